"""Black-box tests of README "Fuel sales and discount quotes", written from the README only."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from payengine import (
    AppliedDiscount,
    Benefits,
    CashPart,
    Coupon,
    CouponKind,
    DiscountRules,
    Engine,
    EngineConfig,
    FuelLine,
    FuelSale,
    IdempotencyConflict,
    InvalidRequest,
    LevelCut,
    Overloaded,
    PaymentRequest,
    PointsBalance,
    PriceCut,
    PricedSale,
    QuoteExpired,
    QuoteMismatch,
    QuoteRefused,
    QuoteUse,
    UnknownQuote,
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
    engine, clock, wechat = open_station(tmp_path / "s.db")
    yield engine, clock, wechat
    engine.shutdown()


def sale_of(line: FuelLine, **kw: object) -> FuelSale:
    return FuelSale("st-1", pump=1, nozzle=1, line=line, **kw)  # type: ignore[arg-type]


def quote_at(tmp_path: Path, clock_ms: int, rules: DiscountRules, sale: FuelSale,
             benefits: Benefits | None = None, **config: object):
    engine, _, _ = open_station(tmp_path / f"q{clock_ms}.db", clock_ms, rules, **config)
    try:
        return engine.quote("station-42", "alice", sale, benefits)
    finally:
        engine.shutdown()


NO_RULES = DiscountRules()


def cut_ids(combination) -> set[str]:
    return {d.rule_id for d in combination.discounts}


# ---------------------------------------------------------------- FuelLine


def test_by_volume_prices_the_volume_rounded_half_up() -> None:
    assert FuelLine.by_volume("95", 3, 1_500).gross_minor == 5        # 4.5 -> 5
    assert FuelLine.by_volume("95", 3, 1_499).gross_minor == 4        # 4.497 -> 4
    assert FuelLine.by_volume("95", 789, 25_350).gross_minor == 20_001  # 20001.15
    line = FuelLine.by_volume("92", 750, 40_000)
    assert (line.grade, line.unit_price_minor, line.volume_ml, line.gross_minor) == (
        "92", 750, 40_000, 30_000)


def test_by_amount_buys_the_volume_rounded_down_and_keeps_the_amount() -> None:
    line = FuelLine.by_amount("95", 789, 200_00)
    assert (line.volume_ml, line.gross_minor) == (25_348, 200_00)
    assert FuelLine.by_amount("95", 1_000, 1).volume_ml == 1   # 0.01 at 10.00/l is 1 ml


def test_a_line_whose_figures_agree_either_way_is_accepted_as_built_directly(
        station) -> None:
    engine, _, _ = station
    # agrees by amount only: 200.00 buys 25.348 l, but 25.348 l cost 200.00 (199.9957) too
    engine.quote("station-42", "alice", sale_of(FuelLine("95", 789, 25_348, 200_00)))
    # agrees by volume only: 25.350 l cost 200.01 (200.0115), and 200.01 buys 25.349 l
    engine.quote("station-42", "alice", sale_of(FuelLine("95", 789, 25_350, 200_01)))
    # agrees by amount only: 1.00 at 3.00/l buys 0.333 l, which cost 1.00 (0.999)
    engine.quote("station-42", "alice", sale_of(FuelLine("95", 300, 333, 1_00)))
    # 2.00 at 7.89/l buys 253 ml, which would cost 2.00 (1.99617): both; 199 buys 252 ml
    engine.quote("station-42", "alice", sale_of(FuelLine("95", 789, 252, 1_99)))


def test_a_line_whose_figures_agree_neither_way_is_invalid_request(station) -> None:
    engine, _, _ = station
    with pytest.raises(InvalidRequest):
        line = FuelLine("95", 789, 25_348, 150_00)
        engine.quote("station-42", "alice", sale_of(line))


@pytest.mark.parametrize("field,value", [
    ("pump", 0), ("pump", 1_000), ("nozzle", 0), ("nozzle", 100)])
def test_pump_and_nozzle_out_of_bounds_are_invalid_request(station, field, value) -> None:
    engine, _, _ = station
    with pytest.raises(InvalidRequest):
        sale = replace(sale_of(FuelLine.by_volume("95", 789, 10_000)), **{field: value})
        engine.quote("station-42", "alice", sale)


@pytest.mark.parametrize("price,volume", [(0, 1_000), (1_000_001, 1_000), (789, 0),
                                          (789, 2_000_001)])
def test_unit_price_and_volume_out_of_bounds_are_invalid_request(station, price, volume) -> None:
    engine, _, _ = station
    with pytest.raises(InvalidRequest):
        engine.quote("station-42", "alice", sale_of(FuelLine.by_volume("95", price, volume)))


def test_the_bounds_themselves_are_accepted(station) -> None:
    engine, _, _ = station
    line = FuelLine.by_volume("95", 1_000_000, 2_000_000)
    engine.quote("station-42", "alice", FuelSale("st-1", 999, 99, line))
    engine.quote("station-42", "alice", FuelSale("st-1", 1, 1, FuelLine.by_volume("95", 500, 1)))
    assert FuelLine.by_volume("95", 500, 1).gross_minor == 1   # 0.5 rounds half up
    engine.quote("station-42", "alice", sale_of(FuelLine.by_volume("95", 1, 500)))


def test_a_sale_with_bad_ids_is_invalid_request(station) -> None:
    engine, _, _ = station
    for station_id in ("", "x" * 129, "a\nb"):
        with pytest.raises(InvalidRequest):
            engine.quote("station-42", "alice",
                         FuelSale(station_id, 1, 1, FuelLine.by_volume("95", 789, 1_000)))


def test_an_order_keeps_its_sale_as_a_priced_sale_also_after_a_reopen(tmp_path: Path) -> None:
    engine, clock, wechat = open_station(tmp_path / "keep.db")
    sale = readme_sale(cashier_id="cs-9", shift_id="2026-12-01/A")
    request = PaymentRequest("station-42", "n-1", "alice", "CNY", sale.line.gross_minor,
                             "95 fuel", CashPart(sale.line.gross_minor, "wechat"), sale=sale)
    receipt = engine.submit(request)
    view = engine.get_order(receipt.order_id).sale
    assert isinstance(view, PricedSale)
    assert view.sale == sale and view.quote_id is None and view.combination_id is None
    assert view.discount_minor == 0
    engine.shutdown()
    engine, _, _ = open_station(tmp_path / "keep.db", clock.clock_ms, channel=wechat)
    try:
        assert engine.get_order(receipt.order_id).sale == view
    finally:
        engine.shutdown()


def test_a_sale_is_part_of_the_idempotency_fingerprint(station) -> None:
    engine, _, _ = station
    sale = readme_sale()
    request = PaymentRequest("station-42", "n-1", "alice", "CNY", 200_00, "95 fuel",
                             CashPart(200_00, "wechat"), sale=sale)
    receipt = engine.submit(request)
    assert engine.submit(request) == receipt
    with pytest.raises(IdempotencyConflict):
        engine.submit(replace(request, sale=replace(sale, pump=4)))


# ---------------------------------------------------------------- the README's example


def test_readme_example_at_13_00_gives_184_94_with_100_points_and_174_94_cash(
        tmp_path: Path) -> None:
    quote = quote_at(tmp_path, station_ms(13), README_RULES, readme_sale(), readme_benefits())
    best = quote.combinations[0]
    assert (best.total_minor, best.points, best.cash_minor) == (184_94, 100, 174_94)
    assert {(d.rule_id, d.kind, d.amount_minor) for d in best.discounts} == {
        ("noon", "price_cut", 506), ("fixed-10", "coupon", 10_00)}
    assert best.gross_minor == 200_00 and best.discount_minor == 15_06
    assert best.points_value_minor == 10_00


def test_readme_example_at_15_00_gives_187_47_with_the_gold_cut_instead(tmp_path: Path) -> None:
    quote = quote_at(tmp_path, station_ms(15), README_RULES, readme_sale(), readme_benefits())
    best = quote.combinations[0]
    assert (best.total_minor, best.points, best.cash_minor) == (187_47, 100, 177_47)
    assert {(d.rule_id, d.kind, d.amount_minor) for d in best.discounts} == {
        ("gold", "level_cut", 253), ("fixed-10", "coupon", 10_00)}


def test_readme_example_lists_each_coupon_choice_with_and_without_points_cheapest_first(
        tmp_path: Path) -> None:
    quote = quote_at(tmp_path, station_ms(13), README_RULES, readme_sale(), readme_benefits())
    rows = [(c.combination_id, c.total_minor, c.cash_minor, c.points) for c in quote.combinations]
    assert rows == [("c1", 184_94, 174_94, 100), ("c2", 184_94, 184_94, 0),
                    ("c3", 194_94, 184_94, 100), ("c4", 194_94, 194_94, 0)]


def test_every_combination_adds_up(tmp_path: Path) -> None:
    quote = quote_at(tmp_path, station_ms(13), README_RULES, readme_sale(), readme_benefits())
    assert quote.points_account_id == "alice/points"
    for c in quote.combinations:
        assert c.gross_minor - c.discount_minor == c.total_minor
        assert c.discount_minor == sum(d.amount_minor for d in c.discounts)
        assert c.points_value_minor == c.points * 10
        assert c.cash_minor == c.total_minor - c.points_value_minor
        assert all(isinstance(d, AppliedDiscount) for d in c.discounts)


def test_a_quote_names_who_and_what_and_lasts_five_minutes_by_default(station) -> None:
    engine, clock, _ = station
    sale = readme_sale()
    quote = engine.quote("station-42", "alice", sale, readme_benefits())
    assert (quote.merchant_id, quote.user_id, quote.sale) == ("station-42", "alice", sale)
    assert quote.created_at_ms == clock.clock_ms
    assert quote.expires_at_ms == clock.clock_ms + 5 * 60_000
    assert engine.get_quote(quote.quote_id) == quote


def test_without_rules_or_benefits_there_is_one_combination_at_the_gross(tmp_path: Path) -> None:
    quote = quote_at(tmp_path, station_ms(13), DiscountRules(), readme_sale())
    assert len(quote.combinations) == 1
    only = quote.combinations[0]
    assert (only.combination_id, only.total_minor, only.discount_minor, only.points,
            only.cash_minor, only.discounts) == ("c1", 200_00, 0, 0, 200_00, ())


def test_the_default_engine_config_has_no_discount_rules(tmp_path: Path) -> None:
    from tests.helpers import ScriptedChannel
    engine = Engine.open(tmp_path / "d.db", channels=[ScriptedChannel()])
    try:
        engine.open_account("alice/points", "POINTS", minor_per_unit=10)
        quote = engine.quote("station-42", "alice", readme_sale(), readme_benefits())
        assert all(d.kind == "coupon" for c in quote.combinations for d in c.discounts)
    finally:
        engine.shutdown()


def test_a_quote_creates_no_order_and_holds_nothing(station) -> None:
    engine, _, _ = station
    before = engine.get_account("alice/points")
    engine.quote("station-42", "alice", readme_sale(), readme_benefits())
    assert engine.get_account("alice/points") == before
    assert engine.ledger_balances() == {} or all(
        v == 0 for cur in engine.ledger_balances().values() for v in cur.values())


# ---------------------------------------------------------------- price cuts


def noon(**kw: object) -> DiscountRules:
    return DiscountRules(price_cuts=(PriceCut("noon", 20, **kw),))  # type: ignore[arg-type]


@pytest.mark.parametrize("hour,minute,applies", [
    (10, 59, False), (11, 0, True), (13, 59, True), (14, 0, False)])
def test_a_price_cut_runs_from_its_first_minute_to_its_end_excluded(
        tmp_path: Path, hour, minute, applies) -> None:
    quote = quote_at(tmp_path, station_ms(hour, minute),
                     noon(from_minute=11 * 60, to_minute=14 * 60), readme_sale())
    assert ("noon" in cut_ids(quote.combinations[0])) is applies


@pytest.mark.parametrize("hour,minute,applies", [
    (21, 59, False), (22, 0, True), (23, 59, True), (0, 0, True), (5, 59, True), (6, 0, False),
    (12, 0, False)])
def test_a_price_cut_whose_from_is_after_its_to_runs_over_midnight(
        tmp_path: Path, hour, minute, applies) -> None:
    quote = quote_at(tmp_path, station_ms(hour, minute),
                     noon(from_minute=22 * 60, to_minute=6 * 60), readme_sale())
    assert ("noon" in cut_ids(quote.combinations[0])) is applies


def test_a_price_cut_from_equal_to_is_refused() -> None:
    with pytest.raises(InvalidRequest):
        EngineConfig(discounts=noon(from_minute=600, to_minute=600))


def test_the_station_day_is_utc_plus_eight_by_default(tmp_path: Path) -> None:
    assert DiscountRules().utc_offset_minutes == 480
    # 03:30 UTC is 11:30 in China: the noon cut runs.
    at_utc = station_ms(11, 30)
    quote = quote_at(tmp_path, at_utc, noon(from_minute=11 * 60, to_minute=14 * 60),
                     readme_sale())
    assert "noon" in cut_ids(quote.combinations[0])


def test_utc_offset_moves_the_station_day(tmp_path: Path) -> None:
    rules = replace(noon(from_minute=11 * 60, to_minute=14 * 60), utc_offset_minutes=0)
    # 11:30 in China is 03:30 UTC: not noon at a UTC station.
    assert "noon" not in cut_ids(quote_at(tmp_path, station_ms(11, 30), rules,
                                          readme_sale()).combinations[0])
    # 19:30 in China is 11:30 UTC.
    assert "noon" in cut_ids(quote_at(tmp_path, station_ms(19, 30), rules,
                                      readme_sale()).combinations[0])


def test_weekdays_count_from_monday_zero_in_station_time(tmp_path: Path) -> None:
    tuesday = noon(weekdays=frozenset({1}))
    # 2026-12-01 is a Tuesday; 00:30 station time on it is still Monday in UTC.
    assert "noon" in cut_ids(quote_at(tmp_path, station_ms(0, 30), tuesday,
                                      readme_sale()).combinations[0])
    # 2026-12-02 is a Wednesday.
    assert "noon" not in cut_ids(quote_at(tmp_path, station_ms(12, 0, day=2), tuesday,
                                          readme_sale()).combinations[0])


def test_a_price_cut_for_other_grades_does_not_apply(tmp_path: Path) -> None:
    quote = quote_at(tmp_path, station_ms(12), noon(grades=frozenset({"92"})), readme_sale())
    assert quote.combinations[0].discount_minor == 0
    quote = quote_at(tmp_path, station_ms(12), noon(grades=frozenset({"92", "95"})),
                     readme_sale())
    assert quote.combinations[0].discount_minor == 506


def test_of_several_running_price_cuts_the_largest_applies(tmp_path: Path) -> None:
    rules = DiscountRules(price_cuts=(PriceCut("a", 20), PriceCut("b", 35), PriceCut("c", 30)))
    quote = quote_at(tmp_path, station_ms(12), rules, readme_sale())
    best = quote.combinations[0]
    assert [(d.rule_id, d.amount_minor) for d in best.discounts] == [("b", 887)]  # 35*25.348


def test_per_litre_cuts_are_rounded_down(tmp_path: Path) -> None:
    # 0.07 a litre on 1.999 l is 0.13993: 0.13.
    sale = sale_of(FuelLine.by_volume("95", 789, 1_999))
    quote = quote_at(tmp_path, station_ms(12), DiscountRules(price_cuts=(PriceCut("p", 7),)),
                     sale)
    assert quote.combinations[0].discount_minor == 13


# ---------------------------------------------------------------- level cuts


def test_of_several_level_cuts_for_the_level_the_largest_applies(tmp_path: Path) -> None:
    rules = DiscountRules(level_cuts=(LevelCut("g1", "gold", 10), LevelCut("g2", "gold", 15),
                                      LevelCut("s", "silver", 50)))
    quote = quote_at(tmp_path, station_ms(12), rules, readme_sale(), Benefits(level="gold"))
    assert [(d.rule_id, d.kind, d.amount_minor) for d in quote.combinations[0].discounts] == [
        ("g2", "level_cut", 380)]                                   # 15*25.348 = 380.22


def test_no_level_means_no_level_cut(tmp_path: Path) -> None:
    rules = DiscountRules(level_cuts=(LevelCut("g", "gold", 10),))
    assert quote_at(tmp_path, station_ms(12), rules, readme_sale()).combinations[0] \
        .discount_minor == 0


def test_a_level_cut_for_other_grades_does_not_apply(tmp_path: Path) -> None:
    rules = DiscountRules(level_cuts=(LevelCut("g", "gold", 10, grades=frozenset({"92"})),))
    quote = quote_at(tmp_path, station_ms(12), rules, readme_sale(), Benefits(level="gold"))
    assert quote.combinations[0].discount_minor == 0


def test_a_price_cut_with_level_stacks_with_the_level_cut(tmp_path: Path) -> None:
    rules = DiscountRules(price_cuts=(PriceCut("p", 20, with_level=True),),
                          level_cuts=(LevelCut("g", "gold", 10),))
    quote = quote_at(tmp_path, station_ms(12), rules, readme_sale(), Benefits(level="gold"))
    assert {(d.rule_id, d.amount_minor) for d in quote.combinations[0].discounts} == {
        ("p", 506), ("g", 253)}


def test_without_with_level_the_price_cut_wins_a_tie(tmp_path: Path) -> None:
    rules = DiscountRules(price_cuts=(PriceCut("p", 10, with_level=False),),
                          level_cuts=(LevelCut("g", "gold", 10),))
    quote = quote_at(tmp_path, station_ms(12), rules, readme_sale(), Benefits(level="gold"))
    assert [(d.rule_id, d.kind) for d in quote.combinations[0].discounts] == [("p", "price_cut")]


def test_without_with_level_the_larger_level_cut_wins(tmp_path: Path) -> None:
    rules = DiscountRules(price_cuts=(PriceCut("p", 10, with_level=False),),
                          level_cuts=(LevelCut("g", "gold", 11),))
    quote = quote_at(tmp_path, station_ms(12), rules, readme_sale(), Benefits(level="gold"))
    assert [(d.rule_id, d.kind) for d in quote.combinations[0].discounts] == [("g", "level_cut")]


# ---------------------------------------------------------------- coupons


def coupons_quote(tmp_path: Path, *coupons: Coupon, rules: DiscountRules = NO_RULES,
                  sale: FuelSale | None = None, clock_ms: int | None = None):
    return quote_at(tmp_path, clock_ms or station_ms(12), rules, sale or readme_sale(),
                    Benefits(coupons=coupons))


def coupon_amounts(quote) -> dict[str, int]:
    return {d.rule_id: d.amount_minor for c in quote.combinations for d in c.discounts
            if d.kind == "coupon"}


def test_a_percent_coupon_takes_ppm_of_the_amount_after_cuts_rounded_down(
        tmp_path: Path) -> None:
    # 20000 - 506 = 19494; 3.3333% of it = 649.79...: 649.
    quote = coupons_quote(tmp_path, Coupon("pc", CouponKind.PERCENT, 33_333),
                          rules=DiscountRules(price_cuts=(PriceCut("p", 20),)))
    assert coupon_amounts(quote) == {"pc": 649}


def test_a_percent_coupon_is_capped_at_cap_minor(tmp_path: Path) -> None:
    quote = coupons_quote(tmp_path, Coupon("pc", CouponKind.PERCENT, 100_000, cap_minor=5_00))
    assert coupon_amounts(quote) == {"pc": 5_00}


def test_a_coupon_is_offered_from_its_threshold_on_the_gross(tmp_path: Path) -> None:
    quote = coupons_quote(tmp_path, Coupon("at", CouponKind.FIXED, 1_00, threshold_minor=200_00),
                          Coupon("above", CouponKind.FIXED, 2_00, threshold_minor=200_01))
    assert coupon_amounts(quote) == {"at": 1_00}


def test_the_threshold_is_on_the_gross_not_the_amount_after_cuts(tmp_path: Path) -> None:
    quote = coupons_quote(tmp_path, Coupon("at", CouponKind.FIXED, 1_00, threshold_minor=200_00),
                          rules=DiscountRules(price_cuts=(PriceCut("p", 20),)))
    assert coupon_amounts(quote) == {"at": 1_00}


def test_a_coupon_for_another_grade_is_not_offered(tmp_path: Path) -> None:
    quote = coupons_quote(tmp_path, Coupon("g92", CouponKind.FIXED, 1_00,
                                           grades=frozenset({"92"})))
    assert coupon_amounts(quote) == {}


def test_an_expired_coupon_is_not_offered(tmp_path: Path) -> None:
    now = station_ms(12)
    quote = coupons_quote(tmp_path, Coupon("old", CouponKind.FIXED, 1_00, expires_at_ms=now - 1),
                          Coupon("new", CouponKind.FIXED, 2_00, expires_at_ms=now + 1),
                          clock_ms=now)
    assert coupon_amounts(quote) == {"new": 2_00}


def test_at_most_one_coupon_per_combination(tmp_path: Path) -> None:
    quote = coupons_quote(tmp_path, Coupon("a", CouponKind.FIXED, 1_00),
                          Coupon("b", CouponKind.FIXED, 2_00))
    assert all(sum(d.kind == "coupon" for d in c.discounts) <= 1 for c in quote.combinations)
    assert [c.total_minor for c in quote.combinations] == [198_00, 199_00, 200_00]


def test_an_exclusive_coupon_takes_no_cut_beside_it(tmp_path: Path) -> None:
    quote = coupons_quote(tmp_path, Coupon("x", CouponKind.FIXED, 10_00, exclusive=True),
                          rules=DiscountRules(price_cuts=(PriceCut("p", 20),)))
    for c in quote.combinations:
        if "x" in cut_ids(c):
            assert [d.rule_id for d in c.discounts] == ["x"]
    assert [(c.total_minor, sorted(cut_ids(c))) for c in quote.combinations] == [
        (190_00, ["x"]), (194_94, ["p"])]


def test_more_than_fifty_coupons_refuse_the_quote(station) -> None:
    engine, _, _ = station
    coupons = tuple(Coupon(f"c{i}", CouponKind.FIXED, 1_00 + i) for i in range(51))
    with pytest.raises(InvalidRequest):
        engine.quote("station-42", "alice", readme_sale(), Benefits(coupons=coupons))
    engine.quote("station-42", "alice", readme_sale(), Benefits(coupons=coupons[:50]))


# ---------------------------------------------------------------- points


def points_quote(tmp_path: Path, balance: int, rules: DiscountRules = NO_RULES,
                 sale: FuelSale | None = None, per_point: int = 10):
    return quote_at(tmp_path, station_ms(12), rules, sale or readme_sale(),
                    Benefits(points=PointsBalance("alice/points", balance, per_point)))


def test_each_choice_comes_with_no_points_and_with_the_most_points(tmp_path: Path) -> None:
    quote = points_quote(tmp_path, 300)
    assert [(c.points, c.cash_minor) for c in quote.combinations] == [
        (300, 170_00), (0, 200_00)]


def test_points_always_leave_at_least_one_cent_to_pay(tmp_path: Path) -> None:
    quote = points_quote(tmp_path, 1_000_000)
    most = quote.combinations[0]
    assert most.points == 1_999 and most.cash_minor == 10   # 19,999 would leave 0.01 at best
    sale = sale_of(FuelLine.by_amount("95", 789, 200_01))
    most = points_quote(tmp_path, 1_000_000, sale=sale).combinations[0]
    assert most.points == 2_000 and most.cash_minor == 1


def test_points_are_whole_and_their_value_at_most_the_share(tmp_path: Path) -> None:
    rules = DiscountRules(points_share_max_ppm=333_333)    # a third of 200.00 = 66.66...
    most = points_quote(tmp_path, 1_000_000, rules).combinations[0]
    assert most.points == 666 and most.points_value_minor == 66_60


def test_points_balance_of_zero_gives_one_choice(tmp_path: Path) -> None:
    quote = points_quote(tmp_path, 0)
    assert [(c.points, c.total_minor) for c in quote.combinations] == [(0, 200_00)]


# ---------------------------------------------------------------- caps and ordering


def test_all_discounts_take_at_most_half_the_gross_by_default_trimming_the_coupon(
        tmp_path: Path) -> None:
    quote = coupons_quote(tmp_path, Coupon("big", CouponKind.FIXED, 150_00),
                          rules=DiscountRules(price_cuts=(PriceCut("p", 20),)))
    best = quote.combinations[0]
    assert best.discount_minor == 100_00
    assert {d.rule_id: d.amount_minor for d in best.discounts} == {"p": 506, "big": 94_94}


def test_discounts_never_take_the_whole_gross(tmp_path: Path) -> None:
    rules = DiscountRules(discount_share_max_ppm=1_000_000)
    quote = coupons_quote(tmp_path, Coupon("all", CouponKind.FIXED, 500_00), rules=rules)
    assert quote.combinations[0].total_minor == 1


def test_combinations_are_at_most_sixteen_by_default_and_distinct(tmp_path: Path) -> None:
    coupons = tuple(Coupon(f"k{i}", CouponKind.FIXED, 1_00 + i) for i in range(30))
    quote = quote_at(tmp_path, station_ms(12), DiscountRules(), readme_sale(),
                     Benefits(coupons=coupons, points=PointsBalance("alice/points", 50, 10)))
    combos = quote.combinations
    assert len(combos) == 16
    assert [c.combination_id for c in combos] == [f"c{i}" for i in range(1, 17)]
    keys = [(c.total_minor, c.cash_minor) for c in combos]
    assert keys == sorted(keys)
    assert len({(c.discounts, c.points) for c in combos}) == 16
    assert combos[0].total_minor == 200_00 - 1_29


def test_combinations_max_is_at_most_sixty_four() -> None:
    EngineConfig(discounts=DiscountRules(combinations_max=64))
    with pytest.raises(InvalidRequest):
        EngineConfig(discounts=DiscountRules(combinations_max=65))


def test_same_total_orders_by_least_cash(tmp_path: Path) -> None:
    quote = points_quote(tmp_path, 5)
    assert [(c.total_minor, c.cash_minor) for c in quote.combinations] == [
        (200_00, 199_50), (200_00, 200_00)]


@pytest.mark.parametrize("rules", [
    dict(quote_ttl_ms=30 * 60_000 + 1), dict(quote_ttl_ms=0),
    dict(combinations_max=0), dict(discount_share_max_ppm=1_000_001),
    dict(points_share_max_ppm=1_000_001), dict(price_cuts=(PriceCut("p", 0),)),
    dict(price_cuts=(PriceCut("p", 10, from_minute=0, to_minute=1441),)),
    dict(price_cuts=(PriceCut("p", 10, weekdays=frozenset({7})),)),
])
def test_bad_rules_refuse_the_engine_config(rules) -> None:
    with pytest.raises(InvalidRequest):
        EngineConfig(discounts=DiscountRules(**rules))


def test_a_quote_ttl_of_thirty_minutes_is_allowed(tmp_path: Path) -> None:
    rules = DiscountRules(quote_ttl_ms=30 * 60_000)
    quote = quote_at(tmp_path, station_ms(12), rules, readme_sale())
    assert quote.expires_at_ms - quote.created_at_ms == 30 * 60_000


@pytest.mark.parametrize("benefits", [
    Benefits(points=PointsBalance("alice/points", -1, 10)),
    Benefits(points=PointsBalance("alice/points", 10, 0)),
    Benefits(points=PointsBalance("", 10, 10)),
    Benefits(coupons=(Coupon("c", CouponKind.FIXED, 0),)),
    Benefits(coupons=(Coupon("c", CouponKind.PERCENT, 1_000_001),)),
    Benefits(coupons=(Coupon("", CouponKind.FIXED, 100),)),
])
def test_bad_benefits_refuse_the_quote(station, benefits) -> None:
    engine, _, _ = station
    with pytest.raises(InvalidRequest):
        engine.quote("station-42", "alice", readme_sale(), benefits)


# ---------------------------------------------------------------- submitting a quote


def test_readme_submit_of_the_best_combination_is_accepted_and_keeps_the_terms(station) -> None:
    engine, _, _ = station
    quote = engine.quote("station-42", "alice", readme_sale(), readme_benefits())
    best = quote.combinations[0]
    receipt = engine.submit(quote_request(quote, best))
    priced = engine.get_order(receipt.order_id).sale
    assert priced.sale == quote.sale
    assert (priced.quote_id, priced.combination_id) == (quote.quote_id, "c1")
    assert priced.discounts == best.discounts and priced.discount_minor == 15_06
    assert receipt.total_minor == 184_94


def test_a_submit_may_send_the_quotes_sale(station) -> None:
    engine, _, _ = station
    quote = engine.quote("station-42", "alice", readme_sale(), readme_benefits())
    engine.submit(quote_request(quote, quote.combinations[0], sale=quote.sale))


def test_the_snapshot_is_charged_after_the_time_cut_ended(station) -> None:
    engine, clock, _ = station
    clock.clock_ms = station_ms(13, 58)
    quote = engine.quote("station-42", "alice", readme_sale(), readme_benefits())
    clock.clock_ms = station_ms(14, 2)
    receipt = engine.submit(quote_request(quote, quote.combinations[0]))
    assert receipt.total_minor == 184_94


def test_a_quote_is_valid_until_its_expiry_excluded(station) -> None:
    engine, clock, _ = station
    quote = engine.quote("station-42", "alice", readme_sale(), readme_benefits())
    clock.clock_ms = quote.expires_at_ms - 1
    engine.submit(quote_request(quote, quote.combinations[0], no="ok"))
    clock.clock_ms = quote.expires_at_ms
    with pytest.raises(QuoteExpired) as error:
        engine.submit(quote_request(quote, quote.combinations[1], no="late"))
    assert error.value.code == "quote_expired"
    assert isinstance(error.value, QuoteRefused)
    with pytest.raises(Exception):  # noqa: B017 - nothing was created
        engine.find_order("station-42", "late")


def test_a_retry_of_an_accepted_submit_gets_its_receipt_after_expiry(station) -> None:
    engine, clock, _ = station
    quote = engine.quote("station-42", "alice", readme_sale(), readme_benefits())
    request = quote_request(quote, quote.combinations[0])
    receipt = engine.submit(request)
    clock.clock_ms = quote.expires_at_ms + 60_000
    assert engine.submit(request) == receipt


def test_an_unknown_quote_is_refused(station) -> None:
    engine, _, _ = station
    quote = engine.quote("station-42", "alice", readme_sale(), readme_benefits())
    request = replace(quote_request(quote, quote.combinations[0]),
                      quote=QuoteUse("no-such-quote", "c1"))
    with pytest.raises(UnknownQuote) as error:
        engine.submit(request)
    assert error.value.code == "unknown_quote" and isinstance(error.value, QuoteRefused)
    with pytest.raises(UnknownQuote):
        engine.get_quote("no-such-quote")


def mismatches(quote):
    best = quote.combinations[0]
    base = quote_request(quote, best)
    sale = quote.sale
    yield "another merchant", replace(base, merchant_id="station-43")
    yield "another user", replace(base, user_id="bob", vouchers=())
    yield "a combination it does not have", replace(base, quote=QuoteUse(quote.quote_id, "c99"))
    yield "another total", replace(base, total_minor=best.total_minor + 1,
                                   cash=CashPart(best.cash_minor + 1, "wechat"))
    yield "other points", replace(base, vouchers=(), cash=CashPart(best.total_minor, "wechat"))
    yield "another sale", replace(base, sale=replace(sale, pump=sale.pump + 1))


@pytest.mark.parametrize("case", ["another merchant", "another user",
                                  "a combination it does not have", "another total",
                                  "other points", "another sale"])
def test_a_submit_that_does_not_match_its_quote_is_quote_mismatch(station, case) -> None:
    engine, _, _ = station
    quote = engine.quote("station-42", "alice", readme_sale(), readme_benefits())
    request = dict(mismatches(quote))[case]
    with pytest.raises(QuoteMismatch) as error:
        engine.submit(request)
    assert error.value.code == "quote_mismatch"
    assert engine.get_account("alice/points").held == 0


def test_quotes_past_quotes_max_are_overloaded_and_expired_ones_make_room(
        tmp_path: Path) -> None:
    engine, clock, _ = open_station(tmp_path / "max.db", quotes_max=2)
    try:
        engine.quote("station-42", "alice", readme_sale())
        engine.quote("station-42", "alice", readme_sale())
        with pytest.raises(Overloaded):
            engine.quote("station-42", "alice", readme_sale())
        clock.clock_ms += 5 * 60_000
        engine.quote("station-42", "alice", readme_sale())
    finally:
        engine.shutdown()


def test_quotes_max_defaults_to_one_hundred_thousand() -> None:
    assert EngineConfig().quotes_max == 100_000
    assert DiscountRules().quote_ttl_ms == 5 * 60_000
    assert DiscountRules().combinations_max == 16
    assert DiscountRules().discount_share_max_ppm == 500_000
