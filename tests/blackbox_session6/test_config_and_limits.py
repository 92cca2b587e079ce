"""The service's TOML file (README *HTTP service / Configuration*) with every documented key,
the API token, and the per-address rate bound (README *Limits, threads and shutdown*):
a burst past `rate_burst` is 429 with `Retry-After`; probes are never limited."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .support import Server, error_of, payment, unique

TOKEN = "token-0123456789abcdef"
MERCHANT_42_SECRET = "station-42-secret-0123456789-0123456789"
MERCHANT_43_SECRET = "a-merchant-secret-of-enough-length-0123456789"
EVERY_KEY = '''
[service]
host = "127.0.0.1"
port = 8000
max_body_bytes = 4096
rate_per_s = 2
rate_burst = 5
rate_clients_max = 100
threads = 4
connections_max = 100
drain_timeout_ms = 2000
notify_drain_timeout_ms = 1000
api_token_env = "BB_API_TOKEN"

[engine]
db = "from-config.db"
synchronous = "NORMAL"
ask_timeout_s = 10
account_idle_ms = 30000
live_orders_max = 5000
actor_threads = 4
submits_in_flight_max = 16
admission_wait_ms = 2
actor_backlog_max = 256
writer_backlog_max = 24
pre_hold_ttl_ms = 900000
pre_hold_ttl_ms_max = 86400000
duplicate_guard_window_ms = 60000
quotes_max = 1000
fee_ppm = { wechat = 6000 }
currencies = { XTS = 2 }

[engine.merchant_requests]
timestamp_window_ms = 300000
nonces_max = 100000
nonce_prune_interval_ms = 60000
nonce_prune_batch_max = 1000

[engine.policy]
pay_window_ms = 600000
pay_window_ms_max = 3600000
hold_grace_ms = 600000
query_schedule_ms = [1000, 2000, 5000]
refund_query_schedule_ms = [1000, 2000, 5000]
voucher_retry_schedule_ms = [100, 200, 400]
voucher_sentinel_interval_ms = 300000
voucher_sentinel_attempts_max = 100
confirm_query_interval_ms = 1000
legs_max = 16
refunds_max = 50

[channels.wechat]
kind = "simulated"
wallet = "wechat"
merchant_no = "sim-0001"
credentials = { key = "bb-wechat-key-000001" }

[routing]
fallbacks_max = 1

[[routing.route]]
method = "qr"
channel = "wechat"

[risk]
hook_timeout_ms = 300
verification_window_ms = 300000
verify_attempts_max = 3

[risk.rules]
amount_max = { CNY = 500000 }
blocked_users = ["mallory"]
blocked_devices = ["dev-bad"]
blocked_payers = ["payer-bad"]
velocity_window_ms = 60000
user_orders_max = 100
device_orders_max = 100
velocity_action = "block"

[[merchants]]
id = "station-42"
secret_env = "BB_STATION_SECRET"

[[merchants]]
id = "station-43"
secret = "MERCHANT_43_SECRET"
'''


@pytest.fixture(scope="module")
def every_key_server(server_extra: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("every-key")
    (folder / "payengine.toml").write_text(EVERY_KEY.replace("MERCHANT_43_SECRET", MERCHANT_43_SECRET))
    env = {"BB_API_TOKEN": TOKEN, "BB_STATION_SECRET": MERCHANT_42_SECRET}
    server = Server(folder, config=folder / "payengine.toml", env=env).start()
    yield server
    server.stop()


@pytest.fixture()
def http(every_key_server: Server) -> Iterator[Any]:
    import httpx
    with httpx.Client(base_url=every_key_server.url, timeout=30) as client:
        yield client


def authorised() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


def wait_for_a_full_bucket() -> None:
    time.sleep(2.6)      # rate_per_s = 2, rate_burst = 5: the bucket refills in 2.5 s


def wait_for_two_tokens() -> None:
    time.sleep(1.0)


def test_a_file_with_every_documented_key_is_taken_and_its_engine_db_is_used(
        every_key_server: Server, http: Any) -> None:
    assert http.get("/readyz").json() == {"status": "ready"}
    assert (every_key_server.cwd / "from-config.db").exists()
    assert not (every_key_server.cwd / "payengine.db").exists()


def test_without_the_api_token_a_v1_call_is_401_unauthorized_and_probes_need_none(http: Any) -> None:
    refused = http.get("/v1/channels/health")
    assert (refused.status_code, error_of(refused)["code"]) == (401, "unauthorized")
    wrong = http.get("/v1/channels/health", headers={"Authorization": "Bearer wrong-token-000000"})
    assert (wrong.status_code, error_of(wrong)["code"]) == (401, "unauthorized")
    for probe in ("/healthz", "/readyz", "/metrics"):
        assert http.get(probe).status_code == 200, probe


def test_the_notify_and_signed_endpoints_ask_no_api_token(http: Any) -> None:
    notify = http.post("/v1/notify/wechat", content=b"{}", headers={"X-Signature": "00"})
    assert notify.status_code != 401
    assert notify.json() == {"return_code": "FAIL", "return_msg": notify.json()["return_msg"]}
    signed = http.post("/v1/signed/pay", content=b"{}")
    assert signed.status_code != 401


def test_the_file_s_risk_rules_block_a_blocked_user_with_403(http: Any) -> None:
    wait_for_two_tokens()
    response = http.post("/v1/orders", headers=authorised(),
                         json=payment(unique("risk"), "wechat", 1_00, user="mallory"))
    assert response.status_code == 403
    error = error_of(response)
    assert (error["code"], error["details"]) == ("risk_blocked", {"rule": "blocked_user"})


def test_a_body_past_this_files_max_body_bytes_is_413_with_its_limit(http: Any) -> None:
    wait_for_two_tokens()
    response = http.post("/v1/orders", headers={**authorised(), "content-type": "application/json"},
                         content=b'{"x": "' + b"y" * 5000 + b'"}')
    assert response.status_code == 413
    assert error_of(response)["details"] == {"max_body_bytes": 4096}


def test_the_environment_is_not_left_holding_the_token() -> None:
    assert os.environ.get("BB_API_TOKEN") is None
    assert Path.cwd().exists()


def signed(merchant: str, secret: str, fields: dict[str, Any], nonce: str | None = None,
           timestamp_ms: int | None = None) -> tuple[bytes, dict[str, str]]:
    """A merchant's signed request, built from README *Signed merchant requests* alone."""
    body = json.dumps(fields, separators=(",", ":")).encode()
    stamp = str(timestamp_ms if timestamp_ms is not None else int(time.time() * 1000))
    nonce = nonce or uuid.uuid4().hex
    message = f"payengine-request-v1\nHMAC-SHA256\n{merchant}\n{stamp}\n{nonce}\n".encode() + body
    return body, {"X-Payengine-Merchant-Id": merchant, "X-Payengine-Timestamp": stamp,
                  "X-Payengine-Nonce": nonce, "X-Payengine-Sign-Type": "HMAC-SHA256",
                  "X-Payengine-Signature": hmac.new(secret.encode(), message, hashlib.sha256).hexdigest(),
                  "Content-Type": "application/json"}


