"""The double-entry ledger, derived from what an order decision changed.

Money moves payer -> payment-gateway transit -> merchant pending settlement (R-DUP): a
charge lands in transit; it reaches the merchant only when the order succeeded; money for
an order that did not (a success after the close, a second charge, a reversed debit) goes
back out of transit and never touches the merchant. Refunds take from the merchant.

Every posting is a balanced set of entries (they sum to zero), so the sum of all balances
is always zero. Postings are pure functions of (old order, new order, transitions): the
shell writes them in the transaction that writes the order, so the ledger can never lag or
lead the orders. Amounts are in the order's minor units (vouchers at their value).

Accounts::

    payer:<channel>            cash paid in (negative) and given back (positive)
    vouchers:<account_id>      voucher value spent (negative) and given back
    transit                    the gateway's transit account: zero for a settled order
    merchant:<merchant_id>     the merchant's pending settlement
    fees:<channel>             the channel's fee, taken from the merchant's share

A recharge or transfer (an order with a ``LegMode.CREDIT`` leg) settles to its beneficiary
instead: ``transit`` -> ``vouchers:<credited account>`` (the fee, if any, still from the
merchant's share). A recharge's refund takes the value back from that account to the
merchant (the clawback) before the merchant's cash goes back to the payer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from payengine.engine.order import (
    Leg,
    LegMode,
    LegStatus,
    OrderState,
    PartStatus,
    PaymentOrder,
    RefundKind,
    Transition,
)

TRANSIT = "transit"
IN_TRANSIT = frozenset({LegStatus.PAID, LegStatus.CONFIRMED, LegStatus.DEBITED})
"""Leg statuses whose money has arrived (in transit, or at the merchant once succeeded)."""


@dataclass(frozen=True, slots=True)
class Entry:
    account: str
    amount_minor: int
    """Signed: what the account receives (positive) or gives (negative)."""


@dataclass(frozen=True, slots=True)
class Posting:
    """One balanced movement of money, with why."""

    memo: str
    entries: tuple[Entry, ...]

    def __post_init__(self) -> None:
        assert sum(e.amount_minor for e in self.entries) == 0, f"unbalanced posting {self}"
        assert all(e.amount_minor != 0 for e in self.entries), f"empty entry in {self}"


def _move(memo: str, source: str, target: str, amount: int) -> Posting:
    return Posting(memo, (Entry(source, -amount), Entry(target, amount)))


def fee_of(amount_minor: int, fee_ppm: int) -> int:
    """The channel's fee on ``amount_minor`` at ``fee_ppm`` parts per million, half up."""
    return (amount_minor * fee_ppm + 500_000) // 1_000_000


def _source(leg: Leg) -> str:
    return f"payer:{leg.channel}" if leg.is_cash else f"vouchers:{leg.account_id}"


def _beneficiary(order: PaymentOrder) -> str | None:
    for leg in order.legs:
        if leg.mode is LegMode.CREDIT:
            return f"vouchers:{leg.account_id}"
    return None


def _settle(order: PaymentOrder, leg: Leg, fee_ppm: Mapping[str, int]) -> Posting:
    merchant = f"merchant:{order.merchant_id}"
    fee = fee_of(leg.value_minor, fee_ppm.get(leg.channel or "", 0)) if leg.is_cash else 0
    beneficiary = _beneficiary(order)
    if beneficiary is not None:  # a recharge or transfer: the value is the account's
        entries = [Entry(TRANSIT, -leg.value_minor), Entry(beneficiary, leg.value_minor)]
        if fee:
            entries += [Entry(merchant, -fee), Entry(f"fees:{leg.channel}", fee)]
        return Posting(f"leg {leg.leg_no} credited to {beneficiary}", tuple(entries))
    entries = [Entry(TRANSIT, -leg.value_minor), Entry(merchant, leg.value_minor - fee)]
    if fee:
        entries.append(Entry(f"fees:{leg.channel}", fee))
    return Posting(f"leg {leg.leg_no} settled to the merchant", tuple(entries))


def postings_for(old: PaymentOrder, new: PaymentOrder, transitions: Sequence[Transition], *,
                 fee_ppm: Mapping[str, int] | None = None) -> tuple[Posting, ...]:
    """The postings one decision makes: what arrived, what was settled, what went back."""
    fees = fee_ppm or {}
    out: list[Posting] = []
    succeeded_now = any(t.entity == "order" and t.to_state == OrderState.SUCCEEDED.value
                        for t in transitions)
    for t in transitions:
        if t.entity.startswith("leg:"):
            out += _leg_postings(new, new.leg(int(t.entity[4:])), t, fees)
        elif t.entity.startswith("refund:"):
            out += _refund_postings(new, t)
    if succeeded_now:
        moved = {int(t.entity[4:]) for t in transitions if t.entity.startswith("leg:")}
        out += [_settle(new, leg, fees) for leg in new.legs
                if leg.status in IN_TRANSIT and leg.leg_no not in moved]
    return tuple(out)


def _leg_postings(order: PaymentOrder, leg: Leg, t: Transition,
                  fees: Mapping[str, int]) -> list[Posting]:
    """A leg's money arrives in transit, or leaves it to go back where it came from.

    A debit being reversed leaves transit when the reversal is decided, and only if the
    debit was known done: a debit whose answer never came is reversed blind (the account
    voids it or records an empty rollback), and the books never counted it in.
    """
    status = LegStatus(t.to_state)
    out: list[Posting] = []
    if status in IN_TRANSIT:
        out.append(_move(f"leg {leg.leg_no} {status.value}", _source(leg), TRANSIT,
                         leg.value_minor))
        if order.state is OrderState.SUCCEEDED:
            out.append(_settle(order, leg, fees))
    elif status is LegStatus.REFUNDED or (
        status is LegStatus.REVERSING and t.from_state == LegStatus.DEBITED.value
    ):
        out.append(_move(f"leg {leg.leg_no} {status.value}", TRANSIT, _source(leg),
                         leg.value_minor))
    return out


def _refund_postings(order: PaymentOrder, t: Transition) -> list[Posting]:
    refund_id, _, leg_text = t.entity[len("refund:"):].partition(":")
    refund = order.refund(refund_id=refund_id)
    assert refund is not None, t
    if refund.kind is RefundKind.DUPLICATE_CHARGE:
        cash = order.cash_leg
        assert cash is not None
        payer = f"payer:{refund.channel or cash.channel}"  # a left route's late charge: its own
        if not leg_text and t.from_state == "":
            return [_move(f"second charge {refund.refund_no}", payer, TRANSIT,
                          refund.amount_minor)]
        if leg_text and t.to_state == PartStatus.DONE.value:
            return [_move(f"second charge {refund.refund_no} refunded", TRANSIT, payer,
                          refund.amount_minor)]
        return []
    if not leg_text:
        return []
    part = refund.part(int(leg_text))
    assert part is not None
    leg = order.leg(part.leg_no)
    if not leg.pays:  # a recharge's clawback: taken from the account, or given back
        merchant, account = f"merchant:{order.merchant_id}", f"vouchers:{leg.account_id}"
        if t.to_state == PartStatus.DONE.value:
            return [_move(f"refund {refund.refund_no} clawback", account, merchant, part.amount)]
        if t.to_state == PartStatus.REVERSED.value:
            return [_move(f"refund {refund.refund_no} clawback undone", merchant, account,
                          part.amount)]
        return []
    if t.to_state != PartStatus.DONE.value:
        return []
    return [_move(f"refund {refund.refund_no} leg {leg.leg_no}", f"merchant:{order.merchant_id}",
                  _source(leg), part.value_minor)]
