
"""Black-box tests of the public API, written from README.md and SPEC.md only.

The wallet is a scripted fake channel defined here (it keeps the ground truth of what the
payer was really charged and refunded, like ``sim.channel.SimulatedChannel``), so the tests
decide when a result arrives. Results are fed through ``Engine.handle_callback`` /
``Engine.handle_refund_callback`` from many threads at once, and every race is repeated over
many iterations with seeded jitter so that one lucky interleaving cannot pass by chance.

Invariants checked after everything settles:
- an order is terminal and settled; every account has ``funded == available + held + spent``
  and ``held == 0``;
- the money oracle: what the payer is out of pocket at the channel (charged - refunded) is
  the cash part for a succeeded order and 0 for a closed or failed one;
- a succeeded order is never refunded; vouchers are spent exactly once or not at all.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from payengine import (
    CashPart,
    ChannelReply,
    CurrencyMismatch,
    Engine,
    EngineConfig,
    HoldNotPending,
    HoldRefused,
    IdempotencyConflict,
    IllegalTransition,
    InsufficientBalance,
    InvalidAmount,
    InvalidRequest,
    LegMode,
    OrderPolicy,
    PaymentError,
    PaymentRequest,
    UnknownAccount,
    UnknownHold,
    UnknownOrder,
    VoucherPart,
)
from payengine.actors.channel import ChannelNotification
from payengine.engine.codes import WECHAT_LIKE_PAY_CODES, WECHAT_LIKE_REFUND_CODES
from tests.helpers import TEST_NOTIFICATIONS, signed_callback, signed_refund_callback

TERMINAL = {"succeeded", "failed", "closed"}
SETTLE_S = 10.0

# --------------------------------------------------------------------------- the fake wallet


@dataclass
class FakePayment:
    serial: str
    amount: int
    state: str  # USERPAYING, SUCCESS, CLOSED, PAYERROR
    txn: str
    charged: int = 0
    refunds: dict[str, list[Any]] | None = None  # refund_id -> [amount, state]

    def refunded(self) -> int:
        return sum(a for a, s in (self.refunds or {}).values() if s == "SUCCESS")


class FakeChannel:
    """A WeChat-Pay-like wallet whose results arrive only when the test says so.

    ``pay`` answers USERPAYING (processing); the test makes the user pay (``user_pays``) or
    fail, then feeds the callback itself. ``query`` and ``close`` tell the ground truth
    (closing an already paid payment answers SUCCESS, as a real wallet does). ``refund`` is
    idempotent by refund id and answers ``refund_result`` (SUCCESS or PROCESSING).
    """

    pay_codes = WECHAT_LIKE_PAY_CODES
    refund_codes = WECHAT_LIKE_REFUND_CODES

    def __init__(self, name: str = "wechat", *, refund_result: str = "SUCCESS") -> None:
        self.name = name
        self.refund_result = refund_result
        self.payments: dict[str, FakePayment] = {}
        self.calls: list[tuple[Any, ...]] = []
        self.pay_gate: threading.Event | None = None  # when set: pay blocks until it is set
        self.pay_entered = threading.Event()
        self._lock = threading.Condition(threading.RLock())
        self._txn = itertools.count(1)

    # ---------------------------------------------------------------- Channel protocol

    def pay(self, payment_serial: str, amount_minor: int, currency: str, title: str
            ) -> ChannelReply:
        with self._lock:
            self.calls.append(("pay", payment_serial, amount_minor))
            payment = self.payments.get(payment_serial)
            if payment is None:
                payment = FakePayment(payment_serial, amount_minor, "USERPAYING",
                                      f"T{next(self._txn):08d}", refunds={})
                self.payments[payment_serial] = payment
            self._lock.notify_all()
            gate = self.pay_gate
        self.pay_entered.set()
        if gate is not None:
            gate.wait(SETTLE_S)
        with self._lock:
            return self._reply(payment)

    def query(self, payment_serial: str) -> ChannelReply:
        with self._lock:
            self.calls.append(("query", payment_serial))
            payment = self.payments.get(payment_serial)
            if payment is None:
                return ChannelReply("SUCCESS", "ORDERNOTEXIST")
            return self._reply(payment)

    def close(self, payment_serial: str) -> ChannelReply:
        with self._lock:
            self.calls.append(("close", payment_serial))
            payment = self.payments.get(payment_serial)
            if payment is None:
                payment = FakePayment(payment_serial, 0, "CLOSED", "", refunds={})
                self.payments[payment_serial] = payment
            elif payment.state == "USERPAYING":
                payment.state = "CLOSED"
            return self._reply(payment)

    def refund(self, payment_serial: str, refund_id: str, amount_minor: int, currency: str
               ) -> ChannelReply:
        with self._lock:
            self.calls.append(("refund", payment_serial, refund_id, amount_minor))
            payment = self.payments.get(payment_serial)
            if payment is None or payment.state != "SUCCESS":
                return ChannelReply("SUCCESS", "REFUNDCLOSE")
            assert payment.refunds is not None
            refund = payment.refunds.get(refund_id)
            if refund is None:
                if payment.refunded() + amount_minor > payment.charged:
                    return ChannelReply("SUCCESS", "REFUNDCLOSE")
                refund = [amount_minor, self.refund_result]
                payment.refunds[refund_id] = refund
            return ChannelReply("SUCCESS", refund[1])

    def query_charge(self, payment_serial: str, channel_txn_id: str) -> ChannelReply:
        with self._lock:
            self.calls.append(("query_charge", payment_serial, channel_txn_id))
            payment = self.payments.get(payment_serial)
            if payment is None or payment.state != "SUCCESS" or payment.txn != channel_txn_id:
                return ChannelReply("SUCCESS", "ORDERNOTEXIST")
            return self._reply(payment)

    def verify_notification(self, body: bytes, headers: Mapping[str, str]
                            ) -> ChannelNotification:
        return TEST_NOTIFICATIONS.verify(body, headers)

    def query_refund(self, payment_serial: str, refund_id: str) -> ChannelReply:
        with self._lock:
            self.calls.append(("query_refund", payment_serial, refund_id))
            payment = self.payments.get(payment_serial)
            refund = None if payment is None else (payment.refunds or {}).get(refund_id)
            if refund is None:
                return ChannelReply("SUCCESS", "REFUNDNOTEXIST")
            return ChannelReply("SUCCESS", refund[1])

    # ---------------------------------------------------------------- the test's levers

    def _reply(self, payment: FakePayment) -> ChannelReply:
        amount = payment.charged if payment.state == "SUCCESS" else None
        return ChannelReply("SUCCESS", payment.state, payment.txn, amount)

    def wait_pay(self, serial: str, timeout_s: float = SETTLE_S) -> None:
        with self._lock:
            assert self._lock.wait_for(lambda: serial in self.payments, timeout_s), \
                f"the engine never called pay for {serial}"

    def user_pays(self, serial: str) -> ChannelReply:
        """The user pays in the wallet app; returns the success notification."""
        with self._lock:
            payment = self.payments[serial]
            if payment.state == "USERPAYING":
                payment.state = "SUCCESS"
                payment.charged = payment.amount
            return self._reply(payment)

    def user_fails(self, serial: str) -> ChannelReply:
        with self._lock:
            payment = self.payments[serial]
            if payment.state == "USERPAYING":
                payment.state = "PAYERROR"
            return self._reply(payment)

    def complete_refunds(self, serial: str) -> list[str]:
        with self._lock:
            payment = self.payments[serial]
            done = []
            for refund_id, refund in (payment.refunds or {}).items():
                if refund[1] == "PROCESSING":
                    refund[1] = "SUCCESS"
                    done.append(refund_id)
            return done

    def net_charged(self, serial: str) -> int:
        with self._lock:
            payment = self.payments.get(serial)
            return 0 if payment is None else payment.charged - payment.refunded()

    def refund_calls(self, serial: str) -> list[tuple[Any, ...]]:
        with self._lock:
            return [c for c in self.calls if c[0] == "refund" and c[1] == serial]

    def pay_calls(self, serial: str | None = None) -> list[tuple[Any, ...]]:
        with self._lock:
            return [c for c in self.calls if c[0] == "pay" and (serial is None or c[1] == serial)]


# --------------------------------------------------------------------------- helpers


def wait_until(predicate: Callable[[], Any], timeout_s: float = SETTLE_S,
               what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.005)


@contextlib.contextmanager
def open_engine(tmp_path: Path, channel: FakeChannel, *, name: str = "engine.db",
                policy: OrderPolicy | None = None,
                config: EngineConfig | None = None) -> Iterator[Engine]:
    # Long query schedule and pay window: results arrive only when the test sends them.
    policy = policy or OrderPolicy(pay_window_ms=120_000, query_schedule_ms=(60_000,),
                                   refund_query_schedule_ms=(60_000,))
    # the user-dimension duplicate guard is off: these tests submit many orders of one user
    # and amount on purpose (tests/test_duplicate_guard.py tests the guard)
    config = config or EngineConfig(duplicate_guard_window_ms=0)
    engine = Engine.open(tmp_path / name, channels=[channel], policy=policy, config=config)
    try:
        yield engine
    finally:
        engine.shutdown()


def settled(engine: Engine, order_id: str, timeout_s: float = SETTLE_S):
    return wait_until(lambda: (o := engine.get_order(order_id)).settled and o,
                      timeout_s, f"order {order_id} to settle")


def wait_paying(engine: Engine, channel: FakeChannel, receipt) -> None:
    channel.wait_pay(receipt.payment_serial)
    wait_until(lambda: engine.get_order(receipt.order_id).state == "paying",
               what=f"{receipt.order_id} to be paying")


def assert_balanced(engine: Engine, account_ids) -> None:
    for account_id in account_ids:
        a = engine.get_account(account_id)
        assert a.funded == a.available + a.held + a.spent, a
        assert a.held == 0, a
        assert min(a.available, a.held, a.spent) >= 0, a


def snapshot(engine: Engine, account_ids) -> dict[str, Any]:
    return {a: engine.get_account(a) for a in account_ids}


def run_together(fns: list[Callable[[], Any]], jitter: random.Random | None = None,
                 *, join_s: float = SETTLE_S * 2, stuck_ok: bool = False
                 ) -> list[tuple[str, Any]]:
    """Run every fn in its own thread, released by one barrier; ('ok', v) or ('err', e),
    or ('stuck', None) for a call still running after join_s (only if stuck_ok)."""
    barrier = threading.Barrier(len(fns))
    results: list[tuple[str, Any]] = [("none", None)] * len(fns)
    delays = [jitter.random() * 0.002 if jitter else 0.0 for _ in fns]

    def worker(i: int) -> None:
        barrier.wait()
        if delays[i]:
            end = time.perf_counter() + delays[i]
            while time.perf_counter() < end:
                pass
        try:
            results[i] = ("ok", fns[i]())
        except BaseException as error:  # reported to the test
            results[i] = ("err", error)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True)
               for i in range(len(fns))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + join_s
    for i, t in enumerate(threads):
        t.join(max(0.0, deadline - time.monotonic()))
        if t.is_alive():
            assert stuck_ok, f"call {i} never returned"
            results[i] = ("stuck", None)
    return list(results)


@dataclass
class Combo:
    """One combined order: cash + red packet (held at submit) + points (pre-held) + phone
    credit (post-deduct), each voucher from its own fresh account."""

    receipt: Any
    request: PaymentRequest
    red: str
    points: str
    phone: str
    cash: int

    @property
    def accounts(self) -> tuple[str, str, str]:
        return (self.red, self.points, self.phone)


def new_combo(engine: Engine, tag: str, *, cash: int = 900, fund: int = 1_000) -> Combo:
    red, points, phone = f"{tag}/red", f"{tag}/points", f"{tag}/phone"
    engine.open_account(red, "CNY")
    engine.fund(red, fund, funding_id=f"{tag}-red")
    engine.open_account(points, "POINTS", minor_per_unit=10)
    engine.fund(points, fund, funding_id=f"{tag}-pts")
    engine.open_account(phone, "CNY")
    engine.fund(phone, fund, funding_id=f"{tag}-phone")
    hold = engine.pre_hold(points, 10, ttl_ms=60_000)
    request = PaymentRequest(
        merchant_id="station-42", merchant_order_no=f"no-{tag}", user_id=f"user-{tag}",
        currency="CNY", total_minor=cash + 100 + 100 + 100, title="Fuel",
        cash=CashPart(cash, channel="wechat"),
        vouchers=(VoucherPart(red, 100),
                  VoucherPart(points, 10, LegMode.PRE_HELD, hold_id=hold.hold_id),
                  VoucherPart(phone, 100, LegMode.POST_DEDUCT)))
    receipt = engine.submit(request)
    return Combo(receipt, request, red, points, phone, cash)


def assert_combo_succeeded(engine: Engine, channel: FakeChannel, combo: Combo) -> None:
    order = settled(engine, combo.receipt.order_id)
    assert order.state == "succeeded", order
    for account_id, spent in ((combo.red, 100), (combo.points, 10), (combo.phone, 100)):
        a = engine.get_account(account_id)
        assert (a.spent, a.held, a.available) == (spent, 0, a.funded - spent), a
    serial = combo.receipt.payment_serial
    assert channel.refund_calls(serial) == [], "a succeeded order was refunded"
    assert channel.net_charged(serial) == combo.cash
    assert_balanced(engine, combo.accounts)


def assert_combo_unwound(engine: Engine, channel: FakeChannel, combo: Combo,
                         states=("closed", "failed")) -> None:
    order = settled(engine, combo.receipt.order_id)
    assert order.state in states, order
    for account_id in combo.accounts:
        a = engine.get_account(account_id)
        assert (a.spent, a.held, a.available) == (0, 0, a.funded), (order, a)
    serial = combo.receipt.payment_serial
    # No cent lost: whatever the payer paid for this order came back by the original route.
    assert channel.net_charged(serial) == 0, (order, channel.calls)
    refund_ids = {c[2] for c in channel.refund_calls(serial)}
    assert len(refund_ids) <= 1, f"refunded under several refund ids: {refund_ids}"
    for call in channel.refund_calls(serial):
        assert call[3] == combo.cash, f"refund of {call[3]}, the cash part is {combo.cash}"
    assert_balanced(engine, combo.accounts)


def leg_transitions(engine: Engine, order_id: str, part: str, to_state: str) -> int:
    return sum(1 for j in engine.journal(order_id)
               if j.part == part and j.to_state == to_state)


# --------------------------------------------------------------------------- README example


def test_readme_example_as_written(tmp_path: Path) -> None:
    """The README's runnable example, on the simulated channel, with its claims asserted."""
    from payengine import ThreadRuntime
    from payengine.sim.channel import ChannelFaults, SimulatedChannel

    world = ThreadRuntime()
    wechat = SimulatedChannel("wechat", world, seed=1, faults=ChannelFaults.none())
    policy = OrderPolicy(pay_window_ms=3_000, query_schedule_ms=(200, 400, 800))
    engine = Engine.open(tmp_path / "station.db", channels=[wechat], policy=policy)
    try:
        wechat.attach(engine)
        engine.open_account("alice/red-packet", "CNY")
        engine.fund("alice/red-packet", 100, funding_id="rp-2026-11-24")
        engine.open_account("alice/points", "POINTS", minor_per_unit=10)
        engine.fund("alice/points", 500, funding_id="pts-welcome")
        engine.open_account("alice/phone", "CNY")
        engine.fund("alice/phone", 100, funding_id="phone-topup-1")
        hold = engine.pre_hold("alice/points", 20, ttl_ms=60_000)
        request = PaymentRequest(
            merchant_id="station-42", merchant_order_no="pump3-000187", user_id="alice",
            currency="CNY", total_minor=100_00, title="Fuel, pump 3",
            cash=CashPart(96_00, channel="wechat"),
            vouchers=(VoucherPart("alice/red-packet", 100),
                      VoucherPart("alice/points", 20, LegMode.PRE_HELD, hold_id=hold.hold_id),
                      VoucherPart("alice/phone", 100, LegMode.POST_DEDUCT)))
        receipt = engine.submit(request)
        assert engine.submit(request) == receipt
        order = settled(engine, receipt.order_id)
        assert order.state == "succeeded"
        with pytest.raises(IllegalTransition):
            engine.close(receipt.order_id)
        points = engine.get_account("alice/points")
        assert (points.funded, points.available, points.held, points.spent) == (500, 480, 0, 20)
        assert_balanced(engine, ["alice/red-packet", "alice/points", "alice/phone"])
        assert wechat.net_charged(receipt.payment_serial) == 96_00
    finally:
        engine.shutdown()
        world.shutdown()


