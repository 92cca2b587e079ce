"""Property tests of the pure core for recharges and transfers: any interleaving of the
wallet's answers, closes, refunds, lost or repeated voucher replies, retries and restarts.

The beneficiary account is the real ``engine.voucher`` core (fences make every command
idempotent); the ledger is ``engine.ledger.postings_for`` of every decision. Whatever
happens, once everything is answered: the account is credited exactly once iff the order
succeeded, never before the payer's side was paid, the ledger gives the account what it
kept, and a transfer's source spends exactly what its target receives.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace

from hypothesis import event as hypothesis_event
from hypothesis import given, settings
from hypothesis import strategies as st

from payengine.engine import voucher as vo
from payengine.engine.codes import ResultKind
from payengine.engine.errors import IllegalTransition, PaymentError
from payengine.engine.ledger import postings_for
from payengine.engine.order import (
    AccountUnit,
    Activate,
    CancelHold,
    CashPart,
    CashResult,
    ClawBack,
    CloseCause,
    CloseOrder,
    ConfirmHold,
    CreditVoucher,
    Effect,
    LegMode,
    LegStatus,
    OrderEvent,
    OrderPolicy,
    OrderState,
    PartStatus,
    PaymentOrder,
    PaymentRequest,
    RefundCash,
    RefundResult,
    RequestRefund,
    ResultSource,
    TimerFired,
    TimerKind,
    TryHold,
    VoucherOp,
    VoucherPart,
    VoucherReply,
    build_order,
    decide,
)
from payengine.engine.voucher import FenceKind, FenceScope, FenceStatus

POLICY = OrderPolicy()
T0 = 1_700_000_000_000
AMOUNT = 10_000
ACCOUNTS = {"src": AccountUnit("CNY", None), "dst": AccountUnit("CNY", None)}
OPS = {TryHold: VoucherOp.TRY, ConfirmHold: VoucherOp.CONFIRM, CancelHold: VoucherOp.CANCEL,
       CreditVoucher: VoucherOp.CREDIT, ClawBack: VoucherOp.CLAWBACK}


def recharge() -> PaymentOrder:
    request = PaymentRequest("m1", "top-1", "u1", "CNY", AMOUNT, "top-up",
                             CashPart(AMOUNT, "wechat"), credit_account="dst")
    return build_order(request, order_id="o1", payment_serial="serial-o1", now_ms=T0,
                       accounts=ACCOUNTS, policy=POLICY)


def transfer() -> PaymentOrder:
    request = PaymentRequest("payengine:transfer", "t-1", "src", "CNY", AMOUNT, "transfer",
                             vouchers=(VoucherPart("src", AMOUNT),), credit_account="dst")
    return build_order(request, order_id="o1", payment_serial="serial-o1", now_ms=T0,
                       accounts=ACCOUNTS, policy=POLICY)


@dataclass
class World:
    """One order, its two accounts (the real voucher core), a lossy link and the books."""

    order: PaymentOrder
    now: int = T0
    accounts: dict[str, vo.VoucherAccount] = field(default_factory=lambda: {
        "src": vo.fund(vo.VoucherAccount("src", "CNY", None), 3 * AMOUNT),
        "dst": vo.VoucherAccount("dst", "CNY", None)})
    fences: dict[tuple[str, vo.FenceKey], vo.Fence] = field(default_factory=dict)
    replies: list[VoucherReply] = field(default_factory=list)
    refunds_in_flight: set[str] = field(default_factory=set)
    ledger: Counter[str] = field(default_factory=Counter)
    credited_unpaid: list[str] = field(default_factory=list)

    def feed(self, event: OrderEvent) -> None:
        try:
            decision = decide(self.order, event, now_ms=self.now, policy=POLICY)
        except (IllegalTransition, PaymentError):
            return  # refused: the order is untouched (decide raises before it builds)
        for posting in postings_for(self.order, decision.order, decision.transitions):
            for entry in posting.entries:
                self.ledger[entry.account] += entry.amount_minor
        self.order = replace(decision.order, pay_in_flight=False)  # pay answered at once
        for effect in decision.effects:
            self.carry_out(effect)

    def carry_out(self, effect: Effect) -> None:
        if isinstance(effect, CreditVoucher):
            cash = self.order.cash_leg
            paid_side = cash.status if cash is not None else self.order.legs[0].status
            if paid_side not in (LegStatus.PAID, LegStatus.HELD):
                self.credited_unpaid.append(paid_side.value)
        if isinstance(effect, RefundCash):
            self.refunds_in_flight.add(effect.refund_id)
        if type(effect) in OPS:
            self.replies.append(self.account_answers(effect))

    def account_answers(self, effect: Effect) -> VoucherReply:
        """The account applies the command at once (its reply may still be lost)."""
        assert isinstance(effect, TryHold | ConfirmHold | CancelHold | CreditVoucher | ClawBack)
        account = self.accounts[effect.account_id]
        key = (effect.account_id, effect.fence)
        fence = self.fences.get(key)
        ok, reason = True, "ok"
        try:
            match effect:
                case TryHold():
                    out = vo.try_hold(account, fence, key=effect.fence, amount=effect.amount,
                                      order_id="o1", expires_at_ms=effect.expires_at_ms,
                                      now_ms=self.now)
                case ConfirmHold():
                    out = vo.confirm(account, fence, key=effect.fence, now_ms=self.now)
                case CancelHold() | ClawBack(undo=True):
                    out = vo.cancel(account, fence, key=effect.fence, order_id="o1",
                                    now_ms=self.now)
                case CreditVoucher():
                    out = vo.credit(account, fence, key=effect.fence, amount=effect.amount,
                                    order_id="o1", now_ms=self.now)
                case ClawBack():
                    out = vo.debit(account, fence, key=effect.fence, amount=effect.amount,
                                   order_id="o1", now_ms=self.now)
            self.accounts[effect.account_id] = out.account
            if out.fence is not None:
                self.fences[key] = out.fence
                ok = out.fence.status is not FenceStatus.REFUSED
        except PaymentError as error:
            ok, reason = False, error.code
        return VoucherReply(effect.leg_no, effect.fence, OPS[type(effect)], ok, reason)

    # ---- the world's moves

    def deliver(self, keep: bool) -> None:
        if self.replies:
            reply = self.replies[0] if keep else self.replies.pop(0)
            self.feed(reply)

    def retry(self) -> None:
        due = self.order.next_voucher_retry_at_ms
        if due is not None:
            self.now = max(self.now, due)
            self.feed(TimerFired(TimerKind.VOUCHER_RETRY, self.order.voucher_attempt))

    def restart(self) -> None:
        self.replies.clear()  # what was in the mailbox died with the process
        self.feed(Activate())

    def refund_answer(self, kind: ResultKind) -> None:
        for refund_id in sorted(self.refunds_in_flight):
            self.feed(RefundResult(refund_id, kind, ResultSource.QUERY,
                                   "SUCCESS" if kind is ResultKind.SUCCESS else "REFUNDCLOSE"))
        self.refunds_in_flight.clear()

    def spend(self, amount: int) -> None:
        """The account's owner spends the credit elsewhere (a refund must then be refused)."""
        account = self.accounts["dst"]
        key = vo.FenceKey.order_leg(f"shop-{len(self.fences)}", 1)
        try:
            out = vo.debit(account, None, key=key, amount=amount, order_id="shop",
                           now_ms=self.now)
        except PaymentError:
            return  # frozen: nothing is spent
        self.accounts["dst"] = out.account

    def settle(self) -> None:
        """The faults stop: every reply arrives, retries fire, refunds are answered."""
        for _ in range(200):
            if self.order.is_settled and not self.replies:
                return
            cash = self.order.cash_leg
            if self.replies:
                self.deliver(keep=False)
            elif self.refunds_in_flight:
                self.refund_answer(ResultKind.SUCCESS)
            elif not self.order.is_terminal and self.order.next_voucher_retry_at_ms is None:
                self.now = max(self.now, self.order.close_at_ms)  # the user never paid
                self.feed(CloseOrder(CloseCause.TIMEOUT))
            elif cash is not None and cash.status is LegStatus.PAYING and self.order.is_terminal:
                self.feed(CashResult(ResultKind.FAILURE, ResultSource.CLOSE, "CLOSED"))
            else:
                self.retry()
        raise AssertionError(f"never settled: {self.order}")


