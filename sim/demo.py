"""``payengine demo``: a fuel station's afternoon on the simulated channel.

Customers pay for fuel with WeChat Pay plus red packets, points and phone credit, in every
mode: held at submit, held before submit (the user ticked "use points"), or deducted in the
callback (one-click fueling). The channel fails, times out, answers with unknown codes,
loses and duplicates callbacks; some users pay after the order was closed, some never pay,
some cashiers close the order, some terminals submit twice. At the end the oracle checks that
every voucher account and every order balances against the channel's own records.
"""

from __future__ import annotations

import contextlib
import random
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from payengine.actors.base import EngineConfig
from payengine.actors.engine import Engine
from payengine.actors.messages import Receipt
from payengine.actors.runtime import ThreadRuntime
from payengine.engine.discounts import DiscountRules
from payengine.engine.errors import DuplicateSuspected, Overloaded, PaymentError
from payengine.engine.fuel import FuelLine, FuelSale
from payengine.engine.order import CashPart, LegMode, OrderPolicy, PaymentRequest, VoucherPart
from payengine.engine.statement import FLAGGED, Verdict
from payengine.sim.channel import ChannelFaults, SimulatedChannel
from payengine.sim.oracle import OracleReport, check
from payengine.sim.progress import Progress
from payengine.sim.statement import statement_from_channel

DEMO_STATION = "st-001"
"""The station the demo's sales happen at (``FuelSale.station_id``)."""
DEMO_GRADES = (("92", 752), ("95", 803), ("98", 891))
"""Grades sold, with their list price per litre in fen."""

DEMO_POLICY = OrderPolicy(
    pay_window_ms=2_500,
    hold_grace_ms=4_000,
    query_schedule_ms=(100, 200, 400, 800, 1_600),
    refund_query_schedule_ms=(100, 200, 400, 800, 1_600),
    voucher_retry_schedule_ms=(100, 200, 400, 800),
)
"""The default policy with time scaled down ~400x so the afternoon takes seconds."""


@dataclass
class DemoResult:
    db_path: str
    seed: int
    orders: int
    final_states: dict[str, int]
    refunded_after_close_or_failure: int
    duplicate_submits: int
    duplicate_receipts_equal: bool
    user_closes: int
    abandoned_pre_holds: int
    channel_faults: dict[str, int]
    report: OracleReport
    wall_seconds: float
    unsettled: int
    errors: list[str] = field(default_factory=list)
    duplicate_warnings: int = 0
    """Submits the user-dimension guard warned of, which the customer then confirmed."""
    merchant_refunds: dict[str, int] = field(default_factory=dict)
    """Refund status -> count, for the refunds the station asked for after the rush."""
    reconciliation: dict[str, int] = field(default_factory=dict)
    """Verdict -> count of the channel's statement imported at the end."""
    statement_flagged: int = 0
    """Statement verdicts a person must look at (second charges excepted: refunded)."""
    unbalanced_postings: int = 0
    shift_id: str = ""
    """The shift the run's sales are booked to at ``DEMO_STATION`` (``payengine report
    shift``)."""
    shift_orders: int = 0
    shift_paid_minor: int = 0
    shift_merchant_net_minor: int = 0

    @property
    def ok(self) -> bool:
        return (self.report.ok and self.duplicate_receipts_equal and self.unsettled == 0
                and not self.errors and self.statement_flagged == 0
                and self.unbalanced_postings == 0)

    def as_json(self) -> dict[str, Any]:
        return {
            "db": self.db_path, "seed": self.seed, "orders": self.orders,
            "final_states": self.final_states,
            "refunded_after_close_or_failure": self.refunded_after_close_or_failure,
            "duplicate_submits": self.duplicate_submits,
            "duplicate_receipts_equal": self.duplicate_receipts_equal,
            "user_closes": self.user_closes, "abandoned_pre_holds": self.abandoned_pre_holds,
            "channel_faults": self.channel_faults, "unsettled": self.unsettled,
            "orders_checked": self.report.orders_checked,
            "accounts_checked": self.report.accounts_checked,
            "awaiting_reconciliation": self.report.awaiting_reconciliation,
            "violations": [str(v) for v in self.report.violations], "errors": self.errors,
            "duplicate_warnings": self.duplicate_warnings,
            "merchant_refunds": self.merchant_refunds, "reconciliation": self.reconciliation,
            "statement_flagged": self.statement_flagged,
            "unbalanced_postings": self.unbalanced_postings,
            "shift": {"station_id": DEMO_STATION, "shift_id": self.shift_id,
                      "orders": self.shift_orders, "paid_minor": self.shift_paid_minor,
                      "merchant_net_minor": self.shift_merchant_net_minor},
            "wall_seconds": round(self.wall_seconds, 3), "ok": self.ok,
        }


