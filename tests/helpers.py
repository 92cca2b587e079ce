"""Fakes and helpers for actor tests: a scripted channel and polling with a deadline."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

from payengine import (
    CashPart,
    ChannelReply,
    Engine,
    EngineConfig,
    LegMode,
    OrderPolicy,
    OrderView,
    PaymentRequest,
    VoucherPart,
)
from payengine.actors.channel import (
    ChannelNotification,
    NotificationKind,
    SignedJsonNotifications,
)
from payengine.engine.codes import WECHAT_LIKE_PAY_CODES, WECHAT_LIKE_REFUND_CODES

T = TypeVar("T")

TEST_SIGNING_KEY = b"payengine-test-channel-key"
TEST_NOTIFICATIONS = SignedJsonNotifications(TEST_SIGNING_KEY)
"""How the tests' channels sign and verify their notifications."""

PROCESSING = ChannelReply("SUCCESS", "USERPAYING")
PAID = ChannelReply("SUCCESS", "SUCCESS", "TX1", None)
NO_ANSWER = ChannelReply("FAIL", None)
REFUND_OK = ChannelReply("SUCCESS", "SUCCESS")
REFUND_CLOSED = ChannelReply("SUCCESS", "REFUNDCLOSE")


def paid_reply(payment_serial: str, amount_minor: int | None = None) -> ChannelReply:
    """The wallet's success for one payment, under a transaction id of its own: a
    transaction id pays one payment only (``PAID``'s ``TX1`` suits one order per test)."""
    return ChannelReply("SUCCESS", "SUCCESS", f"TX-{payment_serial}", amount_minor)


class ScriptedChannel:
    """A channel whose replies the test sets; it records every call. Thread-safe."""

    pay_codes = WECHAT_LIKE_PAY_CODES
    refund_codes = WECHAT_LIKE_REFUND_CODES

    def __init__(self, name: str = "wechat") -> None:
        self.name = name
        self.pay_reply: ChannelReply | Exception = PROCESSING
        self.query_reply: ChannelReply | Exception = PROCESSING
        self.close_reply: ChannelReply | Exception = ChannelReply("SUCCESS", "CLOSED")
        self.refund_reply: ChannelReply | Exception = ChannelReply("SUCCESS", "PROCESSING")
        self.refund_query_reply: ChannelReply | Exception = ChannelReply("SUCCESS", "SUCCESS")
        self.charge_query_reply: ChannelReply | Exception = ChannelReply("SUCCESS",
                                                                         "ORDERNOTEXIST")
        self.notifications = TEST_NOTIFICATIONS
        self.calls: list[tuple[str, ...]] = []
        self._lock = threading.Lock()

    def _answer(self, call: tuple[str, ...], reply: ChannelReply | Exception) -> ChannelReply:
        with self._lock:
            self.calls.append(call)
        if isinstance(reply, Exception):
            raise reply
        return reply

    def pay(self, payment_serial: str, amount_minor: int, currency: str, title: str
            ) -> ChannelReply:
        return self._answer(("pay", payment_serial, str(amount_minor)), self.pay_reply)

    def query(self, payment_serial: str) -> ChannelReply:
        return self._answer(("query", payment_serial), self.query_reply)

    def close(self, payment_serial: str) -> ChannelReply:
        return self._answer(("close", payment_serial), self.close_reply)

    def refund(self, payment_serial: str, refund_id: str, amount_minor: int, currency: str
               ) -> ChannelReply:
        return self._answer(("refund", payment_serial, refund_id, str(amount_minor)),
                            self.refund_reply)

    def query_refund(self, payment_serial: str, refund_id: str) -> ChannelReply:
        return self._answer(("query_refund", payment_serial, refund_id), self.refund_query_reply)

    def query_charge(self, payment_serial: str, channel_txn_id: str) -> ChannelReply:
        return self._answer(("query_charge", payment_serial, channel_txn_id),
                            self.charge_query_reply)

    def verify_notification(self, body: bytes, headers: Mapping[str, str]
                            ) -> ChannelNotification:
        return self.notifications.verify(body, headers)

    def count(self, kind: str) -> int:
        with self._lock:
            return sum(1 for c in self.calls if c[0] == kind)


