"""The money oracle: does the engine's database agree with itself and with the channel?

Checked (each failure is one ``Violation`` naming the order or account):

- vouchers: no balance negative; funded = available + held + spent; funded = top-ups +
  credits (recharges, transfers); held equals the sum of
  pending holds and spent the sum of posted ones (so no hold was posted twice); every fence
  in the scope of what it is (a return in a refund's, a debit in its order's, a hold in its
  order's or the user's); with ``now_ms``, no hold still pending past its expiry;
- orders: a succeeded order's cash was really charged once and kept, and every voucher leg
  spent; any other order has nothing charged (net of refunds) and nothing spent, unless its
  cash leg is explicitly awaiting reconciliation (reported apart, not as a violation);
- every order transition in the journal is in the core's table of legal transitions;
- (``check_authorisations``) a pump pre-authorisation never captures above what it
  authorised, captures once, and one voided or expired is voided at the wallet;
- an owed voucher follow-up (a Confirm, a release, a refund's return the voucher system never
  answered) always has its next re-send scheduled: the sentinel never gives up;
- (``check_notified``, given what downstream was told) every terminal order, every finished
  refund (merchant refunds, second charges, a success the order could not keep) and every
  hold expiry was notified to the subscriber, and the order's to its merchant;
- (``check_step_ups``, given which users sent the right code) no order whose risk step-up
  did not pass ever reached the channel's ``pay`` or kept a hold, and none passed without
  its user's right code;
- (``check_pre_holds``, given what the users did with ``pre_hold``/``release_hold``) every
  user's pre-hold ends as its story says: an abandoned one expired, a released one voided
  (or never made), an adopted one posted exactly when its order succeeded, an order naming
  a dead hold failed, a tick refused after its untick left nothing behind.

The cash check is meaningful once orders have converged (after the quiet phase): an order
still deducting, or closed while its payment is in flight, may hold money for a moment.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from payengine.engine.channel_data import PayDetails, Prepay, without_auth_code
from payengine.engine.codes import CodeTable, ResultKind
from payengine.engine.ledger import TRANSIT
from payengine.engine.order import (
    ALLOWED_TRANSITIONS,
    HOLD_MODES,
    OWED_LEG_STATUSES,
    PAID_CASH_STATUSES,
    SECOND_CHARGE_PREFIX,
    Leg,
    LegMode,
    LegStatus,
    OrderState,
    PartStatus,
    PaymentOrder,
    RefundKind,
    RefundStatus,
)
from payengine.engine.provider import provider_of
from payengine.engine.risk import VerificationStatus
from payengine.engine.routing import RoutingTable
from payengine.engine.voucher import Fence, FenceKey, FenceKind, FenceScope, FenceStatus
from payengine.persistence.outbox import (
    HOLD_STATE_CHANGED,
    LEG_REFUND_KIND,
    ORDER_STATE_CHANGED,
    REFUND_STATE_CHANGED,
    OutboxEvent,
)
from payengine.persistence.store import Store
from payengine.sim.channel import PAY_CODE_MEANINGS, REFUND_CODE_MEANINGS, SimulatedChannel

Told = tuple[str, str, str, str]
"""What a notification told, to match against what should have been told: (event_type,
order_id, subject, to_state); the subject is the refund id, ``account_id/hold_id`` for a
hold, ``""`` for the order itself."""


def told_key(event_type: str, order_id: str, to_state: str, refund_id: str | None = None,
             account_id: str | None = None, hold_id: str | None = None) -> Told:
    if event_type == REFUND_STATE_CHANGED:
        subject = refund_id or ""
    elif event_type == HOLD_STATE_CHANGED:
        subject = f"{account_id}/{hold_id}"
    else:
        subject = ""
    return (event_type, order_id, subject, to_state)


def told_of(event: OutboxEvent) -> Told:
    return told_key(event.event_type, event.order_id, event.to_state, event.refund_id,
                    event.account_id, event.hold_id)

RECONCILIATION_LEG_STATUSES = frozenset(
    {LegStatus.UNKNOWN, LegStatus.REFUND_UNKNOWN, LegStatus.REFUND_FAILED,
     LegStatus.CONFIRM_FAILED, LegStatus.RELEASE_FAILED, LegStatus.CONFIRM_UNKNOWN,
     LegStatus.RELEASE_UNKNOWN}
)
"""Leg outcomes the engine cannot settle alone: flagged for reconciliation (a later issue)."""


class GroundTruth(Protocol):
    """What really happened at a channel (``sim.channel.SimulatedChannel`` fits)."""

    def net_charged(self, payment_serial: str) -> int: ...

    def refunded(self, payment_serial: str) -> int: ...

    def refund_given(self, payment_serial: str, refund_id: str) -> int:
        """What the channel really gave back under ``refund_id`` (0: nothing)."""
        ...


@runtime_checkable
class PayDataTruth(Protocol):
    """What a channel really received and gave for the payer (``SimulatedChannel`` fits)."""

    def pay_details_sent(self, payment_serial: str) -> list[PayDetails | None]:
        """The ``details`` of every ``pay`` call for the serial, in order."""
        ...

    def prepay_given(self, payment_serial: str) -> Prepay | None:
        """What the channel gives the payer for the serial (``None``: it never saw it)."""
        ...


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
          order_ids: Iterable[str] | None = None,
          all_orders: Iterable[PaymentOrder] | None = None,
          providers: frozenset[str] = frozenset()) -> OracleReport:
    """Run every check; ``order_ids`` limits the order checks (all orders if ``None``).
    ``all_orders``: every order, loaded already by the caller (who checks them more ways)."""
    report = OracleReport()
    report.violations += check_ledger_zero_sum(store)
    _check_accounts(store, report, now_ms)
    orders: Iterable[PaymentOrder]
    if order_ids is not None:
        orders = (o for o in map(store.load_order, order_ids) if o is not None)
    else:
        orders = store.iter_orders() if all_orders is None else all_orders
    for order in orders:
        report.orders_checked += 1
        _check_order(store, order, channels, report, providers)
    return report


def _check_accounts(store: Store, report: OracleReport, now_ms: int | None) -> None:
    """Balances against fences; with ``now_ms``, no fence of any scope (a user's pre-hold,
    an order leg's hold, a refund's) still pending past its expiry."""
    top_ups = store.top_ups()
    for account, fences in store.accounts_with_fences():
        report.accounts_checked += 1
        subject = f"account {account.account_id}"
        v = report.violations
        if min(account.available, account.held, account.spent) < 0:
            v.append(Violation("voucher-non-negative", subject, repr(account)))
        if account.funded != account.available + account.held + account.spent:
            v.append(Violation("voucher-conservation", subject, repr(account)))
        pending = sum(f.amount for f in fences if f.status is FenceStatus.PENDING)
        returned = sum(f.amount for f in fences if f.kind is FenceKind.RETURN)
        credited = sum(f.amount for f in fences if f.kind is FenceKind.CREDIT)
        posted = sum(f.amount for f in fences if f.status is FenceStatus.POSTED
                     and f.kind not in (FenceKind.RETURN, FenceKind.CREDIT)) - returned
        if account.funded != top_ups.get(account.account_id, 0) + credited:
            v.append(Violation("voucher-funded-by-top-ups-and-credits", subject,
                               f"funded {account.funded}, top-ups "
                               f"{top_ups.get(account.account_id, 0)} + credits {credited}"))
        if pending != account.held:
            v.append(Violation("voucher-held-matches-holds", subject,
                               f"held {account.held}, pending holds sum {pending}"))
        if posted != account.spent:
            v.append(Violation("voucher-spent-matches-posted", subject,
                               f"spent {account.spent}, posted holds less returns {posted}"))
        for f in fences:
            if not _in_its_scope(f):
                v.append(Violation("fence-in-its-scope", subject,
                                   f"{f.kind.value} fence {f.key!r} for order {f.order_id}"))
            if f.status is FenceStatus.EMPTY_ROLLBACK and (f.kind, f.amount) != (
                FenceKind.EMPTY, 0
            ):
                v.append(Violation("empty-rollback-holds-nothing", subject,
                                   f"{f.kind.value} fence {f.key!r} of {f.amount}"))
            if f.kind is FenceKind.RETURN and not _return_owned(store, f):
                v.append(Violation("voucher-return-has-a-refund", subject,
                                   f"return {f.key} of {f.amount} names no refund part of "
                                   f"order {f.order_id}"))
        if now_ms is not None:
            for f in fences:
                if f.status is FenceStatus.PENDING and (f.expires_at_ms or 0) < now_ms:
                    v.append(Violation("hold-pending-past-expiry", subject,
                                       f"hold {f.key} expired at {f.expires_at_ms}"))


def _check_order(store: Store, order: PaymentOrder, channels: Mapping[str, GroundTruth],
                 report: OracleReport, providers: frozenset[str] = frozenset()) -> None:
    subject = f"order {order.order_id}"
    v = report.violations
    flagged = [leg for leg in order.legs if leg.status in RECONCILIATION_LEG_STATUSES]
    if flagged or order.state is OrderState.NEEDS_RECONCILIATION:
        report.awaiting_reconciliation.append(order.order_id)
    _check_refunds(order, channels, report)
    cash = order.cash_leg
    refunds_open = any(r.status in (RefundStatus.REFUNDING, RefundStatus.UNKNOWN)
                       for r in order.refunds)
    if cash is not None and cash.channel is not None and cash.channel in channels and cash.status not in (
        LegStatus.UNKNOWN, LegStatus.REFUNDING, LegStatus.REFUND_UNKNOWN, LegStatus.REFUND_FAILED
    ) and order.state is not OrderState.NEEDS_RECONCILIATION and not refunds_open:
        charged = channels[cash.channel].net_charged(order.payment_serial)
        given_back = sum(p.amount for r in order.refunds if r.kind is RefundKind.MERCHANT
                         for p in r.parts if p.leg_no == cash.leg_no and p.status is PartStatus.DONE)
        expected = cash.amount - given_back if order.state is OrderState.SUCCEEDED else 0
        if order.state in (OrderState.PAYING, OrderState.ACCEPTED):
            expected = charged  # still deciding; nothing to compare yet
        if charged != expected:
            v.append(Violation("cash-matches-channel", subject,
                               f"state {order.state.value}, cash leg {cash.status.value}: "
                               f"channel holds {charged}, expected {expected}"))
    for leg in order.legs:
        if leg.mode is LegMode.CASH or leg.account_id is None:
            continue
        if provider_of(leg.account_id, providers) is not None:
            continue  # an external provider's: compared with its own books (sim.provider)
        if leg.status in (LegStatus.CONFIRM_UNKNOWN, LegStatus.RELEASE_UNKNOWN):
            continue  # the voucher system never answered: flagged, not guessed
        fence = store.load_fence(leg.account_id, order.fence_of(leg))
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
    if order.owes_follow_up and order.next_voucher_retry_at_ms is None:
        owed = [f"leg {leg.leg_no} {leg.status.value}" for leg in order.legs
                if leg.status in OWED_LEG_STATUSES] + [
            f"return {r.refund_id} leg {p.leg_no}" for r in order.refunds for p in r.parts
            if p.status is PartStatus.UNKNOWN and not order.leg(p.leg_no).is_cash]
        v.append(Violation("sentinel-never-gives-up", subject,
                           f"owes {owed}, and nothing will send it again"))
    if cash is not None and isinstance(channels.get(cash.channel or ""), PayDataTruth):
        _check_pay_data(order, channels[cash.channel or ""], report)  # type: ignore[arg-type]
    _check_returns(store, order, report)
    _check_ledger(store, order, report)
    for entry in store.journal("order", order.order_id):
        if entry.part == "order" and entry.from_state and (
            (OrderState(entry.from_state), OrderState(entry.to_state)) not in ALLOWED_TRANSITIONS
        ):
            v.append(Violation("legal-transition", subject,
                               f"{entry.from_state} -> {entry.to_state} ({entry.cause})"))


def _check_pay_data(order: PaymentOrder, channel: PayDataTruth, report: OracleReport) -> None:
    """Every pay the channel got carried the request's details (a pay re-sent after a
    restart too), and what the order shows the payer is what the channel gave."""
    subject = f"order {order.order_id}"
    stored = order.pay_details
    for sent in channel.pay_details_sent(order.payment_serial):
        if sent != stored and without_auth_code(sent) != stored:  # kept masked once paid
            report.violations.append(Violation(
                "pay-details-reach-channel", subject,
                f"the channel got {sent!r}, the request gave {order.pay_details!r}"))
            break
    if order.prepay is not None and order.prepay != channel.prepay_given(order.payment_serial):
        report.violations.append(Violation(
            "prepay-from-channel", subject,
            f"shows {order.prepay!r}, the channel gave "
            f"{channel.prepay_given(order.payment_serial)!r}"))


def _check_refunds(order: PaymentOrder, channels: Mapping[str, GroundTruth],
                   report: OracleReport) -> None:
    """Refunds never above payments: in the engine's books and at the channel."""
    subject = f"order {order.order_id}"
    asked = sum(r.amount_minor for r in order.refunds
                if r.kind is RefundKind.MERCHANT and r.status is not RefundStatus.FAILED)
    if asked > order.total_minor:
        report.violations.append(Violation(
            "refunds-within-payment", subject,
            f"merchant refunds {asked} exceed the payment {order.total_minor}"))
    cash = order.cash_leg
    if cash is not None and cash.channel is not None and cash.channel in channels:
        truth = channels[cash.channel]
        if truth.net_charged(order.payment_serial) < 0:
            report.violations.append(Violation(
                "refunds-within-payment", subject,
                f"the channel refunded {truth.refunded(order.payment_serial)}, more than it "
                "charged"))
    if any(r.status is RefundStatus.UNKNOWN for r in order.refunds):
        report.awaiting_reconciliation.append(order.order_id)
    if cash is not None and cash.channel is not None and cash.channel in channels:
        for refund in order.refunds:
            part = refund.part(cash.leg_no)
            if part is None or part.status in (PartStatus.SENT, PartStatus.UNKNOWN):
                continue  # in flight or unknown: the channel may or may not have it yet
            # a left route's late charge is given back by that route's channel
            owner = channels.get(refund.channel or cash.channel)
            if owner is None:
                continue
            given = owner.refund_given(refund.payment_serial or order.payment_serial,
                                       refund.refund_id)
            expected = part.amount if part.status is PartStatus.DONE else 0
            if given != expected:
                report.violations.append(Violation(
                    "refund-matches-channel", subject,
                    f"refund {refund.refund_id} is {part.status.value} for {part.amount}; the "
                    f"channel gave back {given}"))


