"""A pump pre-authorisation's life cycle: the transitions of an order with an ``authorisation``.

Pure, like the rest of ``engine``: each function takes the decision being built
(``engine.order._Draft``) and adds transitions and effects to it. ``engine.order`` reaches
this module only through ``decide``'s dispatch (``on_capture``, ``on_void``, ``on_result``),
``_close`` (``on_close``), ``_timer`` (``on_query_due``), ``_start_cash`` (``start``),
``_activate`` (``reissue``), ``build_order`` (``check_shape``, ``refuse_provider_parts``,
``new_authorisation``) and ``_assert_consistent`` (``assert_consistent``). The values it
works with (the record, the events, the effects) are ``engine.authorisation``.

    ACCEPTED --holds placed--> AUTHORISING --authorised--> AUTHORISED --capture--> CAPTURING
        AUTHORISING --declined--> FAILED          CAPTURING --captured--> SUCCEEDED
        AUTHORISING|AUTHORISED --void / expiry--> VOIDING --voided--> CLOSED
        CAPTURING --capture declined--> FAILED

``engine.order`` imports this module at its end (this one builds on the draft and helpers
defined there), so either may be imported first.
"""

from __future__ import annotations

from collections.abc import Sequence

from payengine.engine.authorisation import (
    FLAG_NOTE_MAX,
    Authorisation,
    AuthorisationFlag,
    AuthorisationOp,
    AuthorisationResult,
    AuthorisationStatus,
    AuthoriseCash,
    CaptureAuthorisation,
    CaptureCash,
    QueryAuthorisation,
    VoidCash,
    split_capture,
)
from payengine.engine.channel_data import PayScenario
from payengine.engine.checks import check_id, shown
from payengine.engine.errors import (
    AlreadyCaptured,
    AuthorisationUnsupported,
    AuthorisationVoided,
    CaptureAboveAuthorised,
    IdempotencyConflict,
    IllegalTransition,
    InvalidAmount,
)
from payengine.engine.evolve import evolve
from payengine.engine.money import AMOUNT_MAX
from payengine.engine.order import (
    HOLD_MODES,
    ArmTimer,
    CancelHold,
    CloseCause,
    Leg,
    LegMode,
    LegStatus,
    OrderPolicy,
    OrderState,
    PaymentOrder,
    PaymentRequest,
    TimerKind,
    Trigger,
    VoucherPart,
    _arm_query,
    _close,
    _confirm,
    _Draft,
    _release_everything,
)
from payengine.engine.provider import provider_of

_AUTHORISATION_CASH_IN_FLIGHT = frozenset({LegStatus.AUTHORISING, LegStatus.CAPTURING,
                                           LegStatus.VOIDING})


def check_shape(request: PaymentRequest, vouchers: Sequence[VoucherPart]
                               ) -> None:
    """A pre-authorisation is a trade order with a cash part and held vouchers only."""
    if request.cash is None:
        raise AuthorisationUnsupported("a pre-authorisation needs a cash part (it is the "
                                       "part authorised at the channel)")
    if request.credit_account is not None:
        raise AuthorisationUnsupported("a recharge or transfer cannot be pre-authorised")
    if any(part.mode is LegMode.POST_DEDUCT for part in vouchers):
        raise AuthorisationUnsupported("a post_deduct voucher cannot be pre-authorised: it "
                                       "is debited after the cash; hold it (pre_deduct)")
    details = request.cash.details
    if details is not None and details.scenario is PayScenario.WITHHOLD:
        raise AuthorisationUnsupported("a withholding cannot be pre-authorised")


def refuse_provider_parts(request: PaymentRequest, policy: OrderPolicy) -> None:
    """An external provider's Confirm spends its whole hold (it has no partial confirm), so
    a capture short of it would spend more than the order charges: not pre-authorisable."""
    for part in request.vouchers:
        provider = provider_of(part.account_id, policy.voucher_providers)
        if provider is not None:
            raise AuthorisationUnsupported(
                f"voucher {part.account_id!r} is at external provider {provider!r}, whose "
                "Confirm spends the whole hold: it cannot be pre-authorised")


