"""Risk: block, step-up, verify, expiry, the hook."""

from __future__ import annotations

import threading

import pytest

from payengine import (
    CashPart,
    EngineConfig,
    IllegalTransition,
    InvalidRequest,
    LegMode,
    OrderPolicy,
    PayDetails,
    PaymentRequest,
    PayScenario,
    RiskBlocked,
    RiskConfig,
    RiskOutcome,
    RiskRules,
    RiskVerdict,
    UnknownOrder,
    VerificationFailed,
    VoucherPart,
)

from .support import ScriptedChannel, fuel, uniq, wait_for

POLICY = OrderPolicy(pay_window_ms=60_000, query_schedule_ms=(200,) * 10)
CODE = "424242"


def issue(request, context):
    return CODE


def _open(world, risk, policy=POLICY, db=None, events=None, channel=None):
    channel = channel or ScriptedChannel("wechat")
    subscribers = None
    if events is not None:
        subscribers = {"tap": events.append}
    engine = world.open([channel], policy=policy, risk=risk, db=db, subscribers=subscribers,
                        config=EngineConfig(duplicate_guard_window_ms=0))
    return engine, channel


def order_journal(engine, order_id):
    return [(j.from_state, j.to_state, j.cause) for j in engine.journal(order_id) if j.part == "order"]


def step_up_risk(**kw):
    kw.setdefault("issue_code", issue)
    return RiskConfig(rules=RiskRules(step_up_amount={"CNY": 500_00}), **kw)


# --- block ------------------------------------------------------------------------------------


def test_block_by_user_nothing_created_held_or_published(world) -> None:
    # "**block**: `submit` raises `RiskBlocked` (code `risk_blocked`, `.rule` names the rule, the
    #  message never the data it matched); nothing is created, held, journalled or published"
    events: list = []
    engine, channel = _open(world, RiskConfig(rules=RiskRules(blocked_users=frozenset({"mallory-x1"}))),
                            events=events)
    engine.open_account("mallory-x1/rp", "CNY")
    engine.fund("mallory-x1/rp", 500, funding_id=uniq("f"))
    no = uniq()
    request = PaymentRequest("station-42", no, "mallory-x1", "CNY", 100_00, "Fuel",
                             cash=CashPart(99_00, "wechat"), vouchers=(VoucherPart("mallory-x1/rp", 100),))
    with pytest.raises(RiskBlocked) as info:
        engine.submit(request)
    assert info.value.code == "risk_blocked"
    assert info.value.rule == "blocked_user"
    assert "mallory-x1" not in str(info.value)
    with pytest.raises(UnknownOrder):
        engine.find_order("station-42", no)
    assert engine.get_account("mallory-x1/rp").held == 0
    assert channel.pay_calls == []
    ok = engine.submit(fuel())
    wait_for(lambda: any(e.order_id == ok.order_id for e in events), "events flowing")
    assert not any(e.merchant_order_no == no for e in events)


@pytest.mark.parametrize(("rules", "details", "rule"), [
    (RiskRules(blocked_devices=frozenset({"pump-9"})), PayDetails(device_id="pump-9"), "blocked_device"),
    (RiskRules(blocked_payers=frozenset({"openid-bad"})),
     PayDetails(PayScenario.JSAPI, payer_id="openid-bad"), "blocked_payer"),
    (RiskRules(amount_max={"CNY": 99_99}), None, "amount_max"),
])
def test_block_rules(world, rules, details, rule) -> None:
    # "`RiskRules.amount_max` ... above: block (`amount_max`)"; "(`blocked_user`, `blocked_device`,
    #  `blocked_payer`)"
    engine, _ = _open(world, RiskConfig(rules=rules))
    with pytest.raises(RiskBlocked) as info:
        engine.submit(fuel(details=details))
    assert info.value.rule == rule


def test_amount_max_edge_passes(world) -> None:
    engine, _ = _open(world, RiskConfig(rules=RiskRules(amount_max={"CNY": 100_00})))
    receipt = engine.submit(fuel(total=100_00))
    assert not receipt.needs_verification


