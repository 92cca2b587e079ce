"""The HTTP service's endpoints as README.md *HTTP service* documents them, over real HTTP
to a started `payengine serve` (S1, see conftest)."""

from __future__ import annotations

from typing import Any

from .support import error_of, payment, settled_view, state_view, unique

README_ENDPOINTS = {
    ("post", "/v1/quotes"), ("get", "/v1/quotes/{quote_id}"), ("post", "/v1/orders"),
    ("get", "/v1/orders"), ("get", "/v1/orders/{order_id}"),
    ("post", "/v1/orders/{order_id}/close"), ("post", "/v1/orders/{order_id}/verify"),
    ("post", "/v1/orders/{order_id}/change"), ("post", "/v1/orders/{order_id}/capture"),
    ("post", "/v1/orders/{order_id}/void"), ("post", "/v1/orders/{order_id}/refunds"),
    ("get", "/v1/orders/{order_id}/refunds/{refund_no}"), ("get", "/v1/shifts"),
    ("get", "/v1/operator/orders"), ("get", "/v1/operator/attention"),
    ("post", "/v1/operator/resolve"), ("get", "/v1/operator/journal"),
    ("post", "/v1/accounts"), ("get", "/v1/accounts"), ("post", "/v1/accounts/fund"),
    ("post", "/v1/accounts/status"), ("post", "/v1/holds"), ("get", "/v1/holds"),
    ("post", "/v1/holds/release"), ("get", "/v1/channels/health"),
    ("post", "/v1/signed/pay"), ("post", "/v1/signed/close"), ("post", "/v1/signed/refund"),
    ("post", "/v1/signed/query"), ("post", "/v1/providers/{provider}/callback"),
    ("post", "/v1/notify/{channel}"), ("get", "/healthz"), ("get", "/metrics"),
    ("get", "/readyz"),
}


def submit(client: Any, channel: str = "wechat", amount: int = 50_00, **extra: Any) -> dict[str, Any]:
    response = client.post("/v1/orders", json=payment(unique("o"), channel, amount, **extra))
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_healthz_says_up_and_readyz_says_ready(client: Any) -> None:
    assert client.get("/healthz").json() == {"status": "up"}
    ready = client.get("/readyz")
    assert (ready.status_code, ready.json()) == (200, {"status": "ready"})


def test_every_endpoint_the_readme_lists_is_in_the_openapi_document_and_docs_are_served(client: Any) -> None:
    document = client.get("/openapi.json").json()
    documented = {(method, path) for path, operations in document["paths"].items()
                  for method in operations}
    assert documented >= README_ENDPOINTS, README_ENDPOINTS - documented
    assert client.get("/docs").status_code == 200


def test_the_readme_curl_example_pays_the_order_and_the_merchant_order_number_finds_it(client: Any) -> None:
    account = unique("alice") + "/points"
    opened = client.post("/v1/accounts", json={"account_id": account, "unit": "POINTS",
                                               "minor_per_unit": 10})
    assert opened.status_code == 200
    assert opened.json()["account_id"] == account
    funded = client.post("/v1/accounts/fund", json={"account_id": account, "amount": 500,
                                                    "funding_id": unique("pts-welcome")})
    assert (funded.json()["funded"], funded.json()["available"]) == (500, 500)
    number = unique("pump3")
    body = {"merchant_id": "station-42", "merchant_order_no": number, "user_id": "alice",
            "currency": "CNY", "total_minor": 10000, "title": "Fuel, pump 3",
            "cash": {"amount_minor": 9800, "channel": "wechat"},
            "vouchers": [{"account_id": account, "amount": 20}]}
    receipt = client.post("/v1/orders", json=body).json()
    assert receipt["order_id"].startswith("ord_") and receipt["payment_serial"].startswith("P")
    assert (receipt["merchant_id"], receipt["total_minor"]) == ("station-42", 10000)
    view = settled_view(client, receipt["order_id"])
    found = client.get("/v1/orders", params={"merchant_id": "station-42",
                                             "merchant_order_no": number}).json()
    assert found["order_id"] == receipt["order_id"]
    assert (view["state"], view["settled"]) == ("succeeded", True)
    assert [(leg["mode"], leg["status"]) for leg in view["legs"]] == [
        ("cash", "paid"), ("pre_deduct", "confirmed")]
    points = client.get("/v1/accounts", params={"account_id": account}).json()
    assert (points["funded"], points["available"], points["held"], points["spent"]) == (500, 480, 0, 20)


