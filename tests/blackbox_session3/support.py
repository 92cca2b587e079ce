"""Shared helpers for the session-3 black-box suite (README-only knowledge)."""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from payengine import (
    CashPart,
    ChannelReply,
    CodeTable,
    Engine,
    PaymentRequest,
    SignedJsonNotifications,
    ThreadRuntime,
)
from payengine.sim.channel import ChannelFaults, SimulatedChannel

DEADLINE_S = 15.0
_counter = itertools.count(1)


def wait_for(predicate: Callable[[], Any], what: str = "condition", deadline_s: float = DEADLINE_S) -> Any:
    """Poll until predicate() is truthy; fail loudly on the deadline."""
    end = time.monotonic() + deadline_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def uniq(prefix: str = "no") -> str:
    return f"{prefix}-{next(_counter)}-{time.monotonic_ns() % 1_000_000}"


def fuel(no: str | None = None, total: int = 100_00, channel: str = "wechat", user: str | None = None,
         merchant: str = "station-42", details: Any = None, **kw: Any) -> PaymentRequest:
    return PaymentRequest(merchant, no or uniq(), user or uniq("user"), "CNY", total, "Fuel",
                          cash=CashPart(total, channel, details), **kw)


PAY_CODES = CodeTable("x", frozenset({"SUCCESS"}), frozenset({"SUCCESS"}),
                      frozenset({"PAYERROR", "CLOSED", "REVOKED"}),
                      processing=frozenset({"NOTPAY", "USERPAYING"}),
                      retryable=frozenset({"PAYERROR"}))
REFUND_CODES = CodeTable("x", frozenset({"SUCCESS"}), frozenset({"SUCCESS"}), frozenset({"REFUNDCLOSE"}),
                         processing=frozenset({"PROCESSING", "CHANGE"}))


WAITING = ChannelReply("SUCCESS", "USERPAYING")


class ScriptedChannel:
    """A hand-written Channel (the README's protocol) whose answers a test scripts."""

    def __init__(self, name: str, key: bytes | None = None) -> None:
        self.name = name
        self.pay_codes = CodeTable(name, PAY_CODES.communication_ok, PAY_CODES.success, PAY_CODES.failure,
                                   PAY_CODES.processing, PAY_CODES.retryable)
        self.refund_codes = CodeTable(name, REFUND_CODES.communication_ok, REFUND_CODES.success,
                                      REFUND_CODES.failure, REFUND_CODES.processing)
        self.notifications = SignedJsonNotifications(key or (name + "-signing-key-0123456789").encode())
        self.lock = threading.Lock()
        self.pay_calls: list[tuple[str, int, str, str, Any]] = []
        self.query_calls: list[str] = []
        self.close_calls: list[str] = []
        self.refund_calls: list[tuple[str, str, int]] = []
        self.pay_reply: Callable[[str, int], ChannelReply] = lambda s, a: WAITING
        self.query_reply: Callable[[str], ChannelReply] = lambda s: WAITING
        self.pay_raises: BaseException | None = None
        self.query_raises: BaseException | None = None

    def pay(self, payment_serial: str, amount_minor: int, currency: str, title: str,
            details: Any = None) -> ChannelReply:
        with self.lock:
            self.pay_calls.append((payment_serial, amount_minor, currency, title, details))
        if self.pay_raises is not None:
            raise self.pay_raises
        return self.pay_reply(payment_serial, amount_minor)

    def query(self, payment_serial: str) -> ChannelReply:
        with self.lock:
            self.query_calls.append(payment_serial)
        if self.query_raises is not None:
            raise self.query_raises
        return self.query_reply(payment_serial)

    def query_charge(self, payment_serial: str, channel_txn_id: str) -> ChannelReply:
        return ChannelReply("SUCCESS", "NOTPAY")

    def close(self, payment_serial: str) -> ChannelReply:
        with self.lock:
            self.close_calls.append(payment_serial)
        return ChannelReply("SUCCESS", "CLOSED")

    def refund(self, payment_serial: str, refund_id: str, amount_minor: int, currency: str) -> ChannelReply:
        with self.lock:
            self.refund_calls.append((payment_serial, refund_id, amount_minor))
        return ChannelReply("SUCCESS", "SUCCESS", amount_minor=amount_minor)

    def query_refund(self, payment_serial: str, refund_id: str) -> ChannelReply:
        return ChannelReply("SUCCESS", "SUCCESS")

    def verify_notification(self, body: bytes, headers: Any) -> Any:
        return self.notifications.verify(body, headers)

    def pays_of(self, serial: str) -> list[tuple[str, int, str, str, Any]]:
        with self.lock:
            return [c for c in self.pay_calls if c[0] == serial]


class FourArgChannel(ScriptedChannel):
    """A channel whose pay takes only four arguments (no details)."""

    def pay(self, payment_serial: str, amount_minor: int, currency: str, title: str) -> ChannelReply:  # type: ignore[override]
        return super().pay(payment_serial, amount_minor, currency, title, "NO-DETAILS-PARAM")


class World:
    """An engine on a temp file plus its simulated wallets; shut down by the fixture."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.runtime = ThreadRuntime()
        self.engines: list[Engine] = []

    def sim(self, name: str = "wechat", seed: int = 1) -> SimulatedChannel:
        return SimulatedChannel(name, self.runtime, seed=seed, faults=ChannelFaults.none())

    def open(self, channels: list[Any], attach: bool = True, db: str | None = None, **kw: Any) -> Engine:
        engine = Engine.open(self.tmp / (db or f"e{len(self.engines)}.db"), channels=channels, **kw)
        self.engines.append(engine)
        if attach:
            for ch in channels:
                if isinstance(ch, SimulatedChannel):
                    ch.attach(engine)
        return engine

    def close(self) -> None:
        for engine in self.engines:
            with contextlib.suppress(Exception):
                engine.shutdown()
        self.runtime.shutdown()
