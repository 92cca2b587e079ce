"""Voucher accounts with Try / Confirm / Cancel, as pure functions.

Modelled on TigerBeetle's two-phase transfers (pending -> posted | voided | expired) and on
Seata's TCC fence: every fence key has one fence row whose status makes Confirm and Cancel
idempotent, turns a Cancel that arrives before its Try into a recorded *empty rollback*, and
refuses a Try that arrives after its Cancel (*hanging*).

A fence is addressed by a structured ``FenceKey`` (scope, owner, leg), never by a string the
engine builds and parses: a caller's pre-hold lives in scope ``user`` and the engine's own
fences (an order leg's hold or debit, a refund's voucher return) in scopes ``order`` and
``refund``, which no caller-chosen hold id can reach.

A post-deduct leg uses a *debit*: a fence posted at once (no hold), reversible by its order.

Conservation, asserted after every operation::

    funded == available + held + spent,   available, held, spent >= 0

Each function takes the account and the fence for the key (``None`` if none exists) and
returns the new account, the new fence and whether anything changed. They raise a
``PaymentError`` subclass, leaving both inputs untouched, when the operation is refused.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from payengine.engine.checks import shown
from payengine.engine.errors import (
    AccountClosed,
    AccountFrozen,
    CurrencyMismatch,
    HoldNotPending,
    HoldRefused,
    IdempotencyConflict,
    IllegalTransition,
    InsufficientBalance,
    InvalidAmount,
    InvalidRequest,
    UnknownHold,
)
from payengine.engine.evolve import evolve
from payengine.engine.money import AMOUNT_MAX, check_amount


class FenceScope(enum.StrEnum):
    """Whose fence it is: the namespace of its owner."""

    USER = "user"
    """A caller's pre-hold (``Engine.pre_hold``); owner is the caller's hold id, leg 0. An
    order leg in ``PRE_HELD`` mode adopts it under this same key."""
    ORDER = "order"
    """An order leg's own hold or debit; owner is the order id, leg the leg number."""
    REFUND = "refund"
    """A refund's voucher return; owner is the refund id, leg the leg number."""


@dataclass(frozen=True, slots=True, order=True)
class FenceKey:
    """The address of one fence on an account. Immutable; safe on any thread.

    Stored as three columns, so an owner may contain any character (':' included) and a
    caller's hold id equal to an engine-made id still names another fence.
    """

    scope: FenceScope
    owner: str
    leg: int = 0

    @staticmethod
    def user(hold_id: str) -> FenceKey:
        """The caller's pre-hold ``hold_id``: the only scope the public API addresses."""
        return FenceKey(FenceScope.USER, hold_id, 0)

    @staticmethod
    def order_leg(order_id: str, leg_no: int) -> FenceKey:
        """The hold or debit an order places for one of its own (not pre-held) legs."""
        return FenceKey(FenceScope.ORDER, order_id, leg_no)

    @staticmethod
    def refund_return(refund_id: str, leg_no: int) -> FenceKey:
        """The return of one voucher leg's part of a refund."""
        return FenceKey(FenceScope.REFUND, refund_id, leg_no)

    @property
    def journal_part(self) -> str:
        """How the account's journal names this fence: ``fence:<scope>:<leg>:<owner>``.

        A label for people and logs; the engine never parses it (the owner comes last, so
        even an owner with ':' in it reads unambiguously).
        """
        return f"fence:{self.scope.value}:{self.leg}:{self.owner}"

    @property
    def public_id(self) -> str:
        """How events name the fence: the caller's own hold id for a pre-hold, else the
        journal label (an order's or refund's fence has no id a caller ever gave)."""
        return self.owner if self.scope is FenceScope.USER else self.journal_part

    def __str__(self) -> str:
        """For messages and logs only; never parsed."""
        if self.scope is FenceScope.USER:
            return self.owner
        return f"{self.scope.value} {self.owner} leg {self.leg}"


class FenceKind(enum.StrEnum):
    HOLD = "hold"
    """A Try: the amount moves from available to held until confirmed, cancelled or expired."""
    DEBIT = "debit"
    """A post-deduct: the amount moves from available to spent at once."""
    EMPTY = "empty"
    """Cancel came before any Try for this id: nothing moved, later Trys are refused."""
    RETURN = "return"
    """A refund: spent value given back (spent -> available), posted at once."""
    CREDIT = "credit"
    """A recharge's or transfer's credit: new value (funded and available up), posted at
    once, once per order (the credit leg's fence)."""


