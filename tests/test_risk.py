"""The risk gate: rules (pure), the engine's pass / block / step-up, verify, the hook's
timeout and errors, and the verification window."""

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
    ChannelReply,
    Engine,
    EngineConfig,
    IllegalTransition,
    InvalidRequest,
    LegMode,
    PayDetails,
    PaymentRequest,
    RiskBlocked,
    RiskConfig,
    RiskContext,
    RiskOutcome,
    RiskRules,
    RiskVerdict,
    UnknownOrder,
    VerificationFailed,
    VoucherPart,
)
from payengine.engine.risk import (
    RiskFacts,
    Velocity,
    code_digest,
    in_window,
    over_velocity,
)
from tests.helpers import (
    SLOW_POLICY,
    ScriptedChannel,
    fuel_request,
    fund_customer,
    open_engine,
    paid_reply,
    signed_callback,
    wait_for,
)

CODE = "424242"


class DetailsChannel(ScriptedChannel):
    """A scripted channel whose pay takes the request's details (device ids)."""

    def pay(self, payment_serial: str, amount_minor: int, currency: str, title: str,
            details: PayDetails | None = None) -> ChannelReply:
        return super().pay(payment_serial, amount_minor, currency, title)


def facts(total: int = 10_000, user: str = "alice", device: str | None = None,
          payer: str | None = None) -> RiskFacts:
    return RiskFacts("station-1", user, "CNY", total, device, payer, None)


# ------------------------------------------------------------------ rules (pure)


def test_no_rule_fires_so_the_payment_passes() -> None:
    assert RiskRules().evaluate(facts(), Velocity()).outcome is RiskOutcome.PASS


def test_an_amount_above_the_maximum_is_blocked_and_at_it_passes() -> None:
    rules = RiskRules(amount_max={"CNY": 50_000})
    assert rules.evaluate(facts(50_000), Velocity()).outcome is RiskOutcome.PASS
    verdict = rules.evaluate(facts(50_001), Velocity())
    assert (verdict.outcome, verdict.rule) == (RiskOutcome.BLOCK, "amount_max")
    assert rules.evaluate(replace(facts(90_000), currency="USD"), Velocity()).outcome is (
        RiskOutcome.PASS)


def test_a_step_up_threshold_is_inclusive() -> None:
    rules = RiskRules(step_up_amount={"CNY": 20_000})
    assert rules.evaluate(facts(19_999), Velocity()).outcome is RiskOutcome.PASS
    assert rules.evaluate(facts(20_000), Velocity()) == RiskVerdict.step_up("step_up_amount")


def test_blocklists_block_users_devices_and_payers_and_block_beats_step_up() -> None:
    rules = RiskRules(blocked_users=frozenset({"mallory"}), blocked_devices=frozenset({"pump-9"}),
                      blocked_payers=frozenset({"openid-x"}), step_up_amount={"CNY": 1})
    assert rules.evaluate(facts(user="mallory"), Velocity()).rule == "blocked_user"
    assert rules.evaluate(facts(device="pump-9"), Velocity()).rule == "blocked_device"
    assert rules.evaluate(facts(payer="openid-x"), Velocity()).rule == "blocked_payer"
    assert rules.evaluate(facts(device="pump-1"), Velocity()).outcome is RiskOutcome.STEP_UP


def test_velocity_counts_earlier_orders_so_the_limit_th_plus_one_gets_the_action() -> None:
    rules = RiskRules(user_orders_max=3, device_orders_max=2,
                      velocity_action=RiskOutcome.STEP_UP)
    assert rules.evaluate(facts(), Velocity(2, None)).outcome is RiskOutcome.PASS
    assert rules.evaluate(facts(), Velocity(3, None)).rule == "velocity_user"
    assert rules.evaluate(facts(device="d"), Velocity(0, 1)).outcome is RiskOutcome.PASS
    assert rules.evaluate(facts(device="d"), Velocity(0, 2)) == RiskVerdict(
        RiskOutcome.STEP_UP, "velocity_device")
    assert not over_velocity(10**6, None)


def test_the_velocity_window_excludes_its_start_and_includes_now() -> None:
    assert in_window(1_001, 2_000, 1_000)
    assert not in_window(1_000, 2_000, 1_000)
    assert in_window(2_000, 2_000, 1_000)
    assert not in_window(2_001, 2_000, 1_000)


