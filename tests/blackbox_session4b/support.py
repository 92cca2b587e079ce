"""Wallet fakes written from the README's protocol description (Channel + AgreementChannel)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from payengine import (
    AgreementStatus,
    CashPart,
    ChannelReply,
    CodeTable,
    Engine,
    EngineConfig,
    OrderPolicy,
    PaymentRequest,
)
from payengine.actors.channel import ChannelNotification
from tests.helpers import TEST_NOTIFICATIONS

CODES = CodeTable("wallet", communication_ok=frozenset({"SUCCESS"}),
                  success=frozenset({"SUCCESS"}),
                  failure=frozenset({"PAYERROR", "CLOSED", "BANK_DOWN", "NOTENOUGH", "FORBIDDEN"}),
                  processing=frozenset({"USERPAYING", "NOTPAY"}),
                  retryable=frozenset({"BANK_DOWN", "NOTENOUGH"}),
                  not_found=frozenset({"ORDERNOTEXIST"}))
REFUND_CODES = CodeTable("wallet", communication_ok=frozenset({"SUCCESS"}),
                         success=frozenset({"SUCCESS"}), failure=frozenset({"REFUNDCLOSE"}),
                         processing=frozenset({"PROCESSING", "CHANGE"}))

Reply = ChannelReply | Exception | Callable[..., ChannelReply]


class Wallet:
    """A wallet with details-aware pay and (optionally) agreements. Thread-safe."""

    pay_codes = CODES
    refund_codes = REFUND_CODES

    def __init__(self, name: str, *, pay: Reply | None = None, query: Reply | None = None,
                 close: Reply | None = None) -> None:
        self.name = name
        self.pay_reply: Reply = pay or ChannelReply("SUCCESS", "USERPAYING")
        self.query_reply: Reply = query or ChannelReply("SUCCESS", "USERPAYING")
        self.close_reply: Reply = close or ChannelReply("SUCCESS", "CLOSED")
        self.refund_reply: Reply = ChannelReply("SUCCESS", "SUCCESS")
        self.query_refund_reply: Reply = ChannelReply("SUCCESS", "SUCCESS")
        self.calls: list[tuple[Any, ...]] = []
        self.notifications = TEST_NOTIFICATIONS
        self._lock = threading.Lock()

    def _answer(self, call: tuple[Any, ...], reply: Reply) -> ChannelReply:
        with self._lock:
            self.calls.append(call)
        if isinstance(reply, Exception):
            raise reply
        if callable(reply) and not isinstance(reply, ChannelReply):
            return reply(*call[1:])
        return reply

    def pay(self, payment_serial: str, amount_minor: int, currency: str, title: str,
            details: Any = None) -> ChannelReply:
        return self._answer(("pay", payment_serial, amount_minor, details), self.pay_reply)

    def query(self, payment_serial: str) -> ChannelReply:
        return self._answer(("query", payment_serial), self.query_reply)

    def query_charge(self, payment_serial: str, channel_txn_id: str) -> ChannelReply:
        return self._answer(("query_charge", payment_serial, channel_txn_id),
                            ChannelReply("SUCCESS", "ORDERNOTEXIST"))

    def close(self, payment_serial: str) -> ChannelReply:
        return self._answer(("close", payment_serial), self.close_reply)

    def refund(self, payment_serial: str, refund_id: str, amount_minor: int, currency: str
               ) -> ChannelReply:
        return self._answer(("refund", payment_serial, refund_id, amount_minor),
                            self.refund_reply)

    def query_refund(self, payment_serial: str, refund_id: str) -> ChannelReply:
        return self._answer(("query_refund", payment_serial, refund_id),
                            self.query_refund_reply)

    def verify_notification(self, body: bytes, headers: Mapping[str, str]
                            ) -> ChannelNotification:
        return self.notifications.verify(body, headers)

    def count(self, kind: str) -> int:
        with self._lock:
            return sum(1 for c in self.calls if c[0] == kind)

    def calls_of(self, kind: str) -> list[tuple[Any, ...]]:
        with self._lock:
            return [c for c in self.calls if c[0] == kind]


class AgreementWallet(Wallet):
    """A wallet that also signs agreements (the README's AgreementChannel)."""

    def __init__(self, name: str, *, sign: AgreementStatus | Exception = AgreementStatus.SIGNED,
                 unsign: AgreementStatus | Exception = AgreementStatus.TERMINATED,
                 **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        self.sign_reply = sign
        self.unsign_reply = unsign

    def sign(self, agreement_id: str, user_id: str) -> AgreementStatus:
        with self._lock:
            self.calls.append(("sign", agreement_id, user_id))
        if isinstance(self.sign_reply, Exception):
            raise self.sign_reply
        return self.sign_reply

    def unsign(self, agreement_id: str) -> AgreementStatus:
        with self._lock:
            self.calls.append(("unsign", agreement_id))
        if isinstance(self.unsign_reply, Exception):
            raise self.unsign_reply
        return self.unsign_reply


def paid(serial: str, amount: int | None = None) -> ChannelReply:
    return ChannelReply("SUCCESS", "SUCCESS", f"TX-{serial}", amount)


SLOW = OrderPolicy(pay_window_ms=60_000, query_schedule_ms=(60_000,),
                   refund_query_schedule_ms=(60_000,))
QUICK = OrderPolicy(pay_window_ms=3_000, query_schedule_ms=(100, 200, 400),
                    refund_query_schedule_ms=(100, 200, 400))


def open_with(path: Path, channels: list[Any], policy: OrderPolicy = SLOW,
              **config: Any) -> Engine:
    config.setdefault("ask_timeout_s", 5.0)
    config.setdefault("duplicate_guard_window_ms", 0)
    return Engine.open(path, channels=channels, policy=policy, config=EngineConfig(**config))


def cash_request(no: str, channel: str, amount: int = 50_00, user: str = "alice",
                 merchant: str = "station-1") -> PaymentRequest:
    return PaymentRequest(merchant, no, user, "CNY", amount, "Fuel",
                          cash=CashPart(amount, channel))
