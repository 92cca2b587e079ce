"""`payengine sim ... --report DIR` (README *Chaos report*)."""

from __future__ import annotations

import html
import json
import re
import subprocess
from pathlib import Path

import pytest

from .support import PY, cli, env

CHARTS = ("final_states.png", "faults.png", "settle_latency.png", "transit.png")


def sim(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return cli("sim", *args, cwd=tmp_path, timeout=300)


def test_a_clean_run_writes_the_page_and_its_charts_and_exits_0(tmp_path: Path) -> None:
    out = tmp_path / "deep" / "er" / "chaos"
    r = sim(tmp_path, "--seed", "0", "--orders", "20", "--report", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"report: {out}/index.html" in r.stderr
    assert f"report: {out}/index.html" not in r.stdout
    page = (out / "index.html").read_text()
    for chart in CHARTS:
        assert (out / chart).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", chart
        assert f'src="{chart}"' in page
    assert "<html" in page.lower()
    assert "Violations" in page and "Seeds" in page


def test_a_planted_bug_report_lists_violations_with_the_printed_replay_command(
        tmp_path: Path) -> None:
    r = sim(tmp_path, "--plant-bug", "metrics-double-count", "--report", "chaos")
    assert r.returncode == 1
    assert "report: chaos/index.html" in r.stderr
    replays = set(re.findall(r"^replay: (.*)$", r.stderr + r.stdout, re.M))
    assert len(replays) == 1
    replay = replays.pop()
    page = (tmp_path / "chaos" / "index.html").read_text()
    assert html.escape(replay) in page
    violations = re.search(r"Violations \((\d+)\)", page)
    assert violations and int(violations.group(1)) >= 1
    assert "payment-counted-once" in page


def test_the_replay_command_replays_the_same_run(tmp_path: Path) -> None:
    r = sim(tmp_path, "--plant-bug", "metrics-double-count", "--json")
    first = json.loads(r.stdout.splitlines()[0])
    replay = re.search(r"^replay: payengine (.*)$", r.stderr, re.M)
    assert replay
    again = cli(*replay.group(1).split(), "--json", cwd=tmp_path, timeout=300)
    assert json.loads(again.stdout.splitlines()[0])["trace_hash"] == first["trace_hash"]


def test_a_report_changes_nothing_of_the_run(tmp_path: Path) -> None:
    plain = sim(tmp_path, "--seed", "3", "--orders", "20", "--json")
    reported = sim(tmp_path, "--seed", "3", "--orders", "20", "--json", "--report", "r")
    a, b = json.loads(plain.stdout), json.loads(reported.stdout)
    assert a["trace_hash"] == b["trace_hash"]
    assert a["violations"] == b["violations"] == []


def test_jobs_give_the_same_page_as_one_at_a_time(tmp_path: Path) -> None:
    one = sim(tmp_path, "--seed", "5", "--seeds", "3", "--orders", "15", "--report", "a")
    two = sim(tmp_path, "--seed", "5", "--seeds", "3", "--orders", "15", "--jobs", "2",
              "--report", "b")
    assert one.returncode == two.returncode == 0
    page_a = (tmp_path / "a" / "index.html").read_text()
    page_b = (tmp_path / "b" / "index.html").read_text()
    assert page_a == page_b
    for seed in ("5", "6", "7"):
        assert f"<td>{seed}</td>" in page_a


def test_a_dir_that_is_a_file_exits_2_before_any_seed_runs(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    r = sim(tmp_path, "--seed", "0", "--orders", "20", "--report", "afile", "--json")
    assert r.returncode == 2
    assert r.stdout.strip() == ""
    assert (tmp_path / "afile").read_text() == "x"


def test_without_matplotlib_report_exits_2_naming_the_extra_before_any_seed(
        tmp_path: Path) -> None:
    code = ("import runpy, sys; sys.modules['matplotlib'] = None; "
            "sys.argv = ['payengine', 'sim', '--seed', '0', '--orders', '20', '--json', "
            "'--report', 'r']; runpy.run_module('payengine.sim.cli', run_name='__main__')")
    r = subprocess.run([PY, "-c", code], cwd=tmp_path, env=env(), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-1000:]
    assert "payengine[report]" in r.stderr + r.stdout
    assert r.stdout.strip() == "" or "payengine[report]" in r.stdout
    assert not (tmp_path / "r" / "index.html").exists()


def test_an_existing_report_is_replaced(tmp_path: Path) -> None:
    out = tmp_path / "r"
    out.mkdir()
    (out / "index.html").write_text("old page")
    (out / "final_states.png").write_bytes(b"stale")
    r = sim(tmp_path, "--seed", "1", "--orders", "15", "--report", "r")
    assert r.returncode == 0
    assert (out / "index.html").read_text() != "old page"
    assert (out / "final_states.png").read_bytes()[:4] == b"\x89PNG"


def test_seeds_table_and_fault_kinds_per_seed(tmp_path: Path) -> None:
    r = sim(tmp_path, "--seed", "10", "--seeds", "2", "--orders", "15", "--json",
            "--report", "r")
    assert r.returncode == 0
    runs = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
    page = (tmp_path / "r" / "index.html").read_text()
    for run in runs:
        assert run["trace_hash"] in page
    totals: dict[str, int] = {}
    for run in runs:
        for state, n in run["final_states"].items():
            totals[state] = totals.get(state, 0) + n
    for state, n in totals.items():
        assert f"<tr><td>{state}</td><td>{n}</td></tr>" in page


@pytest.mark.parametrize("faults", ["none"])
def test_a_run_without_faults_still_reports(tmp_path: Path, faults: str) -> None:
    r = sim(tmp_path, "--seed", "2", "--orders", "15", "--faults", faults, "--report", "r")
    assert r.returncode == 0
    page = (tmp_path / "r" / "index.html").read_text()
    pngs = {p.name for p in (tmp_path / "r").glob("*.png")}
    for chart in CHARTS:
        if chart not in pngs:
            assert "No data in these runs" in page
        else:
            assert f'src="{chart}"' in page


def test_the_seeds_section_names_the_seeds_that_drew_each_fault_kind(tmp_path: Path) -> None:
    r = sim(tmp_path, "--seed", "30", "--seeds", "3", "--orders", "15", "--json",
            "--report", "r")
    assert r.returncode == 0
    runs = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
    drew: dict[str, list[int]] = {}
    for run in runs:
        for kind in run["fault_mix"]:
            drew.setdefault(kind, []).append(run["seed"])
    page = (tmp_path / "r" / "index.html").read_text()
    section = page[page.index("<h2>Seeds</h2>"):]
    partial = {k: s for k, s in drew.items() if len(s) < len(runs)}
    assert partial, "some kind is drawn by a strict subset of the seeds"
    for kind, seeds in partial.items():
        row = re.search(rf"<tr><td>{re.escape(kind)}</td><td>([^<]*)</td></tr>", section)
        assert row, kind
        assert all(str(seed) in row.group(1) for seed in seeds), (kind, row.group(1))
