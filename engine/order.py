"""The payment order: its data, its transition table and the pure ``decide`` function.

``decide(order, event, now_ms, policy) -> Decision`` is the only place where an order
changes. It is deterministic and does no I/O: the actor shell persists
``Decision.order`` and only then carries out ``Decision.effects`` (tell a voucher account,
call the channel, arm a timer).

Life cycle (the order's coarse state; each leg has its own status)::

    NEEDS_VERIFICATION --verified--> ACCEPTED    (a risk step-up: see ``engine.risk``)
        \\--wrong codes / window over--> FAILED;  --close--> CLOSED

    ACCEPTED --holds placed--> PAYING --cash success--> [DEDUCTING --debits done-->] SUCCEEDED
        |                        |   \\--query schedule ran out--> NEEDS_RECONCILIATION
        |                        |--cash failure / shortfall--> FAILED
        \\--hold refused--> FAILED    \\--close (timeout or user)--> CLOSED

SUCCEEDED, FAILED and CLOSED are terminal: the state never changes again (merchant refunds,
a later issue, are the only way out). Work that follows a terminal decision (confirming or
cancelling holds, refunding a success that came after the close) is carried by the legs'
statuses, so it survives a crash and is driven to the end by ``Activate``.
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from payengine.engine.authorisation import CAPTURE_ORDERS as CAPTURE_ORDERS
from payengine.engine.authorisation import Authorisation as Authorisation
from payengine.engine.authorisation import AuthorisationOp as AuthorisationOp
from payengine.engine.authorisation import AuthorisationResult as AuthorisationResult
from payengine.engine.authorisation import AuthorisationStatus as AuthorisationStatus
from payengine.engine.authorisation import AuthoriseCash as AuthoriseCash
from payengine.engine.authorisation import CaptureAuthorisation as CaptureAuthorisation
from payengine.engine.authorisation import CaptureCash as CaptureCash
from payengine.engine.authorisation import QueryAuthorisation as QueryAuthorisation
from payengine.engine.authorisation import VoidAuthorisation as VoidAuthorisation
from payengine.engine.authorisation import VoidCash as VoidCash
from payengine.engine.authorisation import authorisation_from_json as authorisation_from_json
from payengine.engine.authorisation import authorisation_json as authorisation_json
from payengine.engine.authorisation import split_capture as split_capture
from payengine.engine.channel_data import (
    PayDetails,
    Prepay,
    check_pay_details,
    details_json,
)
from payengine.engine.checks import (
    check_bool,
    check_id,
    check_instance,
    check_int,
    check_optional_id,
    check_parts,
    check_schedule,
    check_setting,
    check_text,
    shown,
)
from payengine.engine.codes import ResultKind
from payengine.engine.currency import ISO_4217, check_currency
from payengine.engine.discounts import PricedSale, QuoteMismatch, QuoteUse
from payengine.engine.errors import (
    AttemptRefused,
    CurrencyMismatch,
    IdempotencyConflict,
    IllegalTransition,
    InvalidAmount,
    InvalidRequest,
    NotificationRejected,
    RefundRefused,
)
from payengine.engine.evolve import evolve
from payengine.engine.fuel import FuelSale, check_fuel_sale, fuel_sale_json
from payengine.engine.money import AMOUNT_MAX, check_amount, value_in_minor
from payengine.engine.provider import provider_of
from payengine.engine.risk import (
    Verification,
    VerificationStatus,
    check_code,
    code_matches,
)
from payengine.engine.routing import FALLBACKS_MAX as ROUTING_FALLBACKS_MAX
from payengine.engine.voucher import FenceKey, FenceScope

# --------------------------------------------------------------------------- states


class OrderState(enum.StrEnum):
    NEEDS_VERIFICATION = "needs_verification"
    """The risk gate asked for a step-up: the order waits for the user's code
    (``Engine.verify``), holding nothing and charging nothing. Polling shows it: send the
    user to identity verification (核身)."""
    ACCEPTED = "accepted"
    """Persisted and acknowledged; voucher holds are being placed."""
    PAYING = "paying"
    """The cash channel was asked; its result is not known yet."""
    DEDUCTING = "deducting"
    """Cash succeeded; post-deduct vouchers are being debited."""
    NEEDS_RECONCILIATION = "needs_reconciliation"
    """The query schedule ran out with the result still unknown. Not a failure: money may
    have moved. Holds stay held; a callback, a close or reconciliation resolves it."""
    AUTHORISING = "authorising"
    """A pump pre-authorisation (``PaymentRequest.authorise``): the vouchers are held and
    the channel is asked to authorise (hold) the cash part; its answer is not known yet."""
    AUTHORISED = "authorised"
    """Authorised and waiting for the pump: ``Engine.capture`` takes the amount dispensed,
    ``Engine.void`` (or the authorisation's expiry, ``close_at_ms``) voids it."""
    CAPTURING = "capturing"
    """A capture was decided: the channel is asked to capture the cash share (vouchers are
    confirmed for theirs once it did); never decided again, only asked until it answers."""
    VOIDING = "voiding"
    """Voided (by the merchant or by expiry): holds released, the channel's authorisation
    being voided; ``closed`` once the channel said so."""
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CLOSED = "closed"


TERMINAL_STATES = frozenset({OrderState.SUCCEEDED, OrderState.FAILED, OrderState.CLOSED})

AUTHORISATION_STATES = frozenset({OrderState.AUTHORISING, OrderState.AUTHORISED,
                                  OrderState.CAPTURING, OrderState.VOIDING})
"""The states only a pre-authorisation has, between ACCEPTED and its terminal state."""


class Trigger(enum.StrEnum):
    """What moved the order: the cause recorded with every transition."""

    HOLDS_PLACED = "holds_placed"
    HOLD_REFUSED = "hold_refused"
    CASH_SUCCEEDED = "cash_succeeded"
    CASH_SUCCEEDED_DEDUCT = "cash_succeeded_deduct"
    CASH_FAILED = "cash_failed"
    DEBITS_DONE = "debits_done"
    SHORTFALL = "post_deduct_shortfall"
    CREDIT_REFUSED = "credit_refused"
    """The beneficiary account refused the credit (a recharge or transfer): undo all."""
    AMOUNT_MISMATCH = "amount_mismatch"
    QUERIES_EXHAUSTED = "queries_exhausted"
    CLOSE_TIMEOUT = "close_timeout"
    CLOSE_USER = "close_user"
    VERIFIED = "verified"
    VERIFICATION_FAILED = "verification_failed"
    VERIFICATION_EXPIRED = "verification_expired"
    # pump pre-authorisation
    AUTHORISATION_ASKED = "authorisation_asked"
    AUTHORISED = "authorised"
    AUTHORISATION_DECLINED = "authorisation_declined"
    CAPTURE = "capture"
    CAPTURED = "captured"
    CAPTURE_DECLINED = "capture_declined"
    VOID = "void"
    AUTHORISATION_EXPIRED = "authorisation_expired"
    VOIDED = "voided"


S = OrderState
T = Trigger
TRANSITIONS: Mapping[tuple[OrderState, Trigger], OrderState] = {
    (S.NEEDS_VERIFICATION, T.VERIFIED): S.ACCEPTED,
    (S.NEEDS_VERIFICATION, T.VERIFICATION_FAILED): S.FAILED,
    (S.NEEDS_VERIFICATION, T.VERIFICATION_EXPIRED): S.FAILED,
    (S.NEEDS_VERIFICATION, T.CLOSE_TIMEOUT): S.CLOSED,
    (S.NEEDS_VERIFICATION, T.CLOSE_USER): S.CLOSED,
    (S.ACCEPTED, T.HOLDS_PLACED): S.PAYING,
    (S.ACCEPTED, T.CASH_SUCCEEDED): S.SUCCEEDED,  # no cash leg: vouchers only
    (S.ACCEPTED, T.CASH_SUCCEEDED_DEDUCT): S.DEDUCTING,
    (S.ACCEPTED, T.HOLD_REFUSED): S.FAILED,
    (S.ACCEPTED, T.CLOSE_TIMEOUT): S.CLOSED,
    (S.ACCEPTED, T.CLOSE_USER): S.CLOSED,
    (S.PAYING, T.CASH_SUCCEEDED): S.SUCCEEDED,
    (S.PAYING, T.CASH_SUCCEEDED_DEDUCT): S.DEDUCTING,
    (S.PAYING, T.CASH_FAILED): S.FAILED,
    (S.PAYING, T.AMOUNT_MISMATCH): S.NEEDS_RECONCILIATION,
    (S.PAYING, T.QUERIES_EXHAUSTED): S.NEEDS_RECONCILIATION,
    (S.PAYING, T.CLOSE_TIMEOUT): S.CLOSED,
    (S.PAYING, T.CLOSE_USER): S.CLOSED,
    (S.NEEDS_RECONCILIATION, T.CASH_SUCCEEDED): S.SUCCEEDED,
    (S.NEEDS_RECONCILIATION, T.CASH_SUCCEEDED_DEDUCT): S.DEDUCTING,
    (S.NEEDS_RECONCILIATION, T.CASH_FAILED): S.FAILED,
    (S.NEEDS_RECONCILIATION, T.CLOSE_TIMEOUT): S.CLOSED,
    (S.NEEDS_RECONCILIATION, T.CLOSE_USER): S.CLOSED,
    (S.DEDUCTING, T.DEBITS_DONE): S.SUCCEEDED,
    (S.DEDUCTING, T.SHORTFALL): S.FAILED,
    (S.DEDUCTING, T.CREDIT_REFUSED): S.FAILED,
    # pump pre-authorisation (``PaymentRequest.authorise``)
    (S.ACCEPTED, T.AUTHORISATION_ASKED): S.AUTHORISING,
    (S.AUTHORISING, T.AUTHORISED): S.AUTHORISED,
    (S.AUTHORISING, T.AUTHORISATION_DECLINED): S.FAILED,
    (S.AUTHORISING, T.VOID): S.VOIDING,
    (S.AUTHORISING, T.AUTHORISATION_EXPIRED): S.VOIDING,
    (S.AUTHORISED, T.CAPTURE): S.CAPTURING,
    (S.AUTHORISED, T.VOID): S.VOIDING,
    (S.AUTHORISED, T.AUTHORISATION_EXPIRED): S.VOIDING,
    (S.CAPTURING, T.CAPTURED): S.SUCCEEDED,
    (S.CAPTURING, T.CAPTURE_DECLINED): S.FAILED,
    (S.VOIDING, T.VOIDED): S.CLOSED,
}
"""The order's transition table: (state, trigger) -> next state. Anything absent is illegal."""

ALLOWED_TRANSITIONS = frozenset((src, dst) for (src, _), dst in TRANSITIONS.items())
"""(from, to) pairs that may ever be observed; the simulator's oracle checks against this."""

assert not any(src in TERMINAL_STATES for src, _ in ALLOWED_TRANSITIONS), "terminal is final"


def next_state(state: OrderState, trigger: Trigger) -> OrderState:
    """Look ``trigger`` up in the table; a missing entry is an ``IllegalTransition``."""
    try:
        return TRANSITIONS[(state, trigger)]
    except KeyError:
        raise IllegalTransition(f"{trigger.value} is not allowed in state {state.value}") from None


# --------------------------------------------------------------------------- legs


class LegMode(enum.StrEnum):
    CASH = "cash"
    """Paid through a channel (WeChat Pay, Alipay, card)."""
    PRE_DEDUCT = "pre_deduct"
    """Voucher held (Try) at submit, before the channel is asked; confirmed on success."""
    PRE_HELD = "pre_held"
    """Voucher held before submit (the user ticked it); the order adopts the hold."""
    POST_DEDUCT = "post_deduct"
    """Voucher debited only when the cash succeeded; a shortfall then fails the payment."""
    CREDIT = "credit"
    """The beneficiary of a recharge or transfer: a stored-value account credited (by the
    order's own fence) only once the payer's side is paid, before the order succeeds. Its
    ``value_minor`` is what it receives; it pays nothing, so it is not in the parts' sum."""


HOLD_MODES = frozenset({LegMode.PRE_DEDUCT, LegMode.PRE_HELD})


class LegStatus(enum.StrEnum):
    NEW = "new"
    # voucher holds
    TRYING = "trying"
    HELD = "held"
    REFUSED = "refused"
    CONFIRMING = "confirming"
    CONFIRMED = "confirmed"
    CONFIRM_FAILED = "confirm_failed"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    RELEASE_FAILED = "release_failed"
    """The account refused to void or reverse: an anomaly for reconciliation, never silent."""
    CONFIRM_UNKNOWN = "confirm_unknown"
    """The voucher system did not answer the Confirm on its whole retry schedule. Still owed:
    the sentinel re-sends it (``OrderPolicy.voucher_sentinel_interval_ms``, and at every
    start of the order's actor) until an answer turns it ``confirmed`` (or ``confirm_failed``)."""
    RELEASE_UNKNOWN = "release_unknown"
    """The voucher system did not answer the Cancel (or the reversal of a debit) on its whole
    retry schedule. Still owed, and re-sent by the sentinel like ``confirm_unknown``."""
    # post-deduct debits
    DEBITING = "debiting"
    DEBITED = "debited"
    SHORTFALL = "shortfall"
    REVERSING = "reversing"
    REVERSED = "reversed"
    # the beneficiary of a recharge or transfer (``LegMode.CREDIT``)
    CREDITING = "crediting"
    """The credit is sent and not yet acknowledged: re-sent (idempotent by its fence) until
    the account answers, never given up on: the payer's side is already paid."""
    CREDITED = "credited"
    # cash
    PAYING = "paying"
    PAID = "paid"
    UNPAID = "unpaid"
    """The channel said definitively that nothing was charged (failure, or closed unpaid)."""
    UNKNOWN = "unknown"
    """Closed with the charge still unknown after every query: for reconciliation."""
    REFUNDING = "refunding"
    REFUNDED = "refunded"
    REFUND_FAILED = "refund_failed"
    REFUND_UNKNOWN = "refund_unknown"
    # a pre-authorised cash leg (``PaymentRequest.authorise``)
    AUTHORISING = "authorising"
    AUTHORISED = "authorised"
    """The channel holds the authorised amount for the payer; nothing is charged yet."""
    CAPTURING = "capturing"
    VOIDING = "voiding"
    VOIDED = "voided"
    """The channel's authorisation was voided: nothing was, nor will be, charged."""


IN_FLIGHT_LEG_STATUSES = frozenset(
    {
        LegStatus.NEW,
        LegStatus.TRYING,
        LegStatus.CONFIRMING,
        LegStatus.CANCELLING,
        LegStatus.DEBITING,
        LegStatus.REVERSING,
        LegStatus.PAYING,
        LegStatus.REFUNDING,
        LegStatus.CREDITING,
        LegStatus.AUTHORISING,
        LegStatus.CAPTURING,
        LegStatus.VOIDING,
    }
)
"""A leg in one of these still has work to do; an order is settled when none is left."""

OWED_LEG_STATUSES = frozenset({LegStatus.CONFIRM_UNKNOWN, LegStatus.RELEASE_UNKNOWN})
"""A follow-up command the voucher system never answered on the retry schedule: owed (R-TCC:
after the payment's outcome the follow-up steps are guaranteed), re-sent by the sentinel.
An order with one is not settled."""

SENTINEL_LEG_STATUSES = OWED_LEG_STATUSES | {LegStatus.CREDITING}
"""Leg commands the sentinel goes on sending after the retry schedule: the owed follow-ups
and a beneficiary's credit (never given up on once the payer paid)."""


@dataclass(frozen=True, slots=True)
class Leg:
    """One payment flow of an order: the cash part or one voucher."""

    leg_no: int
    mode: LegMode
    account_id: str | None
    """The voucher account; ``None`` for the cash leg."""
    amount: int
    """In the leg's own unit: minor units for cash and money vouchers, points for points."""
    unit: str
    value_minor: int
    """What the leg pays of the order total, in the order's minor units."""
    hold_id: str | None
    """The caller's pre-hold a ``PRE_HELD`` leg adopts (fence ``FenceKey.user(hold_id)``);
    ``None`` for every other leg, whose fence is the order's own (``PaymentOrder.fence_of``)."""
    status: LegStatus = LegStatus.NEW
    channel: str | None = None
    channel_txn_id: str | None = None
    channel_code: str | None = None
    """The last business code the channel gave for this leg (``None``: no answer yet)."""
    refund_id: str | None = None

    @property
    def is_cash(self) -> bool:
        return self.mode is LegMode.CASH

    @property
    def pays(self) -> bool:
        """A leg that pays part of the total (every leg but a recharge's or transfer's
        beneficiary, ``LegMode.CREDIT``)."""
        return self.mode is not LegMode.CREDIT


# --------------------------------------------------------------------------- routes tried

FALLBACKS_MAX = ROUTING_FALLBACKS_MAX
"""Most fallbacks one payment may make (``RoutingTable.fallbacks_max`` is 0..this)."""


class FallbackStep(enum.StrEnum):
    """Where a fallback to the next route stands (R-PROD: only where no double charge is
    possible). Each step is persisted before its command goes out, and ``Activate`` sends
    the command of the step again after a restart."""

    QUERY = "query"
    """The channel answered a retryable failure: asked whether it charged after all."""
    CLOSE = "close"
    """Its query said failure or "not found": the serial is closed so it never charges."""
    ROUTE = "route"
    """Closed: the next route is being chosen (the shell's ``ChooseRoute``)."""


@dataclass(frozen=True, slots=True)
class Fallback:
    step: FallbackStep
    why: str
    """What the old channel answered so far, for the journal."""


@dataclass(frozen=True, slots=True)
class TriedRoute:
    """A route the cash leg left for the next one."""

    channel: str
    payment_serial: str
    """The serial the channel knew the payment by; a new route pays under a new one."""
    code: str
    """The retryable failure code that made the payment leave the channel."""
    outcome: str = "unpaid"
    """``unpaid``; ``charged_late`` when a success came for it later anyway (refunded by
    that channel)."""


def fallback_serial(first_serial: str, fallback_no: int) -> str:
    """The serial of the payment's ``fallback_no``-th next route: derived, so replayable."""
    return f"{first_serial}-F{fallback_no}"


def routing_json(order: PaymentOrder) -> dict[str, object] | None:
    """An order's routes as stored (``None``: not routed, nothing to store)."""
    if order.method is None and not order.tried and order.fallback is None:
        return None
    fallback = order.fallback
    return {"method": order.method,
            "tried": [[t.channel, t.payment_serial, t.code, t.outcome] for t in order.tried],
            "fallback": None if fallback is None else [fallback.step.value, fallback.why]}


def routing_from_json(data: object) -> tuple[str | None, tuple[TriedRoute, ...],
                                             Fallback | None]:
    """``routing_json``'s inverse: (method, tried, fallback)."""
    if data is None:
        return None, (), None
    assert isinstance(data, dict), data
    method, tried, fallback = data.get("method"), data.get("tried", []), data.get("fallback")
    assert (method is None or isinstance(method, str)) and isinstance(tried, list), data
    routes = tuple(TriedRoute(str(c), str(s), str(code), str(outcome))
                   for c, s, code, outcome in tried)
    step = None if fallback is None else Fallback(FallbackStep(fallback[0]), str(fallback[1]))
    return method, routes, step


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True, slots=True)
class CashPart:
    """The cash part of a combined payment: ``amount_minor`` through ``channel``.

    ``details``: what the channel needs besides the amount (scenario, payer id, barcode...);
    kept with the order and given to ``Channel.pay``."""

    amount_minor: int
    channel: str
    details: PayDetails | None = None


