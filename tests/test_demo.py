"""The main job: `payengine demo` balances, also when run again on the same database file
(the Quick start's command, run twice, must not trip over the first run's records)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import structlog

from payengine.sim.cli import main


@pytest.fixture(autouse=True)
def _restore_logging() -> object:
    """The demo points structlog at its log file, which it closes at the end: put the
    process-wide configuration back so later tests do not log into a closed file."""
    saved = structlog.get_config()
    yield None
    structlog.configure(**saved)


def test_the_demo_balances_and_balances_again_on_the_same_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "station.db"
    for _ in range(2):
        code = main(["demo", "--db", str(db), "--orders", "60", "--json", "--no-progress",
                     "--log-file", str(tmp_path / "demo.log")])
        summary = json.loads(capsys.readouterr().out)
        assert code == 0, summary
        assert summary["ok"] and summary["statement_flagged"] == 0
        assert summary["unbalanced_postings"] == 0 and summary["violations"] == []
        assert sum(summary["final_states"].values()) == 60
        assert summary["reconciliation"].get("MATCHED", 0) > 0
        # each run books its sales to a shift of its own, which the shift report finds
        shift = summary["shift"]
        assert shift["orders"] == 60 and shift["paid_minor"] > 0
        assert main(["report", "shift", "--station", shift["station_id"], "--shift",
                     shift["shift_id"], "--db", str(db), "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["orders"] == 60
        assert report["totals"]["CNY"]["paid_minor"] == shift["paid_minor"]
        assert report["totals"]["CNY"]["merchant_net_minor"] == shift["merchant_net_minor"]
