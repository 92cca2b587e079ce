"""The money oracle: does the engine's database agree with itself and with the channel?

Checked (each failure is one ``Violation`` naming the order or account):

- vouchers: no balance negative; funded = available + held + spent; held equals the sum of
  pending holds and spent the sum of posted ones (so no hold was posted twice); with
  ``now_ms``, no hold still pending past its expiry;
- orders: a succeeded order's cash was really charged once and kept, and every voucher leg
  spent; any other order has nothing charged (net of refunds) and nothing spent, unless its
  cash leg is explicitly awaiting reconciliation (reported apart, not as a violation);
- every order transition in the journal is in the core's table of legal transitions.

The cash check is meaningful once orders have converged (after the quiet phase): an order
still deducting, or closed while its payment is in flight, may hold money for a moment.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from engine.order import (
    ALLOWED_TRANSITIONS,
    HOLD_MODES,
    LegMode,
    LegStatus,
    OrderState,
    PaymentOrder,
)
from engine.voucher import FenceStatus
from persistence.store import Store

RECONCILIATION_LEG_STATUSES = frozenset(
    {LegStatus.UNKNOWN, LegStatus.REFUND_UNKNOWN, LegStatus.REFUND_FAILED,
     LegStatus.CONFIRM_FAILED, LegStatus.RELEASE_FAILED, LegStatus.CONFIRM_UNKNOWN,
     LegStatus.RELEASE_UNKNOWN}
)
"""Leg outcomes the engine cannot settle alone: flagged for reconciliation (a later issue)."""


class GroundTruth(Protocol):
    """What really happened at a channel (``sim.channel.SimulatedChannel`` fits)."""

    def net_charged(self, payment_serial: str) -> int: ...


@dataclass(frozen=True)
class Violation:
    invariant: str
    subject: str
    detail: str

    def __str__(self) -> str:
        return f"{self.invariant} [{self.subject}]: {self.detail}"


@dataclass
class OracleReport:
    violations: list[Violation] = field(default_factory=list)
    awaiting_reconciliation: list[str] = field(default_factory=list)
    orders_checked: int = 0
    accounts_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.violations


def check(store: Store, channels: Mapping[str, GroundTruth], *, now_ms: int | None = None,
          order_ids: Iterable[str] | None = None) -> OracleReport:
    """Run every check; ``order_ids`` limits the order checks (all orders if ``None``)."""
    report = OracleReport()
    _check_accounts(store, report, now_ms)
    orders = (store.iter_orders() if order_ids is None
              else (o for o in map(store.load_order, order_ids) if o is not None))
    for order in orders:
        report.orders_checked += 1
        _check_order(store, order, channels, report)
    return report


def _check_accounts(store: Store, report: OracleReport, now_ms: int | None) -> None:
    for account, fences in store.accounts_with_fences():
        report.accounts_checked += 1
        subject = f"account {account.account_id}"
        v = report.violations
        if min(account.available, account.held, account.spent) < 0:
            v.append(Violation("voucher-non-negative", subject, repr(account)))
        if account.funded != account.available + account.held + account.spent:
            v.append(Violation("voucher-conservation", subject, repr(account)))
        pending = sum(f.amount for f in fences if f.status is FenceStatus.PENDING)
        posted = sum(f.amount for f in fences if f.status is FenceStatus.POSTED)
        if pending != account.held:
            v.append(Violation("voucher-held-matches-holds", subject,
                               f"held {account.held}, pending holds sum {pending}"))
        if posted != account.spent:
            v.append(Violation("voucher-spent-matches-posted", subject,
                               f"spent {account.spent}, posted holds sum {posted}"))
        if now_ms is not None:
            for f in fences:
                if f.status is FenceStatus.PENDING and (f.expires_at_ms or 0) < now_ms:
                    v.append(Violation("hold-pending-past-expiry", subject,
                                       f"hold {f.hold_id} expired at {f.expires_at_ms}"))


def _check_order(store: Store, order: PaymentOrder, channels: Mapping[str, GroundTruth],
                 report: OracleReport) -> None:
    subject = f"order {order.order_id}"
    v = report.violations
    flagged = [leg for leg in order.legs if leg.status in RECONCILIATION_LEG_STATUSES]
    if flagged or order.state is OrderState.NEEDS_RECONCILIATION:
        report.awaiting_reconciliation.append(order.order_id)
    cash = order.cash_leg
    if cash is not None and cash.channel is not None and cash.channel in channels and cash.status not in (
        LegStatus.UNKNOWN, LegStatus.REFUNDING, LegStatus.REFUND_UNKNOWN, LegStatus.REFUND_FAILED
    ) and order.state is not OrderState.NEEDS_RECONCILIATION:
        charged = channels[cash.channel].net_charged(order.payment_serial)
        expected = cash.amount if order.state is OrderState.SUCCEEDED else 0
        if order.state in (OrderState.PAYING, OrderState.ACCEPTED):
            expected = charged  # still deciding; nothing to compare yet
        if charged != expected:
            v.append(Violation("cash-matches-channel", subject,
                               f"state {order.state.value}, cash leg {cash.status.value}: "
                               f"channel holds {charged}, expected {expected}"))
    for leg in order.legs:
        if leg.mode is LegMode.CASH or leg.account_id is None or leg.hold_id is None:
            continue
        if leg.status in (LegStatus.CONFIRM_UNKNOWN, LegStatus.RELEASE_UNKNOWN):
            continue  # the voucher system never answered: flagged, not guessed
        fence = store.load_fence(leg.account_id, leg.hold_id)
        if fence is not None and fence.order_id not in (None, order.order_id):
            fence = None  # a pre-hold another order adopted: not this order's money
        spent = fence is not None and fence.status is FenceStatus.POSTED
        if order.state is OrderState.SUCCEEDED and order.is_settled and not spent:
            v.append(Violation("voucher-spent-for-success", subject,
                               f"leg {leg.leg_no} ({leg.status.value}) not posted"))
        if order.is_terminal and order.state is not OrderState.SUCCEEDED and spent:
            v.append(Violation("voucher-kept-by-unpaid-order", subject,
                               f"leg {leg.leg_no} ({leg.mode.value}) posted for a "
                               f"{order.state.value} order"))
        if leg.mode in HOLD_MODES and spent and leg.status not in (
            LegStatus.CONFIRMING, LegStatus.CONFIRMED
        ):
            v.append(Violation("hold-posted-without-confirm", subject,
                               f"leg {leg.leg_no} is {leg.status.value}"))
    for entry in store.journal("order", order.order_id):
        if entry.part == "order" and entry.from_state and (
            (OrderState(entry.from_state), OrderState(entry.to_state)) not in ALLOWED_TRANSITIONS
        ):
            v.append(Violation("legal-transition", subject,
                               f"{entry.from_state} -> {entry.to_state} ({entry.cause})"))
