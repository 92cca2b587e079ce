"""A started HTTP service on loopback for the service tests: uvicorn in a thread on a free
port, the engine on a simulated wallet that outlives engines (its own world)."""

from __future__ import annotations

import dataclasses
import hashlib
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from payengine import Engine
from payengine.actors.runtime import ThreadRuntime
from payengine.actors.service import ServiceConfig, create_app
from payengine.sim.channel import ChannelFaults, SimulatedChannel

START_TIMEOUT_S = 20.0


class Served:
    """uvicorn serving ``create_app(engine, config=config)`` on 127.0.0.1 in a thread; the
    simulated wallet ``wechat`` acknowledged in WeChat Pay's format, as a configured
    ``wallet = "wechat"`` channel is."""

    def __init__(self, engine: Engine, config: ServiceConfig,
                 notify_formats: dict[str, str] | None = None) -> None:
        self.engine = engine
        self.app = create_app(engine, config=config,
                              notify_formats=notify_formats or {"wechat": "wechat"})
        self.server = uvicorn.Server(uvicorn.Config(
            self.app, host="127.0.0.1", port=0, log_level="warning", lifespan="on",
            timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.port = 0

    def start(self) -> Served:
        self.thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=10.0, **kwargs)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "uvicorn did not stop"


def wallet(world: ThreadRuntime, **faults: Any) -> SimulatedChannel:
    """The simulated WeChat wallet: every user pays promptly unless ``faults`` say else."""
    return SimulatedChannel("wechat", world, seed=1,
                            faults=dataclasses.replace(ChannelFaults.none(), **faults))


@contextmanager
def serving(db: Path, channel: SimulatedChannel, config: ServiceConfig | None = None,
            notify_formats: dict[str, str] | None = None) -> Iterator[Served]:
    """An engine on ``db`` with ``channel`` attached, served until the block ends (the app
    shuts the engine down when it stops); ``notify_formats`` as ``create_app``'s (default:
    ``wechat`` answered in WeChat Pay's format)."""
    engine = Engine.open(db, channels=[channel])
    channel.attach(engine)
    served = Served(engine, config or ServiceConfig(port=0), notify_formats).start()
    try:
        yield served
    finally:
        served.stop()
        engine.shutdown()


def payment(no: str, *, total: int = 100_00, vouchers: list[dict[str, Any]] | None = None,
            user: str = "alice") -> dict[str, Any]:
    vouchers = vouchers or []
    cash = total - sum(v["amount"] * v.pop("value", 1) for v in vouchers)
    return {"merchant_id": "station-42", "merchant_order_no": no, "user_id": user,
            "currency": "CNY", "total_minor": total, "title": "Fuel, pump 3",
            "cash": {"amount_minor": cash, "channel": "wechat"}, "vouchers": vouchers}


def wait_settled(client: httpx.Client, order_id: str, timeout_s: float = 20.0
                 ) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        order: dict[str, Any] = client.get(f"/v1/orders/{order_id}").json()
        if order["settled"] or time.monotonic() > deadline:
            return order
        time.sleep(0.05)


DIGESTED = ("trade_orders", "payment_orders", "legs", "refunds", "ledger", "voucher_accounts",
            "fundings", "holds", "quotes", "merchants", "users", "agreements", "withholdings")
"""The tables that hold money and its parties (not the logs of refusals, nor the journal)."""


def state_digest(db: Path) -> str:
    """A digest of every row that holds money or a party, read beside the running engine."""
    connection = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        digest = hashlib.sha256()
        for table in DIGESTED:
            for row in connection.execute(f"SELECT * FROM {table} ORDER BY rowid"):
                digest.update(repr((table, row)).encode())
        return digest.hexdigest()
    finally:
        connection.close()
