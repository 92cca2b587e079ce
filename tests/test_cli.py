"""The ``payengine`` command line on click: options, exit statuses, JSON, operator commands,
progress bars (README "Command line", "Operator tools")."""

from __future__ import annotations

import io
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from payengine.engine.order import PLANTABLE_BUGS
from payengine.persistence.store import Store
from payengine.sim import progress as progress_module
from payengine.sim.cli import cli, main
from tests.test_operator_tools import _doubtful_db, _insert

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ["demo", "sim", "bench", "show", "report", "reconcile", "orders", "attention",
            "resolve"]


def run(*args: str) -> click.testing.Result:
    return CliRunner().invoke(cli, list(args))


@pytest.mark.parametrize("command", [[c] for c in COMMANDS] + [["report", "shift"]])
def test_every_command_answers_help_with_exit_status_zero(command: list[str]) -> None:
    result = run(*command, "--help")
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"Usage: payengine {' '.join(command)}")


@pytest.mark.parametrize("command", [["show", "x"], ["report", "shift", "--station", "s",
                                                     "--shift", "a"], ["orders"], ["attention"],
                                     ["resolve", "needs_reconciliation:x", "acknowledge",
                                      "--operator", "o", "--reason", "r"]])
def test_every_command_reading_a_database_takes_db_config_and_json(
        command: list[str], tmp_path: Path) -> None:
    help_text = run(*command[:2 if command[0] == "report" else 1], "--help").output
    for option in ("--db", "--config", "--json"):
        assert option in help_text
    result = run(*command, "--db", str(tmp_path / "none.db"))
    assert result.exit_code == 2
    name = " ".join(command[:2] if command[0] == "report" else command[:1])
    assert result.stderr == f"payengine {name}: no database at {tmp_path / 'none.db'}\n"


def test_a_usage_error_exits_two_and_an_unknown_planted_bug_is_refused() -> None:
    assert run("sim", "--plant-bug", "no-such-bug").exit_code == 2
    assert run("sim", "--orders", "0").exit_code == 2
    assert run("sim", "--faults", "nonsense").stderr.startswith("payengine sim: unknown fault")
    assert run("no-such-command").exit_code == 2
    assert main(["sim", "--orders", "0"]) == 2


def test_the_sim_help_lists_every_planted_bug_in_braces() -> None:
    text = run("sim", "--help").output
    listed = text.split("--plant-bug {", 1)[1].split("}", 1)[0]
    assert set(listed.split(",")) == set(PLANTABLE_BUGS)


