"""Refunds in the pure core: any interleaving of requests and answers, checked step by step.

The order's actor serialises refund requests, so the core sees them one at a time in
whatever order the mailbox gives; hypothesis picks that order, and the answers of the
channel and the voucher accounts (duplicated, late, lost, refused) in between.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from payengine.engine.codes import ResultKind
from payengine.engine.errors import IdempotencyConflict, IllegalTransition, PaymentError, RefundRefused
from payengine.engine.ledger import postings_for
from payengine.engine.order import (
    Activate,
    CashResult,
    LegStatus,
    OrderEvent,
    OrderPolicy,
    OrderState,
    PartStatus,
    PaymentOrder,
    RefundCash,
    RefundKind,
    RefundResult,
    RefundStatus,
    RequestRefund,
    ResultSource,
    ReturnVoucher,
    TimerFired,
    TimerKind,
    VoucherOp,
    VoucherReply,
    decide,
)
from payengine.engine.voucher import FenceKey, FenceScope
from tests.test_engine_order import T0, make_order

POLICY = OrderPolicy(refund_query_schedule_ms=(1_000, 2_000), voucher_retry_schedule_ms=(100, 200))


def succeeded(mix: str) -> PaymentOrder:
    """An order of ``mix`` paid and with every voucher confirmed or debited."""
    order = make_order(mix)
    legs = tuple(
        replace(leg, status=LegStatus.PAID if leg.is_cash else (
            LegStatus.DEBITED if leg.mode.value == "post_deduct" else LegStatus.CONFIRMED),
            channel_txn_id="wx-1" if leg.is_cash else None)
        for leg in order.legs)
    return replace(order, state=OrderState.SUCCEEDED, cause="paid", legs=legs)


def step(order: PaymentOrder, event: OrderEvent, now_ms: int) -> tuple[PaymentOrder, tuple[object, ...]]:
    decision = decide(order, event, now_ms=now_ms, policy=POLICY)
    return decision.order, decision.effects


def test_a_refund_of_a_cash_and_points_order_goes_in_whole_points_or_not_at_all() -> None:
    order = succeeded("cash+post")  # 95.00 cash + 50 points of 0.10
    with pytest.raises(RefundRefused, match="cannot be given back exactly"):
        step(order, RequestRefund("rf-1", 9_505), T0)
    order, effects = step(order, RequestRefund("rf-1", 9_510), T0)
    (refund,) = order.refunds
    assert [(p.leg_no, p.amount, p.status) for p in refund.parts] == [
        (0, 9_500, PartStatus.SENT), (1, 1, PartStatus.WAITING)]
    assert effects[0] == RefundCash("wechat", order.payment_serial, refund.refund_id, 9_500, "CNY")


def test_vouchers_go_back_only_after_the_cash_part_did() -> None:
    order = succeeded("cash+pre")
    order, _ = step(order, RequestRefund("rf-1", order.total_minor), T0)
    refund = order.refunds[0]
    order, effects = step(order, RefundResult(refund.refund_id, ResultKind.SUCCESS,
                                              ResultSource.NOTIFICATION, "SUCCESS"), T0 + 1)
    returns = [e for e in effects if isinstance(e, ReturnVoucher)]
    assert [(r.account_id, r.amount) for r in returns] == [("redpacket", 500), ("points", 50)]
    for ret in returns:
        assert ret.fence == FenceKey.refund_return(refund.refund_id, ret.leg_no)
        order, _ = step(order, VoucherReply(ret.leg_no, ret.fence, VoucherOp.RETURN, True), T0 + 2)
    assert order.refunds[0].status is RefundStatus.SUCCEEDED and order.is_settled


def test_a_refund_request_is_refused_with_the_order_untouched() -> None:
    order = succeeded("cash")
    for bad, error in ((RequestRefund("", 100), PaymentError),
                       (RequestRefund("rf", 0), PaymentError),
                       (RequestRefund("rf", 10_001), RefundRefused)):
        with pytest.raises(error):
            step(order, bad, T0)
    order, _ = step(order, RequestRefund("rf", 100), T0)
    with pytest.raises(IdempotencyConflict):
        step(order, RequestRefund("rf", 200), T0)
    closed = replace(make_order("cash"), state=OrderState.CLOSED)
    with pytest.raises(IllegalTransition):
        step(closed, RequestRefund("rf", 100), T0)


REFUND_NOS = [f"rf-{n}" for n in range(5)]


@st.composite
def events_for(draw: st.DrawFn, order: PaymentOrder) -> OrderEvent:
    """One event: a new request, or an answer to something the order has (or never had)."""
    choices: list[OrderEvent] = [Activate(),
                                 TimerFired(TimerKind.REFUND_QUERY, order.refund_query_attempt),
                                 TimerFired(TimerKind.VOUCHER_RETRY, order.voucher_attempt),
                                 CashResult(ResultKind.SUCCESS, ResultSource.NOTIFICATION, "SUCCESS",
                                            "wx-2", 1_000)]
    for no in REFUND_NOS:
        for amount in (1, 500, 2_500, 5_000, 9_000, 10_000):
            choices.append(RequestRefund(no, amount))
    for refund in [*order.refunds, None]:
        refund_id = refund.refund_id if refund else "nobody-RF1"
        for kind in ResultKind:
            choices.append(RefundResult(refund_id, kind, ResultSource.QUERY, kind.value))
        for part in refund.parts if refund else ():
            hold = FenceKey.refund_return(refund_id, part.leg_no)
            # the same name in a caller's scope is another fence: its answer is stale
            squatter = FenceKey.user(f"{refund_id}:{part.leg_no}")
            choices += [VoucherReply(part.leg_no, hold, VoucherOp.RETURN, True),
                        VoucherReply(part.leg_no, hold, VoucherOp.RETURN, False, "refused"),
                        VoucherReply(part.leg_no, hold, VoucherOp.RETURN, False, "busy", True),
                        VoucherReply(part.leg_no, squatter, VoucherOp.RETURN, False, "refused")]
    return draw(st.sampled_from(choices))


FINAL = {RefundStatus.SUCCEEDED, RefundStatus.FAILED}


@settings(max_examples=300, deadline=None)
@given(mix=st.sampled_from(["cash", "cash+pre", "cash+post", "cash+pre+2post"]), data=st.data())
def test_no_interleaving_of_refunds_and_answers_gives_back_more_than_was_paid(
    mix: str, data: st.DataObject
) -> None:
    order = succeeded(mix)
    now = T0
    returned_before_cash: list[str] = []
    ledger = {f"merchant:{order.merchant_id}": order.total_minor}
    sent_cash: dict[str, int] = {}
    for _ in range(data.draw(st.integers(1, 40), label="steps")):
        now += data.draw(st.sampled_from([0, 50, 1_000, 5_000]), label="gap")
        event = data.draw(events_for(order), label="event")
        try:
            decision = decide(order, event, now_ms=now, policy=POLICY)
        except PaymentError:
            continue  # refused: the order is untouched by construction (immutable)
        new, effects = decision.order, decision.effects
        for posting in postings_for(order, new, decision.transitions):
            for entry in posting.entries:
                ledger[entry.account] = ledger.get(entry.account, 0) + entry.amount_minor
        for effect in effects:
            if isinstance(effect, RefundCash):
                assert sent_cash.setdefault(effect.refund_id, effect.amount_minor) == effect.amount_minor
            if isinstance(effect, ReturnVoucher):
                assert effect.fence.scope is FenceScope.REFUND
                refund = new.refund(refund_id=effect.fence.owner)
                assert refund is not None
                cash_part = refund.part(0)
                if cash_part is not None and cash_part.status is not PartStatus.DONE:
                    returned_before_cash.append(str(effect.fence))
        for before in order.refunds:
            after = new.refund(refund_id=before.refund_id)
            assert after is not None, "a refund disappeared"
            if before.status in FINAL:
                assert after.status is before.status, (before.status, after.status)
        assert new.state is OrderState.SUCCEEDED
        order = new
    assert not returned_before_cash, "a voucher went back before the cash part did"
    done = sum(p.value_minor for r in order.refunds if r.kind is RefundKind.MERCHANT
               for p in r.parts if p.status is PartStatus.DONE)
    assert ledger[f"merchant:{order.merchant_id}"] == order.total_minor - done >= 0
    assert ledger.get("transit", 0) >= 0  # second charges wait there until given back
    merchant = [r for r in order.refunds if r.kind is RefundKind.MERCHANT]
    assert sum(r.amount_minor for r in merchant if r.status is not RefundStatus.FAILED) \
        <= order.total_minor
    for leg in order.legs:
        given_back = sum(p.value_minor for r in merchant if r.status is not RefundStatus.FAILED
                         for p in r.parts if p.leg_no == leg.leg_no)
        assert given_back <= leg.value_minor
    for refund in order.refunds:
        statuses = {p.status for p in refund.parts}
        if refund.status is RefundStatus.FAILED:
            assert PartStatus.DONE not in statuses
        if refund.status is RefundStatus.SUCCEEDED:
            assert statuses == {PartStatus.DONE}


def test_a_voucher_return_outlasts_the_retry_schedule_and_a_late_answer_still_counts() -> None:
    policy = replace(POLICY, voucher_sentinel_interval_ms=60_000, voucher_sentinel_attempts_max=4)
    order = succeeded("cash+pre")
    now = T0

    def run(event: OrderEvent) -> tuple[object, ...]:
        nonlocal order
        decision = decide(order, event, now_ms=now, policy=policy)
        order = decision.order
        return decision.effects

    run(RequestRefund("rf-1", order.total_minor))
    refund_id = order.refunds[0].refund_id
    run(RefundResult(refund_id, ResultKind.SUCCESS, ResultSource.NOTIFICATION, "SUCCESS"))
    returns = [ReturnVoucher("redpacket", FenceKey.refund_return(refund_id, 1), 500, 1),
               ReturnVoucher("points", FenceKey.refund_return(refund_id, 2), 50, 2)]
    gaps, sent = [], []
    while order.next_voucher_retry_at_ms is not None:
        gaps.append(order.next_voucher_retry_at_ms - now)
        now = order.next_voucher_retry_at_ms
        effects = run(TimerFired(TimerKind.VOUCHER_RETRY, order.voucher_attempt))
        sent.append([e for e in effects if isinstance(e, ReturnVoucher)])
    # the schedule's 2 gaps, then the sentinel's 4 re-sends (the first as the schedule ends)
    assert gaps == [100, 200, 60_000, 60_000, 60_000, 60_000]
    assert sent == [returns] * 5 + [[]]
    # past the schedule the parts are flagged unknown (the refund too), owed, never settled
    assert [p.status for p in order.refunds[0].parts[1:]] == [PartStatus.UNKNOWN] * 2
    assert order.refunds[0].status is RefundStatus.UNKNOWN
    assert order.owes_follow_up and not order.is_settled
    # the sentinel's re-sends are bounded: the timer stops, the returns stay owed
    assert order.next_voucher_retry_at_ms is None
    # a late answer still counts; a restart asks again for the one still unknown
    run(VoucherReply(1, FenceKey.refund_return(refund_id, 1), VoucherOp.RETURN, True))
    assert order.refunds[0].part(1).status is PartStatus.DONE  # type: ignore[union-attr]
    assert not order.is_settled
    effects = run(Activate())
    assert [e for e in effects if isinstance(e, ReturnVoucher)] == returns[1:]
    assert order.next_voucher_retry_at_ms == now + 100  # a fresh schedule
    run(VoucherReply(2, FenceKey.refund_return(refund_id, 2), VoucherOp.RETURN, True))
    assert order.refunds[0].status is RefundStatus.SUCCEEDED and order.is_settled
    assert order.next_voucher_retry_at_ms is None


def test_a_second_charge_and_a_merchant_refund_number_never_collide() -> None:
    order = succeeded("cash")
    with pytest.raises(PaymentError, match="not starting with"):
        step(order, RequestRefund("charge:wx-2", 100), T0)
    order, _ = step(order, RequestRefund("wx-2", 100), T0)
    order, _ = step(order, CashResult(ResultKind.SUCCESS, ResultSource.QUERY, "SUCCESS",
                                      "wx-2", order.total_minor), T0)
    assert [(r.kind, r.refund_no) for r in order.refunds] == [
        (RefundKind.MERCHANT, "wx-2"), (RefundKind.DUPLICATE_CHARGE, "charge:wx-2")]
