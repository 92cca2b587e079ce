"""A deterministic runtime: the real actors on one thread, a seeded scheduler, virtual time.

The same behaviours that run on pykka ``ThreadingActor``s in production run here on
``SimActor``, a pykka ``Actor`` that supplies its own inbox, future and loop (the seam pykka's
gevent and eventlet actors used): its inbox is a deque the ``Scheduler`` watches, its loop is
one message per scheduler step, and its future is resolved by running the scheduler.

One ``random.Random(seed)`` decides everything: which runnable actor goes next, the latency
of every I/O call, and (through the simulated world) every fault. Time is virtual: timers
fire in order, and when nothing is runnable the clock jumps to the next timer. The same seed
gives the same run; ``Scheduler.trace_hash`` shows it.

Events have an owner. ``"engine"`` events (actor messages, the engine's timers and I/O
results) are lost in a crash; ``"world"`` events (the wallet's users paying, notifications
in flight) are not.

Threads: everything here runs on the caller's thread; nothing is thread-safe.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pykka
from pykka import Future
from pykka._envelope import Envelope
from pykka.messages import ProxyCall, ProxyGetAttr, ProxySetAttr, _ActorStop

from payengine.actors.runtime import ActorRef, Behaviour, BehaviourHost


class Deadlock(RuntimeError):
    """A future was waited on that can never be resolved: an ask inside a handler, or no
    work left that could answer it. Names the actors involved."""


class StepLimitReached(RuntimeError):
    """The run took more steps than its bound: a livelock, or a bound set too low."""


class _Event:
    """A timer, an I/O result or a world happening, due at a virtual time.

    The heap holds ``(due_at_ms, seq, event)`` tuples: ordered by tuple comparison in C,
    where a dataclass ``__lt__`` cost about 5 % of a simulation.
    """

    __slots__ = ("cancelled", "due_at_ms", "fn", "label", "owner")

    def __init__(self, due_at_ms: int, owner: str, label: str, fn: Callable[[], None]) -> None:
        self.due_at_ms = due_at_ms
        self.owner = owner
        self.label = label
        self.fn = fn
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Scheduler:
    """Picks the next thing to happen, by seed, and keeps virtual time."""

    def __init__(self, seed: int, *, start_ms: int = 1_700_000_000_000,
                 steps_max: int = 50_000_000) -> None:
        self.rng = random.Random(seed)
        self.now_ms = start_ms
        self.start_ms = start_ms
        self.steps = 0
        self.steps_max = steps_max
        self._events: list[tuple[int, int, _Event]] = []
        self._seq = itertools.count()
        self._runnable: list[SimActor] = []
        self._runnable_at: dict[int, int] = {}
        self.current: SimActor | None = None
        self._hash = hashlib.blake2b(digest_size=16)
        self._trace: list[str] = []
        """Trace lines not yet hashed: hashed in batches, which gives the same digest as
        line by line (a hash of a concatenation) for a fraction of the calls."""
        self.on_step: Callable[[], None] | None = None

    # -- what can happen

    def at(self, due_at_ms: int, fn: Callable[[], None], *, owner: str, label: str) -> _Event:
        due = max(due_at_ms, self.now_ms)
        event = _Event(due, owner, label, fn)
        heapq.heappush(self._events, (due, next(self._seq), event))
        return event

    def mark_runnable(self, actor: SimActor) -> None:
        key = id(actor)
        if key not in self._runnable_at:
            self._runnable_at[key] = len(self._runnable)
            self._runnable.append(actor)

    def _unmark(self, actor: SimActor) -> None:
        index = self._runnable_at.pop(id(actor), None)
        if index is None:
            return
        last = self._runnable.pop()
        if last is not actor:
            self._runnable[index] = last
            self._runnable_at[id(last)] = index

    def drop(self, owner: str, actors: list[SimActor]) -> None:
        """A crash: forget every pending event of ``owner`` and every inbox of ``actors``."""
        for _, _, event in self._events:
            if event.owner == owner:
                event.cancelled = True
        for actor in actors:
            actor.kill()
            self._unmark(actor)

    # -- running

    def step(self) -> bool:
        """Do one thing: handle one message, or fire one timer. False if nothing is left."""
        self.steps += 1
        if self.steps > self.steps_max:
            raise StepLimitReached(f"{self.steps_max} steps")
        events = self._events
        while events and events[0][2].cancelled:
            heapq.heappop(events)
        due_now = bool(events) and events[0][0] <= self.now_ms
        if self._runnable and not (due_now and self.rng.random() < 0.5):
            actor = self._runnable[self.rng.randrange(len(self._runnable))]
            self._run_actor(actor)
        elif events:
            _, _, event = heapq.heappop(events)
            self.now_ms = max(self.now_ms, event.due_at_ms)
            self._record(f"{self.now_ms}|{event.owner}|{event.label}")
            event.fn()
        else:
            return False
        if self.on_step is not None:
            self.on_step()
        return True

    def _run_actor(self, actor: SimActor) -> None:
        assert self.current is None, "an actor step inside another actor step"
        self.current = actor
        try:
            label = actor.step()
        finally:
            self.current = None
        self._record(f"{self.now_ms}|{actor.name}|{label}")
        if actor.actor_inbox.empty():
            self._unmark(actor)

    def run_until(self, done: Callable[[], bool], *, deadline_ms: int | None = None) -> bool:
        """Step until ``done()``; False if the work ran out or virtual time passed the deadline."""
        while not done():
            if deadline_ms is not None and self.now_ms > deadline_ms:
                return False
            next_due = None if deadline_ms is None or self._runnable else self.next_due_ms()
            if next_due is not None and deadline_ms is not None and next_due > deadline_ms:
                self.now_ms = deadline_ms + 1
                return False
            if not self.step():
                return False
        return True

    def run_until_idle(self) -> None:
        """Step until nothing is left to do (every timer fired, every inbox empty)."""
        while self.step():
            pass

    def idle(self) -> bool:
        return not self._runnable and self.next_due_ms() is None

    def has_work_now(self) -> bool:
        """Something can happen without virtual time passing: a message, or a due timer."""
        next_due = self.next_due_ms()
        return bool(self._runnable) or (next_due is not None and next_due <= self.now_ms)

    def next_due_ms(self) -> int | None:
        """When the next live event is due (cancelled ones at the top are dropped)."""
        events = self._events
        while events and events[0][2].cancelled:
            heapq.heappop(events)
        return events[0][0] if events else None

    def _record(self, line: str) -> None:
        trace = self._trace
        trace.append(line)
        if len(trace) >= 4_096:
            self._flush_trace()

    def _flush_trace(self) -> None:
        self._hash.update("".join(self._trace).encode())
        self._trace.clear()

    @property
    def trace_hash(self) -> str:
        self._flush_trace()
        return self._hash.hexdigest()


# ---------------------------------------------------------------------- pykka seam


class SimInbox:
    """An actor's inbox: a deque the scheduler is told about."""

    def __init__(self) -> None:
        self.queue: deque[Envelope[Any]] = deque()
        self.actor: SimActor | None = None

    def put(self, envelope: Envelope[Any], /) -> None:
        actor = self.actor
        if actor is None or actor.dead:
            if envelope.reply_to is not None:  # a crashed engine never answers
                envelope.reply_to.set_exception(
                    (pykka.ActorDeadError, pykka.ActorDeadError("actor lost in a crash"), None))
            return
        self.queue.append(envelope)
        actor.scheduler.mark_runnable(actor)

    def get(self) -> Envelope[Any]:
        return self.queue.popleft()

    def empty(self) -> bool:
        return not self.queue

    def has_messages(self) -> bool:
        return bool(self.queue)


