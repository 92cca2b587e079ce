"""Quoting terminals in the simulated world (issue 12): quotes across a time-of-day boundary.

A share of extra payments is made the way a pump's app makes them: ``Engine.quote`` for the
sale (95 at 7.89 a litre, a per-litre cut that runs until the first minute boundary after
the run's start, ``SIM_DISCOUNTS``), then, a while later, a submit of the quote's
combination. The while is drawn up to past the quote's lifetime, so submits land before the
boundary, after it (the cut has ended: the snapshot must still be charged) and after the
quote expired (refused). Its own random stream: the rest of a seed's workload is unchanged.

The checks: a submit inside the quote's lifetime with the combination's amounts is taken
(a ``QuoteRefused`` then is a violation, ``quote-honoured``); one at or after the expiry is
refused (``quote-expiry``); and every order made from a quote keeps the snapshot's total and
discounts (``quote-terms-kept``). The planted bug ``quote-price-drift`` (the engine prices
the quote anew at submit) is caught by the first check on the submits after the boundary.

The sales are booked to two shifts; at the end each shift's report (``Engine.shift_report``)
is checked against the orders (``shift-report-agrees``; planted bug ``shift-counts-unpaid``).
"""

from __future__ import annotations

import functools
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from payengine.engine.discounts import (
    DiscountRules,
    PriceCut,
    Quote,
    QuoteRefused,
    QuoteUse,
)
from payengine.engine.errors import DuplicateSuspected, IllegalTransition, PaymentError
from payengine.engine.fuel import FuelLine, FuelSale
from payengine.engine.order import (
    CashPart,
    OrderState,
    PaymentOrder,
    PaymentRequest,
    VoucherPart,
)
from payengine.engine.shift_report import ShiftTotals
from payengine.sim.oracle import Violation

if TYPE_CHECKING:
    from payengine.actors.engine import Engine

MERCHANT = "station-1"
STATION = "st-1"
SHIFTS = ("morning", "evening")
"""The shifts the pumps' sales are booked to (by pump, so both shifts have orders)."""
QUOTED_SHARE = 0.25
"""Extra quoted payments, as a share of the run's orders."""
QUOTE_TTL_MS = 60_000
SUBMIT_DELAY_MS_MAX = 75_000
"""Longest wait between a quote and its submit: past ``QUOTE_TTL_MS``, so some expire."""
EDIT_SHARE = 0.2
"""Quoted orders the user changes before paying (``Engine.change_order``)."""
EDITS_AT_ONCE = 3
"""The first quoted orders of a run changed at once, 1 to 30 ms after their submit, on
purpose (their own stream, ``seed + 42``): surely before they are paid, so every run
changes unpaid orders, whose previous one must be closed."""
POINTS, POINTS_VALUE_MINOR = 20, 200
"""Each quoted payment also spends 20 of the user's points (pre-deduct: held at once)."""
GRADE, UNIT_PRICE_MINOR, CUT_MINOR_PER_L = "95", 789, 30
_MS_PER_MINUTE, _UTC_OFFSET_MINUTES = 60_000, 480