@dataclass
class _Customer:
    user_id: str
    red_packet: str
    points: str
    phone_credit: str


def run_demo(db_path: str | Path = "payengine.db", *, orders: int = 300, seed: int = 7,
             workers: int = 8, progress: bool = True, settle_timeout_s: float = 120.0,
             discounts: DiscountRules | None = None) -> DemoResult:
    """Run the fuel-station afternoon on ``db_path`` and check the money at the end.
    ``discounts``: the engine's rules (``payengine demo --config``'s ``[discounts]``)."""
    assert 0 < orders <= 100_000 and 0 < workers <= 64
    started = time.monotonic()
    rng = random.Random(seed)
    run = uuid.uuid4().hex[:8]
    world = ThreadRuntime()
    channel = SimulatedChannel("wechat", world, seed=seed, faults=ChannelFaults(),
                               txn_prefix=f"T{run}-")
    engine = Engine.open(db_path, channels=[channel], policy=DEMO_POLICY,
                         config=EngineConfig(account_idle_ms=1_000, pre_hold_ttl_ms=1_500,
                                             discounts=discounts or DiscountRules()))
    channel.attach(engine)
    started_ms = world.now_ms()
    result = DemoResult(str(db_path), seed, orders, {}, 0, 0, True, 0, 0, {}, OracleReport(),
                        0.0, 0)
    try:
        customers = _open_customers(engine, run, max(10, orders // 4))
        result.shift_id = f"afternoon-{run}"
        plans = [_plan(rng, run, i, customers, result.shift_id) for i in range(orders)]
        bar = Progress("submitting", orders, progress)
        order_ids: list[str] = []
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for n, outcome in enumerate(pool.map(lambda p: _pay(engine, p), plans), start=1):
                order_ids += outcome.order_ids
                result.duplicate_submits += outcome.duplicates
                result.duplicate_receipts_equal &= outcome.receipts_equal
                result.user_closes += outcome.closed
                result.abandoned_pre_holds += outcome.abandoned_hold
                result.duplicate_warnings += outcome.duplicate_warnings
                result.errors += outcome.errors
                bar.show(n)
        bar.finish()
        result.unsettled = _wait_until_settled(engine, orders, settle_timeout_s, progress)
        refunded = _refund_some(engine, rng, order_ids)
        result.unsettled = _wait_until_settled(engine, orders, settle_timeout_s, progress)
        result.merchant_refunds = dict(Counter(
            engine.get_order(order_id).refund(no).status for order_id, no in refunded))
        _reconcile(engine, channel, started_ms, result)
        result.unsettled = _wait_until_settled(engine, orders, settle_timeout_s, progress)
        result.unbalanced_postings = len(engine.unbalanced_postings())
        _wait_for_holds_to_expire(engine, settle_timeout_s)
        result.report = check(engine.store, {channel.name: channel},
                              now_ms=world.now_ms(), order_ids=order_ids)
        final = Counter(engine.get_order(order_id).state for order_id in order_ids)
        result.final_states = dict(sorted(final.items()))
        result.refunded_after_close_or_failure = sum(
            1 for order_id in order_ids
            if any(leg.refund_id for leg in engine.get_order(order_id).legs))
        result.channel_faults = dict(sorted(channel.counts.items()))
        _shift_figures(engine, result)
    finally:
        engine.shutdown()
        world.shutdown()
    result.wall_seconds = time.monotonic() - started
    return result


def _open_customers(engine: Engine, run: str, count: int) -> list[_Customer]:
    customers = []
    for i in range(count):
        c = _Customer(f"user-{run}-{i}", f"redpacket-{run}-{i}", f"points-{run}-{i}",
                      f"phone-{run}-{i}")
        engine.open_account(c.red_packet, "CNY")
        engine.fund(c.red_packet, 300, funding_id=f"fund-{c.red_packet}")
        engine.open_account(c.points, "POINTS", minor_per_unit=10)
        engine.fund(c.points, 100, funding_id=f"fund-{c.points}")
        engine.open_account(c.phone_credit, "CNY")
        engine.fund(c.phone_credit, 200, funding_id=f"fund-{c.phone_credit}")
        customers.append(c)
    return customers


@dataclass(frozen=True)
class _Plan:
    request: PaymentRequest
    pre_hold: tuple[str, int, str] | None
    abandon_hold: tuple[str, int] | None
    duplicate: bool
    close_after_ms: int | None


def _shift_figures(engine: Engine, result: DemoResult) -> None:
    """The run's shift as the settlement system sees it (``Engine.shift_report``)."""
    shift = engine.shift_report(DEMO_STATION, result.shift_id)
    totals = shift.totals.get("CNY")
    result.shift_orders = shift.orders
    if totals is not None:
        result.shift_paid_minor = totals.paid_minor
        result.shift_merchant_net_minor = totals.merchant_net_minor


def _plan(rng: random.Random, run: str, i: int, customers: list[_Customer], shift_id: str
          ) -> _Plan:
    """One customer's payment: the 100.00 = 96.00 + 1.00 + 20 points + 1.00 of the seeds,
    for fuel sold at a pump of ``DEMO_STATION`` during ``shift_id``."""
    c = rng.choice(customers)
    total = rng.randint(20, 400) * 100
    mode = rng.choices([LegMode.PRE_DEDUCT, LegMode.PRE_HELD, LegMode.POST_DEDUCT],
                       weights=[70, 15, 15])[0]
    other_mode = LegMode.PRE_DEDUCT if mode is LegMode.PRE_HELD else mode
    vouchers: list[VoucherPart] = []
    pre_hold = None
    if rng.random() < 0.7:
        vouchers.append(VoucherPart(c.red_packet, 100, other_mode))
    if mode is LegMode.PRE_HELD:
        hold_id = f"prehold-{run}-{i}"
        pre_hold = (c.points, 20, hold_id)
        vouchers.append(VoucherPart(c.points, 20, LegMode.PRE_HELD, hold_id))
    elif rng.random() < 0.6:
        vouchers.append(VoucherPart(c.points, 20, mode))
    if rng.random() < 0.5:
        vouchers.append(VoucherPart(c.phone_credit, 100, other_mode))
    value = sum(100 if v.account_id != c.points else 200 for v in vouchers)
    pump = rng.randint(1, 12)
    grade, unit_price_minor = DEMO_GRADES[i % len(DEMO_GRADES)]
    sale = FuelSale(DEMO_STATION, pump, 1 + i % 4,
                    FuelLine.by_amount(grade, unit_price_minor, total),
                    cashier_id="cashier-1", shift_id=shift_id)
    request = PaymentRequest(
        merchant_id="station-001", merchant_order_no=f"{run}-{i:06d}", user_id=c.user_id,
        currency="CNY", total_minor=total, title=f"Fuel, pump {pump}",
        cash=CashPart(total - value, "wechat"), vouchers=tuple(vouchers), sale=sale)
    abandon = (c.points, 10) if rng.random() < 0.03 else None
    close_after = rng.randint(0, 400) if rng.random() < 0.05 else None
    return _Plan(request, pre_hold, abandon, rng.random() < 0.05, close_after)


@dataclass
class _Outcome:
    order_ids: list[str] = field(default_factory=list)
    duplicates: int = 0
    receipts_equal: bool = True
    closed: int = 0
    abandoned_hold: int = 0
    duplicate_warnings: int = 0
    errors: list[str] = field(default_factory=list)


_RETRY_BACKOFF_S = (0.002, 0.064)
_RETRY_FOR_S = 30.0


def _submit(engine: Engine, request: PaymentRequest) -> Receipt:
    """Submit as a terminal does: refused ``Overloaded`` (the engine is at capacity and
    created nothing), wait a moment, doubling, and ask again, for at most 30 s."""
    backoff_s, deadline = _RETRY_BACKOFF_S[0], time.monotonic() + _RETRY_FOR_S
    while True:
        try:
            return engine.submit(request)
        except Overloaded:
            if time.monotonic() + backoff_s > deadline:
                raise
            time.sleep(backoff_s)
            backoff_s = min(2 * backoff_s, _RETRY_BACKOFF_S[1])


def _pay(engine: Engine, plan: _Plan) -> _Outcome:
    """What one pump terminal does for one customer. Runs on a worker thread."""
    outcome = _Outcome()
    request = plan.request
    try:
        if plan.abandon_hold is not None:
            try:
                engine.pre_hold(plan.abandon_hold[0], plan.abandon_hold[1])
                outcome.abandoned_hold = 1
            except PaymentError:
                pass
        if plan.pre_hold is not None:
            account, amount, hold_id = plan.pre_hold
            # Not enough points: the pre-hold is refused and the order, finding no hold, fails.
            with contextlib.suppress(PaymentError):
                engine.pre_hold(account, amount, hold_id=hold_id, ttl_ms=5_000)
        try:
            receipt = _submit(engine, request)
        except DuplicateSuspected:
            # "an order of this amount exists, pay anyway?": this customer says yes
            outcome.duplicate_warnings = 1
            request = replace(request, confirm_duplicate=True)
            receipt = _submit(engine, request)
        outcome.order_ids.append(receipt.order_id)
        if plan.duplicate:
            outcome.duplicates = 1
            outcome.receipts_equal = _submit(engine, request) == receipt
        if plan.close_after_ms is not None:
            time.sleep(plan.close_after_ms / 1000)
            try:
                engine.close(receipt.order_id)
                outcome.closed = 1
            except PaymentError:
                pass  # already paid: the cashier sees it and does nothing
    except PaymentError as error:
        outcome.errors.append(f"{request.merchant_order_no}: {error.code}: {error.message}")
    return outcome


def _refund_some(engine: Engine, rng: random.Random, order_ids: list[str]
                 ) -> list[tuple[str, str]]:
    """After the rush the station refunds about one paid order in eight: half of it, cash
    first, and for some the rest too (by the original route, vouchers back last)."""
    refunded: list[tuple[str, str]] = []
    for order_id in order_ids:
        order = engine.get_order(order_id)
        if order.state != "succeeded" or rng.random() >= 0.125:
            continue
        parts = [order.total_minor // 2, order.total_minor - order.total_minor // 2]
        for n, amount in enumerate(parts[:rng.choice([1, 2])], start=1):
            try:
                engine.refund(order_id, f"demo-refund-{n}", amount, reason="pump stopped early")
                refunded.append((order_id, f"demo-refund-{n}"))
            except PaymentError:
                pass  # e.g. an amount that cannot be split in whole points: refused, typed
    return refunded


def _reconcile(engine: Engine, channel: SimulatedChannel, started_ms: int,
               result: DemoResult) -> None:
    """End the day with the wallet's statement: it must agree with the engine."""
    report = engine.reconcile(statement_from_channel(channel), period_start_ms=started_ms,
                              period_end_ms=channel.world.now_ms())
    result.reconciliation = {verdict.value: n for verdict, n in sorted(report.counts.items()) if n}
    result.statement_flagged = sum(n for verdict, n in report.counts.items()
                                   if verdict in FLAGGED and verdict is not Verdict.DUPLICATE_CHARGE)


def _wait_until_settled(engine: Engine, orders: int, timeout_s: float, progress: bool) -> int:
    bar = Progress("settling  ", orders, progress)
    deadline = time.monotonic() + timeout_s
    unsettled = engine.unsettled_count()
    while unsettled and time.monotonic() < deadline:
        bar.show(orders - min(unsettled, orders), "orders settled")
        time.sleep(0.1)
        unsettled = engine.unsettled_count()
    bar.show(orders - min(unsettled, orders), "orders settled")
    bar.finish()
    return unsettled


def _wait_for_holds_to_expire(engine: Engine, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not any(a.held for a in engine.store.all_accounts()):
            return
        time.sleep(0.1)


def render(result: DemoResult) -> str:
    """The human summary of a demo run."""
    r = result.report
    lines = [
        f"payengine demo: {result.orders} fuel payments on {result.db_path} "
        f"(seed {result.seed}, {result.wall_seconds:.1f} s)",
        "",
        "orders by final state:",
        *[f"  {state:<24}{count:>6}" for state, count in result.final_states.items()],
        "",
        f"cash refunded by the original route (paid after close or failure): "
        f"{result.refunded_after_close_or_failure}",
        f"awaiting reconciliation: {len(r.awaiting_reconciliation)}",
        f"closed by the cashier: {result.user_closes}; abandoned pre-holds: "
        f"{result.abandoned_pre_holds}",
        f"duplicate submits: {result.duplicate_submits}, "
        f"{'all got the same receipt' if result.duplicate_receipts_equal else 'RECEIPTS DIFFER'}",
        f"same user and amount within a minute: {result.duplicate_warnings} warned, confirmed",
        "merchant refunds: " + (", ".join(f"{k} {v}" for k, v in result.merchant_refunds.items())
                                or "none"),
        "statement: " + ", ".join(f"{k} {v}" for k, v in result.reconciliation.items())
        + (f" ({result.statement_flagged} FLAGGED)" if result.statement_flagged else ""),
        "ledger: " + ("every posting sums to zero" if not result.unbalanced_postings
                      else f"{result.unbalanced_postings} UNBALANCED postings"),
        "channel faults: " + (", ".join(f"{k} {v}" for k, v in result.channel_faults.items())
                              or "none"),
        f"shift {result.shift_id} at {DEMO_STATION}: {result.shift_orders} orders, paid "
        f"{result.shift_paid_minor / 100:.2f} CNY, the merchant's net "
        f"{result.shift_merchant_net_minor / 100:.2f} CNY (payengine report shift --station "
        f"{DEMO_STATION} --shift {result.shift_id} --db {result.db_path})",
        "",
        f"voucher accounts: {r.accounts_checked} checked, "
        + ("all balance (funded = available + held + spent, nothing held)"
           if not any(v.invariant.startswith(("voucher", "hold")) for v in r.violations)
           else "VIOLATIONS"),
        f"orders: {r.orders_checked} checked against the channel's records, "
        + ("all balance" if not any(v.subject.startswith("order") for v in r.violations)
           else "VIOLATIONS"),
    ]
    if result.unsettled:
        lines.append(f"UNSETTLED orders after the wait: {result.unsettled}")
    lines += [f"  violation: {v}" for v in r.violations[:20]]
    lines += [f"  error: {e}" for e in result.errors[:20]]
    lines += ["", "RESULT: " + ("OK, every cent accounted for" if result.ok else "FAILED")]
    return "\n".join(lines)
