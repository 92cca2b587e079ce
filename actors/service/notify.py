"""How the service answers a wallet's notification: in the wallet's own format.

A wallet retries a notification until it is acknowledged, and each wallet spells the
acknowledgement its own way. The service acknowledges only after
``Engine.handle_notification`` returned (the result is committed); a refused notification
is answered with a failure in the same format and a non-2xx status, so the wallet sends it
again. Pure: builds bytes, any thread.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from payengine.engine.errors import ConfigError


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


def _json(value: dict[str, str]) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()
