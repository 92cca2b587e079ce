"""The pooled runtime (``actors.pool``): pykka's guarantees on a bounded pool of threads.

Each actor's messages are handled one at a time, in the order sent, exactly once, never on
two workers at once; ``on_start`` comes first; a stop comes after what was queued before it
and everything after it is refused; a failing told message stops the actor; asks time out
with ``pykka.Timeout``; the threads are bounded by configuration, never by actors. Then the
engine on it: the default runtime, ``actor_threads``, and the paced resume.
"""

from __future__ import annotations

import gc
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pykka
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from payengine import Engine, EngineConfig
from payengine.actors.pool import PooledRuntime
from payengine.actors.resume import ResumeFeeder
from payengine.engine.errors import EngineClosed, InvalidRequest
from tests.helpers import fuel_request, fund_customer, open_engine, paid_order, wait_for

TIMEOUT_S = 10.0


class Recorder:
    """A behaviour that records what it handles and fails loudly on overlap."""

    def __init__(self, on_message: Callable[[Any], Any] | None = None) -> None:
        self.started = False
        self.stopped = 0
        self.seen: list[Any] = []
        self.overlaps = 0
        self.before_start = 0
        self.threads: set[int] = set()
        self._busy = False
        self._on_message = on_message

    def on_start(self) -> None:
        time.sleep(0.001)  # a load from the database: messages arrive meanwhile
        self.started = True

    def on_message(self, message: Any) -> Any:
        if self._busy:
            self.overlaps += 1
        self._busy = True
        try:
            if not self.started:
                self.before_start += 1
            self.threads.add(threading.get_ident())
            self.seen.append(message)
            return self._on_message(message) if self._on_message else message
        finally:
            self._busy = False

    def on_stop(self) -> None:
        self.stopped += 1


@pytest.fixture
def runtime() -> Iterator[PooledRuntime]:
    rt = PooledRuntime(actor_threads=3, messages_per_turn=2)
    yield rt
    rt.shutdown()


# ---------------------------------------------------------------------- ordering


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 4), st.booleans()),
                     min_size=1, max_size=300),
       threads=st.integers(1, 4))
def test_each_actor_sees_each_senders_messages_once_in_send_order_never_concurrently(
        plan: list[tuple[int, int, bool]], threads: int) -> None:
    rt = PooledRuntime(actor_threads=threads, messages_per_turn=3)
    try:
        behaviours = [Recorder() for _ in range(5)]
        refs = [rt.spawn(f"a{i}", b) for i, b in enumerate(behaviours)]
        by_sender: dict[int, list[tuple[int, int, bool]]] = {}
        for n, (sender, actor, asked) in enumerate(plan):
            by_sender.setdefault(sender, []).append((n, actor, asked))

        def send(items: list[tuple[int, int, bool]], sender: int) -> None:
            for n, actor, asked in items:
                if asked:
                    assert refs[actor].ask((sender, n), TIMEOUT_S) == (sender, n)
                else:
                    refs[actor].tell((sender, n))

        senders = [threading.Thread(target=send, args=(items, s))
                   for s, items in by_sender.items()]
        for t in senders:
            t.start()
        for t in senders:
            t.join(TIMEOUT_S)
        for ref in refs:
            ref.ask("sync", TIMEOUT_S)
        for i, behaviour in enumerate(behaviours):
            got = [m for m in behaviour.seen if m != "sync"]
            sent = [(s, n) for n, (s, a, _) in enumerate(plan) if a == i]
            assert sorted(got) == sorted(sent)  # each exactly once
            for s in by_sender:
                assert [m for m in got if m[0] == s] == [m for m in sent if m[0] == s]
            assert behaviour.overlaps == 0 and behaviour.before_start == 0
        assert rt.pool.threads() <= threads
    finally:
        rt.shutdown()


def test_on_start_runs_before_the_first_message(runtime: PooledRuntime) -> None:
    behaviours = [Recorder() for _ in range(50)]
    refs = [runtime.spawn("a", b) for b in behaviours]
    for ref in refs:
        ref.tell("first")
    for ref in refs:
        ref.ask("sync", TIMEOUT_S)
    assert all(b.started and b.before_start == 0 and b.seen[0] == "first" for b in behaviours)


def test_a_busy_actor_does_not_starve_the_others() -> None:
    rt = PooledRuntime(actor_threads=1, messages_per_turn=4)
    try:
        busy = Recorder(lambda m: time.sleep(0.0005))
        busy_ref, other = rt.spawn("busy", busy), rt.spawn("other", Recorder())
        for i in range(2_000):
            busy_ref.tell(i)
        assert other.ask("hello", TIMEOUT_S) == "hello"
        assert len(busy.seen) < 2_000  # answered between two turns of the busy one
    finally:
        rt.shutdown()


