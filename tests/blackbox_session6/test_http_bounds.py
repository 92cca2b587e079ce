"""Bodies too large or of the wrong shape (README *Endpoints*, *Errors*, *Configuration*):
413 and 422 with the documented error body, refused before the engine, nothing created.
S1 bounds bodies at `service.max_body_bytes = 2048`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .support import error_of, payment, unique

LIMIT = 2048


def nothing_stored(client: Any, number: str) -> bool:
    found = client.get("/v1/orders", params={"merchant_id": "station-bb", "merchant_order_no": number})
    return found.status_code == 404 and error_of(found)["code"] == "unknown_order"


def test_a_body_above_max_body_bytes_is_413_payload_too_large_with_the_limit_in_details(client: Any) -> None:
    number = unique("big")
    body = payment(number, "wechat", 1_00, title="x" * 100)
    body["padding"] = "p" * (LIMIT + 10)
    response = client.post("/v1/orders", content=json.dumps(body).encode(),
                           headers={"content-type": "application/json"})
    assert response.status_code == 413
    error = error_of(response)
    assert (error["code"], error["details"]) == ("payload_too_large", {"max_body_bytes": LIMIT})
    assert nothing_stored(client, number)


def test_a_body_without_content_length_is_refused_413_once_it_grows_past_the_limit(client: Any) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"merchant_id":"'
        for _ in range(10):
            yield b"a" * 500
        yield b'"}'
    response = client.post("/v1/orders", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in response.request.headers
    assert response.status_code == 413
    assert error_of(response)["details"] == {"max_body_bytes": LIMIT}


def test_a_body_at_exactly_the_limit_is_read_and_judged_by_its_shape(client: Any) -> None:
    raw = json.dumps({"pad": ""}).encode()
    raw = json.dumps({"pad": "p" * (LIMIT - len(raw))}).encode()
    assert len(raw) == LIMIT
    response = client.post("/v1/orders", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert error_of(response)["code"] == "validation_error"


MALFORMED: list[tuple[str, Any]] = [
    ("string_for_integer", {"total_minor": "100"}),
    ("float_for_integer", {"total_minor": 100.0}),
    ("bool_for_integer", {"total_minor": True}),
    ("unknown_field", {"colour": "red"}),
    ("null_title", {"title": None}),
    ("cash_not_object", {"cash": "wechat"}),
    ("vouchers_not_list", {"vouchers": {"account_id": "a", "amount": 1}}),
]


@pytest.mark.parametrize("name, change", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_a_payment_of_the_wrong_shape_is_422_validation_error_and_creates_nothing(
        client: Any, name: str, change: dict[str, Any]) -> None:
    number = unique(name)
    body = {**payment(number, "wechat", 100), **change}
    response = client.post("/v1/orders", json=body)
    assert response.status_code == 422
    error = error_of(response)
    assert error["code"] == "validation_error"
    errors = error["details"]["errors"]
    assert 1 <= len(errors) <= 20
    assert all(set(e) == {"loc", "msg", "type"} for e in errors)
    assert nothing_stored(client, number)


def test_a_missing_field_is_422_and_names_it(client: Any) -> None:
    number = unique("missing")
    body = payment(number, "wechat", 100)
    del body["title"]
    response = client.post("/v1/orders", json=body)
    assert response.status_code == 422
    assert ["body", "title"] in [e["loc"] for e in error_of(response)["details"]["errors"]]
    assert nothing_stored(client, number)


@pytest.mark.parametrize("raw", [b"{not json", b'{"merchant_id": "\xff\xfe"}', b"[1, 2]", b"",
                                 b"null"], ids=["broken", "not_utf8", "array", "empty", "null"])
def test_a_body_that_is_not_a_utf8_json_object_is_422_validation_error(client: Any, raw: bytes) -> None:
    response = client.post("/v1/orders", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert error_of(response)["code"] == "validation_error"


def test_a_query_parameter_of_the_wrong_type_is_422(client: Any) -> None:
    response = client.get("/v1/operator/orders", params={"limit": "many"})
    assert (response.status_code, error_of(response)["code"]) == (422, "validation_error")


def test_the_engines_own_validation_is_a_400_typed_error_and_creates_nothing(client: Any) -> None:
    number = unique("adds-up")
    body = payment(number, "wechat", 100)
    body["cash"]["amount_minor"] = 99
    response = client.post("/v1/orders", json=body)
    assert response.status_code == 400
    assert error_of(response)["code"] in ("invalid_request", "invalid_amount")
    assert nothing_stored(client, number)
    unknown_channel = client.post("/v1/orders", json=payment(unique("ch"), "no-such-channel", 100))
    assert (unknown_channel.status_code, error_of(unknown_channel)["code"]) == (400, "invalid_request")
    bad_currency = client.post("/v1/orders", json={**payment(unique("cur"), "wechat", 100),
                                                   "currency": "XXX"})
    assert (bad_currency.status_code, error_of(bad_currency)["code"]) == (400, "invalid_request")


JSON_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10**18, 10**18),
                        st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20),
                        st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5),
                                                                               st.integers(), max_size=2))
FIELDS = ["merchant_id", "user_id", "currency", "total_minor", "title", "cash", "vouchers",
          "pay_window_ms", "attempt", "confirm_duplicate", "authorise", "sale", "quote"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(FIELDS), value=JSON_VALUES)
def test_every_refused_payment_leaves_nothing_behind(client: Any, field: str, value: Any) -> None:
    """Property: whatever one field is replaced by, a refused submit (4xx) creates no order,
    and no answer is a 5xx."""
    number = unique("prop")
    body = {**payment(number, "slow", 100), field: value}
    response = client.post("/v1/orders", json=body)
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error_of(response)
        assert nothing_stored(client, number)
    else:
        client.post(f"/v1/orders/{response.json()['order_id']}/close")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(amount=JSON_VALUES, funding=st.one_of(st.text(max_size=140), st.integers()))
def test_every_refused_top_up_leaves_the_account_as_it_was(client: Any, amount: Any, funding: Any) -> None:
    account = "prop/" + unique("acct")
    client.post("/v1/accounts", json={"account_id": account, "unit": "CNY"})
    response = client.post("/v1/accounts/fund", json={"account_id": account, "amount": amount,
                                                      "funding_id": funding})
    assert response.status_code < 500, response.text
    view = client.get("/v1/accounts", params={"account_id": account}).json()
    if response.status_code >= 400:
        error_of(response)
        assert (view["funded"], view["available"]) == (0, 0)
    else:
        assert view["funded"] == amount