def test_a_signed_pay_of_a_merchant_in_the_file_is_taken_and_its_replay_and_forgeries_are_refused(
        http: Any) -> None:
    wait_for_a_full_bucket()
    number = unique("signed")
    pay = {"op": "pay", "merchant_order_no": number, "user_id": "alice", "currency": "CNY",
           "total_minor": 12_00, "title": "Fuel", "cash": {"amount_minor": 12_00, "channel": "wechat"}}
    body, headers = signed("station-43", MERCHANT_43_SECRET, pay)
    taken = http.post("/v1/signed/pay", content=body, headers=headers)
    assert taken.status_code == 200, taken.text
    assert (taken.json()["merchant_id"], taken.json()["merchant_order_no"]) == ("station-43", number)
    replay = http.post("/v1/signed/pay", content=body, headers=headers)
    assert (replay.status_code, error_of(replay)["code"]) == (409, "request_rejected")
    assert error_of(replay)["details"] == {"reason": "replayed_nonce"}
    body, headers = signed("station-43", MERCHANT_43_SECRET, {**pay, "merchant_order_no": unique("t")})
    tampered = http.post("/v1/signed/pay", content=body.replace(b"1200", b"1100"), headers=headers)
    assert (tampered.status_code, error_of(tampered)["details"]) == (401, {"reason": "bad_signature"})
    body, headers = signed("station-99", MERCHANT_43_SECRET, pay)
    unknown = http.post("/v1/signed/pay", content=body, headers=headers)
    assert (unknown.status_code, error_of(unknown)["details"]) == (401, {"reason": "unknown_merchant"})
    body, headers = signed("station-43", MERCHANT_43_SECRET, {"op": "query", "merchant_order_no": number})
    query = http.post("/v1/signed/query", content=body, headers=headers)
    assert (query.status_code, query.json()["order_id"]) == (200, taken.json()["order_id"])


def test_a_signed_pay_of_the_merchant_whose_secret_is_in_the_environment_is_taken_and_a_stale_one_refused(
        http: Any) -> None:
    wait_for_two_tokens()
    pay = {"op": "pay", "merchant_order_no": unique("env"), "user_id": "bob", "currency": "CNY",
           "total_minor": 7_00, "title": "Fuel", "cash": {"amount_minor": 7_00, "channel": "wechat"}}
    body, headers = signed("station-42", MERCHANT_42_SECRET, pay)
    assert http.post("/v1/signed/pay", content=body, headers=headers).status_code == 200
    body, headers = signed("station-42", MERCHANT_42_SECRET, {**pay, "merchant_order_no": unique("old")},
                           timestamp_ms=int(time.time() * 1000) - 3_600_000)
    stale = http.post("/v1/signed/pay", content=body, headers=headers)
    assert (stale.status_code, error_of(stale)["details"]) == (401, {"reason": "stale_timestamp"})


def test_a_burst_past_rate_burst_is_429_rate_limited_with_retry_after_and_probes_still_answer(
        http: Any) -> None:
    wait_for_a_full_bucket()
    answers = [http.get("/v1/channels/health", headers=authorised()) for _ in range(20)]
    statuses = [a.status_code for a in answers]
    assert statuses[:5] == [200] * 5
    limited = [a for a in answers if a.status_code == 429]
    assert len(limited) >= 5
    for answer in limited:
        error = error_of(answer)
        assert error["code"] == "rate_limited"
        assert int(answer.headers["Retry-After"]) >= 1
        assert error["details"]["retry_after_s"] == int(answer.headers["Retry-After"])
    for probe in ("/healthz", "/readyz", "/metrics"):
        assert http.get(probe).status_code == 200, probe
    wait_for_a_full_bucket()
    assert http.get("/v1/channels/health", headers=authorised()).status_code == 200
