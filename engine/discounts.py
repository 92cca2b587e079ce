"""Discount combinations for a fuel sale, and the quote that snapshots them (R-FUEL).

While the user at the pump changes nozzle, amount and method, the station server asks which
discount combinations are possible: a per-litre price cut that runs at this time of day
(分时优惠), the membership level's cut, one of the user's coupons, points. ``make_quote`` is
that question as a pure function of the sale, the user's benefits, the configured rules and
the time: it returns every distinct combination (cheapest first, bounded) with what each
discount takes off, and a ``Quote`` with an id and an expiry. Nothing is ordered or held.

The quote is the snapshot: a submit that names it is charged the snapshot's amounts, even if
the time-based cut ended in between (the user saw the price before the boundary and said
yes). ``check_quote_use`` is that rule at submit: the quote must be the submitter's, still
valid, and the request's amounts the combination's.

Rounding, in the user's favour nowhere and the station's nowhere: a per-litre cut is the
cut times the volume, rounded down to the minor unit; a percentage coupon is rounded down;
the total discount never makes the order free (a payment of 0 is not a payment) and never
passes ``DiscountRules.discount_share_max_ppm`` of the gross.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeVar

from payengine.engine.checks import (
    check_bool,
    check_id,
    check_instance,
    check_int,
    check_parts,
    check_time_ms,
    shown,
)
from payengine.engine.errors import InvalidRequest, PaymentError
from payengine.engine.fuel import (
    ML_PER_L,
    FuelSale,
    check_fuel_sale,
    fuel_sale_from_json,
    fuel_sale_json,
)

PPM = 1_000_000
MINUTES_PER_DAY = 1_440
_MS_PER_MINUTE = 60_000
_MS_PER_DAY = 86_400_000

RULES_MAX = 64
"""Most price cuts, and most level cuts, in one rule set."""

COUPONS_MAX = 50
"""Most coupons of one user considered for one quote."""

COMBINATIONS_MAX = 64
"""Most combinations one quote may hold (``DiscountRules.combinations_max`` ≤ this)."""

QUOTE_TTL_MS_MAX = 30 * 60_000
"""Longest a quote may stay valid: half an hour (a user still at the pump)."""

POINT_VALUE_MINOR_MAX = 1_000_000
CUT_MINOR_PER_L_MAX = 1_000_000


class QuoteRefused(PaymentError):
    """A submit named a quote it may not use: nothing is created."""

    code = "quote_refused"


class UnknownQuote(QuoteRefused):
    """No quote has this id (never made, or pruned after it expired)."""

    code = "unknown_quote"


class QuoteExpired(QuoteRefused):
    """The quote's expiry has passed: ask for a new quote (the prices may have changed)."""

    code = "quote_expired"


class QuoteMismatch(QuoteRefused):
    """The quote is another merchant's or user's, has no such combination, or the request's
    amounts are not the combination's."""

    code = "quote_mismatch"


class CouponKind(enum.StrEnum):
    FIXED = "fixed"
    """``value`` minor units off (满减: at least ``threshold_minor`` of gross)."""
    PERCENT = "percent"
    """``value`` parts per million off the price after cuts (50,000 = 5 % off), at most
    ``cap_minor``."""


class DiscountKind(enum.StrEnum):
    PRICE_CUT = "price_cut"
    LEVEL_CUT = "level_cut"
    COUPON = "coupon"


@dataclass(frozen=True, slots=True)
class PriceCut:
    """A cut of ``cut_minor_per_l`` per litre while it runs: from ``from_minute`` to
    ``to_minute`` (minutes of the station's local day, end excluded; a window with
    ``from_minute > to_minute`` runs over midnight), on ``weekdays`` (0 = Monday; empty:
    every day), for ``grades`` (empty: every grade). ``with_level``: it stacks with the
    membership level's cut; otherwise the better of the two applies."""

    rule_id: str
    cut_minor_per_l: int
    grades: frozenset[str] = frozenset()
    from_minute: int = 0
    to_minute: int = MINUTES_PER_DAY
    weekdays: frozenset[int] = frozenset()
    with_level: bool = True