@dataclass(frozen=True, slots=True)
class VoucherPart:
    """One voucher part: ``amount`` in the account's own unit.

    ``hold_id`` names a hold placed before submit and is required for ``PRE_HELD``.
    """

    account_id: str
    amount: int
    mode: LegMode = LegMode.PRE_DEDUCT
    hold_id: str | None = None


@dataclass(frozen=True, slots=True)
class PaymentRequest:
    """What a merchant submits. ``(merchant_id, merchant_order_no)`` is the idempotency key."""

    merchant_id: str
    merchant_order_no: str
    user_id: str
    currency: str
    total_minor: int
    title: str
    cash: CashPart | None = None
    vouchers: tuple[VoucherPart, ...] = ()
    pay_window_ms: int | None = None
    """How long the order may wait for its payment before it is closed; policy default if None."""
    confirm_duplicate: bool = False
    """The caller was warned of a similar recent order (``DuplicateSuspected``) and the user
    chose to pay anyway. Not part of the fingerprint: it is a decision, not a parameter."""
    attempt: int = 1
    """Which payment attempt of the trade order this is (1..``ATTEMPTS_MAX``). Attempt n+1
    may be made once attempt n failed or closed, maybe with another method; only one attempt
    of a trade order can succeed (a success on an older one is refunded)."""
    sale: FuelSale | None = None
    """What is sold, where (a fuel station's pump, grade, litres, cashier, shift): kept with
    the order for its events and reports. With ``quote``: the quote's sale, or None."""
    quote: QuoteUse | None = None
    """The discount combination of a quote (``Engine.quote``) this payment takes: the order
    is charged the snapshot's amounts, and must name them (``check_quote_use``)."""
    credit_account: str | None = None
    """A recharge or transfer (``Engine.recharge``, ``Engine.transfer``): the stored-value
    account credited with ``total_minor`` once the payer's side is paid. A money voucher
    account in ``currency``; the order then pays by cash alone (a recharge) or by one
    ``PRE_DEDUCT`` voucher part of another account (a transfer)."""
    authorise: bool = False
    """A pump pre-authorisation: the parts are maxima (the pump's limit). The vouchers are
    held, the cash part is authorised (held) at the channel, and ``Engine.capture`` later
    charges what was dispensed (the rest released) or ``Engine.void`` releases all. Needs a
    cash part through a channel that implements ``AuthorisationChannel``."""

    def fingerprint(self) -> str:
        """A stable digest of every parameter: equal requests, equal fingerprints."""
        # JSON, not joined strings: ids may contain any separator, and two different
        # requests must never share a digest (a changed retry would get the old receipt)
        cash: list[object] | None = None
        if self.cash is not None:
            cash = [self.cash.amount_minor, self.cash.channel]
            if self.cash.details is not None:  # appended only when given: digests of
                cash.append(details_json(self.cash.details))  # older requests stay equal
        fields: list[object] = [
            self.merchant_id, self.merchant_order_no, self.user_id, self.currency,
            self.total_minor, self.title, self.pay_window_ms, cash,
            [[v.account_id, v.amount, v.mode.value, v.hold_id] for v in self.vouchers],
        ]
        if self.attempt != 1:  # appended only then: first attempts keep older digests
            fields.append(self.attempt)
        if self.quote is not None:  # likewise; the quote's sale is the sale (or refused)
            fields.append([None, [self.quote.quote_id, self.quote.combination_id]])
        elif self.sale is not None:
            fields.append([fuel_sale_json(self.sale), None])
        if self.credit_account is not None:  # likewise: payments keep their digests
            fields.append(["credit", self.credit_account])
        if self.authorise:  # likewise: only a pre-authorisation's digest says so
            fields.append(["authorise"])
        canonical = json.dumps(fields, ensure_ascii=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class AccountUnit:
    """What the core needs to know of a voucher account to price a leg."""

    unit: str
    minor_per_unit: int | None


class RefundKind(enum.StrEnum):
    MERCHANT = "merchant"
    """Asked for by the merchant: full or partial, by the original route."""
    DUPLICATE_CHARGE = "duplicate_charge"
    """The channel charged the payment a second time: that charge is given back whole."""


SECOND_CHARGE_PREFIX = "charge:"
"""A second charge's refund has ``refund_no`` ``charge:<channel transaction id>``; merchant
refund numbers may not start so, so the two never collide."""


class RefundStatus(enum.StrEnum):
    REFUNDING = "refunding"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    """Nothing was given back (the channel refused the cash part); the amount may be asked again."""
    UNKNOWN = "unknown"
    """No definitive answer after every query, or a part refused after money moved:
    reconciliation decides. Counts as refunded when checking what may still be refunded."""


class PartStatus(enum.StrEnum):
    WAITING = "waiting"
    """A voucher part waits for the cash part: vouchers go back only once the cash did."""
    SENT = "sent"
    DONE = "done"
    FAILED = "failed"
    NOT_SENT = "not_sent"
    """The refund failed before this part was sent: nothing moved for it."""
    REVERSING = "reversing"
    """A recharge's clawback being given back to its account: the channel refused the
    cash refund outright, so the account gets its value again."""
    REVERSED = "reversed"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class RefundPart:
    """What one leg gives back in one refund: ``amount`` in the leg's unit."""

    leg_no: int
    amount: int
    value_minor: int
    status: PartStatus


@dataclass(frozen=True, slots=True)
class Refund:
    """A refund of (part of) an order, by the original route: cash first, then vouchers."""

    refund_id: str
    """The id the channel knows the cash part by; voucher parts are fenced by
    ``FenceKey.refund_return(refund_id, leg_no)`` at their accounts."""
    refund_no: str
    """The merchant's idempotency key (the channel transaction id for a duplicate charge)."""
    kind: RefundKind
    amount_minor: int
    reason: str
    status: RefundStatus
    parts: tuple[RefundPart, ...]
    requested_at_ms: int
    channel: str | None = None
    """The channel that gives it back when that is not the cash leg's: an earlier route's
    late charge (``TriedRoute``). ``None``: the cash leg's channel."""
    payment_serial: str | None = None
    """The serial that channel charged, with ``channel``; ``None``: the order's own."""

    def part(self, leg_no: int) -> RefundPart | None:
        return next((p for p in self.parts if p.leg_no == leg_no), None)



PLANTABLE_BUGS = frozenset({"confirm-twice", "no-refund-after-close", "regress-success",
                            "skip-hold", "over-refund", "ledger-unbalanced",
                            "accept-wrong-channel", "trust-forged-notification",
                            "holds-never-expire", "sentinel-gives-up", "pay-details-lost",
                            "route-ignores-limits", "two-attempts-succeed",
                            "codes-processing-as-failure", "accept-bad-signature",
                            "risk-ignored", "withhold-retry-after-timeout",
                            "quote-price-drift", "shift-counts-unpaid",
                            "change-keeps-holds", "open-without-needed-channel",
                            "credit-before-charge", "route-after-charge",
                            "metrics-double-count", "notify-acks-refusals",
                            "attention-misses-owed", "capture-above-authorisation"})
"""Bugs the simulator can switch on (``payengine sim --plant-bug NAME``): a success after the
close kept, a late "processing" moving a success back, vouchers never held, a hold posted
twice, a hold never expired (the account actor's), owed voucher follow-ups no longer sent
once the fast retry schedule is over or at a start of the order (``sentinel-gives-up``), a
pay sent without the request's details (``pay-details-lost``), routing
past a route's amount limits (``route-ignores-limits``), a next attempt made while the
previous one may still succeed (``two-attempts-succeed``), a channel configuration's
``processing`` codes read as failures (``codes-processing-as-failure``: the bug lives in the
configuration loader, ``actors.adapters.config``, which the simulator builds its wallets
with), a signed
merchant request taken although its signature does not verify (``accept-bad-signature``),
an order waiting for its step-up verification paid all the same (``risk-ignored``), a
withholding retried while its timed-out attempt's close is not answered yet
(``withhold-retry-after-timeout``: ``engine.withhold``), a
quote priced anew at submit instead of charged as quoted (``quote-price-drift``), a shift
report counting unpaid orders as paid (``shift-counts-unpaid``), an order changed by the
user left open with its holds (``change-keeps-holds``, in ``Engine.change_order``), an
engine opened without a channel its unsettled orders use (``open-without-needed-channel``:
the bug lives in ``Engine.open``), a
recharge's account credited as soon as the cash is asked for, before it is paid
(``credit-before-charge``), a
routing fallback after a timeout, without asking the old channel first
(``route-after-charge``), a payment counted by its final state again at every later
commit of the order, e.g. a refund's (``metrics-double-count``: the bug lives in the order
actor's observation hook, ``actors.order_actor``), a
notification the engine refused acknowledged to the wallet all the same by the HTTP service's
answer (``notify-acks-refusals``: the bug lives in ``actors.service.notify``), an attention
queue that leaves out owed voucher follow-ups (``attention-misses-owed``:
``persistence.operator``), a pump pre-authorisation captured for more than it authorised
(``capture-above-authorisation``).
Each must make the oracle report a violation."""

# External voucher providers (engine.provider): a Try the provider has not decided counted
# as held, so the order pays before every asynchronous leg succeeded.
PLANTABLE_BUGS |= {"async-leg-ignored"}

# Pump pre-authorisation (engine.preauth): a capture the wallet says it took with another
# amount than asked believed, the order charging what the wallet said.
PLANTABLE_BUGS |= {"capture-amount-believed"}
# ... and an engine opened with a channel its unsettled pre-authorisations use that cannot
# pre-authorise (the bug lives in ``Engine.open``; the simulator's reopen tries catch it).
PLANTABLE_BUGS |= {"open-with-non-authorising-channel"}
# A report the engine does not believe yet (a second charge, a refund failure) answered as
# handled by Engine.handle_notification, without asking the channel: the wallet stops
# re-sending it (the bug lives in actors.engine).
PLANTABLE_BUGS |= {"notify-acks-unbelieved"}


@dataclass(frozen=True, slots=True)
class OrderPolicy:
    """Tunables of the order life cycle. Every schedule is bounded: nothing retries forever
    (an owed voucher follow-up outlives its schedule only by being re-sent at every start)."""

    pay_window_ms: int = 15 * 60 * 1000
    """Default time from acceptance to the timeout close."""
    pay_window_ms_max: int = 24 * 60 * 60 * 1000
    hold_grace_ms: int = 10 * 60 * 1000
    """Holds expire this long after the order's close, so a Confirm decided before the
    close always finds its hold pending, even after its debits and its own retries."""
    query_schedule_ms: tuple[int, ...] = (1_000, 2_000, 5_000, 10_000, 20_000, 40_000, 100_000)
    """Gaps between status queries of an unknown result; then the order awaits reconciliation."""
    refund_query_schedule_ms: tuple[int, ...] = (
        1_000, 2_000, 5_000, 10_000, 20_000, 40_000, 100_000,
    )
    channel_query_schedules_ms: tuple[tuple[str, tuple[int, ...]], ...] = ()
    """``(channel, schedule)`` pairs: a channel's own ``query_schedule_ms`` (from its
    configuration; ``Engine.open`` adds those its channels carry); other channels use the
    default."""
    channel_refund_query_schedules_ms: tuple[tuple[str, tuple[int, ...]], ...] = ()
    voucher_retry_schedule_ms: tuple[int, ...] = (1_000, 2_000, 5_000, 10_000, 30_000)
    """Gaps between re-sending unanswered voucher commands (idempotent by hold id); after
    the last gap an unanswered Try or debit is cancelled and fails the payment, while an
    unanswered follow-up (a Confirm, a Cancel, a refund's voucher return) is flagged
    (``confirm_unknown``, ``release_unknown``, part ``unknown``) and handed to the sentinel."""
    voucher_sentinel_interval_ms: int = 5 * 60 * 1000
    """The sentinel (R-TCC: once the outcome is decided the follow-up steps must happen):
    after the retry schedule, owed follow-ups are re-sent at this interval (at most an hour)
    until the voucher system answers, and again at every start of the order's actor."""
    voucher_sentinel_attempts_max: int = 2_016
    """Sentinel re-sends per schedule (7 days at 5 min). Then the timer stops, an error is
    logged and the follow-ups stay flagged and listed by ``Engine.owed()``; every reopen of
    the engine re-sends them and starts the schedule again."""
    confirm_query_interval_ms: int = 1_000
    """At most one query per order per this interval on unverified notifications, so a
    flood of forged callbacks cannot turn into a flood of channel calls."""
    legs_max: int = 16
    fallbacks_max: int = 1
    """Routes a routed payment may fall back to after the first (0..3): ``Engine.open`` sets
    it from ``RoutingTable.fallbacks_max``."""
    channels_without_close: frozenset[str] = frozenset()
    """Channels that cannot close a payment (an HTTP channel with no ``close`` operation):
    a fallback from one goes from its query straight to the next route. ``Engine.open``
    adds them."""
    voucher_providers: frozenset[str] = frozenset()
    """External voucher providers (``engine.provider``) the engine was given: their legs
    take no refund return, so a refund that would reach one is refused. ``Engine.open``
    sets it."""
    refunds_max: int = 50
    """Refunds one order may have (merchant refunds and duplicate-charge refunds)."""
    planted_bugs: frozenset[str] = frozenset()
    """Deliberately wrong behaviours, for proving the simulator's oracle has teeth. Empty in
    any real engine; see ``PLANTABLE_BUGS``."""
    authorisation_ttl_ms: int = 30 * 60 * 1000
    """How long a pump pre-authorisation waits for its capture before it expires and is
    voided (a request's ``pay_window_ms`` overrides it); at most ``pay_window_ms_max``."""
    capture_order: str = "vouchers_first"
    """How a capture short of the authorisation is split: ``vouchers_first`` (the vouchers'
    holds are used up first, the cash pays the rest) or ``cash_first``."""

    def __post_init__(self) -> None:
        """Settings are input too: a bad one is ``InvalidRequest``, even under ``python -O``."""
        day_ms = 24 * 60 * 60 * 1000
        check_int(self.pay_window_ms_max, "pay_window_ms_max", 1, 7 * day_ms)
        check_int(self.pay_window_ms, "pay_window_ms", 1, self.pay_window_ms_max)
        check_int(self.hold_grace_ms, "hold_grace_ms", 1, 7 * day_ms)
        for name in ("query_schedule_ms", "refund_query_schedule_ms",
                     "voucher_retry_schedule_ms"):
            check_schedule(getattr(self, name), name, gap_max=day_ms)
        for name in ("channel_query_schedules_ms", "channel_refund_query_schedules_ms"):
            pairs = getattr(self, name)
            check_setting(isinstance(pairs, tuple) and len(pairs) <= 1_000,
                          f"{name} must be a tuple of at most 1000 (channel, schedule) pairs")
            seen = set()
            for pair in pairs:
                check_setting(isinstance(pair, tuple) and len(pair) == 2,
                              f"{name} holds (channel, schedule) pairs, not {shown(pair)}")
                channel = check_id(pair[0], f"{name} channel")
                check_setting(channel not in seen, f"{name} names {channel!r} twice")
                seen.add(channel)
                check_schedule(pair[1], f"{name} {channel}", gap_max=day_ms)
        retry_total = sum(self.voucher_retry_schedule_ms)
        check_setting(self.hold_grace_ms > 2 * retry_total, (
            f"hold_grace_ms {self.hold_grace_ms} must exceed twice the voucher retry schedule "
            f"({retry_total} ms): a Confirm decided before the close must find its hold"))
        check_int(self.confirm_query_interval_ms, "confirm_query_interval_ms", 1, 60 * 60 * 1000)
        check_int(self.voucher_sentinel_interval_ms, "voucher_sentinel_interval_ms", 1,
                  60 * 60 * 1000)
        check_int(self.voucher_sentinel_attempts_max, "voucher_sentinel_attempts_max", 1,
                  1_000_000)
        check_int(self.legs_max, "legs_max", 1, 1_000)
        check_int(self.fallbacks_max, "fallbacks_max", 0, FALLBACKS_MAX)
        check_setting(isinstance(self.channels_without_close, frozenset)
                      and len(self.channels_without_close) <= 1_000,
                      "channels_without_close must be a frozenset of at most 1000 channels")
        check_setting(isinstance(self.voucher_providers, frozenset)
                      and len(self.voucher_providers) <= 1_000,
                      "voucher_providers must be a frozenset of at most 1000 names")
        check_int(self.refunds_max, "refunds_max", 1, 10_000)
        check_int(self.authorisation_ttl_ms, "authorisation_ttl_ms", 1, self.pay_window_ms_max)
        check_setting(self.capture_order in CAPTURE_ORDERS,
                      f"capture_order must be one of {sorted(CAPTURE_ORDERS)}, not "
                      f"{shown(self.capture_order)}")
        unknown = set(self.planted_bugs) - PLANTABLE_BUGS
        check_setting(not unknown, f"unknown planted bugs {sorted(unknown)}")

    def query_schedule_for(self, channel: str | None) -> tuple[int, ...]:
        """The gaps between status queries of a payment through ``channel``."""
        for name, schedule in self.channel_query_schedules_ms:
            if name == channel:
                return schedule
        return self.query_schedule_ms

    def refund_query_schedule_for(self, channel: str | None) -> tuple[int, ...]:
        for name, schedule in self.channel_refund_query_schedules_ms:
            if name == channel:
                return schedule
        return self.refund_query_schedule_ms


# --------------------------------------------------------------------------- the order


@dataclass(frozen=True, slots=True)
class PaymentOrder:
    """A payment order with its legs. Immutable: ``decide`` returns a new one."""

    order_id: str
    merchant_id: str
    merchant_order_no: str
    payment_serial: str
    """The id the channel knows the cash payment by (out_trade_no)."""
    user_id: str
    title: str
    currency: str
    total_minor: int
    fingerprint: str
    state: OrderState
    cause: str
    created_at_ms: int
    close_at_ms: int
    hold_expires_at_ms: int
    legs: tuple[Leg, ...]
    query_attempt: int = 0
    next_query_at_ms: int | None = None
    refund_query_attempt: int = 0
    next_refund_query_at_ms: int | None = None
    voucher_attempt: int = 0
    next_voucher_retry_at_ms: int | None = None
    """When in-flight voucher commands are sent again; None when none is in flight."""
    refunds: tuple[Refund, ...] = ()
    version: int = 0
    pay_details: PayDetails | None = None
    """What the cash part's channel needs besides the amount (``CashPart.details``)."""
    attempt: int = 1
    """Which payment attempt of its trade order this order is (``PaymentRequest.attempt``)."""
    prepay: Prepay | None = None
    """What the pay reply gave for the payer (QR code, prepay id, "enter password"): the
    latest one an answer to the engine's own call carried while the cash was being paid."""
    verification: Verification | None = None
    """The step-up the risk gate asked for at submit (``None``: none asked)."""
    sale: PricedSale | None = None
    """What was sold and at which terms (``PaymentRequest.sale`` / ``quote``); immutable."""
    method: str | None = None
    """The payment method routing chose the channel for (``None``: the cash part named its
    channel). Only a routed payment may fall back to another route."""
    authorisation: Authorisation | None = None
    """A pump pre-authorisation's record (``None``: an ordinary payment). Once captured the
    legs and ``total_minor`` are the captured split; this keeps what was authorised."""
    tried: tuple[TriedRoute, ...] = ()
    """Routes the cash leg left, oldest first (at most ``FALLBACKS_MAX``)."""
    fallback: Fallback | None = None
    """A fallback under way: the old channel is being asked, closed, or the next route
    chosen (``None``: none)."""
    pay_in_flight: bool = field(default=False, compare=False)
    """Volatile, never stored: a pay call of this process has not answered yet. The serial
    is then neither closed nor paid again; the close waits for the answer. A reload starts
    with none in flight, since a dead process's call can no longer answer."""
    confirm_query_at_ms: int | None = field(default=None, compare=False)
    """Volatile, never stored: when an unverified notification last made the order ask its
    channel; such queries are at most one per ``OrderPolicy.confirm_query_interval_ms``."""

    @property
    def is_terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    @property
    def is_settled(self) -> bool:
        """Terminal with nothing left in flight or owed: nothing more will happen by itself.

        A follow-up the voucher system never answered (``OWED_LEG_STATUSES``, a refund's
        voucher return ``unknown``) is still owed and re-sent, so its order is not settled.
        """
        return self.is_terminal and not any(
            leg.status in IN_FLIGHT_LEG_STATUSES or leg.status in OWED_LEG_STATUSES
            for leg in self.legs
        ) and not any(r.status is RefundStatus.REFUNDING for r in self.refunds) and not (
            _owed_returns(self))

    @property
    def owes_follow_up(self) -> bool:
        """A voucher follow-up (Confirm, Cancel, return) went unanswered on the whole retry
        schedule: it is flagged and still owed, and the sentinel re-sends it."""
        return _has_owed(self)

    def refund(self, *, refund_id: str | None = None, refund_no: str | None = None
               ) -> Refund | None:
        for refund in self.refunds:
            if refund.refund_id == refund_id or refund.refund_no == refund_no:
                return refund
        return None

    @property
    def refunded_minor(self) -> int:
        """Merchant refunds that gave back, or may have given back, money (not FAILED)."""
        return sum(r.amount_minor for r in self.refunds
                   if r.kind is RefundKind.MERCHANT and r.status is not RefundStatus.FAILED)

    @property
    def cash_leg(self) -> Leg | None:
        for leg in self.legs:  # a loop, not next(genexpr): read several times per event
            if leg.mode is LegMode.CASH:
                return leg
        return None

    def leg(self, leg_no: int) -> Leg:
        for leg in self.legs:
            if leg.leg_no == leg_no:
                return leg
        raise InvalidRequest(f"order {self.order_id} has no leg {leg_no}")

    def fence_of(self, leg: Leg) -> FenceKey:
        """The fence a voucher leg holds or debits at its account.

        A pre-held leg adopts the caller's own hold (scope ``user``); any other leg has a
        fence in the order's scope, which no caller's hold id can name.
        """
        assert not leg.is_cash and leg.account_id is not None, f"leg {leg.leg_no} has no fence"
        if leg.mode is LegMode.PRE_HELD:
            assert leg.hold_id is not None, f"pre-held leg {leg.leg_no} names no hold"
            return FenceKey.user(leg.hold_id)
        return FenceKey.order_leg(self.order_id, leg.leg_no)


ATTEMPTS_MAX = 10
"""Most payment attempts of one trade order."""
TITLE_MAX = 128
"""Most characters in an order's title (what the wallet shows the payer)."""
REASON_MAX = 256
"""Most characters in a refund's reason."""


def check_request(request: object, *, policy: OrderPolicy,
                  currencies: Mapping[str, int] = ISO_4217) -> PaymentRequest:
    """Return ``request`` if every field has its type and shape; a typed error otherwise.

    What needs no lookup: ids, title, a known currency (``currencies``: the engine's table),
    amounts, the parts' types, modes and hold ids, the pay window, the flag. The shell runs
    it before it looks a channel or an account up, so no bad value reaches a dict or SQLite;
    ``build_order`` runs it again (it is cheap) so that the core never trusts its caller.
    """
    request = check_instance(request, PaymentRequest, "the request")
    for name in ("merchant_id", "merchant_order_no", "user_id"):
        check_id(getattr(request, name), name)
    check_text(request.title, "title", TITLE_MAX, required=True)
    check_currency(request.currency, currencies)
    check_amount(request.total_minor, "total_minor")
    window = request.pay_window_ms
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or not (
        0 < window <= policy.pay_window_ms_max
    )):
        raise InvalidRequest(f"pay_window_ms must be 1..{policy.pay_window_ms_max}, got "
                             f"{shown(window)}")
    check_bool(request.confirm_duplicate, "confirm_duplicate")
    check_int(request.attempt, "attempt", 1, ATTEMPTS_MAX)
    if request.cash is not None:
        cash = check_instance(request.cash, CashPart, "cash")
        check_amount(cash.amount_minor, "cash amount_minor")
        check_id(cash.channel, "the cash part's channel")
        if cash.details is not None:
            check_pay_details(cash.details, "the cash part's details")
    vouchers = check_parts(request.vouchers, VoucherPart, "vouchers", policy.legs_max - 1)
    if request.cash is None and not vouchers:
        raise InvalidRequest("a payment needs a cash part or at least one voucher part")
    for leg_no, part in enumerate(vouchers, start=1):
        check_id(part.account_id, f"voucher part {leg_no} account_id")
        check_amount(part.amount, f"voucher part {leg_no} amount")
        if not isinstance(part.mode, LegMode) or part.mode is LegMode.CASH:
            raise InvalidRequest(f"voucher part {leg_no}: mode must be a voucher mode (a "
                                 f"LegMode), not {shown(part.mode)}")
        check_optional_id(part.hold_id, f"voucher part {leg_no} hold_id")
    if request.sale is not None:
        check_fuel_sale(request.sale, "sale")
    if request.quote is not None:
        quote = check_instance(request.quote, QuoteUse, "quote")
        check_id(quote.quote_id, "quote quote_id")
        check_id(quote.combination_id, "quote combination_id")
    if request.credit_account is not None:
        _check_credit_shape(request, vouchers)
    check_bool(request.authorise, "authorise")
    if request.authorise:
        _preauth.check_shape(request, vouchers)
    return request


