"""Signed merchant requests: the wire format, and every check that needs no I/O.

A request that reaches the engine from outside the process (the HTTP service of a later
issue, a merchant's server, a cashier page's backend) is believed only as far as it can be
checked. Each one is a JSON body and five headers (names in any case):

==========================  ===========================================================
``X-Payengine-Merchant-Id``  the merchant, whose registered key verifies the signature
``X-Payengine-Timestamp``    when it was signed: epoch milliseconds, decimal digits only
``X-Payengine-Nonce``        16..64 characters of ``A-Z a-z 0-9 _ -``, never used twice
``X-Payengine-Sign-Type``    ``HMAC-SHA256`` (a shared secret) or ``RSA-SHA256`` (the
                             merchant's RSA key pair, PKCS#1 v1.5 over SHA-256)
``X-Payengine-Signature``    HMAC: 64 lower-case hex digits; RSA: standard base64 (with
                             padding, canonical)
==========================  ===========================================================

What is signed is ``string_to_sign``: five lines (``\\n``, UTF-8) and then the exact body
bytes, as received, never re-encoded::

    payengine-request-v1
    {sign type}
    {merchant id}
    {timestamp}
    {nonce}
    {body}

The body is one JSON object whose ``op`` says what it asks: ``pay`` (the ``PaymentRequest``
fields but ``merchant_id``, which is the header's: a merchant only ever acts for itself),
``close``, ``refund`` or ``query`` (of the merchant's own order, by ``merchant_order_no``).
Parsing is strict: an unknown or repeated field, a float (``1.0`` is not an amount), a
value of the wrong JSON type, a body that is not UTF-8 JSON is ``malformed``.

Everything here is pure: the clock (``now_ms``) and the keys are arguments; RSA, which needs
the ``cryptography`` package, is verified in the shell (``actors.merchant_auth``).
"""

from __future__ import annotations

import enum
import hmac
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from payengine.engine.channel_data import PayDetails, PayScenario
from payengine.engine.checks import (
    TIME_MS_MAX,
    check_id,
    check_text,
    shown,
)
from payengine.engine.currency import ISO_4217
from payengine.engine.errors import PaymentError, RequestRejected
from payengine.engine.money import check_amount
from payengine.engine.order import (
    REASON_MAX,
    CashPart,
    LegMode,
    OrderPolicy,
    OrderState,
    PaymentOrder,
    PaymentRequest,
    VoucherPart,
    check_request,
)

MERCHANT_HEADER = "X-Payengine-Merchant-Id"
TIMESTAMP_HEADER = "X-Payengine-Timestamp"
NONCE_HEADER = "X-Payengine-Nonce"
SIGN_TYPE_HEADER = "X-Payengine-Sign-Type"
SIGNATURE_HEADER = "X-Payengine-Signature"
HEADERS = (MERCHANT_HEADER, TIMESTAMP_HEADER, NONCE_HEADER, SIGN_TYPE_HEADER, SIGNATURE_HEADER)

SIGNING_VERSION = "payengine-request-v1"
"""The first line of every string to sign: a later format gets another, never this one."""

BODY_BYTES_MAX = 64 * 1024
"""The largest request body accepted (a pay with 15 voucher parts is about 2 KiB)."""

SECRET_MIN = 32
"""Fewest characters in an HMAC secret: 32 random characters are about 190 bits."""
SECRET_MAX = 256

NONCE_RE = re.compile(r"[A-Za-z0-9_-]{16,64}")
"""A nonce: 16 to 64 URL-safe characters (``secrets.token_hex(16)`` gives 32)."""
_TIMESTAMP_RE = re.compile(r"[0-9]{1,16}")
_HEX_SIGNATURE_RE = re.compile(r"[0-9a-f]{64}")
_BASE64_RE = re.compile(r"[A-Za-z0-9+/]{16,2048}={0,2}")


