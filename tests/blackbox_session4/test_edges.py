"""Edges: tiny sales, a second charge in the shift report, discounts of unpaid orders."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from payengine import (
    Benefits,
    CashPart,
    ChannelReply,
    Coupon,
    CouponKind,
    DiscountRules,
    FuelLine,
    FuelSale,
    LevelCut,
    NotificationRejected,
    PaymentRequest,
    PointsBalance,
    PriceCut,
)
from tests.blackbox_session4.support import (
    open_station,
    pay,
    quote_request,
    readme_benefits,
    readme_sale,
    station_ms,
)
from tests.helpers import signed_callback, wait_for

SHIFT = "2026-12-01/A"
EVERYTHING = DiscountRules(price_cuts=(PriceCut("p", 500),),
                           level_cuts=(LevelCut("g", "gold", 500),))
ALL_BENEFITS = Benefits(level="gold", coupons=(
    Coupon("f", CouponKind.FIXED, 1_00), Coupon("pc", CouponKind.PERCENT, 500_000),
    Coupon("x", CouponKind.FIXED, 5_00, exclusive=True)),
    points=PointsBalance("alice/points", 1_000, 10))


@pytest.mark.parametrize("gross", [1, 2, 3, 10, 11, 21])
def test_a_tiny_sale_keeps_every_combination_consistent_and_something_to_pay(
        tmp_path: Path, gross: int) -> None:
    engine, _, _ = open_station(tmp_path / f"t{gross}.db", station_ms(12), EVERYTHING)
    try:
        sale = FuelSale("st-1", 1, 1, FuelLine.by_volume("95", 1_000, gross))
        assert sale.line.gross_minor == gross
        quote = engine.quote("station-42", "alice", sale, ALL_BENEFITS)
        assert quote.combinations
        for c in quote.combinations:
            assert c.gross_minor == gross
            assert c.discount_minor <= gross // 2
            assert c.total_minor >= 1 and c.cash_minor >= 1
            assert c.gross_minor - c.discount_minor == c.total_minor
            assert c.cash_minor == c.total_minor - c.points_value_minor
            assert all(d.amount_minor > 0 for d in c.discounts)
        keys = [(c.total_minor, c.cash_minor) for c in quote.combinations]
        assert keys == sorted(keys)
        for c in quote.combinations:  # a quote pays one trade order: one quote each
            fresh = engine.quote("station-42", "alice", sale, ALL_BENEFITS)
            engine.submit(quote_request(fresh, fresh.combination(c.combination_id),
                                        no=f"n-{c.combination_id}"))
    finally:
        engine.shutdown()


def test_a_second_charge_is_given_back_without_being_a_merchant_refund(tmp_path: Path) -> None:
    engine, _, wechat = open_station(tmp_path / "d.db", fee_ppm={"wechat": 6_000})
    try:
        sale = FuelSale("st-1", 1, 1, FuelLine.by_volume("92", 1_000, 10_000), shift_id=SHIFT)
        receipt = engine.submit(PaymentRequest("station-42", "n-1", "alice", "CNY", 100_00,
                                               "fuel", CashPart(100_00, "wechat"), sale=sale))
        pay(engine, receipt)
        before = engine.shift_report("st-1", SHIFT).totals["CNY"]
        second = ChannelReply("SUCCESS", "SUCCESS", "TX-second", 100_00)
        wechat.charge_query_reply = second          # the wallet confirms the second charge
        with contextlib.suppress(NotificationRejected):     # believed once the wallet says so
            signed_callback(engine, "wechat", receipt.payment_serial, second)
        wait_for(lambda: wechat.count("refund") == 1, what="the second charge given back")
        after = engine.shift_report("st-1", SHIFT).totals["CNY"]
        assert (after.refunds, after.refunded_minor) == (0, 0)
        assert after.merchant_net_minor == before.merchant_net_minor
        assert after.fees_minor == before.fees_minor
        assert after.paid_orders == 1 and after.paid_minor == 100_00
        assert sum(after.collected_by_method.values()) == (
            after.merchant_net_minor + after.fees_minor + after.in_transit_minor)
    finally:
        engine.shutdown()


def test_discounts_are_summed_for_paid_orders_only(tmp_path: Path) -> None:
    engine, _, _ = open_station(tmp_path / "u.db")
    try:
        sale = readme_sale(shift_id=SHIFT)
        quote = engine.quote("station-42", "alice", sale, readme_benefits())
        paid = engine.submit(quote_request(quote, quote.combinations[0], no="paid"))
        pay(engine, paid)
        quote2 = engine.quote("station-42", "alice", sale, readme_benefits())
        closed = engine.submit(quote_request(quote2, quote2.combinations[0], no="closed"))
        engine.close(closed.order_id)
        cny = engine.shift_report("st-1", SHIFT).totals["CNY"]
        assert (cny.paid_orders, cny.gross_minor, cny.discount_minor) == (1, 200_00, 15_06)
        assert cny.discounts_by_rule == {"noon": 506, "fixed-10": 10_00}
    finally:
        engine.shutdown()


def test_discounts_add_up_over_the_shifts_orders(tmp_path: Path) -> None:
    engine, clock, _ = open_station(tmp_path / "a.db")
    try:
        sale = readme_sale(shift_id=SHIFT)
        for no, hour in (("a", 13), ("b", 15)):
            clock.clock_ms = station_ms(hour)
            quote = engine.quote("station-42", "alice", sale, readme_benefits())
            pay(engine, engine.submit(quote_request(quote, quote.combinations[0], no=no)))
        cny = engine.shift_report("st-1", SHIFT).totals["CNY"]
        assert cny.discounts_by_rule == {"noon": 506, "gold": 253, "fixed-10": 20_00}
        assert cny.discount_minor == 506 + 253 + 20_00
        assert cny.paid_minor == 184_94 + 187_47
        assert cny.collected_by_method == {"cash:wechat": 174_94 + 177_47,
                                           "voucher:POINTS": 20_00}
    finally:
        engine.shutdown()
