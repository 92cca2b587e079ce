"""The payment order: ``decide`` over examples, arbitrary event sequences and a simulated world.

The simulated world answers the order's effects with the real voucher functions and a
WeChat-Pay-like channel, delivering replies late, twice, out of order or not at all, and
crashing the order (losing its mailbox, then ``Activate``). Whatever happens, the order must
end settled and no money may be lost or kept: a payment that did not go through is refunded
and every voucher leg given back.
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from hypothesis import event as hypothesis_event
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import voucher as vo
from engine.codes import WECHAT_LIKE_PAY_CODES, WECHAT_LIKE_REFUND_CODES, CodeTable, ResultKind
from engine.errors import HoldRefused, IllegalTransition, InvalidRequest, PaymentError
from engine.order import (
    ALLOWED_TRANSITIONS,
    HOLD_MODES,
    TERMINAL_STATES,
    TRANSITIONS,
    AccountUnit,
    Activate,
    ArmTimer,
    CancelHold,
    CashPart,
    CashResult,
    CloseCash,
    CloseCause,
    CloseOrder,
    ConfirmHold,
    DebitVoucher,
    Decision,
    Effect,
    LegMode,
    LegStatus,
    OrderEvent,
    OrderPolicy,
    OrderState,
    PayCash,
    PaymentOrder,
    PaymentRequest,
    QueryCash,
    QueryRefund,
    RefundCash,
    RefundResult,
    ResultSource,
    TimerFired,
    TimerKind,
    Trigger,
    TryHold,
    VoucherOp,
    VoucherPart,
    VoucherReply,
    build_order,
    decide,
    next_state,
)

S = OrderState
L = LegStatus
POLICY = OrderPolicy()
T0 = 1_700_000_000_000
SECOND = 1_000
CLOSE_AT = T0 + POLICY.pay_window_ms

ACCOUNTS = {
    "redpacket": AccountUnit("CNY", None),
    "points": AccountUnit("POINTS", 10),
    "credit": AccountUnit("CNY", None),
}

MIXES: dict[str, tuple[int | None, tuple[VoucherPart, ...]]] = {
    "cash": (10_000, ()),
    "cash+pre": (9_000, (VoucherPart("redpacket", 500), VoucherPart("points", 50))),
    "cash+post": (9_500, (VoucherPart("points", 50, LegMode.POST_DEDUCT),)),
    "cash+pre+2post": (
        9_000,
        (
            VoucherPart("redpacket", 300),
            VoucherPart("points", 30, LegMode.POST_DEDUCT),
            VoucherPart("credit", 400, LegMode.POST_DEDUCT),
        ),
    ),
    "cash+pre_held": (9_800, (VoucherPart("credit", 200, LegMode.PRE_HELD, hold_id="pre-1"),)),
    "vouchers": (None, (VoucherPart("redpacket", 600), VoucherPart("points", 40))),
    "vouchers+post": (
        None, (VoucherPart("redpacket", 600), VoucherPart("points", 40, LegMode.POST_DEDUCT))
    ),
    "post_only": (None, (VoucherPart("points", 100, LegMode.POST_DEDUCT),)),
    # the seeds' combined payment: 100.00 = 96.00 cash + 1.00 red packet + 20 points
    # + 1.00 phone credit (held by the user before submitting)
    "seeds": (
        9_600,
        (
            VoucherPart("redpacket", 100),
            VoucherPart("points", 20, LegMode.POST_DEDUCT),
            VoucherPart("credit", 100, LegMode.PRE_HELD, hold_id="pre-1"),
        ),
    ),
}


def make_order(mix: str, order_id: str = "o1", now_ms: int = T0) -> PaymentOrder:
    cash, vouchers = MIXES[mix]
    total = (cash or 0) + sum(
        part.amount * (ACCOUNTS[part.account_id].minor_per_unit or 1) for part in vouchers
    )
    request = PaymentRequest(
        merchant_id="m1", merchant_order_no=f"mo-{order_id}", user_id="u1", currency="CNY",
        total_minor=total, title="fuel 92#",
        cash=None if cash is None else CashPart(cash, "wechat"), vouchers=vouchers,
    )
    return build_order(
        request, order_id=order_id, payment_serial=f"serial-{order_id}", now_ms=now_ms,
        accounts=ACCOUNTS, policy=POLICY,
    )


def hold_legs(order: PaymentOrder) -> list[Any]:
    return [leg for leg in order.legs if leg.mode in HOLD_MODES]


def post_legs(order: PaymentOrder) -> list[Any]:
    return [leg for leg in order.legs if leg.mode is LegMode.POST_DEDUCT]


# =========================================================================== the oracle


@dataclass(frozen=True)
class Shape:
    cash: frozenset[LegStatus]
    holds: frozenset[LegStatus]
    posts: frozenset[LegStatus]


def _shape(cash: set[LegStatus], holds: set[LegStatus], posts: set[LegStatus]) -> Shape:
    return Shape(frozenset(cash), frozenset(holds), frozenset(posts))


_REFUNDS = {L.REFUNDING, L.REFUNDED, L.REFUND_FAILED, L.REFUND_UNKNOWN}
SHAPES = {
    S.ACCEPTED: _shape({L.NEW}, {L.NEW, L.TRYING, L.HELD}, {L.NEW}),
    S.PAYING: _shape({L.PAYING}, {L.HELD}, {L.NEW}),
    S.NEEDS_RECONCILIATION: _shape({L.PAYING, L.UNKNOWN}, {L.HELD}, {L.NEW}),
    S.DEDUCTING: _shape({L.PAID}, {L.HELD}, {L.DEBITING, L.DEBITED, L.SHORTFALL}),
    S.SUCCEEDED: _shape({L.PAID}, {L.CONFIRMING, L.CONFIRMED, L.CONFIRM_FAILED}, {L.DEBITED}),
    S.FAILED: _shape(
        {L.UNPAID, L.UNKNOWN, *_REFUNDS},
        {L.REFUSED, L.CANCELLING, L.CANCELLED, L.RELEASE_FAILED},
        {L.CANCELLED, L.SHORTFALL, L.REVERSING, L.REVERSED, L.RELEASE_FAILED},
    ),
    S.CLOSED: _shape(
        {L.UNPAID, L.PAYING, L.UNKNOWN, *_REFUNDS},
        {L.CANCELLING, L.CANCELLED, L.RELEASE_FAILED},
        {L.CANCELLED},
    ),
}
"""What each leg may be while the order is in each state (a money-safety table: e.g. a
succeeded order never has a cancelled hold, a failed one never a confirmed hold)."""

LIVE_STATES = frozenset({S.ACCEPTED, S.PAYING, S.NEEDS_RECONCILIATION})


def check_shape(order: PaymentOrder) -> None:
    shape = SHAPES[order.state]
    cash = order.cash_leg
    assert cash is None or cash.status in shape.cash, (order.state, cash.status)
    for leg in hold_legs(order):
        assert leg.status in shape.holds, (order.state, leg.leg_no, leg.status)
    for leg in post_legs(order):
        assert leg.status in shape.posts, (order.state, leg.leg_no, leg.status)
    assert sum(leg.value_minor for leg in order.legs) == order.total_minor


def check_effects(order: PaymentOrder, effects: tuple[Effect, ...]) -> None:
    """Every effect agrees with the order persisted with it, so ``Activate`` can redo it."""
    cash = order.cash_leg
    for effect in effects:
        match effect:
            case TryHold() | ConfirmHold() | CancelHold() | DebitVoucher():
                leg = order.leg(effect.leg_no)
                assert (effect.account_id, effect.hold_id) == (leg.account_id, leg.hold_id)
                expected = {
                    TryHold: {L.TRYING},
                    ConfirmHold: {L.CONFIRMING},
                    CancelHold: {L.CANCELLING, L.REVERSING},
                    DebitVoucher: {L.DEBITING},
                }[type(effect)]
                assert leg.status in expected, (effect, leg.status)
                if isinstance(effect, TryHold):
                    assert leg.mode in HOLD_MODES
                    assert (effect.amount, effect.expires_at_ms) == (
                        leg.amount, order.hold_expires_at_ms
                    )
                if isinstance(effect, DebitVoucher):
                    assert leg.mode is LegMode.POST_DEDUCT and effect.amount == leg.amount
            case PayCash():
                assert cash is not None and cash.status is L.PAYING and not order.is_terminal
                assert effect == PayCash(
                    "wechat", order.payment_serial, cash.amount, order.currency, order.title
                )
            case QueryCash():
                assert cash is not None and cash.status is L.PAYING
                assert effect.payment_serial == order.payment_serial
            case CloseCash():
                assert cash is not None and cash.status is L.PAYING and order.state is S.CLOSED
            case RefundCash():
                assert cash is not None and cash.status is L.REFUNDING
                assert effect == RefundCash(
                    "wechat", order.payment_serial, f"{order.payment_serial}-R1", cash.amount,
                    order.currency,
                )
                assert cash.refund_id == effect.refund_id
            case QueryRefund():
                assert cash is not None and cash.status is L.REFUNDING
                assert effect.refund_id == cash.refund_id
            case ArmTimer(timer=TimerKind.CLOSE):
                # armed by Activate of a live order (which may then move on at once)
                assert effect.due_at_ms == order.close_at_ms and effect.token == 0
            case ArmTimer(timer=TimerKind.QUERY):
                assert cash is not None and cash.status is L.PAYING
                assert effect.token == order.query_attempt
            case ArmTimer(timer=TimerKind.REFUND_QUERY):
                assert cash is not None and cash.status is L.REFUNDING
                assert effect.token == order.refund_query_attempt
            case _:
                raise AssertionError(f"unexpected effect {effect!r}")


_IDENTITY = (
    "order_id", "merchant_id", "merchant_order_no", "payment_serial", "user_id", "title",
    "currency", "total_minor", "fingerprint", "created_at_ms", "close_at_ms",
    "hold_expires_at_ms",
)


def check_decision(old: PaymentOrder, event: OrderEvent, decision: Decision) -> None:
    new = decision.order
    # order-level transitions chain from the old state to the new one, each one allowed
    state = old.state
    for move in (t for t in decision.transitions if t.entity == "order"):
        pair = (OrderState(move.from_state), OrderState(move.to_state))
        assert pair[0] is state and pair in ALLOWED_TRANSITIONS, pair
        state = pair[1]
    assert state is new.state
    # leg transitions chain from the old statuses to the new ones
    statuses = {leg.leg_no: leg.status for leg in old.legs}
    for move in (t for t in decision.transitions if t.entity != "order"):
        leg_no = int(move.entity.removeprefix("leg:"))
        assert move.from_state == statuses[leg_no].value and move.from_state != move.to_state
        statuses[leg_no] = LegStatus(move.to_state)
    assert statuses == {leg.leg_no: leg.status for leg in new.legs}
    # terminal is final
    if old.is_terminal:
        assert new.state is old.state
    # version moves by one exactly when something changed
    unchanged = replace(new, version=old.version) == old
    assert new.version == old.version + (0 if unchanged else 1)
    assert decision.changed == (not unchanged)
    if unchanged:
        assert decision.note != "applied" and not decision.transitions
    # what an order is never changes
    assert all(getattr(new, name) == getattr(old, name) for name in _IDENTITY)
    assert [replace(leg, status=L.NEW, channel_code=None, channel_txn_id=None, refund_id=None)
            for leg in new.legs] == [
        replace(leg, status=L.NEW, channel_code=None, channel_txn_id=None, refund_id=None)
        for leg in old.legs
    ]
    # a "processing" answer never moves anything
    if isinstance(event, CashResult) and event.kind is ResultKind.PROCESSING:
        assert statuses == {leg.leg_no: leg.status for leg in old.legs}
        assert new.state is old.state
        if old.cash_leg is not None and old.cash_leg.status is not L.PAYING:
            assert new == old
    if isinstance(event, RefundResult) and event.kind is ResultKind.PROCESSING:
        assert new == old
    check_shape(new)
    check_effects(new, decision.effects)


@dataclass
class History:
    """Everything an order did over a run, for the properties that span many events."""

    order: PaymentOrder
    effects: list[Effect] = field(default_factory=list)
    ever_paid: bool = False
    states: list[OrderState] = field(default_factory=list)
    illegal: int = 0

    def apply(self, event: OrderEvent, now_ms: int) -> Decision | None:
        old = self.order
        try:
            decision = decide(old, event, now_ms=now_ms, policy=POLICY)
        except IllegalTransition:
            # only a result for a cash leg never asked, or a user close of a paid order
            cash = old.cash_leg
            assert (
                isinstance(event, CashResult) and (cash is None or cash.status is L.NEW)
            ) or (
                event == CloseOrder(CloseCause.USER) and old.state in (S.SUCCEEDED, S.DEDUCTING)
            ), (event, old.state)
            self.illegal += 1
            return None
        except InvalidRequest:
            assert isinstance(event, VoucherReply)
            assert event.leg_no not in {leg.leg_no for leg in old.legs}
            return None
        check_decision(old, event, decision)
        self.record(decision)
        return decision

    def record(self, decision: Decision) -> None:
        old, new = self.order, decision.order
        self.effects.extend(decision.effects)
        self.states.append(new.state)
        if any(t.to_state == L.PAID.value for t in decision.transitions):
            self.ever_paid = True
        if old.state is S.SUCCEEDED:
            assert new.state is S.SUCCEEDED
        # money safety over the whole history
        confirmed = {e.leg_no for e in self.effects if isinstance(e, ConfirmHold)}
        cancelled = {e.leg_no for e in self.effects if isinstance(e, CancelHold)}
        assert not confirmed & cancelled, "a leg was both confirmed and cancelled"
        refunds = [e for e in self.effects if isinstance(e, RefundCash)]
        assert len({e.refund_id for e in refunds}) <= 1
        if new.state is S.SUCCEEDED:
            assert not refunds and not cancelled
        if new.state in (S.FAILED, S.CLOSED):
            assert not confirmed
            if self.ever_paid:
                assert refunds, "a charged payment that did not go through was not refunded"
        self.order = new


# =========================================================================== examples


class Run:
    """Drive one order through ``decide`` by hand, checking every step with the oracle."""

    def __init__(self, mix: str = "cash", order_id: str = "o1") -> None:
        self.history = History(make_order(mix, order_id))
        self.now = T0

    @property
    def order(self) -> PaymentOrder:
        return self.history.order

    def __call__(self, event: OrderEvent, at: int | None = None) -> Decision:
        if at is not None:
            assert at >= self.now
            self.now = at
        decision = self.history.apply(event, self.now)
        assert decision is not None, f"{event!r} was refused"
        return decision

    def refused(self, event: OrderEvent) -> None:
        before = self.order
        with pytest.raises(IllegalTransition):
            decide(before, event, now_ms=self.now, policy=POLICY)
        assert self.order == before

    def status(self, leg_no: int) -> LegStatus:
        return self.order.leg(leg_no).status

    def hold_all(self) -> None:
        """Activate and answer every Try with ok."""
        decision = self(Activate())
        for effect in decision.effects:
            if isinstance(effect, TryHold):
                self(VoucherReply(effect.leg_no, effect.hold_id, VoucherOp.TRY, True))


def success(amount: int | None = None, source: ResultSource = ResultSource.CALLBACK) -> CashResult:
    return CashResult(ResultKind.SUCCESS, source, "SUCCESS", "wx-txn-1", amount)


def failure(source: ResultSource = ResultSource.CALLBACK, code: str = "PAYERROR") -> CashResult:
    return CashResult(ResultKind.FAILURE, source, code)


def processing(source: ResultSource = ResultSource.QUERY, code: str = "USERPAYING") -> CashResult:
    return CashResult(ResultKind.PROCESSING, source, code)


def test_activating_a_cash_order_asks_the_channel_and_arms_the_close_and_query_timers() -> None:
    run = Run("cash")
    decision = run(Activate())
    assert run.order.state is S.PAYING
    assert run.status(0) is L.PAYING
    assert decision.effects == (
        ArmTimer(TimerKind.CLOSE, CLOSE_AT, 0),
        PayCash("wechat", "serial-o1", 10_000, "CNY", "fuel 92#"),
        ArmTimer(TimerKind.QUERY, T0 + SECOND, 0),
    )
    assert run.order.version == 1


def test_a_callback_before_the_close_succeeds_and_the_timeout_close_after_it_is_ignored() -> None:
    run = Run("cash")
    run(Activate())
    decision = run(success(10_000), at=T0 + 30 * SECOND)
    assert run.order.state is S.SUCCEEDED
    assert run.order.leg(0).status is L.PAID
    assert run.order.leg(0).channel_txn_id == "wx-txn-1"
    assert decision.effects == ()
    paid = run.order
    for event in (TimerFired(TimerKind.CLOSE, 0), CloseOrder(CloseCause.TIMEOUT)):
        ignored = run(event, at=CLOSE_AT)
        assert ignored.note.startswith("ignored")
        assert (ignored.order, ignored.effects, ignored.changed) == (paid, (), False)
    assert run.order.is_settled


def test_a_user_close_after_the_success_is_an_illegal_transition_and_changes_nothing() -> None:
    run = Run("cash")
    run(Activate())
    run(success(10_000))
    run.refused(CloseOrder(CloseCause.USER))
    assert run.order.state is S.SUCCEEDED


def test_a_close_before_the_callback_cancels_the_holds_and_a_later_success_is_refunded() -> None:
    run = Run("cash+pre")
    run.hold_all()
    assert run.order.state is S.PAYING
    closed = run(CloseOrder(CloseCause.USER), at=T0 + 60 * SECOND)
    assert run.order.state is S.CLOSED
    assert closed.effects == (
        CloseCash("wechat", "serial-o1"),
        ArmTimer(TimerKind.QUERY, T0 + 61 * SECOND, 0),
        CancelHold("redpacket", "o1:1", 1),
        CancelHold("points", "o1:2", 2),
    )
    assert [run.status(n) for n in (0, 1, 2)] == [L.PAYING, L.CANCELLING, L.CANCELLING]
    # the user paid just before the close reached the channel
    late = run(success(9_000), at=T0 + 62 * SECOND)
    assert run.order.state is S.CLOSED
    assert run.status(0) is L.REFUNDING
    assert late.effects == (
        RefundCash("wechat", "serial-o1", "serial-o1-R1", 9_000, "CNY"),
        ArmTimer(TimerKind.REFUND_QUERY, T0 + 63 * SECOND, 0),
    )
    run(RefundResult("serial-o1-R1", ResultKind.SUCCESS, ResultSource.CALLBACK, "SUCCESS"))
    run(VoucherReply(1, "o1:1", VoucherOp.CANCEL, True))
    assert not run.order.is_settled
    run(VoucherReply(2, "o1:2", VoucherOp.CANCEL, True))
    assert [run.status(n) for n in (0, 1, 2)] == [L.REFUNDED, L.CANCELLED, L.CANCELLED]
    assert run.order.is_settled


def test_the_close_timer_closes_an_unpaid_order_but_not_before_its_time() -> None:
    run = Run("cash")
    run(Activate())
    early = run(TimerFired(TimerKind.CLOSE, 0), at=CLOSE_AT - 1)
    assert early.note.startswith("stale") and not early.changed
    assert run.order.state is S.PAYING
    run(TimerFired(TimerKind.CLOSE, 0), at=CLOSE_AT)
    assert run.order.state is S.CLOSED
    # the channel confirms the close: nothing was charged
    run(failure(ResultSource.CLOSE, "CLOSED"))
    assert run.status(0) is L.UNPAID
    assert run.order.is_settled
    again = run(TimerFired(TimerKind.CLOSE, 0))
    assert again.note.startswith("duplicate") and not again.changed


def test_a_close_before_activation_releases_only_the_users_own_pre_hold() -> None:
    run = Run("seeds")
    decision = run(CloseOrder(CloseCause.TIMEOUT))
    assert run.order.state is S.CLOSED
    # nothing was tried, so nothing is cancelled, except the hold the user placed before
    # submitting: it must not stay locked until it expires
    assert decision.effects == (CancelHold("credit", "pre-1", 3),)
    assert [run.status(n) for n in range(4)] == [L.UNPAID, L.CANCELLED, L.CANCELLED,
                                                  L.CANCELLING]
    assert not run.order.is_settled
    run(VoucherReply(3, "pre-1", VoucherOp.CANCEL, True))
    assert run.status(3) is L.CANCELLED
    assert run.order.is_settled


@pytest.mark.parametrize("source", list(ResultSource))
def test_a_late_processing_answer_after_the_success_changes_nothing(source: ResultSource) -> None:
    run = Run("cash")
    run(Activate())
    run(success(10_000))
    paid = run.order
    for code in ("USERPAYING", "NOTPAY", "SYSTEMERROR", "???"):
        late = run(processing(source, code))
        assert late.note.startswith("ignored")
        assert (late.order, late.effects) == (paid, ())


def test_a_processing_answer_while_paying_only_records_the_channel_code() -> None:
    run = Run("cash")
    run(Activate())
    first = run(processing(ResultSource.SYNC, "USERPAYING"))
    assert first.changed and run.order.state is S.PAYING
    assert run.order.leg(0).channel_code == "USERPAYING"
    again = run(processing(ResultSource.QUERY, "USERPAYING"))
    assert not again.changed


def test_a_duplicate_success_is_a_no_op() -> None:
    run = Run("cash+pre")
    run.hold_all()
    first = run(success(9_000))
    assert sum(isinstance(e, ConfirmHold) for e in first.effects) == 2
    paid = run.order
    for source in ResultSource:
        again = run(success(9_000, source))
        assert again.note.startswith("duplicate")
        assert (again.order, again.effects, again.changed) == (paid, (), False)


def test_the_query_schedule_backs_off_1_2_5_10_20_40_100_s_then_awaits_reconciliation() -> None:
    run = Run("cash")
    decision = run(Activate())
    queried_at: list[int] = []
    for _ in range(50):
        timers = [e for e in decision.effects if isinstance(e, ArmTimer)
                  and e.timer is TimerKind.QUERY]
        if not timers:
            break
        (timer,) = timers
        decision = run(TimerFired(TimerKind.QUERY, timer.token), at=timer.due_at_ms)
        if any(isinstance(e, QueryCash) for e in decision.effects):
            queried_at.append(run.now - T0)
            run(processing())  # the channel keeps saying "user paying"
    gaps = [b - a for a, b in zip([0, *queried_at], queried_at, strict=False)]
    assert gaps == [1_000, 2_000, 5_000, 10_000, 20_000, 40_000, 100_000]
    assert run.order.state is S.NEEDS_RECONCILIATION
    assert run.now - T0 == 278_000  # one more wait for the last answer, then stop
    assert run.order.next_query_at_ms is None
    assert decision.effects == ()
    assert run.status(0) is L.PAYING  # not a failure: money may have moved
    # the stale timers of earlier attempts change nothing
    for token in range(8):
        assert not run(TimerFired(TimerKind.QUERY, token)).changed


def test_a_custom_query_schedule_is_followed_and_is_finite() -> None:
    policy = OrderPolicy(query_schedule_ms=(10, 30))
    order = make_order("cash")
    d = decide(order, Activate(), now_ms=T0, policy=policy)
    assert d.effects[-1] == ArmTimer(TimerKind.QUERY, T0 + 10, 0)
    d = decide(d.order, TimerFired(TimerKind.QUERY, 0), now_ms=T0 + 10, policy=policy)
    assert d.effects == (QueryCash("wechat", "serial-o1"), ArmTimer(TimerKind.QUERY, T0 + 40, 1))
    d = decide(d.order, TimerFired(TimerKind.QUERY, 1), now_ms=T0 + 40, policy=policy)
    assert d.effects == (QueryCash("wechat", "serial-o1"), ArmTimer(TimerKind.QUERY, T0 + 70, 2))
    d = decide(d.order, TimerFired(TimerKind.QUERY, 2), now_ms=T0 + 70, policy=policy)
    assert d.effects == () and d.order.state is S.NEEDS_RECONCILIATION


def _exhaust_queries(run: Run) -> None:
    for token in range(len(POLICY.query_schedule_ms) + 1):
        due = run.order.next_query_at_ms
        assert due is not None
        run(TimerFired(TimerKind.QUERY, token), at=due)


def test_an_order_awaiting_reconciliation_succeeds_on_a_late_success() -> None:
    run = Run("cash+pre")
    run.hold_all()
    _exhaust_queries(run)
    assert run.order.state is S.NEEDS_RECONCILIATION
    decision = run(success(9_000, ResultSource.RECONCILIATION))
    assert run.order.state is S.SUCCEEDED
    assert [type(e) for e in decision.effects] == [ConfirmHold, ConfirmHold]


def test_an_order_awaiting_reconciliation_is_closed_by_its_close_timer_and_queried_again() -> None:
    run = Run("cash+pre")
    run.hold_all()
    _exhaust_queries(run)
    decision = run(TimerFired(TimerKind.CLOSE, 0), at=CLOSE_AT)
    assert run.order.state is S.CLOSED
    assert decision.effects[:2] == (
        CloseCash("wechat", "serial-o1"), ArmTimer(TimerKind.QUERY, CLOSE_AT + SECOND, 0)
    )
    # the queries after the close also run out: the charge is then unknown, for reconciliation
    _exhaust_queries(run)
    assert run.status(0) is L.UNKNOWN
    run(VoucherReply(1, "o1:1", VoucherOp.CANCEL, True))
    run(VoucherReply(2, "o1:2", VoucherOp.CANCEL, True))
    assert run.order.is_settled
    # the reconciliation file then says it was paid: refund by the original route
    decision = run(success(9_000, ResultSource.RECONCILIATION))
    assert run.status(0) is L.REFUNDING and run.order.state is S.CLOSED
    assert isinstance(decision.effects[0], RefundCash)


def test_a_refused_hold_fails_the_order_cancels_other_holds_and_never_asks_the_channel() -> None:
    run = Run("cash+pre")
    activated = run(Activate())
    assert [type(e) for e in activated.effects] == [ArmTimer, TryHold, TryHold]
    run(VoucherReply(1, "o1:1", VoucherOp.TRY, True))
    assert run.order.state is S.ACCEPTED
    failed = run(VoucherReply(2, "o1:2", VoucherOp.TRY, False, "insufficient_balance"))
    assert run.order.state is S.FAILED
    assert failed.effects == (CancelHold("redpacket", "o1:1", 1),)
    assert [run.status(n) for n in (0, 1, 2)] == [L.UNPAID, L.CANCELLING, L.REFUSED]
    assert not any(isinstance(e, PayCash) for e in run.history.effects)
    run(VoucherReply(1, "o1:1", VoucherOp.CANCEL, True))
    assert run.order.is_settled


def test_a_refused_hold_cancels_a_hold_still_being_tried_and_its_late_ok_is_a_duplicate() -> None:
    run = Run("cash+pre")
    run(Activate())
    failed = run(VoucherReply(1, "o1:1", VoucherOp.TRY, False, "hold_refused"))
    assert failed.effects == (CancelHold("points", "o1:2", 2),)
    assert run.status(2) is L.CANCELLING
    late = run(VoucherReply(2, "o1:2", VoucherOp.TRY, True))
    assert late.note.startswith("duplicate") and not late.changed
    run(VoucherReply(2, "o1:2", VoucherOp.CANCEL, True))
    assert run.order.is_settled and run.order.state is S.FAILED


def test_a_post_deduct_shortfall_fails_refunds_the_cash_reverses_debits_cancels_holds() -> None:
    run = Run("cash+pre+2post")
    run.hold_all()
    assert run.order.state is S.PAYING
    paid = run(success(9_000))
    assert run.order.state is S.DEDUCTING
    assert paid.effects == (
        DebitVoucher("points", "o1:2", 30, 2), DebitVoucher("credit", "o1:3", 400, 3)
    )
    run.refused(CloseOrder(CloseCause.USER))  # paid: it cannot be closed any more
    assert not run(TimerFired(TimerKind.CLOSE, 0), at=CLOSE_AT).changed
    run(VoucherReply(2, "o1:2", VoucherOp.DEBIT, True))
    assert run.order.state is S.DEDUCTING
    failed = run(VoucherReply(3, "o1:3", VoucherOp.DEBIT, False, "insufficient_balance"))
    assert run.order.state is S.FAILED
    assert failed.effects == (
        RefundCash("wechat", "serial-o1", "serial-o1-R1", 9_000, "CNY"),
        ArmTimer(TimerKind.REFUND_QUERY, CLOSE_AT + SECOND, 0),
        CancelHold("redpacket", "o1:1", 1),
        CancelHold("points", "o1:2", 2),
    )
    assert [run.status(n) for n in range(4)] == [
        L.REFUNDING, L.CANCELLING, L.REVERSING, L.SHORTFALL
    ]
    run(VoucherReply(1, "o1:1", VoucherOp.CANCEL, True))
    run(VoucherReply(2, "o1:2", VoucherOp.CANCEL, True))
    run(RefundResult("serial-o1-R1", ResultKind.SUCCESS, ResultSource.QUERY, "SUCCESS"))
    assert [run.status(n) for n in range(4)] == [L.REFUNDED, L.CANCELLED, L.REVERSED, L.SHORTFALL]
    assert run.order.is_settled


def test_post_deduct_debits_all_taken_succeed_and_then_the_holds_are_confirmed() -> None:
    run = Run("cash+pre+2post")
    run.hold_all()
    run(success(9_000))
    run(VoucherReply(3, "o1:3", VoucherOp.DEBIT, True))
    done = run(VoucherReply(2, "o1:2", VoucherOp.DEBIT, True))
    assert run.order.state is S.SUCCEEDED
    assert done.effects == (ConfirmHold("redpacket", "o1:1", 1),)
    run(VoucherReply(1, "o1:1", VoucherOp.CONFIRM, True))
    assert [run.status(n) for n in range(4)] == [L.PAID, L.CONFIRMED, L.DEBITED, L.DEBITED]
    assert run.order.is_settled


def test_a_vouchers_only_order_succeeds_once_every_hold_is_placed_without_any_channel() -> None:
    run = Run("vouchers")
    run(Activate())
    run(VoucherReply(2, "o1:2", VoucherOp.TRY, True))
    done = run(VoucherReply(1, "o1:1", VoucherOp.TRY, True))
    assert run.order.state is S.SUCCEEDED
    assert done.effects == (ConfirmHold("redpacket", "o1:1", 1), ConfirmHold("points", "o1:2", 2))
    run(VoucherReply(1, "o1:1", VoucherOp.CONFIRM, True))
    run(VoucherReply(2, "o1:2", VoucherOp.CONFIRM, True))
    assert run.order.is_settled
    assert not any(isinstance(e, PayCash | ArmTimer) and getattr(e, "timer", None) is not
                   TimerKind.CLOSE for e in run.history.effects)
    run.refused(success(1_000))  # no cash part: no cash result can be for it


def test_a_post_deduct_only_order_debits_at_once() -> None:
    run = Run("post_only")
    decision = run(Activate())
    assert run.order.state is S.DEDUCTING
    assert decision.effects[-1] == DebitVoucher("points", "o1:1", 100, 1)
    run(VoucherReply(1, "o1:1", VoucherOp.DEBIT, True))
    assert run.order.state is S.SUCCEEDED and run.order.is_settled


def test_a_failed_confirm_is_recorded_on_the_leg_but_never_undoes_the_success() -> None:
    run = Run("cash+pre")
    run.hold_all()
    run(success(9_000))
    run(VoucherReply(1, "o1:1", VoucherOp.CONFIRM, False, "hold_not_pending"))
    assert run.status(1) is L.CONFIRM_FAILED
    assert run.order.state is S.SUCCEEDED


def test_an_amount_mismatch_awaits_reconciliation_and_is_reported_not_fixed() -> None:
    run = Run("cash+pre")
    run.hold_all()
    decision = run(success(9_001))
    assert run.order.state is S.NEEDS_RECONCILIATION
    assert run.status(0) is L.UNKNOWN
    assert decision.effects == ()
    assert "amount_mismatch" in run.order.cause
    # a close gives the vouchers back but does not refund money it does not understand
    closed = run(CloseOrder(CloseCause.USER))
    assert [type(e) for e in closed.effects] == [CancelHold, CancelHold]
    assert run.status(0) is L.UNKNOWN


def test_a_success_after_a_definitive_failure_is_refunded() -> None:
    run = Run("cash+pre")
    run.hold_all()
    failed = run(failure())
    assert run.order.state is S.FAILED
    assert [type(e) for e in failed.effects] == [CancelHold, CancelHold]
    assert run(failure(ResultSource.QUERY)).note.startswith("duplicate")
    late = run(success(9_000, ResultSource.RECONCILIATION))
    assert run.order.state is S.FAILED
    assert run.status(0) is L.REFUNDING
    assert isinstance(late.effects[0], RefundCash)


def test_a_failure_after_the_success_is_ignored() -> None:
    run = Run("cash")
    run(Activate())
    run(success(10_000))
    late = run(failure(ResultSource.CLOSE, "CLOSED"))
    assert late.note.startswith("ignored") and not late.changed
    assert run.order.state is S.SUCCEEDED


def test_the_refund_is_asked_again_on_its_schedule_then_becomes_refund_unknown() -> None:
    run = Run("cash")
    run(Activate())
    run(CloseOrder(CloseCause.USER))
    run(success(10_000))
    assert run.status(0) is L.REFUNDING
    queries = 0
    for token in range(len(POLICY.refund_query_schedule_ms) + 1):
        due = run.order.next_refund_query_at_ms
        assert due is not None
        decision = run(TimerFired(TimerKind.REFUND_QUERY, token), at=due)
        queries += sum(isinstance(e, RefundCash) for e in decision.effects)
        run(RefundResult("serial-o1-R1", ResultKind.PROCESSING, ResultSource.QUERY, "PROCESSING"))
    assert queries == 7
    assert run.status(0) is L.REFUND_UNKNOWN
    assert run.order.next_refund_query_at_ms is None
    late = run(RefundResult("serial-o1-R1", ResultKind.SUCCESS, ResultSource.CALLBACK, "SUCCESS"))
    assert late.changed and run.status(0) is L.REFUNDED  # the truth, late, still counts
    again = run(RefundResult("serial-o1-R1", ResultKind.SUCCESS, ResultSource.CALLBACK, "SUCCESS"))
    assert again.note.startswith("duplicate")


def test_a_refund_result_for_another_refund_is_stale() -> None:
    run = Run("cash")
    run(Activate())
    run(CloseOrder(CloseCause.USER))
    run(success(10_000))
    stale = run(RefundResult("serial-o1-R9", ResultKind.SUCCESS, ResultSource.CALLBACK, "SUCCESS"))
    assert stale.note.startswith("stale") and not stale.changed
    failed = run(RefundResult("serial-o1-R1", ResultKind.FAILURE, ResultSource.CALLBACK, "CHANGE"))
    assert failed.changed and run.status(0) is L.REFUND_FAILED


def test_activate_after_a_crash_reissues_every_in_flight_effect() -> None:
    run = Run("cash+pre")
    first = run(Activate())
    again = run(Activate(), at=T0 + 5)
    assert again.effects == first.effects and not again.changed  # the Trys, once more
    run(VoucherReply(1, "o1:1", VoucherOp.TRY, True))
    run(VoucherReply(2, "o1:2", VoucherOp.TRY, True))
    paying = run(Activate(), at=T0 + 10)
    assert paying.effects == (
        ArmTimer(TimerKind.CLOSE, CLOSE_AT, 0),
        PayCash("wechat", "serial-o1", 9_000, "CNY", "fuel 92#"),
        ArmTimer(TimerKind.QUERY, T0 + 5 + SECOND, 0),
    )
    run(processing(ResultSource.SYNC))
    # the channel has answered: a restart only queries, it does not pay again
    assert [type(e) for e in run(Activate()).effects] == [ArmTimer, ArmTimer]
    run(CloseOrder(CloseCause.USER))
    closed = run(Activate())
    assert [type(e) for e in closed.effects] == [ArmTimer, CancelHold, CancelHold]
    assert not closed.changed


def test_a_voucher_reply_for_another_hold_is_stale_and_a_repeated_one_a_duplicate() -> None:
    run = Run("cash+pre")
    run(Activate())
    stale = run(VoucherReply(1, "o2:1", VoucherOp.TRY, True))
    assert stale.note.startswith("stale") and not stale.changed
    run(VoucherReply(1, "o1:1", VoucherOp.TRY, True))
    for op in VoucherOp:
        for ok in (True, False):
            assert not run(VoucherReply(1, "o1:1", op, ok)).changed
    with pytest.raises(InvalidRequest):
        decide(run.order, VoucherReply(9, "o1:9", VoucherOp.TRY, True), now_ms=T0, policy=POLICY)


def test_a_cash_result_before_the_channel_was_asked_is_an_illegal_transition() -> None:
    run = Run("cash+pre")
    run(Activate())
    for result in (success(9_000), failure(), processing()):
        run.refused(result)


def test_a_pre_held_leg_adopts_the_users_hold_and_binds_it_to_the_order() -> None:
    account = vo.fund(vo.VoucherAccount("credit", "CNY", None), 1_000)
    pre = vo.try_hold(account, None, hold_id="pre-1", amount=200, order_id=None,
                      expires_at_ms=T0 + 60 * SECOND, now_ms=T0 - 30 * SECOND)
    run = Run("cash+pre_held")
    decision = run(Activate())
    (try_,) = [e for e in decision.effects if isinstance(e, TryHold)]
    assert try_ == TryHold("credit", "pre-1", 200, run.order.hold_expires_at_ms, 1,
                           adopt_only=True)
    adopted = vo.try_hold(pre.account, pre.fence, hold_id=try_.hold_id, amount=try_.amount,
                          order_id="o1", expires_at_ms=try_.expires_at_ms, now_ms=T0)
    assert adopted.account == pre.account
    assert adopted.fence is not None
    assert (adopted.fence.order_id, adopted.fence.expires_at_ms) == ("o1", try_.expires_at_ms)
    run(VoucherReply(1, "pre-1", VoucherOp.TRY, True))
    assert run.order.state is S.PAYING


def test_an_order_that_lost_a_shared_pre_hold_cannot_void_it_for_the_order_that_won() -> None:
    """The user submitted twice with one pre-hold; o2 is closed while its Try is in flight.
    Its Cancel must not void o1's hold, or o1 takes the cash and its voucher pays nothing."""
    account = vo.fund(vo.VoucherAccount("credit", "CNY", None), 1_000)
    pre = vo.try_hold(account, None, hold_id="pre-1", amount=200, order_id=None,
                      expires_at_ms=T0 + 60 * SECOND, now_ms=T0)
    account, fence = pre.account, pre.fence
    o1, o2 = Run("cash+pre_held", "o1"), Run("cash+pre_held", "o2")
    (try1,) = [e for e in o1(Activate()).effects if isinstance(e, TryHold)]
    (try2,) = [e for e in o2(Activate()).effects if isinstance(e, TryHold)]
    out = vo.try_hold(account, fence, hold_id=try1.hold_id, amount=try1.amount, order_id="o1",
                      expires_at_ms=try1.expires_at_ms, now_ms=T0 + 1)
    account, fence = out.account, out.fence
    o1(VoucherReply(1, "pre-1", VoucherOp.TRY, True))
    (cancel2,) = [e for e in o2(CloseOrder(CloseCause.USER)).effects if isinstance(e, CancelHold)]
    with pytest.raises(HoldRefused):
        vo.cancel(account, fence, hold_id=cancel2.hold_id, order_id="o2", now_ms=T0 + 2)
    # o2 held nothing there: the account tells it so (as actors.account_actor does)
    o2(VoucherReply(1, "pre-1", VoucherOp.CANCEL, True))
    assert o2.status(1) is L.CANCELLED
    with pytest.raises(HoldRefused):
        vo.try_hold(account, fence, hold_id=try2.hold_id, amount=try2.amount, order_id="o2",
                    expires_at_ms=try2.expires_at_ms, now_ms=T0 + 3)
    assert not o2(VoucherReply(1, "pre-1", VoucherOp.TRY, False)).changed
    o2(failure(ResultSource.CLOSE, "CLOSED"))
    assert o2.order.is_settled and o2.order.state is S.CLOSED
    (confirm1,) = [e for e in o1(success(9_800)).effects if isinstance(e, ConfirmHold)]
    out = vo.confirm(account, fence, hold_id=confirm1.hold_id, now_ms=T0 + 4)
    o1(VoucherReply(1, "pre-1", VoucherOp.CONFIRM, True))
    assert o1.order.state is S.SUCCEEDED and o1.status(1) is L.CONFIRMED
    assert (out.account.spent, out.account.held) == (200, 0)


