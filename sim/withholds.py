"""Agreements and withholdings in the simulator (fault kind ``withhold``).

Customers sign agreements on one or both wallets; the merchant withholds from them at
random moments; wallets decline (balance too low), time out (and maybe charge later) and
lose the answers to closes; users revoke agreements in the wallet app, and the merchant
unsigns some, in the middle of it all. Everything is drawn from the stream
``random.Random(seed + 21)``, so a seed's other draws are what they were.

The oracle (``check``), from the wallets' ground truth and the engine's journal:

- a withholding's trade is charged at most once, over all its attempts;
- no attempt was created after its agreement's termination was committed;
- every attempt after the first was created after the one before it was known uncharged
  (its cash leg ``unpaid`` in the journal before the next attempt's order appears);
- a withholding the engine says succeeded has a succeeded attempt, and one it says
  failed has none.
"""

from __future__ import annotations

import functools
import random
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from payengine.actors.channel import AgreementStatus
from payengine.engine.errors import PaymentError
from payengine.engine.order import OrderState
from payengine.engine.withhold import WithholdState
from payengine.persistence import agreements as db
from payengine.persistence.store import Store
from payengine.sim.channel import ChannelFaults, SimulatedChannel
from payengine.sim.oracle import Violation

MERCHANT = "station-1"
WITHHOLDS_PER_ORDER = 0.3
"""Withholdings drawn per terminal order of the seed's workload."""
REVOKE_SHARE = 0.25
"""Chance per withholding that the user revokes one of their agreements around it."""
UNSIGN_SHARE = 0.05


WITHHOLD_CLOSE_LOSSES_MIN = 3
"""Closes of withholding pays whose answer each wallet loses, whatever the draws (no draw:
the streams stay as they were), so every run has a timed-out attempt whose close is not
answered yet, which no next attempt may overtake (``withhold-retry-after-timeout``)."""