def test_velocity_user(world) -> None:
    # "orders a user ... may have created in the last `velocity_window_ms`: with that many already, the
    #  next gets `velocity_action` (`RiskOutcome.BLOCK` by default ...; rules `velocity_user`"
    # "blocked submits create no order and do not count"
    engine, _ = _open(world, RiskConfig(rules=RiskRules(user_orders_max=2)))
    engine.submit(fuel(user="vic"))
    engine.submit(fuel(user="vic"))
    for _ in range(3):
        with pytest.raises(RiskBlocked) as info:
            engine.submit(fuel(user="vic"))
        assert info.value.rule == "velocity_user"
    engine.submit(fuel(user="other-user"))


def test_velocity_device_step_up(world) -> None:
    rules = RiskRules(device_orders_max=1, velocity_action=RiskOutcome.STEP_UP)
    engine, _ = _open(world, RiskConfig(rules=rules, issue_code=issue))
    first = engine.submit(fuel(details=PayDetails(device_id="pump-1")))
    assert not first.needs_verification
    second = engine.submit(fuel(details=PayDetails(device_id="pump-1")))
    assert second.needs_verification
    assert engine.get_order(second.order_id).verification.rule == "velocity_device"


# --- step-up ----------------------------------------------------------------------------------


def test_step_up_holds_nothing_and_pays_once_after_code(world) -> None:
    # "the order is created in `needs_verification` and the receipt says `needs_verification=True`.
    #  It holds nothing and charges nothing while it waits"
    engine, channel = _open(world, step_up_risk())
    engine.open_account("sue/rp", "CNY")
    engine.fund("sue/rp", 1000, funding_id=uniq("f"))
    request = PaymentRequest("station-42", uniq(), "sue", "CNY", 600_00, "Fuel",
                             cash=CashPart(599_00, "wechat"), vouchers=(VoucherPart("sue/rp", 100),))
    receipt = engine.submit(request)
    assert receipt.needs_verification
    view = engine.get_order(receipt.order_id)
    assert view.state == "needs_verification"
    assert view.verification.status == "pending" and view.verification.rule == "step_up_amount"
    assert view.verification.attempts_left == 3
    assert all(leg.status == "new" for leg in view.legs)  # "every leg is `new` there"
    assert engine.get_account("sue/rp").held == 0
    assert channel.pay_calls == []
    engine.verify(receipt.order_id, CODE)
    wait_for(lambda: channel.pays_of(receipt.payment_serial), "pay after code")
    assert engine.get_order(receipt.order_id).verification.status == "passed"
    # "the same code again returns the view again"
    assert engine.verify(receipt.order_id, CODE).order_id == receipt.order_id
    assert len(channel.pays_of(receipt.payment_serial)) == 1


def test_step_up_edge_at_threshold(world) -> None:
    # "`RiskRules.step_up_amount` | currency → totals at or above it step up"
    engine, _ = _open(world, step_up_risk())
    assert engine.submit(fuel(total=500_00)).needs_verification
    assert not engine.submit(fuel(total=499_99)).needs_verification


def test_wrong_codes_fail_the_order(world) -> None:
    # "Each wrong code raises `VerificationFailed` (`.attempts_left`); the `verify_attempts_max`-th fails
    #  the order (`verification` `failed`)."
    engine, channel = _open(world, step_up_risk(verify_attempts_max=3))
    receipt = engine.submit(fuel(total=600_00))
    lefts = []
    for _ in range(3):
        with pytest.raises(VerificationFailed) as info:
            engine.verify(receipt.order_id, "000000")
        assert info.value.code == "verification_failed"
        lefts.append(info.value.attempts_left)
    assert lefts == [2, 1, 0]
    view = engine.get_order(receipt.order_id)
    assert view.state == "failed" and view.verification.status == "failed"
    # "`verify` on an order that is not waiting (... failed ...) raises `IllegalTransition`"
    with pytest.raises(IllegalTransition):
        engine.verify(receipt.order_id, CODE)
    assert channel.pay_calls == []
    causes = order_journal(engine, receipt.order_id)
    assert ("needs_verification", "failed", "verification_failed (3 wrong of 3)") in causes


