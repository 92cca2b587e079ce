"""`payengine serve` with simulated wallets from the file: an engine that cannot open
(ChannelsMissing) exits 1, and orders the wallet never pays survive a restart."""

from __future__ import annotations

import signal
from pathlib import Path

from .support import Server, cli, free_port, payment, serve

NEVER_PAYS = '''
[engine.policy]
pay_window_ms = 600000
query_schedule_ms = [60000]

[channels.slow]
kind = "simulated"
wallet = "wechat"
merchant_no = "sim-0002"
credentials = { key = "simulated-wallet-key-0002" }

# a faults table's unnamed fields are not zero (README: not said): name the sync ones
[channels.slow.simulated.faults]
user_never_pays = 1.0
sync_failure = 0.0
sync_timeout = 0.0
sync_unknown_code = 0.0

[channels.wechat]
kind = "simulated"
wallet = "wechat"
merchant_no = "sim-0001"
credentials = { key = "simulated-wallet-key-0001" }
'''

WITHOUT_SLOW = '''
[channels.wechat]
kind = "simulated"
wallet = "wechat"
merchant_no = "sim-0001"
credentials = { key = "simulated-wallet-key-0001" }
'''


def test_a_server_without_a_channel_its_unsettled_orders_use_exits_1(tmp_path: Path) -> None:
    (tmp_path / "full.toml").write_text(NEVER_PAYS)
    (tmp_path / "less.toml").write_text(WITHOUT_SLOW)
    with serve(tmp_path, "--config", "full.toml") as server, server.client() as c:
        ids = []
        for i in range(3):
            r = c.post("/v1/orders", json=payment(f"n-{i}", channel="slow", total=100 + i))
            assert r.status_code == 200, r.text
            ids.append(r.json()["order_id"])
        assert c.get(f"/v1/orders/{ids[0]}").json()["settled"] is False
    r = cli("serve", "--config", "less.toml", "--port", str(free_port()), cwd=tmp_path)
    assert r.returncode == 1
    assert "slow" in r.stderr and "3" in r.stderr
    with serve(tmp_path, "--config", "full.toml") as server, server.client() as c:
        for oid in ids:
            v = c.get(f"/v1/orders/{oid}").json()
            assert v["state"] == "paying" and v["settled"] is False
        for oid in ids:
            assert c.post(f"/v1/orders/{oid}/close").json()["state"] == "closed"


def test_sigkill_in_the_middle_then_a_restart_keeps_every_acknowledged_order(
        tmp_path: Path) -> None:
    (tmp_path / "full.toml").write_text(NEVER_PAYS)
    port = free_port()
    server = Server(tmp_path, "--config", "full.toml", port=port)
    server.wait_ready()
    acked = {}
    with server.client() as c:
        for i in range(20):
            r = c.post("/v1/orders", json=payment(f"k-{i}", channel="slow", total=100 + i))
            assert r.status_code == 200
            acked[f"k-{i}"] = r.json()
    server.stop(signal.SIGKILL)
    with serve(tmp_path, "--config", "full.toml", port=port) as again, again.client() as c:
        for no, receipt in acked.items():
            r = c.get("/v1/orders", params={"merchant_id": "station-42",
                                            "merchant_order_no": no})
            assert r.status_code == 200
            assert r.json()["order_id"] == receipt["order_id"]
            assert r.json()["state"] == "paying"
