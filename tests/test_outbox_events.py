"""Refunds and hold expiries in the outbox: committed with their change, delivered like every
event (subscribers in commit order, signed merchant notifications filtered by ``states``),
also across a crash.

The real engine runs on the deterministic runtime; the merchant is a transport that records
each POST and answers SUCCESS.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from payengine import (
    CashPart,
    ChannelReply,
    Engine,
    EngineConfig,
    InvalidRequest,
    NotificationConfig,
    NotificationRejected,
    OrderPolicy,
    OutboxEvent,
    PaymentRequest,
)
from payengine.actors.notifier import SIGNATURE_HEADER, verify_signature
from payengine.persistence.outbox import (
    HOLD_STATE_CHANGED,
    LEG_REFUND_KIND,
    ORDER_STATE_CHANGED,
    REFUND_STATE_CHANGED,
)
from payengine.sim.runtime import Scheduler, SimRuntime
from tests.helpers import ScriptedChannel, fund_customer, paid_reply, signed_callback
from tests.test_sentinel import VoucherNetwork

SECRET = "s3cret-key-of-station-1"
POLICY = OrderPolicy(pay_window_ms=2_000, hold_grace_ms=5_000, query_schedule_ms=(60_000,),
                     refund_query_schedule_ms=(60_000,), voucher_retry_schedule_ms=(100, 200),
                     voucher_sentinel_interval_ms=1_000)
REFUND_OK = ChannelReply("SUCCESS", "SUCCESS")


@dataclass
class Recorder:
    """A subscriber; raises while ``down``."""

    got: list[OutboxEvent] = field(default_factory=list)
    down: bool = False

    def __call__(self, event: OutboxEvent) -> None:
        if self.down:
            raise RuntimeError("down")
        self.got.append(event)

    def of(self, event_type: str, order_id: str | None = None) -> list[OutboxEvent]:
        return [e for e in self.got if e.event_type == event_type
                and (order_id is None or e.order_id == order_id)]


@dataclass
class MerchantEndpoint:
    """The merchant's server, as ``NotificationConfig.transport``: records, verifies, SUCCESS."""

    bodies: list[dict[str, object]] = field(default_factory=list)

    def __call__(self, url: str, body: bytes, headers: Mapping[str, str], timeout_s: float
                 ) -> tuple[bool, str]:
        assert verify_signature(SECRET, body, headers[SIGNATURE_HEADER])
        self.bodies.append(json.loads(body))
        return True, "HTTP 200"

    def events(self, event_type: str | None = None) -> list[dict[str, object]]:
        """What it received (of one type), in outbox order: POSTs may overtake each other."""
        return sorted((b for b in self.bodies if event_type in (None, b["event_type"])),
                      key=lambda b: int(b["seq"]))  # type: ignore[call-overload]


class World:
    def __init__(self, path: Path, seed: int = 7) -> None:
        self.path = path
        self.scheduler = Scheduler(seed)
        self.channel = ScriptedChannel()
        self.channel.refund_reply = REFUND_OK
        self.subscriber = Recorder()
        self.merchant = MerchantEndpoint()
        self.network = VoucherNetwork()
        self.engine = self.open()
        fund_customer(self.engine)

    def open(self) -> Engine:
        config = EngineConfig(duplicate_guard_window_ms=0, account_idle_ms=500,
                              notifications=NotificationConfig(
                                  merchant_schedule_ms=(0, 100), subscriber_retry_ms=(1_000,),
                                  transport=self.merchant))
        return Engine.open(self.path, channels=[self.channel],  # type: ignore[list-item]
                           policy=POLICY, config=config, runtime=SimRuntime(self.scheduler),
                           subscribers={"push": self.subscriber},
                           voucher_link=self.network.link)

    def settle(self) -> None:
        """Run until nothing is left to do (timers, deliveries)."""
        self.scheduler.run_until_idle()

    def paid(self, no: str = "o1", total: int = 500, vouchers: bool = False) -> tuple[str, str]:
        from tests.helpers import fuel_request

        request = fuel_request(no) if vouchers else PaymentRequest(
            "station-1", no, "alice", "CNY", total, "Fuel", CashPart(total, "wechat"))
        receipt = self.engine.submit(request)
        self.scheduler.run_until(lambda: self.engine.get_order(receipt.order_id).state
                                 == "paying")
        signed_callback(self.engine, "wechat", receipt.payment_serial, paid_reply(receipt.payment_serial))
        return receipt.order_id, receipt.payment_serial


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path / "events.db")
    yield w
    w.engine.shutdown()


