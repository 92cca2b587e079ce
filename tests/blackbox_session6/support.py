"""Helpers of the black-box suite of issue 13, written from README.md alone.

Nothing here imports payengine's internals: the server is started as the README says
(`payengine serve`), driven over HTTP with httpx, and the wallet's notifications are
forged in the documented `SignedJsonNotifications` format (compact JSON, header
`X-Signature` = hex HMAC-SHA256 of the exact body bytes). Runs on the test's thread.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import payengine

READY_DEADLINE_S = 90.0      # a loaded machine: how long a start may take before we give up
SETTLE_DEADLINE_S = 60.0     # how long to poll for an order to settle (a deadline, not a claim)


def payengine_argv() -> list[str]:
    """The `payengine` command of this interpreter's environment (the README's entry
    point); falls back to the CLI module when the environment has no script (a checkout)."""
    script = Path(sys.executable).parent / "payengine"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "payengine.sim.cli"]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a child process: where `import payengine` resolves to the same
    copy as in this process (the installed one, in the intended run)."""
    env = dict(os.environ)
    package_parent = str(Path(payengine.__file__).resolve().parent.parent)
    if not (Path(sys.executable).parent / "payengine").exists():
        env["PYTHONPATH"] = package_parent
    env.pop("PAYENGINE_TEST_TOKEN", None)
    env["COLUMNS"] = "200"
    if extra:
        env.update(extra)
    return env


def run_cli(args: list[str], cwd: Path, env: dict[str, str] | None = None,
            timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run `payengine ARGS` to its end and return what it printed and its exit status."""
    return subprocess.run([*payengine_argv(), *args], cwd=cwd, env=child_env(env),
                          capture_output=True, text=True, timeout=timeout, check=False)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Server:
    """One `payengine serve` process on a free loopback port."""

    def __init__(self, cwd: Path, config: Path | None = None, db: Path | None = None,
                 env: dict[str, str] | None = None, port: int | None = None) -> None:
        self.cwd, self.config, self.db, self.env = cwd, config, db, env
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.stderr_path = cwd / f"serve-{self.port}.err"

    def argv(self) -> list[str]:
        args = [*payengine_argv(), "serve", "--port", str(self.port)]
        if self.config is not None:
            args += ["--config", str(self.config)]
        if self.db is not None:
            args += ["--db", str(self.db)]
        return args

    def start(self, wait: bool = True) -> Server:
        with open(self.stderr_path, "ab") as err:
            self.process = subprocess.Popen(self.argv(), cwd=self.cwd, env=child_env(self.env),
                                            stdout=subprocess.DEVNULL, stderr=err)
        if wait:
            self.wait_ready()
        return self

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_ready(self) -> None:
        import httpx
        deadline = time.monotonic() + READY_DEADLINE_S
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"serve exited {self.process.returncode}: {self.stderr()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"serve not ready in time: {self.stderr()}")

    def signal(self, signum: int, timeout: float = 60.0) -> int:
        """Send `signum` and wait for the process to end; its return code."""
        assert self.process is not None
        self.process.send_signal(signum)
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def sign_notification(key: str, fields: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    """A wallet notification in the documented SignedJsonNotifications format."""
    body = json.dumps(fields, separators=(",", ":")).encode()
    signature = hmac.new(key.encode(), body, hashlib.sha256).hexdigest()
    return body, {"X-Signature": signature, "Content-Type": "application/json"}


def payment_notification(serial: str, amount_minor: int, txn: str,
                         result_code: str = "SUCCESS", currency: str = "CNY") -> dict[str, Any]:
    return {"kind": "payment", "payment_serial": serial, "refund_id": "",
            "return_code": "SUCCESS", "result_code": result_code, "channel_txn_id": txn,
            "amount_minor": amount_minor, "currency": currency}


def wait_for(predicate: Any, deadline_s: float = SETTLE_DEADLINE_S, step_s: float = 0.1) -> Any:
    """Poll `predicate` until it returns something truthy; the last value otherwise."""
    deadline = time.monotonic() + deadline_s
    value = predicate()
    while not value and time.monotonic() < deadline:
        time.sleep(step_s)
        value = predicate()
    return value


def error_of(response: Any) -> dict[str, Any]:
    """The documented error body's inner object, checked for its shape."""
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"code", "message", "details"}, error
    assert isinstance(error["code"], str) and isinstance(error["message"], str)
    assert isinstance(error["details"], dict)
    return dict(error)


