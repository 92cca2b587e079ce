"""More of the withholding auto-retry table and the agreements' edges."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from payengine import (
    AgreementInactive,
    AgreementStatus,
    CashPart,
    ChannelReply,
    Engine,
    IdempotencyConflict,
    InvalidRequest,
    OrderPolicy,
    PaymentRequest,
    RequestRejected,
    UnknownWithholding,
    WithholdConfig,
)
from tests.blackbox_session4b.support import QUICK, AgreementWallet, open_with, paid
from tests.helpers import signed_callback, wait_for

DECLINE = ChannelReply("SUCCESS", "NOTENOUGH")
WAITING = ChannelReply("SUCCESS", "USERPAYING")


def pays(serial: str, amount: int, details: Any) -> ChannelReply:
    return paid(serial, amount)


@pytest.fixture
def wx() -> AgreementWallet:
    return AgreementWallet("wx")


@pytest.fixture
def ali() -> AgreementWallet:
    return AgreementWallet("ali")


@pytest.fixture
def engine(tmp_path: Path, wx: AgreementWallet, ali: AgreementWallet) -> Iterator[Engine]:
    eng = open_with(tmp_path / "w.db", [wx, ali], policy=QUICK)
    yield eng
    eng.shutdown()


def decided(engine: Engine, no: str = "sub-1") -> Any:
    return wait_for(lambda: (w := engine.get_withholding("gym-1", no)).state != "paying" and w,
                    what="withholding decided")


def test_a_retryable_failure_learnt_by_query_also_moves_to_the_next_agreement(
        engine: Engine, wx: AgreementWallet, ali: AgreementWallet) -> None:
    wx.pay_reply = WAITING
    wx.query_reply = DECLINE
    ali.pay_reply = pays
    a = engine.sign_agreement("alice", "wx")
    b = engine.sign_agreement("alice", "ali")
    engine.withhold("gym-1", "sub-1", "alice", 99_00, "CNY", "Monthly")
    w = decided(engine)
    assert (w.state, w.attempts, w.declined) == ("succeeded", (a.agreement_id, b.agreement_id),
                                                 (a.agreement_id,))


def test_a_retryable_failure_by_notification_also_moves_to_the_next_agreement(
        engine: Engine, wx: AgreementWallet, ali: AgreementWallet) -> None:
    ali.pay_reply = pays
    engine.sign_agreement("alice", "wx")
    engine.sign_agreement("alice", "ali")
    engine.withhold("gym-1", "sub-1", "alice", 99_00, "CNY", "Monthly")
    first = wait_for(lambda: (o := engine.find_order("gym-1", "sub-1")).state == "paying" and o)
    signed_callback(engine, "wx", first.payment_serial, DECLINE)
    w = decided(engine)
    assert (w.state, w.attempt) == ("succeeded", 2)


def test_the_same_withhold_after_success_returns_the_succeeded_withholding(
        engine: Engine, wx: AgreementWallet) -> None:
    wx.pay_reply = pays
    engine.sign_agreement("alice", "wx")
    engine.withhold("gym-1", "sub-1", "alice", 99_00, "CNY", "Monthly")
    decided(engine)
    again = engine.withhold("gym-1", "sub-1", "alice", 99_00, "CNY", "Monthly")
    assert (again.state, again.attempt) == ("succeeded", 1)
    assert wx.count("pay") == 1


def test_withhold_attempts_max_one_fails_on_the_first_decline(tmp_path: Path) -> None:
    w0, w1 = AgreementWallet("w0", pay=DECLINE), AgreementWallet("w1", pay=pays)
    eng = open_with(tmp_path / "x.db", [w0, w1], policy=QUICK,
                    withholding=WithholdConfig(withhold_attempts_max=1))
    try:
        eng.sign_agreement("alice", "w0")
        eng.sign_agreement("alice", "w1")
        eng.withhold("gym-1", "sub-1", "alice", 99_00, "CNY", "Monthly")
        w = decided(eng)
        assert (w.state, w.attempt) == ("failed", 1)
        assert w1.count("pay") == 0
    finally:
        eng.shutdown()


def test_a_timeout_on_a_revoked_agreement_retries_on_the_next_active_one(tmp_path: Path
                                                                         ) -> None:
    w0, w1 = AgreementWallet("w0", pay=WAITING), AgreementWallet("w1", pay=pays)
    policy = OrderPolicy(pay_window_ms=600, query_schedule_ms=(100,),
                         refund_query_schedule_ms=(100,))
    eng = open_with(tmp_path / "x.db", [w0, w1], policy=policy)
    try:
        a = eng.sign_agreement("alice", "w0")
        b = eng.sign_agreement("alice", "w1")
        eng.withhold("gym-1", "sub-1", "alice", 99_00, "CNY", "Monthly")
        wait_for(lambda: w0.calls_of("pay"))
        eng.handle_agreement_callback("w0", a.agreement_id, "alice", AgreementStatus.TERMINATED)
        w = decided(eng)
        assert (w.state, w.attempts) == ("succeeded", (a.agreement_id, b.agreement_id))
        assert w0.count("pay") == 1
    finally:
        eng.shutdown()


def test_a_charge_after_the_close_is_refunded_and_the_withholding_fails(tmp_path: Path
                                                                        ) -> None:
    w0 = AgreementWallet("w0", pay=WAITING, query=ConnectionError("down"),
                         close=ConnectionError("down"))
    w1 = AgreementWallet("w1", pay=pays)
    policy = OrderPolicy(pay_window_ms=400, query_schedule_ms=(100,),
                         refund_query_schedule_ms=(100,))
    eng = open_with(tmp_path / "x.db", [w0, w1], policy=policy)
    try:
        eng.sign_agreement("alice", "w0")
        eng.sign_agreement("alice", "w1")
        eng.withhold("gym-1", "sub-1", "alice", 99_00, "CNY", "Monthly")
        order = wait_for(lambda: (o := eng.find_order("gym-1", "sub-1")).state == "closed" and o,
                         what="attempt 1 closed at the end of its window")
        assert eng.get_withholding("gym-1", "sub-1").state == "paying"
        w0.query_reply = paid(order.payment_serial, 99_00)
        w0.close_reply = paid(order.payment_serial, 99_00)
        for _ in range(50):
            try:
                signed_callback(eng, "w0", order.payment_serial, paid(order.payment_serial, 99_00))
                break
            except Exception:
                import time
                time.sleep(0.1)
        w = decided(eng)
        assert (w.state, w.attempt) == ("failed", 1)
        wait_for(lambda: w0.count("refund") == 1, what="late charge refunded")
        assert w1.count("pay") == 0
    finally:
        eng.shutdown()


def test_a_paying_withholding_goes_on_after_a_restart(tmp_path: Path) -> None:
    w0, w1 = AgreementWallet("w0", pay=WAITING), AgreementWallet("w1", pay=pays)
    slow = OrderPolicy(pay_window_ms=60_000, query_schedule_ms=(60_000,),
                       refund_query_schedule_ms=(60_000,))
    eng = open_with(tmp_path / "x.db", [w0, w1], policy=slow)
    eng.sign_agreement("alice", "w0")
    eng.sign_agreement("alice", "w1")
    eng.withhold("gym-1", "sub-1", "alice", 99_00, "CNY", "Monthly")
    order = wait_for(lambda: (o := eng.find_order("gym-1", "sub-1")).state == "paying" and o)
    eng.shutdown()
    eng = open_with(tmp_path / "x.db", [w0, w1], policy=slow)
    try:
        wait_for(lambda: eng.resuming() == 0)
        signed_callback(eng, "w0", order.payment_serial, DECLINE)
        w = decided(eng)
        assert (w.state, w.attempt) == ("succeeded", 2)
        assert w1.count("pay") == 1
    finally:
        eng.shutdown()


def test_withhold_naming_only_inactive_agreements_is_agreement_inactive(
        engine: Engine, wx: AgreementWallet) -> None:
    a = engine.sign_agreement("alice", "wx")
    engine.unsign_agreement(a.agreement_id)
    engine.sign_agreement("alice", "ali")
    with pytest.raises(AgreementInactive):
        engine.withhold("gym-1", "sub-1", "alice", 99_00, "CNY", "Monthly",
                        agreement_ids=[a.agreement_id])
    with pytest.raises(UnknownWithholding):
        engine.get_withholding("gym-1", "sub-1")


def test_withhold_for_a_frozen_merchant_is_request_rejected_and_nothing_is_kept(
        engine: Engine, wx: AgreementWallet) -> None:
    engine.sign_agreement("alice", "wx")
    engine.set_merchant_status("gym-1", "frozen")
    with pytest.raises(RequestRejected) as caught:
        engine.withhold("gym-1", "sub-1", "alice", 99_00, "CNY", "Monthly")
    assert caught.value.reason == "merchant_frozen"
    with pytest.raises(UnknownWithholding):
        engine.get_withholding("gym-1", "sub-1")
    assert wx.count("pay") == 0


def test_a_merchant_submit_under_a_withholdings_order_number_is_idempotency_conflict(
        engine: Engine) -> None:
    engine.sign_agreement("alice", "wx")
    engine.withhold("gym-1", "sub-1", "alice", 99_00, "CNY", "Monthly")
    with pytest.raises(IdempotencyConflict):
        engine.submit(PaymentRequest("gym-1", "sub-1", "alice", "CNY", 99_00, "Monthly",
                                     cash=CashPart(99_00, "ali")))


def test_two_withholdings_of_one_user_and_amount_are_not_stopped_by_the_duplicate_guard(
        tmp_path: Path) -> None:
    w0 = AgreementWallet("w0")
    eng = open_with(tmp_path / "x.db", [w0], duplicate_guard_window_ms=60_000)
    try:
        eng.sign_agreement("alice", "w0")
        eng.withhold("gym-1", "sub-1", "alice", 99_00, "CNY", "Monthly")
        eng.withhold("gym-1", "sub-2", "alice", 99_00, "CNY", "Monthly")
    finally:
        eng.shutdown()


def test_agreement_fields_are_those_the_readme_lists(engine: Engine) -> None:
    a = engine.sign_agreement("alice", "wx")
    assert a.cause is not None or a.cause is None
    assert a.created_at_ms <= a.updated_at_ms
    assert isinstance(a.version, int)
    later = engine.unsign_agreement(a.agreement_id)
    assert later.version > a.version
    assert later.updated_at_ms >= a.updated_at_ms


def test_withholding_fields_are_those_the_readme_lists(engine: Engine) -> None:
    engine.sign_agreement("alice", "wx")
    w = engine.withhold("gym-1", "sub-1", "alice", 99_00, "CNY", "Monthly")
    for field in ("merchant_id", "merchant_order_no", "user_id", "amount_minor", "currency",
                  "title", "agreement_ids", "attempts", "state", "cause", "created_at_ms",
                  "updated_at_ms", "declined", "version", "attempt", "agreement_id"):
        assert hasattr(w, field), field


@pytest.mark.parametrize("ids", ["agr-1", ("",), (7,)])
def test_withhold_agreement_ids_of_the_wrong_shape_are_invalid_request(
        engine: Engine, ids: Any) -> None:
    engine.sign_agreement("alice", "wx")
    with pytest.raises(InvalidRequest):
        engine.withhold("gym-1", "sub-1", "alice", 99_00, "CNY", "Monthly", agreement_ids=ids)


@pytest.mark.parametrize("user", ["", "a\x00b", 5])
def test_sign_agreement_with_a_bad_user_id_is_invalid_request(engine: Engine, user: Any
                                                              ) -> None:
    with pytest.raises(InvalidRequest):
        engine.sign_agreement(user, "wx")


def test_exactly_agreements_per_withhold_max_agreements_may_be_named(tmp_path: Path) -> None:
    wallets = [AgreementWallet(f"w{i}") for i in range(2)]
    eng = open_with(tmp_path / "x.db", wallets,
                    withholding=WithholdConfig(agreements_per_withhold_max=2))
    try:
        ids = [eng.sign_agreement("alice", f"w{i}").agreement_id for i in range(2)]
        w = eng.withhold("gym-1", "sub-1", "alice", 99_00, "CNY", "Monthly", agreement_ids=ids)
        assert w.agreement_ids == tuple(ids)
    finally:
        eng.shutdown()


def test_a_failed_withholding_frees_its_open_slot(tmp_path: Path) -> None:
    w0 = AgreementWallet("w0", pay=DECLINE)
    eng = open_with(tmp_path / "x.db", [w0], policy=QUICK,
                    withholding=WithholdConfig(withholds_open_max=1))
    try:
        eng.sign_agreement("alice", "w0")
        eng.withhold("gym-1", "sub-1", "alice", 99_00, "CNY", "Monthly")
        assert decided(eng).state == "failed"
        assert eng.withhold("gym-1", "sub-2", "alice", 98_00, "CNY", "Monthly").state == "paying"
    finally:
        eng.shutdown()