class Withholds:
    """The withholding workload of one run; checks at the end (``check``)."""

    def __init__(self, rng: random.Random, seed: int, *, engine: Callable[[], Any],
                 wallets: Mapping[str, SimulatedChannel], at: Callable[[int, Callable[[], None]],
                                                                       None],
                 now_ms: Callable[[], int], counts: Counter[str],
                 quiet: Callable[[], bool]) -> None:
        self.rng = rng
        self.seed = seed
        self.engine = engine
        self.wallets = wallets
        self.at = at
        self.now_ms = now_ms
        self.counts = counts
        self.quiet = quiet
        self.signed: dict[str, list[str]] = {}
        """Customer -> agreement ids the engine gave them."""

    def faults(self, faults: ChannelFaults) -> ChannelFaults:
        """``faults`` with this run's withholding faults."""
        return replace(faults, withhold_declined=self.rng.uniform(0.1, 0.4),
                       withhold_timeout=self.rng.uniform(0.1, 0.4),
                       withhold_close_lost=self.rng.uniform(0.0, 0.5),
                       withhold_close_losses_min=WITHHOLD_CLOSE_LOSSES_MIN,
                       agreement_pending=0.3, agreement_refused=0.1)

    def setup(self, customers: list[str]) -> None:
        engine = self.engine()
        for customer in customers:
            wallets = sorted(self.wallets)
            chosen = wallets if self.rng.random() < 0.5 else [self.rng.choice(wallets)]
            for wallet in chosen:
                try:
                    agreement = engine.sign_agreement(customer, wallet)
                except PaymentError as error:
                    self.counts[f"sign_refused:{error.code}"] += 1
                    continue
                self.signed.setdefault(customer, []).append(agreement.agreement_id)
                self.counts[f"agreement_{agreement.state.value}"] += 1

    def schedule(self, start_ms: int, span_ms: int, orders: int) -> None:
        customers = sorted(self.signed)
        if not customers:
            return
        for i in range(max(1, int(orders * WITHHOLDS_PER_ORDER))):
            customer = self.rng.choice(customers)
            at = start_ms + self.rng.randint(0, span_ms)
            amount = self.rng.randint(5, 200) * 100
            self.at(at, functools.partial(self._withhold, i, customer, amount))
            if self.rng.random() < REVOKE_SHARE:
                agreement = self.rng.choice(self.signed[customer])
                self.at(at + self.rng.randint(0, 2_000),
                        functools.partial(self._revoke, agreement))
            if self.rng.random() < UNSIGN_SHARE:
                agreement = self.rng.choice(self.signed[customer])
                self.at(at + self.rng.randint(0, 2_000),
                        functools.partial(self._unsign, agreement))

    def _withhold(self, i: int, customer: str, amount: int) -> None:
        engine = self.engine()
        if engine is None or self.quiet():
            self.counts["withhold_skipped"] += 1
            return
        try:
            engine.withhold(MERCHANT, f"w{self.seed}-{i:05d}", customer, amount, "CNY",
                            "Car wash subscription")
            self.counts["withhold"] += 1
        except PaymentError as error:
            self.counts[f"withhold_refused:{error.code}"] += 1

    def _revoke(self, agreement_id: str) -> None:
        for wallet in self.wallets.values():
            if wallet.revoke(agreement_id):
                self.counts["agreement_revoked"] += 1

    def _unsign(self, agreement_id: str) -> None:
        engine = self.engine()
        if engine is None:
            return
        try:
            engine.unsign_agreement(agreement_id)
            self.counts["agreement_unsigned"] += 1
        except PaymentError as error:
            self.counts[f"unsign_refused:{error.code}"] += 1

    # ------------------------------------------------------------------ the oracle

    def check(self, store: Store) -> list[Violation]:
        violations: list[Violation] = []
        for w in db.all_withholdings(store):
            self.counts[f"withholding_{w.state.value}"] += 1
            self.counts["withhold_retries"] += w.attempt - 1
            violations += self._check_one(store, w)
        for customer, ids in self.signed.items():
            for agreement_id in ids:
                violations += self._check_agreement(store, agreement_id, customer)
        return violations

    def _check_one(self, store: Store, w: Any) -> list[Violation]:
        subject = f"withholding {w.merchant_order_no}"
        violations: list[Violation] = []
        charges, previous, succeeded = 0, None, 0
        for attempt, agreement_id in enumerate(w.attempts, start=1):
            order_id = store.attempt_order_id(w.merchant_id, w.merchant_order_no, attempt)
            if order_id is None:
                previous = None
                continue
            order = store.load_order(order_id)
            assert order is not None
            succeeded += order.state is OrderState.SUCCEEDED
            cash = order.cash_leg
            wallet = self.wallets.get(cash.channel or "") if cash is not None else None
            payment = None if wallet is None else wallet.payments.get(order.payment_serial)
            charges += 0 if payment is None else len(payment.charges)
            created = _first_seq(store, "order", order_id)
            ended = _terminated_seq(store, agreement_id)
            if ended is not None and ended < created:
                violations.append(Violation(
                    "withhold-never-on-terminated-agreement", subject,
                    f"attempt {attempt} made after agreement {agreement_id} ended"))
            if previous is not None:
                unpaid = _leg_unpaid_seq(store, previous)
                if unpaid is None or unpaid > created:
                    violations.append(Violation(
                        "withhold-retry-after-no-charge", subject,
                        f"attempt {attempt} made while attempt {attempt - 1} "
                        f"({previous}) was not known uncharged"))
            previous = order_id
        if charges > 1:
            violations.append(Violation("withhold-charged-at-most-once", subject,
                                        f"{charges} charges over {w.attempt} attempts"))
        if w.state is WithholdState.SUCCEEDED and succeeded != 1:
            violations.append(Violation("withhold-state-true", subject,
                                        f"succeeded, with {succeeded} succeeded attempts"))
        if w.state is WithholdState.FAILED and succeeded:
            violations.append(Violation("withhold-state-true", subject,
                                        "failed, with a succeeded attempt"))
        return violations

    def _check_agreement(self, store: Store, agreement_id: str, customer: str
                         ) -> list[Violation]:
        """The engine's agreement ends (final) when the wallet's did (the callbacks
        arrived, in whatever order)."""
        agreement = db.load_agreement(store, agreement_id)
        truth = [w.agreement_status(agreement_id) for w in self.wallets.values()]
        truth_known = [t for t in truth if t is not None]
        if agreement is None or agreement.user_id != customer:
            return [Violation("agreement-kept", f"agreement {agreement_id}", "lost")]
        if AgreementStatus.TERMINATED in truth_known and agreement.state.value not in (
                "terminated", "failed"):  # failed: revoked before the signature was heard
            return [Violation("agreement-follows-wallet", f"agreement {agreement_id}",
                              f"wallet ended it, engine has {agreement.state.value}")]
        return []


def _first_seq(store: Store, kind: str, entity_id: str) -> int:
    entries = store.journal(kind, entity_id)
    return entries[0].seq if entries else 1 << 62


def _terminated_seq(store: Store, agreement_id: str) -> int | None:
    return next((e.seq for e in store.journal("agreement", agreement_id)
                 if e.to_state == "terminated"), None)


def _leg_unpaid_seq(store: Store, order_id: str) -> int | None:
    return next((e.seq for e in store.journal("order", order_id)
                 if e.part == "leg:0" and e.to_state == "unpaid"), None)