def _check_credit_shape(request: PaymentRequest, vouchers: Sequence[VoucherPart]) -> None:
    """A recharge is paid by cash alone; a transfer by one voucher held on another account."""
    target = check_id(request.credit_account, "credit_account")
    if request.cash is not None and vouchers:
        raise InvalidRequest("a recharge is paid by its cash part alone")
    if vouchers and (len(vouchers) != 1 or vouchers[0].mode is not LegMode.PRE_DEDUCT):
        raise InvalidRequest("a transfer takes one pre_deduct voucher part (its source)")
    if vouchers and vouchers[0].account_id == target:
        raise InvalidRequest(f"a transfer from {target} to itself moves nothing")


def build_order(
    request: PaymentRequest,
    *,
    order_id: str,
    payment_serial: str,
    now_ms: int,
    accounts: Mapping[str, AccountUnit],
    policy: OrderPolicy,
    currencies: Mapping[str, int] = ISO_4217,
    cash_channel: str | None = None,
    priced: PricedSale | None = None,
) -> PaymentOrder:
    """Validate ``request`` and build its order in ACCEPTED; raise a typed error if invalid.

    ``priced``: the terms of the quote the request names, as the shell checked them
    (``check_quote_use``); required exactly when the request names a quote.

    ``cash_channel``: the channel routing chose for the method ``request.cash.channel``
    names (``engine.routing``); ``None``: the cash part names its channel itself.

    ``accounts`` gives the unit of every voucher account the request names; a missing one is
    the caller's ``UnknownAccount`` to raise before calling this. ``currencies``: the
    engine's currency table (an order in a currency it does not know is ``InvalidRequest``).
    """
    check_request(request, policy=policy, currencies=currencies)
    if request.authorise:
        _preauth.refuse_provider_parts(request, policy)
    assert ":" not in payment_serial, (
        f"payment serial {payment_serial!r}: an IdSource must not use ':', which separates a "
        "refund id (made from the serial) from its part in journal entries")
    currency = request.currency
    total = request.total_minor
    window = policy.pay_window_ms if request.pay_window_ms is None else request.pay_window_ms
    if request.authorise and request.pay_window_ms is None:
        window = policy.authorisation_ttl_ms
    legs: list[Leg] = []
    if request.cash is not None:
        cash_amount = request.cash.amount_minor
        channel = request.cash.channel if cash_channel is None else check_id(
            cash_channel, "the routed channel")
        legs.append(
            Leg(0, LegMode.CASH, None, cash_amount, currency, cash_amount, None,
                channel=channel)
        )
    seen_accounts: set[str] = set()
    for leg_no, part in enumerate(request.vouchers, start=1):
        legs.append(_voucher_leg(order_id, leg_no, part, currency, accounts, seen_accounts))
    if request.credit_account is not None:
        legs.append(_credit_leg(len(request.vouchers) + 1, request.credit_account, total,
                                currency, accounts))
    paid = sum(leg.value_minor for leg in legs if leg.pays)
    if paid != total:
        raise InvalidRequest(f"the parts add up to {paid} minor units, the order total is {total}")
    assert paid <= AMOUNT_MAX * policy.legs_max
    close_at = now_ms + window
    return PaymentOrder(
        sale=_priced_sale(request, priced),
        order_id=order_id,
        merchant_id=request.merchant_id,
        merchant_order_no=request.merchant_order_no,
        payment_serial=payment_serial,
        user_id=request.user_id,
        title=request.title,
        currency=currency,
        total_minor=total,
        fingerprint=request.fingerprint(),
        state=OrderState.ACCEPTED,
        cause="submitted",
        created_at_ms=now_ms,
        close_at_ms=close_at,
        hold_expires_at_ms=close_at + policy.hold_grace_ms,
        legs=tuple(legs),
        pay_details=None if request.cash is None else request.cash.details,
        attempt=request.attempt,
        authorisation=_preauth.new_authorisation(legs, total) if request.authorise else None,
    )


def with_risk(order: PaymentOrder, verification: Verification | None, note: str = ""
              ) -> PaymentOrder:
    """The new ``order`` as the risk gate decided: a step-up starts it in
    NEEDS_VERIFICATION (its window never outlasting the pay window); ``note`` (why, when
    worth journalling: a default taken) goes into the cause of its first transition."""
    assert order.state is OrderState.ACCEPTED and order.version == 0, order.state
    cause = f"submitted; {note}" if note else "submitted"
    if verification is None:
        return evolve(order, cause=cause)
    verification = evolve(verification,
                          expires_at_ms=min(verification.expires_at_ms, order.close_at_ms))
    return evolve(order, state=OrderState.NEEDS_VERIFICATION, verification=verification,
                  cause=f"{cause}; risk step_up ({verification.rule})")


DUPLICATE_GUARD_STATES = frozenset({OrderState.NEEDS_VERIFICATION, OrderState.ACCEPTED,
                                    OrderState.PAYING, OrderState.DEDUCTING,
                                    OrderState.NEEDS_RECONCILIATION, OrderState.SUCCEEDED,
                                    OrderState.AUTHORISING, OrderState.AUTHORISED,
                                    OrderState.CAPTURING})
"""States of a recent order that make a new one for the same user and amount suspect: it is
paid or may still be. A failed or closed one is what a user retries after, in good faith."""


def _priced_sale(request: PaymentRequest, priced: PricedSale | None) -> PricedSale | None:
    """The order's sale: the checked quote's terms, or the request's sale without any."""
    if request.quote is None:
        assert priced is None, "terms without a quote"
        return None if request.sale is None else PricedSale(request.sale)
    assert priced is not None and priced.quote_id == request.quote.quote_id, (
        "a request naming a quote is built with its checked terms")
    if request.sale is not None and request.sale != priced.sale:
        raise QuoteMismatch(f"the request's sale is not quote {priced.quote_id}'s: leave "
                            "sale out (the quote's is taken) or send the same")
    return priced


def suspected_duplicates(request: PaymentRequest, recent: Sequence[PaymentOrder], *,
                         now_ms: int, window_ms: int) -> list[PaymentOrder]:
    """The user-dimension guard (R-DUP): orders of the same user for the same amount and
    currency, accepted within ``window_ms``, paid or still payable, under another merchant
    order number. Empty when the caller confirmed (``confirm_duplicate``)."""
    if request.confirm_duplicate:
        return []
    return [o for o in recent
            if o.user_id == request.user_id and o.total_minor == request.total_minor
            and o.currency == request.currency and o.state in DUPLICATE_GUARD_STATES
            and now_ms - window_ms <= o.created_at_ms <= now_ms
            and (o.merchant_id, o.merchant_order_no) != (request.merchant_id,
                                                         request.merchant_order_no)]


RETRYABLE_STATES = frozenset({OrderState.FAILED, OrderState.CLOSED})
"""An attempt in one of these may be followed by the next attempt: nothing was kept (a
success that still comes for it is refunded, as for any closed or failed order)."""


def check_next_attempt(latest: PaymentOrder, request: PaymentRequest, *,
                       planted_bugs: frozenset[str] = frozenset()) -> None:
    """Whether ``request`` may be the next attempt after ``latest`` (its trade order's latest
    attempt): ``AttemptRefused`` or ``IdempotencyConflict`` otherwise.

    The trade order is what the merchant sells, so the next attempt pays the same: same user,
    currency, total and title; its method and split may differ.
    """
    if request.attempt != latest.attempt + 1:
        raise AttemptRefused(
            f"trade order {request.merchant_id}/{request.merchant_order_no} has "
            f"{latest.attempt} attempt(s): the next is {latest.attempt + 1}, not "
            f"{request.attempt}")
    if latest.state not in RETRYABLE_STATES and "two-attempts-succeed" not in planted_bugs:
        raise AttemptRefused(
            f"attempt {latest.attempt} of {request.merchant_id}/{request.merchant_order_no} "
            f"is {latest.state.value}: a new attempt only after it failed or closed")
    same = (latest.user_id, latest.currency, latest.total_minor, latest.title)
    if (request.user_id, request.currency, request.total_minor, request.title) != same:
        raise IdempotencyConflict(
            f"attempt {request.attempt} of {request.merchant_id}/{request.merchant_order_no} "
            "must pay the same trade (user, currency, total, title) as the ones before")


def _credit_leg(leg_no: int, account_id: str, total: int, currency: str,
                accounts: Mapping[str, AccountUnit]) -> Leg:
    """The beneficiary leg: a money voucher account in the order's currency, credited the
    whole total (``CurrencyMismatch`` for points or another currency)."""
    account = accounts[account_id]
    if account.minor_per_unit is not None or account.unit != currency:
        raise CurrencyMismatch(f"account {account_id} is in {account.unit}; only a money "
                               f"account in {currency} can be credited {currency}")
    return Leg(leg_no, LegMode.CREDIT, account_id, total, currency, total, None)


def _voucher_leg(
    order_id: str,
    leg_no: int,
    part: VoucherPart,
    currency: str,
    accounts: Mapping[str, AccountUnit],
    seen_accounts: set[str],
) -> Leg:
    amount = part.amount  # checked by check_request, like the mode and the hold id
    if part.account_id in seen_accounts:
        raise InvalidRequest(f"account {part.account_id} appears in two parts; merge them")
    seen_accounts.add(part.account_id)
    account = accounts[part.account_id]
    value = value_in_minor(amount, account.unit, account.minor_per_unit, currency)
    if part.mode is LegMode.PRE_HELD:
        if not part.hold_id:
            raise InvalidRequest(f"voucher part {leg_no} is pre_held but names no hold_id")
    elif part.hold_id is not None:
        raise InvalidRequest(f"voucher part {leg_no}: hold_id is only for pre_held parts")
    if value <= 0:
        raise InvalidAmount(f"voucher part {leg_no} is worth nothing")
    return Leg(leg_no, part.mode, part.account_id, amount, account.unit, value, part.hold_id)


# --------------------------------------------------------------------------- events


class ResultSource(enum.StrEnum):
    """Where a channel result came from, which decides how far it is trusted.

    Answers to calls the engine made (``SYNC``, ``QUERY``, ``CLOSE``), notifications whose
    signature the channel's adapter verified (``NOTIFICATION``) and an imported statement
    (``RECONCILIATION``) are the channel's word. A ``CALLBACK`` is a notification fed already
    parsed, whose origin the engine cannot check: it never moves money by itself, it only
    makes the engine ask the channel (a query), whose answer then counts.
    """

    SYNC = "sync"
    CALLBACK = "callback"
    NOTIFICATION = "notification"
    QUERY = "query"
    CLOSE = "close"
    RECONCILIATION = "reconciliation"


UNVERIFIED_SOURCES = frozenset({ResultSource.CALLBACK})
"""Results that only prompt a query: see ``ResultSource``."""


class CloseCause(enum.StrEnum):
    TIMEOUT = "timeout"
    USER = "user"


