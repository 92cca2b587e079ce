"""Wallet notifications posted to `POST /v1/notify/{channel}` (README *Wallet notifications*,
*Notifications from the wallet*): forged ones are refused in the wallet's own format and
move nothing; a genuine one is acknowledged only with the order's committed state.

The `slow` and `ali` channels' users never pay, so their orders wait in `paying` and only a
notification can move them. Notifications are signed as `SignedJsonNotifications` documents
(README *Plugging in a wallet*) with the keys of S1's configuration.
"""

from __future__ import annotations

from typing import Any

import pytest

from .conftest import KEYS
from .support import error_of, payment, payment_notification, sign_notification, state_view, unique


def waiting_order(client: Any, channel: str, amount: int = 40_00) -> dict[str, Any]:
    receipt = client.post("/v1/orders", json=payment(unique("n"), channel, amount)).json()
    view = state_view(client, receipt["order_id"], "paying")
    assert view["state"] == "paying"
    return dict(receipt)


def post(client: Any, channel: str, body: bytes, headers: dict[str, str]) -> Any:
    return client.post(f"/v1/notify/{channel}", content=body, headers=headers)


def order_of(client: Any, receipt: dict[str, Any]) -> dict[str, Any]:
    return dict(client.get(f"/v1/orders/{receipt['order_id']}").json())


def essentials(client: Any, receipt: dict[str, Any]) -> tuple[Any, ...]:
    """What a notification could move: the state, its cause, every leg's status and
    transaction id, the refunds (the wallet's `Prepay` may still arrive meanwhile)."""
    view = order_of(client, receipt)
    return (view["state"], view["cause"], view["settled"], view["refunded_minor"],
            [(leg["status"], leg["channel_txn_id"]) for leg in view["legs"]])


def test_a_notification_signed_with_another_key_is_refused_in_wechats_format_and_moves_nothing(
        client: Any) -> None:
    receipt = waiting_order(client, "slow")
    before = essentials(client, receipt)
    body, headers = sign_notification("not-the-wallets-key-0001",
                                      payment_notification(receipt["payment_serial"], 40_00, unique("TX")))
    answer = post(client, "slow", body, headers)
    assert answer.status_code == 400
    assert answer.json() == {"return_code": "FAIL",
                             "return_msg": "notification_rejected: bad_signature"}
    assert "x-payengine-order-state" not in answer.headers
    assert essentials(client, receipt) == before


def test_a_signed_notification_whose_body_was_changed_after_signing_is_refused_bad_signature(
        client: Any) -> None:
    receipt = waiting_order(client, "slow")
    before = essentials(client, receipt)
    body, headers = sign_notification(KEYS["slow"], payment_notification(
        receipt["payment_serial"], 40_00, unique("TX"), result_code="PAYERROR"))
    tampered = body.replace(b"PAYERROR", b"SUCCESS")
    answer = post(client, "slow", tampered, headers)
    assert (answer.status_code, answer.json()["return_code"]) == (400, "FAIL")
    assert answer.json()["return_msg"] == "notification_rejected: bad_signature"
    assert essentials(client, receipt) == before


def test_an_unsigned_notification_is_refused_and_moves_nothing(client: Any) -> None:
    receipt = waiting_order(client, "slow")
    before = essentials(client, receipt)
    body, _ = sign_notification(KEYS["slow"], payment_notification(
        receipt["payment_serial"], 40_00, unique("TX")))
    answer = post(client, "slow", body, {"Content-Type": "application/json"})
    assert answer.status_code == 400
    assert answer.json()["return_code"] == "FAIL"
    assert answer.json()["return_msg"].startswith("notification_rejected: ")
    assert essentials(client, receipt) == before


def test_a_signed_notification_for_a_serial_nobody_knows_is_404_in_wechats_format(client: Any) -> None:
    body, headers = sign_notification(KEYS["slow"], payment_notification("Pnobody0000", 40_00,
                                                                         unique("TX")))
    answer = post(client, "slow", body, headers)
    assert answer.status_code == 404
    assert answer.json()["return_code"] == "FAIL"
    assert answer.json()["return_msg"].startswith("unknown_order")