def sim_discounts(start_ms: int) -> DiscountRules:
    """A cut that runs for the ten minutes up to the first minute boundary after
    ``start_ms`` (station time, UTC+8), so a run's quotes meet its end."""
    boundary = (start_ms // _MS_PER_MINUTE + 1 + _UTC_OFFSET_MINUTES) % 1_440
    return DiscountRules(
        price_cuts=(PriceCut("early-bird", CUT_MINOR_PER_L, frozenset({GRADE}),
                             from_minute=(boundary - 10) % 1_440,
                             to_minute=boundary or 1_440),),
        utc_offset_minutes=_UTC_OFFSET_MINUTES, quote_ttl_ms=QUOTE_TTL_MS)


@dataclass
class _Quoted:
    """One quoted payment: its quote, the submit made of it and what the engine said."""

    no: str
    customer: str
    replaces: _Quoted | None = None
    """The user's edit of that payment (``Engine.change_order``), made with a new quote."""
    quote: Quote | None = None
    submitted_at_ms: int | None = None
    order_id: str | None = None
    refused: str | None = None


class QuotingTerminals:
    """Makes the quoted payments and checks them. Called on the simulation's thread."""

    def __init__(self, rng: random.Random, *, seed: int, engine: Callable[[], Engine | None],
                 now_ms: Callable[[], int], at: Callable[[int, Callable[[], None]], None],
                 counts: dict[str, int], violations: list[Violation]) -> None:
        self._rng, self._seed, self._engine = rng, seed, engine
        self._now_ms, self._at = now_ms, at
        self._counts, self._violations = counts, violations
        self.quoted: list[_Quoted] = []
        self._on_purpose = random.Random(seed + 42)
        self._edited_at_once = 0

    def schedule(self, start_ms: int, span_ms: int, orders: int, customers: list[str]
                 ) -> None:
        """Draw the quoted payments: a quote within the workload's span, its submit later."""
        rng = self._rng
        for i in range(int(orders * QUOTED_SHARE)):
            quoted = _Quoted(f"q{self._seed}-{i:06d}", rng.choice(customers))
            self.quoted.append(quoted)
            at = start_ms + rng.randint(0, span_ms)
            amount = rng.randint(20, 300) * 100
            pump, delay = rng.randint(1, 12), rng.randint(0, SUBMIT_DELAY_MS_MAX)
            self._at(at, functools.partial(self._quote, quoted, amount, pump, at + delay))

    def _edit(self, previous: _Quoted, rng: random.Random | None = None,
              suffix: str = "-e") -> None:
        """The user changes pump and amount before paying: a new quote, and the order
        changed to it at once (``rng``: the stream it is drawn from, the terminals' own
        unless it is one made on purpose)."""
        rng = rng or self._rng
        edited = _Quoted(f"{previous.no}{suffix}", previous.customer, replaces=previous)
        self.quoted.append(edited)
        self._count("quote_edit")
        self._quote(edited, rng.randint(20, 300) * 100, rng.randint(1, 12), self._now_ms())

    def _quote(self, quoted: _Quoted, amount_minor: int, pump: int, submit_at_ms: int) -> None:
        engine = self._engine()
        if engine is None:  # the server is down: the app shows an error, no payment
            self._counts["quote_server_down"] = self._counts.get("quote_server_down", 0) + 1
            return
        sale = FuelSale(STATION, pump, 1, FuelLine.by_amount(GRADE, UNIT_PRICE_MINOR,
                                                             amount_minor),
                        shift_id=SHIFTS[pump % len(SHIFTS)])
        try:
            quoted.quote = engine.quote(MERCHANT, quoted.customer, sale)
        except PaymentError as error:
            self._counts[f"quote_refused:{error.code}"] = (
                self._counts.get(f"quote_refused:{error.code}", 0) + 1)
            return
        self._at(submit_at_ms, functools.partial(self._submit, quoted))

    def _submit(self, quoted: _Quoted, *, confirm_duplicate: bool = False) -> None:
        engine, quote = self._engine(), quoted.quote
        assert quote is not None
        if engine is None:
            return
        (combination, *_) = quote.combinations
        total = combination.total_minor
        request = PaymentRequest(MERCHANT, quoted.no, quoted.customer, "CNY", total,
                                 "95 fuel", CashPart(total - POINTS_VALUE_MINOR, "wechat"),
                                 (VoucherPart(f"{quoted.customer}/pts", POINTS),),
                                 quote=QuoteUse(quote.quote_id, combination.combination_id),
                                 confirm_duplicate=confirm_duplicate)
        quoted.submitted_at_ms = self._now_ms()
        previous = quoted.replaces
        try:
            if previous is not None and previous.order_id is not None:
                order_id = self._change(engine, previous.order_id, request)
            else:
                order_id = engine.submit(request).order_id
            if quoted.order_id is None:
                self._count("quoted_order")
            quoted.order_id, quoted.refused = order_id, None
            if previous is None:
                self._maybe_edit(quoted)
        except DuplicateSuspected:
            self._submit(quoted, confirm_duplicate=True)
        except PaymentError as error:
            quoted.refused = error.code
            expired = quoted.submitted_at_ms >= quote.expires_at_ms  # maybe pruned: unknown
            if isinstance(error, QuoteRefused) and not expired:
                self._violations.append(Violation(
                    "quote-honoured", f"merchant order {quoted.no}",
                    f"a submit with quote {quote.quote_id}'s own amounts was refused "
                    f"({error.code}): {error.message}"))

    def _maybe_edit(self, quoted: _Quoted) -> None:
        """Draw whether the user changes the order (``EDIT_SHARE``, 0 to 3 s later); the
        first ``EDITS_AT_ONCE`` of a run are changed at once instead, on purpose."""
        edit = self._rng.random() < EDIT_SHARE
        delay = self._rng.randint(0, 3_000) if edit else 0
        if self._edited_at_once < EDITS_AT_ONCE:
            self._edited_at_once += 1
            self._count("quote_edit_at_once")
            self._at(self._now_ms() + self._on_purpose.randint(1, 30),
                     functools.partial(self._edit, quoted, self._on_purpose, "-e0"))
        elif edit:
            self._at(self._now_ms() + delay, functools.partial(self._edit, quoted))

    def _change(self, engine: Engine, previous_id: str, request: PaymentRequest) -> str:
        """``Engine.change_order``; checked at once: the previous order is closed (or was
        paid, and the change refused), so its points are not locked any more."""
        try:
            order_id = engine.change_order(previous_id, request).order_id
        except IllegalTransition:
            self._count("quote_edit_refused_paid")
            if engine.get_order(previous_id).state not in ("succeeded", "deducting"):
                self._violations.append(Violation(
                    "change-closes-previous", f"order {previous_id}",
                    "a change was refused as if the order were paid; it is "
                    f"{engine.get_order(previous_id).state}"))
            raise
        state = engine.get_order(previous_id).state
        if state not in ("closed", "failed"):
            self._violations.append(Violation(
                "change-closes-previous", f"order {previous_id}",
                f"changed to {order_id}, yet still {state}, its holds locked"))
        return order_id

    def check(self, engine: Engine) -> list[Violation]:
        """After the run: expiry respected, every quoted order kept its snapshot's terms."""
        violations: list[Violation] = []
        for quoted in self.quoted:
            quote, at = quoted.quote, quoted.submitted_at_ms
            if quote is None or at is None:
                continue
            expired = at >= quote.expires_at_ms
            self._count("quote_submit_expired" if expired else "quote_submit_valid")
            if expired and quoted.order_id is not None:
                violations.append(Violation(
                    "quote-expiry", f"merchant order {quoted.no}",
                    f"taken at {at}, its quote expired at {quote.expires_at_ms}"))
            if quoted.order_id is None:
                continue
            order = engine.get_order(quoted.order_id)
            combination = quote.combinations[0]
            terms = order.sale
            if terms is None or order.total_minor != combination.total_minor or (
                    terms.discounts != combination.discounts) or terms.quote_id != quote.quote_id:
                violations.append(Violation(
                    "quote-terms-kept", f"order {quoted.order_id}",
                    f"total {order.total_minor} with {terms}, quoted "
                    f"{combination.total_minor} with {combination.discounts}"))
        return violations

    def check_shift_reports(self, engine: Engine, orders: list[PaymentOrder]
                            ) -> list[Violation]:
        """Each shift's report against the orders, counted here independently: orders by
        state, paid orders and amounts, refunds, litres; and the ledger's identity: what the
        methods collected is the merchant's, the fees' and transit's. After the quiet phase
        nothing of a shift is in transit."""
        violations: list[Violation] = []
        for shift in SHIFTS:
            report = engine.shift_report(STATION, shift)
            mine = [o for o in orders if o.sale is not None
                    and o.sale.sale.station_id == STATION and o.sale.sale.shift_id == shift]
            paid = [o for o in mine if o.state is OrderState.SUCCEEDED]
            expected = (Counter(o.state.value for o in mine), len(paid),
                        sum(o.total_minor for o in paid),
                        sum(o.refunded_minor for o in mine),
                        sum(o.sale.sale.line.volume_ml for o in paid if o.sale is not None))
            totals = report.totals.get("CNY", ShiftTotals())
            got = (Counter(report.orders_by_state), totals.paid_orders, totals.paid_minor,
                   totals.refunded_minor, sum(report.litres_ml_by_grade.values()))
            if got != expected:
                violations.append(Violation(
                    "shift-report-agrees", f"shift {shift}",
                    f"report (states, paid orders, paid, refunded, ml) {got}, orders say "
                    f"{expected}"))
            collected = sum(totals.collected_by_method.values())
            kept = totals.merchant_net_minor + totals.fees_minor + totals.in_transit_minor
            if collected != kept or totals.in_transit_minor != 0:
                violations.append(Violation(
                    "shift-report-agrees", f"shift {shift}",
                    f"collected {collected}, merchant + fees + transit {kept}, in transit "
                    f"{totals.in_transit_minor}"))
            self._counts[f"shift_orders:{shift}"] = report.orders
        return violations

    def _count(self, name: str) -> None:
        self._counts[name] = self._counts.get(name, 0) + 1
