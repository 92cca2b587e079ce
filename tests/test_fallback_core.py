"""The routing fallback in the pure core (``engine.order``): any interleaving of the channels'
answers, late payments, lost messages and restarts. Never two kept charges, never a fallback
from a channel that may still charge (after a processing, timeout or non-retryable answer),
and every decided step's command is sent again after a restart."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from payengine.engine.codes import ResultKind
from payengine.engine.errors import IllegalTransition, NotificationRejected
from payengine.engine.order import (
    Activate,
    ArmTimer,
    CashPart,
    CashResult,
    ChooseRoute,
    CloseCash,
    Effect,
    FallbackStep,
    LegStatus,
    OrderEvent,
    OrderPolicy,
    OrderState,
    PayCash,
    PaymentOrder,
    PaymentRequest,
    QueryCash,
    RefundCash,
    RefundResult,
    RefundStatus,
    Rerouted,
    ResultSource,
    TimerFired,
    TimerKind,
    build_order,
    decide,
)

T0 = 1_700_000_000_000
CHANNELS = ("a", "b", "c")
AMOUNT = 5_000
BEHAVIOURS = ("refuse_retryable", "refuse_final", "pays", "user_paying", "timeout", "liar")
"""How a channel answers a new pay: ``liar`` refuses with a retryable code, then charges
all the same later (a wallet's fault: the late money must be refunded by it)."""


def new_order(fallbacks_max: int, bugs: frozenset[str] = frozenset(),
              without_close: frozenset[str] = frozenset()) -> tuple[PaymentOrder, OrderPolicy]:
    policy = OrderPolicy(pay_window_ms=60_000, query_schedule_ms=(1_000, 2_000),
                         fallbacks_max=fallbacks_max, planted_bugs=bugs,
                         channels_without_close=without_close)
    request = PaymentRequest("m", "o-1", "u", "CNY", AMOUNT, "Fuel", CashPart(AMOUNT, "qr"))
    order = build_order(request, order_id="o1", payment_serial="S1", now_ms=T0, accounts={},
                        policy=policy, cash_channel="a")
    return replace(order, method="qr"), policy


@dataclass
class Record:
    """A channel's truth about one serial."""

    state: str  # refused_r, refused_f, user_paying, paid, closed
    charged: bool = False
    refunded: bool = False


@dataclass
class World:
    behaviours: dict[str, str]
    order: PaymentOrder
    policy: OrderPolicy
    now_ms: int = T0
    records: dict[tuple[str, str], Record] = field(default_factory=dict)
    pending: list[Effect] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)

    def feed(self, event: OrderEvent) -> None:
        try:
            decision = decide(self.order, event, now_ms=self.now_ms, policy=self.policy)
        except (IllegalTransition, NotificationRejected):
            return
        for effect in decision.effects:
            if isinstance(effect, PayCash):
                self._check_pay(self.order, effect)
        self.order = decision.order
        self.pending += [e for e in decision.effects if not isinstance(e, ArmTimer)]

    def _check_pay(self, before: PaymentOrder, pay: PayCash) -> None:
        """A pay through a new route: the route it leaves must be unable to charge."""
        cash = before.cash_leg
        assert cash is not None and cash.channel is not None
        if pay.payment_serial == before.payment_serial:
            return
        record = self.records.get((cash.channel, before.payment_serial))
        if record is None and cash.channel in self.policy.channels_without_close:
            return  # its query said "not found" and it cannot be closed: left as it is
        if record is None or record.state not in ("refused_r", "closed") or record.charged:
            self.violations.append(f"paid {pay.channel} while {cash.channel} "
                                   f"{before.payment_serial} is "
                                   f"{'unknown' if record is None else record.state}")

    def answer(self, effect: Effect) -> None:
        match effect:
            case PayCash():
                self.feed(self._pay(effect))
            case QueryCash():
                self.feed(self._query(effect.channel, effect.payment_serial))
            case CloseCash():
                record = self.records.setdefault((effect.channel, effect.payment_serial),
                                                 Record("closed"))
                if record.state == "user_paying":
                    record.state = "closed"
                self.feed(self._reply(effect.channel, effect.payment_serial,
                                      ResultSource.CLOSE))
            case ChooseRoute():
                left = [c for c in CHANNELS if c not in effect.excluded]
                self.feed(Rerouted(left[0], "chosen") if left else Rerouted(None, "none left"))
            case RefundCash():
                record = self.records[(effect.channel, effect.payment_serial)]
                if record.charged:
                    record.refunded = True
                self.feed(RefundResult(effect.refund_id, ResultKind.SUCCESS, ResultSource.SYNC,
                                       "SUCCESS"))

    def _pay(self, pay: PayCash) -> CashResult:
        key = (pay.channel, pay.payment_serial)
        if key not in self.records:
            behaviour = self.behaviours[pay.channel]
            state = {"refuse_retryable": "refused_r", "liar": "refused_r",
                     "refuse_final": "refused_f",
                     "pays": "paid"}.get(behaviour, "user_paying")
            self.records[key] = Record(state, charged=state == "paid")
            if behaviour == "timeout":
                return CashResult(ResultKind.PROCESSING, ResultSource.SYNC,
                                  "ERROR:TimeoutError", payment_serial=pay.payment_serial)
        return self._reply(pay.channel, pay.payment_serial, ResultSource.SYNC)

    def _query(self, channel: str, serial: str) -> CashResult:
        if (channel, serial) not in self.records:
            return CashResult(ResultKind.PROCESSING, ResultSource.QUERY, "ORDERNOTEXIST",
                              payment_serial=serial, not_found=True)
        return self._reply(channel, serial, ResultSource.QUERY)

    def _reply(self, channel: str, serial: str, source: ResultSource) -> CashResult:
        record = self.records[(channel, serial)]
        kind, code, retryable = {
            "refused_r": (ResultKind.FAILURE, "BANK_DOWN", True),
            "refused_f": (ResultKind.FAILURE, "PAYERROR", False),
            "user_paying": (ResultKind.PROCESSING, "USERPAYING", False),
            "paid": (ResultKind.SUCCESS, "SUCCESS", False),
            "closed": (ResultKind.FAILURE, "CLOSED", False),
        }[record.state]
        txn = f"TX-{channel}-{serial}" if kind is ResultKind.SUCCESS else None
        return CashResult(kind, source, code, txn, AMOUNT if txn else None,
                          payment_serial=serial, retryable=retryable)

    def user_pays(self, index: int) -> None:
        """A payer pays a serial still waiting for them; its wallet notifies (verified)."""
        self._charge([k for k, r in self.records.items() if r.state == "user_paying"], index)

    def late_charge(self, index: int) -> None:
        """A lying wallet charges a serial it refused (or that was closed) after all."""
        self._charge([k for k, r in self.records.items()
                      if self.behaviours[k[0]] == "liar" and not r.charged], index)

    def _charge(self, candidates: list[tuple[str, str]], index: int) -> None:
        if not candidates:
            return
        channel, serial = candidates[index % len(candidates)]
        record = self.records[(channel, serial)]
        record.state, record.charged = "paid", True
        self.feed(replace(self._reply(channel, serial, ResultSource.NOTIFICATION),
                          channel=channel))

    def restart(self) -> None:
        """The process died: what was in flight is lost; the order reloads and activates."""
        self.pending.clear()
        self.order = replace(self.order, pay_in_flight=False, confirm_query_at_ms=None)
        self.feed(Activate())

    def timers(self) -> None:
        order = self.order
        if order.next_query_at_ms is not None:
            self.now_ms = max(self.now_ms, order.next_query_at_ms)
            self.feed(TimerFired(TimerKind.QUERY, self.order.query_attempt))

    def settle(self) -> None:
        """Answer everything, let the window close and every schedule run out."""
        for _ in range(200):
            if self.pending:
                self.answer(self.pending.pop(0))
                continue
            if not self.order.is_terminal:
                self.now_ms = max(self.now_ms, self.order.close_at_ms)
                self.feed(TimerFired(TimerKind.CLOSE, 0))
            elif self._renotify():
                continue
            elif self.order.cash_leg is not None and (
                self.order.cash_leg.status is LegStatus.PAYING
            ) and self.order.next_query_at_ms is not None:
                self.timers()
            elif any(r.status is RefundStatus.REFUNDING for r in self.order.refunds) and (
                self.order.next_refund_query_at_ms is not None
            ):
                self.now_ms = max(self.now_ms, self.order.next_refund_query_at_ms)
                self.feed(TimerFired(TimerKind.REFUND_QUERY, self.order.refund_query_attempt))
            else:
                return

    def _renotify(self) -> bool:
        """The wallet sends an unacknowledged notification again: a charge the order does
        not show (its confirming query may have been lost in a restart)."""
        for (channel, serial), record in self.records.items():
            if record.charged and not record.refunded and (
                serial != self.order.payment_serial
            ) and self.order.refund(refund_no=f"charge:TX-{channel}-{serial}") is None:
                self.feed(replace(self._reply(channel, serial, ResultSource.NOTIFICATION),
                                  channel=channel))
                return bool(self.pending)
        return False


