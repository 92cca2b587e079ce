"""The voucher account actor: one per account with work to do.

It serialises every operation on one account (Try, Confirm, Cancel, debit, expiry, top-up),
applies the pure TCC functions of ``engine.voucher``, commits balances and fence rows in one
transaction, and only then answers: a ``VoucherReply`` told to the order, or the asker's
reply. Pending holds are kept in memory; other fences are read from SQLite when a key comes
again. Fences are addressed by ``FenceKey``: the caller's pre-holds (``PreHold``,
``ReleaseHold``) only ever reach scope ``user``; an order's commands carry the key the order
chose (its own leg, its refund's return, or the user's hold a pre-held leg adopts).
After ``account_idle_ms`` without messages the actor stops; its expiry timer restarts it
when a hold falls due.
"""

from __future__ import annotations

import heapq
import itertools
import sqlite3
from dataclasses import replace
from typing import Any

from payengine.actors.base import ActorBehaviour, Context
from payengine.actors.directory import Key
from payengine.actors.messages import (
    AccountView,
    ExpireDue,
    FromOrder,
    Fund,
    HoldView,
    IdleCheck,
    PreHold,
    ReleaseHold,
    SetAccountStatus,
)
from payengine.engine import voucher
from payengine.engine.errors import (
    EngineClosed,
    HoldRefused,
    IdempotencyConflict,
    InvalidRequest,
    Overloaded,
    PaymentError,
    UnknownAccount,
    UnknownHold,
)
from payengine.engine.order import (
    CancelHold,
    ClawBack,
    ConfirmHold,
    CreditVoucher,
    DebitVoucher,
    ReturnVoucher,
    Transition,
    TryHold,
    VoucherOp,
    VoucherReply,
)
from payengine.engine.voucher import (
    Fence,
    FenceKey,
    FenceScope,
    FenceStatus,
    Outcome,
    VoucherAccount,
)

_OPS = {TryHold: VoucherOp.TRY, ConfirmHold: VoucherOp.CONFIRM, CancelHold: VoucherOp.CANCEL,
        DebitVoucher: VoucherOp.DEBIT, ReturnVoucher: VoucherOp.RETURN,
        CreditVoucher: VoucherOp.CREDIT, ClawBack: VoucherOp.CLAWBACK}


