"""Recharges and transfers among the simulated customers' stored-value accounts.

Every customer has a stored-value account ``<customer>/sv`` (CNY), some funded at setup.
Drawn from the workload's own seeded ``random.Random`` (``seed + 23``), so the rest of a
seed's workload is what it was before:

- recharges through the simulated wallets, under the simulator's merchant: paid, refused,
  paid late (after the close: refunded, never credited), closed by the user while the
  payment is in flight, retried with the same merchant order number, refunded in part or
  whole (the value is clawed back from the account first: refused when spent meanwhile);
- transfers between two customers' accounts, some retried with the same transfer id, some
  refused before anything is created (more than the balance, the same account twice).

Crashes, lost voucher replies and the wallets' faults hit them as any order. What they must
end as is checked by ``oracle.check_beneficiaries``: a recharge credits its account exactly
once iff its cash was kept, a transfer's source spends exactly what its target receives.
"""

from __future__ import annotations

import contextlib
import functools
import random
from collections import Counter
from collections.abc import Callable

from payengine.actors.engine import Engine
from payengine.engine.errors import (
    ActorBroken,
    DuplicateSuspected,
    EngineClosed,
    Overloaded,
    PaymentError,
)
from payengine.engine.order import CashPart

MERCHANT = "station-1"
RECHARGE_SHARE = 0.2
"""Recharges per payment of the main workload (and as many transfers)."""
RETRIES_MAX = 4
"""Sends of one recharge or transfer the engine did not answer (down, busy), 1-3 s apart."""


class RechargesAndTransfers:
    """Schedules the recharges and transfers of one run on the world's clock; not
    thread-safe (driven by the world's timers, as the rest of the simulation)."""

    def __init__(self, rng: random.Random, *, seed: int, pay_window_ms: int,
                 now_ms: Callable[[], int], at: Callable[[int, Callable[[], None]], None],
                 engine: Callable[[], Engine | None], quiet: Callable[[], bool],
                 counts: Counter[str]) -> None:
        self._rng = rng
        self._seed = seed
        self._window = pay_window_ms
        self._now = now_ms
        self._at = at
        self._engine = engine
        self._quiet = quiet
        self._counts = counts

    def setup(self, engine: Engine, customers: list[str]) -> None:
        for c in customers:
            engine.open_account(f"{c}/sv", "CNY")
            funding = self._rng.choice([0, 500, 3_000, 10_000])
            if funding:
                engine.fund(f"{c}/sv", funding, funding_id=f"{c}/sv")

    def schedule(self, now: int, span_ms: int, orders: int, customers: list[str]) -> None:
        rng = self._rng
        for i in range(max(2, int(orders * RECHARGE_SHARE))):
            account = f"{rng.choice(customers)}/sv"
            amount = rng.randint(1, 50) * 100
            wallet = rng.choice(["wechat", "alipay"])
            no = f"s{self._seed}-rc{i:05d}"
            at = now + rng.randint(0, span_ms)
            self._at(at, functools.partial(self._recharge, no, account, amount, wallet, 1))
            if rng.random() < 0.1:  # the terminal's retry, as it was
                self._at(at + rng.randint(0, 50),
                         functools.partial(self._recharge, no, account, amount, wallet, 1))
        for i in range(max(2, int(orders * RECHARGE_SHARE))):
            source, target = rng.choice(customers), rng.choice(customers)
            amount = rng.randint(1, 30) * 100
            transfer_id = f"s{self._seed}-tr{i:05d}"
            at = now + rng.randint(0, span_ms)
            move = functools.partial(self._transfer, transfer_id, f"{source}/sv",
                                     f"{target}/sv", amount, 1)
            self._at(at, move)
            if rng.random() < 0.15:
                self._at(at + rng.randint(0, 2_000), move)

    # ------------------------------------------------------------------ recharges

    def _recharge(self, no: str, account: str, amount: int, wallet: str, sent: int,
                  confirm: bool = False) -> None:
        engine = self._engine()
        if engine is None or self._quiet():
            self._again(sent, functools.partial(self._recharge, no, account, amount, wallet,
                                                sent + 1, confirm))
            return
        try:
            receipt = engine.recharge(MERCHANT, no, account, amount, "CNY",
                                      CashPart(amount, wallet), confirm_duplicate=confirm)
        except DuplicateSuspected:
            self._counts["recharge_duplicate_warning"] += 1
            self._recharge(no, account, amount, wallet, sent, confirm=True)
            return
        except (EngineClosed, Overloaded):
            self._again(sent, functools.partial(self._recharge, no, account, amount, wallet,
                                                sent + 1, confirm))
            return
        except PaymentError as error:
            self._counts[f"recharge_refused:{error.code}"] += 1
            return
        self._counts["recharge"] += 1
        rng = self._rng
        if rng.random() < 0.25:  # the user gives up while the payment may be under way
            self._at(self._now() + rng.randint(0, self._window),
                     functools.partial(self._close, receipt.order_id))
        if rng.random() < 0.4:  # whole, in halves, more than is left, a number again
            refund_at = self._now() + self._window + rng.randint(200, 3_000)
            for _ in range(rng.randint(1, 3)):
                part = rng.choice([amount, amount // 2 or amount])
                self._at(refund_at + rng.randint(0, 300),
                         functools.partial(self._refund, receipt.order_id,
                                           f"rf-{rng.randint(1, 3)}", part))

    def _close(self, order_id: str) -> None:
        engine = self._engine()
        if engine is not None and not self._quiet():
            self._counts["recharge_close"] += 1
            with contextlib.suppress(PaymentError, ActorBroken):
                engine.request_close(order_id)

    def _refund(self, order_id: str, refund_no: str, amount: int) -> None:
        engine = self._engine()
        if engine is None or self._quiet():
            return
        try:
            engine.refund(order_id, refund_no, amount)
            self._counts["recharge_refund"] += 1
        except PaymentError as error:
            self._counts[f"recharge_refund_refused:{error.code}"] += 1
        except ActorBroken:
            self._counts["recharge_refund_refused:actor_broken"] += 1

    # ------------------------------------------------------------------ transfers

    def _transfer(self, transfer_id: str, source: str, target: str, amount: int,
                  sent: int) -> None:
        engine = self._engine()
        again = functools.partial(self._transfer, transfer_id, source, target, amount, sent + 1)
        if engine is None or self._quiet():
            self._again(sent, again)
            return
        try:
            engine.transfer(transfer_id, source, target, amount)
        except (EngineClosed, Overloaded):
            self._again(sent, again)
            return
        except PaymentError as error:
            self._counts[f"transfer_refused:{error.code}"] += 1
            return
        self._counts["transfer"] += 1

    def _again(self, sent: int, fn: Callable[[], None]) -> None:
        if sent < RETRIES_MAX and not self._quiet():
            self._at(self._now() + self._rng.randint(1_000, 3_000), fn)