def test_verify_never_stepped_up_or_passed_with_another_code(world) -> None:
    engine, _ = _open(world, step_up_risk())
    plain = engine.submit(fuel(total=10_00))
    with pytest.raises(IllegalTransition):
        engine.verify(plain.order_id, CODE)
    stepped = engine.submit(fuel(total=600_00))
    engine.verify(stepped.order_id, CODE)
    with pytest.raises(IllegalTransition):
        engine.verify(stepped.order_id, "999999")


def test_window_expiry_fails_and_releases_pre_hold(world) -> None:
    # "If the verification window ends first, the order fails by itself (`expired`) ... every leg is
    #  released: nothing was held but a user's pre-hold a `PRE_HELD` part names, which is cancelled."
    engine, channel = _open(world, step_up_risk(verification_window_ms=1_000))
    engine.open_account("pat/pts", "POINTS", minor_per_unit=10)
    engine.fund("pat/pts", 100, funding_id=uniq("f"))
    hold = engine.pre_hold("pat/pts", 20, ttl_ms=600_000)
    request = PaymentRequest("station-42", uniq(), "pat", "CNY", 600_00, "Fuel",
                             cash=CashPart(598_00, "wechat"),
                             vouchers=(VoucherPart("pat/pts", 20, LegMode.PRE_HELD, hold_id=hold.hold_id),))
    receipt = engine.submit(request)
    assert receipt.needs_verification
    assert engine.get_account("pat/pts").held == 20
    view = wait_for(lambda: (v := engine.get_order(receipt.order_id)).state == "failed" and v, "expired")
    assert view.verification.status == "expired"
    wait_for(lambda: engine.get_account("pat/pts").held == 0, "pre-hold cancelled")
    assert engine.get_account("pat/pts").available == 100
    with pytest.raises(IllegalTransition):
        engine.verify(receipt.order_id, CODE)
    assert channel.pay_calls == []
    causes = [j.cause for j in engine.journal(receipt.order_id) if j.to_state == "failed"]
    assert causes and causes[0].startswith("verification_expired")


def test_close_while_waiting(world) -> None:
    # "a close while it waits ... closes it (`closed`)"
    engine, channel = _open(world, step_up_risk())
    receipt = engine.submit(fuel(total=600_00))
    engine.close(receipt.order_id)
    view = wait_for(lambda: (v := engine.get_order(receipt.order_id)).state == "closed" and v, "closed")
    assert view.state == "closed"
    with pytest.raises(IllegalTransition):
        engine.verify(receipt.order_id, CODE)
    assert channel.pay_calls == []


def test_window_never_outlasts_pay_window(world) -> None:
    # "`RiskConfig.verification_window_ms` ... never past the order's pay window"
    engine, _ = _open(world, step_up_risk(verification_window_ms=3_600_000))
    receipt = engine.submit(fuel(total=600_00, pay_window_ms=5_000))
    assert engine.get_order(receipt.order_id).verification.expires_at_ms <= receipt.close_at_ms


def test_journal_of_step_up_and_pass(world) -> None:
    # "the first transition is `"" → needs_verification` (cause `submitted; risk step_up (RULE)`) ...
    #  then `needs_verification → accepted` (`verified: the right code`)"
    engine, _ = _open(world, step_up_risk())
    receipt = engine.submit(fuel(total=600_00))
    engine.verify(receipt.order_id, CODE)
    order = order_journal(engine, receipt.order_id)
    assert order[0] == ("", "needs_verification", "submitted; risk step_up (step_up_amount)")
    assert order[1] == ("needs_verification", "accepted", "verified: the right code")


