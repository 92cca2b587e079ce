"""The runtime seam: clock, timers, I/O lanes and actor spawning behind one small interface.

Nothing else in ``actors/`` reads the wall clock, sleeps, starts a timer thread or picks an
actor implementation: it asks a ``Runtime``. ``ThreadRuntime`` is production: pykka
``ThreadingActor`` hosts, one timer thread, a bounded thread pool per channel. The simulator
(``sim/``) supplies a deterministic runtime with the same interface, virtual time and a seeded
scheduler, and runs the same behaviours.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import pykka

from payengine.actors.logs import get_logger
from payengine.engine.errors import EngineClosed, Overloaded, PaymentError

log = get_logger("payengine.runtime")


class Behaviour(Protocol):
    """What an actor does. Its methods run one at a time on the actor's own thread."""

    def on_start(self) -> None: ...

    def on_message(self, message: Any) -> Any: ...

    def on_stop(self) -> None: ...


class ActorRef(Protocol):
    """A handle to a running actor."""

    def tell(self, message: Any) -> None:
        """Enqueue ``message``; never blocks."""

    def ask(self, message: Any, timeout_s: float) -> Any:
        """Enqueue ``message`` and wait for the reply. Callers outside actors only."""

    def stop(self) -> None:
        """Ask the actor to stop after the messages already queued."""

    @property
    def alive(self) -> bool: ...


class TimerHandle(Protocol):
    def cancel(self) -> None: ...


class Runtime(Protocol):
    """Everything time-, thread- or scheduling-dependent the actor shell needs."""

    def now_ms(self) -> int:
        """Milliseconds since the epoch (wall clock in production, virtual in the simulator)."""

    def call_at(self, due_at_ms: int, fn: Callable[[], None]) -> TimerHandle:
        """Run ``fn`` at ``due_at_ms`` (at once if past). ``fn`` must be quick: a tell."""

    def run_io(self, lane: str, fn: Callable[[], Any], done: Callable[[Any], None]) -> None:
        """Run a blocking call ``fn`` off the actor threads, on ``lane``'s bounded pool.

        ``done`` gets the result, or the exception ``fn`` raised (an ``Overloaded`` if the
        lane's queue is full). A slow lane never delays another lane.
        """

    def spawn(self, name: str, behaviour: Behaviour) -> ActorRef:
        """Start an actor running ``behaviour``."""

    def shutdown(self) -> None:
        """Stop timers and I/O lanes; queued timers are dropped."""


# ---------------------------------------------------------------------- threads


class BehaviourHost:
    """pykka's hooks for an actor that runs a ``Behaviour``: one definition for every
    runtime's actor class (threads here, the pool, the simulator). Put it first among the
    bases so its hooks override ``pykka.Actor``'s."""

    name: str
    behaviour: Behaviour

    def on_start(self) -> None:
        self.behaviour.on_start()

    def on_receive(self, message: Any) -> Any:
        return self.behaviour.on_message(message)

    def on_stop(self) -> None:
        self.behaviour.on_stop()

    def on_failure(self, exception_type: Any, exception_value: Any, traceback: Any) -> None:
        """A told message raised: pykka stops the actor without ``on_stop``. Logged, and the
        behaviour told (``on_failed``, if it has one) that it will handle nothing more."""
        log.error("actor.failed", actor=self.name, error=repr(exception_value))
        self.behaviour_failed()

    def behaviour_failed(self) -> None:
        failed = getattr(self.behaviour, "on_failed", None)
        if failed is not None:
            failed()


class _PykkaHost(BehaviourHost, pykka.ThreadingActor):
    """A pykka thread that runs a ``Behaviour``. Daemon: an abandoned engine never blocks exit."""

    use_daemon_thread = True

    def __init__(self, name: str, behaviour: Behaviour) -> None:
        super().__init__()
        self.name = name
        self.behaviour = behaviour



@dataclass(frozen=True)
class PykkaRef:
    """``ActorRef`` over a pykka actor ref (a thread's or a pooled actor's)."""

    ref: pykka.ActorRef[Any]

    def tell(self, message: Any) -> None:
        self.ref.tell(message)

    def ask(self, message: Any, timeout_s: float) -> Any:
        return self.ref.ask(message, timeout=timeout_s)

    def stop(self) -> None:
        if self.ref.is_alive():
            self.ref.stop(block=False)

    @property
    def alive(self) -> bool:
        return bool(self.ref.is_alive())


class _Timer:
    """A pending timer and its handle. Heap entries are ``(due_at_ms, seq, timer)`` tuples,
    compared in C: a dataclass ``__lt__`` made each push cost microseconds with 100,000s of
    timers pending (one or two per open order)."""

    __slots__ = ("cancelled", "fn", "owner")

    def __init__(self, fn: Callable[[], None], owner: TimerThread) -> None:
        self.fn = fn
        self.owner = owner
        self.cancelled = False

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self.owner.forget_one()


