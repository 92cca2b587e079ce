"""Quotes through the engine (issue 12, items 1 and 2): ``Engine.quote`` stores a snapshot,
a submit naming it is charged its amounts after a time-of-day cut ended, an expired, foreign
or altered use is refused with nothing created, and the order keeps its sale and terms."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from payengine import (
    CashPart,
    Engine,
    EngineConfig,
    InvalidRequest,
    PaymentRequest,
    UnknownAccount,
    UnknownOrder,
)
from payengine.actors.pool import PooledRuntime
from payengine.engine.discounts import (
    Benefits,
    Coupon,
    CouponKind,
    DiscountRules,
    LevelCut,
    PointsBalance,
    PriceCut,
    QuoteExpired,
    QuoteMismatch,
    QuoteUse,
    UnknownQuote,
)
from payengine.engine.errors import Overloaded
from payengine.engine.fuel import FuelLine, FuelSale
from payengine.engine.order import LegMode, VoucherPart
from payengine.persistence.outbox import OutboxEvent
from tests.helpers import ScriptedChannel, paid_reply, signed_callback, wait_for
from tests.test_discounts import at

RULES = DiscountRules(price_cuts=(PriceCut("noon", 20, from_minute=11 * 60,
                                           to_minute=14 * 60),))
SALE = FuelSale("st-1", 3, 2, FuelLine.by_amount("95", 789, 20000), cashier_id="cs-9",
                shift_id="2026-12-01/A")


class SetClock(PooledRuntime):
    """The production runtime with a clock the test sets."""

    def __init__(self, now_ms: int) -> None:
        self.clock_ms = now_ms
        super().__init__()

    def now_ms(self) -> int:
        return self.clock_ms


@pytest.fixture
def station(tmp_path: Path):
    clock = SetClock(at(13, 59))
    wechat = ScriptedChannel("wechat")
    engine = Engine.open(tmp_path / "q.db", channels=[wechat], runtime=clock,
                         config=EngineConfig(discounts=RULES, duplicate_guard_window_ms=0,
                                             quotes_max=3))
    yield engine, clock, wechat
    engine.shutdown()


def request_for(quote_id: str, combination_id: str, total: int, no: str = "n-1"
                ) -> PaymentRequest:
    return PaymentRequest("m-1", no, "alice", "CNY", total, "95 fuel", CashPart(total, "wechat"),
                          quote=QuoteUse(quote_id, combination_id))


def test_a_submit_after_the_cut_ended_is_charged_the_snapshot_and_keeps_its_terms(station):
    engine, clock, _ = station
    quote = engine.quote("m-1", "alice", SALE)
    (only,) = quote.combinations
    assert (only.total_minor, only.discounts[0].rule_id) == (19494, "noon")
    clock.clock_ms = at(14, 2)  # the noon cut ended two minutes ago
    receipt = engine.submit(request_for(quote.quote_id, "c1", 19494))
    order = engine.get_order(receipt.order_id)
    assert order.total_minor == 19494
    assert order.sale is not None and order.sale.sale == SALE
    assert (order.sale.quote_id, order.sale.combination_id) == (quote.quote_id, "c1")
    assert order.sale.discount_minor == 506
    wait_for(lambda: engine.get_order(receipt.order_id).state == "paying", what="paying")
    signed_callback(engine, "wechat", order.payment_serial, paid_reply(order.payment_serial))
    wait_for(lambda: engine.get_order(receipt.order_id).state == "succeeded", what="paid")


def test_an_expired_quote_is_refused_and_creates_nothing_but_a_retry_gets_its_receipt(station):
    engine, clock, _ = station
    quote = engine.quote("m-1", "alice", SALE)
    first = engine.submit(request_for(quote.quote_id, "c1", 19494))
    clock.clock_ms = quote.expires_at_ms
    assert engine.submit(request_for(quote.quote_id, "c1", 19494)) == first
    with pytest.raises(QuoteExpired):
        engine.submit(request_for(quote.quote_id, "c1", 19494, no="n-2"))
    with pytest.raises(UnknownOrder):
        engine.find_order("m-1", "n-2")


@pytest.mark.parametrize("change, error", [
    ({"user_id": "bob"}, QuoteMismatch), ({"merchant_id": "m-2"}, QuoteMismatch),
    ({"total_minor": 20000, "cash": CashPart(20000, "wechat")}, QuoteMismatch),
    ({"quote": QuoteUse("quote-nope", "c1")}, UnknownQuote),
    ({"quote": None}, None),
])
def test_a_foreign_or_altered_use_of_a_quote_is_refused(station, change, error):
    engine, _, _ = station
    quote = engine.quote("m-1", "alice", SALE)
    request = replace(request_for(quote.quote_id, "c1", 19494), **change)
    if error is None:  # without the quote the same request is an ordinary payment
        assert engine.get_order(engine.submit(request).order_id).sale is None
        return
    with pytest.raises(error):
        engine.submit(request)


def test_a_request_whose_sale_is_not_the_quotes_is_refused(station):
    engine, _, _ = station
    quote = engine.quote("m-1", "alice", SALE)
    other = replace(SALE, pump=4)
    with pytest.raises(QuoteMismatch, match="sale"):
        engine.submit(replace(request_for(quote.quote_id, "c1", 19494), sale=other))


def test_points_in_a_combination_must_be_paid_as_points(station):
    engine, _, _ = station
    engine.open_account("alice/points", "POINTS", minor_per_unit=10)
    engine.fund("alice/points", 500, funding_id="f-1")
    quote = engine.quote("m-1", "alice", SALE, Benefits(
        coupons=(Coupon("ten", CouponKind.FIXED, 1000),),
        points=PointsBalance("alice/points", 100, 10)))
    best = quote.combinations[0]
    assert (best.coupon_id, best.points, best.cash_minor) == ("ten", 100, 17494)
    with pytest.raises(QuoteMismatch, match="100 points"):
        engine.submit(request_for(quote.quote_id, best.combination_id, best.total_minor))
    receipt = engine.submit(replace(
        request_for(quote.quote_id, best.combination_id, best.total_minor),
        cash=CashPart(best.cash_minor, "wechat"),
        vouchers=(VoucherPart("alice/points", 100, LegMode.PRE_DEDUCT),)))
    assert engine.get_order(receipt.order_id).sale.combination_id == best.combination_id


def test_quotes_are_bounded_and_expired_ones_make_room(station):
    engine, clock, _ = station
    for _ in range(3):
        engine.quote("m-1", "alice", SALE)
    with pytest.raises(Overloaded, match="quotes_max"):
        engine.quote("m-1", "alice", SALE)
    clock.clock_ms += RULES.quote_ttl_ms
    fresh = engine.quote("m-1", "alice", SALE)
    assert engine.get_quote(fresh.quote_id) == fresh


def test_an_order_keeps_its_sale_across_a_reopen(tmp_path: Path):
    wechat = ScriptedChannel("wechat")
    sale_only = PaymentRequest("m-1", "n-9", "alice", "CNY", 20000, "95 fuel",
                               CashPart(20000, "wechat"), sale=SALE)
    with Engine.open(tmp_path / "r.db", channels=[wechat]) as engine:
        order_id = engine.submit(sale_only).order_id
    with Engine.open(tmp_path / "r.db", channels=[wechat]) as engine:
        kept = engine.get_order(order_id).sale
        assert kept is not None and kept.sale == SALE and kept.discounts == ()


@pytest.mark.parametrize("hour, figures", [(13, (18494, 100, 17494)),
                                           (15, (18747, 100, 17747))])
def test_the_readme_example_gives_the_figures_it_prints(tmp_path: Path, hour, figures):
    rules = DiscountRules(
        price_cuts=(PriceCut("noon", 20, grades=frozenset({"95"}), from_minute=11 * 60,
                             to_minute=14 * 60, with_level=False),),
        level_cuts=(LevelCut("gold", "gold", 10),))
    engine = Engine.open(tmp_path / "s.db", channels=[ScriptedChannel("wechat")],
                         runtime=SetClock(at(hour, 0)), config=EngineConfig(discounts=rules))
    with engine:
        engine.open_account("alice/points", "POINTS", minor_per_unit=10)
        engine.fund("alice/points", 500, funding_id="welcome")
        sale = FuelSale("st-1", pump=3, nozzle=2, line=FuelLine.by_amount("95", 789, 200_00))
        quote = engine.quote("station-42", "alice", sale, Benefits(
            level="gold", coupons=(Coupon("fixed-10", CouponKind.FIXED, 10_00,
                                          threshold_minor=150_00),),
            points=PointsBalance("alice/points", balance=100, minor_per_point=10)))
        best = quote.combinations[0]
        assert (best.total_minor, best.points, best.cash_minor) == figures
        receipt = engine.submit(PaymentRequest(
            "station-42", "pump3-000188", "alice", "CNY", best.total_minor, "95 fuel",
            CashPart(best.cash_minor, "wechat"), (VoucherPart("alice/points", best.points),),
            quote=QuoteUse(quote.quote_id, best.combination_id)))
        assert engine.get_order(receipt.order_id).sale.combination_id == "c1"


def test_every_event_of_a_sold_order_carries_its_sale_discounts_and_split(tmp_path: Path):
    seen: list[OutboxEvent] = []
    engine = Engine.open(tmp_path / "e.db", channels=[ScriptedChannel("wechat")],
                         runtime=SetClock(at(13, 0)),
                         config=EngineConfig(discounts=RULES, duplicate_guard_window_ms=0),
                         subscribers={"terminal-push": seen.append})
    with engine:
        engine.open_account("alice/rp", "CNY")
        engine.fund("alice/rp", 1_00, funding_id="rp")
        quote = engine.quote("m-1", "alice", SALE)
        receipt = engine.submit(replace(
            request_for(quote.quote_id, "c1", 19494), cash=CashPart(19394, "wechat"),
            vouchers=(VoucherPart("alice/rp", 1_00, LegMode.PRE_DEDUCT),)))
        serial = engine.get_order(receipt.order_id).payment_serial
        wait_for(lambda: engine.get_order(receipt.order_id).state == "paying", what="paying")
        signed_callback(engine, "wechat", serial, paid_reply(serial))
        wait_for(lambda: any(e.to_state == "succeeded" for e in seen), what="the event")
    events = [e for e in seen if e.order_id == receipt.order_id]
    assert [e.to_state for e in events] == ["accepted", "paying", "succeeded"]
    for event in events:
        assert event.sale is not None and event.sale.sale == SALE
        assert [(d.rule_id, d.amount_minor) for d in event.sale.discounts] == [("noon", 506)]
        assert event.split == (("cash:wechat", 19394), ("voucher:alice/rp", 100))
    payload = json.loads(json.dumps(events[-1].payload()))
    assert payload["sale"]["sale"]["pump"] == 3 and payload["sale"]["sale"]["shift_id"] == (
        "2026-12-01/A")
    assert payload["split"] == [["cash:wechat", 19394], ["voucher:alice/rp", 100]]


def test_a_quote_pays_one_trade_order_its_attempts_and_retries(station):
    engine, _, _ = station
    quote = engine.quote("m-1", "alice", SALE)
    first = engine.submit(request_for(quote.quote_id, "c1", 19494, no="n-1"))
    with pytest.raises(QuoteMismatch, match="pays merchant order n-1 already"):
        engine.submit(request_for(quote.quote_id, "c1", 19494, no="n-2"))
    with pytest.raises(UnknownOrder):
        engine.find_order("m-1", "n-2")
    assert engine.submit(request_for(quote.quote_id, "c1", 19494, no="n-1")) == first
    engine.close(first.order_id)
    wait_for(lambda: engine.get_order(first.order_id).state == "closed", what="closed")
    again = engine.submit(replace(request_for(quote.quote_id, "c1", 19494, no="n-1"),
                                  attempt=2))
    assert again.attempt == 2


def test_a_retry_that_adds_the_quotes_sale_is_the_same_submit(station):
    engine, _, _ = station
    quote = engine.quote("m-1", "alice", SALE)
    first = engine.submit(request_for(quote.quote_id, "c1", 19494))
    assert engine.submit(replace(request_for(quote.quote_id, "c1", 19494), sale=SALE)) == first


def test_points_offered_must_be_an_account_of_the_engine_worth_what_they_say(station):
    engine, _, _ = station
    with pytest.raises(UnknownAccount):
        engine.quote("m-1", "alice", SALE, Benefits(points=PointsBalance("alice/pts", 10, 10)))
    engine.open_account("alice/pts", "POINTS", minor_per_unit=10)
    with pytest.raises(InvalidRequest, match="worth 10 minor units each, not 5"):
        engine.quote("m-1", "alice", SALE, Benefits(points=PointsBalance("alice/pts", 10, 5)))