_counter = [0]


def unique(prefix: str) -> str:
    """A fresh id for this process's run (servers outlive single tests)."""
    _counter[0] += 1
    return f"{prefix}-{os.getpid()}-{_counter[0]}-{time.monotonic_ns() % 10**9}"


def payment(no: str, channel: str | None, amount: int, user: str | None = None,
            **extra: Any) -> dict[str, Any]:
    """A `POST /v1/orders` body: one cash part through `channel` for the whole amount."""
    body: dict[str, Any] = {"merchant_id": "station-bb", "merchant_order_no": no,
                            "user_id": user or f"user-{no}", "currency": "CNY",
                            "total_minor": amount, "title": "Fuel"}
    if channel is not None:
        body["cash"] = {"amount_minor": amount, "channel": channel}
    body.update(extra)
    return body


def settled_view(http: Any, order_id: str) -> dict[str, Any]:
    """Poll `GET /v1/orders/{id}` until the order is settled; the view then (or the last)."""
    views: list[dict[str, Any]] = []

    def read() -> bool:
        views.append(http.get(f"/v1/orders/{order_id}").json())
        return bool(views[-1].get("settled"))

    wait_for(read)
    return views[-1]


def state_view(http: Any, order_id: str, state: str) -> dict[str, Any]:
    """Poll until the order is in `state`; the view then (or the last one read)."""
    views: list[dict[str, Any]] = []

    def read() -> bool:
        views.append(http.get(f"/v1/orders/{order_id}").json())
        return views[-1].get("state") == state

    wait_for(read)
    return views[-1]


def run_many(commands: dict[str, list[str]], cwd: Path, env: dict[str, str] | None = None,
             timeout: float = 180.0) -> dict[str, subprocess.CompletedProcess[str]]:
    """Run several `payengine` commands at once (each a fresh interpreter); their results."""
    started = {name: subprocess.Popen([*payengine_argv(), *args], cwd=cwd, env=child_env(env),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for name, args in commands.items()}
    results = {}
    for name, process in started.items():
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
        results[name] = subprocess.CompletedProcess(process.args, process.returncode, out, err)
    return results


BATCH_SCRIPT = r'''
import contextlib, io, json, os, sys
from importlib.metadata import entry_points
found = list(entry_points(group="console_scripts", name="payengine"))
if found:
    main = found[0].load()
else:                                   # a checkout without an installed distribution
    from payengine.sim.cli import main
results = []
for argv, env in json.loads(sys.stdin.read()):
    saved = dict(os.environ)
    os.environ.update(env)
    raw_out, raw_err = io.BytesIO(), io.BytesIO()
    out = io.TextIOWrapper(raw_out, encoding="utf-8", write_through=True)
    err = io.TextIOWrapper(raw_err, encoding="utf-8", write_through=True)
    code = 0
    sys.argv = ["payengine", *argv]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            result = main()
            code = result if isinstance(result, int) else 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    os.environ.clear()
    os.environ.update(saved)
    out.flush(); err.flush()
    results.append([code, raw_out.getvalue().decode(), raw_err.getvalue().decode()])
print(json.dumps(results))
'''


def run_batch(calls: list[tuple[list[str], dict[str, str]]], cwd: Path,
              timeout: float = 120.0) -> list[subprocess.CompletedProcess[str]]:
    """Run several quick `payengine` invocations (help, completion) in ONE interpreter,
    through the installed `payengine` console-script entry point (what the command runs)."""
    done = subprocess.run([sys.executable, "-c", BATCH_SCRIPT], input=json.dumps(calls),
                          cwd=cwd, env=child_env(), capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert done.returncode == 0, done.stderr
    return [subprocess.CompletedProcess(argv, code, out, err)
            for (argv, _), (code, out, err) in zip(calls, json.loads(done.stdout.splitlines()[-1]),
                                                   strict=True)]
