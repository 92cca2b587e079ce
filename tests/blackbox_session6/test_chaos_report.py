"""`payengine sim --report DIR` (README *Chaos report*): index.html and its PNGs, the
violations with their replay commands when a planted bug is run, and the refusals."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import has_modules
from .support import child_env, run_many

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CHARTS = ("final_states.png", "faults.png", "settle_latency.png", "transit.png")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    if not has_modules("matplotlib"):
        pytest.skip("the report extra (matplotlib) is not installed")
    folder = tmp_path_factory.mktemp("report")
    (folder / "a-file").write_text("not a folder")
    shim = folder / "shim" / "matplotlib"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('no matplotlib here')\n")
    existing = child_env().get("PYTHONPATH")
    no_matplotlib = {"PYTHONPATH": str(shim.parent) + (":" + existing if existing else "")}
    results = run_many({
        "clean": ["sim", "--seed", "0", "--orders", "30", "--json", "--report", "clean/deep"],
        "planted": ["sim", "--plant-bug", "metrics-double-count", "--report", "planted"],
        "into_file": ["sim", "--seed", "0", "--orders", "10", "--report", "a-file"],
    }, cwd=folder)
    results.update(run_many({"no_matplotlib": ["sim", "--seed", "0", "--orders", "10", "--report",
                                               "never"]}, cwd=folder, env=no_matplotlib))
    yield {"folder": folder, "results": results}


def test_a_clean_run_writes_index_html_and_the_four_charts_and_says_where_on_stderr(
        runs: dict[str, Any]) -> None:
    result = runs["results"]["clean"]
    assert result.returncode == 0, result.stderr
    page = runs["folder"] / "clean" / "deep"
    assert "report: clean/deep/index.html" in result.stderr
    assert "report:" not in result.stdout
    html = (page / "index.html").read_text()
    assert html.lstrip().lower().startswith("<!doctype html") or "<html" in html.lower()
    for chart in CHARTS:
        assert (page / chart).read_bytes().startswith(PNG_MAGIC), chart
        assert f'src="{chart}"' in html
    assert "Seeds" in html
    assert "Violations" not in html or "No violations" in html or "Violations (0)" in html


def test_a_run_with_json_and_report_prints_one_json_object_per_seed_on_stdout(runs: dict[str, Any]) -> None:
    result = runs["results"]["clean"]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    seed = json.loads(lines[0])
    assert (seed["seed"], seed["orders"], seed["violations"]) == (0, 30, [])


def test_a_planted_bug_run_exits_1_and_its_page_lists_violations_with_the_printed_replay_command(
        runs: dict[str, Any]) -> None:
    result = runs["results"]["planted"]
    assert result.returncode == 1
    printed = re.findall(r"^replay: (.+)$", result.stdout + "\n" + result.stderr, re.MULTILINE)
    assert printed, (result.stdout[-2000:], result.stderr[-2000:])
    command = printed[0].strip()
    assert command.startswith("payengine sim ") and "--plant-bug metrics-double-count" in command
    html = (runs["folder"] / "planted" / "index.html").read_text()
    match = re.search(r"<h2>Violations \((\d+)\)</h2>", html)
    assert match and int(match.group(1)) >= 1
    assert f"<code>{command}</code>" in html
    assert "payment-counted-once" in html
    for chart in CHARTS:
        assert (runs["folder"] / "planted" / chart).read_bytes().startswith(PNG_MAGIC)


def test_a_report_dir_that_is_a_file_exits_2(runs: dict[str, Any]) -> None:
    result = runs["results"]["into_file"]
    assert result.returncode == 2, result.stderr
    assert (runs["folder"] / "a-file").read_text() == "not a folder"


def test_without_matplotlib_report_exits_2_naming_the_extra_before_any_seed_runs(
        runs: dict[str, Any]) -> None:
    result = runs["results"]["no_matplotlib"]
    assert result.returncode == 2, result.stderr
    assert "payengine[report]" in result.stderr
    assert "seed 0" not in result.stdout
    assert not (runs["folder"] / "never").exists()


def test_the_page_escapes_its_text(runs: dict[str, Any]) -> None:
    html = (runs["folder"] / "planted" / "index.html").read_text()
    assert "['succeeded'" not in html         # quotes of the violation text are escaped
    assert Path(runs["folder"] / "planted").is_dir()
