"""Operator tools over HTTP (README *Operator tools*, *Endpoints*): the attention queue, a
resolution journalled with who and why, idempotent when repeated.

The attention item is made the way a wallet would: a signed success of another amount for
a waiting order (README *Notifications from the wallet*: "never a success", acknowledged,
the order `needs_reconciliation`, attention kind `amount_mismatch`).
"""

from __future__ import annotations

from typing import Any

import pytest

from .conftest import KEYS
from .support import error_of, payment, payment_notification, sign_notification, state_view, unique


@pytest.fixture()
def mismatched_order(client: Any) -> str:
    receipt = client.post("/v1/orders", json=payment(unique("mm"), "slow", 40_00)).json()
    state_view(client, receipt["order_id"], "paying")
    body, headers = sign_notification(KEYS["slow"], payment_notification(
        receipt["payment_serial"], 39_99, unique("TX")))
    answer = client.post("/v1/notify/slow", content=body, headers=headers)
    assert answer.status_code == 200
    view = state_view(client, receipt["order_id"], "needs_reconciliation")
    assert view["state"] == "needs_reconciliation"
    return str(receipt["order_id"])


def items(client: Any) -> dict[str, dict[str, Any]]:
    return {item["item_id"]: item for item in client.get("/v1/operator/attention").json()["items"]}


def test_an_order_with_another_amount_is_in_the_attention_queue_as_amount_mismatch(
        client: Any, mismatched_order: str) -> None:
    queue = client.get("/v1/operator/attention").json()
    listed = {item["item_id"]: item for item in queue["items"]}
    item = listed[f"amount_mismatch:{mismatched_order}"]
    assert (item["kind"], item["order_id"]) == ("amount_mismatch", mismatched_order)
    assert isinstance(item["why"], str) and item["why"]
    assert set(item) == {"item_id", "kind", "since_ms", "why", "occurrence", "order_id",
                         "refund_id", "event_id", "subscriber"}
    assert f"needs_reconciliation:{mismatched_order}" not in listed
    assert queue["counts"]["amount_mismatch"] == sum(
        1 for i in queue["items"] if i["kind"] == "amount_mismatch")


def test_retry_of_a_needs_reconciliation_item_is_409_action_not_applicable_and_changes_nothing(
        client: Any, mismatched_order: str) -> None:
    item_id = f"amount_mismatch:{mismatched_order}"
    refused = client.post("/v1/operator/resolve", json={"item": item_id, "action": "retry",
                                                        "operator": "ops-anna", "reason": "try"})
    assert (refused.status_code, error_of(refused)["code"]) == (409, "action_not_applicable")
    assert item_id in items(client)
    journal = client.get("/v1/operator/journal").json()["resolutions"]
    assert item_id not in [r["item_id"] for r in journal]


def test_acknowledging_an_item_journals_who_and_why_and_repeating_it_does_nothing_more(
        client: Any, mismatched_order: str) -> None:
    item_id = f"amount_mismatch:{mismatched_order}"
    done = client.post("/v1/operator/resolve", json={"item": item_id, "action": "acknowledge",
                                                     "operator": "ops-anna",
                                                     "reason": "called the wallet"})
    assert done.status_code == 200, done.text
    resolution = done.json()
    assert {k: resolution[k] for k in ("item_id", "kind", "action", "operator", "reason",
                                       "outcome", "repeated")} == {
        "item_id": item_id, "kind": "amount_mismatch", "action": "acknowledge",
        "operator": "ops-anna", "reason": "called the wallet", "outcome": "acknowledged",
        "repeated": False}
    assert item_id not in items(client)
    again = client.post("/v1/operator/resolve", json={"item": item_id, "action": "acknowledge",
                                                      "operator": "ops-bob", "reason": "again"})
    assert again.status_code == 200
    assert {**again.json(), "repeated": False} == resolution
    newest = client.get("/v1/operator/journal", params={"limit": 1}).json()["resolutions"]
    assert [(r["item_id"], r["operator"], r["reason"]) for r in newest] == [
        (item_id, "ops-anna", "called the wallet")]
    view = client.get(f"/v1/orders/{mismatched_order}").json()
    assert view["state"] == "needs_reconciliation"     # money is never moved from here


@pytest.mark.parametrize("field, value", [("reason", "x" * 501), ("reason", ""),
                                          ("operator", ""), ("action", "explode")])
def test_a_resolve_with_a_bad_operator_reason_or_action_is_400_invalid_request_and_journals_nothing(
        client: Any, mismatched_order: str, field: str, value: str) -> None:
    item_id = f"amount_mismatch:{mismatched_order}"
    body = {"item": item_id, "action": "acknowledge", "operator": "ops-anna", "reason": "ok"}
    refused = client.post("/v1/operator/resolve", json={**body, field: value})
    assert (refused.status_code, error_of(refused)["code"]) == (400, "invalid_request")
    assert item_id in items(client)
    journal = client.get("/v1/operator/journal").json()["resolutions"]
    assert item_id not in [r["item_id"] for r in journal]