class SignType(enum.StrEnum):
    """How a merchant signs: with the secret it shares with the engine, or its RSA key."""

    HMAC_SHA256 = "HMAC-SHA256"
    RSA_SHA256 = "RSA-SHA256"


class AccountStatus(enum.StrEnum):
    """A merchant's or a user's standing. ``closed`` is final."""

    ACTIVE = "active"
    FROZEN = "frozen"
    """Temporarily refused (a risk review, a dispute): the setter makes it active again."""
    CLOSED = "closed"
    """Gone for good: never active again (a new account is a new id)."""


# --------------------------------------------------------------------------- the envelope


@dataclass(frozen=True, slots=True)
class Envelope:
    """The headers of a request, checked for form (not yet for truth)."""

    merchant_id: str
    timestamp_ms: int
    nonce: str
    sign_type: SignType
    signature: str
    """As sent: 64 lower-case hex digits (HMAC) or base64 (RSA)."""


def _malformed(message: str) -> RequestRejected:
    return RequestRejected(message, "malformed")


def header(headers: Mapping[str, str], name: str) -> str | None:
    """The value of ``name`` (any case) in ``headers``; ``None`` if absent. The same name
    twice (in two cases) is ``malformed``: which one was signed would be a guess."""
    wanted = name.lower()
    found = [value for key, value in headers.items()
             if isinstance(key, str) and key.lower() == wanted]
    if len(found) > 1:
        raise _malformed(f"header {name} is given {len(found)} times")
    if not found:
        return None
    value = found[0]
    if not isinstance(value, str):
        raise _malformed(f"header {name} must be a str, got {shown(value)}")
    return value


def parse_envelope(headers: object) -> Envelope:
    """The five headers of a request, each in its form; ``RequestRejected`` (``malformed``)
    naming the first that is missing or wrong. Other headers are ignored."""
    if not isinstance(headers, Mapping):
        raise _malformed(f"headers are a mapping of str to str, not {shown(headers)}")
    if len(headers) > 256:
        raise _malformed("more than 256 headers")
    values: dict[str, str] = {}
    for name in HEADERS:
        value = header(headers, name)
        if value is None:
            raise _malformed(f"header {name} is missing")
        values[name] = value
    try:
        merchant_id = check_id(values[MERCHANT_HEADER], MERCHANT_HEADER)
    except PaymentError as error:
        raise _malformed(error.message) from None
    stamp = values[TIMESTAMP_HEADER]
    if not _TIMESTAMP_RE.fullmatch(stamp) or int(stamp) > TIME_MS_MAX:
        raise _malformed(f"{TIMESTAMP_HEADER} must be epoch milliseconds in decimal digits, "
                         f"got {shown(stamp)}")
    nonce = values[NONCE_HEADER]
    if not NONCE_RE.fullmatch(nonce):
        raise _malformed(f"{NONCE_HEADER} must be 16..64 characters of A-Z a-z 0-9 _ -, got "
                         f"{shown(nonce)}")
    try:
        sign_type = SignType(values[SIGN_TYPE_HEADER])
    except ValueError:
        raise _malformed(f"{SIGN_TYPE_HEADER} must be one of {[t.value for t in SignType]}, "
                         f"got {shown(values[SIGN_TYPE_HEADER])}") from None
    signature = values[SIGNATURE_HEADER]
    pattern = _HEX_SIGNATURE_RE if sign_type is SignType.HMAC_SHA256 else _BASE64_RE
    if not pattern.fullmatch(signature):
        what = "64 lower-case hex digits" if sign_type is SignType.HMAC_SHA256 else "standard base64"
        raise _malformed(f"{SIGNATURE_HEADER} of a {sign_type.value} request must be {what}")
    return Envelope(merchant_id, int(stamp), nonce, sign_type, signature)


