"""`payengine report shift` on files that are not a payengine database (README: "Exit status
0, or 2 for a missing database or a bad id"; the report "Reads only")."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def report(db: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "payengine.sim.cli", "report", "shift",
                           "--station", "st-1", "--shift", "A", "--db", str(db), *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_report_shift_on_an_empty_file_writes_nothing_and_exits_2(tmp_path: Path) -> None:
    db = tmp_path / "empty.db"
    db.write_bytes(b"")
    run = report(db, "--json")
    assert db.stat().st_size == 0
    assert run.returncode == 2


def test_report_shift_on_a_file_that_is_not_a_database_exits_2_without_a_traceback(
        tmp_path: Path) -> None:
    db = tmp_path / "garbage.db"
    db.write_text("this is not sqlite\n")
    run = report(db, "--json")
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    assert db.read_text() == "this is not sqlite\n"


def test_report_shift_on_a_directory_exits_2_without_a_traceback(tmp_path: Path) -> None:
    run = report(tmp_path, "--json")
    assert run.returncode == 2
    assert "Traceback" not in run.stderr


def test_report_shift_with_a_control_character_in_the_shift_exits_2(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "payengine.sim.cli", "report", "shift",
                          "--station", "st-1", "--shift", "A\tB", "--db",
                          str(tmp_path / "none.db")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "Traceback" not in run.stderr


def test_report_shift_without_station_is_a_usage_error(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "payengine.sim.cli", "report", "shift",
                          "--shift", "A", "--db", str(tmp_path / "none.db")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
