"""A restart in the middle and the signals (README *HTTP service*, *Limits, threads and
shutdown*): a SIGKILLed server's orders are there after a start on the same file and
settle; SIGTERM and Ctrl-C (SIGINT) stop it gracefully and it exits 0; a second server
on a file in use exits 1."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .support import Server, payment, settled_view, unique

# Users pay 1.5-2.5 s after the pay call: orders are in flight when the server is killed.
SLOW_PAYERS = '''
[engine.policy]
pay_window_ms = 5000
query_schedule_ms = [200, 400, 800]

[channels.wechat]
kind = "simulated"
wallet = "wechat"
merchant_no = "sim-0001"
credentials = { key = "bb-wechat-key-000001" }
simulated = { seed = 1, faults = { sync_failure = 0.0, sync_timeout = 0.0, sync_unknown_code = 0.0, \
user_never_pays = 0.0, user_pays_late = 0.0, callback_lost = 0.0, callback_duplicated = 0.0, \
query_no_answer = 0.0, query_says_processing = 0.0, double_charge = 0.0, refund_callback_lost = 0.0, \
refund_callback_duplicated = 0.0, user_pay_delay_ms = [1500, 2500] } }
'''


@pytest.fixture(scope="module")
def station(server_extra: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Start, submit six payments, SIGKILL, start again on the same file."""
    import httpx
    folder = tmp_path_factory.mktemp("restart")
    config = folder / "payengine.toml"
    config.write_text(SLOW_PAYERS.replace("\\\n", ""))
    first = Server(folder, config=config, db=folder / "station.db").start()
    receipts = []
    with httpx.Client(base_url=first.url, timeout=30) as http:
        for n in range(6):
            answer = http.post("/v1/orders", json=payment(unique("k"), "wechat", 10_00 + n))
            assert answer.status_code == 200, answer.text
            receipts.append(answer.json())
        states_before = [http.get(f"/v1/orders/{r['order_id']}").json()["state"] for r in receipts]
    killed = first.signal(signal.SIGKILL)
    second = Server(folder, config=config, db=folder / "station.db", port=first.port).start()
    yield {"folder": folder, "config": config, "receipts": receipts, "killed": killed,
           "states_before": states_before, "server": second}
    second.stop()


def test_orders_in_flight_when_the_server_was_killed_are_there_after_the_restart(
        station: dict[str, Any]) -> None:
    import httpx
    assert station["killed"] == -signal.SIGKILL
    assert "paying" in station["states_before"]
    with httpx.Client(base_url=station["server"].url, timeout=30) as http:
        for receipt in station["receipts"]:
            view = http.get(f"/v1/orders/{receipt['order_id']}").json()
            assert (view["order_id"], view["payment_serial"], view["total_minor"]) == (
                receipt["order_id"], receipt["payment_serial"], receipt["total_minor"])


def test_every_order_of_the_killed_server_settles_after_the_restart(station: dict[str, Any]) -> None:
    import httpx
    with httpx.Client(base_url=station["server"].url, timeout=30) as http:
        views = [settled_view(http, r["order_id"]) for r in station["receipts"]]
        assert all(v["settled"] for v in views), [(v["state"], v["cause"]) for v in views]
        assert {v["state"] for v in views} <= {"succeeded", "failed", "closed"}
        # a retried submit after the restart gets the first receipt
        body = payment(station["receipts"][0]["merchant_order_no"], "wechat", 10_00)
        assert http.post("/v1/orders", json=body).json() == station["receipts"][0]


def test_a_second_server_on_a_database_in_use_exits_1_and_says_so(station: dict[str, Any]) -> None:
    other = Server(station["folder"], config=station["config"], db=station["folder"] / "station.db")
    other.start(wait=False)
    assert other.process is not None
    assert other.process.wait(timeout=120) == 1
    assert other.stderr().startswith("payengine serve: ")


def test_sigterm_stops_gracefully_exits_0_and_the_next_start_has_the_orders(
        station: dict[str, Any]) -> None:
    import httpx
    server = station["server"]
    assert server.signal(signal.SIGTERM) == 0
    assert "Application shutdown complete" in server.stderr()
    again = Server(station["folder"], config=station["config"], db=station["folder"] / "station.db",
                   port=server.port).start()
    try:
        with httpx.Client(base_url=again.url, timeout=30) as http:
            for receipt in station["receipts"]:
                assert http.get(f"/v1/orders/{receipt['order_id']}").json()["settled"] is True
    finally:
        assert again.signal(signal.SIGINT) == 0


def test_with_no_configuration_serve_uses_payengine_db_in_the_working_directory_and_the_wechat_channel(
        server_extra: None, tmp_path: Path) -> None:
    import httpx
    server = Server(tmp_path).start()
    try:
        assert (tmp_path / "payengine.db").exists()
        with httpx.Client(base_url=server.url, timeout=30) as http:
            assert http.get("/v1/channels/health").json() == {"channels": {"wechat": "closed"}}
            receipt = http.post("/v1/orders", json=payment(unique("d"), "wechat", 5_00)).json()
            assert settled_view(http, receipt["order_id"])["state"] == "succeeded"
    finally:
        assert server.signal(signal.SIGINT) == 0


def test_serve_without_the_server_extra_exits_2_and_names_the_extra(tmp_path: Path) -> None:
    shim = tmp_path / "shim"
    for name in ("fastapi", "uvicorn"):
        (shim / name).mkdir(parents=True)
        (shim / name / "__init__.py").write_text(f"raise ImportError('no {name} here')\n")
    from .support import child_env, payengine_argv
    env = child_env()
    env["PYTHONPATH"] = str(shim) + ((":" + env["PYTHONPATH"]) if env.get("PYTHONPATH") else "")
    result = subprocess.run([*payengine_argv(), "serve", "--port", "0"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "pip install 'payengine[server]'" in result.stderr
    assert result.stderr.startswith("payengine serve: ")
    assert not (tmp_path / "payengine.db").exists()