def _in_its_scope(fence: Fence) -> bool:
    """Only a refund makes returns; only an order debits; a hold is an order leg's own or a
    user's pre-hold; an order's own fence is bound to that order."""
    scope = fence.key.scope
    if scope is FenceScope.ORDER and fence.order_id != fence.key.owner:
        return False
    if fence.kind is FenceKind.RETURN:
        return scope is FenceScope.REFUND
    if fence.kind is FenceKind.DEBIT:  # an order's post-deduct, or a recharge's clawback
        return scope in (FenceScope.ORDER, FenceScope.REFUND)
    if fence.kind is FenceKind.CREDIT:
        return scope is FenceScope.ORDER
    return scope in (FenceScope.USER, FenceScope.ORDER)


def _return_owned(store: Store, fence: Fence) -> bool:
    """A return fence is ``FenceKey.refund_return(refund_id, leg_no)`` of a part its order
    sent or finished."""
    order = None if fence.order_id is None else store.load_order(fence.order_id)
    key = fence.key
    refund = (None if order is None or key.scope is not FenceScope.REFUND
              else order.refund(refund_id=key.owner))
    part = None if refund is None else refund.part(key.leg)
    return part is not None and part.amount == fence.amount and part.status in (
        PartStatus.DONE, PartStatus.SENT, PartStatus.UNKNOWN)


