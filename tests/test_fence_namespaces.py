"""A caller's hold ids never reach the engine's own fences (issue 9, defect 2).

Every account keeps one fence per key. The engine's fences (an order leg's hold or debit, a
refund's voucher return) used to be string ids made with ':' (``<order_id>:<leg>``,
``<serial>-RF<n>:<leg>``) in the same id space as the caller's ``pre_hold`` ids, so a caller
who pre-held or released such an id first took the engine's place: the refund's voucher part
failed and the refund stayed ``unknown`` (the voucher spent for good), or an order's leg was
refused or silently adopted the caller's hold. Fences are now keyed by (scope, owner, leg),
and the public API reaches scope ``user`` only.

Through the public API on real actors and SQLite; ids are predictable (``CountingIds``) so the
tests know the engine's would-be fence names before it makes them.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from payengine import (
    CashPart,
    ChannelReply,
    Engine,
    EngineConfig,
    LegMode,
    OrderView,
    PaymentRequest,
    VoucherPart,
)
from tests.helpers import PAID, SLOW_POLICY, ScriptedChannel, wait_for

REFUND_OK = ChannelReply("SUCCESS", "SUCCESS")
FUNDED = 1_000_000
LONG_TTL_MS = 3_600_000


class CountingIds:
    """Order ``<prefix>ord-<n>`` with serial ``P<n>``: the test can name the engine's fences
    before it makes them. ``prefix`` may contain ':' (order ids no longer split on it)."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix
        self.orders = 0
        self.serials = 0
        self.holds = 0

    def new_order_id(self) -> str:
        self.orders += 1
        return f"{self.prefix}ord-{self.orders}"

    def new_payment_serial(self) -> str:
        self.serials += 1
        return f"P{self.serials}"

    def new_hold_id(self) -> str:
        self.holds += 1
        return f"hold-{self.holds}"

    def next_order(self) -> tuple[str, str]:
        """The (order id, payment serial) the next submit gets."""
        return f"{self.prefix}ord-{self.orders + 1}", f"P{self.serials + 1}"


def _open(path: Path, ids: CountingIds) -> tuple[Engine, ScriptedChannel]:
    channel = ScriptedChannel()
    channel.pay_reply = PAID
    channel.refund_reply = REFUND_OK
    engine = Engine.open(path, channels=[channel], policy=SLOW_POLICY,  # type: ignore[list-item]
                         config=EngineConfig(ask_timeout_s=5.0, duplicate_guard_window_ms=0),
                         ids=ids)
    return engine, channel


def _accounts(engine: Engine, who: str) -> tuple[str, str, str]:
    names = (f"{who}/red-packet", f"{who}/points", f"{who}/phone")
    engine.open_account(names[0], "CNY")
    engine.open_account(names[1], "POINTS", minor_per_unit=10)
    engine.open_account(names[2], "CNY")
    for name in names:
        engine.fund(name, FUNDED, funding_id=f"fund-{name}")
    return names


def _request(no: str, accounts: tuple[str, str, str],
             phone_mode: LegMode = LegMode.PRE_DEDUCT) -> PaymentRequest:
    """100.00 = 96.00 cash + 1.00 red packet (leg 1) + 20 points (leg 2) + 1.00 phone (leg 3)."""
    red_packet, points, phone = accounts
    return PaymentRequest(
        merchant_id="station-1", merchant_order_no=no, user_id="alice", currency="CNY",
        total_minor=10_000, title="Fuel", cash=CashPart(9_600, "wechat"),
        vouchers=(VoucherPart(red_packet, 100), VoucherPart(points, 20),
                  VoucherPart(phone, 100, phone_mode)))


def _paid(engine: Engine, order_id: str) -> OrderView:
    order = wait_for(lambda: (o := engine.get_order(order_id)).settled and o,
                     what=f"order {order_id} settled")
    assert order.state == "succeeded", (order.state, order.cause, order.legs)
    assert [leg.status for leg in order.legs] == ["paid", "confirmed", "confirmed",
                                                  "confirmed" if order.legs[3].mode != "post_deduct"
                                                  else "debited"]
    return order


