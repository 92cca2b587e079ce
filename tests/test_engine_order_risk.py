"""The order core with a risk step-up: arbitrary event sequences keep the step-up's promises.

``decide`` is driven from an order born in ``needs_verification`` by any sequence of verify
calls (right or wrong codes), user closes, timers (close, verification window), restarts
(``Activate``), voucher answers and cash results, with time moving on. After every event:

- every order transition is in the table (``ALLOWED_TRANSITIONS``);
- nothing is tried, held or charged before the right code was given (no ``TryHold`` and
  no ``PayCash`` effect; every leg ``new`` while waiting);
- the verification passes only on the right code; once it failed, expired or was closed,
  the order is failed or closed and no leg is held, tried or confirmed, and the user's
  pre-hold a pre-held leg names is released (a ``CancelHold`` goes out for it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from payengine.engine.codes import ResultKind
from payengine.engine.errors import IllegalTransition
from payengine.engine.order import (
    ALLOWED_TRANSITIONS,
    HOLD_MODES,
    AccountUnit,
    Activate,
    CancelHold,
    CashPart,
    CashResult,
    CloseCause,
    CloseOrder,
    ConfirmHold,
    DebitVoucher,
    Effect,
    LegMode,
    LegStatus,
    OrderPolicy,
    OrderState,
    PayCash,
    PaymentOrder,
    PaymentRequest,
    ResultSource,
    TimerFired,
    TimerKind,
    TryHold,
    VerifyCode,
    VoucherOp,
    VoucherPart,
    VoucherReply,
    build_order,
    decide,
    with_risk,
)
from payengine.engine.risk import Verification, VerificationStatus, code_digest

POLICY = OrderPolicy(pay_window_ms=10_000)
T0 = 1_700_000_000_000
CODE = "735911"
ACCOUNTS = {"rp": AccountUnit("CNY", None), "pts": AccountUnit("POINTS", 10)}
MIXES = {
    "cash": (10_000, ()),
    "cash+pre": (9_000, (VoucherPart("rp", 500), VoucherPart("pts", 50))),
    "cash+pre_held": (9_800, (VoucherPart("rp", 200, LegMode.PRE_HELD, hold_id="tick"),)),
    "cash+post": (9_500, (VoucherPart("pts", 50, LegMode.POST_DEDUCT),)),
    "vouchers": (None, (VoucherPart("rp", 600), VoucherPart("pts", 940, LegMode.POST_DEDUCT))),
}
NOT_RELEASED = frozenset({LegStatus.TRYING, LegStatus.HELD, LegStatus.CONFIRMING,
                          LegStatus.CONFIRMED, LegStatus.DEBITING, LegStatus.DEBITED})


def stepped_up(mix: str, window_ms: int, attempts_max: int) -> PaymentOrder:
    cash, vouchers = MIXES[mix]
    total = (cash or 0) + sum(v.amount * (10 if v.account_id == "pts" else 1) for v in vouchers)
    request = PaymentRequest("m", "n1", "alice", "CNY", total, "Fuel",
                             None if cash is None else CashPart(cash, "wechat"), vouchers)
    order = build_order(request, order_id="o1", payment_serial="P1", now_ms=T0,
                        accounts=ACCOUNTS, policy=POLICY)
    return with_risk(order, Verification(code_digest("o1", CODE), T0 + window_ms, attempts_max,
                                         "step_up_amount"))


events = st.one_of(
    st.tuples(st.just("verify"), st.booleans()),
    st.tuples(st.just("advance"), st.sampled_from([1, 500, 3_000, 8_000])),
    st.tuples(st.just("timer"), st.sampled_from([TimerKind.CLOSE, TimerKind.VERIFY])),
    st.tuples(st.just("close"), st.none()),
    st.tuples(st.just("activate"), st.none()),
    st.tuples(st.just("voucher"), st.booleans()),
    st.tuples(st.just("cash"), st.sampled_from([ResultKind.SUCCESS, ResultKind.FAILURE])),
)


@dataclass
class World:
    order: PaymentOrder
    now_ms: int = T0
    right_given: bool = False
    outstanding: list[Effect] = field(default_factory=list)
    effects: list[Effect] = field(default_factory=list)

    def event(self, kind: str, arg: object) -> object | None:
        match kind:
            case "verify":
                self.right_given |= bool(arg)
                return VerifyCode(CODE if arg else "000000")
            case "advance":
                assert isinstance(arg, int)
                self.now_ms += arg
                return None
            case "timer":
                assert isinstance(arg, TimerKind)
                return TimerFired(arg, 0)
            case "close":
                return CloseOrder(CloseCause.USER)
            case "activate":
                return Activate()
            case "voucher":
                return self._voucher_answer(bool(arg))
            case "cash":
                assert isinstance(arg, ResultKind)
                if not any(isinstance(e, PayCash) for e in self.effects):
                    return None  # the channel was never asked: no result can exist
                return CashResult(arg, ResultSource.SYNC, "SUCCESS" if arg is ResultKind.SUCCESS
                                  else "PAYERROR", "TX1", None)
        raise AssertionError(kind)

    def _voucher_answer(self, ok: bool) -> VoucherReply | None:
        for effect in self.outstanding:
            ops = {TryHold: VoucherOp.TRY, ConfirmHold: VoucherOp.CONFIRM,
                   CancelHold: VoucherOp.CANCEL, DebitVoucher: VoucherOp.DEBIT}
            op = ops.get(type(effect))
            if op is not None:
                self.outstanding.remove(effect)
                return VoucherReply(effect.leg_no, effect.fence, op,  # type: ignore[attr-defined]
                                    ok or op is not VoucherOp.TRY)
        return None


@settings(max_examples=300, deadline=None)
@given(mix=st.sampled_from(sorted(MIXES)), window_ms=st.sampled_from([2_000, 20_000]),
       attempts_max=st.integers(1, 4), steps=st.lists(events, max_size=40))
def test_every_event_sequence_keeps_the_step_ups_promises(
        mix: str, window_ms: int, attempts_max: int, steps: list[tuple[str, object]]) -> None:
    world = World(stepped_up(mix, window_ms, attempts_max))
    assert world.order.state is OrderState.NEEDS_VERIFICATION
    released: set[int] = set()
    for kind, arg in steps:
        event = world.event(kind, arg)
        if event is None:
            continue
        try:
            decision = decide(world.order, event, now_ms=world.now_ms,  # type: ignore[arg-type]
                              policy=POLICY)
        except IllegalTransition:
            continue  # refused: the order is untouched
        before, world.order = world.order, decision.order
        world.effects += decision.effects
        world.outstanding += [e for e in decision.effects
                              if isinstance(e, TryHold | ConfirmHold | CancelHold | DebitVoucher)]
        released |= {e.leg_no for e in decision.effects if isinstance(e, CancelHold)}
        for t in decision.transitions:
            if t.entity == "order":
                assert (OrderState(t.from_state), OrderState(t.to_state)) in ALLOWED_TRANSITIONS
        _check(world, before, released)


def _check(world: World, before: PaymentOrder, released: set[int]) -> None:
    order, v = world.order, world.order.verification
    assert v is not None
    if not world.right_given:
        assert v.status is not VerificationStatus.PASSED
        assert not any(isinstance(e, TryHold | PayCash) for e in world.effects), world.effects
    if order.state is OrderState.NEEDS_VERIFICATION:
        assert {leg.status for leg in order.legs} == {LegStatus.NEW}
        assert v.status is VerificationStatus.PENDING and v.attempts < v.attempts_max
    if v.status in (VerificationStatus.FAILED, VerificationStatus.EXPIRED,
                    VerificationStatus.CLOSED):
        assert order.state in (OrderState.FAILED, OrderState.CLOSED)
        assert not any(leg.status in NOT_RELEASED for leg in order.legs), order.legs
        for leg in order.legs:
            if leg.mode is LegMode.PRE_HELD:
                assert leg.leg_no in released, "the user's pre-hold was not released"
        assert not any(isinstance(e, PayCash) for e in world.effects)
    if v.status is VerificationStatus.FAILED:
        assert v.attempts == v.attempts_max
    if before.verification is not None and before.verification.status is not (
        VerificationStatus.PENDING
    ):
        assert v.status is before.verification.status, "a verification's end is final"
    if order.state in (OrderState.ACCEPTED, OrderState.PAYING, OrderState.DEDUCTING,
                       OrderState.SUCCEEDED):
        assert v.status is VerificationStatus.PASSED
    for leg in order.legs:
        if leg.mode in HOLD_MODES and leg.status is not LegStatus.NEW:
            assert world.right_given or leg.status in (LegStatus.CANCELLING,
                                                       LegStatus.CANCELLED)
