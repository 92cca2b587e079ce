"""The deterministic simulator: reproducible, deadlock-aware, and its oracle has teeth."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from payengine.actors.directory import Directory
from payengine.engine.order import PLANTABLE_BUGS
from payengine.sim.cli import main
from payengine.sim.runtime import Deadlock, Scheduler, SimRuntime
from payengine.sim.simulation import FAULT_KINDS, SimConfig, run, run_many


def test_the_same_seed_gives_the_same_run_and_the_same_trace_hash() -> None:
    first = run(SimConfig(seed=11, orders=120))
    second = run(SimConfig(seed=11, orders=120))
    assert first.trace_hash == second.trace_hash
    assert first.final_states == second.final_states
    assert first.faults == second.faults
    assert first.virtual_seconds == second.virtual_seconds


def test_seeds_run_in_worker_processes_give_the_same_results_in_the_same_order() -> None:
    configs = [SimConfig(seed=seed, orders=40) for seed in range(70, 75)]
    alone = [r.as_json() for r in run_many(configs, jobs=1)]
    side_by_side = [r.as_json() for r in run_many(configs, jobs=2)]
    for line in alone + side_by_side:
        del line["wall_seconds"]
    assert side_by_side == alone
    assert [line["seed"] for line in alone] == list(range(70, 75))


def test_a_sweep_stopped_early_kills_the_runs_nobody_will_read() -> None:
    configs = [SimConfig(seed=0, orders=20)] + [SimConfig(seed=seed, orders=20_000)
                                                for seed in range(1, 10_000)]
    results = run_many(iter(configs), jobs=2)
    first = next(results)
    started = time.monotonic()
    results.close()  # must not run, or wait for, the other 9,999 (big ones, each minutes)
    assert time.monotonic() - started < 20
    assert first.seed == 0 and first.ok


def test_different_seeds_give_different_runs() -> None:
    hashes = {run(SimConfig(seed=seed, orders=60)).trace_hash for seed in range(5)}
    assert len(hashes) == 5


def test_a_run_without_faults_has_no_crash_and_every_order_settles() -> None:
    result = run(SimConfig(seed=3, orders=80, faults=frozenset()))
    assert result.ok, result.violations
    assert result.crashes == 0 and result.fault_mix == []
    # 80 trade orders; the ones paid again (workload, not a fault) add their attempts, the
    # recharges and transfers (``sim.beneficiary``) theirs (a retry counts again), the
    # quoting terminals (``sim.quotes``) their orders
    assert 80 <= sum(result.final_states.values()) <= 80 + _extra_orders(result.faults)
    assert result.faults.get("quoted_order", 0) >= 10


class _Asker:
    """A behaviour that (wrongly) waits on another actor inside its handler."""

    def __init__(self, directory: Directory, target: tuple[str, str]) -> None:
        self.directory, self.target = directory, target

    def on_start(self) -> None: ...

    def on_stop(self) -> None: ...

    def on_message(self, message: Any) -> Any:
        return self.directory.ask(self.target, "ping", 1.0)


def test_an_ask_inside_a_handler_is_reported_as_a_deadlock_naming_both_actors() -> None:
    scheduler = Scheduler(seed=1)
    runtime = SimRuntime(scheduler)
    behaviours: dict[tuple[str, str], Any] = {}
    directory = Directory(runtime, lambda key, kept: behaviours[key])
    behaviours[("a", "1")] = _Asker(directory, ("b", "2"))
    behaviours[("b", "2")] = _Asker(directory, ("a", "1"))
    directory.tell(("a", "1"), "go")
    with pytest.raises(Deadlock, match=r"a:1.*b:2"):
        scheduler.run_until_idle()


@pytest.mark.parametrize("bug", sorted(PLANTABLE_BUGS))
def test_each_planted_bug_is_caught_by_a_default_run(
    bug: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["sim", "--plant-bug", bug, "--json"]) == 1
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["violations"], f"planted bug {bug} went unnoticed"
    assert line["plant_bug"] == bug


def test_a_sweep_of_100_seeds_with_every_fault_finds_no_violation(
    capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["sim", "--seed", "1000", "--seeds", "100", "--orders", "120", "--json",
                 "--jobs", "0"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    failures = [(line["seed"], line["violations"][:2]) for line in lines if line["violations"]]
    assert code == 0, failures
    assert [line["seed"] for line in lines] == list(range(1000, 1100))
    assert sum(line["crashes"] for line in lines) > 50  # crashes really happened
    seen = {kind for line in lines for kind in line["fault_mix"]}
    assert seen == set(FAULT_KINDS)


def test_the_json_line_has_the_promised_fields(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sim", "--seed", "4", "--orders", "50", "--json"]) == 0
    line = json.loads(capsys.readouterr().out)
    for key in ("seed", "orders", "trace_hash", "violations", "final_states", "faults",
                "crashes", "virtual_seconds", "wall_seconds"):
        assert key in line
    assert line["seed"] == 4 and line["orders"] == 50 and line["violations"] == []


def test_a_violation_prints_the_seed_the_trace_and_the_replay_command(
    capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["sim", "--seed", "2", "--plant-bug", "regress-success"]) == 1
    err = capsys.readouterr().err
    assert "seed 2: first violation:" in err
    assert "replay: payengine sim --seed 2 --orders 200 --faults all --crashes 2 " \
           "--runtime sim --plant-bug regress-success" in err


def test_unknown_faults_are_refused_with_a_usage_error(
    capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["sim", "--faults", "cosmic-rays"]) == 2
    assert "unknown fault" in capsys.readouterr().err


@pytest.mark.parametrize("jobs", ["-1", "65"])
def test_a_bad_jobs_count_is_refused_with_a_usage_error(
    jobs: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["sim", "--seeds", "2", "--jobs", jobs]) == 2
    assert "--jobs 0..64" in capsys.readouterr().err


def test_the_threads_runtime_runs_the_same_workload_under_the_same_oracle() -> None:
    result = run(SimConfig(seed=1, orders=60, runtime="threads"))
    assert result.ok, result.violations
    # every order number has its order (some more than one: a new attempt after a failure),
    # but those the risk gate refused every submit of
    blocked = result.faults.get("orders_blocked_by_risk", 0)
    assert 60 <= sum(result.final_states.values()) + blocked <= 60 + _extra_orders(
        result.faults)


class _PowerLoss(BaseException):
    """Stands for the simulator's crash: a BaseException raised inside a handler."""


