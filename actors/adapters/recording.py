"""Every message exchanged with a channel, kept (bounded, secrets redacted) and replayable.

A ``Recorder`` keeps the newest exchanges of one channel in memory (``recording.keep``) and
appends every one to a JSON-lines file if ``recording.file`` is set (rotated to ``.1`` past
``recording.file_bytes_max``). One exchange is one JSON object::

    {"v": 1, "at_ms": ..., "channel": "wechat-1", "operation": "pay", "serial": "P1",
     "refund_id": null, "channel_txn_id": null, "method": "POST", "path": "/pay",
     "request": {"headers": {...}, "body": {...}}, "status": 200,
     "reply": {"body": {...}}, "error": null, "duration_ms": 12, "result": {...}}

``reply.body`` is the wallet's reply as parsed JSON (or its text when it is not JSON);
``result`` is the ``ChannelReply`` it mapped to; ``error`` is the exception a call ended in
(``"TimeoutError: ..."``). Notifications are kept too, as ``operation: "notification"``.

Redacted before anything is kept: every credential (wherever its text appears), the
signature (field and header), ``Authorization`` headers, the payer's ``auth_code``
(masked: first and last two digits) and the fields named in ``recording.redact``.

``RecordedChannel`` is a ``Channel`` that answers from a recording, for regression tests
against recorded messages: by (operation, serial) in the order they were recorded, the last
answer repeated once they are used up. With the channel's ``ChannelConfig`` it maps each
recorded reply body again through the configuration (so a changed mapping or code table is
tested against real messages, and ``replay_mismatches`` lists where it now reads them
otherwise); without one it answers the recorded result.
"""

from __future__ import annotations

import collections
import json
import os
import threading
from collections.abc import Iterable, Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any

from payengine.actors.adapters.config import ChannelConfig, Recording
from payengine.actors.adapters.mapping import (
    ReplyError,
    codes_of,
    map_reply,
    read_notification,
    reply_from_json,
    reply_json,
)
from payengine.actors.channel import ChannelNotification, ChannelReply
from payengine.engine.channel_data import PayDetails
from payengine.engine.codes import WECHAT_LIKE_PAY_CODES, WECHAT_LIKE_REFUND_CODES, CodeTable
from payengine.engine.errors import ConfigError, NotificationRejected

REDACTED = "***"
RECORD_VERSION = 1
TEXT_KEPT_MAX = 64 * 1024
"""Most characters of a non-JSON body kept in a record."""
ALWAYS_REDACTED_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})


def mask_auth_code(value: object) -> object:
    """``134567890123456789`` -> ``13**************89``: enough to find it, not to pay."""
    if not isinstance(value, str) or len(value) < 6:
        return REDACTED
    return value[:2] + "*" * (len(value) - 4) + value[-2:]


class Redactor:
    """Removes one channel's secrets from what is recorded."""

    def __init__(self, secrets: Iterable[str], fields: Iterable[str],
                 headers: Iterable[str], masked: Iterable[str] = ()) -> None:
        self.secrets = tuple(sorted({s for s in secrets if s}, key=len, reverse=True))
        self.fields = frozenset(fields)
        self.masked = frozenset(masked)
        """Fields masked like ``auth_code`` (those a template sends it in)."""
        self.call_masked: tuple[str, ...] = ()
        """Values of one call masked wherever they appear (``masking``)."""
        self.headers = frozenset(h.lower() for h in headers) | ALWAYS_REDACTED_HEADERS

    @classmethod
    def for_config(cls, config: ChannelConfig) -> Redactor:
        signing = config.signing
        fields = set(config.recording.redact)
        masked: set[str] = set()
        for operation in config.operations.values():  # wherever {auth_code} is sent
            masked |= _fields_sending(operation.fields, "{auth_code}")
        if signing.method != "none" and signing.field and not signing.in_header:
            fields.add(signing.field)
        headers = {signing.header} if signing.header else set()
        return cls(config.credentials.secrets(), fields, headers, masked)

    def value(self, data: Any) -> Any:
        """``data`` (parsed JSON, text) with secrets redacted."""
        if isinstance(data, Mapping):
            out: dict[Any, Any] = {}
            for key, inner in data.items():
                if key == "auth_code" or key in self.masked:
                    known = isinstance(inner, str) and any(v in inner for v in self.call_masked)
                    out[key] = (self.text(inner, self.call_masked) if known
                                else mask_auth_code(inner))
                elif key in self.fields:
                    out[key] = REDACTED
                else:
                    out[key] = self.value(inner)
            return out
        if isinstance(data, list | tuple):
            return [self.value(inner) for inner in data]
        if isinstance(data, str):
            return self.text(data, self.call_masked)
        return data

    def text(self, text: str, masked: Iterable[str] = ()) -> str:
        for secret in self.secrets:
            text = text.replace(secret, REDACTED)
        for value in masked:
            text = text.replace(value, str(mask_auth_code(value)))
        return text

    def masking(self, values: Iterable[str]) -> Redactor:
        """This redactor, also masking ``values`` (a call's auth code) wherever they are."""
        values = tuple(v for v in values if v)
        if not values:
            return self
        redactor = Redactor(self.secrets, self.fields, self.headers, self.masked)
        redactor.call_masked = values
        return redactor

    def header_values(self, headers: Mapping[str, str]) -> dict[str, str]:
        return {k: REDACTED if k.lower() in self.headers else self.text(v)
                for k, v in headers.items()}