def new_authorisation(legs: Sequence[Leg], total: int) -> Authorisation:
    return Authorisation(total, tuple((leg.leg_no, leg.amount, leg.value_minor)
                                      for leg in legs))


def assert_consistent(order: PaymentOrder, policy: OrderPolicy) -> None:
    """Captured never exceeds authorised, per leg and in all; a capture is decided once."""
    a = order.authorisation
    assert a is not None
    assert all(leg.pays for leg in order.legs), order.order_id
    if "capture-above-authorisation" not in policy.planted_bugs:
        assert order.total_minor <= a.authorised_minor, (
            f"order {order.order_id} captures {order.total_minor} of {a.authorised_minor}")
        for leg_no, amount, value in a.legs:
            leg = order.leg(leg_no)
            assert 0 <= leg.amount <= amount and 0 <= leg.value_minor <= value, (
                f"order {order.order_id} leg {leg_no} takes more than it authorised")
    if a.capture_id is None:
        assert a.captured_minor is None and order.total_minor == a.authorised_minor
        assert order.state not in (OrderState.CAPTURING, OrderState.SUCCEEDED), order.state
    else:
        assert a.captured_minor == order.total_minor and a.captured_minor > 0, a


def _authorise(order: PaymentOrder, cash: Leg) -> AuthoriseCash:
    assert cash.channel is not None
    return AuthoriseCash(cash.channel, order.payment_serial, cash.amount, order.currency,
                         order.title, order.pay_details)


def start(d: _Draft) -> None:
    """Every hold is held: ask the channel to authorise the cash part."""
    cash = d.cash()
    assert cash is not None and cash.channel is not None, "a pre-authorisation has a cash leg"
    d.move(Trigger.AUTHORISATION_ASKED)
    d.set_leg(cash.leg_no, LegStatus.AUTHORISING, "authorise")
    d.effects.append(_authorise(d.order, d.order.leg(cash.leg_no)))
    _arm_query(d, attempt=0)


def _authorisation_command(order: PaymentOrder, cash: Leg
                           ) -> QueryAuthorisation | CaptureCash | VoidCash | None:
    """What the cash leg waits on, to ask again: the state of an authorisation asked for
    (asking to authorise again could hold the payer's money past the void), or the capture
    or void itself (idempotent, answered with the authorisation's state)."""
    assert cash.channel is not None
    a = order.authorisation
    match cash.status:
        case LegStatus.AUTHORISING:
            return QueryAuthorisation(cash.channel, order.payment_serial)
        case LegStatus.CAPTURING:
            assert a is not None and a.capture_id is not None
            return CaptureCash(cash.channel, order.payment_serial, a.capture_id, cash.amount)
        case LegStatus.VOIDING:
            return VoidCash(cash.channel, order.payment_serial)
    return None


def reissue(d: _Draft) -> None:
    """At a (re)start or an operator's retry (``Activate``): ask again what is in flight
    and re-arm its query schedule; afresh, the flag cleared, if it had run out or the
    authorisation was flagged (the bound is per start; a flag is raised again, as a new
    occurrence, if the fresh schedule ends unsettled or the wallet repeats another amount)."""
    order = d.order
    cash = order.cash_leg
    if cash is None:
        return
    command = _authorisation_command(order, cash)
    if command is None:
        return
    d.effects.append(command)
    if order.next_query_at_ms is not None and (
            order.authorisation is None or order.authorisation.flag is None):
        d.effects.append(ArmTimer(TimerKind.QUERY, order.next_query_at_ms, order.query_attempt))
    else:  # run out, or flagged (an operator's retry, a start): a fresh schedule, unflagged
        _unflag(d)
        _arm_query(d, attempt=0)