@dataclass(frozen=True, slots=True)
class LevelCut:
    """A cut of ``cut_minor_per_l`` per litre for members of ``level`` (定级)."""

    rule_id: str
    level: str
    cut_minor_per_l: int
    grades: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Coupon:
    """One of the user's coupons, as the marketing system lists it. At most one coupon per
    order; an ``exclusive`` one takes no price or level cut beside it. Redeeming it is the
    marketing system's job, told by the order's events."""

    coupon_id: str
    kind: CouponKind
    value: int
    threshold_minor: int = 0
    cap_minor: int | None = None
    grades: frozenset[str] = frozenset()
    exclusive: bool = False
    expires_at_ms: int | None = None


@dataclass(frozen=True, slots=True)
class PointsBalance:
    """The user's points account: ``balance`` whole points usable now, each worth
    ``minor_per_point``. Points pay as a voucher part on ``account_id``."""

    account_id: str
    balance: int
    minor_per_point: int


@dataclass(frozen=True, slots=True)
class Benefits:
    """What the user has: membership level, coupons, points."""

    level: str | None = None
    coupons: tuple[Coupon, ...] = ()
    points: PointsBalance | None = None


@dataclass(frozen=True, slots=True)
class DiscountRules:
    """The station's configured rules. ``utc_offset_minutes``: the station's local time
    (480 = UTC+8) for the time-of-day windows."""

    price_cuts: tuple[PriceCut, ...] = ()
    level_cuts: tuple[LevelCut, ...] = ()
    utc_offset_minutes: int = 480
    discount_share_max_ppm: int = 500_000
    """Most of the gross all discounts together may take off (default half)."""
    points_share_max_ppm: int = 1_000_000
    """Most of the total (after discounts) points may pay; default all of it but 0.01."""
    combinations_max: int = 16
    """Most combinations in one quote (the cheapest are kept)."""
    quote_ttl_ms: int = 5 * 60_000
    """How long a quote stays valid (default 5 minutes, at most ``QUOTE_TTL_MS_MAX``)."""


@dataclass(frozen=True, slots=True)
class AppliedDiscount:
    rule_id: str
    kind: DiscountKind
    amount_minor: int


@dataclass(frozen=True, slots=True)
class Combination:
    """One way to pay: ``gross_minor`` less ``discount_minor`` (the ``discounts``) is
    ``total_minor``, the order's total; of it ``points`` pay ``points_value_minor`` and
    ``cash_minor`` is left for cash and money vouchers."""

    combination_id: str
    discounts: tuple[AppliedDiscount, ...]
    gross_minor: int
    discount_minor: int
    total_minor: int
    points: int
    points_value_minor: int
    cash_minor: int

    @property
    def coupon_id(self) -> str | None:
        return next((d.rule_id for d in self.discounts if d.kind is DiscountKind.COUPON),
                    None)


@dataclass(frozen=True, slots=True)
class Quote:
    """The snapshot a submit may name, valid until ``expires_at_ms`` (exclusive)."""

    quote_id: str
    merchant_id: str
    user_id: str
    sale: FuelSale
    points_account_id: str | None
    created_at_ms: int
    expires_at_ms: int
    combinations: tuple[Combination, ...]

    def combination(self, combination_id: str) -> Combination:
        for combination in self.combinations:
            if combination.combination_id == combination_id:
                return combination
        raise QuoteMismatch(f"quote {self.quote_id} has no combination {combination_id!r}; "
                            f"it has {[c.combination_id for c in self.combinations]}")


# --------------------------------------------------------------------------- quoting