STEPS = st.lists(st.tuples(st.sampled_from(("answer",) * 6 + ("drop", "user", "restart",
                                                                 "timer", "late")),
                           st.integers(0, 7)), max_size=60)
LIKELY = st.sampled_from(("refuse_retryable",) * 3 + ("liar",) * 2 + BEHAVIOURS)


@settings(max_examples=300, deadline=None)
@given(behaviours=st.tuples(LIKELY, LIKELY, LIKELY),
       fallbacks_max=st.integers(0, 3), steps=STEPS,
       without_close=st.frozensets(st.sampled_from(CHANNELS)))
def test_no_interleaving_keeps_two_charges_or_leaves_a_channel_that_may_charge(
        behaviours: tuple[str, str, str], fallbacks_max: int,
        steps: list[tuple[str, int]], without_close: frozenset[str]) -> None:
    order, policy = new_order(fallbacks_max, without_close=without_close)
    world = World(dict(zip(CHANNELS, behaviours, strict=True)), order, policy)
    world.feed(Activate())
    for action, index in steps:
        if action == "answer" and world.pending:
            world.answer(world.pending.pop(index % len(world.pending)))
        elif action == "drop" and world.pending:
            world.pending.pop(index % len(world.pending))
        elif action == "user":
            world.user_pays(index)
        elif action == "restart":
            world.restart()
        elif action == "timer":
            world.timers()
        elif action == "late":
            world.late_charge(index)
    world.settle()
    assert world.violations == []
    order = world.order
    event(f"routes left {len(order.tried)}; refunds {len(order.refunds)}; {order.state.value}")
    kept = [k for k, r in world.records.items() if r.charged and not r.refunded]
    cash = order.cash_leg
    assert cash is not None and len(kept) <= 1, kept
    if order.state is OrderState.SUCCEEDED:
        assert kept == [(cash.channel, order.payment_serial)], (kept, cash)
    else:
        # not paid: whatever was charged anywhere goes back (or is left to reconciliation)
        assert not kept or cash.status in (LegStatus.UNKNOWN, LegStatus.REFUND_UNKNOWN), kept
    assert len(order.tried) <= fallbacks_max
    assert order.fallback is None or not order.is_terminal


