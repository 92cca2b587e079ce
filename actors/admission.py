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
  ``writer_backlog_max`` changes queued for the database writer. Beyond either the engine is
  behind, and a submit is refused without waiting.

Threads: ``admit`` is called by API threads; it never blocks longer than the wait bound.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

from payengine.engine.errors import Overloaded


@dataclass
class AdmissionStats:
    """How many submits were admitted and refused (figures, read without a lock)."""

    admitted: int = 0
    refused_busy: int = 0
    """No submit slot free within the wait."""
    refused_backlog: int = 0
    """A backlog (actor messages, database writer) was beyond its bound."""


class Admission:
    """Gates ``Engine.submit``; see the module docstring."""

    def __init__(self, *, submits_in_flight_max: int, wait_ms: int,
                 backlogs: Mapping[str, tuple[Callable[[], int], int]]) -> None:
        """``backlogs``: name -> (how long it is now, its bound)."""
        self._slots = threading.BoundedSemaphore(submits_in_flight_max)
        self._wait_s = wait_ms / 1000
        self._backlogs = dict(backlogs)
        self.stats = AdmissionStats()

    @contextmanager
    def admit(self) -> Iterator[None]:
        """Hold a submit slot for the block, or raise ``Overloaded`` without waiting longer
        than the bound."""
        for name, (length, bound) in self._backlogs.items():
            backlog = length()
            if backlog > bound:
                self.stats.refused_backlog += 1
                raise _overloaded(f"{backlog} {name} queued, beyond {bound}")
        if not self._slots.acquire(timeout=self._wait_s):
            self.stats.refused_busy += 1
            raise _overloaded("every submit slot is busy")
        try:
            self.stats.admitted += 1
            yield
        finally:
            self._slots.release()


def _overloaded(why: str) -> Overloaded:
    return Overloaded(f"the engine is at capacity ({why}); nothing was created: retry later")