class TimerKind(enum.StrEnum):
    CLOSE = "close"
    QUERY = "query"
    REFUND_QUERY = "refund_query"
    VOUCHER_RETRY = "voucher_retry"
    VERIFY = "verify"
    """The end of a step-up's verification window."""


@dataclass(frozen=True, slots=True)
class Activate:
    """The order's actor (re)started: re-issue whatever is in flight, re-arm timers."""


class VoucherOp(enum.StrEnum):
    TRY = "try"
    CONFIRM = "confirm"
    CANCEL = "cancel"
    DEBIT = "debit"
    RETURN = "return"
    """Give spent value back (a refund); idempotent by the return id."""
    CREDIT = "credit"
    """Credit a recharge's or transfer's beneficiary; idempotent by the order's fence."""
    CLAWBACK = "clawback"
    """Take a refunded recharge's value back from its account (or undo that)."""


@dataclass(frozen=True, slots=True)
class VoucherReply:
    """A voucher account's answer to a Try, Confirm, Cancel, debit or return of one leg."""

    leg_no: int
    fence: FenceKey
    op: VoucherOp
    ok: bool
    reason: str = ""
    retryable: bool = False
    """The voucher system failed without deciding (unavailable, timed out): ask again."""


@dataclass(frozen=True, slots=True)
class CashResult:
    """A result for the cash leg from any of the four sources."""

    kind: ResultKind
    source: ResultSource
    code: str
    channel_txn_id: str | None = None
    amount_minor: int | None = None
    channel: str | None = None
    """The channel that reported it, when it came from outside (a notification, a
    statement): checked against the order's channel. ``None``: the order's own channel."""
    currency: str | None = None
    """The currency the channel reported, if it did: checked against the order's."""
    prepay: Prepay | None = None
    """What the reply gave for the payer (``Channel.pay``'s QR code, prepay id...)."""
    payment_serial: str | None = None
    """The serial the answer or report is about; ``None``: the order's current one. One of
    an earlier route (``PaymentOrder.tried``) never moves the order: a success there is
    refunded by that channel."""
    retryable: bool = False
    """The channel's code table lists the failure code as ``retryable``."""
    not_found: bool = False
    """The channel's code table lists the code as ``not_found`` ("order not found")."""


@dataclass(frozen=True, slots=True)
class RefundResult:
    """A result for the refund of the cash leg."""

    refund_id: str
    kind: ResultKind
    source: ResultSource
    code: str
    amount_minor: int | None = None
    """What the channel says it refunded, if it said: checked against what was asked."""
    channel: str | None = None
    currency: str | None = None


REFUND_ABSENT_CODE = "ABSENT_FROM_STATEMENT"
"""The code of a reconciliation ``RefundResult`` saying the channel's statement for the
period lacks this refund: it never happened, so a refund left *unknown* is asked again."""


def _refund_absent(result: RefundResult) -> bool:
    return (result.source is ResultSource.RECONCILIATION and result.kind is ResultKind.FAILURE
            and result.code == REFUND_ABSENT_CODE)


@dataclass(frozen=True, slots=True)
class CloseOrder:
    cause: CloseCause


@dataclass(frozen=True, slots=True)
class TimerFired:
    timer: TimerKind
    token: int
    """The attempt the timer was armed for; a timer whose token is stale is ignored."""


@dataclass(frozen=True, slots=True)
class RequestRefund:
    """The merchant asks to give back ``amount_minor`` of a succeeded payment."""

    refund_no: str
    amount_minor: int
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Rerouted:
    """The shell's answer to ``ChooseRoute``: the next route's channel, or ``None`` when no
    route is left (``cause`` says why, either way, for the journal)."""

    channel: str | None
    cause: str


@dataclass(frozen=True, slots=True)
class VerifyCode:
    """The user typed a step-up verification code (``Engine.verify``). Never stored."""

    code: str = field(repr=False)




OrderEvent = (
    Activate | VoucherReply | CashResult | RefundResult | CloseOrder | TimerFired | RequestRefund
    | VerifyCode | Rerouted | CaptureAuthorisation | VoidAuthorisation | AuthorisationResult
)

# --------------------------------------------------------------------------- effects


@dataclass(frozen=True, slots=True)
class TryHold:
    account_id: str
    fence: FenceKey
    amount: int
    expires_at_ms: int
    leg_no: int
    adopt_only: bool = False
    """A pre-held leg: adopt the user's existing hold, never create one."""


@dataclass(frozen=True, slots=True)
class ConfirmHold:
    account_id: str
    fence: FenceKey
    leg_no: int
    amount: int | None = None
    """Post only this much of the hold and release the rest (a pre-authorisation captured
    short); ``None``: the whole hold."""


@dataclass(frozen=True, slots=True)
class CancelHold:
    """Void a hold, reverse a debit, or record an empty rollback; idempotent."""

    account_id: str
    fence: FenceKey
    leg_no: int


@dataclass(frozen=True, slots=True)
class DebitVoucher:
    account_id: str
    fence: FenceKey
    amount: int
    leg_no: int


@dataclass(frozen=True, slots=True)
class PayCash:
    channel: str
    payment_serial: str
    amount_minor: int
    currency: str
    title: str
    details: PayDetails | None = None


@dataclass(frozen=True, slots=True)
class QueryCash:
    channel: str
    payment_serial: str


@dataclass(frozen=True, slots=True)
class QueryCharge:
    """Ask the channel whether one transaction of the payment is a real charge.

    A notification of a second charge never moves money by itself: only the channel's
    answer to this (or the statement) has the second charge refunded."""

    channel: str
    payment_serial: str
    channel_txn_id: str


@dataclass(frozen=True, slots=True)
class CloseCash:
    channel: str
    payment_serial: str


@dataclass(frozen=True, slots=True)
class RefundCash:
    channel: str
    payment_serial: str
    refund_id: str
    amount_minor: int
    currency: str


@dataclass(frozen=True, slots=True)
class QueryRefund:
    channel: str
    payment_serial: str
    refund_id: str


@dataclass(frozen=True, slots=True)
class ChooseRoute:
    """Choose the next route of ``method`` (``engine.routing.choose_route``) without the
    channels in ``excluded`` (those tried), breakers respected; answer ``Rerouted``."""

    method: str
    amount_minor: int
    currency: str
    excluded: tuple[str, ...]
    order_id: str


@dataclass(frozen=True, slots=True)
class ArmTimer:
    timer: TimerKind
    due_at_ms: int
    token: int


@dataclass(frozen=True, slots=True)
class ReturnVoucher:
    """Give ``amount`` of spent value back to a voucher account (a refund's voucher part)."""

    account_id: str
    fence: FenceKey
    """The return's fence, ``FenceKey.refund_return(refund_id, leg_no)``."""
    amount: int
    leg_no: int


@dataclass(frozen=True, slots=True)
class CreditVoucher:
    """Credit ``amount`` to the beneficiary account of a recharge or transfer (available
    and funded up), idempotent by ``fence`` (the credit leg's own)."""

    account_id: str
    fence: FenceKey
    amount: int
    leg_no: int


@dataclass(frozen=True, slots=True)
class ClawBack:
    """A recharge's refund takes ``amount`` back from the credited account first (a debit
    under the refund's fence, refused if the balance is short), or, ``undo``, gives it back
    (the channel refused the cash refund outright)."""

    account_id: str
    fence: FenceKey
    """``FenceKey.refund_return(refund_id, credit leg)``."""
    amount: int
    leg_no: int
    undo: bool = False



Effect = (
    TryHold | ConfirmHold | CancelHold | DebitVoucher | PayCash | QueryCash | QueryCharge
    | CloseCash | RefundCash | QueryRefund | ArmTimer | ReturnVoucher | CreditVoucher | ClawBack
    | ChooseRoute | AuthoriseCash | CaptureCash | VoidCash | QueryAuthorisation
)


@dataclass(frozen=True, slots=True)
class Transition:
    """One change of the order's state or of one leg's status, for the journal and the log."""

    entity: str
    """``"order"`` or ``"leg:N"``."""
    from_state: str
    to_state: str
    cause: str


@dataclass(frozen=True, slots=True)
class Decision:
    order: PaymentOrder
    effects: tuple[Effect, ...]
    transitions: tuple[Transition, ...]
    note: str
    """What the event amounted to when nothing changed: duplicate, stale, ignored."""

    @property
    def changed(self) -> bool:
        return bool(self.transitions) or self.note == "applied"


# --------------------------------------------------------------------------- decide


@dataclass
class _Draft:
    """A decision being built: the order so far, and what to do and record."""

    order: PaymentOrder
    now_ms: int
    policy: OrderPolicy
    effects: list[Effect] = field(default_factory=list)
    transitions: list[Transition] = field(default_factory=list)
    touched: bool = False

    def move(self, trigger: Trigger, cause: str | None = None) -> None:
        target = next_state(self.order.state, trigger)
        self.transitions.append(
            Transition("order", self.order.state.value, target.value, cause or trigger.value)
        )
        self.order = evolve(self.order, state=target, cause=cause or trigger.value)

    def set_leg(self, leg_no: int, status: LegStatus, cause: str, **fields: object) -> Leg:
        old = self.order.leg(leg_no)
        new = evolve(old, status=status, **fields)
        if old.status is not status:
            self.transitions.append(Transition(f"leg:{leg_no}", old.status.value, status.value, cause))
        elif new != old:
            self.touched = True
        legs = tuple(new if leg.leg_no == leg_no else leg for leg in self.order.legs)
        self.order = evolve(self.order, legs=legs)
        return new

    def update(self, **fields: object) -> None:
        self.order = evolve(self.order, **fields)
        self.touched = True

    def volatile(self, **fields: object) -> None:
        """Change fields that are never stored (``pay_in_flight``...): no new version."""
        self.order = evolve(self.order, **fields)

    def set_refund(self, refund: Refund, cause: str) -> Refund:
        """Add or replace ``refund``, recording its and its parts' status changes."""
        old = self.order.refund(refund_id=refund.refund_id)
        refund = evolve(refund, status=_refund_status(refund))
        if old is None or old.status is not refund.status:
            self.transitions.append(Transition(f"refund:{refund.refund_id}",
                                               "" if old is None else old.status.value,
                                               refund.status.value, cause))
        for part in refund.parts:
            was = None if old is None else old.part(part.leg_no)
            if was is None or was.status is not part.status:
                self.transitions.append(Transition(f"refund:{refund.refund_id}:{part.leg_no}",
                                                   "" if was is None else was.status.value,
                                                   part.status.value, cause))
        if old is None:
            refunds = (*self.order.refunds, refund)
        else:
            refunds = tuple(refund if r.refund_id == refund.refund_id else r
                            for r in self.order.refunds)
        self.order = evolve(self.order, refunds=refunds)
        self.touched = True
        return refund

    def legs(self, *modes: LegMode) -> list[Leg]:
        return [leg for leg in self.order.legs if leg.mode in modes]

    def cash(self) -> Leg | None:
        return self.order.cash_leg

    def done(self, note: str) -> Decision:
        if self.transitions or self.touched:
            note = "applied"
            self.order = evolve(self.order, version=self.order.version + 1)
        elif note == "applied":
            # the handler found nothing to change (e.g. the same amount mismatch again): it is
            # not a change, or ``Decision.changed`` would say so with the version unchanged
            note = "duplicate: nothing changed"
        return Decision(self.order, tuple(self.effects), tuple(self.transitions), note)


def decide(
    order: PaymentOrder, event: OrderEvent, *, now_ms: int, policy: OrderPolicy
) -> Decision:
    """Apply one event to ``order``: the new order, the effects to carry out, what changed.

    Raises ``IllegalTransition`` (order untouched) for an event the order's state forbids,
    such as a user close of a paid order. Duplicate and stale events are not errors: they
    come back as a decision that changes nothing, with a note saying why.
    """
    draft = _Draft(order, now_ms, policy)
    match event:
        case Activate():
            note = _activate(draft)
        case VoucherReply():
            note = _voucher_reply(draft, event)
        case CashResult():
            note = _cash_result(draft, event)
        case RefundResult():
            note = _refund_result(draft, event)
        case CloseOrder():
            note = _close(draft, event.cause)
        case TimerFired():
            note = _timer(draft, event)
        case RequestRefund():
            note = _request_refund(draft, event)
        case VerifyCode():
            note = _verify(draft, event)
        case Rerouted():
            note = _rerouted(draft, event)
        case CaptureAuthorisation():
            note = _preauth.on_capture(draft, event)
        case VoidAuthorisation():
            note = _preauth.on_void(draft)
        case AuthorisationResult():
            note = _preauth.on_result(draft, event)
    _keep_voucher_retry(draft)
    decision = draft.done(note)
    _assert_consistent(decision.order, policy)
    return decision


def _assert_consistent(order: PaymentOrder, policy: OrderPolicy) -> None:
    """Invariants no event may break; a failure is a bug in this module."""
    assert sum(leg.value_minor for leg in order.legs if leg.pays) == order.total_minor
    statuses = {leg.status for leg in order.legs}
    if order.authorisation is not None:
        _preauth.assert_consistent(order, policy)
        # a captured authorisation's legs with no share were released, not paid
        statuses = {leg.status for leg in order.legs if leg.value_minor > 0}
    if order.state is OrderState.SUCCEEDED:
        assert not statuses & {
            LegStatus.CANCELLING, LegStatus.CANCELLED, LegStatus.REFUSED, LegStatus.UNPAID,
            LegStatus.SHORTFALL, LegStatus.REVERSING, LegStatus.REVERSED, LegStatus.REFUNDING,
            LegStatus.REFUNDED,
        }, f"succeeded order {order.order_id} with legs {sorted(statuses)}"
    if order.state in (OrderState.FAILED, OrderState.CLOSED):
        assert not statuses & {LegStatus.CONFIRMING, LegStatus.CONFIRMED, LegStatus.CREDITING,
                               LegStatus.CREDITED}, (
            f"{order.state.value} order {order.order_id} confirmed a hold or credited"
        )
    if order.state is OrderState.SUCCEEDED:
        assert all(leg.status is LegStatus.CREDITED for leg in order.legs if not leg.pays), (
            f"order {order.order_id} succeeded before its beneficiary was credited")
    if order.state is OrderState.NEEDS_VERIFICATION:
        # R-PROD: nothing is held, tried or charged before the step-up passed
        assert statuses == {LegStatus.NEW}, (
            f"order {order.order_id} waits for verification with legs {sorted(statuses)}")
        assert order.verification is not None and (
            order.verification.status is VerificationStatus.PENDING), order.verification
    v = order.verification
    if v is not None and v.status is not VerificationStatus.PASSED:
        assert order.state in (OrderState.NEEDS_VERIFICATION, OrderState.FAILED,
                               OrderState.CLOSED), (
            f"order {order.order_id} is {order.state.value}, its verification {v.status.value}")
    _assert_routes(order)
    for refund in order.refunds:
        assert sum(p.value_minor for p in refund.parts) == refund.amount_minor, refund
        assert refund.kind is RefundKind.DUPLICATE_CHARGE or order.state is OrderState.SUCCEEDED
    if "over-refund" not in policy.planted_bugs:
        left = _refundable(order, strict=False)
        assert all(value >= 0 for value in left.values()), (
            f"order {order.order_id} refunds more than a leg paid: {left}")


def _assert_routes(order: PaymentOrder) -> None:
    """A fallback only while paying, within the bound, never back to a route it left."""
    assert len(order.tried) <= FALLBACKS_MAX, order.tried
    if not order.tried and order.fallback is None:
        return
    cash = order.cash_leg
    assert cash is not None and order.method is not None, order.order_id
    channels = [t.channel for t in order.tried] + [cash.channel]
    assert len(set(channels)) == len(channels), f"order {order.order_id} routes {channels}"
    serials = {t.payment_serial for t in order.tried}
    assert order.payment_serial not in serials and len(serials) == len(order.tried)
    if order.fallback is not None:
        assert order.state is OrderState.PAYING and cash.status is LegStatus.PAYING, (
            f"order {order.order_id} falls back while {order.state.value}/{cash.status.value}")


# ---- activation


def _activate(d: _Draft) -> str:
    """Re-issue every in-flight and owed effect (all idempotent) and re-arm the timers.

    Owed follow-ups (the sentinel's) are sent again at once; if their schedule had run out
    (or was never armed, in a database from before the sentinel) it starts again.
    """
    order = d.order
    if order.state in (OrderState.ACCEPTED, OrderState.PAYING, OrderState.NEEDS_RECONCILIATION,
                       OrderState.NEEDS_VERIFICATION, OrderState.AUTHORISING,
                       OrderState.AUTHORISED):
        d.effects.append(ArmTimer(TimerKind.CLOSE, order.close_at_ms, 0))
    if order.state is OrderState.NEEDS_VERIFICATION:
        assert order.verification is not None
        if "risk-ignored" in d.policy.planted_bugs:  # the bug: the gate's step-up skipped
            _verified(d, "planted bug: step-up ignored")
            return "activated"
        d.effects.append(ArmTimer(TimerKind.VERIFY, order.verification.expires_at_ms, 0))
        return "activated"  # nothing else: every leg is new
    gives_up = "sentinel-gives-up" in d.policy.planted_bugs
    for leg in order.legs:
        if not (gives_up and leg.status in OWED_LEG_STATUSES):  # the bug: owed is forgotten
            _reissue(d, leg)
    for refund in order.refunds:
        _resend_refund(d, refund, cash=True, vouchers=True)
    if not gives_up:
        _resend_owed_returns(d)
    if order.next_voucher_retry_at_ms is not None:
        d.effects.append(ArmTimer(TimerKind.VOUCHER_RETRY, order.next_voucher_retry_at_ms,
                                  order.voucher_attempt))
    elif _has_owed(order) and not gives_up:
        _arm_voucher_retry(d, 0)
    cash = order.cash_leg
    refunding = cash is not None and (
        cash.status is LegStatus.REFUNDING or bool(_cash_parts_in_flight(order)))
    if refunding and order.next_refund_query_at_ms is not None:
        d.effects.append(ArmTimer(TimerKind.REFUND_QUERY, order.next_refund_query_at_ms,
                                  order.refund_query_attempt))
    if order.state is OrderState.ACCEPTED:
        _advance_holds(d)
    if order.authorisation is not None:
        _preauth.reissue(d)
    return "activated"


