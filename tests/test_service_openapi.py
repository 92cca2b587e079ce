"""``/openapi.json`` documents what the service really answers, so a client written from it
alone reads the answers right: every route's 200 names its view, every refusal of ``/v1``
the one error body (not FastAPI's ``{"detail": ...}``), a notification route the wallet's
format. Each answer of a session over real HTTP is validated against the documented schema
of its status."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
pytest.importorskip("jsonschema_rs")

import httpx
import jsonschema_rs

from payengine import ChannelNotification, ChannelReply, NotificationKind
from payengine.actors.runtime import ThreadRuntime
from tests.service_support import payment, serving, wallet


@pytest.fixture
def world() -> Iterator[ThreadRuntime]:
    runtime = ThreadRuntime()
    yield runtime
    runtime.shutdown()


class Documented:
    """An httpx client that checks every answer against ``/openapi.json``."""

    def __init__(self, client: httpx.Client) -> None:
        self.client = client
        self.spec: dict[str, Any] = client.get("/openapi.json").json()
        self.routes = sorted(
            ((re.compile("^" + re.sub(r"\{[^}]+\}", "[^/]+", path) + "$"), path)
             for path in self.spec["paths"]), key=lambda r: -len(r[1].replace("{", "")))
        self.checked: list[tuple[str, str, int]] = []

    def __call__(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        answer = self.client.request(method, url, **kwargs)
        path = url.split("?", 1)[0]
        template = next(t for pattern, t in self.routes if pattern.match(path))
        operation = self.spec["paths"][template][method.lower()]
        documented = operation["responses"].get(str(answer.status_code))
        assert documented is not None, (method, template, answer.status_code, answer.text)
        media = answer.headers["content-type"].split(";")[0]
        content = documented.get("content", {})
        assert media in content, (method, template, answer.status_code, media, content)
        schema = content[media].get("schema", {})
        value = json.loads(answer.content) if media == "application/json" else answer.text
        validator = jsonschema_rs.validator_for({**schema,
                                                 "components": self.spec["components"]})
        errors = [e.message for e in validator.iter_errors(value)]
        assert errors == [], (method, template, answer.status_code, errors[:3], value)
        self.checked.append((method, template, answer.status_code))
        return answer


def _settled(call: Documented, order_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    while not (view := call("GET", f"/v1/orders/{order_id}").json())["settled"]:
        assert time.monotonic() < deadline, view
        time.sleep(0.05)
    return view


def test_no_refusal_is_documented_as_fastapis_detail_body_and_every_v1_route_has_its_view(
        tmp_path: Path, world: ThreadRuntime) -> None:
    with serving(tmp_path / "pay.db", wallet(world)) as served, served.client() as client:
        spec = client.get("/openapi.json").json()
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            if not path.startswith("/v1/"):
                continue
            ok = responses["200"]["content"]
            assert ok and all(c.get("schema") for c in ok.values()), (method, path)
            for status in ("400", "404", "409", "413", "422", "429", "503"):
                body = responses[status]["content"]
                if path.startswith("/v1/notify/"):
                    assert set(body) == {"application/json", "text/plain"}
                else:
                    assert body["application/json"]["schema"] == {
                        "$ref": "#/components/schemas/ErrorOut"}, (method, path, status)


def test_every_answer_of_a_station_session_is_the_documented_shape_of_its_status(
        tmp_path: Path, world: ThreadRuntime) -> None:
    channel = wallet(world)
    with serving(tmp_path / "pay.db", channel) as served, served.client() as client:
        call = Documented(client)
        call("GET", "/healthz")
        call("GET", "/v1/channels/health")
        call("POST", "/v1/accounts", json={"account_id": "alice/points", "unit": "POINTS",
                                           "minor_per_unit": 10})
        call("POST", "/v1/accounts/fund", json={"account_id": "alice/points", "amount": 500,
                                                "funding_id": "pts-1"})
        call("GET", "/v1/accounts", params={"account_id": "alice/points"})
        call("POST", "/v1/accounts", json={"account_id": "alice/points", "unit": "POINTS",
                                           "minor_per_unit": 10})  # 409 account_exists
        call("POST", "/v1/holds", json={"account_id": "alice/points", "amount": 5,
                                        "hold_id": "h/1"})
        call("GET", "/v1/holds", params={"account_id": "alice/points", "hold_id": "h/1"})
        call("POST", "/v1/holds/release", json={"account_id": "alice/points",
                                                "hold_id": "h/1"})
        sale = {"station_id": "st-1", "pump": 3, "nozzle": 2, "shift_id": "A",
                "line": {"grade": "95", "unit_price_minor": 789, "amount_minor": 200_00}}
        quote = call("POST", "/v1/quotes", json={
            "merchant_id": "station-42", "user_id": "alice", "sale": sale,
            "benefits": {"points": {"account_id": "alice/points", "balance": 100,
                                    "minor_per_point": 10}}}).json()
        call("GET", f"/v1/quotes/{quote['quote_id']}")
        best = quote["combinations"][-1]
        receipt = call("POST", "/v1/orders", json={
            **payment("q-1", total=best["total_minor"]),
            "quote": {"quote_id": quote["quote_id"], "combination_id": best["combination_id"]},
        }).json()
        call("GET", "/v1/orders", params={"merchant_id": "station-42",
                                          "merchant_order_no": "q-1"})
        assert _settled(call, receipt["order_id"])["state"] == "succeeded"
        call("POST", f"/v1/orders/{receipt['order_id']}/refunds",
             json={"refund_no": "r/1", "amount_minor": 10_00})
        call("GET", f"/v1/orders/{receipt['order_id']}/refunds/r%2F1")  # as a client encodes it
        call("GET", f"/v1/orders/{receipt['order_id']}/refunds/nope")  # 404 unknown_refund
        call("GET", "/v1/shifts", params={"station_id": "st-1", "shift_id": "A"})
        call("POST", f"/v1/orders/{receipt['order_id']}/verify", json={"code": "123456"})
        call("POST", f"/v1/orders/{receipt['order_id']}/close")
        pre = call("POST", "/v1/orders", json=payment("p-1", user="bob") | {
            "authorise": True}).json()
        deadline = time.monotonic() + 20
        while call("GET", f"/v1/orders/{pre['order_id']}").json()["state"] != "authorised":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        call("POST", f"/v1/orders/{pre['order_id']}/capture",
             json={"amount_minor": 50_00, "capture_id": "c-1"})
        call("POST", f"/v1/orders/{pre['order_id']}/void")  # 409 already_captured
        call("GET", "/v1/operator/orders", params={"merchant_id": "station-42"})
        call("GET", "/v1/operator/attention")
        call("POST", "/v1/operator/resolve", json={"item": "needs_reconciliation:x",
                                                   "action": "acknowledge",
                                                   "operator": "ops", "reason": "checked"})
        call("GET", "/v1/operator/journal")
        call("POST", "/v1/accounts/status", json={"account_id": "alice/points",
                                                  "status": "frozen"})
        call("GET", "/v1/orders/ord_nobody")  # 404
        call("POST", "/v1/orders", json={"merchant_id": 1})  # 422
        call("POST", "/v1/providers/carrier-x/callback", content=b"{}")  # 400
        body, headers = channel.notifications.sign(ChannelNotification(
            NotificationKind.PAYMENT, receipt["payment_serial"],
            ChannelReply("SUCCESS", "SUCCESS", "T-X", 1, "CNY")))
        call("POST", "/v1/notify/wechat", content=body, headers=headers)  # refused: FAIL
        call("POST", "/v1/signed/pay", content=b"{")  # 400: no merchant signature
        call("GET", "/readyz")
    statuses = {status for _, _, status in call.checked}
    assert {200, 400, 404, 409, 422} <= statuses
    assert len({template for _, template, _ in call.checked}) >= 25