def test_an_unknown_order_is_404_with_the_readmes_exact_error_body(client: Any) -> None:
    response = client.get("/v1/orders/ord_nobody")
    assert response.status_code == 404
    assert response.json() == {"error": {"code": "unknown_order",
                                         "message": "no payment order ord_nobody", "details": {}}}


def test_a_retried_submit_gets_the_same_receipt_and_other_parameters_are_409_idempotency_conflict(
        client: Any) -> None:
    body = payment(unique("retry"), "wechat", 12_00)
    first = client.post("/v1/orders", json=body)
    again = client.post("/v1/orders", json=body)
    assert first.json() == again.json()
    changed = client.post("/v1/orders", json={**body, "title": "Other"})
    assert changed.status_code == 409
    assert error_of(changed)["code"] == "idempotency_conflict"


def test_closing_a_paying_order_closes_it_and_closing_a_paid_order_is_409_illegal_transition(
        client: Any) -> None:
    waiting = submit(client, "slow")
    assert state_view(client, waiting["order_id"], "paying")["state"] == "paying"
    closed = client.post(f"/v1/orders/{waiting['order_id']}/close")
    assert closed.status_code == 200
    assert settled_view(client, waiting["order_id"])["state"] == "closed"
    paid = submit(client, "wechat")
    settled_view(client, paid["order_id"])
    refused = client.post(f"/v1/orders/{paid['order_id']}/close")
    assert refused.status_code == 409
    assert error_of(refused)["code"] == "illegal_transition"
    assert client.get(f"/v1/orders/{paid['order_id']}").json()["state"] == "succeeded"


def test_a_refund_is_answered_read_back_and_one_above_what_is_left_is_409_refund_refused(client: Any) -> None:
    paid = submit(client, "wechat", 30_00)
    settled_view(client, paid["order_id"])
    refund = client.post(f"/v1/orders/{paid['order_id']}/refunds",
                         json={"refund_no": "rf-1", "amount_minor": 10_00, "reason": "pump stopped"})
    assert refund.status_code == 200
    assert refund.json()["refund_no"] == "rf-1"
    view = settled_view(client, paid["order_id"])
    assert view["refunded_minor"] == 10_00
    read = client.get(f"/v1/orders/{paid['order_id']}/refunds/rf-1").json()
    assert (read["refund_no"], read["status"]) == ("rf-1", "succeeded")
    too_much = client.post(f"/v1/orders/{paid['order_id']}/refunds",
                           json={"refund_no": "rf-2", "amount_minor": 25_00})
    assert too_much.status_code == 409
    assert error_of(too_much)["code"] == "refund_refused"
    missing = client.get(f"/v1/orders/{paid['order_id']}/refunds/rf-nobody")
    assert missing.status_code == 404
    assert error_of(missing)["code"] == "unknown_refund"
    assert settled_view(client, paid["order_id"])["refunded_minor"] == 10_00


def test_a_quote_is_stored_read_back_and_a_submit_naming_it_is_charged_its_amounts(client: Any) -> None:
    user = unique("quoter")
    sale = {"station_id": "st-bb", "pump": 3, "nozzle": 2,
            "line": {"grade": "95", "unit_price_minor": 789, "amount_minor": 200_00}}
    made = client.post("/v1/quotes", json={"merchant_id": "station-bb", "user_id": user, "sale": sale})
    assert made.status_code == 200, made.text
    quote = made.json()
    assert client.get(f"/v1/quotes/{quote['quote_id']}").json() == quote
    best = quote["combinations"][0]
    assert best["gross_minor"] - best["discount_minor"] == best["total_minor"]
    body = payment(unique("quoted"), "wechat", best["total_minor"], user=user,
                   quote={"quote_id": quote["quote_id"], "combination_id": best["combination_id"]})
    receipt = client.post("/v1/orders", json=body)
    assert receipt.status_code == 200, receipt.text
    view = settled_view(client, receipt.json()["order_id"])
    assert (view["state"], view["total_minor"]) == ("succeeded", best["total_minor"])
    assert view["sale"]["quote_id"] == quote["quote_id"]
    unknown = client.get("/v1/quotes/q_nobody")
    assert (unknown.status_code, error_of(unknown)["code"]) == (404, "unknown_quote")