class FenceStatus(enum.StrEnum):
    PENDING = "pending"
    """Held; Seata's *tried*."""
    POSTED = "posted"
    """Spent; Seata's *committed*."""
    VOIDED = "voided"
    """Released by Cancel; Seata's *rolled back*."""
    EXPIRED = "expired"
    """Released because its expiry passed before Confirm."""
    REVERSED = "reversed"
    """A posted debit given back by its order (the payment did not go through)."""
    REFUSED = "refused"
    """A debit refused for want of balance; the answer stays the same on a retry."""
    EMPTY_ROLLBACK = "empty_rollback"
    """Cancel without Try; Seata's *suspended*. A later Try or debit is refused."""


FINAL_FENCE_STATUSES = frozenset(
    {
        FenceStatus.VOIDED,
        FenceStatus.EXPIRED,
        FenceStatus.REVERSED,
        FenceStatus.REFUSED,
        FenceStatus.EMPTY_ROLLBACK,
    }
)
"""Statuses a fence never leaves. POSTED is final for holds; a debit may still be reversed."""


class AccountStatus(enum.StrEnum):
    ACTIVE = "active"
    FROZEN = "frozen"
    """Nothing new on it (hold, debit, credit, top-up); what is decided still completes
    (Confirm, Cancel, a refund's return, expiry)."""
    CLOSED = "closed"
    """Final: frozen for ever."""


@dataclass(frozen=True, slots=True)
class VoucherAccount:
    """Balances of one voucher account, in its own unit (minor units or points)."""

    account_id: str
    unit: str
    minor_per_unit: int | None
    funded: int = 0
    available: int = 0
    held: int = 0
    spent: int = 0
    status: AccountStatus = AccountStatus.ACTIVE

    def check_usable(self) -> None:
        """Refuse anything new on a frozen or closed account (a typed error: nothing moved)."""
        if self.status is AccountStatus.FROZEN:
            raise AccountFrozen(f"account {self.account_id} is frozen")
        if self.status is AccountStatus.CLOSED:
            raise AccountClosed(f"account {self.account_id} is closed")

    def check(self) -> VoucherAccount:
        """Assert conservation; a failure here is a bug in this module, never bad input."""
        assert self.available >= 0, f"{self.account_id}: available {self.available} < 0"
        assert self.held >= 0, f"{self.account_id}: held {self.held} < 0"
        assert self.spent >= 0, f"{self.account_id}: spent {self.spent} < 0"
        assert self.funded == self.available + self.held + self.spent, (
            f"{self.account_id}: funded {self.funded} != available {self.available} + "
            f"held {self.held} + spent {self.spent}"
        )
        return self


@dataclass(frozen=True, slots=True)
class Fence:
    """The one record of a fence key on an account: Seata's fence row."""

    key: FenceKey
    account_id: str
    kind: FenceKind
    status: FenceStatus
    amount: int
    order_id: str | None
    expires_at_ms: int | None
    updated_at_ms: int


@dataclass(frozen=True, slots=True)
class Outcome:
    """The result of one operation: the new values and whether anything changed."""

    account: VoucherAccount
    fence: Fence | None
    changed: bool


def fund(account: VoucherAccount, amount: int) -> VoucherAccount:
    """Add ``amount`` to the account (a top-up); the shell makes it idempotent by funding id."""
    check_amount(amount)
    account.check_usable()
    if account.funded + amount > AMOUNT_MAX:
        raise InvalidAmount(
            f"funding {amount} would take {account.account_id} above {AMOUNT_MAX}"
        )
    return evolve(
        account, funded=account.funded + amount, available=account.available + amount
    ).check()


def _assert_same_account(account: VoucherAccount, fence: Fence | None) -> None:
    assert fence is None or fence.account_id == account.account_id, (
        f"fence {fence.key} belongs to {fence.account_id}, not {account.account_id}"
    )


def _assert_fence_of(account: VoucherAccount, fence: Fence | None, key: FenceKey) -> None:
    """The caller looked the fence up by ``key`` on this account: anything else is a bug."""
    _assert_same_account(account, fence)
    assert fence is None or fence.key == key, f"fence {fence.key!r} given for {key!r}"


