"""Edges of agreements, account status, routing ranks and breakers, from the README."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from payengine import (
    AgreementStatus,
    BreakerPolicy,
    CashPart,
    ChannelReply,
    Engine,
    IllegalTransition,
    InvalidRequest,
    LegMode,
    NoRoute,
    OrderPolicy,
    PaymentRequest,
    Route,
    RoutingTable,
    VoucherPart,
    WithholdConfig,
    load_channels,
)
from tests.blackbox_session4b.support import (
    QUICK,
    SLOW,
    AgreementWallet,
    Wallet,
    open_with,
    paid,
)
from tests.helpers import signed_callback, wait_for


@pytest.fixture
def wx() -> AgreementWallet:
    return AgreementWallet("wx")


@pytest.fixture
def engine(tmp_path: Path, wx: AgreementWallet) -> Iterator[Engine]:
    eng = open_with(tmp_path / "w.db", [wx, AgreementWallet("ali")], policy=QUICK)
    yield eng
    eng.shutdown()


# --- agreements ------------------------------------------------------------------------

def test_a_signed_callback_after_a_synchronous_signed_answer_returns_it_unchanged(
        engine: Engine) -> None:
    a = engine.sign_agreement("alice", "wx")
    assert a.state == "active"
    assert engine.handle_agreement_callback("wx", a.agreement_id, "alice",
                                            AgreementStatus.SIGNED) == a


def test_a_failed_callback_again_for_a_failed_agreement_returns_it_unchanged(
        engine: Engine, wx: AgreementWallet) -> None:
    wx.sign_reply = AgreementStatus.FAILED
    a = engine.sign_agreement("alice", "wx")
    assert engine.handle_agreement_callback("wx", a.agreement_id, "alice",
                                            AgreementStatus.FAILED) == a


def test_signed_for_a_failed_agreement_is_an_illegal_transition(
        engine: Engine, wx: AgreementWallet) -> None:
    wx.sign_reply = AgreementStatus.FAILED
    a = engine.sign_agreement("alice", "wx")
    with pytest.raises(IllegalTransition):
        engine.handle_agreement_callback("wx", a.agreement_id, "alice", AgreementStatus.SIGNED)
    assert engine.get_agreement(a.agreement_id).state == "failed"


def test_terminated_for_a_failed_agreement_changes_nothing(
        engine: Engine, wx: AgreementWallet) -> None:
    # README ambiguity: terminated turns a signing agreement failed, so a terminated for a
    # failed one may be "the same callback again" (unchanged) or one that does not apply
    wx.sign_reply = AgreementStatus.FAILED
    a = engine.sign_agreement("alice", "wx")
    try:
        back = engine.handle_agreement_callback("wx", a.agreement_id, "alice",
                                                AgreementStatus.TERMINATED)
        assert back == a
    except IllegalTransition:
        pass
    assert engine.get_agreement(a.agreement_id) == a


@pytest.mark.parametrize("status", [AgreementStatus.SIGNED, AgreementStatus.FAILED])
def test_signed_or_failed_for_an_unsigning_agreement_is_an_illegal_transition(
        engine: Engine, wx: AgreementWallet, status: AgreementStatus) -> None:
    wx.unsign_reply = AgreementStatus.PENDING
    a = engine.sign_agreement("alice", "wx")
    engine.unsign_agreement(a.agreement_id)
    with pytest.raises(IllegalTransition):
        engine.handle_agreement_callback("wx", a.agreement_id, "alice", status)
    assert engine.get_agreement(a.agreement_id).state == "unsigning"


@pytest.mark.parametrize("answer", [AgreementStatus.SIGNED, AgreementStatus.FAILED,
                                    AgreementStatus.PENDING])
def test_an_unsign_answer_other_than_terminated_leaves_it_unsigning(
        engine: Engine, wx: AgreementWallet, answer: AgreementStatus) -> None:
    wx.unsign_reply = answer
    a = engine.sign_agreement("alice", "wx")
    assert engine.unsign_agreement(a.agreement_id).state == "unsigning"


def test_an_unsigning_agreement_is_not_used_by_a_new_withholding(engine: Engine,
                                                                 wx: AgreementWallet) -> None:
    wx.unsign_reply = AgreementStatus.PENDING
    a = engine.sign_agreement("alice", "wx")
    b = engine.sign_agreement("alice", "ali")
    engine.unsign_agreement(a.agreement_id)
    w = engine.withhold("gym-1", "sub-1", "alice", 99_00, "CNY", "Monthly")
    assert w.agreement_id == b.agreement_id


def test_a_user_at_the_agreement_limit_still_gets_their_live_agreement_back(tmp_path: Path
                                                                            ) -> None:
    w0 = AgreementWallet("w0")
    eng = open_with(tmp_path / "x.db", [w0], withholding=WithholdConfig(agreements_per_user_max=1))
    try:
        a = eng.sign_agreement("alice", "w0")
        assert eng.sign_agreement("alice", "w0").agreement_id == a.agreement_id
    finally:
        eng.shutdown()


def test_a_new_withholding_is_taken_once_the_open_one_is_no_longer_paying(tmp_path: Path
                                                                          ) -> None:
    w0 = AgreementWallet("w0", pay=lambda s, a, d: paid(s, a))
    eng = open_with(tmp_path / "x.db", [w0], policy=QUICK,
                    withholding=WithholdConfig(withholds_open_max=1))
    try:
        eng.sign_agreement("alice", "w0")
        eng.withhold("gym-1", "sub-1", "alice", 99_00, "CNY", "Monthly")
        wait_for(lambda: eng.get_withholding("gym-1", "sub-1").state == "succeeded")
        assert eng.withhold("gym-1", "sub-2", "alice", 98_00, "CNY", "Monthly").state == "paying"
    finally:
        eng.shutdown()


@pytest.mark.parametrize("bad", ["", "a\tb", 12, "x" * 129])
def test_an_agreement_callback_with_a_bad_id_is_invalid_request(engine: Engine, bad: Any
                                                                ) -> None:
    with pytest.raises(InvalidRequest):
        engine.handle_agreement_callback("wx", bad, "alice", AgreementStatus.SIGNED)


# --- account status: what was decided before still completes ----------------------------

def test_a_hold_taken_before_the_freeze_is_still_confirmed_when_the_order_is_paid(
        tmp_path: Path) -> None:
    w = Wallet("wx")
    eng = open_with(tmp_path / "x.db", [w])
    try:
        eng.open_account("alice/rp", "CNY")
        eng.fund("alice/rp", 5_00, funding_id="rp")
        r = eng.submit(PaymentRequest("s-1", "n-1", "alice", "CNY", 51_00, "Fuel",
                                      cash=CashPart(50_00, "wx"),
                                      vouchers=(VoucherPart("alice/rp", 1_00),)))
        wait_for(lambda: eng.get_order(r.order_id).state == "paying")
        assert eng.get_account("alice/rp").held == 1_00
        eng.set_account_status("alice/rp", "frozen")
        signed_callback(eng, "wx", r.payment_serial, paid(r.payment_serial))
        view = wait_for(lambda: (o := eng.get_order(r.order_id)).settled and o)
        assert view.state == "succeeded"
        rp = eng.get_account("alice/rp")
        assert (rp.available, rp.held, rp.spent) == (4_00, 0, 1_00)
    finally:
        eng.shutdown()


def test_a_pre_hold_taken_before_the_account_closed_can_still_be_released(tmp_path: Path
                                                                          ) -> None:
    eng = open_with(tmp_path / "x.db", [Wallet("wx")])
    try:
        eng.open_account("alice/pts", "POINTS", minor_per_unit=10)
        eng.fund("alice/pts", 100, funding_id="p")
        hold = eng.pre_hold("alice/pts", 20, hold_id="h-1")
        eng.set_account_status("alice/pts", "closed")
        eng.release_hold("alice/pts", "h-1")
        acc = eng.get_account("alice/pts")
        assert (acc.available, acc.held) == (100, 0)
        assert hold.hold_id == "h-1"
    finally:
        eng.shutdown()


def test_a_refund_return_to_a_frozen_voucher_account_still_completes(tmp_path: Path) -> None:
    w = Wallet("wx")
    eng = open_with(tmp_path / "x.db", [w])
    try:
        eng.open_account("alice/rp", "CNY")
        eng.fund("alice/rp", 5_00, funding_id="rp")
        r = eng.submit(PaymentRequest("s-1", "n-1", "alice", "CNY", 51_00, "Fuel",
                                      cash=CashPart(50_00, "wx"),
                                      vouchers=(VoucherPart("alice/rp", 1_00),)))
        wait_for(lambda: eng.get_order(r.order_id).state == "paying")
        signed_callback(eng, "wx", r.payment_serial, paid(r.payment_serial))
        wait_for(lambda: eng.get_order(r.order_id).settled)
        eng.set_account_status("alice/rp", "frozen")
        eng.refund(r.order_id, "rf-1", 51_00)
        wait_for(lambda: eng.get_order(r.order_id).refund("rf-1").status == "succeeded",
                 what="refund with its voucher return")
        assert eng.get_account("alice/rp").available == 5_00
    finally:
        eng.shutdown()


def test_setting_the_same_status_again_returns_it_as_the_previous_one(tmp_path: Path) -> None:
    eng = open_with(tmp_path / "x.db", [Wallet("wx")])
    try:
        eng.open_account("alice/b", "CNY")
        eng.set_account_status("alice/b", "frozen")
        assert eng.set_account_status("alice/b", "frozen") == "frozen"
    finally:
        eng.shutdown()


# --- routing ranks from the channel configuration, limits, breakers ------------------

SIM = """
[channels.s1]
kind = "simulated"
wallet = "wechat"
merchant_no = "m1"
credentials = {{ key = "simulated-wallet-key-0001" }}
{s1}