# --------------------------------------------------------------------------- close vs success


def test_success_callback_races_user_close(tmp_path: Path) -> None:
    """30 times: the user has paid; the success callback and the cashier's close hit the
    engine at the same instant from two threads (every third time 4 callbacks + 4 closes).
    Exactly one story must come out."""
    channel = FakeChannel()
    outcomes: dict[str, int] = {}
    with open_engine(tmp_path, channel) as engine:
        for i in range(30):
            rng = random.Random(i)
            combo = new_combo(engine, f"race{i}")
            serial, oid = combo.receipt.payment_serial, combo.receipt.order_id
            wait_paying(engine, channel, combo.receipt)
            paid = channel.user_pays(serial)
            copies = 4 if i % 3 == 2 else 1
            tagged = [("cb", lambda: signed_callback(engine, "wechat", serial, paid))] * copies \
                + [("close", lambda: engine.close(oid))] * copies
            rng.shuffle(tagged)
            outcome = run_together([f for _, f in tagged], rng)
            results = list(zip([t for t, _ in tagged], outcome, strict=True))
            cbs = [r for t, r in results if t == "cb"]
            closes = [r for t, r in results if t == "close"]
            assert all(kind == "ok" for kind, _ in cbs), cbs
            order = settled(engine, oid)
            outcomes[order.state] = outcomes.get(order.state, 0) + 1
            if order.state == "succeeded":
                assert all(kind == "err" and isinstance(v, IllegalTransition)
                           for kind, v in closes), closes
                assert_combo_succeeded(engine, channel, combo)
            else:
                assert order.state == "closed", order
                assert any(kind == "ok" for kind, _ in closes), closes
                assert all(kind == "ok" or isinstance(v, IllegalTransition)
                           for kind, v in closes), closes
                assert_combo_unwound(engine, channel, combo, states=("closed",))
                refunds = channel.refund_calls(serial)
                assert refunds and all(c[3] == combo.cash for c in refunds), channel.calls
                cash_leg = order.legs[0]
                assert cash_leg.mode == "cash" and cash_leg.status == "refunded", order
            # Late duplicates from 8 threads change nothing.
            late = run_together([lambda: signed_callback(engine, "wechat", serial, paid)] * 8)
            assert all(kind == "ok" for kind, _ in late), late
            again = settled(engine, oid)
            assert again.state == order.state
            if order.state == "succeeded":
                assert_combo_succeeded(engine, channel, combo)
            else:
                assert_combo_unwound(engine, channel, combo, states=("closed",))
    print("close race outcomes:", outcomes)
    assert sum(outcomes.values()) == 30, outcomes


