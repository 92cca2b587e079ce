"""The cash channel interface (WeChat Pay, Alipay, a card acquirer) and its adapter.

A ``Channel`` is the integrator's code that talks to one payment channel. Its calls block
(network I/O), so the engine runs them on that channel's own I/O lane, never on an actor
thread. It answers with a ``ChannelReply`` holding the channel's raw codes; the engine, not
the channel, decides what they mean, by the channel's ``CodeTable``. An exception from a
call (timeout, connection reset) means "unknown": the order keeps querying.

Asynchronous results (the wallet's notifications) come in through
``Engine.handle_notification`` as the raw bytes the wallet sent: the adapter's
``verify_notification`` checks the signature over those exact bytes and parses them, and
only then does the engine cross-check and act on them. ``Engine.handle_callback`` takes a
notification already parsed, whose origin the engine cannot check: it only makes the order
ask the channel (a query), and the channel's answer counts. Either may be called from
whatever thread the integrator's HTTP server uses.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import inspect
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from payengine.engine.channel_data import PayDetails, Prepay, check_prepay
from payengine.engine.checks import check_id, check_instance, check_optional_id, shown
from payengine.engine.codes import CodeTable, ResultKind
from payengine.engine.errors import NotificationRejected, PaymentError
from payengine.engine.money import check_amount
from payengine.engine.order import (
    AuthorisationOp,
    AuthorisationResult,
    AuthorisationStatus,
    CashResult,
    RefundResult,
    ResultSource,
)


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
    currency: str | None = None
    """The currency the channel reports the amount in, if it does (checked when given)."""
    prepay: Prepay | None = None
    """A pay reply's (or a query's, while the payer has not paid) data for the payer: QR
    code, prepay id, deeplink, "enter password". Kept with the order; shown by
    ``OrderView.prepay``."""


class NotificationKind(enum.StrEnum):
    PAYMENT = "payment"
    REFUND = "refund"


@dataclass(frozen=True, slots=True)
class ChannelNotification:
    """What a wallet's notification says, once its adapter verified the signature."""

    kind: NotificationKind
    payment_serial: str
    reply: ChannelReply
    refund_id: str | None = None
    """For a refund notification: the engine's refund id (out_refund_no)."""


def check_reply(reply: object, what: str = "reply") -> ChannelReply:
    """Return ``reply`` if it is a ``ChannelReply`` of well-typed fields: the codes and the
    transaction id ``None`` or ids (``engine.checks.check_id``), the amount ``None`` or a
    positive int of minor units (``InvalidAmount``). For what a caller feeds the engine
    (``Engine.handle_callback``); a typed error otherwise."""
    reply = check_instance(reply, ChannelReply, what)
    check_optional_id(reply.return_code, f"{what} return_code")
    check_optional_id(reply.result_code, f"{what} result_code")
    check_optional_id(reply.channel_txn_id, f"{what} channel_txn_id")
    check_optional_id(reply.currency, f"{what} currency")
    if reply.amount_minor is not None:
        check_amount(reply.amount_minor, f"{what} amount_minor")
    if reply.prepay is not None:
        check_prepay(reply.prepay, f"{what} prepay")
    return reply


class Channel(Protocol):
    """One cash channel. Every method may block; every one must be idempotent by its ids."""

    name: str
    pay_codes: CodeTable
    refund_codes: CodeTable

    def pay(self, payment_serial: str, amount_minor: int, currency: str, title: str,
            details: PayDetails | None = None) -> ChannelReply:
        """Start (or, for a serial seen before, look up) the payment.

        ``details``: the cash part's ``PayDetails`` (scenario, payer id, barcode...), or
        ``None`` when the request gave none. A channel whose ``pay`` takes only the first four
        arguments still works: the engine then refuses requests with details for it.
        The engine never closes, nor pays again, a serial whose ``pay`` has not returned."""
        ...

    def query(self, payment_serial: str) -> ChannelReply:
        """The payment's current state."""
        ...

    def query_charge(self, payment_serial: str, channel_txn_id: str) -> ChannelReply:
        """One transaction of the payment, by the channel's transaction id.

        Asked when a second charge is reported: answer a success code, with that
        ``channel_txn_id`` and its amount, only if the channel really charged it for this
        serial; anything else (not found, another serial) leaves the money where it is."""
        ...

    def close(self, payment_serial: str) -> ChannelReply:
        """Close an unpaid payment so it can no longer succeed; reply with its final state.

        Also for a serial the wallet has not seen (the pay request never reached it): record
        it as closed, so a pay that arrives later is refused, and answer closed."""
        ...

    def refund(self, payment_serial: str, refund_id: str, amount_minor: int, currency: str
               ) -> ChannelReply:
        """Refund by the original route; idempotent by ``refund_id``."""
        ...

    def query_refund(self, payment_serial: str, refund_id: str) -> ChannelReply:
        """The refund's current state."""
        ...

    def verify_notification(self, body: bytes, headers: Mapping[str, str]
                            ) -> ChannelNotification:
        """Check the notification's signature over the exact ``body`` bytes and parse it.

        Raise ``NotificationRejected`` (reason ``bad_signature`` or ``malformed``), or any
        exception, for a notification that does not verify: nothing is then believed."""
        ...