def _check_returns(store: Store, order: PaymentOrder, report: OracleReport) -> None:
    """Vouchers go back exactly as the order's refunds say: once per done part, never for a
    refund whose cash part has not gone back first."""
    cash = order.cash_leg
    for refund in order.refunds:
        cash_part = None if cash is None else refund.part(cash.leg_no)
        for part in refund.parts:
            leg = order.leg(part.leg_no)
            if leg.is_cash or leg.account_id is None or not leg.pays:
                continue  # (a recharge's clawback: ``check_beneficiaries``)
            fence = store.load_fence(leg.account_id,
                                     FenceKey.refund_return(refund.refund_id, leg.leg_no))
            returned = 0 if fence is None or fence.kind is not FenceKind.RETURN else fence.amount
            subject = f"order {order.order_id}"
            if part.status is PartStatus.DONE and returned != part.amount:
                report.violations.append(Violation(
                    "voucher-returned-as-refunded", subject,
                    f"{refund.refund_id} leg {leg.leg_no}: done for {part.amount}, "
                    f"account shows {returned}"))
            if returned and part.status not in (PartStatus.DONE, PartStatus.SENT,
                                                PartStatus.UNKNOWN):
                report.violations.append(Violation(
                    "voucher-returned-as-refunded", subject,
                    f"{refund.refund_id} leg {leg.leg_no} is {part.status.value}, yet the "
                    f"account gave back {returned}"))
            if returned and cash_part is not None and cash_part.status is not PartStatus.DONE:
                report.violations.append(Violation(
                    "voucher-returned-after-cash", subject,
                    f"{refund.refund_id} leg {leg.leg_no} went back with the cash part "
                    f"{cash_part.status.value}"))


