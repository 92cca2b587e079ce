"""Falling back: a refusal learnt by query, details carried to the next route, a window
ending mid-fallback with vouchers held."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from payengine import (
    CashPart,
    ChannelReply,
    OrderPolicy,
    PayDetails,
    PaymentRequest,
    PayScenario,
    Route,
    RoutingTable,
    VoucherPart,
)
from tests.blackbox_session4b.support import Wallet, open_with, paid
from tests.helpers import wait_for

BANK_DOWN = ChannelReply("SUCCESS", "BANK_DOWN")
NOT_FOUND = ChannelReply("SUCCESS", "ORDERNOTEXIST")
CLOSED = ChannelReply("SUCCESS", "CLOSED")
WAITING = ChannelReply("SUCCESS", "USERPAYING")
FAST = OrderPolicy(pay_window_ms=10_000, query_schedule_ms=(50, 100, 200),
                   refund_query_schedule_ms=(100, 200))
ROUTES = RoutingTable((Route("qr", "a"), Route("qr", "b", priority=1)))


def pays(serial: str, amount: int, details: Any) -> ChannelReply:
    return paid(serial, amount)


def test_a_retryable_refusal_answered_by_a_query_falls_back(tmp_path: Path) -> None:
    answers = [BANK_DOWN]

    def query(serial: str) -> ChannelReply:
        return answers.pop(0) if answers else NOT_FOUND

    a = Wallet("a", pay=WAITING, query=query, close=CLOSED)
    b = Wallet("b", pay=pays)
    eng = open_with(tmp_path / "x.db", [a, b], policy=FAST, routing=ROUTES)
    try:
        r = eng.submit(PaymentRequest("s-1", "n-1", "alice", "CNY", 50_00, "Fuel",
                                      cash=CashPart(50_00, "qr")))
        view = wait_for(lambda: (o := eng.get_order(r.order_id)).settled and o)
        assert (view.state, view.legs[0].channel) == ("succeeded", "b")
        first = view.legs[0].channels_tried[0]
        assert (first.channel, first.outcome, first.code) == ("a", "unpaid", "BANK_DOWN")
        assert any("fallback query" in (e.cause or "") or "query" in (e.cause or "")
                   for e in eng.journal(r.order_id) if e.part == "route")
    finally:
        eng.shutdown()


def test_the_next_route_gets_the_same_pay_details(tmp_path: Path) -> None:
    a = Wallet("a", pay=BANK_DOWN, query=NOT_FOUND, close=CLOSED)
    b = Wallet("b", pay=pays)
    eng = open_with(tmp_path / "x.db", [a, b], policy=FAST, routing=ROUTES)
    try:
        details = PayDetails(PayScenario.BARCODE, auth_code="134670070457647112",
                             device_id="pump-3")
        r = eng.submit(PaymentRequest("s-1", "n-1", "alice", "CNY", 50_00, "Fuel",
                                      cash=CashPart(50_00, "qr", details)))
        wait_for(lambda: eng.get_order(r.order_id).settled)
        sent_a = a.calls_of("pay")[0][3]
        sent_b = b.calls_of("pay")[0][3]
        assert sent_a == details
        assert sent_b.scenario == PayScenario.BARCODE
        assert sent_b.device_id == "pump-3"
        assert sent_b.auth_code == "134670070457647112"
    finally:
        eng.shutdown()


def test_a_window_ending_mid_fallback_closes_the_order_and_releases_its_vouchers(
        tmp_path: Path) -> None:
    a = Wallet("a", pay=BANK_DOWN, query=ConnectionError("down"), close=CLOSED)
    b = Wallet("b", pay=pays)
    eng = open_with(tmp_path / "x.db", [a, b], routing=ROUTES,
                    policy=OrderPolicy(pay_window_ms=500, query_schedule_ms=(100, 100, 5_000),
                                       refund_query_schedule_ms=(100,)))
    try:
        eng.open_account("alice/rp", "CNY")
        eng.fund("alice/rp", 5_00, funding_id="rp")
        r = eng.submit(PaymentRequest("s-1", "n-1", "alice", "CNY", 51_00, "Fuel",
                                      cash=CashPart(50_00, "qr"),
                                      vouchers=(VoucherPart("alice/rp", 1_00),)))
        view = wait_for(lambda: (o := eng.get_order(r.order_id)).settled and o, timeout_s=15)
        assert view.state in ("closed", "failed")
        assert b.count("pay") == 0
        rp = eng.get_account("alice/rp")
        assert (rp.available, rp.held, rp.spent) == (5_00, 0, 0)
    finally:
        eng.shutdown()


def test_the_re_route_respects_the_next_routes_limits(tmp_path: Path) -> None:
    a = Wallet("a", pay=BANK_DOWN, query=NOT_FOUND, close=CLOSED)
    b = Wallet("b", pay=pays)
    c = Wallet("c", pay=pays)
    routes = RoutingTable((Route("qr", "a"), Route("qr", "b", priority=1, amount_max_minor=10_00),
                           Route("qr", "c", priority=2)))
    eng = open_with(tmp_path / "x.db", [a, b, c], policy=FAST, routing=routes)
    try:
        r = eng.submit(PaymentRequest("s-1", "n-1", "alice", "CNY", 50_00, "Fuel",
                                      cash=CashPart(50_00, "qr")))
        view = wait_for(lambda: (o := eng.get_order(r.order_id)).settled and o)
        assert (view.state, view.legs[0].channel) == ("succeeded", "c")
        assert b.count("pay") == 0
        assert view.payment_serial == r.payment_serial + "-F1"
    finally:
        eng.shutdown()


def test_the_re_route_skips_a_disabled_channel_and_fails_when_none_is_left(tmp_path: Path
                                                                           ) -> None:
    from payengine import load_channels
    text = """
[channels.b]
kind = "simulated"
wallet = "wechat"
merchant_no = "m2"
enabled = false
credentials = { key = "simulated-wallet-key-0002" }
"""
    a = Wallet("a", pay=BANK_DOWN, query=NOT_FOUND, close=CLOSED)
    eng = open_with(tmp_path / "x.db", [a, *load_channels(text)], policy=FAST, routing=ROUTES)
    try:
        r = eng.submit(PaymentRequest("s-1", "n-1", "alice", "CNY", 50_00, "Fuel",
                                      cash=CashPart(50_00, "qr")))
        view = wait_for(lambda: (o := eng.get_order(r.order_id)).settled and o)
        assert view.state == "failed"
        assert "no route left" in (view.cause or "")
    finally:
        eng.shutdown()