def test_a_pump_pre_authorisation_is_captured_short_and_a_capture_above_it_is_409(client: Any) -> None:
    receipt = submit(client, "wechat", 200_00, authorise=True)
    order_id = receipt["order_id"]
    assert state_view(client, order_id, "authorised")["state"] == "authorised"
    above = client.post(f"/v1/orders/{order_id}/capture",
                        json={"amount_minor": 300_00, "capture_id": "c-above"})
    assert (above.status_code, error_of(above)["code"]) == (409, "capture_above_authorised")
    captured = client.post(f"/v1/orders/{order_id}/capture",
                           json={"amount_minor": 123_45, "capture_id": "c-1"})
    assert captured.status_code == 200
    assert (captured.json()["captured_minor"], captured.json()["authorised_minor"]) == (123_45, 200_00)
    view = settled_view(client, order_id)
    assert (view["state"], view["total_minor"], view["capture_id"]) == ("succeeded", 123_45, "c-1")
    other = client.post(f"/v1/orders/{order_id}/capture",
                        json={"amount_minor": 100, "capture_id": "c-2"})
    assert (other.status_code, error_of(other)["code"]) == (409, "already_captured")
    void = client.post(f"/v1/orders/{order_id}/void")
    assert (void.status_code, error_of(void)["code"]) == (409, "already_captured")


def test_a_voided_pre_authorisation_closes_and_a_capture_after_it_is_409_authorisation_voided(
        client: Any) -> None:
    receipt = submit(client, "wechat", 80_00, authorise=True)
    order_id = receipt["order_id"]
    state_view(client, order_id, "authorised")
    assert client.post(f"/v1/orders/{order_id}/void").status_code == 200
    view = settled_view(client, order_id)
    assert view["state"] == "closed"
    late = client.post(f"/v1/orders/{order_id}/capture", json={"amount_minor": 100, "capture_id": "c"})
    assert (late.status_code, error_of(late)["code"]) == (409, "authorisation_voided")
    assert client.post(f"/v1/orders/{order_id}/void").status_code == 200   # idempotent


def test_verify_of_an_order_that_waits_for_no_code_is_409_illegal_transition(client: Any) -> None:
    paid = submit(client, "wechat")
    response = client.post(f"/v1/orders/{paid['order_id']}/verify", json={"code": "123456"})
    assert (response.status_code, error_of(response)["code"]) == (409, "illegal_transition")


def test_a_pre_hold_is_read_back_released_and_an_order_can_pay_with_a_pre_held_part(client: Any) -> None:
    account = unique("bob") + "/points"
    client.post("/v1/accounts", json={"account_id": account, "unit": "POINTS", "minor_per_unit": 10})
    client.post("/v1/accounts/fund", json={"account_id": account, "amount": 100, "funding_id": unique("f")})
    hold = client.post("/v1/holds", json={"account_id": account, "amount": 30, "hold_id": "h-1",
                                          "ttl_ms": 60_000})
    assert hold.status_code == 200, hold.text
    again = client.post("/v1/holds", json={"account_id": account, "amount": 30, "hold_id": "h-1",
                                           "ttl_ms": 60_000})
    assert again.json() == hold.json()
    assert client.get("/v1/holds", params={"account_id": account, "hold_id": "h-1"}).json() == hold.json()
    assert client.get("/v1/accounts", params={"account_id": account}).json()["held"] == 30
    released = client.post("/v1/holds/release", json={"account_id": account, "hold_id": "h-1"})
    assert released.status_code == 200
    assert client.get("/v1/accounts", params={"account_id": account}).json()["held"] == 0
    client.post("/v1/holds", json={"account_id": account, "amount": 20, "hold_id": "h-2"})
    body = payment(unique("preheld"), "wechat", 10_00, vouchers=[
        {"account_id": account, "amount": 20, "mode": "pre_held", "hold_id": "h-2"}])
    body["cash"]["amount_minor"] = 8_00
    view = settled_view(client, client.post("/v1/orders", json=body).json()["order_id"])
    assert view["state"] == "succeeded"
    after = client.get("/v1/accounts", params={"account_id": account}).json()
    assert (after["available"], after["held"], after["spent"]) == (80, 0, 20)


def test_a_frozen_account_takes_no_top_up_and_the_status_call_says_the_previous_status(client: Any) -> None:
    account = unique("carol") + "/rp"
    client.post("/v1/accounts", json={"account_id": account, "unit": "CNY"})
    status = client.post("/v1/accounts/status", json={"account_id": account, "status": "frozen"})
    assert status.json() == {"account_id": account, "previous": "active", "status": "frozen"}
    refused = client.post("/v1/accounts/fund", json={"account_id": account, "amount": 100,
                                                     "funding_id": unique("f")})
    assert (refused.status_code, error_of(refused)["code"]) == (409, "account_frozen")
    assert client.get("/v1/accounts", params={"account_id": account}).json()["funded"] == 0
    twice = client.post("/v1/accounts", json={"account_id": account, "unit": "POINTS",
                                              "minor_per_unit": 10})
    assert (twice.status_code, error_of(twice)["code"]) == (409, "account_exists")


