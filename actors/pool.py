"""The pooled production runtime: every actor runs on a small, bounded pool of threads.

``ThreadRuntime`` gives each live actor an OS thread (a pykka ``ThreadingActor``): 10,000
open orders were 10,100 threads. Here an actor is a ``PooledActor``, a pykka ``Actor`` that
supplies its own inbox and loop (the seam ``sim.runtime.SimActor`` uses): putting a message
in its inbox puts the actor on the pool's ready queue, at most once; a worker thread takes
it, handles up to ``messages_per_turn`` messages (so a busy actor cannot starve the others)
and puts it back if more are waiting. The threads are ``actor_threads`` workers (started on
demand), one timer thread and the I/O lanes, whatever the number of actors.

What pykka's loop guarantees holds here too: ``on_start`` runs before the first message; an
actor's messages are handled one at a time, in the order they were put, never on two
workers at once (an actor is on the ready queue or on one worker, never both, and never
twice: the ``scheduled`` flag, under the pool's lock); a stop is handled after the messages
queued before it, and every ask queued or sent after it gets ``pykka.ActorDeadError``; an
exception from a told message is logged (``on_failure``) and stops the actor, one from an
asked message goes back to the asker. Asks use pykka's ``ThreadingFuture``: ``ask`` from a
non-actor thread waits with a timeout and raises ``pykka.Timeout``.

A handler may block briefly (a store write waits for its commit): it holds its worker, so
``actor_threads`` bounds how many do at once. It must not ``ask`` another actor (the
directory's rule): with every worker waiting, nobody would answer.

Per actor, only what an idle actor needs: no thread, no uuid (a counter names it), a plain
flag instead of a ``threading.Event`` (nobody waits on it), an inbox whose deque exists only
while messages wait, and no entry in pykka's ``ActorRegistry`` (a global list under a global
lock, whose ``unregister`` scans it: O(live actors) per stop). ``ActorRegistry.stop_all``
therefore does not see pooled actors; ``Engine.shutdown`` stops them through its directory.
"""

from __future__ import annotations

import itertools
import sys
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, ClassVar

import pykka
from pykka import ThreadingFuture
from pykka._envelope import Envelope
from pykka.messages import _ActorStop

from payengine.actors.logs import get_logger
from payengine.actors.runtime import (
    ActorRef,
    Behaviour,
    BehaviourHost,
    PykkaRef,
    WallClockRuntime,
)
from payengine.engine.checks import check_int
from payengine.engine.errors import EngineClosed

log = get_logger("payengine.runtime")

ACTOR_THREADS_DEFAULT = 8
ACTOR_THREADS_MAX = 256
MESSAGES_PER_TURN = 16
"""How many messages a worker handles for one actor before it takes the next ready one."""

_serials = itertools.count()


class _StopFlag:
    """What pykka reads and writes of ``Actor.actor_stopped``: ``set`` and ``is_set``.

    A ``threading.Event`` is a condition, a lock and a waiters deque, about 1.2 KiB per
    actor; nobody waits on this one (a worker reads it, the pool sets it under its lock).
    """

    __slots__ = ("_is_set",)

    def __init__(self) -> None:
        self._is_set = False

    def set(self) -> None:
        self._is_set = True

    def is_set(self) -> bool:
        return self._is_set


class PoolInbox:
    """An actor's inbox. ``put`` (any thread) queues the envelope and makes the actor ready;
    ``get`` and ``empty`` (the actor's worker) are pykka's side. Guarded by the pool's lock."""

    __slots__ = ("actor", "envelopes", "scheduled", "started")

    def __init__(self) -> None:
        self.actor: PooledActor | None = None
        self.envelopes: deque[Envelope[Any]] | None = None
        """``None`` while empty: an empty deque is 760 bytes, and most actors idle."""
        self.scheduled = False
        """On the ready queue or on a worker: ``put`` must not queue the actor again."""
        self.started = False

    def put(self, envelope: Envelope[Any], /) -> None:
        actor = self.actor
        assert actor is not None, "an inbox is bound to its actor at creation"
        actor.pool.deliver(actor, envelope)

    def get(self) -> Envelope[Any]:
        envelopes = self.envelopes
        assert envelopes, "get() on an empty inbox"
        envelope = envelopes.popleft()
        if not envelopes:
            self.envelopes = None
        return envelope

    def empty(self) -> bool:
        return self.envelopes is None


