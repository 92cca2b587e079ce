"""Voucher accounts: Try / Confirm / Cancel fences, debits, expiry and conservation."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from payengine.engine.errors import (
    CurrencyMismatch,
    HoldNotPending,
    HoldRefused,
    IdempotencyConflict,
    InsufficientBalance,
    InvalidAmount,
    PaymentError,
    UnknownHold,
)
from payengine.engine.money import AMOUNT_MAX
from payengine.engine.voucher import (
    FINAL_FENCE_STATUSES,
    Fence,
    FenceKey,
    FenceKind,
    FenceStatus,
    Outcome,
    VoucherAccount,
    cancel,
    check_unit_matches,
    confirm,
    debit,
    expire_if_due,
    fund,
    try_hold,
)

T0 = 1_700_000_000_000
MINUTE = 60_000
ACCOUNT = VoucherAccount("points-u1", "POINTS", 10)
H1 = FenceKey.user("h1")
OWN_LEG = FenceKey.order_leg("o1", 2)


def _funded(amount: int = 1_000) -> VoucherAccount:
    return fund(ACCOUNT, amount)


def _hold(
    account: VoucherAccount,
    fence: Fence | None = None,
    *,
    key: FenceKey = H1,
    amount: int = 100,
    order_id: str | None = "o1",
    expires_at_ms: int = T0 + 10 * MINUTE,
    now_ms: int = T0,
) -> Outcome:
    return try_hold(
        account, fence, key=key, amount=amount, order_id=order_id,
        expires_at_ms=expires_at_ms, now_ms=now_ms,
    )


def _balances(account: VoucherAccount) -> tuple[int, int, int, int]:
    return account.funded, account.available, account.held, account.spent


# =========================================================================== examples: TCC


def test_try_moves_the_amount_from_available_to_held_and_records_a_pending_fence() -> None:
    out = _hold(_funded(1_000), amount=300)
    assert out.changed
    assert _balances(out.account) == (1_000, 700, 300, 0)
    assert out.fence == Fence(
        H1, ACCOUNT.account_id, FenceKind.HOLD, FenceStatus.PENDING, 300, "o1",
        T0 + 10 * MINUTE, T0,
    )


def test_confirm_posts_the_hold_and_a_second_confirm_changes_nothing() -> None:
    held = _hold(_funded(1_000), amount=300)
    first = confirm(held.account, held.fence, key=H1, now_ms=T0 + 1)
    assert first.changed
    assert _balances(first.account) == (1_000, 700, 0, 300)
    assert first.fence is not None and first.fence.status is FenceStatus.POSTED
    again = confirm(first.account, first.fence, key=H1, now_ms=T0 + 2)
    assert again == Outcome(first.account, first.fence, False)


def test_cancel_voids_the_hold_and_a_second_cancel_changes_nothing() -> None:
    held = _hold(_funded(1_000), amount=300)
    first = cancel(held.account, held.fence, key=H1, order_id="o1", now_ms=T0 + 1)
    assert first.changed
    assert _balances(first.account) == (1_000, 1_000, 0, 0)
    assert first.fence is not None and first.fence.status is FenceStatus.VOIDED
    again = cancel(first.account, first.fence, key=H1, order_id="o1", now_ms=T0 + 2)
    assert again == Outcome(first.account, first.fence, False)


def test_cancel_without_try_is_an_empty_rollback_and_a_later_try_is_refused() -> None:
    account = _funded(1_000)
    empty = cancel(account, None, key=H1, order_id="o1", now_ms=T0)
    assert empty.changed
    assert empty.account == account
    assert empty.fence == Fence(
        H1, ACCOUNT.account_id, FenceKind.EMPTY, FenceStatus.EMPTY_ROLLBACK, 0, "o1", None, T0
    )
    assert cancel(account, empty.fence, key=H1, order_id="o1", now_ms=T0 + 1) == Outcome(
        account, empty.fence, False
    )
    with pytest.raises(HoldRefused, match="after its Cancel"):
        _hold(account, empty.fence, now_ms=T0 + 2)


def test_a_debit_after_an_empty_rollback_is_refused() -> None:
    account = _funded(1_000)
    empty = cancel(account, None, key=OWN_LEG, order_id="o1", now_ms=T0)
    with pytest.raises(HoldRefused):
        debit(account, empty.fence, key=OWN_LEG, amount=100, order_id="o1", now_ms=T0 + 1)


def test_a_try_after_its_cancel_is_refused_even_with_the_same_amount() -> None:
    held = _hold(_funded(1_000), amount=300)
    voided = cancel(held.account, held.fence, key=H1, order_id="o1", now_ms=T0 + 1)
    for amount in (300, 1):
        with pytest.raises(HoldRefused):
            _hold(voided.account, voided.fence, amount=amount, now_ms=T0 + 2)


def test_a_confirmed_hold_cannot_be_cancelled_only_refunded() -> None:
    held = _hold(_funded(1_000), amount=300)
    posted = confirm(held.account, held.fence, key=H1, now_ms=T0 + 1)
    with pytest.raises(HoldNotPending, match="refund"):
        cancel(posted.account, posted.fence, key=H1, order_id="o1", now_ms=T0 + 2)


def test_a_cancelled_hold_cannot_be_confirmed() -> None:
    held = _hold(_funded(1_000), amount=300)
    voided = cancel(held.account, held.fence, key=H1, order_id="o1", now_ms=T0 + 1)
    with pytest.raises(HoldNotPending):
        confirm(voided.account, voided.fence, key=H1, now_ms=T0 + 2)


def test_confirm_without_any_try_is_an_unknown_hold() -> None:
    account = _funded(1_000)
    with pytest.raises(UnknownHold):
        confirm(account, None, key=H1, now_ms=T0)
    empty = cancel(account, None, key=H1, order_id="o1", now_ms=T0)
    with pytest.raises(UnknownHold):
        confirm(account, empty.fence, key=H1, now_ms=T0)


def test_a_retried_try_of_a_pending_hold_moves_no_money_again() -> None:
    held = _hold(_funded(1_000), amount=300)
    again = _hold(held.account, held.fence, amount=300, now_ms=T0 + 5)
    assert again == Outcome(held.account, held.fence, False)


def test_a_retried_try_with_another_amount_is_an_idempotency_conflict() -> None:
    held = _hold(_funded(1_000), amount=300)
    with pytest.raises(IdempotencyConflict):
        _hold(held.account, held.fence, amount=301, now_ms=T0 + 5)


def test_a_retried_try_arriving_after_the_confirm_of_its_order_succeeds_without_change() -> None:
    held = _hold(_funded(1_000), amount=300)
    posted = confirm(held.account, held.fence, key=H1, now_ms=T0 + 1)
    assert _hold(posted.account, posted.fence, now_ms=T0 + 2) == Outcome(
        posted.account, posted.fence, False
    )
    with pytest.raises(HoldRefused):
        _hold(posted.account, posted.fence, order_id="o2", now_ms=T0 + 2)


def test_try_beyond_the_available_balance_is_insufficient_balance() -> None:
    account = _funded(100)
    with pytest.raises(InsufficientBalance):
        _hold(account, amount=101)
    held = _hold(account, key=H1, amount=60)
    with pytest.raises(InsufficientBalance):
        _hold(held.account, key=FenceKey.user("h2"), amount=41)
    assert _balances(_hold(held.account, key=FenceKey.user("h2"), amount=40).account) == (100, 0, 100, 0)


@pytest.mark.parametrize("amount", [0, -5, 1.0, True, AMOUNT_MAX + 1])
def test_try_and_debit_of_an_invalid_amount_are_refused(amount: object) -> None:
    account = _funded(1_000)
    with pytest.raises(InvalidAmount):
        _hold(account, amount=amount)  # type: ignore[arg-type]
    with pytest.raises(InvalidAmount):
        debit(
            account, None, key=FenceKey.user("d"), amount=amount, order_id="o1", now_ms=T0  # type: ignore[arg-type]
        )


# =========================================================================== examples: expiry


def test_a_try_that_would_expire_at_once_is_refused() -> None:
    with pytest.raises(HoldRefused, match="expire at once"):
        _hold(_funded(), expires_at_ms=T0, now_ms=T0)


def test_a_hold_is_not_expired_before_its_expiry() -> None:
    held = _hold(_funded(1_000), amount=300, expires_at_ms=T0 + MINUTE)
    assert held.fence is not None
    assert expire_if_due(held.account, held.fence, T0 + MINUTE - 1) == Outcome(
        held.account, held.fence, False
    )


def test_a_hold_expires_at_its_expiry_and_gives_the_amount_back() -> None:
    held = _hold(_funded(1_000), amount=300, expires_at_ms=T0 + MINUTE)
    assert held.fence is not None
    expired = expire_if_due(held.account, held.fence, T0 + MINUTE)
    assert expired.changed
    assert _balances(expired.account) == (1_000, 1_000, 0, 0)
    assert expired.fence == replace(
        held.fence, status=FenceStatus.EXPIRED, updated_at_ms=T0 + MINUTE
    )
    assert expired.fence is not None
    assert expire_if_due(expired.account, expired.fence, T0 + 2 * MINUTE) == Outcome(
        expired.account, expired.fence, False
    )
    with pytest.raises(HoldNotPending):
        confirm(expired.account, expired.fence, key=H1, now_ms=T0 + MINUTE)
    with pytest.raises(HoldRefused):
        _hold(expired.account, expired.fence, amount=300, now_ms=T0 + MINUTE)
    # cancelling an expired hold is a no-op success
    assert cancel(
        expired.account, expired.fence, key=H1, order_id="o1", now_ms=T0 + MINUTE
    ) == Outcome(expired.account, expired.fence, False)


def test_a_due_hold_not_yet_swept_is_neither_confirmed_nor_retried() -> None:
    held = _hold(_funded(1_000), amount=300, expires_at_ms=T0 + MINUTE)
    with pytest.raises(HoldNotPending, match="expired"):
        confirm(held.account, held.fence, key=H1, now_ms=T0 + MINUTE)
    with pytest.raises(HoldRefused, match="expired"):
        _hold(held.account, held.fence, amount=300, now_ms=T0 + MINUTE)
    # a cancel of a due hold still releases it
    voided = cancel(held.account, held.fence, key=H1, order_id="o1", now_ms=T0 + MINUTE)
    assert _balances(voided.account) == (1_000, 1_000, 0, 0)


def test_a_confirmed_hold_never_expires() -> None:
    held = _hold(_funded(1_000), amount=300, expires_at_ms=T0 + MINUTE)
    posted = confirm(held.account, held.fence, key=H1, now_ms=T0 + 1)
    assert posted.fence is not None
    assert not expire_if_due(posted.account, posted.fence, T0 + 10 * MINUTE).changed


# =========================================================================== examples: pre-hold


def test_an_order_adopts_a_pre_hold_by_binding_it_and_pushing_its_expiry_out() -> None:
    pre = _hold(_funded(1_000), amount=300, order_id=None, expires_at_ms=T0 + MINUTE)
    assert pre.fence is not None and pre.fence.order_id is None
    adopted = _hold(
        pre.account, pre.fence, amount=300, order_id="o1", expires_at_ms=T0 + 25 * MINUTE,
        now_ms=T0 + 5_000,
    )
    assert adopted.changed
    assert adopted.account == pre.account  # no money moved twice
    assert adopted.fence == replace(
        pre.fence, order_id="o1", expires_at_ms=T0 + 25 * MINUTE, updated_at_ms=T0 + 5_000
    )
    # the adopted hold outlives the pre-hold's own expiry
    assert adopted.fence is not None
    assert not expire_if_due(adopted.account, adopted.fence, T0 + 2 * MINUTE).changed
    # adopting again is a no-op
    assert _hold(
        adopted.account, adopted.fence, amount=300, order_id="o1",
        expires_at_ms=T0 + 25 * MINUTE, now_ms=T0 + 6_000,
    ) == Outcome(adopted.account, adopted.fence, False)


def test_adoption_never_shortens_a_hold() -> None:
    pre = _hold(_funded(1_000), amount=300, order_id=None, expires_at_ms=T0 + 30 * MINUTE)
    adopted = _hold(pre.account, pre.fence, amount=300, order_id="o1", expires_at_ms=T0 + MINUTE)
    assert adopted.fence is not None
    assert adopted.fence.order_id == "o1"
    assert adopted.fence.expires_at_ms == T0 + 30 * MINUTE


def test_a_hold_bound_to_one_order_cannot_be_adopted_by_another() -> None:
    pre = _hold(_funded(1_000), amount=300, order_id=None)
    adopted = _hold(pre.account, pre.fence, amount=300, order_id="o1")
    with pytest.raises(HoldRefused, match="bound to order o1"):
        _hold(adopted.account, adopted.fence, amount=300, order_id="o2")


def test_adopting_a_pre_hold_with_another_amount_is_an_idempotency_conflict() -> None:
    pre = _hold(_funded(1_000), amount=300, order_id=None)
    with pytest.raises(IdempotencyConflict):
        _hold(pre.account, pre.fence, amount=200, order_id="o1")


def test_another_order_cannot_cancel_a_hold_bound_to_an_order() -> None:
    """Two orders naming one pre-hold: the loser's Cancel must not void the winner's hold,
    or the winner's Confirm fails after its cash was taken (the voucher then pays nothing)."""
    pre = _hold(_funded(1_000), amount=300, order_id=None)
    adopted = _hold(pre.account, pre.fence, amount=300, order_id="o1")
    with pytest.raises(HoldRefused, match="bound to order o1"):
        cancel(adopted.account, adopted.fence, key=H1, order_id="o2", now_ms=T0 + 1)
    posted = confirm(adopted.account, adopted.fence, key=H1, now_ms=T0 + 2)
    assert _balances(posted.account) == (1_000, 700, 0, 300)
    # its own order (or a caller that names no order) may still cancel it
    own = cancel(adopted.account, adopted.fence, key=H1, order_id="o1", now_ms=T0 + 1)
    assert own.fence is not None and own.fence.status is FenceStatus.VOIDED
    anyone = cancel(adopted.account, adopted.fence, key=H1, order_id=None, now_ms=T0 + 1)
    assert anyone.fence is not None and anyone.fence.status is FenceStatus.VOIDED