def test_success_callback_races_pay_window_timeout(tmp_path: Path) -> None:
    """20 times: the success callback arrives right around the pay window's end."""
    channel = FakeChannel()
    outcomes: dict[str, int] = {}
    with open_engine(tmp_path, channel) as engine:
        for i in range(20):
            rng = random.Random(100 + i)
            red = f"to{i}/red"
            engine.open_account(red, "CNY")
            engine.fund(red, 500, funding_id=red)
            window = 150
            request = PaymentRequest(
                merchant_id="m", merchant_order_no=f"timeout-{i}", user_id=f"u{i}",
                currency="CNY", total_minor=1_000, title="t", pay_window_ms=window,
                cash=CashPart(900, "wechat"), vouchers=(VoucherPart(red, 100),))
            start = time.monotonic()
            receipt = engine.submit(request)
            channel.wait_pay(receipt.payment_serial)
            paid = channel.user_pays(receipt.payment_serial)
            target = start + window / 1000 + rng.uniform(-0.01, 0.01)
            time.sleep(max(0.0, target - time.monotonic()))
            signed_callback(engine, "wechat", receipt.payment_serial, paid)
            order = settled(engine, receipt.order_id)
            account = engine.get_account(red)
            if order.state == "succeeded":
                assert account.spent == 100
                assert channel.refund_calls(receipt.payment_serial) == []
                assert channel.net_charged(receipt.payment_serial) == 900
            else:
                assert order.state == "closed", order
                assert account.spent == 0
                assert channel.net_charged(receipt.payment_serial) == 0, channel.calls
            assert_balanced(engine, [red])
            outcomes[order.state] = outcomes.get(order.state, 0) + 1
    print("timeout race outcomes:", outcomes)


def test_close_while_pay_call_in_flight_then_user_pays(tmp_path: Path) -> None:
    """The cashier closes while the wallet's pay call hangs; the user pays meanwhile and
    the pay call finally answers SUCCESS: the order stays closed and the cash comes back."""
    channel = FakeChannel()
    with open_engine(tmp_path, channel) as engine:
        for i in range(5):
            channel.pay_gate = threading.Event()
            channel.pay_entered.clear()
            combo = new_combo(engine, f"inflight{i}")
            assert channel.pay_entered.wait(SETTLE_S)
            closed = engine.close(combo.receipt.order_id)
            assert closed.state == "closed"
            channel.user_pays(combo.receipt.payment_serial)
            channel.pay_gate.set()
            channel.pay_gate = None
            assert_combo_unwound(engine, channel, combo, states=("closed",))


# --------------------------------------------------------------------------- duplicates


def test_duplicate_success_callbacks_from_8_threads(tmp_path: Path) -> None:
    channel = FakeChannel()
    with open_engine(tmp_path, channel) as engine:
        for i in range(10):
            combo = new_combo(engine, f"dup{i}")
            wait_paying(engine, channel, combo.receipt)
            paid = channel.user_pays(combo.receipt.payment_serial)
            results = run_together(
                [lambda: signed_callback(engine, "wechat", combo.receipt.payment_serial, paid)
                 for _ in range(8)], random.Random(i))
            assert all(kind == "ok" for kind, _ in results), results
            assert_combo_succeeded(engine, channel, combo)
            oid = combo.receipt.order_id
            assert leg_transitions(engine, oid, "leg:0", "paid") == 1
            assert leg_transitions(engine, oid, "order", "succeeded") == 1
            post = [leg for leg in engine.get_order(oid).legs if leg.mode == "post_deduct"]
            assert leg_transitions(engine, oid, f"leg:{post[0].leg_no}", "debited") == 1


def test_success_and_failure_callbacks_race(tmp_path: Path) -> None:
    """The user paid; a stray failure notification races the success one (4 + 4 threads).
    Either the order succeeded (vouchers spent once, no refund) or it failed and, since the
    engine was told of a success, the payer's cash comes back: never both, never neither."""
    channel = FakeChannel()
    states = []
    with open_engine(tmp_path, channel) as engine:
        for i in range(20):
            combo = new_combo(engine, f"sf{i}")
            serial = combo.receipt.payment_serial
            wait_paying(engine, channel, combo.receipt)
            paid = channel.user_pays(serial)
            failed = ChannelReply("SUCCESS", "PAYERROR", paid.channel_txn_id)
            fns = [lambda r=r: signed_callback(engine, "wechat", serial, r)
                   for r in (paid, failed) * 4]
            random.Random(i).shuffle(fns)
            results = run_together(fns, random.Random(i))
            assert all(kind == "ok" for kind, _ in results), results
            order = settled(engine, combo.receipt.order_id)
            states.append(order.state)
            if order.state == "succeeded":
                assert_combo_succeeded(engine, channel, combo)
            else:
                assert_combo_unwound(engine, channel, combo, states=("failed",))
    print("success/failure race outcomes:", {s: states.count(s) for s in set(states)})


def test_failure_then_success_callback_is_refunded(tmp_path: Path) -> None:
    """Deterministic half of the race above: failure handled first, then the success."""
    channel = FakeChannel()
    with open_engine(tmp_path, channel) as engine:
        combo = new_combo(engine, "fs")
        serial = combo.receipt.payment_serial
        wait_paying(engine, channel, combo.receipt)
        paid = channel.user_pays(serial)
        signed_callback(engine, "wechat", serial, ChannelReply("SUCCESS", "PAYERROR", paid.channel_txn_id))
        signed_callback(engine, "wechat", serial, paid)
        assert_combo_unwound(engine, channel, combo, states=("failed",))