def string_to_sign(sign_type: SignType | str, merchant_id: str, timestamp_ms: int, nonce: str,
                   body: bytes) -> bytes:
    """What the signature covers: the version line, the envelope fields, then the exact body
    bytes. Every field is on its own line and none may hold a line break (ids, digits and
    the nonce cannot), so two different requests never share a string to sign."""
    head = f"{SIGNING_VERSION}\n{SignType(sign_type).value}\n{merchant_id}\n{timestamp_ms}\n{nonce}\n"
    return head.encode("utf-8") + body


def hmac_signature(secret: str, message: bytes) -> str:
    """Hex HMAC-SHA256 of ``message`` keyed with the UTF-8 bytes of ``secret``."""
    return hmac.digest(secret.encode("utf-8"), message, "sha256").hex()


def hmac_matches(secret: str, message: bytes, signature: str) -> bool:
    """Whether ``signature`` (lower-case hex) is ``message``'s HMAC under ``secret``;
    compared in constant time. One spelling only: no byte of a signed request can change
    and leave it valid."""
    return hmac.compare_digest(hmac_signature(secret, message).encode("ascii"),
                               signature.encode("ascii", "replace"))


def check_timestamp(timestamp_ms: int, now_ms: int, window_ms: int, floor_ms: int = 0) -> None:
    """Refuse (``stale_timestamp``) a request signed more than ``window_ms`` before or after
    ``now_ms``: the edges themselves are inside. ``floor_ms``: nothing signed before it is
    taken either (set when the window was widened at a restart, so that a request whose
    nonce was forgotten under the narrower window cannot come back)."""
    low = max(now_ms - window_ms, floor_ms)
    if not low <= timestamp_ms <= now_ms + window_ms:
        raise RequestRejected(
            f"the request was signed at {timestamp_ms}, {now_ms - timestamp_ms} ms from the "
            f"engine's clock ({now_ms}); accepted: within {window_ms} ms either way"
            + (f", not before {floor_ms}" if floor_ms > now_ms - window_ms else ""),
            "stale_timestamp")


def check_status(kind: str, ident: str, status: AccountStatus | None) -> None:
    """Refuse a party that is not active: reason ``merchant_frozen``, ``user_closed``...
    (``None``: never given a status, so active)."""
    if status is not None and status is not AccountStatus.ACTIVE:
        raise RequestRejected(f"{kind} {ident} is {status.value}", f"{kind}_{status.value}")


def pay_window_over(order: PaymentOrder, now_ms: int) -> bool:
    """Whether a pay request for this existing order comes too late: the order closed or
    failed, or its pay window ended (a cashier URL cached and opened again)."""
    return order.state in (OrderState.CLOSED, OrderState.FAILED) or now_ms >= order.close_at_ms


# --------------------------------------------------------------------------- operations


@dataclass(frozen=True, slots=True)
class PayOp:
    """``op: pay``: start (or, for the same order again, look up) a payment."""

    request: PaymentRequest


@dataclass(frozen=True, slots=True)
class CloseOp:
    """``op: close``: close the merchant's unpaid order."""

    merchant_order_no: str


@dataclass(frozen=True, slots=True)
class RefundOp:
    """``op: refund``: give back part or all of the merchant's paid order."""

    merchant_order_no: str
    refund_no: str
    amount_minor: int
    reason: str = ""


@dataclass(frozen=True, slots=True)
class QueryOp:
    """``op: query``: the merchant's order as the engine knows it."""

    merchant_order_no: str


MerchantOp = PayOp | CloseOp | RefundOp | QueryOp

OPS: dict[str, type[PayOp | CloseOp | RefundOp | QueryOp]] = {
    "pay": PayOp, "close": CloseOp, "refund": RefundOp, "query": QueryOp}


def _compact(data: Mapping[str, Any]) -> bytes:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _without_none(data: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in data.items() if value is not None}