# =========================================================================== examples: debits


def test_a_debit_moves_the_amount_straight_to_spent_and_is_idempotent() -> None:
    account = _funded(1_000)
    first = debit(account, None, key=OWN_LEG, amount=300, order_id="o1", now_ms=T0)
    assert first.changed
    assert _balances(first.account) == (1_000, 700, 0, 300)
    assert first.fence is not None
    assert (first.fence.kind, first.fence.status) == (FenceKind.DEBIT, FenceStatus.POSTED)
    again = debit(first.account, first.fence, key=OWN_LEG, amount=300, order_id="o1",
                  now_ms=T0 + 1)
    assert again == Outcome(first.account, first.fence, False)


def test_a_debit_shortfall_is_recorded_as_refused_and_answered_the_same_after_a_top_up() -> None:
    account = _funded(100)
    short = debit(account, None, key=OWN_LEG, amount=300, order_id="o1", now_ms=T0)
    assert short.changed
    assert short.account == account
    assert short.fence == Fence(
        OWN_LEG, ACCOUNT.account_id, FenceKind.DEBIT, FenceStatus.REFUSED, 300, "o1", None, T0
    )
    topped_up = fund(account, 1_000)
    again = debit(topped_up, short.fence, key=OWN_LEG, amount=300, order_id="o1",
                  now_ms=T0 + 1)
    assert again == Outcome(topped_up, short.fence, False)
    assert _balances(again.account) == (1_100, 1_100, 0, 0)
    # cancelling a refused debit is a no-op success (nothing to give back)
    assert cancel(topped_up, short.fence, key=OWN_LEG, order_id="o1", now_ms=T0 + 2) == (
        Outcome(topped_up, short.fence, False)
    )


