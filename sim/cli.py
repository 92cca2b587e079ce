"""The ``payengine`` command line.

    payengine demo [--db PATH] [--orders N] [--seed S] [--json]
    payengine sim --seed S --orders N [--seeds K] [--faults all|none|NAME,...] [--crashes N]
                  [--runtime sim|threads] [--plant-bug NAME] [--jobs J] [--json]
                  [--report DIR]
    payengine show ORDER_ID [--db PATH] [--json]
    payengine report shift --station S --shift SH [--db PATH] [--json]
    payengine reconcile FILE [--db PATH] [--json] [--period-start T] [--period-end T]
                        [--settle-timeout S] [--log-file F]
    payengine bench [--payments N] [--workers W] [--rate R] [--synchronous FULL|NORMAL]
                    [--open-orders N] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, TextIO

from payengine.actors.logs import ROOT_LOGGER_NAME, json_handler
from payengine.engine.order import PLANTABLE_BUGS
from payengine.sim.simulation import FAULT_KINDS

DEFAULT_DB = "payengine.db"


def configure_logging(log_file: str | None, level: str = "info") -> TextIO | None:
    """Structured logs as JSON lines to ``log_file`` (``-`` for stderr); ``None``: off.

    The engine logs into the stdlib logger ``payengine`` (see ``payengine.actors.logs``);
    the CLI, being the application here, gives it a JSON-lines handler.
    """
    numeric = getattr(logging, level.upper())
    engine_logger = logging.getLogger(ROOT_LOGGER_NAME)
    for handler in [h for h in engine_logger.handlers if getattr(h, "payengine_cli", False)]:
        engine_logger.removeHandler(handler)
    if log_file is None:
        return None
    stream: TextIO = sys.stderr if log_file == "-" else open(log_file, "a", encoding="utf-8")  # noqa: SIM115
    handler = json_handler(stream, numeric)
    handler.payengine_cli = True  # type: ignore[attr-defined]
    engine_logger.addHandler(handler)
    engine_logger.setLevel(numeric)
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
    simulate.add_argument("--jobs", type=int, default=1,
                          help="seeds run side by side in worker processes; 0 = one per core "
                               "(default 1). Results, output order and trace hashes do not "
                               "depend on it")
    simulate.add_argument("--json", action="store_true",
                          help="one JSON object per seed on stdout")
    # --- chaos report (issue 13 item 5): all its logic is in payengine.sim.report ---
    simulate.add_argument("--report", metavar="DIR", default=None,
                          help="write DIR/index.html with charts (final states, faults, "
                               "settlement latency, money in transit) and every violation's "
                               "replay command; needs payengine[report] (matplotlib)")
    # --- end of the chaos report's block ---
    show = sub.add_parser("show", help="print an order and its journal from a database")
    show.add_argument("order_id")
    show.add_argument("--db", default=DEFAULT_DB, help=f"SQLite file (default {DEFAULT_DB})")
    show.add_argument("--json", action="store_true", help="print as JSON")
    report = sub.add_parser("report", help="print a report from a database")
    kinds = report.add_subparsers(dest="report", required=True, metavar="REPORT")
    shift = kinds.add_parser(
        "shift", help="one station's shift (班结): orders, money by method, refunds, "
                      "discounts, fees, from the ledger",
        description="Reads the orders whose sale names the station and the shift and prints "
                    "their totals from the ledger, by currency: orders by state, paid, gross "
                    "and discounts (succeeded orders), money collected by method net of what "
                    "went back, refunds, channel fees, the merchant's net share, money still "
                    "in transit, litres by grade. Reads only: safe beside a running engine.")
    shift.add_argument("--station", required=True, help="the FuelSale station_id")
    shift.add_argument("--shift", required=True, help="the FuelSale shift_id")
    shift.add_argument("--db", default=DEFAULT_DB, help=f"SQLite file (default {DEFAULT_DB})")
    shift.add_argument("--json", action="store_true", help="print as one JSON object")
    recon = sub.add_parser(
        "reconcile", help="import a channel statement (CSV) and settle what it says",
        description="Imports a channel statement (channel,channel_txn_id,out_trade_no,amount,"
                    "currency,status,time[,refund_id]) into the database: matches every line "
                    "to its order, refunds charges for closed or failed orders by the original "
                    "route, resolves orders awaiting reconciliation, flags amount mismatches, "
                    "unknown orders and charged orders missing from the statement. Importing "
                    "the same file again changes nothing. Runs over the demo's simulated "
                    "channel, rebuilt from the statement. Exit status 0 if nothing is flagged, "
                    "1 if something is, 2 on a usage error or a malformed statement (then "
                    "nothing is applied).")
    recon.add_argument("file", help="the statement, CSV in UTF-8 with a header row")
    recon.add_argument("--db", default=DEFAULT_DB, help=f"SQLite file (default {DEFAULT_DB})")
    recon.add_argument("--json", action="store_true", help="print the report as one JSON object")
    recon.add_argument("--period-start", default=None, metavar="TIME",
                       help="ISO-8601 UTC; orders created from then on are expected on the "
                            "statement (default: the first line's time)")
    recon.add_argument("--period-end", default=None, metavar="TIME",
                       help="ISO-8601 UTC; the statement's cut-off (default: the last line's "
                            "time). An order awaiting reconciliation fails for its absence only "
                            "if its pay window closed by then")
    recon.add_argument("--settle-timeout", type=float, default=5.0,
                       help="seconds to wait for the refunds and releases it started before "
                            "closing the engine (default 5; the rest resumes at the next open)")
    recon.add_argument("--log-file", default=None,
                       help="structured log (JSON lines); '-' for stderr (default: none)")
    bench = sub.add_parser(
        "bench", help="measure the engine on threads and a SQLite file; print the figures",
        description="Submits combined payments (cash + red packet + points) to a fresh engine "
                    "on a temporary SQLite file through an instant channel, closed loop or "
                    "paced at --rate, and prints payments/s, submit->receipt and "
                    "submit->settled p50/p99, commits, write statements and rows per payment, "
                    "peak threads and RSS. Never asserts a speed.")
    bench.add_argument("--payments", type=int, default=1_000, help="payments (default 1000)")
    bench.add_argument("--workers", type=int, default=8, help="client threads (default 8)")
    bench.add_argument("--rate", type=float, default=None,
                       help="payments/s offered, paced (open loop); default: as fast as taken")
    bench.add_argument("--synchronous", choices=["FULL", "NORMAL"], default="FULL",
                       help="SQLite durability (default FULL)")
    bench.add_argument("--open-orders", type=int, default=None, metavar="N",
                       help="instead: hold N payments open (never paid), print threads and "
                            "RSS, then time the reopen that resumes them")
    bench.add_argument("--overload", action="store_true",
                       help="instead: measure capacity (closed loop), then offer twice that "
                            "paced from 64 client threads; print completions as a share of "
                            "capacity and how fast refused submits were told")
    bench.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    # ---- payengine serve (one block: payengine.actors.service.run_server does the work)
    serve = sub.add_parser(
        "serve", help="serve the engine over HTTP (needs 'payengine[server]')",
        description="An HTTP service (FastAPI on uvicorn) over the engine on --db; without "
                    "--config the simulated wallet on 127.0.0.1:8000. Ctrl-C stops it "
                    "gracefully. Exit 2: a bad configuration or the server extra missing.")
    serve.add_argument("--config", default=None, help="payengine.toml (default: none)")
    serve.add_argument("--db", default=None, help="SQLite file (default: [engine] db, "
                                                  "else payengine.db)")
    serve.add_argument("--host", default=None, help="address (default: [service] host, "
                                                    "else 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="port (default: [service] "
                                                              "port, else 8000)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        return _demo(args)
    if args.command == "bench":
        return _bench(args)
    if args.command == "sim":
        try:
            return _sim(args)
        except KeyboardInterrupt:  # the workers are killed on the way out (run_many)
            print("\npayengine sim: interrupted", file=sys.stderr)
            return 130
    if args.command == "reconcile":
        return _reconcile(args)
    if args.command == "report":
        return _report_shift(args)
    if args.command == "serve":
        from payengine.actors.service import run_server

        return run_server(args.config, db=args.db, host=args.host, port=args.port)
    return _show(args)


def _parse_faults(text: str) -> frozenset[str] | None:
    if text == "all":
        return frozenset(FAULT_KINDS)
    if text == "none":
        return frozenset()
    names = frozenset(n.strip() for n in text.split(",") if n.strip())
    return names if names <= set(FAULT_KINDS) else None


def _sim(args: argparse.Namespace) -> int:
    from payengine.sim.demo import Progress
    from payengine.sim.simulation import JOBS_MAX, SimConfig, run_many

    faults = _parse_faults(args.faults)
    if faults is None:
        print(f"payengine sim: unknown fault in {args.faults!r}; known: all, none, "
              + ", ".join(FAULT_KINDS), file=sys.stderr)
        return 2
    if not (0 < args.orders <= 1_000_000 and 0 < args.seeds <= 100_000
            and 0 <= args.crashes <= 1_000 and 0 <= args.jobs <= JOBS_MAX):
        print(f"payengine sim: --orders 1..1000000, --seeds 1..100000, --crashes 0..1000, "
              f"--jobs 0..{JOBS_MAX}", file=sys.stderr)
        return 2
    configure_logging(None)
    report = _open_report(args)  # the chaos report (payengine.sim.report), or None
    if report is False:
        return 2
    jobs = min(args.jobs or os.cpu_count() or 1, args.seeds, JOBS_MAX)
    configs = (SimConfig(seed=seed, orders=args.orders, faults=faults, crashes=args.crashes,
                         runtime=args.runtime, plant_bug=args.plant_bug,
                         record_series=report is not None)
               for seed in range(args.seed, args.seed + args.seeds))
    bar = Progress("seeds", args.seeds, enabled=args.seeds > 1)
    failed = 0
    for n, result in enumerate(run_many(configs, jobs=jobs), start=1):
        seed = result.seed
        if args.json:
            print(json.dumps(result.as_json()), flush=True)
        elif args.seeds == 1 or not result.ok:
            print(_sim_line(result), flush=True)
        if not result.ok:
            failed += 1
            _report_failure(result, args, seed)
        if report is not None:
            report.add(result)
        bar.show(n, f"{failed} failed")
    bar.finish()
    if report is not None:
        print(f"report: {report.write()}", file=sys.stderr)
    if not args.json and args.seeds > 1:
        print(f"{args.seeds - failed}/{args.seeds} seeds passed")
    return 1 if failed else 0


def _open_report(args: argparse.Namespace) -> Any:
    """The chaos report ``--report DIR`` asks for (``payengine.sim.report``), ``None``
    without it, ``False`` after saying on stderr why it cannot be made (exit status 2)."""
    if args.report is None:
        return None
    from payengine.engine.errors import PaymentError
    from payengine.sim.report import ChaosReport, SweepArgs

    try:
        return ChaosReport(args.report, SweepArgs(args.orders, args.faults, args.crashes,
                                                  args.runtime, args.plant_bug))
    except (PaymentError, OSError) as error:
        print(f"payengine sim: {getattr(error, 'message', error)}", file=sys.stderr)
        return False


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


def _bench(args: argparse.Namespace) -> int:
    from payengine.sim.bench import PAYMENTS_MAX, run_bench, run_open_orders, run_overload

    if not 0 < args.payments <= PAYMENTS_MAX or not 0 < args.workers <= 256 or (
        args.rate is not None and not args.rate > 0
    ):
        print(f"payengine bench: --payments 1..{PAYMENTS_MAX}, --workers 1..256, --rate > 0",
              file=sys.stderr)
        return 2
    if args.open_orders is not None:
        if not 0 < args.open_orders <= PAYMENTS_MAX:
            print(f"payengine bench: --open-orders 1..{PAYMENTS_MAX}", file=sys.stderr)
            return 2
        held = run_open_orders(args.open_orders, workers=args.workers)
        print(held.as_json() if args.json else held.render())
        return 0
    if args.overload:
        overload = run_overload(args.payments, synchronous=args.synchronous,
                                progress=not args.json)
        print(overload.as_json() if args.json else overload.render())
        return 0
    result = run_bench(args.payments, workers=args.workers, rate_per_s=args.rate,
                       synchronous=args.synchronous, progress=not args.json)
    print(result.as_json() if args.json else result.render())
    shed = 0 if args.rate is None else result.refused
    return 0 if result.settled == result.payments - shed else 1


def _demo(args: argparse.Namespace) -> int:
    from payengine.sim.demo import render, run_demo

    if not 0 < args.orders <= 100_000:
        print("payengine demo: --orders must be 1..100000", file=sys.stderr)
        return 2
    stream = configure_logging(args.log_file)
    try:
        result = run_demo(args.db, orders=args.orders, seed=args.seed, workers=args.workers,
                          progress=not args.no_progress and not args.json)
    finally:
        configure_logging(None)
        if stream is not None and stream is not sys.stderr:
            stream.close()
    print(json.dumps(result.as_json()) if args.json else render(result))
    return 0 if result.ok else 1


def _show(args: argparse.Namespace) -> int:
    store = _store_for_reading(args.db, "show")
    if store is None:
        return 2
    try:
        order = store.load_order(args.order_id)
        if order is None:
            print(f"payengine show: no order {args.order_id} in {args.db}", file=sys.stderr)
            return 1
        journal = store.journal("order", order.order_id)
    finally:
        store.close()
    from payengine.actors.messages import OrderView

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
    for refund in view.refunds:
        parts = ", ".join(f"leg {leg} {amount} {status}" for leg, amount, status in refund.parts)
        print(f"  refund {refund.refund_no} ({refund.kind}, {refund.refund_id}): "
              f"{refund.amount_minor} {view.currency} {refund.status}  [{parts}]")
    for e in journal:
        print(f"  {e.at_ms}  {e.part:<8} {e.from_state or '-':>20} -> {e.to_state:<20} {e.cause}")
    return 0


def _store_for_reading(db: str, command: str) -> Any:
    """The store at ``db`` opened beside any running engine (no lock), or ``None`` after
    saying why on stderr: no such file, a folder, a file that is not a database of this
    schema. Checked on a read-only connection first, so a read never writes (an empty or
    foreign file is not given the engine's tables)."""
    import sqlite3

    from payengine.persistence.store import SCHEMA_VERSION, Store

    path = Path(db)
    if not path.is_file():
        print(f"payengine {command}: no database at {db}", file=sys.stderr)
        return None
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        finally:
            conn.close()
    except sqlite3.Error:
        row = None
    if row is None or row[0] != str(SCHEMA_VERSION):
        found = "no payengine database" if row is None else f"schema version {row[0]}"
        print(f"payengine {command}: {db} is not a payengine database of schema version "
              f"{SCHEMA_VERSION} ({found})", file=sys.stderr)
        return None
    return Store(db, read_only=True)


def _report_shift(args: argparse.Namespace) -> int:
    from payengine.engine.checks import check_id
    from payengine.engine.errors import InvalidRequest
    from payengine.persistence.reports import report_shift

    try:
        check_id(args.station, "--station")
        check_id(args.shift, "--shift")
    except InvalidRequest as error:
        print(f"payengine report shift: {error.message}", file=sys.stderr)
        return 2
    store = _store_for_reading(args.db, "report shift")
    if store is None:
        return 2
    try:
        report = report_shift(store, args.station, args.shift)
    finally:
        store.close()
    if args.json:
        print(json.dumps({**dataclasses.asdict(report), "orders": report.orders}))
        return 0
    print(f"shift {report.shift_id} at station {report.station_id}: {report.orders} orders "
          + " ".join(f"{state} {n}" for state, n in report.orders_by_state.items()))
    for grade, volume_ml in report.litres_ml_by_grade.items():
        print(f"  {grade:<12} {volume_ml / 1000:>12.3f} litres")
    for currency, totals in report.totals.items():
        print(f"  {currency} (minor units)")
        rows = [("paid orders", totals.paid_orders), ("paid", totals.paid_minor),
                ("gross", totals.gross_minor), ("discounts", totals.discount_minor),
                *((f"  {rule}", amount) for rule, amount in totals.discounts_by_rule.items()),
                *((f"collected {method}", amount)
                  for method, amount in totals.collected_by_method.items()),
                ("refunds", totals.refunds), ("refunded", totals.refunded_minor),
                ("fees", totals.fees_minor), ("merchant net", totals.merchant_net_minor),
                ("in transit", totals.in_transit_minor)]
        for name, value in rows:
            print(f"    {name:<28} {value:>14}")
    return 0


def _reconcile(args: argparse.Namespace) -> int:
    """Open the database the way the demo does (its simulated wallet, its policy) and import
    the statement. The wallet's records died with the demo's process, so the simulated
    channel is rebuilt from the statement: the refunds reconciliation asks for find their
    charges, as they would at a real wallet."""
    import time

    from payengine.actors.base import EngineConfig
    from payengine.actors.engine import Engine
    from payengine.actors.runtime import ThreadRuntime
    from payengine.engine.errors import PaymentError
    from payengine.engine.statement import StatementError, iter_statement, parse_time
    from payengine.sim.demo import DEMO_POLICY
    from payengine.sim.statement import channel_knowing

    def fail(message: str) -> int:
        print(f"payengine reconcile: {message}", file=sys.stderr)
        return 2

    statement = Path(args.file)
    if not statement.is_file():
        return fail(f"no statement file {args.file}")
    if not Path(args.db).exists():
        return fail(f"no database at {args.db}")
    if not 0 <= args.settle_timeout <= 3600:
        return fail("--settle-timeout must be 0..3600 seconds")
    try:
        period = [None if t is None else parse_time(t) for t in (args.period_start, args.period_end)]
    except StatementError as error:
        return fail(f"--period-start/--period-end: {error.message}")
    try:  # validate before opening anything: a malformed statement changes nothing
        with open(statement, encoding="utf-8", newline="") as handle:
            lines = list(iter_statement(handle))
    except StatementError as error:
        return fail(f"{args.file}: {error.message}")
    except UnicodeDecodeError as error:
        return fail(f"{args.file} is not UTF-8 text: {error.reason}")
    stream = configure_logging(args.log_file)
    world = ThreadRuntime()
    engine = None
    try:
        channel = channel_knowing("wechat", world, lines)
        del lines
        engine = Engine.open(args.db, channels=[channel], policy=DEMO_POLICY,
                             config=EngineConfig(account_idle_ms=1_000, pre_hold_ttl_ms=1_500))
        channel.attach(engine)
        report = engine.reconcile(statement, period_start_ms=period[0], period_end_ms=period[1])
        deadline = time.monotonic() + args.settle_timeout
        while engine.unsettled_count() and time.monotonic() < deadline:
            time.sleep(0.05)
    except PaymentError as error:
        return fail(f"{error.code}: {error.message}")
    finally:
        if engine is not None:
            engine.shutdown()
        world.shutdown()
        if stream is not None and stream is not sys.stderr:
            stream.close()
    print(report.to_json() if args.json else report.to_table())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
