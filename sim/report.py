"""The chaos report: ``payengine sim ... --report DIR`` writes ``DIR/index.html`` and its charts.

A page people can look at after a sweep of seeds: final states of the orders per seed, the
faults drawn by kind, the latency of settlement in virtual time (histogram and CDF), money in
transit over time, and every violation with the command that replays its seed. Charts are
matplotlib PNGs (the optional extra ``payengine[report]``, Agg backend: no display needed);
the page is plain HTML, every text escaped. Without matplotlib, ``ChaosReport`` raises
``ExtraMissing`` before any run starts.

``ChaosReport.add`` takes each ``SimResult`` as it comes (with ``--jobs`` too: results come
in seed order) and keeps bounded aggregates, so a sweep of 100,000 seeds holds a few
thousand numbers, not the runs: per-seed rows for the first ``SEEDS_SHOWN_MAX`` seeds (and
every failing one up to ``VIOLATIONS_MAX`` violations), money in transit of the first
``TRANSIT_RUNS_MAX`` runs, a ``BoundedSample`` of the latencies. ``write`` draws and writes
once at the end. Runs on the caller's thread.
"""

from __future__ import annotations

import html
import importlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from payengine.engine.errors import ExtraMissing, InvalidRequest
from payengine.sim.metrics_probe import BoundedSample
from payengine.sim.simulation import SimResult

SEEDS_SHOWN_MAX = 60
"""Seeds drawn one bar each (and listed one row each) in the report; the rest are counted."""
FAULT_SEEDS_SHOWN_MAX = 20
"""Seeds named per fault kind in the Seeds section; the rest are counted."""
TRANSIT_RUNS_MAX = 8
"""Runs whose money in transit is drawn (the first ones)."""
VIOLATIONS_MAX = 200
"""Violations listed (the first ones); the page says how many more there were."""
EVENTS_SHOWN_MAX = 30
"""Injected events drawn (the most frequent); the page's table lists them all."""
LATENCIES_MAX = 20_000
"""Settlement latencies kept over all runs (``BoundedSample``)."""
DETAIL_CHARS_MAX = 500
"""A violation's detail is cut to this many characters on the page."""
STATE_COLOURS = {"succeeded": "#2ca02c", "failed": "#d62728", "closed": "#7f7f7f",
                 "needs_reconciliation": "#ff7f0e", "paying": "#1f77b4"}


def pyplot() -> ModuleType:
    """matplotlib's pyplot on the Agg backend, or ``ExtraMissing`` without the extra."""
    try:
        matplotlib = importlib.import_module("matplotlib")
        matplotlib.use("Agg")
        return importlib.import_module("matplotlib.pyplot")
    except ImportError:
        raise ExtraMissing("the chaos report needs matplotlib: pip install 'payengine[report]'",
                           "report") from None


@dataclass(frozen=True)
class SweepArgs:
    """What the ``sim`` command ran with: what a seed's replay command repeats."""

    orders: int
    faults: str
    crashes: int
    runtime: str
    plant_bug: str | None = None


def replay_command(seed: int, args: SweepArgs) -> str:
    """The command that runs ``seed`` again as the sweep ran it: what ``payengine sim``
    prints after ``replay:`` for a failing seed."""
    command = (f"payengine sim --seed {seed} --orders {args.orders} --faults {args.faults} "
               f"--crashes {args.crashes} --runtime {args.runtime}")
    if args.plant_bug:
        command += f" --plant-bug {args.plant_bug}"
    return command


@dataclass(frozen=True)
class _SeedRow:
    seed: int
    ok: bool
    violations: int
    final_states: dict[str, int]
    crashes: int
    virtual_seconds: float
    trace_hash: str


@dataclass(frozen=True)
class _ViolationRow:
    seed: int
    text: str
    replay: str