[channels.s2]
kind = "simulated"
wallet = "wechat"
merchant_no = "m2"
credentials = {{ key = "simulated-wallet-key-0002" }}
{s2}
"""


def routed_sim(path: Path, s1: str = "", s2: str = "", **config: Any) -> Engine:
    channels = load_channels(SIM.format(s1=s1, s2=s2))
    return open_with(path, channels, policy=SLOW,
                     routing=RoutingTable((Route("qr", "s1"), Route("qr", "s2"))), **config)


def submit_qr(engine: Engine, no: str, amount: int = 50_00) -> str:
    r = engine.submit(PaymentRequest("s-1", no, "alice", "CNY", amount, "Fuel",
                                     cash=CashPart(amount, "qr")))
    return engine.get_order(r.order_id).legs[0].channel


def test_a_configured_channel_fee_ranks_it_against_the_engine_fee(tmp_path: Path) -> None:
    eng = routed_sim(tmp_path / "x.db", s1="fee = { basis_points = 60 }",
                     fee_ppm={"s2": 7_000})
    try:
        assert all(submit_qr(eng, f"n-{i}", 50_00 + i) == "s1" for i in range(5))
    finally:
        eng.shutdown()


def test_a_configured_fee_of_zero_ranks_by_the_engine_fee_instead(tmp_path: Path) -> None:
    eng = routed_sim(tmp_path / "x.db", s1="fee = { basis_points = 0 }",
                     s2="fee = { basis_points = 10 }", fee_ppm={"s1": 7_000})
    try:
        assert all(submit_qr(eng, f"n-{i}", 50_00 + i) == "s2" for i in range(5))
    finally:
        eng.shutdown()


def test_configured_limits_leave_an_amount_out_of_that_channel(tmp_path: Path) -> None:
    eng = routed_sim(tmp_path / "x.db", s1="limits = { amount_max_minor = 100_00 }",
                     s2="limits = { amount_min_minor = 100_01 }")
    try:
        assert submit_qr(eng, "n-1", 100_00) == "s1"
        assert submit_qr(eng, "n-2", 100_01) == "s2"
    finally:
        eng.shutdown()


def test_no_route_explains_why_each_route_was_skipped(tmp_path: Path) -> None:
    eng = routed_sim(tmp_path / "x.db", s1="enabled = false",
                     s2="limits = { amount_max_minor = 10_00 }")
    try:
        with pytest.raises(NoRoute) as caught:
            submit_qr(eng, "n-1", 50_00)
        text = str(caught.value)
        assert "s1" in text and "disabled" in text
        assert "s2" in text
    finally:
        eng.shutdown()


def test_a_half_open_breaker_lets_one_probe_through_and_its_answer_closes_it(tmp_path: Path
                                                                             ) -> None:
    a = Wallet("a", pay=ConnectionError("reset"), query=ConnectionError("reset"))
    b = Wallet("b")
    policy = OrderPolicy(pay_window_ms=60_000, query_schedule_ms=(50, 50, 50, 60_000),
                         refund_query_schedule_ms=(60_000,))
    eng = open_with(tmp_path / "x.db", [a, b], policy=policy,
                    routing=RoutingTable((Route("qr", "a"), Route("qr", "b", priority=1))),
                    breaker=BreakerPolicy(window_calls=4, calls_min=2, failure_pct=50,
                                          open_ms=500))
    try:
        assert submit_qr(eng, "n-1") == "a"
        wait_for(lambda: eng.channel_health()["a"] == "open", what="open")
        assert submit_qr(eng, "n-2", 50_01) == "b"
        a.pay_reply = ChannelReply("SUCCESS", "USERPAYING")
        a.query_reply = ChannelReply("SUCCESS", "USERPAYING")
        time.sleep(0.6)
        assert eng.channel_health()["a"] in ("half_open", "open")
        assert submit_qr(eng, "n-3", 50_02) == "a"  # the probe
        wait_for(lambda: eng.channel_health()["a"] == "closed", what="closed by the probe")
        assert submit_qr(eng, "n-4", 50_03) == "a"
    finally:
        eng.shutdown()


def test_a_breaker_counts_a_business_refusal_as_an_answer(tmp_path: Path) -> None:
    a = Wallet("a", pay=ChannelReply("SUCCESS", "PAYERROR"),
               query=ChannelReply("SUCCESS", "PAYERROR"))
    eng = open_with(tmp_path / "x.db", [a], policy=QUICK,
                    routing=RoutingTable((Route("qr", "a"),)),
                    breaker=BreakerPolicy(window_calls=4, calls_min=2, failure_pct=50,
                                          open_ms=60_000))
    try:
        for i in range(4):
            eng.submit(PaymentRequest("s-1", f"n-{i}", "alice", "CNY", 10_00 + i, "Fuel",
                                      cash=CashPart(10_00 + i, "qr")))
        wait_for(lambda: a.count("pay") == 4)
        time.sleep(0.2)
        assert eng.channel_health()["a"] == "closed"
    finally:
        eng.shutdown()


def test_a_return_code_outside_communication_ok_counts_as_a_failed_call(tmp_path: Path) -> None:
    a = Wallet("a", pay=ChannelReply("FAIL", None), query=ChannelReply("FAIL", None))
    eng = open_with(tmp_path / "x.db", [a], policy=QUICK,
                    routing=RoutingTable((Route("qr", "a"),)),
                    breaker=BreakerPolicy(window_calls=4, calls_min=2, failure_pct=50,
                                          open_ms=60_000))
    try:
        for i in range(2):
            eng.submit(PaymentRequest("s-1", f"n-{i}", "alice", "CNY", 10_00 + i, "Fuel",
                                      cash=CashPart(10_00 + i, "qr")))
        wait_for(lambda: eng.channel_health()["a"] == "open", what="open")
    finally:
        eng.shutdown()


def test_an_order_in_a_points_only_request_with_a_method_needs_no_route(tmp_path: Path) -> None:
    eng = open_with(tmp_path / "x.db", [Wallet("wx")], routing=RoutingTable(()))
    try:
        eng.open_account("alice/pts", "POINTS", minor_per_unit=10)
        eng.fund("alice/pts", 100, funding_id="p")
        r = eng.submit(PaymentRequest("s-1", "n-1", "alice", "CNY", 2_00, "Fuel",
                                      vouchers=(VoucherPart("alice/pts", 20,
                                                            LegMode.PRE_DEDUCT),)))
        assert wait_for(lambda: (o := eng.get_order(r.order_id)).settled and o).state \
            == "succeeded"
    finally:
        eng.shutdown()


def test_the_fee_that_ranks_is_the_fee_for_this_amount_fixed_part_included(tmp_path: Path
                                                                            ) -> None:
    eng = routed_sim(tmp_path / "x.db", s1="fee = { basis_points = 0, fixed_minor = 100 }",
                     s2="fee = { basis_points = 60 }")
    try:
        assert submit_qr(eng, "n-1", 100_00) == "s2"     # 1.00 fixed vs 0.60
        assert submit_qr(eng, "n-2", 1_000_00) == "s1"   # 1.00 fixed vs 6.00
    finally:
        eng.shutdown()


def test_a_routes_own_fee_ppm_beats_the_channel_configs_fee(tmp_path: Path) -> None:
    channels = load_channels(SIM.format(s1="fee = { basis_points = 10 }",
                                        s2="fee = { basis_points = 60 }"))
    eng = open_with(tmp_path / "x.db", channels, policy=SLOW,
                    routing=RoutingTable((Route("qr", "s1", fee_ppm=9_000), Route("qr", "s2"))))
    try:
        assert submit_qr(eng, "n-1") == "s2"
    finally:
        eng.shutdown()


def test_a_retried_top_up_already_applied_returns_the_account_even_once_frozen(tmp_path: Path
                                                                               ) -> None:
    # README ambiguity: "top-ups are idempotent" vs "a top-up on a frozen account is
    # AccountFrozen"; the engine treats the retry of an applied top-up as idempotent
    eng = open_with(tmp_path / "x.db", [Wallet("wx")])
    try:
        eng.open_account("a", "CNY")
        eng.fund("a", 100, funding_id="f")
        eng.set_account_status("a", "frozen")
        view = eng.fund("a", 100, funding_id="f")
        assert (view.funded, view.status) == (100, "frozen")
    finally:
        eng.shutdown()
