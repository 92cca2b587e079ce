"""Admission: a submit the engine cannot take in time is refused at once, never queued.

Above capacity a queue only grows: every accepted submit adds a commit and a chain of actor
messages, new submits take the writer ahead of the actors that would finish older orders,
and completions fall while receipts get slow. So new work is admitted only while the work
already in progress is within bounds, and the rest is refused with ``Overloaded`` at once
(nothing created, retry later: submits are idempotent). Orders already accepted are never
refused: their messages and writes always go on, which is what keeps completions at capacity.

Bounds, from ``EngineConfig``:
- ``submits_in_flight_max`` submits at once; a submit waits at most ``admission_wait_ms`` for
  a slot;
- backlogs: ``actor_backlog_max`` messages told to actors and not handled yet, and
  ``writer_backlog_max`` threads waiting for the database writer. Beyond either the engine
  is behind: a submit waits (sleeping) at most ``admission_wait_ms`` for it to drain, then
  is refused. The wait also paces a client that retries at once, which would otherwise
  take the CPU the engine needs to catch up.

Threads: ``admit`` is called by API threads; it never blocks longer than the wait bound.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

from payengine.engine.errors import Overloaded


@dataclass
class AdmissionStats:
    """How many submits were admitted and refused (figures, read without a lock)."""

    admitted: int = 0
    """Submits past the gate; some are still refused after it (``InvalidRequest``,
    ``IdempotencyConflict``, ``DuplicateSuspected``, the live-order bound), and a retry of
    an accepted submit is admitted again: not the orders created."""
    refused_busy: int = 0
    """No submit slot free within the wait."""
    refused_backlog: int = 0
    """A backlog (actor messages, database writer) stayed beyond its bound for the wait."""
    refused_live_orders: int = 0
    """A new order would have passed ``EngineConfig.live_orders_max``."""


class Admission:
    """Gates ``Engine.submit``; see the module docstring."""

    def __init__(self, *, submits_in_flight_max: int, wait_ms: int,
                 backlogs: Mapping[str, tuple[Callable[[], int], int]]) -> None:
        """``backlogs``: name -> (how long it is now, its bound)."""
        self._slots = threading.BoundedSemaphore(submits_in_flight_max)
        self._wait_s = wait_ms / 1000
        self._backlogs = dict(backlogs)
        self.stats = AdmissionStats()

    def _behind(self) -> str | None:
        """Why the engine is behind (a backlog beyond its bound), or None."""
        for name, (length, bound) in self._backlogs.items():
            backlog = length()
            if backlog > bound:
                return f"{backlog} {name} queued, beyond {bound}"
        return None

    def refuse_live_orders(self, live: int, bound: int) -> Overloaded:
        """The live-order bound refused a new order: counted, and the error to raise."""
        self.stats.refused_live_orders += 1
        return _overloaded(f"{live} orders in flight, the bound is {bound}")

    @contextmanager
    def admit(self) -> Iterator[None]:
        """Hold a submit slot for the block, or raise ``Overloaded`` without waiting longer
        than the bound."""
        deadline = time.monotonic() + self._wait_s
        behind = self._behind()
        while behind is not None and time.monotonic() < deadline:
            # wait (sleeping: the CPU is what the engine needs to catch up) for the backlog
            # to drain, at most the admission wait; a client that retries at once is paced
            # by this wait instead of taking the engine's CPU with its refusals
            time.sleep(_BACKLOG_POLL_S)
            behind = self._behind()
        if behind is not None:
            self.stats.refused_backlog += 1
            raise _overloaded(behind)
        if not self._slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
            self.stats.refused_busy += 1
            raise _overloaded("every submit slot is busy")
        try:
            self.stats.admitted += 1
            yield
        finally:
            self._slots.release()


_BACKLOG_POLL_S = 0.001


def _overloaded(why: str) -> Overloaded:
    return Overloaded(f"the engine is at capacity ({why}); nothing was created: retry later")