def test_processing_after_success_never_moves_back(tmp_path: Path) -> None:
    channel = FakeChannel()
    with open_engine(tmp_path, channel) as engine:
        combo = new_combo(engine, "proc")
        serial = combo.receipt.payment_serial
        wait_paying(engine, channel, combo.receipt)
        paid = channel.user_pays(serial)
        signed_callback(engine, "wechat", serial, paid)
        before = settled(engine, combo.receipt.order_id)
        assert before.state == "succeeded"
        noise = [ChannelReply("SUCCESS", "USERPAYING", paid.channel_txn_id),
                 ChannelReply("SUCCESS", "SYSTEMERROR"), ChannelReply("FAIL", None),
                 ChannelReply(None, None), ChannelReply("SUCCESS", "NOTPAY"),
                 ChannelReply("SUCCESS", "PAYERROR", paid.channel_txn_id),
                 ChannelReply("SUCCESS", "CLOSED", paid.channel_txn_id), paid]
        results = run_together([lambda r=r: signed_callback(engine, "wechat", serial, r)
                                for r in noise * 2], random.Random(7))
        assert all(kind == "ok" for kind, _ in results), results
        after = settled(engine, combo.receipt.order_id)
        assert after.state == "succeeded"
        assert [leg.status for leg in after.legs] == [leg.status for leg in before.legs]
        assert_combo_succeeded(engine, channel, combo)
        with pytest.raises(IllegalTransition):
            engine.close(combo.receipt.order_id)
        assert_combo_succeeded(engine, channel, combo)


def test_stale_processing_pay_reply_after_callback(tmp_path: Path) -> None:
    """The wallet's synchronous pay reply (USERPAYING) arrives after the success callback."""
    channel = FakeChannel()
    with open_engine(tmp_path, channel) as engine:
        for i in range(5):
            channel.pay_gate = threading.Event()
            channel.pay_entered.clear()
            combo = new_combo(engine, f"stale{i}")
            serial = combo.receipt.payment_serial
            assert channel.pay_entered.wait(SETTLE_S)
            with channel._lock:  # the user pays; the stale reply is already "on the wire"
                stale = ChannelReply("SUCCESS", "USERPAYING", channel.payments[serial].txn)
            paid = channel.user_pays(serial)
            signed_callback(engine, "wechat", serial, paid)
            signed_callback(engine, "wechat", serial, stale)
            channel.pay_gate.set()
            channel.pay_gate = None
            assert_combo_succeeded(engine, channel, combo)


def test_refund_callbacks_duplicated_after_close(tmp_path: Path) -> None:
    """Refund answered PROCESSING; the refund callback then arrives 8 times at once."""
    channel = FakeChannel(refund_result="PROCESSING")
    with open_engine(tmp_path, channel) as engine:
        for i in range(5):
            combo = new_combo(engine, f"rf{i}")
            serial = combo.receipt.payment_serial
            wait_paying(engine, channel, combo.receipt)
            paid = channel.user_pays(serial)
            engine.close(combo.receipt.order_id)
            signed_callback(engine, "wechat", serial, paid)
            wait_until(lambda: channel.refund_calls(serial), what="a refund call")
            order = engine.get_order(combo.receipt.order_id)
            assert order.state == "closed" and not order.settled, order
            done = channel.complete_refunds(serial)
            assert len(done) == 1
            ok = ChannelReply("SUCCESS", "SUCCESS")
            results = run_together(
                [lambda: signed_refund_callback(engine, "wechat", serial, done[0], ok)
                 for _ in range(8)], random.Random(i))
            assert all(kind == "ok" for kind, _ in results), results
            order = settled(engine, combo.receipt.order_id)
            assert order.legs[0].status == "refunded", order
            assert_combo_unwound(engine, channel, combo, states=("closed",))


# --------------------------------------------------------------------------- idempotent submit


def plain_request(no: str, red: str, *, total: int = 1_000, cash: int = 900,
                  title: str = "t", user: str = "u") -> PaymentRequest:
    return PaymentRequest(merchant_id="m", merchant_order_no=no, user_id=user, currency="CNY",
                          total_minor=total, title=title, cash=CashPart(cash, "wechat"),
                          vouchers=(VoucherPart(red, total - cash),))


def test_same_submit_from_16_threads(tmp_path: Path) -> None:
    channel = FakeChannel()
    with open_engine(tmp_path, channel) as engine:
        for i in range(5):
            red = f"same{i}/red"
            engine.open_account(red, "CNY")
            engine.fund(red, 1_000, funding_id=red)
            request = plain_request(f"same-{i}", red)
            results = run_together([lambda: engine.submit(request) for _ in range(16)],
                                   random.Random(i))
            assert all(kind == "ok" for kind, _ in results), results
            receipts = {value for _, value in results}
            assert len(receipts) == 1, receipts
            receipt = receipts.pop()
            assert engine.find_order("m", f"same-{i}").order_id == receipt.order_id
            wait_paying(engine, channel, receipt)
            assert engine.get_account(red).held == 100  # held once, not 16 times
            assert {c[1] for c in channel.pay_calls() if c[1] == receipt.payment_serial}
            signed_callback(engine, "wechat", receipt.payment_serial,
                                   channel.user_pays(receipt.payment_serial))
            assert settled(engine, receipt.order_id).state == "succeeded"
            assert engine.submit(request) == receipt
            a = engine.get_account(red)
            assert (a.spent, a.held, a.available) == (100, 0, 900)


def test_same_key_different_parameters_conflict(tmp_path: Path) -> None:
    channel = FakeChannel()
    with open_engine(tmp_path, channel) as engine:
        for i in range(5):
            red = f"conf{i}/red"
            engine.open_account(red, "CNY")
            engine.fund(red, 1_000, funding_id=red)
            a = plain_request(f"conf-{i}", red, total=1_000, cash=900)
            b = plain_request(f"conf-{i}", red, total=1_000, cash=800)
            fns = [lambda r=r: engine.submit(r) for r in (a, b) * 8]
            random.Random(i).shuffle(fns)
            results = run_together(fns, random.Random(i))
            receipts = {v for kind, v in results if kind == "ok"}
            errors = [v for kind, v in results if kind == "err"]
            assert len(receipts) == 1, results
            assert len(errors) == 8, results  # the 8 with the losing parameters
            assert all(isinstance(e, IdempotencyConflict) for e in errors), errors
            receipt = receipts.pop()
            wait_paying(engine, channel, receipt)
            held = engine.get_account(red).held
            assert held in (100, 200), held  # one order's hold, not both
            engine.close(receipt.order_id)
            settled(engine, receipt.order_id)
            assert_balanced(engine, [red])
            assert engine.get_account(red).spent == 0

        red = "conf/red"
        engine.open_account(red, "CNY")
        engine.fund(red, 1_000, funding_id=red)
        base = plain_request("conf-seq", red)
        receipt = engine.submit(base)
        before = snapshot(engine, [red])
        for other in (plain_request("conf-seq", red, title="other"),
                      plain_request("conf-seq", red, user="other-user"),
                      plain_request("conf-seq", red, total=1_100, cash=1_000),
                      PaymentRequest(merchant_id="m", merchant_order_no="conf-seq",
                                     user_id="u", currency="CNY", total_minor=1_000,
                                     title="t", cash=CashPart(1_000, "wechat"))):
            with pytest.raises(IdempotencyConflict):
                engine.submit(other)
        assert engine.submit(base) == receipt
        wait_paying(engine, channel, receipt)
        after = snapshot(engine, [red])
        # Only the original order's own hold may have moved the balance.
        assert after[red].funded == before[red].funded
        engine.close(receipt.order_id)
        settled(engine, receipt.order_id)
        assert_balanced(engine, [red])


# --------------------------------------------------------------------------- pre-holds


def test_pre_hold_then_submit_adopts_it(tmp_path: Path) -> None:
    channel = FakeChannel()
    with open_engine(tmp_path, channel) as engine:
        engine.open_account("p/points", "POINTS", minor_per_unit=10)
        engine.fund("p/points", 500, funding_id="p1")
        hold = engine.pre_hold("p/points", 20, ttl_ms=300)  # short: adoption must keep it
        assert hold.status == "pending"
        a = engine.get_account("p/points")
        assert (a.available, a.held) == (480, 20)
        request = PaymentRequest(
            merchant_id="m", merchant_order_no="ph-1", user_id="u", currency="CNY",
            total_minor=1_000, title="t", cash=CashPart(800, "wechat"),
            vouchers=(VoucherPart("p/points", 20, LegMode.PRE_HELD, hold_id=hold.hold_id),))
        receipt = engine.submit(request)
        wait_paying(engine, channel, receipt)
        assert engine.get_hold("p/points", hold.hold_id).order_id == receipt.order_id
        time.sleep(0.6)  # past the pre-hold's own ttl: an adopted hold must not expire
        assert engine.get_account("p/points").held == 20
        signed_callback(engine, "wechat", receipt.payment_serial,
                               channel.user_pays(receipt.payment_serial))
        assert settled(engine, receipt.order_id).state == "succeeded"
        a = engine.get_account("p/points")
        assert (a.funded, a.available, a.held, a.spent) == (500, 480, 0, 20)
        assert channel.net_charged(receipt.payment_serial) == 800


