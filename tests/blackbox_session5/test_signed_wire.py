"""Signed merchant requests over HTTP, signed by hand from the README's wire format, and
the statuses the Errors table gives each reason; engine bounds as 503 with Retry-After."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from payengine import CashPart, Engine, EngineConfig, OrderPolicy, Overloaded, PaymentRequest
from payengine.actors.service import ServiceConfig, create_app
from tests.helpers import SLOW_POLICY, ScriptedChannel

from .support import InProcess, payment
from .test_service_app import err

SECRET = "station-42-request-key-0123456789abcdef"


def signed(body: dict, *, merchant: str = "station-42", ts: int | None = None,
           nonce: str | None = None, secret: str = SECRET, sign_type: str = "HMAC-SHA256"
           ) -> tuple[bytes, dict[str, str]]:
    raw = json.dumps(body, separators=(",", ":")).encode()
    ts = int(time.time() * 1000) if ts is None else ts
    nonce = nonce or hashlib.sha256(raw + str(time.monotonic_ns()).encode()).hexdigest()[:32]
    msg = (f"payengine-request-v1\n{sign_type}\n{merchant}\n{ts}\n{nonce}\n").encode() + raw
    sig = hmac.new(secret.encode(), msg, hashlib.sha256).hexdigest()
    return raw, {"X-Payengine-Merchant-Id": merchant, "X-Payengine-Timestamp": str(ts),
                 "X-Payengine-Nonce": nonce, "X-Payengine-Sign-Type": sign_type,
                 "X-Payengine-Signature": sig}


def pay_body(no: str, total: int = 100) -> dict:
    return {"op": "pay", "merchant_order_no": no, "user_id": "alice", "currency": "CNY",
            "total_minor": total, "title": "Fuel",
            "cash": {"amount_minor": total, "channel": "wechat"}}


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    eng = Engine.open(tmp_path / "s.db", channels=[ScriptedChannel("wechat")],
                      policy=SLOW_POLICY, config=EngineConfig(duplicate_guard_window_ms=0))
    eng.register_merchant_key("station-42", secret=SECRET)
    yield eng
    eng.shutdown()


@pytest.fixture
def http(engine: Engine) -> Iterator[httpx.Client]:
    with InProcess(create_app(engine, config=ServiceConfig(shutdown_engine=False))) as s, \
            s.client() as c:
        yield c


def post(http: httpx.Client, op: str, signed_request: tuple[bytes, dict[str, str]]
         ) -> httpx.Response:
    body, headers = signed_request
    return http.post(f"/v1/signed/{op}", content=body, headers=headers)


def test_a_request_signed_by_hand_as_the_readme_says_is_taken(http: httpx.Client) -> None:
    r = post(http, "pay", signed(pay_body("w-1")))
    assert r.status_code == 200, r.text
    assert r.json()["merchant_order_no"] == "w-1"
    r = post(http, "query", signed({"op": "query", "merchant_order_no": "w-1"}))
    assert r.status_code == 200 and r.json()["merchant_order_no"] == "w-1"


@pytest.mark.parametrize(("mutate", "status", "reason"), [
    (lambda b, h: (b, {**h, "X-Payengine-Sign-Type": "RSA-SHA256"}), 401, "wrong_sign_type"),
    (lambda b, h: (b.replace(b"100", b"101"), h), 401, "bad_signature"),
    (lambda b, h: (b, {**h, "X-Payengine-Signature": h["X-Payengine-Signature"].upper()}),
     400, "malformed"),  # one spelling only: upper-case hex is not the header's form
    (lambda b, h: (b, {k: v for k, v in h.items() if k != "X-Payengine-Nonce"}), 400,
     "malformed"),
    (lambda b, h: (b, {**h, "X-Payengine-Timestamp": "12e3"}), 400, "malformed"),
    (lambda b, h: (b, {**h, "X-Payengine-Nonce": "short"}), 400, "malformed"),
])
def test_each_refusal_reason_has_the_status_of_the_errors_table(
        http: httpx.Client, engine: Engine, mutate, status: int, reason: str) -> None:
    body, headers = mutate(*signed(pay_body("x-1")))
    r = http.post("/v1/signed/pay", content=body, headers=headers)
    assert r.status_code == status, r.text
    assert err(r)["code"] == "request_rejected"
    assert err(r)["details"]["reason"] == reason
    assert engine.request_rejection_counts() == {reason: 1}


def test_a_stale_timestamp_is_401_and_the_window_edges_are_inside(http: httpx.Client) -> None:
    old = int(time.time() * 1000) - 300_000 - 5_000
    r = post(http, "pay", signed(pay_body("st-1"), ts=old))
    assert r.status_code == 401 and err(r)["details"]["reason"] == "stale_timestamp"
    nearly = int(time.time() * 1000) - 300_000 + 3_000
    assert post(http, "pay", signed(pay_body("st-2"), ts=nearly)).status_code == 200


def test_an_unknown_merchant_is_401(http: httpx.Client) -> None:
    r = post(http, "pay", signed(pay_body("u-1"), merchant="station-99"))
    assert r.status_code == 401 and err(r)["details"]["reason"] == "unknown_merchant"


def test_a_float_amount_or_unknown_field_in_a_signed_body_is_malformed_400(
        http: httpx.Client) -> None:
    body = pay_body("f-1")
    body["total_minor"] = 100.0
    r = post(http, "pay", signed(body))
    assert r.status_code == 400 and err(r)["details"]["reason"] == "malformed"
    body = dict(pay_body("f-2"), surprise=1)
    assert err(post(http, "pay", signed(body)))["details"]["reason"] == "malformed"
    r = post(http, "close", signed({"op": "query", "merchant_order_no": "f-2"}))
    assert r.status_code == 400 and err(r)["details"]["reason"] == "malformed"


def test_a_pay_for_a_closed_order_is_409_pay_window_over(http: httpx.Client) -> None:
    receipt = post(http, "pay", signed(pay_body("pw-1"))).json()
    assert http.post(f"/v1/orders/{receipt['order_id']}/close").status_code == 200
    r = post(http, "pay", signed(pay_body("pw-1")))
    assert r.status_code == 409 and err(r)["details"]["reason"] == "pay_window_over"


def test_a_frozen_user_is_403(http: httpx.Client, engine: Engine) -> None:
    engine.set_user_status("alice", "closed")
    r = post(http, "pay", signed(pay_body("fu-1")))
    assert r.status_code == 403 and err(r)["details"]["reason"] == "user_closed"
    r = http.post("/v1/orders", json=payment("fu-2", total=100))
    assert r.status_code == 403
    assert err(r)["code"] == "request_rejected"
    assert err(r)["details"]["reason"] == "user_closed"


def test_a_signed_refund_with_another_key_is_401_and_refunds_nothing(
        http: httpx.Client, engine: Engine) -> None:
    r = post(http, "refund", signed({"op": "refund", "merchant_order_no": "nope",
                                     "refund_no": "r1", "amount_minor": 1},
                                    secret="another-key-" + "x" * 30))
    assert r.status_code == 401


def test_an_engine_bound_is_503_overloaded_with_retry_after(tmp_path: Path) -> None:
    eng = Engine.open(tmp_path / "o.db", channels=[ScriptedChannel("wechat")],
                      policy=SLOW_POLICY,
                      config=EngineConfig(duplicate_guard_window_ms=0, live_orders_max=1))
    try:
        with InProcess(create_app(eng, config=ServiceConfig(shutdown_engine=False))) as s, \
                s.client() as http:
            assert http.post("/v1/orders", json=payment("o-1", total=100)).status_code == 200
            r = http.post("/v1/orders", json=payment("o-2", total=100))
            assert r.status_code == 503
            assert err(r)["code"] == "overloaded"
            assert int(r.headers["Retry-After"]) >= 1
            assert http.post("/v1/orders", json=payment("o-1", total=100)).status_code == 200
    finally:
        eng.shutdown()


def test_readyz_is_503_with_resuming_details_while_orders_resume(tmp_path: Path) -> None:
    policy = OrderPolicy(pay_window_ms=3_600_000, query_schedule_ms=(600_000,))
    config = EngineConfig(duplicate_guard_window_ms=0, actor_threads=1)
    eng = Engine.open(tmp_path / "r.db", channels=[ScriptedChannel("wechat")], policy=policy,
                      config=config)
    n = 0
    while n < 3000:
        try:
            eng.submit(PaymentRequest("m", f"o{n}", "u", "CNY", 100, "t",
                                      CashPart(100, "wechat")))
            n += 1
        except Overloaded:
            time.sleep(0.005)
    eng.shutdown()
    eng = Engine.open(tmp_path / "r.db", channels=[ScriptedChannel("wechat")], policy=policy,
                      config=config)
    app = create_app(eng, config=ServiceConfig(shutdown_engine=False))

    async def ask() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://t") as c:
            return await c.get("/readyz")

    try:
        r = asyncio.run(ask())
        assert r.status_code == 503
        assert err(r)["code"] == "not_ready"
        assert err(r)["details"]["resuming"] > 0
        assert err(r)["details"]["closing"] is False
        deadline = time.monotonic() + 60
        while eng.resuming() and time.monotonic() < deadline:
            time.sleep(0.1)
        r = asyncio.run(ask())
        assert r.status_code == 200 and r.json() == {"status": "ready"}
    finally:
        eng.shutdown()
