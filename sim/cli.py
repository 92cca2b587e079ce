"""The ``payengine`` command line.

    payengine demo [--db PATH] [--orders N] [--seed S] [--json]
    payengine show ORDER_ID [--db PATH] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any, TextIO

import structlog

DEFAULT_DB = "payengine.db"


def configure_logging(log_file: str | None, level: str = "info") -> TextIO | None:
    """Structured logs as JSON lines to ``log_file`` (``-`` for stderr); ``None``: off."""
    numeric = getattr(logging, level.upper())
    if log_file is None:
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
        return None
    stream: TextIO = sys.stderr if log_file == "-" else open(log_file, "a", encoding="utf-8")  # noqa: SIM115
    structlog.configure(
        processors=[structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso", utc=True),
                    structlog.processors.JSONRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    return stream


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="payengine",
        description="An in-process payment engine: combined payments with TCC vouchers, "
                    "one actor per order and per voucher account, durable in SQLite.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="run a fuel station's payments over the simulated channel and check "
                     "that every cent balances",
        description="Runs a few hundred combined payments (WeChat Pay + red packet + points + "
                    "phone credit) with failures, timeouts, lost and late callbacks, then "
                    "prints orders per final state and whether every voucher account and "
                    "every order balances. Exit status 0 if and only if everything balances.")
    demo.add_argument("--db", default=DEFAULT_DB, help=f"SQLite file (default {DEFAULT_DB})")
    demo.add_argument("--orders", type=int, default=300, help="payments to run (default 300)")
    demo.add_argument("--seed", type=int, default=7, help="seed of the simulated world")
    demo.add_argument("--workers", type=int, default=8, help="pump terminals submitting at once")
    demo.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    demo.add_argument("--log-file", default="payengine-demo.log",
                      help="structured log (JSON lines); '-' for stderr (default "
                           "payengine-demo.log)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    show = sub.add_parser("show", help="print an order and its journal from a database")
    show.add_argument("order_id")
    show.add_argument("--db", default=DEFAULT_DB, help=f"SQLite file (default {DEFAULT_DB})")
    show.add_argument("--json", action="store_true", help="print as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        return _demo(args)
    return _show(args)


def _demo(args: argparse.Namespace) -> int:
    from sim.demo import render, run_demo

    if not 0 < args.orders <= 100_000:
        print("payengine demo: --orders must be 1..100000", file=sys.stderr)
        return 2
    stream = configure_logging(args.log_file)
    try:
        result = run_demo(args.db, orders=args.orders, seed=args.seed, workers=args.workers,
                          progress=not args.no_progress and not args.json)
    finally:
        if stream is not None and stream is not sys.stderr:
            stream.close()
    print(json.dumps(result.as_json()) if args.json else render(result))
    return 0 if result.ok else 1


def _show(args: argparse.Namespace) -> int:
    from persistence.store import Store

    if not Path(args.db).exists():
        print(f"payengine show: no database at {args.db}", file=sys.stderr)
        return 2
    store = Store(args.db)
    try:
        order = store.load_order(args.order_id)
        if order is None:
            print(f"payengine show: no order {args.order_id} in {args.db}", file=sys.stderr)
            return 1
        journal = store.journal("order", order.order_id)
    finally:
        store.close()
    from actors.messages import OrderView

    view = OrderView.of(order)
    if args.json:
        payload: dict[str, Any] = dataclasses.asdict(view)
        payload["journal"] = [dataclasses.asdict(e) for e in journal]
        print(json.dumps(payload))
        return 0
    print(f"order {view.order_id}  {view.state} ({view.cause})  total {view.total_minor} "
          f"{view.currency}  serial {view.payment_serial}  settled {view.settled}")
    for leg in view.legs:
        print(f"  leg {leg.leg_no}: {leg.mode:<11} {leg.amount:>8} {leg.unit:<7} {leg.status}"
              f"{'  ' + leg.account_id if leg.account_id else ''}")
    for e in journal:
        print(f"  {e.at_ms}  {e.part:<8} {e.from_state or '-':>20} -> {e.to_state:<20} {e.cause}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