class AgreementStatus(enum.StrEnum):
    """A wallet's answer to ``AgreementChannel.sign`` or ``unsign``, and what its agreement
    callback reports (``Engine.handle_agreement_callback``)."""

    SIGNED = "signed"
    """The user confirmed the agreement: it is active."""
    PENDING = "pending"
    """Not decided yet (the user has to confirm in the wallet app): a callback will say."""
    FAILED = "failed"
    """The wallet refused to sign it (or the user declined)."""
    TERMINATED = "terminated"
    """It ended: unsigned as asked, or (unasked, in a callback) revoked by the user."""


class AgreementChannel(Protocol):
    """The optional part of a channel that signs payment agreements (签约) for withholding.

    A channel without ``sign`` and ``unsign`` refuses agreements (``AgreementsUnsupported``).
    Both may block; both must be idempotent by ``agreement_id`` (the engine's id, which the
    wallet keeps as the merchant's contract number). A withholding pays through the
    channel's ``pay`` with ``PayDetails(scenario=WITHHOLD, agreement_id=...)``: the wallet
    answers a balance too low with a failure code its ``pay_codes`` lists as retryable."""

    def sign(self, agreement_id: str, user_id: str) -> AgreementStatus:
        """Ask the wallet to sign an agreement for ``user_id``."""
        ...

    def unsign(self, agreement_id: str) -> AgreementStatus:
        """Ask the wallet to end the agreement; ``TERMINATED`` once it did."""
        ...


def signs_agreements(channel: object) -> bool:
    """Whether ``channel`` implements ``AgreementChannel``."""
    return callable(getattr(channel, "sign", None)) and callable(
        getattr(channel, "unsign", None))


@dataclass(frozen=True, slots=True)
class AuthorisationReply:
    """An ``AuthorisationChannel``'s answer: where the authorisation of a serial stands.

    ``amount_minor``: what it authorised (to ``authorise``) or captured (to ``capture``),
    if the channel says; checked against what the engine asked. ``reason``: the channel's
    code or text, for the journal."""

    status: AuthorisationStatus
    amount_minor: int | None = None
    channel_txn_id: str | None = None
    reason: str = ""


class AuthorisationChannel(Protocol):
    """The optional part of a channel that pre-authorises (a pump's authorisation hold).

    A channel without it refuses ``PaymentRequest.authorise`` at submit
    (``AuthorisationUnsupported``). Every method may block and must be idempotent by its
    ids; an exception means "no answer" (the engine asks again on its query schedule)."""

    def authorise(self, payment_serial: str, amount_minor: int, currency: str, title: str,
                  details: PayDetails | None = None) -> AuthorisationReply:
        """Hold ``amount_minor`` for the payer (or, for a serial seen before, say where it
        stands). A serial voided before (``void`` came first) stays voided."""
        ...

    def capture(self, payment_serial: str, capture_id: str, amount_minor: int
                ) -> AuthorisationReply:
        """Charge ``amount_minor`` (at most what was authorised) and release the rest;
        idempotent by ``capture_id``: the same capture again answers ``CAPTURED``."""
        ...

    def void(self, payment_serial: str) -> AuthorisationReply:
        """Release the authorisation; for a serial never seen, record it voided so a late
        ``authorise`` is refused, and answer ``VOIDED``."""
        ...

    def query_authorisation(self, payment_serial: str) -> AuthorisationReply:
        """Where the authorisation stands (``NOT_FOUND`` for a serial never seen)."""
        ...


def authorises(channel: object) -> bool:
    """Whether ``channel`` implements ``AuthorisationChannel``."""
    return all(callable(getattr(channel, name, None))
               for name in ("authorise", "capture", "void", "query_authorisation"))