def _refunded(engine: Engine, order_id: str, refund_no: str) -> OrderView:
    order = wait_for(lambda: (o := engine.get_order(order_id)).settled
                     and o.refund(refund_no).status != "refunding" and o,
                     what=f"refund {refund_no} answered")
    refund = order.refund(refund_no)
    assert refund.status == "succeeded", refund
    assert {status for _, _, status in refund.parts} == {"done"}, refund
    return order


def _balances(engine: Engine, account: str) -> tuple[int, int, int, int]:
    view = engine.get_account(account)
    assert view.funded == view.available + view.held + view.spent
    return view.funded, view.available, view.held, view.spent


# ------------------------------------------------------------------ refunds' voucher returns


@pytest.mark.parametrize("squat", ["pre_hold", "release_hold"])
def test_a_callers_hold_named_like_a_refunds_voucher_return_does_not_block_it(
    tmp_path: Path, squat: str
) -> None:
    """The serial is in the receipt, so ``<serial>-RF1:<leg>`` can be guessed: a caller
    pre-holding it (or releasing it, which records an empty rollback) before the refund used
    to leave every voucher part failed and the refund unknown, the vouchers spent for good."""
    ids = CountingIds()
    engine, _ = _open(tmp_path / "pay.db", ids)
    try:
        accounts = _accounts(engine, "alice")
        receipt = engine.submit(_request("order-1", accounts))
        _paid(engine, receipt.order_id)
        squats = {account: f"{receipt.payment_serial}-RF1:{leg_no}"
                  for leg_no, account in enumerate(accounts, start=1)}
        for account, hold_id in squats.items():
            if squat == "pre_hold":
                engine.pre_hold(account, 1, hold_id=hold_id, ttl_ms=LONG_TTL_MS)
            else:
                assert engine.release_hold(account, hold_id).status == "empty_rollback"

        refund = engine.refund(receipt.order_id, "rf-1", 10_000)
        assert refund.refund_id == f"{receipt.payment_serial}-RF1"  # the name it squatted
        order = _refunded(engine, receipt.order_id, "rf-1")
        assert order.refunded_minor == 10_000

        held = 1 if squat == "pre_hold" else 0
        for account, hold_id in squats.items():
            # every voucher came back; the caller's hold is still the caller's, untouched
            assert _balances(engine, account) == (FUNDED, FUNDED - held, held, 0)
            hold = engine.get_hold(account, hold_id)
            assert (hold.hold_id, hold.status, hold.amount, hold.order_id) == (
                hold_id, "pending" if held else "empty_rollback", held, None)
        if squat == "pre_hold":
            for account, hold_id in squats.items():
                assert engine.release_hold(account, hold_id).status == "voided"
                assert _balances(engine, account) == (FUNDED, FUNDED, 0, 0)
    finally:
        engine.shutdown()


# ------------------------------------------------------------------ order legs' fences


def test_callers_holds_named_like_an_orders_leg_fences_neither_refuse_nor_pay_its_legs(
    tmp_path: Path,
) -> None:
    """Before the submit, a caller pre-holds ``<order_id>:1`` for the leg's exact amount
    (the order used to adopt it as its own, leaving the caller's hold spent by the order),
    releases ``<order_id>:2`` (an empty rollback: the order's Try used to be refused and the
    payment failed), and pre-holds ``<order_id>:3`` for another amount (an idempotency
    conflict refused the leg). The order pays with its own fences; the caller's stay his."""
    ids = CountingIds()
    engine, _ = _open(tmp_path / "pay.db", ids)
    try:
        red_packet, points, phone = accounts = _accounts(engine, "alice")
        order_id, _ = ids.next_order()
        engine.pre_hold(red_packet, 100, hold_id=f"{order_id}:1", ttl_ms=LONG_TTL_MS)
        engine.release_hold(points, f"{order_id}:2")
        engine.pre_hold(phone, 7, hold_id=f"{order_id}:3", ttl_ms=LONG_TTL_MS)

        receipt = engine.submit(_request("order-1", accounts))
        assert receipt.order_id == order_id
        order = _paid(engine, order_id)
        assert [leg.hold_id for leg in order.legs] == [None, None, None, None]

        assert _balances(engine, red_packet) == (FUNDED, FUNDED - 200, 100, 100)
        assert _balances(engine, points) == (FUNDED, FUNDED - 20, 0, 20)
        assert _balances(engine, phone) == (FUNDED, FUNDED - 107, 7, 100)
        assert (engine.get_hold(red_packet, f"{order_id}:1").status,
                engine.get_hold(red_packet, f"{order_id}:1").order_id) == ("pending", None)
        assert engine.get_hold(points, f"{order_id}:2").status == "empty_rollback"
        # the caller may still release what is his: the order's fences are out of reach
        assert engine.release_hold(red_packet, f"{order_id}:1").status == "voided"
        assert engine.release_hold(phone, f"{order_id}:3").status == "voided"
        assert _balances(engine, red_packet) == (FUNDED, FUNDED - 100, 0, 100)
        assert _balances(engine, phone) == (FUNDED, FUNDED - 100, 0, 100)
        # and a caller's release of a name like the order's fence after the payment is a
        # hold of his own (an empty rollback), not a release of the order's confirmed hold
        assert engine.release_hold(points, f"{order_id}:2").status == "empty_rollback"
        assert _balances(engine, points) == (FUNDED, FUNDED - 20, 0, 20)
    finally:
        engine.shutdown()