class SimFuture(Future[Any]):
    """Resolved by running the scheduler; waiting on it inside a handler is a deadlock."""

    scheduler: Scheduler

    def __init__(self) -> None:
        super().__init__()
        self._value: Any = None
        self._exc: BaseException | None = None
        self._done = False
        self.target = "an actor"

    def get(self, *, timeout: float | None = None) -> Any:
        if not self._done:
            sched = self.scheduler
            if sched.current is not None:
                raise Deadlock(f"actor {sched.current.name} waits on a reply from "
                               f"{self.target} inside its handler: an ask cycle deadlocks")
            deadline = None if timeout is None else sched.now_ms + int(timeout * 1000)
            if not sched.run_until(lambda: self._done, deadline_ms=deadline):
                if deadline is not None and sched.now_ms > deadline:
                    raise pykka.Timeout(f"{timeout} seconds (virtual)")
                raise Deadlock(f"no work left that could answer: waiting on {self.target}")
        if self._exc is not None:
            raise self._exc
        return self._value

    def set(self, value: Any | None = None) -> None:
        self._value, self._done = value, True

    def set_exception(self, exc_info: Any = None) -> None:
        if exc_info is None:
            import sys

            exc_info = sys.exc_info()
        self._exc, self._done = exc_info[1], True


class _Flag:
    """``threading.Event`` as an actor's ``actor_stopped`` uses it, for one thread: a bool.
    (An Event is a condition variable and a lock, built per actor started.)"""

    __slots__ = ("_set",)

    def __init__(self) -> None:
        self._set = False

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True

    def clear(self) -> None:
        self._set = False

    def wait(self, timeout: float | None = None) -> bool:
        return self._set


