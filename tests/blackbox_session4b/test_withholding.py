"""Withholding and agreements, from the README's section of that name."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from payengine import (
    AgreementInactive,
    AgreementMismatch,
    AgreementNotFound,
    AgreementStatus,
    AgreementsUnsupported,
    CashPart,
    ChannelReply,
    Engine,
    EngineConfig,
    IdempotencyConflict,
    IllegalTransition,
    InvalidAmount,
    InvalidRequest,
    Overloaded,
    PayDetails,
    PaymentRequest,
    PayScenario,
    ThreadRuntime,
    UnknownWithholding,
    WithholdConfig,
)
from payengine.sim.channel import ChannelFaults, SimulatedChannel
from tests.blackbox_session4b.support import (
    QUICK,
    AgreementWallet,
    Wallet,
    open_with,
    paid,
)
from tests.helpers import wait_for

DECLINE = ChannelReply("SUCCESS", "NOTENOUGH")       # retryable: balance too low
REFUSED = ChannelReply("SUCCESS", "FORBIDDEN")       # a failure that is not retryable


def withhold_pay_of(wallet: Wallet, index: int = -1) -> tuple[Any, ...]:
    return wallet.calls_of("pay")[index]


@pytest.fixture
def wx() -> AgreementWallet:
    return AgreementWallet("wx")


@pytest.fixture
def ali() -> AgreementWallet:
    return AgreementWallet("ali")


@pytest.fixture
def plain() -> Wallet:
    return Wallet("plain")


@pytest.fixture
def engine(tmp_path: Path, wx: AgreementWallet, ali: AgreementWallet, plain: Wallet
           ) -> Iterator[Engine]:
    eng = open_with(tmp_path / "w.db", [wx, ali, plain], policy=QUICK)
    yield eng
    eng.shutdown()


def settled_withholding(engine: Engine, no: str, merchant: str = "gym-1") -> Any:
    return wait_for(lambda: (w := engine.get_withholding(merchant, no)).state != "paying" and w,
                    what="withholding decided")


# --- the README's example -------------------------------------------------------------

def test_the_readme_example_prints_paying_1_then_succeeded_2_true_and_failed_then_terminated(
) -> None:
    world = ThreadRuntime()
    wechat = SimulatedChannel("wechat", world, faults=ChannelFaults.none())
    wechat.faults = ChannelFaults(withhold_declined=1.0)
    alipay = SimulatedChannel("alipay", world, faults=ChannelFaults.none(), txn_prefix="A")
    engine = Engine.open(Path(tempfile.mkdtemp()) / "gym.db", channels=[wechat, alipay])
    try:
        for wallet in (wechat, alipay):
            wallet.attach(engine)
        first = engine.sign_agreement("alice", "wechat")
        backup = engine.sign_agreement("alice", "alipay")
        assert first.state in ("active", "signing")
        assert backup.state in ("active", "signing")
        wait_for(lambda: engine.get_agreement(first.agreement_id).state == "active")
        wait_for(lambda: engine.get_agreement(backup.agreement_id).state == "active")
        w = engine.withhold("gym-1", "sub-2026-12", "alice", 99_00, "CNY", "Monthly membership")
        assert (w.state, w.attempt) == ("paying", 1)
        assert w.agreement_id == first.agreement_id
        deadline = time.monotonic() + 20
        while engine.get_withholding("gym-1", "sub-2026-12").state == "paying":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        w = engine.get_withholding("gym-1", "sub-2026-12")
        assert (w.state, w.attempt) == ("succeeded", 2)
        assert w.attempts == (first.agreement_id, backup.agreement_id)
        assert engine.find_order("gym-1", "sub-2026-12", attempt=1).state == "failed"
        assert engine.find_order("gym-1", "sub-2026-12", attempt=2).state in ("succeeded",)
        assert engine.unsign_agreement(first.agreement_id).state == "terminated"
    finally:
        engine.shutdown()
        world.shutdown()


# --- sign_agreement --------------------------------------------------------------------

def test_a_signed_answer_makes_the_agreement_active_with_the_engines_own_id(
        engine: Engine, wx: AgreementWallet) -> None:
    a = engine.sign_agreement("alice", "wx")
    assert a.state == "active"
    assert (a.user_id, a.channel) == ("alice", "wx")
    assert ("sign", a.agreement_id, "alice") in wx.calls
    assert engine.get_agreement(a.agreement_id).state == "active"


def test_a_failed_answer_makes_the_agreement_failed(engine: Engine, wx: AgreementWallet
                                                    ) -> None:
    wx.sign_reply = AgreementStatus.FAILED
    assert engine.sign_agreement("alice", "wx").state == "failed"


def test_a_pending_answer_leaves_the_agreement_signing(engine: Engine, wx: AgreementWallet
                                                       ) -> None:
    wx.sign_reply = AgreementStatus.PENDING
    assert engine.sign_agreement("alice", "wx").state == "signing"


def test_an_exception_from_the_wallets_sign_leaves_the_agreement_signing(
        engine: Engine, wx: AgreementWallet) -> None:
    wx.sign_reply = ConnectionError("reset")
    assert engine.sign_agreement("alice", "wx").state == "signing"


def test_a_live_agreement_of_the_same_user_and_channel_is_returned_instead_of_a_second(
        engine: Engine, wx: AgreementWallet) -> None:
    first = engine.sign_agreement("alice", "wx")
    again = engine.sign_agreement("alice", "wx")
    assert again.agreement_id == first.agreement_id
    assert len(engine.agreements_of("alice")) == 1


def test_a_signing_agreement_is_also_returned_instead_of_a_second(
        engine: Engine, wx: AgreementWallet) -> None:
    wx.sign_reply = AgreementStatus.PENDING
    first = engine.sign_agreement("alice", "wx")
    assert engine.sign_agreement("alice", "wx").agreement_id == first.agreement_id


def test_a_failed_agreement_is_not_live_so_signing_again_makes_a_new_one(
        engine: Engine, wx: AgreementWallet) -> None:
    wx.sign_reply = AgreementStatus.FAILED
    first = engine.sign_agreement("alice", "wx")
    wx.sign_reply = AgreementStatus.SIGNED
    second = engine.sign_agreement("alice", "wx")
    assert second.agreement_id != first.agreement_id
    assert second.state == "active"


def test_a_channel_without_agreements_refuses_with_agreements_unsupported_and_stores_nothing(
        engine: Engine) -> None:
    with pytest.raises(AgreementsUnsupported) as caught:
        engine.sign_agreement("alice", "plain")
    assert caught.value.code == "agreements_unsupported"
    assert engine.agreements_of("alice") == []


def test_an_unknown_channel_is_an_invalid_request(engine: Engine) -> None:
    with pytest.raises(InvalidRequest):
        engine.sign_agreement("alice", "nope")
    assert engine.agreements_of("alice") == []


def test_a_user_at_agreements_per_user_max_is_refused_overloaded(tmp_path: Path) -> None:
    wallets = [AgreementWallet(f"w{i}") for i in range(3)]
    eng = open_with(tmp_path / "x.db", wallets,
                    withholding=WithholdConfig(agreements_per_user_max=2))
    try:
        eng.sign_agreement("alice", "w0")
        eng.sign_agreement("alice", "w1")
        with pytest.raises(Overloaded):
            eng.sign_agreement("alice", "w2")
        assert len(eng.agreements_of("alice")) == 2
    finally:
        eng.shutdown()


def test_failed_agreements_count_towards_agreements_per_user_max(tmp_path: Path) -> None:
    wallet = AgreementWallet("w0", sign=AgreementStatus.FAILED)
    eng = open_with(tmp_path / "x.db", [wallet],
                    withholding=WithholdConfig(agreements_per_user_max=2))
    try:
        eng.sign_agreement("alice", "w0")
        eng.sign_agreement("alice", "w0")
        with pytest.raises(Overloaded):
            eng.sign_agreement("alice", "w0")
    finally:
        eng.shutdown()


# --- get_agreement / agreements_of ---------------------------------------------------

def test_an_unknown_agreement_id_is_agreement_not_found(engine: Engine) -> None:
    with pytest.raises(AgreementNotFound) as caught:
        engine.get_agreement("no-such-agreement")
    assert caught.value.code == "agreement_not_found"


def test_agreements_of_lists_every_state_oldest_first(engine: Engine, wx: AgreementWallet
                                                      ) -> None:
    wx.sign_reply = AgreementStatus.FAILED
    a = engine.sign_agreement("alice", "wx")
    wx.sign_reply = AgreementStatus.SIGNED
    b = engine.sign_agreement("alice", "wx")
    c = engine.sign_agreement("alice", "ali")
    listed = engine.agreements_of("alice")
    assert [x.agreement_id for x in listed] == [a.agreement_id, b.agreement_id, c.agreement_id]
    assert [x.state for x in listed] == ["failed", "active", "active"]
    assert engine.agreements_of("bob") == []


def test_every_agreement_change_is_in_the_journal(engine: Engine, wx: AgreementWallet) -> None:
    wx.unsign_reply = AgreementStatus.PENDING
    a = engine.sign_agreement("alice", "wx")
    engine.unsign_agreement(a.agreement_id)
    engine.handle_agreement_callback("wx", a.agreement_id, "alice", AgreementStatus.TERMINATED)
    moves = [(e.from_state, e.to_state)
             for e in engine.store.journal("agreement", a.agreement_id)]
    assert ("signing", "active") in moves
    assert ("active", "unsigning") in moves
    assert ("unsigning", "terminated") in moves


# --- unsign_agreement ------------------------------------------------------------------

def test_unsign_of_an_active_agreement_confirmed_by_the_wallet_terminates_it(
        engine: Engine, wx: AgreementWallet) -> None:
    a = engine.sign_agreement("alice", "wx")
    assert engine.unsign_agreement(a.agreement_id).state == "terminated"
    assert ("unsign", a.agreement_id) in wx.calls


def test_unsign_with_a_pending_answer_leaves_it_unsigning_until_the_callback(
        engine: Engine, wx: AgreementWallet) -> None:
    wx.unsign_reply = AgreementStatus.PENDING
    a = engine.sign_agreement("alice", "wx")
    assert engine.unsign_agreement(a.agreement_id).state == "unsigning"
    done = engine.handle_agreement_callback("wx", a.agreement_id, "alice",
                                            AgreementStatus.TERMINATED)
    assert done.state == "terminated"


def test_unsign_with_an_exception_leaves_it_unsigning(engine: Engine, wx: AgreementWallet
                                                      ) -> None:
    wx.unsign_reply = TimeoutError("slow")
    a = engine.sign_agreement("alice", "wx")
    assert engine.unsign_agreement(a.agreement_id).state == "unsigning"


def test_unsign_of_an_unsigning_or_terminated_agreement_returns_it_as_it_is(
        engine: Engine, wx: AgreementWallet) -> None:
    wx.unsign_reply = AgreementStatus.PENDING
    a = engine.sign_agreement("alice", "wx")
    engine.unsign_agreement(a.agreement_id)
    calls = wx.count("unsign")
    assert engine.unsign_agreement(a.agreement_id).state == "unsigning"
    engine.handle_agreement_callback("wx", a.agreement_id, "alice", AgreementStatus.TERMINATED)
    assert engine.unsign_agreement(a.agreement_id).state == "terminated"
    assert wx.count("unsign") >= calls


@pytest.mark.parametrize("sign_reply", [AgreementStatus.PENDING, AgreementStatus.FAILED])
def test_unsign_of_a_signing_or_failed_agreement_is_agreement_inactive(
        engine: Engine, wx: AgreementWallet, sign_reply: AgreementStatus) -> None:
    wx.sign_reply = sign_reply
    a = engine.sign_agreement("alice", "wx")
    before = engine.get_agreement(a.agreement_id)
    with pytest.raises(AgreementInactive) as caught:
        engine.unsign_agreement(a.agreement_id)
    assert caught.value.code == "agreement_inactive"
    assert engine.get_agreement(a.agreement_id) == before


def test_unsign_of_an_unknown_agreement_is_agreement_not_found(engine: Engine) -> None:
    with pytest.raises(AgreementNotFound):
        engine.unsign_agreement("nope")


# --- handle_agreement_callback ---------------------------------------------------------

def test_a_signed_callback_activates_a_signing_agreement_and_again_changes_nothing(
        engine: Engine, wx: AgreementWallet) -> None:
    wx.sign_reply = AgreementStatus.PENDING
    a = engine.sign_agreement("alice", "wx")
    first = engine.handle_agreement_callback("wx", a.agreement_id, "alice",
                                             AgreementStatus.SIGNED)
    assert first.state == "active"
    again = engine.handle_agreement_callback("wx", a.agreement_id, "alice",
                                             AgreementStatus.SIGNED)
    assert again == first


def test_a_failed_callback_fails_a_signing_agreement(engine: Engine, wx: AgreementWallet
                                                     ) -> None:
    wx.sign_reply = AgreementStatus.PENDING
    a = engine.sign_agreement("alice", "wx")
    assert engine.handle_agreement_callback("wx", a.agreement_id, "alice",
                                            AgreementStatus.FAILED).state == "failed"


def test_a_terminated_callback_on_an_active_agreement_means_the_user_revoked_it(
        engine: Engine) -> None:
    a = engine.sign_agreement("alice", "wx")
    assert engine.handle_agreement_callback("wx", a.agreement_id, "alice",
                                            AgreementStatus.TERMINATED).state == "terminated"


def test_a_terminated_callback_on_a_signing_agreement_makes_it_failed(
        engine: Engine, wx: AgreementWallet) -> None:
    wx.sign_reply = AgreementStatus.PENDING
    a = engine.sign_agreement("alice", "wx")
    assert engine.handle_agreement_callback("wx", a.agreement_id, "alice",
                                            AgreementStatus.TERMINATED).state == "failed"


def test_a_callback_for_an_unknown_agreement_is_agreement_not_found(engine: Engine) -> None:
    with pytest.raises(AgreementNotFound):
        engine.handle_agreement_callback("wx", "nope", "alice", AgreementStatus.SIGNED)


@pytest.mark.parametrize("channel,user", [("ali", "alice"), ("wx", "bob")])
def test_a_callback_from_another_channel_or_user_is_agreement_mismatch_and_changes_nothing(
        engine: Engine, wx: AgreementWallet, channel: str, user: str) -> None:
    wx.sign_reply = AgreementStatus.PENDING
    a = engine.sign_agreement("alice", "wx")
    with pytest.raises(AgreementMismatch) as caught:
        engine.handle_agreement_callback(channel, a.agreement_id, user, AgreementStatus.SIGNED)
    assert caught.value.code == "agreement_mismatch"
    assert engine.get_agreement(a.agreement_id).state == "signing"


@pytest.mark.parametrize("status", [AgreementStatus.PENDING, "signed", "bogus", None])
def test_a_status_that_is_not_an_agreement_status_or_is_pending_is_invalid_request(
        engine: Engine, wx: AgreementWallet, status: Any) -> None:
    wx.sign_reply = AgreementStatus.PENDING
    a = engine.sign_agreement("alice", "wx")
    with pytest.raises(InvalidRequest):
        engine.handle_agreement_callback("wx", a.agreement_id, "alice", status)
    assert engine.get_agreement(a.agreement_id).state == "signing"


def test_signed_for_a_terminated_agreement_is_an_illegal_transition(engine: Engine) -> None:
    a = engine.sign_agreement("alice", "wx")
    engine.unsign_agreement(a.agreement_id)
    with pytest.raises(IllegalTransition):
        engine.handle_agreement_callback("wx", a.agreement_id, "alice", AgreementStatus.SIGNED)
    assert engine.get_agreement(a.agreement_id).state == "terminated"


def test_failed_for_an_active_agreement_is_an_illegal_transition(engine: Engine) -> None:
    a = engine.sign_agreement("alice", "wx")
    with pytest.raises(IllegalTransition):
        engine.handle_agreement_callback("wx", a.agreement_id, "alice", AgreementStatus.FAILED)
    assert engine.get_agreement(a.agreement_id).state == "active"


def test_the_same_terminated_callback_again_returns_the_agreement_unchanged(
        engine: Engine) -> None:
    a = engine.sign_agreement("alice", "wx")
    first = engine.handle_agreement_callback("wx", a.agreement_id, "alice",
                                             AgreementStatus.TERMINATED)
    again = engine.handle_agreement_callback("wx", a.agreement_id, "alice",
                                             AgreementStatus.TERMINATED)
    assert again == first


# --- withhold: refusals ----------------------------------------------------------------

def test_withhold_for_a_user_without_agreements_is_agreement_not_found_nothing_created(
        engine: Engine) -> None:
    with pytest.raises(AgreementNotFound):
        engine.withhold("gym-1", "sub-1", "alice", 99_00, "CNY", "Monthly")
    with pytest.raises(UnknownWithholding) as caught:
        engine.get_withholding("gym-1", "sub-1")
    assert caught.value.code == "unknown_withholding"


def test_withhold_naming_an_agreement_of_another_user_is_agreement_not_found(
        engine: Engine) -> None:
    engine.sign_agreement("alice", "wx")
    bobs = engine.sign_agreement("bob", "wx")
    with pytest.raises(AgreementNotFound):
        engine.withhold("gym-1", "sub-1", "alice", 99_00, "CNY", "Monthly",
                        agreement_ids=[bobs.agreement_id])


def test_withhold_with_no_active_agreement_is_agreement_inactive_nothing_created(
        engine: Engine, wx: AgreementWallet) -> None:
    wx.sign_reply = AgreementStatus.PENDING
    engine.sign_agreement("alice", "wx")
    with pytest.raises(AgreementInactive):
        engine.withhold("gym-1", "sub-1", "alice", 99_00, "CNY", "Monthly")
    with pytest.raises(UnknownWithholding):
        engine.get_withholding("gym-1", "sub-1")
    assert wx.count("pay") == 0


@pytest.mark.parametrize("amount", [0, -1, True, 10**15 + 1, 1.5])
def test_withhold_with_a_bad_amount_is_invalid_amount(engine: Engine, amount: Any) -> None:
    engine.sign_agreement("alice", "wx")
    with pytest.raises(InvalidAmount):
        engine.withhold("gym-1", "sub-1", "alice", amount, "CNY", "Monthly")


@pytest.mark.parametrize("field", ["merchant", "no", "currency", "title"])
def test_withhold_with_a_bad_id_title_or_currency_is_invalid_request(
        engine: Engine, field: str) -> None:
    engine.sign_agreement("alice", "wx")
    args: dict[str, Any] = {"merchant": "gym-1", "no": "sub-1", "currency": "CNY",
                            "title": "Monthly"}
    args[field] = {"merchant": "", "no": "a\nb", "currency": "XXX", "title": ""}[field]
    with pytest.raises(InvalidRequest):
        engine.withhold(args["merchant"], args["no"], "alice", 99_00, args["currency"],
                        args["title"])


def test_withhold_naming_the_same_agreement_twice_is_invalid_request(engine: Engine) -> None:
    a = engine.sign_agreement("alice", "wx")
    with pytest.raises(InvalidRequest):
        engine.withhold("gym-1", "sub-1", "alice", 99_00, "CNY", "Monthly",
                        agreement_ids=[a.agreement_id, a.agreement_id])


def test_withhold_naming_more_than_agreements_per_withhold_max_is_refused(tmp_path: Path
                                                                           ) -> None:
    wallets = [AgreementWallet(f"w{i}") for i in range(3)]
    eng = open_with(tmp_path / "x.db", wallets,
                    withholding=WithholdConfig(agreements_per_withhold_max=2))
    try:
        ids = [eng.sign_agreement("alice", f"w{i}").agreement_id for i in range(3)]
        with pytest.raises(InvalidRequest):
            eng.withhold("gym-1", "sub-1", "alice", 99_00, "CNY", "Monthly", agreement_ids=ids)
    finally:
        eng.shutdown()


def test_withhold_with_an_empty_agreement_list_is_refused(engine: Engine) -> None:
    engine.sign_agreement("alice", "wx")
    with pytest.raises((InvalidRequest, AgreementNotFound)):
        engine.withhold("gym-1", "sub-1", "alice", 99_00, "CNY", "Monthly", agreement_ids=[])


def test_withhold_under_a_merchant_order_number_a_payment_used_is_idempotency_conflict(
        engine: Engine) -> None:
    engine.sign_agreement("alice", "wx")
    engine.submit(PaymentRequest("gym-1", "sub-1", "alice", "CNY", 99_00, "Monthly",
                                 cash=CashPart(99_00, "plain")))
    with pytest.raises(IdempotencyConflict):
        engine.withhold("gym-1", "sub-1", "alice", 99_00, "CNY", "Monthly")
    with pytest.raises(UnknownWithholding):
        engine.get_withholding("gym-1", "sub-1")


def test_submit_with_the_withhold_scenario_is_invalid_request(engine: Engine) -> None:
    a = engine.sign_agreement("alice", "wx")
    details = PayDetails(PayScenario.WITHHOLD, agreement_id=a.agreement_id)
    with pytest.raises(InvalidRequest):
        engine.submit(PaymentRequest("gym-1", "sub-1", "alice", "CNY", 99_00, "Monthly",
                                     cash=CashPart(99_00, "wx", details)))


def test_an_unknown_withholding_key_is_unknown_withholding(engine: Engine) -> None:
    with pytest.raises(UnknownWithholding):
        engine.get_withholding("gym-1", "never")


# --- withhold: the first attempt and idempotency ----------------------------------------

def test_attempt_one_pays_through_the_first_active_agreement_with_withhold_details(
        engine: Engine, wx: AgreementWallet) -> None:
    a = engine.sign_agreement("alice", "wx")
    engine.sign_agreement("alice", "ali")
    w = engine.withhold("gym-1", "sub-1", "alice", 99_00, "CNY", "Monthly")
    assert (w.state, w.attempt, w.agreement_id) == ("paying", 1, a.agreement_id)
    assert w.attempts == (a.agreement_id,)
    assert w.declined == ()
    assert (w.merchant_id, w.merchant_order_no, w.user_id, w.amount_minor, w.currency,
            w.title) == ("gym-1", "sub-1", "alice", 99_00, "CNY", "Monthly")
    call = wait_for(lambda: wx.calls_of("pay"), what="pay")[0]
    assert call[2] == 99_00
    details = call[3]
    assert details.scenario == PayScenario.WITHHOLD
    assert details.agreement_id == a.agreement_id
    order = engine.find_order("gym-1", "sub-1", attempt=1)
    assert order.legs[0].channel == "wx"


def test_agreement_ids_choose_the_order_of_preference(engine: Engine, ali: AgreementWallet
                                                      ) -> None:
    a = engine.sign_agreement("alice", "wx")
    b = engine.sign_agreement("alice", "ali")
    w = engine.withhold("gym-1", "sub-1", "alice", 99_00, "CNY", "Monthly",
                        agreement_ids=[b.agreement_id, a.agreement_id])
    assert w.agreement_id == b.agreement_id
    assert w.agreement_ids == (b.agreement_id, a.agreement_id)
    wait_for(lambda: ali.calls_of("pay"), what="pay on ali")


def test_an_inactive_first_agreement_is_passed_over_for_the_first_active_one(
        engine: Engine, wx: AgreementWallet) -> None:
    a = engine.sign_agreement("alice", "wx")
    b = engine.sign_agreement("alice", "ali")
    engine.unsign_agreement(a.agreement_id)
    w = engine.withhold("gym-1", "sub-1", "alice", 99_00, "CNY", "Monthly")
    assert w.agreement_id == b.agreement_id


def test_the_same_withhold_again_returns_the_withholding(engine: Engine, wx: AgreementWallet
                                                         ) -> None:
    engine.sign_agreement("alice", "wx")
    first = engine.withhold("gym-1", "sub-1", "alice", 99_00, "CNY", "Monthly")
    again = engine.withhold("gym-1", "sub-1", "alice", 99_00, "CNY", "Monthly")
    assert (again.merchant_order_no, again.attempt, again.attempts) == (
        first.merchant_order_no, first.attempt, first.attempts)
    assert len(engine.find_order("gym-1", "sub-1").order_id) > 0


@pytest.mark.parametrize("change", ["user", "amount", "currency", "title", "agreements"])
def test_the_same_key_with_other_parameters_is_idempotency_conflict(
        engine: Engine, change: str) -> None:
    a = engine.sign_agreement("alice", "wx")
    b = engine.sign_agreement("alice", "ali")
    engine.sign_agreement("bob", "wx")
    engine.withhold("gym-1", "sub-1", "alice", 99_00, "CNY", "Monthly",
                    agreement_ids=[a.agreement_id])
    kwargs: dict[str, Any] = {"user_id": "alice", "amount_minor": 99_00, "currency": "CNY",
                              "title": "Monthly", "agreement_ids": [a.agreement_id]}
    if change == "user":
        kwargs["user_id"] = "bob"
        kwargs["agreement_ids"] = None
    elif change == "amount":
        kwargs["amount_minor"] = 98_00
    elif change == "currency":
        kwargs["currency"] = "USD"
    elif change == "title":
        kwargs["title"] = "Yearly"
    else:
        kwargs["agreement_ids"] = [b.agreement_id]
    with pytest.raises(IdempotencyConflict):
        engine.withhold("gym-1", "sub-1", **kwargs)


# --- the auto-retry table ----------------------------------------------------------------

def test_a_successful_attempt_makes_the_withholding_succeeded(engine: Engine,
                                                              wx: AgreementWallet) -> None:
    wx.pay_reply = lambda serial, amount, details: paid(serial, amount)
    engine.sign_agreement("alice", "wx")
    engine.withhold("gym-1", "sub-1", "alice", 99_00, "CNY", "Monthly")
    w = settled_withholding(engine, "sub-1")
    assert (w.state, w.attempt) == ("succeeded", 1)
    assert engine.find_order("gym-1", "sub-1").state == "succeeded"


def test_a_retryable_decline_moves_to_the_next_agreement_and_records_the_decline(
        engine: Engine, wx: AgreementWallet, ali: AgreementWallet) -> None:
    wx.pay_reply = DECLINE
    ali.pay_reply = lambda serial, amount, details: paid(serial, amount)
    a = engine.sign_agreement("alice", "wx")
    b = engine.sign_agreement("alice", "ali")
    engine.withhold("gym-1", "sub-1", "alice", 99_00, "CNY", "Monthly")
    w = settled_withholding(engine, "sub-1")
    assert (w.state, w.attempt) == ("succeeded", 2)
    assert w.attempts == (a.agreement_id, b.agreement_id)
    assert w.declined == (a.agreement_id,)
    assert w.agreement_id == b.agreement_id
    assert engine.find_order("gym-1", "sub-1", attempt=1).state == "failed"
    assert engine.find_order("gym-1", "sub-1").attempt == 2
    assert ali.calls_of("pay")[0][3].agreement_id == b.agreement_id


def test_a_retryable_decline_with_no_next_agreement_fails_the_withholding(
        engine: Engine, wx: AgreementWallet) -> None:
    wx.pay_reply = DECLINE
    engine.sign_agreement("alice", "wx")
    engine.withhold("gym-1", "sub-1", "alice", 99_00, "CNY", "Monthly")
    w = settled_withholding(engine, "sub-1")
    assert (w.state, w.attempt) == ("failed", 1)
    assert wx.count("pay") == 1


def test_a_non_retryable_failure_fails_the_withholding_without_a_retry(
        engine: Engine, wx: AgreementWallet, ali: AgreementWallet) -> None:
    wx.pay_reply = REFUSED
    engine.sign_agreement("alice", "wx")
    engine.sign_agreement("alice", "ali")
    engine.withhold("gym-1", "sub-1", "alice", 99_00, "CNY", "Monthly")
    w = settled_withholding(engine, "sub-1")
    assert (w.state, w.attempt) == ("failed", 1)
    time.sleep(0.3)
    assert ali.count("pay") == 0


def test_the_withholding_stops_at_withhold_attempts_max_with_a_cause_saying_so(
        tmp_path: Path) -> None:
    wallets = [AgreementWallet(f"w{i}", pay=DECLINE) for i in range(3)]
    eng = open_with(tmp_path / "x.db", wallets, policy=QUICK,
                    withholding=WithholdConfig(withhold_attempts_max=2))
    try:
        for i in range(3):
            eng.sign_agreement("alice", f"w{i}")
        eng.withhold("gym-1", "sub-1", "alice", 99_00, "CNY", "Monthly")
        w = settled_withholding(eng, "sub-1")
        assert (w.state, w.attempt) == ("failed", 2)
        assert wallets[2].count("pay") == 0
        assert w.cause
        assert "2" in w.cause or "max" in w.cause or "attempts" in w.cause
    finally:
        eng.shutdown()


def test_an_attempt_declined_on_a_retried_agreement_is_not_retried_on_it_again(
        tmp_path: Path) -> None:
    wallets = [AgreementWallet(f"w{i}", pay=DECLINE) for i in range(2)]
    eng = open_with(tmp_path / "x.db", wallets, policy=QUICK)
    try:
        ids = [eng.sign_agreement("alice", f"w{i}").agreement_id for i in range(2)]
        eng.withhold("gym-1", "sub-1", "alice", 99_00, "CNY", "Monthly")
        w = settled_withholding(eng, "sub-1")
        assert (w.state, w.attempt) == ("failed", 2)
        assert w.declined == tuple(ids)
    finally:
        eng.shutdown()


def test_a_timeout_closed_and_confirmed_unpaid_retries_on_the_same_agreement(
        tmp_path: Path) -> None:
    wallet = AgreementWallet("w0")
    policy = QUICK.__class__(pay_window_ms=400, query_schedule_ms=(100,),
                             refund_query_schedule_ms=(100,))
    eng = open_with(tmp_path / "x.db", [wallet], policy=policy)
    try:
        a = eng.sign_agreement("alice", "w0")
        calls = {"n": 0}

        def pay(serial: str, amount: int, details: Any) -> ChannelReply:
            calls["n"] += 1
            if calls["n"] == 1:
                return ChannelReply("SUCCESS", "USERPAYING")
            return paid(serial, amount)
        wallet.pay_reply = pay
        eng.withhold("gym-1", "sub-1", "alice", 99_00, "CNY", "Monthly")
        w = settled_withholding(eng, "sub-1")
        assert (w.state, w.attempt) == ("succeeded", 2)
        assert w.attempts == (a.agreement_id, a.agreement_id)
        assert eng.find_order("gym-1", "sub-1", attempt=1).state == "closed"
    finally:
        eng.shutdown()


def test_a_close_that_is_not_answered_makes_the_withholding_wait_without_a_new_attempt(
        tmp_path: Path) -> None:
    wallet = AgreementWallet("w0", close=ConnectionError("down"),
                             query=ConnectionError("down"))
    policy = QUICK.__class__(pay_window_ms=300, query_schedule_ms=(100,),
                             refund_query_schedule_ms=(100,))
    eng = open_with(tmp_path / "x.db", [wallet], policy=policy,
                    withholding=WithholdConfig(recheck_ms=50))
    try:
        eng.sign_agreement("alice", "w0")
        eng.withhold("gym-1", "sub-1", "alice", 99_00, "CNY", "Monthly")
        time.sleep(1.5)
        w = eng.get_withholding("gym-1", "sub-1")
        assert (w.state, w.attempt) == ("paying", 1)
        assert wallet.count("pay") == 1
    finally:
        eng.shutdown()


def test_a_closed_attempt_by_engine_close_fails_the_withholding(engine: Engine,
                                                                wx: AgreementWallet) -> None:
    engine.sign_agreement("alice", "wx")
    engine.sign_agreement("alice", "ali")
    engine.withhold("gym-1", "sub-1", "alice", 99_00, "CNY", "Monthly")
    order = wait_for(lambda: (o := engine.find_order("gym-1", "sub-1")).state == "paying" and o)
    engine.close(order.order_id)
    w = settled_withholding(engine, "sub-1")
    assert (w.state, w.attempt) == ("failed", 1)


def test_an_agreement_unsigned_during_an_attempt_is_not_used_by_a_later_attempt(
        engine: Engine, wx: AgreementWallet, ali: AgreementWallet) -> None:
    wx.pay_reply = ChannelReply("SUCCESS", "USERPAYING")
    ali.pay_reply = DECLINE
    a = engine.sign_agreement("alice", "ali")
    b = engine.sign_agreement("alice", "wx")
    engine.withhold("gym-1", "sub-1", "alice", 99_00, "CNY", "Monthly",
                    agreement_ids=[b.agreement_id, a.agreement_id])
    wait_for(lambda: wx.calls_of("pay"), what="first pay")
    # the first agreement is unsigned while its attempt is in flight; then it declines
    engine.unsign_agreement(a.agreement_id)
    order = engine.find_order("gym-1", "sub-1", attempt=1)
    from tests.helpers import signed_callback
    signed_callback(engine, "wx", order.payment_serial, DECLINE)
    w = settled_withholding(engine, "sub-1")
    assert (w.state, w.attempt) == ("failed", 1)
    assert ali.count("pay") == 0


def test_withholds_open_max_refuses_one_more_paying_withholding_overloaded(tmp_path: Path
                                                                           ) -> None:
    wallet = AgreementWallet("w0")
    eng = open_with(tmp_path / "x.db", [wallet],
                    withholding=WithholdConfig(withholds_open_max=1))
    try:
        eng.sign_agreement("alice", "w0")
        eng.withhold("gym-1", "sub-1", "alice", 99_00, "CNY", "Monthly")
        with pytest.raises(Overloaded):
            eng.withhold("gym-1", "sub-2", "alice", 98_00, "CNY", "Monthly")
        with pytest.raises(UnknownWithholding):
            eng.get_withholding("gym-1", "sub-2")
    finally:
        eng.shutdown()


# --- WithholdConfig ----------------------------------------------------------------------

def test_withhold_config_defaults_are_those_of_the_readme() -> None:
    c = WithholdConfig()
    assert (c.withhold_attempts_max, c.agreements_per_user_max, c.agreements_per_withhold_max,
            c.withholds_open_max, c.recheck_ms, c.rechecks_max) == (3, 16, 8, 10_000, 1_000, 600)
    assert EngineConfig().withholding == c


@pytest.mark.parametrize("field,low,high", [
    ("withhold_attempts_max", 1, 10), ("agreements_per_user_max", 1, 1_000),
    ("agreements_per_withhold_max", 1, 64), ("withholds_open_max", 1, 10_000_000),
    ("recheck_ms", 1, 3_600_000), ("rechecks_max", 1, 1_000_000)])
def test_withhold_config_bounds_are_inclusive_and_outside_them_is_invalid_request(
        field: str, low: int, high: int) -> None:
    WithholdConfig(**{field: low})
    WithholdConfig(**{field: high})
    for bad in (low - 1, high + 1):
        with pytest.raises(InvalidRequest):
            WithholdConfig(**{field: bad})
    with pytest.raises(InvalidRequest):
        WithholdConfig(**{field: True})


def test_the_subscriber_name_payengine_withholding_is_reserved(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest):
        Engine.open(tmp_path / "x.db", channels=[AgreementWallet("w0")],
                    subscribers={"payengine.withholding": lambda event: None})