class AccountBehaviour(ActorBehaviour):
    def __init__(self, key: Key, ctx: Context) -> None:
        super().__init__(key, ctx)
        self.account: VoucherAccount | None = None
        self.pending: dict[FenceKey, Fence] = {}
        self.expiries: list[tuple[int, int, FenceKey]] = []
        """A heap of the pending fences' expiries, ``(expires_at_ms, seq, key)``; an entry
        whose fence left ``pending`` or moved its expiry is stale and skipped. Every message
        looks at the next expiry: scanning (and sorting) ``pending`` instead cost O(holds)
        per message, with thousands of holds on one account when 100,000 orders are open."""
        self._expiry_seq = itertools.count()
        self.activity = 0
        self.idle_timer_armed = False
        self.expiry_armed_at: int | None = None

    def load(self) -> None:
        self.account = self.ctx.store.load_account(self.key[1])
        if self.account is not None:
            self.pending = {f.key: f for f in self.ctx.store.pending_holds(self.key[1])}
            self._reindex_expiries()

    def idle(self) -> bool:
        return self.account is None

    def handle(self, message: Any) -> Any:
        if self.account is None:
            raise UnknownAccount(f"no voucher account {self.key[1]}")
        if isinstance(message, IdleCheck):
            self._idle_check(message.token)
            return None
        self.activity += 1
        self._arm_idle()
        try:
            return self._dispatch(message)
        finally:
            self._expire_due()
            self._arm_expiry()

    def _dispatch(self, message: Any) -> Any:
        match message:
            case FromOrder():
                self._from_order(message)
                return None
            case Fund():
                return self._fund(message)
            case PreHold():
                return self._pre_hold(message)
            case ReleaseHold():
                return self._release(message.hold_id)
            case SetAccountStatus():
                return self._set_status(message.status)
            case ExpireDue():
                return None
        raise InvalidRequest(f"an account cannot handle {type(message).__name__}")

    # ------------------------------------------------------------------ operations

    def _fence(self, key: FenceKey) -> Fence | None:
        fence = self.pending.get(key)
        if fence is None:
            fence = self.ctx.store.load_fence(self.key[1], key)
        return fence

    def _from_order(self, command: FromOrder) -> None:
        effect = command.effect
        op = _OPS[type(effect)]
        ok, reason = True, op.value
        try:
            outcome = self._apply(command.order_id, effect)
            # A refused fence fails a debit (the balance fell short); a Cancel that finds
            # one refused has nothing to release, which is the success it asked for.
            if (isinstance(effect, DebitVoucher | ClawBack) and outcome.fence is not None
                    and outcome.fence.status is FenceStatus.REFUSED):
                ok, reason = False, "insufficient balance at debit"
            self._commit(outcome, f"{op.value} for order {command.order_id}")
        except (EngineClosed, Overloaded):
            raise  # a crash, a shutdown or a busy database is not the account's answer:
            # no reply, and the order's voucher retry asks again
        except PaymentError as error:
            ok, reason = False, f"{error.code}: {error.message}"
        self.ctx.voucher_link.reply(command.order_id,
                                    VoucherReply(effect.leg_no, effect.fence, op, ok, reason))

    def _apply(self, order_id: str, effect: Any) -> Outcome:
        account = self.account
        assert account is not None
        now_ms = self.ctx.runtime.now_ms()
        key: FenceKey = effect.fence
        _assert_order_may_name(order_id, effect)
        fence = self._fence(key)
        match effect:
            case TryHold():
                return voucher.try_hold(account, fence, key=key,
                                        amount=effect.amount, order_id=order_id,
                                        expires_at_ms=effect.expires_at_ms, now_ms=now_ms,
                                        adopt_only=effect.adopt_only)
            case ConfirmHold():
                if fence is not None and fence.order_id not in (None, order_id):
                    raise UnknownHold(f"hold {key} belongs to another order")
                if fence is not None and fence.status is FenceStatus.PENDING and (
                    fence.expires_at_ms is not None and fence.expires_at_ms <= now_ms
                ) and self._defer_if_confirm_owed(fence, now_ms):
                    # due, not yet expired, and its order owes this Confirm: it is kept
                    assert self.account is not None
                    account, fence = self.account, self.pending[fence.key]
                if ("confirm-twice" in self.ctx.config.planted_bugs and fence is not None
                        and fence.status is FenceStatus.POSTED):
                    posted_again = replace(account, available=account.available - fence.amount,
                                           spent=account.spent + fence.amount)
                    return Outcome(posted_again, replace(fence, updated_at_ms=now_ms + 1), True)
                return voucher.confirm(account, fence, key=key, now_ms=now_ms,
                                       amount=effect.amount)
            case CancelHold():
                if fence is not None and fence.order_id not in (None, order_id):
                    # The order named a pre-hold another order adopted: its Try was refused,
                    # so it has nothing here to release.
                    return Outcome(account, fence, False)
                return voucher.cancel(account, fence, key=key, order_id=order_id,
                                      now_ms=now_ms)
            case DebitVoucher():
                return voucher.debit(account, fence, key=key, amount=effect.amount,
                                     order_id=order_id, now_ms=now_ms)
            case ReturnVoucher():
                return voucher.give_back(account, fence, key=key, amount=effect.amount,
                                         order_id=order_id, now_ms=now_ms)
            case CreditVoucher():
                return voucher.credit(account, fence, key=key, amount=effect.amount,
                                      order_id=order_id, now_ms=now_ms)
            case ClawBack() if effect.undo:
                return voucher.cancel(account, fence, key=key, order_id=order_id, now_ms=now_ms)
            case ClawBack():
                return voucher.debit(account, fence, key=key, amount=effect.amount,
                                     order_id=order_id, now_ms=now_ms)
        raise AssertionError(f"not a voucher effect: {effect!r}")

    def _fund(self, command: Fund) -> AccountView:
        assert self.account is not None
        previous = self.ctx.store.funding_amount(command.funding_id)
        if previous is not None:
            if previous != (self.account.account_id, command.amount):
                raise IdempotencyConflict(
                    f"funding {command.funding_id} was {previous[1]} to {previous[0]}")
            return AccountView.of(self.account)
        after = voucher.fund(self.account, command.amount)
        now_ms = self.ctx.runtime.now_ms()
        try:
            self.ctx.store.save_account(
                self.account, after, [], [Transition("balance", str(self.account.funded),
                                                     str(after.funded),
                                                     f"fund {command.funding_id}")],
                now_ms, funding=(command.funding_id, command.amount))
        except sqlite3.IntegrityError:  # the same funding id, raced on another account
            raise IdempotencyConflict(
                f"funding {command.funding_id} was used for another account") from None
        self.account = after
        return AccountView.of(after)

    def _set_status(self, status: str) -> str:
        """Freeze, unfreeze or close: persisted, then taken; returns the previous status.
        On the account's own thread, so no operation of it sees half a change."""
        before = self.account
        assert before is not None
        after = voucher.set_status(before, status)
        if after != before:
            self.ctx.store.set_account_status(before, after, self.ctx.runtime.now_ms())
            self.account = after
        return before.status.value

    def _pre_hold(self, command: PreHold) -> HoldView:
        assert self.account is not None
        key = FenceKey.user(command.hold_id)
        outcome = voucher.try_hold(
            self.account, self._fence(key), key=key, amount=command.amount, order_id=None,
            expires_at_ms=command.expires_at_ms, now_ms=self.ctx.runtime.now_ms())
        self._commit(outcome, "pre-hold")
        assert outcome.fence is not None
        return HoldView.of(outcome.fence)

    def _release(self, hold_id: str) -> HoldView:
        assert self.account is not None
        key = FenceKey.user(hold_id)
        fence = self._fence(key)
        # No hold yet (the untick overtook the tick): voucher.cancel records an empty
        # rollback, so the late pre-hold with this id is refused instead of locking points.
        if fence is not None and fence.order_id is not None:
            raise HoldRefused(f"hold {hold_id} belongs to order {fence.order_id}; close the order")
        outcome = voucher.cancel(self.account, fence, key=key, order_id=None,
                                 now_ms=self.ctx.runtime.now_ms())
        self._commit(outcome, "released by the user")
        assert outcome.fence is not None
        return HoldView.of(outcome.fence)

    def _commit(self, outcome: Outcome, cause: str) -> None:
        """Persist an outcome (if it changed anything), then take it as the actor's state."""
        if not outcome.changed:
            return
        before = self.account
        assert before is not None and outcome.fence is not None
        old = self.pending.get(outcome.fence.key)  # only pending fences change status
        transition = Transition(outcome.fence.key.journal_part,
                                "" if old is None else old.status.value,
                                outcome.fence.status.value, cause)
        self.ctx.store.save_account(before, outcome.account, [outcome.fence], [transition],
                                    self.ctx.runtime.now_ms())
        self.account = outcome.account
        if outcome.fence.status is FenceStatus.EXPIRED and self.ctx.notifications is not None:
            self.ctx.notifications.kick()  # the expiry is an outbox event: deliver it
        fence = outcome.fence
        if fence.status is FenceStatus.PENDING:
            self.pending[fence.key] = fence
            self._index_expiry(fence)
        else:
            self.pending.pop(fence.key, None)
        self.log.info("transition", account_id=self.key[1], part=transition.entity,
                      from_state=transition.from_state, to_state=transition.to_state,
                      cause=cause)

    # ------------------------------------------------------------------ expiry and idling

    def _expire_due(self) -> None:
        if "holds-never-expire" in self.ctx.config.planted_bugs:
            return  # the planted bug: a due hold stays pending, its vouchers locked
        now_ms = self.ctx.runtime.now_ms()
        while (fence := self._next_to_expire()) is not None:
            assert self.account is not None and fence.expires_at_ms is not None
            if fence.expires_at_ms > now_ms:
                break
            if self._defer_if_confirm_owed(fence, now_ms):
                continue
            outcome = voucher.expire_if_due(self.account, fence, now_ms)
            if not outcome.changed:
                break
            self._commit(outcome, "expired")

    def _defer_if_confirm_owed(self, fence: Fence, now_ms: int) -> bool:
        """A due hold whose order decided to confirm it and has not heard back does not
        expire (R-TCC: the Confirm must succeed once the Try did; the order's sentinel goes on
        sending it): its expiry moves out by ``hold_grace_ms``, journalled. True if deferred."""
        assert self.account is not None
        if fence.order_id is None or not self.ctx.store.confirm_owed(fence):
            return False
        outcome = voucher.defer_expiry(self.account, fence,
                                       now_ms + self.ctx.policy.hold_grace_ms, now_ms)
        self._commit(outcome, f"expiry deferred: order {fence.order_id} owes its Confirm")
        return outcome.changed

    def _index_expiry(self, fence: Fence) -> None:
        if fence.expires_at_ms is not None:
            heapq.heappush(self.expiries, (fence.expires_at_ms, next(self._expiry_seq), fence.key))
            if len(self.expiries) > 2 * len(self.pending) + 64:  # stale entries: amortised O(1)
                self._reindex_expiries()

    def _reindex_expiries(self) -> None:
        seq = self._expiry_seq
        self.expiries = [(f.expires_at_ms, next(seq), f.key) for f in self.pending.values()
                         if f.expires_at_ms is not None]
        heapq.heapify(self.expiries)

    def _next_to_expire(self) -> Fence | None:
        """The pending fence with the earliest expiry; stale heap entries are dropped."""
        expiries = self.expiries
        while expiries:
            due, _, key = expiries[0]
            fence = self.pending.get(key)
            if fence is not None and fence.expires_at_ms == due:
                return fence
            heapq.heappop(expiries)
        return None

    def _arm_expiry(self) -> None:
        next_fence = self._next_to_expire()
        due = None if next_fence is None else next_fence.expires_at_ms
        if due is not None and due != self.expiry_armed_at:
            self.expiry_armed_at = due
            self.tell_later(due, ExpireDue())

    def _arm_idle(self) -> None:
        if not self.idle_timer_armed:
            self.idle_timer_armed = True
            self.tell_later(self.ctx.runtime.now_ms() + self.ctx.config.account_idle_ms,
                            IdleCheck(self.activity))

    def _idle_check(self, token: int) -> None:
        self.idle_timer_armed = False
        if token == self.activity:
            self.try_release()
        else:
            self._arm_idle()


def _assert_order_may_name(order_id: str, effect: Any) -> None:
    """An order's command names its own leg's fence, its refund's return, or (adopting,
    confirming or releasing it) the user's pre-hold its leg named. The core builds these
    keys, so anything else is a bug there, never a caller's input."""
    key: FenceKey = effect.fence
    if isinstance(effect, ReturnVoucher | ClawBack):
        assert key.scope is FenceScope.REFUND, f"a return or clawback under {key!r}"
    elif key.scope is FenceScope.ORDER:
        assert key.owner == order_id, f"order {order_id} names {key!r}"
    else:
        assert key.scope is FenceScope.USER and not isinstance(effect, DebitVoucher) and (
            not isinstance(effect, TryHold) or effect.adopt_only), (
            f"order {order_id} sends {type(effect).__name__} for {key!r}")