def _reissue(d: _Draft, leg: Leg) -> None:
    order = d.order
    account = leg.account_id
    if leg.status is LegStatus.TRYING and account is not None:
        d.effects.append(_try(order, leg))
    elif leg.status in (LegStatus.CONFIRMING, LegStatus.CONFIRM_UNKNOWN) and account is not None:
        d.effects.append(_confirm(order, leg))
    elif leg.status in (LegStatus.CANCELLING, LegStatus.REVERSING, LegStatus.RELEASE_UNKNOWN) and (
        account is not None
    ):
        d.effects.append(CancelHold(account, order.fence_of(leg), leg.leg_no))
    elif leg.status is LegStatus.DEBITING and account is not None:
        d.effects.append(DebitVoucher(account, order.fence_of(leg), leg.amount, leg.leg_no))
    elif leg.status is LegStatus.CREDITING:
        d.effects.append(_credit(order, leg))
    elif leg.status is LegStatus.PAYING and leg.channel is not None:
        if order.pay_in_flight:
            pass  # its answer is still to come: neither close nor pay the serial again
        elif order.is_terminal:  # closed: the channel close may never have left the process
            d.effects.append(CloseCash(leg.channel, order.payment_serial))
        elif order.fallback is not None:  # the fallback's step was decided: send it again
            d.effects.append(_fallback_command(order, leg, order.fallback.step))
        elif leg.channel_code is None and d.now_ms < order.close_at_ms:
            d.effects.append(_pay(d, leg))  # never a payment past its window
            d.volatile(pay_in_flight=True)
        if order.next_query_at_ms is not None:  # None: the schedule already ran out
            d.effects.append(ArmTimer(TimerKind.QUERY, order.next_query_at_ms, order.query_attempt))
    elif leg.status is LegStatus.REFUNDING and leg.channel and leg.refund_id:
        d.effects.append(_refund(order, leg))


def _try(order: PaymentOrder, leg: Leg) -> TryHold:
    assert leg.account_id is not None
    return TryHold(leg.account_id, order.fence_of(leg), leg.amount, order.hold_expires_at_ms,
                   leg.leg_no, adopt_only=leg.mode is LegMode.PRE_HELD)


def _credit(order: PaymentOrder, leg: Leg) -> CreditVoucher:
    assert leg.mode is LegMode.CREDIT and leg.account_id is not None, leg
    return CreditVoucher(leg.account_id, order.fence_of(leg), leg.amount, leg.leg_no)


def _pay(d: _Draft, cash: Leg) -> PayCash:
    order = d.order
    assert cash.channel is not None
    details = None if "pay-details-lost" in d.policy.planted_bugs else order.pay_details
    return PayCash(cash.channel, order.payment_serial, cash.amount, order.currency, order.title,
                   details)


def _refund(order: PaymentOrder, cash: Leg) -> RefundCash:
    assert cash.channel is not None and cash.refund_id is not None
    return RefundCash(cash.channel, order.payment_serial, cash.refund_id, cash.amount, order.currency)


def _advance_holds(d: _Draft) -> None:
    """In ACCEPTED: Try every hold not yet tried; once all are held, go to the cash step."""
    skip = "skip-hold" in d.policy.planted_bugs
    for leg in d.legs(*HOLD_MODES):
        if leg.status is LegStatus.NEW and skip and leg.mode is LegMode.PRE_DEDUCT:
            d.set_leg(leg.leg_no, LegStatus.HELD, "planted bug: never tried")
        elif leg.status is LegStatus.NEW:
            assert leg.account_id is not None
            d.set_leg(leg.leg_no, LegStatus.TRYING, "try")
            d.effects.append(_try(d.order, leg))
    if all(leg.status is LegStatus.HELD for leg in d.legs(*HOLD_MODES)):
        _start_cash(d)


def _start_cash(d: _Draft) -> None:
    if d.order.authorisation is not None:
        _preauth.start(d)
        return
    cash = d.cash()
    if cash is None:
        _cash_succeeded(d, "no cash part")
        return
    d.move(Trigger.HOLDS_PLACED)
    assert cash.channel is not None
    d.set_leg(cash.leg_no, LegStatus.PAYING, "pay")
    d.effects.append(_pay(d, d.order.leg(cash.leg_no)))
    d.volatile(pay_in_flight=True)
    _arm_query(d, attempt=0)
    if "credit-before-charge" in d.policy.planted_bugs:  # the bug: credited before paid
        d.effects += [_credit(d.order, leg) for leg in d.legs(LegMode.CREDIT)]


def _cash_channel(d: _Draft) -> str | None:
    cash = d.cash()
    return None if cash is None else cash.channel


def _arm_query(d: _Draft, attempt: int) -> None:
    schedule = d.policy.query_schedule_for(_cash_channel(d))
    gap = schedule[min(attempt, len(schedule) - 1)]
    due = d.now_ms + gap
    d.update(query_attempt=attempt, next_query_at_ms=due)
    d.effects.append(ArmTimer(TimerKind.QUERY, due, attempt))


def _arm_refund_query(d: _Draft, attempt: int) -> None:
    schedule = d.policy.refund_query_schedule_for(_cash_channel(d))
    due = d.now_ms + schedule[min(attempt, len(schedule) - 1)]
    d.update(refund_query_attempt=attempt, next_refund_query_at_ms=due)
    d.effects.append(ArmTimer(TimerKind.REFUND_QUERY, due, attempt))


# ---- voucher replies


def _voucher_reply(d: _Draft, reply: VoucherReply) -> str:
    if reply.op is VoucherOp.RETURN:
        return _return_reply(d, reply)
    if reply.op is VoucherOp.CLAWBACK:
        return _clawback_reply(d, reply)
    leg = d.order.leg(reply.leg_no)
    if leg.is_cash or d.order.fence_of(leg) != reply.fence:
        return f"stale: reply for {reply.fence!r}, leg {leg.leg_no} is not fenced so"
    expected = _EXPECTED_OP.get(leg.status)
    if expected is reply.op and not reply.ok and reply.retryable:
        return f"ignored: voucher system failed without deciding ({reply.reason}); will retry"
    if expected is not reply.op:
        return f"duplicate: {reply.op.value} reply, leg {leg.leg_no} is {leg.status.value}"
    match leg.status:
        case LegStatus.TRYING:
            return _hold_reply(d, leg, reply)
        case LegStatus.CONFIRMING | LegStatus.CONFIRM_UNKNOWN:
            status = LegStatus.CONFIRMED if reply.ok else LegStatus.CONFIRM_FAILED
            d.set_leg(leg.leg_no, status, reply.reason or "confirmed")
        case LegStatus.CANCELLING | LegStatus.REVERSING | LegStatus.RELEASE_UNKNOWN:
            # only a post-deduct leg is reversed (its debit); a held one is cancelled
            reversal = leg.status is LegStatus.REVERSING or (
                leg.status is LegStatus.RELEASE_UNKNOWN and leg.mode is LegMode.POST_DEDUCT)
            done = LegStatus.REVERSED if reversal else LegStatus.CANCELLED
            status = done if reply.ok else LegStatus.RELEASE_FAILED
            d.set_leg(leg.leg_no, status, reply.reason or "released")
        case LegStatus.DEBITING:
            status = LegStatus.DEBITED if reply.ok else LegStatus.SHORTFALL
            d.set_leg(leg.leg_no, status, reply.reason or "debited")
            _after_debit(d)
        case LegStatus.CREDITING:
            status = LegStatus.CREDITED if reply.ok else LegStatus.REFUSED
            d.set_leg(leg.leg_no, status, reply.reason or "credited")
            _after_debit(d)
    return "applied"


_EXPECTED_OP = {
    LegStatus.TRYING: VoucherOp.TRY,
    LegStatus.CONFIRMING: VoucherOp.CONFIRM,
    LegStatus.CONFIRM_UNKNOWN: VoucherOp.CONFIRM,
    LegStatus.CANCELLING: VoucherOp.CANCEL,
    LegStatus.REVERSING: VoucherOp.CANCEL,
    LegStatus.RELEASE_UNKNOWN: VoucherOp.CANCEL,
    LegStatus.DEBITING: VoucherOp.DEBIT,
    LegStatus.CREDITING: VoucherOp.CREDIT,
}
"""The answer each leg status waits for; a late answer to an owed follow-up still counts."""


def _hold_reply(d: _Draft, leg: Leg, reply: VoucherReply) -> str:
    if reply.ok:
        d.set_leg(leg.leg_no, LegStatus.HELD, "held")
        if d.order.state is OrderState.ACCEPTED:
            _advance_holds(d)
        return "applied"
    d.set_leg(leg.leg_no, LegStatus.REFUSED, reply.reason or "refused")
    if d.order.state is OrderState.ACCEPTED:
        d.move(Trigger.HOLD_REFUSED, f"hold_refused: {reply.reason}")
        _release_everything(d, "payment failed")
    return "applied"


def _after_debit(d: _Draft) -> None:
    """In DEDUCTING, once every debit and credit answered: succeed, or undo everything on a
    shortfall or a refused credit (a recharge's cash is refunded, a transfer's hold voided)."""
    if d.order.state is not OrderState.DEDUCTING:
        return
    if any(leg.status in (LegStatus.DEBITING, LegStatus.CREDITING) for leg in d.order.legs):
        return
    if any(leg.status is LegStatus.REFUSED and not leg.pays for leg in d.order.legs):
        d.move(Trigger.CREDIT_REFUSED)
        _release_everything(d, "credit refused")
        return
    if any(leg.status is LegStatus.SHORTFALL for leg in d.order.legs):
        d.move(Trigger.SHORTFALL)
        _release_everything(d, "post-deduct shortfall")
        return
    d.move(Trigger.DEBITS_DONE)
    _confirm_holds(d)


def _confirm(order: PaymentOrder, leg: Leg) -> ConfirmHold:
    """A hold's Confirm: a pre-authorisation's posts the captured share only."""
    assert leg.account_id is not None
    amount = None if order.authorisation is None else leg.amount
    return ConfirmHold(leg.account_id, order.fence_of(leg), leg.leg_no, amount)


def _confirm_holds(d: _Draft) -> None:
    for leg in d.legs(*HOLD_MODES):
        assert leg.status is LegStatus.HELD, f"confirming leg {leg.leg_no} in {leg.status.value}"
        assert leg.account_id is not None
        d.set_leg(leg.leg_no, LegStatus.CONFIRMING, "payment succeeded")
        d.effects.append(_confirm(d.order, leg))
        if "confirm-twice" in d.policy.planted_bugs:
            d.effects.append(_confirm(d.order, leg))


def _release_everything(d: _Draft, cause: str) -> None:
    """The payment did not go through: give every leg back (holds, debits, and the cash)."""
    for leg in d.order.legs:
        account = leg.account_id
        if leg.status in (LegStatus.HELD, LegStatus.TRYING) and account is not None:
            d.set_leg(leg.leg_no, LegStatus.CANCELLING, cause)
            d.effects.append(CancelHold(account, d.order.fence_of(leg), leg.leg_no))
        elif leg.status is LegStatus.DEBITED and account is not None:
            d.set_leg(leg.leg_no, LegStatus.REVERSING, cause)
            d.effects.append(CancelHold(account, d.order.fence_of(leg), leg.leg_no))
        elif leg.status is LegStatus.NEW and leg.mode is LegMode.CASH:
            d.set_leg(leg.leg_no, LegStatus.UNPAID, cause)
        elif leg.status is LegStatus.NEW and leg.mode is LegMode.PRE_HELD and account is not None:
            # the user's own pre-hold, never tried by this order: release it all the same
            d.set_leg(leg.leg_no, LegStatus.CANCELLING, cause)
            d.effects.append(CancelHold(account, d.order.fence_of(leg), leg.leg_no))
        elif leg.status is LegStatus.NEW:
            d.set_leg(leg.leg_no, LegStatus.CANCELLED, cause)
        elif leg.status is LegStatus.PAID:
            _refund_cash(d, leg, cause)


def _refund_cash(d: _Draft, leg: Leg, cause: str) -> None:
    """Give a charged cash leg back by the original route (差错退款); one refund per order."""
    assert leg.channel is not None
    refund_id = f"{d.order.payment_serial}-R1"
    leg = d.set_leg(leg.leg_no, LegStatus.REFUNDING, cause, refund_id=refund_id)
    d.effects.append(_refund(d.order, leg))
    _arm_refund_query(d, attempt=0)


# ---- cash results


def check_report(order: PaymentOrder, result: CashResult | RefundResult,
                 policy: OrderPolicy) -> None:
    """Refuse a channel report that contradicts what the order is: ``NotificationRejected``.

    Channel, currency and (for a notification) amount are fixed when the order is made, so
    a report naming others is not about this payment, whatever it says. A verified success
    of another amount is not refused here: money really moved, and it takes the mismatch
    path (never a success). The shell checks the same before feeding, and records it.
    """
    cash = order.cash_leg
    if cash is None:
        raise NotificationRejected(f"order {order.order_id} has no cash part", "wrong_channel")
    expected = _reporting_channel(order, result) or cash.channel
    if result.channel is not None and result.channel != expected and (
        "accept-wrong-channel" not in policy.planted_bugs
    ):
        raise NotificationRejected(
            f"order {order.order_id} pays through {expected}, not {result.channel}",
            "wrong_channel")
    from_outside = result.source in (ResultSource.CALLBACK, ResultSource.NOTIFICATION)
    if from_outside and result.currency is not None and result.currency != order.currency:
        # (an answer to the engine's own call in another currency is not refused: if money
        # moved, it takes the mismatch path, never a success)
        raise NotificationRejected(
            f"order {order.order_id} is in {order.currency}, the report says {result.currency}",
            "wrong_currency")
    if not from_outside or result.amount_minor is None:
        return
    if isinstance(result, RefundResult):
        asked = _refund_cash_amount(order, result.refund_id)
        if asked is None:
            raise NotificationRejected(
                f"order {order.order_id} has no refund {result.refund_id} through its channel",
                "unknown_refund")
        if result.amount_minor != asked:
            raise NotificationRejected(
                f"refund {result.refund_id} asked {asked}, the report says {result.amount_minor}",
                "wrong_amount")
    elif result.source in UNVERIFIED_SOURCES and result.amount_minor != cash.amount:
        raise NotificationRejected(
            f"order {order.order_id} asked {cash.amount}, the report says {result.amount_minor}",
            "wrong_amount")


PAID_CASH_STATUSES = frozenset({LegStatus.PAID, LegStatus.REFUNDING, LegStatus.REFUNDED,
                                LegStatus.REFUND_UNKNOWN, LegStatus.REFUND_FAILED})
"""Cash statuses that mean the channel charged the payment (under ``channel_txn_id``)."""


def _reporting_channel(order: PaymentOrder, result: CashResult | RefundResult) -> str | None:
    """The channel a report must come from when it is not the cash leg's: an earlier
    route's, for its serial or its late charge's refund (``None``: the cash leg's)."""
    if isinstance(result, RefundResult):
        refund = order.refund(refund_id=result.refund_id)
        return None if refund is None else refund.channel
    tried = old_route(order, result)
    return None if tried is None else tried.channel


def old_route(order: PaymentOrder, result: CashResult) -> TriedRoute | None:
    """The earlier route ``result`` is about, if its serial is one the order left."""
    serial = result.payment_serial
    if serial is None or serial == order.payment_serial:
        return None
    return next((t for t in order.tried if t.payment_serial == serial), None)


def _late_charge_key(tried: TriedRoute, result: CashResult) -> str:
    """The refund number of an earlier route's late charge: one per transaction."""
    return SECOND_CHARGE_PREFIX + (result.channel_txn_id or tried.payment_serial)


def report_agrees(order: PaymentOrder, result: CashResult | RefundResult) -> bool:
    """Whether a report says only what the order already knows from its channel.

    An unverified notification that agrees (the same success again, "still processing")
    can be acknowledged; one that would change something cannot be believed and is refused
    while the order asks the channel."""
    cash = order.cash_leg
    if cash is None or result.kind is ResultKind.PROCESSING:
        return True
    if isinstance(result, CashResult) and (tried := old_route(order, result)) is not None:
        # an earlier route: only its late charge changes anything (a refund), once
        return result.kind is not ResultKind.SUCCESS or order.refund(
            refund_no=_late_charge_key(tried, result)) is not None
    if isinstance(result, RefundResult):
        refund = order.refund(refund_id=result.refund_id)
        part = None if refund is None else refund.part(cash.leg_no)
        done = (cash.refund_id == result.refund_id and cash.status is LegStatus.REFUNDED) or (
            part is not None and part.status is PartStatus.DONE)
        failed = (cash.refund_id == result.refund_id
                  and cash.status is LegStatus.REFUND_FAILED) or (
            part is not None and part.status is PartStatus.FAILED)
        return done if result.kind is ResultKind.SUCCESS else failed
    if result.kind is ResultKind.FAILURE:
        return cash.status is LegStatus.UNPAID
    txn = result.channel_txn_id
    if cash.status not in PAID_CASH_STATUSES:
        return False
    # the payment's own transaction, or a second charge the channel confirmed (being refunded)
    return txn in (None, cash.channel_txn_id) or order.refund(
        refund_no=SECOND_CHARGE_PREFIX + txn) is not None


def needs_confirmation(order: PaymentOrder, result: CashResult | RefundResult) -> bool:
    """Whether even a verified report is believed only once the channel's answer to a query
    says the same: a second charge (money would leave) and a refund failure (the amount
    would be free to refund again)."""
    cash = order.cash_leg
    if cash is None:
        return False
    if isinstance(result, RefundResult):
        return result.kind is ResultKind.FAILURE
    if (tried := old_route(order, result)) is not None:  # money would leave: confirm first
        return result.kind is ResultKind.SUCCESS and order.refund(
            refund_no=_late_charge_key(tried, result)) is None
    txn = result.channel_txn_id
    return (result.kind is ResultKind.SUCCESS and cash.status in PAID_CASH_STATUSES
            and txn is not None and cash.channel_txn_id is not None
            and txn != cash.channel_txn_id)


def _refund_cash_amount(order: PaymentOrder, refund_id: str) -> int | None:
    """What the channel was asked to give back under ``refund_id`` (``None``: nothing)."""
    cash = order.cash_leg
    if cash is None:
        return None
    if cash.refund_id == refund_id:
        return cash.amount
    refund = order.refund(refund_id=refund_id)
    part = None if refund is None else refund.part(cash.leg_no)
    return None if part is None else part.amount


def _ask_channel(d: _Draft, effect: QueryCash | QueryCharge | QueryRefund, why: str, *,
                 source: ResultSource) -> str:
    """Ask the channel instead of believing a report. For unverified reports at most one
    query per confirm interval (the shell bounds them per order too, across restarts of the
    actor); a verified one always asks, so forged callbacks can never use up its turn."""
    last = d.order.confirm_query_at_ms
    if source in UNVERIFIED_SOURCES:
        if last is not None and d.now_ms - last < d.policy.confirm_query_interval_ms:
            return f"ignored: {why}; the channel was asked moments ago"
        d.volatile(confirm_query_at_ms=d.now_ms)
    d.effects.append(effect)
    return f"asked the channel: {why}"


