"""Sequences of the withholding auto-retry table: timeouts and declines mixed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from payengine import AgreementStatus, ChannelReply, OrderPolicy
from tests.blackbox_session4b.support import AgreementWallet, open_with, paid
from tests.helpers import signed_callback, wait_for

DECLINE = ChannelReply("SUCCESS", "NOTENOUGH")
WAITING = ChannelReply("SUCCESS", "USERPAYING")
SHORT = OrderPolicy(pay_window_ms=400, query_schedule_ms=(100,),
                    refund_query_schedule_ms=(100,))


def scripted(*replies: Any) -> Any:
    """Pay answers in turn (the last one repeats)."""
    left = list(replies)

    def pay(serial: str, amount: int, details: Any) -> ChannelReply:
        reply = left.pop(0) if len(left) > 1 else left[0]
        return paid(serial, amount) if reply == "paid" else reply
    return pay


def decided(eng: Any) -> Any:
    return wait_for(lambda: (w := eng.get_withholding("gym-1", "sub-1")).state != "paying"
                    and w, timeout_s=15, what="withholding decided")


def test_a_timeout_then_a_decline_then_the_next_agreement(tmp_path: Path) -> None:
    a = AgreementWallet("a", pay=scripted(WAITING, DECLINE))
    b = AgreementWallet("b", pay=scripted("paid"))
    eng = open_with(tmp_path / "x.db", [a, b], policy=SHORT)
    try:
        x = eng.sign_agreement("alice", "a")
        y = eng.sign_agreement("alice", "b")
        eng.withhold("gym-1", "sub-1", "alice", 99_00, "CNY", "Monthly")
        w = decided(eng)
        assert (w.state, w.attempt) == ("succeeded", 3)
        assert w.attempts == (x.agreement_id, x.agreement_id, y.agreement_id)
        assert w.declined == (x.agreement_id,)
        states = [eng.find_order("gym-1", "sub-1", attempt=n).state for n in (1, 2, 3)]
        assert states == ["closed", "failed", "succeeded"]
    finally:
        eng.shutdown()


def test_a_decline_then_a_timeout_retries_on_the_agreement_that_timed_out(tmp_path: Path
                                                                          ) -> None:
    a = AgreementWallet("a", pay=scripted(DECLINE))
    b = AgreementWallet("b", pay=scripted(WAITING, "paid"))
    eng = open_with(tmp_path / "x.db", [a, b], policy=SHORT)
    try:
        x = eng.sign_agreement("alice", "a")
        y = eng.sign_agreement("alice", "b")
        eng.withhold("gym-1", "sub-1", "alice", 99_00, "CNY", "Monthly")
        w = decided(eng)
        assert (w.state, w.attempts) == ("succeeded",
                                         (x.agreement_id, y.agreement_id, y.agreement_id))
        assert a.count("pay") == 1
    finally:
        eng.shutdown()


def test_an_attempt_in_flight_on_a_revoked_agreement_may_still_succeed(tmp_path: Path) -> None:
    a = AgreementWallet("a", pay=WAITING)
    eng = open_with(tmp_path / "x.db", [a], policy=OrderPolicy(
        pay_window_ms=60_000, query_schedule_ms=(60_000,), refund_query_schedule_ms=(60_000,)))
    try:
        x = eng.sign_agreement("alice", "a")
        eng.withhold("gym-1", "sub-1", "alice", 99_00, "CNY", "Monthly")
        order = wait_for(lambda: (o := eng.find_order("gym-1", "sub-1")).state == "paying" and o)
        eng.handle_agreement_callback("a", x.agreement_id, "alice", AgreementStatus.TERMINATED)
        signed_callback(eng, "a", order.payment_serial, paid(order.payment_serial, 99_00))
        w = decided(eng)
        assert (w.state, w.attempt) == ("succeeded", 1)
        assert eng.get_agreement(x.agreement_id).state == "terminated"
    finally:
        eng.shutdown()


def test_three_timeouts_on_one_agreement_end_at_withhold_attempts_max(tmp_path: Path) -> None:
    a = AgreementWallet("a", pay=WAITING)
    eng = open_with(tmp_path / "x.db", [a], policy=SHORT)
    try:
        x = eng.sign_agreement("alice", "a")
        eng.withhold("gym-1", "sub-1", "alice", 99_00, "CNY", "Monthly")
        w = decided(eng)
        assert (w.state, w.attempt) == ("failed", 3)
        assert w.attempts == (x.agreement_id,) * 3
        assert w.declined == ()
        assert a.count("pay") == 3
    finally:
        eng.shutdown()