def make_quote(merchant_id: str, user_id: str, sale: FuelSale, benefits: Benefits,
               rules: DiscountRules, *, quote_id: str, now_ms: int) -> Quote:
    """Every distinct combination for ``sale`` at ``now_ms``, cheapest total first (then
    least cash), at most ``rules.combinations_max``. Raises ``InvalidRequest`` for bad
    input, before anything is computed."""
    check_id(merchant_id, "merchant_id")
    check_id(user_id, "user_id")
    check_id(quote_id, "quote_id")
    check_fuel_sale(sale)
    check_benefits(benefits)
    check_rules(rules)
    check_time_ms(now_ms, "now_ms")
    options = _options(sale, benefits, rules, now_ms)
    ranked = sorted(set(options), key=_rank)[: rules.combinations_max]
    combinations = tuple(_named(index, option) for index, option in enumerate(ranked, 1))
    points = benefits.points
    return Quote(quote_id, merchant_id, user_id, sale,
                 None if points is None else points.account_id, now_ms,
                 now_ms + rules.quote_ttl_ms, combinations)


_Cut = TypeVar("_Cut", PriceCut, LevelCut)

_Option = tuple[tuple[AppliedDiscount, ...], int, int, int, int, int]
"""(discounts, gross, discount, total, points, points value): a combination without its id."""


def _options(sale: FuelSale, benefits: Benefits, rules: DiscountRules, now_ms: int
             ) -> list[_Option]:
    line = sale.line
    cuts = _cuts(sale, benefits, rules, now_ms)
    coupons: list[Coupon | None] = [None]
    coupons += [c for c in benefits.coupons if _coupon_applies(c, line.grade,
                                                               line.gross_minor, now_ms)]
    options = []
    for coupon in coupons:
        applied = [] if coupon is not None and coupon.exclusive else list(cuts)
        after_cuts = line.gross_minor - sum(d.amount_minor for d in applied)
        if coupon is not None:
            applied.append(AppliedDiscount(coupon.coupon_id, DiscountKind.COUPON,
                                           _coupon_off(coupon, after_cuts)))
        discounts = _capped(applied, line.gross_minor, rules.discount_share_max_ppm)
        discount = sum(d.amount_minor for d in discounts)
        total = line.gross_minor - discount
        for points in _points_choices(total, benefits.points, rules.points_share_max_ppm):
            value = 0 if benefits.points is None else points * benefits.points.minor_per_point
            options.append((discounts, line.gross_minor, discount, total, points, value))
    return options


