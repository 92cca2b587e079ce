"""Reconciliation end to end: real actors, a real SQLite file, statements written here."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from payengine import ChannelReply, Engine, EngineConfig, InvalidRequest, OrderPolicy, Receipt
from payengine.actors.reconcile import ReconciliationReport
from payengine.actors.runtime import ThreadRuntime
from payengine.engine.statement import StatementError, Verdict, format_time, parse_statement
from payengine.persistence import statements
from payengine.sim.channel import ChannelFaults, SimulatedChannel
from payengine.sim.cli import main
from payengine.sim.statement import statement_from_channel
from tests.helpers import (
    PROCESSING,
    ScriptedChannel,
    fuel_request,
    fund_customer,
    open_engine,
    signed_callback,
    wait_for,
)

POLICY = OrderPolicy(pay_window_ms=60_000, query_schedule_ms=(20, 20),
                     refund_query_schedule_ms=(60_000,))
"""Queries run out within ~40 ms (the order then awaits reconciliation); nothing else fires."""

HEADER = "channel,channel_txn_id,out_trade_no,amount,currency,status,time,refund_id"



@pytest.fixture
def engine(tmp_path: Path, channel: ScriptedChannel) -> Iterator[Engine]:
    eng = open_engine(tmp_path / "pay.db", channel, POLICY)
    fund_customer(eng)
    fund_customer(eng, "bob")
    yield eng
    eng.shutdown()


def state(engine: Engine, receipt: Receipt) -> str:
    return engine.get_order(receipt.order_id).state


def cash_status(engine: Engine, receipt: Receipt) -> str:
    return engine.get_order(receipt.order_id).legs[0].status


def awaiting(engine: Engine, no: str, who: str = "alice") -> Receipt:
    """An order whose queries ran out: it waits for reconciliation, its holds kept."""
    receipt = engine.submit(fuel_request(no, who))
    wait_for(lambda: state(engine, receipt) == "needs_reconciliation", what=f"{no} awaiting")
    return receipt


def paid(engine: Engine, no: str, txn: str) -> Receipt:
    receipt = awaiting(engine, no)
    reply = ChannelReply("SUCCESS", "SUCCESS", txn, 9_600)
    assert signed_callback(engine, "wechat", receipt.payment_serial, reply) == "succeeded"
    wait_for(lambda: engine.get_order(receipt.order_id).settled, what=f"{no} settled")
    return receipt


def closed(engine: Engine, no: str) -> Receipt:
    receipt = awaiting(engine, no)
    engine.close(receipt.order_id)
    wait_for(lambda: engine.get_order(receipt.order_id).settled, what=f"{no} closed")
    assert cash_status(engine, receipt) == "unpaid"
    return receipt


def row(serial: str, txn: str, amount: str = "96.00", at_ms: int | None = None,
        status: str = "SUCCESS", refund_id: str = "") -> str:
    at = format_time(at_ms if at_ms is not None else int(time.time() * 1000))
    return f"wechat,{txn},{serial},{amount},CNY,{status},{at},{refund_id}"


def csv_text(*rows: str) -> str:
    return "\n".join((HEADER, *rows)) + "\n"


def versions(engine: Engine) -> dict[str, int]:
    return {order.order_id: order.version for order in engine.store.iter_orders()}


def verdicts(report: ReconciliationReport) -> dict[str | None, Verdict]:
    return {entry.order_id: entry.verdict for entry in report.entries}


@dataclass
class Day:
    """A morning at the pump, and the wechat statement for it."""

    matched: Receipt
    closed: Receipt
    resolved: Receipt
    absent: Receipt
    mismatch: Receipt
    missing: Receipt
    text: str
    period_end_ms: int
    """A daily statement's cut-off: after the pay windows of this morning's orders closed.
    (An order still awaiting reconciliation fails for its absence only then.)"""

    def reconcile(self, engine: Engine) -> ReconciliationReport:
        return engine.reconcile(self.text, period_end_ms=self.period_end_ms)


def a_day(engine: Engine) -> Day:
    start = engine.runtime.now_ms() - 1_000
    matched = paid(engine, "m-1", "TX-A")
    shut = closed(engine, "c-1")
    resolved = awaiting(engine, "r-1")
    absent = awaiting(engine, "a-1", who="bob")
    mismatch = awaiting(engine, "x-1")
    missing = paid(engine, "f-1", "TX-F")
    text = csv_text(
        row(matched.payment_serial, "TX-A", at_ms=start),  # the period starts here
        row(shut.payment_serial, "TX-B"),
        row(resolved.payment_serial, "TX-C"),
        row(mismatch.payment_serial, "TX-E", amount="95.00"),
        row("P-not-ours", "TX-Z"),
    )
    end = engine.runtime.now_ms() + POLICY.pay_window_ms
    return Day(matched, shut, resolved, absent, mismatch, missing, text, end)


# ---------------------------------------------------------------------- the statement's lines


def test_every_kind_of_line_is_matched_refunded_resolved_or_flagged(
    engine: Engine, channel: ScriptedChannel
) -> None:
    day = a_day(engine)
    missing_version = engine.store.load_order(day.missing.order_id).version  # type: ignore[union-attr]

    report = day.reconcile(engine)

    by_order = verdicts(report)
    assert by_order[day.matched.order_id] is Verdict.MATCHED
    assert by_order[day.closed.order_id] is Verdict.ERROR_REFUND
    assert by_order[day.resolved.order_id] is Verdict.RESOLVED_SUCCESS
    assert by_order[day.absent.order_id] is Verdict.RESOLVED_FAILED
    assert by_order[day.mismatch.order_id] is Verdict.AMOUNT_MISMATCH
    assert by_order[day.missing.order_id] is Verdict.MISSING_ON_STATEMENT
    assert by_order[None] is Verdict.UNKNOWN_ORDER
    assert report.lines == 5 and report.flagged == 3 and not report.ok
    assert [e.line_no for e in report.entries[:5]] == [2, 3, 4, 5, 6]

    # 差错退款: the closed order's charge goes back by the original route, recorded
    serial = day.closed.payment_serial
    assert ("refund", serial, f"{serial}-R1", "9600") in channel.calls
    assert state(engine, day.closed) == "closed"
    assert cash_status(engine, day.closed) == "refunding"

    # the order awaiting reconciliation succeeds on the statement's word
    wait_for(lambda: engine.get_order(day.resolved.order_id).settled, what="resolved settled")
    assert state(engine, day.resolved) == "succeeded"
    assert any("reconciliation" in e.cause for e in engine.journal(day.resolved.order_id))
    assert engine.get_account("alice/points").spent == 60  # m-1, r-1, f-1

    # the one the channel never charged fails, and bob gets every voucher back
    wait_for(lambda: engine.get_order(day.absent.order_id).settled, what="absent settled")
    assert state(engine, day.absent) == "failed"
    for account in ("bob/red-packet", "bob/points", "bob/phone"):
        view = engine.get_account(account)
        assert (view.available, view.held, view.spent) == (view.funded, 0, 0), view

    # another amount: flagged, never a success; it keeps waiting with the charge unknown
    assert state(engine, day.mismatch) == "needs_reconciliation"
    assert cash_status(engine, day.mismatch) == "unknown"

    # charged by the engine's records, absent from the statement: reported, not touched
    assert engine.store.load_order(day.missing.order_id).version == missing_version  # type: ignore[union-attr]
    assert state(engine, day.missing) == "succeeded"

    (record,) = statements.imports(engine.store)
    assert record.finished_at_ms is not None and record.lines == 5
    assert record.counts["ERROR_REFUND"] == 1


def test_importing_the_same_statement_twice_changes_nothing(
    engine: Engine, channel: ScriptedChannel
) -> None:
    day = a_day(engine)
    first = day.reconcile(engine)
    wait_for(lambda: engine.get_order(day.resolved.order_id).settled, what="resolved settled")
    wait_for(lambda: engine.get_order(day.absent.order_id).settled, what="absent settled")
    time.sleep(0.1)  # let the refund's synchronous "processing" reply come back
    before, calls = versions(engine), len(channel.calls)

    second = day.reconcile(engine)

    line_entries = [e for e in second.entries if e.line_no is not None]
    assert [e.verdict for e in line_entries] == [Verdict.ALREADY_IMPORTED] * 5
    assert "imported in import #1 as ERROR_REFUND" in line_entries[1].detail
    # what was only reported is reported again, and still not touched
    assert verdicts(second)[day.missing.order_id] is Verdict.MISSING_ON_STATEMENT
    assert second.count(Verdict.RESOLVED_FAILED) == 0
    assert first.digest == second.digest
    time.sleep(0.1)
    assert versions(engine) == before
    assert len(channel.calls) == calls


def test_a_crash_between_feeding_and_recording_re_feeds_harmlessly(
    engine: Engine, channel: ScriptedChannel
) -> None:
    """Lines are recorded after their order committed; lose the records (a crash right
    before them) and the next import feeds the same results again: the core ignores them."""
    day = a_day(engine)
    day.reconcile(engine)
    wait_for(lambda: engine.get_order(day.resolved.order_id).settled, what="resolved settled")
    wait_for(lambda: engine.get_order(day.absent.order_id).settled, what="absent settled")
    time.sleep(0.1)
    with engine.store._tx() as conn:
        conn.execute("DELETE FROM statement_lines")
    before, refunds = versions(engine), channel.count("refund")

    again = day.reconcile(engine)

    by_order = verdicts(again)
    assert by_order[day.closed.order_id] is Verdict.MATCHED  # its refund is under way
    assert "refunding" in again.entries[1].detail
    assert by_order[day.resolved.order_id] is Verdict.MATCHED
    assert by_order[day.mismatch.order_id] is Verdict.AMOUNT_MISMATCH
    time.sleep(0.1)
    assert versions(engine) == before
    assert channel.count("refund") == refunds


def test_a_malformed_statement_applies_nothing(engine: Engine) -> None:
    waiting = awaiting(engine, "r-1")
    before = versions(engine)
    text = csv_text(row(waiting.payment_serial, "TX-C"), row("P2", "TX-D"),
                    row("P3", "TX-E", amount="96.0"))
    with pytest.raises(StatementError) as caught:
        engine.reconcile(text)
    assert caught.value.line_no == 4 and caught.value.code == "bad_statement"
    assert state(engine, waiting) == "needs_reconciliation"
    assert versions(engine) == before
    assert statements.imports(engine.store) == []


def test_a_duplicate_line_in_one_statement_or_a_conflicting_one_is_not_applied_twice(
    engine: Engine,
) -> None:
    day_order = paid(engine, "m-1", "TX-A")
    text = csv_text(row(day_order.payment_serial, "TX-A"), row(day_order.payment_serial, "TX-A"),
                    row(day_order.payment_serial, "TX-A", amount="1.00"))
    report = engine.reconcile(text)
    assert [e.verdict for e in report.entries] == [
        Verdict.MATCHED, Verdict.ALREADY_IMPORTED, Verdict.CONFLICTING_LINE]
    assert engine.reconcile(text).entries[2].verdict is Verdict.CONFLICTING_LINE


def test_a_statement_may_be_text_a_file_or_parsed_lines(engine: Engine, tmp_path: Path) -> None:
    receipt = paid(engine, "m-1", "TX-A")
    text = csv_text(row(receipt.payment_serial, "TX-A"))
    report = engine.reconcile(parse_statement(text))
    assert [e.verdict for e in report.entries] == [Verdict.MATCHED]
    path = tmp_path / "wechat.csv"
    path.write_text(text)
    again = engine.reconcile(path)
    assert again.source == str(path) and again.entries[0].verdict is Verdict.ALREADY_IMPORTED
    with pytest.raises(InvalidRequest):
        engine.reconcile(42)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest):
        engine.reconcile(text, channels="wechat")
    with pytest.raises(InvalidRequest):
        engine.reconcile(text, period_start_ms=2, period_end_ms=1)


# ---------------------------------------------------------------------- refunds and charges


def test_refund_lines_settle_the_refunds_the_engine_waits_for(
    engine: Engine, channel: ScriptedChannel
) -> None:
    shut = closed(engine, "c-1")
    engine.reconcile(csv_text(row(shut.payment_serial, "TX-B")))
    assert cash_status(engine, shut) == "refunding"
    refund_id = f"{shut.payment_serial}-R1"

    refunds = csv_text(
        row(shut.payment_serial, "RTX-1", status="REFUND", refund_id=refund_id),
        row(shut.payment_serial, "RTX-2", status="REFUND", refund_id=f"{refund_id}X"),
    )
    report = engine.reconcile(refunds)

    assert [e.verdict for e in report.entries] == [Verdict.REFUND_RESOLVED,
                                                   Verdict.UNKNOWN_REFUND]
    assert cash_status(engine, shut) == "refunded"
    wait_for(lambda: engine.get_order(shut.order_id).settled, what="refund settled")
    again = engine.reconcile(refunds)
    assert again.count(Verdict.ALREADY_IMPORTED) == 2


def test_a_second_charge_under_another_transaction_is_refunded(
    engine: Engine, channel: ScriptedChannel
) -> None:
    receipt = paid(engine, "m-1", "TX-A")
    report = engine.reconcile(csv_text(row(receipt.payment_serial, "TX-A"),
                                       row(receipt.payment_serial, "TX-A2")))
    assert [e.verdict for e in report.entries] == [Verdict.MATCHED, Verdict.DUPLICATE_CHARGE]
    assert "refund" in report.entries[1].detail
    # the refund is decided and committed by reconcile; the channel is called after, on
    # an I/O lane: wait for the call rather than assume it was made before reconcile returned
    wait_for(lambda: any(call[0] == "refund" and call[1] == receipt.payment_serial
                         and call[3] == "9600" for call in channel.calls),
             what="the second charge's refund asked of the channel")
    assert state(engine, receipt) == "succeeded"  # the payment itself stands
    assert statements.line_verdicts(engine.store, "wechat", receipt.payment_serial) == [
        ("SUCCESS", "MATCHED", True), ("SUCCESS", "DUPLICATE_CHARGE", True)]


def test_an_order_whose_window_is_open_past_the_cut_off_keeps_waiting(engine: Engine) -> None:
    """The user may still pay after the statement's last line: absence proves nothing yet."""
    start = engine.runtime.now_ms() - 1_000
    waiting = awaiting(engine, "w-1")
    other = paid(engine, "m-1", "TX-A")
    before = versions(engine)
    # the period ends with the statement's last line (now), before the order's window closes
    report = engine.reconcile(csv_text(row(other.payment_serial, "TX-A")), period_start_ms=start)
    assert report.period_end_ms is not None and report.period_end_ms >= start + 1_000
    assert report.count(Verdict.RESOLVED_FAILED) == 0 and report.ok
    assert state(engine, waiting) == "needs_reconciliation"
    assert versions(engine) == before