# --------------------------------------------------------------------------- the tables


def test_no_transition_leaves_a_terminal_state_and_success_is_reached_only_by_payment() -> None:
    assert not any(src in TERMINAL_STATES for src, _ in ALLOWED_TRANSITIONS)
    assert {trigger for (_, trigger), dst in TRANSITIONS.items() if dst is S.SUCCEEDED} == {
        Trigger.CASH_SUCCEEDED, Trigger.DEBITS_DONE
    }
    for state in TERMINAL_STATES:
        for trigger in Trigger:
            with pytest.raises(IllegalTransition):
                next_state(state, trigger)


@pytest.mark.parametrize(
    ("comm", "business", "kind"),
    [
        ("SUCCESS", "SUCCESS", ResultKind.SUCCESS),
        ("SUCCESS", "PAYERROR", ResultKind.FAILURE),
        ("SUCCESS", "CLOSED", ResultKind.FAILURE),
        ("SUCCESS", "REVOKED", ResultKind.FAILURE),
        ("SUCCESS", "USERPAYING", ResultKind.PROCESSING),
        ("SUCCESS", "NOTPAY", ResultKind.PROCESSING),
        ("SUCCESS", "SYSTEMERROR", ResultKind.PROCESSING),
        ("SUCCESS", "REFUND", ResultKind.PROCESSING),
        ("SUCCESS", "success", ResultKind.PROCESSING),
        ("SUCCESS", "", ResultKind.PROCESSING),
        ("SUCCESS", None, ResultKind.PROCESSING),
        ("FAIL", "SUCCESS", ResultKind.PROCESSING),
        ("FAIL", "PAYERROR", ResultKind.PROCESSING),
        (None, "SUCCESS", ResultKind.PROCESSING),
        (None, None, ResultKind.PROCESSING),
    ],
)
def test_only_mapped_codes_after_a_good_communication_are_success_or_failure(
    comm: str | None, business: str | None, kind: ResultKind
) -> None:
    assert WECHAT_LIKE_PAY_CODES.classify(comm, business) is kind


