"""Situations some planted bugs need, made on purpose in every run instead of left to luck.

The random workload meets a planted bug's situation only by chance: a merchant refund that
asks for more than is left once the order succeeded, a next attempt sent while the first
may still succeed. A change anywhere in the workload reshuffles the scheduler, and a bug
caught by luck goes unseen. This workload makes each situation a few times in every run
with faults (``Simulation`` calls ``submitted`` for each first attempt it submitted), from a
stream of its own (``seed + 40``), so the rest of a seed's draws stay as they were:

- **refund twice whole** (``over-refund``): at four moments, up to two first attempts that
  succeeded by then (drawn among them) are each refunded whole
  (``ovr-whole``), then whole again under another number (``ovr-again``): the second must be
  refused (``RefundRefused``: nothing is left); taken, it is ``over-asking-refund-refused``.
- **pay again at once** (``two-attempts-succeed``): 1 to 30 ms after a first attempt's receipt
  the terminal submits the next attempt of the same trade, the same way: refused
  (``AttemptRefused``) while the first may still succeed; taken, the first must be
  ``failed`` or ``closed`` (``next-attempt-after-unpaid``), and the oracle's
  ``one-success-per-trade`` sees a first that succeeded all the same.

- **a late "processing"** (``regress-success``): at the same moments, up to two of those
  paid orders get a "processing" callback (``handle_callback``, as a delayed one arrives):
  it must change nothing.

- **a return into an outage** (``attention-misses-owed``): when a voucher system is down
  for longer than the voucher retry schedule (``voucher-faults``), two orders paid with its
  vouchers are refunded whole just after it went down: their returns end ``unknown``,
  owed follow-ups for the sentinel, which the attention queue must list.

Runs on the simulator's thread (the world's timers); asks the engine and waits, as a
merchant's back office does.
"""

from __future__ import annotations

import functools
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import replace

from payengine.actors.channel import ChannelReply
from payengine.actors.engine import Engine
from payengine.actors.messages import Receipt
from payengine.engine.errors import ActorBroken, IllegalTransition, PaymentError
from payengine.engine.order import LegMode, OrderState, PaymentRequest
from payengine.sim.oracle import Violation

CHOSEN_SHARE = 0.2
"""Share of first attempts paid again at once, until ``PAY_AGAIN_AT_ONCE_MAX``."""
REFUND_SWEEPS = 4
"""Moments in the workload (a quarter of its span apart, a pay window after) when orders
that succeeded by then are chosen to be refunded twice whole."""
STALE_PROCESSING_PER_SWEEP = 2
"""Orders that succeeded by then sent a late "processing" callback per sweep at most."""
REFUND_TWICE_PER_SWEEP = 2
"""Orders refunded twice whole per sweep at most: among those that succeeded, so a run whose
payments mostly fail has some too."""
OUTAGE_REFUNDS = 2
"""Orders refunded whole just after a voucher system's outage began, so their vouchers'
returns go into it: sent again until the schedule is over, then flagged ``unknown`` for the
sentinel while the outage lasts (``attention-misses-owed`` leaves such items out)."""
OUTAGE_REFUND_DELAY_MS = 50
"""How long after the outage's start they are refunded (their cash comes back first)."""
OUTAGE_REFUND_RETRY_MS = 100
"""Looks again this soon while the engine is down (while the outage is young enough)."""
CANDIDATES_MAX = 100_000
"""First attempts remembered as candidates for refunding twice (one per order)."""
PAY_AGAIN_AT_ONCE_MAX = 8
"""Trades paid again at once at most per run."""
REFUND_TRIES_MAX = 6
"""Looks at an order that may not have succeeded yet (or is confirming its vouchers, or the
engine is down), a second apart."""
REFUND_RETRY_MS = 1_000