def test_a_closed_order_whose_charge_stayed_unknown_is_resolved_by_its_absence(
    engine: Engine, channel: ScriptedChannel
) -> None:
    channel.close_reply = PROCESSING  # the channel never says whether it was charged
    start = engine.runtime.now_ms()
    receipt = awaiting(engine, "u-1")
    engine.close(receipt.order_id)
    wait_for(lambda: cash_status(engine, receipt) == "unknown", what="charge unknown")

    report = engine.reconcile(csv_text(), period_start_ms=start,
                              period_end_ms=engine.runtime.now_ms(), channels=["wechat"])

    assert verdicts(report) == {receipt.order_id: Verdict.RESOLVED_FAILED}
    assert (state(engine, receipt), cash_status(engine, receipt)) == ("closed", "unpaid")
    assert report.ok


def test_the_channels_own_records_reconcile_with_nothing_to_fix(tmp_path: Path) -> None:
    """Once the engine converged, the channel's truth (a double charge included, which the
    engine heard of and refunded) matches the engine's records line for line."""
    world = ThreadRuntime()
    faults = dataclasses.replace(ChannelFaults.none(), double_charge=1.0)
    wechat = SimulatedChannel("wechat", world, seed=3, faults=faults)
    policy = OrderPolicy(pay_window_ms=5_000, query_schedule_ms=(200, 400))
    engine = Engine.open(tmp_path / "sim.db", channels=[wechat], policy=policy,
                         config=EngineConfig(duplicate_guard_window_ms=0))
    wechat.attach(engine)
    try:
        fund_customer(engine)
        receipts = [engine.submit(fuel_request(f"s-{i}")) for i in range(3)]
        for receipt in receipts:
            wait_for(lambda r=receipt: engine.get_order(r.order_id).settled  # type: ignore[misc]
                     and engine.get_order(r.order_id).refunds, what="paid, second charge refunded")
        text = statement_from_channel(wechat)
        report = engine.reconcile(text, period_start_ms=0)
        assert report.count(Verdict.MATCHED) == 6 and report.count(Verdict.REFUND_MATCHED) == 3
        assert report.ok and report.lines == 9, report.to_table()
    finally:
        engine.shutdown()
        world.shutdown()