def test_the_refund_table_maps_its_own_codes() -> None:
    table = WECHAT_LIKE_REFUND_CODES
    assert table.classify("SUCCESS", "SUCCESS") is ResultKind.SUCCESS
    assert table.classify("SUCCESS", "CHANGE") is ResultKind.FAILURE
    assert table.classify("SUCCESS", "REFUNDCLOSE") is ResultKind.FAILURE
    assert table.classify("SUCCESS", "PROCESSING") is ResultKind.PROCESSING
    assert table.classify("SUCCESS", "PAYERROR") is ResultKind.PROCESSING
    assert table.classify(None, "SUCCESS") is ResultKind.PROCESSING


_CODES = st.one_of(st.none(), st.sampled_from(["SUCCESS", "FAIL", "PAYERROR", "CLOSED"]), st.text())


@settings(max_examples=200, deadline=None)
@given(comm=_CODES, business=_CODES)
def test_any_other_code_pair_means_processing(comm: str | None, business: str | None) -> None:
    table = WECHAT_LIKE_PAY_CODES
    kind = table.classify(comm, business)
    if comm != "SUCCESS":
        assert kind is ResultKind.PROCESSING
    elif business == "SUCCESS":
        assert kind is ResultKind.SUCCESS
    elif business in {"PAYERROR", "CLOSED", "REVOKED"}:
        assert kind is ResultKind.FAILURE
    else:
        assert kind is ResultKind.PROCESSING