def test_a_debit_retried_with_another_amount_is_an_idempotency_conflict() -> None:
    first = debit(_funded(1_000), None, key=OWN_LEG, amount=300, order_id="o1", now_ms=T0)
    with pytest.raises(IdempotencyConflict):
        debit(first.account, first.fence, key=OWN_LEG, amount=200, order_id="o1", now_ms=T0)


def test_cancel_reverses_a_posted_debit_once_and_a_later_debit_is_refused() -> None:
    first = debit(_funded(1_000), None, key=OWN_LEG, amount=300, order_id="o1", now_ms=T0)
    reversed_ = cancel(first.account, first.fence, key=OWN_LEG, order_id="o1", now_ms=T0 + 1)
    assert reversed_.changed
    assert _balances(reversed_.account) == (1_000, 1_000, 0, 0)
    assert reversed_.fence is not None and reversed_.fence.status is FenceStatus.REVERSED
    assert cancel(
        reversed_.account, reversed_.fence, key=OWN_LEG, order_id="o1", now_ms=T0 + 2
    ) == Outcome(reversed_.account, reversed_.fence, False)
    with pytest.raises(HoldRefused):
        debit(reversed_.account, reversed_.fence, key=OWN_LEG, amount=300, order_id="o1",
              now_ms=T0 + 3)


