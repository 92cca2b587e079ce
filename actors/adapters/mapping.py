"""A configured channel's messages: requests assembled from templates, replies and
notifications mapped to ``ChannelReply`` and ``ChannelNotification``. No I/O here.

A reply maps only if it is what the configuration says a reply is: a 2xx status, a JSON
object, a signature that verifies (when ``signing.verify_replies``), values of the right
kinds. Anything else raises ``ReplyError``: the engine reads an exception as "processing:
query it", never as a result.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import quote, urlencode

from payengine.actors.adapters import signing as sig
from payengine.actors.adapters.config import STATUS_PATH, ChannelConfig, ReplyMapping
from payengine.actors.channel import (
    ChannelNotification,
    ChannelReply,
    NotificationKind,
    check_notification,
    check_reply,
)
from payengine.engine.channel_data import PayDetails, Prepay
from payengine.engine.codes import CodeTable, ResultKind
from payengine.engine.currency import ISO_4217, format_minor
from payengine.engine.errors import NotificationRejected, PaymentError


class ReplyError(Exception):
    """A wallet's reply that is not a result: a non-2xx status, not a JSON object, a bad
    signature, a value of the wrong kind. The engine takes it as "processing"."""


class ChannelHttpError(ReplyError):
    """The wallet answered with a status other than 2xx."""

    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP status {status}")
        self.status = status


class OperationNotConfigured(ReplyError):
    """The configuration has no such operation for this channel (e.g. ``close``)."""


# ---------------------------------------------------------------------------- requests


def request_values(config: ChannelConfig, operation: str, *, serial: str, now_ms: int,
                   nonce: str, amount_minor: int | None = None, currency: str | None = None,
                   title: str | None = None, details: PayDetails | None = None,
                   refund_id: str | None = None, channel_txn_id: str | None = None
                   ) -> dict[str, Any]:
    """What the placeholders of ``operation``'s template stand for in this call."""
    values: dict[str, Any] = {
        "serial": serial, "merchant_no": config.merchant_no, "wallet": config.wallet,
        "channel": config.name, "nonce": nonce, "timestamp": str(now_ms // 1000),
        "timestamp_ms": str(now_ms), "app_id": config.credentials.app_id,
        "amount": amount_minor, "currency": currency, "title": title,
        "refund_id": refund_id, "channel_txn_id": channel_txn_id,
        "amount_decimal": None,
    }
    digits = None if currency is None else ISO_4217.get(currency)
    if amount_minor is not None and digits is not None:
        values["amount_decimal"] = format_minor(amount_minor, digits)
    if operation == "pay":
        scenario = "native" if details is None else details.scenario.value
        values.update(
            scenario=scenario, trade_type=config.scenarios.get(scenario),
            notify_url=(details.notify_url if details and details.notify_url
                        else config.notify_url),
            payer_id=details and details.payer_id, auth_code=details and details.auth_code,
            client_ip=details and details.client_ip, device_id=details and details.device_id)
    if operation == "refund":
        values["refund_notify_url"] = config.refund_notify_url or config.notify_url
    return values


_SUBSTITUTION = re.compile(r"\{\{|\}\}|\{([^{}]*)\}")
_LONE = re.compile(r"\{([^{}]*)\}")


class _Missing(Exception):
    pass


def render(template: Any, values: Mapping[str, Any]) -> Any:
    """A request template with its placeholders filled; ``None`` for a field left out
    (one of its placeholders has no value)."""
    if isinstance(template, Mapping):
        out = {}
        for name, inner in template.items():
            value = render(inner, values)
            if value is not None:
                out[name] = value
        return out
    if not isinstance(template, str):
        return template
    lone = _LONE.fullmatch(template)
    if lone is not None:
        return values.get(lone.group(1))

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "{{":
            return "{"
        if match.group(0) == "}}":
            return "}"
        value = values.get(match.group(1))
        if value is None:
            raise _Missing
        return sig.scalar_text(value)

    try:
        return _SUBSTITUTION.sub(substitute, template)
    except _Missing:
        return None


def _render_path(path: str, values: Mapping[str, Any], channel: str, operation: str) -> str:
    def substitute(match: re.Match[str]) -> str:
        if match.group(0) in ("{{", "}}"):
            return match.group(0)[0]
        value = values.get(match.group(1))
        if value is None:
            raise OperationNotConfigured(f"{channel}: operations.{operation}.path needs "
                                         f"{{{match.group(1)}}}, which has no value")
        return quote(sig.scalar_text(value), safe="")

    return _SUBSTITUTION.sub(substitute, path)


def assemble(config: ChannelConfig, operation: str, values: Mapping[str, Any]
             ) -> tuple[str, str, bytes, dict[str, str], dict[str, Any]]:
    """The request: ``(method, path and query, body, headers, fields sent)``, signed."""
    op = config.operations.get(operation)
    if op is None:
        raise OperationNotConfigured(f"{config.name}: no operations.{operation} configured")
    fields: dict[str, Any] = render(op.fields, values)
    signing, credentials = config.signing, config.credentials
    headers = dict(config.headers)
    signature: str | None = None
    if signing.method != "none" and signing.form == "sorted-pairs":
        signature = sig.sign(signing, credentials,
                             sig.message_of_pairs(signing, credentials, fields))
        if not signing.in_header:
            assert signing.field is not None
            fields[signing.field] = signature
    path = _render_path(op.path, values, config.name, operation)
    body = b""
    if op.method == "GET":
        query = urlencode({k: sig.scalar_text(v) for k, v in fields.items()})
        if query:
            path = f"{path}{'&' if '?' in path else '?'}{query}"
        signed = query.encode()
    else:
        if config.body == "json":
            body = json.dumps(fields, ensure_ascii=False, separators=(",", ":")).encode()
            headers.setdefault("Content-Type", "application/json; charset=utf-8")
        else:
            body = urlencode({k: sig.scalar_text(v) for k, v in fields.items()}).encode()
            headers.setdefault("Content-Type", "application/x-www-form-urlencoded")
        signed = body
    if signing.method != "none" and signing.form == "body":
        signature = sig.sign(signing, credentials,
                             sig.message_of_body(signing, credentials, signed))
    if signature is not None and signing.in_header:
        assert signing.header is not None
        headers[signing.header] = signature
    headers.setdefault("Accept", "application/json")
    return op.method, path, body, headers, fields


# ---------------------------------------------------------------------------- replies


def parse_body(body: bytes) -> Any:
    """A reply's JSON (decimals kept exact), or ``ReplyError``."""
    try:
        return json.loads(body, parse_float=Decimal)
    except (ValueError, RecursionError):
        raise ReplyError("the reply is not JSON") from None


def read_reply(config: ChannelConfig, operation: str, status: int, body: bytes,
               headers: Mapping[str, str], *, currency: str | None = None,
               verify: bool = True) -> ChannelReply:
    """Map a wallet's HTTP reply; ``ReplyError`` if it is not a well-formed one."""
    if not 200 <= status < 300:
        raise ChannelHttpError(status)
    data = parse_body(body)
    if not isinstance(data, dict):
        raise ReplyError("the reply is not a JSON object")
    if verify and config.signing.verify_replies and not signature_ok(config, body, data,
                                                                     headers):
        raise ReplyError("the reply's signature does not verify")
    return map_reply(config.operation_reply(operation), status, data,
                     currency or config.currency, codes_of(config, operation))


def codes_of(config: ChannelConfig, operation: str) -> CodeTable:
    """The code table an operation's replies are read with (a refund's or a payment's)."""
    pay_codes, refund_codes = config.codes
    return refund_codes if operation in ("refund", "query_refund") else pay_codes


def signature_ok(config: ChannelConfig, body: bytes, data: Any,
                 headers: Mapping[str, str]) -> bool:
    """Whether a reply's or notification's signature verifies, in the channel's form."""
    signing, credentials = config.signing, config.credentials
    if signing.method == "none":
        return False
    if signing.form == "body":
        assert signing.header is not None
        return sig.verify(signing, credentials, sig.message_of_body(signing, credentials, body),
                          header(headers, signing.header))
    if not isinstance(data, dict):
        return False
    given = (header(headers, signing.header) if signing.in_header and signing.header
             else data.get(signing.field or ""))
    return sig.verify(signing, credentials, sig.message_of_pairs(signing, credentials, data),
                      given)


def header(headers: Mapping[str, str], name: str) -> str | None:
    wanted = name.lower()
    if not isinstance(headers, Mapping):
        return None
    for key, value in headers.items():
        if isinstance(key, str) and key.lower() == wanted and isinstance(value, str):
            return value
    return None


def lookup(data: Any, path: str | None, status: int | None) -> Any:
    if path is None:
        return None
    if path == STATUS_PATH:
        return None if status is None else f"HTTP_{status}"
    if path.startswith("="):
        return path[1:]
    for part in path.split("."):
        if not isinstance(data, dict):
            return None
        data = data.get(part)
    return data


def _text(value: Any, what: str) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | Decimal):
        raise ReplyError(f"{what} is not a text: {type(value).__name__}")
    return str(value)