def test_outbox_publishes_verification_states(world) -> None:
    # "the outbox publishes each as an `order.state_changed` event"
    events: list = []
    engine, _ = _open(world, step_up_risk(), events=events)
    receipt = engine.submit(fuel(total=600_00))
    engine.verify(receipt.order_id, CODE)
    wait_for(lambda: any(e.order_id == receipt.order_id and e.from_state == "needs_verification"
                         for e in events), "event")
    mine = [(e.event_type, e.from_state, e.to_state) for e in events if e.order_id == receipt.order_id]
    assert ("order.state_changed", "", "needs_verification") in mine
    assert ("order.state_changed", "needs_verification", "accepted") in mine


def test_waiting_order_survives_restart(world) -> None:
    # "An order waiting for its code is passivated ... and survives a restart, its window still running."
    risk = step_up_risk()
    engine, _ = _open(world, risk, db="risk.db")
    receipt = engine.submit(fuel(total=600_00))
    engine.shutdown()
    channel = ScriptedChannel("wechat")
    engine2 = world.open([channel], policy=POLICY, risk=risk, db="risk.db")
    assert engine2.get_order(receipt.order_id).state == "needs_verification"
    engine2.verify(receipt.order_id, CODE)
    wait_for(lambda: channel.pays_of(receipt.payment_serial), "pay after restart")


def test_retry_not_assessed_again(world) -> None:
    # "A retried submit of an accepted order (same key and attempt) is not assessed again"
    calls: list = []

    class Hook:
        def assess(self, request, context):
            calls.append(context.order_id)
            return RiskVerdict.passed()

    engine, _ = _open(world, RiskConfig(hook=Hook()))
    request = fuel()
    receipt = engine.submit(request)
    assert engine.submit(request) == receipt
    assert calls == [receipt.order_id]  # "`order_id` (the id the order will have)"


# --- the hook ---------------------------------------------------------------------------------


def test_hook_verdicts(world) -> None:
    class Hook:
        def assess(self, request, context):
            if request.user_id.startswith("blk"):
                return RiskVerdict.blocked("hook_says_no")
            if request.user_id.startswith("stp"):
                return RiskVerdict.step_up("new_device", code="135790")
            return RiskVerdict.passed()

    engine, _ = _open(world, RiskConfig(hook=Hook()))
    with pytest.raises(RiskBlocked) as info:
        engine.submit(fuel(user="blk-1"))
    assert info.value.rule == "hook_says_no"
    receipt = engine.submit(fuel(user="stp-1"))
    assert receipt.needs_verification
    with pytest.raises(VerificationFailed):
        engine.verify(receipt.order_id, CODE)
    engine.verify(receipt.order_id, "135790")
    assert not engine.submit(fuel(user="ok-1")).needs_verification


def test_rules_block_never_asks_hook(world) -> None:
    # "a block by the rules never asks the hook"
    asked: list = []

    class Hook:
        def assess(self, request, context):
            asked.append(request)
            return RiskVerdict.passed()

    engine, _ = _open(world, RiskConfig(rules=RiskRules(blocked_users=frozenset({"zed"})), hook=Hook()))
    with pytest.raises(RiskBlocked):
        engine.submit(fuel(user="zed"))
    assert asked == []


def test_most_severe_wins(world) -> None:
    # "the most severe wins (block, then step-up, then pass)"
    class Hook:
        def assess(self, request, context):
            return RiskVerdict.blocked("hook_block")

    rules = RiskRules(step_up_amount={"CNY": 1})
    engine, _ = _open(world, RiskConfig(rules=rules, hook=Hook(), issue_code=issue))
    with pytest.raises(RiskBlocked) as info:
        engine.submit(fuel())
    assert info.value.rule == "hook_block"


class SlowHook:
    def __init__(self) -> None:
        self.release = threading.Event()

    def assess(self, request, context):
        self.release.wait(5)
        return RiskVerdict.blocked("too_late")