def test_a_debit_over_a_hold_id_is_refused_and_a_debit_cannot_be_confirmed() -> None:
    held = _hold(_funded(1_000), amount=300)
    with pytest.raises(HoldRefused):
        debit(held.account, held.fence, key=H1, amount=300, order_id="o1", now_ms=T0)
    debited = debit(_funded(1_000), None, key=FenceKey.user("d1"), amount=300, order_id="o1", now_ms=T0)
    with pytest.raises(UnknownHold):
        confirm(debited.account, debited.fence, key=FenceKey.user("d1"), now_ms=T0)


# =========================================================================== examples: funding


def test_funding_adds_to_funded_and_available() -> None:
    assert _balances(fund(fund(ACCOUNT, 100), 50)) == (150, 150, 0, 0)


def test_funding_above_the_maximum_or_by_an_invalid_amount_is_refused() -> None:
    with pytest.raises(InvalidAmount):
        fund(fund(ACCOUNT, AMOUNT_MAX), 1)
    for amount in (0, -1, 1.5, True):
        with pytest.raises(InvalidAmount):
            fund(ACCOUNT, amount)  # type: ignore[arg-type]


def test_a_request_in_another_unit_is_a_currency_mismatch() -> None:
    check_unit_matches(ACCOUNT, "POINTS")
    with pytest.raises(CurrencyMismatch):
        check_unit_matches(ACCOUNT, "CNY")


