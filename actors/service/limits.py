"""The service's bounds on what comes in, as one pure ASGI middleware: a bearer token (if
configured), a token bucket per client address, and the body size.

It runs on the event loop, before routing: a request over a bound is answered with the one
error body (413, 429, 401) and never reaches the engine; on a wallet's notification route
(``POST /v1/notify/{channel}``) the same refusal is answered in that wallet's format
(``notify.refusal``), status and headers kept, so the wallet understands it and retries.
The body is read here, at most ``max_body_bytes`` of it (a declared ``Content-Length``
above that is refused before a byte is read), and handed on whole, so every handler sees a
complete body within the bound.
"""

from __future__ import annotations

import hmac
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from payengine.actors.service.errors import error_body
from payengine.actors.service.notify import AckFormat, notify_channel, refusal

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

UNLIMITED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
"""Probes and the metrics scrape: never rate-limited (a busy service must still say it is
up, and show why it is busy)."""
OPEN_PREFIXES = ("/v1/signed/", "/v1/notify/")
"""Routes that authenticate each request themselves (merchant and wallet signatures): no
bearer token asked."""


class TokenBuckets:
    """A token bucket per client address, at most ``clients_max`` of them (the least
    recently seen is forgotten: it starts full again). Event loop only: not thread-safe."""

    def __init__(self, rate_per_s: int, burst: int, clients_max: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        assert rate_per_s > 0 and burst > 0 and clients_max > 0
        self.rate_per_s, self.burst, self.clients_max = rate_per_s, burst, clients_max
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, client: str) -> float:
        """0.0 if ``client`` may go on (a token taken), else the seconds until it may."""
        now = self._clock()
        tokens, at = self._buckets.pop(client, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate_per_s)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate_per_s
        self._buckets[client] = (tokens, now)
        while len(self._buckets) > self.clients_max:
            self._buckets.popitem(last=False)
        return wait

    def __len__(self) -> int:
        return len(self._buckets)


class Bounds:
    """The middleware: token, rate, then body (in that order: the cheapest refusals first)."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, buckets: TokenBuckets,
                 api_token: str | None,
                 ack_for: Callable[[str], AckFormat] | None = None) -> None:
        """``ack_for``: a channel's acknowledgement format (``None``: every refusal is the
        JSON error body, notification routes too)."""
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.buckets = buckets
        self.api_token = api_token
        self.ack_for = ack_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if path in UNLIMITED_PATHS:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        channel = notify_channel(path)
        fmt = None if channel is None or self.ack_for is None else self.ack_for(channel)
        if not self._authorised(path, headers):
            await _answer(send, fmt, 401, "unauthorized", "a bearer token is required",
                          {"WWW-Authenticate": "Bearer"})
            return
        client = scope.get("client")
        wait = self.buckets.take(str(client[0]) if client else "")
        if wait > 0:
            await _answer(send, fmt, 429, "rate_limited", "too many requests from this "
                                                          "address",
                          {"Retry-After": str(max(1, math.ceil(wait)))},
                          {"retry_after_s": max(1, math.ceil(wait))})
            return
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit()
                                     or int(declared) > self.max_body_bytes):
            await _too_large(send, fmt, self.max_body_bytes)
            return
        body = await self._read(receive)
        if body is None:
            await _too_large(send, fmt, self.max_body_bytes)
            return
        await self.app(scope, _replay(body, receive), send)

    def _authorised(self, path: str, headers: dict[str, str]) -> bool:
        if self.api_token is None or not path.startswith("/v1/") or path.startswith(
                OPEN_PREFIXES):
            return True
        given = headers.get("authorization", "")
        expected = f"Bearer {self.api_token}"
        return hmac.compare_digest(given.encode("latin-1"), expected.encode("latin-1"))

    async def _read(self, receive: Receive) -> bytes | None:
        """The whole body, or ``None`` once it grew past the bound (the rest unread)."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break  # a disconnect: the app will see it
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def _too_large(send: Send, fmt: AckFormat | None, limit: int) -> None:
    await _answer(send, fmt, 413, "payload_too_large", f"the body is larger than {limit} "
                                                       f"bytes",
                  {"Connection": "close"}, {"max_body_bytes": limit})


async def _answer(send: Send, fmt: AckFormat | None, status: int, code: str, message: str,
                  headers: dict[str, str], details: dict[str, Any] | None = None) -> None:
    """The one error body, or with ``fmt`` (a notification route) the wallet's failure."""
    if fmt is None:
        body, media_type = error_body(code, message, details), "application/json"
    else:
        answer = refusal(fmt, status, code)
        body, media_type = answer.body, answer.media_type
        if media_type.startswith("text/"):  # as the app's own Response says it
            media_type += "; charset=utf-8"
    raw = [(b"content-type", media_type.encode()),
           (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