@given(total=st.integers(1, 10**9), users=st.integers(0, 20), devices=st.integers(0, 20),
       blocked=st.booleans())
def test_the_verdict_is_the_most_severe_of_the_rules_that_fire(
        total: int, users: int, devices: int, blocked: bool) -> None:
    rules = RiskRules(amount_max={"CNY": 500_000}, step_up_amount={"CNY": 100_000},
                      user_orders_max=10, device_orders_max=5,
                      blocked_users=frozenset({"alice"} if blocked else set()))
    verdict = rules.evaluate(facts(total, device="d"), Velocity(users, devices))
    block = total > 500_000 or users >= 10 or devices >= 5 or blocked
    step_up = total >= 100_000
    expected = (RiskOutcome.BLOCK if block else RiskOutcome.STEP_UP if step_up
                else RiskOutcome.PASS)
    assert verdict.outcome is expected


def test_bad_rules_are_refused_when_built() -> None:
    with pytest.raises(InvalidRequest):
        RiskRules(amount_max={"CNY": 0})
    with pytest.raises(InvalidRequest):
        RiskRules(blocked_users={"a"})  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest):
        RiskRules(velocity_action=RiskOutcome.PASS)
    with pytest.raises(InvalidRequest, match="issue_code"):
        RiskConfig(rules=RiskRules(step_up_amount={"CNY": 1}))
    with pytest.raises(InvalidRequest):
        RiskConfig(verify_attempts_max=0)


def test_the_code_digest_depends_on_the_order_and_the_code() -> None:
    assert code_digest("o1", "1234") != code_digest("o2", "1234")
    assert code_digest("o1", "1234") != code_digest("o1", "1235")
    assert "1234" not in code_digest("o1", "1234")


# ------------------------------------------------------------------ the engine


def issue(request: PaymentRequest, context: RiskContext) -> str:
    return CODE


def step_up_everything(verification_window_ms: int = 60_000, attempts: int = 3) -> RiskConfig:
    return RiskConfig(rules=RiskRules(step_up_amount={"CNY": 1}), issue_code=issue,
                      verification_window_ms=verification_window_ms,
                      verify_attempts_max=attempts)


def open_risky(tmp_path: Path, channel: ScriptedChannel, risk: RiskConfig) -> Engine:
    engine = Engine.open(tmp_path / "risk.db", channels=[channel],
                         policy=SLOW_POLICY,
                         config=EngineConfig(ask_timeout_s=5.0, duplicate_guard_window_ms=0),
                         risk=risk)
    fund_customer(engine)
    return engine


@pytest.fixture
def risky(tmp_path: Path, channel: ScriptedChannel) -> Iterator[Engine]:
    engine = open_risky(tmp_path, channel, step_up_everything())
    yield engine
    engine.shutdown()


def held(engine: Engine, who: str = "alice") -> int:
    return sum(engine.get_account(f"{who}/{name}").held
               for name in ("red-packet", "points", "phone"))


def test_a_blocked_payment_is_a_typed_refusal_with_no_order_and_nothing_held(
        tmp_path: Path, channel: ScriptedChannel) -> None:
    engine = open_risky(tmp_path, channel,
                        RiskConfig(rules=RiskRules(blocked_users=frozenset({"alice"}))))
    try:
        with pytest.raises(RiskBlocked) as raised:
            engine.submit(fuel_request("blocked-1"))
        assert raised.value.code == "risk_blocked" and raised.value.rule == "blocked_user"
        assert "alice" not in raised.value.message
        assert engine.store.count_orders_by_state() == {}
        assert held(engine) == 0 and channel.count("pay") == 0
    finally:
        engine.shutdown()


def test_a_step_up_is_visible_to_polling_and_nothing_is_held_or_paid(
        risky: Engine, channel: ScriptedChannel) -> None:
    receipt = risky.submit(fuel_request("big-1"))
    assert receipt.needs_verification
    assert risky.submit(fuel_request("big-1")) == receipt  # a retry: the same receipt
    view = risky.get_order(receipt.order_id)
    assert view.state == "needs_verification"
    assert view.verification is not None and view.verification.status == "pending"
    assert view.verification.attempts_left == 3 and view.verification.rule == "step_up_amount"
    assert held(risky) == 0 and channel.count("pay") == 0
    journal = risky.journal(receipt.order_id)
    assert journal[0].to_state == "needs_verification" and "step_up" in journal[0].cause
    assert CODE not in repr(view)


