"""The HTTP service over real HTTP on loopback: uvicorn started on a free port, httpx as
the client, the simulated wallet as the channel."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from payengine import ChannelNotification, ChannelReply, MerchantSigner, NotificationKind
from payengine.actors.channel import SignedJsonNotifications
from payengine.actors.runtime import ThreadRuntime
from payengine.actors.service import ServiceConfig
from tests.service_support import payment, serving, state_digest, wait_settled, wallet


@pytest.fixture
def world() -> Iterator[ThreadRuntime]:
    runtime = ThreadRuntime()
    yield runtime
    runtime.shutdown()


def _accounts(client: object) -> None:
    import httpx

    assert isinstance(client, httpx.Client)
    assert client.post("/v1/accounts", json={"account_id": "alice/points", "unit": "POINTS",
                                             "minor_per_unit": 10}).status_code == 200
    assert client.post("/v1/accounts/fund", json={"account_id": "alice/points", "amount": 500,
                                                  "funding_id": "pts-1"}).status_code == 200
    assert client.post("/v1/accounts", json={"account_id": "alice/red-packet",
                                             "unit": "CNY"}).status_code == 200
    assert client.post("/v1/accounts/fund", json={"account_id": "alice/red-packet",
                                                  "amount": 100, "funding_id": "rp-1"}
                       ).status_code == 200


def test_a_combined_payment_succeeds_over_http_and_a_retry_gets_the_same_receipt(
        tmp_path: Path, world: ThreadRuntime) -> None:
    with serving(tmp_path / "pay.db", wallet(world)) as served, served.client() as client:
        _accounts(client)
        hold = client.post("/v1/holds", json={"account_id": "alice/points", "amount": 20,
                                              "hold_id": "tick-1", "ttl_ms": 60_000}).json()
        assert hold["status"] == "pending" and hold["amount"] == 20
        body = payment("pump3-000187", vouchers=[
            {"account_id": "alice/red-packet", "amount": 100},
            {"account_id": "alice/points", "amount": 20, "mode": "pre_held",
             "hold_id": "tick-1", "value": 10}])
        first = client.post("/v1/orders", json=body)
        assert first.status_code == 200, first.text
        again = client.post("/v1/orders", json=body)
        assert again.json() == first.json()
        receipt = first.json()
        assert receipt["total_minor"] == 100_00 and receipt["merchant_order_no"] == "pump3-000187"
        order = wait_settled(client, receipt["order_id"])
        assert order["state"] == "succeeded"
        assert [(leg["mode"], leg["status"]) for leg in order["legs"]] == [
            ("cash", "paid"), ("pre_deduct", "confirmed"), ("pre_held", "confirmed")]
        found = client.get("/v1/orders", params={"merchant_id": "station-42",
                                                 "merchant_order_no": "pump3-000187"})
        assert found.json()["order_id"] == receipt["order_id"]
        points = client.get("/v1/accounts", params={"account_id": "alice/points"}).json()
        assert (points["funded"], points["available"], points["held"], points["spent"]) == (
            500, 480, 0, 20)
        refund = client.post(f"/v1/orders/{receipt['order_id']}/refunds",
                             json={"refund_no": "r/1", "amount_minor": 50_00})
        assert refund.status_code == 200 and refund.json()["refund_no"] == "r/1"
        deadline = time.monotonic() + 20
        while (got := client.get(f"/v1/orders/{receipt['order_id']}/refunds/r/1").json()
               )["status"] == "refunding" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert got["status"] == "succeeded" and got["amount_minor"] == 50_00
        assert client.get("/v1/channels/health").json() == {"channels": {"wechat": "closed"}}


def test_typed_errors_come_back_with_their_code_status_and_one_body_shape(
        tmp_path: Path, world: ThreadRuntime) -> None:
    with serving(tmp_path / "pay.db", wallet(world)) as served, served.client() as client:
        _accounts(client)
        receipt = client.post("/v1/orders", json=payment("o-1")).json()
        wait_settled(client, receipt["order_id"])

        def error(response: object) -> tuple[int, str]:
            import httpx

            assert isinstance(response, httpx.Response)
            body = response.json()
            assert set(body) == {"error"} and set(body["error"]) == {"code", "message",
                                                                     "details"}
            return response.status_code, body["error"]["code"]

        assert error(client.get("/v1/orders/ord_nobody")) == (404, "unknown_order")
        assert error(client.get("/v1/accounts", params={"account_id": "bob/x"})) == (
            404, "unknown_account")
        changed = payment("o-1", total=99_00)
        assert error(client.post("/v1/orders", json=changed)) == (409, "idempotency_conflict")
        assert error(client.post(f"/v1/orders/{receipt['order_id']}/close")) == (
            409, "illegal_transition")
        zero = payment("o-2", total=0)
        assert error(client.post("/v1/orders", json=zero)) == (400, "invalid_amount")
        assert error(client.post("/v1/orders", json={**payment("o-3"), "currency": "XXX"})
                     ) == (400, "invalid_request")
        assert error(client.post("/v1/orders", json={**payment("o-4"), "total_minor": "100"})
                     ) == (422, "validation_error")
        assert error(client.post("/v1/orders/x/refunds", json={"refund_no": "r",
                                                               "amount_minor": 1.5})
                     ) == (422, "validation_error")
        too_much = client.post(f"/v1/orders/{receipt['order_id']}/refunds",
                               json={"refund_no": "r-1", "amount_minor": 200_00})
        assert error(too_much) == (409, "refund_refused")
        assert error(client.get("/v1/nowhere")) == (404, "not_found")
        assert error(client.delete("/v1/orders")) == (405, "method_not_allowed")
        duplicate = client.post("/v1/orders", json=payment("o-5"))
        assert error(duplicate) == (409, "duplicate_suspected")
        assert duplicate.json()["error"]["details"]["order_ids"] == [receipt["order_id"]]


def test_an_unexpected_failure_is_a_500_with_the_error_body_and_nothing_leaked(
        tmp_path: Path, world: ThreadRuntime, monkeypatch: pytest.MonkeyPatch) -> None:
    with serving(tmp_path / "pay.db", wallet(world)) as served, served.client() as client:
        def broken(order_id: str) -> None:
            raise RuntimeError("secret-internal-detail")

        monkeypatch.setattr(served.engine, "get_order", broken)
        response = client.get("/v1/orders/ord_1")
        assert response.status_code == 500
        assert response.json()["error"]["code"] == "internal_error"
        assert "secret-internal-detail" not in response.text
        assert "Traceback" not in response.text


def _quiet_digest(db: Path) -> str:
    """The state digest once the background work of the last request is done (two reads
    alike, 200 ms apart)."""
    deadline = time.monotonic() + 20
    last = state_digest(db)
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = state_digest(db)
        if now == last:
            return now
        last = now
    raise AssertionError("the state never settled")


def test_a_forged_wallet_notification_is_refused_and_nothing_moves(
        tmp_path: Path, world: ThreadRuntime) -> None:
    db = tmp_path / "pay.db"
    with serving(db, wallet(world, user_never_pays=1.0)) as served, \
            served.client() as client:
        receipt = client.post("/v1/orders", json=payment("o-1")).json()
        before = _quiet_digest(db)
        forged = SignedJsonNotifications(b"not-the-wallets-key-0123456789")
        body, headers = forged.sign(ChannelNotification(
            NotificationKind.PAYMENT, receipt["payment_serial"],
            ChannelReply("SUCCESS", "SUCCESS", "T-FORGED", 100_00, "CNY")))
        answer = client.post("/v1/notify/wechat", content=body, headers=headers)
        assert answer.status_code == 400
        assert answer.json() == {"return_code": "FAIL",
                                 "return_msg": "notification_rejected: bad_signature"}
        assert state_digest(db) == before
        order = client.get(f"/v1/orders/{receipt['order_id']}").json()
        assert order["state"] == "paying" and order["legs"][0]["status"] == "paying"
        assert served.engine.rejection_counts().get("bad_signature") == 1


def test_a_genuine_wallet_notification_is_acknowledged_in_the_wallets_format_once_committed(
        tmp_path: Path, world: ThreadRuntime) -> None:
    channel = wallet(world, user_never_pays=1.0)
    with serving(tmp_path / "pay.db", channel) as served, served.client() as client:
        receipt = client.post("/v1/orders", json=payment("o-1")).json()
        body, headers = channel.notifications.sign(ChannelNotification(
            NotificationKind.PAYMENT, receipt["payment_serial"],
            ChannelReply("SUCCESS", "SUCCESS", "T-1", 100_00, "CNY")))
        answer = client.post("/v1/notify/wechat", content=body, headers=headers)
        assert answer.status_code == 200
        assert answer.json() == {"return_code": "SUCCESS", "return_msg": "OK"}
        assert answer.headers["x-payengine-order-state"] in ("deducting", "succeeded")
        order = client.get(f"/v1/orders/{receipt['order_id']}").json()
        assert order["legs"][0]["status"] == "paid"  # committed before the answer
        assert client.post("/v1/notify/wechat", content=body, headers=headers
                           ).status_code == 200  # the wallet's retry: safe


def test_oversized_and_malformed_bodies_are_refused_and_leave_state_untouched(
        tmp_path: Path, world: ThreadRuntime) -> None:
    db = tmp_path / "pay.db"
    config = ServiceConfig(port=0, max_body_bytes=2_048)
    with serving(db, wallet(world), config) as served, served.client() as client:
        _accounts(client)
        receipt = client.post("/v1/orders", json=payment("o-1")).json()
        wait_settled(client, receipt["order_id"])
        before = state_digest(db)
        big = payment("o-2")
        big["title"] = "x" * 5_000
        too_large = client.post("/v1/orders", json=big)
        assert too_large.status_code == 413
        assert too_large.json()["error"] == {"code": "payload_too_large", "message":
                                             "the body is larger than 2048 bytes",
                                             "details": {"max_body_bytes": 2048}}

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it comes
            for _ in range(10):
                yield b" " * 1_000

        assert client.post("/v1/orders", content=chunks(),
                           headers={"content-type": "application/json"}).status_code == 413
        for raw in (b"{", b"[]", b'{"merchant_id": "m"', "\u00ff".encode("latin-1"),
                    json.dumps({**payment("o-3"), "colour": "red"}).encode()):
            answer = client.post("/v1/orders", content=raw,
                                 headers={"content-type": "application/json"})
            assert answer.status_code == 422, raw
            assert answer.json()["error"]["code"] == "validation_error"
        assert client.post("/v1/signed/pay", content=b"{").status_code == 400
        assert state_digest(db) == before


def test_a_burst_over_the_rate_bound_is_answered_429_with_retry_after(
        tmp_path: Path, world: ThreadRuntime) -> None:
    config = ServiceConfig(port=0, rate_per_s=1, rate_burst=5)
    with serving(tmp_path / "pay.db", wallet(world), config) as served, \
            served.client() as client:
        statuses = [client.get("/v1/channels/health").status_code for _ in range(12)]
        assert statuses[:5] == [200] * 5
        assert statuses.count(429) >= 6
        refused = client.get("/v1/channels/health")
        assert refused.status_code == 429
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["code"] == "rate_limited"
        assert client.get("/healthz").status_code == 200  # probes are never limited


def test_healthz_says_up_and_readyz_says_ready_once_the_engine_resumed(
        tmp_path: Path, world: ThreadRuntime) -> None:
    with serving(tmp_path / "pay.db", wallet(world)) as served, served.client() as client:
        assert client.get("/healthz").json() == {"status": "up"}
        deadline = time.monotonic() + 20
        while (ready := client.get("/readyz")).status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.json() == {"status": "ready"}
        assert client.get("/openapi.json").json()["info"]["title"] == "payengine"


def test_the_app_refuses_engine_calls_once_closing_and_shuts_the_engine_down(
        tmp_path: Path, world: ThreadRuntime) -> None:
    from payengine import EngineClosed

    with serving(tmp_path / "pay.db", wallet(world)) as served:
        service = served.app.state.service
    assert service.closing
    with pytest.raises(EngineClosed):
        served.engine.get_order("ord_1")


def test_a_restart_in_the_middle_keeps_the_order_and_it_settles(
        tmp_path: Path, world: ThreadRuntime) -> None:
    db = tmp_path / "pay.db"
    channel = wallet(world, user_pay_delay_ms=(1_500, 1_500))  # outlives both engines
    with serving(db, channel) as served, served.client() as client:
        receipt = client.post("/v1/orders", json=payment("o-1")).json()
        deadline = time.monotonic() + 20  # the pay is asked for once the actor ran (load)
        while client.get(f"/v1/orders/{receipt['order_id']}").json()["state"] != "paying":
            assert time.monotonic() < deadline, "the order never asked for its payment"
            time.sleep(0.02)
    with serving(db, channel) as served, served.client() as client:
        order = wait_settled(client, receipt["order_id"], timeout_s=30)
        assert order["state"] == "succeeded", order
        assert client.post("/v1/orders", json=payment("o-1")).json() == receipt


def test_signed_merchant_requests_are_verified_by_the_engine_and_a_replay_is_refused(
        tmp_path: Path, world: ThreadRuntime) -> None:
    from payengine import CashPart, PaymentRequest

    secret = "station-42-request-key-0123456789abcdef"
    with serving(tmp_path / "pay.db", wallet(world)) as served, served.client() as client:
        served.engine.register_merchant_key("station-42", secret=secret)
        signer = MerchantSigner("station-42", secret=secret)
        request = PaymentRequest("station-42", "s-1", "alice", "CNY", 50_00, "Fuel",
                                 cash=CashPart(50_00, "wechat"))
        body, headers = signer.pay(request)
        paid = client.post("/v1/signed/pay", content=body, headers=headers)
        assert paid.status_code == 200 and paid.json()["merchant_order_no"] == "s-1"
        replay = client.post("/v1/signed/pay", content=body, headers=headers)
        assert replay.status_code == 409
        assert replay.json()["error"]["details"] == {"reason": "replayed_nonce"}
        body, headers = signer.query("s-1")
        assert client.post("/v1/signed/query", content=body, headers=headers
                           ).json()["order_id"] == paid.json()["order_id"]
        body, headers = signer.query("s-1")
        forged = client.post("/v1/signed/query", content=body.replace(b"s-1", b"s-2"),
                             headers=headers)
        assert forged.status_code == 401
        assert forged.json()["error"]["details"] == {"reason": "bad_signature"}


def test_a_configured_api_token_is_asked_on_v1_but_not_of_signed_routes_or_probes(
        tmp_path: Path, world: ThreadRuntime, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAYENGINE_TEST_TOKEN", "t" * 32)
    config = ServiceConfig(port=0, api_token_env="PAYENGINE_TEST_TOKEN")
    with serving(tmp_path / "pay.db", wallet(world), config) as served, \
            served.client() as client:
        assert client.get("/v1/channels/health").status_code == 401
        assert client.get("/v1/channels/health", headers={"Authorization": "Bearer wrong"}
                          ).status_code == 401
        assert client.get("/v1/channels/health",
                          headers={"Authorization": "Bearer " + "t" * 32}).status_code == 200
        assert client.get("/healthz").status_code == 200
        assert client.post("/v1/signed/query", content=b"{}").status_code == 400


def test_a_quote_is_made_read_back_paid_and_booked_to_its_shift(
        tmp_path: Path, world: ThreadRuntime) -> None:
    with serving(tmp_path / "pay.db", wallet(world)) as served, served.client() as client:
        sale = {"station_id": "st-1", "pump": 3, "nozzle": 2, "shift_id": "2026-12-01/A",
                "line": {"grade": "95", "unit_price_minor": 789, "amount_minor": 200_00}}
        made = client.post("/v1/quotes", json={
            "merchant_id": "station-42", "user_id": "alice", "sale": sale,
            "benefits": {"coupons": [{"coupon_id": "fixed-10", "kind": "fixed",
                                      "value": 10_00, "threshold_minor": 150_00}]}})
        assert made.status_code == 200, made.text
        quote = made.json()
        assert client.get(f"/v1/quotes/{quote['quote_id']}").json() == quote
        best = quote["combinations"][0]
        assert best["discounts"] == [{"rule_id": "fixed-10", "kind": "coupon",
                                      "amount_minor": 10_00}]
        body = {**payment("q-1", total=best["total_minor"]),
                "quote": {"quote_id": quote["quote_id"],
                          "combination_id": best["combination_id"]}}
        receipt = client.post("/v1/orders", json=body)
        assert receipt.status_code == 200, receipt.text
        order = wait_settled(client, receipt.json()["order_id"])
        assert order["state"] == "succeeded"
        assert order["sale"]["quote_id"] == quote["quote_id"]
        report = client.get("/v1/shifts", params={"station_id": "st-1",
                                                  "shift_id": "2026-12-01/A"}).json()
        assert report["orders_by_state"] == {"succeeded": 1}
        assert report["totals"]["CNY"]["paid_minor"] == best["total_minor"]
        assert client.get("/v1/quotes/nope").json()["error"]["code"] == "unknown_quote"


def test_an_unpaid_order_is_changed_closed_and_verify_is_refused_when_not_asked(
        tmp_path: Path, world: ThreadRuntime) -> None:
    with serving(tmp_path / "pay.db", wallet(world, user_never_pays=1.0)) as served, \
            served.client() as client:
        first = client.post("/v1/orders", json=payment("c-1")).json()
        changed = client.post(f"/v1/orders/{first['order_id']}/change",
                              json=payment("c-2", total=90_00))
        assert changed.status_code == 200, changed.text
        assert changed.json()["merchant_order_no"] == "c-2"
        assert wait_settled(client, first["order_id"])["state"] == "closed"
        second = changed.json()["order_id"]
        verify = client.post(f"/v1/orders/{second}/verify", json={"code": "123456"})
        assert (verify.status_code, verify.json()["error"]["code"]) == (409,
                                                                        "illegal_transition")
        closed = client.post(f"/v1/orders/{second}/close")
        assert closed.status_code == 200 and closed.json()["order_id"] == second
        assert wait_settled(client, second)["state"] == "closed"
        hold = client.post("/v1/accounts", json={"account_id": "bob/p", "unit": "POINTS",
                                                 "minor_per_unit": 1})
        assert hold.status_code == 200
        client.post("/v1/accounts/fund", json={"account_id": "bob/p", "amount": 5,
                                               "funding_id": "b-1"})
        held = client.post("/v1/holds", json={"account_id": "bob/p", "amount": 5,
                                              "hold_id": "h/1"}).json()
        assert client.get("/v1/holds", params={"account_id": "bob/p", "hold_id": "h/1"}
                          ).json() == held
        released = client.post("/v1/holds/release", json={"account_id": "bob/p",
                                                          "hold_id": "h/1"}).json()
        assert released["status"] == "voided"
        frozen = client.post("/v1/accounts/status", json={"account_id": "bob/p",
                                                          "status": "frozen"}).json()
        assert frozen == {"account_id": "bob/p", "previous": "active", "status": "frozen"}
        refused = client.post("/v1/holds", json={"account_id": "bob/p", "amount": 1})
        assert (refused.status_code, refused.json()["error"]["code"]) == (409,
                                                                          "account_frozen")


def test_metrics_are_scraped_at_slash_metrics_and_count_the_payment_once(
        tmp_path: Path, world: ThreadRuntime) -> None:
    pytest.importorskip("prometheus_client")
    from prometheus_client.parser import text_string_to_metric_families

    with serving(tmp_path / "pay.db", wallet(world)) as served, served.client() as client:
        receipt = client.post("/v1/orders", json=payment("pump1-000001")).json()
        assert wait_settled(client, receipt["order_id"])["state"] == "succeeded"
        scraped = client.get("/metrics")
        assert scraped.status_code == 200
        assert scraped.headers["content-type"].startswith("text/plain")
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in text_string_to_metric_families(scraped.text)
                   for s in family.samples}
        assert samples[("payengine_payments_total",
                        (("channel", "wechat"), ("state", "succeeded")))] == 1.0
        assert samples[("payengine_up", ())] == 1.0


def test_the_operator_tools_answer_over_http_and_a_resolution_is_journalled(
        tmp_path: Path, world: ThreadRuntime) -> None:
    with serving(tmp_path / "pay.db", wallet(world)) as served, served.client() as client:
        receipt = client.post("/v1/orders", json=payment("pump1-000009")).json()
        assert wait_settled(client, receipt["order_id"])["state"] == "succeeded"
        page = client.get("/v1/operator/orders", params={"merchant_id": "station-42",
                                                        "state": "succeeded"}).json()
        assert [o["order_id"] for o in page["orders"]] == [receipt["order_id"]]
        assert page["next_after"] is None
        assert client.get("/v1/operator/attention").json() == {"items": [], "counts": {}}
        unknown = client.post("/v1/operator/resolve", json={
            "item": "needs_reconciliation:nobody", "action": "acknowledge",
            "operator": "ops-anna", "reason": "checked"})
        assert unknown.status_code == 404
        assert unknown.json()["error"]["code"] == "unknown_attention_item"
        bad = client.get("/v1/operator/orders", params={"limit": 501})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_request"
        assert client.get("/v1/operator/journal").json() == {"resolutions": []}


def test_a_pump_pre_authorisation_is_captured_short_over_http_and_a_second_capture_refused(
        tmp_path: Path, world: ThreadRuntime) -> None:
    with serving(tmp_path / "pay.db", wallet(world)) as served, served.client() as client:
        body = payment("pump2-000001") | {"authorise": True}
        order_id = client.post("/v1/orders", json=body).json()["order_id"]
        deadline = time.monotonic() + 20
        while (view := client.get(f"/v1/orders/{order_id}").json())["state"] != "authorised":
            assert time.monotonic() < deadline, view
            time.sleep(0.05)
        above = client.post(f"/v1/orders/{order_id}/capture",
                            json={"amount_minor": 100_01, "capture_id": "cap-1"})
        assert above.status_code == 409
        assert above.json()["error"]["code"] == "capture_above_authorised"
        taken = client.post(f"/v1/orders/{order_id}/capture",
                            json={"amount_minor": 61_50, "capture_id": "cap-1"})
        assert taken.status_code == 200, taken.text
        settled = wait_settled(client, order_id)
        assert (settled["state"], settled["authorised_minor"], settled["captured_minor"]) == (
            "succeeded", 100_00, 61_50)
        again = client.post(f"/v1/orders/{order_id}/capture",
                            json={"amount_minor": 10_00, "capture_id": "cap-2"})
        assert again.status_code == 409 and again.json()["error"]["code"] == "already_captured"
        void = client.post(f"/v1/orders/{order_id}/void")
        assert void.status_code == 409 and void.json()["error"]["code"] == "already_captured"


def test_a_provider_callback_for_a_provider_the_engine_lacks_is_refused_with_400(
        tmp_path: Path, world: ThreadRuntime) -> None:
    with serving(tmp_path / "pay.db", wallet(world)) as served, served.client() as client:
        refused = client.post("/v1/providers/carrier-x/callback", content=b'{"txn": "t"}')
        assert refused.status_code == 400
        assert refused.json()["error"]["code"] == "provider_callback_rejected"