def _check_ledger(store: Store, order: PaymentOrder, report: OracleReport) -> None:
    """A settled order with nothing unknown leaves nothing in transit, and the merchant has
    exactly what was paid less what was refunded (no fees in the simulator), or nothing."""
    if not order.is_settled or order.order_id in report.awaiting_reconciliation:
        return
    balances = store.ledger_balances(order.order_id).get(order.currency, {})
    subject = f"order {order.order_id}"
    if balances.get(TRANSIT, 0) != 0:
        report.violations.append(Violation(
            "ledger-transit-empty", subject, f"transit holds {balances[TRANSIT]}"))
    merchant = balances.get(f"merchant:{order.merchant_id}", 0)
    expected = 0
    if order.state is OrderState.SUCCEEDED and all(leg.pays for leg in order.legs):
        expected = order.total_minor - sum(
            p.value_minor for r in order.refunds if r.kind is RefundKind.MERCHANT
            for p in r.parts if p.status is PartStatus.DONE)
    if merchant != expected:
        report.violations.append(Violation(
            "ledger-merchant-share", subject,
            f"{order.state.value}: merchant holds {merchant}, expected {expected}"))


def check_beneficiaries(store: Store, orders: Iterable[PaymentOrder]) -> list[Violation]:
    """Recharges and transfers (orders with a credit leg), once converged: the beneficiary
    account holds exactly one credit of the order's amount iff the order succeeded (a
    recharge whose cash was refunded, or that closed or failed, credited nothing); a
    recharge refund's clawback is at the account exactly as its part says, and its cash
    went back only after it; the order's ledger credits the account what it kept."""
    out: list[Violation] = []
    for order in orders:
        credit = next((leg for leg in order.legs if not leg.pays), None)
        if credit is None or credit.account_id is None or not order.is_terminal:
            continue
        subject = f"order {order.order_id}"
        fence = store.load_fence(credit.account_id, order.fence_of(credit))
        credited = 0 if fence is None or fence.kind is not FenceKind.CREDIT else fence.amount
        kept = order.state is OrderState.SUCCEEDED
        if credited != (credit.amount if kept else 0):
            out.append(Violation("beneficiary-credited-iff-paid", subject,
                                 f"{order.state.value}, credit leg {credit.status.value}: "
                                 f"{credit.account_id} credited {credited} of {credit.amount}"))
        clawed = _check_clawbacks(store, order, credit, out)
        balances = store.ledger_balances(order.order_id).get(order.currency, {})
        booked = balances.get(f"vouchers:{credit.account_id}", 0)
        if order.is_settled and booked != (credit.amount - clawed if kept else 0):
            out.append(Violation("ledger-beneficiary-share", subject,
                                 f"vouchers:{credit.account_id} holds {booked} in the ledger, "
                                 f"credited {credited}, clawed back {clawed}"))
    return out


