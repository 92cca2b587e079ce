"""Merchant refunds and refunds of a second charge, through the public API.

A refund goes back by the original route: the cash part through the channel's refund,
then the vouchers to their accounts. Refunds of one order are serialised by its actor, so
no interleaving of requests can give back more than was paid.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from payengine import (
    ChannelReply,
    Engine,
    IdempotencyConflict,
    IllegalTransition,
    InvalidAmount,
    NotificationRejected,
    OrderPolicy,
    RefundRefused,
)
from tests.helpers import (
    SLOW_POLICY,
    ScriptedChannel,
    fuel_request,
    fund_customer,
    open_engine,
    paid_order,
    paid_reply,
    signed_callback,
    signed_refund_callback,
    wait_for,
)

REFUND_OK = ChannelReply("SUCCESS", "SUCCESS")
REFUND_FAILED = ChannelReply("SUCCESS", "REFUNDCLOSE")
FUNDED = {"alice/red-packet": 1_000, "alice/points": 1_000, "alice/phone": 1_000}


def available(engine: Engine) -> dict[str, int]:
    return {a: engine.get_account(a).available for a in FUNDED}


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Engine, ScriptedChannel]:
    channel = ScriptedChannel()
    channel.refund_reply = REFUND_OK
    engine = open_engine(tmp_path / "pay.db", channel)
    fund_customer(engine)
    yield engine, channel  # type: ignore[misc]
    engine.shutdown()


def test_a_full_refund_gives_the_cash_back_then_every_voucher(
    setup: tuple[Engine, ScriptedChannel]
) -> None:
    engine, channel = setup
    order = paid_order(engine)
    assert available(engine) == {"alice/red-packet": 900, "alice/points": 980, "alice/phone": 900}
    refund = engine.refund(order.order_id, "rf-1", 10_000, reason="pump fault")
    assert refund.refund_no == "rf-1" and refund.amount_minor == 10_000
    done = wait_for(lambda: engine.get_order(order.order_id).refund("rf-1").status == "succeeded"
                    and engine.get_order(order.order_id), what="refund done")
    assert ("refund", order.payment_serial, refund.refund_id, "9600") in channel.calls
    assert available(engine) == FUNDED
    assert done.state == "succeeded" and done.refunded_minor == 10_000 and done.settled
    assert [(leg, status) for leg, _, status in done.refund("rf-1").parts] == [
        (0, "done"), (1, "done"), (2, "done"), (3, "done")]
    for account in FUNDED:
        view = engine.get_account(account)
        assert view.funded == view.available + view.held + view.spent


def test_partial_refunds_go_cash_first_and_never_above_what_was_paid(
    setup: tuple[Engine, ScriptedChannel]
) -> None:
    engine, channel = setup
    order = paid_order(engine)
    first = engine.refund(order.order_id, "rf-1", 9_000)
    assert [(leg, amount) for leg, amount, _ in first.parts] == [(0, 9_000)]
    second = engine.refund(order.order_id, "rf-2", 750)  # 6.00 cash + 1.00 red packet + 0.50
    assert [(leg, amount) for leg, amount, _ in second.parts] == [(0, 600), (1, 100), (2, 5)]
    with pytest.raises(RefundRefused, match="exceeds the 250"):
        engine.refund(order.order_id, "rf-3", 251)
    third = engine.refund(order.order_id, "rf-3", 250)
    assert [(leg, amount) for leg, amount, _ in third.parts] == [(2, 15), (3, 100)]
    wait_for(lambda: all(r.status == "succeeded" for r in engine.get_order(order.order_id).refunds),
             what="all three refunds done")
    final = engine.get_order(order.order_id)
    assert final.refunded_minor == 10_000
    assert available(engine) == FUNDED
    assert sum(int(c[3]) for c in channel.calls if c[0] == "refund") == 9_600


def test_the_same_refund_asked_again_is_the_same_refund_and_other_parameters_conflict(
    setup: tuple[Engine, ScriptedChannel]
) -> None:
    engine, _ = setup
    order = paid_order(engine)
    first = engine.refund(order.order_id, "rf-1", 5_000, reason="r")
    again = engine.refund(order.order_id, "rf-1", 5_000, reason="r")
    assert again.refund_id == first.refund_id
    with pytest.raises(IdempotencyConflict):
        engine.refund(order.order_id, "rf-1", 4_000, reason="r")
    with pytest.raises(InvalidAmount):
        engine.refund(order.order_id, "rf-2", 0)
    wait_for(lambda: engine.get_order(order.order_id).refund("rf-1").status == "succeeded",
             what="refund done")
    assert len(engine.get_order(order.order_id).refunds) == 1


def test_only_a_succeeded_payment_can_be_refunded(setup: tuple[Engine, ScriptedChannel]) -> None:
    engine, _ = setup
    receipt = engine.submit(fuel_request("unpaid"))
    wait_for(lambda: engine.get_order(receipt.order_id).state == "paying", what="holds placed")
    with pytest.raises(IllegalTransition, match="only a succeeded payment"):
        engine.refund(receipt.order_id, "rf-1", 100)
    assert engine.get_order(receipt.order_id).refunds == ()


def test_a_refused_cash_refund_returns_no_voucher_and_frees_the_amount_again(
    setup: tuple[Engine, ScriptedChannel]
) -> None:
    engine, channel = setup
    order = paid_order(engine)
    channel.refund_reply = REFUND_FAILED
    engine.refund(order.order_id, "rf-1", 10_000)
    failed = wait_for(lambda: (o := engine.get_order(order.order_id)).refund("rf-1").status
                      == "failed" and o, what="refund refused by the channel")
    assert [status for _, _, status in failed.refund("rf-1").parts] == [
        "failed", "not_sent", "not_sent", "not_sent"]
    assert failed.refunded_minor == 0
    assert available(engine) == {"alice/red-packet": 900, "alice/points": 980, "alice/phone": 900}
    channel.refund_reply = REFUND_OK
    engine.refund(order.order_id, "rf-2", 10_000)
    wait_for(lambda: engine.get_order(order.order_id).refund("rf-2").status == "succeeded",
             what="second try")
    assert available(engine) == FUNDED


def test_a_refund_still_processing_is_settled_by_its_callback(
    setup: tuple[Engine, ScriptedChannel]
) -> None:
    engine, channel = setup
    order = paid_order(engine)
    channel.refund_reply = ChannelReply("SUCCESS", "PROCESSING")
    refund = engine.refund(order.order_id, "rf-1", 9_700)
    assert refund.status == "refunding"
    assert not engine.get_order(order.order_id).settled
    signed_refund_callback(engine, "wechat", order.payment_serial, refund.refund_id, REFUND_OK)
    signed_refund_callback(engine, "wechat", order.payment_serial, refund.refund_id, REFUND_OK)
    wait_for(lambda: engine.get_order(order.order_id).refund("rf-1").status == "succeeded",
             what="refund done after its callback")
    assert engine.get_account("alice/red-packet").available == 1_000


def test_concurrent_refund_requests_never_give_back_more_than_was_paid(
    setup: tuple[Engine, ScriptedChannel]
) -> None:
    engine, channel = setup
    order = paid_order(engine)
    accepted: list[str] = []
    refused: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(16)

    def ask(n: int) -> None:
        start.wait()
        try:
            engine.refund(order.order_id, f"rf-{n}", 3_000)
            with lock:
                accepted.append(f"rf-{n}")
        except RefundRefused:
            with lock:
                refused.append(f"rf-{n}")

    threads = [threading.Thread(target=ask, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(accepted) == 3 and len(refused) == 13
    wait_for(lambda: engine.get_order(order.order_id).settled, what="refunds done")
    final = engine.get_order(order.order_id)
    assert final.refunded_minor == 9_000
    assert sorted(r.refund_no for r in final.refunds) == sorted(accepted)
    assert sum(int(c[3]) for c in channel.calls if c[0] == "refund") <= 9_600


def test_a_refund_asked_before_a_crash_is_finished_after_reopen(tmp_path: Path) -> None:
    channel = ScriptedChannel()
    channel.refund_reply = ChannelReply("SUCCESS", "PROCESSING")
    engine = open_engine(tmp_path / "pay.db", channel)
    fund_customer(engine)
    order = paid_order(engine)
    refund = engine.refund(order.order_id, "rf-1", 10_000)
    engine.abandon()
    channel.refund_reply = REFUND_OK
    reopened = open_engine(tmp_path / "pay.db", channel)
    try:
        wait_for(lambda: reopened.get_order(order.order_id).refund("rf-1").status == "succeeded",
                 what="the refund finished by the reopened engine")
        assert sum(1 for c in channel.calls if c[:3] == ("refund", order.payment_serial,
                                                          refund.refund_id)) >= 2
        assert available(reopened) == FUNDED
    finally:
        reopened.shutdown()


def test_a_second_charge_of_a_paid_order_is_refunded_whole(
    setup: tuple[Engine, ScriptedChannel]
) -> None:
    engine, channel = setup
    order = paid_order(engine)
    second = ChannelReply("SUCCESS", "SUCCESS", "TX2", 9_600)
    with pytest.raises(NotificationRejected, match="unconfirmed"):
        signed_callback(engine, "wechat", order.payment_serial, second)
    # money never leaves on a notification alone: the channel is asked about TX2 first
    wait_for(lambda: ("query_charge", order.payment_serial, "TX2") in channel.calls,
             what="the second charge asked about")
    assert engine.get_order(order.order_id).refunds == ()
    channel.charge_query_reply = second  # the channel confirms it really charged TX2
    time.sleep(SLOW_POLICY.confirm_query_interval_ms / 1000)  # past the bound on such queries
    with pytest.raises(NotificationRejected, match="unconfirmed"):  # the wallet's retry
        signed_callback(engine, "wechat", order.payment_serial, second)
    done = wait_for(lambda: (o := engine.get_order(order.order_id)).settled and o.refunds and o,
                    what="second charge refunded")
    (refund,) = done.refunds
    assert (refund.kind, refund.refund_no, refund.amount_minor) == ("duplicate_charge", "charge:TX2", 9_600)
    assert refund.status == "succeeded" and done.state == "succeeded"
    assert done.refunded_minor == 0  # the merchant may still refund the payment itself
    assert [c for c in channel.calls if c[0] == "refund"] == [
        ("refund", order.payment_serial, refund.refund_id, "9600")]


def test_a_refund_left_unknown_and_absent_from_the_statement_is_asked_again(
    tmp_path: Path
) -> None:
    from payengine.engine.statement import LineStatus, StatementLine, Verdict, render_statement

    channel = ScriptedChannel()
    channel.refund_reply = TimeoutError("refund timed out")
    channel.refund_query_reply = TimeoutError("query timed out")
    policy = OrderPolicy(pay_window_ms=60_000, query_schedule_ms=(60_000,),
                         refund_query_schedule_ms=(20, 20))
    engine = open_engine(tmp_path / "pay.db", channel, policy=policy)
    try:
        fund_customer(engine)
        order = paid_order(engine)
        engine.refund(order.order_id, "rf-1", 10_000)
        closed = engine.submit(fuel_request("closed"))
        wait_for(lambda: engine.get_order(closed.order_id).state == "paying", what="paying")
        engine.close(closed.order_id)
        # paid after the close
        signed_callback(engine, "wechat", closed.payment_serial, paid_reply(closed.payment_serial))
        wait_for(lambda: engine.get_order(order.order_id).refund("rf-1").status == "unknown"
                 and engine.get_order(closed.order_id).legs[0].status == "refund_unknown",
                 what="both refunds unknown after their schedules")
        now = engine.runtime.now_ms()
        statement = render_statement([
            StatementLine("wechat", "TX1", order.payment_serial, 9_600, "CNY",
                          LineStatus.SUCCESS, now),
            StatementLine("wechat", "TX1c", closed.payment_serial, 9_600, "CNY",
                          LineStatus.SUCCESS, now)])
        channel.refund_reply = REFUND_OK
        report = engine.reconcile(statement, period_start_ms=now - 60_000, period_end_ms=now)
        assert report.counts.get(Verdict.REFUND_RESENT) == 2
        wait_for(lambda: engine.get_order(order.order_id).refund("rf-1").status == "succeeded"
                 and engine.get_order(closed.order_id).legs[0].status == "refunded",
                 what="both refunds asked again and done")
        assert available(engine) == FUNDED
    finally:
        engine.shutdown()
