"""The pure parts of external voucher providers: code mapping, a command's query schedule,
the order's semantics under any sequence of asynchronous answers, and the configuration.
"""

from __future__ import annotations

import contextlib
import random
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from payengine import Engine, OrderPolicy
from payengine.actors.adapters.providers import load_providers, parse_providers
from payengine.engine.codes import CodeTable, ResultKind
from payengine.engine.errors import ConfigError, IllegalTransition, InvalidRequest
from payengine.engine.order import (
    AccountUnit,
    Activate,
    ArmTimer,
    CancelHold,
    CashPart,
    CashResult,
    CloseCause,
    CloseOrder,
    ConfirmHold,
    LegStatus,
    OrderState,
    PayCash,
    PaymentOrder,
    PaymentRequest,
    ResultSource,
    TimerFired,
    TimerKind,
    VoucherOp,
    VoucherPart,
    VoucherReply,
    build_order,
    decide,
)
from payengine.engine.provider import (
    PendingCommand,
    ProviderCodes,
    ProviderOp,
    ProviderReply,
    account_ref,
    classify,
    next_step,
    provider_of,
    txn_id_of,
)
from payengine.engine.voucher import FenceKey
from payengine.sim.provider import SIM_PROVIDERS_TOML, ProviderFaults, SimulatedProvider
from payengine.sim.runtime import Scheduler, SimWorld
from tests.helpers import ScriptedChannel

CODES = st.sampled_from(["OK", "HELD", "CONFIRMED", "REFUSED", "PENDING", "WHAT", "", "ERR"])


def table(success: frozenset[str], failure: frozenset[str]) -> CodeTable:
    return CodeTable("carrier-try", frozenset({"OK"}), success, failure - success)


# ---------------------------------------------------------------------- code mapping


@given(success=st.frozensets(CODES, max_size=3), failure=st.frozensets(CODES, max_size=3),
       comm=st.one_of(st.none(), CODES), code=st.one_of(st.none(), CODES))
def test_only_a_listed_code_under_a_good_communication_code_decides(
        success: frozenset[str], failure: frozenset[str], comm: str | None,
        code: str | None) -> None:
    t = table(success, failure)
    codes = ProviderCodes(t, t, t)
    kind = classify(codes, ProviderOp.TRY, ProviderReply(comm, code))
    if comm != "OK" or code is None or (code not in success and code not in failure):
        assert kind is ResultKind.PROCESSING
    elif code in success:
        assert kind is ResultKind.SUCCESS
    else:
        assert kind is ResultKind.FAILURE
    assert classify(codes, ProviderOp.TRY, None) is ResultKind.PROCESSING


def test_each_operation_reads_its_own_table() -> None:
    (config,) = parse_providers(tomllib.loads(SIM_PROVIDERS_TOML))
    held = ProviderReply("OK", "HELD")
    assert classify(config.codes, ProviderOp.TRY, held) is ResultKind.SUCCESS
    assert classify(config.codes, ProviderOp.CONFIRM, held) is ResultKind.PROCESSING
    assert classify(config.codes, ProviderOp.CANCEL, held) is ResultKind.PROCESSING
    confirmed = ProviderReply("OK", "CONFIRMED")
    assert classify(config.codes, ProviderOp.CANCEL, confirmed) is ResultKind.FAILURE


# ---------------------------------------------------------------------- query schedule


KINDS = st.sampled_from(list(ResultKind))


@given(kinds=st.lists(KINDS, min_size=1, max_size=12),
       schedule=st.lists(st.integers(1, 1_000), min_size=1, max_size=5).map(tuple),
       op=st.sampled_from(list(ProviderOp)))
def test_a_command_is_decided_by_its_first_decided_answer_or_unknown_after_its_schedule(
        kinds: list[ResultKind], schedule: tuple[int, ...], op: ProviderOp) -> None:
    command = PendingCommand("t", op, "o", 1, FenceKey.order_leg("o", 1), "ref", 10)
    now = 0
    for answers, kind in enumerate(kinds, start=1):
        step = next_step(command, kind, schedule_ms=schedule, now_ms=now)
        first_decided = next((k for k in kinds if k is not ResultKind.PROCESSING), None)
        if kind is not ResultKind.PROCESSING:
            assert step.ok is (kind is ResultKind.SUCCESS)
            assert kind is first_decided
            return
        if answers <= len(schedule):
            assert step.query_at_ms == now + schedule[answers - 1] and not step.unknown
            now = step.query_at_ms
            command = PendingCommand(command.txn_id, op, "o", 1, command.fence, "ref", 10,
                                     command.queries_done + 1)
        else:
            assert step.unknown and step.ok is None and step.query_at_ms is None
            return