def encode_pay(request: PaymentRequest) -> bytes:
    """The body of ``op: pay`` for ``request`` (its ``merchant_id`` goes in the header).
    Absent optional fields are left out; compact UTF-8 JSON."""
    body: dict[str, Any] = {
        "op": "pay", "merchant_order_no": request.merchant_order_no,
        "user_id": request.user_id, "currency": request.currency,
        "total_minor": request.total_minor, "title": request.title,
    }
    if request.cash is not None:
        cash: dict[str, Any] = {"amount_minor": request.cash.amount_minor,
                                "channel": request.cash.channel}
        details = request.cash.details
        if details is not None:
            cash["details"] = _without_none({
                "scenario": details.scenario.value, "payer_id": details.payer_id,
                "auth_code": details.auth_code, "client_ip": details.client_ip,
                "notify_url": details.notify_url, "device_id": details.device_id})
        body["cash"] = cash
    if request.vouchers:
        body["vouchers"] = [_without_none({"account_id": v.account_id, "amount": v.amount,
                                           "mode": v.mode.value, "hold_id": v.hold_id})
                            for v in request.vouchers]
    if request.pay_window_ms is not None:
        body["pay_window_ms"] = request.pay_window_ms
    if request.confirm_duplicate:
        body["confirm_duplicate"] = True
    if request.attempt != 1:
        body["attempt"] = request.attempt
    return _compact(body)


def encode_close(merchant_order_no: str) -> bytes:
    return _compact({"op": "close", "merchant_order_no": merchant_order_no})


def encode_refund(merchant_order_no: str, refund_no: str, amount_minor: int,
                  reason: str = "") -> bytes:
    body: dict[str, Any] = {"op": "refund", "merchant_order_no": merchant_order_no,
                            "refund_no": refund_no, "amount_minor": amount_minor}
    if reason:
        body["reason"] = reason
    return _compact(body)


def encode_query(merchant_order_no: str) -> bytes:
    return _compact({"op": "query", "merchant_order_no": merchant_order_no})


class _NotJson(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for key, value in pairs:
        if key in data:
            raise _NotJson(f"field {key!r} is given twice")
        data[key] = value
    return data


def _no_float(text: str) -> Any:
    raise _NotJson(f"{text} is not an integer: amounts are integer minor units")


def _no_constant(text: str) -> Any:
    raise _NotJson(f"{text} is not JSON")


def _load(body: object) -> dict[str, Any]:
    if not isinstance(body, bytes) or not 0 < len(body) <= BODY_BYTES_MAX:
        raise _malformed(f"a request body is the raw bytes received, 1..{BODY_BYTES_MAX} of "
                         f"them, not {shown(body)}")
    try:
        data = json.loads(body.decode("utf-8"), object_pairs_hook=_no_duplicates,
                          parse_float=_no_float, parse_constant=_no_constant)
    except _NotJson as error:
        raise _malformed(f"the body: {error}") from None
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _malformed("the body is not UTF-8 JSON") from None
    if not isinstance(data, dict):
        raise _malformed("the body is not a JSON object")
    return data


_ABSENT: Any = object()


class _Fields:
    """Typed reads of one JSON object's fields; every field must be read (``done``)."""

    def __init__(self, data: object, what: str) -> None:
        if not isinstance(data, dict):
            raise _malformed(f"{what} must be a JSON object, not {shown(data)}")
        self.data: dict[str, Any] = data
        self.what = what
        self.read: set[str] = set()

    def get(self, name: str, kind: type | tuple[type, ...], *, default: Any = _ABSENT) -> Any:
        self.read.add(name)
        value = self.data.get(name, _ABSENT)
        if value is _ABSENT or (value is None and default is not _ABSENT):
            if default is _ABSENT:
                raise _malformed(f"{self.what}: field {name!r} is missing")
            return default
        # bool is an int in Python, never in this format: true is not 1
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            raise _malformed(f"{self.what}: field {name!r} must not be true or false")
        if not isinstance(value, kind):
            names = "/".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise _malformed(f"{self.what}: field {name!r} must be a JSON "
                             f"{_JSON_NAMES.get(names, names)}, got {shown(value)}")
        return value

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.read)
        if unknown:
            raise _malformed(f"{self.what}: unknown field {unknown[0]!r}")