class PooledActor(BehaviourHost, pykka.Actor):
    """A pykka actor without a thread of its own: ``ActorPool`` workers run its turns.

    Subclassed per runtime (``PooledRuntime``) to bind ``pool``.
    """

    pool: ClassVar[ActorPool]

    def __init__(self, name: str, behaviour: Behaviour) -> None:
        # Not pykka.Actor.__init__: it draws a uuid4 and makes a threading.Event per actor.
        self.actor_urn = f"urn:payengine:actor:{next(_serials)}"
        inbox = self._create_actor_inbox()
        inbox.actor = self
        self.actor_inbox = inbox
        self.actor_stopped = _StopFlag()  # type: ignore[assignment]
        self._actor_ref = pykka.ActorRef(self)
        self.name = name
        self.behaviour = behaviour

    @staticmethod
    def _create_actor_inbox() -> PoolInbox:
        return PoolInbox()

    @staticmethod
    def _create_future() -> pykka.Future[Any]:
        return ThreadingFuture()

    def _start_actor_loop(self) -> None:
        self.pool.start(self)

    @classmethod
    def spawn(cls, name: str, behaviour: Behaviour) -> pykka.ActorRef[PooledActor]:
        """``Actor.start`` without the ``ActorRegistry`` (see the module's docstring)."""
        actor = cls(name, behaviour)
        actor._start_actor_loop()
        return actor.actor_ref

    def _stop(self) -> None:
        """pykka's ``_stop`` less the registry it was never in. On its worker."""
        self.actor_stopped.set()
        try:
            self.on_stop()
        except Exception:
            self._handle_failure(*sys.exc_info())

    def handle(self, envelope: Envelope[Any]) -> None:
        """One message, as pykka's ``_actor_loop_running`` handles it. On its worker."""
        try:
            response = self._handle_receive(envelope.message)
            if envelope.reply_to is not None:
                envelope.reply_to.set(response)
        except Exception:
            if envelope.reply_to is not None:
                envelope.reply_to.set_exception()
            else:
                self._handle_failure(*sys.exc_info())
                try:
                    self.on_failure(*sys.exc_info())
                except Exception:
                    self._handle_failure(*sys.exc_info())
        except BaseException as exc:
            # pykka stops every actor of the process here; a pool stops this one and keeps
            # its worker for the others.
            log.critical("actor.aborted", actor=self.name, error=repr(exc))
            if envelope.reply_to is not None:
                envelope.reply_to.set_exception()
            self._stop()


def refuse(envelope: Envelope[Any], name: str) -> None:
    """Answer a message a stopped actor will never handle, as pykka's teardown does."""
    if envelope.reply_to is None:
        return
    if isinstance(envelope.message, _ActorStop):
        envelope.reply_to.set(None)
    else:
        envelope.reply_to.set_exception((pykka.ActorDeadError, pykka.ActorDeadError(
            f"{name} stopped before handling the message"), None))