def _signer(engine: Engine, channel: str) -> SignedJsonNotifications:
    """The channel's own signer (a simulated wallet has its key), else the tests' key."""
    known = engine._ctx.channels.get(channel)
    signer = getattr(known, "notifications", TEST_NOTIFICATIONS)
    assert isinstance(signer, SignedJsonNotifications)
    return signer


def signed_callback(engine: Engine, channel: str, payment_serial: str, reply: ChannelReply,
                    *, wait: bool = True) -> str:
    """The wallet's payment notification, signed as the wallet sends it, fed to the engine."""
    body, headers = _signer(engine, channel).sign(
        ChannelNotification(NotificationKind.PAYMENT, payment_serial, reply))
    return engine.handle_notification(channel, body, headers, wait=wait)


def signed_refund_callback(engine: Engine, channel: str, payment_serial: str, refund_id: str,
                           reply: ChannelReply, *, wait: bool = True) -> str:
    """The wallet's refund notification, signed, fed to the engine."""
    body, headers = _signer(engine, channel).sign(
        ChannelNotification(NotificationKind.REFUND, payment_serial, reply, refund_id))
    return engine.handle_notification(channel, body, headers, wait=wait)


def wait_for(predicate: Callable[[], T], timeout_s: float = 10.0, what: str = "condition") -> T:
    """Poll ``predicate`` until it returns something truthy; fail the test after the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.01)


SLOW_POLICY = OrderPolicy(pay_window_ms=60_000, query_schedule_ms=(60_000,),
                          refund_query_schedule_ms=(60_000,))
"""No timer fires during a test: the test feeds every result itself."""


def open_engine(path: Path, channel: object, policy: OrderPolicy = SLOW_POLICY,
                config: EngineConfig | None = None) -> Engine:
    """An engine on ``path``. The default config switches the user-dimension duplicate
    guard off: tests submit many orders of one user and amount; the guard has its own."""
    return Engine.open(path, channels=[channel], policy=policy,  # type: ignore[list-item]
                       config=config or EngineConfig(ask_timeout_s=5.0, duplicate_guard_window_ms=0))


def fund_customer(engine: Engine, who: str = "alice", red_packet: int = 1_000,
                  points: int = 1_000, phone: int = 1_000) -> None:
    engine.open_account(f"{who}/red-packet", "CNY")
    engine.fund(f"{who}/red-packet", red_packet, funding_id=f"{who}-rp")
    engine.open_account(f"{who}/points", "POINTS", minor_per_unit=10)
    engine.fund(f"{who}/points", points, funding_id=f"{who}-pts")
    engine.open_account(f"{who}/phone", "CNY")
    engine.fund(f"{who}/phone", phone, funding_id=f"{who}-phone")


def fuel_request(no: str = "order-1", who: str = "alice",
                 phone_mode: LegMode = LegMode.PRE_DEDUCT) -> PaymentRequest:
    """The seeds' example: 100.00 = 96.00 cash + 1.00 red packet + 20 points + 1.00 phone."""
    return PaymentRequest(
        merchant_id="station-1", merchant_order_no=no, user_id=who, currency="CNY",
        total_minor=10_000, title="Fuel", cash=CashPart(9_600, "wechat"),
        vouchers=(VoucherPart(f"{who}/red-packet", 100), VoucherPart(f"{who}/points", 20),
                  VoucherPart(f"{who}/phone", 100, phone_mode)))


def paid_order(engine: Engine, no: str = "order-1") -> OrderView:
    """Submit the fuel request ``no``, pay it by callback, and wait until it settled."""
    receipt = engine.submit(fuel_request(no))
    wait_for(lambda: engine.get_order(receipt.order_id).state == "paying", what="holds placed")
    signed_callback(engine, "wechat", receipt.payment_serial, paid_reply(receipt.payment_serial))
    settled = wait_for(lambda: (o := engine.get_order(receipt.order_id)).settled and o,
                       what="paid and confirmed")
    assert settled.state == "succeeded", settled
    return settled
