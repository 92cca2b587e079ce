"""Refusals of ``POST /v1/notify/{channel}`` made before the engine sees the notification
(429 rate bound, 413 body size, 503 closing, 405 wrong method) answer in the wallet's own
format with their status kept, over real HTTP on loopback; every other path keeps the
JSON error body."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from payengine import ChannelNotification, ChannelReply, NotificationKind
from payengine.actors.runtime import ThreadRuntime
from payengine.actors.service import ServiceConfig
from payengine.actors.service.notify import ACK_FORMATS, notify_channel, refusal
from tests.service_support import payment, serving, wallet

FORMATS = {"wechat": "wechat", "alipay": "alipay", "json": "json"}
"""Three names for the one simulated channel ``wechat``: each test picks its format."""
FAILED = {
    "wechat": lambda code: {"return_code": "FAIL", "return_msg": code},
    "json": lambda code: {"code": "FAIL", "message": code},
}


@pytest.fixture
def world() -> Iterator[ThreadRuntime]:
    runtime = ThreadRuntime()
    yield runtime
    runtime.shutdown()


def _assert_wallet_failure(answer: object, fmt: str, status: int, code: str) -> None:
    import httpx

    assert isinstance(answer, httpx.Response)
    assert answer.status_code == status
    if fmt == "alipay":
        assert answer.content == b"fail"
        assert answer.headers["content-type"].startswith("text/plain")
    else:
        assert answer.json() == FAILED[fmt](code)
        assert answer.headers["content-type"] == "application/json"


def _genuine(channel: object, serial: str) -> tuple[bytes, dict[str, str]]:
    body, headers = channel.notifications.sign(ChannelNotification(  # type: ignore[attr-defined]
        NotificationKind.PAYMENT, serial, ChannelReply("SUCCESS", "SUCCESS", "T-1", 100_00,
                                                       "CNY")))
    return body, headers


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_an_oversized_notification_is_refused_413_in_the_wallets_format_and_moves_nothing(
        tmp_path: Path, world: ThreadRuntime, fmt: str) -> None:
    db = tmp_path / "pay.db"
    channel = wallet(world, user_never_pays=1.0)
    config = ServiceConfig(port=0, max_body_bytes=1_024)
    with serving(db, channel, config, {"wechat": fmt}) as served, served.client() as client:
        receipt = client.post("/v1/orders", json=payment("o-1")).json()
        body, headers = _genuine(channel, receipt["payment_serial"])
        padded = json.dumps({**json.loads(body), "pad": "x" * 2_000}).encode()
        _assert_wallet_failure(client.post("/v1/notify/wechat", content=padded,
                                           headers=headers), fmt, 413, "payload_too_large")

        def chunks() -> Iterator[bytes]:  # no Content-Length: refused as it grows past
            for _ in range(4):
                yield b" " * 600

        _assert_wallet_failure(client.post("/v1/notify/wechat", content=chunks(),
                                           headers=headers), fmt, 413, "payload_too_large")
        assert served.engine.rejected_notifications() == []  # the engine never saw them
        order = client.get(f"/v1/orders/{receipt['order_id']}").json()
        assert order["legs"][0]["status"] in ("new", "paying")  # not paid: never fed
        ok = client.post("/v1/notify/wechat", content=body, headers=headers)
        assert ok.status_code == 200  # the wallet's retry within the bound is taken
        big = client.post("/v1/orders", json={**payment("o-2"), "title": "x" * 2_000})
        assert big.status_code == 413
        assert big.json()["error"]["code"] == "payload_too_large"  # other paths: JSON


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_a_rate_limited_notification_is_refused_429_in_the_wallets_format_with_retry_after(
        tmp_path: Path, world: ThreadRuntime, fmt: str) -> None:
    db = tmp_path / "pay.db"
    channel = wallet(world, user_never_pays=1.0)
    config = ServiceConfig(port=0, rate_per_s=1, rate_burst=3)
    with serving(db, channel, config, {"wechat": fmt}) as served, served.client() as client:
        receipt = client.post("/v1/orders", json=payment("o-1")).json()
        body, headers = _genuine(channel, receipt["payment_serial"])
        answers = [client.post("/v1/notify/wechat", content=body, headers=headers)
                   for _ in range(8)]  # the submit took 1 of the 3 tokens
        refused = [a for a in answers if a.status_code == 429]
        assert len(refused) >= 4  # 2 left in the burst, at most a few refilled meanwhile
        assert all(a.status_code in (200, 429) for a in answers)
        for answer in refused:
            _assert_wallet_failure(answer, fmt, 429, "rate_limited")
            assert int(answer.headers["retry-after"]) >= 1
        elsewhere = client.get("/v1/channels/health")
        assert elsewhere.status_code == 429
        assert elsewhere.json()["error"]["code"] == "rate_limited"  # other paths: JSON
        assert served.engine.rejection_counts() == {}


def test_a_notification_while_the_service_closes_is_a_503_in_the_wallets_format(
        tmp_path: Path, world: ThreadRuntime) -> None:
    channel = wallet(world, user_never_pays=1.0)
    with serving(tmp_path / "pay.db", channel) as served, served.client() as client:
        receipt = client.post("/v1/orders", json=payment("o-1")).json()
        body, headers = _genuine(channel, receipt["payment_serial"])
        served.app.state.service.closing = True
        answer = client.post("/v1/notify/wechat", content=body, headers=headers)
        _assert_wallet_failure(answer, "wechat", 503, "engine_closed")
        assert answer.headers["retry-after"] == "1"
        order = client.get(f"/v1/orders/{receipt['order_id']}")
        assert order.status_code == 503
        assert order.json()["error"]["code"] == "engine_closed"  # other paths: JSON


def test_a_wrong_method_on_a_notification_route_is_a_405_in_the_wallets_format(
        tmp_path: Path, world: ThreadRuntime) -> None:
    with serving(tmp_path / "pay.db", wallet(world), None, {"wechat": "alipay"}) as served, \
            served.client() as client:
        answer = client.get("/v1/notify/wechat")
        _assert_wallet_failure(answer, "alipay", 405, "method_not_allowed")
        assert client.get("/v1/notify").json()["error"]["code"] == "not_found"


@given(fmt=st.sampled_from(sorted(ACK_FORMATS)), status=st.sampled_from(
    [400, 401, 404, 405, 409, 413, 422, 429, 500, 503]),
    code=st.sampled_from(["rate_limited", "payload_too_large", "unauthorized",
                          "engine_closed", "internal_error"]))
def test_a_refusal_is_never_an_acknowledgement_and_keeps_its_status_and_headers(
        fmt: str, status: int, code: str) -> None:
    answer = refusal(ACK_FORMATS[fmt], status, code, {"Retry-After": "2"})
    assert not answer.acknowledged and answer.status == status and answer.code == code
    assert answer.headers == {"Retry-After": "2"}
    assert answer.body == ACK_FORMATS[fmt].fail(code)
    assert answer.body not in (ACK_FORMATS[fmt].ok(),)


@given(st.text(max_size=30))
def test_only_a_one_segment_notification_path_names_a_channel(rest: str) -> None:
    channel = notify_channel("/v1/notify/" + rest)
    assert channel == (rest if rest and "/" not in rest else None)
    assert notify_channel("/v1/orders/" + rest) is None