def on_capture(d: _Draft, event: CaptureAuthorisation) -> str:
    """Decide a capture: refused (typed, nothing changed) unless the order is authorised and
    the amount within the authorisation; the same capture again is answered the same."""
    order = d.order
    capture_id = check_id(event.capture_id, "capture_id")
    amount = event.amount_minor
    if isinstance(amount, bool) or not isinstance(amount, int) or not 0 <= amount <= AMOUNT_MAX:
        raise InvalidAmount(f"amount_minor must be an int 0..{AMOUNT_MAX}, got {shown(amount)}")
    a = order.authorisation
    if a is None:
        raise IllegalTransition(f"order {order.order_id} is not a pre-authorisation: there is "
                                "nothing to capture")
    if a.capture_id is not None:
        if capture_id != a.capture_id:
            raise AlreadyCaptured(f"order {order.order_id} was captured already (capture "
                                  f"{a.capture_id}, {a.captured_minor})")
        if amount != a.captured_minor:
            raise IdempotencyConflict(f"capture {capture_id} of order {order.order_id} took "
                                      f"{a.captured_minor}, not {amount}")
        return "duplicate: the same capture again"
    if order.state in (OrderState.VOIDING, OrderState.CLOSED):
        if amount == 0 and order.cause == _zero_capture_cause(capture_id):
            return "duplicate: the same capture of nothing again (it voided the order)"
        raise AuthorisationVoided(f"order {order.order_id} was voided ({order.cause}): "
                                  "nothing can be captured")
    if order.state is not OrderState.AUTHORISED:
        raise IllegalTransition(f"order {order.order_id} is {order.state.value}: only an "
                                "authorised order can be captured")
    if d.now_ms >= order.close_at_ms:  # expired; its close timer just has not run yet
        raise AuthorisationVoided(f"order {order.order_id}'s authorisation expired at "
                                  f"{order.close_at_ms}: nothing can be captured")
    bug = "capture-above-authorisation" in d.policy.planted_bugs
    if amount > a.authorised_minor and not bug:
        raise CaptureAboveAuthorised(f"order {order.order_id} authorised {a.authorised_minor}; "
                                     f"a capture of {amount} is above it")
    if amount == 0:
        return _void_authorisation(d, Trigger.VOID, _zero_capture_cause(capture_id))
    cash = d.cash()
    assert cash is not None
    shares = split_capture(a, amount, cash.leg_no, d.policy.capture_order, over_to_cash=bug)
    legs = tuple(evolve(leg, amount=shares[leg.leg_no][0], value_minor=shares[leg.leg_no][1])
                 for leg in order.legs)
    d.update(legs=legs, total_minor=amount,
             authorisation=evolve(a, capture_id=capture_id, captured_minor=amount))
    d.move(Trigger.CAPTURE, f"capture {capture_id}: {amount} of {a.authorised_minor}")
    for leg in d.legs(*HOLD_MODES):
        if leg.value_minor == 0 and leg.account_id is not None:  # no share: released now
            d.set_leg(leg.leg_no, LegStatus.CANCELLING, "captured short: no share")
            d.effects.append(CancelHold(leg.account_id, d.order.fence_of(leg), leg.leg_no))
    cash = d.order.leg(cash.leg_no)
    status = LegStatus.CAPTURING if cash.value_minor > 0 else LegStatus.VOIDING
    cash = d.set_leg(cash.leg_no, status, "capture" if cash.value_minor else "no cash share")
    command = _authorisation_command(d.order, cash)
    assert command is not None
    d.effects.append(command)
    _arm_query(d, attempt=0)
    return "applied"


def _zero_capture_cause(capture_id: str) -> str:
    """The cause of a void by a capture of 0: it names the capture, so its retry is known."""
    return f"void: capture {capture_id} of nothing"


def on_void(d: _Draft) -> str:
    """``Engine.void``: release everything; idempotent; refused once a capture is decided."""
    order = d.order
    if order.authorisation is None:
        raise IllegalTransition(f"order {order.order_id} is not a pre-authorisation: close it")
    state = order.state
    if state in (OrderState.CAPTURING, OrderState.SUCCEEDED) or (
            order.authorisation.capture_id is not None):
        raise AlreadyCaptured(f"order {order.order_id} is captured ({state.value}): it cannot "
                              "be voided (refund it)")
    if state in (OrderState.VOIDING, OrderState.CLOSED, OrderState.FAILED):
        return f"duplicate: the authorisation is {state.value} already"
    if state in (OrderState.ACCEPTED, OrderState.NEEDS_VERIFICATION):
        return _close(d, CloseCause.USER)  # nothing asked of the channel yet
    return _void_authorisation(d, Trigger.VOID, "void")