def test_release_pre_hold(tmp_path: Path) -> None:
    channel = FakeChannel()
    with open_engine(tmp_path, channel) as engine:
        engine.open_account("r/points", "POINTS", minor_per_unit=10)
        engine.fund("r/points", 500, funding_id="r1")
        hold = engine.pre_hold("r/points", 20, ttl_ms=60_000)
        released = engine.release_hold("r/points", hold.hold_id)
        assert released.status != "pending"
        a = engine.get_account("r/points")
        assert (a.available, a.held, a.spent) == (500, 0, 0)
        # Releasing again (a retried Cancel) changes nothing.
        with contextlib.suppress(HoldNotPending):
            engine.release_hold("r/points", hold.hold_id)
        assert engine.get_account("r/points") == a
        # Concurrent releases of another hold: released exactly once.
        hold2 = engine.pre_hold("r/points", 30, ttl_ms=60_000)
        results = run_together([lambda: engine.release_hold("r/points", hold2.hold_id)
                                for _ in range(8)], random.Random(1))
        assert any(kind == "ok" for kind, _ in results), results
        assert all(kind == "ok" or isinstance(v, HoldNotPending) for kind, v in results), results
        assert engine.get_account("r/points") == a
        # An order that references the released hold must not spend it.
        request = PaymentRequest(
            merchant_id="m", merchant_order_no="rel-1", user_id="u", currency="CNY",
            total_minor=1_000, title="t", cash=CashPart(800, "wechat"),
            vouchers=(VoucherPart("r/points", 20, LegMode.PRE_HELD, hold_id=hold.hold_id),))
        try:
            receipt = engine.submit(request)
        except PaymentError:
            assert engine.get_account("r/points") == a
            with pytest.raises(UnknownOrder):
                engine.find_order("m", "rel-1")
        else:
            order = settled(engine, receipt.order_id)
            assert order.state == "failed", order
            assert channel.net_charged(receipt.payment_serial) == 0
        assert engine.get_account("r/points") == a
        assert_balanced(engine, ["r/points"])


def test_cancel_before_try_is_fenced(tmp_path: Path) -> None:
    """README: "a fence per hold (idempotent Confirm/Cancel, empty rollback recorded, a Try
    after its Cancel refused)"; SPEC R-TCC: "empty rollback (Cancel with no Try: record it,
    succeed); hanging (Try arriving after its Cancel: refuse)". With a caller-chosen hold id,
    the app's "untick" (release) can overtake its "tick" (pre_hold): the late Try must be
    refused instead of hanging the points until the hold expires."""
    channel = FakeChannel()
    with open_engine(tmp_path, channel) as engine:
        engine.open_account("fence/points", "POINTS", minor_per_unit=10)
        engine.fund("fence/points", 500, funding_id="fence")
        before = engine.get_account("fence/points")
        # After a real Try, a second Try after the Cancel is refused (this part holds).
        engine.pre_hold("fence/points", 20, hold_id="tick-0")
        engine.release_hold("fence/points", "tick-0")
        with pytest.raises(HoldRefused):
            engine.pre_hold("fence/points", 20, hold_id="tick-0")
        assert engine.get_account("fence/points") == before
        # The empty rollback: Cancel first, then its Try.
        with contextlib.suppress(UnknownHold):
            engine.release_hold("fence/points", "tick-1")
        with pytest.raises(HoldRefused):
            engine.pre_hold("fence/points", 20, hold_id="tick-1")
        assert engine.get_account("fence/points") == before


def test_tick_and_untick_race(tmp_path: Path) -> None:
    """20 times: pre_hold and release_hold of one caller-chosen hold id race from two
    threads. Whichever lands first, the user's last word was "release": with the fence
    (SPEC R-TCC: a Cancel with no Try is recorded and succeeds, a Try after it is refused)
    nothing may stay held once both calls have returned."""
    channel = FakeChannel()
    leftovers = []
    with open_engine(tmp_path, channel) as engine:
        engine.open_account("tick/points", "POINTS", minor_per_unit=10)
        engine.fund("tick/points", 10_000, funding_id="tick")
        for i in range(20):
            hold_id = f"race-{i}"
            tick = lambda: engine.pre_hold("tick/points", 20, hold_id=hold_id)  # noqa: E731
            untick = lambda: engine.release_hold("tick/points", hold_id)  # noqa: E731
            (t_kind, t_val), (u_kind, u_val) = run_together([tick, untick], random.Random(i))
            assert t_kind == "ok" or isinstance(t_val, PaymentError), t_val
            assert u_kind == "ok" or isinstance(u_val, PaymentError), u_val
            with contextlib.suppress(UnknownHold):
                if engine.get_hold("tick/points", hold_id).status == "pending":
                    leftovers.append((hold_id, t_kind, type(u_val).__name__))
                    engine.release_hold("tick/points", hold_id)
        assert_balanced(engine, ["tick/points"])
    assert not leftovers, f"holds left pending after their release: {leftovers}"


def test_success_with_wrong_amount_is_not_silently_accepted(tmp_path: Path) -> None:
    """SPEC R-COMP: mismatches are reported, never silently "fixed"."""
    channel = FakeChannel()
    with open_engine(tmp_path, channel) as engine:
        combo = new_combo(engine, "amt")
        serial = combo.receipt.payment_serial
        wait_paying(engine, channel, combo.receipt)
        paid = channel.user_pays(serial)
        wrong = ChannelReply("SUCCESS", "SUCCESS", paid.channel_txn_id, combo.cash - 1)
        signed_callback(engine, "wechat", serial, wrong)
        order = engine.get_order(combo.receipt.order_id)
        assert order.state != "succeeded", order
        for account_id in combo.accounts:
            assert engine.get_account(account_id).spent == 0


def test_pre_hold_expires(tmp_path: Path) -> None:
    channel = FakeChannel()
    with open_engine(tmp_path, channel) as engine:
        engine.open_account("x/points", "POINTS", minor_per_unit=10)
        engine.fund("x/points", 500, funding_id="x1")
        hold = engine.pre_hold("x/points", 50, ttl_ms=200)
        assert engine.get_account("x/points").held == 50
        wait_until(lambda: engine.get_account("x/points").held == 0, 5.0, "the hold to expire")
        assert engine.get_hold("x/points", hold.hold_id).status != "pending"
        a = engine.get_account("x/points")
        assert (a.available, a.held, a.spent) == (500, 0, 0)
        # A Try after its Cancel is refused: an order adopting the expired hold spends nothing.
        request = PaymentRequest(
            merchant_id="m", merchant_order_no="exp-1", user_id="u", currency="CNY",
            total_minor=1_000, title="t", cash=CashPart(500, "wechat"),
            vouchers=(VoucherPart("x/points", 50, LegMode.PRE_HELD, hold_id=hold.hold_id),))
        try:
            receipt = engine.submit(request)
        except PaymentError:
            pass
        else:
            assert settled(engine, receipt.order_id).state == "failed"
            assert channel.net_charged(receipt.payment_serial) == 0
        assert engine.get_account("x/points") == a


def test_one_pre_hold_adopted_by_two_orders_at_once(tmp_path: Path) -> None:
    """Two different orders reference the same pre-hold, submitted from two threads, 10
    times: the points are spent at most once and the other order never succeeds on them."""
    channel = FakeChannel()
    with open_engine(tmp_path, channel) as engine:
        for i in range(10):
            acc = f"twice{i}/points"
            engine.open_account(acc, "POINTS", minor_per_unit=10)
            engine.fund(acc, 100, funding_id=acc)
            hold = engine.pre_hold(acc, 20, ttl_ms=60_000)
            requests = [PaymentRequest(
                merchant_id="m", merchant_order_no=f"twice{i}-{k}", user_id="u",
                currency="CNY", total_minor=1_000, title="t", cash=CashPart(800, "wechat"),
                vouchers=(VoucherPart(acc, 20, LegMode.PRE_HELD, hold_id=hold.hold_id),))
                for k in range(2)]
            results = run_together([lambda r=r: engine.submit(r) for r in requests],
                                   random.Random(i))
            receipts = [v for kind, v in results if kind == "ok"]
            assert all(kind == "ok" or isinstance(v, PaymentError) for kind, v in results)
            assert receipts, results
            for r in receipts:
                # "paying" is committed before the pay call reaches the wallet: wait for the
                # call too, or the user pays a payment the wallet does not know yet
                wait_until(lambda r=r: engine.get_order(r.order_id).state in TERMINAL or (
                    engine.get_order(r.order_id).state == "paying"
                    and r.payment_serial in channel.payments), what="order to pay or end")
            run_together([lambda r=r: signed_callback(engine,
                "wechat", r.payment_serial, channel.user_pays(r.payment_serial))
                for r in receipts if engine.get_order(r.order_id).state == "paying"])
            orders = [settled(engine, r.order_id) for r in receipts]
            ok = [o for o in orders if o.state == "succeeded"]
            assert len(ok) <= 1, orders
            a = engine.get_account(acc)
            assert a.spent == 20 * len(ok), (a, orders)
            assert a.spent <= 20, a
            for r, o in zip(receipts, orders, strict=True):
                expected = 800 if o.state == "succeeded" else 0
                assert channel.net_charged(r.payment_serial) == expected, (o, channel.calls)
            assert_balanced(engine, [acc])


