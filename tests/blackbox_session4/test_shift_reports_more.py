"""More of README "Shift reports": vouchers by unit, refunds over vouchers, attempts, charges
given back, money in transit, and the CLI's default database."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from payengine import (
    CashPart,
    FuelLine,
    FuelSale,
    LegMode,
    PaymentRequest,
    VoucherPart,
)
from tests.blackbox_session4.support import (
    open_station,
    pay,
    quote_request,
    readme_benefits,
    readme_sale,
)
from tests.helpers import REFUND_OK, paid_reply, signed_callback, signed_refund_callback, wait_for

SHIFT = "2026-12-01/A"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def station(tmp_path: Path):
    engine, clock, wechat = open_station(tmp_path / "shift.db", fee_ppm={"wechat": 6_000})
    engine.open_account("alice/red-packet", "CNY")
    engine.fund("alice/red-packet", 50_00, funding_id="rp")
    yield engine, clock, wechat
    engine.shutdown()


def sale(volume_ml: int = 10_000, grade: str = "92") -> FuelSale:
    return FuelSale("st-1", 1, 1, FuelLine.by_volume(grade, 1_000, volume_ml), shift_id=SHIFT)


def balanced(t) -> bool:
    return sum(t.collected_by_method.values()) == t.merchant_net_minor + t.fees_minor + \
        t.in_transit_minor


def finish_refunds(engine, receipt) -> None:
    for refund in engine.get_order(receipt.order_id).refunds:
        if refund.status == "refunding":
            signed_refund_callback(engine, "wechat", receipt.payment_serial, refund.refund_id,
                                   REFUND_OK)
    wait_for(lambda: engine.get_order(receipt.order_id).settled, what="settled")


def test_money_vouchers_are_collected_under_their_currency(station) -> None:
    engine, _, _ = station
    receipt = engine.submit(PaymentRequest(
        "station-42", "n-1", "alice", "CNY", 100_00, "fuel", CashPart(70_00, "wechat"),
        (VoucherPart("alice/red-packet", 10_00), VoucherPart("alice/points", 2_00)),
        sale=sale()))
    pay(engine, receipt)
    cny = engine.shift_report("st-1", SHIFT).totals["CNY"]
    assert cny.collected_by_method == {"cash:wechat": 70_00, "voucher:CNY": 10_00,
                                       "voucher:POINTS": 20_00}
    assert cny.fees_minor == 42                    # 0.6 % of the cash only
    assert cny.merchant_net_minor == 100_00 - 42
    assert balanced(cny)


def test_a_voucher_only_order_is_reported(station) -> None:
    engine, _, _ = station
    receipt = engine.submit(PaymentRequest(
        "station-42", "n-1", "alice", "CNY", 10_00, "fuel", None,
        (VoucherPart("alice/red-packet", 10_00),), sale=sale(1_000)))
    wait_for(lambda: engine.get_order(receipt.order_id).settled, what="settled")
    report = engine.shift_report("st-1", SHIFT)
    assert report.orders_by_state == {"succeeded": 1}
    cny = report.totals["CNY"]
    assert cny.collected_by_method == {"voucher:CNY": 10_00}
    assert (cny.fees_minor, cny.merchant_net_minor, cny.in_transit_minor) == (0, 10_00, 0)


def test_a_full_refund_gives_back_cash_then_points(station) -> None:
    engine, _, _ = station
    quote = engine.quote("station-42", "alice", replace(readme_sale(), shift_id=SHIFT),
                         readme_benefits())
    receipt = engine.submit(quote_request(quote, quote.combinations[0]))
    pay(engine, receipt)
    engine.refund(receipt.order_id, "all", 184_94)
    finish_refunds(engine, receipt)
    cny = engine.shift_report("st-1", SHIFT).totals["CNY"]
    assert sum(cny.collected_by_method.values()) == 0
    assert cny.collected_by_method.get("cash:wechat", 0) == 0
    assert cny.collected_by_method.get("voucher:POINTS", 0) == 0
    assert (cny.refunds, cny.refunded_minor) == (1, 184_94)
    assert cny.merchant_net_minor == -cny.fees_minor
    assert cny.discounts_by_rule == {"noon": 506, "fixed-10": 10_00}
    assert balanced(cny)


def test_a_failed_refund_is_not_counted(station) -> None:
    from tests.helpers import REFUND_CLOSED
    engine, _, wechat = station
    receipt = engine.submit(PaymentRequest("station-42", "n-1", "alice", "CNY", 100_00, "fuel",
                                           CashPart(100_00, "wechat"), sale=sale()))
    pay(engine, receipt)
    wechat.refund_reply = REFUND_CLOSED
    engine.refund(receipt.order_id, "r-1", 30_00)
    wait_for(lambda: engine.get_order(receipt.order_id).refund("r-1").status == "failed",
             what="refund failed")
    cny = engine.shift_report("st-1", SHIFT).totals["CNY"]
    assert (cny.refunds, cny.refunded_minor) == (0, 0)
    assert cny.collected_by_method == {"cash:wechat": 100_00}
    assert cny.merchant_net_minor == 100_00 - 60
    assert balanced(cny)


def test_two_attempts_of_one_trade_are_both_orders_of_the_shift(station) -> None:
    engine, _, _ = station
    request = PaymentRequest("station-42", "n-1", "alice", "CNY", 100_00, "fuel",
                             CashPart(100_00, "wechat"), sale=sale())
    first = engine.submit(request)
    engine.close(first.order_id)
    second = engine.submit(replace(request, attempt=2))
    pay(engine, second)
    report = engine.shift_report("st-1", SHIFT)
    assert report.orders_by_state == {"closed": 1, "succeeded": 1}
    assert report.totals["CNY"].paid_orders == 1
    assert report.litres_ml_by_grade == {"92": 10_000}


def test_a_charge_given_back_after_a_close_nets_to_zero_and_is_no_merchant_refund(
        station) -> None:
    engine, _, wechat = station
    receipt = engine.submit(PaymentRequest("station-42", "n-1", "alice", "CNY", 100_00, "fuel",
                                           CashPart(100_00, "wechat"), sale=sale()))
    wait_for(lambda: engine.get_order(receipt.order_id).state == "paying", what="paying")
    engine.close(receipt.order_id)
    signed_callback(engine, "wechat", receipt.payment_serial, paid_reply(receipt.payment_serial))
    wait_for(lambda: wechat.count("refund") == 1, what="the error refund")
    under_way = engine.shift_report("st-1", SHIFT).totals["CNY"]
    assert balanced(under_way)
    assert under_way.paid_orders == 0 and under_way.refunds == 0
    assert under_way.merchant_net_minor == 0
    refund_id = next(c for c in wechat.calls if c[0] == "refund")[2]
    signed_refund_callback(engine, "wechat", receipt.payment_serial, refund_id, REFUND_OK)
    wait_for(lambda: engine.get_order(receipt.order_id).settled, what="settled")
    done = engine.shift_report("st-1", SHIFT).totals.get("CNY")
    if done is not None:
        assert sum(done.collected_by_method.values()) == 0
        assert (done.merchant_net_minor, done.fees_minor, done.in_transit_minor) == (0, 0, 0)
        assert done.refunds == 0 and done.refunded_minor == 0


def test_a_paid_order_still_deducting_is_in_transit(station) -> None:
    engine, _, _ = station
    engine.open_account("alice/phone", "CNY")       # funded with nothing: the debit falls short
    receipt = engine.submit(PaymentRequest(
        "station-42", "n-1", "alice", "CNY", 100_00, "fuel", CashPart(90_00, "wechat"),
        (VoucherPart("alice/phone", 10_00, LegMode.POST_DEDUCT),), sale=sale()))
    wait_for(lambda: engine.get_order(receipt.order_id).state == "paying", what="paying")
    signed_callback(engine, "wechat", receipt.payment_serial, paid_reply(receipt.payment_serial))
    wait_for(lambda: engine.get_order(receipt.order_id).state not in ("paying", "deducting"),
             what="decided")
    view = engine.get_order(receipt.order_id)
    report = engine.shift_report("st-1", SHIFT)
    assert report.orders_by_state == {view.state: 1}
    cny = report.totals["CNY"]
    assert balanced(cny)
    if view.state == "failed":                 # the shortfall: the cash goes back
        assert cny.paid_orders == 0 and cny.merchant_net_minor == 0
        if view.settled:
            assert cny.in_transit_minor == 0


def test_report_shift_reads_payengine_db_in_the_working_directory_by_default(
        tmp_path: Path) -> None:
    engine, _, _ = open_station(tmp_path / "payengine.db")
    try:
        receipt = engine.submit(PaymentRequest("station-42", "n-1", "alice", "CNY", 10_00,
                                               "fuel", CashPart(10_00, "wechat"),
                                               sale=sale(1_000)))
        pay(engine, receipt)
        run = subprocess.run([sys.executable, "-m", "payengine.sim.cli", "report", "shift",
                              "--station", "st-1", "--shift", SHIFT, "--json"], cwd=tmp_path,
                             env={**os.environ, "PYTHONPATH": str(ROOT)},
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        printed = json.loads(run.stdout)
        assert printed["orders"] == 1 and printed["totals"]["CNY"]["paid_minor"] == 10_00
    finally:
        engine.shutdown()


def test_report_shift_table_shows_the_figures(tmp_path: Path) -> None:
    engine, _, _ = open_station(tmp_path / "t.db")
    try:
        receipt = engine.submit(PaymentRequest("station-42", "n-1", "alice", "CNY", 123_45,
                                               "fuel", CashPart(123_45, "wechat"),
                                               sale=sale(12_345)))
        pay(engine, receipt)
    finally:
        engine.shutdown()
    run = subprocess.run([sys.executable, "-m", "payengine.sim.cli", "report", "shift",
                          "--station", "st-1", "--shift", SHIFT, "--db", str(tmp_path / "t.db")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "123.45" in run.stdout or "12345" in run.stdout
