"""Discount combinations and quote snapshots (engine.discounts, engine.fuel): exact figures
for one station's rules, the time-of-day boundary, and properties over any input."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from payengine.engine.discounts import (
    Benefits,
    Coupon,
    CouponKind,
    DiscountKind,
    DiscountRules,
    LevelCut,
    PointsBalance,
    PriceCut,
    QuoteExpired,
    QuoteMismatch,
    check_quote_use,
    local_minute_and_weekday,
    make_quote,
)
from payengine.engine.errors import InvalidRequest
from payengine.engine.fuel import (
    FuelLine,
    FuelSale,
    check_fuel_sale,
    fuel_sale_from_json,
    fuel_sale_json,
    price_of_volume,
)

CST = dt.timezone(dt.timedelta(hours=8))


def at(hour: int, minute: int, second: int = 0, day: int = 1) -> int:
    """Epoch ms of 2026-12-<day> hour:minute:second at the station (UTC+8)."""
    when = dt.datetime(2026, 12, day, hour, minute, second, tzinfo=CST)
    return int(when.timestamp() * 1000)


RULES = DiscountRules(
    price_cuts=(PriceCut("night", 30, from_minute=22 * 60, to_minute=6 * 60),
                PriceCut("noon", 20, grades=frozenset({"95"}), from_minute=11 * 60,
                         to_minute=14 * 60, with_level=False)),
    level_cuts=(LevelCut("gold", "gold", 10),),
)
BENEFITS = Benefits(
    level="gold",
    coupons=(Coupon("fixed-10", CouponKind.FIXED, 1000, threshold_minor=15000),
             Coupon("pct-5", CouponKind.PERCENT, 50_000, cap_minor=800),
             Coupon("excl-15", CouponKind.FIXED, 1500, exclusive=True)),
    points=PointsBalance("alice/points", 100, 10),
)
SALE = FuelSale("st-1", 3, 2, FuelLine.by_amount("95", 789, 20000), terminal_id="t-3",
                cashier_id="cs-9", shift_id="2026-12-01/A")


def quote_at(now_ms: int, benefits: Benefits = BENEFITS, rules: DiscountRules = RULES):
    return make_quote("m-1", "alice", SALE, benefits, rules, quote_id="q-1", now_ms=now_ms)


def test_a_line_by_amount_buys_the_volume_rounded_down_and_by_volume_is_priced_half_up():
    assert FuelLine.by_amount("95", 789, 20000).volume_ml == 25348
    assert FuelLine.by_volume("95", 789, 40000).gross_minor == 31560
    assert price_of_volume(1, 500) == 1 and price_of_volume(1, 499) == 0


@pytest.mark.parametrize("unit_price_minor", [0, -1, 1_000_001])
def test_a_line_by_amount_at_a_unit_price_out_of_range_is_an_invalid_request(
        unit_price_minor: int) -> None:
    with pytest.raises(InvalidRequest, match="unit_price_minor"):
        FuelLine.by_amount("95", unit_price_minor, 100)


def test_a_line_whose_amount_and_volume_disagree_is_refused():
    with pytest.raises(InvalidRequest, match="41000 ml at 789 a litre is 32349"):
        check_fuel_sale(FuelSale("st-1", 1, 1, FuelLine("95", 789, 41000, 31560)))


@pytest.mark.parametrize("field, value", [("pump", 0), ("nozzle", 100), ("pump", True),
                                          ("station_id", ""), ("shift_id", "a\nb")])
def test_a_sale_with_a_bad_field_is_refused(field: str, value: object):
    values = {"station_id": "st-1", "pump": 1, "nozzle": 1, "shift_id": None}
    values[field] = value
    with pytest.raises(InvalidRequest, match=field):
        check_fuel_sale(FuelSale(values["station_id"], values["pump"],  # type: ignore[arg-type]
                                 values["nozzle"], FuelLine.by_volume("95", 789, 1000),  # type: ignore[arg-type]
                                 shift_id=values["shift_id"]))  # type: ignore[arg-type]


def test_a_sale_survives_its_json_round_trip():
    assert fuel_sale_from_json(fuel_sale_json(SALE)) == SALE
    assert fuel_sale_from_json(None) is None


def test_the_local_clock_knows_the_weekday_and_minute():
    assert local_minute_and_weekday(at(13, 59), 480) == (13 * 60 + 59, 1)  # a Tuesday


def test_at_noon_the_noon_cut_beats_the_level_cut_and_every_combination_is_listed():
    quote = quote_at(at(13, 59))
    rows = [(c.combination_id, c.coupon_id, c.discount_minor, c.total_minor, c.points,
             c.cash_minor) for c in quote.combinations]
    assert rows == [
        ("c1", "fixed-10", 1506, 18494, 100, 17494),
        ("c2", "fixed-10", 1506, 18494, 0, 18494),
        ("c3", "excl-15", 1500, 18500, 100, 17500),
        ("c4", "excl-15", 1500, 18500, 0, 18500),
        ("c5", "pct-5", 1306, 18694, 100, 17694),
        ("c6", "pct-5", 1306, 18694, 0, 18694),
        ("c7", None, 506, 19494, 100, 18494),
        ("c8", None, 506, 19494, 0, 19494),
    ]
    assert quote.combinations[0].discounts[0].rule_id == "noon"
    assert [d.kind for d in quote.combinations[2].discounts] == [DiscountKind.COUPON]
    assert quote.expires_at_ms == at(14, 4)


def test_one_minute_later_the_noon_cut_has_ended_and_the_level_cut_applies():
    cheapest_plain = [c for c in quote_at(at(14, 0)).combinations if c.coupon_id is None]
    assert [(d.rule_id, d.amount_minor) for d in cheapest_plain[0].discounts] == [("gold", 253)]


def test_a_cut_over_midnight_runs_from_its_start_until_its_end():
    def night_cut(now_ms: int) -> list[str]:
        plain = quote_at(now_ms, Benefits()).combinations[-1]
        return [d.rule_id for d in plain.discounts]
    assert night_cut(at(21, 59)) == []
    assert night_cut(at(22, 0)) == ["night"]
    assert night_cut(at(5, 59)) == ["night"]
    assert night_cut(at(6, 0)) == []


def test_a_submit_is_charged_the_snapshot_even_after_the_time_cut_ended():
    quote = quote_at(at(13, 59))
    used = check_quote_use(quote, "c8", merchant_id="m-1", user_id="alice",
                           total_minor=19494, points=0, now_ms=at(14, 3))
    assert used.total_minor == 19494 and used.discounts[0].rule_id == "noon"


def test_an_expired_quote_is_refused_from_its_expiry_on():
    quote = quote_at(at(13, 59))
    check_quote_use(quote, "c8", merchant_id="m-1", user_id="alice", total_minor=19494,
                    points=0, now_ms=quote.expires_at_ms - 1)
    with pytest.raises(QuoteExpired):
        check_quote_use(quote, "c8", merchant_id="m-1", user_id="alice", total_minor=19494,
                        points=0, now_ms=quote.expires_at_ms)


@pytest.mark.parametrize("merchant, user, combination, total, points", [
    ("m-2", "alice", "c8", 19494, 0), ("m-1", "bob", "c8", 19494, 0),
    ("m-1", "alice", "c99", 19494, 0), ("m-1", "alice", "c8", 19493, 0),
    ("m-1", "alice", "c7", 19494, 0)])
def test_a_foreign_quote_or_other_amounts_are_refused(merchant, user, combination, total,
                                                      points):
    with pytest.raises(QuoteMismatch):
        check_quote_use(quote_at(at(13, 59)), combination, merchant_id=merchant,
                        user_id=user, total_minor=total, points=points, now_ms=at(14, 0))


def test_discounts_never_pass_their_share_of_the_gross():
    big = Benefits(coupons=(Coupon("huge", CouponKind.FIXED, 10**9),))
    rules = DiscountRules(discount_share_max_ppm=300_000)
    huge = next(c for c in quote_at(at(9, 0), big, rules).combinations if c.coupon_id)
    assert huge.discount_minor == 6000 and huge.total_minor == 14000


def test_a_coupon_below_its_threshold_or_expired_is_not_offered():
    coupons = (Coupon("t", CouponKind.FIXED, 100, threshold_minor=20001),
               Coupon("e", CouponKind.FIXED, 100, expires_at_ms=at(9, 0)))
    quote = quote_at(at(9, 0), Benefits(coupons=coupons))
    assert [c.coupon_id for c in quote.combinations] == [None]


@pytest.mark.parametrize("rules", [
    DiscountRules(price_cuts=(PriceCut("x", 1, from_minute=60, to_minute=60),)),
    DiscountRules(price_cuts=(PriceCut("x", 1), PriceCut("x", 2))),
    DiscountRules(combinations_max=0), DiscountRules(quote_ttl_ms=31 * 60_000),
    DiscountRules(price_cuts=(PriceCut("x", 1, weekdays=frozenset({7})),)),
])
def test_bad_rules_are_refused(rules: DiscountRules):
    with pytest.raises(InvalidRequest):
        quote_at(at(9, 0), rules=rules)


# --------------------------------------------------------------------------- properties

grades = st.sampled_from(["92", "95", "98", "0"])
coupons = st.builds(
    Coupon, coupon_id=st.text("abcdef", min_size=1, max_size=4), kind=st.just(CouponKind.FIXED),
    value=st.integers(1, 50_000), threshold_minor=st.integers(0, 30_000),
    exclusive=st.booleans()) | st.builds(
    Coupon, coupon_id=st.text("ghijk", min_size=1, max_size=4), kind=st.just(CouponKind.PERCENT),
    value=st.integers(1, 1_000_000), cap_minor=st.none() | st.integers(1, 5000),
    grades=st.frozensets(grades, max_size=2))
benefit_sets = st.builds(
    Benefits, level=st.none() | st.sampled_from(["gold", "silver"]),
    coupons=st.lists(coupons, max_size=6, unique_by=lambda c: c.coupon_id).map(tuple),
    points=st.none() | st.builds(PointsBalance, st.just("u/points"), st.integers(0, 10_000),
                                 st.integers(1, 100)))
rule_sets = st.builds(
    DiscountRules,
    price_cuts=st.lists(st.builds(PriceCut, st.sampled_from(["p1", "p2", "p3"]),
                                  st.integers(1, 500), st.frozensets(grades, max_size=2),
                                  st.integers(0, 1439), st.integers(1, 1440)
                                  ).filter(lambda c: c.from_minute != c.to_minute),
                        max_size=3, unique_by=lambda c: c.rule_id).map(tuple),
    level_cuts=st.lists(st.builds(LevelCut, st.sampled_from(["l1", "l2"]),
                                  st.sampled_from(["gold", "silver"]), st.integers(1, 300)),
                        max_size=2, unique_by=lambda c: c.rule_id).map(tuple),
    discount_share_max_ppm=st.integers(0, 1_000_000),
    points_share_max_ppm=st.integers(0, 1_000_000), combinations_max=st.integers(1, 64))
sales = st.builds(lambda grade, price, amount: FuelSale("st", 1, 1, FuelLine.by_amount(
    grade, price, amount)), grades, st.integers(300, 1200), st.integers(100, 200_000))


@settings(max_examples=300, deadline=None)
@given(sales, benefit_sets, rule_sets, st.integers(0, 2 * 10**12))
def test_every_combination_adds_up_and_stays_within_its_caps(sale, benefits, rules, now_ms):
    quote = make_quote("m", "u", sale, benefits, rules, quote_id="q", now_ms=now_ms)
    gross = sale.line.gross_minor
    assert 1 <= len(quote.combinations) <= rules.combinations_max
    assert len({c.combination_id for c in quote.combinations}) == len(quote.combinations)
    keys = [(c.total_minor, c.cash_minor) for c in quote.combinations]
    assert keys == sorted(keys)
    for c in quote.combinations:
        assert c.gross_minor == gross
        assert c.discount_minor == sum(d.amount_minor for d in c.discounts)
        assert c.total_minor == gross - c.discount_minor >= 1
        assert c.discount_minor <= gross * rules.discount_share_max_ppm // 1_000_000
        assert all(d.amount_minor > 0 for d in c.discounts)
        assert sum(d.kind is DiscountKind.COUPON for d in c.discounts) <= 1
        assert c.cash_minor == c.total_minor - c.points_value_minor >= 1
        if benefits.points is None:
            assert c.points == 0
        else:
            assert c.points <= benefits.points.balance
            assert c.points_value_minor == c.points * benefits.points.minor_per_point
        if c.coupon_id is not None:
            coupon = next(x for x in benefits.coupons if x.coupon_id == c.coupon_id)
            assert gross >= coupon.threshold_minor
            if coupon.exclusive:
                assert len(c.discounts) == 1
    again = make_quote("m", "u", sale, benefits, rules, quote_id="q", now_ms=now_ms)
    assert again == quote


@settings(max_examples=200, deadline=None)
@given(sales, benefit_sets, rule_sets, st.integers(0, 2 * 10**12), st.data())
def test_a_quote_is_usable_exactly_for_its_own_amounts_until_it_expires(
        sale, benefits, rules, now_ms, data):
    quote = make_quote("m", "u", sale, benefits, rules, quote_id="q", now_ms=now_ms)
    chosen = data.draw(st.sampled_from(quote.combinations))
    later = data.draw(st.integers(now_ms, now_ms + 2 * rules.quote_ttl_ms))
    use = dict(merchant_id="m", user_id="u", total_minor=chosen.total_minor,
               points=chosen.points, now_ms=later)
    if later < quote.expires_at_ms:
        assert check_quote_use(quote, chosen.combination_id, **use) == chosen
        with pytest.raises(QuoteMismatch):
            check_quote_use(quote, chosen.combination_id,
                            **{**use, "total_minor": chosen.total_minor + 1})
    else:
        with pytest.raises(QuoteExpired):
            check_quote_use(quote, chosen.combination_id, **use)
