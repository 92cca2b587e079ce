"""The generic HTTP channel: a wallet spoken to as its ``ChannelConfig`` says.

Each call assembles the request from the operation's template, signs it, sends it with the
standard library's ``http.client`` (one connection per call: a wallet call is rare next to
its own latency, and no pool can leak a half-read connection into the next payment) and maps
the reply. The whole call (connecting, sending, every read of the reply) has one deadline,
``timeout_ms``: a wallet that hangs, or trickles its reply a byte at a time, ends in
``TimeoutError`` and frees the I/O worker, so one slow merchant number cannot hold its lane,
and never holds another's (each channel has a lane of its own). Every exception means
"unknown" to the engine, which queries later: nothing here ever guesses a result.

Every exchange is recorded (``actors.adapters.recording``), secrets redacted.
"""

from __future__ import annotations

import http.client
import io
import secrets
import socket
import ssl
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from payengine.actors.adapters.config import ChannelConfig, Fee, Limits
from payengine.actors.adapters.mapping import (
    ReplyError,
    assemble,
    read_notification,
    read_reply,
    reply_json,
    request_values,
)
from payengine.actors.adapters.recording import Recorder, body_for_record
from payengine.actors.channel import ChannelNotification, ChannelReply
from payengine.engine.channel_data import PayDetails
from payengine.engine.codes import CodeTable, ResultKind
from payengine.engine.errors import NotificationRejected


class ReplyTooLarge(ReplyError):
    """The reply is longer than ``reply_bytes_max``."""


class _DeadlineIO(io.RawIOBase):
    """A socket's reading side where every read waits at most until the call's deadline."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock = sock
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the channel's reply took longer than its timeout")
        self._sock.settimeout(left)
        return self._sock.recv_into(buffer)


class _DeadlineSocket:
    """What ``http.client`` needs of a socket, with one deadline for the whole call."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock = sock
        self._deadline = deadline

    def _left(self) -> float:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the channel call took longer than its timeout")
        return left

    def sendall(self, data: bytes) -> None:
        self._sock.settimeout(self._left())
        self._sock.sendall(data)

    def makefile(self, mode: str, *args: Any, **kwargs: Any) -> io.BufferedReader:
        assert "r" in mode
        return io.BufferedReader(_DeadlineIO(self._sock, self._deadline))

    def close(self) -> None:
        """Nothing: ``http.client`` closes the connection while the reply is still being
        read from it (a real socket counts its open files; this one would lose the reply).
        ``http_call`` closes the socket itself once the exchange is over."""

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def _connection(url: str, deadline: float
                ) -> tuple[http.client.HTTPConnection, socket.socket]:
    parts = urlsplit(url)
    timeout = max(deadline - time.monotonic(), 0.001)
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(parts.hostname or "", parts.port, timeout=timeout,
                                           context=ssl.create_default_context())
    else:
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout)
    conn.connect()
    raw = conn.sock
    assert raw is not None
    conn.sock = _DeadlineSocket(raw, deadline)
    return conn, raw


def http_call(url: str, method: str, body: bytes, headers: Mapping[str, str],
              timeout_s: float, bytes_max: int) -> tuple[int, dict[str, str], bytes]:
    """One HTTP exchange within ``timeout_s`` in all: ``(status, headers, body)``.

    ``TimeoutError`` past the deadline, ``ReplyTooLarge`` past ``bytes_max``, ``OSError``
    or ``http.client.HTTPException`` for a broken connection."""
    deadline = time.monotonic() + timeout_s
    try:
        conn, raw = _connection(url, deadline)
    except TimeoutError:
        raise
    except OSError as error:
        if isinstance(error, socket.timeout | TimeoutError):
            raise TimeoutError(f"connecting to {urlsplit(url).netloc} timed out") from None
        raise
    try:
        parts = urlsplit(url)
        target = parts.path or "/"
        if parts.query:
            target = f"{target}?{parts.query}"
        conn.request(method, target, body=body if method != "GET" else None,
                     headers=dict(headers))
        response = conn.getresponse()
        data = response.read(bytes_max + 1)
        if len(data) > bytes_max:
            raise ReplyTooLarge(f"the reply is longer than {bytes_max} bytes")
        return response.status, dict(response.getheaders()), data
    except TimeoutError as error:
        raise TimeoutError(f"the channel call timed out: {error}") from None
    finally:
        conn.close()
        raw.close()


Transport = Callable[[str, str, bytes, Mapping[str, str], float, int],
                     tuple[int, dict[str, str], bytes]]