def _trusts(d: _Draft, source: ResultSource) -> bool:
    return source not in UNVERIFIED_SOURCES or "trust-forged-notification" in d.policy.planted_bugs


def _confirm_cash(d: _Draft, cash: Leg, result: CashResult) -> str:
    """An unverified payment notification: ask the channel what it would change."""
    why = f"unverified {result.kind.value} notification ({result.code})"
    assert cash.channel is not None
    txn = result.channel_txn_id
    if result.kind is ResultKind.PROCESSING:
        return f"ignored: {why}"
    if cash.status in (LegStatus.PAYING, LegStatus.UNKNOWN, LegStatus.UNPAID):
        return _ask_channel(d, QueryCash(cash.channel, d.order.payment_serial), why,
                            source=result.source)
    if result.kind is ResultKind.SUCCESS and txn and cash.channel_txn_id and (
        txn != cash.channel_txn_id
    ) and d.order.refund(refund_no=SECOND_CHARGE_PREFIX + txn) is None:
        return _ask_channel(d, QueryCharge(cash.channel, d.order.payment_serial, txn), why,
                            source=result.source)
    return f"ignored: {why}, cash leg is {cash.status.value}"


def _cash_result(d: _Draft, result: CashResult) -> str:
    cash = d.cash()
    if cash is None:
        raise IllegalTransition(f"order {d.order.order_id} has no cash part")
    if d.order.authorisation is not None:  # it is charged by its capture, never by a pay
        return (f"ignored: a pre-authorisation is not paid by a pay result "
                f"({result.source.value} says {result.kind.value})")
    if cash.status is LegStatus.NEW:
        raise IllegalTransition(
            f"order {d.order.order_id} has not asked its channel yet; a {result.kind.value} "
            "result cannot be for it"
        )
    if result.payment_serial not in (None, d.order.payment_serial):
        check_report(d.order, result, d.policy)
        return _old_route_result(d, result)
    close_waited = d.order.pay_in_flight and d.order.is_terminal
    if result.source is ResultSource.SYNC:  # first: the pay call is back, whatever it says
        d.volatile(pay_in_flight=False)
    check_report(d.order, result, d.policy)
    if not d.order.is_terminal and d.order.state is not OrderState.DEDUCTING and (
        d.now_ms >= d.order.close_at_ms
    ):
        # The pay window is over but the close timer has not been handled yet (a restart, a
        # busy mailbox): the window decides, not the timer's luck. Close first, then apply.
        _close(d, CloseCause.TIMEOUT)
        cash = d.cash()
        assert cash is not None
    _keep_prepay(d, result)
    trusted = _trusts(d, result.source)
    note = _apply_cash_result(d, result) if trusted else _confirm_cash(d, cash, result)
    cash = d.cash()
    if close_waited and not d.order.pay_in_flight and cash is not None and (
        cash.status is LegStatus.PAYING
    ):
        assert cash.channel is not None  # the close waited for this answer: send it now
        d.effects.append(CloseCash(cash.channel, d.order.payment_serial))
    return note


PREPAY_SOURCES = frozenset({ResultSource.SYNC, ResultSource.QUERY})
"""Answers to the engine's own calls: only they may say what the payer is shown."""


def _keep_prepay(d: _Draft, result: CashResult) -> None:
    """Keep a new prepay (QR code, "enter password") while the cash is being paid, so the
    terminal polling the order shows it; a notification's, or a late one's, is not kept."""
    cash = d.cash()
    if result.prepay is not None and result.source in PREPAY_SOURCES and (
        cash is not None and cash.status is LegStatus.PAYING and not d.order.is_terminal
    ) and result.prepay != d.order.prepay:
        d.update(prepay=result.prepay)


def _apply_cash_result(d: _Draft, result: CashResult) -> str:
    cash = d.cash()
    assert cash is not None
    match result.kind:
        case ResultKind.SUCCESS:
            return _cash_success(d, cash, result)
        case ResultKind.FAILURE:
            return _cash_failure(d, cash, result)
    if d.order.fallback is not None and cash.status is LegStatus.PAYING:
        return _fallback_answer(d, cash, result)
    if _starts_fallback(d, cash, result):  # only the planted bug: never on processing
        return _begin_fallback(d, cash, result)
    if cash.status is LegStatus.PAYING and result.code != cash.channel_code:
        d.set_leg(cash.leg_no, LegStatus.PAYING, "processing", channel_code=result.code)
        return "applied"
    if "regress-success" in d.policy.planted_bugs and d.order.state is OrderState.SUCCEEDED:
        d.transitions.append(Transition("order", "succeeded", "paying", "planted bug"))
        d.order = evolve(d.order, state=OrderState.PAYING, cause="planted bug")
        return "applied"
    return f"ignored: {result.source.value} says processing, cash leg is {cash.status.value}"


def _cash_success(d: _Draft, cash: Leg, result: CashResult) -> str:
    if cash.status not in (LegStatus.PAYING, LegStatus.UNKNOWN, LegStatus.UNPAID):
        txn = result.channel_txn_id
        if txn and cash.channel_txn_id and txn != cash.channel_txn_id:
            if result.source is ResultSource.NOTIFICATION and (
                "trust-forged-notification" not in d.policy.planted_bugs
            ):
                # Money never leaves on a notification alone: the channel confirms first.
                if d.order.refund(refund_no=SECOND_CHARGE_PREFIX + txn) is not None:
                    return f"duplicate: second charge {txn} is already being refunded"
                assert cash.channel is not None
                return _ask_channel(d, QueryCharge(cash.channel, d.order.payment_serial, txn),
                                    f"notified of a second charge {txn}", source=result.source)
            return _refund_second_charge(d, cash, result)
        return f"duplicate: success again ({result.source.value}), cash leg is {cash.status.value}"
    if (result.amount_minor is not None and result.amount_minor != cash.amount) or (
        result.currency is not None and result.currency != d.order.currency
    ):
        cause = (f"amount_mismatch: channel charged {result.amount_minor} "
                 f"{result.currency or d.order.currency}, asked {cash.amount} {d.order.currency}")
        d.set_leg(cash.leg_no, LegStatus.UNKNOWN, cause, channel_code=result.code,
                  channel_txn_id=result.channel_txn_id)
        if d.order.state is OrderState.PAYING:
            d.move(Trigger.AMOUNT_MISMATCH, cause)
        return "applied"
    if cash.status is LegStatus.UNPAID:
        cause = f"success after a definitive failure ({result.source.value})"
    else:
        cause = f"paid ({result.source.value})"
    if d.order.fallback is not None:  # it charged after all: no fallback, the order is paid
        cause = f"{cause}; no fallback: {d.order.fallback.why}, then it charged"
        d.update(fallback=None)
    cash = d.set_leg(cash.leg_no, LegStatus.PAID, cause, channel_code=result.code,
                     channel_txn_id=result.channel_txn_id)
    if d.order.is_terminal or d.order.state is OrderState.DEDUCTING:
        if "no-refund-after-close" not in d.policy.planted_bugs:
            _refund_cash(d, cash, f"success after {d.order.state.value}: {d.order.cause}")
        return "applied"
    _cash_succeeded(d, cause)
    return "applied"


def _cash_succeeded(d: _Draft, cause: str) -> None:
    """The payer's side is paid: debit post-deduct legs and credit the beneficiary (both in
    DEDUCTING), or succeed at once and confirm the holds."""
    post = d.legs(LegMode.POST_DEDUCT)
    credits = d.legs(LegMode.CREDIT)
    if not post and not credits:
        d.move(Trigger.CASH_SUCCEEDED, cause)
        _confirm_holds(d)
        return
    d.move(Trigger.CASH_SUCCEEDED_DEDUCT, cause)
    for leg in post:
        assert leg.account_id is not None
        d.set_leg(leg.leg_no, LegStatus.DEBITING, "cash paid")
        d.effects.append(DebitVoucher(leg.account_id, d.order.fence_of(leg), leg.amount,
                                      leg.leg_no))
    for leg in credits:
        d.set_leg(leg.leg_no, LegStatus.CREDITING, "payer paid")
        d.effects.append(_credit(d.order, leg))


def _cash_failure(d: _Draft, cash: Leg, result: CashResult) -> str:
    if cash.status is LegStatus.UNPAID:
        return f"duplicate: failure again ({result.source.value})"
    if cash.status not in (LegStatus.PAYING, LegStatus.UNKNOWN):
        return f"ignored: {result.source.value} says failure after the cash leg is {cash.status.value}"
    if d.order.fallback is not None and cash.status is LegStatus.PAYING:
        return _fallback_answer(d, cash, result)
    if _starts_fallback(d, cash, result):
        return _begin_fallback(d, cash, result)
    cause = f"channel says {result.code} ({result.source.value})"
    d.set_leg(cash.leg_no, LegStatus.UNPAID, cause, channel_code=result.code)
    if d.order.state in (OrderState.PAYING, OrderState.NEEDS_RECONCILIATION):
        d.move(Trigger.CASH_FAILED, cause)
        _release_everything(d, "payment failed")
    return "applied"


# ---- routing fallback (R-PROD: only where no double charge is possible)

ROUTE_CAUSE_MAX = 2_000
"""Most characters of a route choice's reasons kept in the journal (a table may have 1,000
routes; the first ones, best first, say why)."""
FALLBACK_SOURCES = frozenset({ResultSource.SYNC, ResultSource.QUERY, ResultSource.NOTIFICATION})
"""Where the retryable failure that starts a fallback may come from: the channel's word."""


def _starts_fallback(d: _Draft, cash: Leg, result: CashResult) -> bool:
    """Whether ``result`` lets the routed payment leave its channel for the next route.

    Only an explicit failure the channel's code table lists as retryable, from the channel
    itself, while the order is paying within its window with no pay call out, and fallbacks
    are left. Anything else (processing, a timeout, a non-retryable failure) keeps the
    existing behaviour. The planted bug ``route-after-charge`` also leaves after a
    processing or timed-out pay answer, without asking the channel.
    """
    order = d.order
    if order.method is None or order.fallback is not None or order.pay_in_flight or (
        order.state is not OrderState.PAYING or cash.status is not LegStatus.PAYING
        or len(order.tried) >= d.policy.fallbacks_max or d.now_ms >= order.close_at_ms
        or result.source not in FALLBACK_SOURCES
    ):
        return False
    if result.kind is ResultKind.FAILURE and result.retryable:
        return True
    return ("route-after-charge" in d.policy.planted_bugs and result.source is ResultSource.SYNC
            and result.kind is ResultKind.PROCESSING)


def _begin_fallback(d: _Draft, cash: Leg, result: CashResult) -> str:
    """The channel refused with a retryable code: first make sure it has not charged (a
    query), the decision persisted before the query goes out."""
    assert cash.channel is not None
    why = f"{cash.channel} answered {result.code} (retryable, {result.source.value})"
    if result.kind is not ResultKind.FAILURE:  # the planted bug: no query, no close
        why = f"{cash.channel} answered {result.code} ({result.source.value}; planted bug)"
        return _enter_step(d, cash, FallbackStep.ROUTE, why, result.code)
    return _enter_step(d, cash, FallbackStep.QUERY, why, result.code)


def _enter_step(d: _Draft, cash: Leg, step: FallbackStep, why: str, code: str | None = None
                ) -> str:
    assert cash.channel is not None
    d.update(fallback=Fallback(step, why))
    if code is not None:
        d.set_leg(cash.leg_no, LegStatus.PAYING, why, channel_code=code)
    d.transitions.append(Transition("route", cash.channel, cash.channel,
                                    f"{why}: fallback {step.value}"))
    d.effects.append(_fallback_command(d.order, cash, step))
    return "applied"


def _fallback_command(order: PaymentOrder, cash: Leg, step: FallbackStep
                      ) -> QueryCash | CloseCash | ChooseRoute:
    """The command a fallback step waits on; sent again by ``Activate`` after a restart."""
    assert cash.channel is not None and order.method is not None
    match step:
        case FallbackStep.QUERY:
            return QueryCash(cash.channel, order.payment_serial)
        case FallbackStep.CLOSE:
            return CloseCash(cash.channel, order.payment_serial)
        case FallbackStep.ROUTE:
            excluded = (*(t.channel for t in order.tried), cash.channel)
            return ChooseRoute(order.method, cash.amount, order.currency, excluded,
                               order.order_id)


def _fallback_answer(d: _Draft, cash: Leg, result: CashResult) -> str:
    """The old channel's answer while a fallback waits on it (``Fallback.step``).

    QUERY: a failure with a retryable code, or "not found" (within the window, after the
    explicit failure: nothing arrived, and the close makes sure nothing will), goes on to
    CLOSE. CLOSE: a failure or "not found" goes on to ROUTE. A non-retryable failure to the
    query ends the fallback: the first failure stands, as it would have without routing.
    Anything undecided (processing, a timeout, no answer) proves nothing: the step's
    command goes out again on the query schedule, and when that runs out the first failure
    stands (``_query_due``). A success was handled before (``_cash_success``): the order
    is paid by that channel.
    """
    fallback = d.order.fallback
    assert fallback is not None and cash.channel is not None
    waits_for = {FallbackStep.QUERY: ResultSource.QUERY, FallbackStep.CLOSE: ResultSource.CLOSE}
    if waits_for.get(fallback.step) is not result.source:
        return (f"ignored: {result.source.value} says {result.code} while the fallback "
                f"waits ({fallback.step.value})")
    said = "not found" if result.not_found else (
        "retryable" if result.retryable else result.kind.value)
    why = f"{fallback.why}; {fallback.step.value}: {result.code} ({said})"
    clean = (result.kind is ResultKind.FAILURE and (result.retryable or fallback.step is
                                                    FallbackStep.CLOSE)) or (
        result.kind is ResultKind.PROCESSING and result.not_found)
    if result.kind is ResultKind.PROCESSING and not result.not_found:
        return f"ignored: {why}; asked again on the query schedule"
    if not clean:
        return _end_fallback(d, cash, f"no fallback: {why}")
    step = FallbackStep.CLOSE if fallback.step is FallbackStep.QUERY else FallbackStep.ROUTE
    if step is FallbackStep.CLOSE and cash.channel in d.policy.channels_without_close:
        step, why = FallbackStep.ROUTE, f"{why}; no close (the channel has none)"
    return _enter_step(d, cash, step, why)


def _end_fallback(d: _Draft, cash: Leg, cause: str) -> str:
    """No fallback after all: the explicit failure stands and the order fails."""
    d.update(fallback=None)
    d.set_leg(cash.leg_no, LegStatus.UNPAID, cause)
    d.move(Trigger.CASH_FAILED, cause)
    _release_everything(d, "payment failed")
    return "applied"


def _rerouted(d: _Draft, event: Rerouted) -> str:
    """The next route is chosen: pay it under a new serial; none left: the order fails."""
    cash = d.cash()
    fallback = d.order.fallback
    if cash is None or fallback is None or fallback.step is not FallbackStep.ROUTE:
        return "stale: no route was being chosen"
    assert cash.channel is not None and cash.status is LegStatus.PAYING
    assert isinstance(event.cause, str), event  # the shell's, never outside input
    if d.now_ms >= d.order.close_at_ms:
        return _close(d, CloseCause.TIMEOUT)
    tried = (*(t.channel for t in d.order.tried), cash.channel)
    if event.channel is None or event.channel in tried:
        return _end_fallback(d, cash, f"no fallback: {fallback.why}; no route left: "
                                      f"{event.cause[:ROUTE_CAUSE_MAX]}")
    channel = check_id(event.channel, "the next route's channel")
    left = TriedRoute(cash.channel, d.order.payment_serial, cash.channel_code or "")
    first = (d.order.tried[0].payment_serial if d.order.tried else d.order.payment_serial)
    d.update(tried=(*d.order.tried, left), fallback=None, prepay=None,
             payment_serial=fallback_serial(first, len(d.order.tried) + 1))
    cause = f"{fallback.why} -> {channel}; {event.cause[:ROUTE_CAUSE_MAX]}"
    d.transitions.append(Transition("route", cash.channel, channel, cause))
    cash = d.set_leg(cash.leg_no, LegStatus.PAYING, cause, channel=channel, channel_code=None,
                     channel_txn_id=None)
    d.effects.append(_pay(d, cash))
    d.volatile(pay_in_flight=True)
    _arm_query(d, attempt=0)
    return "applied"


def _old_route_result(d: _Draft, result: CashResult) -> str:
    """A result for a serial of a route the order left: never moves the order. A charge
    there (late money) is given back by that channel; a notification of one is first
    confirmed by a query of that channel."""
    tried = old_route(d.order, result)
    cash = d.cash()
    if tried is None or cash is None:
        return f"stale: no route of this order used serial {result.payment_serial}"
    if result.kind is not ResultKind.SUCCESS:
        return f"ignored: left route {tried.channel} says {result.code} ({result.source.value})"
    if d.order.refund(refund_no=_late_charge_key(tried, result)) is not None:
        return f"duplicate: late charge on {tried.channel} is already being refunded"
    if result.source in (*UNVERIFIED_SOURCES, ResultSource.NOTIFICATION) and (
        "trust-forged-notification" not in d.policy.planted_bugs
    ):
        return _ask_channel(d, QueryCash(tried.channel, tried.payment_serial),
                            f"{result.source.value} of a late charge on {tried.channel}",
                            source=result.source)
    note = _refund_charge(d, cash, result, tried.channel, tried.payment_serial,
                          _late_charge_key(tried, result), f"late charge on {tried.channel}")
    if note == "applied":
        d.update(tried=tuple(evolve(t, outcome="charged_late") if t is tried else t
                             for t in d.order.tried))
    return note


# ---- refunds


def _refund_result(d: _Draft, result: RefundResult) -> str:
    if d.cash() is not None:
        check_report(d.order, result, d.policy)
    if not _trusts(d, result.source) or (
        result.source is ResultSource.NOTIFICATION and result.kind is ResultKind.FAILURE
        and "trust-forged-notification" not in d.policy.planted_bugs
    ):
        # An unverified report, or a failure (which would free the amount to be refunded
        # again): the channel's own answer to a query decides.
        return _confirm_refund(d, result)
    return _apply_refund_result(d, result)