def test_a_broken_account_fails_its_check_loudly() -> None:
    with pytest.raises(AssertionError):
        replace(_funded(100), available=99).check()
    with pytest.raises(AssertionError):
        VoucherAccount("a", "CNY", None, funded=0, available=-1, held=1).check()


# =========================================================================== the property

KEYS = (FenceKey.user("h1"), FenceKey.user("o1:2"), FenceKey.order_leg("o1", 2),
        FenceKey.refund_return("o1", 2))
"""Keys with equal owners in other scopes: the functions treat each as its own fence."""
ORDER_IDS = (None, "o1", "o2")
AMOUNTS = (1, 7, 40, 150, 600)

LEGAL_FENCE_MOVES: dict[FenceStatus | None, frozenset[FenceStatus]] = {
    None: frozenset(
        {FenceStatus.PENDING, FenceStatus.POSTED, FenceStatus.REFUSED, FenceStatus.EMPTY_ROLLBACK}
    ),
    FenceStatus.PENDING: frozenset(
        {FenceStatus.PENDING, FenceStatus.POSTED, FenceStatus.VOIDED, FenceStatus.EXPIRED}
    ),
    FenceStatus.POSTED: frozenset({FenceStatus.POSTED, FenceStatus.REVERSED}),
    **{status: frozenset({status}) for status in FINAL_FENCE_STATUSES},
}


