"""The cash channel interface (WeChat Pay, Alipay, a card acquirer) and its adapter.

A ``Channel`` is the integrator's code that talks to one payment channel. Its calls block
(network I/O), so the engine runs them on that channel's own I/O lane, never on an actor
thread. It answers with a ``ChannelReply`` holding the channel's raw codes; the engine, not
the channel, decides what they mean, by the channel's ``CodeTable``. An exception from a
call (timeout, connection reset) means "unknown": the order keeps querying.

Asynchronous results (the wallet's callback) come in through ``Engine.handle_callback`` and
``Engine.handle_refund_callback``, from whatever thread the integrator's HTTP server uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from payengine.engine.checks import check_instance, check_optional_id
from payengine.engine.codes import CodeTable, ResultKind
from payengine.engine.money import check_amount
from payengine.engine.order import CashResult, RefundResult, ResultSource


@dataclass(frozen=True, slots=True)
class ChannelReply:
    """A channel's answer, as raw codes.

    ``return_code`` is the communication level (did the request get a well-formed answer);
    ``result_code`` the business level (the trade or refund state).
    """

    return_code: str | None
    result_code: str | None
    channel_txn_id: str | None = None
    amount_minor: int | None = None


def check_reply(reply: object, what: str = "reply") -> ChannelReply:
    """Return ``reply`` if it is a ``ChannelReply`` of well-typed fields: the codes and the
    transaction id ``None`` or ids (``engine.checks.check_id``), the amount ``None`` or a
    positive int of minor units (``InvalidAmount``). For what a caller feeds the engine
    (``Engine.handle_callback``); a typed error otherwise."""
    reply = check_instance(reply, ChannelReply, what)
    check_optional_id(reply.return_code, f"{what} return_code")
    check_optional_id(reply.result_code, f"{what} result_code")
    check_optional_id(reply.channel_txn_id, f"{what} channel_txn_id")
    if reply.amount_minor is not None:
        check_amount(reply.amount_minor, f"{what} amount_minor")
    return reply


class Channel(Protocol):
    """One cash channel. Every method may block; every one must be idempotent by its ids."""

    name: str
    pay_codes: CodeTable
    refund_codes: CodeTable

    def pay(self, payment_serial: str, amount_minor: int, currency: str, title: str
            ) -> ChannelReply:
        """Start (or, for a serial seen before, look up) the payment."""
        ...

    def query(self, payment_serial: str) -> ChannelReply:
        """The payment's current state."""
        ...

    def close(self, payment_serial: str) -> ChannelReply:
        """Close an unpaid payment so it can no longer succeed; reply with its final state."""
        ...

    def refund(self, payment_serial: str, refund_id: str, amount_minor: int, currency: str
               ) -> ChannelReply:
        """Refund by the original route; idempotent by ``refund_id``."""
        ...

    def query_refund(self, payment_serial: str, refund_id: str) -> ChannelReply:
        """The refund's current state."""
        ...


def cash_result(channel: Channel, reply: ChannelReply | BaseException,
                source: ResultSource) -> CashResult:
    """Classify a payment reply, or the exception a call raised, into a ``CashResult``."""
    if isinstance(reply, BaseException):
        return CashResult(ResultKind.PROCESSING, source, f"ERROR:{type(reply).__name__}")
    kind = channel.pay_codes.classify(reply.return_code, reply.result_code)
    code = reply.result_code or reply.return_code or "NONE"
    return CashResult(kind, source, code, reply.channel_txn_id, reply.amount_minor)


def refund_result(channel: Channel, refund_id: str, reply: ChannelReply | BaseException,
                  source: ResultSource) -> RefundResult:
    """Classify a refund reply, or the exception a call raised, into a ``RefundResult``."""
    if isinstance(reply, BaseException):
        return RefundResult(refund_id, ResultKind.PROCESSING, source,
                            f"ERROR:{type(reply).__name__}")
    kind = channel.refund_codes.classify(reply.return_code, reply.result_code)
    return RefundResult(refund_id, kind, source, reply.result_code or reply.return_code or "NONE")
