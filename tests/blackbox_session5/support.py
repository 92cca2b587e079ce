"""Helpers written from the README's HTTP service section: start `payengine serve` as a
subprocess on a free port, or serve `create_app(engine)` in process with uvicorn."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cli(*args: str, cwd: Path, timeout: float = 120, extra_env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess[str]:
    e = env()
    if extra_env:
        e.update(extra_env)
    return subprocess.run([PY, "-m", "payengine.sim.cli", *args], cwd=cwd, env=e,
                          capture_output=True, text=True, timeout=timeout)


class Server:
    """`payengine serve ...` in a folder, as a subprocess."""

    def __init__(self, cwd: Path, *args: str, port: int | None = None,
                 extra_env: dict[str, str] | None = None) -> None:
        self.port = port or free_port()
        self.cwd = cwd
        e = env()
        if extra_env:
            e.update(extra_env)
        self.out = open(cwd / f"serve-{self.port}.out", "w")  # noqa: SIM115
        self.err_path = cwd / f"serve-{self.port}.err"
        self.err = open(self.err_path, "w")  # noqa: SIM115
        argv = [PY, "-m", "payengine.sim.cli", "serve", *args]
        if "--port" not in args:
            argv += ["--port", str(self.port)]
        self.proc = subprocess.Popen(argv, cwd=cwd, env=e, stdout=self.out, stderr=self.err)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}: {self.stderr()}")
            try:
                r = httpx.get(self.url + "/readyz", timeout=1)
                if r.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError("server not ready: " + self.stderr())

    def stderr(self) -> str:
        self.err.flush()
        return self.err_path.read_text()

    def client(self, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=15, **kw)

    def stop(self, sig: int = signal.SIGINT, timeout_s: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout_s)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)
            self.out.close()
            self.err.close()
        return rc


@contextmanager
def serve(cwd: Path, *args: str, **kw: Any) -> Iterator[Server]:
    server = Server(cwd, *args, **kw)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


class InProcess:
    """An ASGI app served by uvicorn on a thread, on a free port."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> InProcess:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise AssertionError("in-process server did not start")
            time.sleep(0.02)
        return self

    def client(self, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=15, **kw)

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def wait_until(predicate: Any, timeout_s: float = 15.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def payment(no: str, *, total: int = 100_00, merchant: str = "station-42", user: str = "alice",
            cash: int | None = None, channel: str = "wechat",
            vouchers: list[dict[str, Any]] | None = None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"merchant_id": merchant, "merchant_order_no": no, "user_id": user,
                            "currency": "CNY", "total_minor": total, "title": "Fuel"}
    vouchers = vouchers or []
    paid_by_vouchers = sum(v["amount"] for v in vouchers)  # money vouchers in these tests
    cash_amount = total - paid_by_vouchers if cash is None else cash
    if cash_amount:
        body["cash"] = {"amount_minor": cash_amount, "channel": channel}
    if vouchers:
        body["vouchers"] = vouchers
    body.update(extra)
    return body