def on_close(d: _Draft, cause: CloseCause) -> str:
    """A close of an authorising or authorised order voids it: by the user (``void``) or by
    its expiry (the close timer at ``close_at_ms``: ``authorisation_expired``)."""
    state = d.order.state
    if state is OrderState.CAPTURING:
        if cause is CloseCause.USER:
            raise IllegalTransition(f"order {d.order.order_id} is being captured; it cannot "
                                    "be closed")
        return "ignored: the close timer found the authorisation being captured"
    if state is OrderState.VOIDING:
        return "duplicate: the authorisation is being voided already"
    if cause is CloseCause.USER:
        return _void_authorisation(d, Trigger.VOID, "void")
    return _void_authorisation(d, Trigger.AUTHORISATION_EXPIRED,
                               Trigger.AUTHORISATION_EXPIRED.value)


def _void_authorisation(d: _Draft, trigger: Trigger, cause: str) -> str:
    """Void: the channel's authorisation voided, every voucher hold released."""
    d.move(trigger, cause)
    cash = d.cash()
    assert cash is not None and cash.channel is not None
    channel = cash.channel
    d.set_leg(cash.leg_no, LegStatus.VOIDING, cause)
    d.effects.append(VoidCash(channel, d.order.payment_serial))
    _arm_query(d, attempt=0)
    _release_everything(d, cause)
    return "applied"


def on_result(d: _Draft, result: AuthorisationResult) -> str:
    order, cash = d.order, d.order.cash_leg
    if order.authorisation is None or cash is None:
        return "ignored: not a pre-authorisation"
    if result.payment_serial is not None and result.payment_serial != order.payment_serial:
        return f"stale: an answer about serial {result.payment_serial}"
    status = result.status
    if status is None or status is AuthorisationStatus.PENDING:
        return (f"ignored: {result.op.value} answered nothing decisive; the query schedule "
                "asks again")
    match cash.status:
        case LegStatus.AUTHORISING:
            return _authorising_answer(d, cash, result, status)
        case LegStatus.CAPTURING:
            return _capturing_answer(d, cash, result, status)
        case LegStatus.VOIDING:
            return _voiding_answer(d, cash, result, status)
    return f"duplicate: {result.op.value} says {status.value}, the cash leg is {cash.status.value}"


def _authorising_answer(d: _Draft, cash: Leg, result: AuthorisationResult,
                        status: AuthorisationStatus) -> str:
    why = result.reason or status.value
    if status is AuthorisationStatus.AUTHORISED:
        if result.amount_minor is not None and result.amount_minor != cash.amount:
            d.update(next_query_at_ms=None)
            return _void_authorisation(d, Trigger.VOID, f"void: authorised {result.amount_minor}"
                                                        f", {cash.amount} was asked")
        d.set_leg(cash.leg_no, LegStatus.AUTHORISED, "authorised",
                  channel_txn_id=result.channel_txn_id or cash.channel_txn_id)
        d.update(next_query_at_ms=None)
        d.move(Trigger.AUTHORISED)
        return "applied"
    if status is AuthorisationStatus.NOT_FOUND:
        if d.now_ms < d.order.close_at_ms:  # the authorise never reached it: ask again
            d.effects.append(_authorise(d.order, cash))
            return "applied: the authorisation asked again"
        return "ignored: not found, and the window is over (the close voids it)"
    if status is AuthorisationStatus.CAPTURED:
        return "ignored: a capture reported for an authorisation never captured"
    d.set_leg(cash.leg_no, LegStatus.UNPAID if status is AuthorisationStatus.DECLINED
              else LegStatus.VOIDED, why)
    d.update(next_query_at_ms=None)
    d.move(Trigger.AUTHORISATION_DECLINED, f"authorisation_declined: {why}")
    _release_everything(d, "authorisation declined")
    return "applied"


