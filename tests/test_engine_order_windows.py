"""The pay window decides, whatever the timers' luck; a closed payment is closed again."""

from __future__ import annotations

from dataclasses import replace

import pytest

from payengine.engine.codes import ResultKind
from payengine.engine.errors import InvalidRequest
from payengine.engine.order import (
    Activate,
    CashPart,
    CashResult,
    CloseCash,
    LegStatus,
    OrderPolicy,
    OrderState,
    PayCash,
    PaymentOrder,
    PaymentRequest,
    QueryCash,
    RefundCash,
    ResultSource,
    TimerFired,
    TimerKind,
    build_order,
    decide,
)

POLICY = OrderPolicy(pay_window_ms=10_000)
T0 = 1_700_000_000_000


def paying_order(*, pay_in_flight: bool = False) -> PaymentOrder:
    """An order whose pay call went out; by default as reloaded from the database, where
    no call of a previous process is in flight any more."""
    order = PaymentRequest("m", "n1", "u", "CNY", 1_000, "Fuel", CashPart(1_000, "wechat"))
    built = build_order(order, order_id="o1", payment_serial="S1", now_ms=T0, accounts={},
                        policy=POLICY)
    decision = decide(built, Activate(), now_ms=T0, policy=POLICY)
    assert decision.order.state is OrderState.PAYING
    assert decision.order.pay_in_flight
    return replace(decision.order, pay_in_flight=pay_in_flight)


def test_a_success_handled_after_the_pay_window_is_refunded_even_before_the_close_timer() -> None:
    order = paying_order()
    late = T0 + POLICY.pay_window_ms + 1
    success = CashResult(ResultKind.SUCCESS, ResultSource.NOTIFICATION, "SUCCESS", "TX", 1_000)
    decision = decide(order, success, now_ms=late, policy=POLICY)
    assert decision.order.state is OrderState.CLOSED
    assert decision.order.cash_leg is not None
    assert decision.order.cash_leg.status is LegStatus.REFUNDING
    assert any(isinstance(e, RefundCash) for e in decision.effects)


def test_a_success_inside_the_pay_window_succeeds() -> None:
    order = paying_order()
    success = CashResult(ResultKind.SUCCESS, ResultSource.NOTIFICATION, "SUCCESS", "TX", 1_000)
    decision = decide(order, success, now_ms=T0 + POLICY.pay_window_ms - 1, policy=POLICY)
    assert decision.order.state is OrderState.SUCCEEDED


def test_activate_never_sends_a_payment_again_after_its_window() -> None:
    order = paying_order()
    assert order.cash_leg is not None and order.cash_leg.channel_code is None
    inside = decide(order, Activate(), now_ms=T0 + 1, policy=POLICY)
    assert any(isinstance(e, PayCash) for e in inside.effects)
    after = decide(order, Activate(), now_ms=T0 + POLICY.pay_window_ms, policy=POLICY)
    assert not any(isinstance(e, PayCash) for e in after.effects)


def test_activate_of_a_closed_order_with_its_payment_open_closes_it_at_the_channel_again() -> None:
    order = paying_order()
    closed = decide(order, TimerFired(TimerKind.CLOSE, 0), now_ms=T0 + POLICY.pay_window_ms,
                    policy=POLICY).order
    assert closed.state is OrderState.CLOSED
    assert closed.cash_leg is not None and closed.cash_leg.status is LegStatus.PAYING
    resumed = decide(closed, Activate(), now_ms=T0 + 60_000, policy=POLICY)
    assert CloseCash("wechat", "S1") in resumed.effects


def test_after_the_close_each_query_tick_asks_the_channel_to_close_again() -> None:
    order = paying_order()
    closed = decide(order, TimerFired(TimerKind.CLOSE, 0), now_ms=T0 + POLICY.pay_window_ms,
                    policy=POLICY).order
    tick = decide(closed, TimerFired(TimerKind.QUERY, closed.query_attempt),
                  now_ms=closed.next_query_at_ms or 0, policy=POLICY)
    assert CloseCash("wechat", "S1") in tick.effects
    assert not any(isinstance(e, QueryCash) for e in tick.effects)


def test_the_hold_grace_must_outlast_twice_the_voucher_retry_schedule() -> None:
    with pytest.raises(InvalidRequest, match="hold_grace_ms"):
        # a hold could expire while its Confirm is still being retried
        OrderPolicy(hold_grace_ms=1_000, voucher_retry_schedule_ms=(400, 400))
    assert replace(POLICY).hold_grace_ms > 2 * sum(POLICY.voucher_retry_schedule_ms)


def test_a_close_never_overtakes_the_pay_call_it_waits_for_its_answer_then_closes() -> None:
    order = paying_order(pay_in_flight=True)
    closed = decide(order, TimerFired(TimerKind.CLOSE, 0), now_ms=T0 + POLICY.pay_window_ms,
                    policy=POLICY)
    assert closed.order.state is OrderState.CLOSED
    assert not any(isinstance(e, CloseCash) for e in closed.effects)
    tick = decide(closed.order, TimerFired(TimerKind.QUERY, closed.order.query_attempt),
                  now_ms=closed.order.next_query_at_ms or 0, policy=POLICY)
    assert QueryCash("wechat", "S1") in tick.effects  # asking is safe, closing is not
    assert not any(isinstance(e, CloseCash) for e in tick.effects)
    answered = decide(tick.order, CashResult(ResultKind.PROCESSING, ResultSource.SYNC,
                                             "USERPAYING"), now_ms=T0 + 20_000, policy=POLICY)
    assert answered.effects.count(CloseCash("wechat", "S1")) == 1
    assert not answered.order.pay_in_flight


def test_a_pay_answered_with_success_after_the_close_is_refunded_not_closed() -> None:
    order = paying_order(pay_in_flight=True)
    closed = decide(order, TimerFired(TimerKind.CLOSE, 0), now_ms=T0 + POLICY.pay_window_ms,
                    policy=POLICY).order
    paid = decide(closed, CashResult(ResultKind.SUCCESS, ResultSource.SYNC, "SUCCESS", "TX",
                                     1_000), now_ms=T0 + 20_000, policy=POLICY)
    assert paid.order.cash_leg is not None
    assert paid.order.cash_leg.status is LegStatus.REFUNDING
    assert not any(isinstance(e, CloseCash) for e in paid.effects)


def test_activate_while_the_pay_call_is_in_flight_neither_pays_again_nor_closes() -> None:
    order = paying_order(pay_in_flight=True)
    again = decide(order, Activate(), now_ms=T0 + 1, policy=POLICY)
    assert not any(isinstance(e, PayCash | CloseCash) for e in again.effects)
    closed = decide(order, TimerFired(TimerKind.CLOSE, 0), now_ms=T0 + POLICY.pay_window_ms,
                    policy=POLICY).order
    resumed = decide(closed, Activate(), now_ms=T0 + 60_000, policy=POLICY)
    assert not any(isinstance(e, PayCash | CloseCash) for e in resumed.effects)