def test_pre_hold_adopted_with_other_amount_or_account(tmp_path: Path) -> None:
    """A PRE_HELD leg whose amount or account does not match the pre-hold must not pay
    more value than was held (refused at submit, or the order fails and nothing is spent)."""
    channel = FakeChannel()
    with open_engine(tmp_path, channel) as engine:
        engine.open_account("mm/points", "POINTS", minor_per_unit=10)
        engine.fund("mm/points", 500, funding_id="mm1")
        engine.open_account("mm/other", "POINTS", minor_per_unit=10)
        engine.fund("mm/other", 500, funding_id="mm2")
        for k, (acc, amount) in enumerate((("mm/points", 50), ("mm/points", 5),
                                           ("mm/other", 20))):
            hold = engine.pre_hold("mm/points", 20, ttl_ms=60_000)
            request = PaymentRequest(
                merchant_id="m", merchant_order_no=f"mm-{k}", user_id="u", currency="CNY",
                total_minor=1_000 + amount * 10, title="t", cash=CashPart(1_000, "wechat"),
                vouchers=(VoucherPart(acc, amount, LegMode.PRE_HELD, hold_id=hold.hold_id),))
            try:
                receipt = engine.submit(request)
            except PaymentError:
                continue
            state = wait_until(lambda: (s := engine.get_order(receipt.order_id).state)
                               in TERMINAL | {"paying"} and s, what="order to pay or end")
            if state == "paying":
                signed_callback(engine, "wechat", receipt.payment_serial,
                                       channel.user_pays(receipt.payment_serial))
            order = settled(engine, receipt.order_id)
            spent = engine.get_account(acc).spent
            if order.state == "succeeded":
                # then the leg's full amount must have been taken from the leg's account
                assert spent == amount, (order, engine.get_account(acc))
            view = engine.get_hold("mm/points", hold.hold_id)
            if view.status == "pending" and view.order_id is None:
                engine.release_hold("mm/points", hold.hold_id)
        wait_until(lambda: engine.unsettled_count() == 0)
        for acc in ("mm/points", "mm/other"):
            a = engine.get_account(acc)
            assert a.funded == a.available + a.held + a.spent, a


def test_concurrent_pre_holds_never_overdraw(tmp_path: Path) -> None:
    channel = FakeChannel()
    with open_engine(tmp_path, channel) as engine:
        for i in range(5):
            acc = f"ov{i}/points"
            engine.open_account(acc, "POINTS", minor_per_unit=10)
            engine.fund(acc, 100, funding_id=acc)
            results = run_together([lambda: engine.pre_hold(acc, 30, ttl_ms=60_000)
                                    for _ in range(8)], random.Random(i))
            holds = [v for kind, v in results if kind == "ok"]
            errors = [v for kind, v in results if kind == "err"]
            assert len(holds) == 3, results
            assert all(isinstance(e, InsufficientBalance) for e in errors), errors
            a = engine.get_account(acc)
            assert (a.available, a.held) == (10, 90)
            run_together([lambda h=h: engine.release_hold(acc, h.hold_id) for h in holds])
            assert_balanced(engine, [acc])


def test_concurrent_orders_share_one_voucher_account(tmp_path: Path) -> None:
    """8 orders each want 30 of an account holding 100: pre-deduct holds (4 orders) and
    post-deduct debits (4 orders) compete. Refused Trys/debits fail their order and return
    the cash; the rest succeed; nothing is overdrawn or lost."""
    channel = FakeChannel()
    with open_engine(tmp_path, channel) as engine:
        for round_no in range(3):
            acc = f"shared{round_no}/red"
            engine.open_account(acc, "CNY")
            engine.fund(acc, 100, funding_id=acc)
            requests = [PaymentRequest(
                merchant_id="m", merchant_order_no=f"sh{round_no}-{k}", user_id=f"u{k}",
                currency="CNY", total_minor=1_000, title="t", cash=CashPart(970, "wechat"),
                vouchers=(VoucherPart(acc, 30, LegMode.PRE_DEDUCT if k % 2 else
                                      LegMode.POST_DEDUCT),)) for k in range(8)]
            results = run_together([lambda r=r: engine.submit(r) for r in requests],
                                   random.Random(round_no))
            assert all(kind == "ok" for kind, _ in results), results
            receipts = [v for _, v in results]

            def paid_or_done(r) -> bool:
                o = engine.get_order(r.order_id)
                return o.state == "paying" or o.state in TERMINAL

            wait_until(lambda: all(paid_or_done(r) for r in receipts), what="orders to pay")
            fns = []
            for r in receipts:
                if engine.get_order(r.order_id).state == "paying":
                    channel.wait_pay(r.payment_serial)
                    reply = channel.user_pays(r.payment_serial)
                    fns.append(lambda r=r, reply=reply: signed_callback(engine,
                        "wechat", r.payment_serial, reply))
            run_together(fns, random.Random(round_no))
            orders = [settled(engine, r.order_id) for r in receipts]
            ok = [o for o in orders if o.state == "succeeded"]
            assert all(o.state in ("succeeded", "failed") for o in orders), orders
            assert len(ok) == 3, [o.state for o in orders]
            a = engine.get_account(acc)
            assert (a.spent, a.available, a.held) == (90, 10, 0), a
            for r, o in zip(receipts, orders, strict=True):
                expected = 970 if o.state == "succeeded" else 0
                assert channel.net_charged(r.payment_serial) == expected, (o, channel.calls)
                if o.state == "succeeded":
                    assert channel.refund_calls(r.payment_serial) == []


# --------------------------------------------------------------------------- typed errors


BAD_AMOUNTS = [1.5, True, False, -1, 0, 10**30]  # README: float, bool, zero, negative, too large