def test_a_code_table_cannot_map_one_code_to_both_success_and_failure() -> None:
    with pytest.raises(AssertionError):
        CodeTable("x", frozenset({"OK"}), frozenset({"DONE"}), frozenset({"DONE", "NO"}))


# =========================================================================== property: any events

GAPS_MS = (0, 1, 999, 1_000, 20_000, 100_000, 900_000)


def all_events(order: PaymentOrder) -> list[OrderEvent]:
    """Every event the order could be sent, right or wrong, fresh or stale."""
    events: list[OrderEvent] = [
        Activate(), CloseOrder(CloseCause.USER), CloseOrder(CloseCause.TIMEOUT),
        VoucherReply(99, "nope", VoucherOp.TRY, True),
    ]
    for leg in order.legs:
        hold = leg.hold_id or "cash"
        for op in VoucherOp:
            for ok in (True, False):
                events.append(VoucherReply(leg.leg_no, hold, op, ok, "" if ok else "no"))
        events.append(VoucherReply(leg.leg_no, f"{hold}-other", VoucherOp.TRY, True))
    cash = order.cash_leg
    right = cash.amount if cash is not None else 1
    codes = {ResultKind.SUCCESS: "SUCCESS", ResultKind.FAILURE: "PAYERROR",
             ResultKind.PROCESSING: "USERPAYING"}
    for kind, code in codes.items():
        for source in ResultSource:
            for amount in (None, right, right + 1):
                events.append(CashResult(kind, source, code, "wx-1", amount))
    events.append(CashResult(ResultKind.PROCESSING, ResultSource.QUERY, "SYSTEMERROR"))
    for refund_id in (f"{order.payment_serial}-R1", "other-R1"):
        for kind in ResultKind:
            events.append(RefundResult(refund_id, kind, ResultSource.CALLBACK, kind.value.upper()))
    for timer in TimerKind:
        for token in range(len(POLICY.query_schedule_ms) + 3):
            events.append(TimerFired(timer, token))
    return events