def test_the_right_code_lets_the_order_pay_once(risky: Engine, channel: ScriptedChannel) -> None:
    receipt = risky.submit(fuel_request("big-2"))
    view = risky.verify(receipt.order_id, CODE)
    assert view.verification is not None and view.verification.status == "passed"
    wait_for(lambda: risky.get_order(receipt.order_id).state == "paying", what="paying")
    assert risky.verify(receipt.order_id, CODE).state in ("paying", "succeeded")  # a retry
    signed_callback(risky, "wechat", receipt.payment_serial, paid_reply(receipt.payment_serial))
    done = wait_for(lambda: (o := risky.get_order(receipt.order_id)).settled and o)
    assert done.state == "succeeded"
    wait_for(lambda: channel.count("pay") >= 1, what="the pay call")  # on its lane
    assert channel.count("pay") == 1
    with pytest.raises(IllegalTransition):
        risky.verify(receipt.order_id, "000000")  # not waiting any more
    parts = [(e.from_state, e.to_state) for e in risky.journal(receipt.order_id)
             if e.part == "order"]
    assert parts[:3] == [("", "needs_verification"), ("needs_verification", "accepted"),
                         ("accepted", "paying")]


def test_wrong_codes_count_and_the_last_one_fails_the_order_and_releases_the_pre_hold(
        risky: Engine, channel: ScriptedChannel) -> None:
    hold = risky.pre_hold("alice/points", 20, hold_id="tick-1")
    request = replace(fuel_request("big-3"), vouchers=(
        VoucherPart("alice/red-packet", 100), VoucherPart("alice/points", 20, LegMode.PRE_HELD,
                                                          hold_id=hold.hold_id),
        VoucherPart("alice/phone", 100)))
    receipt = risky.submit(request)
    for left in (2, 1):
        with pytest.raises(VerificationFailed) as raised:
            risky.verify(receipt.order_id, "111111")
        assert raised.value.attempts_left == left and raised.value.code == "verification_failed"
    with pytest.raises(VerificationFailed) as raised:
        risky.verify(receipt.order_id, "111111")
    assert (raised.value.attempts_left, raised.value.state) == (0, "failed")
    done = wait_for(lambda: (o := risky.get_order(receipt.order_id)).settled and o)
    assert done.state == "failed" and done.verification is not None
    assert done.verification.status == "failed"
    assert risky.get_hold("alice/points", "tick-1").status == "voided"
    assert held(risky) == 0 and channel.count("pay") == 0
    with pytest.raises(IllegalTransition):
        risky.verify(receipt.order_id, CODE)  # the right code, too late


def test_a_verify_of_an_order_never_stepped_up_is_an_illegal_transition(
        tmp_path: Path, channel: ScriptedChannel) -> None:
    engine = open_engine(tmp_path / "plain.db", channel)
    fund_customer(engine)
    try:
        receipt = engine.submit(fuel_request("plain-1"))
        assert not receipt.needs_verification
        with pytest.raises(IllegalTransition):
            engine.verify(receipt.order_id, CODE)
        with pytest.raises(InvalidRequest):
            engine.verify(receipt.order_id, "12 34")
    finally:
        engine.shutdown()


def test_a_user_close_while_waiting_closes_the_order(risky: Engine,
                                                     channel: ScriptedChannel) -> None:
    receipt = risky.submit(fuel_request("big-4"))
    view = risky.close(receipt.order_id)
    assert view.state == "closed" and view.verification is not None
    assert view.verification.status == "closed"
    with pytest.raises(IllegalTransition):
        risky.verify(receipt.order_id, CODE)
    assert channel.count("pay") == 0