def test_typed_errors_leave_state_untouched(tmp_path: Path) -> None:
    channel = FakeChannel()
    with open_engine(tmp_path, channel) as engine:
        engine.open_account("t/red", "CNY")
        engine.fund("t/red", 100, funding_id="t1")
        engine.open_account("t/usd", "USD")
        engine.fund("t/usd", 100, funding_id="t2")
        engine.open_account("t/points", "POINTS", minor_per_unit=10)
        engine.fund("t/points", 100, funding_id="t3")
        accounts = ["t/red", "t/usd", "t/points"]
        hold = engine.pre_hold("t/points", 10)
        before = snapshot(engine, accounts)

        def unchanged() -> None:
            assert snapshot(engine, accounts) == before
            with pytest.raises(UnknownOrder):
                engine.find_order("m", "typed-1")

        def expect(error: type[PaymentError], fn: Callable[[], Any]) -> None:
            with pytest.raises(error) as info:
                fn()
            assert isinstance(info.value.code, str) and info.value.code
            unchanged()

        for bad in BAD_AMOUNTS:
            expect(InvalidAmount, lambda: engine.fund("t/red", bad, funding_id=f"bad-{bad!r}"))
            expect(InvalidAmount, lambda: engine.pre_hold("t/red", bad))
            expect(InvalidAmount, lambda: engine.submit(PaymentRequest(
                merchant_id="m", merchant_order_no="typed-1", user_id="u", currency="CNY",
                total_minor=bad, title="t", cash=CashPart(bad, "wechat"))))
            expect(InvalidAmount, lambda: engine.submit(PaymentRequest(
                merchant_id="m", merchant_order_no="typed-1", user_id="u", currency="CNY",
                total_minor=1_000, title="t", cash=CashPart(900, "wechat"),
                vouchers=(VoucherPart("t/red", bad),))))
        # a bad amount with the same funding id as a later good top-up
        expect(InvalidAmount, lambda: engine.fund("t/red", 1.5, funding_id="later"))

        expect(InsufficientBalance, lambda: engine.pre_hold("t/red", 101))
        expect(InsufficientBalance, lambda: engine.pre_hold("t/points", 91))
        expect(UnknownAccount, lambda: engine.fund("nope", 10, funding_id="n1"))
        expect(UnknownAccount, lambda: engine.pre_hold("nope", 10))
        expect(UnknownAccount, lambda: engine.get_account("nope"))
        expect(UnknownOrder, lambda: engine.get_order("ord_nope"))
        expect(UnknownOrder, lambda: engine.close("ord_nope"))
        expect(UnknownOrder, lambda: engine.find_order("m", "nope"))
        expect(UnknownHold, lambda: engine.get_hold("t/points", "hold_nope"))

        def req(**kw: Any) -> Callable[[], Any]:
            fields = dict(merchant_id="m", merchant_order_no="typed-1", user_id="u",
                          currency="CNY", total_minor=1_000, title="t",
                          cash=CashPart(900, "wechat"), vouchers=(VoucherPart("t/red", 100),))
            fields.update(kw)
            return lambda: engine.submit(PaymentRequest(**fields))

        expect(UnknownAccount, req(vouchers=(VoucherPart("nope", 100),)))
        expect(CurrencyMismatch, req(vouchers=(VoucherPart("t/usd", 100),)))
        expect(InvalidRequest, req(cash=CashPart(800, "wechat")))          # 800 + 100 != 1000
        expect(InvalidRequest, req(cash=CashPart(900, "alipay")))          # unknown channel
        # An unknown pre-hold: the README only promises that a refused Try fails the payment,
        # so either submit refuses it (typed, nothing committed) or the order fails unpaid.
        try:
            bad_hold = req(merchant_order_no="typed-hold", vouchers=(
                VoucherPart("t/points", 10, LegMode.PRE_HELD, hold_id="hold_nope"),))()
        except PaymentError:
            unchanged()
            with pytest.raises(UnknownOrder):
                engine.find_order("m", "typed-hold")
        else:
            # Observed: the engine Tries a fresh hold under the unknown id (like PRE_DEDUCT).
            # Not promised either way by the README; money-wise it must still balance.
            wait_until(lambda: engine.get_order(bad_hold.order_id).state in TERMINAL | {"paying"})
            if engine.get_order(bad_hold.order_id).state == "paying":
                engine.close(bad_hold.order_id)
            assert settled(engine, bad_hold.order_id).state in ("failed", "closed")
            assert channel.net_charged(bad_hold.payment_serial) == 0
            unchanged()

        # Nothing above was committed: the same key with sound parameters is a fresh order.
        receipt = req()()
        assert engine.find_order("m", "typed-1").order_id == receipt.order_id
        engine.fund("t/red", 7, funding_id="later")
        assert engine.get_account("t/red").funded == 107
        engine.release_hold("t/points", hold.hold_id)
        engine.close(receipt.order_id)
        settled(engine, receipt.order_id)
        assert_balanced(engine, accounts)


def test_non_numeric_amounts_are_typed_errors(tmp_path: Path) -> None:
    """Not listed in the README, but an integrator expects a PaymentError, not a crash."""
    channel = FakeChannel()
    with open_engine(tmp_path, channel) as engine:
        engine.open_account("n/red", "CNY")
        engine.fund("n/red", 100, funding_id="n1")
        before = engine.get_account("n/red")
        for bad in ("10", None, 10.0):
            with pytest.raises(PaymentError):
                engine.fund("n/red", bad, funding_id=f"b{bad!r}")
            with pytest.raises(PaymentError):
                engine.pre_hold("n/red", bad)
            with pytest.raises(PaymentError):
                engine.submit(PaymentRequest(
                    merchant_id="m", merchant_order_no="n-1", user_id="u", currency="CNY",
                    total_minor=bad, title="t", cash=CashPart(bad, "wechat")))
            assert engine.get_account("n/red") == before


def test_fund_is_idempotent_under_concurrency(tmp_path: Path) -> None:
    channel = FakeChannel()
    with open_engine(tmp_path, channel) as engine:
        engine.open_account("f/red", "CNY")
        for i in range(5):
            results = run_together([lambda: engine.fund("f/red", 50, funding_id=f"topup-{i}")
                                    for _ in range(8)], random.Random(i))
            assert all(kind == "ok" for kind, _ in results), results
            assert engine.get_account("f/red").funded == 50 * (i + 1)
        assert_balanced(engine, ["f/red"])


# --------------------------------------------------------------------------- chaos


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_many_orders_many_threads_conserve_money(tmp_path: Path, seed: int) -> None:
    """24 combined orders; per order a random story (success x1..3, failure, close,
    success racing close, close then late success), all stories played at once from
    many threads. Afterwards the money oracle and every account balance."""
    rng = random.Random(seed)
    channel = FakeChannel(refund_result="SUCCESS")
    with open_engine(tmp_path, channel) as engine:
        combos = [new_combo(engine, f"s{seed}-{k}", cash=rng.randint(1, 5_000))
                  for k in range(24)]
        for c in combos:
            wait_paying(engine, channel, c.receipt)
        stories: list[Callable[[], Any]] = []

        def swallow(fn: Callable[[], Any]) -> Callable[[], Any]:
            def run() -> Any:
                try:
                    return fn()
                except IllegalTransition as error:
                    return error
            return run

        for c in combos:
            serial, oid = c.receipt.payment_serial, c.receipt.order_id
            kind = rng.choice(["success", "dup", "fail", "close", "race", "late"])
            if kind == "fail":
                reply = channel.user_fails(serial)
            elif kind != "close":
                reply = channel.user_pays(serial)
            cb = (lambda s=serial, r=reply: signed_callback(engine, "wechat", s, r)) \
                if kind != "close" else None
            close = swallow(lambda o=oid: engine.close(o))
            if kind in ("success", "fail"):
                stories.append(cb)
            elif kind == "dup":
                stories += [cb] * 3
            elif kind == "close":
                stories.append(close)
            elif kind == "race":
                stories += [cb, close]
            else:  # close first, then the late success, in one thread
                stories.append(lambda close=close, cb=cb: (close(), cb()))
        rng.shuffle(stories)
        results = run_together(stories, rng)
        assert all(kind == "ok" for kind, _ in results), [v for k, v in results if k == "err"]
        for c in combos:
            order = settled(engine, c.receipt.order_id)
            if order.state == "succeeded":
                assert_combo_succeeded(engine, channel, c)
            else:
                assert_combo_unwound(engine, channel, c)
        assert engine.unsettled_count() == 0


# --------------------------------------------------------------------------- shutdown / resume


def test_race_then_restart_resumes_to_one_story(tmp_path: Path) -> None:
    """Callback and close race, the engine is shut down at once (refund still PROCESSING at
    the wallet), reopened on the same file: it finishes the one story it committed to."""
    channel = FakeChannel(refund_result="PROCESSING")
    policy = OrderPolicy(pay_window_ms=120_000, query_schedule_ms=(60_000,),
                         refund_query_schedule_ms=(100, 200, 400))
    outcomes: dict[str, int] = {}
    for i in range(6):
        engine = Engine.open(tmp_path / "resume.db", channels=[channel], policy=policy)
        try:
            combo = new_combo(engine, f"rs{i}")
            serial, oid = combo.receipt.payment_serial, combo.receipt.order_id
            wait_paying(engine, channel, combo.receipt)
            paid = channel.user_pays(serial)
            fns = [lambda: signed_callback(engine, "wechat", serial, paid),
                   lambda: engine.close(oid)]
            run_together(fns if i % 2 else fns[::-1], random.Random(i))
        finally:
            engine.shutdown()
        channel.complete_refunds(serial)  # the wallet finishes the refund while we are down
        engine = Engine.open(tmp_path / "resume.db", channels=[channel], policy=policy)
        try:
            def done() -> Any:
                channel.complete_refunds(serial)  # a refund issued after reopening finishes too
                order = engine.get_order(oid)
                return order.settled and order.legs[0].status != "refund_unknown" and order
            order = wait_until(done, what=f"{oid} to settle after reopening")
            outcomes[order.state] = outcomes.get(order.state, 0) + 1
            if order.state == "succeeded":
                assert_combo_succeeded(engine, channel, combo)
            else:
                assert_combo_unwound(engine, channel, combo, states=("closed",))
        finally:
            engine.shutdown()
    print("restart race outcomes:", outcomes)