_PLAIN_DECIMAL = re.compile(r"[0-9]{1,18}(\.[0-9]{1,6})?")
"""A decimal amount as wallets write it: ASCII digits, at most one point."""


def _amount(value: Any, mapping: ReplyMapping, currency: str | None) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ReplyError("amount is a bool")
    if mapping.amount_format == "minor":
        if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 16:
            value = int(value)
        if not isinstance(value, int):
            raise ReplyError(f"amount is not an integer of minor units: {value!r:.40}")
        return value
    if currency not in ISO_4217:
        raise ReplyError("a decimal amount needs a currency (in the reply, or the channel's"
                         " currency)")
    assert currency is not None
    try:
        if not isinstance(value, str | int | Decimal) or not _PLAIN_DECIMAL.fullmatch(
            str(value)
        ):  # "88.88" only: no exponent, sign, spaces or non-ASCII digits are guessed at
            raise InvalidOperation
        minor = Decimal(value).scaleb(ISO_4217[currency])
        if not minor.is_finite() or minor != minor.to_integral_value():
            raise InvalidOperation
    except InvalidOperation:
        raise ReplyError(f"amount is not a decimal of {currency}: {value!r:.40}") from None
    return int(minor)


def map_reply(mapping: ReplyMapping, status: int | None, data: Any,
              currency: str | None, codes: CodeTable | None = None) -> ChannelReply:
    """A reply (or notification) object as a ``ChannelReply``, checked.

    A reported amount of 0 is read as none reported (a wallet may send 0 with a trade not
    paid yet), except in a reply ``codes`` reads as a success: a success of nothing cannot
    be checked against the order (the engine checks only a reported amount), so it is a
    ``ReplyError``, never a payment in full."""
    def get(name: str) -> Any:
        return lookup(data, mapping.path(name), status)

    reply_currency = _text(get("currency"), "currency")
    result = _text(get("result_code"), "result_code")
    if result is not None:
        result = mapping.rename_result.get(result, result)
    prepay_values = [_text(get(name), name)
                     for name in ("prepay_id", "code_url", "deeplink", "user_action")]
    return_code = _text(get("return_code"), "return_code")
    amount = _amount(get("amount"), mapping, reply_currency or currency)
    if amount == 0 and codes is not None and (
        codes.classify(return_code, result) is ResultKind.SUCCESS
    ):
        raise ReplyError(f"the reply says {result or return_code} for an amount 0")
    reply = ChannelReply(
        return_code=return_code,
        result_code=result,
        channel_txn_id=_text(get("channel_txn_id"), "channel_txn_id"),
        amount_minor=amount or None,
        currency=reply_currency,
        prepay=Prepay(*prepay_values) if any(v is not None for v in prepay_values) else None)
    try:
        return check_reply(reply)
    except PaymentError as error:
        raise ReplyError(error.message) from None


