"""Directory.ask against an actor that stops with the ask still queued: the ask was never
handled, so it goes once more to an actor started afresh (a flaky ActorDeadError seen after
a failed save under load)."""

from __future__ import annotations

from typing import Any

import pykka
import pytest

from payengine.actors.directory import Directory, Key
from payengine.engine.errors import EngineClosed


class _Ref:
    def __init__(self, dies: bool, on_ask: Any) -> None:
        self.dies = dies
        self.on_ask = on_ask
        self.alive = True
        self.asked: list[Any] = []

    def tell(self, message: Any) -> None:
        raise AssertionError("not told in these tests")

    def ask(self, message: Any, timeout_s: float) -> Any:
        self.asked.append(message)
        if self.on_ask is not None:
            self.on_ask()
        if self.dies:
            self.alive = False
            raise pykka.ActorDeadError("stopped before handling the message")
        return "answer"

    def stop(self) -> None:
        self.alive = False


class _Runtime:
    """Spawns refs that die on their first ask while ``deaths`` lasts."""

    def __init__(self, deaths: int) -> None:
        self.deaths = deaths
        self.spawned: list[_Ref] = []
        self.on_ask: Any = None

    def spawn(self, name: str, behaviour: Any) -> _Ref:
        ref = _Ref(self.deaths > 0, self.on_ask)
        self.deaths -= 1
        self.spawned.append(ref)
        return ref


def _directory(deaths: int) -> tuple[Directory, _Runtime]:
    runtime = _Runtime(deaths)
    return Directory(runtime, lambda key, kept: object()), runtime  # type: ignore[arg-type]


KEY: Key = ("order", "o1")


def test_an_ask_queued_to_an_actor_that_stopped_is_answered_by_a_fresh_actor() -> None:
    directory, runtime = _directory(deaths=1)
    assert directory.ask(KEY, "q", 1.0) == "answer"
    assert len(runtime.spawned) == 2
    assert [len(r.asked) for r in runtime.spawned] == [1, 1]


def test_an_ask_is_sent_at_most_twice_when_actors_keep_dying() -> None:
    directory, runtime = _directory(deaths=5)
    with pytest.raises(pykka.ActorDeadError):
        directory.ask(KEY, "q", 1.0)
    assert sum(len(r.asked) for r in runtime.spawned) == 2


def test_an_ask_whose_actor_stopped_because_the_engine_shut_is_engine_closed_not_resent(
        ) -> None:
    directory, runtime = _directory(deaths=5)
    runtime.on_ask = directory.close  # the shutdown stops the actor with the ask queued
    with pytest.raises(EngineClosed):
        directory.ask(KEY, "q", 1.0)
    assert sum(len(r.asked) for r in runtime.spawned) == 1


def test_messages_queued_behind_a_failure_leave_the_backlog_when_the_actor_stops() -> None:
    """A told message that raises stops its actor (pykka's discipline); what was queued
    behind it is never handled. Counted as still queued, it kept admission refusing submits
    (``Overloaded``) for as long as nobody wrote to that key again."""
    import threading
    import time

    from payengine.actors.pool import PooledRuntime

    gate = threading.Event()
    runtime = PooledRuntime(actor_threads=2)
    directory: Directory

    class Failing:
        handled = 0

        def on_start(self) -> None: ...

        def on_message(self, message: Any) -> None:
            self.handled += 1
            try:
                if message == "wait":
                    gate.wait(10)
                if message == "fail":
                    raise RuntimeError("a bug in a handler")
            finally:
                directory.note_handled()

        def on_stop(self) -> None: ...

        def on_failed(self) -> None:
            directory.stopped(KEY, self)

    directory = Directory(runtime, lambda key, kept: Failing())
    try:
        for message in ("wait", "fail", "never", "never"):
            directory.tell(KEY, message)
        assert directory.backlog == 4
        gate.set()
        deadline = time.monotonic() + 10
        while directory.backlog and time.monotonic() < deadline:
            time.sleep(0.01)
        assert directory.backlog == 0
        assert directory.live_count("order") == 0  # the next message starts a fresh actor
    finally:
        runtime.shutdown()