class ChaosReport:
    """Collects results (``add``), then writes ``directory/index.html`` and its PNGs."""

    def __init__(self, directory: str | Path, args: SweepArgs) -> None:
        self.plt = pyplot()  # first: without the extra nothing is made
        self.directory = Path(directory)
        if self.directory.exists() and not self.directory.is_dir():
            raise InvalidRequest(f"--report {directory}: a file is there, not a directory")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.args = args
        self.runs = 0
        self.first_seed = 0
        self.failed = 0
        self.seeds: list[_SeedRow] = []
        self.states: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()
        self.fault_mix: Counter[str] = Counter()
        self.fault_seeds: dict[str, list[int]] = {}
        self.latencies = BoundedSample(LATENCIES_MAX)
        self.transit: list[tuple[int, list[tuple[int, int]]]] = []
        self.violations: list[_ViolationRow] = []
        self.violations_total = 0

    def add(self, result: SimResult) -> None:
        """Take one run's result into the aggregates (bounded: see the module docstring)."""
        if not self.runs:
            self.first_seed = result.seed
        self.runs += 1
        self.failed += not result.ok
        self.states.update(result.final_states)
        self.faults.update(result.faults)
        self.fault_mix.update(result.fault_mix)
        for kind in result.fault_mix:
            listed = self.fault_seeds.setdefault(kind, [])
            if len(listed) < FAULT_SEEDS_SHOWN_MAX:
                listed.append(result.seed)
        if len(self.seeds) < SEEDS_SHOWN_MAX:
            self.seeds.append(_SeedRow(result.seed, result.ok, len(result.violations),
                                       dict(result.final_states), result.crashes,
                                       result.virtual_seconds, result.trace_hash))
        series = result.series
        if series is not None:
            for latency in series.settle_latencies_ms:
                self.latencies.add(latency)
            if len(self.transit) < TRANSIT_RUNS_MAX and series.transit:
                self.transit.append((result.seed, list(series.transit)))
        replay = replay_command(result.seed, self.args)
        for violation in result.violations:
            self.violations_total += 1
            if len(self.violations) < VIOLATIONS_MAX:
                self.violations.append(_ViolationRow(result.seed, str(violation), replay))

    def write(self) -> Path:
        """Draw the charts that have data, write the page; return its path."""
        charts = {
            "final_states.png": ("Final states of the orders per seed", self._draw_states),
            "faults.png": ("Faults drawn, by kind", self._draw_faults),
            "settle_latency.png": ("Latency of settlement (virtual time)", self._draw_latency),
            "transit.png": ("Money in transit over time", self._draw_transit),
        }
        drawn: dict[str, str] = {}
        for name, (title, draw) in charts.items():
            path = self.directory / name
            path.unlink(missing_ok=True)  # a chart without data this time is not shown stale
            if draw(path):
                drawn[name] = title
        page = self.directory / "index.html"
        page.write_text(self._html(drawn, [t for n, (t, _) in charts.items() if n not in drawn]),
                        encoding="utf-8")
        return page

    # ------------------------------------------------------------------ charts

    def _save(self, figure: Any, path: Path) -> bool:
        figure.tight_layout()
        figure.savefig(path, format="png", dpi=100)
        self.plt.close(figure)
        return True

    def _draw_states(self, path: Path) -> bool:
        if not self.seeds:
            return False
        plt = self.plt
        states = sorted({s for row in self.seeds for s in row.final_states})
        figure, axes = plt.subplots(figsize=(max(6.0, 0.25 * len(self.seeds) + 3), 4))
        labels = [str(row.seed) for row in self.seeds]
        bottom = [0] * len(self.seeds)
        for state in states:
            heights = [row.final_states.get(state, 0) for row in self.seeds]
            axes.bar(labels, heights, bottom=bottom, label=state,
                     color=STATE_COLOURS.get(state))
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
        shown = "" if self.runs <= len(self.seeds) else f" (first {len(self.seeds)} of {self.runs})"
        axes.set(title=f"Final states per seed{shown}", xlabel="seed", ylabel="orders")
        axes.tick_params(axis="x", labelrotation=90, labelsize=7)
        axes.legend(fontsize=8)
        return self._save(figure, path)

    def _draw_faults(self, path: Path) -> bool:
        """Left: seeds per fault kind switched on; right: the most frequent injected events
        (a fault kind shows as several: ``callback_lost``, ``forged:replayed``...)."""
        kinds = sorted(self.fault_mix.items())
        events = sorted(((k, n) for k, n in self.faults.items() if n > 0),
                        key=lambda kn: (-kn[1], kn[0]))[:EVENTS_SHOWN_MAX]
        if not kinds and not events:
            return False
        rows = max(len(kinds), len(events), 1)
        figure, (left, right) = self.plt.subplots(1, 2, figsize=(12, 0.22 * rows + 1.5))
        left.barh([k for k, _ in kinds], [n for _, n in kinds], color="#9467bd")
        left.invert_yaxis()
        left.set(title=f"Fault kinds switched on (seeds of {self.runs})", xlabel="seeds")
        right.barh([k for k, _ in events], [n for _, n in events], color="#8c564b")
        right.set_xscale("log")
        right.tick_params(axis="x", which="minor", labelbottom=False)
        right.invert_yaxis()
        right.set(title=f"Most frequent injected events (top {EVENTS_SHOWN_MAX})",
                  xlabel="count over all runs (log)")
        for axes in (left, right):
            axes.tick_params(axis="y", labelsize=7)
        return self._save(figure, path)

    def _draw_latency(self, path: Path) -> bool:
        values = sorted(v / 1000 for v in self.latencies.values)
        if not values:
            return False
        figure, (hist, cdf) = self.plt.subplots(1, 2, figsize=(10, 4))
        hist.hist(values, bins=min(50, max(5, len(values) // 10)), color="#1f77b4")
        hist.set(title="Submit to settled", xlabel="virtual seconds", ylabel="payments")
        cdf.plot(values, [(i + 1) / len(values) for i in range(len(values))], color="#1f77b4")
        cdf.set(title="CDF", xlabel="virtual seconds", ylabel="share of payments", ylim=(0, 1))
        cdf.grid(True, alpha=0.3)
        return self._save(figure, path)

    def _draw_transit(self, path: Path) -> bool:
        if not self.transit:
            return False
        figure, axes = self.plt.subplots(figsize=(10, 4))
        for seed, points in self.transit:
            axes.step([ms / 1000 for ms, _ in points], [minor / 100 for _, minor in points],
                      where="post", label=f"seed {seed}")
        axes.set(title="Money in transit (the gateway's transit account)",
                 xlabel="seconds since the run's start (virtual on the sim runtime)",
                 ylabel="CNY")
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize=8)
        return self._save(figure, path)

    # ------------------------------------------------------------------ the page

    def _html(self, drawn: dict[str, str], missing: list[str]) -> str:
        e = html.escape
        args = self.args
        verdict = ("all seeds passed" if not self.failed
                   else f"{self.failed} of {self.runs} seeds violated an invariant")
        parts = [
            "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
            "<title>payengine chaos report</title>",
            "<style>body{font-family:sans-serif;margin:2em;max-width:1100px}"
            "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;"
            "padding:2px 6px;text-align:left}code{background:#f4f4f4}"
            ".bad{color:#b00}.ok{color:#070}</style></head><body>",
            "<h1>payengine chaos report</h1>",
            f'<p class="{"ok" if not self.failed else "bad"}">{e(verdict)}</p>',
            f"<p>{self.runs} run(s), seeds {self.first_seed} and on; each run as "
            f"<code>{e(replay_command(self.first_seed, args))}</code></p>",
            "<h2>Final states (all seeds)</h2>", self._table(
                ["state", "orders"], [[s, str(n)] for s, n in sorted(self.states.items())]),
        ]
        for name, title in drawn.items():
            parts.append(f"<h2>{e(title)}</h2>")
            parts.append(f'<p><img src="{e(name)}" alt="{e(title)}"></p>')
        for title in missing:
            parts.append(f"<h2>{e(title)}</h2><p>No data in these runs.</p>")
        parts.append(f"<h2>Violations ({self.violations_total})</h2>")
        if not self.violations:
            parts.append("<p>None.</p>")
        else:
            more = self.violations_total - len(self.violations)
            parts.append(self._table(
                ["seed", "violation", "replay"],
                [[str(v.seed), v.text[:DETAIL_CHARS_MAX], v.replay] for v in self.violations],
                code_column=2))
            if more:
                parts.append(f"<p>... and {more} more (the first {VIOLATIONS_MAX} are listed)."
                             "</p>")
        parts.append("<h2>Seeds</h2>")
        parts.append(self._table(
            ["seed", "verdict", "final states", "crashes", "virtual s", "trace"],
            [[str(r.seed), "OK" if r.ok else f"VIOLATED ({r.violations})",
              " ".join(f"{k} {v}" for k, v in r.final_states.items()), str(r.crashes),
              f"{r.virtual_seconds:.1f}", r.trace_hash] for r in self.seeds]))
        if self.runs > len(self.seeds):
            parts.append(f"<p>The first {len(self.seeds)} of {self.runs} seeds are listed.</p>")
        parts.append("<h2>Fault kinds switched on (seeds)</h2>")
        parts.append(self._table(["fault", "seeds"],
                                 [[k, self._seeds_of(k, n)]
                                  for k, n in sorted(self.fault_mix.items())]))
        parts.append("<h2>Injected events (all runs)</h2>")
        parts.append(self._table(["event", "count"],
                                 [[k, str(n)] for k, n in sorted(self.faults.items())]))
        parts.append(f"<p>Settlement latencies: {self.latencies.offered} observed, "
                     f"{len(self.latencies.values)} drawn.</p></body></html>")
        return "\n".join(parts) + "\n"

    def _seeds_of(self, kind: str, drawn: int) -> str:
        """``3: 30, 31, 32``: how many seeds drew the fault kind, and which (the first
        ``FAULT_SEEDS_SHOWN_MAX``)."""
        listed = self.fault_seeds.get(kind, [])
        text = f"{drawn}: " + ", ".join(map(str, listed))
        return text + (f" ... and {drawn - len(listed)} more" if drawn > len(listed) else "")

    @staticmethod
    def _table(head: list[str], rows: list[list[str]], code_column: int | None = None) -> str:
        e = html.escape
        out = ["<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>"]
        for row in rows:
            cells = [f"<td><code>{e(c)}</code></td>" if i == code_column else f"<td>{e(c)}</td>"
                     for i, c in enumerate(row)]
            out.append("<tr>" + "".join(cells) + "</tr>")
        out.append("</table>")
        return "\n".join(out)
