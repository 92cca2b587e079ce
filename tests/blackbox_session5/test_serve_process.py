"""`payengine serve` as a subprocess, driven over HTTP from the README's example and tables."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import httpx

from .support import Server, cli, free_port, payment, serve, wait_until


def test_the_readme_curl_walkthrough_runs_in_an_empty_folder(tmp_path: Path) -> None:
    with serve(tmp_path) as server, server.client() as c:
        assert c.get("/readyz").json() == {"status": "ready"}
        r = c.post("/v1/accounts", json={"account_id": "alice/points", "unit": "POINTS",
                                         "minor_per_unit": 10})
        assert r.status_code == 200, r.text
        assert r.json()["account_id"] == "alice/points"
        r = c.post("/v1/accounts/fund", json={"account_id": "alice/points", "amount": 500,
                                              "funding_id": "pts-welcome"})
        assert r.status_code == 200, r.text
        r = c.post("/v1/orders", json={
            "merchant_id": "station-42", "merchant_order_no": "pump3-000187",
            "user_id": "alice", "currency": "CNY", "total_minor": 10000,
            "title": "Fuel, pump 3", "cash": {"amount_minor": 9800, "channel": "wechat"},
            "vouchers": [{"account_id": "alice/points", "amount": 20}]})
        assert r.status_code == 200, r.text
        receipt = r.json()
        assert receipt["order_id"].startswith("ord_")
        assert receipt["payment_serial"].startswith("P")
        assert receipt["merchant_id"] == "station-42"

        def settled() -> dict | None:
            v = c.get("/v1/orders", params={"merchant_id": "station-42",
                                            "merchant_order_no": "pump3-000187"}).json()
            return v if v.get("settled") else None

        view = wait_until(settled, what="the README order settled")
        assert view["order_id"] == receipt["order_id"]
        assert view["state"] == "succeeded"
        assert isinstance(view["legs"], list) and len(view["legs"]) == 2
        r = c.get("/v1/orders/ord_nobody")
        assert r.status_code == 404
        assert r.json() == {"error": {"code": "unknown_order",
                                      "message": "no payment order ord_nobody", "details": {}}}
    assert (tmp_path / "payengine.db").exists(), "the default db is payengine.db in the cwd"


def test_healthz_openapi_and_docs_are_served(tmp_path: Path) -> None:
    with serve(tmp_path) as server, server.client() as c:
        assert c.get("/healthz").json() == {"status": "up"}
        spec = c.get("/openapi.json").json()
        paths = set(spec["paths"])
        for p in ["/v1/quotes", "/v1/quotes/{quote_id}", "/v1/orders", "/v1/orders/{order_id}",
                  "/v1/orders/{order_id}/close", "/v1/orders/{order_id}/verify",
                  "/v1/orders/{order_id}/change", "/v1/orders/{order_id}/refunds",
                  "/v1/orders/{order_id}/refunds/{refund_no}", "/v1/shifts", "/v1/accounts",
                  "/v1/accounts/fund", "/v1/accounts/status", "/v1/holds",
                  "/v1/holds/release", "/v1/channels/health", "/v1/signed/pay",
                  "/v1/signed/close", "/v1/signed/refund", "/v1/signed/query",
                  "/v1/notify/{channel}", "/healthz", "/readyz", "/metrics"]:
            assert p in paths, p
        assert c.get("/docs").status_code == 200
        assert c.get("/v1/channels/health").json() == {"channels": {"wechat": "closed"}}


def test_ctrl_c_and_sigterm_both_exit_zero(tmp_path: Path) -> None:
    server = Server(tmp_path)
    server.wait_ready()
    assert server.stop(signal.SIGINT) == 0
    server = Server(tmp_path)
    server.wait_ready()
    assert server.stop(signal.SIGTERM) == 0  # the README once said: ends by the signal


def test_a_bad_port_in_the_configuration_exits_2_naming_the_key(tmp_path: Path) -> None:
    (tmp_path / "payengine.toml").write_text("[service]\nport = 70000\n")
    r = cli("serve", "--config", "payengine.toml", cwd=tmp_path)
    assert r.returncode == 2
    assert "service.port: must be from 0 to 65535, not 70000" in r.stderr + r.stdout
    assert not (tmp_path / "payengine.db").exists(), "checked before anything is opened"


def test_an_unknown_key_in_the_configuration_exits_2_naming_it(tmp_path: Path) -> None:
    (tmp_path / "payengine.toml").write_text("[service]\nportt = 8000\n")
    r = cli("serve", "--config", "payengine.toml", cwd=tmp_path)
    assert r.returncode == 2
    assert "service.portt" in r.stderr + r.stdout


def test_a_second_server_on_the_same_file_exits_1(tmp_path: Path) -> None:
    with serve(tmp_path):
        r = cli("serve", "--port", str(free_port()), cwd=tmp_path, timeout=60)
        assert r.returncode == 1
        assert "payengine.db is open in another engine" in r.stderr


def test_db_host_and_port_flags_win_over_the_configuration_file(tmp_path: Path) -> None:
    port = free_port()
    (tmp_path / "payengine.toml").write_text(
        '[service]\nhost = "127.0.0.2"\nport = 1\n[engine]\ndb = "from-file.db"\n')
    with serve(tmp_path, "--config", "payengine.toml", "--db", "from-flag.db",
               "--host", "127.0.0.1", "--port", str(port), port=port) as server:
        assert server.port == port
    assert (tmp_path / "from-flag.db").exists()
    assert not (tmp_path / "from-file.db").exists()


def test_the_configured_engine_db_is_relative_to_the_working_directory(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "p.toml").write_text('[engine]\ndb = "station.db"\n')
    with serve(tmp_path, "--config", "conf/p.toml"):
        pass
    assert (tmp_path / "station.db").exists()


def test_a_killed_server_restarted_on_the_same_file_keeps_and_settles_its_orders(
        tmp_path: Path) -> None:
    # The simulated wallet's memory dies with the process (README: not said), so a short
    # pay window lets the in-flight orders end after the restart.
    (tmp_path / "p.toml").write_text(
        "[engine.policy]\npay_window_ms = 3000\nquery_schedule_ms = [200, 400, 800]\n")
    port = free_port()
    server = Server(tmp_path, "--config", "p.toml", port=port)
    server.wait_ready()
    receipts = []
    with server.client() as c:
        for i in range(5):
            r = c.post("/v1/orders", json=payment(f"k-{i}", total=1000 + i))
            assert r.status_code == 200, r.text
            receipts.append(r.json())
    server.stop(signal.SIGKILL)
    with serve(tmp_path, "--config", "p.toml", port=port) as again, again.client() as c:
        for i, receipt in enumerate(receipts):
            r = c.post("/v1/orders", json=payment(f"k-{i}", total=1000 + i))
            assert r.json() == receipt, "a retried submit after the restart: same receipt"

            def settled(oid: str = receipt["order_id"]) -> dict | None:
                v = c.get(f"/v1/orders/{oid}").json()
                return v if v["settled"] else None

            assert wait_until(settled)["state"] in ("succeeded", "closed")


def test_shutdown_with_sigint_then_a_restart_answers_from_the_same_file(tmp_path: Path) -> None:
    with serve(tmp_path) as server, server.client() as c:
        c.post("/v1/accounts", json={"account_id": "bob/rp", "unit": "CNY"})
        c.post("/v1/accounts/fund", json={"account_id": "bob/rp", "amount": 300,
                                          "funding_id": "f1"})
    with serve(tmp_path) as server, server.client() as c:
        r = c.get("/v1/accounts", params={"account_id": "bob/rp"})
        assert r.status_code == 200
        assert r.json()["funded"] == 300


def test_the_api_token_guards_v1_but_not_probes_metrics_signed_or_notify(
        tmp_path: Path) -> None:
    (tmp_path / "p.toml").write_text('[service]\napi_token_env = "PE_TOKEN"\n')
    token = "t" * 20
    with serve(tmp_path, "--config", "p.toml", extra_env={"PE_TOKEN": token}) as server, \
            server.client() as c:
        r = c.get("/v1/channels/health")
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "unauthorized"
        r = c.get("/v1/channels/health", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200
        r = c.get("/v1/channels/health", headers={"Authorization": "Bearer wrong-token-xxxxxx"})
        assert r.status_code == 401
        assert c.get("/healthz").status_code == 200
        assert c.get("/readyz").status_code == 200
        assert c.get("/metrics").status_code == 200
        r = c.post("/v1/signed/pay", content=b"{}")
        assert r.status_code != 401 or r.json()["error"]["code"] == "request_rejected"
        r = c.post("/v1/notify/wechat", content=b"{}")
        assert r.status_code != 401


def test_an_api_token_shorter_than_16_characters_refuses_the_configuration(
        tmp_path: Path) -> None:
    (tmp_path / "p.toml").write_text('[service]\napi_token_env = "PE_TOKEN"\n')
    r = cli("serve", "--config", "p.toml", cwd=tmp_path, extra_env={"PE_TOKEN": "short"})
    assert r.returncode == 2
    assert "service.api_token_env" in r.stderr + r.stdout


def test_the_rate_bound_answers_429_with_retry_after_and_spares_the_probes(
        tmp_path: Path) -> None:
    (tmp_path / "p.toml").write_text("[service]\nrate_per_s = 1\nrate_burst = 3\n")
    with serve(tmp_path, "--config", "p.toml") as server, server.client() as c:
        codes = [c.get("/v1/channels/health").status_code for _ in range(6)]
        assert codes[:3] == [200, 200, 200]
        assert 429 in codes[3:]
        r = c.get("/v1/channels/health")
        assert r.status_code == 429
        assert r.json()["error"]["code"] == "rate_limited"
        assert int(r.headers["Retry-After"]) >= 1
        assert r.json()["error"]["details"]["retry_after_s"] >= 1
        for _ in range(10):
            assert c.get("/healthz").status_code == 200
            assert c.get("/readyz").status_code == 200
            assert c.get("/metrics").status_code == 200
        time.sleep(1.2)
        assert c.get("/v1/channels/health").status_code == 200


def test_a_body_over_max_body_bytes_is_413_with_the_bound_in_details(tmp_path: Path) -> None:
    (tmp_path / "p.toml").write_text("[service]\nmax_body_bytes = 1024\n")
    with serve(tmp_path, "--config", "p.toml") as server, server.client() as c:
        big = payment("big", title="x" * 2000)
        r = c.post("/v1/orders", json=big)
        assert r.status_code == 413
        assert r.json()["error"]["code"] == "payload_too_large"
        assert r.json()["error"]["details"]["max_body_bytes"] == 1024

        def chunks():  # no Content-Length: refused as soon as it grows past the bound
            yield b'{"merchant_id": "' + b"x" * 600
            yield b"y" * 600 + b'"}'

        r = c.post("/v1/orders", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert r.json()["error"]["details"]["max_body_bytes"] == 1024


def test_the_default_max_body_bytes_is_65536(tmp_path: Path) -> None:
    with serve(tmp_path) as server, server.client() as c:
        body = b'{"account_id": "a", "unit": "' + b"X" * 65_600 + b'"}'
        r = c.post("/v1/accounts", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert r.json()["error"]["details"]["max_body_bytes"] == 65536
        r = c.post("/v1/accounts", content=b'{"account_id": "a", "unit": "' + b"X" * 60_000
                   + b'"}', headers={"content-type": "application/json"})
        assert r.status_code != 413


def test_unknown_routes_and_methods_use_the_error_body(tmp_path: Path) -> None:
    with serve(tmp_path) as server, server.client() as c:
        r = c.get("/v1/nothing-here")
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "not_found"
        assert set(r.json()["error"]) == {"code", "message", "details"}
        r = c.delete("/v1/orders")
        assert r.status_code == 405
        assert r.json()["error"]["code"] == "method_not_allowed"


def test_a_simulated_wallet_channel_from_the_file_serves_payments(tmp_path: Path) -> None:
    (tmp_path / "p.toml").write_text(
        '[channels.wechat-1]\nkind = "simulated"\nwallet = "wechat"\n'
        'merchant_no = "sim-0001"\ncredentials = { key = "simulated-wallet-key-0001" }\n')
    with serve(tmp_path, "--config", "p.toml") as server, server.client() as c:
        assert c.get("/v1/channels/health").json() == {"channels": {"wechat-1": "closed"}}
        r = c.post("/v1/orders", json=payment("w1", channel="wechat-1"))
        assert r.status_code == 200, r.text
        oid = r.json()["order_id"]
        v = wait_until(lambda: (x := c.get(f"/v1/orders/{oid}").json())["settled"] and x)
        assert v["state"] == "succeeded"
        # a forged notification to that wallet's URL is answered in WeChat Pay's format
        r = c.post("/v1/notify/wechat-1", content=b"<xml><return_code>SUCCESS</return_code>"
                   b"</xml>", headers={"content-type": "text/xml"})
        assert r.status_code in (400, 404, 409)
        assert r.json()["return_code"] == "FAIL"
        assert r.json()["return_msg"].startswith("notification_rejected: ")


def test_httpx_is_answered_json_for_every_refusal(tmp_path: Path) -> None:
    with serve(tmp_path) as server, server.client() as c:
        r = c.post("/v1/orders", content=b"not json", headers={"content-type":
                                                                "application/json"})
        assert r.status_code == 422
        body = r.json()["error"]
        assert body["code"] == "validation_error"
        assert isinstance(body["details"]["errors"], list)
        for e in body["details"]["errors"]:
            assert set(e) == {"loc", "msg", "type"}


def test_an_unreadable_config_file_is_a_configuration_error(tmp_path: Path) -> None:
    r = cli("serve", "--config", "missing.toml", cwd=tmp_path)
    assert r.returncode == 2


def test_serve_answers_on_the_host_it_was_given(tmp_path: Path) -> None:
    with serve(tmp_path, "--host", "127.0.0.1") as server:
        assert httpx.get(server.url + "/healthz").status_code == 200