def test_the_planted_bug_counts_a_try_still_processing_as_held() -> None:
    command = PendingCommand("t", ProviderOp.TRY, "o", 1, FenceKey.order_leg("o", 1), "r", 1)
    assert next_step(command, ResultKind.PROCESSING, schedule_ms=(1,), now_ms=0).ok is None
    bugged = next_step(command, ResultKind.PROCESSING, schedule_ms=(1,), now_ms=0,
                       planted_bugs=frozenset({"async-leg-ignored"}))
    assert bugged.ok is True


def test_a_provider_account_names_its_provider_and_the_providers_own_reference() -> None:
    providers = frozenset({"carrier-x"})
    assert provider_of("carrier-x:138", providers) == "carrier-x"
    assert account_ref("carrier-x:138:9") == "138:9"
    assert provider_of("carrier-y:138", providers) is None
    assert provider_of("carrier-x:", providers) is None
    assert provider_of("alice/phone", providers) is None
    assert txn_id_of(FenceKey.order_leg("o-1", 2)) == "fence:order:2:o-1"


# ---------------------------------------------------------------------- the order


PROVIDERS = frozenset({"carrier-x", "carrier-y"})
ORDER_POLICY = OrderPolicy(pay_window_ms=10_000, voucher_retry_schedule_ms=(10, 20),
                           voucher_providers=PROVIDERS)
LEG_ACCOUNTS = ("carrier-x:a", "carrier-y:b")


def new_order() -> PaymentOrder:
    request = PaymentRequest("m", "no-1", "u", "CNY", 1_000, "Fuel", CashPart(800, "wechat"),
                             tuple(VoucherPart(a, 100) for a in LEG_ACCOUNTS))
    units = {a: AccountUnit("CNY", None) for a in LEG_ACCOUNTS}
    return build_order(request, order_id="o1", payment_serial="s1", now_ms=0, accounts=units,
                       policy=ORDER_POLICY, cash_channel="wechat")


_EXPECTED = {LegStatus.TRYING: ProviderOp.TRY, LegStatus.CONFIRMING: ProviderOp.CONFIRM,
             LegStatus.CONFIRM_UNKNOWN: ProviderOp.CONFIRM,
             LegStatus.CANCELLING: ProviderOp.CANCEL,
             LegStatus.RELEASE_UNKNOWN: ProviderOp.CANCEL}
_VOUCHER_OP = {ProviderOp.TRY: VoucherOp.TRY, ProviderOp.CONFIRM: VoucherOp.CONFIRM,
               ProviderOp.CANCEL: VoucherOp.CANCEL}

ANSWER = st.tuples(st.just("answer"), st.sampled_from([1, 2]),
                  st.sampled_from([ResultKind.SUCCESS] * 8 + [ResultKind.FAILURE]
                                  + [ResultKind.PROCESSING] * 2),
                  st.sampled_from([False] * 4 + [True]))
STEPS = st.lists(st.one_of(
    ANSWER, ANSWER, ANSWER, ANSWER,
    st.tuples(st.just("timer"), st.integers(0, 2)),
    st.tuples(st.just("cash"), st.sampled_from([True] * 3 + [False])),
    st.tuples(st.just("close"), st.integers(0, 9)),
), min_size=15, max_size=60)