class _Crasher:
    def on_start(self) -> None: ...

    def on_stop(self) -> None: ...

    def on_message(self, message: Any) -> Any:
        raise _PowerLoss


def test_a_crash_inside_a_handler_answers_its_asker_as_a_dead_actor() -> None:
    import pykka

    scheduler = Scheduler(seed=1)
    runtime = SimRuntime(scheduler)
    ref = runtime.spawn("order:1", _Crasher())
    future = ref.ref.ask("anything", block=False)  # type: ignore[attr-defined]
    with pytest.raises(_PowerLoss):  # the crash escapes the step, to the simulator ...
        scheduler.run_until_idle()
    with pytest.raises(pykka.ActorDeadError):  # ... and whoever waits is told, never hangs
        future.get(timeout=0)


def _extra_orders(faults: dict[str, int]) -> int:
    """Orders a run makes besides its payments' first attempts: at most one per count."""
    return sum(faults.get(kind, 0) for kind in ("pay_again", "recharge", "transfer",
                                                "quoted_order", "preauth",
                                                "pay_again_at_once"))


def test_a_merchant_that_never_accepts_a_notification_is_a_violation() -> None:
    from payengine.sim.simulation import Simulation

    simulation = Simulation(SimConfig(seed=3, orders=30, faults=frozenset()))
    simulation.merchant.down = lambda: 1.0
    result = simulation.run()
    assert {v.invariant for v in result.violations} == {"merchant-notified"}
    # every payment, every recharge (the merchant's too; a retry counts again), every
    # order of the quoting terminals and every pump pre-authorisation
    assert 30 + result.faults.get("quoted_order", 0) <= len(result.violations) <= (
        30 + result.faults.get("recharge", 0) + result.faults.get("quoted_order", 0)
        + result.faults.get("preauth", 0))


