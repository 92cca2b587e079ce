"""Users who tick "use points" in the app before they order: pre-holds (``pre-holds``).

The app holds the points with ``Engine.pre_hold`` the moment the user ticks the box, and
releases them (``release_hold``) when the user unticks it; the order then names the hold in a
``PRE_HELD`` part and adopts it. Each plan is one user's story, drawn per order from the
holder's own seeded ``random.Random``:

- ``adopted``: ticked, then ordered with the hold (sometimes the tick is sent twice with the
  same hold id, as an app retries; once in a while the retry names another amount and must be
  refused): the hold is posted exactly when the order succeeds, else given back;
- ``dead``: ordered with a hold that had already expired, been released, or was never made
  (the tick was refused for want of points): the order fails with that leg refused, nothing
  is spent and no hold is created in its place;
- ``released``: ticked, then unticked: the hold is voided, nothing spent;
- ``untick_race``: the untick and the tick sent at (nearly) the same instant, in either
  order: the untick first records an *empty rollback* and the late tick is refused
  (``HoldRefused``), having changed nothing;
- ``abandoned``: ticked and forgotten: the hold must expire after its TTL and give
  everything back.

Ticks and unticks the engine did not answer (down, crashed, busy) are sent again with the
same hold id, a few times, 1-3 s apart. What each plan must end as is checked by ``oracle.check_pre_holds``.
"""

from __future__ import annotations

import functools
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import replace

from payengine.actors.engine import Engine
from payengine.actors.messages import HoldView
from payengine.engine.errors import (
    ActorBroken,
    EngineClosed,
    HoldRefused,
    IdempotencyConflict,
    Overloaded,
    PaymentError,
    UnknownHold,
)
from payengine.engine.order import LegMode, PaymentRequest, VoucherPart
from payengine.sim.oracle import Fate, PreHoldPlan, Violation

POINT_MINOR = 10
"""What one point is worth (the simulator's points accounts: ``minor_per_unit=10``)."""

FATE_WEIGHTS = {Fate.ADOPTED: 40, Fate.DEAD: 15, Fate.RELEASED: 15, Fate.RACE: 15,
                Fate.ABANDONED: 15}

NOT_ANSWERED = (EngineClosed, Overloaded)
"""The engine did not answer (down, crashing, busy): the app tries again."""

ATTEMPTS = 4
"""Sends of one tick or untick at most, 1-3 s apart (an engine restarts within 3 s)."""


