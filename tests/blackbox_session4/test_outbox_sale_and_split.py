"""Black-box tests of the `sale` and `split` fields of outbox events (README "Notifications and
the outbox"), in-process and in a merchant notification's JSON."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from payengine import CashPart, PaymentRequest, PricedSale, VoucherPart
from tests.blackbox_session4.support import (
    open_station,
    pay,
    quote_request,
    readme_benefits,
    readme_sale,
)
from tests.helpers import wait_for

SHIFT = "2026-12-01/A"
SECRET = "a-merchant-secret-of-32-chars-xx"


@pytest.fixture
def station(tmp_path: Path):
    seen: list = []
    engine, clock, wechat = open_station(tmp_path / "o.db",
                                         subscribers={"settlement": seen.append})
    yield engine, clock, wechat, seen
    engine.shutdown()


def events_of(seen: list, order_id: str, event_type: str = "order.state_changed") -> list:
    return [e for e in list(seen) if e.order_id == order_id and e.event_type == event_type]


def test_order_events_carry_the_priced_sale_and_the_split(station) -> None:
    engine, _, _, seen = station
    quote = engine.quote("station-42", "alice", readme_sale(shift_id=SHIFT, cashier_id="cs-9"),
                         readme_benefits())
    receipt = engine.submit(quote_request(quote, quote.combinations[0]))
    pay(engine, receipt)
    wait_for(lambda: any(e.to_state == "succeeded" for e in events_of(seen, receipt.order_id)),
             what="the success event")
    events = events_of(seen, receipt.order_id)
    assert next(e.to_state for e in events) == "accepted"
    priced = engine.get_order(receipt.order_id).sale
    for event in events:
        assert isinstance(event.sale, PricedSale)
        assert event.sale == priced
        assert event.sale.quote_id == quote.quote_id
        assert event.sale.combination_id == "c1"
        assert tuple(event.split) == (("cash:wechat", 174_94), ("voucher:alice/points", 10_00))


def test_an_order_without_a_fuel_sale_has_no_sale_and_its_split(station) -> None:
    engine, _, _, seen = station
    engine.open_account("alice/red-packet", "CNY")
    engine.fund("alice/red-packet", 5_00, funding_id="rp")
    receipt = engine.submit(PaymentRequest(
        "station-42", "shop-1", "alice", "CNY", 50_00, "shop", CashPart(43_00, "wechat"),
        (VoucherPart("alice/red-packet", 2_00), VoucherPart("alice/points", 50))))
    wait_for(lambda: events_of(seen, receipt.order_id), what="the accepted event")
    event = events_of(seen, receipt.order_id)[0]
    assert event.sale is None
    assert tuple(event.split) == (("cash:wechat", 43_00), ("voucher:alice/red-packet", 2_00),
                                  ("voucher:alice/points", 5_00))


def test_refund_events_carry_the_sale_and_split_too(station) -> None:
    engine, _, _, seen = station
    quote = engine.quote("station-42", "alice", readme_sale(), readme_benefits())
    receipt = engine.submit(quote_request(quote, quote.combinations[0]))
    pay(engine, receipt)
    engine.refund(receipt.order_id, "refund-1", 50_00)
    wait_for(lambda: events_of(seen, receipt.order_id, "refund.state_changed"),
             what="the refund event")
    event = events_of(seen, receipt.order_id, "refund.state_changed")[0]
    assert event.sale == engine.get_order(receipt.order_id).sale
    assert tuple(event.split) == (("cash:wechat", 174_94), ("voucher:alice/points", 10_00))


def test_hold_events_have_an_empty_split(station) -> None:
    engine, clock, _, seen = station
    hold = engine.pre_hold("alice/points", 20, ttl_ms=1_000)
    clock.clock_ms += 2_000

    def expired():
        return [e for e in list(seen) if e.event_type == "hold.state_changed"
                and e.hold_id == hold.hold_id]
    event = wait_for(expired, timeout_s=20, what="the hold's expiry")[0]
    assert tuple(event.split) == ()
    assert event.sale is None


class Catcher(BaseHTTPRequestHandler):
    bodies: ClassVar[list[tuple[bytes, dict]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Catcher.bodies.append((body, dict(self.headers)))
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"SUCCESS")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def merchant_server():
    Catcher.bodies = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Catcher)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/notify"
    server.shutdown()
    server.server_close()


def test_a_merchant_notification_has_sale_as_an_object_and_split_as_pairs(
        station, merchant_server) -> None:
    engine, _, _, _ = station
    engine.notifications.register_merchant("station-42", merchant_server, SECRET,
                                           states=["succeeded"])
    sale = readme_sale(shift_id=SHIFT, cashier_id="cs-9", terminal_id="t-1")
    quote = engine.quote("station-42", "alice", sale, readme_benefits())
    receipt = engine.submit(quote_request(quote, quote.combinations[0]))
    pay(engine, receipt)
    wait_for(lambda: Catcher.bodies, timeout_s=20, what="the merchant's notification")
    body, headers = Catcher.bodies[0]
    signature = {k.lower(): v for k, v in headers.items()}["x-payengine-signature"]
    assert hmac.compare_digest(hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest(),
                               signature)
    sent = json.loads(body)
    assert sent["to_state"] == "succeeded"
    assert sent["sale"] == {
        "sale": {"station_id": "st-1", "pump": 3, "nozzle": 2, "grade": "95",
                 "unit_price_minor": 789, "volume_ml": 25_348, "gross_minor": 200_00,
                 "terminal_id": "t-1", "cashier_id": "cs-9", "shift_id": SHIFT},
        "quote_id": quote.quote_id, "combination_id": "c1",
        "discounts": [[d.rule_id, d.kind, d.amount_minor]
                      for d in quote.combinations[0].discounts]}
    assert sent["split"] == [["cash:wechat", 174_94], ["voucher:alice/points", 10_00]]


def test_a_merchant_notification_of_an_order_without_sale_has_null(
        station, merchant_server) -> None:
    engine, _, _, _ = station
    engine.notifications.register_merchant("station-42", merchant_server, SECRET,
                                           states=["succeeded"])
    receipt = engine.submit(PaymentRequest("station-42", "shop-1", "alice", "CNY", 50_00,
                                           "shop", CashPart(50_00, "wechat")))
    pay(engine, receipt)
    wait_for(lambda: Catcher.bodies, timeout_s=20, what="the merchant's notification")
    sent = json.loads(Catcher.bodies[0][0])
    assert sent["sale"] is None
    assert sent["split"] == [["cash:wechat", 50_00]]


def test_a_refund_notification_carries_the_sale_and_split_too(station, merchant_server) -> None:
    engine, _, _, _ = station
    engine.notifications.register_merchant("station-42", merchant_server, SECRET,
                                           states=["refund_refunding"])
    quote = engine.quote("station-42", "alice", readme_sale(), readme_benefits())
    receipt = engine.submit(quote_request(quote, quote.combinations[0]))
    pay(engine, receipt)
    engine.refund(receipt.order_id, "r-1", 20_00)
    wait_for(lambda: Catcher.bodies, timeout_s=20, what="the refund notification")
    sent = json.loads(Catcher.bodies[0][0])
    assert sent["event_type"] == "refund.state_changed"
    assert sent["refund_no"] == "r-1" and sent["amount"] == 20_00
    assert sent["sale"]["quote_id"] == quote.quote_id
    assert sent["sale"]["sale"]["volume_ml"] == 25_348
    assert sent["split"] == [["cash:wechat", 174_94], ["voucher:alice/points", 10_00]]