class ActorPool:
    """The ready queue and the worker threads that run actors' turns.

    One lock (a condition) guards the ready queue and every inbox: ``deliver`` and the
    workers hold it only to move an envelope or an actor. The ready queue holds each actor
    at most once, so it is bounded by the live actors.
    """

    def __init__(self, threads_max: int = ACTOR_THREADS_DEFAULT,
                 messages_per_turn: int = MESSAGES_PER_TURN) -> None:
        self.threads_max = check_int(threads_max, "actor_threads", 1, ACTOR_THREADS_MAX)
        self.messages_per_turn = check_int(messages_per_turn, "messages_per_turn", 1, 10_000)
        self._cond = threading.Condition(threading.Lock())
        self._ready: deque[PooledActor] = deque()
        self._threads = 0
        self._idle = 0
        self._closed = False

    # -- any thread

    def start(self, actor: PooledActor) -> None:
        """Make a new actor ready: its first turn runs ``on_start``."""
        with self._cond:
            if self._closed:
                raise EngineClosed("the actor pool is shut down")
            actor.actor_inbox.scheduled = True  # type: ignore[attr-defined]
            self._make_ready(actor)

    def deliver(self, actor: PooledActor, envelope: Envelope[Any]) -> None:
        """Queue ``envelope`` for ``actor``; refuse it if the actor stopped (or the pool
        stopped for good: then the actor counts as stopped)."""
        inbox: PoolInbox = actor.actor_inbox  # type: ignore[assignment]
        with self._cond:
            if self._closed and self._threads == 0:
                actor.actor_stopped.set()
            if not actor.actor_stopped.is_set():
                if inbox.envelopes is None:
                    inbox.envelopes = deque()
                inbox.envelopes.append(envelope)
                if not inbox.scheduled:
                    inbox.scheduled = True
                    self._make_ready(actor)
                return
        refuse(envelope, actor.name)

    def shutdown(self) -> None:
        """Let the workers go once the ready queue is empty. Messages put before that are
        still handled (the stops ``Engine.shutdown`` sends, mostly); later ones are
        refused and their actors count as stopped."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def threads(self) -> int:
        with self._cond:
            return self._threads

    def ready_count(self) -> int:
        """Actors with messages waiting for a worker thread (the pool's queue; metrics)."""
        with self._cond:
            return len(self._ready)

    # -- under the lock

    def _make_ready(self, actor: PooledActor) -> None:
        self._ready.append(actor)
        if self._idle:
            self._cond.notify()
        elif self._threads < self.threads_max:
            self._threads += 1
            threading.Thread(target=self._work, name=f"actor-pool-{self._threads}",
                             daemon=True).start()

    # -- worker threads

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._ready:
                    if self._closed:
                        self._threads -= 1
                        return
                    self._idle += 1
                    self._cond.wait()
                    self._idle -= 1
                actor = self._ready.popleft()
            try:
                self._run_turn(actor)
            except BaseException as exc:
                # Exceptions are handled by the actor (pykka's discipline); what escapes is a
                # BaseException (SystemExit from a handler...). Ending the thread here would
                # shrink the pool for good and leave the actor scheduled with its messages
                # never handled: stop the actor instead, loudly, and go on.
                log.critical("actor.escaped", actor=actor.name, error=repr(exc))
                self._abandon(actor)

    def _abandon(self, actor: PooledActor) -> None:
        """Stop ``actor`` after an escape: its waiting askers get ``ActorDeadError``."""
        inbox: PoolInbox = actor.actor_inbox  # type: ignore[assignment]
        actor.actor_stopped.set()
        actor.behaviour_failed()
        with self._cond:
            left = inbox.envelopes or deque()
            inbox.envelopes = None
            inbox.scheduled = False
        for envelope in left:
            refuse(envelope, actor.name)

    def _run_turn(self, actor: PooledActor) -> None:
        """Up to ``messages_per_turn`` messages of ``actor``, then requeue or release it."""
        inbox: PoolInbox = actor.actor_inbox  # type: ignore[assignment]
        if not inbox.started:
            inbox.started = True
            actor._actor_loop_setup()  # on_start; a failure stops the actor (pykka's way)
        stopped = actor.actor_stopped
        for _ in range(self.messages_per_turn):
            if stopped.is_set():
                break
            with self._cond:
                if inbox.envelopes is None:
                    break
                envelope = inbox.get()
            actor.handle(envelope)
        with self._cond:
            if stopped.is_set():
                left = inbox.envelopes or deque()
                inbox.envelopes = None
                inbox.scheduled = False
            elif inbox.envelopes is not None:
                self._ready.append(actor)  # still scheduled; no new thread for a requeue
                return
            else:
                inbox.scheduled = False
                return
        for envelope in left:
            refuse(envelope, actor.name)


@dataclass(frozen=True)
class PooledRef(PykkaRef):
    """``actors.runtime.ActorRef`` of a pooled actor: a stop is a message in its inbox (no
    thread of its own to stop)."""

    def stop(self) -> None:
        """Stop after the messages already queued; a no-op on a stopped actor."""
        if self.ref.is_alive():
            self.ref.actor_inbox.put(Envelope(_ActorStop()))


class PooledRuntime(WallClockRuntime):
    """Production runtime: wall clock, pooled actors, one timer thread, I/O lanes.

    Threads: ``actor_threads`` workers (started as work arrives), the timer thread, and
    ``io_workers_per_lane`` per I/O lane used; never one per actor.
    """

    def __init__(self, *, actor_threads: int = ACTOR_THREADS_DEFAULT,
                 messages_per_turn: int = MESSAGES_PER_TURN, io_workers_per_lane: int = 4,
                 io_queue_max: int = 1_000, timers_max: int = 1_000_000) -> None:
        super().__init__(io_workers_per_lane=io_workers_per_lane, io_queue_max=io_queue_max,
                         timers_max=timers_max)
        self.pool = ActorPool(actor_threads, messages_per_turn)
        self._actor_class: type[PooledActor] = type(
            "PooledActorFor", (PooledActor,), {"pool": self.pool})

    def spawn(self, name: str, behaviour: Behaviour) -> ActorRef:
        return PooledRef(self._actor_class.spawn(name, behaviour))

    def shutdown(self) -> None:
        """Stop timers and I/O lanes; the workers leave once the actors' queued messages
        (and the stops sent right after this) are handled."""
        super().shutdown()
        self.pool.shutdown()
