"""Black-box harness built from the README only: two hand-written channels implementing the
documented ``payengine.Channel`` protocol, and small helpers."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from payengine import (
    CashPart,
    ChannelNotification,
    ChannelReply,
    Engine,
    EngineConfig,
    NotificationKind,
    OrderPolicy,
    PaymentRequest,
    SignedJsonNotifications,
    VoucherPart,
)
from payengine.engine.codes import WECHAT_LIKE_PAY_CODES, WECHAT_LIKE_REFUND_CODES

OK = "SUCCESS"


class InstantChannel:
    """A wallet that pays at once, synchronously, and refunds at once."""

    pay_codes = WECHAT_LIKE_PAY_CODES
    refund_codes = WECHAT_LIKE_REFUND_CODES

    def __init__(self, name: str = "wechat") -> None:
        self.name = name
        self._lock = threading.Lock()
        self._txn = itertools.count(1)
        self.paid: dict[str, tuple[str, int, str]] = {}
        self.refunds: dict[str, int] = {}
        self.signer = SignedJsonNotifications(b"k" * 32)

    def pay(self, payment_serial: str, amount_minor: int, currency: str, title: str) -> ChannelReply:
        with self._lock:
            if payment_serial not in self.paid:
                self.paid[payment_serial] = (f"T{next(self._txn)}", amount_minor, currency)
            txn, amount, cur = self.paid[payment_serial]
        return ChannelReply(OK, "SUCCESS", txn, amount, cur)

    def query(self, payment_serial: str) -> ChannelReply:
        with self._lock:
            got = self.paid.get(payment_serial)
        if got is None:
            return ChannelReply(OK, "NOTPAY")
        return ChannelReply(OK, "SUCCESS", got[0], got[1], got[2])

    def query_charge(self, payment_serial: str, channel_txn_id: str) -> ChannelReply:
        got = self.paid.get(payment_serial)
        if got is None or got[0] != channel_txn_id:
            return ChannelReply(OK, "NOTPAY")
        return ChannelReply(OK, "SUCCESS", got[0], got[1], got[2])

    def close(self, payment_serial: str) -> ChannelReply:
        return ChannelReply(OK, "CLOSED")

    def refund(self, payment_serial: str, refund_id: str, amount_minor: int, currency: str) -> ChannelReply:
        with self._lock:
            self.refunds.setdefault(refund_id, amount_minor)
        return ChannelReply(OK, "SUCCESS", None, amount_minor, currency)

    def query_refund(self, payment_serial: str, refund_id: str) -> ChannelReply:
        amount = self.refunds.get(refund_id)
        if amount is None:
            return ChannelReply(OK, "NOTFOUND")
        return ChannelReply(OK, "SUCCESS", None, amount)

    def verify_notification(self, body: bytes, headers: Any) -> ChannelNotification:
        return self.signer.verify(body, headers)


class SilentChannel(InstantChannel):
    """A wallet whose users never pay by themselves: ``pay`` answers "processing"
    (USERPAYING), queries say NOTPAY-like processing, until the test calls ``user_pays``,
    which records the charge and returns a signed notification to feed the engine."""

    def __init__(self, name: str = "wechat") -> None:
        super().__init__(name)
        self.pay_calls = 0
        self.closed: set[str] = set()
        self.amounts: dict[str, tuple[int, str]] = {}

    def pay(self, payment_serial: str, amount_minor: int, currency: str, title: str) -> ChannelReply:
        with self._lock:
            self.pay_calls += 1
            self.amounts[payment_serial] = (amount_minor, currency)
        return ChannelReply(OK, "USERPAYING")

    def query(self, payment_serial: str) -> ChannelReply:
        with self._lock:
            got = self.paid.get(payment_serial)
        if got is None:
            return ChannelReply(OK, "USERPAYING")
        return ChannelReply(OK, "SUCCESS", got[0], got[1], got[2])

    def close(self, payment_serial: str) -> ChannelReply:
        with self._lock:
            if payment_serial in self.paid:
                got = self.paid[payment_serial]
                return ChannelReply(OK, "SUCCESS", got[0], got[1], got[2])
            self.closed.add(payment_serial)
        return ChannelReply(OK, "CLOSED")

    def user_pays(self, payment_serial: str) -> tuple[bytes, dict[str, str]]:
        with self._lock:
            amount, cur = self.amounts[payment_serial]
            txn = f"T{next(self._txn)}"
            self.paid[payment_serial] = (txn, amount, cur)
        note = ChannelNotification(
            NotificationKind.PAYMENT, payment_serial, ChannelReply(OK, "SUCCESS", txn, amount, cur)
        )
        return self.signer.sign(note)


def open_engine(
    path: Path,
    channel: Any,
    *,
    config: EngineConfig | None = None,
    policy: OrderPolicy | None = None,
    **kw: Any,
) -> Engine:
    return Engine.open(path, channels=[channel], config=config, policy=policy, **kw)


def setup_accounts(engine: Engine, users: int = 1, prefix: str = "u") -> None:
    for i in range(users):
        engine.open_account(f"{prefix}{i}/rp", "CNY")
        engine.fund(f"{prefix}{i}/rp", 1_000_000, funding_id=f"fund-{prefix}{i}-rp")
        engine.open_account(f"{prefix}{i}/points", "POINTS", minor_per_unit=10)
        engine.fund(f"{prefix}{i}/points", 1_000_000, funding_id=f"fund-{prefix}{i}-pts")


def request(
    no: str,
    *,
    user: str = "u0",
    total: int = 100_00,
    vouchers: bool = True,
    channel: str = "wechat",
    merchant: str = "station-42",
    pay_window_ms: int | None = None,
) -> PaymentRequest:
    """A combined payment: cash + 1.00 red packet + 20 points (2.00), as in the README."""
    parts: tuple[VoucherPart, ...] = ()
    cash = total
    if vouchers:
        parts = (VoucherPart(f"{user}/rp", 100), VoucherPart(f"{user}/points", 20))
        cash = total - 300
    return PaymentRequest(
        merchant_id=merchant,
        merchant_order_no=no,
        user_id=f"user-{no}",  # distinct users: the duplicate guard stays out of the way
        currency="CNY",
        total_minor=total,
        title="Fuel, pump 3",
        cash=CashPart(cash, channel=channel),
        vouchers=parts,
        pay_window_ms=pay_window_ms,
    )


def wait_until(cond: Callable[[], bool], timeout_s: float = 20.0, every_s: float = 0.02) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(every_s)
    return cond()


def run_threads(n: int, target: Callable[[int], None]) -> None:
    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