def _capturing_answer(d: _Draft, cash: Leg, result: AuthorisationResult,
                      status: AuthorisationStatus) -> str:
    if status is AuthorisationStatus.CAPTURED:
        if result.amount_minor is not None and result.amount_minor != cash.amount:
            if "capture-amount-believed" not in d.policy.planted_bugs:
                return _amount_mismatch(d, cash, result.amount_minor)
            cash = _believe_amount(d, cash, result.amount_minor)  # the planted bug
        d.set_leg(cash.leg_no, LegStatus.PAID, "captured",
                  channel_txn_id=result.channel_txn_id or cash.channel_txn_id)
        d.update(next_query_at_ms=None)
        _captured(d)
        return "applied"
    if status is AuthorisationStatus.AUTHORISED:
        return "ignored: the capture is not applied yet; it is asked again on the schedule"
    if result.op is not AuthorisationOp.CAPTURE or status is AuthorisationStatus.NOT_FOUND:
        # a late answer of an earlier call (a query sent while authorising) or a channel not
        # seeing the serial yet: only the capture's own refusal may fail a capture
        return (f"ignored: {result.op.value} says {status.value} while capturing; the "
                "capture is asked again on the schedule")
    why = result.reason or status.value
    # the wallet keeps its authorisation after refusing a capture: void it, so the payer's
    # money is not held until the wallet's own expiry (the leg voiding keeps the order
    # unsettled until the wallet says voided)
    assert cash.channel is not None
    _unflag(d)
    d.set_leg(cash.leg_no, LegStatus.VOIDING, f"capture refused ({why}): void")
    d.effects.append(VoidCash(cash.channel, d.order.payment_serial))
    _arm_query(d, attempt=0)
    d.move(Trigger.CAPTURE_DECLINED, f"capture_declined: {why}")
    _release_everything(d, "capture declined")
    return "applied"


def _amount_mismatch(d: _Draft, cash: Leg, said: int) -> str:
    """The wallet says it captured ``said``, not the ``cash.amount`` asked: never believed
    (the order would charge one amount while the wallet took another). The order stays
    capturing, flagged for a person (``capture_amount_mismatch``), and goes on asking on its
    schedule and then the sentinel's: a later answer with the amount asked settles it."""
    note = f"the wallet says it captured {said}, {cash.amount} was asked"
    _flag(d, AuthorisationFlag.AMOUNT_MISMATCH, note)
    return f"applied: flagged: {note}"


def _believe_amount(d: _Draft, cash: Leg, said: int) -> Leg:
    """The planted bug ``capture-amount-believed``: the cash share becomes what the wallet
    said it captured, the order's total with it."""
    a = d.order.authorisation
    assert a is not None
    total = d.order.total_minor - cash.amount + said
    legs = tuple(evolve(leg, amount=said, value_minor=said) if leg.leg_no == cash.leg_no
                 else leg for leg in d.order.legs)
    d.update(legs=legs, total_minor=total, authorisation=evolve(a, captured_minor=total))
    return d.order.leg(cash.leg_no)


def _flag(d: _Draft, flag: AuthorisationFlag, note: str) -> None:
    """Flag the authorisation for a person; an amount mismatch, the more specific, replaces
    an unsettled flag, never the other way round. Nothing changes if it is flagged so."""
    a = d.order.authorisation
    assert a is not None
    if a.flag is AuthorisationFlag.AMOUNT_MISMATCH and flag is not a.flag:
        return
    note = note[:FLAG_NOTE_MAX]
    if a.flag is None:
        d.update(authorisation=evolve(a, flag=flag, flag_note=note, flagged_at_ms=d.now_ms))
    elif (a.flag, a.flag_note) != (flag, note):
        d.update(authorisation=evolve(a, flag=flag, flag_note=note))


def _unflag(d: _Draft) -> None:
    """The cash leg starts another operation (a void after a refused capture, a capture or
    void asked afresh): a flag raised for the one before says nothing of it, and if it goes
    unsettled too it is flagged anew (a new occurrence for the attention queue)."""
    a = d.order.authorisation
    if a is not None and a.flag is not None:
        d.update(authorisation=evolve(a, flag=None, flag_note="", flagged_at_ms=0))


