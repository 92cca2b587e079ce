"""Money never moves on a wallet notification alone: forged, replayed, tampered, misrouted.

Each test is one of the inputs that broke the money before (issue 9, defects 0, 1 and 5):
the engine either refuses it (``NotificationRejected``, recorded and counted) or asks the
channel, whose answer alone decides.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from payengine import (
    CashPart,
    ChannelNotification,
    ChannelReply,
    Engine,
    EngineConfig,
    InvalidAmount,
    NotificationKind,
    NotificationRejected,
    OrderPolicy,
    PaymentRequest,
    RefundRefused,
)
from tests.helpers import (
    PROCESSING,
    REFUND_CLOSED,
    REFUND_OK,
    SLOW_POLICY,
    TEST_NOTIFICATIONS,
    ScriptedChannel,
    paid_reply,
    signed_callback,
    signed_refund_callback,
    wait_for,
)

NOT_PAID = ChannelReply("SUCCESS", "NOTPAY")


@pytest.fixture
def wechat() -> ScriptedChannel:
    return ScriptedChannel("wechat")


@pytest.fixture
def alipay() -> ScriptedChannel:
    return ScriptedChannel("alipay")


@pytest.fixture
def engine(tmp_path: Path, wechat: ScriptedChannel, alipay: ScriptedChannel
           ) -> Iterator[Engine]:
    eng = Engine.open(tmp_path / "pay.db", channels=[wechat, alipay],  # type: ignore[list-item]
                      policy=SLOW_POLICY,
                      config=EngineConfig(ask_timeout_s=5.0, duplicate_guard_window_ms=0))
    yield eng
    eng.shutdown()


def paying(engine: Engine, no: str, channel: str = "wechat", amount: int = 1_000) -> str:
    receipt = engine.submit(PaymentRequest("station-1", no, "alice", "CNY", amount, "Fuel",
                                           CashPart(amount, channel)))
    wait_for(lambda: engine.get_order(receipt.order_id).state == "paying", what="paying")
    return receipt.order_id


def serial_of(engine: Engine, order_id: str) -> str:
    return engine.get_order(order_id).payment_serial


def paid(engine: Engine, no: str, channel: str = "wechat", amount: int = 1_000) -> str:
    order_id = paying(engine, no, channel, amount)
    serial = serial_of(engine, order_id)
    assert signed_callback(engine, channel, serial, paid_reply(serial)) == "succeeded"
    wait_for(lambda: engine.get_order(order_id).settled, what="settled")
    return order_id


# ---------------------------------------------------------------- payments


@pytest.mark.parametrize("amount", [1_000, None])
def test_an_unsigned_success_the_wallet_never_sent_only_makes_the_engine_ask(
        engine: Engine, wechat: ScriptedChannel, amount: int | None) -> None:
    order_id = paying(engine, "o1")
    serial = serial_of(engine, order_id)
    wechat.query_reply = NOT_PAID
    with pytest.raises(NotificationRejected) as raised:
        engine.handle_callback("wechat", serial,
                               ChannelReply("SUCCESS", "SUCCESS", "forged-1", amount))
    assert raised.value.reason == "unverified"
    assert engine.rejection_counts() == {"unverified": 1}
    wait_for(lambda: ("query", serial) in wechat.calls, what="the channel asked")
    view = engine.get_order(order_id)
    assert view.state == "paying" and view.legs[0].status == "paying"
    assert view.legs[0].channel_txn_id is None


def test_an_unsigned_success_counts_once_the_channel_confirms_it(
        engine: Engine, wechat: ScriptedChannel) -> None:
    order_id = paying(engine, "o1")
    serial = serial_of(engine, order_id)
    wechat.query_reply = paid_reply(serial, 1_000)
    with pytest.raises(NotificationRejected, match="not believed"):
        engine.handle_callback("wechat", serial, paid_reply(serial))
    done = wait_for(lambda: (o := engine.get_order(order_id)).state == "succeeded" and o,
                    what="paid by the query's answer")
    assert done.legs[0].channel_txn_id == f"TX-{serial}"
    # the wallet sends it again (it was not acknowledged): now it agrees, and is acknowledged
    assert engine.handle_callback("wechat", serial, paid_reply(serial)) == "succeeded"
    assert engine.handle_callback("wechat", serial, PROCESSING) == "succeeded"


def test_a_float_amount_in_a_reply_is_a_typed_error_and_changes_nothing(
        engine: Engine, wechat: ScriptedChannel) -> None:
    order_id = paying(engine, "o1")
    serial = serial_of(engine, order_id)
    with pytest.raises(InvalidAmount):
        engine.handle_callback("wechat", serial,
                               ChannelReply("SUCCESS", "SUCCESS", "x", 1000.0))  # type: ignore[arg-type]
    assert engine.get_order(order_id).state == "paying"
    assert wechat.count("query") == 0


def test_an_unsigned_success_of_another_amount_is_refused_and_recorded(
        engine: Engine, wechat: ScriptedChannel) -> None:
    order_id = paying(engine, "o1")
    serial = serial_of(engine, order_id)
    with pytest.raises(NotificationRejected) as raised:
        engine.handle_callback("wechat", serial, ChannelReply("SUCCESS", "SUCCESS", "x", 999))
    assert raised.value.reason == "wrong_amount" and raised.value.code == "notification_rejected"
    assert engine.rejection_counts() == {"wrong_amount": 1}
    (rejection,) = engine.rejected_notifications()
    assert (rejection.channel, rejection.payment_serial, rejection.source, rejection.reason) == (
        "wechat", serial, "callback", "wrong_amount")
    assert engine.get_order(order_id).state == "paying"


def test_a_success_through_the_wrong_channel_is_refused_and_never_pays(
        engine: Engine, wechat: ScriptedChannel, alipay: ScriptedChannel) -> None:
    order_id = paying(engine, "ali-1", channel="alipay")
    serial = serial_of(engine, order_id)
    with pytest.raises(NotificationRejected) as unsigned:
        engine.handle_callback("wechat", serial, ChannelReply("SUCCESS", "SUCCESS", "wx-1", 1000))
    assert unsigned.value.reason == "wrong_channel"
    with pytest.raises(NotificationRejected) as signed:
        signed_callback(engine, "wechat", serial, ChannelReply("SUCCESS", "SUCCESS", "wx-1", 1000))
    assert signed.value.reason == "wrong_channel"
    view = engine.get_order(order_id)
    assert view.state == "paying" and view.legs[0].status == "paying"
    assert view.legs[0].channel_txn_id is None
    assert engine.rejection_counts() == {"wrong_channel": 2}
    assert wechat.count("query") == 0


def test_a_success_in_another_currency_is_refused(engine: Engine) -> None:
    order_id = paying(engine, "o1")
    serial = serial_of(engine, order_id)
    with pytest.raises(NotificationRejected) as raised:
        signed_callback(engine, "wechat", serial,
                        ChannelReply("SUCCESS", "SUCCESS", "t", 1_000, "USD"))
    assert raised.value.reason == "wrong_currency"
    assert engine.get_order(order_id).state == "paying"


@pytest.mark.parametrize("tamper", ["amount", "serial", "signature", "no header"])
def test_a_tampered_notification_does_not_verify(engine: Engine, tamper: str) -> None:
    order_id = paying(engine, "o1")
    other_id = paying(engine, "o2")
    serial = serial_of(engine, order_id)
    body, headers = TEST_NOTIFICATIONS.sign(ChannelNotification(
        NotificationKind.PAYMENT, serial, paid_reply(serial, 1_000)))
    data = json.loads(body)
    if tamper == "amount":
        data["amount_minor"] = 1
    elif tamper == "serial":
        data["payment_serial"] = serial_of(engine, other_id)
    forged = json.dumps(data, separators=(",", ":"), sort_keys=True).encode()
    if tamper == "signature":
        forged, headers = body, {"X-Signature": "0" * 64}
    elif tamper == "no header":
        forged, headers = body, {}
    with pytest.raises(NotificationRejected) as raised:
        engine.handle_notification("wechat", forged, headers)
    assert raised.value.reason == "bad_signature"
    assert {engine.get_order(o).state for o in (order_id, other_id)} == {"paying"}
    assert engine.rejection_counts() == {"bad_signature": 1}


def test_one_payments_success_replayed_under_another_serial_is_refused(
        engine: Engine) -> None:
    first = paid(engine, "o1")
    second = paying(engine, "o2")
    txn = engine.get_order(first).legs[0].channel_txn_id
    assert txn is not None
    with pytest.raises(NotificationRejected) as raised:
        signed_callback(engine, "wechat", serial_of(engine, second),
                        ChannelReply("SUCCESS", "SUCCESS", txn, 1_000))
    assert raised.value.reason == "foreign_transaction"
    assert engine.get_order(second).state == "paying"


def test_a_statement_line_with_another_payments_transaction_is_a_conflict(
        engine: Engine) -> None:
    first = paid(engine, "o1")
    second = paying(engine, "o2")
    txn = engine.get_order(first).legs[0].channel_txn_id
    statement = ("channel,channel_txn_id,out_trade_no,amount,currency,status,time\n"
                 f"wechat,{txn},{serial_of(engine, second)},10.00,CNY,SUCCESS,"
                 "2026-12-01T08:00:00Z\n")
    report = engine.reconcile(statement)
    assert {v.value: n for v, n in report.counts.items() if n} == {"CONFLICTING_LINE": 1}
    assert engine.get_order(second).state == "paying"
    assert engine.rejection_counts() == {"foreign_transaction": 1}


@pytest.mark.parametrize("verified", [True, False])
def test_a_second_charge_is_refunded_only_after_the_channel_confirms_it(
        engine: Engine, wechat: ScriptedChannel, verified: bool) -> None:
    order_id = paid(engine, "o1")
    serial = serial_of(engine, order_id)
    replayed = ChannelReply("SUCCESS", "SUCCESS", "TX-second", 1_000)
    feed = signed_callback if verified else _unsigned
    with pytest.raises(NotificationRejected, match="not believed") as raised:
        feed(engine, "wechat", serial, replayed)
    assert raised.value.reason == ("unconfirmed" if verified else "unverified")
    wait_for(lambda: ("query_charge", serial, "TX-second") in wechat.calls, what="asked")
    order = engine.get_order(order_id)
    assert order.refunds == () and wechat.count("refund") == 0  # the channel said no
    assert order.state == "succeeded"


def test_a_refund_notification_of_another_amount_is_refused(
        engine: Engine, wechat: ScriptedChannel) -> None:
    order_id = paid(engine, "o1")
    serial = serial_of(engine, order_id)
    refund = engine.refund(order_id, "r1", 500)
    for feed in (signed_refund_callback, _unsigned_refund):
        with pytest.raises(NotificationRejected) as raised:
            feed(engine, "wechat", serial, refund.refund_id, ChannelReply("SUCCESS", "SUCCESS",
                                                                          None, 1))
        assert raised.value.reason == "wrong_amount"
    assert engine.get_order(order_id).refund("r1").status == "refunding"  # type: ignore[union-attr]


def test_a_refund_reported_by_another_channel_is_refused(engine: Engine) -> None:
    order_id = paid(engine, "o1")
    refund = engine.refund(order_id, "r1", 500)
    with pytest.raises(NotificationRejected) as raised:
        signed_refund_callback(engine, "alipay", serial_of(engine, order_id), refund.refund_id,
                               REFUND_OK)
    assert raised.value.reason == "wrong_channel"
    assert engine.get_order(order_id).refund("r1").status == "refunding"  # type: ignore[union-attr]


def test_a_refund_of_a_refund_id_the_order_never_made_is_refused(engine: Engine) -> None:
    order_id = paid(engine, "o1")
    with pytest.raises(NotificationRejected) as raised:
        signed_refund_callback(engine, "wechat", serial_of(engine, order_id), "nope-RF9",
                               ChannelReply("SUCCESS", "SUCCESS", None, 10))
    assert raised.value.reason == "unknown_refund"


@pytest.mark.parametrize("verified", [True, False])
def test_a_refund_close_the_channel_does_not_confirm_leaves_the_refund_in_flight(
        engine: Engine, wechat: ScriptedChannel, verified: bool) -> None:
    order_id = paid(engine, "o1")
    serial = serial_of(engine, order_id)
    wechat.refund_query_reply = ChannelReply("SUCCESS", "PROCESSING")  # really paying it out
    refund = engine.refund(order_id, "r1", 500)
    # a failure would free the amount: asked first, and not acknowledged, even when signed
    feed = signed_refund_callback if verified else _unsigned_refund
    with pytest.raises(NotificationRejected, match="not believed") as raised:
        feed(engine, "wechat", serial, refund.refund_id, REFUND_CLOSED)
    assert raised.value.reason == ("unconfirmed" if verified else "unverified")
    wait_for(lambda: ("query_refund", serial, refund.refund_id) in wechat.calls, what="asked")
    assert engine.get_order(order_id).refund("r1").status == "refunding"  # type: ignore[union-attr]
    # so the merchant cannot ask for the same money again: it is still being refunded
    with pytest.raises(RefundRefused, match="may still give back"):
        engine.refund(order_id, "r2", 1_000)


def test_a_refund_success_counts_once_verified(engine: Engine) -> None:
    order_id = paid(engine, "o1")
    refund = engine.refund(order_id, "r1", 500)
    signed_refund_callback(engine, "wechat", serial_of(engine, order_id), refund.refund_id,
                           ChannelReply("SUCCESS", "SUCCESS", None, 500))
    done = wait_for(lambda: (r := engine.get_order(order_id).refund("r1")) is not None
                    and r.status == "succeeded" and r, what="refunded")
    assert done.parts == ((0, 500, "done"),)


def _unsigned(engine: Engine, channel: str, serial: str, reply: ChannelReply) -> str:
    return engine.handle_callback(channel, serial, reply)


def _unsigned_refund(engine: Engine, channel: str, serial: str, refund_id: str,
                     reply: ChannelReply) -> str:
    return engine.handle_refund_callback(channel, serial, refund_id, reply)


# ---------------------------------------------------------------- close vs. an in-flight pay


def test_a_close_never_overtakes_the_pay_call_still_in_flight(tmp_path: Path) -> None:
    gate = threading.Event()
    entered = threading.Event()

    class SlowPay(ScriptedChannel):
        def pay(self, payment_serial: str, amount_minor: int, currency: str, title: str
                ) -> ChannelReply:
            entered.set()
            gate.wait(10)
            return super().pay(payment_serial, amount_minor, currency, title)

    channel = SlowPay()
    channel.pay_reply = PROCESSING
    engine = Engine.open(tmp_path / "p.db", channels=[channel],  # type: ignore[list-item]
                         policy=OrderPolicy(pay_window_ms=60_000, query_schedule_ms=(60_000,)),
                         config=EngineConfig(ask_timeout_s=5.0))
    try:
        receipt = engine.submit(PaymentRequest("m", "n", "u", "CNY", 100, "t",
                                               CashPart(100, "wechat")))
        assert entered.wait(5)
        assert engine.close(receipt.order_id).state == "closed"
        assert channel.count("close") == 0  # the pay call has not answered: no close yet
        gate.set()
        wait_for(lambda: channel.count("close") == 1, what="the close after the answer")
        assert [c[0] for c in channel.calls] == ["pay", "close"]
    finally:
        gate.set()
        engine.shutdown()


@pytest.mark.parametrize("field, value", [
    ("channel_txn_id", "T\ud800"), ("channel_txn_id", "T\n1"), ("channel_txn_id", "T\x001"),
    ("result_code", "\ud800"), ("return_code", "S" * 129), ("amount_minor", 10**30),
    ("amount_minor", 10.0), ("amount_minor", True), ("payment_serial", "P\ud800"),
    ("currency", 7),
])
def test_a_signed_notification_with_a_malformed_field_is_refused_as_malformed(
        engine: Engine, field: str, value: object) -> None:
    order_id = paying(engine, "o1")
    serial = serial_of(engine, order_id)
    data: dict[str, object] = {
        "kind": "payment", "payment_serial": serial, "refund_id": None,
        "return_code": "SUCCESS", "result_code": "SUCCESS", "channel_txn_id": "T1",
        "amount_minor": 1_000, "currency": "CNY"}
    data[field] = value
    body = json.dumps(data, separators=(",", ":"), sort_keys=True).encode()
    headers = {"X-Signature": TEST_NOTIFICATIONS.signature(body)}  # a correct signature
    with pytest.raises(NotificationRejected) as raised:
        engine.handle_notification("wechat", body, headers)
    assert raised.value.reason == "malformed"
    assert engine.rejection_counts() == {"malformed": 1}
    assert engine.get_order(order_id).legs[0].status == "paying"


def test_an_unverified_second_charge_sent_again_after_the_channel_confirmed_it_agrees(
        engine: Engine, wechat: ScriptedChannel) -> None:
    order_id = paid(engine, "o1")
    serial = serial_of(engine, order_id)
    second = ChannelReply("SUCCESS", "SUCCESS", "TX-second", 1_000)
    wechat.charge_query_reply = second
    with pytest.raises(NotificationRejected, match="not believed"):
        engine.handle_callback("wechat", serial, second)
    wait_for(lambda: [r for r in engine.get_order(order_id).refunds
                      if r.refund_no == "charge:TX-second"], what="the second charge refunding")
    assert engine.handle_callback("wechat", serial, second) == "succeeded"
