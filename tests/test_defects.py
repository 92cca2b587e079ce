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
    Overloaded,
    PaymentRequest,
    RiskBlocked,
    RiskConfig,
    RiskRules,
    VerificationFailed,
    load_channels,
)
from payengine.actors import order_actor
from payengine.actors.claim import Claim
from payengine.engine.order import Activate, PaymentOrder, VerifyCode
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


def open_stepping_up(tmp_path: Path, channel: ScriptedChannel, attempts: int = 3,
                     ask_timeout_s: float = 5.0) -> Engine:
    engine = Engine.open(tmp_path / "risk.db", channels=[channel], policy=SLOW_POLICY,
                         config=EngineConfig(ask_timeout_s=ask_timeout_s,
                                             duplicate_guard_window_ms=0),
                         risk=RiskConfig(rules=RiskRules(step_up_amount={"CNY": 1}),
                                         issue_code=lambda request, context: CODE,
                                         verify_attempts_max=attempts))
    fund_customer(engine)
    return engine


def wrong(engine: Engine, order_id: str, code: str) -> tuple[int, str]:
    with pytest.raises(VerificationFailed) as failed:
        engine.verify(order_id, code)
    return failed.value.attempts_left, failed.value.state


class HeldActor:
    """Holds the order actors' ``decide`` on chosen events until released: a busy actor,
    deterministically (no sleeps)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, hold_on: type) -> None:
        self.holding = threading.Event()
        self.release = threading.Event()
        self._hold_on, self._decide = hold_on, order_actor.decide
        monkeypatch.setattr(order_actor, "decide", self._held_decide)

    def _held_decide(self, order: PaymentOrder, event: object, **kwargs: object) -> object:
        if isinstance(event, self._hold_on) and not self.release.is_set():
            self.holding.set()
            assert self.release.wait(30), "never released"
        return self._decide(order, event, **kwargs)  # type: ignore[arg-type]


def test_a_wrong_code_retried_after_overloaded_counts_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with open_stepping_up(tmp_path, ScriptedChannel(), ask_timeout_s=0.2) as engine:
        receipt = engine.submit(fuel_request("big-1"))
        held = HeldActor(monkeypatch, Activate)
        engine._ctx.directory.tell(("order", receipt.order_id), Activate())
        assert held.holding.wait(10)  # the order's actor is busy: the code waits in its queue
        with pytest.raises(Overloaded, match="nothing was done"):
            engine.verify(receipt.order_id, "000000")
        held.release.set()
        # the caller retries the same call: it counts once
        assert wrong(engine, receipt.order_id, "000000") == (2, "needs_verification")
        view = wait_for(lambda: engine.get_order(receipt.order_id).verification)
        assert view.attempts_left == 2


def test_a_code_the_actor_took_before_the_wait_ended_is_answered_not_overloaded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with open_stepping_up(tmp_path, ScriptedChannel(), ask_timeout_s=0.2) as engine:
        receipt = engine.submit(fuel_request("big-1"))
        held = HeldActor(monkeypatch, VerifyCode)
        withdraw = Claim.withdraw

        def withdrawn_then_released(claim: Claim) -> bool:
            taken = not withdraw(claim)
            held.release.set()  # the asker gave up waiting: let the actor go on
            return not taken

        monkeypatch.setattr(Claim, "withdraw", withdrawn_then_released)
        assert wrong(engine, receipt.order_id, "000000") == (2, "needs_verification")
        assert held.holding.is_set()


@settings(max_examples=100, deadline=None)
@given(steps=st.lists(st.sampled_from(["take", "withdraw"]), min_size=1, max_size=6))
def test_a_claim_is_won_by_whoever_comes_first_and_only_by_them(steps: list[str]) -> None:
    claim = Claim()
    answers = [(step, claim.take() if step == "take" else claim.withdraw()) for step in steps]
    first = steps[0]
    assert all(won == (step == first) for step, won in answers)


def test_a_claims_outcome_is_handed_over_or_overloaded_when_it_does_not_come() -> None:
    claim = Claim()
    with pytest.raises(Overloaded):
        claim.outcome(0.01)
    claim.finish("view")
    assert claim.outcome(0.01) == "view"
    failed = Claim()
    failed.finish(IllegalTransition("not waiting"))
    with pytest.raises(IllegalTransition):
        failed.outcome(0.01)


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
