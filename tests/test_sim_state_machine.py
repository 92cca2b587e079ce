"""A hypothesis state machine driving the real engine on the deterministic runtime.

Each example opens the engine on a fresh SQLite file with a ``SimRuntime`` on one seeded
``Scheduler`` (the seed is drawn by hypothesis), and a ``SimulatedChannel`` whose users never
pay on their own: paying is a rule. Hypothesis then picks the interleaving of submits
(duplicates included), users paying, duplicate and late "processing" callbacks, user
closes, crashes (plain, or armed to hit right after the next commit) with a reopen on the
same file, scheduler steps, and time advancing past the pay window. After every step the
invariants below are checked against the database; at teardown a quiet phase lets every
timer fire and the full money oracle compares the engine with the channel's ground truth.

Invariants after every step:

- vouchers: conservation, held equals pending holds, spent equals posted holds (the oracle's
  account checks);
- every journalled order transition is legal; a settled order passes the whole oracle,
  including the cash check against the channel; no hold is posted without a confirm;
- a succeeded order never has a cancelled, refused, reversed or refunded leg;
- every acknowledged receipt names an order that exists, under its merchant key, with the
  same order id and payment serial; ``get_order`` never raises for it;
- an order observed in a terminal state never changes state again.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import structlog
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from payengine import (
    CashPart,
    ChannelReply,
    Engine,
    EngineConfig,
    IdempotencyConflict,
    IllegalTransition,
    LegMode,
    OrderState,
    PaymentRequest,
    Receipt,
    VoucherPart,
)
from payengine.engine.order import TERMINAL_STATES, LegStatus
from payengine.sim.channel import ChannelFaults, SimulatedChannel
from payengine.sim.oracle import Violation, check
from payengine.sim.runtime import Scheduler, SimRuntime, SimWorld
from payengine.sim.simulation import SIM_POLICY, SeqIds, SimulatedCrash
from tests.helpers import signed_callback

T = TypeVar("T")

PLANTED_BUGS: frozenset[str] = frozenset()
"""Always empty here. To prove the machine has teeth, set it (from a scratch script, e.g. to
``{"no-refund-after-close"}``) and run ``EngineMachine``: hypothesis must find a violation."""

SETTINGS = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

MERCHANT = "station-1"
CUSTOMERS = ("alice", "bob")
STATES = frozenset(s.value for s in OrderState)
TERMINAL = frozenset(s.value for s in TERMINAL_STATES)
NOT_FOR_A_SUCCESS = frozenset({
    LegStatus.CANCELLING, LegStatus.CANCELLED, LegStatus.REFUSED, LegStatus.UNPAID,
    LegStatus.SHORTFALL, LegStatus.REVERSING, LegStatus.REVERSED, LegStatus.REFUNDING,
    LegStatus.REFUNDED, LegStatus.REFUND_FAILED, LegStatus.REFUND_UNKNOWN,
    LegStatus.RELEASE_FAILED,
})
ACCOUNT_INVARIANTS = frozenset({
    "voucher-non-negative", "voucher-conservation", "voucher-held-matches-holds",
    "voucher-spent-matches-posted",
})
MID_RUN_ORDER_INVARIANTS = frozenset({"legal-transition", "hold-posted-without-confirm"})
"""Order checks that hold at every instant; the rest (cash against the channel, vouchers kept
by an unpaid order) may be momentarily false while an order's follow-up is in flight, so
mid-run they are applied to settled orders only."""


def _step(fn: Callable[..., T]) -> Callable[..., T]:
    """Mark the machine interrupted while a rule or invariant runs: if one fails, teardown
    only cleans up (the failure is reported as it is, not hidden by a second one)."""

    @functools.wraps(fn)
    def step(self: EngineMachine, *args: object, **kwargs: object) -> T:
        self.interrupted = True
        result = fn(self, *args, **kwargs)
        self.interrupted = False
        return result

    return step


def _fmt(violations: list[Violation]) -> str:
    return "\n".join(str(v) for v in violations)


class EngineMachine(RuleBasedStateMachine):
    orders = Bundle("orders")

    def __init__(self) -> None:
        super().__init__()
        self.tmp: Path | None = None  # made by setup, removed by teardown
        self.engine: Engine | None = None
        self.runtime: SimRuntime | None = None
        self.requests: dict[str, PaymentRequest] = {}
        self.receipts: dict[str, Receipt] = {}
        self.last_state: dict[str, str] = {}
        self.submits = 0
        self.interrupted = False
        self.eager: set[str] = set()
        self.crashes = 0

    # ------------------------------------------------------------------ lifecycle

    @initialize(
        seed=st.integers(0, 2**16),
        pay_window_ms=st.sampled_from([1_500, 3_000, 10_000]),
        io_latency_ms=st.sampled_from([(1, 20), (1, 400)]),
        sync_failure=st.sampled_from([0.0, 0.15]),
        sync_timeout=st.sampled_from([0.0, 0.2]),
        sync_unknown_code=st.sampled_from([0.0, 0.2]),
        callback_lost=st.sampled_from([0.0, 0.4]),
        callback_duplicated=st.sampled_from([0.0, 0.4]),
        query_no_answer=st.sampled_from([0.0, 0.4]),
        query_says_processing=st.sampled_from([0.0, 0.4]),
        callback_delay_ms=st.sampled_from([(0, 50), (0, 2_000)]),
        funds=st.sampled_from([(300, 60), (1_000, 500)]),
    )
    @_step
    def setup(self, seed: int, pay_window_ms: int, io_latency_ms: tuple[int, int],
              sync_failure: float, sync_timeout: float, sync_unknown_code: float,
              callback_lost: float, callback_duplicated: float, query_no_answer: float,
              query_says_processing: float, callback_delay_ms: tuple[int, int],
              funds: tuple[int, int]) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="payengine-sm-"))
        self.path = self.tmp / "sm.db"
        self.sched = Scheduler(seed)
        self.sched.on_step = self._eager_users_pay
        self.world = SimWorld(self.sched, io_latency_ms=(1, 30))
        self.io_latency_ms = io_latency_ms
        self.faults = ChannelFaults(
            sync_failure=sync_failure, sync_timeout=sync_timeout,
            sync_unknown_code=sync_unknown_code, user_never_pays=1.0, user_pays_late=0.0,
            callback_lost=callback_lost, callback_duplicated=callback_duplicated,
            query_no_answer=query_no_answer, query_says_processing=query_says_processing,
            callback_delay_ms=callback_delay_ms,
        )
        self.channel = SimulatedChannel("wechat", self.world, seed=seed + 1,
                                        faults=self.faults, wait_for_ack=False)
        # the simulator's schedules (short, so a quiet phase ends soon), this example's window
        self.policy = replace(SIM_POLICY, pay_window_ms=pay_window_ms, planted_bugs=PLANTED_BUGS)
        self.config = EngineConfig(account_idle_ms=2_000, ask_timeout_s=30.0,
                                   planted_bugs=PLANTED_BUGS, duplicate_guard_window_ms=0)
        self.ids = SeqIds()
        self._open()
        engine = self._engine
        rp, pts = funds
        for who in CUSTOMERS:
            engine.open_account(f"{who}/rp", "CNY")
            engine.fund(f"{who}/rp", rp, funding_id=f"{who}/rp")
            engine.open_account(f"{who}/pts", "POINTS", minor_per_unit=10)
            engine.fund(f"{who}/pts", pts, funding_id=f"{who}/pts")

    @property
    def _engine(self) -> Engine:
        assert self.engine is not None, "the engine is down between rules"
        return self.engine

    def _open(self) -> None:
        self.runtime = SimRuntime(self.sched, io_latency_ms=self.io_latency_ms)
        self.engine = Engine.open(self.path, channels=[self.channel], policy=self.policy,
                                  config=self.config, runtime=self.runtime, ids=self.ids,
                                  synchronous="OFF")
        self.channel.attach(self.engine)

    def _crash(self) -> None:
        """Power loss: this incarnation's actors, messages, timers and I/O are gone."""
        engine, runtime = self.engine, self.runtime
        assert engine is not None and runtime is not None
        self.engine = None
        self.channel.attach(None)
        runtime.crash()
        engine.abandon()
        self.crashes += 1

    def _run_world_until(self, until_ms: int) -> None:
        """Let time pass; a crash armed on a commit is taken (and recovered) on the way."""
        sched = self.sched
        self._guarded(lambda: sched.run_until(lambda: sched.now_ms >= until_ms))
        if sched.now_ms < until_ms and sched.idle():
            sched.now_ms = until_ms  # nothing is scheduled: time passes all the same

    def _guarded(self, fn: Callable[[], T]) -> T:
        """Call ``fn``; if an armed crash hits inside it, crash, reopen and call it again
        (a client retries, every call is idempotent)."""
        while True:
            try:
                return fn()
            except SimulatedCrash:
                self._crash()
                self._open()

    def teardown(self) -> None:
        try:
            if self.runtime is not None and not self.interrupted:
                self._quiet_phase_and_final_check()
        finally:
            if self.engine is not None:
                with contextlib.suppress(Exception):
                    self.engine.shutdown()
            if self.tmp is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)

    def _quiet_phase_and_final_check(self) -> None:
        if self.engine is None:
            self._open()
        # faults off, but users still pay only when a rule made them (eager users included)
        self.channel.faults = replace(ChannelFaults.none(), user_never_pays=1.0)
        self._engine.store.after_commit = None
        self._guarded(self.sched.run_until_idle)
        engine = self._engine
        report = check(engine.store, {"wechat": self.channel}, now_ms=self.sched.now_ms)
        violations = list(report.violations)
        for no, receipt in self.receipts.items():
            found = engine.find_order(MERCHANT, no)
            if found.order_id != receipt.order_id:
                violations.append(Violation("one-order-per-key", f"key {no}",
                                            f"{receipt.order_id} != {found.order_id}"))
        for order in engine.store.iter_orders():
            if not order.is_settled and order.state is not OrderState.NEEDS_RECONCILIATION:
                violations.append(Violation(
                    "converged-after-quiet-phase", f"order {order.order_id}",
                    f"{order.state.value} with legs {[leg.status.value for leg in order.legs]}"))
        assert not violations, _fmt(violations) + "\n" + self._journals(violations)

    def _journals(self, violations: list[Violation]) -> str:
        lines = []
        for v in violations[:3]:
            if v.subject.startswith("order ") and self.engine is not None:
                order_id = v.subject.split(" ", 1)[1]
                lines.append(f"journal of {order_id}:")
                lines += [f"  {e.at_ms} {e.part} {e.from_state or '-'} -> {e.to_state} ({e.cause})"
                          for e in self.engine.journal(order_id)]
        return "\n".join(lines)

    # ------------------------------------------------------------------ rules

    @rule(target=orders,
          who=st.sampled_from(CUSTOMERS),
          cash_minor=st.integers(1, 300).map(lambda n: n * 100),
          rp=st.none() | st.tuples(st.sampled_from([100, 250]),
                                   st.sampled_from([LegMode.PRE_DEDUCT, LegMode.POST_DEDUCT])),
          pts=st.none() | st.tuples(st.sampled_from([20, 40]),
                                    st.sampled_from([LegMode.PRE_DEDUCT, LegMode.POST_DEDUCT])),
          pay_window_ms=st.none() | st.sampled_from([800, 5_000]))
    @_step
    def submit(self, who: str, cash_minor: int, rp: tuple[int, LegMode] | None,
               pts: tuple[int, LegMode] | None, pay_window_ms: int | None) -> Receipt:
        vouchers: list[VoucherPart] = []
        value = 0
        if rp is not None:
            vouchers.append(VoucherPart(f"{who}/rp", rp[0], rp[1]))
            value += rp[0]
        if pts is not None:
            vouchers.append(VoucherPart(f"{who}/pts", pts[0], pts[1]))
            value += pts[0] * 10
        self.submits += 1
        no = f"o{self.submits:04d}"
        request = PaymentRequest(MERCHANT, no, who, "CNY", cash_minor + value, "Fuel",
                                 CashPart(cash_minor, "wechat"), tuple(vouchers),
                                 pay_window_ms=pay_window_ms)
        receipt = self._guarded(lambda: self._engine.submit(request))
        assert receipt.merchant_order_no == no and receipt.total_minor == request.total_minor
        self.requests[no] = request
        self.receipts[no] = receipt
        return receipt

    @rule(receipt=orders, change=st.sampled_from([None, "total", "title", "window"]))
    @_step
    def duplicate_submit(self, receipt: Receipt, change: str | None) -> None:
        request = self.requests[receipt.merchant_order_no]
        if change is None:
            again = self._guarded(lambda: self._engine.submit(request))
            assert again == receipt, f"duplicate submit: {again} != {receipt}"
            return
        assert request.cash is not None
        if change == "total":
            other = PaymentRequest(
                request.merchant_id, request.merchant_order_no, request.user_id,
                request.currency, request.total_minor + 100, request.title,
                CashPart(request.cash.amount_minor + 100, "wechat"), request.vouchers,
                pay_window_ms=request.pay_window_ms)
        elif change == "title":
            other = PaymentRequest(
                request.merchant_id, request.merchant_order_no, request.user_id,
                request.currency, request.total_minor, request.title + " (again)",
                request.cash, request.vouchers, pay_window_ms=request.pay_window_ms)
        else:
            other = PaymentRequest(
                request.merchant_id, request.merchant_order_no, request.user_id,
                request.currency, request.total_minor, request.title, request.cash,
                request.vouchers, pay_window_ms=7_777)
        try:
            got = self._guarded(lambda: self._engine.submit(other))
        except IdempotencyConflict:
            return
        raise AssertionError(f"a submit with other parameters got a receipt: {got}")

    @precondition(lambda self: bool(self.receipts))
    @rule(data=st.data())
    @_step
    def user_pays(self, data: st.DataObject) -> None:
        """A user pays an order that may still be paid: now if the channel shows the payment,
        else as soon as the payment reaches the channel (the user is waiting at the code).
        The notification goes through the world, late, lost or twice per the channel's
        faults. An order the engine closed can still be paid while its close is on its way
        to the channel."""
        store = self._engine.store
        candidates = []
        for no, receipt in sorted(self.receipts.items()):
            payment = self.channel.payments.get(receipt.payment_serial)
            order = store.load_order(receipt.order_id)
            assert order is not None
            waiting = payment.state == "USERPAYING" if payment else not order.is_terminal
            if waiting:
                candidates.append(no)
        if not candidates:
            return
        serial = self.receipts[data.draw(st.sampled_from(candidates), label="order")].payment_serial
        if serial not in self.channel.payments:
            self.eager.add(serial)
        else:
            self.channel._user_pays(serial)

    def _eager_users_pay(self) -> None:
        """After every scheduler step: a waiting user pays the moment the payment shows."""
        if not self.eager:
            return
        for serial in sorted(self.eager):
            payment = self.channel.payments.get(serial)
            if payment is not None:
                self.eager.discard(serial)
                if payment.state == "USERPAYING":
                    self.channel._user_pays(serial)

    @rule(receipt=orders)
    @_step
    def duplicate_callback(self, receipt: Receipt) -> None:
        """The channel's final answer again, fed straight to the engine (acknowledged)."""
        payment = self.channel.payments.get(receipt.payment_serial)
        if payment is None or payment.state == "USERPAYING":
            return
        reply = self.channel._reply(payment)
        state = self._guarded(lambda: signed_callback(self._engine,
            "wechat", receipt.payment_serial, reply, wait=True))
        assert state in STATES, state

    @rule(receipt=orders, code=st.sampled_from(["USERPAYING", "NOTPAY", "SYSTEMERROR"]))
    @_step
    def late_processing_callback(self, receipt: Receipt, code: str) -> None:
        """A stale "still paying" notification arriving after the fact."""
        payment = self.channel.payments.get(receipt.payment_serial)
        if payment is None:
            return  # the channel was never asked: no notification can exist
        reply = ChannelReply("SUCCESS", code, payment.txn_id or None)
        before = self._engine.get_order(receipt.order_id).state
        state = self._guarded(lambda: signed_callback(self._engine,
            "wechat", receipt.payment_serial, reply, wait=True))
        assert state in STATES, state
        if before in TERMINAL:
            assert state == before, f"a processing callback moved {before} to {state}"

    @rule(receipt=orders)
    @_step
    def user_close(self, receipt: Receipt) -> None:
        try:
            view = self._guarded(lambda: self._engine.close(receipt.order_id))
        except IllegalTransition:
            state = self._engine.get_order(receipt.order_id).state
            assert state in (OrderState.SUCCEEDED, OrderState.DEDUCTING), (
                f"close refused as paid, but the order is {state}")
            return
        assert view.state in (OrderState.CLOSED, OrderState.FAILED), (
            f"close returned {view.state}")

    @rule(when=st.sampled_from(["now", "after-next-commit"]),
          downtime_ms=st.sampled_from([0, 50, 1_000, 5_000]))
    @_step
    def crash(self, when: str, downtime_ms: int) -> None:
        """Power loss, now or right after the engine's next commit (its decision durable, its
        effects lost: taken by whichever later rule drives the engine). While the server is
        down the world goes on (users may pay, notifications to it are lost); then the engine
        reopens on the same file."""
        if when == "after-next-commit":
            store = self._engine.store

            def crash_now() -> None:
                store.after_commit = None
                raise SimulatedCrash

            store.after_commit = crash_now
            return
        self._crash()
        target = self.sched.now_ms + downtime_ms
        self.sched.run_until(lambda: self.sched.now_ms >= target)
        if self.sched.now_ms < target and self.sched.idle():
            self.sched.now_ms = target
        self._open()

    @rule(delta_ms=st.sampled_from([1, 5, 20, 50, 200, 1_000, 3_500, 10_000]))
    @_step
    def advance_time(self, delta_ms: int) -> None:
        self._run_world_until(self.sched.now_ms + delta_ms)

    @rule(steps=st.integers(1, 30))
    @_step
    def run_steps(self, steps: int) -> None:
        """A few scheduler steps: one message or one timer each, in the seed's order."""
        def go() -> None:
            for _ in range(steps):
                if not self.sched.step():
                    return

        self._guarded(go)

    @rule()
    @_step
    def run_what_is_due(self) -> None:
        """Handle every message and timer due now, without letting time pass."""
        sched = self.sched

        self._guarded(lambda: sched.run_until(lambda: not sched.has_work_now()))

    @rule(receipt=orders)
    @_step
    def query(self, receipt: Receipt) -> None:
        view = self._engine.get_order(receipt.order_id)
        assert view.order_id == receipt.order_id
        assert view.state in STATES, view.state
        self._observe(receipt.order_id, view.state)

    # ------------------------------------------------------------------ invariants

    def _observe(self, order_id: str, state: str) -> None:
        last = self.last_state.get(order_id)
        if last in TERMINAL:
            assert state == last, f"order {order_id} was {last} (terminal), now {state}"
        self.last_state[order_id] = state

    @invariant()
    @_step
    def receipts_are_backed_by_their_orders(self) -> None:
        if self.engine is None:
            return
        engine = self.engine
        for no, receipt in self.receipts.items():
            view = engine.get_order(receipt.order_id)  # must not raise
            assert view.order_id == receipt.order_id
            assert view.payment_serial == receipt.payment_serial
            assert view.merchant_order_no == no
            assert view.state in STATES, view.state
            assert engine.store.order_id_for_merchant(MERCHANT, no) == receipt.order_id
            self._observe(receipt.order_id, view.state)

    @invariant()
    @_step
    def money_and_transitions_hold(self) -> None:
        if self.engine is None:
            return
        store = self.engine.store
        order_ids = sorted(r.order_id for r in self.receipts.values())
        report = check(store, {"wechat": self.channel}, order_ids=order_ids)
        settled = set()
        for order_id in order_ids:
            order = store.load_order(order_id)
            assert order is not None
            if order.is_settled:
                settled.add(f"order {order_id}")
            if order.state is OrderState.SUCCEEDED:
                bad = [leg for leg in order.legs if leg.status in NOT_FOR_A_SUCCESS]
                assert not bad, (f"succeeded order {order_id} has legs "
                                 f"{[(leg.leg_no, leg.status.value) for leg in bad]}")
        violations = [
            v for v in report.violations
            if v.invariant in ACCOUNT_INVARIANTS or v.invariant in MID_RUN_ORDER_INVARIANTS
            or v.subject in settled
        ]
        assert not violations, _fmt(violations) + "\n" + self._journals(violations)


def test_engine_state_machine_keeps_money_and_states_consistent() -> None:
    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    try:
        run_state_machine_as_test(EngineMachine, settings=SETTINGS)
    finally:
        structlog.configure(**saved)