def test_submits_racing_shutdown_are_all_or_nothing(tmp_path: Path) -> None:
    """16 threads submit while the engine shuts down. README: every method is thread-safe;
    expected failures are typed and "leave state untouched". So each submit must return
    promptly with either a receipt (and the order exists after reopening) or a typed
    PaymentError such as EngineClosed (and no order exists: the cashier was told "no")."""
    channel = FakeChannel()
    violations: list[str] = []
    stuck_rounds = 0
    for round_no in range(8):
        db = tmp_path / f"shut{round_no}.db"
        engine = Engine.open(db, channels=[channel])
        red = f"sd{round_no}/red"
        engine.open_account(red, "CNY")
        engine.fund(red, 10_000, funding_id=red)
        requests = [plain_request(f"sd{round_no}-{k}", red) for k in range(16)]
        fns: list[Callable[[], Any]] = [lambda r=r: engine.submit(r) for r in requests]
        fns.insert(8, lambda: (time.sleep(0.002), engine.shutdown()))
        try:
            results = run_together(fns, random.Random(round_no), join_s=2.0, stuck_ok=True)
        finally:
            engine.shutdown()
        del results[8]
        stuck = [request.merchant_order_no for request, (kind, _) in zip(requests, results, strict=True)
                 if kind == "stuck"]
        if stuck:
            stuck_rounds += 1
            violations.append(f"round {round_no}: submit blocked > 2 s during shutdown "
                              f"(it raises Overloaded after ~30 s): {stuck}")
        engine = Engine.open(db, channels=[channel])
        try:
            for request, (kind, value) in zip(requests, results, strict=True):
                no = request.merchant_order_no
                try:
                    found = engine.find_order("m", no)
                except UnknownOrder:
                    found = None
                if kind == "ok":
                    if found is None or found.order_id != value.order_id:
                        violations.append(f"{no}: receipt {value.order_id} but no such order")
                elif kind == "err":
                    if not isinstance(value, PaymentError):
                        violations.append(f"{no}: untyped error {value!r}")
                    if found is not None:
                        violations.append(f"{no}: submit raised {value!r} but order "
                                          f"{found.order_id} was committed (state {found.state})")
                if found is not None:
                    oid = found.order_id
                    wait_until(lambda oid=oid: engine.get_order(oid).state
                               in TERMINAL | {"paying"}, what="resumed order")
                    if engine.get_order(oid).state == "paying":
                        engine.close(oid)
                    settled(engine, oid)
            assert_balanced(engine, [red])
            assert engine.get_account(red).spent == 0
        finally:
            engine.shutdown()
        if stuck_rounds >= 2:
            break  # enough evidence; keep the file fast
    assert not violations, "\n".join(violations[:12]) + f"\n({len(violations)} in all)"


def test_reads_and_callbacks_racing_shutdown_return_promptly(tmp_path: Path) -> None:
    """get_order / get_account / find_order / handle_callback from 15 threads while the
    engine shuts down: each returns or raises a typed PaymentError (EngineClosed) at once."""
    channel = FakeChannel()
    problems: list[str] = []
    for round_no in range(4):
        engine = Engine.open(tmp_path / f"reads{round_no}.db", channels=[channel])
        try:
            engine.open_account("rd/red", "CNY")
            engine.fund("rd/red", 10_000, funding_id="rd")
            receipt = engine.submit(plain_request("rd-1", "rd/red"))
            wait_paying(engine, channel, receipt)
            paid = channel.user_pays(receipt.payment_serial)
            fns: list[Callable[[], Any]] = [
                lambda: engine.get_order(receipt.order_id),
                lambda: engine.get_account("rd/red"),
                lambda: engine.find_order("m", "rd-1"),
                lambda: signed_callback(engine, "wechat", receipt.payment_serial, paid)] * 4
            fns[7] = lambda: (time.sleep(0.002), engine.shutdown())
            results = run_together(fns, random.Random(round_no), join_s=2.0, stuck_ok=True)
        finally:
            engine.shutdown()
        for i, (kind, value) in enumerate(results):
            if kind == "stuck":
                problems.append(f"round {round_no}: call {i} blocked > 2 s during shutdown")
            elif kind == "err" and not isinstance(value, PaymentError):
                problems.append(f"round {round_no}: call {i} raised untyped {value!r}")
        if problems:
            break
    assert not problems, problems


def test_calls_after_shutdown_raise_engine_closed(tmp_path: Path) -> None:
    from payengine import EngineClosed
    channel = FakeChannel()
    engine = Engine.open(tmp_path / "closed.db", channels=[channel])
    engine.open_account("c/red", "CNY")
    engine.shutdown()
    for fn in (lambda: engine.fund("c/red", 1, funding_id="x"),
               lambda: engine.submit(plain_request("c-1", "c/red")),
               lambda: engine.pre_hold("c/red", 1)):
        with pytest.raises(EngineClosed):
            fn()


def test_overloaded_submit_leaves_state_untouched(tmp_path: Path) -> None:
    from payengine import Overloaded
    channel = FakeChannel()
    with open_engine(tmp_path, channel, config=EngineConfig(live_orders_max=2,
                                                                 duplicate_guard_window_ms=0)) as engine:
        engine.open_account("o/red", "CNY")
        engine.fund("o/red", 10_000, funding_id="o1")
        receipts, refused = [], []
        for k in range(5):
            try:
                receipts.append(engine.submit(plain_request(f"ov-{k}", "o/red")))
            except Overloaded:
                refused.append(k)
        assert refused, "live_orders_max=2 never refused a submit"
        for k in refused:
            with pytest.raises(UnknownOrder):
                engine.find_order("m", f"ov-{k}")
        for r in receipts:
            wait_paying(engine, channel, r)
            engine.close(r.order_id)
            settled(engine, r.order_id)
        assert_balanced(engine, ["o/red"])
        assert engine.get_account("o/red").held == 0


# --------------------------------------------------------------------------- chaos with timers


@pytest.mark.parametrize("seed", [11, 12])
def test_chaos_with_queries_timeouts_and_lost_callbacks(tmp_path: Path, seed: int) -> None:
    """Fast query gradient and a short pay window, so every path races every other: users
    pay at random times (some after the window), callbacks are lost or sent 1-3 times, some
    cashiers close. The money oracle must hold for every order."""
    rng = random.Random(seed)
    channel = FakeChannel()
    policy = OrderPolicy(pay_window_ms=250, query_schedule_ms=(30, 60, 120, 240, 480, 960),
                         refund_query_schedule_ms=(30, 60, 120, 240))
    with open_engine(tmp_path, channel, policy=policy) as engine:
        combos = [new_combo(engine, f"c{seed}-{k}", cash=rng.randint(1, 3_000))
                  for k in range(20)]
        plans = [dict(pay_at=rng.choice([None, rng.uniform(0, 0.2), rng.uniform(0.2, 0.4)]),
                      copies=rng.choice([0, 1, 1, 2, 3]),
                      close_at=rng.choice([None, None, rng.uniform(0, 0.3)])) for _ in combos]

        def story(c: Combo, plan: dict[str, Any], seed_: int) -> None:
            r = random.Random(seed_)
            serial, oid = c.receipt.payment_serial, c.receipt.order_id
            channel.wait_pay(serial)
            events = []
            if plan["pay_at"] is not None:
                events.append((plan["pay_at"], "pay"))
            if plan["close_at"] is not None:
                events.append((plan["close_at"], "close"))
            start = time.monotonic()
            for at, what in sorted(events):
                time.sleep(max(0.0, start + at - time.monotonic()))
                if what == "pay":
                    reply = channel.user_pays(serial)
                    for _ in range(plan["copies"]):
                        time.sleep(r.uniform(0, 0.02))
                        signed_callback(engine, "wechat", serial, reply)
                else:
                    with contextlib.suppress(IllegalTransition):
                        engine.close(oid)

        results = run_together([lambda c=c, p=p, k=k: story(c, p, seed * 100 + k)
                                for k, (c, p) in enumerate(zip(combos, plans, strict=True))])
        assert all(kind == "ok" for kind, _ in results), [v for k, v in results if k == "err"]
        states: dict[str, int] = {}
        for c in combos:
            order = settled(engine, c.receipt.order_id)
            states[order.state] = states.get(order.state, 0) + 1
            if order.state == "succeeded":
                assert_combo_succeeded(engine, channel, c)
            else:
                assert_combo_unwound(engine, channel, c, states=("closed", "failed"))
        print("chaos states:", states)
        assert engine.unsettled_count() == 0
