"""More README promises of "Fuel sales and discount quotes": caps, points, submits, ids."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from payengine import (
    Benefits,
    CashPart,
    Coupon,
    CouponKind,
    DiscountRules,
    FuelLine,
    FuelSale,
    InvalidRequest,
    LevelCut,
    PointsBalance,
    PriceCut,
    QuoteMismatch,
    QuoteUse,
    UnknownQuote,
    VoucherPart,
)
from tests.blackbox_session4.support import (
    README_RULES,
    open_station,
    quote_request,
    readme_benefits,
    readme_sale,
    station_ms,
)


@pytest.fixture
def station(tmp_path: Path):
    engine, clock, wechat = open_station(tmp_path / "m.db")
    yield engine, clock, wechat
    engine.shutdown()


def quote_with(tmp_path: Path, rules: DiscountRules, benefits: Benefits | None = None,
               sale: FuelSale | None = None, clock_ms: int | None = None):
    engine, _, _ = open_station(tmp_path / "x.db", clock_ms or station_ms(12), rules)
    try:
        return engine.quote("station-42", "alice", sale or readme_sale(), benefits)
    finally:
        engine.shutdown()


def test_a_cut_larger_than_the_cap_is_trimmed_to_half_the_gross(tmp_path: Path) -> None:
    quote = quote_with(tmp_path, DiscountRules(price_cuts=(PriceCut("huge", 500),)))
    assert quote.combinations[0].discount_minor == 100_00
    assert quote.combinations[0].total_minor == 100_00


def test_no_combination_lists_a_discount_of_nothing(tmp_path: Path) -> None:
    quote = quote_with(tmp_path, DiscountRules(price_cuts=(PriceCut("huge", 500),)),
                       Benefits(coupons=(Coupon("k", CouponKind.FIXED, 5_00),)))
    for c in quote.combinations:
        assert all(d.amount_minor > 0 for d in c.discounts), c
    assert len({(c.total_minor, c.points, c.cash_minor) for c in quote.combinations}) == len(
        quote.combinations)


def test_points_share_is_of_the_total_after_discounts(tmp_path: Path) -> None:
    rules = replace(README_RULES, points_share_max_ppm=500_000)
    quote = quote_with(tmp_path, rules, readme_benefits(balance=100_000),
                       clock_ms=station_ms(13))
    best = quote.combinations[0]
    assert best.total_minor == 184_94
    assert best.points == 924 and best.points_value_minor == 92_40   # half of 184.94: 92.47


def test_a_points_share_of_zero_offers_no_points(tmp_path: Path) -> None:
    quote = quote_with(tmp_path, DiscountRules(points_share_max_ppm=0), readme_benefits())
    assert all(c.points == 0 for c in quote.combinations)


def test_points_worth_more_than_a_cent_each_leave_at_least_a_cent(tmp_path: Path) -> None:
    sale = FuelSale("st-1", 1, 1, FuelLine.by_volume("95", 1_000, 1_000))     # 10.00
    quote = quote_with(tmp_path, DiscountRules(),
                       Benefits(points=PointsBalance("alice/gold-points", 1_000, 100)), sale=sale)
    assert quote.combinations[0].points == 9 and quote.combinations[0].cash_minor == 1_00


def test_a_percent_coupon_without_cap_is_not_capped(tmp_path: Path) -> None:
    quote = quote_with(tmp_path, DiscountRules(),
                       Benefits(coupons=(Coupon("p", CouponKind.PERCENT, 250_000),)))
    assert quote.combinations[0].discount_minor == 50_00


def test_an_exclusive_percent_coupon_takes_its_share_of_the_gross(tmp_path: Path) -> None:
    quote = quote_with(tmp_path, DiscountRules(price_cuts=(PriceCut("p", 20),)),
                       Benefits(coupons=(Coupon("x", CouponKind.PERCENT, 100_000,
                                                exclusive=True),)))
    exclusive = [c for c in quote.combinations if any(d.rule_id == "x" for d in c.discounts)]
    assert exclusive and all(c.discount_minor == 20_00 for c in exclusive)


def test_a_coupon_is_trimmed_to_the_cap_after_stacked_cuts(tmp_path: Path) -> None:
    rules = DiscountRules(price_cuts=(PriceCut("p", 20, with_level=True),),
                          level_cuts=(LevelCut("g", "gold", 10),), discount_share_max_ppm=100_000)
    quote = quote_with(tmp_path, rules, Benefits(level="gold", coupons=(
        Coupon("k", CouponKind.FIXED, 50_00),)))
    best = quote.combinations[0]
    assert {d.rule_id: d.amount_minor for d in best.discounts} == {"p": 506, "g": 253,
                                                                   "k": 20_00 - 759}


def test_without_points_benefit_the_quote_has_no_points_account(station) -> None:
    engine, _, _ = station
    quote = engine.quote("station-42", "alice", readme_sale())
    assert quote.points_account_id is None
    assert all(c.points == 0 for c in quote.combinations)


def test_a_stored_quote_survives_a_reopen(tmp_path: Path) -> None:
    engine, clock, wechat = open_station(tmp_path / "r.db")
    quote = engine.quote("station-42", "alice", readme_sale(), readme_benefits())
    engine.shutdown()
    engine, _, _ = open_station(tmp_path / "r.db", clock.clock_ms, channel=wechat)
    try:
        assert engine.get_quote(quote.quote_id) == quote
        engine.submit(quote_request(quote, quote.combinations[0]))
    finally:
        engine.shutdown()


def test_the_cash_share_may_be_paid_partly_with_a_money_voucher(station) -> None:
    engine, _, _ = station
    engine.open_account("alice/red-packet", "CNY")
    engine.fund("alice/red-packet", 5_00, funding_id="rp")
    quote = engine.quote("station-42", "alice", readme_sale(), readme_benefits())
    best = quote.combinations[0]
    request = replace(quote_request(quote, best),
                      cash=CashPart(best.cash_minor - 5_00, "wechat"),
                      vouchers=(VoucherPart("alice/points", best.points),
                                VoucherPart("alice/red-packet", 5_00)))
    assert engine.submit(request).total_minor == 184_94


def test_points_on_a_combination_without_points_are_a_mismatch(station) -> None:
    engine, _, _ = station
    quote = engine.quote("station-42", "alice", readme_sale(), readme_benefits())
    without = quote.combinations[1]
    assert without.points == 0
    request = replace(quote_request(quote, without),
                      cash=CashPart(without.cash_minor - 10_00, "wechat"),
                      vouchers=(VoucherPart("alice/points", 100),))
    with pytest.raises(QuoteMismatch):
        engine.submit(request)


def test_a_combination_of_another_quote_is_a_mismatch_or_unknown(station) -> None:
    engine, _, _ = station
    quote = engine.quote("station-42", "alice", readme_sale(), readme_benefits())
    with pytest.raises(QuoteMismatch):
        engine.submit(replace(quote_request(quote, quote.combinations[0]),
                              quote=QuoteUse(quote.quote_id, "c5")))


@pytest.mark.parametrize("use", [QuoteUse("", "c1"), QuoteUse("q", ""),
                                 QuoteUse("q\n", "c1"), QuoteUse("q" * 129, "c1")])
def test_a_malformed_quote_use_is_invalid_request(station, use) -> None:
    engine, _, _ = station
    quote = engine.quote("station-42", "alice", readme_sale(), readme_benefits())
    with pytest.raises(InvalidRequest):
        engine.submit(replace(quote_request(quote, quote.combinations[0]), quote=use))


@pytest.mark.parametrize("merchant,user", [("", "alice"), ("station-42", ""),
                                           ("station-42", "a\x00b")])
def test_a_quote_for_a_bad_merchant_or_user_id_is_invalid_request(station, merchant,
                                                                  user) -> None:
    engine, _, _ = station
    with pytest.raises(InvalidRequest):
        engine.quote(merchant, user, readme_sale())


def test_a_sale_that_is_not_a_fuel_sale_is_invalid_request(station) -> None:
    engine, _, _ = station
    with pytest.raises(InvalidRequest):
        engine.quote("station-42", "alice", {"station_id": "st-1"})  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest):
        engine.quote("station-42", "alice", readme_sale(), {"level": "gold"})  # type: ignore


def test_a_pruned_quote_is_unknown(tmp_path: Path) -> None:
    engine, clock, _ = open_station(tmp_path / "p.db")
    try:
        old = engine.quote("station-42", "alice", readme_sale())
        clock.clock_ms = old.expires_at_ms + 1
        engine.quote("station-42", "alice", readme_sale())     # prunes the expired one
        with pytest.raises(UnknownQuote):
            engine.get_quote(old.quote_id)
    finally:
        engine.shutdown()


def test_quote_ids_are_unique(station) -> None:
    engine, _, _ = station
    ids = {engine.quote("station-42", "alice", readme_sale()).quote_id for _ in range(20)}
    assert len(ids) == 20


def test_a_coupon_expiring_at_the_quote_time_is_not_offered(tmp_path: Path) -> None:
    now = station_ms(12)
    quote = quote_with(tmp_path, DiscountRules(),
                       Benefits(coupons=(Coupon("edge", CouponKind.FIXED, 1_00,
                                                expires_at_ms=now),)), clock_ms=now)
    assert all(not c.discounts for c in quote.combinations)


@pytest.mark.parametrize("quote_id", ["", "q" * 129, "a\nb", 5, None])
def test_get_quote_of_a_malformed_id_is_invalid_request(station, quote_id) -> None:
    engine, _, _ = station
    with pytest.raises(InvalidRequest):
        engine.get_quote(quote_id)  # type: ignore[arg-type]
