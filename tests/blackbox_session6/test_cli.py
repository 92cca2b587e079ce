"""The command line (README *Command line*): `--help` everywhere, exit statuses, `--json`
outputs that parse, shell completion as documented, `show` and `report shift` read-only."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .support import run_batch, run_cli, run_many, wait_for

COMMANDS = ["demo", "sim", "bench", "show", "report", "report shift", "reconcile", "orders",
            "attention", "resolve", "serve"]


@pytest.fixture(scope="module")
def helps(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("help")
    commands = {"top -h": ["-h"]}
    for command in COMMANDS:
        commands[command] = [*command.split(), "--help"]
        commands[command + " -h"] = [*command.split(), "-h"]
    answers = run_batch([(argv, {}) for argv in commands.values()], cwd=folder)
    results: dict[str, Any] = dict(zip(commands, answers, strict=True))
    results["top"] = run_cli(["--help"], cwd=folder)      # the command itself, once
    return results


@pytest.mark.parametrize("command", ["top", "top -h", *COMMANDS, *[c + " -h" for c in COMMANDS]])
def test_every_command_and_group_answers_help_with_status_0(helps: dict[str, Any], command: str) -> None:
    result = helps[command]
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage: ")


def test_the_top_level_help_lists_every_documented_command(helps: dict[str, Any]) -> None:
    listed = helps["top"].stdout
    for command in ("demo", "sim", "show", "report", "reconcile", "bench", "orders", "attention",
                    "resolve", "serve"):
        assert f"  {command} " in listed, command


def test_serve_help_shows_its_documented_options(helps: dict[str, Any]) -> None:
    text = helps["serve"].stdout
    for option in ("--config", "--db", "--host", "--port"):
        assert option in text


@pytest.fixture(scope="module")
def completions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("complete")
    results: dict[str, Any] = {}
    # the documented line, as bash runs it: the command with the variable set
    results["bash"] = run_cli([], cwd=folder, env={"_PAYENGINE_COMPLETE": "bash_source"})
    asks = {"state": ("payengine orders --state ", 3), "runtime": ("payengine sim --runtime ", 3),
            "action": ("payengine resolve some-item ", 3), "plant": ("payengine sim --plant-bug ", 3),
            "commands": ("payengine ", 1)}
    calls = [([], {"_PAYENGINE_COMPLETE": f"{shell}_source"}) for shell in ("zsh", "fish")]
    calls += [([], {"_PAYENGINE_COMPLETE": "bash_complete", "COMP_WORDS": words, "COMP_CWORD": str(cword)})
              for words, cword in asks.values()]
    answers = run_batch(calls, cwd=folder)
    results["zsh"], results["fish"] = answers[:2]
    for name, answer in zip(asks, answers[2:], strict=True):
        results[name] = [line.split(",", 1)[1] for line in answer.stdout.splitlines() if "," in line]
    return results


@pytest.mark.parametrize("shell, marker", [("bash", "_payengine_completion"),
                                           ("zsh", "#compdef payengine"),
                                           ("fish", "_PAYENGINE_COMPLETE=fish_complete")])
def test_the_documented_completion_script_is_printed_for_each_shell(completions: dict[str, Any], shell: str,
                                                                   marker: str) -> None:
    result = completions[shell]
    assert result.returncode == 0
    assert marker in result.stdout


def test_commands_options_and_choices_complete(completions: dict[str, Any]) -> None:
    assert {"demo", "sim", "serve", "orders", "attention", "resolve"} <= set(completions["commands"])
    assert {"succeeded", "failed", "closed", "needs_reconciliation", "paying"} <= set(completions["state"])
    assert {"sim", "threads"} == set(completions["runtime"])
    assert {"acknowledge", "retry"} == set(completions["action"])
    assert {"metrics-double-count", "notify-acks-refusals", "confirm-twice"} <= set(completions["plant"])


# ---------------------------------------------------------------- reading a database

@pytest.fixture(scope="module")
def paid_db() -> Iterator[dict[str, Any]]:
    """A database with one paid fuel order of shift A at station st-cli (made from Python)."""
    from payengine import CashPart, Engine, FuelLine, FuelSale, PaymentRequest, ThreadRuntime
    from payengine.sim.channel import ChannelFaults, SimulatedChannel
    world = ThreadRuntime()
    wechat = SimulatedChannel("wechat", world, seed=1, faults=ChannelFaults.none())
    folder = Path(tempfile.mkdtemp())
    engine = Engine.open(folder / "cli.db", channels=[wechat])
    wechat.attach(engine)
    sale = FuelSale("st-cli", pump=2, nozzle=1, shift_id="2026-12-01/A",
                    line=FuelLine.by_volume("95", 800, 10_000))
    receipt = engine.submit(PaymentRequest("station-1", "S-1", "alice", "CNY", 80_00, "Fuel",
                                           CashPart(80_00, "wechat"), sale=sale))
    wait_for(lambda: engine.get_order(receipt.order_id).settled)
    engine.shutdown()
    world.shutdown()
    empty = folder / "empty.db"
    empty.write_bytes(b"")
    (folder / "cli.toml").write_text('[engine]\ndb = "cli.db"\n')
    (folder / "bad.toml").write_text("[engine]\ndb = 5\n")
    db = str(folder / "cli.db")
    shift = ["report", "shift", "--station", "st-cli", "--shift", "2026-12-01/A", "--db", db]
    results = run_many({
        "show_json": ["show", receipt.order_id, "--db", db, "--json"],
        "show_text": ["show", receipt.order_id, "--db", db],
        "show_nobody": ["show", "ord_nobody", "--db", db],
        "shift_json": [*shift, "--json"],
        "shift_text": shift,
        "shift_missing_db": ["report", "shift", "--station", "s", "--shift", "a", "--db",
                             str(folder / "nope.db")],
        "shift_empty_db": ["report", "shift", "--station", "s", "--shift", "a", "--db", str(empty)],
        "shift_folder_db": ["report", "shift", "--station", "s", "--shift", "a", "--db", str(folder)],
        "orders_missing_db": ["orders", "--db", str(folder / "nope.db")],
        "attention_empty": ["attention", "--db", db, "--json"],
        "unknown_option": ["orders", "--colour", "red", "--db", db],
        "config_db": ["orders", "--config", "cli.toml", "--json"],
        "bad_config": ["orders", "--config", "bad.toml"],
        "demo_json": ["demo", "--orders", "12", "--json", "--db", str(folder / "demo.db")],
    }, cwd=folder)
    yield {"results": results, "receipt": receipt, "folder": folder, "empty": empty}


def test_show_json_is_one_object_naming_the_order(paid_db: dict[str, Any]) -> None:
    result = paid_db["results"]["show_json"]
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert paid_db["receipt"].order_id in json.dumps(shown)
    assert paid_db["results"]["show_text"].returncode == 0


def test_show_of_an_order_nobody_has_exits_1(paid_db: dict[str, Any]) -> None:
    assert paid_db["results"]["show_nobody"].returncode == 1


def test_report_shift_json_has_the_shift_report_fields_and_its_money_adds_up(paid_db: dict[str, Any]) -> None:
    result = paid_db["results"]["shift_json"]
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["station_id"], report["shift_id"]) == ("st-cli", "2026-12-01/A")
    assert {"orders_by_state", "litres_ml_by_grade", "totals", "orders"} <= set(report)
    assert report["orders_by_state"] == {"succeeded": 1}
    assert report["litres_ml_by_grade"] == {"95": 10_000}
    totals = report["totals"]["CNY"]
    assert (totals["paid_orders"], totals["paid_minor"]) == (1, 80_00)
    assert sum(totals["collected_by_method"].values()) == (
        totals["merchant_net_minor"] + totals["fees_minor"] + totals["in_transit_minor"])
    assert paid_db["results"]["shift_text"].returncode == 0


@pytest.mark.parametrize("name", ["shift_missing_db", "shift_empty_db", "shift_folder_db",
                                  "orders_missing_db", "unknown_option", "bad_config"])
def test_a_missing_or_foreign_database_or_a_usage_error_exits_2(paid_db: dict[str, Any], name: str) -> None:
    result = paid_db["results"][name]
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stdout == ""


def test_an_empty_file_given_as_db_is_left_as_it_was(paid_db: dict[str, Any]) -> None:
    assert paid_db["empty"].read_bytes() == b""
    assert not (paid_db["folder"] / "nope.db").exists()


def test_attention_json_on_a_database_with_nothing_to_do_exits_0(paid_db: dict[str, Any]) -> None:
    result = paid_db["results"]["attention_empty"]
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"items": [], "counts": {}}


def test_the_config_files_engine_db_is_the_default_database(paid_db: dict[str, Any]) -> None:
    result = paid_db["results"]["config_db"]
    assert result.returncode == 0, result.stderr
    assert [o["merchant_order_no"] for o in json.loads(result.stdout)["orders"]] == ["S-1"]


def test_a_bad_config_names_the_key(paid_db: dict[str, Any]) -> None:
    assert "engine.db" in paid_db["results"]["bad_config"].stderr


def test_demo_json_is_one_object_that_balances_and_names_its_shift(paid_db: dict[str, Any]) -> None:
    result = paid_db["results"]["demo_json"]
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    demo = json.loads(lines[0])
    assert (demo["orders"], demo["violations"]) == (12, [])
    shift = demo["shift"]
    assert set(shift) == {"station_id", "shift_id", "orders", "paid_minor", "merchant_net_minor"}
    assert shift["station_id"] == "st-001" and shift["shift_id"].startswith("afternoon-")