class TimerThread:
    """One thread and a heap of timers; ``timers_max`` bounds the heap.

    Runs each due callback on its own thread, so callbacks must not block (they tell).
    Cancelled timers leave the heap when due, or sooner: once they are half of it, the heap
    is rebuilt without them (amortised O(1) per cancel), so timers cancelled long before
    they are due (a settled order's close timer, a day ahead) do not pile up.
    """

    def __init__(self, now_ms: Callable[[], int], timers_max: int = 1_000_000) -> None:
        self._now_ms = now_ms
        self._timers_max = timers_max
        self._heap: list[tuple[int, int, _Timer]] = []
        self._cancelled = 0
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="payengine-timers", daemon=True)
        self._thread.start()

    def call_at(self, due_at_ms: int, fn: Callable[[], None]) -> _Timer:
        with self._cond:
            if self._stopped:
                raise EngineClosed("timers are stopped")
            if len(self._heap) >= self._timers_max:
                self._compact()
                if len(self._heap) >= self._timers_max:
                    raise Overloaded(f"{self._timers_max} timers pending")
            timer = _Timer(fn, self)
            heapq.heappush(self._heap, (due_at_ms, next(self._seq), timer))
            if self._heap[0][2] is timer:
                self._cond.notify()
            return timer

    def forget_one(self) -> None:
        """A timer was cancelled (any thread): rebuild the heap once half of it is dead."""
        with self._cond:
            self._cancelled += 1
            if self._cancelled > 1_000 and 2 * self._cancelled > len(self._heap):
                self._compact()

    def _compact(self) -> None:
        self._heap = [entry for entry in self._heap if not entry[2].cancelled]
        heapq.heapify(self._heap)
        self._cancelled = 0

    def pending(self) -> int:
        """Timers in the heap, cancelled ones not yet dropped included."""
        with self._cond:
            return len(self._heap)

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._heap.clear()
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped:
                    if not self._heap:
                        self._cond.wait()
                        continue
                    wait_ms = self._heap[0][0] - self._now_ms()
                    if wait_ms <= 0:
                        break
                    self._cond.wait(timeout=wait_ms / 1000)
                if self._stopped:
                    return
                timer = heapq.heappop(self._heap)[2]
                if timer.cancelled:
                    self._cancelled -= 1
                    continue
                timer.cancelled = True  # no longer pending: a late cancel() counts nothing
            try:
                timer.fn()
            except Exception as exc:  # a timer must never kill the timer thread
                log.warning("timer.callback_failed", error=repr(exc))


class _Lane:
    """A bounded pool for blocking calls to one channel."""

    def __init__(self, name: str, workers: int, queue_max: int) -> None:
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"io-{name}")
        self.slots = threading.BoundedSemaphore(workers + queue_max)


class IoLanes:
    """``Runtime.run_io`` for the production runtimes: one bounded thread pool per lane,
    made on the lane's first call. ``run_io`` may be called from any thread."""

    def __init__(self, workers_per_lane: int, queue_max: int) -> None:
        self._workers = workers_per_lane
        self._queue_max = queue_max
        self._lanes: dict[str, _Lane] = {}
        self._lock = threading.Lock()
        self._closed = False

    def run_io(self, lane: str, fn: Callable[[], Any], done: Callable[[Any], None]) -> None:
        with self._lock:
            if self._closed:
                raise EngineClosed("the runtime is shut down")
            pool = self._lanes.get(lane)
            if pool is None:
                pool = self._lanes[lane] = _Lane(lane, self._workers, self._queue_max)
        if not pool.slots.acquire(blocking=False):
            done(Overloaded(f"I/O lane {lane} is full"))
            return

        def call() -> None:
            try:
                result: Any = fn()
            except Exception as exc:
                result = exc
            finally:
                pool.slots.release()
            try:
                done(result)
            except (PaymentError, pykka.ActorDeadError) as exc:
                log.info("io.result_dropped", lane=lane, error=repr(exc))

        try:
            pool.pool.submit(call)
        except RuntimeError:  # pool shut down meanwhile
            pool.slots.release()

    def shutdown(self) -> None:
        """Refuse new calls; queued ones are dropped, running ones finish on their own."""
        with self._lock:
            self._closed = True
            lanes = list(self._lanes.values())
        for lane in lanes:
            lane.pool.shutdown(wait=False, cancel_futures=True)


class WallClockRuntime:
    """What the production runtimes share: the wall clock, one timer thread for every timer,
    and a bounded I/O lane per channel. Subclasses supply ``spawn`` (how actors run)."""

    def __init__(self, *, io_workers_per_lane: int = 4, io_queue_max: int = 1_000,
                 timers_max: int = 1_000_000) -> None:
        self._timers = TimerThread(self.now_ms, timers_max)
        self._io = IoLanes(io_workers_per_lane, io_queue_max)

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000

    def call_at(self, due_at_ms: int, fn: Callable[[], None]) -> TimerHandle:
        return self._timers.call_at(due_at_ms, fn)

    def run_io(self, lane: str, fn: Callable[[], Any], done: Callable[[Any], None]) -> None:
        self._io.run_io(lane, fn, done)

    def shutdown(self) -> None:
        """Stop timers and I/O lanes; queued timers are dropped."""
        self._timers.stop()
        self._io.shutdown()


class ThreadRuntime(WallClockRuntime):
    """Production runtime: wall clock, pykka ThreadingActors, a timer thread, I/O lanes.

    One OS thread per live actor: fine for a few hundred; ``actors.pool.PooledRuntime``
    (the default of ``Engine.open``) bounds the threads whatever the number of actors.
    """

    def spawn(self, name: str, behaviour: Behaviour) -> ActorRef:
        return PykkaRef(_PykkaHost.start(name, behaviour))
