"""``payengine serve`` stops gracefully on SIGTERM and SIGINT and exits 0 (README "HTTP
service": exit status), as a subprocess: what it answered is in the database after."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

import httpx

from payengine import Engine
from payengine.actors.runtime import ThreadRuntime
from payengine.actors.service.runner import STOP_SIGNALS, stop_signals
from payengine.sim.channel import ChannelFaults, SimulatedChannel
from tests.service_support import payment

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 60.0
EXIT_TIMEOUT_S = 60.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Serve:
    """``python -m payengine.sim.cli serve --db DB --port N`` in ``folder``."""

    def __init__(self, folder: Path, db: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep +
               os.environ.get("PYTHONPATH", "")}
        self.err_path = folder / "serve.err"
        self.err = self.err_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "payengine.sim.cli", "serve", "--db", str(db), "--port",
             str(self.port)], cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=self.err)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"serve exited early: {self.stderr()}"
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"serve never got ready: {self.stderr()}")

    def stderr(self) -> str:
        if not self.err.closed:
            self.err.flush()
        return self.err_path.read_text()

    def stop(self, sig: int) -> int:
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(EXIT_TIMEOUT_S)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)
            self.err.close()


@pytest.fixture
def world() -> Iterator[ThreadRuntime]:
    runtime = ThreadRuntime()
    yield runtime
    runtime.shutdown()


def _reopened(db: Path, world: ThreadRuntime) -> Engine:
    channel = SimulatedChannel("wechat", world, seed=1, faults=ChannelFaults.none())
    engine = Engine.open(db, channels=[channel])
    channel.attach(engine)
    return engine


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_drains_and_exits_0_on_the_signal_and_the_order_is_persisted(
        tmp_path: Path, world: ThreadRuntime, sig: int) -> None:
    db = tmp_path / "station.db"
    server = Serve(tmp_path, db)
    try:
        server.wait_ready()
        with httpx.Client(base_url=server.url, timeout=15) as client:
            answer = client.post("/v1/orders", json=payment("pump3-000187"))
            assert answer.status_code == 200, answer.text
            receipt = answer.json()
    finally:
        status = server.stop(sig)
    assert status == 0, server.stderr()
    assert "Traceback" not in server.stderr()
    engine = _reopened(db, world)
    try:
        view = engine.find_order("station-42", "pump3-000187")
        assert view.order_id == receipt["order_id"]
        assert view.total_minor == 100_00
    finally:
        engine.shutdown()


def test_every_payment_answered_before_a_sigterm_is_in_the_database_after_it(
        tmp_path: Path, world: ThreadRuntime) -> None:
    db = tmp_path / "station.db"
    server = Serve(tmp_path, db)
    answered: list[dict[str, Any]] = []
    refused: list[str] = []
    five = threading.Event()

    def pay(n: int) -> None:
        try:
            with httpx.Client(base_url=server.url, timeout=15) as client:
                answer = client.post("/v1/orders", json=payment(
                    f"burst-{n}", user=f"user-{n}"))  # not alike: no duplicate guard
        except httpx.HTTPError:
            return  # refused at the door once the server stopped accepting: fine
        if answer.status_code == 200:
            answered.append(answer.json())
            if len(answered) >= 5:
                five.set()
        elif answer.status_code != 503:  # 503 engine_closed while draining is fine
            refused.append(answer.text)
        if refused:
            five.set()  # nothing more to wait for: the test fails below

    try:
        server.wait_ready()
        with ThreadPoolExecutor(max_workers=4) as pool:
            futures = [pool.submit(pay, n) for n in range(40)]
            assert five.wait(READY_TIMEOUT_S), server.stderr()
            status = server.stop(signal.SIGTERM)
            for future in futures:
                future.result()
    finally:
        if server.proc.poll() is None:
            server.stop(signal.SIGKILL)
    assert refused == []
    assert status == 0, server.stderr()
    assert len(answered) >= 5
    engine = _reopened(db, world)
    try:
        for receipt in answered:
            assert engine.get_order(receipt["order_id"]).order_id == receipt["order_id"]
    finally:
        engine.shutdown()


@pytest.mark.parametrize("sig", STOP_SIGNALS)
def test_a_stop_signal_inside_stop_signals_is_recorded_and_asks_the_server_to_exit(
        sig: int) -> None:
    class Server:
        should_exit = False

    server = Server()
    before = signal.getsignal(sig)
    with stop_signals(server) as received:
        signal.raise_signal(sig)  # handled at once: this thread runs the handler
        assert received == [sig]
        assert server.should_exit
    assert signal.getsignal(sig) is before


def test_stop_signals_off_the_main_thread_leaves_the_handlers_alone() -> None:
    seen: list[object] = []

    class Server:
        should_exit = False

    def run() -> None:
        with stop_signals(Server()) as received:
            seen.append(signal.getsignal(signal.SIGTERM))
            seen.append(received)

    before = signal.getsignal(signal.SIGTERM)
    thread = threading.Thread(target=run)
    thread.start()
    thread.join(10)
    assert seen == [before, []]


def test_a_sigterm_while_the_engine_opens_stops_serve_with_0_and_serves_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    from payengine.actors.service import runner

    opened: list[Engine] = []
    real_open = runner.open_engine

    def open_then_signalled(settings: Any, channels: Any) -> Engine:
        engine = real_open(settings, channels)
        opened.append(engine)
        signal.raise_signal(signal.SIGTERM)  # a supervisor's stop while it opened
        return engine

    def never(self: uvicorn.Server, sockets: object = None) -> None:
        raise AssertionError("served after a stop was asked")

    monkeypatch.setattr(runner, "open_engine", open_then_signalled)
    monkeypatch.setattr(uvicorn.Server, "run", never)
    before = signal.getsignal(signal.SIGTERM)
    assert runner.run_server(db=str(tmp_path / "x.db"), port=0) == 0
    assert not opened[0].is_open
    assert signal.getsignal(signal.SIGTERM) is before
