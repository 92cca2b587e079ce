"""The ``payengine`` command line.

    payengine demo [--db PATH] [--orders N] [--seed S] [--json]
    payengine sim --seed S --orders N [--seeds K] [--faults all|none|NAME,...] [--crashes N]
                  [--runtime sim|threads] [--plant-bug NAME] [--json]
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

from engine.order import PLANTABLE_BUGS
from sim.simulation import FAULT_KINDS

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
    simulate = sub.add_parser(
        "sim", help="run the real engine in a seeded, faulty world and check every invariant",
        description="Runs the engine on a deterministic runtime (or real threads) while the "
                    "simulated world loses, duplicates and reorders callbacks, times out, "
                    "crashes the engine, ... then checks the money. Exit status 0 if and only "
                    "if no invariant was violated; a failure prints the command that replays "
                    "it.")
    simulate.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    simulate.add_argument("--seeds", type=int, default=1, help="run seeds S .. S+K-1")
    simulate.add_argument("--orders", type=int, default=200, help="payments per seed")
    simulate.add_argument("--faults", default="all",
                          help="all, none, or a comma list of: " + ", ".join(FAULT_KINDS))
    simulate.add_argument("--crashes", type=int, default=2, help="engine crashes per run")
    simulate.add_argument("--runtime", choices=["sim", "threads"], default="sim")
    simulate.add_argument("--plant-bug", choices=sorted(PLANTABLE_BUGS), default=None,
                          help="switch on a deliberately wrong behaviour (the oracle must "
                               "catch it)")
    simulate.add_argument("--json", action="store_true",
                          help="one JSON object per seed on stdout")
    show = sub.add_parser("show", help="print an order and its journal from a database")
    show.add_argument("order_id")
    show.add_argument("--db", default=DEFAULT_DB, help=f"SQLite file (default {DEFAULT_DB})")
    show.add_argument("--json", action="store_true", help="print as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        return _demo(args)
    if args.command == "sim":
        return _sim(args)
    return _show(args)


def _parse_faults(text: str) -> frozenset[str] | None:
    if text == "all":
        return frozenset(FAULT_KINDS)
    if text == "none":
        return frozenset()
    names = frozenset(n.strip() for n in text.split(",") if n.strip())
    return names if names <= set(FAULT_KINDS) else None


def _sim(args: argparse.Namespace) -> int:
    from sim.demo import Progress
    from sim.simulation import SimConfig, run

    faults = _parse_faults(args.faults)
    if faults is None:
        print(f"payengine sim: unknown fault in {args.faults!r}; known: all, none, "
              + ", ".join(FAULT_KINDS), file=sys.stderr)
        return 2
    if not (0 < args.orders <= 1_000_000 and 0 < args.seeds <= 100_000
            and 0 <= args.crashes <= 1_000):
        print("payengine sim: --orders 1..1000000, --seeds 1..100000, --crashes 0..1000",
              file=sys.stderr)
        return 2
    configure_logging(None)
    bar = Progress("seeds", args.seeds, enabled=args.seeds > 1)
    failed = 0
    for n, seed in enumerate(range(args.seed, args.seed + args.seeds), start=1):
        config = SimConfig(seed=seed, orders=args.orders, faults=faults, crashes=args.crashes,
                           runtime=args.runtime, plant_bug=args.plant_bug)
        result = run(config)
        if args.json:
            print(json.dumps(result.as_json()), flush=True)
        elif args.seeds == 1 or not result.ok:
            print(_sim_line(result), flush=True)
        if not result.ok:
            failed += 1
            _report_failure(result, args, seed)
        bar.show(n, f"{failed} failed")
    bar.finish()
    if not args.json and args.seeds > 1:
        print(f"{args.seeds - failed}/{args.seeds} seeds passed")
    return 1 if failed else 0


def _sim_line(result: Any) -> str:
    states = " ".join(f"{k} {v}" for k, v in result.final_states.items())
    verdict = "OK" if result.ok else f"VIOLATED ({len(result.violations)})"
    return (f"seed {result.seed}: {verdict}  {result.orders} orders  {states}  "
            f"crashes {result.crashes}  {result.virtual_seconds:.1f} virtual s  "
            f"{result.wall_seconds:.2f} wall s  trace {result.trace_hash}")


def _report_failure(result: Any, args: argparse.Namespace, seed: int) -> None:
    """The seed, the first violated invariant with its order's trace, the replay command."""
    out = sys.stderr
    first = result.violations[0]
    print(f"seed {seed}: first violation: {first}", file=out)
    subject = first.subject.split(" ", 1)[1] if first.subject.startswith("order ") else None
    for line in result.traces.get(subject, []) if subject else []:
        print(f"    {line}", file=out)
    replay = (f"payengine sim --seed {seed} --orders {args.orders} --faults {args.faults} "
              f"--crashes {args.crashes} --runtime {args.runtime}")
    if args.plant_bug:
        replay += f" --plant-bug {args.plant_bug}"
    print(f"replay: {replay}", file=out)


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
    store = Store(args.db, exclusive=False)
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
