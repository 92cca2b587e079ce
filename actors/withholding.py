"""Agreements and withholdings in the shell: persist, call the wallet, retry by itself.

``Withholder`` is built by ``Engine.open`` and serves the Engine's agreement and withhold
methods. Its system auto-retry is driven by the outbox (``actors.notifier``): it is an
in-process subscriber, so it hears every terminal state of every attempt at least once,
also after a crash (its cursor is in SQLite), and it runs on its own I/O lane, never on an
actor's thread: submitting the next attempt from there blocks no actor. A closed attempt
whose close the wallet has not answered yet causes no event when the answer comes, so
such a withholding looks again every ``WithholdConfig.recheck_ms`` (a timer that only
hands the look to the ``withhold`` lane). ``resume`` (at ``Engine.open``) looks at every
withholding still paying.

Order of things (persist before acting): a retry's decision (the next attempt and its
agreement) is committed before the attempt is submitted; the submit is idempotent by
(merchant, merchant order number, attempt), so a crash between the two is repaired by the
next look. Deciding and submitting happen under one lock, which agreement changes take too:
an agreement terminated before a retry's look is never paid on by it.

Threads: API methods on the caller's thread; ``on_event`` on the subscriber lane;
``advance`` on either, or on the ``withhold`` lane for a recheck.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from payengine.actors.channel import AgreementStatus, signs_agreements
from payengine.actors.messages import Receipt
from payengine.engine.agreement import (
    Agreement,
    AgreementEvent,
    agreement_event,
    check_usable,
    new_agreement,
)
from payengine.engine.channel_data import PayDetails, PayScenario
from payengine.engine.checks import check_id, check_ids, shown
from payengine.engine.errors import (
    AgreementInactive,
    AgreementMismatch,
    AgreementNotFound,
    AgreementsUnsupported,
    EngineClosed,
    IdempotencyConflict,
    IllegalTransition,
    InvalidRequest,
    Overloaded,
    PaymentError,
    UnknownWithholding,
)
from payengine.engine.order import (
    TERMINAL_STATES,
    CashPart,
    PaymentOrder,
    PaymentRequest,
    check_request,
)
from payengine.engine.withhold import (
    AttemptOutcome,
    Step,
    StepKind,
    Withholding,
    WithholdState,
    after_step,
    attempt_outcome,
    next_step,
    waits_for_close,
)
from payengine.persistence import agreements as db
from payengine.persistence.outbox import ORDER_STATE_CHANGED, OutboxEvent

if TYPE_CHECKING:
    from payengine.actors.base import Context

SUBSCRIBER_NAME = "payengine.withholding"
"""The outbox subscriber that drives the auto-retry (its cursor is stored under this name)."""
LANE = "withhold"
"""The I/O lane rechecks run on."""
_TERMINAL = frozenset(state.value for state in TERMINAL_STATES)
_CALLBACK_EVENTS = {
    AgreementStatus.SIGNED: AgreementEvent.SIGNED,
    AgreementStatus.FAILED: AgreementEvent.SIGN_FAILED,
    AgreementStatus.TERMINATED: AgreementEvent.REVOKED,
}


class Withholder:
    """Agreements, withholdings and their auto-retry for one engine. Thread-safe."""

    def __init__(self, ctx: Context, submit: Callable[[PaymentRequest], Receipt],
                 new_id: Callable[[], str] | None = None) -> None:
        self._ctx = ctx
        self._submit = submit
        self._new_id = new_id or (lambda: f"agr_{uuid.uuid4().hex}")
        self._config = ctx.config.withholding
        self._bugs = ctx.config.planted_bugs | ctx.policy.planted_bugs
        self._lock = threading.RLock()
        """Held while an agreement changes and while a withholding decides and submits."""
        self._rechecking: set[tuple[str, str]] = set()

    # ------------------------------------------------------------------ agreements

    def sign(self, user_id: str, channel: str) -> Agreement:
        """Ask ``channel`` to sign an agreement for ``user_id`` (persisted as ``signing``
        first). A live one (signing, active, unsigning) of the same user and channel is
        returned instead of a second; one still ``signing`` is asked of the wallet again
        (idempotent by its id), in case its answer or callback was lost."""
        check_id(user_id, "user_id")
        wallet = self._wallet(channel)
        with self._lock:
            mine = db.agreements_of(self._ctx.store, user_id,
                                    self._config.agreements_per_user_max + 1)
            live = [a for a in mine if a.channel == channel and a.state.value in (
                "signing", "active", "unsigning")]
            if live and live[0].state.value != "signing":
                return live[0]
            if live:
                agreement = live[0]
            elif len(mine) >= self._config.agreements_per_user_max:
                raise Overloaded(f"user {user_id} has {len(mine)} agreements "
                                 f"(agreements_per_user_max)")
            else:
                agreement = new_agreement(check_id(self._new_id(), "agreement id"), user_id,
                                          channel, self._now())
                db.insert_agreement(self._ctx.store, agreement)
        answer = self._ask_wallet(lambda: wallet.sign(agreement.agreement_id, user_id))
        if answer in (AgreementStatus.SIGNED, AgreementStatus.FAILED):
            with contextlib.suppress(IllegalTransition):  # a callback came first: it stands
                return self._apply(agreement.agreement_id, _CALLBACK_EVENTS[answer],
                                   f"sign answered {answer.value}")
        return self.get(agreement.agreement_id)

    def unsign(self, agreement_id: str) -> Agreement:
        """End an active agreement: ``unsigning`` at once (no new payment uses it), then
        ``terminated`` when the wallet confirms (now or by callback). Again on an
        ``unsigning`` or ``terminated`` one returns it; on any other ``AgreementInactive``."""
        agreement = self.get(agreement_id)
        wallet = self._wallet(agreement.channel)
        if agreement.state.value in ("unsigning", "terminated"):
            return agreement
        check_usable(agreement)
        self._apply(agreement_id, AgreementEvent.UNSIGN, "unsign asked")
        answer = self._ask_wallet(lambda: wallet.unsign(agreement_id))
        if answer is AgreementStatus.TERMINATED:
            return self._apply(agreement_id, AgreementEvent.UNSIGNED, "unsign answered")
        return self.get(agreement_id)

    def get(self, agreement_id: str) -> Agreement:
        check_id(agreement_id, "agreement_id")
        agreement = db.load_agreement(self._ctx.store, agreement_id)
        if agreement is None:
            raise AgreementNotFound(f"no agreement {agreement_id}")
        return agreement

    def of(self, user_id: str) -> list[Agreement]:
        check_id(user_id, "user_id")
        return db.agreements_of(self._ctx.store, user_id, self._config.agreements_per_user_max)

    def callback(self, channel: str, agreement_id: str, user_id: str, status: object
                 ) -> Agreement:
        """A wallet's word on an agreement, checked against what the engine knows first."""
        check_id(channel, "channel")
        check_id(user_id, "user_id")
        if not isinstance(status, AgreementStatus) or status is AgreementStatus.PENDING:
            raise InvalidRequest(f"status must be an AgreementStatus other than pending, got "
                                 f"{shown(status)}")
        agreement = self.get(agreement_id)
        if agreement.channel != channel:
            raise AgreementMismatch(f"agreement {agreement_id} is on channel "
                                    f"{agreement.channel}, not {channel}")
        if agreement.user_id != user_id:
            raise AgreementMismatch(f"agreement {agreement_id} belongs to another user")
        event = _CALLBACK_EVENTS[status]
        if status is AgreementStatus.TERMINATED and agreement.state.value == "unsigning":
            event = AgreementEvent.UNSIGNED
        return self._apply(agreement_id, event, f"wallet callback: {status.value}")

    def _apply(self, agreement_id: str, event: AgreementEvent, cause: str) -> Agreement:
        with self._lock:
            before = self.get(agreement_id)
            after = agreement_event(before, event, self._now(), cause)
            if after is not before:
                saved = db.save_agreement(self._ctx.store, before, after)
                assert saved, f"agreement {agreement_id} changed under the lock"
                self._ctx.log.info("agreement", agreement_id=agreement_id,
                                   from_state=before.state.value, to_state=after.state.value,
                                   cause=cause)
            return after

    def _wallet(self, channel: str) -> Any:
        check_id(channel, "channel")
        wallet = self._ctx.channels.get(channel)
        if wallet is None:
            raise InvalidRequest(f"unknown channel {channel!r}")
        if not signs_agreements(wallet):
            raise AgreementsUnsupported(f"channel {channel} does not sign agreements")
        return wallet

    def _ask_wallet(self, call: Callable[[], object]) -> AgreementStatus | None:
        """The wallet's answer, or ``None`` when it gave none we can believe (an error, a
        timeout, a value that is no ``AgreementStatus``): a callback will tell."""
        try:
            answer = call()
        except Exception as error:
            self._ctx.log.warning("agreement.call_failed", error=repr(error))
            return None
        return answer if isinstance(answer, AgreementStatus) else None

    # ------------------------------------------------------------------ withholding

    def withhold(self, merchant_id: str, merchant_order_no: str, user_id: str,
                 amount_minor: int, currency: str, title: str,
                 agreement_ids: Sequence[str] | None) -> Withholding:
        """Start a withholding (attempt 1 on the first usable agreement); the same one
        again returns it, the same key with other parameters is ``IdempotencyConflict``."""
        config = self._config
        check_request(PaymentRequest(merchant_id, merchant_order_no, user_id, currency,
                                     amount_minor, title, CashPart(amount_minor, "check")),
                      policy=self._ctx.policy, currencies=self._ctx.config.currency_table)
        named = None if agreement_ids is None else check_ids(
            agreement_ids, "agreement_ids", config.agreements_per_withhold_max)
        with self._lock:
            existing = db.load_withholding(self._ctx.store, merchant_id, merchant_order_no)
            if existing is not None:  # a retry of the call: the same trade, or a conflict
                return _same(existing, user_id, amount_minor, currency, title, named)
            chosen, first = self._agreements_for(user_id, named)
            now = self._now()
            w = Withholding(merchant_id, merchant_order_no, user_id, amount_minor, currency,
                            title, chosen, (first,), WithholdState.PAYING, "withhold asked",
                            now, now)
            if db.count_open_withholdings(self._ctx.store) >= config.withholds_open_max:
                raise Overloaded(f"{config.withholds_open_max} withholdings are paying "
                                 "(withholds_open_max)")
            existing = db.insert_withholding(self._ctx.store, w)
            assert existing is None, "inserted under the lock after a miss"
            try:
                self._submit(self._request(w))
            except PaymentError as error:
                db.delete_withholding(self._ctx.store, w, error.code)  # nothing was created
                raise
        return w

    def get_withholding(self, merchant_id: str, merchant_order_no: str) -> Withholding:
        check_id(merchant_id, "merchant_id")
        check_id(merchant_order_no, "merchant_order_no")
        w = db.load_withholding(self._ctx.store, merchant_id, merchant_order_no)
        if w is None:
            raise UnknownWithholding(f"no withholding {merchant_id}/{merchant_order_no}")
        return w

    def _agreements_for(self, user_id: str, named: tuple[str, ...] | None
                        ) -> tuple[tuple[str, ...], str]:
        """The agreements a new withholding may use, in order, and the one attempt 1 pays
        on (the first active): those named (each the user's), or all the user's active
        ones, oldest first. ``AgreementNotFound`` / ``AgreementInactive`` otherwise."""
        if named is None:
            mine = self.of(user_id)
            if not mine:
                raise AgreementNotFound(f"user {user_id} has no agreement")
            chosen = tuple(a.agreement_id for a in mine if a.is_active)[
                :self._config.agreements_per_withhold_max]
            if not chosen:
                raise AgreementInactive(f"no agreement of user {user_id} is active")
            return chosen, chosen[0]
        if not named or len(set(named)) != len(named):
            raise InvalidRequest("agreement_ids must name 1 or more agreements, each once")
        agreements = [self.get(agreement_id) for agreement_id in named]
        for agreement in agreements:
            if agreement.user_id != user_id:
                raise AgreementNotFound(f"user {user_id} has no agreement "
                                        f"{agreement.agreement_id}")
        active = [a.agreement_id for a in agreements if a.is_active]
        if not active:
            raise AgreementInactive(f"none of the agreements {list(named)} is active")
        return named, active[0]

    def _request(self, w: Withholding) -> PaymentRequest:
        agreement = self.get(w.agreement_id)
        details = PayDetails(PayScenario.WITHHOLD, agreement_id=agreement.agreement_id)
        return PaymentRequest(w.merchant_id, w.merchant_order_no, w.user_id, w.currency,
                              w.amount_minor, w.title,
                              CashPart(w.amount_minor, agreement.channel, details),
                              confirm_duplicate=True, attempt=w.attempt)

    # ------------------------------------------------------------------ the auto-retry

    def on_event(self, event: OutboxEvent) -> None:
        """The outbox subscriber: a terminal state of an attempt may call for the next."""
        if event.event_type == ORDER_STATE_CHANGED and event.to_state in _TERMINAL:
            self.advance(event.merchant_id, event.merchant_order_no)

    def resume(self) -> int:
        """At ``Engine.open``: look at every withholding still paying (at most
        ``withholds_open_max``); returns how many."""
        open_ones = db.open_withholdings(self._ctx.store, self._config.withholds_open_max)
        for w in open_ones:
            try:
                self.advance(w.merchant_id, w.merchant_order_no)
            except (Overloaded, EngineClosed) as error:
                self._ctx.log.warning("withhold.resume_deferred", error=repr(error))
        return len(open_ones)

    def advance(self, merchant_id: str, merchant_order_no: str, rechecks: int = 0) -> None:
        """Look at the withholding's latest attempt and do what ``engine.withhold`` says:
        wait, submit the next attempt (decision committed first), or end it."""
        store = self._ctx.store
        with self._lock:
            w = db.load_withholding(store, merchant_id, merchant_order_no)
            if w is None or w.state is not WithholdState.PAYING:
                return
            order_id = store.attempt_order_id(merchant_id, merchant_order_no, w.attempt)
            if order_id is None:  # decided, then crashed before the submit: submit now
                self._submit_attempt(w)
                return
            order = store.load_order(order_id)
            assert order is not None, f"attempt order {order_id} vanished"
            outcome = attempt_outcome(order, retryable=self._retryable(order),
                                      planted_bugs=self._bugs)
            active = [a for a in w.agreement_ids if self._is_active(a)]
            step = next_step(w, outcome, active,
                             attempts_max=self._config.withhold_attempts_max)
            if step.kind is StepKind.WAIT:
                if waits_for_close(order):
                    self._recheck_later(w, rechecks)
                return
            after = after_step(w, step, outcome, self._now())
            if not db.save_withholding(store, w, after):
                return  # assert-free: only this lock writes; a reopen's look may race
            self._ctx.log.info("withhold", merchant_order_no=merchant_order_no,
                               step=step.kind.value, cause=step.cause)
            if step.kind is StepKind.RETRY:
                self._submit_attempt(after)

    def _submit_attempt(self, w: Withholding) -> None:
        """Submit attempt ``w.attempt``. A refusal that says "later" (overloaded, shut
        down) propagates, so the event comes again; any other ends the withholding."""
        try:
            self._submit(self._request(w))
        except (Overloaded, EngineClosed):
            raise
        except PaymentError as error:
            step = Step(StepKind.FAIL, cause=f"attempt {w.attempt} refused: {error.code}")
            failed = after_step(w, step, AttemptOutcome.FAILED, self._now())
            db.save_withholding(self._ctx.store, w, failed)

    def _retryable(self, order: PaymentOrder) -> bool:
        cash = order.cash_leg
        if cash is None or cash.channel is None or cash.channel_code is None:
            return False
        wallet = self._ctx.channels.get(cash.channel)
        codes = getattr(wallet, "pay_codes", None)
        return codes is not None and cash.channel_code in codes.retryable and (
            cash.channel_code in codes.failure)

    def _is_active(self, agreement_id: str) -> bool:
        agreement = db.load_agreement(self._ctx.store, agreement_id)
        return agreement is not None and agreement.is_active

    def _recheck_later(self, w: Withholding, rechecks: int) -> None:
        """Look again in ``recheck_ms`` (on the ``withhold`` lane), at most ``rechecks_max``
        times per wait and once at a time per withholding."""
        key = (w.merchant_id, w.merchant_order_no)
        if rechecks >= self._config.rechecks_max or key in self._rechecking:
            return
        self._rechecking.add(key)
        runtime = self._ctx.runtime

        def look() -> None:
            self._rechecking.discard(key)
            self.advance(*key, rechecks=rechecks + 1)

        def on_lane() -> None:
            with contextlib.suppress(EngineClosed):
                runtime.run_io(LANE, look, self._looked)

        try:
            runtime.call_at(self._now() + self._config.recheck_ms, on_lane)
        except (EngineClosed, Overloaded):
            self._rechecking.discard(key)  # resumed at the next open

    def _looked(self, result: object) -> None:
        if isinstance(result, BaseException) and not isinstance(result, EngineClosed):
            self._ctx.log.warning("withhold.recheck_failed", error=repr(result))

    def _now(self) -> int:
        return self._ctx.runtime.now_ms()


def _same(existing: Withholding, user_id: str, amount_minor: int, currency: str, title: str,
          named: tuple[str, ...] | None) -> Withholding:
    """``existing`` if a withhold call asked for the same trade (and, if it named
    agreements, the same ones); ``IdempotencyConflict`` otherwise."""
    if (existing.user_id, existing.amount_minor, existing.currency, existing.title) != (
            user_id, amount_minor, currency, title) or (
            named is not None and named != existing.agreement_ids):
        raise IdempotencyConflict(
            f"withholding {existing.merchant_id}/{existing.merchant_order_no} was asked "
            "before with different parameters")
    return existing