def test_an_exception_in_a_seed_is_that_seeds_violation_not_the_end_of_the_batch(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    from payengine.sim.simulation import Simulation

    def broken(self: Simulation, deadline_ms: int) -> None:
        raise RuntimeError("planted harness failure")

    monkeypatch.setattr(Simulation, "_reconcile", broken)
    result = run(SimConfig(seed=3, orders=20, faults=frozenset()))
    assert [v.invariant for v in result.violations] == ["run-completes"]
    assert "planted harness failure" in result.violations[0].detail


def test_work_still_scheduled_after_the_quiet_phase_deadline_is_a_violation(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    import payengine.sim.simulation

    monkeypatch.setattr(payengine.sim.simulation, "QUIET_PHASE_MAX_MS", 1)  # as if a timer looped
    result = run(SimConfig(seed=3, orders=20, faults=frozenset()))
    assert "quiet-phase-ends" in {v.invariant for v in result.violations}


def test_pre_holds_play_every_story_and_each_ends_as_it_should() -> None:
    result = run(SimConfig(seed=2, orders=120, faults=frozenset({"pre-holds"})))
    assert result.ok, result.violations
    assert result.fault_mix == ["pre-holds"]
    counts = result.faults
    for kind in ("pre_hold", "pre_hold_retry", "pre_hold_released", "untick_race",
                 "pre_hold_refused", "pre_hold_refused:insufficient_balance",
                 "pre_hold_posted", "pre_hold_voided", "pre_hold_expired",
                 "pre_hold_empty_rollback", "pre_held_order_failed"):
        assert counts.get(kind, 0) > 0, f"no {kind} in {counts}"


def test_late_user_closes_of_paid_orders_are_refused_and_never_undo_the_payment() -> None:
    result = run(SimConfig(seed=4, orders=120, faults=frozenset({"late-close", "user-pays-late"})))
    assert result.ok, result.violations
    assert result.faults["late_close_refused_paid"] > 0
    assert result.faults.get("late_close_closed", 0) + result.faults.get("late_close_failed", 0)


def test_the_pre_hold_oracle_sees_a_hold_not_given_back_and_one_acknowledged_then_lost(
    tmp_path: Any
) -> None:
    from payengine import Engine, HoldRefused
    from payengine.actors.runtime import ThreadRuntime
    from payengine.sim.channel import ChannelFaults, SimulatedChannel
    from payengine.sim.oracle import Fate, PreHoldPlan, check_pre_holds

    world = ThreadRuntime()
    engine = Engine.open(tmp_path / "holds.db", channels=[SimulatedChannel(
        "wechat", world, seed=1, faults=ChannelFaults.none())])
    try:
        engine.open_account("u/pts", "POINTS", minor_per_unit=10)
        engine.fund("u/pts", 100, funding_id="f1")
        engine.pre_hold("u/pts", 10, hold_id="kept", ttl_ms=60_000)  # "abandoned", not expired
        engine.release_hold("u/pts", "raced")  # the untick overtakes the tick ...
        with pytest.raises(HoldRefused):
            engine.pre_hold("u/pts", 10, hold_id="raced")  # ... which is refused
        engine.pre_hold("u/pts", 10, hold_id="unticked")
        engine.release_hold("u/pts", "unticked")
        plans = [PreHoldPlan("u/pts", "kept", 10, Fate.ABANDONED, placed=True),
                 PreHoldPlan("u/pts", "raced", 10, Fate.RACE, refused="hold_refused"),
                 PreHoldPlan("u/pts", "unticked", 10, Fate.RELEASED, placed=True,
                             released=True),
                 PreHoldPlan("u/pts", "lost", 10, Fate.ABANDONED, placed=True)]
        violations, counts = check_pre_holds(engine.store, plans)
    finally:
        engine.shutdown()
        world.shutdown()
    assert {(v.invariant, v.subject) for v in violations} == {
        ("pre-hold-given-back", "pre-hold u/pts/kept"),
        ("acknowledged-pre-hold-survives", "pre-hold u/pts/lost")}
    assert counts["pre_hold_empty_rollback"] == 1 and counts["pre_hold_voided"] == 1


def test_bench_prints_its_figures_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--payments", "30", "--workers", "4", "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["payments"] == figures["settled"] == 30
    assert figures["commits_per_payment"] > 0 and figures["rows_per_payment"] > 0
    assert figures["settled_p99_ms"] >= figures["settled_p50_ms"] > 0
    assert figures["offered_per_s"] is None and figures["peak_threads"] > 1


def test_bench_refuses_a_bad_number_as_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--payments", "0"]) == 2
    assert "--payments" in capsys.readouterr().err


def test_bench_open_orders_holds_them_and_times_the_reopen(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--open-orders", "20", "--workers", "4", "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["open_orders"] == figures["accepted"] == 20
    assert figures["threads"] < 64  # a pool of actor threads, not one per order
    assert figures["reopen_s"] >= figures["reopen_returned_s"] > 0


class _Releaser:
    """Lets its own actor go after each message, as an idle order or account does."""

    def __init__(self) -> None:
        self.ref: Any = None
        self.handled: list[Any] = []
        self.stops = 0

    def on_start(self) -> None: ...

    def on_stop(self) -> None:
        self.stops += 1

    def on_message(self, message: Any) -> Any:
        self.handled.append(message)
        self.ref.stop()


def test_an_actor_its_own_handler_lets_go_stops_without_a_step_of_its_own() -> None:
    scheduler = Scheduler(seed=1)
    runtime = SimRuntime(scheduler)
    behaviour = _Releaser()
    behaviour.ref = runtime.spawn("order:1", behaviour)
    behaviour.ref.tell("one")
    assert scheduler.step() and not behaviour.ref.alive  # stopped with that step
    assert behaviour.stops == 1 and scheduler.idle()
    # Messages already queued are handled first, as behind pykka's stop message.
    queued = _Releaser()
    queued.ref = runtime.spawn("order:2", queued)
    queued.ref.tell("a")
    queued.ref.tell("b")
    scheduler.run_until_idle()
    assert queued.handled == ["a", "b"] and queued.stops == 1 and not queued.ref.alive


def test_the_simulated_wallets_come_from_a_channel_configuration(tmp_path: Any) -> None:
    """The loader, the code tables and the simulated kind run in every seed; the oracle
    checks the tables against what the wallet means by each code."""
    from payengine.sim.oracle import check_code_tables
    from payengine.sim.simulation import Simulation

    sim = Simulation(SimConfig(seed=1, orders=1, db_dir=str(tmp_path)))
    assert sim.channel.config is not None and sim.channel.config.merchant_no == "sim-wechat-0001"
    assert sim.alipay.config is not None and sim.alipay.config.wallet == "alipay"
    assert sim.alipay.txn_prefix == "A"
    assert check_code_tables(sim.channels) == []
    bugged = Simulation(SimConfig(seed=1, orders=1, db_dir=str(tmp_path),
                                  plant_bug="codes-processing-as-failure"))
    found = check_code_tables(bugged.channels)
    assert {v.subject for v in found} == {"channel wechat", "channel alipay"}
    assert any("USERPAYING as failure" in v.detail for v in found)
