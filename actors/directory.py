"""Where live actors are found, started on demand and let go when idle.

Every message to an order or account actor goes through ``Directory.tell`` / ``ask``: it
finds the live actor for the key or starts one (which loads its state from the database) and
enqueues the message, all under one short lock. Because of that lock the directory knows how
many messages each live actor was sent, and an actor may stop only when it has handled
exactly that many (``release``): nothing is ever left in a stopping actor's inbox, where
pykka would drop it. A later message simply starts a fresh actor from the database.

An actor may also be let go while its work goes on (``release`` with ``kept``): an open
order that only waits for its user's wallet or a timer is passivated, its actor gone, and
what it would need again (its armed timers' handles) kept here under its key. The next
message for the key starts a fresh actor from the database and hands it ``kept``
(``factory(key, kept)``); meanwhile the order costs a row, its timers and this entry, not an
actor. Passive entries count with the live ones in ``count`` (the live-order bound).

Threads: any thread may call ``tell``; ``ask`` only from outside actors (API threads), never
from an actor's handler, which must not block on another actor.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pykka

from payengine.actors.messages import Asked
from payengine.actors.runtime import ActorRef, Behaviour, Runtime
from payengine.engine.errors import ActorBroken, EngineClosed, Overloaded

Key = tuple[str, str]
"""(kind, id): ``("order", order_id)`` or ``("account", account_id)``."""


@dataclass(slots=True)
class _Live:
    ref: ActorRef
    behaviour: Behaviour
    sent: int = 0


class Directory:
    """Live actors by key. ``factory(key, kept)`` builds the behaviour of a new actor;
    ``kept`` is what its passivated predecessor left (``release``), or ``None``."""

    def __init__(self, runtime: Runtime, factory: Callable[[Key, Any], Behaviour]) -> None:
        self._runtime = runtime
        self._factory = factory
        self._live: dict[Key, _Live] = {}
        self._live_counts: Counter[str] = Counter()
        """Live actors by kind, kept with ``_live``: a submit reads it, and counting 100,000
        live orders per submit was O(live)."""
        self._passive: dict[Key, Any] = {}
        """Passivated actors: what each left for its successor (``release``)."""
        self._passive_counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._closed = False
        self._broken: dict[Key, str] = {}
        """Actors stopped on a broken invariant, with the error: refused until reopen."""
        self._told = 0
        self._handled = 0
        self._handled_lock = threading.Lock()

    def tell(self, key: Key, message: Any) -> None:
        self.offer(key, message)

    def offer(self, key: Key, message: Any) -> bool:
        """``tell``, saying if it was enqueued: not when the key is quarantined (dropped:
        the failure was logged when it broke)."""
        with self._lock:
            if key in self._broken:
                return False
            self._enqueue(key, message)
            return True

    def ask(self, key: Key, message: Any, timeout_s: float) -> Any:
        """Ask ``key``'s actor. An actor that stopped with the ask still queued (it failed on
        an earlier message, or was released in the same instant) never handled it: the ask
        goes once more, to an actor started afresh from the database, as ``tell`` does."""
        for attempt in range(2):
            with self._lock:
                live = self._enqueue_ask_slot(key)
                ref = live.ref
            try:
                return self._ask_live(key, ref, message, timeout_s)
            except pykka.ActorDeadError:
                if self._closed:
                    raise EngineClosed("the engine shut down before answering") from None
                if attempt == 1:
                    raise
        raise AssertionError("unreachable")

    def _ask_live(self, key: Key, ref: ActorRef, message: Any, timeout_s: float) -> Any:
        try:
            return ref.ask(Asked(message), timeout_s)
        except pykka.Timeout:
            raise Overloaded(
                f"{key[0]} {key[1]} did not answer within {timeout_s} s; the request may still "
                "be applied: retry it (every request is idempotent)"
            ) from None

    @property
    def backlog(self) -> int:
        """Messages sent to actors and not handled yet: how far behind the actors are."""
        return self._told - self._handled

    def note_handled(self) -> None:
        """Called by an actor after each message it handled (any thread)."""
        with self._handled_lock:
            self._handled += 1

    def _enqueue(self, key: Key, message: Any) -> None:
        live = self._get_or_start(key)
        live.sent += 1
        self._told += 1
        try:
            live.ref.tell(message)
        except pykka.ActorDeadError:
            # The actor died of a bug (its failure was logged); start it afresh from the
            # database once. A second death propagates.
            self._forget(key)
            self._forget_unhandled(live)
            live = self._get_or_start(key)
            live.sent += 1
            live.ref.tell(message)

    def _enqueue_ask_slot(self, key: Key) -> _Live:
        live = self._get_or_start(key)
        if not live.ref.alive:
            self._forget(key)
            self._forget_unhandled(live)
            live = self._get_or_start(key)
        live.sent += 1
        self._told += 1
        return live

    def _get_or_start(self, key: Key) -> _Live:
        if self._closed:
            raise EngineClosed("the engine is shut down")
        if key in self._broken:
            raise ActorBroken(f"{key[0]} {key[1]} stopped on a broken invariant "
                              f"({self._broken[key]}); it is quarantined until the engine "
                              "is reopened")
        live = self._live.get(key)
        if live is None:
            kept = self._passive.pop(key, None)
            if kept is not None:
                self._passive_counts[key[0]] -= 1
            try:
                behaviour = self._factory(key, kept)
                ref = self._runtime.spawn(f"{key[0]}:{key[1]}", behaviour)
            except BaseException:
                if kept is not None:  # not handed over: keep it for the next try
                    self._passive[key] = kept
                    self._passive_counts[key[0]] += 1
                raise
            live = _Live(ref, behaviour)
            self._live[key] = live
            self._live_counts[key[0]] += 1
        return live

    def _forget(self, key: Key) -> _Live | None:
        live = self._live.pop(key, None)
        if live is not None:
            self._live_counts[key[0]] -= 1
        return live

    def _forget_unhandled(self, live: _Live) -> None:
        """A dead actor's queued messages will never be handled: out of the backlog."""
        lost = live.sent - int(getattr(live.behaviour, "handled", live.sent))
        if lost > 0:
            with self._handled_lock:
                self._handled += lost

    def release(self, key: Key, behaviour: Behaviour, handled: int, kept: Any = None) -> bool:
        """Stop ``behaviour``'s actor if it handled every message it was sent; say if it did.

        ``kept`` (not ``None``): the actor is passivated, its work not done; the next actor
        started for ``key`` gets ``kept`` from the factory. Stored under the same lock as
        the release, so a message racing it finds either the live actor or ``kept``.
        Called by the actor itself, on its own thread, at the end of a handler.
        """
        with self._lock:
            live = self._live.get(key)
            if live is None or live.behaviour is not behaviour or live.sent != handled:
                return False
            self._forget(key)
            if kept is not None and not self._closed:
                self._passive[key] = kept
                self._passive_counts[key[0]] += 1
            live.ref.stop()
            return True

    def stopped(self, key: Key, behaviour: Behaviour) -> None:
        """``behaviour``'s actor is stopping (its own thread): if it is still the live one
        for ``key`` (it failed; a release or a quarantine forgot it already), forget it, and
        what it was sent and did not handle leaves the backlog. The next message to ``key``
        starts a fresh actor from the database."""
        with self._lock:
            live = self._live.get(key)
            if live is None or live.behaviour is not behaviour:
                return
            self._forget(key)
            self._forget_unhandled(live)

    def quarantine(self, key: Key, error: str) -> None:
        """Refuse every further message to ``key``: its actor broke an invariant.

        Called by the failing actor on its own thread. Restarting it would only replay the
        same decision and break again, in a hot loop; a reopen after a fix retries it.
        """
        with self._lock:
            self._broken.setdefault(key, error)
            live = self._forget(key)
            if live is not None:
                self._forget_unhandled(live)
        if live is not None:
            live.ref.stop()  # an asked actor survives its exception in pykka: stop it here

    def broken(self) -> dict[Key, str]:
        with self._lock:
            return dict(self._broken)

    def live_count(self, kind: str) -> int:
        """Live actors of ``kind`` (passivated ones not counted)."""
        with self._lock:
            return self._live_counts[kind]

    def count(self, kind: str) -> int:
        """Live and passivated actors of ``kind``: for orders, the orders in flight."""
        with self._lock:
            return self._live_counts[kind] + self._passive_counts[kind]

    def close(self) -> list[ActorRef]:
        """Refuse new messages; return the live actors for the caller to stop."""
        with self._lock:
            self._closed = True
            refs = [live.ref for live in self._live.values()]
            self._live.clear()
            self._live_counts.clear()
            self._passive.clear()  # their timers stop with the runtime
            self._passive_counts.clear()
        return refs
