"""Which rule applies (README: "Of several running cuts the largest applies"; the level cut
"stacks with the price cut if the price cut says with_level") and the cap's rounding."""

from __future__ import annotations

from pathlib import Path

from payengine import (
    Benefits,
    Coupon,
    CouponKind,
    DiscountRules,
    FuelLine,
    FuelSale,
    LevelCut,
    PriceCut,
)
from tests.blackbox_session4.support import open_station, readme_sale, station_ms


def best(tmp_path: Path, rules: DiscountRules, benefits: Benefits | None = None,
         sale: FuelSale | None = None, hour: int = 12):
    engine, _, _ = open_station(tmp_path / "x.db", station_ms(hour), rules)
    try:
        return engine.quote("station-42", "alice", sale or readme_sale(), benefits).combinations[0]
    finally:
        engine.shutdown()


def applied(combination) -> dict[str, int]:
    return {d.rule_id: d.amount_minor for d in combination.discounts}


def test_a_larger_cut_for_another_grade_does_not_hide_the_smaller_one(tmp_path: Path) -> None:
    rules = DiscountRules(price_cuts=(PriceCut("big92", 50, grades=frozenset({"92"})),
                                      PriceCut("small", 20)))
    assert applied(best(tmp_path, rules)) == {"small": 506}


def test_a_larger_cut_that_is_not_running_does_not_hide_the_smaller_one(tmp_path: Path) -> None:
    rules = DiscountRules(price_cuts=(PriceCut("night", 50, from_minute=22 * 60,
                                               to_minute=6 * 60),
                                      PriceCut("day", 20)))
    assert applied(best(tmp_path, rules, hour=12)) == {"day": 506}
    assert applied(best(tmp_path, rules, hour=23)) == {"night": 1_267}


def test_the_largest_price_cut_decides_whether_the_level_stacks(tmp_path: Path) -> None:
    rules = DiscountRules(price_cuts=(PriceCut("big", 30, with_level=False),
                                      PriceCut("small", 20, with_level=True)),
                          level_cuts=(LevelCut("gold", "gold", 15),))
    assert applied(best(tmp_path, rules, Benefits(level="gold"))) == {"big": 760}


def test_a_level_cut_applies_alone_when_no_price_cut_runs(tmp_path: Path) -> None:
    rules = DiscountRules(price_cuts=(PriceCut("noon", 20, from_minute=11 * 60,
                                               to_minute=14 * 60, with_level=False),),
                          level_cuts=(LevelCut("gold", "gold", 10),))
    assert applied(best(tmp_path, rules, Benefits(level="gold"), hour=20)) == {"gold": 253}


def test_the_cap_of_an_odd_gross_is_rounded_down(tmp_path: Path) -> None:
    sale = FuelSale("st-1", 1, 1, FuelLine.by_volume("95", 789, 25_350))
    assert sale.line.gross_minor == 200_01
    top = best(tmp_path, DiscountRules(), Benefits(coupons=(
        Coupon("k", CouponKind.FIXED, 150_00),)), sale=sale)
    assert top.discount_minor == 100_00 and top.total_minor == 100_01


def test_a_percent_coupon_capped_then_trimmed_to_the_share(tmp_path: Path) -> None:
    rules = DiscountRules(price_cuts=(PriceCut("p", 20),), discount_share_max_ppm=50_000)
    top = best(tmp_path, rules, Benefits(coupons=(
        Coupon("pc", CouponKind.PERCENT, 300_000, cap_minor=20_00),)))
    assert applied(top) == {"p": 506, "pc": 10_00 - 506}
