"""The payment order actor: one per order in flight.

Each message is an ``engine.order`` event. The actor feeds it to ``decide``, commits the new
order (and its journal rows) to SQLite, and only then carries out the effects: tells to
voucher account actors, channel calls on the channel's I/O lane, timers. Races between a
callback, a query result and the close timer are decided by the order of this mailbox.

When the order is settled (terminal and nothing in flight) the actor stops; any later message
(a duplicate callback, a stale timer) starts it again from the database.

An open order that only waits (its user is paying: the pay call answered, every hold held,
nothing else in flight; or a pre-authorisation waiting for its pump) is passivated: the
actor stops and its armed timers stay in the timer heap, their handles kept by the
directory. Its next message (the wallet's callback, a query or close timer, a user's close,
a capture) starts a fresh actor from the database, which adopts
the handles and goes on without an ``Activate``: nothing was lost that the database does
not hold. What is never stored is re-derived: ``pay_in_flight`` comes from the process-wide
``PaysInFlight`` (and an order whose pay call is out is never passivated), and an order that
asked its channel about an unverified report less than ``confirm_query_interval_ms`` ago
stays live until that is past (``confirm_query_at_ms`` is not stored). 100,000 open orders
are then 100,000 rows and their timers, not 100,000 actors.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from payengine.actors.base import ActorBehaviour, Context
from payengine.actors.channel import (
    authorisation_result,
    call_pay,
    cash_result,
    communicated,
    query_charge_result,
    refund_result,
)
from payengine.actors.claim import Claimed
from payengine.actors.directory import Key
from payengine.actors.messages import FromOrder, OrderView
from payengine.actors.observe import NO_OBSERVER, notify, timed
from payengine.actors.routes import choose_for
from payengine.actors.runtime import TimerHandle
from payengine.engine.errors import EngineClosed, InvalidRequest, Overloaded, UnknownOrder
from payengine.engine.ledger import Posting, postings_for
from payengine.engine.order import (
    TERMINAL_STATES,
    Activate,
    ArmTimer,
    AuthorisationOp,
    AuthorisationResult,
    AuthoriseCash,
    CancelHold,
    CaptureAuthorisation,
    CaptureCash,
    CashResult,
    ChooseRoute,
    ClawBack,
    CloseCash,
    CloseOrder,
    ConfirmHold,
    CreditVoucher,
    DebitVoucher,
    Decision,
    Effect,
    LegStatus,
    OrderState,
    PayCash,
    PaymentOrder,
    QueryAuthorisation,
    QueryCash,
    QueryCharge,
    QueryRefund,
    RefundCash,
    RefundResult,
    RequestRefund,
    Rerouted,
    ResultSource,
    ReturnVoucher,
    TimerFired,
    TimerKind,
    Transition,
    TryHold,
    VerifyCode,
    VoidAuthorisation,
    VoidCash,
    VoucherReply,
    decide,
    owed_commands,
)
from payengine.engine.routing import NoRoute

EFFECT_RETRY_FIRST_MS = 1_000
EFFECT_RETRY_MAX_MS = 60_000
EFFECT_RETRIES_MAX = 30
"""Retries of a committed decision whose effects failed to go out: 1 s doubling to 1 min,
about 25 minutes in all; then the next ``Engine.open`` resumes the order."""

_QUIET_LEG_STEPS = frozenset({(LegStatus.TRYING.value, LegStatus.HELD.value),
                              (LegStatus.CONFIRMING.value, LegStatus.CONFIRMED.value)})
"""Leg steps that may wait for the order's next commit (``OrderBehaviour._may_wait_to_save``)."""

_EVENTS = (Activate, VoucherReply, CashResult, RefundResult, CloseOrder, TimerFired,
           RequestRefund, VerifyCode, Rerouted, CaptureAuthorisation, VoidAuthorisation,
           AuthorisationResult)