def test_the_config_files_engine_db_is_the_default_database_and_the_command_line_wins(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # engine.db is relative to the working directory, as serve's
    _doubtful_db(tmp_path / "from-config.db", 1)
    config = tmp_path / "payengine.toml"
    config.write_text('[engine]\ndb = "from-config.db"\n[service]\nport = 8080\n')
    result = run("attention", "--config", str(config), "--json")
    assert result.exit_code == 1
    assert json.loads(result.stdout)["counts"] == {"amount_mismatch": 1}
    other = run("attention", "--config", str(config), "--db", str(tmp_path / "x.db"))
    assert other.exit_code == 2 and "no database at" in other.stderr
    config.write_text("[engine]\ndb = 5\n")
    bad = run("orders", "--config", str(config))
    assert (bad.exit_code, bad.stderr) == (
        2, f"payengine orders: --config {config}: engine.db must be a non-empty string (a file "
           "path)\n")


def test_orders_prints_one_json_page_with_the_cursor_of_the_next(tmp_path: Path) -> None:
    db = tmp_path / "o.db"
    Store(db).close()
    _insert(db, [{"order_id": f"o{i}", "merchant_id": "m1", "user_id": "u1" if i % 2 else "u2",
                  "station_id": None, "channel": "wechat", "at": 1_000 + i, "total": 100 + i,
                  "state": "succeeded"} for i in range(5)])
    first = run("orders", "--db", str(db), "--user", "u2", "--limit", "2", "--json")
    assert first.exit_code == 0
    page = json.loads(first.stdout)
    assert [o["order_id"] for o in page["orders"]] == ["o0", "o2"]
    assert page["next_after"] == "1002:o2"
    assert page["orders"][0] == {
        "order_id": "o0", "merchant_id": "m1", "merchant_order_no": "o0", "user_id": "u2",
        "state": "succeeded", "cause": "test", "total_minor": 100, "currency": "CNY",
        "created_at_ms": 1000, "settled": False, "station_id": None, "channel": "wechat"}
    second = json.loads(run("orders", "--db", str(db), "--user", "u2", "--limit", "2",
                            "--after", page["next_after"], "--json").stdout)
    assert (second["orders"][0]["order_id"], second["next_after"]) == ("o4", None)
    since = json.loads(run("orders", "--db", str(db), "--since", "1970-01-01T00:00:01.003Z",
                           "--json").stdout)
    assert [o["order_id"] for o in since["orders"]] == ["o3", "o4"]
    text = run("orders", "--db", str(db), "--limit", "1").stdout.splitlines()
    assert text[-1] == "1 orders; next page: --after 1000:o0"
    bad = run("orders", "--db", str(db), "--since", "yesterday")
    assert bad.exit_code == 2 and bad.stderr.startswith("payengine orders: --since: ")
    assert run("orders", "--db", str(db), "--state", "lost").exit_code == 2


def test_attention_and_resolve_work_on_a_file_and_journal_who_and_why(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    _doubtful_db(db, 2)
    listed = run("attention", "--db", str(db), "--json")
    assert listed.exit_code == 1
    queue = json.loads(listed.stdout)
    assert [i["item_id"] for i in queue["items"]] == ["amount_mismatch:nr0",
                                                      "needs_reconciliation:nr1"]
    assert queue["items"][0]["kind"] == "amount_mismatch"
    assert queue["counts"] == {"amount_mismatch": 1, "needs_reconciliation": 1}
    refused = run("resolve", "needs_reconciliation:nr1", "retry", "--db", str(db),
                  "--operator", "anna", "--reason", "x")
    assert refused.exit_code == 1
    assert refused.stderr.startswith("payengine resolve: action_not_applicable: ")
    unknown = run("resolve", "needs_reconciliation:zz", "acknowledge", "--db", str(db),
                  "--operator", "anna", "--reason", "x")
    assert unknown.exit_code == 1 and "unknown_attention_item" in unknown.stderr
    assert run("resolve", "needs_reconciliation:nr1", "acknowledge", "--db", str(db),
               "--operator", "anna").exit_code == 2  # --reason is required
    for _ in range(2):
        for item in ("amount_mismatch:nr0", "needs_reconciliation:nr1"):
            done = run("resolve", item, "acknowledge", "--db", str(db), "--operator", "anna",
                       "--reason", "checked the statement", "--json")
            assert done.exit_code == 0, done.output
    record = json.loads(done.stdout)
    assert {k: record[k] for k in ("item_id", "kind", "action", "operator", "reason",
                                   "outcome", "repeated")} == {
        "item_id": "needs_reconciliation:nr1", "kind": "needs_reconciliation",
        "action": "acknowledge", "operator": "anna", "reason": "checked the statement",
        "outcome": "acknowledged", "repeated": True}
    empty = run("attention", "--db", str(db))
    assert (empty.exit_code, empty.stdout) == (0, "0 items\n")
    conn = sqlite3.connect(db)
    rows = conn.execute("SELECT item_id, operator, reason FROM operator_resolutions").fetchall()
    conn.close()
    assert sorted(rows) == [("amount_mismatch:nr0", "anna", "checked the statement"),
                            ("needs_reconciliation:nr1", "anna", "checked the statement")]


def test_the_read_only_commands_read_beside_an_engine_holding_the_file(tmp_path: Path) -> None:
    from payengine import Engine
    from tests.helpers import ScriptedChannel, fuel_request, fund_customer

    engine = Engine.open(tmp_path / "live.db", channels=[ScriptedChannel()])  # type: ignore[list-item]
    try:
        fund_customer(engine)
        receipt = engine.submit(fuel_request("o1"))
        page = json.loads(run("orders", "--db", str(tmp_path / "live.db"), "--json").stdout)
        assert [o["order_id"] for o in page["orders"]] == [receipt.order_id]
        assert run("attention", "--db", str(tmp_path / "live.db")).exit_code == 0
    finally:
        engine.shutdown()


@pytest.mark.parametrize("use_rich", [True, False])
def test_a_progress_bar_draws_on_stderr_only_when_enabled(
        use_rich: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    bar = progress_module.Progress("seeds", 3, force=True, use_rich=use_rich)
    for n in (1, 2, 3):
        bar.show(n, "0 failed")
    bar.finish()
    quiet = progress_module.Progress("seeds", 3, enabled=False, force=True)
    quiet.show(2)
    quiet.finish()
    if use_rich:
        assert "3/3" in err.getvalue() and "seeds" in err.getvalue()
    else:  # click's bar hides itself on a stream that is not a terminal
        assert err.getvalue() in ("", "\n") or "seeds" in err.getvalue()


def _payengine(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "payengine.sim.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_the_cli_in_its_own_process_prints_json_only_on_stdout_and_exits_as_documented(
        tmp_path: Path) -> None:
    db = tmp_path / "p.db"
    _doubtful_db(db, 1)
    listed = _payengine("attention", "--db", str(db), "--json")
    assert listed.returncode == 1
    assert json.loads(listed.stdout)["counts"] == {"amount_mismatch": 1}
    assert listed.stderr == ""
    done = _payengine("resolve", "amount_mismatch:nr0", "acknowledge", "--db", str(db),
                      "--operator", "ops", "--reason", "refunded by hand")
    assert done.returncode == 0
    assert done.stdout.startswith("amount_mismatch:nr0: acknowledged by ops at ")
    assert _payengine("attention", "--db", str(db)).returncode == 0
    simulated = _payengine("sim", "--seed", "0", "--orders", "20", "--seeds", "2", "--json")
    assert simulated.returncode == 0, simulated.stderr[-2000:]
    assert [json.loads(line)["seed"] for line in simulated.stdout.splitlines()] == [0, 1]
    assert simulated.stderr == ""  # no bar: --json, and stderr is not a terminal


def test_shell_completion_is_generated_by_click_for_payengine() -> None:
    done = _payengine(env={"_PAYENGINE_COMPLETE": "bash_source"})
    assert done.returncode == 0
    assert "_PAYENGINE_COMPLETE=bash_complete" in done.stdout
    words = _payengine(env={"_PAYENGINE_COMPLETE": "bash_complete", "COMP_WORDS": "payengine att",
                            "COMP_CWORD": "1"})
    assert "attention" in words.stdout