class SimActor(BehaviourHost, pykka.Actor):
    """A pykka actor with no thread: the scheduler calls ``step`` for each message.

    Lighter than pykka's own start, which one thread does not need: no uuid4 (a urandom
    read) and no ``threading.Event`` per actor, no entry in pykka's ``ActorRegistry`` (a
    locked list, whose ``remove`` at each stop scans every live actor; nothing here looks
    actors up there).
    """

    scheduler: Scheduler
    name: str
    _serial = itertools.count()

    def __init__(self, name: str, behaviour: Behaviour) -> None:  # no super().__init__()
        self.actor_urn = f"urn:sim:{next(SimActor._serial)}"
        inbox = SimInbox()
        self.actor_inbox = inbox
        self.actor_stopped = _Flag()  # type: ignore[assignment]
        self._actor_ref = pykka.ActorRef(self)
        self.name = name
        self.behaviour = behaviour
        self.dead = False
        self.stop_after_step = False
        """Asked to stop (``_SimRef.stop``) by its own handler: it stops when the step
        ends, as a stop message would once the inbox is done, but without a step of its
        own (an empty inbox) or by a stop message behind what is queued."""
        inbox.actor = self

    @classmethod
    def start(cls, *args: Any, **kwargs: Any) -> pykka.ActorRef[Any]:
        actor = cls(*args, **kwargs)
        actor._start_actor_loop()
        return actor.actor_ref

    def _stop(self) -> None:
        self.actor_stopped.set()
        try:
            self.on_stop()
        except Exception:
            self._handle_failure(*_exc_info())

    @staticmethod
    def _create_actor_inbox() -> SimInbox:
        return SimInbox()

    def _start_actor_loop(self) -> None:
        self._actor_loop_setup()


    def step(self) -> str:
        """Handle one message as pykka's loop would; return a label for the trace."""
        inbox = self.actor_inbox
        assert isinstance(inbox, SimInbox)
        envelope = inbox.get()
        message = envelope.message
        inner = getattr(message, "message", message)
        label = type(inner).__name__
        if self.actor_stopped.is_set():
            self._refuse(envelope)
            return label + ":dead"
        try:
            if isinstance(message, _PYKKA_MESSAGES):
                response = self._handle_receive(message)
            else:  # what pykka's _handle_receive does for a plain message
                response = self.behaviour.on_message(message)
            if envelope.reply_to is not None:
                envelope.reply_to.set(response)
        except (Deadlock, StepLimitReached):
            raise
        except Exception:
            if envelope.reply_to is not None:
                envelope.reply_to.set_exception()
            else:
                self._handle_failure(*_exc_info())
                self.on_failure(*_exc_info())
        except BaseException:
            # A simulated crash in this handler: the message was taken off the inbox, so
            # kill() will not answer it. Answer its asker as a crash would (the actor died),
            # or an ask nested further up the stack would wait forever.
            if envelope.reply_to is not None:
                envelope.reply_to.set_exception(
                    (pykka.ActorDeadError, pykka.ActorDeadError("actor lost in a crash"), None))
            raise
        if self.stop_after_step:
            self.stop_after_step = False
            if self.actor_stopped.is_set():
                pass  # stopped by a failure already: no second on_stop
            elif inbox.has_messages():  # what is queued first, as with a stop message
                self.actor_ref.tell(_ActorStop())
            else:
                self._stop()
        if self.actor_stopped.is_set():
            while inbox.has_messages():
                self._refuse(inbox.get())
        return label

    def _refuse(self, envelope: Envelope[Any]) -> None:
        if envelope.reply_to is None:
            return
        if isinstance(envelope.message, _ActorStop):
            envelope.reply_to.set(None)
        else:
            envelope.reply_to.set_exception(
                (pykka.ActorDeadError, pykka.ActorDeadError(f"{self.name} stopped"), None))

    def kill(self) -> None:
        """A crash: no goodbye, no on_stop; queued messages are gone."""
        self.dead = True
        inbox = self.actor_inbox
        assert isinstance(inbox, SimInbox)
        for envelope in inbox.queue:
            if envelope.reply_to is not None:
                envelope.reply_to.set_exception(
                    (pykka.ActorDeadError, pykka.ActorDeadError("actor lost in a crash"), None))
        inbox.queue.clear()
        self.actor_stopped.set()