def check_authorisations(orders: Iterable[PaymentOrder], channels: Mapping[str, object],
                         accepted: Mapping[str, set[tuple[str, int]]]) -> list[Violation]:
    """Pump pre-authorisations, once converged: nothing is ever captured above what was
    authorised (by the order, per leg, at the wallet, nor in a capture the engine accepted);
    at most one capture per order; a voided or expired one captured nothing and is voided at
    the wallet; a succeeded one's wallet captured exactly its cash share."""
    out: list[Violation] = []
    for order in orders:
        a = order.authorisation
        if a is None:
            continue
        subject = f"order {order.order_id}"
        if order.total_minor > a.authorised_minor or any(
                order.leg(n).value_minor > value for n, _, value in a.legs):
            out.append(Violation("capture-within-authorisation", subject,
                                 f"charges {order.total_minor} "
                                 f"{[leg.value_minor for leg in order.legs]}, authorised "
                                 f"{a.authorised_minor} {[v for _, _, v in a.legs]}"))
        taken = accepted.get(order.order_id, set())
        if any(amount > a.authorised_minor for _, amount in taken) or len(
                {capture_id for capture_id, amount in taken if amount}) > 1:
            out.append(Violation("capture-accepted-within-authorisation-once", subject,
                                 f"the engine accepted {sorted(taken)}, authorised "
                                 f"{a.authorised_minor}"))
        cash = order.cash_leg
        wallet = None if cash is None else channels.get(cash.channel or "")
        record = getattr(wallet, "authorisation", lambda serial: None)(order.payment_serial)
        if cash is None or record is None:
            continue
        state = record.state.value
        if state == "captured" and record.captured_minor > record.amount_minor:
            out.append(Violation("capture-within-authorisation", subject,
                                 f"the wallet captured {record.captured_minor} of "
                                 f"{record.amount_minor}"))
        if order.state is OrderState.SUCCEEDED:
            expected = (("captured", cash.amount) if cash.amount
                        else ("voided", 0))
            if (state, record.captured_minor) != expected:
                out.append(Violation("captured-as-charged", subject,
                                     f"the wallet's authorisation is {state} for "
                                     f"{record.captured_minor}, the order charged "
                                     f"{cash.amount}"))
        elif order.is_terminal and state not in ("voided", "declined"):
            out.append(Violation("voided-authorisation-released-at-channel", subject,
                                 f"{order.state.value} ({order.cause}) but the wallet's "
                                 f"authorisation is {state}"))
        if order.state is OrderState.CLOSED and a.capture_id is not None:
            out.append(Violation("no-capture-after-void", subject,
                                 f"closed with capture {a.capture_id}"))
    return out


def _check_clawbacks(store: Store, order: PaymentOrder, credit: Leg,
                     out: list[Violation]) -> int:
    """What the recharge's refunds took back from its account (checked part by part)."""
    assert credit.account_id is not None
    clawed = 0
    cash = order.cash_leg
    for refund in order.refunds:
        part = refund.part(credit.leg_no)
        if part is None:
            continue
        fence = store.load_fence(credit.account_id,
                                 FenceKey.refund_return(refund.refund_id, credit.leg_no))
        status = None if fence is None else fence.status
        expected = {PartStatus.DONE: {FenceStatus.POSTED},
                    PartStatus.REVERSED: {FenceStatus.REVERSED},
                    PartStatus.FAILED: {FenceStatus.REFUSED}}.get(part.status)
        if expected is not None and status not in expected:
            out.append(Violation("clawback-as-refunded", f"order {order.order_id}",
                                 f"{refund.refund_id} clawback {part.status.value}, its fence "
                                 f"{status and status.value}"))
        if part.status is PartStatus.DONE:
            clawed += part.amount
        cash_part = None if cash is None else refund.part(cash.leg_no)
        if cash_part is not None and cash_part.status not in (
            PartStatus.WAITING, PartStatus.NOT_SENT
        ) and part.status not in (PartStatus.DONE, PartStatus.REVERSING, PartStatus.REVERSED):
            out.append(Violation("clawback-before-cash", f"order {order.order_id}",
                                 f"{refund.refund_id}: cash part {cash_part.status.value} "
                                 f"with the clawback {part.status.value}"))
    return clawed


def check_one_success_per_trade(orders: Iterable[PaymentOrder]) -> list[Violation]:
    """At most one attempt of a trade order succeeded, and only its last: a next attempt is
    taken only once the one before failed or closed, for good; its attempts are 1..n."""
    succeeded: dict[tuple[str, str], list[str]] = {}
    attempts: dict[tuple[str, str], list[int]] = {}
    paid_attempts: dict[tuple[str, str], list[int]] = {}
    for order in orders:
        key = (order.merchant_id, order.merchant_order_no)
        attempts.setdefault(key, []).append(order.attempt)
        if order.state is OrderState.SUCCEEDED:
            succeeded.setdefault(key, []).append(order.order_id)
            paid_attempts.setdefault(key, []).append(order.attempt)
    violations = [Violation("one-success-per-trade", f"trade {k[0]}/{k[1]}",
                            f"attempts {ids} all succeeded")
                  for k, ids in succeeded.items() if len(ids) > 1]
    violations += [Violation("one-success-per-trade", f"trade {k[0]}/{k[1]}",
                             f"attempt {min(paid)} succeeded, yet attempt {max(attempts[k])} "
                             "was taken after it")
                   for k, paid in paid_attempts.items()
                   if len(paid) == 1 and paid[0] < max(attempts[k])]
    violations += [Violation("attempts-in-order", f"trade {k[0]}/{k[1]}", f"attempts {sorted(n)}")
                   for k, n in attempts.items() if sorted(n) != list(range(1, len(n) + 1))]
    return violations


NOTICE_VIOLATIONS_MAX = 10
"""Violations ``check_wallet_notices`` names per wallet and kind at most (one cause usually
breaks many charges alike)."""


