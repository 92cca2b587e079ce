"""The pure core of a pump pre-authorisation: ``split_capture`` and ``decide`` under any
sequence of captures, voids, expiries, timers and channel answers (late, twice, lost).

A small world answers the order's effects: voucher accounts with the real voucher functions
(a partial Confirm posts part of a hold and releases the rest) and a wallet that keeps its
own authorisation. Whatever happens: captured <= authorised, at most one capture is ever
decided, every refusal is typed and changes nothing, the vouchers posted plus released equal
what was held, and the wallet captured exactly what the order says it charged.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from payengine.engine import voucher as vo
from payengine.engine.errors import InvalidAmount, PaymentError
from payengine.engine.order import (
    AccountUnit,
    Activate,
    ArmTimer,
    Authorisation,
    AuthorisationOp,
    AuthorisationResult,
    AuthorisationStatus,
    AuthoriseCash,
    CancelHold,
    CaptureAuthorisation,
    CaptureCash,
    CashPart,
    ConfirmHold,
    LegStatus,
    OrderPolicy,
    OrderState,
    PaymentOrder,
    PaymentRequest,
    QueryAuthorisation,
    TimerFired,
    TimerKind,
    TryHold,
    VoidAuthorisation,
    VoidCash,
    VoucherOp,
    VoucherPart,
    VoucherReply,
    build_order,
    decide,
    split_capture,
)

A = AuthorisationStatus
T0 = 1_700_000_000_000
TTL = 60_000
POLICY = OrderPolicy(authorisation_ttl_ms=TTL, query_schedule_ms=(1_000, 2_000, 4_000))
ACCOUNTS = {"rp": AccountUnit("CNY", None), "pts": AccountUnit("POINTS", 10)}


# --------------------------------------------------------------------------- the split


@st.composite
def authorisations(draw: st.DrawFn) -> tuple[Authorisation, int]:
    cash = draw(st.integers(1, 50_000))
    legs = [(0, cash, cash)]
    if draw(st.booleans()):
        rp = draw(st.integers(1, 5_000))
        legs.append((1, rp, rp))
    if draw(st.booleans()):
        pts = draw(st.integers(1, 500))
        per = draw(st.sampled_from([1, 10, 100]))
        legs.append((len(legs), pts, pts * per))
    total = sum(v for _, _, v in legs)
    return Authorisation(total, tuple(legs)), cash


@given(authorisations(), st.data(), st.sampled_from(["vouchers_first", "cash_first"]))
def test_a_split_takes_exactly_the_amount_never_more_than_a_leg_authorised(
        auth_and_cash: tuple[Authorisation, int], data: st.DataObject, order: str) -> None:
    auth, _ = auth_and_cash
    amount = data.draw(st.integers(1, auth.authorised_minor))
    try:
        shares = split_capture(auth, amount, 0, order)
    except InvalidAmount:
        # only when whole points cannot make it and every money leg is full
        money_room = sum(v for n, u, v in auth.legs if u == v)
        assert amount > money_room
        return
    assert sum(v for _, v in shares.values()) == amount
    for leg_no, units, value in auth.legs:
        taken_units, taken_value = shares[leg_no]
        assert 0 <= taken_units <= units and 0 <= taken_value <= value
        assert taken_value * units == taken_units * value  # whole units at the leg's rate


def test_vouchers_first_uses_the_vouchers_before_the_cash_and_cash_first_the_reverse() -> None:
    auth = Authorisation(10_600, ((0, 10_000, 10_000), (1, 100, 100), (2, 50, 500)))
    assert split_capture(auth, 555, 0, "vouchers_first") == {2: (50, 500), 1: (55, 55), 0: (0, 0)}
    assert split_capture(auth, 10_555, 0, "cash_first") == {0: (10_000, 10_000), 2: (50, 500),
                                                            1: (55, 55)}
    assert split_capture(auth, 9_000, 0, "cash_first") == {0: (9_000, 9_000), 2: (0, 0),
                                                           1: (0, 0)}


def test_a_capture_that_whole_points_cannot_make_is_refused() -> None:
    auth = Authorisation(1_500, ((0, 1_000, 1_000), (1, 50, 500)))  # 10 fen a point
    with pytest.raises(InvalidAmount):
        split_capture(auth, 1_005, 0, "cash_first")  # cash full, 5 fen of half a point


# --------------------------------------------------------------------------- the world


@dataclass
class World:
    """The order's outside: voucher accounts and the wallet's authorisation."""

    rng: random.Random
    accounts: dict[str, vo.VoucherAccount] = field(default_factory=dict)
    fences: dict[tuple[str, vo.FenceKey], vo.Fence] = field(default_factory=dict)
    wallet: AuthorisationStatus = A.NOT_FOUND
    authorised: int = 0
    captured: int = 0
    capture_ids: set[str] = field(default_factory=set)
    inbox: list[object] = field(default_factory=list)
    now: int = T0

    def next_event(self, *, at_random: bool) -> tuple[int, object]:
        """Any event due within 5 s (answers out of order), else the earliest (time passes)."""
        self.inbox.sort(key=lambda item: item[0])  # type: ignore[index]
        soon = [i for i, item in enumerate(self.inbox)
                if item[0] <= self.now + 5_000]  # type: ignore[index]
        at = self.rng.choice(soon) if at_random and soon else 0
        due, event = self.inbox.pop(at)  # type: ignore[misc]
        return due, event

    def carry_out(self, order: PaymentOrder, effects: tuple[object, ...]) -> None:
        for effect in effects:
            if isinstance(effect, ArmTimer):
                self.inbox.append((effect.due_at_ms, TimerFired(effect.timer, effect.token)))
                continue
            reply = self._answer(order, effect)
            if reply is None:
                continue
            lost, twice = self.rng.random() < 0.2, self.rng.random() < 0.2
            if not lost:
                self.inbox.append((self.now, reply))
            if twice:
                self.inbox.append((self.now + self.rng.randint(0, 5_000), reply))

    def _answer(self, order: PaymentOrder, effect: object) -> object | None:
        match effect:
            case TryHold() | ConfirmHold() | CancelHold():
                return self._voucher(order, effect)
            case AuthoriseCash():
                if self.wallet is A.NOT_FOUND:
                    self.wallet = A.DECLINED if self.rng.random() < 0.1 else A.AUTHORISED
                    self.authorised = effect.amount_minor
                return self._auth(AuthorisationOp.AUTHORISE, order)
            case CaptureCash():
                if self.wallet is A.AUTHORISED:
                    assert effect.amount_minor <= self.authorised
                    self.wallet, self.captured = A.CAPTURED, effect.amount_minor
                    self.capture_ids.add(effect.capture_id)
                return self._auth(AuthorisationOp.CAPTURE, order)
            case VoidCash():
                if self.wallet in (A.AUTHORISED, A.NOT_FOUND):
                    self.wallet = A.VOIDED
                return self._auth(AuthorisationOp.VOID, order)
            case QueryAuthorisation():
                return self._auth(AuthorisationOp.QUERY, order)
        raise AssertionError(f"unexpected effect {effect}")

    def _auth(self, op: AuthorisationOp, order: PaymentOrder) -> AuthorisationResult:
        amount = {A.AUTHORISED: self.authorised, A.CAPTURED: self.captured}.get(self.wallet)
        return AuthorisationResult(op, self.wallet, amount or None, order.payment_serial)

    def _voucher(self, order: PaymentOrder, effect: TryHold | ConfirmHold | CancelHold
                 ) -> VoucherReply:
        key = (effect.account_id, effect.fence)
        account, fence = self.accounts[effect.account_id], self.fences.get(key)
        try:
            match effect:
                case TryHold():
                    out = vo.try_hold(account, fence, key=effect.fence, amount=effect.amount,
                                      order_id=order.order_id,
                                      expires_at_ms=effect.expires_at_ms, now_ms=self.now)
                    op = VoucherOp.TRY
                case ConfirmHold():
                    out = vo.confirm(account, fence, key=effect.fence, now_ms=self.now,
                                     amount=effect.amount)
                    op = VoucherOp.CONFIRM
                case CancelHold():
                    out = vo.cancel(account, fence, key=effect.fence, order_id=order.order_id,
                                    now_ms=self.now)
                    op = VoucherOp.CANCEL
        except PaymentError as error:
            return VoucherReply(effect.leg_no, effect.fence, _op(effect), False, error.code)
        self.accounts[effect.account_id] = out.account
        if out.fence is not None:
            self.fences[key] = out.fence
        return VoucherReply(effect.leg_no, effect.fence, op, True)


def _op(effect: object) -> VoucherOp:
    return {TryHold: VoucherOp.TRY, ConfirmHold: VoucherOp.CONFIRM,
            CancelHold: VoucherOp.CANCEL}[type(effect)]


def _new_order() -> PaymentOrder:
    request = PaymentRequest(
        merchant_id="m", merchant_order_no="n", user_id="u", currency="CNY",
        total_minor=12_000, title="Pump", cash=CashPart(10_000, "wechat"),
        vouchers=(VoucherPart("rp", 1_000), VoucherPart("pts", 100)), authorise=True)
    return build_order(request, order_id="o1", payment_serial="s1", now_ms=T0,
                       accounts=ACCOUNTS, policy=POLICY)


COMMANDS = st.lists(st.tuples(
    st.sampled_from(["deliver"] * 12 + ["capture"] * 4 + ["void", "time", "activate"]),
    st.integers(0, 13_000), st.sampled_from(["c1", "c2"])), max_size=60)


@settings(max_examples=150, deadline=None)
@given(COMMANDS, st.integers(0, 2**32))
def test_any_sequence_keeps_capture_within_authorisation_once_and_every_voucher_accounted(
        commands: list[tuple[str, int, str]], seed: int) -> None:
    world = World(random.Random(seed))
    world.accounts["rp"] = vo.fund(vo.VoucherAccount("rp", "CNY", None), 5_000)
    world.accounts["pts"] = vo.fund(vo.VoucherAccount("pts", "POINTS", 10), 500)
    order = _new_order()
    decision = decide(order, Activate(), now_ms=world.now, policy=POLICY)
    order = decision.order
    world.carry_out(order, decision.effects)
    decided_captures: set[str] = set()
    for command, amount, capture_id in [*commands, *[("drain", 0, "")] * 200]:
        event: object
        if command in ("deliver", "drain"):
            if not world.inbox:
                if command == "drain":
                    break
                continue
            due, event = world.next_event(at_random=command == "deliver")
            world.now = max(world.now, due)
        elif command == "capture":
            event = CaptureAuthorisation(capture_id, amount)
        elif command == "void":
            event = VoidAuthorisation()
        elif command == "time":
            world.now += amount
            continue
        else:
            event = Activate()
        before = order
        try:
            decision = decide(order, event, now_ms=world.now, policy=POLICY)  # type: ignore[arg-type]
        except PaymentError:
            assert order == before  # a refusal changes nothing (decide is pure)
            continue
        order = decision.order
        world.carry_out(order, decision.effects)
        a = order.authorisation
        assert a is not None
        assert order.total_minor <= a.authorised_minor == 12_000
        if a.capture_id is not None:
            decided_captures.add(a.capture_id)
        assert len(decided_captures) <= 1
    a = order.authorisation
    assert a is not None
    assert len(world.capture_ids) <= 1 and world.capture_ids <= decided_captures
    if order.is_settled:
        _assert_settled_accounts(order, world)


def _assert_settled_accounts(order: PaymentOrder, world: World) -> None:
    """Posted + released == held on every voucher; the wallet charged what the order did."""
    for account_id, account in world.accounts.items():
        assert account.held == 0, account
        leg = next(leg for leg in order.legs if leg.account_id == account_id)
        spent = account.spent
        if order.state is OrderState.SUCCEEDED:
            assert spent == leg.amount, (leg, account)
        else:
            assert spent == 0, (order.state, account)
    cash = order.cash_leg
    assert cash is not None
    if order.state is OrderState.SUCCEEDED:
        assert world.captured == cash.amount and (cash.amount == 0) == (
            cash.status is LegStatus.VOIDED)
        assert sum(leg.value_minor for leg in order.legs) == order.total_minor
    else:
        assert world.captured == 0 and world.wallet is not A.AUTHORISED


def test_an_expiry_timer_voids_an_authorised_order_and_a_late_capture_is_refused() -> None:
    from payengine.engine.errors import AuthorisationVoided
    order = _authorised_order()
    with pytest.raises(AuthorisationVoided):  # expired, though its timer has not run yet
        decide(order, CaptureAuthorisation("c", 1), now_ms=T0 + TTL, policy=POLICY)
    early = decide(order, TimerFired(TimerKind.CLOSE, 0), now_ms=T0 + TTL - 1, policy=POLICY)
    assert not early.changed
    expired = decide(order, TimerFired(TimerKind.CLOSE, 0), now_ms=T0 + TTL, policy=POLICY)
    assert expired.order.state is OrderState.VOIDING
    assert expired.order.cause == "authorisation_expired"
    assert VoidCash("wechat", "s1") in expired.effects
    assert {type(e) for e in expired.effects} >= {CancelHold, VoidCash}
    with pytest.raises(AuthorisationVoided):
        decide(expired.order, CaptureAuthorisation("c", 1), now_ms=T0 + TTL, policy=POLICY)


def test_not_found_while_voiding_is_no_proof_and_sends_the_void_again() -> None:
    """Seed 1007: a void decided while the authorise was in flight lost its request; a query
    answered "not found" before the authorise landed; the order took it for voided and the
    wallet kept the authorisation. Only the wallet's own voided (or declined) answer ends it."""
    order = _new_order()
    for event in (Activate(),
                  VoucherReply(1, order.fence_of(order.leg(1)), VoucherOp.TRY, True),
                  VoucherReply(2, order.fence_of(order.leg(2)), VoucherOp.TRY, True)):
        order = decide(order, event, now_ms=T0, policy=POLICY).order
    assert order.state is OrderState.AUTHORISING
    voiding = decide(order, VoidAuthorisation(), now_ms=T0 + 1, policy=POLICY).order
    assert voiding.state is OrderState.VOIDING
    found_nothing = decide(voiding, AuthorisationResult(AuthorisationOp.QUERY, A.NOT_FOUND,
                                                        payment_serial="s1"),
                           now_ms=T0 + 2, policy=POLICY)
    assert found_nothing.order.state is OrderState.VOIDING
    assert found_nothing.order.cash_leg is not None
    assert found_nothing.order.cash_leg.status is LegStatus.VOIDING
    assert list(found_nothing.effects) == [VoidCash("wechat", "s1")]
    voided = decide(found_nothing.order, AuthorisationResult(AuthorisationOp.VOID, A.VOIDED,
                                                             payment_serial="s1"),
                    now_ms=T0 + 3, policy=POLICY)
    assert voided.order.state is OrderState.CLOSED