def _fields_sending(template: Any, placeholder: str) -> set[str]:
    """The names of a request template's fields whose value holds ``placeholder``."""
    found: set[str] = set()
    if isinstance(template, Mapping):
        for name, value in template.items():
            if isinstance(value, str) and placeholder in value:
                found.add(name)
            found |= _fields_sending(value, placeholder)
    return found


def body_for_record(body: bytes | None, parsed: Any = None) -> Any:
    """A body as kept: its JSON if it is JSON, else its text (cut short)."""
    if parsed is not None:
        return parsed
    if not body:
        return None
    try:
        value: Any = json.loads(body, parse_float=Decimal)
        return value
    except (ValueError, RecursionError):
        return body[:TEXT_KEPT_MAX].decode("utf-8", "replace")


class Recorder:
    """One channel's recording: a bounded ring in memory, and an optional JSON-lines file."""

    def __init__(self, channel: str, recording: Recording, redactor: Redactor,
                 base_dir: str | Path | None = None) -> None:
        self.channel = channel
        self.redactor = redactor
        self._ring: collections.deque[dict[str, Any]] = collections.deque(
            maxlen=recording.keep)
        self._keep = recording.keep
        self._file = None if recording.file is None else Path(base_dir or ".") / recording.file
        self._file_bytes_max = recording.file_bytes_max
        self._lock = threading.Lock()
        self.recorded = 0
        self.file_errors = 0

    @classmethod
    def for_config(cls, config: ChannelConfig, base_dir: str | Path | None = None
                   ) -> Recorder:
        return cls(config.name, config.recording, Redactor.for_config(config), base_dir)

    @property
    def file(self) -> Path | None:
        return self._file

    def record(self, entry: Mapping[str, Any], *, masked: Iterable[str | None] = ()
               ) -> dict[str, Any]:
        """Keep one exchange (redacted here); returns what was kept. ``masked``: values of
        this call masked wherever they appear (the payer's auth code)."""
        r = self.redactor.masking(v for v in masked if v)
        kept = dict(entry)
        kept["v"] = RECORD_VERSION
        kept["channel"] = self.channel
        for part in ("request", "reply"):
            message = dict(kept.get(part) or {})
            if "headers" in message:
                message["headers"] = r.header_values(message["headers"])
            kept[part] = message
        kept = dict(r.value(kept))  # fields by name, and secrets in every text (errors too)
        with self._lock:
            self.recorded += 1
            if self._keep:
                self._ring.append(kept)
            if self._file is not None:
                self._append(kept)
        return kept

    def _append(self, kept: Mapping[str, Any]) -> None:
        assert self._file is not None
        line = json.dumps(kept, ensure_ascii=False, separators=(",", ":"), default=str) + "\n"
        try:
            try:
                if self._file.stat().st_size + len(line) > self._file_bytes_max:
                    os.replace(self._file, self._file.with_name(self._file.name + ".1"))
            except FileNotFoundError:
                pass
            with self._file.open("a", encoding="utf-8") as f:
                f.write(line)
        except OSError:
            self.file_errors += 1  # a full disk must not fail a payment: the ring still has it

    def records(self) -> list[dict[str, Any]]:
        """The exchanges in memory, oldest first."""
        with self._lock:
            return list(self._ring)


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The exchanges of a recording file (its rotated ``.1`` first, if there is one)."""
    path = Path(path)
    records: list[dict[str, Any]] = []
    for part in (path.with_name(path.name + ".1"), path):
        if not part.exists():
            continue
        with part.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line, parse_float=Decimal)
                except ValueError:
                    raise ConfigError(f"{part}:{number}", "not a JSON record") from None
                if not isinstance(record, dict) or record.get("v") != RECORD_VERSION:
                    raise ConfigError(f"{part}:{number}", "not a recording of version "
                                                          f"{RECORD_VERSION}")
                records.append(dict(record))
    return records


class NotRecorded(LookupError):
    """The recording has no answer for this call (the engine takes it as "processing")."""


class ReplayedError(OSError):
    """The error a recorded call ended in, raised again."""


def _key(operation: str, serial: object, extra: object = None) -> tuple[str, str, str]:
    return (operation, str(serial), "" if extra is None else str(extra))


def _record_key(record: Mapping[str, Any]) -> tuple[str, str, str]:
    extra = record.get("refund_id") or record.get("channel_txn_id")
    return _key(str(record.get("operation")), record.get("serial"), extra)


class RecordedChannel:
    """A ``Channel`` answering from a recording (see the module's docstring)."""

    def __init__(self, records: Iterable[Mapping[str, Any]], *,
                 config: ChannelConfig | None = None, name: str | None = None,
                 remap: bool = True) -> None:
        self._answers: dict[tuple[str, str, str], list[Mapping[str, Any]]] = {}
        self._served: collections.Counter[tuple[str, str, str]] = collections.Counter()
        self._lock = threading.Lock()
        self.config = config
        self.remap = remap and config is not None
        channels = set()
        for record in records:
            if record.get("operation") == "notification":
                continue
            channels.add(record.get("channel"))
            self._answers.setdefault(_record_key(record), []).append(record)
        self.name = name or (config.name if config is not None else None) or (
            next(iter(channels)) if len(channels) == 1 else "recorded")
        self.pay_codes: CodeTable
        self.refund_codes: CodeTable
        if config is not None:
            self.pay_codes, self.refund_codes = config.codes
        else:
            self.pay_codes, self.refund_codes = WECHAT_LIKE_PAY_CODES, WECHAT_LIKE_REFUND_CODES
        self.calls: list[tuple[str, str, str]] = []
        """Every call made, as its key: what a test can compare with what was recorded."""

    @property
    def query_schedule_ms(self) -> tuple[int, ...] | None:
        return None if self.config is None else self.config.query_schedule_ms

    @property
    def refund_query_schedule_ms(self) -> tuple[int, ...] | None:
        return None if self.config is None else self.config.refund_query_schedule_ms

    @classmethod
    def from_file(cls, path: str | Path, **kwargs: Any) -> RecordedChannel:
        return cls(read_records(path), **kwargs)

    @classmethod
    def from_recorder(cls, recorder: Recorder, **kwargs: Any) -> RecordedChannel:
        return cls(recorder.records(), **kwargs)

    def _answer(self, key: tuple[str, str, str]) -> ChannelReply:
        with self._lock:
            self.calls.append(key)
            answers = self._answers.get(key)
            if not answers:
                raise NotRecorded(f"{self.name}: no recorded {key[0]} for {key[1]}")
            record = answers[min(self._served[key], len(answers) - 1)]
            self._served[key] += 1
        return self.replay(record)

    def replay(self, record: Mapping[str, Any]) -> ChannelReply:
        """The answer ``record`` gives: its error raised again, its reply mapped again (with a
        config), or its recorded result."""
        error = record.get("error")
        if error is not None:
            if str(error).startswith("TimeoutError"):
                raise TimeoutError(error)
            raise ReplayedError(error)
        status = record.get("status")
        body = (record.get("reply") or {}).get("body")
        if self.remap and self.config is not None and isinstance(status, int):
            if not 200 <= status < 300 or not isinstance(body, dict):
                raise ReplyError(f"recorded reply: status {status}")
            operation = str(record.get("operation"))
            return map_reply(self.config.operation_reply(operation), status, body,
                             self.config.currency, codes_of(self.config, operation))
        result = record.get("result")
        if not isinstance(result, Mapping):
            raise NotRecorded(f"{self.name}: the record has no result")
        return reply_from_json(result)

    def pay(self, payment_serial: str, amount_minor: int, currency: str, title: str,
            details: PayDetails | None = None) -> ChannelReply:
        return self._answer(_key("pay", payment_serial))

    def query(self, payment_serial: str) -> ChannelReply:
        return self._answer(_key("query", payment_serial))

    def query_charge(self, payment_serial: str, channel_txn_id: str) -> ChannelReply:
        key = _key("query_charge", payment_serial, channel_txn_id)
        with self._lock:
            recorded = key in self._answers
        return self._answer(key if recorded else _key("query", payment_serial))

    def close(self, payment_serial: str) -> ChannelReply:
        return self._answer(_key("close", payment_serial))

    def refund(self, payment_serial: str, refund_id: str, amount_minor: int, currency: str
               ) -> ChannelReply:
        return self._answer(_key("refund", payment_serial, refund_id))

    def query_refund(self, payment_serial: str, refund_id: str) -> ChannelReply:
        return self._answer(_key("query_refund", payment_serial, refund_id))

    def verify_notification(self, body: bytes, headers: Mapping[str, str]
                            ) -> ChannelNotification:
        """With the channel's config, verified as the live channel would; without, refused:
        a recording holds no keys."""
        if self.config is None:
            raise NotificationRejected("a recorded channel without its configuration cannot "
                                       "verify notifications", "bad_signature")
        return read_notification(self.config, body, headers)


def replay_mismatches(records: Iterable[Mapping[str, Any]], config: ChannelConfig
                      ) -> list[str]:
    """Where the configuration now reads recorded replies otherwise than it did: one line
    per record whose reply maps to another result (or no longer maps). Empty: the
    regression passes."""
    channel = RecordedChannel((), config=config)
    problems = []
    for number, record in enumerate(records, 1):
        if record.get("operation") == "notification" or record.get("error") is not None:
            continue
        if not isinstance(record.get("status"), int) or record.get("result") is None:
            continue
        try:
            now = reply_json(channel.replay(record))
        except (ReplyError, ValueError) as error:
            now = {"error": str(error)}
        if now != record.get("result"):
            problems.append(f"record {number} ({record.get('operation')} "
                            f"{record.get('serial')}): recorded {record.get('result')}, "
                            f"now {now}")
    return problems