class RaisingHook:
    def assess(self, request, context):
        raise RuntimeError("risk service down")


class JunkHook:
    def assess(self, request, context):
        return "pass"


@pytest.mark.parametrize("hook", [RaisingHook(), JunkHook()])
@pytest.mark.parametrize("outcome", [RiskOutcome.PASS, RiskOutcome.BLOCK, RiskOutcome.STEP_UP])
def test_hook_failure_follows_on_timeout(world, hook, outcome) -> None:
    # "`RiskConfig.on_timeout` | what a payment gets when the hook does not answer in time, raises,
    #  answers something that is not a valid `RiskVerdict` ...: `PASS`, `BLOCK` or `STEP_UP`"
    engine, _ = _open(world, RiskConfig(hook=hook, on_timeout=outcome, issue_code=issue))
    if outcome is RiskOutcome.BLOCK:
        with pytest.raises(RiskBlocked):
            engine.submit(fuel())
    else:
        receipt = engine.submit(fuel())
        assert receipt.needs_verification == (outcome is RiskOutcome.STEP_UP)


def test_hook_timeout_pass_journalled(world) -> None:
    # "The order's first journal entry says so (`submitted; risk pass by default: risk service timed out
    #  (300 ms)`)"
    hook = SlowHook()
    engine, _ = _open(world, RiskConfig(hook=hook, hook_timeout_ms=300))
    try:
        receipt = engine.submit(fuel())
    finally:
        hook.release.set()
    first = engine.journal(receipt.order_id)[0]
    assert (first.from_state, first.to_state) == ("", "accepted")
    assert first.cause == "submitted; risk pass by default: risk service timed out (300 ms)"


def test_issue_code_failure_blocks(world) -> None:
    # "if it fails, the payment is blocked (`rule` `step_up_unavailable`): fail closed"
    def broken(request, context):
        raise RuntimeError("sms gateway down")

    engine, _ = _open(world, step_up_risk(issue_code=broken))
    no = uniq()
    with pytest.raises(RiskBlocked) as info:
        engine.submit(fuel(no, total=600_00))
    assert info.value.rule == "step_up_unavailable"
    with pytest.raises(UnknownOrder):
        engine.find_order("station-42", no)


def test_issue_code_required_for_step_up() -> None:
    # "Required if a rule or `on_timeout` may step up."
    with pytest.raises(InvalidRequest):
        RiskConfig(rules=RiskRules(step_up_amount={"CNY": 500_00}))
    with pytest.raises(InvalidRequest):
        RiskConfig(hook=RaisingHook(), on_timeout=RiskOutcome.STEP_UP)
    with pytest.raises(InvalidRequest):
        RiskConfig(rules=RiskRules(user_orders_max=3, velocity_action=RiskOutcome.STEP_UP))


@pytest.mark.parametrize("kwargs", [
    {"hook_timeout_ms": 0}, {"hook_timeout_ms": 10_001}, {"hook_threads": 0}, {"hook_threads": 65},
    {"verification_window_ms": 999}, {"verification_window_ms": 3_600_001},
    {"verify_attempts_max": 0}, {"verify_attempts_max": 11},
])
def test_risk_config_bounds(kwargs) -> None:
    # "Configuration (`Engine.open(..., risk=RiskConfig(...))`; bad settings raise `InvalidRequest`)"
    with pytest.raises(InvalidRequest):
        RiskConfig(issue_code=issue, **kwargs)


def test_risk_config_defaults() -> None:
    config = RiskConfig()
    assert (config.hook, config.hook_timeout_ms, config.on_timeout, config.hook_threads, config.issue_code,
            config.verification_window_ms, config.verify_attempts_max) == (
        None, 300, RiskOutcome.PASS, 4, None, 300_000, 3)
    assert RiskRules().velocity_window_ms == 60_000
    assert RiskRules().velocity_action is RiskOutcome.BLOCK


class VerdictHook:
    def __init__(self, verdict) -> None:
        self.verdict = verdict

    def assess(self, request, context):
        return self.verdict()