def try_hold(
    account: VoucherAccount,
    fence: Fence | None,
    *,
    key: FenceKey,
    amount: int,
    order_id: str | None,
    expires_at_ms: int,
    now_ms: int,
    adopt_only: bool = False,
) -> Outcome:
    """Try: hold ``amount`` until ``expires_at_ms``.

    Idempotent: a second Try of a pending hold with the same amount succeeds without moving
    money again. This is also how an order *adopts* a pre-hold the user placed before
    submitting: the hold is bound to the order and its expiry pushed out to the order's.
    With ``adopt_only`` the hold must exist already: an order naming a pre-hold that is not
    there gets ``UnknownHold``, not a fresh hold under that id.
    """
    _assert_fence_of(account, fence, key)
    check_amount(amount)
    if fence is not None and fence.status is FenceStatus.PENDING and _due(fence, now_ms):
        raise HoldRefused(f"hold {key} expired at {fence.expires_at_ms}; it cannot be reused")
    if fence is None and adopt_only:
        raise UnknownHold(f"no pre-hold {key} on account {account.account_id}")
    if fence is None:
        account.check_usable()
        if expires_at_ms <= now_ms:
            raise HoldRefused(f"hold {key} would expire at once ({expires_at_ms} <= {now_ms})")
        if amount > account.available:
            raise InsufficientBalance(
                f"account {account.account_id} has {account.available} {account.unit} "
                f"available, {amount} asked"
            )
        new_account = evolve(
            account, available=account.available - amount, held=account.held + amount
        ).check()
        new_fence = Fence(
            key, account.account_id, FenceKind.HOLD, FenceStatus.PENDING, amount,
            order_id, expires_at_ms, now_ms,
        )
        return Outcome(new_account, new_fence, True)
    if fence.kind is not FenceKind.HOLD or fence.status is not FenceStatus.PENDING:
        if (
            fence.kind is FenceKind.HOLD
            and fence.status is FenceStatus.POSTED
            and fence.order_id == order_id
        ):
            return Outcome(account, fence, False)
        raise HoldRefused(
            f"hold {key} on {account.account_id} is {fence.status.value}: a Try after "
            "its Cancel or expiry is refused"
        )
    if fence.amount != amount:
        raise IdempotencyConflict(
            f"hold {key} holds {fence.amount} {account.unit}, a Try for {amount} came again"
        )
    if fence.order_id is not None and order_id is not None and fence.order_id != order_id:
        raise HoldRefused(f"hold {key} is bound to order {fence.order_id}, not {order_id}")
    if order_id is None:
        # the caller's retry of its own pre-hold: the same hold, its expiry as first set
        # (a retry that pushed it out would let a client keep points locked for ever)
        return Outcome(account, fence, False)
    bound = fence.order_id if fence.order_id is not None else order_id
    new_expiry = max(fence.expires_at_ms or 0, expires_at_ms)
    if bound == fence.order_id and new_expiry == fence.expires_at_ms:
        return Outcome(account, fence, False)
    return Outcome(
        account, evolve(fence, order_id=bound, expires_at_ms=new_expiry, updated_at_ms=now_ms),
        True,
    )


def confirm(account: VoucherAccount, fence: Fence | None, *, key: FenceKey, now_ms: int,
            amount: int | None = None) -> Outcome:
    """Confirm: post a pending hold (held -> spent). Idempotent on a posted hold.

    ``amount`` (a pump pre-authorisation captured short): post only that much of the hold,
    1..its amount, and release the rest (held -> available) in the same step; the fence then
    records the posted amount. ``None``: the whole hold. A Confirm again of a posted fence
    with the same amount (or ``None``) changes nothing; another amount is an
    ``IdempotencyConflict``: one fence is posted once.

    A hold whose expiry has passed is refused (``HoldNotPending``), as TigerBeetle refuses to
    post an expired pending transfer; the caller expires it with ``expire_if_due``.
    """
    _assert_fence_of(account, fence, key)
    if fence is None or fence.kind is not FenceKind.HOLD:
        raise UnknownHold(f"no hold {key} on account {account.account_id}")
    if amount is not None:
        check_amount(amount)
    if fence.status is FenceStatus.POSTED:
        if amount is not None and amount != fence.amount:
            raise IdempotencyConflict(f"hold {key} was posted for {fence.amount} "
                                      f"{account.unit}, a Confirm for {amount} came again")
        return Outcome(account, fence, False)
    if fence.status is FenceStatus.PENDING and _due(fence, now_ms):
        raise HoldNotPending(f"hold {key} expired at {fence.expires_at_ms}, before Confirm")
    if fence.status is not FenceStatus.PENDING:
        raise HoldNotPending(f"hold {key} is {fence.status.value}; it cannot be confirmed")
    posted = fence.amount if amount is None else amount
    if posted > fence.amount:
        raise InvalidAmount(f"hold {key} holds {fence.amount} {account.unit}; {posted} "
                            "cannot be posted")
    new_account = evolve(
        account, held=account.held - fence.amount, spent=account.spent + posted,
        available=account.available + fence.amount - posted,
    ).check()
    return Outcome(
        new_account,
        evolve(fence, status=FenceStatus.POSTED, amount=posted, updated_at_ms=now_ms), True
    )


