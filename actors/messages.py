"""Messages between the actors, and the public views the engine hands out.

Messages are immutable dataclasses. Order actors receive the core's events
(``engine.order.OrderEvent``); account actors receive the commands below.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from payengine.engine.channel_data import Prepay
from payengine.engine.discounts import PricedSale
from payengine.engine.order import (
    CancelHold,
    ClawBack,
    ConfirmHold,
    CreditVoucher,
    DebitVoucher,
    Leg,
    LegStatus,
    OrderState,
    PaymentOrder,
    Refund,
    ReturnVoucher,
    TryHold,
)
from payengine.engine.risk import Verification
from payengine.engine.voucher import Fence, FenceScope, VoucherAccount


@dataclass(frozen=True, slots=True)
class Asked:
    """Wraps a message sent with ``ask``: its typed errors go back to the asker.

    A message that was only told has nobody to hear an error, so its errors are logged.
    """

    message: Any


@dataclass(frozen=True, slots=True)
class Paced:
    """Wraps a told message whose sender paces what it sends: ``done`` is called once the
    actor has handled ``message``, on the actor's thread, however the handler ended (the
    resume's feeder tells the next Activate then). ``done`` must be quick and never block.
    """

    message: Any
    done: Callable[[], None]


@dataclass(frozen=True, slots=True)
class FromOrder:
    """An order's voucher effect, to be answered with a ``VoucherReply`` told to the order."""

    order_id: str
    effect: (TryHold | ConfirmHold | CancelHold | DebitVoucher | ReturnVoucher | CreditVoucher
             | ClawBack)


@dataclass(frozen=True, slots=True)
class Fund:
    """Top up an account; idempotent by ``funding_id``."""

    funding_id: str
    amount: int


@dataclass(frozen=True, slots=True)
class SetAccountStatus:
    """Freeze, unfreeze or close an account (``Engine.set_account_status``)."""

    status: str


@dataclass(frozen=True, slots=True)
class PreHold:
    """Hold vouchers before an order exists (the user ticked "use points").

    ``hold_id`` is the caller's: it names the fence ``FenceKey.user(hold_id)`` only.
    """

    hold_id: str
    amount: int
    expires_at_ms: int


@dataclass(frozen=True, slots=True)
class ReleaseHold:
    """Give back a pre-hold no order has adopted (the user unticked it)."""

    hold_id: str


@dataclass(frozen=True, slots=True)
class ExpireDue:
    """Expire every pending hold whose expiry has passed."""


@dataclass(frozen=True, slots=True)
class IdleCheck:
    token: int


# ---------------------------------------------------------------------- public views


@dataclass(frozen=True, slots=True)
class Receipt:
    """The synchronous acknowledgement of a submit; a duplicate submit gets an equal one.

    Carries what a third-party cashier page needs: title, payment serial and amount.
    """

    order_id: str
    payment_serial: str
    merchant_id: str
    merchant_order_no: str
    total_minor: int
    currency: str
    title: str
    accepted_at_ms: int
    close_at_ms: int
    attempt: int = 1
    """Which payment attempt of the trade order this order is."""
    needs_verification: bool = False
    """The order waits for a step-up code now: send the user to identity verification, then
    ``Engine.verify(order_id, code)``. The current truth: a retried submit after the code
    passed (or the step-up failed, expired or was closed) gets ``False``."""

    @staticmethod
    def of(order: PaymentOrder) -> Receipt:
        return Receipt(order.order_id, order.payment_serial, order.merchant_id,
                       order.merchant_order_no, order.total_minor, order.currency, order.title,
                       order.created_at_ms, order.close_at_ms, order.attempt,
                       order.state is OrderState.NEEDS_VERIFICATION)


@dataclass(frozen=True, slots=True)
class VerificationView:
    """A step-up the risk gate asked for: never the code, nor its digest."""

    status: str
    """``pending`` (waiting for the code: show the verification page), ``passed``,
    ``failed`` (too many wrong codes), ``expired``, ``closed`` (the order was closed)."""
    rule: str
    """What asked for it."""
    expires_at_ms: int
    attempts_left: int

    @staticmethod
    def of(verification: Verification | None) -> VerificationView | None:
        if verification is None:
            return None
        return VerificationView(verification.status.value, verification.rule,
                                verification.expires_at_ms, verification.attempts_left)


@dataclass(frozen=True, slots=True)
class LegView:
    leg_no: int
    mode: str
    account_id: str | None
    amount: int
    unit: str
    value_minor: int
    status: str
    hold_id: str | None
    """The caller's pre-hold a ``pre_held`` leg adopted; ``None`` for every other leg."""
    channel_txn_id: str | None
    refund_id: str | None
    channel: str | None = None
    """The cash leg's executing channel (the one routing chose for a method); ``None`` for a
    voucher leg."""
    channels_tried: tuple[ChannelTry, ...] = ()
    """The cash leg: every channel it was sent to, oldest first, the current one last
    (``outcome`` = the leg's status); more than one after a routing fallback. Empty for a
    voucher leg."""

    @staticmethod
    def of(leg: Leg, order: PaymentOrder | None = None) -> LegView:
        tried: tuple[ChannelTry, ...] = ()
        if leg.is_cash and order is not None and leg.channel is not None:
            tried = (*(ChannelTry(t.channel, t.payment_serial, t.outcome, t.code)
                       for t in order.tried),
                     ChannelTry(leg.channel, order.payment_serial, leg.status.value,
                                leg.channel_code))
        return LegView(leg.leg_no, leg.mode.value, leg.account_id, leg.amount, leg.unit,
                       leg.value_minor, leg.status.value, leg.hold_id, leg.channel_txn_id,
                       leg.refund_id, leg.channel, tried)


