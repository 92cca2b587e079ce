"""Pumps that pre-authorise (issue 12 item 3, SPEC R-FUEL), in every run.

Drawn from the workload's own seeded ``random.Random`` (``seed + 27``), so the rest of a
seed's workload is what it was before. Each pre-authorisation authorises up to a pump limit
(cash, sometimes with a fuel card voucher held too) with a short expiry, then:

- is captured short (0..authorised; 0 voids), sometimes again under the same id (the same
  answer) or under another id (``AlreadyCaptured``), sometimes only after it expired
  (``AuthorisationVoided``);
- is captured for more than it authorised (``CaptureAboveAuthorised`` expected);
- is voided, and sometimes captured after the void (``AuthorisationVoided``);
- is abandoned: it must expire and be voided at the wallet; the first few abandoned ones
  (``ABOVE_ON_PURPOSE_MAX``) are captured above their authorisation first, on purpose, from
  a stream of their own (``seed + 41``), so every run has such captures whatever it drew.

The wallets' faults for authorisations (declined, request lost, answer lost, a captured
amount misreported) are switched on by ``faults``; crashes and voucher faults hit these
orders as any. ``accepted`` keeps every capture the engine accepted, for
``oracle.check_authorisations``.
"""

from __future__ import annotations

import functools
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import replace

from payengine.actors.engine import Engine
from payengine.engine.errors import (
    ActorBroken,
    AlreadyCaptured,
    AuthorisationVoided,
    CaptureAboveAuthorised,
    EngineClosed,
    IllegalTransition,
    Overloaded,
    PaymentError,
)
from payengine.engine.order import CashPart, PaymentRequest, VoucherPart
from payengine.sim.channel import ChannelFaults

MERCHANT = "station-1"
PREAUTH_SHARE = 0.3
"""Pre-authorisations per payment of the main workload."""
RETRIES_MAX = 4
"""Sends of one call the engine did not answer (down, busy), 1-3 s apart."""
CAPTURE_WAITS_MAX = 8
"""Tries of a capture that found the order still authorising, 300-600 ms apart."""
TTLS_MS = (1_500, 3_000, 6_000)
"""The pre-authorisations' expiries (their ``pay_window_ms``)."""
ABOVE_ON_PURPOSE_MAX = 3
"""Abandoned pre-authorisations that also get a capture above what they authorised, on
purpose (``Pumps.on_purpose``), so every run has some whatever the fates drew."""