def check_wallet_notices(store: Store, channels: Mapping[str, SimulatedChannel]
                         ) -> list[Violation]:
    """Run before the channel's statement: what the wallets' re-sent notifications promise.

    A wallet sends a notification until the engine acknowledges it (``sim.channel``), and the
    engine acknowledges one only once it believes it (a second charge, say, once the channel
    confirmed it). So before any statement every charge a wallet made is known to the engine
    (its payment's transaction, or a second or late charge it refunds) or flagged for
    reconciliation; and every notification a wallet sent was acknowledged in the end: a
    genuine one is never refused for good. An acknowledged refusal breaks the first (the
    wallet stopped sending what the engine never learnt).
    """
    violations: list[Violation] = []
    for name, wallet in sorted(channels.items()):
        unknown: list[Violation] = []
        for serial, payment in sorted(wallet.payments.items()):
            if not payment.charges:
                continue
            order_id = store.order_id_for_serial(serial)
            order = None if order_id is None else store.load_order(order_id)
            for txn, amount, at_ms in payment.charges:
                if order is not None and _charge_known(order, name, serial, txn):
                    continue
                told = ("its notification was acknowledged" if wallet.acknowledged(
                    f"payment {serial} {txn}") else "its notification was never acknowledged")
                unknown.append(Violation(
                    "wallet-charges-known",
                    f"order {order_id}" if order_id else f"serial {serial}",
                    f"{name} charged {amount} under {txn} at {at_ms} for {serial}; before the "
                    f"statement the engine neither knows the charge nor flags it ({told})"))
        violations += unknown[:NOTICE_VIOLATIONS_MAX]
        violations += [Violation("wallet-notification-acknowledged", f"notification {n.key}",
                                 f"{name} sent it {n.sends} times, never acknowledged "
                                 f"(answers: {n.refusals})")
                       for n in wallet.unacknowledged()][:NOTICE_VIOLATIONS_MAX]
    return violations


def _charge_known(order: PaymentOrder, channel: str, serial: str, txn: str) -> bool:
    """Whether ``order`` knows the charge: its cash paid under ``txn`` through ``channel``, a
    second or late charge it refunds, or something flagged for reconciliation."""
    if order.state is OrderState.NEEDS_RECONCILIATION or any(
        leg.status in RECONCILIATION_LEG_STATUSES for leg in order.legs
    ):
        return True
    cash = order.cash_leg
    if cash is not None and (cash.channel, order.payment_serial, cash.channel_txn_id) == (
        channel, serial, txn
    ) and cash.status in PAID_CASH_STATUSES:
        return True
    return order.refund(refund_no=SECOND_CHARGE_PREFIX + txn) is not None


def check_routes(store: Store, table: RoutingTable, orders: Iterable[PaymentOrder]
                 ) -> list[Violation]:
    """Every routed order went through a route of its method that could take its amount
    and currency (the first one chosen at submit, and each one it fell back to), and its
    cash leg is on the channel the journal says was chosen last."""
    violations: list[Violation] = []
    for order in orders:
        cash = order.cash_leg
        if cash is None:
            continue
        subject = f"order {order.order_id}"
        method, last = None, None
        for entry in store.journal("order", order.order_id):
            if entry.part != "route" or entry.from_state == entry.to_state:
                continue  # a fallback's step (the old channel asked, closed): no route
            if method is None:
                method = entry.from_state  # at submit: method -> channel
            elif entry.from_state != last:
                violations.append(Violation("fallback-from-the-paying-route", subject,
                                            f"{entry.from_state} -> {entry.to_state}, the "
                                            f"payment was on {last}"))
            last = entry.to_state
            route = next((r for r in table.of(method) if r.channel == entry.to_state), None)
            if route is None:
                violations.append(Violation("routed-by-a-route", subject,
                                            f"{method} -> {entry.to_state}"))
            elif not route.amount_min_minor <= cash.amount <= route.amount_max_minor or (
                route.currencies and order.currency not in route.currencies
            ):
                violations.append(Violation(
                    "route-takes-the-payment", subject,
                    f"{cash.amount} {order.currency} through {route.channel}, which takes "
                    f"{route.amount_min_minor}..{route.amount_max_minor}"))
        if last is not None and cash.channel != last:
            violations.append(Violation("paid-where-routed", subject,
                                        f"routed to {last}, cash leg on {cash.channel}"))
    return violations


def check_fallbacks(channels: Mapping[str, object], orders: Iterable[PaymentOrder]
                    ) -> list[Violation]:
    """A payment left a route only after that channel's explicit retryable refusal of its
    serial (never after a timeout or a processing answer: it may have charged), and no
    route it left keeps a charge: at most one channel keeps the money (R-PROD)."""
    violations: list[Violation] = []
    for order in orders:
        subject = f"order {order.order_id}"
        for tried in order.tried:
            truth = channels.get(tried.channel)
            refused = getattr(truth, "refused_retryably", None)
            if refused is not None and not refused(tried.payment_serial):
                violations.append(Violation(
                    "fallback-after-explicit-refusal", subject,
                    f"left {tried.channel} ({tried.payment_serial}, code {tried.code}) which "
                    "never refused it retryably"))
            net = getattr(truth, "net_charged", None)
            if net is not None and net(tried.payment_serial) != 0:
                violations.append(Violation(
                    "one-channel-keeps-the-charge", subject,
                    f"{tried.channel} keeps {net(tried.payment_serial)} of left serial "
                    f"{tried.payment_serial}; the order is {order.state.value} on "
                    f"{order.cash_leg and order.cash_leg.channel}"))
    return violations


def check_ledger_zero_sum(store: Store) -> list[Violation]:
    """Every posting sums to zero (so all balances do)."""
    return [Violation("ledger-zero-sum", f"posting {posting}", f"entries sum to {total}")
            for posting, total in store.unbalanced_postings()]


