"""More recharge/transfer edges, and routing with vouchers, refunds and restarts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from payengine import (
    BreakerPolicy,
    CashPart,
    ChannelReply,
    Engine,
    IdempotencyConflict,
    InvalidAmount,
    InvalidRequest,
    LegMode,
    OrderPolicy,
    PaymentRequest,
    RefundRefused,
    Route,
    RoutingTable,
    VoucherPart,
)
from tests.blackbox_session4b.support import Wallet, open_with, paid
from tests.helpers import signed_callback, wait_for

BANK_DOWN = ChannelReply("SUCCESS", "BANK_DOWN")
NOT_FOUND = ChannelReply("SUCCESS", "ORDERNOTEXIST")
CLOSED = ChannelReply("SUCCESS", "CLOSED")
WAITING = ChannelReply("SUCCESS", "USERPAYING")
FAST = OrderPolicy(pay_window_ms=10_000, query_schedule_ms=(50, 100, 200),
                   refund_query_schedule_ms=(100, 200))


def pays(serial: str, amount: int, details: Any) -> ChannelReply:
    return paid(serial, amount)


def down(name: str) -> Wallet:
    return Wallet(name, pay=BANK_DOWN, query=NOT_FOUND, close=CLOSED)


def up(name: str) -> Wallet:
    return Wallet(name, pay=pays, query=WAITING)


def routed(path: Path, wallets: list[Wallet], routes: tuple[Route, ...], **config: Any
           ) -> Engine:
    return open_with(path, wallets, policy=FAST, routing=RoutingTable(routes), **config)


def settled(engine: Engine, order_id: str) -> Any:
    return wait_for(lambda: (o := engine.get_order(order_id)).settled and o, what="settled")


# --- recharge -----------------------------------------------------------------------------

def test_a_recharge_can_be_routed_by_method_and_falls_back(tmp_path: Path) -> None:
    a, b = down("a"), up("b")
    eng = routed(tmp_path / "x.db", [a, b], (Route("qr", "a"), Route("qr", "b", priority=1)))
    try:
        eng.open_account("alice/balance", "CNY")
        r = eng.recharge("shop-1", "t-1", "alice/balance", 50_00, "CNY", CashPart(50_00, "qr"))
        view = settled(eng, r.order_id)
        assert view.state == "succeeded"
        assert view.legs[0].channel == "b"
        assert eng.get_account("alice/balance").funded == 50_00
    finally:
        eng.shutdown()


def test_a_recharge_can_be_paid_again_as_attempt_two_after_attempt_one_closed(tmp_path: Path
                                                                               ) -> None:
    a = Wallet("wx")
    eng = open_with(tmp_path / "x.db", [a])
    try:
        eng.open_account("alice/balance", "CNY")
        first = eng.recharge("shop-1", "t-1", "alice/balance", 50_00, "CNY",
                             CashPart(50_00, "wx"))
        wait_for(lambda: eng.get_order(first.order_id).state == "paying")
        eng.close(first.order_id)
        settled(eng, first.order_id)
        second = eng.recharge("shop-1", "t-1", "alice/balance", 50_00, "CNY",
                              CashPart(50_00, "wx"), attempt=2)
        assert second.attempt == 2
        wait_for(lambda: eng.get_order(second.order_id).state == "paying")
        signed_callback(eng, "wx", second.payment_serial, paid(second.payment_serial))
        assert settled(eng, second.order_id).state == "succeeded"
        assert eng.get_account("alice/balance").funded == 50_00
    finally:
        eng.shutdown()


def test_refunds_of_a_recharge_together_at_most_what_was_paid(tmp_path: Path) -> None:
    a = Wallet("wx")
    eng = open_with(tmp_path / "x.db", [a])
    try:
        eng.open_account("alice/balance", "CNY")
        eng.fund("alice/balance", 100_00, funding_id="extra")
        r = eng.recharge("shop-1", "t-1", "alice/balance", 50_00, "CNY", CashPart(50_00, "wx"))
        wait_for(lambda: eng.get_order(r.order_id).state == "paying")
        signed_callback(eng, "wx", r.payment_serial, paid(r.payment_serial))
        settled(eng, r.order_id)
        eng.refund(r.order_id, "rf-1", 30_00)
        with pytest.raises(RefundRefused):
            eng.refund(r.order_id, "rf-2", 20_01)
        eng.refund(r.order_id, "rf-3", 20_00)
        wait_for(lambda: all(x.status == "succeeded" for x in eng.get_order(r.order_id).refunds))
        assert eng.get_account("alice/balance").available == 100_00
        assert eng.get_order(r.order_id).refunded_minor == 50_00
    finally:
        eng.shutdown()


def test_a_recharge_refund_again_under_the_same_number_is_idempotent(tmp_path: Path) -> None:
    a = Wallet("wx")
    eng = open_with(tmp_path / "x.db", [a])
    try:
        eng.open_account("alice/balance", "CNY")
        r = eng.recharge("shop-1", "t-1", "alice/balance", 50_00, "CNY", CashPart(50_00, "wx"))
        wait_for(lambda: eng.get_order(r.order_id).state == "paying")
        signed_callback(eng, "wx", r.payment_serial, paid(r.payment_serial))
        settled(eng, r.order_id)
        first = eng.refund(r.order_id, "rf-1", 10_00)
        assert eng.refund(r.order_id, "rf-1", 10_00).refund_no == first.refund_no
        with pytest.raises(IdempotencyConflict):
            eng.refund(r.order_id, "rf-1", 11_00)
        wait_for(lambda: eng.get_order(r.order_id).refund("rf-1").status == "succeeded")
        assert eng.get_account("alice/balance").available == 40_00
        assert a.count("refund") == 1
    finally:
        eng.shutdown()


def test_a_recharge_with_a_channel_fee_takes_the_fee_from_the_merchant(tmp_path: Path) -> None:
    a = Wallet("wx")
    eng = open_with(tmp_path / "x.db", [a], fee_ppm={"wx": 6_000})
    try:
        eng.open_account("alice/balance", "CNY")
        r = eng.recharge("shop-1", "t-1", "alice/balance", 50_00, "CNY", CashPart(50_00, "wx"))
        wait_for(lambda: eng.get_order(r.order_id).state == "paying")
        signed_callback(eng, "wx", r.payment_serial, paid(r.payment_serial))
        settled(eng, r.order_id)
        balances = eng.ledger_balances(r.order_id)["CNY"]
        assert balances["vouchers:alice/balance"] == 50_00
        assert balances["payer:wx"] == -50_00
        assert balances["fees:wx"] == 30
        assert balances["merchant:shop-1"] == -30
        assert balances["transit"] == 0
        assert eng.get_account("alice/balance").funded == 50_00
    finally:
        eng.shutdown()


@pytest.mark.parametrize("kwargs", [{"confirm_duplicate": "yes"}, {"pay_window_ms": 0},
                                    {"title": ""}, {"attempt": 11}, {"user_id": ""}])
def test_a_recharge_with_a_bad_keyword_is_invalid_request(tmp_path: Path,
                                                          kwargs: dict[str, Any]) -> None:
    eng = open_with(tmp_path / "x.db", [Wallet("wx")])
    try:
        eng.open_account("alice/balance", "CNY")
        with pytest.raises(InvalidRequest):
            eng.recharge("shop-1", "t-1", "alice/balance", 50_00, "CNY",
                         CashPart(50_00, "wx"), **kwargs)
    finally:
        eng.shutdown()


def test_a_recharge_of_a_cash_part_that_is_not_a_cash_part_is_invalid_request(tmp_path: Path
                                                                               ) -> None:
    eng = open_with(tmp_path / "x.db", [Wallet("wx")])
    try:
        eng.open_account("alice/balance", "CNY")
        with pytest.raises(InvalidRequest):
            eng.recharge("shop-1", "t-1", "alice/balance", 50_00, "CNY",
                         {"amount_minor": 50_00, "channel": "wx"})  # type: ignore[arg-type]
    finally:
        eng.shutdown()


def test_a_transfer_whose_credit_would_pass_ten_to_the_fifteen_fails_and_is_undone(
        tmp_path: Path) -> None:
    eng = open_with(tmp_path / "x.db", [Wallet("wx")])
    try:
        eng.open_account("alice/balance", "CNY")
        eng.open_account("bob/balance", "CNY")
        eng.fund("alice/balance", 10_00, funding_id="a")
        eng.fund("bob/balance", 10**15, funding_id="b")
        eng.transfer("t1", "alice/balance", "bob/balance", 1_00)
        moved = wait_for(lambda: (m := eng.get_transfer("t1")).settled and m)
        assert moved.state == "failed"
        alice = eng.get_account("alice/balance")
        assert (alice.available, alice.held, alice.spent) == (10_00, 0, 0)
        assert eng.get_account("bob/balance").funded == 10**15
    finally:
        eng.shutdown()


def test_a_transfer_of_ten_to_the_fifteen_is_taken_and_one_more_is_invalid_amount(
        tmp_path: Path) -> None:
    eng = open_with(tmp_path / "x.db", [Wallet("wx")])
    try:
        eng.open_account("alice/balance", "CNY")
        eng.open_account("bob/balance", "CNY")
        eng.fund("alice/balance", 10**15, funding_id="a")
        with pytest.raises(InvalidAmount):
            eng.transfer("t0", "alice/balance", "bob/balance", 10**15 + 1)
        eng.transfer("t1", "alice/balance", "bob/balance", 10**15)
        assert wait_for(lambda: (m := eng.get_transfer("t1")).settled and m).state == "succeeded"
    finally:
        eng.shutdown()


def test_conservation_funded_is_top_ups_plus_credits_after_recharges_and_transfers(
        tmp_path: Path) -> None:
    a = Wallet("wx")
    eng = open_with(tmp_path / "x.db", [a])
    try:
        eng.open_account("alice/balance", "CNY")
        eng.open_account("bob/balance", "CNY")
        eng.fund("alice/balance", 10_00, funding_id="a")
        r = eng.recharge("shop-1", "t-1", "alice/balance", 50_00, "CNY", CashPart(50_00, "wx"))
        wait_for(lambda: eng.get_order(r.order_id).state == "paying")
        signed_callback(eng, "wx", r.payment_serial, paid(r.payment_serial))
        settled(eng, r.order_id)
        eng.transfer("t1", "alice/balance", "bob/balance", 25_00)
        wait_for(lambda: eng.get_transfer("t1").settled)
        alice, bob = eng.get_account("alice/balance"), eng.get_account("bob/balance")
        assert alice.funded == 60_00
        assert alice.funded == alice.available + alice.held + alice.spent
        assert (bob.funded, bob.available) == (25_00, 25_00)
        assert alice.spent == bob.funded
        totals = eng.ledger_balances()["CNY"]
        assert sum(totals.values()) == 0
        assert eng.unbalanced_postings() == []
    finally:
        eng.shutdown()


# --- routing with vouchers, refunds, breakers -------------------------------------------

def test_a_combined_payment_falls_back_and_its_vouchers_are_confirmed_once(tmp_path: Path
                                                                           ) -> None:
    a, b = down("a"), up("b")
    eng = routed(tmp_path / "x.db", [a, b], (Route("qr", "a"), Route("qr", "b", priority=1)))
    try:
        eng.open_account("alice/rp", "CNY")
        eng.fund("alice/rp", 5_00, funding_id="rp")
        r = eng.submit(PaymentRequest("station-1", "n-1", "alice", "CNY", 51_00, "Fuel",
                                      cash=CashPart(50_00, "qr"),
                                      vouchers=(VoucherPart("alice/rp", 1_00),)))
        view = settled(eng, r.order_id)
        assert view.state == "succeeded"
        assert view.legs[0].channel == "b"
        rp = eng.get_account("alice/rp")
        assert (rp.available, rp.held, rp.spent) == (4_00, 0, 1_00)
    finally:
        eng.shutdown()


def test_a_refund_of_a_fallback_paid_order_goes_to_the_new_channel_under_the_new_serial(
        tmp_path: Path) -> None:
    a, b = down("a"), up("b")
    eng = routed(tmp_path / "x.db", [a, b], (Route("qr", "a"), Route("qr", "b", priority=1)))
    try:
        r = eng.submit(PaymentRequest("station-1", "n-1", "alice", "CNY", 50_00, "Fuel",
                                      cash=CashPart(50_00, "qr")))
        settled(eng, r.order_id)
        eng.refund(r.order_id, "rf-1", 10_00)
        wait_for(lambda: b.count("refund") == 1)
        assert b.calls_of("refund")[0][1] == r.payment_serial + "-F1"
        assert a.count("refund") == 0
    finally:
        eng.shutdown()


def test_a_fallback_paid_order_balances_in_the_ledger_with_the_new_channel(tmp_path: Path
                                                                           ) -> None:
    a, b = down("a"), up("b")
    eng = routed(tmp_path / "x.db", [a, b], (Route("qr", "a"), Route("qr", "b", priority=1)))
    try:
        r = eng.submit(PaymentRequest("station-1", "n-1", "alice", "CNY", 50_00, "Fuel",
                                      cash=CashPart(50_00, "qr")))
        settled(eng, r.order_id)
        balances = eng.ledger_balances(r.order_id)["CNY"]
        assert balances["payer:b"] == -50_00
        assert balances.get("payer:a", 0) == 0
        assert balances["merchant:station-1"] == 50_00
    finally:
        eng.shutdown()


def test_a_retryable_refusal_by_verified_notification_also_falls_back(tmp_path: Path) -> None:
    a = Wallet("a", pay=WAITING, query=WAITING, close=CLOSED)
    b = up("b")
    eng = routed(tmp_path / "x.db", [a, b], (Route("qr", "a"), Route("qr", "b", priority=1)))
    try:
        r = eng.submit(PaymentRequest("station-1", "n-1", "alice", "CNY", 50_00, "Fuel",
                                      cash=CashPart(50_00, "qr")))
        wait_for(lambda: a.count("pay") == 1)
        a.query_reply = NOT_FOUND
        signed_callback(eng, "a", r.payment_serial, BANK_DOWN)
        view = settled(eng, r.order_id)
        assert (view.state, view.legs[0].channel) == ("succeeded", "b")
    finally:
        eng.shutdown()


def test_a_fallback_survives_a_restart_between_steps(tmp_path: Path) -> None:
    a = Wallet("a", pay=BANK_DOWN, query=ConnectionError("down"), close=CLOSED)
    b = up("b")
    slow = OrderPolicy(pay_window_ms=60_000, query_schedule_ms=(60_000,),
                       refund_query_schedule_ms=(60_000,))
    eng = open_with(tmp_path / "x.db", [a, b], policy=slow,
                    routing=RoutingTable((Route("qr", "a"), Route("qr", "b", priority=1))))
    r = eng.submit(PaymentRequest("station-1", "n-1", "alice", "CNY", 50_00, "Fuel",
                                  cash=CashPart(50_00, "qr")))
    wait_for(lambda: a.count("query") >= 1, what="fallback query sent")
    eng.shutdown()
    a.query_reply = NOT_FOUND
    eng = open_with(tmp_path / "x.db", [a, b], policy=slow,
                    routing=RoutingTable((Route("qr", "a"), Route("qr", "b", priority=1))))
    try:
        view = settled(eng, r.order_id)
        assert (view.state, view.legs[0].channel) == ("succeeded", "b")
        assert b.count("pay") == 1
    finally:
        eng.shutdown()


def test_breaker_policy_defaults_are_those_of_the_readme() -> None:
    p = BreakerPolicy()
    assert (p.window_calls, p.calls_min, p.failure_pct, p.open_ms) == (20, 5, 50, 30_000)


def test_a_breaker_opens_after_calls_min_failures_and_routing_then_skips_it(tmp_path: Path
                                                                            ) -> None:
    a = Wallet("a", pay=ConnectionError("reset"), query=ConnectionError("reset"))
    b = up("b")
    eng = routed(tmp_path / "x.db", [a, b], (Route("qr", "a"), Route("qr", "b", priority=1)),
                 breaker=BreakerPolicy(window_calls=4, calls_min=2, failure_pct=50,
                                       open_ms=60_000))
    try:
        eng.submit(PaymentRequest("station-1", "n-1", "alice", "CNY", 50_00, "Fuel",
                                  cash=CashPart(50_00, "qr")))
        wait_for(lambda: eng.channel_health()["a"] == "open", what="breaker open")
        r = eng.submit(PaymentRequest("station-1", "n-2", "alice", "CNY", 51_00, "Fuel",
                                      cash=CashPart(51_00, "qr")))
        assert eng.get_order(r.order_id).legs[0].channel == "b"
        entry = next(e for e in eng.journal(r.order_id) if e.part == "route")
        assert "a skipped: unavailable (circuit open)" in entry.cause
    finally:
        eng.shutdown()


@pytest.mark.parametrize("kwargs", [{"window_calls": 0}, {"calls_min": 0}, {"failure_pct": 0},
                                    {"failure_pct": 101}, {"open_ms": 0}])
def test_a_bad_breaker_policy_is_invalid_request(kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest):
        BreakerPolicy(**kwargs)


def test_a_voucher_only_leg_mode_is_not_a_route_concern(tmp_path: Path) -> None:
    # vouchers only, no cash: the routing table is not consulted
    eng = routed(tmp_path / "x.db", [up("a")], (Route("qr", "a"),))
    try:
        eng.open_account("alice/rp", "CNY")
        eng.fund("alice/rp", 5_00, funding_id="rp")
        r = eng.submit(PaymentRequest("station-1", "n-1", "alice", "CNY", 1_00, "Fuel",
                                      vouchers=(VoucherPart("alice/rp", 1_00,
                                                            LegMode.PRE_DEDUCT),)))
        assert settled(eng, r.order_id).state == "succeeded"
    finally:
        eng.shutdown()