def _voiding_answer(d: _Draft, cash: Leg, result: AuthorisationResult,
                    status: AuthorisationStatus) -> str:
    if status in (AuthorisationStatus.AUTHORISED, AuthorisationStatus.CAPTURED):
        return (f"ignored: {result.op.value} says {status.value} while voiding; the void is "
                "asked again on the schedule")
    if status is AuthorisationStatus.NOT_FOUND:
        # not proof: an authorise may still be on its way (in flight, or its request slow).
        # The void itself records an unseen serial voided, so a late authorise is refused.
        if result.op is AuthorisationOp.VOID:  # the void's own answer: the query schedule
            return "ignored: the void says not found; it is asked again on the schedule"
        assert cash.channel is not None
        d.effects.append(VoidCash(cash.channel, d.order.payment_serial))
        return (f"applied: {result.op.value} says not found while voiding; the void is sent "
                "again, which fences a late authorise")
    d.set_leg(cash.leg_no, LegStatus.VOIDED, result.reason or "voided")
    d.update(next_query_at_ms=None)
    if d.order.state is OrderState.VOIDING:
        d.move(Trigger.VOIDED, d.order.cause)
    elif d.order.state is OrderState.CAPTURING:  # a capture with no cash share
        _captured(d)
    return "applied"


def _captured(d: _Draft) -> None:
    """The cash share is captured (or had none and is voided): succeed and confirm each
    voucher for its captured share."""
    assert d.order.state is OrderState.CAPTURING, d.order.state
    d.move(Trigger.CAPTURED, f"captured {d.order.total_minor}")
    for leg in d.legs(*HOLD_MODES):
        if leg.status is LegStatus.HELD:
            assert leg.value_minor > 0, leg
            d.set_leg(leg.leg_no, LegStatus.CONFIRMING, "captured")
            d.effects.append(_confirm(d.order, leg))


def on_query_due(d: _Draft, token: int) -> str:
    order, cash = d.order, d.order.cash_leg
    due = order.next_query_at_ms
    if cash is None or cash.status not in _AUTHORISATION_CASH_IN_FLIGHT or (
            token != order.query_attempt or due is None or d.now_ms < due):
        return "stale: query timer"
    schedule = len(d.policy.query_schedule_for(cash.channel))
    if token >= schedule:
        if cash.status is LegStatus.AUTHORISING:  # never known: void it, which is safe
            return _void_authorisation(d, Trigger.VOID, "void: the authorisation went "
                                                        "unanswered")
        return _sentinel_round(d, cash, token - schedule)
    command = _authorisation_command(order, cash)
    assert command is not None
    d.effects.append(command)
    _arm_query(d, token + 1)
    return "applied"


def _sentinel_round(d: _Draft, cash: Leg, rounds: int) -> str:
    """A capture or void decided stays decided: once its query schedule is over it is
    flagged (``authorisation_unsettled``) and the sentinel asks again every
    ``voucher_sentinel_interval_ms``, at most ``voucher_sentinel_attempts_max`` times; then
    the timer stops (still flagged), and every start of the order asks again afresh."""
    op = "capture" if cash.status is LegStatus.CAPTURING else "void"
    _flag(d, AuthorisationFlag.UNSETTLED, f"the {op} is unsettled after its query schedule")
    token = d.order.query_attempt
    if rounds >= d.policy.voucher_sentinel_attempts_max:
        d.update(next_query_at_ms=None, query_attempt=token + 1)
        return f"applied: the sentinel stopped asking after {rounds} rounds"
    command = _authorisation_command(d.order, cash)
    assert command is not None
    d.effects.append(command)
    due = d.now_ms + d.policy.voucher_sentinel_interval_ms
    d.update(query_attempt=token + 1, next_query_at_ms=due)
    d.effects.append(ArmTimer(TimerKind.QUERY, due, token + 1))
    return "applied"
