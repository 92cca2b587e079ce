"""The chaos report (``payengine sim --report DIR``) and the series the simulator keeps for it."""

from __future__ import annotations

import html
import importlib
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from payengine.sim.cli import main
from payengine.sim.metrics_probe import BoundedSample, check_payments_counted, transit_series

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SMALL_SWEEP = ["sim", "--seed", "3", "--seeds", "2", "--orders", "40"]


def _linked_images(page: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', page)


def test_a_report_links_every_chart_it_drew_and_names_each_failing_seed_s_replay_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "report"
    status = main([*SMALL_SWEEP, "--plant-bug", "metrics-double-count", "--report", str(out)])
    printed = capsys.readouterr()
    assert status == 1
    page = (out / "index.html").read_text(encoding="utf-8")
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["faults.png", "final_states.png", "settle_latency.png", "transit.png"]
    assert sorted(_linked_images(page)) == pngs
    for name in pngs:
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE
    replays = [line.removeprefix("replay: ") for line in printed.err.splitlines()
               if line.startswith("replay: ")]
    assert replays == [
        "payengine sim --seed 3 --orders 40 --faults all --crashes 2 --runtime sim "
        "--plant-bug metrics-double-count",
        "payengine sim --seed 4 --orders 40 --faults all --crashes 2 --runtime sim "
        "--plant-bug metrics-double-count"]
    for replay in replays:
        assert f"<code>{html.escape(replay)}</code>" in page
    assert "payment-counted-once" in page
    assert "2 of 2 seeds violated an invariant" in page
    assert f"report: {out / 'index.html'}" in printed.err


def test_a_green_sweep_s_report_says_so_and_lists_no_violation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "report"
    assert main([*SMALL_SWEEP, "--report", str(out)]) == 0
    page = (out / "index.html").read_text(encoding="utf-8")
    assert "all seeds passed" in page
    assert "<h2>Violations (0)</h2>\n<p>None.</p>" in page


def test_the_report_of_a_sweep_is_the_same_with_worker_processes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    assert main([*SMALL_SWEEP, "--report", str(tmp_path / "one")]) == 0
    assert main([*SMALL_SWEEP, "--jobs", "2", "--report", str(tmp_path / "two")]) == 0
    one = (tmp_path / "one" / "index.html").read_text(encoding="utf-8")
    two = (tmp_path / "two" / "index.html").read_text(encoding="utf-8")
    assert one == two
    assert "<tr><td>3</td><td>OK</td>" in one and "<tr><td>4</td><td>OK</td>" in one


def test_without_matplotlib_the_report_is_refused_with_status_2_before_any_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.import_module

    def no_matplotlib(name: str, *args: Any) -> Any:
        if name.startswith("matplotlib"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", no_matplotlib)
    out = tmp_path / "report"
    assert main([*SMALL_SWEEP, "--report", str(out)]) == 2
    printed = capsys.readouterr()
    assert "pip install 'payengine[report]'" in printed.err
    assert "seed 3" not in printed.out
    assert not out.exists()


def test_a_report_directory_that_is_a_file_is_refused_with_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    assert main([*SMALL_SWEEP, "--report", str(taken)]) == 2
    assert "not a directory" in capsys.readouterr().err


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.integers(0, 10**6), max_size=300), size_max=st.integers(2, 20))
def test_a_bounded_sample_keeps_every_stride_th_value_and_never_more_than_its_bound(
    values: list[int], size_max: int
) -> None:
    sample = BoundedSample(size_max)
    for value in values:
        sample.add(value)
        assert len(sample.values) <= size_max
    assert sample.values == values[::sample.stride]
    assert sample.offered == len(values)


@settings(max_examples=200, deadline=None)
@given(moves=st.lists(st.tuples(st.integers(0, 10_000), st.integers(-5_000, 5_000)),
                      max_size=200),
       points_max=st.integers(2, 50))
def test_money_in_transit_ends_at_the_sum_of_its_movements_in_at_most_points_max_points(
    moves: list[tuple[int, int]], points_max: int
) -> None:
    moves = sorted(moves, key=lambda m: m[0])
    series = transit_series(((1_000 + at, "CNY", minor) for at, minor in moves), 1_000, 11_000,
                            points_max)
    assert len(series) <= points_max
    assert [t for t, _ in series] == sorted(t for t, _ in series)
    if moves:
        assert series[-1][1] == sum(minor for _, minor in moves)
        assert series[0] == (0, 0) or series[0][0] == 0
    else:
        assert series == []


def test_a_payment_counted_twice_or_in_another_state_than_it_ended_is_a_violation() -> None:
    counted = {"o1": ["succeeded"], "o2": ["closed", "closed"], "o3": ["failed"]}
    final = {"o1": "succeeded", "o2": "closed", "o3": "succeeded", "o4": "failed"}
    violations = check_payments_counted(counted, final)
    assert [(v.invariant, v.subject) for v in violations] == [
        ("payment-counted-once", "order o2"), ("payment-counted-as-it-ended", "order o3")]