def test_the_verification_window_ends_by_itself_and_the_order_fails(
        tmp_path: Path, channel: ScriptedChannel) -> None:
    engine = open_risky(tmp_path, channel, step_up_everything(verification_window_ms=1_000))
    try:
        receipt = engine.submit(fuel_request("big-5"))
        done = wait_for(lambda: (o := engine.get_order(receipt.order_id)).settled and o,
                        what="verification expired")
        assert done.state == "failed" and done.verification is not None
        assert done.verification.status == "expired"
        with pytest.raises(IllegalTransition):
            engine.verify(receipt.order_id, CODE)
        assert channel.count("pay") == 0 and held(engine) == 0
        assert any(e.cause.startswith("verification_expired")
                   for e in engine.journal(receipt.order_id))
    finally:
        engine.shutdown()


class Hook:
    """A risk service: answers ``verdict``, or raises ``error``, or waits on ``gate``."""

    def __init__(self, verdict: object = None, error: Exception | None = None,
                 gate: threading.Event | None = None) -> None:
        self.verdict, self.error, self.gate = verdict, error, gate
        self.calls = 0

    def assess(self, request: PaymentRequest, context: RiskContext) -> RiskVerdict:
        self.calls += 1
        if self.gate is not None:
            self.gate.wait(10)
        if self.error is not None:
            raise self.error
        return self.verdict  # type: ignore[return-value]


def test_the_hooks_step_up_carries_the_code_it_sent(tmp_path: Path,
                                                    channel: ScriptedChannel) -> None:
    hook = Hook(RiskVerdict.step_up("new_device", "9876"))
    engine = open_risky(tmp_path, channel, RiskConfig(hook=hook))
    try:
        receipt = engine.submit(fuel_request("hook-1"))
        assert engine.get_order(receipt.order_id).state == "needs_verification"
        with pytest.raises(VerificationFailed):
            engine.verify(receipt.order_id, CODE)
        assert engine.verify(receipt.order_id, "9876").verification.status == "passed"  # type: ignore[union-attr]
    finally:
        engine.shutdown()


def test_the_hooks_block_refuses_with_its_rule(tmp_path: Path, channel: ScriptedChannel) -> None:
    engine = open_risky(tmp_path, channel, RiskConfig(hook=Hook(RiskVerdict.blocked("fraud"))))
    try:
        with pytest.raises(RiskBlocked, match="fraud"):
            engine.submit(fuel_request("hook-2"))
        assert engine.store.count_orders_by_state() == {}
    finally:
        engine.shutdown()


@pytest.mark.parametrize("default", list(RiskOutcome))
def test_a_hook_that_does_not_answer_in_time_follows_the_configured_default(
        tmp_path: Path, channel: ScriptedChannel, default: RiskOutcome) -> None:
    gate = threading.Event()
    hook = Hook(RiskVerdict.passed(), gate=gate)
    engine = open_risky(tmp_path, channel, RiskConfig(hook=hook, hook_timeout_ms=50,
                                                      on_timeout=default, issue_code=issue))
    try:
        _check_default(engine, default, "hook-3", "timed out")
    finally:
        gate.set()
        engine.shutdown()


@pytest.mark.parametrize("hook", [Hook(error=RuntimeError("down")), Hook("not a verdict"),
                                  Hook(RiskVerdict(RiskOutcome.PASS, "bad\nrule"))])
def test_a_hook_that_raises_or_answers_badly_follows_the_configured_default(
        tmp_path: Path, channel: ScriptedChannel, hook: Hook) -> None:
    engine = open_risky(tmp_path, channel, RiskConfig(hook=hook, on_timeout=RiskOutcome.STEP_UP,
                                                      issue_code=issue))
    try:
        _check_default(engine, RiskOutcome.STEP_UP, "hook-4", "risk service")
    finally:
        engine.shutdown()


def _check_default(engine: Engine, default: RiskOutcome, no: str, why: str) -> None:
    if default is RiskOutcome.BLOCK:
        with pytest.raises(RiskBlocked):
            engine.submit(fuel_request(no))
        assert engine.store.count_orders_by_state() == {}
        return
    receipt = engine.submit(fuel_request(no))
    first = engine.journal(receipt.order_id)[0]
    assert why in first.cause and f"risk {default.value} by default" in first.cause
    state = engine.get_order(receipt.order_id).state
    assert (state == "needs_verification") == (default is RiskOutcome.STEP_UP)


