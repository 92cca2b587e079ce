"""External voucher providers (several asynchronous legs): a payment of cash, an internal red
packet and a carrier's phone credit held by Try/Confirm/Cancel over the network.

The real engine runs on the deterministic runtime (virtual time, one seed); the carrier is
the simulator's (``sim.provider``), its faults switched on one at a time.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from payengine import (
    CashPart,
    ChannelReply,
    Engine,
    EngineConfig,
    OrderPolicy,
    OrderView,
    PaymentRequest,
    VoucherPart,
)
from payengine.actors.adapters.providers import load_providers
from payengine.engine.errors import (
    InvalidRequest,
    ProviderCallbackRejected,
    ProvidersMissing,
    RefundRefused,
    UnknownAccount,
)
from payengine.engine.order import LegMode
from payengine.engine.provider import txn_id_of
from payengine.engine.voucher import FenceKey
from payengine.sim.provider import SIM_PROVIDERS_TOML, ProviderFaults, SimulatedProvider
from payengine.sim.runtime import Scheduler, SimRuntime, SimWorld
from tests.helpers import ScriptedChannel, fund_customer, paid_reply, signed_callback

RETRY_MS = (100, 200, 400)
QUERY_MS = (50, 100)
POLICY = OrderPolicy(pay_window_ms=5_000, hold_grace_ms=5_000, query_schedule_ms=(60_000,),
                     refund_query_schedule_ms=(60_000,), voucher_retry_schedule_ms=RETRY_MS,
                     voucher_sentinel_interval_ms=1_000)
PHONE = "13800000000"
PHONE_ACCOUNT = f"carrier-x:{PHONE}"
TEST_TOML = SIM_PROVIDERS_TOML.replace("[300, 600, 1200, 2400]", "[50, 100]")


class Carrier(SimulatedProvider):
    """The simulated carrier, with a switch that makes its Confirms time out."""

    confirm_down = False

    def confirm(self, txn_id: str) -> object:  # type: ignore[override]
        if self.confirm_down:
            raise TimeoutError("carrier confirm timed out")
        return super().confirm(txn_id)


class World:
    def __init__(self, path: Path, faults: ProviderFaults | None = None) -> None:
        self.path = path
        self.scheduler = Scheduler(1)
        self.channel = ScriptedChannel()
        self.channel.refund_reply = ChannelReply("SUCCESS", "SUCCESS")
        self.engine: Engine | None = None
        self.carrier = Carrier("carrier-x", SimWorld(self.scheduler, io_latency_ms=(1, 1)),
                               random.Random(7), faults or ProviderFaults(), "carrier-secret",
                               lambda: self.engine)
        self.carrier.fund(PHONE, 1_000)
        self.engine = self.open()
        fund_customer(self.engine, red_packet=1_000, points=1_000, phone=1_000)

    def open(self, *, with_carrier: bool = True) -> Engine:
        providers = load_providers(TEST_TOML, {"carrier-x": self.carrier}) if with_carrier else []
        return Engine.open(self.path, channels=[self.channel],  # type: ignore[list-item]
                           policy=POLICY, runtime=SimRuntime(self.scheduler),
                           config=EngineConfig(duplicate_guard_window_ms=0, account_idle_ms=500),
                           providers=providers)

    @property
    def e(self) -> Engine:
        assert self.engine is not None
        return self.engine

    def run_until(self, what: str, done: object, limit_ms: int = 60_000) -> None:
        deadline = self.scheduler.now_ms + limit_ms
        assert self.scheduler.run_until(done, deadline_ms=deadline), (  # type: ignore[arg-type]
            f"{what}: not within {limit_ms} virtual ms")

    def run_for(self, ms: int) -> None:
        until = self.scheduler.now_ms + ms
        self.scheduler.run_until(lambda: False, deadline_ms=until - 1)
        self.scheduler.now_ms = max(self.scheduler.now_ms, until)

    def order(self, order_id: str) -> OrderView:
        return self.e.get_order(order_id)

    def submit(self, no: str = "order-1", phone: int = 100) -> tuple[str, str]:
        receipt = self.e.submit(request(no, phone))
        return receipt.order_id, receipt.payment_serial

    def pay(self, serial: str) -> None:
        signed_callback(self.e, "wechat", serial, paid_reply(serial))

    def phone_status(self, order_id: str) -> str | None:
        return self.carrier.status(FenceKey.order_leg(order_id, 2))


def request(no: str = "order-1", phone: int = 100) -> PaymentRequest:
    """100.00 = cash + 1.00 red packet + ``phone`` fen of phone credit at carrier-x."""
    return PaymentRequest(
        merchant_id="station-1", merchant_order_no=no, user_id="alice", currency="CNY",
        total_minor=10_000, title="Fuel", cash=CashPart(10_000 - 100 - phone, "wechat"),
        vouchers=(VoucherPart("alice/red-packet", 100), VoucherPart(PHONE_ACCOUNT, phone)))


def statuses(view: OrderView) -> list[str]:
    return [leg.status for leg in view.legs]


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path / "providers.db")
    yield w
    w.e.shutdown()


def slow(world: World, decide_ms: int = 500, *, callbacks_lost: bool = False) -> None:
    world.carrier.faults = ProviderFaults(slow=1.0, decide_ms=(decide_ms, decide_ms),
                                          callback_lost=1.0 if callbacks_lost else 0.0,
                                          callback_delay_ms=(0, 0))


# ---------------------------------------------------------------------- the happy path


def test_a_payment_with_a_carrier_leg_succeeds_and_the_carrier_confirms_its_hold(
        world: World) -> None:
    order_id, serial = world.submit()
    world.run_until("held", lambda: world.order(order_id).state == "paying")
    assert world.phone_status(order_id) == "HELD"
    world.pay(serial)
    world.run_until("settled", lambda: world.order(order_id).settled)
    view = world.order(order_id)
    assert view.state == "succeeded"
    assert statuses(view) == ["paid", "confirmed", "confirmed"]
    assert world.phone_status(order_id) == "CONFIRMED"
    assert world.carrier.accounts[PHONE] == [1_000, 900, 0, 100]
    assert world.e.ledger_balances(order_id)["CNY"][f"vouchers:{PHONE_ACCOUNT}"] == -100


def test_the_cash_is_asked_for_only_once_the_carriers_late_try_arrives_by_callback(
        world: World) -> None:
    slow(world, decide_ms=600)
    order_id, serial = world.submit()
    world.run_for(300)  # queried twice, still PENDING at the carrier: no cash yet
    assert world.order(order_id).state == "accepted"
    assert statuses(world.order(order_id))[2] == "trying"
    assert world.channel.count("pay") == 0
    world.run_until("held by callback", lambda: world.order(order_id).state == "paying")
    assert world.phone_status(order_id) == "HELD"
    kinds = [m["kind"] for m in world.e.provider_messages("carrier-x")]
    assert kinds[:2] == ["request", "call"] and "callback" in kinds
    world.pay(serial)
    world.run_until("settled", lambda: world.order(order_id).settled)
    assert world.order(order_id).state == "succeeded"
    assert world.phone_status(order_id) == "CONFIRMED"


# ---------------------------------------------------------------------- failures compensate


def test_a_try_the_carrier_refuses_fails_the_order_and_cancels_the_red_packet_hold(
        world: World) -> None:
    world.carrier.faults = ProviderFaults(refuse=1.0)
    order_id, _ = world.submit()
    world.run_until("settled", lambda: world.order(order_id).settled)
    view = world.order(order_id)
    assert view.state == "failed"
    assert statuses(view)[1:] == ["cancelled", "refused"]
    assert world.channel.count("pay") == 0
    assert world.e.get_account("alice/red-packet").available == 1_000
    assert world.phone_status(order_id) == "REFUSED"
    assert world.carrier.accounts[PHONE] == [1_000, 1_000, 0, 0]


def test_a_try_too_large_for_the_phone_balance_is_refused_and_nothing_is_charged(
        world: World) -> None:
    order_id, _ = world.submit(phone=2_000)
    world.run_until("settled", lambda: world.order(order_id).settled)
    assert world.order(order_id).state == "failed"
    assert world.channel.count("pay") == 0
    assert world.carrier.unbalanced() == []


def test_a_try_never_decided_is_cancelled_after_both_schedules_and_the_order_fails(
        world: World) -> None:
    slow(world, decide_ms=10_000_000, callbacks_lost=True)
    order_id, _ = world.submit()
    world.run_until("settled", lambda: world.order(order_id).settled)
    view = world.order(order_id)
    assert view.state == "failed"
    assert statuses(view)[1:] == ["cancelled", "cancelled"]
    assert world.channel.count("pay") == 0
    # the Cancel decided the pending Try at the carrier: nothing held, and the late
    # decision finds it cancelled
    assert world.phone_status(order_id) == "CANCELLED"
    assert world.carrier.accounts[PHONE] == [1_000, 1_000, 0, 0]
    queries = [m for m in world.e.provider_messages("carrier-x", 1_000)
               if m["kind"] == "query_request" and m["op"] == "try"]
    assert len(queries) >= len(QUERY_MS)


def test_a_close_before_the_carrier_decided_cancels_and_a_late_try_holds_nothing(
        world: World) -> None:
    slow(world, decide_ms=3_000)
    order_id, _ = world.submit()
    world.run_for(500)
    assert world.e.close(order_id).state in ("closed", "accepted")
    world.run_until("settled", lambda: world.order(order_id).settled)
    assert world.order(order_id).state == "closed"
    world.run_for(5_000)  # the carrier's own decision time passes
    assert world.phone_status(order_id) == "CANCELLED"
    assert world.carrier.accounts[PHONE] == [1_000, 1_000, 0, 0]


# ---------------------------------------------------------------------- owed follow-ups


def test_an_unanswered_confirm_stays_owed_until_the_carrier_answers(world: World) -> None:
    order_id, serial = world.submit()
    world.run_until("held", lambda: world.order(order_id).state == "paying")
    world.carrier.confirm_down = True
    world.pay(serial)
    world.run_for(sum(RETRY_MS) + 500)
    view = world.order(order_id)
    assert view.state == "succeeded" and not view.settled
    assert statuses(view) == ["paid", "confirmed", "confirm_unknown"]
    assert [o.account_id for o in world.e.owed()] == [PHONE_ACCOUNT]
    world.carrier.confirm_down = False
    world.run_until("confirmed", lambda: world.order(order_id).settled, limit_ms=5_000)
    assert statuses(world.order(order_id)) == ["paid", "confirmed", "confirmed"]
    assert world.phone_status(order_id) == "CONFIRMED"


# ---------------------------------------------------------------------- callbacks


def test_duplicated_and_late_callbacks_change_nothing(world: World) -> None:
    slow(world, decide_ms=300)
    order_id, serial = world.submit()
    world.run_until("held", lambda: world.order(order_id).state == "paying")
    txn = txn_id_of(FenceKey.order_leg(order_id, 2))
    before = statuses(world.order(order_id))
    for code in ("HELD", "REFUSED", "HELD"):  # again, contradicting, again: all too late
        body, headers = world.carrier.signed_callback(txn, "try", code)
        assert world.e.handle_provider_callback("carrier-x", body, headers) == "queued"
    world.run_for(100)
    assert statuses(world.order(order_id)) == before
    world.pay(serial)
    world.run_until("settled", lambda: world.order(order_id).settled)
    assert world.order(order_id).state == "succeeded"


def test_a_callback_that_does_not_verify_is_rejected_and_recorded(world: World) -> None:
    slow(world, decide_ms=5_000, callbacks_lost=True)
    order_id, _ = world.submit()
    world.run_for(20)
    txn = txn_id_of(FenceKey.order_leg(order_id, 2))
    body, headers = world.carrier.signed_callback(txn, "try", "HELD")
    with pytest.raises(ProviderCallbackRejected) as caught:
        world.e.handle_provider_callback("carrier-x", body.replace(b"HELD", b"HELd"), headers)
    assert caught.value.code == "provider_callback_rejected"
    with pytest.raises(ProviderCallbackRejected):
        world.e.handle_provider_callback("carrier-y", body, headers)
    world.run_for(20)
    assert world.order(order_id).state == "accepted"
    assert world.e.provider_messages("carrier-x")[-1]["kind"] in ("callback_rejected",
                                                                   "query_request", "query")
    assert any(m["kind"] == "callback_rejected"
               for m in world.e.provider_messages("carrier-x", 1_000))


# ---------------------------------------------------------------------- restart


def test_a_restart_resumes_a_pending_try_and_the_order_completes(world: World) -> None:
    slow(world, decide_ms=400, callbacks_lost=True)
    order_id, serial = world.submit()
    world.run_for(100)
    assert statuses(world.order(order_id))[2] == "trying"
    world.e.abandon()  # a crash: the provider actor's queries are gone
    world.engine = None
    world.run_for(10)
    world.engine = world.open()
    world.run_until("held after restart", lambda: world.order(order_id).state == "paying")
    assert world.phone_status(order_id) == "HELD"
    world.pay(serial)
    world.run_until("settled", lambda: world.order(order_id).settled)
    assert world.order(order_id).state == "succeeded"
    assert world.phone_status(order_id) == "CONFIRMED"


def test_an_engine_opened_without_a_provider_its_unsettled_orders_use_is_refused(
        world: World) -> None:
    slow(world, decide_ms=100_000, callbacks_lost=True)
    order_id, _ = world.submit()
    world.run_for(20)
    world.e.abandon()
    world.engine = None
    with pytest.raises(ProvidersMissing) as caught:
        world.open(with_carrier=False)
    assert caught.value.providers == {"carrier-x": 1}
    assert caught.value.code == "providers_missing"
    world.engine = world.open()
    assert world.order(order_id).state == "accepted"


# ---------------------------------------------------------------------- submit and refund


def test_submit_refuses_provider_parts_it_cannot_hold_and_unknown_providers(
        world: World) -> None:
    base = request()
    post = replace(base, vouchers=(VoucherPart(PHONE_ACCOUNT, 100, LegMode.POST_DEDUCT),),
                   cash=CashPart(9_900, "wechat"))
    with pytest.raises(InvalidRequest, match="pre_deduct"):
        world.e.submit(post)
    unknown = replace(base, vouchers=(VoucherPart(f"carrier-z:{PHONE}", 100),),
                      cash=CashPart(9_900, "wechat"))
    with pytest.raises(UnknownAccount):
        world.e.submit(unknown)
    with pytest.raises(InvalidRequest, match="carrier-x"):
        world.e.open_account(PHONE_ACCOUNT, "CNY")
    assert world.carrier.txns == {}


def test_a_refund_may_give_back_the_cash_but_never_reach_the_carrier_leg(world: World) -> None:
    order_id, serial = world.submit()
    world.run_until("held", lambda: world.order(order_id).state == "paying")
    world.pay(serial)
    world.run_until("settled", lambda: world.order(order_id).settled)
    with pytest.raises(RefundRefused, match="carrier-x"):
        world.e.refund(order_id, "rf-all", 10_000)
    refund = world.e.refund(order_id, "rf-cash", 9_800)
    assert refund.amount_minor == 9_800
    assert world.phone_status(order_id) == "CONFIRMED"


def test_two_carriers_one_refusing_fail_the_order_and_the_other_carrier_releases_its_hold(
        tmp_path: Path) -> None:
    world = World(tmp_path / "two.db")
    world.e.shutdown()
    other = SimulatedProvider("carrier-y", SimWorld(world.scheduler, io_latency_ms=(5, 5)),
                              random.Random(8), ProviderFaults(refuse=1.0), "y-secret",
                              lambda: world.engine)
    other.fund(PHONE, 1_000)
    providers = [*load_providers(TEST_TOML, {"carrier-x": world.carrier}),
                 *load_providers(TEST_TOML.replace("carrier-x", "carrier-y"),
                                 {"carrier-y": other})]
    world.engine = Engine.open(world.path, channels=[world.channel],  # type: ignore[list-item]
                               policy=POLICY, runtime=SimRuntime(world.scheduler),
                               config=EngineConfig(duplicate_guard_window_ms=0),
                               providers=providers)
    both = replace(request(), cash=CashPart(9_700, "wechat"),
                   vouchers=(VoucherPart(PHONE_ACCOUNT, 100), VoucherPart(f"carrier-y:{PHONE}", 200)))
    order_id = world.e.submit(both).order_id
    world.run_until("settled", lambda: world.order(order_id).settled)
    view = world.order(order_id)
    assert view.state == "failed"
    assert statuses(view)[1:] == ["cancelled", "refused"]
    assert world.channel.count("pay") == 0
    assert world.carrier.status(FenceKey.order_leg(order_id, 1)) == "CANCELLED"
    assert other.status(FenceKey.order_leg(order_id, 2)) == "REFUSED"
    assert world.carrier.accounts[PHONE] == [1_000, 1_000, 0, 0]
    world.e.shutdown()