def reply_json(reply: ChannelReply | None) -> dict[str, Any] | None:
    """A ``ChannelReply`` as a JSON object (for recordings)."""
    if reply is None:
        return None
    prepay = reply.prepay
    return {"return_code": reply.return_code, "result_code": reply.result_code,
            "channel_txn_id": reply.channel_txn_id, "amount_minor": reply.amount_minor,
            "currency": reply.currency,
            "prepay": None if prepay is None else {
                "prepay_id": prepay.prepay_id, "code_url": prepay.code_url,
                "deeplink": prepay.deeplink, "user_action": prepay.user_action}}


def reply_from_json(data: Mapping[str, Any]) -> ChannelReply:
    prepay = data.get("prepay")
    return check_reply(ChannelReply(
        data.get("return_code"), data.get("result_code"), data.get("channel_txn_id"),
        data.get("amount_minor"), data.get("currency"),
        None if prepay is None else Prepay(**prepay)))


# ---------------------------------------------------------------------------- notifications


def read_notification(config: ChannelConfig, body: bytes, headers: Mapping[str, str]
                      ) -> ChannelNotification:
    """Verify a notification's signature over the exact ``body`` bytes, then map it.

    ``NotificationRejected``: ``bad_signature`` if it does not verify (or the channel signs
    nothing, so nothing it receives can be believed), ``malformed`` if it cannot be read."""
    if not isinstance(body, bytes):
        raise NotificationRejected("a notification body is the raw bytes received",
                                   "malformed")
    if config.signing.method == "none":
        raise NotificationRejected(f"{config.name} signs nothing: its notifications cannot be"
                                   " verified", "bad_signature")
    try:
        data = parse_body(body)
    except ReplyError:
        data = None
    if config.signing.form == "sorted-pairs" and not isinstance(data, dict):
        raise NotificationRejected("the notification is not a JSON object", "malformed")
    if not signature_ok(config, body, data, headers):
        raise NotificationRejected("the notification's signature does not verify",
                                   "bad_signature")
    if not isinstance(data, dict):
        raise NotificationRejected("the notification is not a JSON object", "malformed")
    spec = config.notifications
    try:
        serial = _text(lookup(data, spec.serial, None), "serial")
        refund_id = _text(lookup(data, spec.refund_id, None), "refund_id")
        mapping = (spec.refund_reply if refund_id is not None and spec.refund_reply
                   else spec.reply) or config.reply
        reply = map_reply(mapping, None, data, config.currency,
                          codes_of(config, "refund" if refund_id is not None else "pay"))
    except ReplyError as error:
        raise NotificationRejected(str(error), "malformed") from None
    kind = NotificationKind.PAYMENT if refund_id is None else NotificationKind.REFUND
    return check_notification(ChannelNotification(kind, serial, reply,  # type: ignore[arg-type]
                                                   refund_id))