class PreHolder:
    """Schedules each plan's ticks and unticks; keeps the plans for the oracle.

    ``at`` schedules a world event (the simulation's, which turns a simulated crash inside
    it into the engine's crash); ``engine`` returns the engine now running, or ``None``.
    """

    def __init__(self, rng: random.Random, share: float, *, now_ms: Callable[[], int],
                 at: Callable[[int, Callable[[], None]], None],
                 engine: Callable[[], Engine | None], counts: Counter[str],
                 violations: list[Violation], points_funded_max: int) -> None:
        self.rng = rng
        self.share = share
        self.points_funded_max = points_funded_max
        """No points account was ever funded more: a tick for more is refused."""
        self.now_ms = now_ms
        self.at = at
        self.engine = engine
        self.counts = counts
        self.violations = violations
        self.plans: list[PreHoldPlan] = []

    # ------------------------------------------------------------------ planning

    def around_order(self, request: PaymentRequest, submit_at_ms: int,
                     submit: Callable[[PaymentRequest], None]
                     ) -> tuple[PaymentRequest, Callable[[], None]]:
        """Maybe give the user of ``request`` a pre-hold story around this order.

        Returns the request to submit (with a ``PRE_HELD`` part if the user orders with the
        hold) and what to run at ``submit_at_ms``.
        """
        rng = self.rng
        if rng.random() >= self.share or request.cash is None:
            return request, functools.partial(submit, request)
        fate = rng.choices(list(FATE_WEIGHTS), weights=list(FATE_WEIGHTS.values()))[0]
        plan = PreHoldPlan(f"{request.user_id}/pts", f"ph-{request.merchant_order_no}",
                           rng.choice([10, 20, 40]), fate)
        self.plans.append(plan)
        now = self.now_ms()
        tick_at = max(now, submit_at_ms - rng.randint(0, 1_500))
        match fate:
            case Fate.ADOPTED:
                ttl = submit_at_ms - tick_at + rng.randint(1_000, 10_000)
                self._tick_at(tick_at, plan, ttl, retry=rng.random() < 0.3)
            case Fate.DEAD:
                how = rng.choice(["expired", "released", "refused"])
                # more points than the account ever had: refused, and no hold is made
                room = (request.cash.amount_minor + _points_of(request, plan.account_id)
                        * POINT_MINOR) // POINT_MINOR - 1
                if how == "refused" and room > self.points_funded_max:
                    plan.amount = rng.randint(self.points_funded_max + 1, room)
                    self._tick_at(tick_at, plan, rng.randint(1_000, 10_000))
                elif how == "released":
                    self._tick_at(tick_at, plan, rng.randint(5_000, 20_000))
                    self.at(rng.randint(tick_at, submit_at_ms),
                            functools.partial(self._untick, plan))
                else:  # expired before the order names it
                    ttl = rng.randint(20, 400)
                    tick_at = max(now, submit_at_ms - ttl - rng.randint(1, 1_000))
                    self._tick_at(tick_at, plan, ttl)
            case Fate.RELEASED:
                self._tick_at(tick_at, plan, rng.randint(5_000, 20_000))
                self.at(tick_at + rng.randint(10, 3_000), functools.partial(self._untick, plan))
            case Fate.RACE:
                ttl = rng.randint(5_000, 20_000)
                tick, untick = tick_at + rng.randint(0, 3), tick_at + rng.randint(0, 3)
                if rng.random() < 0.5:  # which is scheduled first, at equal times
                    self._tick_at(tick, plan, ttl)
                    self.at(untick, functools.partial(self._untick, plan))
                else:
                    self.at(untick, functools.partial(self._untick, plan))
                    self._tick_at(tick, plan, ttl)
                self.counts["untick_race"] += 1
            case Fate.ABANDONED:
                self._tick_at(tick_at, plan, rng.randint(200, 8_000))
        if fate not in (Fate.ADOPTED, Fate.DEAD):
            return request, functools.partial(submit, request)  # the user paid without it
        plan.order_key = (request.merchant_id, request.merchant_order_no)
        with_hold = _with_pre_held(request, plan)
        return with_hold, functools.partial(self._submit, plan, with_hold, submit)

    def _tick_at(self, at_ms: int, plan: PreHoldPlan, ttl_ms: int, *, retry: bool = False
                 ) -> None:
        self.at(at_ms, functools.partial(self._tick, plan, ttl_ms, retry, 1))

    # ------------------------------------------------------------------ the user's app

    def _again(self, fn: Callable[[int], None], attempt: int) -> None:
        """The app sends what was not answered again a moment later, up to ``ATTEMPTS`` in
        all: long enough to outlast a restart of the engine."""
        if attempt < ATTEMPTS:
            self.at(self.now_ms() + self.rng.randint(1_000, 3_000),
                    functools.partial(fn, attempt + 1))

    def _tick(self, plan: PreHoldPlan, ttl_ms: int, retry: bool, attempt: int) -> None:
        engine = self.engine()
        again = functools.partial(self._tick, plan, ttl_ms, False)
        if engine is None:
            self.counts["pre_hold_not_answered"] += 1
            self._again(again, attempt)
            return
        try:
            view = engine.pre_hold(plan.account_id, plan.amount, hold_id=plan.hold_id,
                                   ttl_ms=ttl_ms)
        except NOT_ANSWERED:
            self.counts["pre_hold_not_answered"] += 1
            self._again(again, attempt)
            return
        except HoldRefused as error:
            self._refused(engine, plan, error)
            return
        except PaymentError as error:
            plan.refused = error.code
            self.counts[f"pre_hold_refused:{error.code}"] += 1
            return
        except ActorBroken:
            self.counts["pre_hold_refused:actor_broken"] += 1  # a violation, noted at the end
            return
        except BaseException:  # the engine crashed inside the call: no answer came
            self._again(again, attempt)
            raise
        self.counts["pre_hold"] += 1
        plan.placed = True
        if (view.hold_id, view.amount, view.status) != (plan.hold_id, plan.amount, "pending"):
            self.violations.append(Violation(
                "pre-hold-answered-truthfully", plan.subject, f"pre_hold answered {view}"))
        if retry:
            self._retry(engine, plan, ttl_ms, view)

    def _retry(self, engine: Engine, plan: PreHoldPlan, ttl_ms: int, first: HoldView) -> None:
        """The app sends the tick again with the same hold id: the same hold comes back (or,
        naming another amount, it is refused and nothing changes)."""
        other = self.rng.random() < 0.2
        amount = plan.amount + 1 if other else plan.amount
        self.counts["pre_hold_retry"] += 1
        try:
            again = engine.pre_hold(plan.account_id, amount, hold_id=plan.hold_id,
                                    ttl_ms=ttl_ms)
        except IdempotencyConflict:
            if not other:
                self.violations.append(Violation(
                    "pre-hold-idempotent", plan.subject,
                    "the same tick sent again was refused as a conflict"))
            return
        except (PaymentError, ActorBroken):
            return  # down, crashed or adopted meanwhile: the first answer stands
        if other:
            self.violations.append(Violation(
                "pre-hold-idempotent", plan.subject,
                f"a retry for {amount} of a hold of {plan.amount} was accepted: {again}"))
        elif (again.hold_id, again.amount, again.status) != (
                first.hold_id, first.amount, first.status):
            self.violations.append(Violation(
                "pre-hold-idempotent", plan.subject, f"first {first}, then {again}"))

    def _refused(self, engine: Engine, plan: PreHoldPlan, error: HoldRefused) -> None:
        """A tick refused as a Try after its Cancel: it must have changed nothing, so no hold
        of that id may be pending now."""
        plan.refused = error.code
        self.counts["pre_hold_refused"] += 1
        try:
            view = engine.get_hold(plan.account_id, plan.hold_id)
        except (PaymentError, ActorBroken):
            return
        if view.status == "pending":
            self.violations.append(Violation(
                "refused-tick-changed-nothing", plan.subject,
                f"pre_hold was refused ({error.message}), yet the hold is {view}"))

    def _untick(self, plan: PreHoldPlan, attempt: int = 1) -> None:
        engine = self.engine()
        again = functools.partial(self._untick, plan)
        if engine is None:
            self.counts["pre_hold_release_not_answered"] += 1
            self._again(again, attempt)
            return
        try:
            view = engine.release_hold(plan.account_id, plan.hold_id)
        except NOT_ANSWERED:
            self.counts["pre_hold_release_not_answered"] += 1
            self._again(again, attempt)
            return
        except HoldRefused as error:
            self.counts["pre_hold_release_refused"] += 1
            if plan.order_key is None:  # no order names this hold: nothing may refuse it
                self.violations.append(Violation(
                    "unadopted-pre-hold-released", plan.subject,
                    f"release_hold refused: {error.message}"))
            return
        except PaymentError as error:
            self.counts[f"pre_hold_release_refused:{error.code}"] += 1
            return
        except ActorBroken:
            self.counts["pre_hold_release_refused:actor_broken"] += 1
            return
        except BaseException:
            self._again(again, attempt)
            raise
        plan.released = True
        self.counts["pre_hold_released"] += 1
        if view.status not in ("voided", "empty_rollback", "expired"):
            self.violations.append(Violation(
                "pre-hold-released", plan.subject, f"release_hold answered {view}"))

    def _submit(self, plan: PreHoldPlan, request: PaymentRequest,
                submit: Callable[[PaymentRequest], None]) -> None:
        """Order with the hold; first note whether it is already dead (released, expired, or
        never made for want of points): such an order must fail, nothing spent."""
        engine = self.engine()
        if engine is not None:
            try:
                view = engine.get_hold(plan.account_id, plan.hold_id)
            except UnknownHold:
                plan.dead = plan.refused == "insufficient_balance"
            except (PaymentError, ActorBroken):
                pass
            else:
                plan.dead = view.status != "pending" or (
                    view.expires_at_ms is not None and view.expires_at_ms <= self.now_ms())
        if plan.dead:
            self.counts["pre_held_order_with_dead_hold"] += 1
        submit(request)


def _points_of(request: PaymentRequest, account_id: str) -> int:
    return sum(v.amount for v in request.vouchers if v.account_id == account_id)


def _with_pre_held(request: PaymentRequest, plan: PreHoldPlan) -> PaymentRequest:
    """``request`` paying ``plan``'s points from its pre-hold instead of any other points
    part, the cash making up the difference."""
    assert request.cash is not None
    kept = tuple(v for v in request.vouchers if v.account_id != plan.account_id)
    cash = request.cash.amount_minor + (
        _points_of(request, plan.account_id) - plan.amount) * POINT_MINOR
    assert cash > 0, (request, plan)
    part = VoucherPart(plan.account_id, plan.amount, LegMode.PRE_HELD, hold_id=plan.hold_id)
    return replace(request, cash=replace(request.cash, amount_minor=cash), vouchers=(*kept, part))
