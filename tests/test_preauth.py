"""Pump pre-authorisation through the engine (issue 12 item 3, SPEC R-FUEL).

The real engine on the deterministic runtime (virtual time), with a scripted wallet that
implements ``AuthorisationChannel`` and keeps its own ground truth: authorise up to the
pump's limit, capture what was dispensed (the rest released), void, expiry, restarts.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from payengine import (
    AlreadyCaptured,
    AuthorisationReply,
    AuthorisationStatus,
    AuthorisationUnsupported,
    AuthorisationVoided,
    CaptureAboveAuthorised,
    CashPart,
    Engine,
    EngineConfig,
    IdempotencyConflict,
    IllegalTransition,
    InvalidAmount,
    LegMode,
    OrderPolicy,
    OrderView,
    PaymentRequest,
    VoucherPart,
)
from payengine.sim.runtime import Scheduler, SimRuntime
from tests.helpers import ScriptedChannel, fund_customer

A = AuthorisationStatus
TTL_MS = 10_000
POLICY = OrderPolicy(pay_window_ms=60_000, query_schedule_ms=(500, 1_000),
                     refund_query_schedule_ms=(60_000,), authorisation_ttl_ms=TTL_MS)


class PumpWallet(ScriptedChannel):
    """A scripted wallet that pre-authorises: holds, captures and voids per serial, as a
    real acquirer would, unless the test makes a call fail (``fail``: op -> remaining)."""

    def __init__(self, name: str = "wechat") -> None:
        super().__init__(name)
        self.held: dict[str, int] = {}
        self.state: dict[str, AuthorisationStatus] = {}
        self.captured: dict[str, tuple[str, int]] = {}
        self.decline = False
        self.fail: dict[str, int] = {}
        self.lost_after: dict[str, int] = {}
        """op -> how many calls take effect and then lose their answer."""

    def _failing(self, op: str) -> None:
        if self.fail.get(op, 0) > 0:
            self.fail[op] -= 1
            raise TimeoutError(f"{op} timed out")

    def _reply(self, op: str, serial: str) -> AuthorisationReply:
        state = self.state.get(serial, A.NOT_FOUND)
        if self.lost_after.get(op, 0) > 0:
            self.lost_after[op] -= 1
            raise TimeoutError(f"{op} answer lost")
        amount = {A.AUTHORISED: self.held.get(serial),
                  A.CAPTURED: self.captured.get(serial, ("", 0))[1] or None}.get(state)
        return AuthorisationReply(state, amount, f"A-{serial}")

    def authorise(self, payment_serial: str, amount_minor: int, currency: str, title: str,
                  details: object = None) -> AuthorisationReply:
        self.calls.append(("authorise", payment_serial, str(amount_minor)))
        self._failing("authorise")
        if payment_serial not in self.state:
            self.state[payment_serial] = A.DECLINED if self.decline else A.AUTHORISED
            self.held[payment_serial] = amount_minor
        return self._reply("authorise", payment_serial)

    def capture(self, payment_serial: str, capture_id: str, amount_minor: int
                ) -> AuthorisationReply:
        self.calls.append(("capture", payment_serial, capture_id, str(amount_minor)))
        self._failing("capture")
        if self.state.get(payment_serial) is A.AUTHORISED:
            assert amount_minor <= self.held[payment_serial], "captured above the hold"
            self.state[payment_serial] = A.CAPTURED
            self.captured[payment_serial] = (capture_id, amount_minor)
        return self._reply("capture", payment_serial)

    def void(self, payment_serial: str) -> AuthorisationReply:
        self.calls.append(("void", payment_serial))
        self._failing("void")
        if self.state.get(payment_serial, A.AUTHORISED) is A.AUTHORISED:
            self.state[payment_serial] = A.VOIDED
        return self._reply("void", payment_serial)

    def query_authorisation(self, payment_serial: str) -> AuthorisationReply:
        self.calls.append(("query_authorisation", payment_serial))
        self._failing("query")
        return self._reply("query", payment_serial)


class Station:
    """One scheduler, one pump wallet, one engine reopened on the same file."""

    def __init__(self, path: Path, policy: OrderPolicy = POLICY) -> None:
        self.path = path
        self.scheduler = Scheduler(7)
        self.wallet = PumpWallet()
        self.policy = policy
        self.engine = self.open()
        fund_customer(self.engine)

    def open(self) -> Engine:
        return Engine.open(self.path, channels=[self.wallet],  # type: ignore[list-item]
                           policy=self.policy, runtime=SimRuntime(self.scheduler),
                           config=EngineConfig(duplicate_guard_window_ms=0,
                                               account_idle_ms=500))

    def reopen(self, *, crash: bool) -> None:
        if crash:
            self.engine.abandon()
        else:
            self.engine.shutdown()
        self.engine = self.open()

    def run_for(self, ms: int) -> None:
        until = self.scheduler.now_ms + ms
        self.scheduler.run_until(lambda: False, deadline_ms=until - 1)
        self.scheduler.now_ms = max(self.scheduler.now_ms, until)

    def run_until(self, what: str, done: object, limit_ms: int = 120_000) -> None:
        deadline = self.scheduler.now_ms + limit_ms
        assert self.scheduler.run_until(done, deadline_ms=deadline), (  # type: ignore[arg-type]
            f"{what}: not within {limit_ms} virtual ms")

    def order(self, order_id: str) -> OrderView:
        return self.engine.get_order(order_id)

    def authorised(self, request: PaymentRequest | None = None) -> OrderView:
        receipt = self.engine.submit(request or pump_request())
        self.run_until("authorised", lambda: self.order(receipt.order_id).state == "authorised")
        return self.order(receipt.order_id)

    def balances(self, account: str) -> tuple[int, int, int]:
        view = self.engine.get_account(account)
        return view.available, view.held, view.spent

    def merchant(self, order_id: str) -> int:
        return self.engine.ledger_balances(order_id).get("CNY", {}).get("merchant:station-1", 0)


@pytest.fixture
def station(tmp_path: Path) -> Iterator[Station]:
    s = Station(tmp_path / "station.db")
    yield s
    s.engine.shutdown()


def pump_request(no: str = "pump-1", cash: int = 20_000, red_packet: int = 500,
                 points: int = 0) -> PaymentRequest:
    """Authorise up to cash + red packet (+ points at 10 fen each) at pump 3."""
    vouchers = [VoucherPart("alice/red-packet", red_packet)] if red_packet else []
    if points:
        vouchers.append(VoucherPart("alice/points", points))
    return PaymentRequest(
        merchant_id="station-1", merchant_order_no=no, user_id="alice", currency="CNY",
        total_minor=cash + red_packet + 10 * points, title="Pump 3", cash=CashPart(cash, "wechat"),
        vouchers=tuple(vouchers), authorise=True)


def test_a_capture_short_charges_the_dispensed_amount_vouchers_first_and_releases_the_rest(
        station: Station) -> None:
    view = station.authorised()
    assert (view.authorised_minor, view.total_minor, view.captured_minor) == (20_500, 20_500, None)
    assert station.balances("alice/red-packet") == (500, 500, 0)
    assert station.wallet.held[view.payment_serial] == 20_000

    captured = station.engine.capture(view.order_id, 12_345, capture_id="cap-1")
    assert captured.state == "capturing" and captured.captured_minor == 12_345
    station.run_until("settled", lambda: station.order(view.order_id).settled)

    done = station.order(view.order_id)
    assert done.state == "succeeded" and done.total_minor == 12_345
    assert done.authorised_minor == 20_500 and done.capture_id == "cap-1"
    assert [(leg.leg_no, leg.amount, leg.value_minor) for leg in done.legs] == [
        (0, 11_845, 11_845), (1, 500, 500)]
    assert station.wallet.captured[view.payment_serial] == ("cap-1", 11_845)
    assert station.balances("alice/red-packet") == (500, 0, 500)
    assert station.merchant(view.order_id) == 12_345


def test_a_capture_smaller_than_the_vouchers_posts_part_of_a_hold_and_voids_the_cash(
        tmp_path: Path) -> None:
    s = Station(tmp_path / "s.db")
    try:
        view = s.authorised(pump_request(red_packet=800, points=50))  # 8.00 + 5.00 + 200.00
        s.engine.capture(view.order_id, 1_005, capture_id="c")
        s.run_until("settled", lambda: s.order(view.order_id).settled)
        done = s.order(view.order_id)
        assert done.state == "succeeded" and done.total_minor == 1_005
        # vouchers first, points before money vouchers: 50 points (5.00), 5.05 red packet
        assert {leg.leg_no: (leg.amount, leg.status) for leg in done.legs} == {
            0: (0, "voided"), 1: (505, "confirmed"), 2: (50, "confirmed")}
        assert s.balances("alice/red-packet") == (495, 0, 505)
        assert s.balances("alice/points") == (950, 0, 50)
        assert s.wallet.state[view.payment_serial] is A.VOIDED
        assert s.merchant(view.order_id) == 1_005
        refund = s.engine.refund(view.order_id, "r1", 1_005)  # no cash: vouchers only
        assert refund.amount_minor == 1_005
        s.run_until("refunded", lambda: s.order(view.order_id).settled)
        assert s.order(view.order_id).refund("r1").status == "succeeded"
        assert s.balances("alice/red-packet") == (1_000, 0, 0)
        assert s.balances("alice/points") == (1_000, 0, 0)
        assert s.merchant(view.order_id) == 0
    finally:
        s.engine.shutdown()


def test_cash_first_captures_the_cash_and_leaves_the_voucher_hold_released(
        tmp_path: Path) -> None:
    s = Station(tmp_path / "s.db", OrderPolicy(**{**_policy_fields(), "capture_order":
                                                   "cash_first"}))
    try:
        view = s.authorised()
        s.engine.capture(view.order_id, 15_000, capture_id="c")
        s.run_until("settled", lambda: s.order(view.order_id).settled)
        done = s.order(view.order_id)
        assert {leg.leg_no: (leg.amount, leg.status) for leg in done.legs} == {
            0: (15_000, "paid"), 1: (0, "cancelled")}
        assert s.balances("alice/red-packet") == (1_000, 0, 0)
    finally:
        s.engine.shutdown()


def _policy_fields() -> dict[str, object]:
    return {"pay_window_ms": 60_000, "query_schedule_ms": (500, 1_000),
            "refund_query_schedule_ms": (60_000,), "authorisation_ttl_ms": TTL_MS}


def test_the_same_capture_again_is_answered_the_same_and_moves_nothing(station: Station) -> None:
    view = station.authorised()
    first = station.engine.capture(view.order_id, 9_000, capture_id="cap-1")
    again = station.engine.capture(view.order_id, 9_000, capture_id="cap-1")
    assert again == first
    station.run_until("settled", lambda: station.order(view.order_id).settled)
    assert station.engine.capture(view.order_id, 9_000, capture_id="cap-1").state == "succeeded"
    assert [c for c in station.wallet.calls if c[0] == "capture"] == [
        ("capture", view.payment_serial, "cap-1", "8500")]


@pytest.mark.parametrize("when", ["capturing", "succeeded"])
def test_a_second_capture_or_another_amount_or_a_void_is_refused_and_changes_nothing(
        station: Station, when: str) -> None:
    view = station.authorised()
    station.engine.capture(view.order_id, 9_000, capture_id="cap-1")
    if when == "succeeded":
        station.run_until("settled", lambda: station.order(view.order_id).settled)
    before = station.order(view.order_id)
    with pytest.raises(AlreadyCaptured) as second:
        station.engine.capture(view.order_id, 1_000, capture_id="cap-2")
    assert second.value.code == "already_captured"
    with pytest.raises(IdempotencyConflict):
        station.engine.capture(view.order_id, 9_001, capture_id="cap-1")
    with pytest.raises(AlreadyCaptured):
        station.engine.void(view.order_id)
    assert station.order(view.order_id) == before


def test_a_capture_above_the_authorisation_is_refused_and_nothing_moves(station: Station) -> None:
    view = station.authorised()
    with pytest.raises(CaptureAboveAuthorised) as above:
        station.engine.capture(view.order_id, 20_501, capture_id="cap-1")
    assert above.value.code == "capture_above_authorised"
    assert station.order(view.order_id) == view
    assert not [c for c in station.wallet.calls if c[0] == "capture"]
    with pytest.raises(InvalidAmount):
        station.engine.capture(view.order_id, -1, capture_id="cap-1")
    station.engine.capture(view.order_id, 20_500, capture_id="cap-1")  # all of it: fine
    station.run_until("settled", lambda: station.order(view.order_id).settled)
    assert station.order(view.order_id).total_minor == 20_500


def test_a_void_releases_every_hold_and_voids_at_the_channel_and_a_capture_after_is_refused(
        station: Station) -> None:
    view = station.authorised()
    voiding = station.engine.void(view.order_id)
    assert voiding.state == "voiding"
    station.run_until("closed", lambda: station.order(view.order_id).settled)
    assert station.balances("alice/red-packet") == (1_000, 0, 0)
    closed = station.order(view.order_id)
    assert (closed.state, closed.cause) == ("closed", "void")
    assert station.wallet.state[view.payment_serial] is A.VOIDED
    assert station.engine.void(view.order_id) == closed  # idempotent
    with pytest.raises(AuthorisationVoided) as voided:
        station.engine.capture(view.order_id, 100, capture_id="late")
    assert voided.value.code == "authorisation_voided"
    assert station.order(view.order_id) == closed
    assert station.merchant(view.order_id) == 0


def test_a_capture_of_zero_is_a_void(station: Station) -> None:
    view = station.authorised()
    assert station.engine.capture(view.order_id, 0, capture_id="c0").state == "voiding"
    station.run_until("closed", lambda: station.order(view.order_id).settled)
    assert station.order(view.order_id).state == "closed"


def test_an_authorisation_never_captured_expires_and_is_voided(station: Station) -> None:
    view = station.authorised()
    station.run_for(TTL_MS + 1_000)
    station.run_until("closed", lambda: station.order(view.order_id).settled)
    closed = station.order(view.order_id)
    assert (closed.state, closed.cause) == ("closed", "authorisation_expired")
    assert station.wallet.state[view.payment_serial] is A.VOIDED
    assert station.balances("alice/red-packet") == (1_000, 0, 0)
    with pytest.raises(AuthorisationVoided):
        station.engine.capture(view.order_id, 100, capture_id="late")


def test_a_declined_authorisation_fails_the_order_and_releases_the_vouchers(
        station: Station) -> None:
    station.wallet.decline = True
    receipt = station.engine.submit(pump_request())
    station.run_until("failed", lambda: station.order(receipt.order_id).settled)
    failed = station.order(receipt.order_id)
    assert failed.state == "failed" and failed.cause.startswith("authorisation_declined")
    assert station.balances("alice/red-packet") == (1_000, 0, 0)
    with pytest.raises(IllegalTransition):
        station.engine.capture(receipt.order_id, 100, capture_id="c")


def test_a_capture_before_the_authorisation_answered_is_refused(station: Station) -> None:
    station.wallet.fail["authorise"] = 1
    station.wallet.fail["query"] = 5
    receipt = station.engine.submit(pump_request())
    station.run_until("authorising", lambda: station.order(receipt.order_id).state
                      == "authorising")
    with pytest.raises(IllegalTransition):
        station.engine.capture(receipt.order_id, 100, capture_id="c")


def test_an_authorisation_whose_answer_was_lost_is_found_by_its_query(station: Station) -> None:
    station.wallet.lost_after["authorise"] = 1
    view = station.authorised()
    assert ("query_authorisation", view.payment_serial) in station.wallet.calls
    assert [c[0] for c in station.wallet.calls].count("authorise") == 1


def test_an_authorisation_never_answered_is_voided_to_be_safe(station: Station) -> None:
    station.wallet.fail["authorise"] = 1
    station.wallet.fail["query"] = 100
    receipt = station.engine.submit(pump_request())
    station.run_until("closed", lambda: station.order(receipt.order_id).settled)
    closed = station.order(receipt.order_id)
    assert closed.state == "closed" and "unanswered" in closed.cause
    assert station.wallet.state[closed.payment_serial] is A.VOIDED


def test_a_capture_whose_answer_is_lost_is_asked_again_never_decided_anew(
        station: Station) -> None:
    view = station.authorised()
    station.wallet.lost_after["capture"] = 2
    station.engine.capture(view.order_id, 7_000, capture_id="cap-1")
    station.run_until("settled", lambda: station.order(view.order_id).settled)
    captures = [c for c in station.wallet.calls if c[0] == "capture"]
    assert len(captures) == 3 and len(set(captures)) == 1
    assert station.order(view.order_id).state == "succeeded"


@pytest.mark.parametrize("crash", [True, False])
def test_a_restart_resumes_an_authorised_order_whose_expiry_still_applies(
        station: Station, crash: bool) -> None:
    view = station.authorised()
    station.reopen(crash=crash)
    assert station.order(view.order_id).state == "authorised"
    station.run_for(TTL_MS + 1_000)
    station.run_until("closed", lambda: station.order(view.order_id).settled)
    assert station.order(view.order_id).cause == "authorisation_expired"
    assert station.wallet.state[view.payment_serial] is A.VOIDED


def test_a_restart_during_a_capture_sends_the_same_capture_and_it_completes(
        station: Station) -> None:
    view = station.authorised()
    station.wallet.fail["capture"] = 1
    station.engine.capture(view.order_id, 5_000, capture_id="cap-1")
    station.reopen(crash=True)
    station.run_until("settled", lambda: station.order(view.order_id).settled)
    done = station.order(view.order_id)
    assert done.state == "succeeded" and done.captured_minor == 5_000
    assert station.wallet.captured[view.payment_serial] == ("cap-1", 4_500)


def test_a_refund_of_a_captured_order_is_limited_to_what_was_captured(station: Station) -> None:
    from payengine import RefundRefused
    station.wallet.refund_reply = __import__("payengine").ChannelReply("SUCCESS", "SUCCESS")
    view = station.authorised()
    station.engine.capture(view.order_id, 3_000, capture_id="c")
    station.run_until("settled", lambda: station.order(view.order_id).settled)
    with pytest.raises(RefundRefused):
        station.engine.refund(view.order_id, "r1", 3_001)
    station.engine.refund(view.order_id, "r1", 3_000)
    station.run_until("refunded", lambda: station.order(view.order_id).settled)
    assert station.merchant(view.order_id) == 0


def test_authorise_is_refused_where_it_cannot_be_and_creates_nothing(tmp_path: Path) -> None:
    plain = ScriptedChannel()
    engine = Engine.open(tmp_path / "p.db", channels=[plain],  # type: ignore[list-item]
                         policy=POLICY, runtime=SimRuntime(Scheduler(1)),
                         config=EngineConfig(duplicate_guard_window_ms=0))
    try:
        fund_customer(engine)
        with pytest.raises(AuthorisationUnsupported) as unsupported:
            engine.submit(pump_request())
        assert unsupported.value.code == "authorisation_unsupported"
        post = PaymentRequest(
            merchant_id="station-1", merchant_order_no="p2", user_id="alice", currency="CNY",
            total_minor=10_100, title="Pump", cash=CashPart(10_000, "wechat"),
            vouchers=(VoucherPart("alice/phone", 100, LegMode.POST_DEDUCT),), authorise=True)
        with pytest.raises(AuthorisationUnsupported):
            engine.submit(post)
        with pytest.raises(AuthorisationUnsupported):
            engine.submit(PaymentRequest(
                merchant_id="station-1", merchant_order_no="p3", user_id="alice",
                currency="CNY", total_minor=100, title="Pump",
                vouchers=(VoucherPart("alice/red-packet", 100),), authorise=True))
        assert engine.store.count_orders_by_state() == {}
    finally:
        engine.shutdown()


def test_authorise_is_in_the_fingerprint_only_when_set() -> None:
    plain = pump_request()
    from dataclasses import replace
    assert replace(plain, authorise=False).fingerprint() != plain.fingerprint()
    assert replace(plain, authorise=False).fingerprint() == PaymentRequest(
        merchant_id="station-1", merchant_order_no="pump-1", user_id="alice", currency="CNY",
        total_minor=20_500, title="Pump 3", cash=CashPart(20_000, "wechat"),
        vouchers=(VoucherPart("alice/red-packet", 500),)).fingerprint()


def test_the_simulated_wallet_pre_authorises_on_real_threads_as_the_readme_says(
        tmp_path: Path) -> None:
    from payengine import ThreadRuntime
    from payengine.sim.channel import ChannelFaults, SimulatedChannel
    from tests.helpers import wait_for
    world = ThreadRuntime()
    wechat = SimulatedChannel("wechat", world, seed=1, faults=ChannelFaults.none())
    engine = Engine.open(tmp_path / "t.db", channels=[wechat],
                         policy=OrderPolicy(query_schedule_ms=(200, 400, 800)),
                         config=EngineConfig(ask_timeout_s=5.0, duplicate_guard_window_ms=0))
    try:
        wechat.attach(engine)
        fund_customer(engine)
        receipt = engine.submit(pump_request())
        wait_for(lambda: engine.get_order(receipt.order_id).state == "authorised",
                 what="authorised")
        with pytest.raises(CaptureAboveAuthorised):
            engine.capture(receipt.order_id, 20_501, capture_id="c1")
        engine.capture(receipt.order_id, 12_345, capture_id="c1")
        done = wait_for(lambda: (o := engine.get_order(receipt.order_id)).settled and o,
                        what="captured")
        assert (done.state, done.total_minor, done.authorised_minor) == ("succeeded", 12_345,
                                                                          20_500)
        record = wechat.authorisation(receipt.payment_serial)
        assert record is not None and (record.state, record.captured_minor) == (A.CAPTURED,
                                                                                11_845)
        assert wechat.net_charged(receipt.payment_serial) == 11_845
    finally:
        engine.shutdown()
        world.shutdown()