_EXPECTED_OP = {L.TRYING: VoucherOp.TRY, L.CONFIRMING: VoucherOp.CONFIRM,
                L.CANCELLING: VoucherOp.CANCEL, L.REVERSING: VoucherOp.CANCEL,
                L.DEBITING: VoucherOp.DEBIT}


def pertinent_events(order: PaymentOrder) -> list[OrderEvent]:
    """The answers the order is waiting for, so that runs reach deep states."""
    events: list[OrderEvent] = [TimerFired(TimerKind.CLOSE, 0)]
    for leg in order.legs:
        op = _EXPECTED_OP.get(leg.status)
        if op is not None and leg.hold_id is not None:
            events += [VoucherReply(leg.leg_no, leg.hold_id, op, True),
                       VoucherReply(leg.leg_no, leg.hold_id, op, False, "refused")]
    cash = order.cash_leg
    if cash is not None and cash.status is not L.NEW:
        events += [success(cash.amount), failure(), processing()]
        if cash.status is L.PAYING:
            events.append(TimerFired(TimerKind.QUERY, order.query_attempt))
        if cash.status is L.REFUNDING and cash.refund_id is not None:
            events += [RefundResult(cash.refund_id, kind, ResultSource.QUERY, "X")
                       for kind in ResultKind]
            events.append(TimerFired(TimerKind.REFUND_QUERY, order.refund_query_attempt))
    return events