def _cuts(sale: FuelSale, benefits: Benefits, rules: DiscountRules, now_ms: int
          ) -> tuple[AppliedDiscount, ...]:
    """The best running price cut and the best level cut, both if they stack, else the
    larger (on a tie the price cut, by rule id)."""
    line = sale.line
    minute, weekday = local_minute_and_weekday(now_ms, rules.utc_offset_minutes)
    price = _best(c for c in rules.price_cuts
                   if _grade_ok(c.grades, line.grade) and _runs(c, minute, weekday))
    level = None if benefits.level is None else _best(
        c for c in rules.level_cuts
         if c.level == benefits.level and _grade_ok(c.grades, line.grade))
    chosen: list[PriceCut | LevelCut] = [c for c in (price, level) if c is not None]
    if price is not None and level is not None and not price.with_level:
        chosen = [price if price.cut_minor_per_l >= level.cut_minor_per_l else level]
    return tuple(
        AppliedDiscount(c.rule_id, DiscountKind.PRICE_CUT if isinstance(c, PriceCut)
                        else DiscountKind.LEVEL_CUT,
                        c.cut_minor_per_l * line.volume_ml // ML_PER_L)
        for c in chosen)


def _best(cuts: Iterable[_Cut]) -> _Cut | None:
    return max(cuts, key=lambda c: (c.cut_minor_per_l, c.rule_id), default=None)


def local_minute_and_weekday(now_ms: int, utc_offset_minutes: int) -> tuple[int, int]:
    """The minute of the local day (0..1439) and the weekday (0 = Monday) at ``now_ms``."""
    local_ms = now_ms + utc_offset_minutes * _MS_PER_MINUTE
    days = local_ms // _MS_PER_DAY
    return (local_ms % _MS_PER_DAY) // _MS_PER_MINUTE, (days + 3) % 7  # 1970-01-01: Thursday


def _runs(cut: PriceCut, minute: int, weekday: int) -> bool:
    if cut.weekdays and weekday not in cut.weekdays:
        return False
    if cut.from_minute < cut.to_minute:
        return cut.from_minute <= minute < cut.to_minute
    return minute >= cut.from_minute or minute < cut.to_minute


def _grade_ok(grades: frozenset[str], grade: str) -> bool:
    return not grades or grade in grades


def _coupon_applies(coupon: Coupon, grade: str, gross_minor: int, now_ms: int) -> bool:
    return (_grade_ok(coupon.grades, grade) and gross_minor >= coupon.threshold_minor
            and (coupon.expires_at_ms is None or now_ms < coupon.expires_at_ms))


def _coupon_off(coupon: Coupon, after_cuts_minor: int) -> int:
    if coupon.kind is CouponKind.FIXED:
        return coupon.value
    off = after_cuts_minor * coupon.value // PPM
    return off if coupon.cap_minor is None else min(off, coupon.cap_minor)


def _capped(applied: list[AppliedDiscount], gross_minor: int, share_max_ppm: int
            ) -> tuple[AppliedDiscount, ...]:
    """Trim the discounts, last applied first, to at most ``share_max_ppm`` of the gross and
    at most the gross less one minor unit; discounts trimmed to nothing are dropped."""
    room = min(gross_minor * share_max_ppm // PPM, gross_minor - 1)
    kept = []
    for discount in applied:
        amount = min(discount.amount_minor, room)
        room -= amount
        if amount > 0:
            kept.append(AppliedDiscount(discount.rule_id, discount.kind, amount))
    return tuple(kept)


def _points_choices(total_minor: int, points: PointsBalance | None, share_max_ppm: int
                    ) -> tuple[int, ...]:
    """No points, and the most points allowed (whole points, leaving at least one minor
    unit: an order paid by points alone still has a payment to make)."""
    if points is None:
        return (0,)
    value_max = min(total_minor * share_max_ppm // PPM, total_minor - 1)
    most = min(points.balance, value_max // points.minor_per_point)
    return (0, most) if most > 0 else (0,)


def _rank(option: _Option) -> tuple[int, int, int, str]:
    discounts, _gross, _discount, total, points, value = option
    return (total, total - value, points, "|".join(f"{d.kind}:{d.rule_id}" for d in discounts))


def _named(index: int, option: _Option) -> Combination:
    discounts, gross, discount, total, points, value = option
    return Combination(f"c{index}", discounts, gross, discount, total, points, value,
                       total - value)


# --------------------------------------------------------------------------- using a quote


def check_quote_use(quote: Quote, combination_id: str, *, merchant_id: str, user_id: str,
                    total_minor: int, points: int, now_ms: int) -> Combination:
    """The combination a submit may be charged, or a ``QuoteRefused``: the quote must be
    this merchant's and user's, unexpired at ``now_ms``, and the request's total and points
    the combination's (the snapshot's amounts, whatever the time is now)."""
    if quote.merchant_id != merchant_id or quote.user_id != user_id:
        raise QuoteMismatch(f"quote {quote.quote_id} was made for another merchant or user")
    if now_ms >= quote.expires_at_ms:
        raise QuoteExpired(f"quote {quote.quote_id} expired at {quote.expires_at_ms} "
                           f"(now {now_ms}): ask for a new quote")
    combination = quote.combination(combination_id)
    if total_minor != combination.total_minor or points != combination.points:
        raise QuoteMismatch(
            f"quote {quote.quote_id} {combination_id} is a total of "
            f"{combination.total_minor} with {combination.points} points; the request has "
            f"{total_minor} with {points} points")
    return combination


# --------------------------------------------------------------------------- checks


def check_rules(value: object, what: str = "discount rules") -> DiscountRules:
    """Return ``value`` if it is well-formed ``DiscountRules``; ``InvalidRequest`` otherwise."""
    rules = check_instance(value, DiscountRules, what)
    price_cuts = check_parts(rules.price_cuts, PriceCut, f"{what} price_cuts", RULES_MAX)
    level_cuts = check_parts(rules.level_cuts, LevelCut, f"{what} level_cuts", RULES_MAX)
    for index, cut in enumerate(price_cuts):
        _check_price_cut(cut, f"{what} price_cuts[{index}]")
    for index, level in enumerate(level_cuts):
        check_id(level.rule_id, f"{what} level_cuts[{index}] rule_id")
        check_id(level.level, f"{what} level_cuts[{index}] level")
        check_int(level.cut_minor_per_l, f"{what} level_cuts[{index}] cut_minor_per_l", 1,
                   CUT_MINOR_PER_L_MAX)
        _check_grades(level.grades, f"{what} level_cuts[{index}] grades")
    _check_unique([c.rule_id for c in price_cuts] + [c.rule_id for c in level_cuts],
                  f"{what} rule_id")
    check_int(rules.utc_offset_minutes, f"{what} utc_offset_minutes", -720, 840)
    check_int(rules.discount_share_max_ppm, f"{what} discount_share_max_ppm", 0, PPM)
    check_int(rules.points_share_max_ppm, f"{what} points_share_max_ppm", 0, PPM)
    check_int(rules.combinations_max, f"{what} combinations_max", 1, COMBINATIONS_MAX)
    check_int(rules.quote_ttl_ms, f"{what} quote_ttl_ms", 1, QUOTE_TTL_MS_MAX)
    return rules


def check_benefits(value: object, what: str = "benefits") -> Benefits:
    """Return ``value`` if it is well-formed ``Benefits``; ``InvalidRequest`` otherwise."""
    benefits = check_instance(value, Benefits, what)
    if benefits.level is not None:
        check_id(benefits.level, f"{what} level")
    coupons = check_parts(benefits.coupons, Coupon, f"{what} coupons", COUPONS_MAX)
    for index, coupon in enumerate(coupons):
        _check_coupon(coupon, f"{what} coupons[{index}]")
    _check_unique([c.coupon_id for c in coupons], f"{what} coupon_id")
    if benefits.points is not None:
        points = check_instance(benefits.points, PointsBalance, f"{what} points")
        check_id(points.account_id, f"{what} points account_id")
        check_int(points.balance, f"{what} points balance", 0, 10**15)
        check_int(points.minor_per_point, f"{what} points minor_per_point", 1,
                   POINT_VALUE_MINOR_MAX)
    return benefits


def _check_price_cut(cut: PriceCut, what: str) -> None:
    check_id(cut.rule_id, f"{what} rule_id")
    check_int(cut.cut_minor_per_l, f"{what} cut_minor_per_l", 1, CUT_MINOR_PER_L_MAX)
    _check_grades(cut.grades, f"{what} grades")
    check_int(cut.from_minute, f"{what} from_minute", 0, MINUTES_PER_DAY - 1)
    check_int(cut.to_minute, f"{what} to_minute", 1, MINUTES_PER_DAY)
    if cut.from_minute == cut.to_minute:
        raise InvalidRequest(f"{what}: from_minute equals to_minute ({cut.from_minute}): "
                             "an empty window (0 to 1440 is the whole day)")
    if not isinstance(cut.weekdays, frozenset) or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= 6
            for d in cut.weekdays):
        raise InvalidRequest(f"{what} weekdays must be a frozenset of 0..6 (0 = Monday), "
                             f"got {shown(cut.weekdays)}")
    check_bool(cut.with_level, f"{what} with_level")


def _check_coupon(coupon: Coupon, what: str) -> None:
    check_id(coupon.coupon_id, f"{what} coupon_id")
    if not isinstance(coupon.kind, CouponKind):
        raise InvalidRequest(f"{what} kind must be a CouponKind, got {shown(coupon.kind)}")
    if coupon.kind is CouponKind.PERCENT:
        check_int(coupon.value, f"{what} value (ppm off)", 1, PPM)
    else:
        check_int(coupon.value, f"{what} value (minor units off)", 1, 10**15)
        if coupon.cap_minor is not None:
            raise InvalidRequest(f"{what}: cap_minor is for percent coupons")
    check_int(coupon.threshold_minor, f"{what} threshold_minor", 0, 10**15)
    if coupon.cap_minor is not None:
        check_int(coupon.cap_minor, f"{what} cap_minor", 1, 10**15)
    _check_grades(coupon.grades, f"{what} grades")
    check_bool(coupon.exclusive, f"{what} exclusive")
    if coupon.expires_at_ms is not None:
        check_time_ms(coupon.expires_at_ms, f"{what} expires_at_ms")


def _check_grades(grades: object, what: str) -> None:
    if not isinstance(grades, frozenset) or len(grades) > RULES_MAX:
        raise InvalidRequest(f"{what} must be a frozenset of at most {RULES_MAX} grades, got "
                             f"{shown(grades)}")
    for grade in grades:
        check_id(grade, f"{what} item")


def _check_unique(ids: list[str], what: str) -> None:
    seen: set[str] = set()
    for item in ids:
        if item in seen:
            raise InvalidRequest(f"{what} {item!r} appears twice")
        seen.add(item)


# --------------------------------------------------------------------------- kept with orders


@dataclass(frozen=True, slots=True)
class QuoteUse:
    """A submit's choice: combination ``combination_id`` of quote ``quote_id``."""

    quote_id: str
    combination_id: str


@dataclass(frozen=True, slots=True)
class PricedSale:
    """What an order sold and at which terms, kept with it for its events and reports: the
    sale, and (when the submit named a quote) the quote, the combination and its discounts."""

    sale: FuelSale
    quote_id: str | None = None
    combination_id: str | None = None
    discounts: tuple[AppliedDiscount, ...] = ()

    @property
    def discount_minor(self) -> int:
        return sum(d.amount_minor for d in self.discounts)


def priced_sale_json(priced: PricedSale | None) -> dict[str, object] | None:
    """``priced`` as plain JSON values (stored with the order)."""
    if priced is None:
        return None
    return {"sale": fuel_sale_json(priced.sale), "quote_id": priced.quote_id,
            "combination_id": priced.combination_id,
            "discounts": [[d.rule_id, d.kind.value, d.amount_minor] for d in priced.discounts]}


def priced_sale_from_json(stored: object) -> PricedSale | None:
    """The inverse of ``priced_sale_json``; a malformed row fails loudly (it was ours)."""
    if stored is None:
        return None
    assert isinstance(stored, dict), stored
    sale = fuel_sale_from_json(stored["sale"])
    assert sale is not None
    return PricedSale(sale, stored["quote_id"], stored["combination_id"],
                      tuple(AppliedDiscount(rule_id, DiscountKind(kind), amount)
                            for rule_id, kind, amount in stored["discounts"]))


def quote_json(quote: Quote) -> dict[str, object]:
    """``quote`` as plain JSON values (the stored snapshot)."""
    return {"quote_id": quote.quote_id, "merchant_id": quote.merchant_id,
            "user_id": quote.user_id, "sale": fuel_sale_json(quote.sale),
            "points_account_id": quote.points_account_id,
            "created_at_ms": quote.created_at_ms, "expires_at_ms": quote.expires_at_ms,
            "combinations": [
                [c.combination_id, [[d.rule_id, d.kind.value, d.amount_minor]
                                    for d in c.discounts],
                 c.gross_minor, c.discount_minor, c.total_minor, c.points,
                 c.points_value_minor, c.cash_minor] for c in quote.combinations]}


def quote_from_json(stored: dict[str, object]) -> Quote:
    """The inverse of ``quote_json``."""
    sale = fuel_sale_from_json(stored["sale"])
    assert sale is not None
    rows = stored["combinations"]
    assert isinstance(rows, list)
    combinations = tuple(
        Combination(cid, tuple(AppliedDiscount(r, DiscountKind(k), a) for r, k, a in ds),
                    gross, discount, total, points, value, cash)
        for cid, ds, gross, discount, total, points, value, cash in rows)
    return Quote(str(stored["quote_id"]), str(stored["merchant_id"]), str(stored["user_id"]),
                 sale, _optional_str(stored["points_account_id"]),
                 _int(stored["created_at_ms"]), _int(stored["expires_at_ms"]), combinations)


def _optional_str(value: object) -> str | None:
    assert value is None or isinstance(value, str), value
    return value


def _int(value: object) -> int:
    assert isinstance(value, int), value
    return value