# ---------------------------------------------------------------------- stop and failure


def test_a_stop_comes_after_what_was_queued_before_it_and_refuses_what_follows(
        runtime: PooledRuntime) -> None:
    gate = threading.Event()
    behaviour = Recorder(lambda m: gate.wait(TIMEOUT_S) if m == "block" else m)
    ref = runtime.spawn("a", behaviour)
    ref.tell("block")
    for i in range(5):
        ref.tell(i)
    ref.stop()
    late = ref.ask  # queued behind the stop: the actor is still alive when it is sent
    refused: list[BaseException] = []

    def ask_late() -> None:
        try:
            late("late", TIMEOUT_S)
        except BaseException as exc:
            refused.append(exc)

    asker = threading.Thread(target=ask_late)
    asker.start()
    time.sleep(0.05)
    gate.set()
    asker.join(TIMEOUT_S)
    assert behaviour.seen == ["block", 0, 1, 2, 3, 4]
    assert behaviour.stopped == 1 and not ref.alive
    assert len(refused) == 1 and isinstance(refused[0], pykka.ActorDeadError)
    with pytest.raises(pykka.ActorDeadError):
        ref.ask("after", TIMEOUT_S)
    ref.stop()  # a no-op on a stopped actor
    assert behaviour.stopped == 1


def test_a_failing_told_message_stops_the_actor_and_a_failing_ask_goes_to_the_asker(
        runtime: PooledRuntime) -> None:
    def handle(message: Any) -> Any:
        if message == "bad ask" or message == "bad tell":
            raise ValueError(message)
        return message

    behaviour = Recorder(handle)
    ref = runtime.spawn("a", behaviour)
    with pytest.raises(ValueError, match="bad ask"):
        ref.ask("bad ask", TIMEOUT_S)
    assert ref.alive and ref.ask("still here", TIMEOUT_S) == "still here"
    gate = threading.Event()
    behaviour._on_message = lambda m: gate.wait(TIMEOUT_S) and handle(m)
    ref.tell("block")
    ref.tell("bad tell")
    queued: list[BaseException] = []
    asker = threading.Thread(target=lambda: _catch(queued, lambda: ref.ask("queued", 5)))
    asker.start()
    time.sleep(0.05)
    gate.set()
    asker.join(TIMEOUT_S)
    wait_for(lambda: not ref.alive, what="the actor stopped on its failure")
    assert behaviour.seen[-1] == "bad tell"  # the queued ask was never handled
    assert behaviour.stopped == 0  # pykka: on_failure, not on_stop
    assert len(queued) == 1 and isinstance(queued[0], pykka.ActorDeadError)
    with pytest.raises(pykka.ActorDeadError):
        ref.ask("after", TIMEOUT_S)


def _catch(into: list[BaseException], fn: Callable[[], Any]) -> None:
    try:
        fn()
    except BaseException as exc:
        into.append(exc)


def test_a_failing_on_start_stops_the_actor_and_refuses_its_asks(
        runtime: PooledRuntime) -> None:
    class BadStart(Recorder):
        def on_start(self) -> None:
            raise RuntimeError("cannot load")

    ref = runtime.spawn("a", BadStart())
    with pytest.raises(pykka.ActorDeadError):
        ref.ask("hello", TIMEOUT_S)
    assert not ref.alive


def test_a_base_exception_from_on_start_stops_that_actor_and_the_worker_goes_on() -> None:
    """What escapes pykka's discipline (a BaseException) must not end a worker thread:
    the pool would shrink for good and the actor stay scheduled, its messages never
    handled (found in review)."""
    runtime = PooledRuntime(actor_threads=1)
    try:
        class ExitsAtStart(Recorder):
            def on_start(self) -> None:
                raise SystemExit("a handler asked to exit")

        bad = runtime.spawn("bad", ExitsAtStart())
        with pytest.raises(pykka.ActorDeadError):
            bad.ask("hello", TIMEOUT_S)
        assert not bad.alive
        good = runtime.spawn("good", Recorder())  # the only worker still serves others
        assert good.ask("still here", TIMEOUT_S) == "still here"
    finally:
        runtime.shutdown()