class Pumps:
    """Schedules the pre-authorisations of one run on the world's clock; not thread-safe
    (driven by the world's timers, as the rest of the simulation)."""

    def __init__(self, rng: random.Random, *, seed: int, now_ms: Callable[[], int],
                 at: Callable[[int, Callable[[], None]], None],
                 engine: Callable[[], Engine | None], quiet: Callable[[], bool],
                 counts: Counter[str]) -> None:
        self._rng = rng
        self._seed = seed
        self._now = now_ms
        self._at = at
        self._engine = engine
        self._quiet = quiet
        self.counts = counts
        self.accepted: dict[str, set[tuple[str, int]]] = {}
        """Order id -> every (capture id, amount) the engine accepted (no error)."""
        self.authorised: dict[str, int] = {}
        """Order id -> what its submit asked to authorise."""
        self.on_purpose = random.Random(seed + 41)
        """Draws for the captures above the authorisation made on purpose: a stream of its
        own, so the pumps' other draws stay as they were."""
        self.above_on_purpose = 0

    @staticmethod
    def faults(channel: ChannelFaults) -> ChannelFaults:
        """The wallets' pre-authorisation faults, on top of the run's others."""
        return replace(channel, authorisation_declined=0.05, authorisation_request_lost=0.1,
                       authorisation_answer_lost=0.1, capture_amount_misreported=0.1)

    def setup(self, engine: Engine, customers: list[str]) -> None:
        for c in customers:
            engine.open_account(f"{c}/fuel", "CNY")
            engine.fund(f"{c}/fuel", self._rng.choice([500, 2_000]), funding_id=f"{c}/fuel")

    def schedule(self, now: int, span_ms: int, orders: int, customers: list[str]) -> None:
        rng = self._rng
        for i in range(max(3, int(orders * PREAUTH_SHARE))):
            c = rng.choice(customers)
            cash = rng.randint(50, 500) * 100
            card = rng.choice([0, 0, 100, 300])
            request = PaymentRequest(
                merchant_id=MERCHANT, merchant_order_no=f"s{self._seed}-pa{i:05d}", user_id=c,
                currency="CNY", total_minor=cash + card, title=f"Pump {i % 8 + 1}",
                cash=CashPart(cash, rng.choice(["wechat", "alipay"])),
                vouchers=(VoucherPart(f"{c}/fuel", card),) if card else (),
                pay_window_ms=rng.choice(TTLS_MS), confirm_duplicate=True, authorise=True)
            self._at(now + rng.randint(0, span_ms),
                     functools.partial(self._submit, request, 1))

    def _submit(self, request: PaymentRequest, sent: int) -> None:
        engine = self._engine()
        again = functools.partial(self._submit, request, sent + 1)
        if engine is None or self._quiet():
            self._again(sent, again)
            return
        try:
            receipt = engine.submit(request)
        except (EngineClosed, Overloaded):
            self._again(sent, again)
            return
        except PaymentError as error:
            self.counts[f"preauth_refused:{error.code}"] += 1
            return
        self.counts["preauth"] += 1
        self.authorised[receipt.order_id] = request.total_minor
        self._fate(receipt.order_id, request.total_minor, request.pay_window_ms or 0)

    def _fate(self, order_id: str, authorised: int, ttl: int) -> None:
        rng = self._rng
        fate = rng.random()
        start = self._now() + rng.randint(100, 800)
        if fate < 0.55:  # the pump stops: capture what it dispensed
            amount = rng.randint(0, authorised) if rng.random() < 0.9 else 0
            late = rng.random() < 0.1  # only after the expiry: refused
            at = self._now() + ttl + 1_000 if late else start
            capture_id = f"cap-{order_id}"
            self._at(at, functools.partial(self._capture, order_id, capture_id, amount, 1))
            if rng.random() < 0.2:  # the terminal retries, or sends a second capture
                other = capture_id if rng.random() < 0.5 else f"{capture_id}-2"
                self._at(at + rng.randint(50, 3_000),
                         functools.partial(self._capture, order_id, other, amount, 1))
        elif fate < 0.65:  # above the pump's limit: must be refused
            self._at(start, functools.partial(self._capture, order_id, f"cap-{order_id}",
                                              authorised + rng.randint(1, 500), 1))
        elif fate < 0.8:  # the driver drives off: voided, maybe captured after that
            self._at(start, functools.partial(self._void, order_id, 1))
            if rng.random() < 0.3:
                self._at(start + rng.randint(100, 2_000),
                         functools.partial(self._capture, order_id, f"cap-{order_id}", 100, 1))
        elif self.above_on_purpose < ABOVE_ON_PURPOSE_MAX:
            # abandoned, and on purpose first captured above the authorisation: refused, it
            # expires and is voided at the wallet (nothing else races that capture)
            self.above_on_purpose += 1
            self._at(self._now() + self.on_purpose.randint(100, 800), functools.partial(
                self._capture_above, order_id, authorised + self.on_purpose.randint(1, 500), 1))
        # else abandoned: it expires, and is voided at the wallet

    def _capture_above(self, order_id: str, amount: int, sent: int) -> None:
        """A capture above the authorisation made on purpose: ``CaptureAboveAuthorised``.
        Waits for an authorisation still under way with its own stream's draws."""
        engine = self._engine()
        if engine is None or self._quiet():
            return
        try:
            engine.capture(order_id, amount, capture_id=f"cap-{order_id}-above")
        except IllegalTransition:
            state = engine.get_order(order_id).state
            if state in ("accepted", "authorising") and sent < CAPTURE_WAITS_MAX:
                self._at(self._now() + self.on_purpose.randint(300, 600), functools.partial(
                    self._capture_above, order_id, amount, sent + 1))
            return
        except (PaymentError, ActorBroken) as error:
            self.counts[f"capture_above_refused:{getattr(error, 'code', 'broken')}"] += 1
            return
        self.counts["capture_above_taken"] += 1
        self.accepted.setdefault(order_id, set()).add((f"cap-{order_id}-above", amount))

    def _capture(self, order_id: str, capture_id: str, amount: int, sent: int) -> None:
        engine = self._engine()
        again = functools.partial(self._capture, order_id, capture_id, amount, sent + 1)
        if engine is None or self._quiet():
            self._again(sent, again)
            return
        try:
            engine.capture(order_id, amount, capture_id=capture_id)
        except (EngineClosed, Overloaded):
            self._again(sent, again)
            return
        except IllegalTransition:
            state = engine.get_order(order_id).state
            if state in ("accepted", "authorising") and sent < CAPTURE_WAITS_MAX:
                self._at(self._now() + self._rng.randint(300, 600), again)  # not yet: wait
            else:
                self.counts[f"capture_refused:illegal_transition:{state}"] += 1
            return
        except (AlreadyCaptured, AuthorisationVoided, CaptureAboveAuthorised) as error:
            self.counts[f"capture_refused:{error.code}"] += 1
            return
        except (PaymentError, ActorBroken) as error:
            self.counts[f"capture_refused:{type(error).__name__}"] += 1
            return
        self.counts["capture"] += 1
        self.accepted.setdefault(order_id, set()).add((capture_id, amount))

    def _void(self, order_id: str, sent: int) -> None:
        engine = self._engine()
        again = functools.partial(self._void, order_id, sent + 1)
        if engine is None or self._quiet():
            self._again(sent, again)
            return
        try:
            engine.void(order_id)
        except (EngineClosed, Overloaded):
            self._again(sent, again)
            return
        except (PaymentError, ActorBroken) as error:
            self.counts[f"void_refused:{type(error).__name__}"] += 1
            return
        self.counts["void"] += 1

    def _again(self, sent: int, fn: Callable[[], None]) -> None:
        if sent < RETRIES_MAX and not self._quiet():
            self._at(self._now() + self._rng.randint(1_000, 3_000), fn)