def _authorised_order() -> PaymentOrder:
    order = _new_order()
    for event in (Activate(),
                  VoucherReply(1, order.fence_of(order.leg(1)), VoucherOp.TRY, True),
                  VoucherReply(2, order.fence_of(order.leg(2)), VoucherOp.TRY, True),
                  AuthorisationResult(AuthorisationOp.AUTHORISE, A.AUTHORISED, 10_000, "s1")):
        order = decide(order, event, now_ms=T0, policy=POLICY).order
    assert order.state is OrderState.AUTHORISED
    return order


def test_only_the_capture_s_own_refusal_fails_a_capture_never_a_late_query_answer() -> None:
    """A query sent while authorising may answer "not found" after the capture was decided
    (the I/O lane's workers answer out of order): failing then would release the vouchers
    while the capture lands and charges."""
    capturing = decide(_authorised_order(), CaptureAuthorisation("c1", 11_000), now_ms=T0 + 1,
                       policy=POLICY).order
    assert capturing.state is OrderState.CAPTURING
    for late in (AuthorisationResult(AuthorisationOp.QUERY, A.NOT_FOUND, payment_serial="s1"),
                 AuthorisationResult(AuthorisationOp.AUTHORISE, A.DECLINED, payment_serial="s1"),
                 AuthorisationResult(AuthorisationOp.CAPTURE, A.NOT_FOUND, payment_serial="s1")):
        outcome = decide(capturing, late, now_ms=T0 + 2, policy=POLICY)
        assert outcome.order.state is OrderState.CAPTURING, late
        assert not [e for e in outcome.effects if isinstance(e, CancelHold)], late
    refused = decide(capturing, AuthorisationResult(AuthorisationOp.CAPTURE, A.DECLINED,
                                                    payment_serial="s1"),
                     now_ms=T0 + 3, policy=POLICY)
    assert refused.order.state is OrderState.FAILED
    # the wallet keeps its authorisation after refusing a capture: the order voids it and
    # stays unsettled until the wallet says voided
    assert VoidCash("wechat", "s1") in refused.effects
    assert refused.order.cash_leg is not None
    assert refused.order.cash_leg.status is LegStatus.VOIDING and not refused.order.is_settled
    voided = decide(refused.order, AuthorisationResult(AuthorisationOp.VOID, A.VOIDED,
                                                       payment_serial="s1"),
                    now_ms=T0 + 4, policy=POLICY).order
    assert voided.state is OrderState.FAILED and voided.cash_leg is not None
    assert voided.cash_leg.status is LegStatus.VOIDED