def test_a_step_up_without_a_code_to_send_is_blocked(tmp_path: Path,
                                                     channel: ScriptedChannel) -> None:
    def broken(request: PaymentRequest, context: RiskContext) -> str:
        raise ConnectionError("sms gateway down")

    engine = open_risky(tmp_path, channel, RiskConfig(rules=RiskRules(
        step_up_amount={"CNY": 1}), issue_code=broken))
    try:
        with pytest.raises(RiskBlocked) as raised:
            engine.submit(fuel_request("sms-1"))
        assert raised.value.rule == "step_up_unavailable"
        assert engine.store.count_orders_by_state() == {}
    finally:
        engine.shutdown()


def test_velocity_per_user_and_device_counts_the_orders_in_the_window(tmp_path: Path) -> None:
    channel = DetailsChannel()
    engine = open_risky(tmp_path, channel, RiskConfig(rules=RiskRules(
        user_orders_max=2, device_orders_max=3, velocity_window_ms=60_000)))
    try:
        def request(no: str, who: str, device: str) -> PaymentRequest:
            return PaymentRequest("station-1", no, who, "CNY", 500, "Fuel",
                                  CashPart(500, "wechat", PayDetails(device_id=device)))

        engine.submit(request("v1", "alice", "pump-1"))
        engine.submit(request("v2", "alice", "pump-1"))
        with pytest.raises(RiskBlocked, match="velocity_user"):
            engine.submit(request("v3", "alice", "pump-2"))
        engine.submit(request("v4", "bob", "pump-1"))
        with pytest.raises(RiskBlocked, match="velocity_device"):
            engine.submit(request("v5", "carol", "pump-1"))
        engine.submit(request("v2", "alice", "pump-1"))  # a retry is not assessed again
        assert sum(engine.store.count_orders_by_state().values()) == 3
    finally:
        engine.shutdown()


def test_a_waiting_order_survives_a_restart_and_can_still_be_verified(
        tmp_path: Path, channel: ScriptedChannel) -> None:
    engine = open_risky(tmp_path, channel, step_up_everything())
    receipt = engine.submit(fuel_request("big-6"))
    engine.shutdown()
    again = Engine.open(tmp_path / "risk.db", channels=[channel], policy=SLOW_POLICY,
                        risk=step_up_everything())
    try:
        assert again.get_order(receipt.order_id).state == "needs_verification"
        again.verify(receipt.order_id, CODE)
        wait_for(lambda: again.get_order(receipt.order_id).state == "paying")
        wait_for(lambda: channel.count("pay") >= 1, what="the pay call")  # on its lane
        assert channel.count("pay") == 1
    finally:
        again.shutdown()


def test_any_blocked_submit_creates_nothing_and_holds_nothing(
        tmp_path: Path, channel: ScriptedChannel) -> None:
    engine = open_risky(tmp_path, channel, RiskConfig(rules=RiskRules(
        amount_max={"CNY": 20_000}, blocked_users=frozenset({"mallory"}))))
    fund_customer(engine, "mallory")
    numbers = iter(range(10**6))
    try:
        @settings(max_examples=40, deadline=None)
        @given(who=st.sampled_from(["alice", "mallory"]), cash=st.integers(1, 300).map(
            lambda n: n * 100))
        def submit(who: str, cash: int) -> None:
            request = replace(fuel_request(f"p{next(numbers)}", who),
                              total_minor=cash + 400, cash=CashPart(cash, "wechat"))
            before = sum(engine.store.count_orders_by_state().values())
            blocked = who == "mallory" or cash + 400 > 20_000
            try:
                engine.submit(request)
            except RiskBlocked:
                assert blocked
                assert sum(engine.store.count_orders_by_state().values()) == before
                with pytest.raises(UnknownOrder):
                    engine.find_order("station-1", request.merchant_order_no)
                assert held(engine, "mallory") == 0
            else:
                assert not blocked

        submit()
    finally:
        engine.shutdown()