@settings(max_examples=200, deadline=None)
@given(mix=st.sampled_from(sorted(MIXES)), data=st.data())
def test_any_sequence_of_events_keeps_the_order_monotone_consistent_and_money_safe(
    mix: str, data: st.DataObject
) -> None:
    history = History(make_order(mix))
    pool = all_events(history.order)
    now = T0
    if data.draw(st.booleans(), label="activate first"):
        history.apply(Activate(), now)
    for _ in range(data.draw(st.integers(1, 60), label="steps")):
        now += data.draw(st.sampled_from(GAPS_MS), label="gap")
        pertinent = pertinent_events(history.order)
        if data.draw(st.booleans(), label="pertinent"):
            event = data.draw(st.sampled_from(pertinent), label="event")
        else:
            event = data.draw(st.sampled_from(pool), label="event")
        was = history.order
        decision = history.apply(event, now)
        if decision is None:
            assert history.order == was
        if was.is_terminal:
            assert history.order.state is was.state
        cash = was.cash_leg
        if cash is not None and cash.status is L.PAID and isinstance(event, CashResult) and (
            event.kind is ResultKind.PROCESSING
        ):
            assert history.order == was
    hypothesis_event(f"{mix}: {'>'.join(dict.fromkeys(s.value for s in history.states))}")


# =========================================================================== property: a world


@dataclass
class Scenario:
    mix: str
    shortfall: frozenset[int]
    """Voucher legs whose account holds one unit less than the leg."""
    pre_hold: str
    """For a pre_held leg: none, placed, other_amount, short (expires in 1 ms)."""
    payer: str
    """instant (card), pays, fails, never."""
    pay_at_ms: int
    """When the user pays (or fails to), counted from the order's creation; not before the
    channel has the trade."""
    user_close_after_ms: int | None
    max_delay_ms: int
    duplicate: float
    loss: float
    """Chance that a message between the order and the channel is lost."""
    comm_error: float
    crash: float


scenarios = st.builds(
    Scenario,
    mix=st.sampled_from(sorted(MIXES)),
    shortfall=st.one_of(
        st.just(frozenset()), st.frozensets(st.integers(1, 3), min_size=1, max_size=2)
    ),
    pre_hold=st.sampled_from(["none", "placed", "placed", "other_amount", "short"]),
    payer=st.sampled_from(["instant", "pays", "pays", "pays", "fails", "never"]),
    pay_at_ms=st.sampled_from(
        [0, 500, 5_000, 100_000, 899_000, 900_000, 900_001, 900_050, 901_000, 1_000_000]
    ),
    user_close_after_ms=st.one_of(
        st.none(), st.sampled_from([0, 3, 2_000, 60_000, 900_000, 1_000_000])
    ),
    max_delay_ms=st.sampled_from([0, 50, 3_000]),
    duplicate=st.sampled_from([0.0, 0.2, 0.5]),
    loss=st.sampled_from([0.0, 0.0, 0.2, 0.5]),
    comm_error=st.sampled_from([0.0, 0.0, 0.3]),
    crash=st.sampled_from([0.0, 0.0, 0.05]),
)