def authorisation_result(op: AuthorisationOp, reply: object, payment_serial: str
                         ) -> AuthorisationResult:
    """An ``AuthorisationChannel`` reply (or the exception its call raised) as the order's
    event; anything malformed counts as no answer (status ``None``): never believed."""
    if isinstance(reply, AuthorisationReply) and isinstance(reply.status, AuthorisationStatus):
        amount = reply.amount_minor
        txn = reply.channel_txn_id
        well_formed = (amount is None or (isinstance(amount, int) and not isinstance(amount, bool)
                                          and amount > 0)) and (
            txn is None or (isinstance(txn, str) and 0 < len(txn) <= 128))
        if well_formed:
            return AuthorisationResult(op, reply.status, amount, payment_serial, txn,
                                       str(reply.reason)[:200])
    return AuthorisationResult(op, None, payment_serial=payment_serial,
                               reason=f"no answer: {shown(reply)}"[:200])


def takes_details(channel: Channel) -> bool:
    """Whether ``channel.pay`` accepts ``details`` (older adapters take four arguments)."""
    try:
        parameters = inspect.signature(channel.pay).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "details" or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
               for p in parameters)


def call_pay(channel: Channel, payment_serial: str, amount_minor: int, currency: str,
             title: str, details: PayDetails | None) -> ChannelReply:
    """``channel.pay``, with ``details`` only when there are any (``takes_details``)."""
    if details is None:
        return channel.pay(payment_serial, amount_minor, currency, title)
    return channel.pay(payment_serial, amount_minor, currency, title, details=details)


def communicated(reply: object, codes: CodeTable) -> bool:
    """Whether a call got a well-formed answer (its communication code is OK), whatever the
    answer said: what a channel's circuit breaker counts (``engine.health``). Never raises:
    it runs in the call's callback, before the reply is handed to the order (a malformed
    reply, e.g. an unhashable code from an adapter, is a failure, not a lost answer)."""
    try:
        return isinstance(reply, ChannelReply) and reply.return_code in codes.communication_ok
    except Exception:
        return False


def cash_result(channel: Channel, reply: ChannelReply | BaseException,
                source: ResultSource, *, reported_by: str | None = None,
                payment_serial: str | None = None) -> CashResult:
    """Classify a payment reply, or the exception a call raised, into a ``CashResult``.

    ``reported_by``: the channel a notification came through, for the order to check;
    ``payment_serial``: the serial the call or report was about. Whether a failure code is
    ``retryable`` and a code ``not_found`` comes from the channel's own code table."""
    if isinstance(reply, BaseException) or not isinstance(reply, ChannelReply):
        # an exception (timeout), or an adapter bug: never guess a result from it
        return CashResult(ResultKind.PROCESSING, source, f"ERROR:{type(reply).__name__}",
                          payment_serial=payment_serial)
    try:
        codes = channel.pay_codes
        comm, business = reply.return_code, reply.result_code
        kind = codes.classify(comm, business)
        code = str(business or comm or "NONE")
        prepay = None if reply.prepay is None else check_prepay(reply.prepay)
        return CashResult(kind, source, code, reply.channel_txn_id, reply.amount_minor,
                          reported_by, reply.currency, prepay, payment_serial,
                          retryable=codes.is_retryable(comm, business),
                          not_found=codes.is_not_found(comm, business))
    except Exception as error:  # an adapter's malformed reply: never guess a result from it
        return CashResult(ResultKind.PROCESSING, source, f"ERROR:{type(error).__name__}",
                          payment_serial=payment_serial)


def refund_result(channel: Channel, refund_id: str, reply: ChannelReply | BaseException,
                  source: ResultSource, *, reported_by: str | None = None) -> RefundResult:
    """Classify a refund reply, or the exception a call raised, into a ``RefundResult``."""
    if isinstance(reply, BaseException) or not isinstance(reply, ChannelReply):
        return RefundResult(refund_id, ResultKind.PROCESSING, source,
                            f"ERROR:{type(reply).__name__}")
    try:
        kind = channel.refund_codes.classify(reply.return_code, reply.result_code)
        return RefundResult(refund_id, kind, source,
                            str(reply.result_code or reply.return_code or "NONE"),
                            reply.amount_minor, reported_by, reply.currency)
    except Exception as error:  # an adapter's malformed reply: never guess a result from it
        return RefundResult(refund_id, ResultKind.PROCESSING, source,
                            f"ERROR:{type(error).__name__}")