def test_the_shift_report_counts_the_shifts_paid_orders_and_its_money_adds_up(client: Any) -> None:
    shift = unique("shift")
    sale = {"station_id": "st-shift", "pump": 1, "nozzle": 1, "shift_id": shift,
            "line": {"grade": "92", "unit_price_minor": 700, "volume_ml": 10_000}}
    for _ in range(2):
        receipt = client.post("/v1/orders", json=payment(unique("sh"), "wechat", 70_00, sale=sale))
        assert receipt.status_code == 200, receipt.text
        settled_view(client, receipt.json()["order_id"])
    report = client.get("/v1/shifts", params={"station_id": "st-shift", "shift_id": shift}).json()
    assert report["orders_by_state"] == {"succeeded": 2}
    assert report["litres_ml_by_grade"] == {"92": 20_000}
    totals = report["totals"]["CNY"]
    assert (totals["paid_orders"], totals["paid_minor"]) == (2, 140_00)
    assert sum(totals["collected_by_method"].values()) == (
        totals["merchant_net_minor"] + totals["fees_minor"] + totals["in_transit_minor"])
    empty = client.get("/v1/shifts", params={"station_id": "st-none", "shift_id": "none"}).json()
    assert (empty["orders_by_state"], empty["totals"]) == ({}, {})


def test_the_operator_order_search_filters_by_merchant_and_user_and_pages_with_a_cursor(client: Any) -> None:
    user = unique("pager")
    ids = [submit(client, "wechat", 5_00 + n, user=user)["order_id"] for n in range(3)]
    first = client.get("/v1/operator/orders", params={"user_id": user, "limit": 2}).json()
    assert [o["order_id"] for o in first["orders"]] == ids[:2]
    assert first["next_after"] is not None
    rest = client.get("/v1/operator/orders", params={"user_id": user, "limit": 2,
                                                     "after": first["next_after"]}).json()
    assert ([o["order_id"] for o in rest["orders"]], rest["next_after"]) == (ids[2:], None)
    summary = first["orders"][0]
    assert set(summary) == {"order_id", "merchant_id", "merchant_order_no", "user_id", "state",
                            "cause", "total_minor", "currency", "created_at_ms", "settled",
                            "station_id", "channel"}
    assert (summary["merchant_id"], summary["channel"]) == ("station-bb", "wechat")
    bad = client.get("/v1/operator/orders", params={"limit": 0})
    assert (bad.status_code, error_of(bad)["code"]) == (400, "invalid_request")


def test_the_operator_attention_and_journal_have_their_documented_shapes(client: Any) -> None:
    attention = client.get("/v1/operator/attention").json()
    assert set(attention) == {"items", "counts"}
    assert isinstance(attention["items"], list) and isinstance(attention["counts"], dict)
    assert set(client.get("/v1/operator/journal").json()) == {"resolutions"}
    unknown = client.post("/v1/operator/resolve", json={"item": "dead_letter:nobody:1",
                                                        "action": "acknowledge",
                                                        "operator": "ops-anna", "reason": "test"})
    assert (unknown.status_code, error_of(unknown)["code"]) == (404, "unknown_attention_item")


def test_channel_health_lists_every_configured_channel_closed(client: Any) -> None:
    assert client.get("/v1/channels/health").json() == {
        "channels": {"wechat": "closed", "slow": "closed", "ali": "closed"}}


def test_an_unknown_route_is_404_not_found_and_a_wrong_method_405_in_the_error_body(client: Any) -> None:
    missing = client.get("/v1/nothing-here")
    assert (missing.status_code, error_of(missing)["code"]) == (404, "not_found")
    wrong = client.delete("/v1/orders")
    assert (wrong.status_code, error_of(wrong)["code"]) == (405, "method_not_allowed")


def test_the_openapi_422_schema_describes_the_documented_error_body(client: Any) -> None:
    document = client.get("/openapi.json").json()
    operation = document["paths"]["/v1/orders"]["post"]
    schema = operation["responses"]["422"]["content"]["application/json"]["schema"]
    name = schema["$ref"].rsplit("/", 1)[-1]
    properties = document["components"]["schemas"][name].get("properties", {})
    assert "error" in properties