@pytest.mark.parametrize("seed", range(12))
def test_a_verify_racing_the_window_timer_either_pays_once_or_never(
        tmp_path: Path, seed: int) -> None:
    """On the deterministic runtime, the right code arrives around the end of the window:
    the order's mailbox decides, so the order passed and paid once, or expired and never
    paid; never both, never neither."""
    from payengine.sim.channel import ChannelFaults, SimulatedChannel
    from payengine.sim.runtime import Scheduler, SimRuntime, SimWorld
    from payengine.sim.simulation import SeqIds

    sched = Scheduler(seed)
    world = SimWorld(sched, io_latency_ms=(1, 30))
    wechat = SimulatedChannel("wechat", world, seed=seed, faults=replace(
        ChannelFaults.none(), user_never_pays=1.0), wait_for_ack=False)
    engine = Engine.open(tmp_path / f"race-{seed}.db", channels=[wechat],
                         policy=replace(SLOW_POLICY, pay_window_ms=30_000),
                         runtime=SimRuntime(sched, io_latency_ms=(1, 40)), ids=SeqIds(),
                         synchronous="OFF", risk=step_up_everything(verification_window_ms=1_000))
    wechat.attach(engine)
    answers: list[str] = []
    try:
        fund_customer(engine)
        receipt = engine.submit(fuel_request(f"race-{seed}"))
        expires = engine.get_order(receipt.order_id).verification.expires_at_ms  # type: ignore[union-attr]

        def verify() -> None:
            try:
                answers.append(engine.verify(receipt.order_id, CODE).state)
            except IllegalTransition:
                answers.append("refused")

        world.call_at(expires + seed % 5 - 2, verify)
        sched.run_until(lambda: sched.idle() or sched.now_ms > expires + 5_000)
        order = engine.get_order(receipt.order_id)
        assert order.verification is not None and len(answers) == 1
        pays = len(wechat.pay_details_sent(receipt.payment_serial))
        if order.verification.status == "passed":
            assert answers[0] != "refused" and pays == 1
        else:
            assert order.verification.status == "expired" and order.state == "failed"
            assert answers[0] == "refused" and pays == 0
    finally:
        engine.shutdown()


def test_a_step_up_with_the_services_code_beats_the_rules_step_up(
        tmp_path: Path, channel: ScriptedChannel) -> None:
    issued: list[str] = []

    def issue_once(request: PaymentRequest, context: RiskContext) -> str:
        issued.append(request.merchant_order_no)
        return CODE

    engine = open_risky(tmp_path, channel, RiskConfig(
        rules=RiskRules(step_up_amount={"CNY": 1}), issue_code=issue_once,
        hook=Hook(RiskVerdict.step_up("new_device", "5555"))))
    try:
        receipt = engine.submit(fuel_request("both-1"))
        assert issued == []  # the user got the service's code only
        assert engine.verify(receipt.order_id, "5555").verification.status == "passed"  # type: ignore[union-attr]
    finally:
        engine.shutdown()


def test_an_order_waiting_for_its_code_is_passivated_and_wakes_for_the_code(
        risky: Engine, channel: ScriptedChannel) -> None:
    receipt = risky.submit(fuel_request("idle-1"))
    wait_for(lambda: risky._ctx.directory.live_count("order") == 0, what="passivation")
    assert risky._ctx.directory.count("order") == 1  # still in flight
    risky.verify(receipt.order_id, CODE)
    wait_for(lambda: risky.get_order(receipt.order_id).state == "paying", what="paying")
    wait_for(lambda: channel.count("pay") >= 1, what="the pay call")  # on its lane
    assert channel.count("pay") == 1


def test_a_hook_whose_calls_all_hang_is_not_asked_past_its_slots(
        tmp_path: Path, channel: ScriptedChannel) -> None:
    gate = threading.Event()
    hook = Hook(RiskVerdict.passed(), gate=gate)
    engine = open_risky(tmp_path, channel, RiskConfig(hook=hook, hook_timeout_ms=20,
                                                      hook_threads=1))
    try:
        causes = [engine.journal(engine.submit(fuel_request(f"hang-{n}")).order_id)[0].cause
                  for n in range(3)]
        assert all("risk pass by default" in cause for cause in causes)
        assert "timed out" in causes[0] and "timed out" in causes[1]
        assert "busy" in causes[2]  # two calls out (one running, one queued): not asked
        assert hook.calls == 1
    finally:
        gate.set()
        engine.shutdown()
