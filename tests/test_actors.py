"""The actor shell end to end: real pykka actors, a real SQLite file, a scripted channel."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from payengine import (
    ChannelReply,
    CurrencyMismatch,
    Engine,
    EngineConfig,
    IdempotencyConflict,
    IllegalTransition,
    InsufficientBalance,
    InvalidAmount,
    InvalidRequest,
    LegMode,
    OrderPolicy,
    PaymentRequest,
    UnknownAccount,
    UnknownOrder,
    VoucherPart,
)
from payengine.actors.engine import Engine as _Engine
from tests.helpers import (
    NO_ANSWER,
    PAID,
    ScriptedChannel,
    fuel_request,
    fund_customer,
    open_engine,
    paid_reply,
    signed_callback,
    signed_refund_callback,
    wait_for,
)


def paying(engine: Engine, order_id: str) -> bool:
    return engine.get_order(order_id).state == "paying"


def settled(engine: Engine, order_id: str) -> bool:
    return engine.get_order(order_id).settled


def balances(engine: Engine, account_id: str) -> tuple[int, int, int, int]:
    a = engine.get_account(account_id)
    return a.funded, a.available, a.held, a.spent


# ---------------------------------------------------------------------- the happy path


def test_a_combined_payment_holds_vouchers_before_calling_the_channel_then_confirms_them(
    engine: Engine, channel: ScriptedChannel
) -> None:
    receipt = engine.submit(fuel_request())
    wait_for(lambda: paying(engine, receipt.order_id), what="paying")
    assert balances(engine, "alice/red-packet") == (1_000, 900, 100, 0)
    assert balances(engine, "alice/points") == (1_000, 980, 20, 0)
    # the channel is called on an I/O lane after "paying" is committed: wait for the call
    wait_for(lambda: channel.calls, what="the channel called")
    assert channel.calls[0] == ("pay", receipt.payment_serial, "9600")

    serial = receipt.payment_serial
    assert signed_callback(engine, "wechat", serial, paid_reply(serial)) == "succeeded"
    wait_for(lambda: settled(engine, receipt.order_id), what="settled")
    order = engine.get_order(receipt.order_id)
    assert [leg.status for leg in order.legs] == ["paid", "confirmed", "confirmed", "confirmed"]
    assert balances(engine, "alice/red-packet") == (1_000, 900, 0, 100)
    assert balances(engine, "alice/points") == (1_000, 980, 0, 20)
    assert balances(engine, "alice/phone") == (1_000, 900, 0, 100)


def test_every_transition_is_journalled_in_order(engine: Engine) -> None:
    receipt = engine.submit(fuel_request())
    wait_for(lambda: paying(engine, receipt.order_id))
    signed_callback(engine, "wechat", receipt.payment_serial, paid_reply(receipt.payment_serial))
    wait_for(lambda: settled(engine, receipt.order_id))
    order_moves = [(e.from_state, e.to_state) for e in engine.journal(receipt.order_id)
                   if e.part == "order"]
    assert order_moves == [("", "accepted"), ("accepted", "paying"), ("paying", "succeeded")]


# ---------------------------------------------------------------------- callback vs close


def test_callback_before_close_leaves_the_order_paid_and_a_user_close_is_refused(
    engine: Engine, channel: ScriptedChannel
) -> None:
    receipt = engine.submit(fuel_request())
    wait_for(lambda: paying(engine, receipt.order_id))
    signed_callback(engine, "wechat", receipt.payment_serial, paid_reply(receipt.payment_serial))
    with pytest.raises(IllegalTransition):
        engine.close(receipt.order_id)
    assert engine.get_order(receipt.order_id).state == "succeeded"
    assert channel.count("refund") == 0


def test_success_after_a_user_close_is_refunded_by_the_original_route_and_holds_released(
    engine: Engine, channel: ScriptedChannel
) -> None:
    receipt = engine.submit(fuel_request())
    wait_for(lambda: paying(engine, receipt.order_id))
    channel.close_reply = ChannelReply("SUCCESS", "USERPAYING")  # the close does not settle it
    assert engine.close(receipt.order_id).state == "closed"
    wait_for(lambda: balances(engine, "alice/points") == (1_000, 1_000, 0, 0), what="release")

    serial = receipt.payment_serial
    assert signed_callback(engine, "wechat", serial, paid_reply(serial)) == "closed"
    wait_for(lambda: channel.count("refund") == 1, what="refund call")
    refund = next(c for c in channel.calls if c[0] == "refund")
    assert refund[1:] == (receipt.payment_serial, f"{receipt.payment_serial}-R1", "9600")
    signed_refund_callback(engine, "wechat", receipt.payment_serial, refund[2],
                                  ChannelReply("SUCCESS", "SUCCESS"))
    wait_for(lambda: settled(engine, receipt.order_id))
    order = engine.get_order(receipt.order_id)
    assert order.state == "closed"
    assert [leg.status for leg in order.legs] == ["refunded", "cancelled", "cancelled",
                                                  "cancelled"]
    for account in ("alice/red-packet", "alice/points", "alice/phone"):
        assert balances(engine, account) == (1_000, 1_000, 0, 0)


def test_the_timeout_close_closes_the_channel_payment_and_releases_every_hold(
    tmp_path: Path, channel: ScriptedChannel
) -> None:
    policy = OrderPolicy(pay_window_ms=300, query_schedule_ms=(60_000,))
    engine = open_engine(tmp_path / "pay.db", channel, policy)
    try:
        fund_customer(engine)
        receipt = engine.submit(fuel_request())
        wait_for(lambda: settled(engine, receipt.order_id), what="timeout close")
        order = engine.get_order(receipt.order_id)
        assert (order.state, order.cause) == ("closed", "close_timeout")
        assert order.legs[0].status == "unpaid"  # the channel confirmed it closed unpaid
        assert channel.count("close") == 1
        assert balances(engine, "alice/red-packet") == (1_000, 1_000, 0, 0)
    finally:
        engine.shutdown()


# ---------------------------------------------------------------------- duplicates


def test_the_same_submit_from_16_threads_at_once_creates_exactly_one_order(
    engine: Engine,
) -> None:
    for round_no in range(10):
        request = fuel_request(no=f"race-{round_no}")
        barrier = threading.Barrier(16)
        receipts: list[object] = []
        lock = threading.Lock()

        def submit(req: PaymentRequest = request, b: threading.Barrier = barrier,
                   out: list[object] = receipts, guard: threading.Lock = lock) -> None:
            b.wait()
            receipt = engine.submit(req)
            with guard:
                out.append(receipt)

        threads = [threading.Thread(target=submit) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(receipts) == 16 and len(set(receipts)) == 1  # type: ignore[arg-type]
        rows = engine.store.db.execute(
            "SELECT COUNT(*) FROM payment_orders WHERE merchant_order_no = ?",
            [request.merchant_order_no]).fetchone()[0]
        assert rows == 1


def test_the_same_key_with_other_parameters_is_an_idempotency_conflict(engine: Engine) -> None:
    engine.submit(fuel_request(no="k1"))
    other = fuel_request(no="k1", phone_mode=LegMode.POST_DEDUCT)
    with pytest.raises(IdempotencyConflict):
        engine.submit(other)


def test_duplicated_and_out_of_order_callbacks_change_nothing_after_success(
    engine: Engine, channel: ScriptedChannel
) -> None:
    receipt = engine.submit(fuel_request())
    wait_for(lambda: paying(engine, receipt.order_id))
    serial = receipt.payment_serial
    assert signed_callback(engine, "wechat", serial, paid_reply(serial)) == "succeeded"
    assert signed_callback(engine, "wechat", serial, paid_reply(serial)) == "succeeded"
    assert signed_callback(engine, "wechat", serial, ChannelReply("SUCCESS", "USERPAYING")) \
        == "succeeded"
    assert signed_callback(engine, "wechat", serial, ChannelReply("SUCCESS", "PAYERROR")) \
        == "succeeded"
    wait_for(lambda: settled(engine, receipt.order_id))
    paid_moves = [e for e in engine.journal(receipt.order_id) if e.to_state == "paid"]
    assert len(paid_moves) == 1
    assert channel.count("refund") == 0
    assert balances(engine, "alice/points") == (1_000, 980, 0, 20)


def test_a_late_processing_reply_never_moves_a_success_back(
    engine: Engine, channel: ScriptedChannel
) -> None:
    receipt = engine.submit(fuel_request())
    wait_for(lambda: paying(engine, receipt.order_id))
    signed_callback(engine, "wechat", receipt.payment_serial, paid_reply(receipt.payment_serial))
    for code in ("USERPAYING", "NOTPAY", "SYSTEMERROR", "WHATEVER"):
        state = signed_callback(engine, "wechat", receipt.payment_serial,
                                       ChannelReply("SUCCESS", code))
        assert state == "succeeded"


def test_a_failure_callback_fails_the_payment_and_releases_every_hold(
    engine: Engine, channel: ScriptedChannel
) -> None:
    receipt = engine.submit(fuel_request())
    wait_for(lambda: paying(engine, receipt.order_id))
    assert signed_callback(engine, "wechat", receipt.payment_serial,
                                  ChannelReply("SUCCESS", "PAYERROR")) == "failed"
    wait_for(lambda: settled(engine, receipt.order_id))
    for account in ("alice/red-packet", "alice/points", "alice/phone"):
        assert balances(engine, account) == (1_000, 1_000, 0, 0)


# ---------------------------------------------------------------------- unknown results


def test_an_unknown_result_is_queried_on_its_schedule_then_awaits_reconciliation(
    tmp_path: Path, channel: ScriptedChannel
) -> None:
    channel.pay_reply = TimeoutError("no answer")
    channel.query_reply = NO_ANSWER
    policy = OrderPolicy(pay_window_ms=60_000, query_schedule_ms=(20, 40, 60))
    engine = open_engine(tmp_path / "pay.db", channel, policy)
    try:
        fund_customer(engine)
        receipt = engine.submit(fuel_request())
        wait_for(lambda: engine.get_order(receipt.order_id).state == "needs_reconciliation",
                 what="needs_reconciliation")
        assert channel.count("query") == 3
        assert balances(engine, "alice/points") == (1_000, 980, 20, 0)  # holds stay held
        signed_callback(engine, "wechat", receipt.payment_serial, paid_reply(receipt.payment_serial))
        wait_for(lambda: settled(engine, receipt.order_id))
        assert engine.get_order(receipt.order_id).state == "succeeded"
    finally:
        engine.shutdown()


# ---------------------------------------------------------------------- vouchers


def test_a_refused_hold_fails_the_payment_before_the_channel_is_called(
    tmp_path: Path, channel: ScriptedChannel
) -> None:
    engine = open_engine(tmp_path / "pay.db", channel)
    try:
        fund_customer(engine, points=10)  # 20 points asked
        receipt = engine.submit(fuel_request())
        wait_for(lambda: settled(engine, receipt.order_id))
        order = engine.get_order(receipt.order_id)
        assert order.state == "failed" and order.cause.startswith("hold_refused")
        assert channel.calls == []
        assert balances(engine, "alice/red-packet") == (1_000, 1_000, 0, 0)
        assert balances(engine, "alice/points") == (10, 10, 0, 0)
    finally:
        engine.shutdown()


def test_a_post_deduct_shortfall_refunds_the_cash_and_gives_every_voucher_back(
    tmp_path: Path, channel: ScriptedChannel
) -> None:
    engine = open_engine(tmp_path / "pay.db", channel)
    try:
        fund_customer(engine, phone=50)  # 100 asked, deducted only after the cash
        receipt = engine.submit(fuel_request(phone_mode=LegMode.POST_DEDUCT))
        wait_for(lambda: paying(engine, receipt.order_id))
        assert balances(engine, "alice/phone") == (50, 50, 0, 0)  # nothing held
        signed_callback(engine, "wechat", receipt.payment_serial, paid_reply(receipt.payment_serial))
        wait_for(lambda: channel.count("refund") == 1, what="refund")
        refund_id = next(c for c in channel.calls if c[0] == "refund")[2]
        signed_refund_callback(engine, "wechat", receipt.payment_serial, refund_id,
                                      ChannelReply("SUCCESS", "SUCCESS"))
        wait_for(lambda: settled(engine, receipt.order_id))
        order = engine.get_order(receipt.order_id)
        assert (order.state, order.cause) == ("failed", "post_deduct_shortfall")
        assert [leg.status for leg in order.legs] == ["refunded", "cancelled", "cancelled",
                                                      "shortfall"]
        assert balances(engine, "alice/points") == (1_000, 1_000, 0, 0)
    finally:
        engine.shutdown()


def test_a_pre_hold_is_adopted_by_the_order_and_confirmed(
    engine: Engine, channel: ScriptedChannel
) -> None:
    hold = engine.pre_hold("alice/points", 20, ttl_ms=60_000)
    assert balances(engine, "alice/points") == (1_000, 980, 20, 0)
    request = PaymentRequest(
        merchant_id="station-1", merchant_order_no="ph-1", user_id="alice", currency="CNY",
        total_minor=1_000, title="Fuel", cash=None,
        vouchers=(VoucherPart("alice/points", 20, LegMode.PRE_HELD, hold.hold_id),
                  VoucherPart("alice/red-packet", 800)))
    receipt = engine.submit(request)
    wait_for(lambda: settled(engine, receipt.order_id))
    assert engine.get_order(receipt.order_id).state == "succeeded"  # vouchers only: no channel
    assert engine.get_hold("alice/points", hold.hold_id).order_id == receipt.order_id
    assert balances(engine, "alice/points") == (1_000, 980, 0, 20)
    assert channel.calls == []


def test_an_unadopted_pre_hold_expires_and_its_vouchers_come_back(engine: Engine) -> None:
    hold = engine.pre_hold("alice/points", 30, ttl_ms=100)
    assert engine.get_hold("alice/points", hold.hold_id).status == "pending"
    wait_for(lambda: engine.get_hold("alice/points", hold.hold_id).status == "expired",
             what="expiry")
    assert balances(engine, "alice/points") == (1_000, 1_000, 0, 0)


def test_a_pre_hold_that_expired_cannot_pay_an_order(engine: Engine,
                                                     channel: ScriptedChannel) -> None:
    hold = engine.pre_hold("alice/points", 20, ttl_ms=50)
    wait_for(lambda: engine.get_hold("alice/points", hold.hold_id).status == "expired")
    request = PaymentRequest(
        merchant_id="station-1", merchant_order_no="ph-2", user_id="alice", currency="CNY",
        total_minor=1_000, title="Fuel", cash=None,
        vouchers=(VoucherPart("alice/points", 20, LegMode.PRE_HELD, hold.hold_id),
                  VoucherPart("alice/red-packet", 800)))
    receipt = engine.submit(request)
    wait_for(lambda: settled(engine, receipt.order_id))
    assert engine.get_order(receipt.order_id).state == "failed"
    assert balances(engine, "alice/red-packet") == (1_000, 1_000, 0, 0)


# ---------------------------------------------------------------------- typed errors


def test_bad_input_is_a_typed_error_and_leaves_the_engine_working(engine: Engine) -> None:
    with pytest.raises(InvalidAmount):
        engine.fund("alice/points", 1.5, funding_id="f")  # type: ignore[arg-type]
    with pytest.raises(UnknownAccount):
        engine.fund("nobody", 10, funding_id="f2")
    with pytest.raises(UnknownOrder):
        engine.get_order("ord_missing")
    with pytest.raises(UnknownOrder):
        engine.close("ord_missing")
    with pytest.raises(UnknownOrder):
        signed_callback(engine, "wechat", "P-missing", PAID)
    with pytest.raises(InsufficientBalance):
        engine.pre_hold("alice/points", 5_000)
    engine.open_account("usd/voucher", "USD")
    engine.fund("usd/voucher", 500, funding_id="usd")
    with pytest.raises(CurrencyMismatch):
        engine.submit(PaymentRequest("station-1", "cm-1", "alice", "CNY", 500, "Fuel",
                                     vouchers=(VoucherPart("usd/voucher", 500),)))
    with pytest.raises(InvalidRequest):
        engine.submit(PaymentRequest("station-1", "sum-1", "alice", "CNY", 500, "Fuel",
                                     vouchers=(VoucherPart("alice/red-packet", 400),)))
    with pytest.raises(InvalidRequest):
        engine.submit(fuel_request().__class__(
            "station-1", "ch-1", "alice", "CNY", 500, "Fuel",
            cash=fuel_request().cash.__class__(500, "no-such-channel")))  # type: ignore[union-attr]
    # the same account actor still serves after refusing
    assert engine.fund("alice/points", 5, funding_id="after-errors").funded == 1_005
    assert engine.fund("alice/points", 5, funding_id="after-errors").funded == 1_005
    with pytest.raises(IdempotencyConflict):
        engine.fund("alice/points", 6, funding_id="after-errors")


# ---------------------------------------------------------------------- bounded actors


def test_order_actors_stop_when_settled_and_accounts_after_their_quiet_period(
    tmp_path: Path, channel: ScriptedChannel
) -> None:
    engine = open_engine(tmp_path / "pay.db", channel,
                         config=EngineConfig(account_idle_ms=100))
    try:
        fund_customer(engine)
        receipt = engine.submit(fuel_request())
        wait_for(lambda: paying(engine, receipt.order_id))
        # in flight, but only waiting for its user: passivated, its actor gone
        assert engine._ctx.directory.count("order") == 1
        wait_for(lambda: engine._ctx.directory.live_count("order") == 0, what="passivation")
        signed_callback(engine, "wechat", receipt.payment_serial, paid_reply(receipt.payment_serial))
        wait_for(lambda: settled(engine, receipt.order_id))
        wait_for(lambda: engine._ctx.directory.count("order") == 0, what="order stop")
        wait_for(lambda: engine._ctx.directory.live_count("account") == 0, what="account stop")
        # a late duplicate callback wakes the order from the database, changes nothing
        serial = receipt.payment_serial
        assert signed_callback(engine, "wechat", serial, paid_reply(serial)) == "succeeded"
        wait_for(lambda: engine._ctx.directory.live_count("order") == 0)
    finally:
        engine.shutdown()


# ---------------------------------------------------------------------- restart


def test_shutdown_mid_flight_and_reopen_resumes_the_order(
    tmp_path: Path, channel: ScriptedChannel
) -> None:
    path = tmp_path / "pay.db"
    engine = open_engine(path, channel)
    fund_customer(engine)
    receipt = engine.submit(fuel_request())
    wait_for(lambda: paying(engine, receipt.order_id))
    engine.shutdown()
    reopened = open_engine(path, channel)
    try:
        serial = receipt.payment_serial
        assert signed_callback(reopened, "wechat", serial, paid_reply(serial)) == "succeeded"
        wait_for(lambda: settled(reopened, receipt.order_id))
        assert balances(reopened, "alice/points") == (1_000, 980, 0, 20)
    finally:
        reopened.shutdown()


def test_submits_after_shutdown_are_refused(engine: Engine) -> None:
    engine.shutdown()
    from payengine import EngineClosed

    with pytest.raises(EngineClosed):
        engine.submit(fuel_request())
    assert isinstance(engine, _Engine)