def test_a_merchant_refund_is_published_when_created_and_when_it_succeeds(world: World) -> None:
    world.engine.notifications.register_merchant("station-1", "https://pos.example/notify",
                                                 SECRET)
    order_id, serial = world.paid(vouchers=True)
    world.settle()
    refund = world.engine.refund(order_id, "rf-1", 9_800, reason="pump stopped")
    world.settle()
    assert world.engine.get_order(order_id).refund("rf-1").status == "succeeded"
    events = world.engine.notifications.events(order_id)
    refunds = [e for e in events if e.event_type == REFUND_STATE_CHANGED]
    assert [(e.from_state, e.to_state) for e in refunds] == [("", "refunding"),
                                                            ("refunding", "succeeded")]
    for e in refunds:
        assert (e.refund_id, e.refund_no, e.refund_kind, e.amount, e.unit) == (
            refund.refund_id, "rf-1", "merchant", 9_800, "CNY")
        assert (e.order_id, e.merchant_id, e.merchant_order_no, e.payment_serial,
                e.user_id) == (order_id, "station-1", "o1", serial, "alice")
        assert e.event_id == f"{order_id}:{e.order_version}:0"  # no order event in its commit
        assert (e.account_id, e.hold_id) == (None, None)
    assert refunds[0].cause == "refund rf-1 requested"
    # the order's own events are unchanged: still order.state_changed, with the user
    orders = [e for e in events if e.event_type == ORDER_STATE_CHANGED]
    assert [e.to_state for e in orders] == ["accepted", "paying", "succeeded"]
    assert all(e.refund_id is None and e.user_id == "alice" for e in orders)
    # delivered like any event: to the subscriber in commit order, and to the merchant
    assert [e.event_id for e in world.subscriber.got if e.order_id == order_id] == [
        e.event_id for e in events]
    told = world.merchant.events(REFUND_STATE_CHANGED)
    assert [(b["to_state"], b["refund_no"], b["refund_kind"], b["amount"]) for b in told] == [
        ("refunding", "rf-1", "merchant", 9_800), ("succeeded", "rf-1", "merchant", 9_800)]
    assert all(n.status == "delivered" for n in world.engine.notifications.notifications_of(
        order_id))


def test_a_refused_refund_is_published_failed_and_the_merchant_filters_refund_states(
    world: World
) -> None:
    world.engine.notifications.register_merchant(
        "station-1", "https://pos.example/notify", SECRET,
        states=["succeeded", "refund_failed", "refund_succeeded"])
    order_id, _ = world.paid()
    world.settle()
    world.channel.refund_reply = ChannelReply("SUCCESS", "REFUNDCLOSE")
    world.engine.refund(order_id, "rf-1", 200)
    world.settle()
    assert world.engine.get_order(order_id).refund("rf-1").status == "failed"
    pushed = world.subscriber.of(REFUND_STATE_CHANGED, order_id)
    assert [(e.from_state, e.to_state, e.refund_no) for e in pushed] == [
        ("", "refunding", "rf-1"), ("refunding", "failed", "rf-1")]
    # the merchant asked for order successes and finished refunds only
    assert [(b["event_type"], b["to_state"]) for b in world.merchant.events()] == [
        (ORDER_STATE_CHANGED, "succeeded"), (REFUND_STATE_CHANGED, "failed")]
    with pytest.raises(InvalidRequest, match="refund_succeeded"):
        world.engine.notifications.register_merchant("station-1", "https://pos.example/n",
                                                     SECRET, states=["refund_done"])


def test_a_success_after_the_close_is_refunded_and_the_user_is_told(world: World) -> None:
    # R-DUP: "a later success callback triggers a refund and a notification to the user"
    world.engine.notifications.register_merchant("station-1", "https://pos.example/notify",
                                                 SECRET)
    receipt = world.engine.submit(PaymentRequest("station-1", "late", "bob", "CNY", 700,
                                                 "Fuel", CashPart(700, "wechat")))
    world.engine.close(receipt.order_id)
    signed_callback(world.engine, "wechat", receipt.payment_serial, paid_reply(receipt.payment_serial))
    world.settle()
    view = world.engine.get_order(receipt.order_id)
    assert view.state == "closed" and view.legs[0].status == "refunded"
    pushed = world.subscriber.of(REFUND_STATE_CHANGED, receipt.order_id)
    assert [(e.from_state, e.to_state, e.refund_kind, e.refund_id, e.refund_no, e.amount,
             e.user_id) for e in pushed] == [
        ("", "refunding", LEG_REFUND_KIND, view.legs[0].refund_id, None, 700, "bob"),
        ("refunding", "succeeded", LEG_REFUND_KIND, view.legs[0].refund_id, None, 700, "bob")]
    assert pushed[0].cause.startswith("success after closed")
    assert [b["to_state"] for b in world.merchant.events(REFUND_STATE_CHANGED)] == [
        "refunding", "succeeded"]
    # the order's own story stays an order's: accepted, paying, closed
    assert [e.to_state for e in world.subscriber.of(ORDER_STATE_CHANGED, receipt.order_id)] == [
        "accepted", "paying", "closed"]