def test_a_void_answering_not_found_is_asked_again_on_the_schedule_not_at_once() -> None:
    voiding = decide(_authorised_order(), VoidAuthorisation(), now_ms=T0 + 1,
                     policy=POLICY).order
    outcome = decide(voiding, AuthorisationResult(AuthorisationOp.VOID, A.NOT_FOUND,
                                                  payment_serial="s1"),
                     now_ms=T0 + 2, policy=POLICY)
    assert outcome.order.state is OrderState.VOIDING
    assert not [e for e in outcome.effects if isinstance(e, VoidCash)]


def test_a_voucher_at_an_external_provider_cannot_be_pre_authorised() -> None:
    from payengine.engine.errors import AuthorisationUnsupported

    request = PaymentRequest(
        merchant_id="m", merchant_order_no="n", user_id="u", currency="CNY",
        total_minor=15_000, title="Pump", cash=CashPart(10_000, "wechat"),
        vouchers=(VoucherPart("carrier-x:13800000000", 5_000),), authorise=True)
    policy = OrderPolicy(authorisation_ttl_ms=TTL, voucher_providers=frozenset({"carrier-x"}))
    with pytest.raises(AuthorisationUnsupported, match="carrier-x"):
        build_order(request, order_id="o1", payment_serial="s1", now_ms=T0,
                    accounts={"carrier-x:13800000000": AccountUnit("CNY", None)},
                    policy=policy)


def test_a_capture_of_nothing_retried_is_answered_not_refused() -> None:
    from payengine.engine.errors import AuthorisationVoided

    voided = decide(_authorised_order(), CaptureAuthorisation("c0", 0), now_ms=T0 + 1,
                    policy=POLICY)
    assert voided.order.state is OrderState.VOIDING
    again = decide(voided.order, CaptureAuthorisation("c0", 0), now_ms=T0 + 2, policy=POLICY)
    assert not again.changed
    with pytest.raises(AuthorisationVoided):
        decide(voided.order, CaptureAuthorisation("c9", 0), now_ms=T0 + 2, policy=POLICY)