def _confirm_refund(d: _Draft, result: RefundResult) -> str:
    why = f"{result.source.value} says refund {result.refund_id} {result.kind.value}"
    cash = d.cash()
    if result.kind is ResultKind.PROCESSING or cash is None or cash.channel is None:
        return f"ignored: {why}"
    refund = d.order.refund(refund_id=result.refund_id)
    part = None if refund is None else refund.part(cash.leg_no)
    open_error_refund = cash.refund_id == result.refund_id and cash.status in (
        LegStatus.REFUNDING, LegStatus.REFUND_UNKNOWN)
    open_part = part is not None and part.status in (PartStatus.SENT, PartStatus.UNKNOWN)
    if not (open_error_refund or open_part):
        return f"ignored: {why}, nothing open to settle"
    return _ask_channel(d, QueryRefund(cash.channel, d.order.payment_serial, result.refund_id),
                        why, source=result.source)


def _apply_refund_result(d: _Draft, result: RefundResult) -> str:
    cash = d.cash()
    if cash is None or cash.refund_id != result.refund_id:
        refund = d.order.refund(refund_id=result.refund_id)
        if refund is None or cash is None:
            return f"stale: no refund {result.refund_id} on this order"
        return _cash_part_result(d, refund, cash, result)
    if _refund_absent(result):
        if cash.status is not LegStatus.REFUND_UNKNOWN:
            return f"ignored: refund absent from the statement, cash leg is {cash.status.value}"
        # The statement says the refund never happened: the money is still owed. Ask again
        # (idempotent by refund_id) with a fresh schedule, never guess it failed.
        cash = d.set_leg(cash.leg_no, LegStatus.REFUNDING, "refund absent from the statement")
        d.effects.append(_refund(d.order, cash))
        _arm_refund_query(d, attempt=0)
        return "applied"
    if cash.status not in (LegStatus.REFUNDING, LegStatus.REFUND_UNKNOWN):
        return f"duplicate: refund result again, cash leg is {cash.status.value}"
    if result.kind is ResultKind.SUCCESS:
        d.set_leg(cash.leg_no, LegStatus.REFUNDED, f"refunded ({result.source.value})")
        return "applied"
    if result.kind is ResultKind.FAILURE:
        d.set_leg(cash.leg_no, LegStatus.REFUND_FAILED, f"refund failed: {result.code}")
        return "applied"
    return f"ignored: refund still processing, cash leg is {cash.status.value}"


# ---- close


def _close(d: _Draft, cause: CloseCause) -> str:
    state = d.order.state
    if state in AUTHORISATION_STATES:
        return _preauth.on_close(d, cause)
    if state in (OrderState.SUCCEEDED, OrderState.DEDUCTING):
        if cause is CloseCause.USER:
            raise IllegalTransition(f"order {d.order.order_id} is paid; it cannot be closed")
        return "ignored: the close timer found the order paid"
    if state in (OrderState.FAILED, OrderState.CLOSED):
        return f"duplicate: order is already {state.value}"
    trigger = Trigger.CLOSE_USER if cause is CloseCause.USER else Trigger.CLOSE_TIMEOUT
    if state is OrderState.NEEDS_VERIFICATION:
        _end_verification(d, VerificationStatus.CLOSED)
    if d.order.fallback is not None:  # the window is over: no next route any more
        d.update(fallback=None)
    d.move(trigger)
    cash = d.cash()
    if cash is not None and cash.status is LegStatus.PAYING:
        assert cash.channel is not None
        if not d.order.pay_in_flight:  # else the close goes out once the pay call answered
            d.effects.append(CloseCash(cash.channel, d.order.payment_serial))
        _arm_query(d, attempt=0)
    _release_everything(d, f"order closed ({cause.value})")
    return "applied"


# ---- step-up verification


def _verify(d: _Draft, event: VerifyCode) -> str:
    """The user's code for the step-up: right, the order goes on (holds, then the channel);
    wrong, it counts, and the last wrong one fails the order and releases everything.

    A verify of an order that is not waiting is ``IllegalTransition`` (order untouched),
    except the right code again after a pass (a retried call), which changes nothing. Past
    the verification window or the pay window the window decides, as the timer would have.
    """
    order = d.order
    code = check_code(event.code)
    v = order.verification
    if v is None:
        raise IllegalTransition(f"order {order.order_id} was not asked for a verification")
    if order.state is not OrderState.NEEDS_VERIFICATION:
        if v.status is VerificationStatus.PASSED and code_matches(v, order.order_id, code):
            return "duplicate: verified already"
        raise IllegalTransition(f"order {order.order_id} is {order.state.value}, its "
                                f"verification {v.status.value}: not waiting for a code")
    if d.now_ms >= order.close_at_ms:
        return _close(d, CloseCause.TIMEOUT)
    if d.now_ms >= v.expires_at_ms:
        _fail_verification(d, VerificationStatus.EXPIRED, Trigger.VERIFICATION_EXPIRED)
        return "applied"
    if code_matches(v, order.order_id, code):
        _verified(d, "verified: the right code")
        return "applied"
    d.update(verification=evolve(v, attempts=v.attempts + 1))
    if v.attempts + 1 >= v.attempts_max:
        _fail_verification(d, VerificationStatus.FAILED, Trigger.VERIFICATION_FAILED)
    return "applied"


def _verified(d: _Draft, cause: str) -> None:
    """The step-up passed: the order is accepted and places its holds, then pays."""
    _end_verification(d, VerificationStatus.PASSED)
    d.move(Trigger.VERIFIED, cause)
    _advance_holds(d)


def _end_verification(d: _Draft, status: VerificationStatus) -> None:
    v = d.order.verification
    assert v is not None
    d.update(verification=evolve(v, status=status))


def _fail_verification(d: _Draft, status: VerificationStatus, trigger: Trigger) -> None:
    """Wrong codes or the window over: the order fails; every leg is released (nothing was
    held but the user's own pre-holds, which go back)."""
    v = d.order.verification
    assert v is not None
    _end_verification(d, status)
    cause = f"{trigger.value} ({v.attempts} wrong of {v.attempts_max})"
    d.move(trigger, cause)
    _release_everything(d, trigger.value)


# ---- timers


def _timer(d: _Draft, fired: TimerFired) -> str:
    match fired.timer:
        case TimerKind.CLOSE:
            if d.now_ms < d.order.close_at_ms:
                return "stale: close timer fired early"
            return _close(d, CloseCause.TIMEOUT)
        case TimerKind.QUERY:
            if d.order.authorisation is not None:
                return _preauth.on_query_due(d, fired.token)
            return _query_due(d, fired.token)
        case TimerKind.REFUND_QUERY:
            return _refund_query_due(d, fired.token)
        case TimerKind.VOUCHER_RETRY:
            return _voucher_retry_due(d, fired.token)
        case TimerKind.VERIFY:
            v = d.order.verification
            if d.order.state is not OrderState.NEEDS_VERIFICATION or v is None:
                return "stale: verification timer"
            if d.now_ms < v.expires_at_ms:
                return "stale: verification timer fired early"
            _fail_verification(d, VerificationStatus.EXPIRED, Trigger.VERIFICATION_EXPIRED)
            return "applied"


def _query_due(d: _Draft, token: int) -> str:
    cash = d.cash()
    if cash is None or cash.status is not LegStatus.PAYING or token != d.order.query_attempt:
        return "stale: query timer"
    assert cash.channel is not None
    attempts = len(d.policy.query_schedule_for(cash.channel))
    fallback = d.order.fallback
    if token >= attempts and fallback is not None:  # its answer never came: the failure stands
        d.update(next_query_at_ms=None, query_attempt=token + 1)
        return _end_fallback(d, cash, f"no fallback: {fallback.why}; {fallback.step.value} "
                                      "unanswered")
    if token >= attempts:
        if d.order.state is OrderState.PAYING:
            d.move(Trigger.QUERIES_EXHAUSTED)
        elif d.order.is_terminal:
            d.set_leg(cash.leg_no, LegStatus.UNKNOWN, "queries exhausted after close")
        d.update(next_query_at_ms=None, query_attempt=token + 1)
        return "applied"
    if d.order.is_terminal and not d.order.pay_in_flight:
        # After the close, ask the channel to close again: idempotent, it answers with the
        # final state, and a close that was lost in a timeout is then made after all.
        d.effects.append(CloseCash(cash.channel, d.order.payment_serial))
    elif fallback is not None:  # the step's command again: its answer may have been lost
        d.effects.append(_fallback_command(d.order, cash, fallback.step))
    else:
        d.effects.append(QueryCash(cash.channel, d.order.payment_serial))
    _arm_query(d, token + 1)
    return "applied"


def _refund_query_due(d: _Draft, token: int) -> str:
    cash = d.cash()
    closing = cash is not None and cash.status is LegStatus.REFUNDING
    pending = _cash_parts_in_flight(d.order)
    due = d.order.next_refund_query_at_ms
    if cash is None or not (closing or pending) or token != d.order.refund_query_attempt or (
        due is None or d.now_ms < due
    ):
        return "stale: refund query timer"
    assert cash.channel is not None
    if token >= len(d.policy.refund_query_schedule_for(cash.channel)):
        cause = "refund queries exhausted"
        if closing:
            d.set_leg(cash.leg_no, LegStatus.REFUND_UNKNOWN, cause)
        for refund in pending:
            _set_part(d, refund, cash.leg_no, PartStatus.UNKNOWN, cause)
        d.update(next_refund_query_at_ms=None)
        return "applied"
    # Ask for the refund again rather than only query it: the request is idempotent by
    # refund_id and answers with the refund's state, and a request that was lost (a timeout
    # before the channel saw it) is then made after all.
    if closing:
        d.effects.append(_refund(d.order, cash))
    for refund in pending:
        _resend_refund(d, refund, cash=True, vouchers=False)
    _arm_refund_query(d, token + 1)
    return "applied"


# ---- voucher retries


VOUCHER_IN_FLIGHT = frozenset(
    {LegStatus.TRYING, LegStatus.CONFIRMING, LegStatus.CANCELLING, LegStatus.REVERSING,
     LegStatus.DEBITING, LegStatus.CREDITING}
)
"""Leg statuses waiting for the voucher system's answer."""


_VOUCHER_IN_FLIGHT_VALUES = frozenset(status.value for status in VOUCHER_IN_FLIGHT)


def _keep_voucher_retry(d: _Draft) -> None:
    """Arm the retry timer when a voucher command goes out; disarm it when none is left.

    A command issued in this decision restarts the schedule from its first gap, so every
    command gets the whole schedule, however far along an earlier command's retries were.
    Owed follow-ups keep the timer (the sentinel's) but never re-arm a stopped one: only a
    new command or a start of the actor does.
    """
    in_flight = any(leg.status in VOUCHER_IN_FLIGHT for leg in d.order.legs) or bool(
        _returns_in_flight(d.order)) or bool(_clawbacks_in_flight(d.order))
    issued = any(t.entity.startswith("leg:") and t.to_state in _VOUCHER_IN_FLIGHT_VALUES
                 for t in d.transitions) or any(
        t.entity.startswith("refund:") and t.entity.count(":") == 2
        and t.to_state in (PartStatus.SENT.value, PartStatus.REVERSING.value)
        and not _is_cash_part(d.order, t.entity)
        for t in d.transitions)
    if in_flight and (d.order.next_voucher_retry_at_ms is None or issued):
        _arm_voucher_retry(d, 0)
    elif not in_flight and not _has_owed(d.order) and d.order.next_voucher_retry_at_ms is not None:
        d.update(next_voucher_retry_at_ms=None, voucher_attempt=0)


def _arm_voucher_retry(d: _Draft, attempt: int) -> None:
    """Attempt ``attempt`` is due after the schedule's gap, or the sentinel's interval once
    the schedule is over."""
    schedule = d.policy.voucher_retry_schedule_ms
    gap = schedule[attempt] if attempt < len(schedule) else d.policy.voucher_sentinel_interval_ms
    due = d.now_ms + gap
    d.update(voucher_attempt=attempt, next_voucher_retry_at_ms=due)
    d.effects.append(ArmTimer(TimerKind.VOUCHER_RETRY, due, attempt))


def _voucher_retry_due(d: _Draft, token: int) -> str:
    """Re-send what is unanswered; at the end of the schedule give up on Trys and debits and
    hand the follow-ups to the sentinel, which re-sends them at its interval, bounded."""
    order = d.order
    due = order.next_voucher_retry_at_ms
    if due is None or token != order.voucher_attempt or d.now_ms < due:
        return "stale: voucher retry timer"
    schedule = len(d.policy.voucher_retry_schedule_ms)
    if token + 1 < schedule:
        for leg in order.legs:
            if leg.status in VOUCHER_IN_FLIGHT or leg.status in OWED_LEG_STATUSES:
                _reissue(d, leg)
        for refund in order.refunds:
            _resend_refund(d, refund, cash=False, vouchers=True)
        _resend_owed_returns(d)
        _arm_voucher_retry(d, token + 1)
        return "applied"
    # The schedule is over (or this is one of the sentinel's rounds): a Try or a debit still
    # unanswered is cancelled; a follow-up is flagged, owed, and sent again.
    _give_up_on_vouchers(d)
    if not _has_owed(d.order) or "sentinel-gives-up" in d.policy.planted_bugs:
        # (the planted bug: follow-ups still owed are flagged and then never sent again)
        d.update(next_voucher_retry_at_ms=None, voucher_attempt=0)
        return "applied"
    if token + 1 - schedule >= d.policy.voucher_sentinel_attempts_max:
        # Bounded: the timer stops here. Never silently: the follow-ups stay flagged, the
        # actor logs this as an error, ``owed_commands`` lists them with no next attempt,
        # and the next start of the actor sends them again on a fresh schedule.
        d.update(next_voucher_retry_at_ms=None, voucher_attempt=token + 1)
        return "applied"
    for leg in d.order.legs:
        if leg.status in SENTINEL_LEG_STATUSES:
            _reissue(d, leg)
    _resend_owed_returns(d)
    for refund in d.order.refunds:
        _resend_clawback(d, refund)
    _arm_voucher_retry(d, token + 1)
    return "applied"


def _give_up_on_vouchers(d: _Draft) -> None:
    """The voucher system stayed silent for the whole schedule: stop waiting, safely.

    An unanswered Try or debit may or may not have happened, so it is cancelled (voids the
    hold, reverses the debit, or records an empty rollback) and the payment fails. An
    unanswered Confirm, Cancel or voucher return is never guessed either way: it is flagged
    (``confirm_unknown``, ``release_unknown``, part ``unknown``) and stays owed: the
    sentinel goes on sending it.
    """
    cause = "voucher system did not answer"
    for refund, leg_no in _returns_in_flight(d.order):
        _set_part(d, refund, leg_no, PartStatus.UNKNOWN, cause)
    for leg in d.order.legs:
        if leg.status is LegStatus.CONFIRMING:
            d.set_leg(leg.leg_no, LegStatus.CONFIRM_UNKNOWN, cause)
        elif leg.status in (LegStatus.CANCELLING, LegStatus.REVERSING):
            d.set_leg(leg.leg_no, LegStatus.RELEASE_UNKNOWN, cause)
        elif leg.status is LegStatus.DEBITING and leg.account_id is not None:
            d.set_leg(leg.leg_no, LegStatus.REVERSING, cause)
            d.effects.append(CancelHold(leg.account_id, d.order.fence_of(leg), leg.leg_no))
    if d.order.state is OrderState.ACCEPTED and any(
        leg.status is LegStatus.TRYING for leg in d.order.legs
    ):
        d.move(Trigger.HOLD_REFUSED, f"hold_refused: {cause}")
        _release_everything(d, cause)
    elif d.order.state is OrderState.DEDUCTING and not any(
        leg.status is LegStatus.CREDITING for leg in d.order.legs
    ):  # a credit is never given up on: the payer paid; the sentinel goes on sending it
        d.move(Trigger.SHORTFALL, f"{Trigger.SHORTFALL.value}: {cause}")
        _release_everything(d, cause)


# ---- refunds: merchant-initiated and second charges


REFUNDABLE_LEG_STATUSES = frozenset({LegStatus.PAID, LegStatus.CONFIRMED, LegStatus.DEBITED})
"""A leg in one of these took the payer's money, so a refund may give it back."""


def _refundable(order: PaymentOrder, *, strict: bool = True) -> dict[int, int]:
    """Per leg, the value (order minor units) merchant refunds may still give back.

    Refunds that FAILED gave nothing back and do not count; UNKNOWN ones may have, and do.
    ``strict=False`` counts every leg (for the consistency check, where a leg's status may
    have moved on), not only those that took money.
    """
    left = {leg.leg_no: leg.value_minor for leg in order.legs
            if not strict or leg.status in REFUNDABLE_LEG_STATUSES}
    for refund in order.refunds:
        if refund.kind is RefundKind.MERCHANT and refund.status is not RefundStatus.FAILED:
            for part in refund.parts:
                left[part.leg_no] = left.get(part.leg_no, 0) - part.value_minor
    return left


def _request_refund(d: _Draft, request: RequestRefund) -> str:
    """Accept a merchant refund: split it over the legs, cash first, and start the cash part.

    Vouchers go back only after the cash part succeeded, so a refund the channel refuses
    leaves nothing half-returned. Raises (order untouched) for a bad or excessive request.
    """
    order = d.order
    no, amount = check_refund_request(request)
    existing = order.refund(refund_no=no)
    merchant_refunds = sum(1 for r in order.refunds if r.kind is RefundKind.MERCHANT)
    if existing is not None:
        if (existing.kind, existing.amount_minor, existing.reason) != (
            RefundKind.MERCHANT, amount, request.reason
        ):
            raise IdempotencyConflict(f"refund {no} of order {order.order_id} was asked before "
                                      "with different parameters")
        return f"duplicate: refund {no} asked again"
    if order.state is not OrderState.SUCCEEDED:
        raise IllegalTransition(f"order {order.order_id} is {order.state.value}; only a "
                                "succeeded payment can be refunded")
    if any(leg.status in IN_FLIGHT_LEG_STATUSES for leg in order.legs):
        raise IllegalTransition(f"order {order.order_id} is still confirming its vouchers; "
                                "ask again shortly")
    if merchant_refunds >= d.policy.refunds_max:
        raise RefundRefused(f"order {order.order_id} has {merchant_refunds} refunds, the most "
                            "one order may have")
    parts = _allocate(order, amount, over_refund="over-refund" in d.policy.planted_bugs)
    _refuse_provider_returns(d, parts)
    cash = order.cash_leg
    credit = _beneficiary(order)
    first_cash = credit is None and cash is not None and any(
        p.leg_no == cash.leg_no for p in parts)
    if credit is not None:
        if cash is None:
            raise IllegalTransition(f"order {order.order_id} is a transfer: it is not "
                                    "refunded; transfer the amount back instead")
        # a recharge: its value comes back from the account first (the cash part waits)
        parts = (*parts, RefundPart(credit.leg_no, amount, 0, PartStatus.SENT))
    else:
        parts = tuple(evolve(p, status=PartStatus.SENT)
                      if not first_cash or (cash and p.leg_no == cash.leg_no) else p
                      for p in parts)
    refund = Refund(f"{order.payment_serial}-RF{len(order.refunds) + 1}", no,
                    RefundKind.MERCHANT, amount, request.reason, RefundStatus.REFUNDING, parts,
                    d.now_ms)
    refund = d.set_refund(refund, f"refund {no} requested")
    _resend_refund(d, refund, cash=credit is None, vouchers=True)
    if first_cash:
        _arm_refund_query(d, attempt=0)
    return "applied"