def test_an_ask_times_out_with_pykka_timeout(runtime: PooledRuntime) -> None:
    gate = threading.Event()
    ref = runtime.spawn("a", Recorder(lambda m: gate.wait(TIMEOUT_S)))
    ref.tell("block")
    with pytest.raises(pykka.Timeout):
        ref.ask("late", 0.05)
    gate.set()
    assert ref.ask("sync", TIMEOUT_S) is True


def test_after_shutdown_the_workers_leave_and_messages_are_refused() -> None:
    rt = PooledRuntime(actor_threads=2)
    ref = rt.spawn("a", Recorder())
    assert ref.ask("hello", TIMEOUT_S) == "hello"
    rt.shutdown()
    wait_for(lambda: rt.pool.threads() == 0, what="the workers left")
    with pytest.raises(pykka.ActorDeadError):
        ref.ask("late", TIMEOUT_S)
    assert not ref.alive
    with pytest.raises(EngineClosed):
        rt.spawn("b", Recorder())


# ---------------------------------------------------------------------- bounds


def test_threads_are_bounded_by_configuration_not_by_actors() -> None:
    before = threading.active_count()
    rt = PooledRuntime(actor_threads=4)
    try:
        behaviours = [Recorder(lambda m: time.sleep(0.0001)) for _ in range(2_000)]
        refs = [rt.spawn(f"a{i}", b) for i, b in enumerate(behaviours)]
        for ref in refs:
            ref.tell(1)
            ref.tell(2)
        peak = 0
        for ref in refs:
            ref.ask("sync", TIMEOUT_S)
            peak = max(peak, threading.active_count())
        assert rt.pool.threads() <= 4
        assert peak - before <= 4 + 1  # the workers and the timer thread
        assert all(b.seen == [1, 2, "sync"] for b in behaviours)
    finally:
        rt.shutdown()


def test_an_idle_actor_costs_well_under_a_kib() -> None:
    """Measured, for the record: about 650 bytes (a ThreadingActor is 5.6 KiB before its
    thread's stack)."""
    rt = PooledRuntime(actor_threads=2)
    try:
        behaviour = Recorder()
        warm = [rt.spawn("warm", behaviour) for _ in range(100)]
        for ref in warm:
            ref.ask(0, TIMEOUT_S)
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            refs = [rt.spawn(f"order:{i}", behaviour) for i in range(2_000)]
            for ref in refs:
                ref.ask(0, TIMEOUT_S)
            behaviour.seen.clear()
            gc.collect()
            per_actor = (tracemalloc.get_traced_memory()[0] - before) / len(refs)
        finally:
            tracemalloc.stop()
        assert per_actor < 1_024, per_actor
    finally:
        rt.shutdown()