def cancel(
    account: VoucherAccount,
    fence: Fence | None,
    *,
    key: FenceKey,
    order_id: str | None,
    now_ms: int,
) -> Outcome:
    """Cancel: void a pending hold, or reverse a posted debit. Idempotent.

    With no fence at all this is an empty rollback: it is recorded (so that a late Try is
    refused) and succeeds. Cancelling a posted *hold* is refused: the payment went through and
    only the refund path may give it back. A pending hold bound to another order than
    ``order_id`` is refused (``HoldRefused``): only its own order may void it.
    """
    _assert_fence_of(account, fence, key)
    if fence is None:
        empty = Fence(
            key, account.account_id, FenceKind.EMPTY, FenceStatus.EMPTY_ROLLBACK, 0,
            order_id, None, now_ms,
        )
        return Outcome(account, empty, True)
    if fence.status in FINAL_FENCE_STATUSES:
        return Outcome(account, fence, False)
    if fence.status is FenceStatus.PENDING:
        if fence.order_id is not None and order_id is not None and fence.order_id != order_id:
            # two orders named one pre-hold: the one that did not adopt it may not void it
            raise HoldRefused(f"hold {key} is bound to order {fence.order_id}, not {order_id}")
        new_account = evolve(
            account, held=account.held - fence.amount, available=account.available + fence.amount
        ).check()
        return Outcome(
            new_account, evolve(fence, status=FenceStatus.VOIDED, updated_at_ms=now_ms), True
        )
    assert fence.status is FenceStatus.POSTED
    if fence.kind is FenceKind.HOLD:
        raise HoldNotPending(f"hold {key} was confirmed; only a refund can give it back")
    new_account = evolve(
        account, spent=account.spent - fence.amount, available=account.available + fence.amount
    ).check()
    return Outcome(
        new_account, evolve(fence, status=FenceStatus.REVERSED, updated_at_ms=now_ms), True
    )


def debit(
    account: VoucherAccount,
    fence: Fence | None,
    *,
    key: FenceKey,
    amount: int,
    order_id: str,
    now_ms: int,
) -> Outcome:
    """Post-deduct: move ``amount`` from available to spent at once, idempotent by ``key``.

    A shortfall is recorded as a REFUSED fence (and reported by ``Outcome.fence.status``) so
    that a retried debit gets the same answer even if the account was topped up meanwhile.
    """
    _assert_fence_of(account, fence, key)
    check_amount(amount)
    if fence is not None:
        if fence.kind is FenceKind.DEBIT and fence.amount != amount:
            raise IdempotencyConflict(f"debit {key} was for {fence.amount}, not {amount}")
        if fence.kind is FenceKind.DEBIT and fence.status in (
            FenceStatus.POSTED, FenceStatus.REFUSED
        ):
            return Outcome(account, fence, False)
        raise HoldRefused(f"debit {key} is {fence.status.value}; it cannot be taken again")
    account.check_usable()
    if amount > account.available:
        refused = Fence(
            key, account.account_id, FenceKind.DEBIT, FenceStatus.REFUSED, amount,
            order_id, None, now_ms,
        )
        return Outcome(account, refused, True)
    new_account = evolve(
        account, available=account.available - amount, spent=account.spent + amount
    ).check()
    posted = Fence(
        key, account.account_id, FenceKind.DEBIT, FenceStatus.POSTED, amount, order_id,
        None, now_ms,
    )
    return Outcome(new_account, posted, True)