class Deliberate:
    """The deliberate situations of one run. Not thread-safe: the simulator's thread."""

    def __init__(self, rng: random.Random, *, engine: Callable[[], Engine | None],
                 at: Callable[[int, Callable[[], None]], None], now_ms: Callable[[], int],
                 quiet: Callable[[], bool], pay_window_ms: int, counts: Counter[str],
                 violations: list[Violation], receipts: dict[tuple[str, int], Receipt]
                 ) -> None:
        self.rng = rng
        self.engine = engine
        self.at = at
        self.now_ms = now_ms
        self.quiet = quiet
        self.pay_window_ms = pay_window_ms
        self.counts = counts
        self.violations = violations
        self.receipts = receipts
        """The simulator's acknowledged submits: a next attempt taken joins them."""
        self.candidates: dict[str, int] = {}
        """First attempts of the workload (order id -> total), not yet refunded twice."""
        self.pay_agains_chosen = 0

    def submitted(self, request: PaymentRequest, receipt: Receipt) -> None:
        """A first attempt was acknowledged: maybe make it the subject of a situation."""
        if request.attempt != 1 or self.quiet():
            return
        if len(self.candidates) < CANDIDATES_MAX:
            self.candidates[receipt.order_id] = request.total_minor
        if self.pay_agains_chosen < PAY_AGAIN_AT_ONCE_MAX and self.rng.random() < CHOSEN_SHARE:
            self.pay_agains_chosen += 1
            due = self.now_ms() + self.rng.randint(1, 30)
            self.at(due, functools.partial(self._pay_again_at_once, request, receipt.order_id))

    def schedule(self, start_ms: int, span_ms: int) -> None:
        """The refund sweeps, over the workload's span (``Simulation._schedule_workload``)."""
        for k in range(1, REFUND_SWEEPS + 1):
            due = start_ms + span_ms * k // REFUND_SWEEPS + self.pay_window_ms + 500
            self.at(due, functools.partial(self._refund_sweep, 1))

    def _refund_sweep(self, tries: int) -> None:
        """Choose orders that succeeded by now and refund them twice whole."""
        engine = self.engine()
        if self.quiet():
            return
        if engine is None:  # down: the back office tries again a second later
            if tries < REFUND_TRIES_MAX:
                self.at(self.now_ms() + REFUND_RETRY_MS,
                        functools.partial(self._refund_sweep, tries + 1))
            return
        paid = [order_id for order_id in sorted(self.candidates)
                if engine.get_order(order_id).state == OrderState.SUCCEEDED.value]
        for order_id in self.rng.sample(paid, min(STALE_PROCESSING_PER_SWEEP, len(paid))):
            self._stale_processing(engine, order_id)
        chosen = [(order_id, self.candidates.pop(order_id)) for order_id in
                  self.rng.sample(paid, min(REFUND_TWICE_PER_SWEEP, len(paid)))]
        for order_id, total_minor in chosen:  # each refund runs the world meanwhile
            self._refund_twice(order_id, total_minor, 1)

    def into_outage(self, system: str, start_ms: int, latest_ms: int) -> None:
        """A voucher system (accounts ending ``system``) is unreachable from ``start_ms``:
        refund orders paid with its vouchers then (``OUTAGE_REFUNDS``), by ``latest_ms``
        (after it, their returns' retries would outlast the outage)."""
        self.at(start_ms + OUTAGE_REFUND_DELAY_MS,
                functools.partial(self._refund_into_outage, system, latest_ms))

    def _refund_into_outage(self, system: str, latest_ms: int) -> None:
        engine = self.engine()
        if self.quiet():
            return
        if engine is None:  # down: soon again, while the outage is young enough
            if self.now_ms() + OUTAGE_REFUND_RETRY_MS <= latest_ms:
                self.at(self.now_ms() + OUTAGE_REFUND_RETRY_MS,
                        functools.partial(self._refund_into_outage, system, latest_ms))
            else:
                self.counts["outage_refund_engine_down"] += 1
            return
        paid = []
        for order_id in sorted(self.candidates):
            view = engine.get_order(order_id)
            if view.state == OrderState.SUCCEEDED.value and any(
                (leg.account_id or "").endswith(system) for leg in view.legs
            ):
                paid.append(order_id)
        for order_id in self.rng.sample(paid, min(OUTAGE_REFUNDS, len(paid))):
            total_minor = self.candidates.pop(order_id)
            try:
                engine.refund(order_id, "ovr-outage", total_minor)
            except (PaymentError, ActorBroken) as error:
                self.counts[f"outage_refund_refused:{getattr(error, 'code', 'broken')}"] += 1
                continue
            self.counts["outage_refund"] += 1

    def _stale_processing(self, engine: Engine, order_id: str) -> None:
        """A late "processing" callback for a paid order (a delayed, reordered one): it
        agrees with nothing new and must change nothing (``regress-success`` moves the
        order back to paying, which the oracle's ``legal-transition`` sees)."""
        view = engine.get_order(order_id)
        cash = next((leg for leg in view.legs if leg.mode == LegMode.CASH.value), None)
        if cash is None or cash.channel is None:
            return
        self.counts["stale_processing"] += 1
        try:
            engine.handle_callback(cash.channel, view.payment_serial,
                                   ChannelReply("SUCCESS", "USERPAYING"), wait=False)
        except (PaymentError, ActorBroken) as error:  # quarantined: a violation of its own
            self.counts[f"stale_processing_refused:{getattr(error, 'code', 'broken')}"] += 1

    def _refund_twice(self, order_id: str, total_minor: int, tries: int) -> None:
        engine = self.engine()
        if self.quiet():
            return
        if engine is None:  # the engine is down: the back office tries again later
            self._again(order_id, total_minor, tries)
            return
        try:
            state = engine.get_order(order_id).state
        except PaymentError:
            return
        if state != OrderState.SUCCEEDED.value:  # refunded in the meantime, say
            self.counts["refund_twice_not_paid"] += 1
            return
        try:
            engine.refund(order_id, "ovr-whole", total_minor)
        except IllegalTransition:  # its vouchers still confirming: look again later
            self._again(order_id, total_minor, tries)
            return
        except (PaymentError, ActorBroken) as error:  # refunded in part already, say
            self.counts[f"refund_twice_whole_refused:{getattr(error, 'code', 'broken')}"] += 1
            return
        self.counts["refund_twice"] += 1
        try:
            engine.refund(order_id, "ovr-again", total_minor)
        except (PaymentError, ActorBroken) as error:
            self.counts[f"refund_twice_refused:{getattr(error, 'code', 'broken')}"] += 1
            return
        self.violations.append(Violation(
            "over-asking-refund-refused", f"order {order_id}",
            f"refunded whole ({total_minor}), then whole again under another number: taken"))

    def _again(self, order_id: str, total_minor: int, tries: int) -> None:
        if tries >= REFUND_TRIES_MAX:
            self.counts["refund_twice_not_ready"] += 1
        else:
            self.at(self.now_ms() + REFUND_RETRY_MS,
                    functools.partial(self._refund_twice, order_id, total_minor, tries + 1))

    def _pay_again_at_once(self, request: PaymentRequest, first_order_id: str) -> None:
        engine = self.engine()
        if engine is None or self.quiet():
            self.counts["pay_again_at_once_engine_down"] += engine is None
            return
        again = replace(request, attempt=request.attempt + 1)
        self.counts["pay_again_at_once"] += 1
        try:
            receipt = engine.submit(again)
        except (PaymentError, ActorBroken) as error:
            self.counts[f"pay_again_at_once_refused:{getattr(error, 'code', 'broken')}"] += 1
            return
        self.receipts.setdefault((again.merchant_order_no, again.attempt), receipt)
        # Taken: so the first had failed or closed, for good (both are final)
        first = engine.get_order(first_order_id).state
        if first not in (OrderState.FAILED.value, OrderState.CLOSED.value):
            self.violations.append(Violation(
                "next-attempt-after-unpaid", f"order {first_order_id}",
                f"attempt {again.attempt} of {again.merchant_order_no} was taken "
                f"({receipt.order_id}) while attempt {request.attempt} is {first}"))
