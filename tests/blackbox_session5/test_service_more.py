"""More of the HTTP service: step-up verify, risk blocks, duplicates, the shutdown steps,
connections_max and a signed merchant from the configuration file."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from payengine import (
    CashPart,
    Engine,
    EngineClosed,
    EngineConfig,
    MerchantSigner,
    OrderPolicy,
    PaymentRequest,
    RiskConfig,
    RiskRules,
)
from payengine.actors.service import ServiceConfig, create_app
from tests.helpers import ScriptedChannel, paid_reply

from .support import InProcess, payment, serve, wait_until
from .test_service_app import err, notify, wait_paying


@pytest.fixture
def risky(tmp_path: Path) -> Iterator[tuple[Engine, ScriptedChannel]]:
    channel = ScriptedChannel("wechat")
    risk = RiskConfig(rules=RiskRules(amount_max={"CNY": 2_000_00},
                                      step_up_amount={"CNY": 500_00},
                                      blocked_users=frozenset({"mallory"})),
                      issue_code=lambda request, context: "424242",
                      verification_window_ms=120_000, verify_attempts_max=3)
    eng = Engine.open(tmp_path / "risk.db", channels=[channel],
                      policy=OrderPolicy(pay_window_ms=600_000, query_schedule_ms=(60_000,)),
                      config=EngineConfig(duplicate_guard_window_ms=0), risk=risk)
    yield eng, channel
    with contextlib.suppress(EngineClosed):
        eng.shutdown()


def test_step_up_verify_over_http_wrong_then_right(
        risky: tuple[Engine, ScriptedChannel]) -> None:
    engine, channel = risky
    app = create_app(engine, config=ServiceConfig(shutdown_engine=False))
    with InProcess(app) as served, served.client() as http:
        r = http.post("/v1/orders", json=payment("big", total=2_000_01))
        assert r.status_code == 403
        assert err(r)["code"] == "risk_blocked"
        assert err(r)["details"] == {"rule": "amount_max"}
        r = http.post("/v1/orders", json=payment("m-1", user="mallory", total=100))
        assert err(r)["details"] == {"rule": "blocked_user"}
        r = http.post("/v1/orders", json=payment("s-1", total=600_00))
        assert r.status_code == 200
        receipt = r.json()
        assert receipt["needs_verification"] is True
        oid = receipt["order_id"]
        view = http.get(f"/v1/orders/{oid}").json()
        assert view["state"] == "needs_verification"
        assert view["verification"]["status"] == "pending"
        assert view["verification"]["attempts_left"] == 3
        r = http.post(f"/v1/orders/{oid}/verify", json={"code": "000000"})
        assert r.status_code == 403
        e = err(r)
        assert e["code"] == "verification_failed"
        assert e["details"]["attempts_left"] == 2
        assert e["details"]["state"] == "needs_verification"
        r = http.post(f"/v1/orders/{oid}/verify", json={"code": "424242"})
        assert r.status_code == 200, r.text
        assert r.json()["order_id"] == oid
        again = http.post(f"/v1/orders/{oid}/verify", json={"code": "424242"})
        assert again.status_code == 200
        wait_paying(http, oid)
        notify(http, "wechat", receipt["payment_serial"], paid_reply(receipt["payment_serial"]))
        v = wait_until(lambda: (x := http.get(f"/v1/orders/{oid}").json())["settled"] and x)
        assert (v["state"], v["verification"]["status"]) == ("succeeded", "passed")
        assert channel.count("pay") == 1


def test_the_last_wrong_code_fails_the_order_with_state_failed(
        risky: tuple[Engine, ScriptedChannel]) -> None:
    engine, _ = risky
    app = create_app(engine, config=ServiceConfig(shutdown_engine=False))
    with InProcess(app) as served, served.client() as http:
        oid = http.post("/v1/orders", json=payment("s-2", total=700_00)).json()["order_id"]
        for left in (2, 1, 0):
            r = http.post(f"/v1/orders/{oid}/verify", json={"code": "111111"})
            assert r.status_code == 403
            assert err(r)["details"]["attempts_left"] == left
        assert err(r)["details"]["state"] == "failed"
        r = http.post(f"/v1/orders/{oid}/verify", json={"code": "424242"})
        assert r.status_code == 409 and err(r)["code"] == "illegal_transition"
        r = http.post(f"/v1/orders/{oid}/verify", json={"code": 424242})
        assert r.status_code == 422


def test_shutdown_waits_at_most_notify_drain_timeout_for_the_outbox(tmp_path: Path) -> None:
    def never_caught_up(event: Any) -> None:
        raise RuntimeError("subscriber down")

    channel = ScriptedChannel("wechat")
    engine = Engine.open(tmp_path / "d.db", channels=[channel],
                         policy=OrderPolicy(pay_window_ms=600_000, query_schedule_ms=(60_000,)),
                         subscribers={"books": never_caught_up})
    app = create_app(engine, config=ServiceConfig(notify_drain_timeout_ms=1500,
                                                  drain_timeout_ms=0))
    served = InProcess(app)
    with served, served.client() as http:
        oid = http.post("/v1/orders", json=payment("d-1")).json()["order_id"]
        assert http.post(f"/v1/orders/{oid}/close").json()["state"] == "closed"
        assert not engine.notifications.caught_up()
        started = time.monotonic()
        served.server.should_exit = True
        served.thread.join(30)
        took = time.monotonic() - started
    assert 1.2 <= took <= 6.0, took
    with pytest.raises(EngineClosed):
        engine.get_order(oid)


def test_past_connections_max_uvicorn_answers_a_plain_503(tmp_path: Path) -> None:
    (tmp_path / "p.toml").write_text("[service]\nconnections_max = 2\n")
    with serve(tmp_path, "--config", "p.toml") as server:
        held = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(3)]
        try:
            time.sleep(0.3)
            r = httpx.get(server.url + "/healthz", timeout=5)
            assert r.status_code == 503
            assert "error" not in r.text
        finally:
            for s in held:
                s.close()
        time.sleep(0.5)
        assert httpx.get(server.url + "/healthz", timeout=5).status_code == 200


def test_a_merchant_from_the_file_signs_requests_and_its_nonces_outlive_a_restart(
        tmp_path: Path) -> None:
    secret = "station-42-request-key-0123456789abcdef"
    (tmp_path / "p.toml").write_text('[[merchants]]\nid = "station-42"\nsecret_env = "S42"\n')
    signer = MerchantSigner("station-42", secret=secret)
    body, headers = signer.pay(PaymentRequest("station-42", "sp-1", "alice", "CNY", 100, "t",
                                              cash=CashPart(100, "wechat")))
    with serve(tmp_path, "--config", "p.toml", extra_env={"S42": secret}) as s, \
            s.client() as c:
        r = c.post("/v1/signed/pay", content=body, headers=dict(headers))
        assert r.status_code == 200, r.text
        receipt = r.json()
    with serve(tmp_path, "--config", "p.toml", extra_env={"S42": secret}) as s, \
            s.client() as c:
        r = c.post("/v1/signed/pay", content=body, headers=dict(headers))
        assert r.status_code == 409
        assert r.json()["error"]["details"]["reason"] == "replayed_nonce"
        qb, qh = signer.query("sp-1")
        r = c.post("/v1/signed/query", content=qb, headers=dict(qh))
        assert r.status_code == 200 and r.json()["order_id"] == receipt["order_id"]


def test_a_duplicate_suspected_submit_is_409_with_order_ids(tmp_path: Path) -> None:
    with serve(tmp_path) as server, server.client() as c:
        first = c.post("/v1/orders", json=payment("dup-0")).json()
        r = c.post("/v1/orders", json=payment("dup-1"))
        assert r.status_code == 409
        assert err(r)["code"] == "duplicate_suspected"
        assert err(r)["details"]["order_ids"] == [first["order_id"]]
        r = c.post("/v1/orders", json=payment("dup-1", confirm_duplicate=True))
        assert r.status_code == 200


def test_the_metrics_endpoint_counts_payments_of_the_served_engine(tmp_path: Path) -> None:
    with serve(tmp_path) as server, server.client() as c:
        oid = c.post("/v1/orders", json=payment("mx-1")).json()["order_id"]
        wait_until(lambda: c.get(f"/v1/orders/{oid}").json()["settled"])

        def counted() -> bool:
            return 'payengine_payments_total{channel="wechat",state="succeeded"} 1.0' \
                in c.get("/metrics").text

        wait_until(counted)
        text = c.get("/metrics").text
        assert "payengine_submit_seconds_count 1.0" in text
        assert 'payengine_orders{state="succeeded"} 1.0' in text
        assert "payengine_up 1.0" in text
