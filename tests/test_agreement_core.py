"""The agreement state machine and the withholding's retry decision (pure core)."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from payengine.engine.agreement import (
    AGREEMENT_TRANSITIONS,
    FINAL_AGREEMENT_STATES,
    AgreementEvent,
    AgreementState,
    agreement_event,
    check_usable,
    new_agreement,
)
from payengine.engine.errors import AgreementInactive, IllegalTransition
from payengine.engine.order import (
    CashPart,
    Leg,
    LegMode,
    LegStatus,
    OrderPolicy,
    OrderState,
    PaymentOrder,
    PaymentRequest,
    Trigger,
    build_order,
)
from payengine.engine.withhold import (
    AttemptOutcome,
    StepKind,
    Withholding,
    WithholdState,
    after_step,
    attempt_outcome,
    next_step,
    waits_for_close,
)

events = st.lists(st.sampled_from(AgreementEvent), max_size=12)


@given(events)
def test_an_agreement_moves_only_along_its_table_and_never_leaves_a_final_state(
        sequence: list[AgreementEvent]) -> None:
    agreement = new_agreement("agr-1", "alice", "wechat", 0)
    for now_ms, event in enumerate(sequence, start=1):
        before = agreement
        try:
            agreement = agreement_event(before, event, now_ms, event.value)
        except IllegalTransition:
            assert (before.state, event) not in AGREEMENT_TRANSITIONS
            continue
        if agreement is before:  # a duplicate: nothing changed, not even the version
            assert (before.state, event) not in AGREEMENT_TRANSITIONS
            continue
        assert AGREEMENT_TRANSITIONS[(before.state, event)] is agreement.state
        assert before.state not in FINAL_AGREEMENT_STATES
        assert agreement.version == before.version + 1
        assert agreement.updated_at_ms == now_ms
        assert (agreement.user_id, agreement.channel) == ("alice", "wechat")


@given(events)
def test_only_an_active_agreement_is_usable(sequence: list[AgreementEvent]) -> None:
    agreement = new_agreement("agr-1", "alice", "wechat", 0)
    for event in sequence:
        with contextlib.suppress(IllegalTransition):
            agreement = agreement_event(agreement, event, 1, "")
        if agreement.state is AgreementState.ACTIVE:
            assert check_usable(agreement) is agreement
        else:
            with pytest.raises(AgreementInactive):
                check_usable(agreement)


def test_a_wallet_revocation_terminates_an_active_agreement_and_a_second_one_changes_nothing(
) -> None:
    signed = agreement_event(new_agreement("agr-1", "alice", "wechat", 0),
                             AgreementEvent.SIGNED, 1, "signed")
    revoked = agreement_event(signed, AgreementEvent.REVOKED, 2, "revoked")
    assert revoked.state is AgreementState.TERMINATED
    assert agreement_event(revoked, AgreementEvent.REVOKED, 3, "again") is revoked
    with pytest.raises(IllegalTransition):
        agreement_event(revoked, AgreementEvent.SIGNED, 4, "late")


# ---------------------------------------------------------------------- the retry decision

POLICY = OrderPolicy()


def attempt(state: OrderState, leg: LegStatus, *, code: str | None = None,
            cause: str = "") -> PaymentOrder:
    order = build_order(
        PaymentRequest("m", "w-1", "alice", "CNY", 500, "Subscription",
                       CashPart(500, "wechat")),
        order_id="o1", payment_serial="P1", now_ms=0, accounts={}, policy=POLICY)
    cash = order.legs[0]
    legs = (Leg(cash.leg_no, LegMode.CASH, None, 500, "CNY", 500, None, leg, "wechat",
                None, code),)
    return PaymentOrder(**{**{f: getattr(order, f) for f in order.__dataclass_fields__},
                           "state": state, "legs": legs, "cause": cause or state.value})


def test_a_closed_attempt_whose_close_is_unanswered_waits_and_is_looked_at_again() -> None:
    closed = attempt(OrderState.CLOSED, LegStatus.PAYING, cause=Trigger.CLOSE_TIMEOUT.value)
    assert attempt_outcome(closed, retryable=False) is AttemptOutcome.WAITING
    assert waits_for_close(closed)


def test_the_planted_bug_takes_an_unanswered_close_for_a_confirmed_one() -> None:
    closed = attempt(OrderState.CLOSED, LegStatus.PAYING, cause=Trigger.CLOSE_TIMEOUT.value)
    outcome = attempt_outcome(closed, retryable=False,
                              planted_bugs=frozenset({"withhold-retry-after-timeout"}))
    assert outcome is AttemptOutcome.CLOSED_UNPAID


def test_a_closed_attempt_confirmed_unpaid_may_be_retried_but_one_closed_on_purpose_not(
) -> None:
    timed_out = attempt(OrderState.CLOSED, LegStatus.UNPAID, cause="close_timeout")
    by_user = attempt(OrderState.CLOSED, LegStatus.UNPAID, cause="close_user")
    assert attempt_outcome(timed_out, retryable=False) is AttemptOutcome.CLOSED_UNPAID
    assert attempt_outcome(by_user, retryable=False) is AttemptOutcome.FAILED


def test_a_success_after_the_close_ends_the_withholding_without_a_retry() -> None:
    refunded = attempt(OrderState.CLOSED, LegStatus.REFUNDING, cause="close_timeout")
    assert attempt_outcome(refunded, retryable=False) is AttemptOutcome.FAILED


order_states = st.sampled_from(OrderState)
leg_statuses = st.sampled_from([LegStatus.NEW, LegStatus.PAYING, LegStatus.PAID,
                                LegStatus.UNPAID, LegStatus.UNKNOWN, LegStatus.REFUNDING,
                                LegStatus.REFUNDED])


@given(order_states, leg_statuses, st.booleans(), st.sampled_from(["close_timeout",
                                                                   "close_user", ""]))
def test_an_attempt_that_may_still_charge_is_never_followed(
        state: OrderState, leg: LegStatus, retryable: bool, cause: str) -> None:
    order = attempt(state, leg, cause=cause)
    outcome = attempt_outcome(order, retryable=retryable)
    if outcome in (AttemptOutcome.DECLINED, AttemptOutcome.CLOSED_UNPAID):
        assert order.state in (OrderState.FAILED, OrderState.CLOSED)
        assert leg in (LegStatus.NEW, LegStatus.UNPAID)
    if not order.is_terminal:
        assert outcome is AttemptOutcome.WAITING


agreement_ids = st.lists(st.sampled_from(["a1", "a2", "a3", "a4"]), min_size=1, max_size=4,
                         unique=True)


@st.composite
def withholdings(draw: st.DrawFn) -> Withholding:
    ids = tuple(draw(agreement_ids))
    attempts = tuple(draw(st.lists(st.sampled_from(ids), min_size=1, max_size=5)))
    declined = tuple(draw(st.lists(st.sampled_from(ids), max_size=3, unique=True)))
    return Withholding("m", "w-1", "alice", 500, "CNY", "t", ids, attempts,
                       WithholdState.PAYING, "", 0, 0, declined)


@given(withholdings(), st.sampled_from(AttemptOutcome), st.lists(st.sampled_from(
    ["a1", "a2", "a3", "a4"]), unique=True), st.integers(1, 10))
def test_a_retry_pays_on_an_active_agreement_that_never_declined_within_the_attempts_max(
        w: Withholding, outcome: AttemptOutcome, active: list[str], attempts_max: int) -> None:
    step = next_step(w, outcome, active, attempts_max=attempts_max)
    if step.kind is not StepKind.RETRY:
        assert step.kind is {AttemptOutcome.WAITING: StepKind.WAIT,
                             AttemptOutcome.SUCCEEDED: StepKind.SUCCEED}.get(outcome,
                                                                             StepKind.FAIL)
        return
    assert outcome in (AttemptOutcome.DECLINED, AttemptOutcome.CLOSED_UNPAID)
    assert w.attempt < attempts_max
    assert step.agreement_id in active and step.agreement_id in w.agreement_ids
    assert step.agreement_id not in w.declined
    if outcome is AttemptOutcome.DECLINED:
        assert step.agreement_id != w.agreement_id
    after = after_step(w, step, outcome, 5)
    assert after.attempt == w.attempt + 1 and after.agreement_id == step.agreement_id
    assert after.state is WithholdState.PAYING and after.version == w.version + 1


def test_a_declined_attempt_moves_to_the_next_agreement_and_a_timeout_stays_on_its_own(
) -> None:
    w = Withholding("m", "w-1", "alice", 500, "CNY", "t", ("a1", "a2"), ("a1",),
                    WithholdState.PAYING, "", 0, 0)
    declined = next_step(w, AttemptOutcome.DECLINED, ["a1", "a2"], attempts_max=3)
    timed_out = next_step(w, AttemptOutcome.CLOSED_UNPAID, ["a1", "a2"], attempts_max=3)
    assert (declined.kind, declined.agreement_id) == (StepKind.RETRY, "a2")
    assert (timed_out.kind, timed_out.agreement_id) == (StepKind.RETRY, "a1")
    revoked = next_step(w, AttemptOutcome.CLOSED_UNPAID, ["a2"], attempts_max=3)
    assert revoked.agreement_id == "a2"
    none_left = next_step(w, AttemptOutcome.DECLINED, ["a1"], attempts_max=3)
    assert none_left.kind is StepKind.FAIL
