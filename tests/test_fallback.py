"""Routing fallback (issue 11, item 3): an explicit pre-payment failure falls back to the next
route only where no double charge is possible (R-PROD): the old channel's retryable failure,
then its query says failure or "order not found", then it is closed; a late charge on a
route the payment left is refunded by that channel."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest

from payengine import (
    CashPart,
    ChannelReply,
    ChannelTry,
    CodeTable,
    Engine,
    EngineConfig,
    OrderPolicy,
    PaymentRequest,
    Receipt,
    Route,
    RoutingTable,
)
from payengine.engine.statement import LineStatus, StatementLine, Verdict
from tests.helpers import ScriptedChannel, signed_callback, wait_for

QR = "qr"
CODES = CodeTable(
    channel="wallet", communication_ok=frozenset({"SUCCESS"}),
    success=frozenset({"SUCCESS"}),
    failure=frozenset({"PAYERROR", "CLOSED", "NOTENOUGH", "BANK_DOWN"}),
    retryable=frozenset({"NOTENOUGH", "BANK_DOWN"}),
    not_found=frozenset({"ORDERNOTEXIST"}))
REFUSED = ChannelReply("SUCCESS", "BANK_DOWN")
NOT_FOUND = ChannelReply("SUCCESS", "ORDERNOTEXIST")
CLOSED = ChannelReply("SUCCESS", "CLOSED")
PAID = ChannelReply("SUCCESS", "SUCCESS", "TX-B", 5_000)
POLICY = OrderPolicy(pay_window_ms=60_000, query_schedule_ms=(60_000,),
                     refund_query_schedule_ms=(60_000,))


class Wallet(ScriptedChannel):
    pay_codes = CODES


def wallets(*names: str) -> list[Wallet]:
    out = []
    for name in names:
        wallet = Wallet(name)
        wallet.pay_reply, wallet.query_reply, wallet.close_reply = REFUSED, NOT_FOUND, CLOSED
        out.append(wallet)
    return out


def open_engine(path: Path, *channels: Wallet, fallbacks_max: int = 1,
                policy: OrderPolicy = POLICY) -> Engine:
    routes = tuple(Route(QR, c.name, priority=i) for i, c in enumerate(channels))
    config = EngineConfig(routing=RoutingTable(routes, fallbacks_max=fallbacks_max),
                          duplicate_guard_window_ms=0, ask_timeout_s=5.0)
    return Engine.open(path, channels=list(channels), policy=policy, config=config)


def request(no: str = "o-1") -> PaymentRequest:
    return PaymentRequest("station-1", no, f"u-{no}", "CNY", 5_000, "Fuel", CashPart(5_000, QR))


def paid_by_b(engine: Engine) -> Receipt:
    """Submit; wallet-a refuses it retryably, wallet-b is paid: wait for that."""
    receipt = engine.submit(request())
    wait_for(lambda: engine.get_order(receipt.order_id).state == "succeeded",
             what="paid by wallet-b")
    return receipt


def test_a_retryable_failure_is_queried_closed_and_then_paid_by_the_next_route(
        tmp_path: Path) -> None:
    a, b = wallets("wallet-a", "wallet-b")
    b.pay_reply = PAID
    engine = open_engine(tmp_path / "f.db", a, b)
    try:
        receipt = engine.submit(request())
        view = wait_for(lambda: (v := engine.get_order(receipt.order_id)).state == "succeeded"
                        and v, what="paid by wallet-b")
        first = receipt.payment_serial
        assert a.calls == [("pay", first, "5000"), ("query", first), ("close", first)]
        assert b.calls == [("pay", f"{first}-F1", "5000")]
        assert view.payment_serial == f"{first}-F1" and view.legs[0].channel == "wallet-b"
        assert view.legs[0].channels_tried == (
            ChannelTry("wallet-a", first, "unpaid", "BANK_DOWN"),
            ChannelTry("wallet-b", f"{first}-F1", "paid", "SUCCESS"))
        routes = [(e.from_state, e.to_state, e.cause) for e in engine.journal(receipt.order_id)
                  if e.part == "route"]
        assert routes[-1][:2] == ("wallet-a", "wallet-b")
        assert routes[-1][2].startswith(
            "wallet-a answered BANK_DOWN (retryable, sync); query: ORDERNOTEXIST (not found); "
            "close: CLOSED (failure) -> wallet-b; method qr: wallet-b chosen")
        assert engine.ledger_balances(receipt.order_id)["CNY"]["payer:wallet-b"] == -5_000
    finally:
        engine.shutdown()


@pytest.mark.parametrize(("pay", "query", "close"), [
    (ChannelReply("SUCCESS", "PAYERROR"), NOT_FOUND, CLOSED),  # not retryable
    (REFUSED, ChannelReply("SUCCESS", "PAYERROR"), CLOSED),  # the query: not retryable
    (REFUSED, ChannelReply("SUCCESS", "USERPAYING"), CLOSED),  # the query: processing
    (REFUSED, ChannelReply("FAIL", None), CLOSED),  # the query: no answer
    (REFUSED, NOT_FOUND, ChannelReply("FAIL", None)),  # the close: no answer
])
def test_without_the_full_proof_the_failure_stands_and_no_other_route_is_paid(
        tmp_path: Path, pay: ChannelReply, query: ChannelReply, close: ChannelReply) -> None:
    a, b = wallets("wallet-a", "wallet-b")
    a.pay_reply, a.query_reply, a.close_reply, b.pay_reply = pay, query, close, PAID
    # undecided answers are asked again on the query schedule; when it runs out, the
    # explicit failure stands
    engine = open_engine(tmp_path / "f.db", a, b, policy=replace(
        POLICY, query_schedule_ms=(20, 20, 20)))
    try:
        receipt = engine.submit(request())
        view = wait_for(lambda: (v := engine.get_order(receipt.order_id)).state == "failed"
                        and v, what="failed")
        assert b.calls == [] and view.legs[0].channel == "wallet-a"
        assert view.legs[0].channels_tried == (
            ChannelTry("wallet-a", receipt.payment_serial, "unpaid", pay.result_code),)
    finally:
        engine.shutdown()


def test_a_query_that_finds_the_payment_paid_keeps_it_and_pays_no_other_route(
        tmp_path: Path) -> None:
    a, b = wallets("wallet-a", "wallet-b")
    a.query_reply, b.pay_reply = ChannelReply("SUCCESS", "SUCCESS", "TX-A", 5_000), PAID
    engine = open_engine(tmp_path / "f.db", a, b)
    try:
        receipt = engine.submit(request())
        view = wait_for(lambda: (v := engine.get_order(receipt.order_id)).state == "succeeded"
                        and v, what="paid by wallet-a")
        assert b.calls == [] and view.legs[0].channel == "wallet-a" and a.count("close") == 0
    finally:
        engine.shutdown()


@pytest.mark.parametrize("fallbacks_max", [0, 1, 2])
def test_no_more_routes_are_tried_than_fallbacks_max_allows(tmp_path: Path,
                                                            fallbacks_max: int) -> None:
    channels = wallets("wallet-a", "wallet-b", "wallet-c", "wallet-d")
    engine = open_engine(tmp_path / "f.db", *channels, fallbacks_max=fallbacks_max)
    try:
        receipt = engine.submit(request())
        view = wait_for(lambda: (v := engine.get_order(receipt.order_id)).state == "failed"
                        and v, what="failed")
        assert [c.count("pay") for c in channels] == [1] * (fallbacks_max + 1) + [0] * (
            3 - fallbacks_max)
        assert len(view.legs[0].channels_tried) == fallbacks_max + 1
    finally:
        engine.shutdown()


def test_no_route_left_fails_the_order_and_says_why(tmp_path: Path) -> None:
    (a,) = wallets("wallet-a")
    engine = open_engine(tmp_path / "f.db", a)
    try:
        receipt = engine.submit(request())
        view = wait_for(lambda: (v := engine.get_order(receipt.order_id)).state == "failed"
                        and v, what="failed")
        assert "no route left" in view.cause and a.count("pay") == 1
    finally:
        engine.shutdown()


def test_a_late_charge_on_the_left_route_is_confirmed_then_refunded_by_that_channel(
        tmp_path: Path) -> None:
    a, b = wallets("wallet-a", "wallet-b")
    b.pay_reply = PAID
    engine = open_engine(tmp_path / "f.db", a, b)
    try:
        receipt = paid_by_b(engine)
        first = receipt.payment_serial
        late = ChannelReply("SUCCESS", "SUCCESS", "TX-A-LATE", 5_000)
        a.query_reply, a.refund_reply = late, ChannelReply("SUCCESS", "SUCCESS")
        with pytest.raises(Exception, match="not believed"):
            signed_callback(engine, "wallet-a", first, late)  # a query of wallet-a first
        wait_for(lambda: engine.get_order(receipt.order_id).refunds, what="refund")
        view = engine.get_order(receipt.order_id)
        assert view.state == "succeeded" and view.legs[0].channel == "wallet-b"
        (refund,) = view.refunds
        assert (refund.kind, refund.refund_no, refund.amount_minor) == (
            "duplicate_charge", "charge:TX-A-LATE", 5_000)
        assert ("refund", first, refund.refund_id, "5000") in a.calls
        assert b.count("refund") == 0
        assert view.legs[0].channels_tried[0] == ChannelTry("wallet-a", first, "charged_late",
                                                            "BANK_DOWN")
        # the same notification again, now it agrees: acknowledged, nothing more
        assert signed_callback(engine, "wallet-a", first, late) == "succeeded"
        wait_for(lambda: engine.get_order(receipt.order_id).settled, what="refund done")
        balances = engine.ledger_balances(receipt.order_id)["CNY"]
        assert balances.get("payer:wallet-a", 0) == 0 and balances.get("transit", 0) == 0
    finally:
        engine.shutdown()


def test_a_report_for_a_left_serial_from_another_channel_is_refused(tmp_path: Path) -> None:
    a, b = wallets("wallet-a", "wallet-b")
    b.pay_reply = PAID
    engine = open_engine(tmp_path / "f.db", a, b)
    try:
        receipt = paid_by_b(engine)
        with pytest.raises(Exception, match="wallet-a"):
            signed_callback(engine, "wallet-b", receipt.payment_serial,
                            ChannelReply("SUCCESS", "SUCCESS", "TX-X", 5_000))
        assert engine.get_order(receipt.order_id).refunds == ()
    finally:
        engine.shutdown()


def test_a_reopened_engine_finds_the_order_by_a_left_serial_and_keeps_its_routes(
        tmp_path: Path) -> None:
    a, b = wallets("wallet-a", "wallet-b")
    b.pay_reply = PAID
    engine = open_engine(tmp_path / "f.db", a, b)
    receipt = paid_by_b(engine)
    before = engine.get_order(receipt.order_id)
    engine.shutdown()
    engine = open_engine(tmp_path / "f.db", a, b)
    try:
        assert engine.get_order(receipt.order_id) == before
        a.query_reply = ChannelReply("SUCCESS", "SUCCESS", "TX-A-LATE", 5_000)
        with pytest.raises(Exception, match="not believed"):
            signed_callback(engine, "wallet-a", receipt.payment_serial, a.query_reply)
        wait_for(lambda: engine.get_order(receipt.order_id).refunds, what="late charge refund")
    finally:
        engine.shutdown()


def test_a_statement_line_of_a_late_charge_on_a_left_route_is_refunded_by_that_channel(
        tmp_path: Path) -> None:
    a, b = wallets("wallet-a", "wallet-b")
    b.pay_reply, a.refund_reply = PAID, ChannelReply("SUCCESS", "SUCCESS")
    engine = open_engine(tmp_path / "f.db", a, b)
    try:
        receipt = paid_by_b(engine)
        first = receipt.payment_serial
        now_ms = engine.runtime.now_ms()
        line = StatementLine("wallet-a", "TX-A-LATE", first, 5_000, "CNY", LineStatus.SUCCESS,
                             now_ms)
        report = engine.reconcile([line], channels=["wallet-a"])
        assert report.count(Verdict.DUPLICATE_CHARGE) == 1, report.to_table()
        view = wait_for(lambda: (v := engine.get_order(receipt.order_id)).settled and v,
                        what="late charge refunded")
        (refund,) = view.refunds
        assert (refund.refund_no, refund.status) == ("charge:TX-A-LATE", "succeeded")
        assert ("refund", first, refund.refund_id, "5000") in a.calls
        assert view.state == "succeeded" and view.legs[0].channel == "wallet-b"
        again = engine.reconcile([line], channels=["wallet-a"])  # the same line: nothing new
        assert again.count(Verdict.DUPLICATE_CHARGE) == 0
        assert len(engine.get_order(receipt.order_id).refunds) == 1
    finally:
        engine.shutdown()


def test_a_restart_between_the_steps_sends_each_steps_command_again(tmp_path: Path) -> None:
    a, b = wallets("wallet-a", "wallet-b")
    a.query_reply = TimeoutError("wallet-a does not answer queries")
    b.pay_reply = PAID
    engine = open_engine(tmp_path / "f.db", a, b)
    receipt = engine.submit(request())
    first = receipt.payment_serial
    wait_for(lambda: a.count("query") == 1, what="the fallback's query")
    engine.shutdown()  # the query was never answered: the step is still "query"
    a.query_reply, a.close_reply = NOT_FOUND, TimeoutError("wallet-a does not answer closes")
    engine = open_engine(tmp_path / "f.db", a, b)
    wait_for(lambda: a.count("close") == 1, what="the query again, then the close")
    engine.shutdown()  # the close was never answered: the step is still "close"
    a.close_reply = CLOSED
    engine = open_engine(tmp_path / "f.db", a, b)
    try:
        view = wait_for(lambda: (v := engine.get_order(receipt.order_id)).state == "succeeded"
                        and v, what="paid by wallet-b")
        assert a.calls == [("pay", first, "5000"), ("query", first), ("query", first),
                           ("close", first), ("close", first)]
        assert b.calls == [("pay", f"{first}-F1", "5000")]
        assert view.legs[0].channels_tried[0] == ChannelTry("wallet-a", first, "unpaid",
                                                            "BANK_DOWN")
    finally:
        engine.shutdown()


def test_the_readme_fallback_example_runs_and_prints_what_it_says(
        capsys: pytest.CaptureFixture[str]) -> None:
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = text[text.index("#### Falling back to the next route"):
                   text.index("### Notifications from the wallet")]
    (block,) = re.findall(r"```python\n(.*?)```", section, re.S)
    exec(compile(block, "README.md", "exec"), {"__name__": "readme_example"})
    assert capsys.readouterr().out.splitlines() == [
        "wechat-2", "True", "wechat-1 unpaid BANK_DOWN", "wechat-2 paid SUCCESS"]


def test_a_channel_that_cannot_close_is_left_after_its_query_without_a_close(
        tmp_path: Path) -> None:
    a, b = wallets("wallet-a", "wallet-b")
    a.supports_close = False  # type: ignore[attr-defined]  # as an HTTP channel with no close
    b.pay_reply = PAID
    engine = open_engine(tmp_path / "f.db", a, b)
    try:
        receipt = paid_by_b(engine)
        assert a.calls == [("pay", receipt.payment_serial, "5000"),
                           ("query", receipt.payment_serial)]
        (moved,) = [e for e in engine.journal(receipt.order_id)
                    if e.part == "route" and e.from_state != e.to_state and e.from_state != QR]
        assert "no close (the channel has none) -> wallet-b" in moved.cause
    finally:
        engine.shutdown()


def test_an_http_channel_without_a_close_operation_is_known_to_have_none() -> None:
    from payengine.actors.engine import _without_close

    class Http:
        def __init__(self, operations: tuple[str, ...]) -> None:
            self.config = type("Config", (), {"kind": "http", "operations": dict.fromkeys(
                operations)})()

    assert _without_close({"a": Http(("pay", "query")), "b": Http(("pay", "query", "close")),
                           "c": Wallet("c")}) == frozenset({"a"})  # type: ignore[dict-item]
