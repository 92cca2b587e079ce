"""Outbox retention: events everybody is done with are deleted once old; nothing else is.

Runs on the deterministic runtime, so "old" is virtual time and every round is stepped.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from payengine import CashPart, Engine, EngineConfig, InvalidRequest, PaymentRequest
from payengine.actors.notifier import EVENT_ID_HEADER, NotificationConfig, OutboxEvent
from payengine.sim.runtime import Scheduler, SimRuntime
from tests.helpers import SLOW_POLICY, ScriptedChannel, paid_reply, signed_callback

RETENTION_MS = 10_000
SECRET = "s3cret-key-of-station-1"


class Books:
    """A subscriber that refuses everything while ``down``."""

    def __init__(self) -> None:
        self.down = False
        self.got: list[str] = []

    def __call__(self, event: OutboxEvent) -> None:
        if self.down:
            raise RuntimeError("books are down")
        self.got.append(event.event_id)


class Wallet:
    """A merchant endpoint (``NotificationConfig.transport``): refuses the notifications of
    a success of the merchant orders in ``refuse``, accepts the rest."""

    def __init__(self) -> None:
        self.refuse: set[str] = set()
        self.accepted: set[str] = set()

    def __call__(self, url: str, body: bytes, headers: Mapping[str, str],
                 timeout_s: float) -> tuple[bool, str]:
        payload = json.loads(body)
        if payload["merchant_order_no"] in self.refuse and payload["to_state"] == "succeeded":
            return False, "HTTP 503"
        self.accepted.add(headers[EVENT_ID_HEADER])
        return True, "HTTP 200 SUCCESS"


class World:
    def __init__(self, path: Path, channel: ScriptedChannel) -> None:
        self.scheduler = Scheduler(seed=9)
        self.books = Books()
        self.wallet = Wallet()
        notifications = NotificationConfig(
            outbox_retention_ms=RETENTION_MS, prune_interval_ms=1_000, prune_batch_max=3,
            subscriber_retry_ms=(1_000,) * 30, merchant_schedule_ms=(0,) + (60_000,) * 5,
            transport=self.wallet)
        self.engine = Engine.open(
            path, channels=[channel], policy=SLOW_POLICY,
            config=EngineConfig(duplicate_guard_window_ms=0, notifications=notifications),
            runtime=SimRuntime(self.scheduler), subscribers={"books": self.books})
        self.engine.notifications.register_merchant("station-1", "https://m.example/notify",
                                                    SECRET)

    def pay(self, no: str) -> str:
        receipt = self.engine.submit(PaymentRequest(
            merchant_id="station-1", merchant_order_no=no, user_id="alice", currency="CNY",
            total_minor=500, title="Fuel", cash=CashPart(500, "wechat")))
        self.settle()
        signed_callback(self.engine, "wechat", receipt.payment_serial, paid_reply(receipt.payment_serial))
        self.settle()
        assert self.engine.get_order(receipt.order_id).state == "succeeded"
        return receipt.order_id

    def settle(self) -> None:
        """Run the I/O in flight (at most 20 ms of latency each) and what it starts."""
        self.wait(200)

    def wait(self, ms: int) -> None:
        """Let ``ms`` of virtual time pass, running whatever falls due meanwhile."""
        target = self.scheduler.now_ms + ms
        self.scheduler.at(target, lambda: None, owner="world", label="tick")
        self.scheduler.run_until(
            lambda: self.scheduler.now_ms >= target and not self.scheduler.has_work_now())

    def seqs(self) -> list[int]:
        return [e.seq for e in self.engine.notifications.events()]


@pytest.fixture
def world(tmp_path: Path, channel: ScriptedChannel) -> Iterator[World]:
    w = World(tmp_path / "retention.db", channel)
    yield w
    w.engine.shutdown()


def test_old_events_every_consumer_is_done_with_are_pruned_and_seq_keeps_growing(
    world: World
) -> None:
    first = world.pay("o1")
    old = world.engine.notifications.events()
    assert [e.order_id for e in old] == [first] * len(old) and len(old) >= 3
    assert set(world.books.got) == world.wallet.accepted == {e.event_id for e in old}

    world.wait(RETENTION_MS + 1_000)
    second = world.pay("o2")
    world.wait(2_000)
    world.pay("o3")  # one more commit after the interval: the batches go on
    left = world.engine.notifications.events()
    assert {e.order_id for e in left} >= {second}
    assert not any(e.order_id == first for e in left), "o1's events are older than retention"
    assert world.engine.notifications.status(old[-1].event_id) is None  # its notification too
    assert min(e.seq for e in left) > max(e.seq for e in old)  # no seq handed out twice
    assert world.engine.notifications.caught_up()


def test_an_event_a_subscriber_has_not_taken_is_kept(world: World) -> None:
    world.books.down = True
    first = world.pay("o1")
    world.wait(RETENTION_MS + 1_000)
    world.pay("o2")
    assert any(e.order_id == first for e in world.engine.notifications.events())
    world.books.down = False
    world.wait(2_000)  # the subscriber's retry takes everything
    world.pay("o3")
    world.wait(2_000)
    world.pay("o4")
    assert not any(e.order_id == first for e in world.engine.notifications.events())
    assert len(world.books.got) == len(set(world.books.got))
    assert world.books.got[0].startswith(first)


def test_an_event_whose_merchant_notification_is_pending_is_kept(world: World) -> None:
    world.wallet.refuse.add("o1")  # its success is refused; retries wait 60 s, past retention
    first = world.pay("o1")
    world.wait(RETENTION_MS + 1_000)
    for n in range(2, 6):
        world.pay(f"o{n}")
        world.wait(2_000)
    kept = world.engine.notifications.events(first)
    assert [e.to_state for e in kept] == ["succeeded"]
    status = world.engine.notifications.status(kept[0].event_id)
    assert status is not None and status.status == "pending" and status.attempts >= 1


def test_the_newest_event_is_never_pruned(world: World) -> None:
    world.pay("o1")
    newest = world.seqs()[-1]
    world.wait(RETENTION_MS + 1_000)
    world.engine.notifications._prune_after_ms = 0
    world.engine.notifications.kick()
    world.settle()
    assert world.seqs() == [newest]


def test_a_bad_retention_is_refused() -> None:
    for bad in (0, 999, True, 1.5, 366 * 24 * 3600 * 1000):
        with pytest.raises(InvalidRequest, match="outbox_retention_ms"):
            NotificationConfig(outbox_retention_ms=bad)  # type: ignore[arg-type]
    assert NotificationConfig(outbox_retention_ms=None).outbox_retention_ms is None
    for name, bad in (("prune_interval_ms", 0), ("prune_batch_max", 0),
                      ("prune_batch_max", 100_001)):
        with pytest.raises(InvalidRequest, match=name):
            NotificationConfig(**{name: bad})  # type: ignore[arg-type]