@settings(max_examples=300, deadline=None)
@given(steps=STEPS)
def test_any_sequence_of_provider_answers_pays_only_when_every_async_leg_is_held(
        steps: list[tuple[Any, ...]]) -> None:
    """Success only with every leg confirmed or owed its Confirm; the cash asked for only
    with every leg held; a leg never both confirmed and cancelled, nor cancelled twice; a
    failed or closed order releases every hold it placed."""
    order, now = new_order(), 0
    timer: ArmTimer | None = None
    confirmed: set[int] = set()
    cancelled: set[int] = set()
    ever_held: set[int] = set()
    truly_held: set[int] = set()
    """Legs whose Try the provider answered with a success code: the provider's truth."""

    def apply(event: Any) -> None:
        nonlocal order, timer
        decision = decide(order, event, now_ms=now, policy=ORDER_POLICY)
        order = decision.order
        for effect in decision.effects:
            if isinstance(effect, PayCash):
                assert all(order.leg(n).status is LegStatus.HELD for n in (1, 2)), order.legs
                assert truly_held == {1, 2}, truly_held
            if isinstance(effect, ArmTimer) and effect.timer is TimerKind.VOUCHER_RETRY:
                timer = effect
            if isinstance(effect, ConfirmHold):
                confirmed.add(effect.leg_no)
            if isinstance(effect, CancelHold):
                cancelled.add(effect.leg_no)
        for t in decision.transitions:
            if t.entity.startswith("leg:") and t.to_state == LegStatus.HELD.value:
                ever_held.add(int(t.entity[4:]))
            if t.entity.startswith("leg:") and t.to_state == LegStatus.CANCELLING.value:
                assert t.from_state in ("trying", "held"), t  # released once, never after
        assert not confirmed & cancelled, (confirmed, cancelled)

    apply(Activate())
    for step in steps:
        if step[0] == "answer":
            _, leg_no, kind, stale = step
            leg = order.leg(leg_no)
            op = _EXPECTED.get(leg.status, ProviderOp.TRY)
            if stale:
                op = random.Random(leg_no).choice([o for o in ProviderOp if o is not op])
            if op is ProviderOp.TRY and kind is ResultKind.SUCCESS:
                truly_held.add(leg_no)
            command = PendingCommand("t", op, "o1", leg_no, order.fence_of(leg), "r", 100, 9)
            result = next_step(command, kind, schedule_ms=(5,), now_ms=now)
            ok = bool(result.ok)
            apply(VoucherReply(leg_no, order.fence_of(leg), _VOUCHER_OP[op], ok,
                               retryable=result.unknown))
        elif step[0] == "timer" and step[1] == 0 and timer is not None:
            now = max(now, timer.due_at_ms)
            apply(TimerFired(TimerKind.VOUCHER_RETRY, timer.token))
        elif step[0] == "cash" and order.state is OrderState.PAYING:
            kind = ResultKind.SUCCESS if step[1] else ResultKind.FAILURE
            apply(CashResult(kind, ResultSource.NOTIFICATION, "SUCCESS" if step[1] else
                             "PAYERROR", "tx-1" if step[1] else None, 800 if step[1] else None))
        elif step[0] == "close" and step[1] == 0:  # rare: a user's close
            with contextlib.suppress(IllegalTransition):
                apply(CloseOrder(CloseCause.USER))
    legs = [order.leg(n).status for n in (1, 2)]
    event(order.state.value)
    if order.state is OrderState.SUCCEEDED:
        assert ever_held == {1, 2}
        assert all(s in (LegStatus.CONFIRMING, LegStatus.CONFIRMED, LegStatus.CONFIRM_UNKNOWN,
                         LegStatus.CONFIRM_FAILED) for s in legs), legs
    if order.state in (OrderState.FAILED, OrderState.CLOSED):
        for n in ever_held:
            assert n in cancelled and order.leg(n).status in (
                LegStatus.CANCELLING, LegStatus.CANCELLED, LegStatus.RELEASE_UNKNOWN,
                LegStatus.RELEASE_FAILED), legs
        assert not confirmed


# ---------------------------------------------------------------------- configuration


def test_providers_load_from_toml_with_their_code_tables_and_schedule() -> None:
    carrier = object()
    (provider,) = load_providers(SIM_PROVIDERS_TOML, {"carrier-x": carrier})  # type: ignore[dict-item]
    assert provider.name == "carrier-x" and provider.unit == "CNY"
    assert provider.minor_per_unit is None
    assert provider.query_schedule_ms == (300, 600, 1_200, 2_400)
    assert provider.codes.try_.success == frozenset({"HELD", "CONFIRMED"})
    assert provider.transport is carrier


