"""The shift report (班结): what one station took during one shift, from the ledger.

At the end of a shift the cashier hands over, and the settlement system needs the shift's
figures: orders by final state, money by payment method, refunds, discounts given, the
channels' fees and what the merchant keeps. Every money figure here comes from the ledger's
postings of the shift's orders (``engine.ledger``: the same postings the merchant is
settled from), not from the orders' requested amounts, so the report and the settlement
cannot disagree: a charge refunded after a close, a second charge given back, a refund that
is still under way are all where the ledger has them. Discounts and litres come from the
orders' sales (``PaymentOrder.sale``), counted for succeeded orders only.

Pure: the shell reads the shift's orders and their ledger balances and calls
``shift_report``. Amounts of different currencies are never added: each has its totals.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from payengine.engine.ledger import TRANSIT
from payengine.engine.order import LegMode, OrderState, PaymentOrder, RefundKind, RefundStatus


@dataclass(frozen=True, slots=True)
class ShiftTotals:
    """One currency's figures of a shift, in its minor units.

    ``collected_by_method``: what each method brought in, net of what went back (a refund,
    a late charge returned): ``cash:<channel>`` and ``voucher:<unit>`` (a red packet in CNY
    is ``voucher:CNY``, points ``voucher:POINTS``, at their value). ``merchant_net_minor`` is
    the merchant's share after fees and refunds; ``in_transit_minor`` is money not yet
    decided (zero once every order of the shift is settled)."""

    paid_orders: int = 0
    paid_minor: int = 0
    gross_minor: int = 0
    discount_minor: int = 0
    discounts_by_rule: dict[str, int] = field(default_factory=dict)
    collected_by_method: dict[str, int] = field(default_factory=dict)
    refunds: int = 0
    refunded_minor: int = 0
    fees_minor: int = 0
    merchant_net_minor: int = 0
    in_transit_minor: int = 0


@dataclass(frozen=True, slots=True)
class ShiftReport:
    station_id: str
    shift_id: str
    orders_by_state: dict[str, int]
    litres_ml_by_grade: dict[str, int]
    """Volume sold by grade, succeeded orders only."""
    totals: dict[str, ShiftTotals]
    """By currency."""

    @property
    def orders(self) -> int:
        return sum(self.orders_by_state.values())


def shift_report(station_id: str, shift_id: str,
                 orders: Iterable[tuple[PaymentOrder, Mapping[str, int]]], *,
                 planted_bugs: frozenset[str] = frozenset()) -> ShiftReport:
    """The report of ``orders``: the shift's, each with its ledger balances (``{ledger
    account: minor}`` in the order's currency; ``{}`` before its first posting).
    ``planted_bugs``: ``shift-counts-unpaid`` counts every order as paid (the simulator's
    oracle must see it)."""
    states: Counter[str] = Counter()
    litres: Counter[str] = Counter()
    by_currency: dict[str, _Totals] = {}
    for order, balances in orders:
        assert order.sale is not None and order.sale.sale.station_id == station_id and (
            order.sale.sale.shift_id == shift_id), f"order {order.order_id} is not of the shift"
        states[order.state.value] += 1
        totals = by_currency.setdefault(order.currency, _Totals())
        totals.add_ledger(order, balances)
        if order.state is OrderState.SUCCEEDED or "shift-counts-unpaid" in planted_bugs:
            line = order.sale.sale.line
            litres[line.grade] += line.volume_ml
            totals.add_sale(order)
    return ShiftReport(station_id, shift_id, dict(sorted(states.items())),
                       dict(sorted(litres.items())),
                       {currency: t.frozen() for currency, t in sorted(by_currency.items())})


class _Totals:
    """A currency's totals while they are summed."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.discounts: Counter[str] = Counter()
        self.methods: Counter[str] = Counter()

    def add_ledger(self, order: PaymentOrder, balances: Mapping[str, int]) -> None:
        units = {f"vouchers:{leg.account_id}": leg.unit for leg in order.legs
                 if leg.mode is not LegMode.CASH}
        for account, minor in balances.items():
            kind, _, name = account.partition(":")
            if kind == "payer":
                self.methods[f"cash:{name}"] -= minor  # paid in is negative there
            elif kind == "vouchers":
                self.methods[f"voucher:{units.get(account, name)}"] -= minor
            elif kind == "fees":
                self.counts["fees"] += minor
            elif kind == "merchant":
                self.counts["merchant_net"] += minor
            else:
                assert account == TRANSIT, f"unknown ledger account {account!r}"
                self.counts["in_transit"] += minor
        for refund in order.refunds:
            if refund.kind is RefundKind.MERCHANT and refund.status is not RefundStatus.FAILED:
                self.counts["refunds"] += 1
                self.counts["refunded"] += refund.amount_minor

    def add_sale(self, order: PaymentOrder) -> None:
        assert order.sale is not None
        self.counts["paid_orders"] += 1
        self.counts["paid"] += order.total_minor
        self.counts["gross"] += order.sale.sale.line.gross_minor
        for discount in order.sale.discounts:
            self.discounts[discount.rule_id] += discount.amount_minor
            self.counts["discount"] += discount.amount_minor

    def frozen(self) -> ShiftTotals:
        c = self.counts
        return ShiftTotals(
            paid_orders=c["paid_orders"], paid_minor=c["paid"], gross_minor=c["gross"],
            discount_minor=c["discount"], discounts_by_rule=dict(sorted(self.discounts.items())),
            collected_by_method={k: v for k, v in sorted(self.methods.items()) if v},
            refunds=c["refunds"], refunded_minor=c["refunded"], fees_minor=c["fees"],
            merchant_net_minor=c["merchant_net"], in_transit_minor=c["in_transit"])
