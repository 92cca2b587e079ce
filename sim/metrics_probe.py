"""The simulator's view of the engine's observation hooks, and the series a report draws.

``MetricsProbe`` is installed as every engine incarnation's observer (``Engine.set_observer``)
and remembers which final state each payment was counted in, which is what
``EngineMetrics``'s ``payengine_payments_total`` counts. ``check_payments_counted`` then holds
the hooks to the store's truth: a payment is counted at most once (across crashes too: a
reopened order that is final already is not final *again*), and in the state it ended in. One
counted never (its commit was the last thing before a crash) is allowed: a counter may lose an
increment in a crash, it must never invent one.

It also keeps the settlement latencies (virtual ms from submit to settled) for the chaos
report, and ``transit_series`` reads money in transit over time from the ledger: both bounded
(``BoundedSample``), both only when ``SimConfig.record_series`` asks.

Threads: on the deterministic runtime everything is on one thread; on real threads the hooks
come from actor threads, hence the lock.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from payengine.actors.observe import Observer
from payengine.persistence.store import Store
from payengine.sim.oracle import Violation

SERIES_POINTS_MAX = 400
"""Points of money in transit kept per run (the ledger's changes, bucketed in time)."""
LATENCIES_MAX = 4_000
"""Settlement latencies kept per run (every other one dropped each time it is full)."""
COUNTED_MAX = 4
"""Final states remembered per order: more than one is a violation already."""
VIOLATIONS_MAX = 20
"""Violations of the counting check reported per run (the first ones)."""


class BoundedSample:
    """At most ``size_max`` values: when full, every other one is dropped and from then on
    only every ``stride``-th value offered is kept. Deterministic (no randomness), evenly
    spread over what was offered."""

    def __init__(self, size_max: int) -> None:
        assert size_max >= 2
        self.size_max = size_max
        self.values: list[int] = []
        self.stride = 1
        self.offered = 0

    def add(self, value: int) -> None:
        self.offered += 1
        if (self.offered - 1) % self.stride:
            return
        if len(self.values) >= self.size_max:
            self.values = self.values[::2]
            self.stride *= 2
            if (self.offered - 1) % self.stride:
                return
        self.values.append(value)


class MetricsProbe(Observer):
    """Counts what the engine's hooks say (see the module docstring); measures nothing."""

    enabled = False  # virtual time: no wall-clock durations wanted

    def __init__(self, *, keep_latencies: bool) -> None:
        self._lock = threading.Lock()
        self.counted: dict[str, list[str]] = {}
        """order id -> the final states it was counted in (at most ``COUNTED_MAX``)."""
        self.latencies: BoundedSample | None = (
            BoundedSample(LATENCIES_MAX) if keep_latencies else None)

    def payment_finished(self, order_id: str, channel: str, state: str) -> None:
        with self._lock:
            states = self.counted.setdefault(order_id, [])
            if len(states) < COUNTED_MAX:
                states.append(state)

    def payment_settled(self, order_id: str, channel: str, state: str, created_at_ms: int,
                        settled_at_ms: int) -> None:
        if self.latencies is not None:
            with self._lock:
                self.latencies.add(max(0, settled_at_ms - created_at_ms))


def check_payments_counted(counted: Mapping[str, list[str]], final: Mapping[str, str]
                           ) -> list[Violation]:
    """Each payment counted at most once, in the state it ended in (``final``: order id ->
    state in the store)."""
    out: list[Violation] = []
    for order_id, states in sorted(counted.items()):
        if len(states) > 1:
            out.append(Violation("payment-counted-once", f"order {order_id}",
                                 f"counted {len(states)} times: {states}"))
        elif states[0] != final.get(order_id):
            out.append(Violation("payment-counted-as-it-ended", f"order {order_id}",
                                 f"counted {states[0]}, ended {final.get(order_id)}"))
        if len(out) >= VIOLATIONS_MAX:
            break
    return out


@dataclass
class SimSeries:
    """What a chaos report draws of one run, in virtual time (ms since the run's start)."""

    transit: list[tuple[int, int]] = field(default_factory=list)
    """(ms, minor units in transit) at the end of each time bucket with a change."""
    settle_latencies_ms: list[int] = field(default_factory=list)
    """Submit to settled of payments (a bounded, evenly spread sample)."""
    latencies_seen: int = 0
    """Settlements observed (the sample holds at most ``LATENCIES_MAX`` of them)."""


def transit_series(movements: Iterable[tuple[int, str, int]], start_ms: int, end_ms: int,
                   points_max: int = SERIES_POINTS_MAX) -> list[tuple[int, int]]:
    """Money in ``transit`` over time from its ledger movements (in commit order): zero at
    the start, then the running balance at the last movement of each of ``points_max - 1``
    equal time buckets, as (ms since ``start_ms``, minor units): ``points_max`` points at
    most. Currencies are summed (the simulator pays in CNY only)."""
    assert points_max >= 2
    span = max(1, end_ms - start_ms)
    points: dict[int, tuple[int, int]] = {}
    balance = 0
    for at_ms, _currency, minor in movements:
        balance += minor
        at = min(max(0, at_ms - start_ms), span)
        points[at * (points_max - 2) // span] = (at, balance)
    series = [points[bucket] for bucket in sorted(points)]
    # nothing was in transit at the start: the line starts at zero, not at its first bucket
    return [(0, 0), *series] if series and series[0][0] > 0 else series


def series_of(store: Store, probe: MetricsProbe, start_ms: int, end_ms: int) -> SimSeries:
    """The run's series, read at its end (the ledger) and from the probe."""
    latencies = probe.latencies
    return SimSeries(
        transit=transit_series(store.iter_account_movements("transit"), start_ms, end_ms),
        settle_latencies_ms=[] if latencies is None else list(latencies.values),
        latencies_seen=0 if latencies is None else latencies.offered)
