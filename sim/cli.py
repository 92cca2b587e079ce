"""The ``payengine`` command line, on click (README "Command line").

    payengine demo [--db PATH] [--config F] [--orders N] [--seed S] [--workers W] [--json]
                   [--log-file F] [--no-progress]
    payengine sim --seed S --orders N [--seeds K] [--faults all|none|NAME,...] [--crashes N]
                  [--runtime sim|threads] [--plant-bug NAME] [--jobs J] [--json] [--no-progress]
                  [--report DIR]
    payengine show ORDER_ID [--db PATH] [--config F] [--json]
    payengine report shift --station S --shift SH [--db PATH] [--config F] [--json]
    payengine reconcile FILE [--db PATH] [--config F] [--json] [--period-start T]
                        [--period-end T] [--settle-timeout S] [--log-file F]
    payengine bench [--payments N] [--workers W] [--rate R] [--synchronous FULL|NORMAL]
                    [--open-orders N | --overload] [--json] [--no-progress]
    payengine orders [--db PATH] [--config F] [--state S] [--since T] [--until T]
                     [--merchant M] [--user U] [--station S] [--channel C] [--limit N]
                     [--after CURSOR] [--json]
    payengine attention [--db PATH] [--config F] [--json]
    payengine resolve ITEM ACTION --operator NAME --reason TEXT [--db PATH] [--config F]
                      [--json]
    payengine serve [--config payengine.toml] [--db PATH] [--host H] [--port N]

Every command returns its exit status from ``main`` (0 fine, 1 a finding, 2 a usage error);
results go to stdout, diagnostics and progress bars (``sim.progress``) to stderr. Runs on
the main thread of its process.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, TextIO

import click

from payengine.actors.logs import ROOT_LOGGER_NAME, json_handler
from payengine.engine.order import PLANTABLE_BUGS
from payengine.sim.cli_common import (
    PROG,
    config_option,
    database,
    db_option,
    discount_rules,
    fail,
    json_option,
    open_for_reading,
    out,
    progress_option,
)
from payengine.sim.cli_operator import register as _register_operator_commands
from payengine.sim.simulation import FAULT_KINDS


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


# ---------------------------------------------------------------------- shared options


class _Group(click.Group):
    """Commands listed in the order they were added (the README's), not alphabetically."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)


@click.group(PROG, cls=_Group, context_settings={"help_option_names": ["-h", "--help"],
                                          "max_content_width": 100})
def cli() -> None:
    """An in-process payment engine: combined payments with TCC vouchers, one actor per
    order and per voucher account, durable in SQLite.

    Shell completion: eval "$(_PAYENGINE_COMPLETE=bash_source payengine)" (zsh_source,
    fish_source for those shells)."""


@cli.result_callback()
def _exit_status(status: object) -> object:
    """A command's int is the process's exit status, in click's standalone mode (the
    ``payengine`` script, ``CliRunner``) as through ``main``."""
    if isinstance(status, int) and not isinstance(status, bool) and status:
        raise click.exceptions.Exit(status)
    return status


def main(argv: list[str] | None = None) -> int:
    """Run the command line on ``argv`` (default ``sys.argv[1:]``); its exit status."""
    try:
        result = cli.main(args=argv, prog_name=PROG, standalone_mode=False)
    except click.exceptions.Exit as done:
        return int(done.exit_code)
    except click.ClickException as error:
        error.show()
        return int(error.exit_code)
    except click.Abort:
        click.echo("Aborted!", err=True)
        return 130
    return result if isinstance(result, int) else 0


# ---------------------------------------------------------------------- demo


@cli.command(help="Runs a few hundred combined payments (WeChat Pay + red packet + points + "
                  "phone credit) with failures, timeouts, lost and late callbacks, then "
                  "prints orders per final state and whether every voucher account and "
                  "every order balances. Exit status 0 if and only if everything balances.",
             short_help="run a fuel station's payments over the simulated channel and check "
                        "that every cent balances")
@db_option
@config_option
@click.option("--orders", type=int, default=300, show_default=True, help="payments to run")
@click.option("--seed", type=int, default=7, show_default=True, help="seed of the simulated world")
@click.option("--workers", type=int, default=8, show_default=True,
              help="pump terminals submitting at once")
@json_option("print the summary as one JSON object")
@click.option("--log-file", default="payengine-demo.log", show_default=True,
              help="structured log (JSON lines); '-' for stderr")
@progress_option
def demo(db: str | None, config: str | None, orders: int, seed: int, workers: int,
         as_json: bool, log_file: str, no_progress: bool) -> int:
    from payengine.sim.demo import render, run_demo

    if not 0 < orders <= 100_000:
        return fail("demo", "--orders must be 1..100000")
    if not 0 < workers <= 64:
        return fail("demo", "--workers must be 1..64")
    path = database("demo", db, config)
    discounts = None if path is None else discount_rules("demo", config)
    if path is None or discounts is None:
        return 2
    stream = configure_logging(log_file)
    try:
        result = run_demo(path, orders=orders, seed=seed, workers=workers,
                          progress=not no_progress and not as_json, discounts=discounts)
    finally:
        configure_logging(None)
        if stream is not None and stream is not sys.stderr:
            stream.close()
    out(json.dumps(result.as_json()) if as_json else render(result))
    return 0 if result.ok else 1


# ---------------------------------------------------------------------- sim


@cli.command(help="Runs the engine on a deterministic runtime (or real threads) while the "
                  "simulated world loses, duplicates and reorders callbacks, times out, "
                  "crashes the engine, ... then checks the money. Exit status 0 if and only "
                  "if no invariant was violated; a failure prints the command that replays "
                  "it.",
             short_help="run the real engine in a seeded, faulty world and check every "
                        "invariant")
@click.option("--seed", type=int, default=0, show_default=True, help="first seed")
@click.option("--seeds", type=int, default=1, show_default=True, help="run seeds S .. S+K-1")
@click.option("--orders", type=int, default=200, show_default=True, help="payments per seed")
@click.option("--faults", default="all", show_default=True,
              help="all, none, or a comma list of: " + ", ".join(FAULT_KINDS))
@click.option("--crashes", type=int, default=2, show_default=True, help="engine crashes per run")
@click.option("--runtime", type=click.Choice(["sim", "threads"]), default="sim",
              show_default=True)
@click.option("--plant-bug", type=click.Choice(sorted(PLANTABLE_BUGS)), default=None,
              metavar="{" + ",".join(sorted(PLANTABLE_BUGS)) + "}",
              help="switch on a deliberately wrong behaviour (the oracle must catch it)")
@click.option("--jobs", type=int, default=1, show_default=True,
              help="seeds run side by side in worker processes; 0 = one per core. Results, "
                   "output order and trace hashes do not depend on it")
@json_option("one JSON object per seed on stdout")
@click.option("--report", "report_dir", metavar="DIR", default=None,
              help="write DIR/index.html with charts (final states, faults, settlement "
                   "latency, money in transit) and every violation's replay command; needs "
                   "payengine[report] (matplotlib)")
@progress_option
def sim(seed: int, seeds: int, orders: int, faults: str, crashes: int, runtime: str,
        plant_bug: str | None, jobs: int, as_json: bool, report_dir: str | None,
        no_progress: bool) -> int:
    from payengine.sim.progress import Progress
    from payengine.sim.report import SweepArgs
    from payengine.sim.simulation import JOBS_MAX, SimConfig, run_many

    drawn = _parse_faults(faults)
    if drawn is None:
        return fail("sim", f"unknown fault in {faults!r}; known: all, none, "
                     + ", ".join(FAULT_KINDS))
    if not (0 < orders <= 1_000_000 and 0 < seeds <= 100_000
            and 0 <= crashes <= 1_000 and 0 <= jobs <= JOBS_MAX):
        return fail("sim", f"--orders 1..1000000, --seeds 1..100000, --crashes 0..1000, "
                            f"--jobs 0..{JOBS_MAX}")
    configure_logging(None)
    replay = SweepArgs(orders, faults, crashes, runtime, plant_bug)
    report = _open_report(report_dir, replay)  # the chaos report (sim.report), or None
    if report is False:
        return 2
    workers = min(jobs or os.cpu_count() or 1, seeds, JOBS_MAX)
    configs = (SimConfig(seed=s, orders=orders, faults=drawn, crashes=crashes,
                         runtime=runtime, plant_bug=plant_bug,
                         record_series=report is not None)
               for s in range(seed, seed + seeds))
    bar = Progress("seeds", seeds, enabled=seeds > 1 and not as_json and not no_progress)
    failed = 0
    try:
        for n, result in enumerate(run_many(configs, jobs=workers), start=1):
            if as_json:
                out(json.dumps(result.as_json()))
            elif seeds == 1 or not result.ok:
                out(_sim_line(result))
            sys.stdout.flush()
            if not result.ok:
                failed += 1
                _report_failure(result, replay)
            if report is not None:
                report.add(result)
            bar.show(n, f"{failed} failed")
    except KeyboardInterrupt:  # the workers are killed on the way out (run_many)
        bar.finish()
        click.echo(f"\n{PROG} sim: interrupted", err=True)
        return 130
    bar.finish()
    if report is not None:
        click.echo(f"report: {report.write()}", err=True)
    if not as_json and seeds > 1:
        out(f"{seeds - failed}/{seeds} seeds passed")
    return 1 if failed else 0


def _parse_faults(text: str) -> frozenset[str] | None:
    if text == "all":
        return frozenset(FAULT_KINDS)
    if text == "none":
        return frozenset()
    names = frozenset(n.strip() for n in text.split(",") if n.strip())
    return names if names <= set(FAULT_KINDS) else None


def _sim_line(result: Any) -> str:
    states = " ".join(f"{k} {v}" for k, v in result.final_states.items())
    verdict = "OK" if result.ok else f"VIOLATED ({len(result.violations)})"
    return (f"seed {result.seed}: {verdict}  {result.orders} orders  {states}  "
            f"crashes {result.crashes}  {result.virtual_seconds:.1f} virtual s  "
            f"{result.wall_seconds:.2f} wall s  trace {result.trace_hash}")


def _report_failure(result: Any, args: Any) -> None:
    """The seed, the first violated invariant with its order's trace, the replay command
    (``args``: the sweep's ``sim.report.SweepArgs``)."""
    from payengine.sim.report import replay_command

    seed = result.seed
    first = result.violations[0]
    lines = [f"seed {seed}: first violation: {first}"]
    subject = first.subject.split(" ", 1)[1] if first.subject.startswith("order ") else None
    lines += [f"    {line}" for line in (result.traces.get(subject, []) if subject else [])]
    lines.append(f"replay: {replay_command(seed, args)}")
    click.echo("\n".join(lines), err=True)


def _open_report(directory: str | None, args: Any) -> Any:
    """The chaos report ``--report DIR`` asks for (``payengine.sim.report``), ``None``
    without it, ``False`` after saying on stderr why it cannot be made (exit status 2)."""
    if directory is None:
        return None
    from payengine.engine.errors import PaymentError
    from payengine.sim.report import ChaosReport

    try:
        return ChaosReport(directory, args)
    except (PaymentError, OSError) as error:
        click.echo(f"{PROG} sim: {getattr(error, 'message', error)}", err=True)
        return False


# ---------------------------------------------------------------------- bench


@cli.command(help="Submits combined payments (cash + red packet + points) to a fresh engine "
                  "on a temporary SQLite file through an instant channel, closed loop or "
                  "paced at --rate, and prints payments/s, submit->receipt and "
                  "submit->settled p50/p99, commits, write statements and rows per payment, "
                  "peak threads and RSS. Never asserts a speed.",
             short_help="measure the engine on threads and a SQLite file; print the figures")
@click.option("--payments", type=int, default=1_000, show_default=True, help="payments")
@click.option("--workers", type=int, default=8, show_default=True, help="client threads")
@click.option("--rate", type=float, default=None,
              help="payments/s offered, paced (open loop); default: as fast as taken")
@click.option("--synchronous", type=click.Choice(["FULL", "NORMAL"]), default="FULL",
              show_default=True, help="SQLite durability")
@click.option("--open-orders", type=int, default=None, metavar="N",
              help="instead: hold N payments open (never paid), print threads and RSS, then "
                   "time the reopen that resumes them")
@click.option("--overload", is_flag=True,
              help="instead: measure capacity (closed loop), then offer twice that paced from "
                   "64 client threads; print completions as a share of capacity and how fast "
                   "refused submits were told")
@json_option("print the figures as one JSON object")
@progress_option
def bench(payments: int, workers: int, rate: float | None, synchronous: str,
          open_orders: int | None, overload: bool, as_json: bool, no_progress: bool) -> int:
    from payengine.sim.bench import PAYMENTS_MAX, run_bench, run_open_orders, run_overload

    if not 0 < payments <= PAYMENTS_MAX or not 0 < workers <= 256 or (
        rate is not None and not rate > 0
    ):
        return fail("bench", f"--payments 1..{PAYMENTS_MAX}, --workers 1..256, --rate > 0")
    progress = not as_json and not no_progress
    if open_orders is not None:
        if not 0 < open_orders <= PAYMENTS_MAX:
            return fail("bench", f"--open-orders 1..{PAYMENTS_MAX}")
        held = run_open_orders(open_orders, workers=workers)
        out(held.as_json() if as_json else held.render())
        return 0
    if overload:
        loaded = run_overload(payments, synchronous=synchronous, progress=progress)
        out(loaded.as_json() if as_json else loaded.render())
        return 0
    result = run_bench(payments, workers=workers, rate_per_s=rate, synchronous=synchronous,
                       progress=progress)
    out(result.as_json() if as_json else result.render())
    shed = 0 if rate is None else result.refused
    return 0 if result.settled == result.payments - shed else 1


# ---------------------------------------------------------------------- reading a database


@cli.command(short_help="print an order and its journal from a database",
             help="Prints an order (state, legs, refunds) and its journal. Reads only: safe "
                  "beside a running engine. Exit status 1 if there is no such order.")
@click.argument("order_id")
@db_option
@config_option
@json_option("print as JSON")
def show(order_id: str, db: str | None, config: str | None, as_json: bool) -> int:
    store = open_for_reading("show", db, config)
    if store is None:
        return 2
    try:
        order = store.load_order(order_id)
        if order is None:
            return fail("show", f"no order {order_id} in {store.path}", 1)
        journal = store.journal("order", order.order_id)
    finally:
        store.close()
    from payengine.actors.messages import OrderView

    view = OrderView.of(order)
    if as_json:
        payload: dict[str, Any] = dataclasses.asdict(view)
        payload["journal"] = [dataclasses.asdict(e) for e in journal]
        out(json.dumps(payload))
        return 0
    lines = [f"order {view.order_id}  {view.state} ({view.cause})  total {view.total_minor} "
             f"{view.currency}  serial {view.payment_serial}  settled {view.settled}"]
    for leg in view.legs:
        lines.append(f"  leg {leg.leg_no}: {leg.mode:<11} {leg.amount:>8} {leg.unit:<7} "
                     f"{leg.status}{'  ' + leg.account_id if leg.account_id else ''}")
    for refund in view.refunds:
        parts = ", ".join(f"leg {leg} {amount} {status}" for leg, amount, status in refund.parts)
        lines.append(f"  refund {refund.refund_no} ({refund.kind}, {refund.refund_id}): "
                     f"{refund.amount_minor} {view.currency} {refund.status}  [{parts}]")
    for e in journal:
        lines.append(f"  {e.at_ms}  {e.part:<8} {e.from_state or '-':>20} -> {e.to_state:<20} "
                     f"{e.cause}")
    out("\n".join(lines))
    return 0


@cli.group(cls=_Group, short_help="print a report from a database")
def report() -> None:
    """Print a report from a database (reads only)."""


@report.command(short_help="one station's shift (班结): orders, money by method, refunds, "
                           "discounts, fees, from the ledger",
                help="Reads the orders whose sale names the station and the shift and prints "
                     "their totals from the ledger, by currency: orders by state, paid, gross "
                     "and discounts (succeeded orders), money collected by method net of what "
                     "went back, refunds, channel fees, the merchant's net share, money still "
                     "in transit, litres by grade. Reads only: safe beside a running engine.")
@click.option("--station", required=True, help="the FuelSale station_id")
@click.option("--shift", "shift_id", required=True, help="the FuelSale shift_id")
@db_option
@config_option
@json_option("print as one JSON object")
def shift(station: str, shift_id: str, db: str | None, config: str | None,
          as_json: bool) -> int:
    from payengine.engine.checks import check_id
    from payengine.engine.errors import InvalidRequest
    from payengine.persistence.reports import report_shift

    try:
        check_id(station, "--station")
        check_id(shift_id, "--shift")
    except InvalidRequest as error:
        return fail("report shift", error.message)
    store = open_for_reading("report shift", db, config)
    if store is None:
        return 2
    try:
        found = report_shift(store, station, shift_id)
    finally:
        store.close()
    if as_json:
        out(json.dumps({**dataclasses.asdict(found), "orders": found.orders}))
        return 0
    lines = [f"shift {found.shift_id} at station {found.station_id}: {found.orders} orders "
             + " ".join(f"{state} {n}" for state, n in found.orders_by_state.items())]
    for grade, volume_ml in found.litres_ml_by_grade.items():
        lines.append(f"  {grade:<12} {volume_ml / 1000:>12.3f} litres")
    for currency, totals in found.totals.items():
        lines.append(f"  {currency} (minor units)")
        rows = [("paid orders", totals.paid_orders), ("paid", totals.paid_minor),
                ("gross", totals.gross_minor), ("discounts", totals.discount_minor),
                *((f"  {rule}", amount) for rule, amount in totals.discounts_by_rule.items()),
                *((f"collected {method}", amount)
                  for method, amount in totals.collected_by_method.items()),
                ("refunds", totals.refunds), ("refunded", totals.refunded_minor),
                ("fees", totals.fees_minor), ("merchant net", totals.merchant_net_minor),
                ("in transit", totals.in_transit_minor)]
        lines += [f"    {name:<28} {value:>14}" for name, value in rows]
    out("\n".join(lines))
    return 0


# ---------------------------------------------------------------------- reconcile


@cli.command(short_help="import a channel statement (CSV) and settle what it says",
             help="Imports a channel statement (channel,channel_txn_id,out_trade_no,amount,"
                  "currency,status,time[,refund_id]) into the database: matches every line "
                  "to its order, refunds charges for closed or failed orders by the original "
                  "route, resolves orders awaiting reconciliation, flags amount mismatches, "
                  "unknown orders and charged orders missing from the statement. Importing "
                  "the same file again changes nothing. Runs over the demo's simulated "
                  "channel, rebuilt from the statement. Exit status 0 if nothing is flagged, "
                  "1 if something is, 2 on a usage error or a malformed statement (then "
                  "nothing is applied).")
@click.argument("file")
@db_option
@config_option
@json_option("print the report as one JSON object")
@click.option("--period-start", default=None, metavar="TIME",
              help="ISO-8601 UTC; orders created from then on are expected on the statement "
                   "(default: the first line's time)")
@click.option("--period-end", default=None, metavar="TIME",
              help="ISO-8601 UTC; the statement's cut-off (default: the last line's time). An "
                   "order awaiting reconciliation fails for its absence only if its pay window "
                   "closed by then")
@click.option("--settle-timeout", type=float, default=5.0, show_default=True,
              help="seconds to wait for the refunds and releases it started before closing "
                   "the engine (the rest resumes at the next open)")
@click.option("--log-file", default=None,
              help="structured log (JSON lines); '-' for stderr (default: none)")
def reconcile(file: str, db: str | None, config: str | None, as_json: bool,
              period_start: str | None, period_end: str | None, settle_timeout: float,
              log_file: str | None) -> int:
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

    def refuse(message: str) -> int:
        return fail("reconcile", message)

    path = database("reconcile", db, config)
    discounts = None if path is None else discount_rules("reconcile", config)
    if path is None or discounts is None:
        return 2
    statement = Path(file)
    if not statement.is_file():
        return refuse(f"no statement file {file}")
    if not Path(path).exists():
        return refuse(f"no database at {path}")
    if not 0 <= settle_timeout <= 3600:
        return refuse("--settle-timeout must be 0..3600 seconds")
    try:
        period = [None if t is None else parse_time(t) for t in (period_start, period_end)]
    except StatementError as error:
        return refuse(f"--period-start/--period-end: {error.message}")
    try:  # validate before opening anything: a malformed statement changes nothing
        with open(statement, encoding="utf-8", newline="") as handle:
            lines = list(iter_statement(handle))
    except StatementError as error:
        return refuse(f"{file}: {error.message}")
    except UnicodeDecodeError as error:
        return refuse(f"{file} is not UTF-8 text: {error.reason}")
    stream = configure_logging(log_file)
    world = ThreadRuntime()
    engine = None
    try:
        channel = channel_knowing("wechat", world, lines)
        del lines
        engine = Engine.open(path, channels=[channel], policy=DEMO_POLICY,
                             config=EngineConfig(account_idle_ms=1_000, pre_hold_ttl_ms=1_500,
                                                 discounts=discounts))
        channel.attach(engine)
        found = engine.reconcile(statement, period_start_ms=period[0], period_end_ms=period[1])
        deadline = time.monotonic() + settle_timeout
        while engine.unsettled_count() and time.monotonic() < deadline:
            time.sleep(0.05)
    except PaymentError as error:
        return refuse(f"{error.code}: {error.message}")
    finally:
        if engine is not None:
            engine.shutdown()
        world.shutdown()
        if stream is not None and stream is not sys.stderr:
            stream.close()
    out(found.to_json() if as_json else found.to_table())
    return 0 if found.ok else 1


# ---------------------------------------------------------------------- serve


@cli.command(help="An HTTP service (FastAPI on uvicorn) over the engine on --db; without "
                  "--config the simulated wallet on 127.0.0.1:8000. Ctrl-C or SIGTERM "
                  "stops it gracefully (exit 0). Exit 1: the engine cannot be opened; 2: a "
                  "bad configuration or the server extra missing.",
             short_help="serve the engine over HTTP (needs 'payengine[server]')")
@click.option("--config", default=None, metavar="FILE", type=click.Path(dir_okay=False),
              help="payengine.toml (default: none)")
@click.option("--db", default=None, metavar="PATH",
              help="SQLite file (default: [engine] db, else payengine.db)")
@click.option("--host", default=None, help="address (default: [service] host, else 127.0.0.1)")
@click.option("--port", type=int, default=None,
              help="port (default: [service] port, else 8000)")
def serve(config: str | None, db: str | None, host: str | None, port: int | None) -> int:
    from payengine.actors.service import run_server

    return run_server(config, db=db, host=host, port=port)


# ---------------------------------------------------------------------- operator tools

_register_operator_commands(cli)


if __name__ == "__main__":
    sys.exit(main())
