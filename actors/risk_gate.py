"""The risk gate: assess a new payment before it is persisted (pass, block or step-up).

Where it runs, and why: in the submitting thread, after validation and before the order is
inserted (``Engine.submit``), so that

- a block is a typed refusal (``RiskBlocked``) with nothing created and nothing held: no
  order row, no hold, no journal entry, no event;
- the verdict is persisted in the same transaction as the order (a step-up order is born in
  ``needs_verification``): a crash leaves either no order or the order with its verdict,
  never an order whose assessment is lost (persist before act, with nothing to recover);
- an actor thread never waits for the risk service: only the submitting caller does, for
  at most ``RiskConfig.hook_timeout_ms``, on a bounded pool of its own.

What it costs: a submit's latency includes the risk service's answer (bounded by the
timeout), and a submit slot (``EngineConfig.submits_in_flight_max``) is held meanwhile.

The rules (``engine.risk.RiskRules``) are evaluated first, with velocity counted by the
store (bounded queries); a block by the rules never calls the service. Then the application's
hook (``RiskHook.assess``), if any, on the pool: its verdict is combined with the rules'
(the most severe wins). A hook that does not answer within the timeout, raises, returns
something other than a ``RiskVerdict``, or cannot be called because the pool is full follows
``RiskConfig.on_timeout`` (``pass``, ``block`` or ``step_up``), and the order's journal says
so. A step-up needs a code the user is sent: the hook's verdict carries it (its service sent
the SMS), or ``RiskConfig.issue_code`` is called (the application sends it); a step-up for
which no code can be had is a block (``step_up_unavailable``): fail closed.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from payengine.engine.checks import check_instance, check_int, check_setting, shown
from payengine.engine.errors import InvalidRequest, RiskBlocked
from payengine.engine.order import PaymentRequest
from payengine.engine.risk import (
    RiskFacts,
    RiskOutcome,
    RiskRules,
    RiskVerdict,
    Velocity,
    Verification,
    check_code,
    check_verdict,
    code_digest,
    worst,
)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RiskContext:
    """What the engine tells the risk service besides the request."""

    order_id: str
    """The id the order will have if it is created (a block creates nothing)."""
    now_ms: int
    rules: RiskVerdict
    """The configured rules' verdict (``pass`` or ``step_up``: a block never asks)."""
    velocity: Velocity


class RiskHook(Protocol):
    """The application's risk service. Called on the gate's own pool (never an actor's
    thread), at most ``RiskConfig.hook_timeout_ms`` waited for: give its client a timeout
    too, since a call that never returns keeps a pool thread."""

    def assess(self, request: PaymentRequest, context: RiskContext) -> RiskVerdict: ...


CodeIssuer = Callable[[PaymentRequest, RiskContext], str]
"""Sends the user a step-up code (an SMS) and returns it; the engine keeps its digest."""


@dataclass(frozen=True)
class RiskConfig:
    """The risk gate of one engine (``Engine.open(..., risk=RiskConfig(...))``)."""

    rules: RiskRules = field(default_factory=RiskRules)
    hook: RiskHook | None = None
    hook_timeout_ms: int = 300
    """How long a submit waits for the risk service (1..10,000 ms)."""
    on_timeout: RiskOutcome = RiskOutcome.PASS
    """What a payment gets when the risk service does not answer in time, raises, answers
    something that is not a ``RiskVerdict``, or cannot be asked (its pool is full)."""
    hook_threads: int = 4
    """Threads calling the risk service (1..64); at most twice as many calls are out at
    once, and a submit past that follows ``on_timeout`` without asking."""
    issue_code: CodeIssuer | None = None
    """For step-ups without a code from the hook (the rules', a default's): sends the user
    a code and returns it. Required when a rule or ``on_timeout`` may ask for a step-up."""
    verification_window_ms: int = 5 * 60 * 1000
    """How long a step-up waits for the right code (1 s..1 h; never past the pay window)."""
    verify_attempts_max: int = 3
    """Wrong codes after which the order fails (1..10)."""

    def __post_init__(self) -> None:
        check_instance(self.rules, RiskRules, "rules")
        check_setting(self.hook is None or callable(getattr(self.hook, "assess", None)),
                      f"hook must have an assess(request, context) method, not {shown(self.hook)}")
        check_int(self.hook_timeout_ms, "hook_timeout_ms", 1, 10_000)
        check_setting(isinstance(self.on_timeout, RiskOutcome),
                      f"on_timeout must be a RiskOutcome, not {shown(self.on_timeout)}")
        check_int(self.hook_threads, "hook_threads", 1, 64)
        check_setting(self.issue_code is None or callable(self.issue_code),
                      "issue_code must be callable")
        check_int(self.verification_window_ms, "verification_window_ms", 1_000, 3_600_000)
        check_int(self.verify_attempts_max, "verify_attempts_max", 1, 10)
        may_step_up = self.rules.may_step_up or (
            self.hook is not None and self.on_timeout is RiskOutcome.STEP_UP)
        check_setting(not may_step_up or self.issue_code is not None,
                      "a rule or on_timeout may ask for a step-up: issue_code must send the "
                      "user a code")


@dataclass(frozen=True, slots=True)
class Assessment:
    """The gate's decision for a payment that was not blocked."""

    verification: Verification | None
    note: str
    """Why, for the order's first journal entry when worth saying (a default taken)."""