def query_charge_result(channel: Channel, channel_txn_id: str,
                        reply: ChannelReply | BaseException,
                        payment_serial: str | None = None) -> CashResult:
    """Classify the answer to ``query_charge``: a success only for that very transaction."""
    result = cash_result(channel, reply, ResultSource.QUERY, payment_serial=payment_serial)
    if result.kind is ResultKind.SUCCESS and result.channel_txn_id != channel_txn_id:
        return CashResult(ResultKind.PROCESSING, ResultSource.QUERY,
                          f"NOT_THAT_CHARGE:{result.code}", payment_serial=payment_serial)
    return result


SIGNATURE_HEADER = "X-Signature"


class SignedJsonNotifications:
    """A notification format for simulated and test channels, and a model for adapters.

    The body is compact JSON (``kind, payment_serial, refund_id, return_code, result_code,
    channel_txn_id, amount_minor, currency``); the header ``X-Signature`` is the hex
    HMAC-SHA256 of the exact body bytes under the channel's key. Anything that does not
    verify or parse strictly (a float amount, a missing serial) is ``NotificationRejected``.
    """

    def __init__(self, key: bytes) -> None:
        assert len(key) >= 16, "a signing key of at least 16 bytes"
        self._key = key

    def sign(self, notification: ChannelNotification) -> tuple[bytes, dict[str, str]]:
        reply = notification.reply
        body = json.dumps({
            "kind": notification.kind.value, "payment_serial": notification.payment_serial,
            "refund_id": notification.refund_id, "return_code": reply.return_code,
            "result_code": reply.result_code, "channel_txn_id": reply.channel_txn_id,
            "amount_minor": reply.amount_minor, "currency": reply.currency,
        }, separators=(",", ":"), sort_keys=True).encode()
        return body, {SIGNATURE_HEADER: self.signature(body)}

    def signature(self, body: bytes) -> str:
        return hmac.new(self._key, body, hashlib.sha256).hexdigest()

    def verify(self, body: bytes, headers: Mapping[str, str]) -> ChannelNotification:
        if not isinstance(body, bytes):
            raise NotificationRejected("a notification body is the raw bytes received",
                                       "malformed")
        given = _header(headers, SIGNATURE_HEADER)
        if not isinstance(given, str) or not hmac.compare_digest(
            given.encode("ascii", "replace"), self.signature(body).encode()
        ):
            raise NotificationRejected("the notification's signature does not verify",
                                       "bad_signature")
        return _parse_notification(body)


def _header(headers: Mapping[str, str], name: str) -> object:
    if not isinstance(headers, Mapping):
        return None
    wanted = name.lower()
    return next((v for k, v in headers.items() if isinstance(k, str) and k.lower() == wanted),
                None)


def _parse_notification(body: bytes) -> ChannelNotification:
    try:
        data = json.loads(body)
    except ValueError:
        raise NotificationRejected("the notification is not JSON", "malformed") from None
    if not isinstance(data, dict):
        raise NotificationRejected("the notification is not a JSON object", "malformed")

    def optional(name: str) -> Any:
        value = data.get(name)
        return None if value == "" else value  # wallets send empty optional fields

    try:
        kind = NotificationKind(str(data.get("kind")))
    except ValueError:
        raise NotificationRejected(f"notification kind: {shown(data.get('kind'))}",
                                   "malformed") from None
    reply = ChannelReply(optional("return_code"), optional("result_code"),
                         optional("channel_txn_id"), data.get("amount_minor"),
                         optional("currency"))
    serial: Any = data.get("payment_serial")  # checked below, with every other field
    return check_notification(ChannelNotification(kind, serial, reply,
                                                  optional("refund_id")))


def check_notification(notification: object) -> ChannelNotification:
    """Return what an adapter verified if every field is well formed (ids, codes, a positive
    int amount, a refund id for a refund), else ``NotificationRejected`` (``malformed``):
    a signature says who sent it, not that its content is sane."""
    try:
        note = check_instance(notification, ChannelNotification, "notification")
        check_instance(note.kind, NotificationKind, "notification kind")
        check_id(note.payment_serial, "notification payment_serial")
        if note.kind is NotificationKind.REFUND:
            check_id(note.refund_id, "notification refund_id")
        else:
            check_optional_id(note.refund_id, "notification refund_id")
        check_reply(note.reply, "notification")
    except PaymentError as error:
        raise NotificationRejected(error.message, "malformed") from None
    return note