class OrderBehaviour(ActorBehaviour):
    def __init__(self, key: Key, ctx: Context, kept: dict[TimerKind, TimerHandle] | None = None
                 ) -> None:
        super().__init__(key, ctx)
        self.order: PaymentOrder | None = None
        self.passivated = kept is not None
        """Started for an order its previous actor passivated (``kept``: its timers)."""
        self.timers: dict[TimerKind, TimerHandle] = {} if kept is None else kept
        self.durable: PaymentOrder | None = None
        """The order as last committed (``order`` may be ahead: ``_may_wait_to_save``)."""
        self.unsaved_transitions: list[Transition] = []
        self.unsaved_postings: list[Posting] = []
        self.effect_retries = 0
        """Activations in a row sent because an effect failed (``_carry_out_all``)."""

    def load(self) -> None:
        order = self.ctx.fresh_orders.take(self.key[1]) or self.ctx.store.load_order(self.key[1])
        if order is not None and order.payment_serial in self.ctx.pays_in_flight:
            order = replace(order, pay_in_flight=True)  # restarted while its pay is running
        self.order = self.durable = order
        # An unsettled order whose actor (re)started has effects in flight that nobody may
        # carry out any more (the previous actor died, or the engine restarted): the first
        # message is preceded by an Activate, which re-issues them (all idempotent). Not
        # after a passivation: nothing was lost, its timers are still armed.
        self.needs_activation = (self.order is not None and not self.order.is_settled
                                 and not self.passivated)

    def idle(self) -> bool:
        if self.order is not None and self.unsaved_transitions:
            return False  # decided, not yet committed (``_may_wait_to_save``): keep it
        return self.order is None or self.order.is_settled or self._waiting(self.order)

    def _waiting(self, order: PaymentOrder) -> bool:
        """Only waiting for its user to pay, or for a timer: nothing in flight that this
        actor's memory knows and the database does not (see the module's docstring)."""
        if order.state is OrderState.NEEDS_VERIFICATION and not self.needs_activation:
            # waiting for the user's code: nothing is in flight (every leg new), and its
            # close and verification timers are armed
            return all(leg.status is LegStatus.NEW for leg in order.legs)
        if order.state is OrderState.AUTHORISED and not self.needs_activation:
            # a pre-authorisation waiting for its pump: only its expiry timer is armed
            return not order.refunds and order.next_voucher_retry_at_ms is None and all(
                leg.status is (LegStatus.AUTHORISED if leg.is_cash else LegStatus.HELD)
                for leg in order.legs)
        if self.needs_activation or order.pay_in_flight or order.state is not OrderState.PAYING:
            return False
        if order.refunds or order.next_voucher_retry_at_ms is not None:
            return False
        for leg in order.legs:
            if leg.status is not (LegStatus.PAYING if leg.is_cash else LegStatus.HELD):
                return False
        asked = order.confirm_query_at_ms
        return asked is None or (self.ctx.runtime.now_ms() - asked
                                 >= self.ctx.policy.confirm_query_interval_ms)

    def passive_state(self) -> dict[TimerKind, TimerHandle] | None:
        if self.order is None or self.order.is_settled:
            return None
        return self.timers

    def handed_over(self) -> None:
        self.timers = {}  # the next actor's now: this one's on_stop must not cancel them

    def cancel_timers(self) -> None:
        for handle in self.timers.values():
            handle.cancel()
        self.timers.clear()

    def handle(self, message: Any) -> Any:
        if isinstance(message, Claimed):
            return self._handle_claimed(message)
        if self.order is None:
            raise UnknownOrder(f"no payment order {self.key[1]}")
        if not isinstance(message, _EVENTS):
            raise InvalidRequest(f"an order cannot handle {type(message).__name__}")
        if self.needs_activation:
            self.needs_activation = False
            if not isinstance(message, Activate):
                self._apply(Activate())
        return self._apply(message)

    def _handle_claimed(self, message: Claimed) -> Any:
        """An event whose asker may have given up (``actors.claim``): handled only if the
        asker did not withdraw it, and its outcome handed over for an asker still waiting."""
        if not message.claim.take():
            raise Overloaded("its asker gave up waiting: withdrawn, not handled")
        try:
            result = self.handle(message.event)
        except BaseException as error:
            message.claim.finish(error)
            raise
        message.claim.finish(self.reply(result))
        return result

    def reply(self, result: Any) -> OrderView:
        assert isinstance(result, PaymentOrder)
        return OrderView.of(result)

    def _apply(self, event: Any) -> PaymentOrder:
        """Decide, commit, take the new state, then act: in that order, whatever fails."""
        assert self.order is not None
        now_ms = self.ctx.runtime.now_ms()
        decision = decide(self.order, event, now_ms=now_ms, policy=self.ctx.policy)
        changed = decision.order.version != self.order.version
        transitions, postings = self.unsaved_transitions, self.unsaved_postings
        if changed:
            transitions = [*transitions, *decision.transitions]
            postings = [*postings, *postings_for(self.order, decision.order,
                                                 decision.transitions,
                                                 fee_ppm=self.ctx.config.fee_ppm)]
        # Commit unless this decision may wait (_may_wait_to_save); and commit what earlier
        # decisions left waiting before anything acts on this one or answers an asker. Kept
        # only once committed or deliberately deferred: a failed commit leaves this actor
        # exactly as it was (the asker's retry decides again, and writes it once).
        saved = False
        if (changed and not self._may_wait_to_save(decision)) or (
                transitions and (decision.effects or self.answering)):
            was = self.durable
            self._save(decision.order, transitions, postings, now_ms)
            saved = True
            self._observe_saved(was, decision.order, now_ms)
        elif changed:
            self.unsaved_transitions, self.unsaved_postings = transitions, postings
        before, self.order = self.order, decision.order
        if saved and decision.transitions:
            self.ctx.notifications.kick()
        self._log(event, decision)
        if (before.next_voucher_retry_at_ms is not None and self.order.owes_follow_up
                and self.order.next_voucher_retry_at_ms is None):
            self._log_sentinel_stopped()
        self._carry_out_all(decision, now_ms)
        return self.order

    def _carry_out_all(self, decision: Decision, now_ms: int) -> None:
        """Carry out a committed decision's effects; one failing must not lose the others.

        Committed but not all carried out: activate again later, which re-issues every
        in-flight effect (all idempotent), backing off from ``EFFECT_RETRY_FIRST_MS`` to
        ``EFFECT_RETRY_MAX_MS``. A failure that stays (``EFFECT_RETRIES_MAX`` retries in a
        row) stops the retries with an error logged: the order is resumed, and its effects
        re-issued, at the next ``Engine.open``; its queries, timers and the voucher sentinel
        go on meanwhile."""
        assert self.order is not None
        failed = 0
        for effect in decision.effects:
            try:
                self._carry_out(effect)
            except EngineClosed:
                raise
            except Exception as error:
                failed += 1
                self.log.error("effect.failed", order_id=self.order.order_id,
                               effect=type(effect).__name__, error=repr(error))
        if not failed:
            if decision.effects:
                self.effect_retries = 0
            return
        if self.effect_retries >= EFFECT_RETRIES_MAX:
            self.log.error("effect.retries_exhausted", order_id=self.order.order_id,
                           retries=self.effect_retries)
            return
        delay_ms = min(EFFECT_RETRY_FIRST_MS << self.effect_retries, EFFECT_RETRY_MAX_MS)
        self.effect_retries += 1
        self.tell_later(now_ms + delay_ms, Activate())

    def _may_wait_to_save(self, decision: Decision) -> bool:
        """True if this decision may ride with the next commit instead of its own.

        Only a voucher's answer that changes nothing but its leg (``trying -> held`` while
        another leg's Try is out, ``confirming -> confirmed`` while another Confirm is):
        nothing acts on it (no effect, no reply, no event, the order neither changes state
        nor settles), and if it is lost in a crash the order's activation re-sends that
        leg's command, whose fence answers the same again. Persist-before-act holds: every
        effect still goes out after every decision before it is durable. Saves a commit
        per voucher leg but the last, twice per payment.
        """
        if decision.effects or self.answering or not decision.transitions:
            return False
        before, after = self.order, decision.order
        assert before is not None
        if after.state is not before.state or after.is_settled:
            return False
        return all(t.entity.startswith("leg:") and (t.from_state, t.to_state) in _QUIET_LEG_STEPS
                   for t in decision.transitions)

    def _save(self, order: PaymentOrder, transitions: list[Transition],
              postings: list[Posting], now_ms: int) -> None:
        """Commit ``order`` with every change decided since the last commit."""
        self.ctx.store.save_order(
            order, transitions, now_ms, postings, before=self.durable,
            skew_ledger="ledger-unbalanced" in self.ctx.config.planted_bugs)
        self.durable, self.unsaved_transitions, self.unsaved_postings = order, [], []

    def _observe_saved(self, was: PaymentOrder | None, order: PaymentOrder, now_ms: int
                       ) -> None:
        """Tell the observer (``actors.observe``) what this commit finished: the payment's
        final state (once: on the commit that made it final) and its settling. After the
        commit, on this actor's thread; a failing observer changes nothing here."""
        observer = self.ctx.observer
        if observer is NO_OBSERVER or was is None:
            return
        final = order.state in TERMINAL_STATES
        if final and (was.state not in TERMINAL_STATES
                      or "metrics-double-count" in self.ctx.config.planted_bugs):
            notify(observer.payment_finished, order.order_id, _channel_of(order),
                   order.state.value)
        if order.is_settled and not was.is_settled and not order.refunds:
            notify(observer.payment_settled, order.order_id, _channel_of(order),
                   order.state.value, order.created_at_ms, now_ms)

    def _log(self, event: Any, decision: Decision) -> None:
        """Log the decision; a failing log never undoes or blocks a committed decision."""
        order = decision.order
        try:
            if decision.transitions and self.log.is_enabled_for(logging.INFO):
                for t in decision.transitions:
                    self.log.info("transition", order_id=order.order_id, part=t.entity,
                                  from_state=t.from_state, to_state=t.to_state, cause=t.cause,
                                  on=type(event).__name__)
            elif not decision.transitions and self.log.is_enabled_for(logging.DEBUG):
                self.log.debug("event", order_id=order.order_id, on=type(event).__name__,
                               note=decision.note)
        except Exception:
            pass

    def _log_sentinel_stopped(self) -> None:
        """The sentinel's bounded re-sends are used up with follow-ups still owed: loudly."""
        assert self.order is not None
        try:
            for owed in owed_commands(self.order):
                self.log.error("sentinel.stopped", order_id=owed.order_id, leg=owed.leg_no,
                               refund_id=owed.refund_id, account_id=owed.account_id,
                               operation=owed.operation, status=owed.status,
                               attempts=owed.attempts,
                               note="still owed: listed by Engine.owed(), re-sent at next open")
        except Exception:
            pass

    def _carry_out(self, effect: Effect) -> None:
        """Run one effect. Called only after the decision that produced it was committed."""
        assert self.order is not None
        order_id = self.order.order_id
        match effect:
            case (TryHold() | ConfirmHold() | CancelHold() | DebitVoucher() | ReturnVoucher()
                  | CreditVoucher() | ClawBack()):
                self.ctx.voucher_link.request(effect.account_id, FromOrder(order_id, effect))
            case ArmTimer():
                old = self.timers.pop(effect.timer, None)
                if old is not None:
                    old.cancel()
                self.timers[effect.timer] = self.tell_later(
                    effect.due_at_ms, TimerFired(effect.timer, effect.token))
            case PayCash():
                self._pay(effect)
            case QueryCash():
                self._call_channel(effect.channel, effect.payment_serial, ResultSource.QUERY,
                                   lambda ch: ch.query(effect.payment_serial), "query")
            case QueryCharge():
                channel = self.ctx.channels[effect.channel]
                directory, key, txn = self.ctx.directory, self.key, effect.channel_txn_id
                serial = effect.payment_serial
                self.ctx.runtime.run_io(
                    effect.channel,
                    timed(self.ctx.observer, effect.channel, "query_charge",
                          lambda: channel.query_charge(serial, txn)),
                    lambda reply: directory.tell(key, query_charge_result(channel, txn, reply,
                                                                          serial)))
            case CloseCash():
                self._call_channel(effect.channel, effect.payment_serial, ResultSource.CLOSE,
                                   lambda ch: ch.close(effect.payment_serial), "close")
            case ChooseRoute():
                self._choose_route(effect)
            case RefundCash():
                self._call_refund(effect.channel, effect.refund_id, ResultSource.SYNC,
                                  lambda ch: ch.refund(effect.payment_serial, effect.refund_id,
                                                       effect.amount_minor, effect.currency),
                                  "refund")
            case QueryRefund():
                self._call_refund(effect.channel, effect.refund_id, ResultSource.QUERY,
                                  lambda ch: ch.query_refund(effect.payment_serial,
                                                             effect.refund_id), "query_refund")
            case AuthoriseCash() | CaptureCash() | VoidCash() | QueryAuthorisation():
                self._call_authorisation(effect)

    def _call_authorisation(self, effect: AuthoriseCash | CaptureCash | VoidCash
                            | QueryAuthorisation) -> None:
        """One ``AuthorisationChannel`` call on the channel's I/O lane; its answer (or its
        exception: no answer) comes back to this order as an ``AuthorisationResult``."""
        channel: Any = self.ctx.channels[effect.channel]
        directory, key, serial = self.ctx.directory, self.key, effect.payment_serial
        call: Any
        match effect:
            case AuthoriseCash():
                op = AuthorisationOp.AUTHORISE
                call = lambda: channel.authorise(  # noqa: E731
                    serial, effect.amount_minor, effect.currency, effect.title, effect.details)
            case CaptureCash():
                op = AuthorisationOp.CAPTURE
                call = lambda: channel.capture(  # noqa: E731
                    serial, effect.capture_id, effect.amount_minor)
            case VoidCash():
                op = AuthorisationOp.VOID
                call = lambda: channel.void(serial)  # noqa: E731
            case QueryAuthorisation():
                op = AuthorisationOp.QUERY
                call = lambda: channel.query_authorisation(serial)  # noqa: E731
        self.ctx.runtime.run_io(
            effect.channel, timed(self.ctx.observer, effect.channel,
                                  "query_authorisation" if op is AuthorisationOp.QUERY
                                  else op.value, call),
            lambda reply: directory.tell(key, authorisation_result(op, reply, serial)))

    def _pay(self, effect: PayCash) -> None:
        """Call ``pay`` on the channel's lane; the serial counts as in flight, process-wide,
        until the call has come back (see ``PaysInFlight``)."""
        channel = self.ctx.channels[effect.channel]
        directory, key, serial = self.ctx.directory, self.key, effect.payment_serial
        in_flight = self.ctx.pays_in_flight

        health = self.ctx.health

        def answered(reply: Any) -> None:
            in_flight.discard(serial)
            health.record(effect.channel, communicated(reply, channel.pay_codes))
            directory.tell(key, cash_result(channel, reply, ResultSource.SYNC,
                                            payment_serial=serial))

        in_flight.add(serial)
        try:
            self.ctx.runtime.run_io(effect.channel, timed(
                self.ctx.observer, effect.channel, "pay", lambda: call_pay(
                    channel, serial, effect.amount_minor, effect.currency, effect.title,
                    effect.details)), answered)
        except BaseException:
            in_flight.discard(serial)  # never started: nothing is in flight
            raise

    def _call_channel(self, name: str, serial: str, source: ResultSource, call: Any,
                      operation: str) -> None:
        channel = self.ctx.channels[name]
        directory, key, health = self.ctx.directory, self.key, self.ctx.health

        def answered(reply: Any) -> None:
            health.record(name, communicated(reply, channel.pay_codes))
            directory.tell(key, cash_result(channel, reply, source, payment_serial=serial))

        self.ctx.runtime.run_io(name, timed(self.ctx.observer, name, operation,
                                            lambda: call(channel)), answered)

    def _choose_route(self, effect: ChooseRoute) -> None:
        """The next route of a falling-back payment (``actors.routes``), told back to this
        order as ``Rerouted``: a message, so the choice is decided and persisted like any
        other event. No route left is an answer too (``channel=None``). On this actor's
        thread: the choice reads the breakers (a lock) and blocks on nothing."""
        assert self.order is not None
        try:
            choice = choose_for(self.ctx, effect.method, effect.amount_minor, effect.currency,
                                self.order.pay_details, effect.order_id, tried=effect.excluded)
        except NoRoute as error:
            self.ctx.directory.tell(self.key, Rerouted(None, error.message))
            return
        self.ctx.directory.tell(self.key, Rerouted(choice.channel, choice.cause))

    def _call_refund(self, name: str, refund_id: str, source: ResultSource, call: Any,
                     operation: str) -> None:
        channel = self.ctx.channels[name]
        directory, key = self.ctx.directory, self.key
        self.ctx.runtime.run_io(
            name, timed(self.ctx.observer, name, operation, lambda: call(channel)),
            lambda reply: directory.tell(key, refund_result(channel, refund_id, reply, source)),
        )


def _channel_of(order: PaymentOrder) -> str:
    """The channel label of an order for metrics: its cash leg's channel, else ``none``."""
    cash = order.cash_leg
    return (cash.channel if cash is not None else None) or "none"