def test_a_pre_held_leg_still_adopts_the_callers_hold_it_names(tmp_path: Path) -> None:
    """Adoption is the one place an order uses a caller's hold: under the caller's key."""
    ids = CountingIds()
    engine, _ = _open(tmp_path / "pay.db", ids)
    try:
        points = _accounts(engine, "alice")[1]
        hold = engine.pre_hold(points, 20, hold_id="ticked:points", ttl_ms=LONG_TTL_MS)
        request = PaymentRequest(
            merchant_id="station-1", merchant_order_no="order-1", user_id="alice",
            currency="CNY", total_minor=10_000, title="Fuel", cash=CashPart(9_800, "wechat"),
            vouchers=(VoucherPart(points, 20, LegMode.PRE_HELD, hold_id=hold.hold_id),))
        receipt = engine.submit(request)
        order = wait_for(lambda: (o := engine.get_order(receipt.order_id)).settled and o,
                         what="settled")
        assert order.state == "succeeded" and order.legs[1].hold_id == "ticked:points"
        adopted = engine.get_hold(points, "ticked:points")
        assert (adopted.status, adopted.order_id) == ("posted", receipt.order_id)
        assert _balances(engine, points) == (FUNDED, FUNDED - 20, 0, 20)
        refund = engine.refund(receipt.order_id, "rf-1", 10_000)
        _refunded(engine, receipt.order_id, "rf-1")
        assert _balances(engine, points) == (FUNDED, FUNDED, 0, 0)
        assert engine.get_hold(points, "ticked:points").status == "posted"  # the Try's record
        assert refund.refund_id.endswith("-RF1")
    finally:
        engine.shutdown()


def test_order_ids_with_a_colon_pay_and_refund(tmp_path: Path) -> None:
    """Nothing splits an order id on ':' any more, so an IdSource may use it."""
    ids = CountingIds(prefix="shop:7:")
    engine, _ = _open(tmp_path / "pay.db", ids)
    try:
        accounts = _accounts(engine, "alice")
        receipt = engine.submit(_request("order-1", accounts, LegMode.POST_DEDUCT))
        assert receipt.order_id == "shop:7:ord-1"
        _paid(engine, receipt.order_id)
        engine.refund(receipt.order_id, "rf-1", 9_700)
        engine.refund(receipt.order_id, "rf-2", 300)
        _refunded(engine, receipt.order_id, "rf-1")
        order = _refunded(engine, receipt.order_id, "rf-2")
        assert order.refunded_minor == 10_000
        for account in accounts:
            assert _balances(engine, account) == (FUNDED, FUNDED, 0, 0)
        assert engine.ledger_balances(receipt.order_id)["CNY"].get("transit", 0) == 0
    finally:
        engine.shutdown()


# ------------------------------------------------------------------ the property