class VoucherAccountMachine(RuleBasedStateMachine):
    """Any interleaving of Try / Confirm / Cancel / debit / expiry over a few ids, with
    duplicates, reorderings and time passing, keeps the account conserved and every fence
    moving only forward."""

    def __init__(self) -> None:
        super().__init__()
        self.now = T0
        self.account = ACCOUNT
        self.fences: dict[FenceKey, Fence] = {}
        self.cancelled: set[FenceKey] = set()
        """Ids a Cancel succeeded on: every later Try of them must be refused."""
        self.posted_times: dict[FenceKey, int] = {}

    @initialize(amount=st.integers(0, 800))
    def open_account(self, amount: int) -> None:
        if amount:
            self.account = fund(self.account, amount)

    # ----------------------------------------------------------------- driver

    def _apply(
        self,
        key: FenceKey,
        operation: Callable[[VoucherAccount, Fence | None], Outcome],
        refusals: tuple[type[PaymentError], ...],
    ) -> Outcome | PaymentError:
        account, fence = self.account, self.fences.get(key)
        snapshot = (self.account, dict(self.fences))
        try:
            out = operation(account, fence)
        except PaymentError as error:
            assert isinstance(error, refusals), f"unexpected {type(error).__name__}: {error}"
            # refused: the caller keeps its old values, and they are intact
            assert (self.account, self.fences) == snapshot
            assert (account, fence) == (snapshot[0], snapshot[1].get(key))
            with pytest.raises(type(error)):
                operation(account, fence)  # the same question gets the same answer
            return error
        assert out.changed == ((out.account, out.fence) != (account, fence))
        assert out.fence is not None
        assert (out.fence.key, out.fence.account_id) == (key, account.account_id)
        old_status = None if fence is None else fence.status
        assert out.fence.status in LEGAL_FENCE_MOVES[old_status], (
            f"{key}: {old_status} -> {out.fence.status}"
        )
        if fence is not None:
            assert (out.fence.kind, out.fence.amount) == (fence.kind, fence.amount)
            if out.fence.status is FenceStatus.REVERSED:
                assert out.fence.kind is FenceKind.DEBIT
        if out.fence.status is FenceStatus.POSTED and old_status is not FenceStatus.POSTED:
            self.posted_times[key] = self.posted_times.get(key, 0) + 1
            assert self.posted_times[key] == 1, f"{key} posted twice"
        # every successful operation is idempotent: again on its result changes nothing
        assert operation(out.account, out.fence) == Outcome(out.account, out.fence, False)
        self.account = out.account
        self.fences[key] = out.fence
        return out

    # ----------------------------------------------------------------- rules

    @rule(
        key=st.sampled_from(KEYS),
        amount=st.sampled_from(AMOUNTS),
        order_id=st.sampled_from(ORDER_IDS),
        ttl_ms=st.sampled_from((-1, 0, 1, 1_000, MINUTE, 30 * MINUTE)),
    )
    def try_(self, key: FenceKey, amount: int, order_id: str | None, ttl_ms: int) -> None:
        before = self.fences.get(key)
        available = self.account.available
        result = self._apply(
            key,
            lambda a, f: try_hold(
                a, f, key=key, amount=amount, order_id=order_id,
                expires_at_ms=self.now + ttl_ms, now_ms=self.now,
            ),
            (HoldRefused, InsufficientBalance, IdempotencyConflict),
        )
        if key in self.cancelled:
            assert isinstance(result, HoldRefused), "a Try after its Cancel was not refused"
        if before is None:
            if ttl_ms <= 0:
                assert isinstance(result, HoldRefused)
            elif amount > available:
                assert isinstance(result, InsufficientBalance)
            else:
                assert isinstance(result, Outcome)
                assert self.account.available == available - amount
                assert self.account.held == sum(
                    f.amount for f in self.fences.values() if f.status is FenceStatus.PENDING
                )
        elif before.status is FenceStatus.PENDING and before.expires_at_ms is not None and (
            before.expires_at_ms > self.now
        ):
            if before.amount != amount:
                assert isinstance(result, IdempotencyConflict)
            elif None not in (before.order_id, order_id) and before.order_id != order_id:
                assert isinstance(result, HoldRefused)
            else:
                assert isinstance(result, Outcome)
                assert self.account.available == available  # no money moved again
                assert result.fence is not None
                assert result.fence.order_id == (before.order_id or order_id)
                if order_id is None:  # the caller's retry: the same hold, expiry as first set
                    assert result.fence == before and not result.changed
                else:  # an order adopts it: the expiry moves out to the order's
                    assert result.fence.expires_at_ms == max(before.expires_at_ms,
                                                             self.now + ttl_ms)
        elif before.kind is FenceKind.HOLD and before.status is FenceStatus.POSTED:
            assert isinstance(result, Outcome if before.order_id == order_id else HoldRefused)
        else:
            assert isinstance(result, HoldRefused)

    @rule(key=st.sampled_from(KEYS))
    def confirm_(self, key: FenceKey) -> None:
        before = self.fences.get(key)
        held, spent = self.account.held, self.account.spent
        result = self._apply(
            key,
            lambda a, f: confirm(a, f, key=key, now_ms=self.now),
            (UnknownHold, HoldNotPending),
        )
        if before is None or before.kind is not FenceKind.HOLD:
            assert isinstance(result, UnknownHold)
        elif isinstance(result, Outcome):
            assert result.fence is not None and result.fence.status is FenceStatus.POSTED
            if before.status is FenceStatus.PENDING:
                assert (self.account.held, self.account.spent) == (
                    held - before.amount, spent + before.amount
                )
            else:
                assert not result.changed
        else:
            assert before.status is not FenceStatus.POSTED

    @rule(key=st.sampled_from(KEYS), order_id=st.sampled_from(ORDER_IDS))
    def cancel_(self, key: FenceKey, order_id: str | None) -> None:
        before = self.fences.get(key)
        result = self._apply(
            key,
            lambda a, f: cancel(a, f, key=key, order_id=order_id, now_ms=self.now),
            (HoldNotPending, HoldRefused),
        )
        if isinstance(result, Outcome):
            assert result.fence is not None and result.fence.status in FINAL_FENCE_STATUSES
            self.cancelled.add(key)
        elif isinstance(result, HoldNotPending):
            assert before is not None
            assert (before.kind, before.status) == (FenceKind.HOLD, FenceStatus.POSTED)
        else:  # another order's hold
            assert before is not None and before.status is FenceStatus.PENDING
            assert None not in (before.order_id, order_id) and before.order_id != order_id

    @rule(
        key=st.sampled_from(KEYS),
        amount=st.sampled_from(AMOUNTS),
        order_id=st.sampled_from(ORDER_IDS[1:]),
    )
    def debit_(self, key: FenceKey, amount: int, order_id: str) -> None:
        before = self.fences.get(key)
        available = self.account.available
        result = self._apply(
            key,
            lambda a, f: debit(
                a, f, key=key, amount=amount, order_id=order_id, now_ms=self.now
            ),
            (IdempotencyConflict, HoldRefused),
        )
        if before is None:
            assert isinstance(result, Outcome) and result.fence is not None
            expected = FenceStatus.REFUSED if amount > available else FenceStatus.POSTED
            assert result.fence.status is expected
        elif before.kind is not FenceKind.DEBIT:
            assert isinstance(result, HoldRefused)
        elif before.amount != amount:
            assert isinstance(result, IdempotencyConflict)
        elif before.status is FenceStatus.REVERSED:
            assert isinstance(result, HoldRefused)
        else:
            assert isinstance(result, Outcome) and not result.changed

    @rule(key=st.sampled_from(KEYS))
    def expire(self, key: FenceKey) -> None:
        before = self.fences.get(key)
        if before is None:
            return

        def _expire(account: VoucherAccount, fence: Fence | None) -> Outcome:
            assert fence is not None
            return expire_if_due(account, fence, self.now)

        result = self._apply(key, _expire, ())
        assert isinstance(result, Outcome)
        due = before.expires_at_ms is not None and before.expires_at_ms <= self.now
        assert result.changed == (before.status is FenceStatus.PENDING and due)

    @rule(ms=st.sampled_from((1, 999, 1_000, MINUTE, 31 * MINUTE)))
    def time_passes(self, ms: int) -> None:
        self.now += ms

    @rule(amount=st.sampled_from(AMOUNTS))
    def top_up(self, amount: int) -> None:
        before = self.account
        self.account = fund(self.account, amount)
        assert self.account.available == before.available + amount

    # ----------------------------------------------------------------- invariants

    @invariant()
    def money_is_conserved(self) -> None:
        a = self.account
        a.check()
        assert a.funded == a.available + a.held + a.spent
        assert min(a.available, a.held, a.spent) >= 0

    @invariant()
    def spent_is_the_posted_fences_and_held_the_pending_ones(self) -> None:
        fences = self.fences.values()
        assert self.account.spent == sum(f.amount for f in fences if f.status is FenceStatus.POSTED)
        assert self.account.held == sum(f.amount for f in fences if f.status is FenceStatus.PENDING)
        assert all(f.kind is FenceKind.HOLD for f in fences if f.status is FenceStatus.PENDING)


VoucherAccountMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=40, deadline=None
)
test_any_interleaving_of_voucher_operations_conserves_money_and_honours_the_fences = (
    VoucherAccountMachine.TestCase
)


def test_an_order_adopting_a_pre_hold_that_does_not_exist_is_refused_not_given_a_new_hold() -> None:
    account = fund(ACCOUNT, 100)
    with pytest.raises(UnknownHold):
        try_hold(account, None, key=FenceKey.user("never-placed"), amount=20, order_id="o1",
                 expires_at_ms=T0 + 1_000, now_ms=T0, adopt_only=True)