@dataclass(frozen=True, slots=True)
class ChannelTry:
    """One channel a cash leg was sent to (``LegView.channels_tried``)."""

    channel: str
    payment_serial: str
    """The serial that channel knows the payment by (each route its own)."""
    outcome: str
    """A left route: ``unpaid`` (it refused with a retryable code and confirmed nothing
    was charged) or ``charged_late`` (it charged later after all: refunded by that
    channel). The current route: the leg's status."""
    code: str | None
    """A left route: the retryable failure code it refused with. The current one: the
    last code it answered (``None``: none yet)."""


@dataclass(frozen=True, slots=True)
class OrderView:
    """What the engine knows of an order (never asks the channel)."""

    order_id: str
    merchant_id: str
    merchant_order_no: str
    payment_serial: str
    state: str
    cause: str
    total_minor: int
    currency: str
    settled: bool
    """Nothing more will happen by itself: terminal, and every leg's and refund's follow-up is
    done. An order whose voucher follow-up is still owed (``confirm_unknown``,
    ``release_unknown``, a return ``unknown``: ``Engine.owed()``) is not settled."""
    legs: tuple[LegView, ...]
    refunds: tuple[RefundView, ...] = ()
    refunded_minor: int = 0
    """Merchant refunds given back or still under way (FAILED ones excluded)."""
    prepay: Prepay | None = None
    """What the payer is to be shown, from the channel's pay reply: the QR code (NATIVE),
    the prepay id (JSAPI, APP), the deeplink (H5), or ``user_action`` such as
    ``"enter_password"`` (a barcode payment waiting for the payer's PIN). ``None`` until the
    channel answered the pay with one, and once the order is closed or paid."""
    attempt: int = 1
    """Which payment attempt of its trade order this order is (``PaymentRequest.attempt``)."""
    verification: VerificationView | None = None
    """The step-up the risk gate asked for (``None``: none). While ``state`` is
    ``needs_verification`` its ``status`` is ``pending``: go to identity verification (核身)."""
    sale: PricedSale | None = None
    """What was sold (station, pump, grade, litres, cashier, shift) and, for a submit that
    named a quote, the quote, the combination and the discounts it was charged."""
    user_id: str = ""
    """Who pays (a recharge's user; a transfer's is its source account)."""
    title: str = ""
    authorised_minor: int | None = None
    """A pump pre-authorisation's authorised total (``None``: not one). ``total_minor`` is
    the same until a capture is decided, and the captured amount from then on."""
    captured_minor: int | None = None
    """The capture decided (``None``: none); the money moves once the order succeeded."""
    capture_id: str | None = None

    @staticmethod
    def of(order: PaymentOrder) -> OrderView:
        cash = order.cash_leg
        showing = cash is not None and cash.status is LegStatus.PAYING and not order.is_terminal
        return OrderView(order.order_id, order.merchant_id, order.merchant_order_no,
                         order.payment_serial, order.state.value, order.cause,
                         order.total_minor, order.currency, order.is_settled,
                         tuple(LegView.of(leg, order) for leg in order.legs),
                         tuple(RefundView.of(r) for r in order.refunds), order.refunded_minor,
                         order.prepay if showing else None, order.attempt,
                         VerificationView.of(order.verification), order.sale,
                         order.user_id, order.title,
                         *_authorisation_figures(order))

    def refund(self, refund_no: str) -> RefundView:
        """The refund the merchant asked for under ``refund_no``."""
        for refund in self.refunds:
            if refund.refund_no == refund_no:
                return refund
        raise KeyError(refund_no)


def _authorisation_figures(order: PaymentOrder) -> tuple[int | None, int | None, str | None]:
    a = order.authorisation
    if a is None:
        return None, None, None
    return a.authorised_minor, a.captured_minor, a.capture_id


@dataclass(frozen=True, slots=True)
class RefundView:
    """A refund of an order: ``parts`` maps leg number to (amount in the leg's unit, status)."""

    refund_id: str
    refund_no: str
    kind: str
    amount_minor: int
    reason: str
    status: str
    parts: tuple[tuple[int, int, str], ...]
    """(leg_no, amount in the leg's unit, status) per leg that gives something back."""

    @staticmethod
    def of(refund: Refund) -> RefundView:
        return RefundView(refund.refund_id, refund.refund_no, refund.kind.value,
                          refund.amount_minor, refund.reason, refund.status.value,
                          tuple((p.leg_no, p.amount, p.status.value) for p in refund.parts))


@dataclass(frozen=True, slots=True)
class AccountView:
    account_id: str
    unit: str
    minor_per_unit: int | None
    funded: int
    available: int
    held: int
    spent: int
    status: str = "active"
    """``active``, ``frozen`` or ``closed`` (``Engine.set_account_status``)."""

    @staticmethod
    def of(account: VoucherAccount) -> AccountView:
        return AccountView(account.account_id, account.unit, account.minor_per_unit,
                           account.funded, account.available, account.held, account.spent,
                           account.status.value)


@dataclass(frozen=True, slots=True)
class HoldView:
    """A caller's pre-hold (never one of the engine's own fences)."""

    hold_id: str
    account_id: str
    amount: int
    status: str
    order_id: str | None
    expires_at_ms: int | None

    @staticmethod
    def of(fence: Fence) -> HoldView:
        assert fence.key.scope is FenceScope.USER, f"{fence.key!r} is not a caller's hold"
        return HoldView(fence.key.owner, fence.account_id, fence.amount, fence.status.value,
                        fence.order_id, fence.expires_at_ms)
