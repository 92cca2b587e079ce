"""README runnable examples, and the simulator's planted bugs / --help."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
PY_BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)
ENV = dict(os.environ, PYTHONPATH=str(ROOT))


def _block(starting: str) -> str:
    matches = [b for b in PY_BLOCKS if starting in b and b.lstrip().startswith("import tempfile")]
    assert matches, starting
    return matches[0]


def _run(code: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "example.py"
    script.write_text(code)
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          env=ENV, cwd=tmp_path)


def test_main_example_runs_as_written(tmp_path: Path) -> None:
    # "This example runs as it is"
    result = _run(_block("pump3-000187"), tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("succeeded ")
    assert "refused:" in lines[1]
    assert "funded=500" in lines[2] and "available=480" in lines[2] and "spent=20" in lines[2]
    # print(refund.status, refund.parts)            # succeeded ((0, 5000, 'done'),)
    assert lines[3] == "succeeded ((0, 5000, 'done'),)"
    assert "'merchant:station-42': 5000" in lines[4] and "'payer:wechat': -4600" in lines[4]


def test_signed_requests_example_runs_as_written(tmp_path: Path) -> None:
    # "`payengine.MerchantSigner` builds and signs requests ...: this runs as it is"
    result = _run(_block("pump3-000188"), tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "replayed_nonce"
    assert lines[2] == "{'replayed_nonce': 1}"


def test_risk_example_runs_as_written(tmp_path: Path) -> None:
    # "This runs as it is:" (Risk)
    result = _run(_block("send_sms_code"), tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "risk_blocked blocked_user",
        "needs_verification",
        "verification_failed 2",
        "succeeded passed",
    ]


PLANTED = [
    "confirm-twice", "no-refund-after-close", "regress-success", "skip-hold", "over-refund",
    "ledger-unbalanced", "accept-wrong-channel", "trust-forged-notification", "holds-never-expire",
    "sentinel-gives-up", "pay-details-lost", "route-ignores-limits", "two-attempts-succeed",
    "codes-processing-as-failure", "accept-bad-signature", "risk-ignored",
    "withhold-retry-after-timeout", "quote-price-drift", "shift-counts-unpaid",
    "change-keeps-holds", "open-without-needed-channel", "credit-before-charge",
    "route-after-charge", "metrics-double-count", "notify-acks-refusals",
    "attention-misses-owed", "async-leg-ignored", "capture-above-authorisation",
    "notify-acks-unbelieved", "capture-amount-believed", "open-with-non-authorising-channel",
]


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "payengine.sim.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=ENV, cwd=ROOT)


def test_readme_lists_every_planted_bug_the_cli_takes() -> None:
    # "`--plant-bug NAME` (`confirm-twice`, ... `risk-ignored` ...)"
    for name in PLANTED:
        assert f"`{name}`" in README
    help_text = _cli("sim", "--help").stdout
    listed = re.search(r"--plant-bug \{([^}]*)\}", help_text)
    assert listed is not None
    assert set(listed.group(1).split(",")) == set(PLANTED)


@pytest.mark.parametrize("bug", PLANTED)
def test_planted_bug_is_caught(bug: str) -> None:
    # "switches on a deliberately wrong behaviour to show the oracle catches it"
    # "Exit status 0 if and only if no invariant was violated. On a violation it prints the seed,
    #  the first violated invariant ... and the command that replays it."
    result = _cli("sim", "--seed", "0", "--plant-bug", bug)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    out = result.stdout + result.stderr
    assert "replay: payengine sim --seed 0" in out
    assert f"--plant-bug {bug}" in out


def test_sim_without_bug_passes_same_seed() -> None:
    # "Exit status 0 if and only if no invariant was violated."
    result = _cli("sim", "--seed", "0", "--orders", "60")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


def test_sim_help_exits_zero_and_names_options() -> None:
    # payengine sim --seed S --orders N [--seeds K] [--faults all|none|NAME,NAME] [--crashes N]
    #               [--runtime sim|threads] [--plant-bug NAME] [--jobs J] [--json]
    result = _cli("sim", "--help")
    assert result.returncode == 0
    for opt in ("--seed", "--orders", "--seeds", "--faults", "--crashes", "--runtime", "--plant-bug",
                "--jobs", "--json"):
        assert opt in result.stdout
    flat = re.sub(r"-\n\s+", "-", result.stdout)
    for fault in ("forged-request", "risk", "pre-holds", "late-close", "merchant-down"):
        assert fault in flat


def test_sim_new_faults_alone_pass() -> None:
    # "Exit status 0 if and only if no invariant was violated." with the new faults on
    faults = "risk,forged-request,pre-holds,late-close"
    result = _cli("sim", "--seed", "3", "--orders", "60", "--faults", faults)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


def test_sim_json_with_planted_bug() -> None:
    # "`--json` prints one object per seed (`seed, orders, trace_hash, violations, final_states, faults,
    #  crashes, virtual_seconds, wall_seconds, …`)"
    import json

    result = _cli("sim", "--seed", "0", "--plant-bug", "risk-ignored", "--json")
    assert result.returncode == 1
    objects = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(objects) == 1
    record = objects[0]
    for key in ("seed", "orders", "trace_hash", "violations", "final_states", "faults", "crashes",
                "virtual_seconds", "wall_seconds"):
        assert key in record
    assert record["violations"]


def test_sim_same_seed_same_trace() -> None:
    # "The same seed gives the same run (`trace_hash`)."
    import json

    runs = [_cli("sim", "--seed", "5", "--orders", "40", "--faults", "risk,forged-request", "--json")
            for _ in range(2)]
    hashes = [json.loads(r.stdout.splitlines()[-1])["trace_hash"] for r in runs]
    assert hashes[0] == hashes[1]