_WHEN = ("before_submit", "before_refund")
_ID_TEXT = st.text(alphabet="ord-P1RF2:3", min_size=1, max_size=14)


def test_no_caller_hold_ids_interfere_with_orders_and_refunds(tmp_path: Path) -> None:
    """Any hold ids a caller pre-holds or releases on the order's accounts (with ':' in them,
    equal to the order's or its refunds' would-be fence names, or their owners), before the
    submit or before the refunds, leave the payment and its refunds exactly as without them:
    every leg paid, every refund part done, every voucher back, and the caller's holds his."""
    ids = CountingIds()
    engine, _ = _open(tmp_path / "pay.db", ids)
    examples = itertools.count()

    @settings(max_examples=50, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow])
    @given(data=st.data())
    def one_payment(data: st.DataObject) -> None:
        n = next(examples)
        accounts = _accounts(engine, f"u{n}")
        order_id, serial = ids.next_order()
        would_be = [f"{order_id}:{leg}" for leg in (1, 2, 3)] + [
            f"{serial}-RF{r}:{leg}" for r in (1, 2) for leg in (1, 2, 3)] + [
            order_id, serial, f"{serial}-RF1", f"{serial}-RF2"]
        hold_ids = data.draw(st.lists(st.one_of(st.sampled_from(would_be), _ID_TEXT),
                                      max_size=8, unique=True), label="hold ids")
        squats = [(hold_id,
                   data.draw(st.sampled_from(accounts), label="account"),
                   data.draw(st.sampled_from(_WHEN), label="when"),
                   data.draw(st.integers(0, 3), label="amount (0: release)"))
                  for hold_id in hold_ids]
        phone_mode = data.draw(st.sampled_from((LegMode.PRE_DEDUCT, LegMode.POST_DEDUCT)))
        two_refunds = data.draw(st.booleans(), label="two refunds")

        def squat(when: str) -> None:
            for hold_id, account, at, amount in squats:
                if at != when:
                    continue
                if amount:
                    view = engine.pre_hold(account, amount, hold_id=hold_id, ttl_ms=LONG_TTL_MS)
                    assert (view.status, view.order_id) == ("pending", None)
                else:
                    assert engine.release_hold(account, hold_id).status == "empty_rollback"

        squat("before_submit")
        receipt = engine.submit(_request(f"order-{n}", accounts, phone_mode))
        assert (receipt.order_id, receipt.payment_serial) == (order_id, serial)
        _paid(engine, order_id)
        squat("before_refund")
        if two_refunds:
            engine.refund(order_id, "rf-1", 9_700)  # cash and the red packet
            engine.refund(order_id, "rf-2", 300)  # the points and the phone credit
            _refunded(engine, order_id, "rf-1")
            order = _refunded(engine, order_id, "rf-2")
        else:
            engine.refund(order_id, "rf-1", 10_000)
            order = _refunded(engine, order_id, "rf-1")
        assert order.refunded_minor == 10_000

        for account in accounts:
            held = sum(amount for _, a, _, amount in squats if a == account)
            # the order and its refunds moved nothing for good; the caller's holds are held
            assert _balances(engine, account) == (FUNDED, FUNDED - held, held, 0), squats
        for hold_id, account, _, amount in squats:
            hold = engine.get_hold(account, hold_id)
            assert (hold.status, hold.amount, hold.order_id) == (
                "pending" if amount else "empty_rollback", amount, None)

    try:
        one_payment()
    finally:
        engine.shutdown()


def test_a_retried_pre_hold_is_the_same_hold_and_keeps_its_first_expiry() -> None:
    from payengine.engine import voucher as vo
    from payengine.engine.voucher import FenceKey, VoucherAccount

    account = vo.fund(VoucherAccount("pts", "POINTS", 10), 100)
    key = FenceKey.user("tick-1")
    first = vo.try_hold(account, None, key=key, amount=20, order_id=None,
                        expires_at_ms=1_000, now_ms=0)
    assert first.fence is not None
    again = vo.try_hold(first.account, first.fence, key=key, amount=20, order_id=None,
                        expires_at_ms=5_000, now_ms=500)
    assert (again.changed, again.fence, again.account) == (False, first.fence, first.account)