def give_back(
    account: VoucherAccount,
    fence: Fence | None,
    *,
    key: FenceKey,
    amount: int,
    order_id: str,
    now_ms: int,
) -> Outcome:
    """Refund: move ``amount`` from spent back to available, idempotent by ``key``.

    The order decides how much of what it spent may come back; the account only refuses to
    give back more than it has spent in all (``HoldRefused``), which no correct order asks.
    """
    _assert_fence_of(account, fence, key)
    check_amount(amount)
    if fence is not None:
        if fence.kind is FenceKind.RETURN and (fence.amount, fence.order_id) == (amount, order_id):
            return Outcome(account, fence, False)
        raise IdempotencyConflict(f"return {key} was {fence.kind.value} of {fence.amount} "
                                  f"for {fence.order_id}, not a return of {amount}")
    if amount > account.spent:
        raise HoldRefused(f"account {account.account_id} has spent {account.spent} "
                          f"{account.unit}; {amount} cannot be given back")
    new_account = evolve(
        account, spent=account.spent - amount, available=account.available + amount
    ).check()
    posted = Fence(key, account.account_id, FenceKind.RETURN, FenceStatus.POSTED, amount,
                   order_id, None, now_ms)
    return Outcome(new_account, posted, True)


def credit(
    account: VoucherAccount,
    fence: Fence | None,
    *,
    key: FenceKey,
    amount: int,
    order_id: str,
    now_ms: int,
) -> Outcome:
    """Credit ``amount`` (funded and available up), idempotent by ``key``: the same credit
    again changes nothing, so a credit re-sent after a crash lands exactly once."""
    _assert_fence_of(account, fence, key)
    check_amount(amount)
    if fence is not None:
        if fence.kind is FenceKind.CREDIT and (fence.amount, fence.order_id) == (amount, order_id):
            return Outcome(account, fence, False)
        raise IdempotencyConflict(f"credit {key} was {fence.kind.value} of {fence.amount} "
                                  f"for {fence.order_id}, not a credit of {amount}")
    account.check_usable()
    if account.funded + amount > AMOUNT_MAX:
        raise InvalidAmount(f"crediting {amount} would take {account.account_id} above "
                            f"{AMOUNT_MAX}")
    new_account = evolve(account, funded=account.funded + amount,
                         available=account.available + amount).check()
    posted = Fence(key, account.account_id, FenceKind.CREDIT, FenceStatus.POSTED, amount,
                   order_id, None, now_ms)
    return Outcome(new_account, posted, True)


def set_status(account: VoucherAccount, status: object) -> VoucherAccount:
    """The account in ``status`` (``active``, ``frozen``, ``closed``); closing is final
    (``IllegalTransition`` to leave it), a bad status ``InvalidRequest``."""
    try:
        new = AccountStatus(status) if isinstance(status, str) else None
    except ValueError:
        new = None
    if new is None:
        raise InvalidRequest(f"account status must be one of "
                             f"{[s.value for s in AccountStatus]}, not {shown(status)}")
    if account.status is AccountStatus.CLOSED and new is not AccountStatus.CLOSED:
        raise IllegalTransition(f"account {account.account_id} is closed: that is final")
    return evolve(account, status=new)


def _due(fence: Fence, now_ms: int) -> bool:
    return fence.expires_at_ms is not None and fence.expires_at_ms <= now_ms


def expire_if_due(account: VoucherAccount, fence: Fence, now_ms: int) -> Outcome:
    """Expire a pending hold whose expiry has passed (held -> available); else change nothing."""
    _assert_same_account(account, fence)
    if fence.status is not FenceStatus.PENDING or not _due(fence, now_ms):
        return Outcome(account, fence, False)
    new_account = evolve(
        account, held=account.held - fence.amount, available=account.available + fence.amount
    ).check()
    return Outcome(
        new_account, evolve(fence, status=FenceStatus.EXPIRED, updated_at_ms=now_ms), True
    )


def defer_expiry(account: VoucherAccount, fence: Fence, expires_at_ms: int, now_ms: int
                 ) -> Outcome:
    """Move a pending hold's expiry out to ``expires_at_ms`` (never earlier); balances stay.

    For a hold whose order decided to confirm it (R-TCC: Confirm must succeed once Try did):
    the account keeps it until the order's Confirm arrives, however late.
    """
    _assert_same_account(account, fence)
    if fence.status is not FenceStatus.PENDING or (fence.expires_at_ms or 0) >= expires_at_ms:
        return Outcome(account, fence, False)
    return Outcome(account, evolve(fence, expires_at_ms=expires_at_ms, updated_at_ms=now_ms),
                   True)


def check_unit_matches(account: VoucherAccount, unit: str) -> None:
    """A request naming a unit for this account must name the account's own unit."""
    if unit != account.unit:
        raise CurrencyMismatch(f"account {account.account_id} is in {account.unit}, not {unit}")