def _must_tell(order: PaymentOrder) -> list[tuple[str, Told]]:
    """(invariant, what) each subscriber must have been told of a settled-down order."""
    must: list[tuple[str, Told]] = []
    if order.is_terminal:
        must.append(("terminal-order-notified",
                     told_key(ORDER_STATE_CHANGED, order.order_id, order.state.value)))
    for refund in order.refunds:
        if refund.status in (RefundStatus.SUCCEEDED, RefundStatus.FAILED):
            must.append(("refund-notified", told_key(REFUND_STATE_CHANGED, order.order_id,
                                                     refund.status.value, refund.refund_id)))
    cash = order.cash_leg
    leg_final = {LegStatus.REFUNDED: RefundStatus.SUCCEEDED, LegStatus.REFUND_FAILED:
                 RefundStatus.FAILED}
    if cash is not None and cash.status in leg_final:
        must.append((f"refund-notified ({LEG_REFUND_KIND})", told_key(
            REFUND_STATE_CHANGED, order.order_id, leg_final[cash.status].value, cash.refund_id)))
    return must


def check_notified(store: Store, told: set[Told], merchant_told: set[Told],
                   merchants: Iterable[str],
                   all_orders: Iterable[PaymentOrder] | None = None) -> list[Violation]:
    """Every terminal order, finished refund and expired hold was told to the subscriber
    (``told``), and to the merchant (``merchant_told``) if it is one of ``merchants``: one
    violation per missing thing for the subscriber, one per order for the merchant."""
    violations: list[Violation] = []
    registered = set(merchants)
    expected: dict[str, list[tuple[str, Told]]] = {}
    merchant_of: dict[str, str] = {}
    for order in store.iter_orders() if all_orders is None else all_orders:
        expected[order.order_id] = _must_tell(order)
        merchant_of[order.order_id] = order.merchant_id
    for _, fences in store.accounts_with_fences():
        for fence in fences:
            if fence.status is FenceStatus.EXPIRED:
                key = told_key(HOLD_STATE_CHANGED, fence.order_id or "", "expired",
                               account_id=fence.account_id,
                               hold_id=fence.key.public_id)
                expected.setdefault(fence.order_id or "", []).append(("hold-expiry-notified",
                                                                      key))
    for order_id, must in expected.items():
        subject = f"order {order_id}" if order_id else "pre-holds"
        for invariant, key in must:
            if key not in told:
                what = key[3] if key[0] == ORDER_STATE_CHANGED else f"{key[0]} {key[2]} {key[3]}"
                violations.append(Violation(invariant, subject,
                                            f"{what}, but downstream never heard of it"))
        if merchant_of.get(order_id) in registered:
            missing = [key for _, key in must if key not in merchant_told]
            if missing:
                violations.append(Violation(
                    "merchant-notified", subject,
                    f"the merchant never accepted a notification of {missing}"))
    return violations


# --------------------------------------------------------------------------- pre-holds


class Fate(enum.StrEnum):
    """What a user did with a pre-hold (``sim.preholds``)."""

    ADOPTED = "adopted"
    """Ticked, then ordered with it (a ``PRE_HELD`` part)."""
    DEAD = "dead"
    """Ordered with it after it expired or was released, or although the tick was refused."""
    RELEASED = "released"
    """Ticked, then unticked."""
    RACE = "untick_race"
    """Untick and tick sent together, either first."""
    ABANDONED = "abandoned"
    """Ticked, never ordered with, never unticked."""


@dataclass
class PreHoldPlan:
    """One user's pre-hold and what became of the calls the app made for it."""

    account_id: str
    hold_id: str
    amount: int
    fate: Fate
    order_key: tuple[str, str] | None = None
    """(merchant_id, merchant_order_no) of the order naming the hold, if one does."""
    placed: bool = False
    """A ``pre_hold`` call answered with the hold pending."""
    refused: str | None = None
    """The code a ``pre_hold`` call was refused with."""
    released: bool = False
    """A ``release_hold`` call answered."""
    dead: bool = False
    """At its order's submit the hold was already final or due, or was refused for want of
    points (no hold made): the order cannot succeed with it."""

    @property
    def subject(self) -> str:
        return f"pre-hold {self.account_id}/{self.hold_id}"


GIVEN_BACK = frozenset({FenceStatus.VOIDED, FenceStatus.EXPIRED, FenceStatus.EMPTY_ROLLBACK})
"""How a pre-hold no order kept ends: released, expired, or never made (empty rollback)."""


