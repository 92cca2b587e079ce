"""Observation hooks: what the engine tells a metrics collector, and nothing by default.

The engine calls an ``Observer`` at a few points of a payment's life (a submit answered, an
order reaching its final state, an order settled, a channel call back, a group commit). The
default, ``NO_OBSERVER``, does nothing and says so (``enabled`` False), so the engine does not
even read a clock for it: observation costs an attribute read and a call per point. A
collector (``actors.metrics.EngineMetrics``, the simulator's probe) subclasses ``Observer``
and is installed with ``Engine.set_observer``; the engine never imports prometheus_client.

Threads: hooks are called on whatever thread reached the point (a submitting thread, an
actor's, a channel's I/O lane, the thread that committed), after the fact (a decision's
hook after its commit). An observer must be thread-safe, must not block, and must not
raise: an exception it raises is swallowed and counted, never felt by the payment.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class Observer:
    """No-op hooks; subclass and override what you collect. See the module docstring."""

    enabled = False
    """True: the engine measures durations (reads ``time.perf_counter``) for this observer."""

    def submitted(self, seconds: float) -> None:
        """``Engine.submit`` answered (a receipt) after ``seconds`` on the caller's thread."""

    def payment_finished(self, order_id: str, channel: str, state: str) -> None:
        """A payment order reached its final state (``succeeded``, ``failed``, ``closed``):
        called once per order, after the commit that made it final. ``channel``: its cash
        leg's channel, ``"none"`` for an order paid by vouchers alone."""

    def payment_settled(self, order_id: str, channel: str, state: str, created_at_ms: int,
                        settled_at_ms: int) -> None:
        """A payment (no refund asked yet) became settled: final, nothing in flight or owed.
        Times are the engine clock's (virtual in the simulator)."""

    def channel_call(self, channel: str, operation: str, seconds: float, failed: bool) -> None:
        """A call to a wallet returned (``failed``: it raised) after ``seconds``, on the
        channel's I/O lane. ``operation``: pay, query, close, query_charge, refund,
        query_refund."""

    def group_commit(self, changes: int) -> None:
        """The store committed a batch of ``changes`` writers' changes in one transaction."""


@dataclass(frozen=True)
class Vitals:
    """What an engine's memory says about its load, read in one go (``Engine.vitals``)."""

    live_order_actors: int
    """Order actors running now (passivated ones not counted)."""
    orders_in_flight: int
    """Orders with an actor, running or passivated."""
    live_account_actors: int
    actor_backlog: int
    """Messages told to actors and not handled yet."""
    writer_backlog: int
    """Threads waiting for the database's writer connection (the group-commit queue)."""
    pool_ready: int
    """Actors waiting for a worker thread of the actor pool (0 on other runtimes)."""
    pool_threads: int
    """Worker threads of the actor pool (0 on other runtimes)."""
    threads: int
    """Threads of this process."""
    breaker_states: dict[str, str]
    """Each channel's circuit breaker: closed, open or half_open."""
    commits: int
    changes_committed: int
    failed_changes: int
    largest_batch: int
    submits_admitted: int
    submits_refused: int
    broken_actors: int
    """Actors quarantined on a broken invariant."""
    observer_errors: int
    """Exceptions observers raised (swallowed), process-wide."""


NO_OBSERVER = Observer()
"""The default: observes nothing."""


def timed(observer: Observer, channel: str, operation: str,
          call: Callable[[], Any]) -> Callable[[], Any]:
    """``call`` measured for ``observer.channel_call`` when the observer wants durations;
    ``call`` itself when not (no wrapper, no clock). Runs on the channel's I/O lane."""
    if not observer.enabled:
        return call

    def measured() -> Any:
        started = time.perf_counter()
        failed = True
        try:
            result = call()
            failed = False
            return result
        finally:
            notify(observer.channel_call, channel, operation, time.perf_counter() - started,
                   failed)

    return measured


HOOK_ERRORS = [0]
"""Exceptions observers raised, process-wide (swallowed by ``notify``)."""


def notify(hook: Callable[..., None], *args: Any) -> None:
    """Call ``hook(*args)``; an exception from it is counted in ``HOOK_ERRORS`` and dropped."""
    try:
        hook(*args)
    except Exception:
        HOOK_ERRORS[0] += 1
