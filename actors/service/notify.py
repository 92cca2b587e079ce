"""How the service answers a wallet's notification: in the wallet's own format.

A wallet retries a notification until it is acknowledged, and each wallet spells the
acknowledgement its own way. The service acknowledges only after
``Engine.handle_notification`` returned (the result is committed); a refused notification
is answered with a failure in the same format and a non-2xx status, so the wallet sends it
again. Pure: builds bytes, any thread.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from payengine.actors.service.errors import headers_of, status_of
from payengine.engine.errors import ConfigError, PaymentError

ACK_REFUSALS_BUG = "notify-acks-refusals"
"""The planted bug of this module (``PLANTABLE_BUGS``): every notification acknowledged,
refused or not ("so the wallet stops sending it"): a refused one is then never sent again."""


@dataclass(frozen=True)
class AckFormat:
    """One wallet's acknowledgement: ``ok`` on success, ``fail`` (with the reason) else."""

    name: str
    media_type: str

    def ok(self) -> bytes:
        if self.name == "wechat":
            return _json({"return_code": "SUCCESS", "return_msg": "OK"})
        if self.name == "alipay":
            return b"success"
        return _json({"code": "SUCCESS", "message": "OK"})

    def fail(self, reason: str) -> bytes:
        if self.name == "wechat":
            return _json({"return_code": "FAIL", "return_msg": reason})
        if self.name == "alipay":
            return b"fail"
        return _json({"code": "FAIL", "message": reason})


ACK_FORMATS = {
    "wechat": AckFormat("wechat", "application/json"),
    "alipay": AckFormat("alipay", "text/plain"),
    "json": AckFormat("json", "application/json"),
}
"""``wechat``: WeChat Pay v2's fields as JSON (``return_code`` ``SUCCESS``/``FAIL``);
``alipay``: the text ``success``/``fail``; ``json`` (any other wallet, and the default):
``{"code": "SUCCESS"}`` / ``{"code": "FAIL", "message": ...}`` as WeChat Pay v3 has it."""


def ack_format(name: str) -> AckFormat:
    """The format called ``name``; ``ConfigError`` for one this service does not speak."""
    if name not in ACK_FORMATS:
        raise ConfigError("notify_formats", f"unknown acknowledgement format {name!r} "
                                            f"(known: {', '.join(ACK_FORMATS)})")
    return ACK_FORMATS[name]


def format_for_wallet(wallet: str) -> AckFormat:
    """The acknowledgement a wallet of that name expects (``json`` if none is known)."""
    return ACK_FORMATS.get(wallet, ACK_FORMATS["json"])


NOTIFY_PREFIX = "/v1/notify/"
"""The wallets' notification routes: ``POST /v1/notify/{channel}``."""


def notify_channel(path: str) -> str | None:
    """The channel of a notification route's path (``/v1/notify/wechat-1`` -> ``wechat-1``),
    ``None`` for any other path (one segment only, as the route matches)."""
    if not path.startswith(NOTIFY_PREFIX):
        return None
    channel = path[len(NOTIFY_PREFIX):]
    return channel if channel and "/" not in channel else None


def refusal(fmt: AckFormat, status: int, code: str,
            headers: Mapping[str, str] | None = None) -> NotifyAnswer:
    """A refusal made before the engine saw the notification (rate bound, body size, the
    service closing, no such route...), in the wallet's format with its non-2xx status
    kept, so the wallet understands it and sends the notification again."""
    assert not 200 <= status < 300, "a refusal is never an acknowledgement"
    return NotifyAnswer(status, fmt.fail(code), fmt.media_type, code, dict(headers or {}))


def _json(value: dict[str, str]) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


class NotificationSink(Protocol):
    """Where a notification goes: an ``Engine`` (``handle_notification``)."""

    def handle_notification(self, channel: str, body: bytes,
                            headers: Mapping[str, str] | None = None, *,
                            wait: bool = True) -> str: ...


@dataclass(frozen=True)
class NotifyAnswer:
    """What the wallet is answered: status, body in its format, and the typed error's code
    (``""`` when acknowledged)."""

    status: int
    body: bytes
    media_type: str
    code: str = ""
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def acknowledged(self) -> bool:
        return 200 <= self.status < 300


def answer_notification(sink: NotificationSink, channel: str, body: bytes,
                        headers: Mapping[str, str], fmt: AckFormat, *, wait: bool = True,
                        planted_bugs: frozenset[str] = frozenset()) -> NotifyAnswer:
    """Feed the notification to the engine and build the wallet's answer: acknowledged
    only once the engine returned (with ``wait``, once the result is committed), a
    failure in the wallet's format with the typed error's status otherwise. Blocks on the
    engine: call it on a worker thread (the app) or the simulator's I/O lane."""
    try:
        state = sink.handle_notification(channel, body, headers, wait=wait)
    except PaymentError as error:
        if ACK_REFUSALS_BUG in planted_bugs:
            return NotifyAnswer(200, fmt.ok(), fmt.media_type, error.code)
        reason = getattr(error, "reason", "")
        return NotifyAnswer(status_of(error), fmt.fail(f"{error.code}: {reason}" if reason
                                                       else error.code),
                            fmt.media_type, error.code, headers_of(error))
    return NotifyAnswer(200, fmt.ok(), fmt.media_type, "",
                        {"X-Payengine-Order-State": state})