TRADE_CODES = {None: "ORDERNOTEXIST", "NOTPAY": "NOTPAY", "SUCCESS": "SUCCESS",
               "PAYERROR": "PAYERROR", "CLOSED": "CLOSED", "REFUND": "REFUND"}
"""What a WeChat-Pay-like query answers for each state of a trade."""


@dataclass
class Channel:
    """A WeChat-Pay-like channel holding one trade (one payment serial)."""

    state: str | None = None
    amount: int = 0
    charged: int = 0
    refunded: int = 0
    refund_ids: set[str] = field(default_factory=set)
    violations: list[str] = field(default_factory=list)

    def code(self) -> str:
        return TRADE_CODES[self.state]


class World:
    """The order's surroundings: voucher accounts, a channel, a network, timers, crashes."""

    def __init__(self, scenario: Scenario, rng: random.Random) -> None:
        self.scenario = scenario
        self.rng = rng
        self.now = T0
        self.history = History(make_order(scenario.mix))
        self.queue: list[tuple[int, float, int, str, object]] = []
        self.sequence = 0
        self.channel = Channel()
        self.accounts: dict[str, vo.VoucherAccount] = {}
        self.fences: dict[tuple[str, str], vo.Fence] = {}
        self.lost = False
        for leg in self.order.legs:
            if leg.account_id is None:
                continue
            unit = ACCOUNTS[leg.account_id]
            account = vo.VoucherAccount(leg.account_id, unit.unit, unit.minor_per_unit)
            funding = leg.amount - 1 if leg.leg_no in scenario.shortfall else leg.amount + 50
            self.accounts[leg.account_id] = vo.fund(account, funding) if funding else account
            if leg.mode is LegMode.PRE_HELD and scenario.pre_hold != "none":
                self._place_pre_hold(leg.account_id, leg.hold_id, leg.amount)

    @property
    def order(self) -> PaymentOrder:
        return self.history.order

    def _place_pre_hold(self, account_id: str, hold_id: str | None, amount: int) -> None:
        assert hold_id is not None
        kind = self.scenario.pre_hold
        amount = amount - 1 if kind == "other_amount" and amount > 1 else amount
        expires = T0 + (1 if kind == "short" else 60 * SECOND)
        try:
            out = vo.try_hold(self.accounts[account_id], None, hold_id=hold_id, amount=amount,
                              order_id=None, expires_at_ms=expires, now_ms=T0 - SECOND)
        except PaymentError:
            return  # the user could not hold it: the order's own Try will tell
        self.accounts[account_id] = out.account
        self.fences[(account_id, hold_id)] = out.fence  # type: ignore[assignment]

    # ----------------------------------------------------------------- the network

    def send(self, dest: str, payload: object, *, lossy: bool = False,
             delay: int | None = None) -> None:
        if lossy and self.rng.random() < self.scenario.loss:
            self.lost = True
            return
        copies = 2 if self.rng.random() < self.scenario.duplicate else 1
        for _ in range(copies):
            due = self.now + (
                self.rng.randint(0, self.scenario.max_delay_ms) if delay is None else delay
            )
            self.sequence += 1
            heapq.heappush(self.queue, (due, self.rng.random(), self.sequence, dest, payload))
            if delay is not None:
                break

    def run(self, steps_max: int = 5_000) -> None:
        for _ in range(steps_max):
            if not self.queue:
                return
            due, _, _, dest, payload = heapq.heappop(self.queue)
            self.now = max(self.now, due)
            if dest == "order":
                self.to_order(payload)  # type: ignore[arg-type]
            elif dest == "voucher":
                self.to_voucher(payload)  # type: ignore[arg-type]
            elif dest == "channel":
                self.to_channel(payload)
            else:
                raise AssertionError(dest)
        raise AssertionError("the world never became quiet")

    def crash(self) -> None:
        """The order's actor dies: its mailbox is lost (timers are durable), then it restarts."""
        self.queue = [m for m in self.queue
                      if m[3] != "order" or isinstance(m[4], TimerFired)]
        heapq.heapify(self.queue)
        self.to_order(Activate(), crashed=True)

    # ----------------------------------------------------------------- the order

    def to_order(self, event: OrderEvent, crashed: bool = False) -> None:
        if not crashed and self.rng.random() < self.scenario.crash:
            self.crash()
        decision = self.history.apply(event, self.now)
        if decision is None:
            return
        for effect in decision.effects:
            match effect:
                case TryHold() | ConfirmHold() | CancelHold() | DebitVoucher():
                    self.send("voucher", effect)
                case ArmTimer():
                    self.send("order", TimerFired(effect.timer, effect.token),
                              delay=max(0, effect.due_at_ms - self.now))
                case _:
                    self.send("channel", effect, lossy=True)

    # ----------------------------------------------------------------- voucher accounts

    def to_voucher(self, effect: Effect) -> None:
        assert isinstance(effect, TryHold | ConfirmHold | CancelHold | DebitVoucher)
        key = (effect.account_id, effect.hold_id)
        account, fence = self.accounts[effect.account_id], self.fences.get(key)
        if fence is not None:  # the account sweeps a due hold before touching it
            swept = vo.expire_if_due(account, fence, self.now)
            account, fence = swept.account, swept.fence
            assert fence is not None
            self.accounts[effect.account_id], self.fences[key] = account, fence
        order_id = self.order.order_id
        try:
            match effect:
                case TryHold():
                    op = VoucherOp.TRY
                    out = vo.try_hold(account, fence, hold_id=effect.hold_id,
                                      amount=effect.amount, order_id=order_id,
                                      expires_at_ms=effect.expires_at_ms, now_ms=self.now,
                                      adopt_only=effect.adopt_only)
                case ConfirmHold():
                    op = VoucherOp.CONFIRM
                    out = vo.confirm(account, fence, hold_id=effect.hold_id, now_ms=self.now)
                case CancelHold():
                    op = VoucherOp.CANCEL
                    out = vo.cancel(account, fence, hold_id=effect.hold_id, order_id=order_id,
                                    now_ms=self.now)
                case DebitVoucher():
                    op = VoucherOp.DEBIT
                    out = vo.debit(account, fence, hold_id=effect.hold_id, amount=effect.amount,
                                   order_id=order_id, now_ms=self.now)
        except PaymentError as error:
            reply = VoucherReply(effect.leg_no, effect.hold_id, op, False, error.code)
        else:
            self.accounts[effect.account_id] = out.account.check()
            assert out.fence is not None
            self.fences[key] = out.fence
            ok = out.fence.status is not vo.FenceStatus.REFUSED
            reply = VoucherReply(effect.leg_no, effect.hold_id, op, ok, "" if ok else "short")
        self.send("order", reply)

    # ----------------------------------------------------------------- the channel

    def cash_result(self, source: ResultSource) -> CashResult:
        channel = self.channel
        if self.rng.random() < self.scenario.comm_error:
            self.lost = True
            comm, code = "FAIL", "COMMUNICATION_ERROR"
        else:
            comm, code = "SUCCESS", channel.code()
        kind = WECHAT_LIKE_PAY_CODES.classify(comm, code)
        amount = channel.amount if kind is ResultKind.SUCCESS else None
        return CashResult(kind, source, code, "wx-1" if amount else None, amount)

    def refund_result(self, refund_id: str, source: ResultSource) -> RefundResult:
        if self.rng.random() < self.scenario.comm_error:
            self.lost = True
            kind = WECHAT_LIKE_REFUND_CODES.classify("FAIL", "SUCCESS")
            return RefundResult(refund_id, kind, source, "COMMUNICATION_ERROR")
        code = "SUCCESS" if refund_id in self.channel.refund_ids else "REFUNDNOTEXIST"
        kind = WECHAT_LIKE_REFUND_CODES.classify("SUCCESS", code)
        return RefundResult(refund_id, kind, source, code)

    def to_channel(self, message: object) -> None:
        channel, scenario = self.channel, self.scenario
        match message:
            case PayCash():
                if channel.state is None:
                    channel.state, channel.amount = "NOTPAY", message.amount_minor
                    if scenario.payer == "instant":
                        channel.state, channel.charged = "SUCCESS", message.amount_minor
                    elif scenario.payer != "never":
                        pay_at = T0 + scenario.pay_at_ms
                        self.send("channel", "user pays", delay=max(0, pay_at - self.now))
                elif channel.amount and message.amount_minor != channel.amount:
                    channel.violations.append("one serial asked for two amounts")
                self.send("order", self.cash_result(ResultSource.SYNC), lossy=True)
            case "user pays":
                if channel.state != "NOTPAY":
                    return  # closed meanwhile: the user is told so and nothing is charged
                if scenario.payer == "pays":
                    channel.state, channel.charged = "SUCCESS", channel.amount
                else:
                    channel.state = "PAYERROR"
                self.send("order", self.cash_result(ResultSource.CALLBACK), lossy=True)
            case QueryCash():
                self.send("order", self.cash_result(ResultSource.QUERY), lossy=True)
            case CloseCash():
                if channel.state in (None, "NOTPAY"):
                    channel.state = "CLOSED"
                self.send("order", self.cash_result(ResultSource.CLOSE), lossy=True)
            case RefundCash():
                if channel.state not in ("SUCCESS", "REFUND"):
                    channel.violations.append(f"refund of an unpaid trade ({channel.state})")
                    return
                if message.amount_minor != channel.charged:
                    channel.violations.append("refund of another amount than was charged")
                if message.refund_id not in channel.refund_ids:
                    channel.refund_ids.add(message.refund_id)
                    channel.refunded += message.amount_minor
                    channel.state = "REFUND"
                self.send("order", self.refund_result(message.refund_id, ResultSource.SYNC),
                          lossy=True)
            case QueryRefund():
                self.send("order", self.refund_result(message.refund_id, ResultSource.QUERY),
                          lossy=True)
            case _:
                raise AssertionError(f"the channel got {message!r}")

    def reconcile(self) -> None:
        """The day's reconciliation file: the channel's truth about the trade, if it has one."""
        channel = self.channel
        if self.order.cash_leg is None or channel.state is None:
            return
        if channel.state == "NOTPAY":
            channel.state = "CLOSED"  # unpaid trades are closed at the end of the day
        if channel.state in ("SUCCESS", "REFUND"):
            event = CashResult(ResultKind.SUCCESS, ResultSource.RECONCILIATION, "SUCCESS",
                               "wx-1", channel.amount)
        else:
            event = CashResult(ResultKind.FAILURE, ResultSource.RECONCILIATION, channel.code())
        self.to_order(event)

    def sweep(self) -> None:
        """Much later: every hold that was never confirmed has expired."""
        self.now = max([self.now] + [f.expires_at_ms or 0 for f in self.fences.values()]) + 1
        for (account_id, hold_id), fence in list(self.fences.items()):
            out = vo.expire_if_due(self.accounts[account_id], fence, self.now)
            self.accounts[account_id] = out.account.check()
            self.fences[(account_id, hold_id)] = out.fence  # type: ignore[assignment]