def _exc_info() -> Any:
    import sys

    return sys.exc_info()


_PYKKA_MESSAGES = (_ActorStop, ProxyCall, ProxyGetAttr, ProxySetAttr)
"""Messages pykka's ``_handle_receive`` handles itself; any other goes to the behaviour."""


@dataclass(frozen=True)
class _SimRef:
    ref: pykka.ActorRef[Any]
    name: str
    actor: SimActor

    def tell(self, message: Any) -> None:
        self.ref.tell(message)

    def ask(self, message: Any, timeout_s: float) -> Any:
        future = self.ref.ask(message, block=False)
        assert isinstance(future, SimFuture)
        future.target = self.name
        return future.get(timeout=timeout_s)

    def stop(self) -> None:
        if not self.ref.is_alive():
            return
        if self.actor.scheduler.current is self.actor:
            self.actor.stop_after_step = True  # its own handler let it go: see SimActor
        else:
            self.ref.tell(_ActorStop())

    @property
    def alive(self) -> bool:
        return bool(self.ref.is_alive())


# ---------------------------------------------------------------------- runtimes


class SimRuntime:
    """The engine's runtime on a scheduler: what ``actors.runtime.Runtime`` asks for.

    One per engine incarnation; ``crash`` drops this incarnation's actors, timers and I/O.
    """

    def __init__(self, scheduler: Scheduler, *, io_latency_ms: tuple[int, int] = (1, 20),
                 owner: str = "engine") -> None:
        self.scheduler = scheduler
        self.io_latency_ms = io_latency_ms
        self.owner = owner
        self._actors: list[SimActor] = []
        self._live_after_prune = 0
        future_cls = type("SimFutureFor", (SimFuture,), {"scheduler": scheduler})
        self._actor_class: type[SimActor] = type(
            "SimActorFor", (SimActor,),
            {"scheduler": scheduler, "_create_future": staticmethod(future_cls)},
        )
        self.crashed = False

    def now_ms(self) -> int:
        return self.scheduler.now_ms

    def call_at(self, due_at_ms: int, fn: Callable[[], None]) -> _Event:
        return self.scheduler.at(due_at_ms, fn, owner=self.owner, label="timer")

    def run_io(self, lane: str, fn: Callable[[], Any], done: Callable[[Any], None]) -> None:
        low, high = self.io_latency_ms
        latency = self.scheduler.rng.randint(low, high) if high > low else low

        def complete() -> None:
            try:
                result: Any = fn()
            except Exception as exc:
                result = exc
            done(result)

        self.scheduler.at(self.scheduler.now_ms + latency, complete, owner=self.owner,
                          label=f"io:{lane}")

    def spawn(self, name: str, behaviour: Behaviour) -> ActorRef:
        ref = self._actor_class.start(name, behaviour)
        inbox = ref.actor_inbox
        assert isinstance(inbox, SimInbox) and inbox.actor is not None
        actor = inbox.actor
        self._actors.append(actor)
        if len(self._actors) > 2 * self._live_after_prune + 64:  # amortised O(1) per spawn
            self._actors = [a for a in self._actors if not a.actor_stopped.is_set()]
            self._live_after_prune = len(self._actors)
        return _SimRef(ref, name, actor)

    def shutdown(self) -> None:
        for _, _, event in self.scheduler._events:
            if event.owner == self.owner:
                event.cancelled = True

    def crash(self) -> None:
        """Drop every actor, message, timer and I/O result of this engine incarnation."""
        self.crashed = True
        self.scheduler.drop(self.owner, self._actors)
        self._actors = []


class SimWorld:
    """The outside world's view of the scheduler (channels, users, the network): it
    survives engine crashes. Fits ``sim.channel.World``."""

    def __init__(self, scheduler: Scheduler, *, io_latency_ms: tuple[int, int] = (1, 20)) -> None:
        self.scheduler = scheduler
        self.io_latency_ms = io_latency_ms

    def now_ms(self) -> int:
        return self.scheduler.now_ms

    def call_at(self, due_at_ms: int, fn: Callable[[], None]) -> _Event:
        return self.scheduler.at(due_at_ms, fn, owner="world", label="world")

    def run_io(self, lane: str, fn: Callable[[], Any], done: Callable[[Any], None]) -> None:
        low, high = self.io_latency_ms
        latency = self.scheduler.rng.randint(low, high) if high > low else low

        def complete() -> None:
            try:
                result: Any = fn()
            except Exception as exc:
                result = exc
            done(result)

        self.scheduler.at(self.scheduler.now_ms + latency, complete, owner="world",
                          label=f"net:{lane}")