@pytest.mark.parametrize(("text", "key"), [
    (SIM_PROVIDERS_TOML.replace('unit = "CNY"', 'unit = "CNY"\ncolour = 1'),
     "providers.carrier-x.colour"),
    (SIM_PROVIDERS_TOML.replace("[300, 600, 1200, 2400]", "[0]"),
     "providers.carrier-x.query_schedule_ms"),
    (SIM_PROVIDERS_TOML.replace('success = ["CONFIRMED"]', 'success = ["CONFIRMED", "REFUSED"]'),
     "providers.carrier-x.codes.confirm"),
    (SIM_PROVIDERS_TOML.replace("[providers.carrier-x.codes.cancel]", "[providers.carrier-x.x]"),
     "providers.carrier-x.x"),
    (SIM_PROVIDERS_TOML.replace("[providers.carrier-x]", '[providers."carrier:x"]'),
     "providers.carrier:x"),
])
def test_a_wrong_provider_setting_is_a_config_error_naming_its_key(text: str, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_providers(text, {"carrier-x": object(), "carrier:x": object()})  # type: ignore[dict-item]
    assert caught.value.key == key


def test_a_provider_without_a_transport_or_a_transport_without_a_provider_is_refused() -> None:
    with pytest.raises(ConfigError, match="no transport"):
        load_providers(SIM_PROVIDERS_TOML, {})
    with pytest.raises(ConfigError, match="does not declare"):
        load_providers(SIM_PROVIDERS_TOML, {"carrier-x": object(), "y": object()})  # type: ignore[dict-item]


def test_engine_open_refuses_a_provider_whose_queries_outlast_the_voucher_retries(
        tmp_path: Path) -> None:
    scheduler = Scheduler(1)
    carrier = SimulatedProvider("carrier-x", SimWorld(scheduler), random.Random(1),
                                ProviderFaults(), "s", lambda: None)
    providers = load_providers(SIM_PROVIDERS_TOML, {"carrier-x": carrier})
    short = OrderPolicy(voucher_retry_schedule_ms=(100, 200), hold_grace_ms=60_000)
    with pytest.raises(InvalidRequest, match="voucher retry schedule"):
        Engine.open(tmp_path / "x.db", channels=[ScriptedChannel()],  # type: ignore[list-item]
                    policy=short, providers=providers)
    with pytest.raises(InvalidRequest, match="try_hold"):
        Engine.open(tmp_path / "y.db", channels=[ScriptedChannel()],  # type: ignore[list-item]
                    providers=[object()])


# ---------------------------------------------------------------------- the simulated carrier


def test_the_carriers_cancel_before_its_try_is_an_empty_rollback_that_refuses_the_late_try(
        ) -> None:
    carrier = SimulatedProvider("carrier-x", SimWorld(Scheduler(1)), random.Random(1),
                                ProviderFaults(), "s", lambda: None)
    carrier.fund("138", 500)
    assert carrier.cancel("t-1") == ProviderReply("OK", "EMPTY_ROLLBACK")
    assert carrier.try_hold("t-1", "138", 100, "CNY") == ProviderReply("OK", "EMPTY_ROLLBACK")
    assert carrier.accounts["138"] == [500, 500, 0, 0]
    assert carrier.try_hold("t-2", "138", 100, "CNY").result_code == "HELD"
    assert carrier.try_hold("t-2", "138", 100, "CNY").result_code == "HELD"  # idempotent
    assert carrier.confirm("t-2").result_code == "CONFIRMED"
    assert carrier.cancel("t-2").result_code == "CONFIRMED"  # too late: a failure code
    assert carrier.accounts["138"] == [500, 400, 0, 100]
    assert carrier.unbalanced() == []
    body, headers = carrier.signed_callback("t-2", "try", "HELD")
    assert carrier.verify_callback(body, headers).op is ProviderOp.TRY
    with pytest.raises(ValueError, match="signature"):
        carrier.verify_callback(body + b" ", headers)



# ---------------------------------------------------------------------- the README


README = Path(__file__).resolve().parent.parent / "README.md"


def readme_section() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index("### External voucher providers")
    return text[start:text.index("\n### ", start + 10)]


def test_the_readme_configuration_is_the_simulated_carriers() -> None:
    match = re.search(r"```toml\n(.*?)```", readme_section(), re.S)
    assert match is not None
    assert parse_providers(tomllib.loads(match.group(1))) == parse_providers(
        tomllib.loads(SIM_PROVIDERS_TOML))


def test_the_readme_example_runs_as_written(capsys: pytest.CaptureFixture[str]) -> None:
    (block,) = re.findall(r"```python\n(.*?)```", readme_section(), re.S)
    exec(compile(block, "README.md", "exec"), {"__name__": "readme_example"})
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == ["succeeded ['paid', 'confirmed', 'confirmed']", "[500, 300, 0, 200]"]
    assert out[2].startswith("['request', 'call', ") and len(out) == 3  # then a query or
    # the callback, whichever real time brought first
