"""A pre-authorisation's capture or void the wallet leaves unsettled, or answers with another
amount: flagged for a person (``authorisation_unsettled``, ``capture_amount_mismatch``),
asked again by the sentinel (bounded), never believed (README "Pump pre-authorisation")."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from payengine.engine.authorisation import (
    Authorisation,
    AuthorisationFlag,
    authorisation_from_json,
)
from payengine.engine.errors import ActionNotApplicable
from payengine.engine.evolve import evolve
from payengine.engine.order import (
    ArmTimer,
    AuthorisationOp,
    AuthorisationResult,
    AuthorisationStatus,
    CaptureAuthorisation,
    CaptureCash,
    LegStatus,
    OrderPolicy,
    OrderState,
    PaymentOrder,
    TimerFired,
    TimerKind,
    VoidAuthorisation,
    VoidCash,
    decide,
)
from tests.test_preauth import Station
from tests.test_preauth_core import POLICY, T0, _authorised_order

A = AuthorisationStatus
SCHEDULE = POLICY.query_schedule_ms  # (1_000, 2_000, 4_000)
SENTINEL = OrderPolicy(authorisation_ttl_ms=POLICY.authorisation_ttl_ms,
                       query_schedule_ms=SCHEDULE, voucher_sentinel_interval_ms=60_000,
                       voucher_sentinel_attempts_max=3)


def _fire(order: PaymentOrder, now: int, policy: OrderPolicy = SENTINEL
          ) -> tuple[PaymentOrder, tuple[object, ...]]:
    """The query timer as armed (its token), at ``now``."""
    decision = decide(order, TimerFired(TimerKind.QUERY, order.query_attempt), now_ms=now,
                      policy=policy)
    return decision.order, decision.effects


def _capturing(amount: int = 9_000) -> tuple[PaymentOrder, int]:
    order = decide(_authorised_order(), CaptureAuthorisation("cap-1", amount), now_ms=T0,
                   policy=SENTINEL).order
    assert order.state is OrderState.CAPTURING
    return order, order.leg(0).amount


def _run_out_schedule(order: PaymentOrder) -> tuple[PaymentOrder, int]:
    """Fire every query of the schedule with no answer: the last one is the first past it."""
    now = T0
    for _ in range(len(SCHEDULE)):
        assert order.next_query_at_ms is not None
        now = order.next_query_at_ms
        order, _ = _fire(order, now)
    assert order.next_query_at_ms is not None
    return order, order.next_query_at_ms


def test_a_capture_unanswered_on_its_whole_schedule_is_flagged_and_asked_at_the_sentinel_interval(
        ) -> None:
    order, _ = _capturing()
    order, due = _run_out_schedule(order)
    assert order.authorisation is not None and order.authorisation.flag is None
    order, effects = _fire(order, due)
    a = order.authorisation
    assert a is not None and a.flag is AuthorisationFlag.UNSETTLED
    assert a.flag_note == "the capture is unsettled after its query schedule"
    assert order.state is OrderState.CAPTURING and order.leg(0).status is LegStatus.CAPTURING
    assert [type(e) for e in effects] == [CaptureCash, ArmTimer]
    assert order.next_query_at_ms == due + 60_000


def test_the_sentinel_stops_after_its_attempts_and_a_start_asks_again_afresh() -> None:
    order, _ = _capturing()
    order, due = _run_out_schedule(order)
    rounds = 0
    while order.next_query_at_ms is not None:
        order, effects = _fire(order, order.next_query_at_ms)
        rounds += 1
        assert rounds <= 10, "the sentinel must stop"
    assert rounds == 1 + SENTINEL.voucher_sentinel_attempts_max  # the asks, then the stop
    assert effects == ()
    assert order.authorisation is not None
    assert order.authorisation.flag is AuthorisationFlag.UNSETTLED  # still flagged
    from payengine.engine.order import Activate
    started = decide(order, Activate(), now_ms=due + 10**7, policy=SENTINEL)
    assert [type(e) for e in started.effects] == [CaptureCash, ArmTimer]
    assert started.order.query_attempt == 0  # a fresh schedule


def test_an_unsettled_void_is_flagged_too() -> None:
    order = decide(_authorised_order(), VoidAuthorisation(), now_ms=T0, policy=SENTINEL).order
    order, due = _run_out_schedule(order)
    order, effects = _fire(order, due)
    a = order.authorisation
    assert a is not None and a.flag is AuthorisationFlag.UNSETTLED
    assert a.flag_note == "the void is unsettled after its query schedule"
    assert [type(e) for e in effects] == [VoidCash, ArmTimer]


def test_a_capture_the_wallet_says_took_another_amount_is_flagged_and_not_believed() -> None:
    order, cash = _capturing()
    said = AuthorisationResult(AuthorisationOp.CAPTURE, A.CAPTURED, cash - 100, "s1")
    decision = decide(order, said, now_ms=T0 + 10, policy=SENTINEL)
    flagged = decision.order
    a = flagged.authorisation
    assert a is not None and a.flag is AuthorisationFlag.AMOUNT_MISMATCH
    assert a.flag_note == f"the wallet says it captured {cash - 100}, {cash} was asked"
    assert flagged.state is OrderState.CAPTURING and flagged.leg(0).amount == cash
    assert flagged.total_minor == order.total_minor and decision.effects == ()
    again = decide(flagged, said, now_ms=T0 + 20, policy=SENTINEL)
    assert not again.changed  # the same answer again changes nothing
    # the schedule running out keeps the more specific flag
    ran_out, due = _run_out_schedule(flagged)
    ran_out, _ = _fire(ran_out, due)
    assert ran_out.authorisation is not None
    assert ran_out.authorisation.flag is AuthorisationFlag.AMOUNT_MISMATCH


def test_a_later_answer_with_the_amount_asked_settles_a_flagged_capture() -> None:
    order, cash = _capturing()
    order = decide(order, AuthorisationResult(AuthorisationOp.QUERY, A.CAPTURED, cash + 5, "s1"),
                   now_ms=T0 + 10, policy=SENTINEL).order
    order = decide(order, AuthorisationResult(AuthorisationOp.QUERY, A.CAPTURED, cash, "s1"),
                   now_ms=T0 + 20, policy=SENTINEL).order
    assert order.state is OrderState.SUCCEEDED and order.leg(0).status is LegStatus.PAID
    assert order.total_minor == 9_000


def test_the_planted_bug_believes_the_wallet_s_amount() -> None:
    policy = OrderPolicy(authorisation_ttl_ms=POLICY.authorisation_ttl_ms,
                         query_schedule_ms=SCHEDULE,
                         planted_bugs=frozenset({"capture-amount-believed"}))
    order, cash = _capturing()
    order = decide(order, AuthorisationResult(AuthorisationOp.CAPTURE, A.CAPTURED, cash - 100,
                                              "s1"), now_ms=T0 + 10, policy=policy).order
    assert order.state is OrderState.SUCCEEDED and order.total_minor == 9_000 - 100


def test_an_authorisation_stored_before_flags_loads_unflagged_and_a_flag_round_trips() -> None:
    assert authorisation_from_json([100, [[0, 100, 100]], None, None]) == Authorisation(
        100, ((0, 100, 100),))
    order, cash = _capturing()
    order = decide(order, AuthorisationResult(AuthorisationOp.CAPTURE, A.CAPTURED, cash - 1,
                                              "s1"), now_ms=T0, policy=SENTINEL).order
    from payengine.engine.authorisation import authorisation_json
    stored = authorisation_json(order)
    assert stored is not None and stored[4:] == ["amount_mismatch", order.authorisation.flag_note
                                                  if order.authorisation else None, T0]
    assert authorisation_from_json(stored) == order.authorisation
    assert authorisation_from_json(stored[:6]) == evolve(order.authorisation, flagged_at_ms=0)


def test_an_unflagged_authorisation_is_stored_in_the_four_items_older_releases_read() -> None:
    from payengine.engine.authorisation import authorisation_json
    order, _ = _capturing()
    stored = authorisation_json(order)
    assert stored is not None and len(stored) == 4
    assert authorisation_from_json(stored) == order.authorisation


def test_a_void_after_a_refused_flagged_capture_starts_unflagged_and_is_flagged_anew() -> None:
    order, _ = _capturing()
    order, due = _run_out_schedule(order)
    order, _ = _fire(order, due)
    assert order.authorisation is not None
    assert (order.authorisation.flag, order.authorisation.flagged_at_ms) == (
        AuthorisationFlag.UNSETTLED, due)
    refused = AuthorisationResult(AuthorisationOp.CAPTURE, A.DECLINED, reason="limit")
    order = decide(order, refused, now_ms=due + 5, policy=SENTINEL).order
    assert order.leg(0).status is LegStatus.VOIDING
    assert order.authorisation is not None and order.authorisation.flag is None
    order, void_due = _run_out_schedule(order)
    order, _ = _fire(order, void_due)
    a = order.authorisation
    assert a is not None and a.flag is AuthorisationFlag.UNSETTLED
    assert a.flag_note == "the void is unsettled after its query schedule"
    assert a.flagged_at_ms == void_due > due


def test_a_start_of_a_flagged_order_asks_again_on_a_fresh_schedule_unflagged() -> None:
    from payengine.engine.order import Activate
    order, _ = _capturing()
    order, due = _run_out_schedule(order)
    order, _ = _fire(order, due)
    assert order.next_query_at_ms is not None  # the sentinel still asks
    started = decide(order, Activate(), now_ms=due + 1, policy=SENTINEL)
    assert [type(e) for e in started.effects] == [CaptureCash, ArmTimer]
    assert started.order.query_attempt == 0
    assert started.order.authorisation is not None
    assert started.order.authorisation.flag is None


ANSWERS = st.lists(st.tuples(
    st.sampled_from(list(AuthorisationOp)),
    st.sampled_from([*list(A), None]),
    st.one_of(st.none(), st.integers(1, 20_000))), max_size=25)


@settings(max_examples=200, deadline=None)
@given(ANSWERS, st.integers(1, 11_000))
def test_whatever_the_wallet_answers_a_capture_succeeds_only_with_the_cash_amount_asked(
        answers: list[tuple[AuthorisationOp, AuthorisationStatus | None, int | None]],
        amount: int) -> None:
    order, cash = _capturing(amount)
    now = T0
    for op, status, said in answers:
        now += 500
        event: object = AuthorisationResult(op, status, said, "s1")
        if order.next_query_at_ms is not None and order.next_query_at_ms <= now:
            event = TimerFired(TimerKind.QUERY, order.query_attempt)
        order = decide(order, event, now_ms=now, policy=SENTINEL).order  # type: ignore[arg-type]
        a = order.authorisation
        assert a is not None and a.captured_minor == amount == order.total_minor
        assert order.leg(0).amount == cash
        if a.flag is AuthorisationFlag.AMOUNT_MISMATCH:
            assert str(cash) in a.flag_note
        if order.leg(0).status is LegStatus.PAID:
            assert order.state is OrderState.SUCCEEDED


# --------------------------------------------------------------------------- in the engine


@pytest.fixture
def station(tmp_path: Path) -> Iterator[Station]:
    s = Station(tmp_path / "station.db")
    yield s
    s.engine.shutdown()


def test_the_queue_lists_a_capture_whose_amount_the_wallet_misreports_and_a_retry_asks_again(
        station: Station) -> None:
    view = station.authorised()
    real_reply = station.wallet._reply
    misreport = {"on": True}

    def reply(op: str, serial: str) -> object:
        answer = real_reply(op, serial)
        if misreport["on"] and answer.status is A.CAPTURED and answer.amount_minor:
            return type(answer)(answer.status, answer.amount_minor - 7, answer.channel_txn_id)
        return answer

    station.wallet._reply = reply  # type: ignore[method-assign,assignment]
    station.engine.capture(view.order_id, 12_345, capture_id="cap-1")
    item_id = f"capture_amount_mismatch:{view.order_id}"
    station.run_until("flagged", lambda: any(
        i.item_id == item_id for i in station.engine.attention()))
    item = next(i for i in station.engine.attention() if i.item_id == item_id)
    assert item.kind.value == "capture_amount_mismatch" and item.order_id == view.order_id
    assert "the wallet says it captured 11838, 11845 was asked" in item.why
    assert station.order(view.order_id).state == "capturing"

    misreport["on"] = False
    asked = len(station.wallet.calls)
    resolution = station.engine.resolve(item_id, "retry", operator="ops-anna",
                                        reason="the wallet fixed its report")
    assert resolution.outcome == "asked_again" and not resolution.repeated
    station.run_until("settled", lambda: station.order(view.order_id).settled)
    assert ("capture", view.payment_serial, "cap-1", "11845") in station.wallet.calls[asked:]
    assert station.order(view.order_id).state == "succeeded"
    assert not [i for i in station.engine.attention() if i.item_id == item_id]
    again = station.engine.resolve(item_id, "retry", operator="ops-anna", reason="again")
    assert again.repeated


def test_an_unsettled_capture_is_listed_and_acknowledged_while_the_sentinel_goes_on_asking(
        station: Station) -> None:
    view = station.authorised()
    station.wallet.fail["capture"] = 10**6  # every capture times out
    station.engine.capture(view.order_id, 12_345, capture_id="cap-1")
    item_id = f"authorisation_unsettled:{view.order_id}"
    station.run_until("flagged", lambda: any(
        i.item_id == item_id for i in station.engine.attention()))
    resolution = station.engine.resolve(item_id, "acknowledge", operator="ops-anna",
                                        reason="called the acquirer")
    assert resolution.outcome == "acknowledged"
    assert item_id not in {i.item_id for i in station.engine.attention()}
    asked = sum(call[0] == "capture" for call in station.wallet.calls)
    station.run_for(station.policy.voucher_sentinel_interval_ms * 2 + 1)
    assert sum(call[0] == "capture" for call in station.wallet.calls) > asked  # still asking
    station.wallet.fail["capture"] = 0
    station.run_for(station.policy.voucher_sentinel_interval_ms + 1)
    assert station.order(view.order_id).state == "succeeded"


def test_an_unsettled_capture_flagged_again_after_a_retry_is_a_new_occurrence_retried_again(
        station: Station) -> None:
    view = station.authorised()
    station.wallet.fail["capture"] = 10**6  # every capture times out
    station.engine.capture(view.order_id, 12_345, capture_id="cap-1")
    item_id = f"authorisation_unsettled:{view.order_id}"

    def listed() -> list[object]:
        return [i for i in station.engine.attention() if i.item_id == item_id]

    station.run_until("flagged", lambda: bool(listed()))
    first = station.engine.attention()
    occurrence = next(i.occurrence for i in first if i.item_id == item_id)
    assert occurrence > 0
    retried = station.engine.resolve(item_id, "retry", operator="ops-anna", reason="try")
    assert (retried.outcome, retried.repeated, retried.occurrence) == (
        "asked_again", False, occurrence)
    station.run_until("flagged again", lambda: any(
        i.item_id == item_id and i.occurrence != occurrence for i in station.engine.attention()))
    station.wallet.fail["capture"] = 0
    asked = sum(call[0] == "capture" for call in station.wallet.calls)
    again = station.engine.resolve(item_id, "retry", operator="ops-anna", reason="fixed")
    assert (again.outcome, again.repeated) == ("asked_again", False)
    assert again.occurrence != occurrence
    station.run_until("settled", lambda: station.order(view.order_id).settled)
    assert sum(call[0] == "capture" for call in station.wallet.calls) > asked
    assert station.order(view.order_id).state == "succeeded"
    assert not listed()


def test_a_retry_of_an_unsettled_capture_from_another_process_is_refused(
        station: Station) -> None:
    from payengine.actors.operator import resolve_in_file
    from payengine.persistence.store import Store

    view = station.authorised()
    station.wallet.fail["capture"] = 10**6
    station.engine.capture(view.order_id, 12_345, capture_id="cap-1")
    item_id = f"authorisation_unsettled:{view.order_id}"
    station.run_until("flagged", lambda: any(
        i.item_id == item_id for i in station.engine.attention()))
    store = Store(station.path, read_only=True)
    try:
        with pytest.raises(ActionNotApplicable):
            resolve_in_file(station.path, store, item_id, "retry", "ops-anna", "now",
                            station.scheduler.now_ms)
    finally:
        store.close()