class RiskGate:
    """Assesses submits for one engine; thread-safe (called by every submitting thread)."""

    def __init__(self, config: RiskConfig, count: Callable[..., int]) -> None:
        """``count``: ``Store.count_recent_orders``."""
        self.config = config
        self._count = count
        self._pool: _DaemonPool | None = None
        self._pool_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(2 * config.hook_threads)
        self._closed = False

    def shutdown(self) -> None:
        """Stop the pool; a call still out is not waited for (its thread ends with it)."""
        with self._pool_lock:
            self._closed = True
            if self._pool is not None:
                self._pool.shutdown()

    def assess(self, request: PaymentRequest, *, order_id: str, now_ms: int) -> Assessment:
        """Pass (``verification`` ``None``), step-up (a ``Verification``), or raise
        ``RiskBlocked`` (nothing created). Called before the order is inserted."""
        config = self.config
        facts = RiskFacts.of(request)
        velocity = self._velocity(facts, now_ms)
        verdict = config.rules.evaluate(facts, velocity)
        note = ""
        if verdict.outcome is not RiskOutcome.BLOCK and config.hook is not None:
            context = RiskContext(order_id, now_ms, verdict, velocity)
            answer, failure = self._call(lambda: check_verdict(config.hook.assess(  # type: ignore[union-attr]
                request, context)))
            if answer is None:
                answer = RiskVerdict(config.on_timeout, f"risk service {failure}")
                note = f"risk {config.on_timeout.value} by default: risk service {failure}"
            verdict = worst(verdict, answer)
        if verdict.outcome is RiskOutcome.BLOCK:
            raise RiskBlocked(f"the payment was refused by the risk check ({verdict.rule})",
                              verdict.rule)
        if verdict.outcome is RiskOutcome.PASS:
            return Assessment(None, note)
        code = verdict.code or self._issue_code(request, RiskContext(order_id, now_ms, verdict,
                                                                     velocity))
        return Assessment(Verification(
            code_digest(order_id, code), now_ms + config.verification_window_ms,
            config.verify_attempts_max, verdict.rule or "risk service"), note)

    def _velocity(self, facts: RiskFacts, now_ms: int) -> Velocity:
        rules = self.config.rules
        since = now_ms - rules.velocity_window_ms
        users = devices = None
        if rules.user_orders_max is not None:
            users = self._count(since_ms=since, until_ms=now_ms, count_max=rules.user_orders_max,
                                user_id=facts.user_id)
        if rules.device_orders_max is not None and facts.device_id is not None:
            devices = self._count(since_ms=since, until_ms=now_ms,
                                  count_max=rules.device_orders_max, device_id=facts.device_id)
        return Velocity(users or 0, devices)

    def _call(self, call: Callable[[], T]) -> tuple[T | None, str]:
        """``call()`` on the pool, waited for at most ``hook_timeout_ms``: its result, or
        ``None`` and what went wrong."""
        if not self._slots.acquire(blocking=False):
            return None, "busy (every call slot taken)"
        try:
            future = self._submit(call)
        except (RuntimeError, queue.Full):  # shut down (or, never, more than the slots)
            self._slots.release()
            return None, "unavailable (engine shutting down)"
        future.add_done_callback(lambda _: self._slots.release())
        try:
            return future.result(self.config.hook_timeout_ms / 1000), ""
        except concurrent.futures.TimeoutError:
            return None, f"timed out ({self.config.hook_timeout_ms} ms)"
        except InvalidRequest as error:
            return None, f"answered badly: {error.message}"
        except Exception as error:
            return None, f"failed ({type(error).__name__})"

    def _submit(self, call: Callable[[], Any]) -> concurrent.futures.Future[Any]:
        with self._pool_lock:
            if self._closed:
                raise RuntimeError("the risk gate is shut down")
            if self._pool is None:
                self._pool = _DaemonPool(self.config.hook_threads, 2 * self.config.hook_threads)
            return self._pool.submit(call)

    def _issue_code(self, request: PaymentRequest, context: RiskContext) -> str:
        """A code for a step-up the hook sent none for; none to be had is a block."""
        issue = self.config.issue_code
        if issue is None:
            raise RiskBlocked("the risk check asks for a verification, and no code can be "
                              "sent (step_up_unavailable)", "step_up_unavailable")
        code, failure = self._call(lambda: check_code(issue(request, context)))
        if code is None:
            raise RiskBlocked("the risk check asks for a verification, and sending the code "
                              f"{failure} (step_up_unavailable)", "step_up_unavailable")
        return code


class _DaemonPool:
    """A fixed pool of daemon threads with a bounded queue.

    Not a ``ThreadPoolExecutor``: its threads are joined when the interpreter exits, so one
    risk service call that never returns would keep the application from exiting. The
    callers bound what is queued (``RiskGate._slots``), so ``submit`` never waits."""

    def __init__(self, threads: int, queued_max: int) -> None:
        self._tasks: queue.Queue[tuple[Callable[[], Any], concurrent.futures.Future[Any]] | None]
        self._tasks = queue.Queue(maxsize=queued_max)
        self._threads = [threading.Thread(target=self._work, name=f"payengine-risk-{n}",
                                          daemon=True) for n in range(threads)]
        for thread in self._threads:
            thread.start()

    def submit(self, call: Callable[[], Any]) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._tasks.put_nowait((call, future))  # bounded by the caller's slots
        return future

    def shutdown(self) -> None:
        """Let every thread end once it has nothing to do (a hung call ends with it)."""
        for _ in self._threads:
            try:
                self._tasks.put_nowait(None)
            except queue.Full:
                break  # busy threads: they are daemons, nobody waits for them

    def _work(self) -> None:
        while (task := self._tasks.get()) is not None:
            call, future = task
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(call())
            except BaseException as error:  # handed to the waiting submit, never lost
                future.set_exception(error)
