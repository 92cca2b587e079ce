"""Resuming every unsettled order at open, paced.

``Engine.open`` used to tell every unsettled order its ``Activate`` at once: 100,000 orders
were 100,000 actors loading their state together, and a burst of their re-issued channel
and voucher calls. The feeder keeps at most ``in_flight_max`` activations sent and not yet
handled: each one handled (``messages.Paced``) tells the next. ``Engine.open`` returns once
the first ones are sent; the engine serves requests meanwhile (an order that gets another
message before its turn activates first, as after any restart).

Holds cannot expire under the pacing: ``Engine._resume`` first moves every pending hold of
an unsettled order to ``now + hold_grace_ms`` (10 minutes by default; a resume of 100,000
orders takes seconds). A resume that outlasts half the grace is logged as an error.

Threads: ``start`` on the opening thread; ``_one_done`` on actor threads (after a handler);
``_watch`` on the timer thread. One lock guards the counters; no tell is made under it.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from payengine.actors.directory import Directory
from payengine.actors.messages import Paced
from payengine.actors.runtime import Runtime
from payengine.engine.errors import EngineClosed
from payengine.engine.order import Activate

IN_FLIGHT_MAX = 256
"""Activations sent and not yet handled, at most. ``Engine.open`` uses fewer:
``in_flight_for(actor_threads)``."""


def in_flight_for(actor_threads: int) -> int:
    """Activations in flight for ``actor_threads`` workers: two each, one running and one
    ready for when it waits on SQLite. More only made the workers fight over the GIL and
    the pool's locks: resuming 100,000 orders (2 cores, loaded) took 37-43 s with 256 in
    flight and 21-29 s with 8 or 16, with a half to a fifth of the context switches."""
    return max(1, min(IN_FLIGHT_MAX, 2 * actor_threads))

STALL_MS = 5_000
"""With activations in flight and none handled for this long, they are taken as lost (an
actor that died of a bug drops what was queued behind the failing message) and the feeder
goes on, so a lost one never stalls the resume of the others."""


class ResumeFeeder:
    """Tells each of ``order_ids`` its ``Activate``, at most ``in_flight_max`` unhandled."""

    def __init__(self, directory: Directory, runtime: Runtime, order_ids: Sequence[str],
                 *, grace_ms: int, log: Any, in_flight_max: int = IN_FLIGHT_MAX) -> None:
        self._directory = directory
        self._runtime = runtime
        self._order_ids = order_ids
        self._grace_ms = grace_ms
        self._log = log
        self._in_flight_max = in_flight_max
        self._lock = threading.Lock()
        self._next = 0
        self._in_flight = 0
        self._handled = 0
        self._handled_at_last_watch = -1
        self._started_ms = runtime.now_ms()
        self._finished = threading.Event()
        self._stopped = False

    def start(self) -> None:
        self._top_up()
        self._arm_watch()

    def pending(self) -> int:
        """Orders whose activation is not handled yet (lost ones count as handled)."""
        with self._lock:
            return max(0, len(self._order_ids) - self._handled)

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until every activation was handled; False on timeout. Not on an actor."""
        return self._finished.wait(timeout_s)

    def _top_up(self) -> None:
        while True:
            with self._lock:
                if self._stopped or self._in_flight >= self._in_flight_max:
                    return
                if self._next >= len(self._order_ids):
                    break
                order_id = self._order_ids[self._next]
                self._next += 1
                self._in_flight += 1
            try:
                sent = self._directory.offer(("order", order_id), Paced(Activate(), self._one_done))
            except EngineClosed:
                self._stop()
                return
            if not sent:  # quarantined: nothing to activate
                self._one_done()
        self._finish_if_done()

    def _one_done(self) -> None:
        with self._lock:
            self._in_flight = max(0, self._in_flight - 1)
            self._handled += 1
        self._top_up()

    def _finish_if_done(self) -> None:
        with self._lock:
            if self._stopped or self._handled < len(self._order_ids):
                return
            self._stopped = True
        elapsed_ms = self._runtime.now_ms() - self._started_ms
        if 2 * elapsed_ms > self._grace_ms:
            self._log.error("resume.slow", orders=len(self._order_ids), elapsed_ms=elapsed_ms,
                            hold_grace_ms=self._grace_ms,
                            note="holds of orders resumed late may have expired meanwhile")
        self._log.info("engine.resumed", orders=len(self._order_ids), elapsed_ms=elapsed_ms)
        self._finished.set()

    def _stop(self) -> None:
        with self._lock:
            self._stopped = True
        self._finished.set()

    def _arm_watch(self) -> None:
        with self._lock:
            if self._stopped:
                return
        try:
            self._runtime.call_at(self._runtime.now_ms() + STALL_MS, self._watch)
        except EngineClosed:
            self._stop()

    def _watch(self) -> None:
        with self._lock:
            stalled = self._handled == self._handled_at_last_watch and self._in_flight > 0
            self._handled_at_last_watch = self._handled
            lost = self._in_flight if stalled else 0
            self._in_flight -= lost
            self._handled += lost
        if lost:
            self._log.warning("resume.activations_lost", lost=lost)
            self._top_up()
            self._finish_if_done()
        self._arm_watch()