@pytest.mark.parametrize("code", ["", "x" * 33, "12 34", "12\n34"])
def test_step_up_code_checked(world, code) -> None:
    # "`code` is the code its service sent the user (1..32 printable characters, no spaces)";
    # a verdict that does not check is "something that is not a valid `RiskVerdict`": `on_timeout`
    engine, _ = _open(world, RiskConfig(hook=VerdictHook(lambda: RiskVerdict.step_up("r", code=code)),
                                        on_timeout=RiskOutcome.BLOCK))
    with pytest.raises(RiskBlocked):
        engine.submit(fuel())


def test_step_up_code_edges_taken(world) -> None:
    engine, _ = _open(world, RiskConfig(hook=VerdictHook(lambda: RiskVerdict.step_up("r", code="x" * 32)),
                                        on_timeout=RiskOutcome.BLOCK))
    receipt = engine.submit(fuel())
    assert receipt.needs_verification
    engine.verify(receipt.order_id, "x" * 32)


def test_rule_length_checked(world) -> None:
    # "`rule` (printable, at most 128 characters)"
    engine, _ = _open(world, RiskConfig(hook=VerdictHook(lambda: RiskVerdict.blocked("r" * 128))))
    with pytest.raises(RiskBlocked) as info:
        engine.submit(fuel())
    assert info.value.rule == "r" * 128
    engine, _ = _open(world, RiskConfig(hook=VerdictHook(lambda: RiskVerdict.blocked("r" * 129)),
                                        on_timeout=RiskOutcome.PASS))
    assert not engine.submit(fuel()).needs_verification


def test_code_never_stored(world, tmp_path) -> None:
    # "The engine sends no SMS and never stores a code: the order keeps a SHA-256 digest over the order id
    #  and the code"
    code = "ZQX-unique-code-987"
    engine, _ = _open(world, step_up_risk(issue_code=lambda r, c: code), db="codes.db")
    receipt = engine.submit(fuel(total=600_00))
    with pytest.raises(VerificationFailed):
        engine.verify(receipt.order_id, "wrong-code-123")
    engine.shutdown()
    for path in tmp_path.glob("codes.db*"):
        assert code.encode() not in path.read_bytes(), path.name


def test_issue_code_timeout_blocks(world) -> None:
    # "`RiskConfig.issue_code` | ... Called on the same pool with the same timeout; if it fails, the payment
    #  is blocked (`rule` `step_up_unavailable`): fail closed"
    release = threading.Event()

    def slow(request, context):
        release.wait(10)
        return CODE

    engine, _ = _open(world, step_up_risk(issue_code=slow, hook_timeout_ms=200))
    try:
        with pytest.raises(RiskBlocked) as info:
            engine.submit(fuel(total=600_00))
        assert info.value.rule == "step_up_unavailable"
    finally:
        release.set()


def test_step_up_vouchers_held_only_after_code(world) -> None:
    # "its holds are placed only once the code passed"
    channel = ScriptedChannel("wechat")
    from payengine import ChannelReply

    channel.pay_reply = lambda s, a: ChannelReply("SUCCESS", "SUCCESS", "T-" + s, a, "CNY")
    engine, _ = _open(world, step_up_risk(), channel=channel)
    engine.open_account("kim/rp", "CNY")
    engine.fund("kim/rp", 1000, funding_id=uniq("f"))
    request = PaymentRequest("station-42", uniq(), "kim", "CNY", 600_00, "Fuel",
                             cash=CashPart(599_00, "wechat"), vouchers=(VoucherPart("kim/rp", 100),))
    receipt = engine.submit(request)
    assert engine.get_account("kim/rp").held == 0
    engine.verify(receipt.order_id, CODE)
    wait_for(lambda: engine.get_order(receipt.order_id).settled, "settled")
    account = engine.get_account("kim/rp")
    assert (account.spent, account.held, account.available) == (100, 0, 900)