MOVES = st.sampled_from([
    "pay", "pay", "fail", "close_user", "close_timeout", "deliver", "deliver", "deliver",
    "repeat", "drop", "retry", "restart", "refund", "refund_part", "refund_ok",
    "refund_refused", "spend", "freeze",
])


def play(world: World, move: str) -> None:
    world.now += 10
    match move:
        case "pay":
            world.feed(CashResult(ResultKind.SUCCESS, ResultSource.NOTIFICATION, "SUCCESS",
                                  "tx-1", AMOUNT))
        case "fail":
            world.feed(CashResult(ResultKind.FAILURE, ResultSource.QUERY, "PAYERROR"))
        case "close_user" | "close_timeout":
            cause = CloseCause.USER if move == "close_user" else CloseCause.TIMEOUT
            world.feed(CloseOrder(cause))
        case "deliver" | "repeat" | "drop":
            if move == "drop" and world.replies:
                world.replies.pop(0)
            else:
                world.deliver(keep=move == "repeat")
        case "retry":
            world.retry()
        case "restart":
            world.restart()
        case "refund" | "refund_part":
            amount = AMOUNT if move == "refund" else AMOUNT // 4
            world.feed(RequestRefund(f"rf-{len(world.order.refunds)}", amount))
        case "refund_ok":
            world.refund_answer(ResultKind.SUCCESS)
        case "refund_refused":
            world.refund_answer(ResultKind.FAILURE)
        case "spend":
            if world.accounts["dst"].available >= AMOUNT // 2:
                world.spend(AMOUNT // 2)
        case "freeze":
            world.accounts["dst"] = vo.set_status(world.accounts["dst"], "frozen")


def check_books(world: World) -> None:
    order = world.order
    credit = next(leg for leg in order.legs if leg.mode is LegMode.CREDIT)
    credit_fences = [f for (acct, _), f in world.fences.items()
                     if acct == "dst" and f.kind is FenceKind.CREDIT]
    credited = sum(f.amount for f in credit_fences)
    succeeded = order.state is OrderState.SUCCEEDED
    assert world.credited_unpaid == [], "credited before the payer's side was paid"
    assert len(credit_fences) <= 1 and credited == (AMOUNT if succeeded else 0), (
        order.state, credit.status, credited)
    assert credit.status is (LegStatus.CREDITED if succeeded else credit.status)
    clawed = sum(f.amount for (acct, key), f in world.fences.items()
                 if acct == "dst" and key.scope is FenceScope.REFUND
                 and f.status is FenceStatus.POSTED)
    assert world.ledger["vouchers:dst"] == credited - clawed
    assert sum(world.ledger.values()) == 0
    for_reconciliation = {LegStatus.REFUND_FAILED, LegStatus.REFUND_UNKNOWN, LegStatus.UNKNOWN}
    assert world.ledger["transit"] == 0 or any(
        leg.status in for_reconciliation for leg in order.legs)
    for refund in order.refunds:
        part = refund.part(credit.leg_no)
        assert part is not None
        if part.status is PartStatus.FAILED:  # refused: nothing went to the payer
            assert {p.status for p in refund.parts} <= {PartStatus.FAILED, PartStatus.NOT_SENT}
    for account in world.accounts.values():
        account.check()


@settings(max_examples=400, deadline=None)
@given(moves=st.lists(MOVES, max_size=40), paid_first=st.booleans())
def test_a_recharge_credits_its_account_once_iff_it_succeeded_whatever_the_interleaving(
        moves: list[str], paid_first: bool) -> None:
    world = World(recharge())
    world.feed(Activate())
    if paid_first:  # the refunds' races: clawback vs. spending, freezing, the channel
        play(world, "pay")
        world.settle()
    for move in moves:
        play(world, move)
    world.settle()
    hypothesis_event(f"recharge {world.order.state.value}, refunds "
                     f"{sorted(r.status.value for r in world.order.refunds)}")
    check_books(world)
    cash = world.order.cash_leg
    assert cash is not None
    if world.order.state is not OrderState.SUCCEEDED:  # the cash was never kept (a refund
        # the channel refused outright is for reconciliation, never the account's)
        assert cash.status in (LegStatus.UNPAID, LegStatus.REFUNDED, LegStatus.REFUND_FAILED,
                               LegStatus.UNKNOWN), cash.status


@settings(max_examples=300, deadline=None)
@given(moves=st.lists(MOVES, max_size=30))
def test_a_transfer_moves_all_or_nothing_and_conserves_the_total(moves: list[str]) -> None:
    world = World(transfer())
    world.feed(Activate())
    for move in moves:
        play(world, move)
    world.settle()
    hypothesis_event(f"transfer {world.order.state.value}")
    check_books(world)
    src, dst = world.accounts["src"], world.accounts["dst"]
    moved = AMOUNT if world.order.state is OrderState.SUCCEEDED else 0
    assert src.spent == moved and src.held == 0
    assert dst.funded == moved
    assert world.ledger["vouchers:src"] == -moved
    assert src.available + dst.funded + src.spent - moved == 3 * AMOUNT


def test_a_transfer_order_is_refused_a_refund_and_stays_as_it_was() -> None:
    world = World(transfer())
    world.feed(Activate())
    world.settle()
    assert world.order.state is OrderState.SUCCEEDED
    before = world.order
    try:
        decide(before, RequestRefund("rf", 100), now_ms=world.now, policy=POLICY)
    except IllegalTransition:
        pass
    else:
        raise AssertionError("a transfer was refunded")