@pytest.mark.parametrize("step", list(FallbackStep))
def test_after_a_restart_each_step_sends_its_command_again(step: FallbackStep) -> None:
    order, policy = new_order(1)
    world = World({"a": "refuse_retryable", "b": "pays", "c": "pays"}, order, policy)
    world.feed(Activate())
    while world.order.fallback is None or world.order.fallback.step is not step:
        world.answer(world.pending.pop(0))
    sent = world.pending[-1]
    world.restart()
    assert sent in world.pending
    world.settle()
    assert world.order.state is OrderState.SUCCEEDED and world.order.legs[0].channel == "b"


def test_the_planted_bug_falls_back_after_a_timeout_and_the_property_sees_it() -> None:
    order, policy = new_order(1, frozenset({"route-after-charge"}))
    world = World({"a": "timeout", "b": "pays", "c": "pays"}, order, policy)
    world.feed(Activate())
    world.settle()
    assert world.violations and "while a S1 is user_paying" in world.violations[0]


def test_a_late_charge_whose_confirming_query_was_lost_is_refunded_by_its_channel() -> None:
    order, policy = new_order(1)
    world = World({"a": "liar", "b": "pays", "c": "pays"}, order, policy)
    world.feed(Activate())
    for _ in range(4):  # pay a (refused), query a, close a, choose b
        world.answer(world.pending.pop(0))
    world.late_charge(0)  # a charges S1 after all; the order asks a first...
    world.restart()  # ...and that query is lost: the wallet notifies again
    world.settle()
    (refund,) = world.order.refunds
    assert (refund.channel, refund.payment_serial, refund.status.value) == ("a", "S1",
                                                                            "succeeded")
    assert world.order.state is OrderState.SUCCEEDED and world.order.legs[0].channel == "b"
    assert world.order.tried[0].outcome == "charged_late"
    assert {k: (r.charged, r.refunded) for k, r in world.records.items()} == {
        ("a", "S1"): (True, True), ("b", "S1-F1"): (True, False)}