def test_a_second_charge_refund_is_published_as_a_duplicate_charge(world: World) -> None:
    order_id, serial = world.paid()
    world.settle()
    second = ChannelReply("SUCCESS", "SUCCESS", "TX2", 500)
    world.channel.charge_query_reply = second  # the channel confirms the second charge
    with pytest.raises(NotificationRejected, match="unconfirmed"):
        signed_callback(world.engine, "wechat", serial, second)
    world.settle()
    pushed = world.subscriber.of(REFUND_STATE_CHANGED, order_id)
    assert [(e.to_state, e.refund_kind, e.refund_no, e.amount) for e in pushed] == [
        ("refunding", "duplicate_charge", "charge:TX2", 500),
        ("succeeded", "duplicate_charge", "charge:TX2", 500)]


def test_a_pre_hold_that_expires_unadopted_is_told_to_subscribers_and_no_merchant(
    world: World
) -> None:
    world.engine.notifications.register_merchant("station-1", "https://pos.example/notify",
                                                 SECRET)
    hold = world.engine.pre_hold("alice/points", 30, hold_id="tick-1", ttl_ms=1_000)
    world.settle()
    assert world.engine.get_hold("alice/points", "tick-1").status == "expired"
    [event] = world.subscriber.of(HOLD_STATE_CHANGED)
    assert (event.account_id, event.hold_id, event.amount, event.unit) == (
        "alice/points", hold.hold_id, 30, "POINTS")
    assert (event.from_state, event.to_state, event.cause) == ("pending", "expired", "expired")
    assert (event.order_id, event.merchant_id, event.user_id, event.refund_id) == (
        "", "", None, None)
    assert event.event_id.startswith("hold:alice/points:")
    assert world.merchant.bodies == []  # no merchant: subscribers only
    assert world.engine.notifications.caught_up()
    # a released pre-hold is the user's own doing: no event
    world.engine.pre_hold("alice/points", 5, hold_id="tick-2", ttl_ms=1_000)
    world.engine.release_hold("alice/points", "tick-2")
    world.settle()
    assert len(world.subscriber.of(HOLD_STATE_CHANGED)) == 1


def test_an_orders_hold_that_expires_is_told_to_its_merchant(world: World) -> None:
    world.engine.notifications.register_merchant("station-1", "https://pos.example/notify",
                                                 SECRET, states=["hold_expired"])
    from tests.helpers import fuel_request

    receipt = world.engine.submit(fuel_request("o9"))
    world.scheduler.run_until(lambda: world.engine.get_order(receipt.order_id).state == "paying")
    world.network.down = True  # the Cancels of the close never arrive: the holds expire
    world.engine.close(receipt.order_id)
    world.scheduler.run_until(
        lambda: len(world.subscriber.of(HOLD_STATE_CHANGED)) == 3, deadline_ms=(
            world.scheduler.now_ms + 60_000))
    expired = world.subscriber.of(HOLD_STATE_CHANGED)
    assert {(e.order_id, e.merchant_id, e.merchant_order_no, e.user_id) for e in expired} == {
        (receipt.order_id, "station-1", "o9", "alice")}
    assert sorted((e.account_id, e.amount) for e in expired) == [
        ("alice/phone", 100), ("alice/points", 20), ("alice/red-packet", 100)]
    world.network.down = False
    world.settle()
    assert world.engine.get_order(receipt.order_id).settled
    assert sorted(b["account_id"] for b in world.merchant.bodies) == [  # type: ignore[type-var]
        "alice/phone", "alice/points", "alice/red-packet"]
    assert {b["event_type"] for b in world.merchant.bodies} == {HOLD_STATE_CHANGED}


def test_refund_events_committed_before_a_crash_are_delivered_after_the_reopen(
    world: World
) -> None:
    order_id, _ = world.paid()
    world.settle()
    world.subscriber.down = True  # the consumer refuses: the events wait in the outbox
    world.engine.refund(order_id, "rf-1", 500)
    world.scheduler.run_until(
        lambda: world.engine.get_order(order_id).refund("rf-1").status == "succeeded")
    committed = [e.event_id for e in world.engine.notifications.events(order_id)
                 if e.event_type == REFUND_STATE_CHANGED]
    assert len(committed) == 2 and not world.subscriber.of(REFUND_STATE_CHANGED)
    world.engine.abandon()  # a crash
    world.subscriber.down = False
    world.engine = world.open()
    world.settle()
    assert [e.event_id for e in world.subscriber.of(REFUND_STATE_CHANGED)] == committed
    assert world.engine.notifications.caught_up()
