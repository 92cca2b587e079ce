"""Statements of routes a payment left, and of recharges: *Late money* and the ledger."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from payengine import (
    CashPart,
    ChannelReply,
    OrderPolicy,
    PaymentRequest,
    Route,
    RoutingTable,
)
from tests.blackbox_session4b.support import Wallet, open_with, paid
from tests.helpers import signed_callback, wait_for

BANK_DOWN = ChannelReply("SUCCESS", "BANK_DOWN")
NOT_FOUND = ChannelReply("SUCCESS", "ORDERNOTEXIST")
CLOSED = ChannelReply("SUCCESS", "CLOSED")
FAST = OrderPolicy(pay_window_ms=10_000, query_schedule_ms=(50, 100, 200),
                   refund_query_schedule_ms=(100, 200))


def pays(serial: str, amount: int, details: Any) -> ChannelReply:
    return paid(serial, amount)


HEADER = "channel,channel_txn_id,out_trade_no,amount,currency,status,time\n"


def test_a_statement_line_of_a_left_route_has_it_given_back_by_that_channel(tmp_path: Path
                                                                           ) -> None:
    a = Wallet("a", pay=BANK_DOWN, query=NOT_FOUND, close=CLOSED)
    b = Wallet("b", pay=pays)
    eng = open_with(tmp_path / "x.db", [a, b], policy=FAST,
                    routing=RoutingTable((Route("qr", "a"), Route("qr", "b", priority=1))))
    try:
        r = eng.submit(PaymentRequest("s-1", "n-1", "alice", "CNY", 50_00, "Fuel",
                                      cash=CashPart(50_00, "qr")))
        view = wait_for(lambda: (o := eng.get_order(r.order_id)).settled and o)
        assert (view.state, view.legs[0].channel) == ("succeeded", "b")
        statement = HEADER + (f"a,TX-LATE,{r.payment_serial},50.00,CNY,SUCCESS,"
                              "2026-12-01T10:00:00Z\n")
        eng.reconcile(statement, channels=["a"])
        late = wait_for(lambda: (o := eng.get_order(r.order_id)).refund("charge:TX-LATE") and o,
                        what="late charge refunded")
        refund = late.refund("charge:TX-LATE")
        assert refund.kind == "duplicate_charge"
        assert late.state == "succeeded"
        assert late.legs[0].channel == "b"
        wait_for(lambda: any(c[0] == "refund" and c[1] == r.payment_serial for c in a.calls),
                 what="refund through a under the old serial")
        wait_for(lambda: eng.get_order(r.order_id).legs[0].channels_tried[0].outcome
                 == "charged_late", what="charged_late")
        wait_for(lambda: eng.get_order(r.order_id).refund("charge:TX-LATE").status
                 == "succeeded", what="refund done")
        balances = eng.ledger_balances(r.order_id)["CNY"]
        assert balances.get("payer:a", 0) == 0
        assert balances["payer:b"] == -50_00
        assert balances["merchant:s-1"] == 50_00
        assert balances["transit"] == 0
        assert eng.get_order(r.order_id).refunded_minor == 0
    finally:
        eng.shutdown()


def test_a_statement_line_of_a_paid_recharge_matches_and_credits_nothing_more(tmp_path: Path
                                                                             ) -> None:
    w = Wallet("wx")
    eng = open_with(tmp_path / "x.db", [w], policy=FAST)
    try:
        eng.open_account("alice/balance", "CNY")
        r = eng.recharge("shop-1", "t-1", "alice/balance", 50_00, "CNY", CashPart(50_00, "wx"))
        wait_for(lambda: eng.get_order(r.order_id).state == "paying")
        signed_callback(eng, "wx", r.payment_serial, paid(r.payment_serial))
        wait_for(lambda: eng.get_order(r.order_id).settled)
        statement = HEADER + (f"wx,TX-{r.payment_serial},{r.payment_serial},50.00,CNY,"
                              "SUCCESS,2026-12-01T10:00:00Z\n")
        report = eng.reconcile(statement, channels=["wx"])
        assert "MATCHED" in report.to_json()
        assert eng.get_account("alice/balance").funded == 50_00
    finally:
        eng.shutdown()


def test_a_recharge_paying_resolved_by_the_statement_is_credited_once(tmp_path: Path) -> None:
    w = Wallet("wx")
    eng = open_with(tmp_path / "x.db", [w], policy=FAST)
    try:
        eng.open_account("alice/balance", "CNY")
        r = eng.recharge("shop-1", "t-1", "alice/balance", 50_00, "CNY", CashPart(50_00, "wx"))
        wait_for(lambda: eng.get_order(r.order_id).state == "paying")
        statement = HEADER + (f"wx,TX-{r.payment_serial},{r.payment_serial},50.00,CNY,"
                              "SUCCESS,2026-12-01T10:00:00Z\n")
        eng.reconcile(statement, channels=["wx"])
        view = wait_for(lambda: (o := eng.get_order(r.order_id)).settled and o)
        assert view.state == "succeeded"
        assert view.legs[-1].status == "credited"
        eng.reconcile(statement, channels=["wx"])
        assert eng.get_account("alice/balance").funded == 50_00
    finally:
        eng.shutdown()
