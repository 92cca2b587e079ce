"""``payengine serve``: open the engine the settings describe and serve it with uvicorn.

Runs on the calling (main) thread: uvicorn's loop takes SIGINT and SIGTERM, stops
accepting, lets the requests in flight finish (``drain_timeout_ms``), then the app's
shutdown waits (bounded) for the outbox and shuts the engine down. uvicorn then gives the
signal back to the handler it found (``Server.capture_signals`` re-raises it, so that an
embedding program learns of it): ``stop_signals`` is that handler, so a graceful stop on
SIGTERM exits 0 like one on Ctrl-C, instead of dying by the signal (143) after it. With no configuration it
serves what ``payengine demo`` runs on: the SQLite file ``payengine.db`` in the working
directory and a simulated wallet, channel ``wechat`` (every user pays promptly).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

from payengine.actors.adapters.channels import build_channel
from payengine.actors.adapters.config import parse_config
from payengine.actors.channel import Channel
from payengine.actors.engine import Engine
from payengine.actors.service.config import ServerSettings, load_settings
from payengine.actors.service.notify import format_for_wallet
from payengine.engine.errors import ExtraMissing, PaymentError

SIMULATED_KEY = "payengine-serve-simulated-wallet-key"
"""The simulated wallet's notification key (it moves no real money)."""
DEFAULT_CHANNELS: Mapping[str, Any] = {"channels": {"wechat": {
    "kind": "simulated", "wallet": "wechat", "merchant_no": "sim-0001",
    "credentials": {"key": SIMULATED_KEY},
    "simulated": {"seed": 7, "txn_prefix": "S", "faults": "none"}}}}
"""What is served without ``[channels]``: the demo's simulated wallet, without faults."""


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
"""The signals that stop ``payengine serve`` gracefully (exit status 0)."""


class _Stoppable(Protocol):
    should_exit: bool


class StopRequest:
    """A stop asked before uvicorn's server exists (while the engine opens), handed on to
    the server once it does. Set from a signal handler, read on the main thread."""

    def __init__(self) -> None:
        self._asked = False
        self.server: Any = None
        """``uvicorn.Server``, once built: ``should_exit`` is set on it as well."""

    @property
    def should_exit(self) -> bool:
        return self._asked

    @should_exit.setter
    def should_exit(self, value: bool) -> None:
        self._asked = value
        if self.server is not None:
            self.server.should_exit = value


@contextlib.contextmanager
def stop_signals(server: _Stoppable) -> Iterator[list[int]]:
    """While the block runs, SIGINT and SIGTERM are recorded (the list yielded) and ask
    ``server`` to exit, instead of raising ``KeyboardInterrupt`` or ending the process.

    uvicorn installs its own handlers while it serves and, once it has shut down
    gracefully, restores these and raises the signal again: it lands here and is only
    recorded. A signal before uvicorn took over (while it starts) or after it gave back
    (while the engine shuts down) stops the server as well. Main thread only (Python's
    rule for signal handlers); elsewhere the handlers are left as they are."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def stop(sig: int, frame: FrameType | None) -> None:
        received.append(sig)
        server.should_exit = True

    previous = {sig: signal.signal(sig, stop) for sig in STOP_SIGNALS}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def require_server_extra() -> None:
    """``ExtraMissing`` unless FastAPI and uvicorn can be imported."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as error:
        raise ExtraMissing(f"the HTTP service needs the server extra ({error.name} is not "
                           f"installed): pip install 'payengine[server]'", "server") from None


def build_channels(settings: ServerSettings) -> list[Channel]:
    """The configured channels (the simulated wallet by default), built, not started."""
    source = settings.channels if settings.channels is not None else DEFAULT_CHANNELS
    configs = parse_config({k: v for k, v in source.items() if k == "channels"},
                           base_dir=settings.base_dir)
    return [build_channel(c, base_dir=settings.base_dir) for c in configs]


def open_engine(settings: ServerSettings, channels: list[Channel]) -> Engine:
    """The engine on ``settings.db`` with the channels, merchant keys registered and the
    simulated wallets attached (their notifications go to this engine)."""
    engine = Engine.open(Path(settings.db), channels=channels, policy=settings.policy,
                         config=settings.engine, synchronous=settings.synchronous,
                         risk=settings.risk)
    try:
        for merchant in settings.merchants:
            engine.register_merchant_key(merchant.merchant_id, secret=merchant.secret,
                                         public_key_pem=merchant.public_key_pem)
        for channel in channels:
            attach = getattr(channel, "attach", None)
            if attach is not None:
                attach(engine)
    except BaseException:
        engine.shutdown()
        raise
    return engine


def notify_formats(channels: list[Channel]) -> dict[str, str]:
    """Each channel's acknowledgement format, by its configured wallet."""
    formats = {}
    for channel in channels:
        config = getattr(channel, "config", None)
        wallet = getattr(config, "wallet", None)
        if isinstance(wallet, str):
            formats[channel.name] = format_for_wallet(wallet).name
    return formats


def run_server(config_path: str | Path | None = None, *, db: str | None = None,
               host: str | None = None, port: int | None = None) -> int:
    """``payengine serve``: 0 after a clean stop (SIGINT or SIGTERM: drained first); 2 for
    a bad configuration or a missing extra (the message on stderr); 1 if the engine cannot
    be opened."""
    try:
        require_server_extra()
        settings = load_settings(config_path, db=db, host=host, port=port)
        channels = build_channels(settings)
    except PaymentError as error:
        print(f"payengine serve: {error.message}", file=sys.stderr)
        return 2
    import uvicorn

    from payengine.actors.service.app import create_app

    stop = StopRequest()
    with stop_signals(stop):  # from here a signal stops the serve cleanly, even mid-open
        try:
            engine = open_engine(settings, channels)
        except PaymentError as error:
            print(f"payengine serve: cannot open {settings.db}: {error.message}",
                  file=sys.stderr)
            return 1
        service = settings.service
        try:
            app = create_app(engine, config=service, notify_formats=notify_formats(channels))
        except PaymentError as error:
            engine.shutdown()
            print(f"payengine serve: {error.message}", file=sys.stderr)
            return 2
        server = uvicorn.Server(uvicorn.Config(
            app, host=service.host, port=service.port, log_level="info",
            limit_concurrency=service.connections_max,
            timeout_graceful_shutdown=max(1, -(-service.drain_timeout_ms // 1000))))
        stop.server = server
        try:
            if not stop.should_exit:  # else stopped while the engine opened: serve nothing
                print(f"payengine serve: {settings.db} on http://{service.host}:"
                      f"{service.port} (OpenAPI at /openapi.json)", file=sys.stderr)
                server.run()
        except KeyboardInterrupt:  # a Ctrl-C off the main thread (no handler of ours)
            pass
        finally:
            engine.shutdown()  # idempotent: the app's shutdown did it unless it never started
    return 0
