"""Regression tests for the known defects left by the last session (issue 11, defects list).

Each test reproduces one defect and failed before its fix."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from payengine import (
    CashPart,
    ChannelsMissing,
    Engine,
    EngineConfig,
    IdempotencyConflict,
    IllegalTransition,
    MerchantSigner,
    PaymentRequest,
    RiskBlocked,
    RiskConfig,
    RiskRules,
    VerificationFailed,
    load_channels,
)
from payengine.engine.order import (
    OrderPolicy,
    OrderState,
    PaymentOrder,
    VerifyCode,
    build_order,
    decide,
    with_risk,
)
from payengine.engine.risk import Verification, VerificationStatus, code_digest
from payengine.sim.channel import SimulatedChannel
from tests.helpers import (
    SLOW_POLICY,
    ScriptedChannel,
    fuel_request,
    fund_customer,
    open_engine,
    paid_order,
    wait_for,
)

CODE = "424242"

# ------------------------------------------------------------------ 1. a channel gone at reopen


def test_reopening_without_a_channel_unsettled_orders_use_is_refused_naming_it(
        tmp_path: Path) -> None:
    wechat, alipay = ScriptedChannel("wechat"), ScriptedChannel("alipay")
    engine = Engine.open(tmp_path / "pay.db", channels=[wechat, alipay], policy=SLOW_POLICY,
                         config=EngineConfig(duplicate_guard_window_ms=0))
    fund_customer(engine)
    for no in ("a-1", "a-2"):
        engine.submit(fuel_request(no))
    engine.submit(PaymentRequest("station-1", "b-1", "bob", "CNY", 500, "Fuel",
                                 CashPart(500, "alipay")))
    wait_for(lambda: wechat.count("pay") == 2 and alipay.count("pay") == 1, what="paying")
    engine.shutdown()

    with pytest.raises(ChannelsMissing) as refused:
        Engine.open(tmp_path / "pay.db", channels=[ScriptedChannel("alipay")],
                    policy=SLOW_POLICY)
    assert refused.value.code == "channels_missing"
    assert refused.value.channels == {"wechat": 2}
    assert "wechat" in refused.value.message and "2 unsettled" in refused.value.message
    # refused before anything started: the file is free, and nothing moved
    with Engine.open(tmp_path / "pay.db", channels=[wechat, alipay],
                     policy=SLOW_POLICY) as again:
        assert again.unsettled_count() == 3
        assert {again.get_order(o.order_id).state for o in again.store.iter_orders()} == {
            "paying"}


def test_reopening_without_a_channel_only_settled_orders_used_is_allowed(
        tmp_path: Path) -> None:
    wechat = ScriptedChannel("wechat")
    engine = open_engine(tmp_path / "pay.db", wechat)
    fund_customer(engine)
    paid_order(engine)
    engine.shutdown()
    with Engine.open(tmp_path / "pay.db", channels=[ScriptedChannel("alipay")]) as again:
        assert again.unsettled_count() == 0


def test_a_refund_through_a_channel_no_longer_configured_is_refused_and_changes_nothing(
        tmp_path: Path) -> None:
    wechat = ScriptedChannel("wechat")
    engine = open_engine(tmp_path / "pay.db", wechat)
    fund_customer(engine)
    order = paid_order(engine)
    engine.shutdown()
    with Engine.open(tmp_path / "pay.db", channels=[ScriptedChannel("alipay")]) as again:
        with pytest.raises(ChannelsMissing) as refused:
            again.refund(order.order_id, "r-1", 100)
        assert refused.value.channels == {"wechat": 1}
        assert again.get_order(order.order_id).refunds == ()
        assert again.unsettled_count() == 0


# ------------------------------------------------------------------ 2. a retried wrong code


def open_stepping_up(tmp_path: Path, channel: ScriptedChannel, attempts: int = 3) -> Engine:
    engine = Engine.open(tmp_path / "risk.db", channels=[channel], policy=SLOW_POLICY,
                         config=EngineConfig(ask_timeout_s=5.0, duplicate_guard_window_ms=0),
                         risk=RiskConfig(rules=RiskRules(step_up_amount={"CNY": 1}),
                                         issue_code=lambda request, context: CODE,
                                         verify_attempts_max=attempts))
    fund_customer(engine)
    return engine


def wrong(engine: Engine, order_id: str, code: str) -> tuple[int, str]:
    with pytest.raises(VerificationFailed) as failed:
        engine.verify(order_id, code)
    return failed.value.attempts_left, failed.value.state


def test_a_wrong_code_sent_again_by_a_retrying_caller_counts_once(tmp_path: Path) -> None:
    with open_stepping_up(tmp_path, ScriptedChannel()) as engine:
        receipt = engine.submit(fuel_request("big-1"))
        assert wrong(engine, receipt.order_id, "000000") == (2, "needs_verification")
        # the caller got Overloaded (the actor did not answer in time) and sends it again
        assert wrong(engine, receipt.order_id, "000000") == (2, "needs_verification")
        assert wrong(engine, receipt.order_id, "111111") == (1, "needs_verification")
        assert engine.verify(receipt.order_id, CODE).state == "accepted"


def test_the_retry_of_the_last_wrong_code_is_told_the_order_failed_again(
        tmp_path: Path) -> None:
    with open_stepping_up(tmp_path, ScriptedChannel(), attempts=2) as engine:
        receipt = engine.submit(fuel_request("big-1"))
        assert wrong(engine, receipt.order_id, "000000") == (1, "needs_verification")
        assert wrong(engine, receipt.order_id, "111111") == (0, "failed")
        assert wrong(engine, receipt.order_id, "111111") == (0, "failed")  # its retry
        with pytest.raises(IllegalTransition):
            engine.verify(receipt.order_id, "222222")  # a new code: not waiting any more
        view = engine.get_order(receipt.order_id)
        assert view.verification is not None and view.verification.attempts_left == 0


def test_wrong_codes_survive_a_restart_so_a_retry_after_it_counts_once(tmp_path: Path) -> None:
    engine = open_stepping_up(tmp_path, ScriptedChannel())
    receipt = engine.submit(fuel_request("big-1"))
    assert wrong(engine, receipt.order_id, "000000") == (2, "needs_verification")
    engine.shutdown()
    with open_stepping_up(tmp_path, ScriptedChannel()) as again:
        assert wrong(again, receipt.order_id, "000000") == (2, "needs_verification")


@settings(max_examples=200, deadline=None)
@given(codes=st.lists(st.sampled_from(["000000", "111111", "222222", "333333", CODE]),
                      max_size=12),
       attempts_max=st.integers(1, 4))
def test_only_distinct_wrong_codes_count_against_the_attempts(codes: list[str],
                                                              attempts_max: int) -> None:
    order = stepped_up_core(attempts_max)
    distinct: set[str] = set()
    for code in codes:
        before, seen = order, code in distinct
        try:
            order = decide(order, VerifyCode(code), now_ms=CORE_T0, policy=CORE_POLICY).order
        except IllegalTransition:
            assert before.state is not OrderState.NEEDS_VERIFICATION
            continue
        if before.state is OrderState.NEEDS_VERIFICATION and code != CODE:
            distinct.add(code)
        if seen or before.state is not OrderState.NEEDS_VERIFICATION:
            assert order == before  # a retry changes nothing
        v = order.verification
        assert v is not None and v.attempts == min(len(distinct), attempts_max)
    assert order.verification is not None
    wrong_before_right = codes[:codes.index(CODE)] if CODE in codes else codes
    expected = min(len(set(wrong_before_right)), attempts_max)
    assert order.verification.attempts == expected
    assert (order.verification.status is VerificationStatus.FAILED) == (expected == attempts_max)


CORE_T0 = 1_700_000_000_000
CORE_POLICY = OrderPolicy(pay_window_ms=10_000)


def stepped_up_core(attempts_max: int) -> PaymentOrder:
    request = PaymentRequest("m", "n1", "alice", "CNY", 10_000, "Fuel", CashPart(10_000, "wechat"))
    order = build_order(request, order_id="o1", payment_serial="P1", now_ms=CORE_T0,
                        accounts={}, policy=CORE_POLICY)
    return with_risk(order, Verification(code_digest("o1", CODE), CORE_T0 + 5_000, attempts_max,
                                         "step_up_amount"))


# ------------------------------------------------------------------ 3. receipts tell the truth


def test_a_retried_submit_after_the_step_up_passed_no_longer_asks_for_verification(
        tmp_path: Path) -> None:
    with open_stepping_up(tmp_path, ScriptedChannel()) as engine:
        receipt = engine.submit(fuel_request("big-1"))
        assert receipt.needs_verification
        assert engine.submit(fuel_request("big-1")) == receipt  # still waiting: the same
        engine.verify(receipt.order_id, CODE)
        again = engine.submit(fuel_request("big-1"))
        assert not again.needs_verification
        assert again.order_id == receipt.order_id


def test_a_retried_submit_after_the_step_up_failed_does_not_ask_for_a_code(
        tmp_path: Path) -> None:
    with open_stepping_up(tmp_path, ScriptedChannel(), attempts=1) as engine:
        receipt = engine.submit(fuel_request("big-1"))
        wrong(engine, receipt.order_id, "000000")
        assert not engine.submit(fuel_request("big-1")).needs_verification


# ------------------------------------------------------------------ 4. signed refusals recorded

SECRET = "station-1-request-key-0123456789abcdef"


def test_a_signed_pay_the_risk_gate_blocks_is_recorded_as_a_refusal(tmp_path: Path) -> None:
    risk = RiskConfig(rules=RiskRules(blocked_users=frozenset({"alice"})))
    with Engine.open(tmp_path / "pay.db", channels=[ScriptedChannel()], policy=SLOW_POLICY,
                     risk=risk) as engine:
        fund_customer(engine)
        engine.register_merchant_key("station-1", secret=SECRET)
        signer = MerchantSigner("station-1", secret=SECRET)
        body, headers = signer.pay(fuel_request("blocked-1"))
        with pytest.raises(RiskBlocked):
            engine.submit_signed(body, headers)
        (refusal,) = engine.rejected_requests()
        assert (refusal.merchant_id, refusal.op, refusal.merchant_order_no, refusal.reason) == (
            "station-1", "pay", "blocked-1", "risk_blocked")
        assert refusal.nonce == headers["X-Payengine-Nonce"] and "alice" not in refusal.detail
        assert engine.request_rejection_counts() == {"risk_blocked": 1}
        assert engine.store.count_orders_by_state() == {}


def test_a_signed_pay_conflicting_with_its_order_is_recorded_as_a_refusal(
        tmp_path: Path) -> None:
    with open_engine(tmp_path / "pay.db", ScriptedChannel()) as engine:
        fund_customer(engine)
        engine.register_merchant_key("station-1", secret=SECRET)
        signer = MerchantSigner("station-1", secret=SECRET)
        receipt = engine.submit_signed(*signer.pay(fuel_request("order-1")))
        other = replace(fuel_request("order-1"), title="Something else")
        with pytest.raises(IdempotencyConflict):
            engine.submit_signed(*signer.pay(other))
        (refusal,) = engine.rejected_requests()
        assert (refusal.op, refusal.merchant_order_no, refusal.reason) == (
            "pay", "order-1", "idempotency_conflict")
        assert engine.request_rejection_counts() == {"idempotency_conflict": 1}
        assert engine.get_order(receipt.order_id).total_minor == 10_000


# ------------------------------------------------------------------ 5. no thread left behind
@pytest.fixture
def no_threads_left() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    wait_for(lambda: not [t for t in threading.enumerate() if t not in before],
             what="every thread started by the test to end")


SIMULATED_TOML = """
[channels.sim-wallet]
kind = "simulated"
wallet = "wechat"
merchant_no = "1"
credentials = { key = "simulated-wallet-key-0001" }
simulated = { faults = "none", txn_prefix = "S" }
"""


def test_loading_simulated_channels_without_a_world_starts_no_thread(
        no_threads_left: None) -> None:
    (wallet,) = load_channels(SIMULATED_TOML)
    assert isinstance(wallet, SimulatedChannel)


def test_simulated_channels_without_a_world_pay_and_leave_no_thread_after_shutdown(
        tmp_path: Path, no_threads_left: None) -> None:
    (wallet,) = load_channels(SIMULATED_TOML)
    request = PaymentRequest("station-1", "sim-1", "alice", "CNY", 500, "Fuel",
                             CashPart(500, "sim-wallet"))
    with Engine.open(tmp_path / "pay.db", channels=[wallet]) as engine:
        assert isinstance(wallet, SimulatedChannel)
        wallet.attach(engine)
        receipt = engine.submit(request)
        done = wait_for(lambda: (o := engine.get_order(receipt.order_id)).settled and o,
                        what="the simulated user to pay")
        assert done.state == "succeeded"
    with Engine.open(tmp_path / "pay.db", channels=[wallet]) as again:  # reopened: still works
        wallet.attach(again)
        receipt = again.submit(replace(request, merchant_order_no="sim-2", user_id="bob"))
        done = wait_for(lambda: (o := again.get_order(receipt.order_id)).settled and o,
                        what="the simulated user to pay again")
        assert done.state == "succeeded"
