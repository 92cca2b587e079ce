"""Defects a review of the notification, in-flight and sentinel work found, each pinned.

- A forged callback must not use up the turn of a genuine second charge's confirmation.
- A second charge or a refund failure, even signed, is believed only once the channel says
  so: until then it is refused (``unconfirmed``), so the wallet sends it again, and a
  confirmation query that failed once is asked again on that retry.
- The bound on confirmation queries holds for a settled order too (its actor stops after
  every message).
- An order actor restarted in the same process still knows its pay call is running.
- A pay reply the core refuses still ends the pay call: the close that waited goes out.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from payengine import (
    CashPart,
    ChannelReply,
    Engine,
    EngineConfig,
    NotificationRejected,
    PaymentRequest,
)
from tests.helpers import (
    SLOW_POLICY,
    ScriptedChannel,
    paid_reply,
    signed_callback,
    wait_for,
)

SECOND = ChannelReply("SUCCESS", "SUCCESS", "TX-2", 1_000)


def open_engine(tmp_path: Path, channel: ScriptedChannel) -> Engine:
    return Engine.open(tmp_path / "pay.db", channels=[channel],  # type: ignore[list-item]
                       policy=SLOW_POLICY,
                       config=EngineConfig(ask_timeout_s=5.0, duplicate_guard_window_ms=0))


@pytest.fixture
def channel() -> ScriptedChannel:
    return ScriptedChannel("wechat")


@pytest.fixture
def engine(tmp_path: Path, channel: ScriptedChannel) -> Iterator[Engine]:
    eng = open_engine(tmp_path, channel)
    yield eng
    eng.shutdown()


def submit(engine: Engine, no: str) -> tuple[str, str]:
    receipt = engine.submit(PaymentRequest("station-1", no, "alice", "CNY", 1_000, "Fuel",
                                           CashPart(1_000, "wechat")))
    wait_for(lambda: engine.get_order(receipt.order_id).state == "paying", what="paying")
    return receipt.order_id, receipt.payment_serial


def paid(engine: Engine, no: str) -> tuple[str, str]:
    order_id, serial = submit(engine, no)
    assert signed_callback(engine, "wechat", serial, paid_reply(serial)) == "succeeded"
    return order_id, serial


def second_charge_refunds(engine: Engine, order_id: str) -> list[str]:
    return [r.status for r in engine.get_order(order_id).refunds if r.refund_no == "charge:TX-2"]


def test_a_forged_callback_does_not_use_up_a_genuine_second_charges_confirmation(
        engine: Engine, channel: ScriptedChannel) -> None:
    order_id, serial = paid(engine, "o1")
    with pytest.raises(NotificationRejected, match="not believed"):
        engine.handle_callback("wechat", serial, ChannelReply("SUCCESS", "SUCCESS", "F1", 1_000))
    channel.charge_query_reply = SECOND
    with pytest.raises(NotificationRejected) as raised:  # signed, but money would leave
        signed_callback(engine, "wechat", serial, SECOND)
    assert raised.value.reason == "unconfirmed"
    wait_for(lambda: ("query_charge", serial, "TX-2") in channel.calls, what="TX-2 asked")
    wait_for(lambda: second_charge_refunds(engine, order_id), what="refunded")
    assert signed_callback(engine, "wechat", serial, SECOND) == "succeeded"  # now acknowledged


def test_a_confirmation_query_that_failed_is_asked_again_on_the_wallets_retry(
        engine: Engine, channel: ScriptedChannel) -> None:
    order_id, serial = paid(engine, "o1")
    channel.charge_query_reply = TimeoutError("read timed out")
    with pytest.raises(NotificationRejected):
        signed_callback(engine, "wechat", serial, SECOND)
    wait_for(lambda: channel.count("query_charge") == 1, what="asked once")
    assert second_charge_refunds(engine, order_id) == []
    channel.charge_query_reply = SECOND
    time.sleep(SLOW_POLICY.confirm_query_interval_ms / 1000)  # the wallet's retry, later
    with pytest.raises(NotificationRejected):
        signed_callback(engine, "wechat", serial, SECOND)
    wait_for(lambda: second_charge_refunds(engine, order_id), what="refunded at last")


def test_confirmation_queries_stay_bounded_for_a_settled_order(
        engine: Engine, channel: ScriptedChannel) -> None:
    order_id, serial = paid(engine, "o1")
    wait_for(lambda: engine.get_order(order_id).settled, what="settled")
    for i in range(50):
        with pytest.raises(NotificationRejected):
            engine.handle_callback("wechat", serial,
                                   ChannelReply("SUCCESS", "SUCCESS", f"F-{i}", 1_000))
    time.sleep(0.3)
    assert channel.count("query_charge") == 1


class GatedPay(ScriptedChannel):
    """A wallet whose ``pay`` blocks until the test opens the gate; records overlaps."""

    def __init__(self) -> None:
        super().__init__("wechat")
        self.gate = threading.Event()
        self.paying = 0
        self.overlaps: list[str] = []

    def pay(self, payment_serial: str, amount_minor: int, currency: str, title: str
            ) -> ChannelReply:
        self.paying += 1
        try:
            self.gate.wait(10)
            return super().pay(payment_serial, amount_minor, currency, title)
        finally:
            self.paying -= 1

    def close(self, payment_serial: str) -> ChannelReply:
        if self.paying:
            self.overlaps.append(payment_serial)
        return super().close(payment_serial)


def test_an_order_actor_restarted_in_the_process_still_knows_its_pay_is_running(
        tmp_path: Path) -> None:
    channel = GatedPay()
    engine = open_engine(tmp_path, channel)
    try:
        receipt = engine.submit(PaymentRequest("m", "o1", "u", "CNY", 1_000, "t",
                                               CashPart(1_000, "wechat")))
        wait_for(lambda: channel.paying == 1, what="the pay call running")
        real_save = engine.store.save_order
        failures = [sqlite3.OperationalError("disk I/O error")]

        def save_failing_once(*args: Any, **kwargs: Any) -> Any:
            if failures:
                raise failures.pop()  # a transient error kills the order's actor
            return real_save(*args, **kwargs)

        engine.store.save_order = save_failing_once  # type: ignore[method-assign]
        engine.request_close(receipt.order_id)
        time.sleep(0.2)
        engine.request_close(receipt.order_id)  # a new actor, loaded from the database
        wait_for(lambda: engine.get_order(receipt.order_id).state == "closed", what="closed")
        time.sleep(0.2)
        assert channel.count("pay") == 0 and channel.count("close") == 0  # pay still running
        channel.gate.set()
        wait_for(lambda: channel.count("close") == 1, what="the close after the pay")
        assert channel.count("pay") == 1 and channel.overlaps == []
    finally:
        channel.gate.set()
        engine.shutdown()


def test_a_pay_reply_the_core_refuses_still_ends_the_pay_call(
        engine: Engine, channel: ScriptedChannel) -> None:
    channel.pay_reply = ChannelReply("SUCCESS", "USERPAYING", None, None, "USD")
    order_id, _ = submit(engine, "o1")
    wait_for(lambda: channel.count("pay") == 1, what="paid")
    time.sleep(0.2)
    assert engine.close(order_id).state == "closed"
    wait_for(lambda: channel.count("close") == 1, what="closed at the channel")


def test_a_pay_success_in_another_currency_is_never_a_success(
        engine: Engine, channel: ScriptedChannel) -> None:
    channel.pay_reply = ChannelReply("SUCCESS", "SUCCESS", "T1", 1_000, "USD")
    order_id = engine.submit(PaymentRequest("station-1", "o1", "alice", "CNY", 1_000, "Fuel",
                                            CashPart(1_000, "wechat"))).order_id
    view = wait_for(lambda: (o := engine.get_order(order_id)).state == "needs_reconciliation"
                    and o, what="flagged")
    assert view.legs[0].status == "unknown"


def test_owed_with_a_limit_is_not_filled_by_orders_owing_the_voucher_systems_nothing(
        tmp_path: Path, channel: ScriptedChannel) -> None:
    from payengine import VoucherPart
    from payengine.actors.directory import Directory
    from payengine.actors.voucher_link import DirectVoucherLink
    from payengine.engine.order import ConfirmHold

    class ConfirmsLost(DirectVoucherLink):
        def request(self, account_id: str, command: Any) -> None:
            if not isinstance(command.effect, ConfirmHold):  # the Confirm never arrives
                super().request(account_id, command)

    def link(directory: Directory) -> ConfirmsLost:
        return ConfirmsLost(directory)

    channel.refund_reply = ChannelReply("SUCCESS", "PROCESSING")
    engine = Engine.open(tmp_path / "p.db", channels=[channel],  # type: ignore[list-item]
                         policy=SLOW_POLICY, voucher_link=link,
                         config=EngineConfig(ask_timeout_s=5.0, duplicate_guard_window_ms=0))
    try:
        older, _ = paid(engine, "o1")
        engine.refund(older, "rf1", 500)  # its cash part at the channel: nothing owed to vouchers
        engine.open_account("a/rp", "CNY")
        engine.fund("a/rp", 1_000, funding_id="f1")
        receipt = engine.submit(PaymentRequest("station-1", "o2", "alice", "CNY", 1_100, "Fuel",
                                               CashPart(1_000, "wechat"),
                                               (VoucherPart("a/rp", 100),)))
        wait_for(lambda: engine.get_order(receipt.order_id).state == "paying", what="paying")
        signed_callback(engine, "wechat", receipt.payment_serial,
                        paid_reply(receipt.payment_serial))
        wait_for(lambda: engine.owed(), what="the Confirm owed")
        (owed,) = engine.owed(limit=1)
        assert (owed.order_id, owed.operation) == (receipt.order_id, "confirm")
    finally:
        engine.shutdown()


BAD_IDS: list[object] = ["\ud800", "a\x00b", 7, b"x", ["a"], {"a": 1}, "", "x" * 129]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_the_notifications_api_refuses_bad_ids_typed(engine: Engine, bad: object) -> None:
    from payengine import InvalidRequest

    notifications = engine.notifications
    calls = [
        lambda: notifications.status(bad),  # type: ignore[arg-type]
        lambda: notifications.notifications_of(bad),  # type: ignore[arg-type]
        lambda: notifications.events(bad),  # type: ignore[arg-type]
        lambda: notifications.dead_letters(bad),  # type: ignore[arg-type]
        lambda: notifications.unregister_merchant(bad),  # type: ignore[arg-type]
        lambda: notifications.merchant(bad),  # type: ignore[arg-type]
        lambda: notifications.register_merchant(bad, "https://pos.example/n",  # type: ignore[arg-type]
                                                "s" * 16),
        lambda: notifications.register_merchant("m", "https://pos.example/n", "s" * 16,
                                                states=bad),  # type: ignore[arg-type]
    ]
    for call in calls:
        if bad == "x" * 129 and call is calls[0]:
            continue  # an event id may be longer than an id (order id, version, index)
        with pytest.raises(InvalidRequest):
            call()


def test_the_confirm_limiter_gives_verified_reports_their_own_turn_and_stays_bounded() -> None:
    from payengine.actors.confirm_limiter import ConfirmLimiter

    limiter = ConfirmLimiter(interval_ms=1_000, orders_max=2)
    assert limiter.allow("o1", False, 0) and not limiter.allow("o1", False, 999)
    assert limiter.allow("o1", True, 999)  # a forger's turn is not the wallet's
    assert limiter.allow("o1", False, 1_000)  # the interval is over
    limiter.allow("o2", False, 1_000)
    limiter.allow("o3", False, 1_000)  # the least recent ones are forgotten past the bound
    assert limiter.allow("o1", False, 1_001)
