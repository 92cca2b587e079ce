"""Shared setup for the session-4 black-box tests: an engine on a clock the test sets, a
scripted wallet, and the README's own rules and benefits."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

from payengine import (
    Benefits,
    CashPart,
    Coupon,
    CouponKind,
    DiscountRules,
    Engine,
    EngineConfig,
    FuelLine,
    FuelSale,
    LevelCut,
    OrderPolicy,
    PaymentRequest,
    PointsBalance,
    PriceCut,
    QuoteUse,
    VoucherPart,
)
from tests.helpers import ScriptedChannel, paid_reply, signed_callback, wait_for
from tests.test_quotes_engine import SetClock

STATION_TZ = timezone(timedelta(hours=8))

# The README's example rules and benefits.
README_RULES = DiscountRules(
    price_cuts=(PriceCut("noon", 20, grades=frozenset({"95"}), from_minute=11 * 60,
                         to_minute=14 * 60, with_level=False),),
    level_cuts=(LevelCut("gold", "gold", 10),))


def readme_sale(**kw: object) -> FuelSale:
    return FuelSale("st-1", pump=3, nozzle=2, line=FuelLine.by_amount("95", 789, 200_00),
                    **kw)  # type: ignore[arg-type]


def readme_benefits(balance: int = 100) -> Benefits:
    return Benefits(
        level="gold",
        coupons=(Coupon("fixed-10", CouponKind.FIXED, 10_00, threshold_minor=150_00),),
        points=PointsBalance("alice/points", balance=balance, minor_per_point=10))


def station_ms(hour: int, minute: int = 0, day: int = 1) -> int:
    """Epoch ms of ``hour:minute`` station time (UTC+8) on 2026-12-``day`` (the 1st is a
    Tuesday)."""
    return int(datetime(2026, 12, day, hour, minute, tzinfo=STATION_TZ).timestamp() * 1000)


POLICY = OrderPolicy(pay_window_ms=60_000, query_schedule_ms=(60_000,),
                     refund_query_schedule_ms=(60_000,))


def open_station(path: Path, clock_ms: int | None = None, rules: DiscountRules = README_RULES,
                 channel: ScriptedChannel | None = None, subscribers: dict | None = None,
                 **config: object
                 ) -> tuple[Engine, SetClock, ScriptedChannel]:
    clock = SetClock(clock_ms if clock_ms is not None else station_ms(13))
    wechat = channel or ScriptedChannel("wechat")
    config.setdefault("duplicate_guard_window_ms", 0)
    engine = Engine.open(path, channels=[wechat], runtime=clock, policy=POLICY,
                         subscribers=subscribers,
                         config=EngineConfig(discounts=rules, **config))  # type: ignore[arg-type]
    engine.open_account("alice/points", "POINTS", minor_per_unit=10)
    engine.open_account("alice/gold-points", "POINTS", minor_per_unit=100)
    engine.fund("alice/points", 5_000, funding_id="alice-pts")
    return engine, clock, wechat


def quote_request(quote, combination, no: str = "pump3-000188", user: str = "alice",
                  merchant: str = "station-42", **kw: object) -> PaymentRequest:
    """The README's submit of a quote's combination: cash for the rest, points for points."""
    vouchers = ((VoucherPart(quote.points_account_id or "alice/points", combination.points),)
                if combination.points else ())
    return PaymentRequest(merchant, no, user, "CNY", combination.total_minor, "95 fuel",
                          CashPart(combination.cash_minor, "wechat"), vouchers,
                          quote=QuoteUse(quote.quote_id, combination.combination_id),
                          **kw)  # type: ignore[arg-type]


def pay(engine: Engine, receipt) -> None:
    """The wallet says the order is paid; wait until it settled."""
    wait_for(lambda: engine.get_order(receipt.order_id).state in ("paying", "succeeded"),
             what="holds placed")
    signed_callback(engine, "wechat", receipt.payment_serial, paid_reply(receipt.payment_serial))
    wait_for(lambda: (o := engine.get_order(receipt.order_id)).settled and o.state == "succeeded",
             what="paid and settled")