def check_pre_holds(store: Store, plans: Iterable[PreHoldPlan]
                    ) -> tuple[list[Violation], Counter[str]]:
    """Each user's pre-hold ended as its story says; with how many ended each way.

    Meant after the quiet phase (every order settled, every TTL passed): no pre-hold is
    pending then. One no order kept (abandoned, released, raced, or named by an order that
    did not succeed) gave everything back (voided, expired, or never made), an abandoned one
    by expiring; an adopted one is posted, bound to its order, exactly when the order
    succeeded; an order naming a dead hold did not succeed; a tick refused after its untick
    left an empty rollback that never held anything; an acknowledged tick is durable.
    """
    violations: list[Violation] = []
    counts: Counter[str] = Counter()
    for plan in plans:
        subject = plan.subject
        fence = store.load_fence(plan.account_id, FenceKey.user(plan.hold_id))
        order = None
        if plan.order_key is not None:
            order_id = store.order_id_for_merchant(*plan.order_key)
            order = None if order_id is None else store.load_order(order_id)
        succeeded = order is not None and order.state is OrderState.SUCCEEDED
        if plan.dead and order is not None and not succeeded:
            counts["pre_held_order_failed"] += 1
        if fence is None:
            counts["pre_hold_never_made"] += 1
            if plan.placed:
                violations.append(Violation("acknowledged-pre-hold-survives", subject,
                                            "pre_hold answered, the account has no such hold"))
            if succeeded:
                violations.append(Violation("dead-pre-hold-fails-its-order", subject,
                                            f"order {order and order.order_id} succeeded "
                                            "with a hold that was never made"))
            continue
        counts[f"pre_hold_{fence.status.value}"] += 1
        adopted = plan.order_key is not None and not plan.dead  # named, alive at submit
        if adopted and succeeded:
            assert order is not None
            if fence.status is not FenceStatus.POSTED or fence.order_id != order.order_id:
                violations.append(Violation(
                    "adopted-pre-hold-posted-iff-succeeded", subject,
                    f"order {order.order_id} succeeded, the hold is {fence.status.value} "
                    f"for {fence.order_id}"))
        elif plan.dead and succeeded:
            assert order is not None
            violations.append(Violation(
                "dead-pre-hold-fails-its-order", subject,
                f"order {order.order_id} succeeded with a hold that was {fence.status.value} "
                "before it was submitted"))
        elif fence.status not in GIVEN_BACK:
            state = "no order" if order is None else f"order {order.order_id} {order.state.value}"
            violations.append(Violation(
                "pre-hold-given-back", subject,
                f"{plan.fate.value} ({state}): the hold is {fence.status.value}, "
                f"{fence.amount} points not given back"))
        elif plan.fate is Fate.ABANDONED and fence.status is not FenceStatus.EXPIRED:
            violations.append(Violation(
                "abandoned-pre-hold-expires", subject,
                f"nobody released it, yet it is {fence.status.value}"))
        if plan.order_key is None and fence.order_id is not None:
            violations.append(Violation("pre-hold-unadopted", subject,
                                        f"no order names it, yet order {fence.order_id} has it"))
        if plan.refused == "hold_refused" and fence.status is FenceStatus.EMPTY_ROLLBACK:
            held = [e for e in store.journal("account", plan.account_id)
                    if e.part == fence.key.journal_part and e.to_state != "empty_rollback"]
            if held:
                violations.append(Violation(
                    "refused-tick-changed-nothing", subject,
                    f"its untick came first, yet the hold went {held[0].to_state}"))
    return violations, counts


# --------------------------------------------------------------------------- step-ups


def check_step_ups(store: Store, channels: Mapping[str, object], right_code_sent: set[str],
                   all_orders: Iterable[PaymentOrder] | None = None) -> list[Violation]:
    """Every step-up the risk gate asked for ended as its user's answers say.

    Meant after the quiet phase. An order born in ``needs_verification`` (its first journal
    entry says so: the verdict was persisted with the order) whose verification did not pass
    never reached the channel's ``pay`` (the channel records each call by serial), and holds
    and spends nothing (its voucher fences are all given back); one whose verification
    passed had its user send the right code (``right_code_sent``).
    """
    violations: list[Violation] = []
    for order in store.iter_orders() if all_orders is None else all_orders:
        v = order.verification
        if v is None:
            continue
        subject = f"order {order.order_id}"
        first = store.journal("order", order.order_id)[0]
        if (first.from_state, first.to_state) != ("", OrderState.NEEDS_VERIFICATION.value):
            violations.append(Violation("step-up-persisted-with-its-order", subject,
                                        f"first transition {first.from_state!r} -> "
                                        f"{first.to_state}"))
        if v.status is VerificationStatus.PASSED:
            if order.order_id not in right_code_sent:
                violations.append(Violation(
                    "verified-only-by-its-code", subject,
                    f"{order.state.value}: the verification passed, its user never sent the "
                    "right code"))
            continue
        cash = order.cash_leg
        truth = None if cash is None else channels.get(cash.channel or "")
        if isinstance(truth, PayDataTruth) and truth.pay_details_sent(order.payment_serial):
            violations.append(Violation(
                "no-pay-before-verification", subject,
                f"the channel was asked to pay while the verification is {v.status.value}"))
        for leg in order.legs:
            if leg.account_id is None:
                continue
            fence = store.load_fence(leg.account_id, order.fence_of(leg))
            if fence is not None and fence.order_id in (None, order.order_id) and (
                fence.status in (FenceStatus.PENDING, FenceStatus.POSTED)
            ):
                violations.append(Violation(
                    "unverified-order-releases-holds", subject,
                    f"verification {v.status.value}, leg {leg.leg_no}'s fence is "
                    f"{fence.status.value}"))
    return violations


def check_code_tables(channels: Mapping[str, object]) -> list[Violation]:
    """Each simulated wallet's code tables (from its configuration) read every code it
    answers as the wallet means it, and a failed communication as processing: a table that
    fails a payment the wallet still waits for would fail orders the payer then pays."""
    violations = []
    for name, channel in channels.items():
        for what, meanings in (("pay_codes", PAY_CODE_MEANINGS),
                               ("refund_codes", REFUND_CODE_MEANINGS)):
            table = getattr(channel, what, None)
            if not isinstance(table, CodeTable):
                continue
            for code, meaning in meanings.items():
                read = table.classify("SUCCESS", code)
                if read is not meaning:
                    violations.append(Violation(
                        "codes-as-the-wallet-means", f"channel {name}",
                        f"{what} reads {code} as {read.value}; the wallet means "
                        f"{meaning.value}"))
            if table.classify("FAIL", None) is not ResultKind.PROCESSING:
                violations.append(Violation("codes-as-the-wallet-means", f"channel {name}",
                                            f"{what} decides a failed communication"))
    return violations