def test_a_notification_of_another_channels_order_is_refused_and_moves_nothing(client: Any) -> None:
    receipt = waiting_order(client, "ali")
    before = essentials(client, receipt)
    body, headers = sign_notification(KEYS["slow"], payment_notification(
        receipt["payment_serial"], 40_00, unique("TX")))
    answer = post(client, "slow", body, headers)
    assert answer.status_code == 400
    assert answer.json() == {"return_code": "FAIL", "return_msg": "notification_rejected: wrong_channel"}
    assert essentials(client, receipt) == before


def test_a_signed_notification_of_another_amount_is_acknowledged_pays_nothing_and_is_flagged(
        client: Any) -> None:
    receipt = waiting_order(client, "slow")
    body, headers = sign_notification(KEYS["slow"], payment_notification(
        receipt["payment_serial"], 1, unique("TX")))
    answer = post(client, "slow", body, headers)
    assert answer.status_code == 200
    assert answer.json() == {"return_code": "SUCCESS", "return_msg": "OK"}
    assert answer.headers["x-payengine-order-state"] == "needs_reconciliation"
    assert order_of(client, receipt)["state"] == "needs_reconciliation"
    queue = client.get("/v1/operator/attention").json()["items"]
    assert f"amount_mismatch:{receipt['order_id']}" in [item["item_id"] for item in queue]


def test_a_genuine_notification_is_acknowledged_with_the_committed_state_and_again_when_repeated(
        client: Any) -> None:
    receipt = waiting_order(client, "slow")
    body, headers = sign_notification(KEYS["slow"], payment_notification(
        receipt["payment_serial"], 40_00, unique("TX")))
    answer = post(client, "slow", body, headers)
    assert answer.status_code == 200
    assert answer.json() == {"return_code": "SUCCESS", "return_msg": "OK"}
    assert answer.headers["x-payengine-order-state"] == order_of(client, receipt)["state"]
    assert answer.headers["x-payengine-order-state"] in ("deducting", "succeeded")
    repeated = post(client, "slow", body, headers)
    assert repeated.status_code == 200
    assert repeated.headers["x-payengine-order-state"] == "succeeded"
    assert order_of(client, receipt)["state"] == "succeeded"


def test_an_alipay_channel_is_answered_in_alipays_plain_text_format(client: Any) -> None:
    receipt = waiting_order(client, "ali")
    forged, headers = sign_notification("not-the-wallets-key-0001", payment_notification(
        receipt["payment_serial"], 40_00, unique("TX")))
    refused = post(client, "ali", forged, headers)
    assert (refused.status_code, refused.text) == (400, "fail")
    assert order_of(client, receipt)["state"] == "paying"
    genuine, headers = sign_notification(KEYS["ali"], payment_notification(
        receipt["payment_serial"], 40_00, unique("TX")))
    accepted = post(client, "ali", genuine, headers)
    assert (accepted.status_code, accepted.text) == (200, "success")
    assert accepted.headers["x-payengine-order-state"] == "succeeded"


def test_a_notification_for_a_channel_the_service_does_not_have_is_refused_in_the_json_format(
        client: Any) -> None:
    body, headers = sign_notification(KEYS["slow"], payment_notification("Pnobody0001", 1_00, "TX"))
    answer = post(client, "no-such-channel", body, headers)
    assert answer.status_code == 400
    assert answer.json()["code"] == "FAIL"


def test_a_refused_notification_leaves_the_order_payable_by_the_genuine_one_after_it(client: Any) -> None:
    receipt = waiting_order(client, "slow")
    for key, amount in (("not-the-wallets-key-0001", 40_00), ("another-wrong-key-00001", 1)):
        body, headers = sign_notification(key, payment_notification(
            receipt["payment_serial"], amount, unique("TX")))
        assert post(client, "slow", body, headers).status_code == 400
    body, headers = sign_notification(KEYS["slow"], payment_notification(
        receipt["payment_serial"], 40_00, unique("TX")))
    assert post(client, "slow", body, headers).status_code == 200
    assert state_view(client, receipt["order_id"], "succeeded")["state"] == "succeeded"


def test_notification_refusals_never_use_the_json_error_body_of_the_api(client: Any) -> None:
    body, headers = sign_notification("not-the-wallets-key-0001",
                                      payment_notification("Pwhatever01", 1_00, "TX"))
    answer = post(client, "slow", body, headers)
    assert "error" not in answer.json()
    with pytest.raises(AssertionError):
        error_of(answer)