def _refuse_provider_returns(d: _Draft, parts: tuple[RefundPart, ...]) -> None:
    """External voucher providers implement Try/Confirm/Cancel, not refunds: a refund whose
    split reaches a provider leg is refused (``RefundRefused``), nothing recorded."""
    providers = d.policy.voucher_providers
    for part in parts:
        account = d.order.leg(part.leg_no).account_id
        if account is not None and provider_of(account, providers) is not None:
            raise RefundRefused(
                f"a refund of order {d.order.order_id} would reach its leg {part.leg_no} at "
                f"external voucher provider {provider_of(account, providers)!r}, which takes "
                "no refunds: refund at most what its other legs may still give back")


def check_refund_request(request: RequestRefund) -> tuple[str, int]:
    """``(refund_no, amount_minor)`` if the request is well formed; a typed error if not.
    The shell calls it before asking the order's actor, the core again when deciding."""
    no = check_id(request.refund_no, "refund_no")
    if no.startswith(SECOND_CHARGE_PREFIX):
        raise InvalidRequest(f"refund_no must be an id not starting with "
                             f"{SECOND_CHARGE_PREFIX!r}: those name the engine's own refunds "
                             "of second charges")
    amount = check_amount(request.amount_minor, "refund amount_minor")
    check_text(request.reason, "reason", REASON_MAX)
    return no, amount


def _allocate(order: PaymentOrder, amount: int, *, over_refund: bool) -> tuple[RefundPart, ...]:
    """Split ``amount`` over the legs still refundable: the cash leg first, then vouchers in
    leg order, each in whole units of its own (a point is worth ``value_minor/amount``)."""
    left = _refundable(order)
    total_left = sum(max(v, 0) for v in left.values())
    if amount > total_left and not over_refund:
        raise RefundRefused(f"a refund of {amount} exceeds the {total_left} minor units order "
                            f"{order.order_id} may still give back")
    parts: list[RefundPart] = []
    rest = amount
    for leg in sorted(order.legs, key=lambda leg: (not leg.is_cash, leg.leg_no)):
        available = left.get(leg.leg_no, 0)
        if over_refund and leg.is_cash and leg.leg_no in left:
            available += max(amount - total_left, 0)  # planted bug: give back more than paid
        if leg.amount == 0:  # a pre-authorisation's leg that took no share of its capture
            continue
        per_unit = leg.value_minor // leg.amount
        assert per_unit * leg.amount == leg.value_minor, leg
        units = min(rest, available) // per_unit if available > 0 else 0
        if units > 0:
            parts.append(RefundPart(leg.leg_no, units, units * per_unit, PartStatus.WAITING))
            rest -= units * per_unit
    if rest:
        raise RefundRefused(f"{amount} cannot be given back exactly: {rest} minor units are "
                            "less than one unit of the vouchers left to refund")
    return tuple(parts)


def _refund_status(refund: Refund) -> RefundStatus:
    statuses = {part.status for part in refund.parts}
    if statuses == {PartStatus.DONE}:
        return RefundStatus.SUCCEEDED
    if PartStatus.SENT in statuses or PartStatus.REVERSING in statuses:
        return RefundStatus.REFUNDING
    if PartStatus.DONE not in statuses and PartStatus.UNKNOWN not in statuses and (
        PartStatus.FAILED in statuses
    ):
        return RefundStatus.FAILED
    return RefundStatus.UNKNOWN


def _resend_refund(d: _Draft, refund: Refund, *, cash: bool, vouchers: bool) -> None:
    """Send (again) the refund's parts in flight; all idempotent by their ids."""
    order = d.order
    if vouchers:
        _resend_clawback(d, refund)
    for part in refund.parts:
        if part.status is not PartStatus.SENT:
            continue
        leg = order.leg(part.leg_no)
        if not leg.pays:
            continue  # the clawback, above
        if leg.is_cash and cash:
            channel = refund.channel or leg.channel
            assert channel is not None
            d.effects.append(RefundCash(channel, refund.payment_serial or order.payment_serial,
                                        refund.refund_id, part.amount, order.currency))
        elif not leg.is_cash and vouchers and leg.account_id is not None:
            d.effects.append(ReturnVoucher(
                leg.account_id, FenceKey.refund_return(refund.refund_id, leg.leg_no),
                part.amount, leg.leg_no))


def _beneficiary(order: PaymentOrder) -> Leg | None:
    """The credit leg of a recharge or transfer; ``None`` for a payment."""
    for leg in order.legs:
        if leg.mode is LegMode.CREDIT:
            return leg
    return None


def _clawback_part(order: PaymentOrder, refund: Refund) -> RefundPart | None:
    credit = _beneficiary(order)
    return None if credit is None else refund.part(credit.leg_no)


def _resend_clawback(d: _Draft, refund: Refund) -> None:
    """Send (again) a recharge refund's clawback, or its undoing, while unanswered."""
    part = _clawback_part(d.order, refund)
    if part is None or part.status not in (PartStatus.SENT, PartStatus.REVERSING):
        return
    leg = d.order.leg(part.leg_no)
    assert leg.account_id is not None
    d.effects.append(ClawBack(leg.account_id, FenceKey.refund_return(refund.refund_id,
                                                                     leg.leg_no),
                              part.amount, leg.leg_no, undo=part.status is PartStatus.REVERSING))


def _clawbacks_in_flight(order: PaymentOrder) -> list[Refund]:
    if not order.refunds:
        return []
    return [r for r in order.refunds if (p := _clawback_part(order, r)) is not None
            and p.status in (PartStatus.SENT, PartStatus.REVERSING)]


def _clawback_reply(d: _Draft, reply: VoucherReply) -> str:
    """The account answered a clawback: taken (the cash goes back now) or refused (the
    refund fails, nothing moved); or answered its undoing (the value is back)."""
    fence = reply.fence
    refund = (d.order.refund(refund_id=fence.owner) if fence.scope is FenceScope.REFUND
              else None)
    part = None if refund is None else _clawback_part(d.order, refund)
    if refund is None or part is None or (fence.leg, reply.leg_no) != (part.leg_no,) * 2:
        return f"stale: no clawback {fence!r} on this order"
    if not reply.ok and reply.retryable:
        return f"ignored: voucher system failed without deciding ({reply.reason}); will retry"
    cause = reply.reason or "clawback"
    if part.status is PartStatus.REVERSING:
        _set_part(d, refund, part.leg_no, PartStatus.REVERSED if reply.ok else PartStatus.UNKNOWN,
                  cause)
        return "applied"
    if part.status is not PartStatus.SENT:
        return f"duplicate: clawback reply, part is {part.status.value}"
    taken = reply.ok
    parts = tuple(
        evolve(p, status=PartStatus.DONE if taken else PartStatus.FAILED) if p is part
        else evolve(p, status=PartStatus.SENT if taken else PartStatus.NOT_SENT)
        if p.status is PartStatus.WAITING else p
        for p in refund.parts)
    refund = d.set_refund(evolve(refund, parts=parts), cause)
    if taken:
        _resend_refund(d, refund, cash=True, vouchers=False)
        _arm_refund_query(d, attempt=0)
    return "applied"


def _set_part(d: _Draft, refund: Refund, leg_no: int, status: PartStatus, cause: str) -> Refund:
    refund = d.order.refund(refund_id=refund.refund_id) or refund
    parts = tuple(evolve(p, status=status) if p.leg_no == leg_no else p for p in refund.parts)
    return d.set_refund(evolve(refund, parts=parts), cause)


def _resend_owed_returns(d: _Draft) -> None:
    """Send again every voucher return left ``unknown``: its cash went back, so it is owed
    (the sentinel's), and its status stays ``unknown`` until the account answers."""
    order = d.order
    for refund, leg_no in _owed_returns(order):
        part = refund.part(leg_no)
        leg = order.leg(leg_no)
        assert part is not None and leg.account_id is not None
        d.effects.append(ReturnVoucher(leg.account_id,
                                       FenceKey.refund_return(refund.refund_id, leg_no),
                                       part.amount, leg_no))


def _owed_returns(order: PaymentOrder) -> list[tuple[Refund, int]]:
    """Voucher parts of refunds that were sent and never answered on the retry schedule.

    A voucher part is sent only after its refund's cash part went back (or at once when the
    refund has none), so an ``unknown`` voucher part is always owed.
    """
    if not order.refunds:  # most orders: skip the cash leg lookup
        return []
    cash = order.cash_leg
    cash_no = None if cash is None else cash.leg_no
    return [(r, p.leg_no) for r in order.refunds for p in r.parts
            if p.status is PartStatus.UNKNOWN and p.leg_no != cash_no
            and order.leg(p.leg_no).pays]


def _has_owed(order: PaymentOrder) -> bool:
    """True while the order owes a follow-up the voucher system never answered."""
    return any(leg.status in SENTINEL_LEG_STATUSES for leg in order.legs) or bool(
        _owed_returns(order)) or bool(_clawbacks_in_flight(order))


def _cash_parts_in_flight(order: PaymentOrder) -> list[Refund]:
    cash = order.cash_leg
    if cash is None:
        return []
    return [r for r in order.refunds
            if (part := r.part(cash.leg_no)) is not None and part.status is PartStatus.SENT]


def _returns_in_flight(order: PaymentOrder) -> list[tuple[Refund, int]]:
    if not order.refunds:  # most orders: skip the cash leg lookup
        return []
    cash = order.cash_leg
    cash_no = None if cash is None else cash.leg_no
    return [(r, p.leg_no) for r in order.refunds for p in r.parts
            if p.status is PartStatus.SENT and p.leg_no != cash_no
            and order.leg(p.leg_no).pays]


def _is_cash_part(order: PaymentOrder, entity: str) -> bool:
    cash = order.cash_leg
    return cash is not None and entity.endswith(f":{cash.leg_no}")


def _cash_part_result(d: _Draft, refund: Refund, cash: Leg, result: RefundResult) -> str:
    part = refund.part(cash.leg_no)
    if _refund_absent(result):
        if part is None or part.status is not PartStatus.UNKNOWN:
            return f"ignored: refund absent from the statement, part is {part and part.status.value}"
        refund = _set_part(d, refund, cash.leg_no, PartStatus.SENT,
                           "refund absent from the statement: asked again")
        _resend_refund(d, refund, cash=True, vouchers=False)
        _arm_refund_query(d, attempt=0)
        return "applied"
    if part is None or part.status not in (PartStatus.SENT, PartStatus.UNKNOWN):
        return f"duplicate: refund result again, its cash part is {part and part.status.value}"
    if result.kind is ResultKind.PROCESSING:
        return f"ignored: refund {refund.refund_id} still processing"
    cause = f"cash refund {result.kind.value} ({result.source.value}): {result.code}"
    failed = result.kind is ResultKind.FAILURE
    # One change for the whole refund, so its status moves once (no passing "unknown").
    cash_status, waiting_to = ((PartStatus.FAILED, PartStatus.NOT_SENT) if failed
                               else (PartStatus.DONE, PartStatus.SENT))
    clawback = _clawback_part(d.order, refund)
    parts = tuple(
        evolve(p, status=cash_status) if p.leg_no == cash.leg_no
        else evolve(p, status=waiting_to) if p.status is PartStatus.WAITING
        # nothing went back to the payer: a recharge's account gets its value again
        else evolve(p, status=PartStatus.REVERSING) if failed and p is clawback
        and p.status is PartStatus.DONE else p
        for p in refund.parts)
    refund = d.set_refund(evolve(refund, parts=parts), cause)
    _resend_refund(d, refund, cash=False, vouchers=True)
    return "applied"


def _return_reply(d: _Draft, reply: VoucherReply) -> str:
    fence = reply.fence
    refund = (d.order.refund(refund_id=fence.owner) if fence.scope is FenceScope.REFUND
              else None)
    part = None if refund is None else refund.part(reply.leg_no)
    if refund is None or part is None or fence.leg != reply.leg_no or (
        d.order.leg(reply.leg_no).is_cash
    ):
        return f"stale: no voucher return {fence!r} on this order"
    if part.status not in (PartStatus.SENT, PartStatus.UNKNOWN):
        return f"duplicate: return reply, part is {part.status.value}"
    if not reply.ok and reply.retryable:
        return f"ignored: voucher system failed without deciding ({reply.reason}); will retry"
    status = PartStatus.DONE if reply.ok else PartStatus.FAILED
    _set_part(d, refund, reply.leg_no, status, reply.reason or "returned")
    return "applied"


def _refund_second_charge(d: _Draft, cash: Leg, result: CashResult) -> str:
    """The channel charged this payment again under another transaction: give it back whole."""
    txn = result.channel_txn_id
    assert txn is not None and cash.channel is not None
    return _refund_charge(d, cash, result, None, None, SECOND_CHARGE_PREFIX + txn,
                          f"second charge {txn}")


def _refund_charge(d: _Draft, cash: Leg, result: CashResult, channel: str | None,
                   serial: str | None, refund_no: str, what: str) -> str:
    """Give back whole a charge the order does not keep: a second charge of its channel, or
    a late charge of a route it left (``channel``, ``serial``), by the channel that made it."""
    txn = result.channel_txn_id or refund_no
    if d.order.refund(refund_no=refund_no) is not None:
        return f"duplicate: {what} is already being refunded"
    seconds = sum(1 for r in d.order.refunds if r.kind is RefundKind.DUPLICATE_CHARGE)
    if seconds >= d.policy.refunds_max:  # bounded apart from the merchant's own refunds
        return f"ignored: {what} found with no refund left; for reconciliation"
    amount = cash.amount
    if result.amount_minor not in (None, amount):
        # Not this payment's amount: never refund a guess; the statement flags it.
        return f"ignored: {what} of {result.amount_minor}; for reconciliation"
    refund = Refund(f"{serial or d.order.payment_serial}-DC{len(d.order.refunds) + 1}",
                    refund_no, RefundKind.DUPLICATE_CHARGE, amount, f"{what} ({txn})",
                    RefundStatus.REFUNDING,
                    (RefundPart(cash.leg_no, amount, amount, PartStatus.SENT),), d.now_ms,
                    channel, serial)
    refund = d.set_refund(refund, f"{what} ({result.source.value})")
    _resend_refund(d, refund, cash=True, vouchers=False)
    _arm_refund_query(d, attempt=0)
    return "applied"


# ---- what is owed


FOLLOW_UP_OPS: Mapping[LegStatus, VoucherOp] = {
    LegStatus.CONFIRMING: VoucherOp.CONFIRM,
    LegStatus.CONFIRM_UNKNOWN: VoucherOp.CONFIRM,
    LegStatus.CANCELLING: VoucherOp.CANCEL,
    LegStatus.REVERSING: VoucherOp.CANCEL,
    LegStatus.RELEASE_UNKNOWN: VoucherOp.CANCEL,
    LegStatus.CREDITING: VoucherOp.CREDIT,
}
"""Leg statuses of a follow-up sent and not yet answered, and the command they wait on."""


@dataclass(frozen=True, slots=True)
class OwedCommand:
    """A voucher follow-up an order still owes: decided, sent, not yet answered."""

    order_id: str
    leg_no: int
    refund_id: str | None
    """``None`` for the leg's own Confirm or Cancel; the refund's id for a voucher return."""
    account_id: str
    operation: str
    """``confirm``, ``cancel`` (a hold's release or a debit's reversal), ``return``,
    ``credit`` (a recharge's or transfer's beneficiary) or ``clawback`` (a recharge refund's
    taking back, or its undoing)."""
    fence: FenceKey
    """The fence the voucher account keeps the command under (the leg's own, the user's
    pre-hold a pre-held leg adopted, or the refund's return)."""
    amount: int
    """In the account's unit."""
    status: str
    """The leg's status (``confirming``, ``confirm_unknown``, ...) or the refund part's
    (``sent``, ``unknown``)."""
    flagged: bool
    """Unanswered on the whole retry schedule: the sentinel re-sends it."""
    attempts: int
    """Sends of the order's voucher commands since its schedule last (re)started."""
    next_attempt_at_ms: int | None
    """When it is sent again; ``None`` once the sentinel's re-sends are used up (the next
    start of the engine sends it again)."""


def owed_commands(order: PaymentOrder) -> tuple[OwedCommand, ...]:
    """The follow-ups ``order`` still owes its voucher accounts, in leg order, then refunds."""
    next_at = order.next_voucher_retry_at_ms
    # every round of the schedule that fired sent it (but the one that found the sentinel's
    # re-sends used up), and so did the first send
    attempts = order.voucher_attempt + (0 if next_at is None else 1)
    owed: list[OwedCommand] = []
    for leg in order.legs:
        op = FOLLOW_UP_OPS.get(leg.status)
        if op is None or leg.account_id is None:
            continue
        owed.append(OwedCommand(order.order_id, leg.leg_no, None, leg.account_id, op.value,
                                order.fence_of(leg), leg.amount, leg.status.value,
                                leg.status in OWED_LEG_STATUSES, attempts, next_at))
    for refund in order.refunds:
        for part in refund.parts:
            leg = order.leg(part.leg_no)
            if leg.is_cash or leg.account_id is None or part.status not in (
                PartStatus.SENT, PartStatus.UNKNOWN, PartStatus.REVERSING
            ) or (leg.pays and part.status is PartStatus.REVERSING):
                continue
            op = VoucherOp.RETURN if leg.pays else VoucherOp.CLAWBACK
            owed.append(OwedCommand(order.order_id, part.leg_no, refund.refund_id,
                                    leg.account_id, op.value,
                                    FenceKey.refund_return(refund.refund_id, part.leg_no),
                                    part.amount,
                                    part.status.value, part.status is PartStatus.UNKNOWN,
                                    attempts, next_at))
    return tuple(owed)


# The pre-authorisation's transitions (engine.preauth) build on the draft and helpers above,
# so the module is imported last: whichever of the two is imported first, the other finds
# what it needs.
from payengine.engine import preauth as _preauth  # noqa: E402
