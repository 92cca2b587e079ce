"""`create_app(engine)` served in process, driven over HTTP with httpx: every endpoint of the
README's table, its error body and statuses, and the wallet notifications."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from payengine import (
    ChannelReply,
    DiscountRules,
    Engine,
    EngineClosed,
    EngineConfig,
    LevelCut,
    MerchantSigner,
    UnknownOrder,
)
from payengine.actors.channel import (
    ChannelNotification,
    NotificationKind,
    SignedJsonNotifications,
)
from payengine.actors.service import ServiceConfig, create_app
from tests.helpers import (
    PAID,
    SLOW_POLICY,
    TEST_NOTIFICATIONS,
    ScriptedChannel,
    paid_reply,
    wait_for,
)

from .support import InProcess, payment, wait_until

SECRET = "station-42-request-key-0123456789abcdef"


@pytest.fixture
def channel() -> ScriptedChannel:
    return ScriptedChannel("wechat")


@pytest.fixture
def engine(tmp_path: Path, channel: ScriptedChannel) -> Iterator[Engine]:
    rules = DiscountRules(level_cuts=(LevelCut("gold", "gold", 10),))
    eng = Engine.open(tmp_path / "svc.db", channels=[channel], policy=SLOW_POLICY,
                      config=EngineConfig(duplicate_guard_window_ms=0, discounts=rules))
    yield eng
    with contextlib.suppress(Exception):
        eng.shutdown()


@pytest.fixture
def http(engine: Engine) -> Iterator[httpx.Client]:
    app = create_app(engine, config=ServiceConfig(shutdown_engine=False))
    with InProcess(app) as served, served.client() as client:
        yield client


def err(r: httpx.Response) -> dict[str, Any]:
    body = r.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message", "details"}, body
    return body["error"]


def notify(http: httpx.Client, channel: str, serial: str, reply: ChannelReply,
           signer: SignedJsonNotifications = TEST_NOTIFICATIONS,
           kind: NotificationKind = NotificationKind.PAYMENT, refund_id: str | None = None
           ) -> httpx.Response:
    body, headers = signer.sign(ChannelNotification(kind, serial, reply, refund_id))
    return http.post(f"/v1/notify/{channel}", content=body, headers=dict(headers))


def accounts(http: httpx.Client) -> None:
    assert http.post("/v1/accounts", json={"account_id": "alice/rp", "unit": "CNY"}
                     ).status_code == 200
    assert http.post("/v1/accounts/fund", json={"account_id": "alice/rp", "amount": 1000,
                                                "funding_id": "rp-1"}).status_code == 200
    assert http.post("/v1/accounts", json={"account_id": "alice/points", "unit": "POINTS",
                                           "minor_per_unit": 10}).status_code == 200
    assert http.post("/v1/accounts/fund", json={"account_id": "alice/points", "amount": 500,
                                                "funding_id": "pts-1"}).status_code == 200


def wait_paying(http: httpx.Client, order_id: str) -> None:
    """The wallet notifies only a pay it was sent: wait until the order is paying."""
    wait_until(lambda: http.get(f"/v1/orders/{order_id}").json()["state"] == "paying",
               what="order paying")


def paid_order(http: httpx.Client, no: str = "p-1", total: int = 100_00) -> dict[str, Any]:
    r = http.post("/v1/orders", json=payment(no, total=total))
    assert r.status_code == 200, r.text
    receipt = r.json()
    wait_paying(http, receipt["order_id"])
    r = notify(http, "wechat", receipt["payment_serial"], paid_reply(receipt["payment_serial"]))
    assert r.status_code == 200, r.text
    wait_until(lambda: http.get(f"/v1/orders/{receipt['order_id']}").json()["settled"])
    return receipt


# ---------------------------------------------------------------- payments and notifications

def test_a_combined_payment_pays_on_a_genuine_signed_notification(http: httpx.Client) -> None:
    accounts(http)
    body = payment("combo-1", total=100_00, cash=96_00, vouchers=[
        {"account_id": "alice/rp", "amount": 200},
        {"account_id": "alice/points", "amount": 20, "mode": "post_deduct"}])
    r = http.post("/v1/orders", json=body)
    assert r.status_code == 200, r.text
    receipt = r.json()
    assert http.post("/v1/orders", json=body).json() == receipt
    view = http.get(f"/v1/orders/{receipt['order_id']}").json()
    assert view["state"] in ("accepted", "paying")
    assert [leg["mode"] for leg in view["legs"]][1:] == ["pre_deduct", "post_deduct"]
    wait_paying(http, receipt["order_id"])
    r = notify(http, "wechat", receipt["payment_serial"], paid_reply(receipt["payment_serial"]))
    assert r.status_code == 200
    # the order's state at the acknowledgement: the post-deduct part is taken after it
    assert r.headers["X-Payengine-Order-State"] in ("deducting", "succeeded")
    view = wait_until(lambda: (v := http.get(f"/v1/orders/{receipt['order_id']}").json())
                      ["settled"] and v)
    assert view["state"] == "succeeded"
    assert view["total_minor"] == 100_00 and view["currency"] == "CNY"
    pts = http.get("/v1/accounts", params={"account_id": "alice/points"}).json()
    assert (pts["funded"], pts["available"], pts["held"], pts["spent"]) == (500, 480, 0, 20)


def test_the_same_order_number_with_another_amount_is_409_idempotency_conflict(
        http: httpx.Client) -> None:
    assert http.post("/v1/orders", json=payment("idem-1", total=500)).status_code == 200
    r = http.post("/v1/orders", json=payment("idem-1", total=600))
    assert r.status_code == 409
    assert err(r)["code"] == "idempotency_conflict"


def test_a_forged_notification_is_refused_in_json_format_and_nothing_moves(
        http: httpx.Client, engine: Engine) -> None:
    receipt = http.post("/v1/orders", json=payment("forge-1")).json()
    forger = SignedJsonNotifications(b"not-the-wallets-key-at-all")
    r = notify(http, "wechat", receipt["payment_serial"], paid_reply(receipt["payment_serial"]),
               signer=forger)
    assert r.status_code == 400
    assert r.json() == {"code": "FAIL", "message": "notification_rejected: bad_signature"}
    assert "X-Payengine-Order-State" not in r.headers
    view = http.get(f"/v1/orders/{receipt['order_id']}").json()
    assert view["state"] in ("accepted", "paying")
    assert all(leg["status"] != "paid" for leg in view["legs"])
    assert engine.rejection_counts().get("bad_signature") == 1
    assert engine.ledger_balances(receipt["order_id"]).get("CNY", {}).get(
        "merchant:station-42", 0) == 0


def test_a_channel_built_in_python_answers_json_whatever_its_name(http: httpx.Client) -> None:
    receipt = http.post("/v1/orders", json=payment("json-1")).json()
    serial = receipt["payment_serial"]
    r = notify(http, "wechat", serial, paid_reply(serial),
               signer=SignedJsonNotifications(b"forged-forged-forged"))
    assert r.json() == {"code": "FAIL", "message": "notification_rejected: bad_signature"}
    r = notify(http, "wechat", serial, paid_reply(serial))
    assert r.json() == {"code": "SUCCESS", "message": "OK"}


def test_a_notification_for_an_unknown_serial_is_404_and_refused(http: httpx.Client) -> None:
    r = notify(http, "wechat", "P-nobody", PAID)
    assert r.status_code == 404
    assert r.json()["code"] == "FAIL"
    assert r.json()["message"].startswith("unknown_order")


def test_a_notification_through_the_wrong_channel_name_is_refused(http: httpx.Client) -> None:
    receipt = http.post("/v1/orders", json=payment("wc-1")).json()
    r = notify(http, "nochannel", receipt["payment_serial"],
               paid_reply(receipt["payment_serial"]))
    assert r.status_code in (400, 404)
    assert r.json()["code"] == "FAIL"
    assert http.get(f"/v1/orders/{receipt['order_id']}").json()["state"] != "succeeded"


def test_notify_formats_answer_in_wechat_and_alipay_formats(engine: Engine) -> None:
    for fmt, ok, fail in (("wechat", {"return_code": "SUCCESS", "return_msg": "OK"},
                           "FAIL"), ("alipay", "success", "fail")):
        app = create_app(engine, config=ServiceConfig(shutdown_engine=False),
                         notify_formats={"wechat": fmt})
        with InProcess(app) as served, served.client() as http:
            receipt = http.post("/v1/orders", json=payment(f"fmt-{fmt}")).json()
            serial = receipt["payment_serial"]
            r = notify(http, "wechat", serial, paid_reply(serial),
                       signer=SignedJsonNotifications(b"forged-forged-forged"))
            assert r.status_code == 400
            if fmt == "wechat":
                assert r.json() == {"return_code": "FAIL",
                                    "return_msg": "notification_rejected: bad_signature"}
            else:
                assert r.text == fail
            r = notify(http, "wechat", serial, paid_reply(serial))
            assert r.status_code == 200
            assert (r.json() if fmt == "wechat" else r.text) == ok
            assert r.headers["X-Payengine-Order-State"] == "succeeded"


def test_a_second_charge_notification_is_409_unconfirmed_and_not_acknowledged(
        http: httpx.Client, channel: ScriptedChannel) -> None:
    receipt = paid_order(http, "dc-1")
    serial = receipt["payment_serial"]
    r = notify(http, "wechat", serial, ChannelReply("SUCCESS", "SUCCESS", "TX-OTHER", None))
    assert r.status_code == 409
    assert r.json() == {"code": "FAIL", "message": "notification_rejected: unconfirmed"}


# ---------------------------------------------------------------- close, refunds, verify

def test_close_of_a_paying_order_and_of_a_paid_one(http: httpx.Client) -> None:
    receipt = http.post("/v1/orders", json=payment("cl-1")).json()
    r = http.post(f"/v1/orders/{receipt['order_id']}/close")
    assert r.status_code == 200
    assert r.json()["state"] == "closed"
    paid = paid_order(http, "cl-2")
    r = http.post(f"/v1/orders/{paid['order_id']}/close")
    assert r.status_code == 409
    assert err(r)["code"] == "illegal_transition"


def test_refunds_are_made_read_back_and_bounded(http: httpx.Client) -> None:
    receipt = paid_order(http, "rf-1", total=100_00)
    oid = receipt["order_id"]
    r = http.post(f"/v1/orders/{oid}/refunds", json={"refund_no": "r1", "amount_minor": 50_00,
                                                     "reason": "pump stopped early"})
    assert r.status_code == 200, r.text
    refund = r.json()
    assert refund["refund_no"] == "r1" and refund["amount_minor"] == 50_00
    assert isinstance(refund["parts"], list)  # tuples are lists
    assert all(isinstance(p, list) for p in refund["parts"])
    r = http.get(f"/v1/orders/{oid}/refunds/r1")
    assert r.status_code == 200
    assert r.json()["refund_no"] == "r1"
    r = http.get(f"/v1/orders/{oid}/refunds/nope")
    assert r.status_code == 404
    assert err(r)["code"] == "unknown_refund"
    r = http.post(f"/v1/orders/{oid}/refunds", json={"refund_no": "r2", "amount_minor": 60_00})
    assert r.status_code == 409
    assert err(r)["code"] == "refund_refused"
    r = http.post(f"/v1/orders/{oid}/refunds", json={"refund_no": "r1", "amount_minor": 40_00})
    assert r.status_code == 409
    assert err(r)["code"] == "idempotency_conflict"
    r = http.post(f"/v1/orders/{oid}/refunds", json={"refund_no": "r3", "amount_minor": 0})
    assert r.status_code == 400
    assert err(r)["code"] == "invalid_amount"


def test_a_refund_of_an_unpaid_order_is_409_illegal_transition(http: httpx.Client) -> None:
    receipt = http.post("/v1/orders", json=payment("rf-unpaid")).json()
    r = http.post(f"/v1/orders/{receipt['order_id']}/refunds",
                  json={"refund_no": "r1", "amount_minor": 100})
    assert r.status_code == 409
    assert err(r)["code"] == "illegal_transition"


def test_verify_of_an_order_not_waiting_for_a_code_is_409(http: httpx.Client) -> None:
    receipt = http.post("/v1/orders", json=payment("vf-1")).json()
    r = http.post(f"/v1/orders/{receipt['order_id']}/verify", json={"code": "123456"})
    assert r.status_code == 409
    assert err(r)["code"] == "illegal_transition"
    r = http.post("/v1/orders/ord_nobody/verify", json={"code": "123456"})
    assert r.status_code == 404


def test_change_closes_the_previous_order_and_submits_the_new_one(http: httpx.Client) -> None:
    accounts(http)
    first = http.post("/v1/orders", json=payment(
        "ch-1", total=50_00, vouchers=[{"account_id": "alice/rp", "amount": 300}])).json()
    wait_until(lambda: http.get("/v1/accounts", params={"account_id": "alice/rp"}
                                ).json()["held"] == 300)
    new = payment("ch-2", total=60_00, vouchers=[{"account_id": "alice/rp", "amount": 300}])
    r = http.post(f"/v1/orders/{first['order_id']}/change", json=new)
    assert r.status_code == 200, r.text
    receipt = r.json()
    assert receipt["order_id"] != first["order_id"]
    assert http.post(f"/v1/orders/{first['order_id']}/change", json=new).json() == receipt
    assert http.get(f"/v1/orders/{first['order_id']}").json()["state"] == "closed"
    r = http.post(f"/v1/orders/{receipt['order_id']}/change",
                  json=payment("ch-3", total=60_00, user="bob"))
    assert r.status_code == 400
    assert err(r)["code"] == "invalid_request"


# ---------------------------------------------------------------- accounts and holds

def test_accounts_open_read_fund_and_status(http: httpx.Client) -> None:
    r = http.post("/v1/accounts", json={"account_id": "a/1", "unit": "CNY"})
    assert r.status_code == 200
    assert http.post("/v1/accounts", json={"account_id": "a/1", "unit": "CNY"}).json() \
        == r.json()
    r = http.post("/v1/accounts", json={"account_id": "a/1", "unit": "POINTS",
                                        "minor_per_unit": 10})
    assert r.status_code == 409 and err(r)["code"] == "account_exists"
    r = http.post("/v1/accounts/fund", json={"account_id": "a/1", "amount": 700,
                                             "funding_id": "f-1"})
    assert r.json()["funded"] == 700
    assert http.post("/v1/accounts/fund", json={"account_id": "a/1", "amount": 700,
                                                "funding_id": "f-1"}).json()["funded"] == 700
    r = http.post("/v1/accounts/fund", json={"account_id": "a/1", "amount": 701,
                                             "funding_id": "f-1"})
    assert r.status_code == 409 and err(r)["code"] == "idempotency_conflict"
    r = http.post("/v1/accounts/status", json={"account_id": "a/1", "status": "frozen"})
    assert r.json() == {"account_id": "a/1", "previous": "active", "status": "frozen"}
    r = http.post("/v1/accounts/fund", json={"account_id": "a/1", "amount": 1,
                                             "funding_id": "f-2"})
    assert r.status_code == 409 and err(r)["code"] == "account_frozen"
    r = http.get("/v1/accounts", params={"account_id": "nobody"})
    assert r.status_code == 404 and err(r)["code"] == "unknown_account"
    r = http.post("/v1/accounts", json={"account_id": "a/2", "unit": "XYZ"})
    assert r.status_code == 400 and err(r)["code"] == "invalid_request"


def test_holds_are_made_read_released_and_refused_after_release(http: httpx.Client) -> None:
    accounts(http)
    r = http.post("/v1/holds", json={"account_id": "alice/points", "amount": 20,
                                     "hold_id": "h-1", "ttl_ms": 60_000})
    assert r.status_code == 200, r.text
    hold = r.json()
    assert hold["hold_id"] == "h-1"
    assert http.post("/v1/holds", json={"account_id": "alice/points", "amount": 20,
                                        "hold_id": "h-1", "ttl_ms": 60_000}).json() == hold
    r = http.get("/v1/holds", params={"account_id": "alice/points", "hold_id": "h-1"})
    assert r.json() == hold
    r = http.post("/v1/holds/release", json={"account_id": "alice/points", "hold_id": "h-1"})
    assert r.status_code == 200
    r = http.post("/v1/holds", json={"account_id": "alice/points", "amount": 20,
                                     "hold_id": "h-1"})
    assert r.status_code == 409 and err(r)["code"] == "hold_refused"
    r = http.get("/v1/holds", params={"account_id": "alice/points", "hold_id": "h-none"})
    assert r.status_code == 404 and err(r)["code"] == "unknown_hold"
    r = http.post("/v1/holds", json={"account_id": "alice/points", "amount": 10_000})
    assert r.status_code == 409 and err(r)["code"] == "insufficient_balance"


def test_a_pre_held_part_pays_with_the_users_hold(http: httpx.Client) -> None:
    accounts(http)
    http.post("/v1/holds", json={"account_id": "alice/points", "amount": 20, "hold_id": "h-2"})
    body = payment("ph-1", total=100_00, cash=98_00, vouchers=[
        {"account_id": "alice/points", "amount": 20, "mode": "pre_held", "hold_id": "h-2"}])
    r = http.post("/v1/orders", json=body)
    assert r.status_code == 200, r.text
    serial = r.json()["payment_serial"]
    wait_paying(http, r.json()["order_id"])
    assert notify(http, "wechat", serial, paid_reply(serial)).status_code == 200
    wait_until(lambda: http.get("/v1/accounts", params={"account_id": "alice/points"}
                                ).json()["spent"] == 20)


# ---------------------------------------------------------------- quotes and shifts

SALE = {"station_id": "st-1", "pump": 3, "nozzle": 2, "shift_id": "2026-12-01/A",
        "line": {"grade": "95", "unit_price_minor": 789, "amount_minor": 200_00}}


def test_a_quote_prices_the_readme_sale_at_the_gold_cut(http: httpx.Client) -> None:
    accounts(http)
    r = http.post("/v1/quotes", json={
        "merchant_id": "station-42", "user_id": "alice", "sale": SALE,
        "benefits": {"level": "gold",
                     "coupons": [{"coupon_id": "fixed-10", "kind": "fixed", "value": 10_00,
                                  "threshold_minor": 150_00}],
                     "points": {"account_id": "alice/points", "balance": 100,
                                "minor_per_point": 10}}})
    assert r.status_code == 200, r.text
    quote = r.json()
    best = quote["combinations"][0]
    assert (best["total_minor"], best["points"], best["cash_minor"]) == (187_47, 100, 177_47)
    assert best["combination_id"] == "c1"
    assert quote["sale"]["line"]["volume_ml"] == 25_348
    assert http.get(f"/v1/quotes/{quote['quote_id']}").json() == quote
    r = http.get("/v1/quotes/q_nobody")
    assert r.status_code == 404 and err(r)["code"] == "unknown_quote"
    body = payment("q-1", total=best["total_minor"], cash=best["cash_minor"],
                   vouchers=[{"account_id": "alice/points", "amount": 100}],
                   quote={"quote_id": quote["quote_id"], "combination_id": "c1"})
    r = http.post("/v1/orders", json=body)
    assert r.status_code == 200, r.text
    serial = r.json()["payment_serial"]
    oid = r.json()["order_id"]
    wait_paying(http, oid)
    assert notify(http, "wechat", serial, paid_reply(serial)).status_code == 200
    view = wait_until(lambda: (v := http.get(f"/v1/orders/{oid}").json())["settled"] and v)
    assert view["sale"]["quote_id"] == quote["quote_id"]
    assert view["sale"]["sale"]["shift_id"] == "2026-12-01/A"
    body["merchant_order_no"] = "q-2"
    r = http.post("/v1/orders", json=body)
    assert r.status_code == 409 and err(r)["code"] == "quote_mismatch"
    r = http.get("/v1/shifts", params={"station_id": "st-1", "shift_id": "2026-12-01/A"})
    assert r.status_code == 200, r.text
    report = r.json()
    assert report["orders_by_state"] == {"succeeded": 1}
    cny = report["totals"]["CNY"]
    assert cny["paid_orders"] == 1 and cny["paid_minor"] == 187_47
    assert cny["gross_minor"] == 200_00
    assert cny["discount_minor"] == 200_00 - 187_47 - 0 or cny["discount_minor"] == 12_53
    assert report["litres_ml_by_grade"] == {"95": 25_348}
    assert sum(cny["collected_by_method"].values()) == (
        cny["merchant_net_minor"] + cny["fees_minor"] + cny["in_transit_minor"])
    assert cny["collected_by_method"] == {"cash:wechat": 177_47, "voucher:POINTS": 10_00}


def test_an_unknown_shift_is_an_empty_report(http: httpx.Client) -> None:
    r = http.get("/v1/shifts", params={"station_id": "st-x", "shift_id": "none"})
    assert r.status_code == 200
    assert r.json()["orders_by_state"] == {} and r.json()["totals"] == {}


def test_a_sale_by_volume_is_priced_half_up(http: httpx.Client) -> None:
    sale = dict(SALE, line={"grade": "95", "unit_price_minor": 789, "volume_ml": 1_500})
    r = http.post("/v1/quotes", json={"merchant_id": "station-42", "user_id": "alice",
                                      "sale": sale})
    assert r.status_code == 200, r.text
    assert r.json()["sale"]["line"]["gross_minor"] == 1184  # 11.835 -> 11.84


# ---------------------------------------------------------------- signed requests

def test_signed_pay_query_replay_and_bad_signature(http: httpx.Client, engine: Engine) -> None:
    engine.register_merchant_key("station-42", secret=SECRET)
    signer = MerchantSigner("station-42", secret=SECRET)
    from payengine import CashPart, PaymentRequest
    request = PaymentRequest("station-42", "sg-1", "alice", "CNY", 50_00, "Fuel",
                             cash=CashPart(50_00, "wechat"))
    body, headers = signer.pay(request)
    r = http.post("/v1/signed/pay", content=body, headers=dict(headers))
    assert r.status_code == 200, r.text
    receipt = r.json()
    r = http.post("/v1/signed/pay", content=body, headers=dict(headers))
    assert r.status_code == 409
    assert err(r)["code"] == "request_rejected"
    assert err(r)["details"]["reason"] == "replayed_nonce"
    body2, headers2 = signer.pay(request)
    assert http.post("/v1/signed/pay", content=body2, headers=dict(headers2)).json() == receipt
    body3, headers3 = signer.query("sg-1")
    r = http.post("/v1/signed/query", content=body3, headers=dict(headers3))
    assert r.status_code == 200 and r.json()["order_id"] == receipt["order_id"]
    forged = dict(headers2)
    sig_key = next(k for k in forged if k.lower() == "x-payengine-signature")
    forged[sig_key] = ("0" if forged[sig_key][0] != "0" else "1") + forged[sig_key][1:]
    body4, headers4 = signer.pay(request)
    headers4 = dict(headers4)
    headers4[sig_key] = forged[sig_key]
    r = http.post("/v1/signed/pay", content=body4, headers=headers4)
    assert r.status_code == 401
    assert err(r)["details"]["reason"] == "bad_signature"
    r = http.post("/v1/signed/pay", content=b"{}", headers={})
    assert r.status_code == 400
    assert err(r)["details"]["reason"] == "malformed"
    assert engine.request_rejection_counts() == {"replayed_nonce": 1, "bad_signature": 1,
                                                 "malformed": 1}


def test_signed_requests_of_a_frozen_merchant_are_403(http: httpx.Client, engine: Engine
                                                      ) -> None:
    engine.register_merchant_key("station-42", secret=SECRET)
    engine.set_merchant_status("station-42", "frozen")
    signer = MerchantSigner("station-42", secret=SECRET)
    from payengine import CashPart, PaymentRequest
    body, headers = signer.pay(PaymentRequest("station-42", "sg-2", "alice", "CNY", 100,
                                              "Fuel", cash=CashPart(100, "wechat")))
    r = http.post("/v1/signed/pay", content=body, headers=dict(headers))
    assert r.status_code == 403
    assert err(r)["details"]["reason"] == "merchant_frozen"
    other = MerchantSigner("station-99", secret=SECRET)
    body, headers = other.query("x")
    r = http.post("/v1/signed/query", content=body, headers=dict(headers))
    assert r.status_code == 401
    assert err(r)["details"]["reason"] == "unknown_merchant"


def test_a_signed_close_and_refund_go_through(http: httpx.Client, engine: Engine) -> None:
    engine.register_merchant_key("station-42", secret=SECRET)
    signer = MerchantSigner("station-42", secret=SECRET)
    paid_order(http, "sg-3", total=30_00)
    r = http.post("/v1/signed/refund", content=(x := signer.refund("sg-3", "sr-1", 10_00))[0],
                  headers=dict(x[1]))
    assert r.status_code == 200, r.text
    assert r.json()["amount_minor"] == 10_00
    http.post("/v1/orders", json=payment("sg-4", total=20_00))
    body, headers = signer.close("sg-4")
    r = http.post("/v1/signed/close", content=body, headers=dict(headers))
    assert r.status_code == 200 and r.json()["state"] == "closed"


# ---------------------------------------------------------------- strict bodies and errors

@pytest.mark.parametrize("change", [
    {"total_minor": "100"}, {"total_minor": 1.0}, {"total_minor": True},
    {"surprise": 1}, {"title": None, "_drop": "title"}, {"_drop": "currency"},
])
def test_a_body_not_of_the_documented_shape_is_422_and_creates_nothing(
        http: httpx.Client, engine: Engine, change: dict[str, Any]) -> None:
    body = payment("strict-1", total=100)
    change = dict(change)
    drop = change.pop("_drop", None)
    body.update(change)
    if drop:
        body.pop(drop)
    r = http.post("/v1/orders", json=body)
    assert r.status_code == 422, r.text
    e = err(r)
    assert e["code"] == "validation_error"
    assert 1 <= len(e["details"]["errors"]) <= 20
    with pytest.raises(UnknownOrder):
        engine.find_order("station-42", "strict-1")


def test_a_float_amount_in_a_nested_part_is_422(http: httpx.Client) -> None:
    body = payment("strict-2", total=100)
    body["cash"]["amount_minor"] = 100.0
    assert http.post("/v1/orders", json=body).status_code == 422


def test_a_bad_query_parameter_is_422(http: httpx.Client) -> None:
    r = http.get("/v1/orders", params={"merchant_id": "m", "merchant_order_no": "x",
                                       "attempt": "one"})
    assert r.status_code == 422
    assert err(r)["code"] == "validation_error"


def test_engine_validation_errors_keep_their_typed_codes(http: httpx.Client) -> None:
    r = http.post("/v1/orders", json=payment("v-1", total=0))
    assert r.status_code == 400 and err(r)["code"] == "invalid_amount"
    r = http.post("/v1/orders", json=dict(payment("v-2", total=100), currency="XTS"))
    assert r.status_code == 400 and err(r)["code"] == "invalid_request"
    r = http.post("/v1/orders", json=payment("v-3", total=100, cash=90))
    assert r.status_code == 400 and err(r)["code"] == "invalid_request"
    r = http.post("/v1/orders", json=payment("v-4", total=100, channel="nochannel"))
    assert r.status_code == 400
    r = http.post("/v1/orders", json=payment("v-5", total=100, vouchers=[
        {"account_id": "nobody/rp", "amount": 100}]))
    assert r.status_code == 404 and err(r)["code"] == "unknown_account"
    r = http.get("/v1/orders", params={"merchant_id": "m", "merchant_order_no": "none"})
    assert r.status_code == 404 and err(r)["code"] == "unknown_order"


def test_at_most_64_vouchers_in_a_payment(http: httpx.Client) -> None:
    vouchers = [{"account_id": f"x/{i}", "amount": 1} for i in range(65)]
    r = http.post("/v1/orders", json=payment("many", total=65, vouchers=vouchers))
    assert r.status_code == 422


def test_find_order_by_attempt(http: httpx.Client) -> None:
    receipt = http.post("/v1/orders", json=payment("att-1", total=100)).json()
    r = http.get("/v1/orders", params={"merchant_id": "station-42",
                                       "merchant_order_no": "att-1", "attempt": 1})
    assert r.json()["order_id"] == receipt["order_id"]
    r = http.get("/v1/orders", params={"merchant_id": "station-42",
                                       "merchant_order_no": "att-1", "attempt": 2})
    assert r.status_code == 404


def test_channels_health_lists_the_breaker_states(http: httpx.Client) -> None:
    assert http.get("/v1/channels/health").json() == {"channels": {"wechat": "closed"}}


# ---------------------------------------------------------------- lifecycle

def test_the_app_shuts_the_engine_down_when_it_stops(engine: Engine) -> None:
    app = create_app(engine)
    with InProcess(app) as served, served.client() as http:
        assert http.get("/readyz").json() == {"status": "ready"}
    with pytest.raises(EngineClosed):
        engine.open_account("late/1", "CNY")


def test_shutdown_engine_false_leaves_the_engine_open(engine: Engine) -> None:
    app = create_app(engine, config=ServiceConfig(shutdown_engine=False))
    with InProcess(app) as served, served.client() as http:
        assert http.get("/healthz").json() == {"status": "up"}
    assert engine.open_account("late/2", "CNY").account_id == "late/2"


def test_a_closed_engine_is_503_engine_closed_with_retry_after_1(engine: Engine) -> None:
    app = create_app(engine, config=ServiceConfig(shutdown_engine=False))
    with InProcess(app) as served, served.client() as http:
        engine.shutdown()
        r = http.post("/v1/accounts", json={"account_id": "z/1", "unit": "CNY"})
        assert r.status_code == 503
        assert err(r)["code"] == "engine_closed"
        assert r.headers["Retry-After"] == "1"


def test_readyz_is_503_not_ready_once_the_engine_is_closed(engine: Engine) -> None:
    app = create_app(engine, config=ServiceConfig(shutdown_engine=False))
    with InProcess(app) as served, served.client() as http:
        assert http.get("/readyz").status_code == 200
        engine.shutdown()
        r = http.get("/readyz")
        assert r.status_code == 503
        assert err(r)["code"] == "not_ready"


def test_metrics_are_served_with_a_given_engine_metrics(engine: Engine) -> None:
    from payengine.metrics import EngineMetrics

    metrics = EngineMetrics(engine)
    app = create_app(engine, config=ServiceConfig(shutdown_engine=False), metrics=metrics)
    with InProcess(app) as served, served.client() as http:
        paid_order(http, "m-1", total=100)
        wait_for(lambda: metrics.snapshot().get(
            'payengine_payments_total{channel="wechat",state="succeeded"}') == 1.0)
        r = http.get("/metrics")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/plain")
        assert 'payengine_payments_total{channel="wechat",state="succeeded"} 1.0' in r.text
        assert "payengine_up 1.0" in r.text


def test_metrics_served_by_an_app_made_metrics(http: httpx.Client) -> None:
    r = http.get("/metrics")
    assert r.status_code == 200
    assert "payengine_up 1.0" in r.text
    assert "# TYPE payengine_payments_total counter" in r.text