def test_actor_threads_is_validated() -> None:
    for bad in (0, 257, True, 1.5):
        with pytest.raises(InvalidRequest):
            EngineConfig(actor_threads=bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidRequest):
            PooledRuntime(actor_threads=bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------------- the engine on it


def test_the_engine_runs_on_a_pool_of_actor_threads_by_default(tmp_path: Path) -> None:
    from tests.helpers import ScriptedChannel

    engine = Engine.open(tmp_path / "pay.db", channels=[ScriptedChannel()],
                         config=EngineConfig(actor_threads=2, duplicate_guard_window_ms=0))
    try:
        assert isinstance(engine.runtime, PooledRuntime)
        assert engine.runtime.pool.threads_max == 2
        fund_customer(engine)
        assert paid_order(engine).state == "succeeded"
        assert engine.runtime.pool.threads() <= 2
    finally:
        engine.shutdown()


class _FakeDirectory:
    """Records the feeder's tells; the test decides when each is handled."""

    def __init__(self, broken: set[str]) -> None:
        self.sent: list[tuple[str, Any]] = []
        self.broken = broken

    def offer(self, key: tuple[str, str], message: Any) -> bool:
        if key[1] in self.broken:
            return False
        self.sent.append((key[1], message))
        return True


class _ManualTimers:
    def __init__(self) -> None:
        self.now = 0
        self.due: list[tuple[int, Callable[[], None]]] = []

    def now_ms(self) -> int:
        return self.now

    def call_at(self, due_at_ms: int, fn: Callable[[], None]) -> Any:
        self.due.append((due_at_ms, fn))
        return None


@settings(max_examples=50, deadline=None)
@given(orders=st.integers(0, 60), in_flight_max=st.integers(1, 8),
       picks=st.lists(st.integers(0, 1_000), max_size=200), broken=st.sets(st.integers(0, 60)))
def test_the_resume_keeps_a_bounded_number_of_activations_in_flight(
        orders: int, in_flight_max: int, picks: list[int], broken: set[int]) -> None:
    import structlog

    ids = [f"o{i}" for i in range(orders)]
    directory = _FakeDirectory({f"o{i}" for i in broken})
    timers = _ManualTimers()
    feeder = ResumeFeeder(directory, timers, ids, grace_ms=600_000,  # type: ignore[arg-type]
                          log=structlog.get_logger(), in_flight_max=in_flight_max)
    feeder.start()
    handled = 0
    picks_left = iter(picks)
    while handled < len(directory.sent):
        in_flight = len(directory.sent) - handled
        assert in_flight <= in_flight_max
        # handle the in-flight ones in any order the test picks
        pick = next(picks_left, 0) % in_flight
        _, message = directory.sent[handled + pick]
        directory.sent[handled], directory.sent[handled + pick] = (
            directory.sent[handled + pick], directory.sent[handled])
        handled += 1
        message.done()
    fed = [order_id for order_id, _ in directory.sent]
    assert sorted(fed) == sorted(i for i in ids if i not in directory.broken)
    assert len(set(fed)) == len(fed)
    assert feeder.pending() == 0 and feeder.wait(0)


def test_a_reopened_engine_resumes_every_open_order(tmp_path: Path) -> None:
    from payengine.engine.order import OrderPolicy
    from payengine.sim.bench import SilentChannel

    policy = OrderPolicy(pay_window_ms=60 * 60 * 1000, query_schedule_ms=(60 * 60 * 1000,))
    engine = open_engine(tmp_path / "pay.db", SilentChannel(), policy)
    ids = []
    try:
        fund_customer(engine, red_packet=10**6, points=10**6, phone=10**6)
        for i in range(40):
            ids.append(engine.submit(fuel_request(f"order-{i}")).order_id)
        wait_for(lambda: all(engine.get_order(o).state == "paying" for o in ids),
                 what="every order paying")
    finally:
        engine.shutdown()
    reopened = open_engine(tmp_path / "pay.db", SilentChannel(), policy)
    try:
        wait_for(lambda: reopened.resuming() == 0, what="the resume")
        assert reopened._ctx.directory.count("order") == len(ids)
        # each resumed, then passivated: only waiting for its user, its timers armed
        wait_for(lambda: reopened._ctx.directory.live_count("order") == 0, what="passivation")
        assert all(reopened.get_order(o).state == "paying" for o in ids)
        runtime = reopened.runtime
        assert isinstance(runtime, PooledRuntime)
        assert runtime.pool.threads() <= EngineConfig().actor_threads
    finally:
        reopened.shutdown()


def test_a_passivated_order_wakes_on_its_timers_and_closes_at_its_window(
        tmp_path: Path) -> None:
    """An order only waiting for its user is passivated with its timers armed: each query
    timer starts it again from the database (no Activate: the pay is never re-sent), and
    the close timer closes it; the user's close of another passivated order is answered."""
    from payengine.engine.order import OrderPolicy
    from payengine.sim.bench import SilentChannel

    class Counting(SilentChannel):
        def __init__(self) -> None:
            self.calls: list[str] = []

        def pay(self, payment_serial: str, *args: Any) -> Any:
            self.calls.append("pay")
            return super().pay(payment_serial, *args)

        def query(self, payment_serial: str) -> Any:
            self.calls.append("query")
            return super().query(payment_serial)

        def close(self, payment_serial: str) -> Any:
            self.calls.append("close")
            return super().close(payment_serial)

    channel = Counting()
    policy = OrderPolicy(pay_window_ms=1_500, query_schedule_ms=(200, 200, 60_000))
    engine = open_engine(tmp_path / "pay.db", channel, policy)
    try:
        fund_customer(engine)
        timed = engine.submit(fuel_request("timed")).order_id
        closed = engine.submit(fuel_request("closed")).order_id
        directory = engine._ctx.directory
        wait_for(lambda: directory.live_count("order") == 0 and directory.count("order") == 2,
                 what="both passivated")
        assert engine.close(closed).state == "closed"
        wait_for(lambda: engine.get_order(timed).state == "closed", what="the timeout close")
        wait_for(lambda: directory.count("order") == 0, what="both settled")
        assert engine.get_order(timed).cause == "close_timeout"
        assert channel.calls.count("pay") == 2  # once per order, never re-sent on a wake-up
        assert channel.calls.count("query") >= 2  # the passivated order's query timers fired
    finally:
        engine.shutdown()