_JSON_NAMES = {"str": "string", "int": "integer", "bool": "true or false", "list": "array",
               "dict": "object"}


def _enum(fields: _Fields, name: str, enum_type: type[enum.StrEnum], default: Any) -> Any:
    value = fields.get(name, str, default=None)
    if value is None:
        return default
    try:
        return enum_type(value)
    except ValueError:
        raise _malformed(f"{fields.what}: {name} must be one of "
                         f"{[m.value for m in enum_type]}, got {shown(value)}") from None


def _pay(data: _Fields, merchant_id: str) -> PaymentRequest:
    cash = None
    cash_data = data.get("cash", dict, default=None)
    if cash_data is not None:
        fields = _Fields(cash_data, "cash")
        amount = fields.get("amount_minor", int)
        channel = fields.get("channel", str)
        details = None
        details_data = fields.get("details", dict, default=None)
        if details_data is not None:
            d = _Fields(details_data, "cash details")
            details = PayDetails(
                _enum(d, "scenario", PayScenario, PayScenario.NATIVE),
                **{name: d.get(name, str, default=None) for name in (
                    "payer_id", "auth_code", "client_ip", "notify_url", "device_id")})
            d.done()
        fields.done()
        cash = CashPart(amount, channel, details)
    vouchers = []
    for index, item in enumerate(data.get("vouchers", list, default=[])):
        v = _Fields(item, f"vouchers[{index}]")
        vouchers.append(VoucherPart(v.get("account_id", str), v.get("amount", int),
                                    _enum(v, "mode", LegMode, LegMode.PRE_DEDUCT),
                                    v.get("hold_id", str, default=None)))
        v.done()
    return PaymentRequest(
        merchant_id=merchant_id, merchant_order_no=data.get("merchant_order_no", str),
        user_id=data.get("user_id", str), currency=data.get("currency", str),
        total_minor=data.get("total_minor", int), title=data.get("title", str), cash=cash,
        vouchers=tuple(vouchers), pay_window_ms=data.get("pay_window_ms", int, default=None),
        confirm_duplicate=data.get("confirm_duplicate", bool, default=False),
        attempt=data.get("attempt", int, default=1))


def parse_body(body: object, merchant_id: str, *, policy: OrderPolicy,
               currencies: Mapping[str, int] = ISO_4217) -> MerchantOp:
    """The operation a verified body asks for, every field checked (a pay as ``submit``
    checks its request: ``check_request``); ``RequestRejected`` (``malformed``) naming the
    first thing wrong."""
    data = _Fields(_load(body), "the body")
    op_name = data.get("op", str)
    if op_name not in OPS:
        raise _malformed(f"op must be one of {sorted(OPS)}, got {shown(op_name)}")
    try:
        op: MerchantOp
        if op_name == "pay":
            op = PayOp(_pay(data, merchant_id))
            data.done()
            check_request(op.request, policy=policy, currencies=currencies)
            return op
        no = check_id(data.get("merchant_order_no", str), "merchant_order_no")
        if op_name == "refund":
            op = RefundOp(no, check_id(data.get("refund_no", str), "refund_no"),
                          check_amount(data.get("amount_minor", int), "amount_minor"),
                          check_text(data.get("reason", str, default=""), "reason", REASON_MAX))
        else:
            op = (CloseOp if op_name == "close" else QueryOp)(no)
        data.done()
        return op
    except RequestRejected:
        raise
    except PaymentError as error:  # InvalidRequest, InvalidAmount: a value out of its bounds
        raise _malformed(error.message) from None


def op_name(op: MerchantOp) -> str:
    """``pay``, ``close``, ``refund`` or ``query``."""
    return next(name for name, cls in OPS.items() if isinstance(op, cls))
