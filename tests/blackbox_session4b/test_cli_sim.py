"""The simulator's command line for withholding, channel-down, recharges and planted bugs."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest


def sim(*args: str) -> tuple[int, list[dict[str, Any]]]:
    done = subprocess.run([sys.executable, "-m", "payengine.sim.cli", "sim", *args, "--json"],
                          capture_output=True, text=True, timeout=600, check=False)
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    return done.returncode, lines


def test_sim_with_withhold_faults_prints_one_json_object_per_seed_and_counts_withholdings(
) -> None:
    rc, runs = sim("--seed", "1", "--seeds", "6", "--orders", "60", "--faults", "withhold")
    assert rc == 0
    assert [r["seed"] for r in runs] == [1, 2, 3, 4, 5, 6]
    for run in runs:
        for key in ("seed", "orders", "trace_hash", "violations", "final_states", "faults",
                    "crashes", "virtual_seconds", "wall_seconds"):
            assert key in run
        assert run["violations"] == []
    drawn = [r for r in runs if "withhold" in r["fault_mix"]]
    assert drawn, "no seed of six drew the withhold fault"
    for run in drawn:
        assert run["faults"].get("withhold", 0) > 0
        assert run["faults"].get("withholding_succeeded", 0) \
            + run["faults"].get("withholding_failed", 0) > 0


def test_sim_with_channel_down_runs_clean_and_counts_it() -> None:
    rc, runs = sim("--seed", "1", "--seeds", "6", "--orders", "60", "--faults", "channel-down")
    assert rc == 0
    drawn = [r for r in runs if "channel-down" in r["fault_mix"]]
    assert drawn
    assert all(r["faults"].get("channel_down", 0) > 0 for r in drawn)


def test_the_same_seed_gives_the_same_trace_hash_with_withholdings() -> None:
    _, first = sim("--seed", "4", "--orders", "60", "--faults", "withhold")
    _, second = sim("--seed", "4", "--orders", "60", "--faults", "withhold")
    assert first[0]["trace_hash"] == second[0]["trace_hash"]


@pytest.mark.parametrize("bug,invariant", [
    ("open-without-needed-channel", "reopen-needs-its-channels"),
    ("credit-before-charge", ""),
    ("route-after-charge", "fallback"),
])
def test_a_planted_bug_of_these_sections_is_caught_and_exits_one(bug: str, invariant: str
                                                                  ) -> None:
    rc, runs = sim("--seed", "1", "--orders", "60", "--crashes", "2", "--plant-bug", bug)
    assert rc == 1
    assert runs[0]["ok"] is False
    assert runs[0]["plant_bug"] == bug
    assert runs[0]["violations"]
    assert invariant in json.dumps(runs[0]["violations"])


def test_the_withhold_retry_after_timeout_bug_is_caught_over_a_few_seeds() -> None:
    rc, runs = sim("--seed", "1", "--seeds", "3", "--orders", "200", "--plant-bug",
                   "withhold-retry-after-timeout")
    assert rc == 1
    assert any("withhold" in json.dumps(r["violations"]) for r in runs)


def test_an_unknown_planted_bug_is_refused_with_a_non_zero_exit() -> None:
    done = subprocess.run([sys.executable, "-m", "payengine.sim.cli", "sim", "--seed", "1",
                           "--orders", "5", "--plant-bug", "no-such-bug"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode != 0