class HttpChannel:
    """A ``Channel`` speaking HTTP to a wallet as its ``ChannelConfig`` says. Thread-safe."""

    def __init__(self, config: ChannelConfig, *, recorder: Recorder | None = None,
                 transport: Transport | None = None,
                 clock_ms: Callable[[], int] | None = None,
                 nonce: Callable[[], str] | None = None,
                 base_dir: str | Path | None = None) -> None:
        assert config.kind == "http", config.kind
        self.config = config
        self.name = config.name
        self.pay_codes: CodeTable
        self.refund_codes: CodeTable
        self.pay_codes, self.refund_codes = config.codes
        self.recorder = recorder or Recorder.for_config(config, base_dir)
        self._transport = transport or http_call
        self._clock_ms = clock_ms or (lambda: time.time_ns() // 1_000_000)
        self._nonce = nonce or (lambda: secrets.token_hex(16))

    def __repr__(self) -> str:
        return f"HttpChannel({self.name!r}, {self.config.base_url!r})"

    # ---------------------------------------------------------------- for the routing

    @property
    def enabled(self) -> bool:
        return self.config.enabled

    @property
    def fee(self) -> Fee:
        return self.config.fee

    @property
    def limits(self) -> Limits:
        return self.config.limits

    @property
    def query_schedule_ms(self) -> tuple[int, ...] | None:
        """This channel's own query schedule (``Engine.open`` puts it in the policy)."""
        return self.config.query_schedule_ms

    @property
    def refund_query_schedule_ms(self) -> tuple[int, ...] | None:
        return self.config.refund_query_schedule_ms

    # ---------------------------------------------------------------- the Channel API

    def pay(self, payment_serial: str, amount_minor: int, currency: str, title: str,
            details: PayDetails | None = None) -> ChannelReply:
        return self._call("pay", payment_serial, currency, amount_minor=amount_minor,
                          currency=currency, title=title, details=details)

    def query(self, payment_serial: str) -> ChannelReply:
        return self._call("query", payment_serial, None)

    def query_charge(self, payment_serial: str, channel_txn_id: str) -> ChannelReply:
        """By ``operations.query_charge`` if configured, else the payment's query (the
        engine takes it as that charge only if the transaction id is the same)."""
        operation = "query_charge" if "query_charge" in self.config.operations else "query"
        return self._call(operation, payment_serial, None, channel_txn_id=channel_txn_id)

    def close(self, payment_serial: str) -> ChannelReply:
        return self._call("close", payment_serial, None)

    def refund(self, payment_serial: str, refund_id: str, amount_minor: int, currency: str
               ) -> ChannelReply:
        """The refund request (idempotent by ``refund_id``), answering the refund's state.

        The engine re-sends a pending refund to learn its state; a wallet whose refund reply
        only says "accepted" (WeChat's) is then asked ``query_refund`` at once, and its
        answer counts if it is decided (a failed query leaves the refund's own reply)."""
        reply = self._call("refund", payment_serial, currency, refund_id=refund_id,
                           amount_minor=amount_minor, currency=currency)
        decided = self.refund_codes.classify(reply.return_code, reply.result_code)
        if decided is not ResultKind.PROCESSING or "query_refund" not in self.config.operations:
            return reply
        try:
            state = self.query_refund(payment_serial, refund_id)
        except Exception:
            return reply
        decided = self.refund_codes.classify(state.return_code, state.result_code)
        return reply if decided is ResultKind.PROCESSING else state

    def query_refund(self, payment_serial: str, refund_id: str) -> ChannelReply:
        return self._call("query_refund", payment_serial, None, refund_id=refund_id)

    def verify_notification(self, body: bytes, headers: Mapping[str, str]
                            ) -> ChannelNotification:
        started = time.monotonic()
        entry: dict[str, Any] = {
            "at_ms": self._clock_ms(), "operation": "notification", "serial": None,
            "error": None,
            "request": {"headers": dict(headers) if isinstance(headers, Mapping) else {},
                        "body": body_for_record(body) if isinstance(body, bytes) else None}}
        try:
            notification = read_notification(self.config, body, headers)
        except NotificationRejected as error:
            entry["error"] = f"NotificationRejected: {error.reason}: {error.message}"
            raise
        finally:
            entry["duration_ms"] = round((time.monotonic() - started) * 1000, 3)
            if entry["error"] is not None:
                self.recorder.record(entry)
        entry.update(serial=notification.payment_serial, refund_id=notification.refund_id,
                     kind=notification.kind.value, result=reply_json(notification.reply))
        self.recorder.record(entry)
        return notification

    # ---------------------------------------------------------------- the call

    def _call(self, operation: str, serial: str, reply_currency: str | None,
              **values: Any) -> ChannelReply:
        config = self.config
        now_ms = self._clock_ms()
        fields = request_values(config, operation, serial=serial, now_ms=now_ms,
                                nonce=self._nonce(), **values)
        entry: dict[str, Any] = {
            "at_ms": now_ms, "operation": operation, "serial": serial,
            "refund_id": values.get("refund_id"),
            "channel_txn_id": values.get("channel_txn_id"), "error": None}
        started = time.monotonic()
        try:
            method, path, body, headers, sent = assemble(config, operation, fields)
            entry.update(method=method, path=path,
                         request={"headers": headers, "body": sent})
            assert config.base_url is not None
            status, reply_headers, reply_body = self._transport(
                config.base_url.rstrip("/") + path, method, body, headers,
                config.timeout_ms / 1000, config.reply_bytes_max)
            entry.update(status=status, reply={"headers": reply_headers,
                                               "body": body_for_record(reply_body)})
            reply = read_reply(config, operation, status, reply_body, reply_headers,
                               currency=reply_currency)
        except BaseException as error:
            entry["error"] = f"{type(error).__name__}: {error}"
            raise
        finally:
            entry["duration_ms"] = round((time.monotonic() - started) * 1000, 3)
            if entry["error"] is not None:
                self.recorder.record(entry, masked=[fields.get("auth_code")])
        entry["result"] = reply_json(reply)
        self.recorder.record(entry, masked=[fields.get("auth_code")])
        return reply
