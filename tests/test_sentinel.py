"""The sentinel (R-TCC): a voucher follow-up decided after the payment's outcome (a Confirm
after success, a Cancel of a failed or closed order's holds, a refund's voucher return) is
never given up on. Past the retry schedule it is flagged, listed by ``Engine.owed()`` and
re-sent at ``voucher_sentinel_interval_ms`` and at every reopen until the voucher system
answers; the order is not settled meanwhile.

The real engine runs on the deterministic runtime (virtual time, one seed), its voucher
systems behind a link that loses every request while they are "down".
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from payengine import ChannelReply, Engine, EngineConfig, OrderPolicy, OrderView, OwedCommand
from payengine.actors.directory import Directory
from payengine.actors.messages import FromOrder
from payengine.actors.voucher_link import DirectVoucherLink
from payengine.engine.order import LegStatus
from payengine.engine.voucher import FenceKey
from payengine.sim.runtime import Scheduler, SimRuntime
from tests.helpers import ScriptedChannel, fuel_request, fund_customer, paid_reply, signed_callback

RETRY_MS = (100, 200, 400)
SENTINEL_MS = 1_000
POLICY = OrderPolicy(pay_window_ms=2_000, hold_grace_ms=5_000, query_schedule_ms=(60_000,),
                     refund_query_schedule_ms=(60_000,), voucher_retry_schedule_ms=RETRY_MS,
                     voucher_sentinel_interval_ms=SENTINEL_MS)
ACCOUNTS = ("alice/red-packet", "alice/points", "alice/phone")
FUNDED = 1_000
SPENT = {"alice/red-packet": 100, "alice/points": 20, "alice/phone": 100}


@dataclass
class VoucherNetwork:
    """Between the orders and the voucher systems: while ``down`` every request is lost."""

    down: bool = False
    lost: Counter[str] = field(default_factory=Counter)

    def link(self, directory: Directory) -> DirectVoucherLink:
        network = self

        class Link(DirectVoucherLink):
            def request(self, account_id: str, command: FromOrder) -> None:
                if network.down:
                    network.lost[type(command.effect).__name__] += 1
                    return
                super().request(account_id, command)

        return Link(directory)


class World:
    """One scheduler, a scripted wallet and the voucher network; engines open and close on
    the same database file like a server restarting."""

    def __init__(self, path: Path, seed: int = 1, policy: OrderPolicy = POLICY) -> None:
        self.path = path
        self.scheduler = Scheduler(seed)
        self.channel = ScriptedChannel()
        self.channel.refund_reply = ChannelReply("SUCCESS", "SUCCESS")
        self.network = VoucherNetwork()
        self.engine = self.open(policy)
        fund_customer(self.engine, red_packet=FUNDED, points=FUNDED, phone=FUNDED)

    def open(self, policy: OrderPolicy = POLICY) -> Engine:
        return Engine.open(self.path, channels=[self.channel],  # type: ignore[list-item]
                           policy=policy, runtime=SimRuntime(self.scheduler),
                           config=EngineConfig(duplicate_guard_window_ms=0, account_idle_ms=500),
                           voucher_link=self.network.link)

    def reopen(self, policy: OrderPolicy = POLICY, *, crash: bool = False) -> None:
        if crash:
            self.engine.abandon()
        else:
            self.engine.shutdown()
        self.engine = self.open(policy)

    def run_for(self, ms: int) -> None:
        """Let ``ms`` of virtual time pass: everything due before then happens."""
        until = self.scheduler.now_ms + ms
        self.scheduler.run_until(lambda: False, deadline_ms=until - 1)
        self.scheduler.now_ms = max(self.scheduler.now_ms, until)

    def run_until(self, what: str, done: object, limit_ms: int = 600_000) -> None:
        deadline = self.scheduler.now_ms + limit_ms
        assert self.scheduler.run_until(done, deadline_ms=deadline), (  # type: ignore[arg-type]
            f"{what}: not within {limit_ms} virtual ms")

    def order(self, order_id: str) -> OrderView:
        return self.engine.get_order(order_id)

    def submit_and_hold(self) -> tuple[str, str]:
        receipt = self.engine.submit(fuel_request())
        self.run_until("holds placed", lambda: self.order(receipt.order_id).state == "paying")
        return receipt.order_id, receipt.payment_serial

    def balances(self) -> dict[str, tuple[int, int, int]]:
        return {a: ((v := self.engine.get_account(a)).available, v.held, v.spent)
                for a in ACCOUNTS}


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path / "sentinel.db")
    yield w
    w.engine.shutdown()


def statuses(view: OrderView) -> list[str]:
    return [leg.status for leg in view.legs]


def owed_of(engine: Engine, order_id: str) -> list[OwedCommand]:
    return [o for o in engine.owed() if o.order_id == order_id]


def test_an_unanswered_confirm_outlives_its_schedule_and_lands_when_the_vouchers_come_back(
    world: World
) -> None:
    order_id, serial = world.submit_and_hold()
    world.network.down = True
    assert signed_callback(world.engine, "wechat", serial, paid_reply(serial)) == "succeeded"
    paid_at = world.scheduler.now_ms
    # the whole retry schedule passes unanswered: the Confirms are flagged, not dropped
    world.run_for(sum(RETRY_MS) + 50)
    view = world.order(order_id)
    assert view.state == "succeeded" and not view.settled
    assert statuses(view) == ["paid"] + ["confirm_unknown"] * 3
    owed = owed_of(world.engine, order_id)
    assert [(o.leg_no, o.account_id, o.operation, o.status, o.flagged, o.refund_id)
            for o in owed] == [(n, a, "confirm", "confirm_unknown", True, None)
                               for n, a in enumerate(ACCOUNTS, start=1)]
    assert owed[0].fence == FenceKey.order_leg(order_id, 1) and owed[1].amount == 20
    first = owed[0]
    assert first.next_attempt_at_ms == paid_at + sum(RETRY_MS) + SENTINEL_MS
    # the sentinel keeps sending, far past the holds' expiry (close + grace = 7 s)
    world.run_for(10 * SENTINEL_MS)
    assert world.network.lost["ConfirmHold"] >= 3 * (1 + len(RETRY_MS) + 10)
    later = owed_of(world.engine, order_id)[0]
    assert later.attempts == first.attempts + 10
    assert later.next_attempt_at_ms == first.next_attempt_at_ms + 10 * SENTINEL_MS  # type: ignore[operator]
    assert world.balances() == {a: (FUNDED - SPENT[a], SPENT[a], 0) for a in ACCOUNTS}
    # the voucher systems come back: the next round lands every Confirm, without a reopen
    world.network.down = False
    world.run_until("confirmed", lambda: world.order(order_id).settled, limit_ms=SENTINEL_MS + 100)
    assert statuses(world.order(order_id)) == ["paid"] + ["confirmed"] * 3
    assert world.balances() == {a: (FUNDED - SPENT[a], 0, SPENT[a]) for a in ACCOUNTS}
    assert world.engine.owed() == []
    journal = [(j.part, j.from_state, j.to_state) for j in world.engine.journal(order_id)]
    assert ("leg:2", "confirm_unknown", "confirmed") in journal
    # the voucher value reached the merchant once the Confirm landed (the ledger follows)
    assert world.engine.ledger_balances(order_id)["CNY"]["merchant:station-1"] == 10_000
    assert world.engine.ledger_balances(order_id)["CNY"].get("transit", 0) == 0


def test_an_owed_confirm_is_sent_at_once_by_a_reopened_engine(world: World) -> None:
    order_id, serial = world.submit_and_hold()
    world.network.down = True
    signed_callback(world.engine, "wechat", serial, paid_reply(serial))
    world.run_for(sum(RETRY_MS) + 3 * SENTINEL_MS)
    assert statuses(world.order(order_id))[1:] == ["confirm_unknown"] * 3
    # a restart with a sentinel that would wait an hour: the reopen itself sends them
    patient = OrderPolicy(pay_window_ms=2_000, hold_grace_ms=5_000, query_schedule_ms=(60_000,),
                          voucher_retry_schedule_ms=RETRY_MS,
                          voucher_sentinel_interval_ms=3_600_000)
    world.reopen(patient, crash=True)
    assert len(owed_of(world.engine, order_id)) == 3  # the list is read from the database
    world.network.down = False
    world.run_until("confirmed after reopen", lambda: world.order(order_id).settled,
                    limit_ms=RETRY_MS[0] + 50)
    assert statuses(world.order(order_id)) == ["paid"] + ["confirmed"] * 3
    assert world.engine.owed() == []
    assert world.balances() == {a: (FUNDED - SPENT[a], 0, SPENT[a]) for a in ACCOUNTS}


def test_a_reopen_restarts_a_sentinel_whose_bounded_re_sends_ran_out(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="payengine")
    bounded = OrderPolicy(pay_window_ms=2_000, hold_grace_ms=5_000, query_schedule_ms=(60_000,),
                          voucher_retry_schedule_ms=RETRY_MS, voucher_sentinel_interval_ms=500,
                          voucher_sentinel_attempts_max=2)
    world.reopen(bounded)
    order_id, serial = world.submit_and_hold()
    world.network.down = True
    signed_callback(world.engine, "wechat", serial, paid_reply(serial))
    world.run_for(sum(RETRY_MS) + 3 * 500 + 100)
    owed = owed_of(world.engine, order_id)
    # used up: no next attempt, yet still listed, flagged and unsettled (never silently)
    assert [(o.status, o.flagged, o.next_attempt_at_ms, o.attempts) for o in owed] == [
        ("confirm_unknown", True, None, 1 + (len(RETRY_MS) - 1) + 2)] * 3
    assert not world.order(order_id).settled
    stopped = [r.msg for r in caplog.records if isinstance(r.msg, dict)
               and r.msg.get("event") == "sentinel.stopped"]
    assert sorted((m["order_id"], m["leg"], m["operation"]) for m in stopped) == [
        (order_id, n, "confirm") for n in (1, 2, 3)]
    sent = world.network.lost["ConfirmHold"]
    world.run_for(60_000)
    assert world.network.lost["ConfirmHold"] == sent  # bounded: nothing more until a start
    world.network.down = False
    world.reopen(bounded)
    world.run_until("confirmed after reopen", lambda: world.order(order_id).settled,
                    limit_ms=100)
    assert world.engine.owed() == []


def test_an_unanswered_release_of_a_closed_order_is_re_sent_until_the_holds_come_back(
    world: World
) -> None:
    order_id, _ = world.submit_and_hold()
    world.network.down = True
    world.engine.close(order_id)
    world.run_for(sum(RETRY_MS) + 50)
    view = world.order(order_id)
    assert view.state == "closed" and not view.settled
    assert statuses(view)[1:] == ["release_unknown"] * 3
    assert [(o.operation, o.status, o.flagged) for o in owed_of(world.engine, order_id)] == [
        ("cancel", "release_unknown", True)] * 3
    world.run_for(2 * SENTINEL_MS)
    assert world.network.lost["CancelHold"] >= 3 * (1 + len(RETRY_MS) + 2)
    world.network.down = False
    world.run_until("released", lambda: world.order(order_id).settled, limit_ms=SENTINEL_MS + 100)
    assert statuses(world.order(order_id))[1:] == ["cancelled"] * 3
    assert world.engine.owed() == []
    assert world.balances() == {a: (FUNDED, 0, 0) for a in ACCOUNTS}


def test_an_unanswered_voucher_return_of_a_refund_is_re_sent_until_it_lands(world: World) -> None:
    order_id, serial = world.submit_and_hold()
    signed_callback(world.engine, "wechat", serial, paid_reply(serial))
    world.run_until("paid", lambda: world.order(order_id).settled)
    world.network.down = True
    world.engine.refund(order_id, "rf-1", 10_000)
    world.run_for(sum(RETRY_MS) + 50)
    refund = world.order(order_id).refund("rf-1")
    assert refund.status == "unknown"  # the cash went back; the vouchers are owed
    assert refund.parts == ((0, 9_600, "done"), (1, 100, "unknown"), (2, 20, "unknown"),
                            (3, 100, "unknown"))
    assert not world.order(order_id).settled
    owed = owed_of(world.engine, order_id)
    assert [(o.leg_no, o.operation, o.refund_id, o.fence, o.amount, o.status) for o in owed] == [
        (n, "return", refund.refund_id, FenceKey.refund_return(refund.refund_id, n), amount,
         "unknown")
        for n, amount in ((1, 100), (2, 20), (3, 100))]
    world.run_for(3 * SENTINEL_MS)
    assert world.network.lost["ReturnVoucher"] >= 3 * (1 + len(RETRY_MS) + 3)
    world.network.down = False
    world.run_until("returned", lambda: world.order(order_id).settled, limit_ms=SENTINEL_MS + 100)
    assert world.order(order_id).refund("rf-1").status == "succeeded"
    assert world.engine.owed() == []
    assert world.balances() == {a: (FUNDED, 0, 0) for a in ACCOUNTS}


def test_owed_takes_a_bounded_limit(world: World) -> None:
    with pytest.raises(Exception, match="limit must be"):
        world.engine.owed(limit=0)
    with pytest.raises(Exception, match="limit must be"):
        world.engine.owed(limit=10_001)
    assert world.engine.owed(limit=1) == []


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), kind=st.sampled_from(["confirm", "release", "return"]),
       outage_ms=st.integers(0, 30_000), reopen_at_ms=st.one_of(st.none(), st.integers(0, 30_000)),
       crash=st.booleans())
def test_whatever_the_outage_and_restarts_every_follow_up_lands_once_the_vouchers_answer(
    tmp_path_factory: pytest.TempPathFactory, seed: int, kind: str, outage_ms: int,
    reopen_at_ms: int | None, crash: bool
) -> None:
    world = World(tmp_path_factory.mktemp("sentinel") / "pay.db", seed)
    try:
        rng = random.Random(seed)
        order_id, serial = world.submit_and_hold()
        if kind == "return":
            signed_callback(world.engine, "wechat", serial, paid_reply(serial))
            world.run_until("paid", lambda: world.order(order_id).settled)
        world.network.down = True
        if kind == "confirm":
            signed_callback(world.engine, "wechat", serial, paid_reply(serial))
        elif kind == "release":
            world.engine.close(order_id)
        else:
            world.engine.refund(order_id, "rf-1", rng.choice([10_000, 9_700]))
        start = world.scheduler.now_ms
        if reopen_at_ms is not None and reopen_at_ms < outage_ms:
            world.run_for(reopen_at_ms)
            world.reopen(crash=crash)
        world.run_for(max(0, start + outage_ms - world.scheduler.now_ms))
        if outage_ms > sum(RETRY_MS):
            assert not world.order(order_id).settled and world.engine.owed()
        world.network.down = False
        world.run_until("settled", lambda: world.order(order_id).settled,
                        limit_ms=SENTINEL_MS + 1_000)
        view = world.order(order_id)
        assert world.engine.owed() == []
        expected = {"confirm": "confirmed", "release": "cancelled", "return": "confirmed"}[kind]
        assert statuses(view)[1:] == [expected] * 3
        balances = world.balances()
        if kind == "confirm":
            assert balances == {a: (FUNDED - SPENT[a], 0, SPENT[a]) for a in ACCOUNTS}
        else:
            assert all(held == 0 for _, held, _ in balances.values())
            assert all(available + spent == FUNDED for available, _, spent in balances.values())
        if kind == "return":
            assert view.refund("rf-1").status == "succeeded"
            if view.refund("rf-1").amount_minor == 10_000:
                assert balances == {a: (FUNDED, 0, 0) for a in ACCOUNTS}
        assert not [leg for leg in view.legs if leg.status in (
            LegStatus.CONFIRM_FAILED.value, LegStatus.RELEASE_FAILED.value)]
    finally:
        world.engine.shutdown()