# ---------------------------------------------------------------------- the report and the CLI


def test_the_report_renders_as_a_table_and_as_json(engine: Engine) -> None:
    report = a_day(engine).reconcile(engine)
    table = report.to_table()
    assert "ERROR_REFUND" in table and "MISSING_ON_STATEMENT" in table
    assert "flagged for a person" in table
    payload = json.loads(report.to_json())
    assert list(payload) == ["import_id", "source", "digest", "lines", "period", "channels",
                             "counts", "flagged", "ok", "entries", "entries_omitted"]
    assert list(payload["counts"]) == [v.value for v in Verdict]
    assert payload["counts"]["UNKNOWN_ORDER"] == 1 and payload["flagged"] == 3
    assert set(payload["entries"][0]) == {"verdict", "line_no", "channel", "channel_txn_id",
                                          "out_trade_no", "refund_id", "order_id", "amount_minor",
                                          "currency", "detail"}


def test_the_cli_reconciles_a_database_file(
    tmp_path: Path, channel: ScriptedChannel, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "station.db"
    engine = open_engine(db, channel, POLICY)
    fund_customer(engine)
    fund_customer(engine, "bob")
    start = engine.runtime.now_ms() - 1_000
    matched = paid(engine, "m-1", "TX-A")
    shut = closed(engine, "c-1")
    absent = awaiting(engine, "a-1", who="bob")
    engine.shutdown()
    good = tmp_path / "wechat-2026-11-24.csv"
    good.write_text(csv_text(row(matched.payment_serial, "TX-A", at_ms=start),
                             row(shut.payment_serial, "TX-B")))

    end = ["--period-end", format_time(start + 120_000)]  # after bob's order's window closed
    assert main(["reconcile", str(good), "--db", str(db), "--json", *end]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["counts"]["MATCHED"] == 1 and payload["counts"]["ERROR_REFUND"] == 1
    assert payload["counts"]["RESOLVED_FAILED"] == 1 and payload["ok"] is True

    assert main(["reconcile", str(good), "--db", str(db), *end]) == 0  # again: nothing to do
    assert "ALREADY_IMPORTED" in capsys.readouterr().out

    flagged = tmp_path / "flagged.csv"
    flagged.write_text(csv_text(row("P-not-ours", "TX-Z")))
    assert main(["reconcile", str(flagged), "--db", str(db), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["counts"]["UNKNOWN_ORDER"] == 1

    broken = tmp_path / "broken.csv"
    broken.write_text(csv_text(row("P1", "TX-1", amount="1e3")))
    assert main(["reconcile", str(broken), "--db", str(db)]) == 2
    assert "line 2" in capsys.readouterr().err
    assert main(["reconcile", str(good), "--db", str(tmp_path / "none.db")]) == 2
    assert main(["reconcile", str(tmp_path / "none.csv"), "--db", str(db)]) == 2

    # the refund went through the demo's (rebuilt) simulated wallet; bob got his vouchers back
    reopened = open_engine(db, channel, POLICY)
    try:
        assert reopened.get_order(shut.order_id).legs[0].status == "refunded"
        assert reopened.get_order(absent.order_id).state == "failed"
        assert reopened.get_account("bob/points").held == 0
    finally:
        reopened.shutdown()