def _assert_money_safe(world: World) -> None:
    order, channel, history = world.order, world.channel, world.history
    cash = order.cash_leg
    refunds = [e for e in history.effects if isinstance(e, RefundCash)]
    assert not channel.violations, channel.violations
    assert len(channel.refund_ids) <= 1
    assert channel.refunded in (0, channel.charged)
    if order.state is S.SUCCEEDED:
        if cash is not None:
            assert cash.status is L.PAID
            assert (channel.charged, channel.refunded) == (cash.amount, 0)
        assert not refunds
        for leg in order.legs:
            if leg.account_id is None:
                continue
            assert leg.hold_id is not None
            fence = world.fences[(leg.account_id, leg.hold_id)]
            account = world.accounts[leg.account_id]
            expected = L.CONFIRMED if leg.mode in HOLD_MODES else L.DEBITED
            assert leg.status is expected, (leg.leg_no, leg.status)
            assert fence.status is vo.FenceStatus.POSTED
            assert (account.spent, account.held) == (leg.amount, 0)
        return
    assert order.state in (S.FAILED, S.CLOSED)
    for leg in order.legs:
        if leg.account_id is None:
            continue
        account = world.accounts[leg.account_id]
        assert (account.spent, account.held) == (0, 0), (leg.leg_no, account)
        assert account.available == account.funded
        allowed = {L.CANCELLED, L.REFUSED} if leg.mode in HOLD_MODES else {
            L.CANCELLED, L.REVERSED, L.SHORTFALL
        }
        assert leg.status in allowed, (leg.leg_no, leg.status)
    if cash is None:
        return
    if channel.charged:
        assert refunds, "the channel charged a payment that did not go through: no refund"
        assert cash.status in (L.REFUNDED, L.REFUND_UNKNOWN), cash.status
        if not world.lost:
            assert cash.status is L.REFUNDED
            assert channel.refunded == channel.charged
    else:
        assert not refunds
        assert cash.status in (L.UNPAID, L.UNKNOWN), cash.status
        if cash.status is L.UNKNOWN:
            assert channel.state is None  # the channel never heard of it: nothing to reconcile


@settings(max_examples=300, deadline=None)
@given(scenario=scenarios, rng=st.randoms(use_true_random=False))
def test_in_a_world_of_late_lost_and_duplicated_messages_no_money_is_lost_or_kept(
    scenario: Scenario, rng: random.Random
) -> None:
    world = World(scenario, rng)
    world.to_order(Activate())
    if scenario.user_close_after_ms is not None:
        world.send("order", CloseOrder(CloseCause.USER), delay=scenario.user_close_after_ms)
    world.run()
    # quiet: every timer has fired, so the close timer has decided the order one way or the
    # other, and every leg has had its answer (a crash re-issues what it lost)
    assert world.order.is_terminal, world.order.state
    assert world.order.is_settled, [(leg.leg_no, leg.status) for leg in world.order.legs]
    world.reconcile()
    world.run()
    assert world.order.is_settled
    world.sweep()
    _assert_money_safe(world)
    cash = world.order.cash_leg
    cash_status = None if cash is None else cash.status.value
    hypothesis_event(f"{world.order.state.value}, cash {cash_status}")
    # a paid order is only ever paid through its channel's success
    if world.order.state is S.SUCCEEDED and world.order.cash_leg is not None:
        assert world.history.ever_paid


reliable_scenarios = st.builds(
    Scenario,
    mix=st.sampled_from(sorted(MIXES)),
    shortfall=st.just(frozenset()),
    pre_hold=st.just("placed"),  # an order naming a pre-hold that is not there fails
    payer=st.sampled_from(["instant", "pays"]),
    pay_at_ms=st.sampled_from([0, 500, 5_000, 99_999]),
    user_close_after_ms=st.none(),
    max_delay_ms=st.sampled_from([0, 50, 3_000]),
    duplicate=st.sampled_from([0.0, 0.2, 0.5]),
    loss=st.just(0.0),
    comm_error=st.just(0.0),
    crash=st.just(0.0),
)


@settings(max_examples=100, deadline=None)
@given(scenario=reliable_scenarios, rng=st.randoms(use_true_random=False))
def test_on_a_reliable_network_a_user_who_pays_in_time_always_succeeds(
    scenario: Scenario, rng: random.Random
) -> None:
    world = World(scenario, rng)
    world.to_order(Activate())
    world.run()
    assert world.order.state is S.SUCCEEDED
    _assert_money_safe(world)


late_payment_scenarios = st.builds(
    Scenario,
    mix=st.sampled_from(["cash", "cash+pre", "cash+post", "cash+pre_held", "seeds"]),
    shortfall=st.just(frozenset()),
    pre_hold=st.just("placed"),
    payer=st.just("pays"),
    pay_at_ms=st.integers(899_000, 904_000),
    user_close_after_ms=st.one_of(st.none(), st.integers(890_000, 905_000)),
    max_delay_ms=st.sampled_from([50, 3_000]),
    duplicate=st.sampled_from([0.0, 0.5]),
    loss=st.sampled_from([0.0, 0.3]),
    comm_error=st.just(0.0),
    crash=st.sampled_from([0.0, 0.05]),
)


@settings(max_examples=150, deadline=None)
@given(scenario=late_payment_scenarios, rng=st.randoms(use_true_random=False))
def test_a_payment_racing_the_close_either_succeeds_or_is_refunded_by_the_original_route(
    scenario: Scenario, rng: random.Random
) -> None:
    world = World(scenario, rng)
    world.to_order(Activate())
    if scenario.user_close_after_ms is not None:
        world.send("order", CloseOrder(CloseCause.USER), delay=scenario.user_close_after_ms)
    world.run()
    world.reconcile()
    world.run()
    world.sweep()
    assert world.order.is_settled
    _assert_money_safe(world)
    cash = world.order.cash_leg
    assert cash is not None
    if world.channel.charged and world.order.state is not S.SUCCEEDED:
        assert cash.status in (L.REFUNDED, L.REFUND_UNKNOWN)
    hypothesis_event(f"{world.order.state.value}, cash {cash.status.value}")
