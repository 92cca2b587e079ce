"""The engine keeps its promises when messages to voucher systems get lost, or a second
engine tries to open its database, or the channel close is lost in a crash."""

from __future__ import annotations

from pathlib import Path

import pytest

from payengine import ChannelReply, DatabaseInUse, OrderPolicy
from payengine.actors.directory import Directory
from payengine.actors.messages import FromOrder
from payengine.actors.voucher_link import DirectVoucherLink
from payengine.engine.order import ConfirmHold, VoucherReply
from tests.helpers import (
    ScriptedChannel,
    fuel_request,
    fund_customer,
    open_engine,
    paid_reply,
    signed_callback,
    wait_for,
)


class DropFirstConfirm(DirectVoucherLink):
    """Loses the first Confirm of every hold on the wire, and the first reply to each Try."""

    def __init__(self, directory: Directory) -> None:
        super().__init__(directory)
        self.dropped: list[str] = []

    def request(self, account_id: str, command: FromOrder) -> None:
        key = f"confirm:{command.effect.fence!r}"
        if isinstance(command.effect, ConfirmHold) and key not in self.dropped:
            self.dropped.append(key)
            return
        super().request(account_id, command)

    def reply(self, order_id: str, reply: VoucherReply) -> None:
        key = f"{reply.op.value}-reply:{reply.fence!r}"
        if reply.op.value == "try" and key not in self.dropped:
            self.dropped.append(key)
            return
        super().reply(order_id, reply)


def test_lost_voucher_requests_and_replies_are_sent_again_until_answered(tmp_path: Path) -> None:
    channel = ScriptedChannel()
    links: list[DropFirstConfirm] = []

    def link(directory: Directory) -> DropFirstConfirm:
        links.append(DropFirstConfirm(directory))
        return links[-1]

    from payengine import Engine, EngineConfig

    policy = OrderPolicy(pay_window_ms=60_000, query_schedule_ms=(60_000,),
                         voucher_retry_schedule_ms=(50, 100, 200, 400))
    engine = Engine.open(tmp_path / "pay.db", channels=[channel], policy=policy,
                         config=EngineConfig(duplicate_guard_window_ms=0),
                         voucher_link=link)
    try:
        fund_customer(engine)
        receipt = engine.submit(fuel_request())
        wait_for(lambda: engine.get_order(receipt.order_id).state == "paying",
                 what="holds placed although every first Try reply was lost")
        signed_callback(engine, "wechat", receipt.payment_serial, paid_reply(receipt.payment_serial))
        wait_for(lambda: engine.get_order(receipt.order_id).settled, what="confirmed")
        order = engine.get_order(receipt.order_id)
        assert [leg.status for leg in order.legs] == ["paid", "confirmed", "confirmed",
                                                      "confirmed"]
        assert sum(1 for d in links[0].dropped if d.startswith("confirm:")) == 3
        for account in ("alice/red-packet", "alice/points", "alice/phone"):
            a = engine.get_account(account)
            assert a.held == 0 and a.funded == a.available + a.spent
    finally:
        engine.shutdown()


def test_a_second_engine_on_the_same_database_is_refused(tmp_path: Path) -> None:
    channel = ScriptedChannel()
    first = open_engine(tmp_path / "pay.db", channel)
    try:
        with pytest.raises(DatabaseInUse):
            open_engine(tmp_path / "pay.db", channel)
    finally:
        first.shutdown()
    second = open_engine(tmp_path / "pay.db", channel)  # free again once the first is down
    second.shutdown()


def test_a_channel_close_lost_before_a_restart_is_made_again_after_it(tmp_path: Path) -> None:
    channel = ScriptedChannel()
    path = tmp_path / "pay.db"
    engine = open_engine(path, channel)
    fund_customer(engine)
    receipt = engine.submit(fuel_request())
    wait_for(lambda: engine.get_order(receipt.order_id).state == "paying")
    channel.close_reply = TimeoutError("the close never reached the wallet")
    engine.close(receipt.order_id)
    wait_for(lambda: channel.count("close") == 1)
    engine.shutdown()
    channel.close_reply = ChannelReply("SUCCESS", "CLOSED")
    engine = open_engine(path, channel)
    try:
        wait_for(lambda: engine.get_order(receipt.order_id).settled, what="closed at the wallet")
        assert channel.count("close") == 2
        assert engine.get_order(receipt.order_id).legs[0].status == "unpaid"
    finally:
        engine.shutdown()


def test_an_order_that_breaks_an_invariant_is_quarantined_not_restarted_in_a_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import payengine.actors.order_actor as order_actor
    from payengine import ActorBroken

    real_decide = order_actor.decide
    calls: list[str] = []

    def decide_with_a_bug(order, event, **kw):  # type: ignore[no-untyped-def]
        if order.merchant_order_no == "order-bad":
            calls.append(type(event).__name__)
            raise AssertionError("planted: broken invariant")
        return real_decide(order, event, **kw)

    monkeypatch.setattr(order_actor, "decide", decide_with_a_bug)
    channel = ScriptedChannel()
    engine = open_engine(tmp_path / "pay.db", channel)
    try:
        fund_customer(engine)
        bad = engine.submit(fuel_request("order-bad"))
        good = engine.submit(fuel_request("order-good"))
        wait_for(lambda: engine.get_order(good.order_id).state == "paying", what="good order runs")
        wait_for(lambda: engine.broken_actors(), what="the bad order quarantined")
        assert list(engine.broken_actors()) == [f"order:{bad.order_id}"]
        with pytest.raises(ActorBroken, match="quarantined"):
            engine.close(bad.order_id)
        with pytest.raises(ActorBroken):  # the channel is told to call back later
            signed_callback(engine, "wechat", bad.payment_serial, paid_reply(bad.payment_serial))
        seen = len(calls)
        signed_callback(engine, "wechat", good.payment_serial, paid_reply(good.payment_serial))
        wait_for(lambda: engine.get_order(good.order_id).settled, what="good order settles")
        assert len(calls) == seen == 1, "the broken order was restarted"
        assert engine.get_order(bad.order_id).state == "accepted"  # last committed state
    finally:
        engine.shutdown()
    monkeypatch.setattr(order_actor, "decide", real_decide)
    reopened = open_engine(tmp_path / "pay.db", channel)
    try:
        assert reopened.broken_actors() == {}
        wait_for(lambda: reopened.get_order(bad.order_id).state == "paying",
                 what="the fixed engine resumes the quarantined order")
    finally:
        reopened.shutdown()
