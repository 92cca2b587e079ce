"""Further edges: rechecks, repeated refunds of recharges, left routes' notifications."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Any

from payengine import (
    CashPart,
    ChannelReply,
    Engine,
    InsufficientBalance,
    OrderPolicy,
    PaymentRequest,
    Route,
    RoutingTable,
    WithholdConfig,
)
from tests.blackbox_session4b.support import AgreementWallet, Wallet, open_with, paid
from tests.helpers import signed_callback, wait_for

BANK_DOWN = ChannelReply("SUCCESS", "BANK_DOWN")
NOT_FOUND = ChannelReply("SUCCESS", "ORDERNOTEXIST")
CLOSED = ChannelReply("SUCCESS", "CLOSED")
WAITING = ChannelReply("SUCCESS", "USERPAYING")
FAST = OrderPolicy(pay_window_ms=10_000, query_schedule_ms=(50, 100, 200),
                   refund_query_schedule_ms=(100, 200))


def pays(serial: str, amount: int, details: Any) -> ChannelReply:
    return paid(serial, amount)


def test_a_withholding_waiting_for_a_close_answer_retries_once_the_close_is_answered(
        tmp_path: Path) -> None:
    w0 = AgreementWallet("w0", pay=WAITING, query=ConnectionError("down"),
                         close=ConnectionError("down"))
    policy = OrderPolicy(pay_window_ms=300, query_schedule_ms=(100,),
                         refund_query_schedule_ms=(100,))
    eng = open_with(tmp_path / "x.db", [w0], policy=policy,
                    withholding=WithholdConfig(recheck_ms=50))
    try:
        a = eng.sign_agreement("alice", "w0")
        eng.withhold("gym-1", "sub-1", "alice", 99_00, "CNY", "Monthly")
        wait_for(lambda: w0.count("close") >= 1, what="close sent")
        assert eng.get_withholding("gym-1", "sub-1").attempt == 1
        w0.close_reply = CLOSED
        w0.query_reply = CLOSED
        w0.pay_reply = pays
        w = wait_for(lambda: (x := eng.get_withholding("gym-1", "sub-1")).state != "paying"
                     and x, timeout_s=15, what="withholding decided")
        assert (w.state, w.attempt, w.attempts) == ("succeeded", 2,
                                                    (a.agreement_id, a.agreement_id))
    finally:
        eng.shutdown()


def recharged(eng: Engine, wallet: Wallet, amount: int = 50_00) -> str:
    eng.open_account("alice/balance", "CNY")
    r = eng.recharge("shop-1", "t-1", "alice/balance", amount, "CNY", CashPart(amount, "wx"))
    wait_for(lambda: eng.get_order(r.order_id).state == "paying")
    signed_callback(eng, "wx", r.payment_serial, paid(r.payment_serial))
    wait_for(lambda: eng.get_order(r.order_id).settled)
    return r.order_id


def test_a_recharge_refund_refused_by_the_channel_may_be_asked_again_under_a_new_number(
        tmp_path: Path) -> None:
    w = Wallet("wx")
    eng = open_with(tmp_path / "x.db", [w], policy=FAST)
    try:
        order_id = recharged(eng, w)
        w.refund_reply = ChannelReply("SUCCESS", "REFUNDCLOSE")
        eng.refund(order_id, "rf-1", 50_00)
        wait_for(lambda: eng.get_order(order_id).refund("rf-1").status == "failed")
        wait_for(lambda: eng.get_account("alice/balance").available == 50_00, what="reversed")
        assert eng.get_order(order_id).refunded_minor == 0
        w.refund_reply = ChannelReply("SUCCESS", "SUCCESS")
        eng.refund(order_id, "rf-2", 50_00)
        wait_for(lambda: eng.get_order(order_id).refund("rf-2").status == "succeeded")
        assert eng.get_account("alice/balance").available == 0
        assert eng.get_order(order_id).refunded_minor == 50_00
    finally:
        eng.shutdown()


def test_a_recharge_refund_counts_only_the_available_balance_not_what_is_held(tmp_path: Path
                                                                              ) -> None:
    w = Wallet("wx")
    eng = open_with(tmp_path / "x.db", [w], policy=FAST)
    try:
        order_id = recharged(eng, w)
        eng.pre_hold("alice/balance", 30_00, hold_id="h1")
        try:
            eng.refund(order_id, "rf-1", 30_00)
            raise AssertionError("a refund above the available balance was taken")
        except InsufficientBalance:
            pass
        eng.refund(order_id, "rf-2", 20_00)
        wait_for(lambda: eng.get_order(order_id).refund("rf-2").status == "succeeded")
        acc = eng.get_account("alice/balance")
        assert (acc.available, acc.held) == (0, 30_00)
    finally:
        eng.shutdown()


def test_a_transfer_and_a_hold_racing_for_one_balance_never_both_take_it(tmp_path: Path
                                                                         ) -> None:
    eng = open_with(tmp_path / "x.db", [Wallet("wx")], policy=FAST)
    try:
        eng.open_account("alice/balance", "CNY")
        eng.open_account("bob/balance", "CNY")
        eng.fund("alice/balance", 50_00, funding_id="a")
        results: dict[str, Any] = {}

        def hold() -> None:
            try:
                results["hold"] = eng.pre_hold("alice/balance", 50_00, hold_id="h")
            except Exception as error:
                results["hold"] = error

        thread = threading.Thread(target=hold)
        thread.start()
        try:
            eng.transfer("t1", "alice/balance", "bob/balance", 50_00)
            moved = wait_for(lambda: (m := eng.get_transfer("t1")).settled and m)
            results["transfer"] = moved.state
        except InsufficientBalance:
            results["transfer"] = "refused"
        thread.join()
        alice, bob = eng.get_account("alice/balance"), eng.get_account("bob/balance")
        assert alice.available + alice.held + alice.spent == 50_00
        assert alice.held + alice.spent <= 50_00
        assert bob.funded == alice.spent
        assert not (results["transfer"] == "succeeded"
                    and not isinstance(results["hold"], Exception))
    finally:
        eng.shutdown()


def routed_down_up(tmp_path: Path, b_pay: Any = WAITING) -> tuple[Engine, Wallet, Wallet]:
    a = Wallet("a", pay=BANK_DOWN, query=NOT_FOUND, close=CLOSED)
    b = Wallet("b", pay=b_pay, query=WAITING, close=CLOSED)
    eng = open_with(tmp_path / "x.db", [a, b], policy=FAST,
                    routing=RoutingTable((Route("qr", "a"), Route("qr", "b", priority=1))))
    return eng, a, b


def test_a_failure_notification_for_a_left_serial_does_not_move_the_order(tmp_path: Path
                                                                          ) -> None:
    eng, _a, b = routed_down_up(tmp_path)
    try:
        r = eng.submit(PaymentRequest("s-1", "n-1", "alice", "CNY", 50_00, "Fuel",
                                      cash=CashPart(50_00, "qr")))
        wait_for(lambda: b.count("pay") == 1, what="moved to b")
        with contextlib.suppress(Exception):  # refused is fine
            signed_callback(eng, "a", r.payment_serial, ChannelReply("SUCCESS", "PAYERROR"))
        view = eng.get_order(r.order_id)
        assert view.state == "paying"
        assert view.legs[0].channel == "b"
        signed_callback(eng, "b", r.payment_serial + "-F1", paid(r.payment_serial + "-F1"))
        assert wait_for(lambda: (o := eng.get_order(r.order_id)).settled and o).state \
            == "succeeded"
    finally:
        eng.shutdown()


def test_closing_an_order_after_its_fallback_closes_the_new_serial_at_the_new_channel(
        tmp_path: Path) -> None:
    eng, _a, b = routed_down_up(tmp_path)
    try:
        r = eng.submit(PaymentRequest("s-1", "n-1", "alice", "CNY", 50_00, "Fuel",
                                      cash=CashPart(50_00, "qr")))
        wait_for(lambda: b.count("pay") == 1, what="moved to b")
        eng.close(r.order_id)
        view = wait_for(lambda: (o := eng.get_order(r.order_id)).settled and o)
        assert view.state == "closed"
        assert ("close", r.payment_serial + "-F1") in b.calls
    finally:
        eng.shutdown()


def test_a_user_close_during_the_fallback_query_means_the_next_route_is_never_paid(
        tmp_path: Path) -> None:
    a = Wallet("a", pay=BANK_DOWN, query=ConnectionError("down"), close=CLOSED)
    b = Wallet("b", pay=pays)
    slow_q = OrderPolicy(pay_window_ms=10_000, query_schedule_ms=(2_000, 2_000),
                         refund_query_schedule_ms=(100,))
    eng = open_with(tmp_path / "x.db", [a, b], policy=slow_q,
                    routing=RoutingTable((Route("qr", "a"), Route("qr", "b", priority=1))))
    try:
        r = eng.submit(PaymentRequest("s-1", "n-1", "alice", "CNY", 50_00, "Fuel",
                                      cash=CashPart(50_00, "qr")))
        wait_for(lambda: a.count("query") >= 1, what="fallback query")
        eng.close(r.order_id)
        view = wait_for(lambda: (o := eng.get_order(r.order_id)).settled and o)
        assert view.state in ("closed", "failed")
        assert b.count("pay") == 0
    finally:
        eng.shutdown()
