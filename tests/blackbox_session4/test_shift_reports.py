"""Black-box tests of README "Shift reports" (Engine.shift_report, `payengine report shift`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from payengine import CashPart, InvalidRequest, PaymentRequest, ShiftReport, ShiftTotals
from tests.blackbox_session4.support import (
    open_station,
    pay,
    quote_request,
    readme_benefits,
    readme_sale,
)
from tests.helpers import REFUND_OK, paid_reply, signed_callback, signed_refund_callback, wait_for

SHIFT = "2026-12-01/A"
FEE_PPM = 6_000
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def station(tmp_path: Path):
    engine, clock, wechat = open_station(tmp_path / "shift.db", fee_ppm={"wechat": FEE_PPM})
    yield engine, clock, wechat
    engine.shutdown()


def quoted_order(engine, no: str = "n-1", shift: str = SHIFT, station: str = "st-1"):
    sale = readme_sale(shift_id=shift, cashier_id="cs-9")
    sale = type(sale)(station, sale.pump, sale.nozzle, sale.line, cashier_id="cs-9",
                      shift_id=shift)
    quote = engine.quote("station-42", "alice", sale, readme_benefits())
    return engine.submit(quote_request(quote, quote.combinations[0], no=no))


def plain_order(engine, no: str, total: int, currency: str = "CNY", shift: str = SHIFT,
                grade: str = "92", volume_ml: int = 10_000):
    from payengine import FuelLine, FuelSale
    line = FuelLine.by_volume(grade, total * 1000 // volume_ml, volume_ml)
    sale = FuelSale("st-1", 1, 1, line, shift_id=shift)
    return engine.submit(PaymentRequest("station-42", no, "alice", currency, line.gross_minor,
                                        "fuel", CashPart(line.gross_minor, "wechat"), sale=sale))


def balanced(totals: ShiftTotals) -> bool:
    return sum(totals.collected_by_method.values()) == (
        totals.merchant_net_minor + totals.fees_minor + totals.in_transit_minor)


def test_an_unknown_station_or_shift_gives_an_empty_report(station) -> None:
    engine, _, _ = station
    report = engine.shift_report("st-nowhere", "never")
    assert isinstance(report, ShiftReport)
    assert (report.station_id, report.shift_id) == ("st-nowhere", "never")
    assert (report.orders_by_state, report.litres_ml_by_grade, report.totals) == ({}, {}, {})


def test_a_paid_quoted_order_is_reported_from_the_ledger(station) -> None:
    engine, _, _ = station
    receipt = quoted_order(engine)
    pay(engine, receipt)
    report = engine.shift_report("st-1", SHIFT)
    assert report.orders_by_state == {"succeeded": 1}
    assert report.litres_ml_by_grade == {"95": 25_348}
    assert set(report.totals) == {"CNY"}
    cny = report.totals["CNY"]
    assert (cny.paid_orders, cny.paid_minor, cny.gross_minor, cny.discount_minor) == (
        1, 184_94, 200_00, 15_06)
    assert cny.discounts_by_rule == {"noon": 506, "fixed-10": 10_00}
    assert cny.collected_by_method == {"cash:wechat": 174_94, "voucher:POINTS": 10_00}
    assert (cny.refunds, cny.refunded_minor, cny.in_transit_minor) == (0, 0, 0)
    ledger = engine.ledger_balances(receipt.order_id)["CNY"]
    assert cny.fees_minor == ledger["fees:wechat"] > 0
    assert cny.merchant_net_minor == ledger["merchant:station-42"] == 184_94 - cny.fees_minor
    assert balanced(cny)


def test_the_fee_is_the_channels_fee_ppm_of_the_cash(station) -> None:
    engine, _, _ = station
    receipt = plain_order(engine, "n-1", 100_00)
    pay(engine, receipt)
    cny = engine.shift_report("st-1", SHIFT).totals["CNY"]
    assert cny.fees_minor == 60               # 0.6 % of 100.00
    assert cny.merchant_net_minor == 99_40 and cny.collected_by_method == {"cash:wechat": 100_00}


def test_only_the_shifts_orders_of_that_station_count(station) -> None:
    engine, _, _ = station
    pay(engine, quoted_order(engine, "n-1"))
    pay(engine, quoted_order(engine, "n-2", shift="2026-12-01/B"))
    pay(engine, quoted_order(engine, "n-3", station="st-2"))
    no_sale = engine.submit(PaymentRequest("station-42", "n-4", "alice", "CNY", 50_00, "shop",
                                           CashPart(50_00, "wechat")))
    pay(engine, no_sale)
    report = engine.shift_report("st-1", SHIFT)
    assert report.orders_by_state == {"succeeded": 1}
    assert report.totals["CNY"].paid_orders == 1
    assert engine.shift_report("st-2", SHIFT).orders_by_state == {"succeeded": 1}


def test_unpaid_orders_count_by_state_but_sell_no_litres(station) -> None:
    engine, _, _ = station
    pay(engine, quoted_order(engine, "n-1"))
    open_one = plain_order(engine, "n-2", 100_00)
    wait_for(lambda: engine.get_order(open_one.order_id).state == "paying", what="paying")
    closed = plain_order(engine, "n-3", 80_00)
    engine.close(closed.order_id)
    report = engine.shift_report("st-1", SHIFT)
    assert report.orders_by_state == {"succeeded": 1, "paying": 1, "closed": 1}
    assert report.litres_ml_by_grade == {"95": 25_348}
    cny = report.totals["CNY"]
    assert cny.paid_orders == 1 and cny.paid_minor == 184_94 and cny.gross_minor == 200_00
    assert balanced(cny)


def test_litres_add_up_by_grade(station) -> None:
    engine, _, _ = station
    pay(engine, plain_order(engine, "n-1", 100_00, grade="92", volume_ml=10_000))
    pay(engine, plain_order(engine, "n-2", 50_00, grade="92", volume_ml=5_000))
    pay(engine, quoted_order(engine, "n-3"))
    report = engine.shift_report("st-1", SHIFT)
    assert report.litres_ml_by_grade == {"92": 15_000, "95": 25_348}
    assert report.totals["CNY"].paid_minor == 100_00 + 50_00 + 184_94
    assert report.totals["CNY"].gross_minor == 100_00 + 50_00 + 200_00


def test_a_refund_is_counted_and_taken_from_the_merchants_share(station) -> None:
    engine, _, _wechat = station
    receipt = quoted_order(engine)
    pay(engine, receipt)
    engine.refund(receipt.order_id, "refund-1", 50_00, reason="pump stopped early")
    under_way = engine.shift_report("st-1", SHIFT).totals["CNY"]
    assert (under_way.refunds, under_way.refunded_minor) == (1, 50_00)
    assert balanced(under_way)
    refund_id = engine.get_order(receipt.order_id).refund("refund-1").refund_id
    signed_refund_callback(engine, "wechat", receipt.payment_serial, refund_id, REFUND_OK)
    wait_for(lambda: engine.get_order(receipt.order_id).refund("refund-1").status
             == "succeeded", what="refund done")
    wait_for(lambda: engine.get_order(receipt.order_id).settled, what="settled")
    cny = engine.shift_report("st-1", SHIFT).totals["CNY"]
    assert (cny.refunds, cny.refunded_minor, cny.in_transit_minor) == (1, 50_00, 0)
    assert cny.collected_by_method == {"cash:wechat": 124_94, "voucher:POINTS": 10_00}
    assert cny.merchant_net_minor == 184_94 - cny.fees_minor - 50_00
    assert cny.paid_minor == 184_94          # still a succeeded order of its total
    assert balanced(cny)


def test_a_charge_given_back_after_a_close_nets_to_nothing(station) -> None:
    engine, _, wechat = station
    receipt = plain_order(engine, "n-1", 100_00)
    wait_for(lambda: engine.get_order(receipt.order_id).state == "paying", what="paying")
    engine.close(receipt.order_id)
    signed_callback(engine, "wechat", receipt.payment_serial, paid_reply(receipt.payment_serial))
    wait_for(lambda: wechat.count("refund") == 1, what="the late charge given back")
    report = engine.shift_report("st-1", SHIFT)
    assert report.orders_by_state == {"closed": 1}
    cny = report.totals.get("CNY")
    if cny is not None:
        assert cny.paid_orders == 0 and cny.merchant_net_minor == 0
        assert balanced(cny)


def test_currencies_are_never_added_together(station) -> None:
    engine, _, _ = station
    pay(engine, plain_order(engine, "n-1", 100_00))
    pay(engine, plain_order(engine, "n-2", 5_000, currency="JPY", volume_ml=20_000))
    report = engine.shift_report("st-1", SHIFT)
    assert set(report.totals) == {"CNY", "JPY"}
    assert report.totals["JPY"].paid_minor == 5_000
    assert report.totals["CNY"].paid_minor == 100_00
    assert report.orders_by_state == {"succeeded": 2}


@pytest.mark.parametrize("station_id,shift_id", [("", SHIFT), ("st-1", ""),
                                                 ("st-1", "x" * 129), ("a\tb", SHIFT)])
def test_a_bad_station_or_shift_id_is_invalid_request(station, station_id, shift_id) -> None:
    engine, _, _ = station
    with pytest.raises(InvalidRequest):
        engine.shift_report(station_id, shift_id)


def test_a_report_reads_only(station) -> None:
    engine, _, _ = station
    pay(engine, quoted_order(engine))
    before = (engine.ledger_balances(), engine.get_account("alice/points"))
    first = engine.shift_report("st-1", SHIFT)
    assert engine.shift_report("st-1", SHIFT) == first
    assert (engine.ledger_balances(), engine.get_account("alice/points")) == before


# ---------------------------------------------------------------- the command line


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "payengine.sim.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_report_shift_json_prints_the_report_beside_a_running_engine(station,
                                                                     tmp_path: Path) -> None:
    engine, _, _ = station
    pay(engine, quoted_order(engine))
    run = cli("report", "shift", "--station", "st-1", "--shift", SHIFT,
              "--db", str(tmp_path / "shift.db"), "--json")
    assert run.returncode == 0, run.stderr
    printed = json.loads(run.stdout)
    assert isinstance(printed, dict)
    assert {"station_id", "shift_id", "orders_by_state", "litres_ml_by_grade", "totals",
            "orders"} <= set(printed)
    assert (printed["station_id"], printed["shift_id"]) == ("st-1", SHIFT)
    assert printed["orders"] == 1
    assert printed["orders_by_state"] == {"succeeded": 1}
    assert printed["litres_ml_by_grade"] == {"95": 25_348}
    cny = printed["totals"]["CNY"]
    report = engine.shift_report("st-1", SHIFT).totals["CNY"]
    for field in ("paid_orders", "paid_minor", "gross_minor", "discount_minor",
                  "discounts_by_rule", "collected_by_method", "refunds", "refunded_minor",
                  "fees_minor", "merchant_net_minor", "in_transit_minor"):
        assert cny[field] == getattr(report, field), field


def test_report_shift_prints_a_table_without_json(station, tmp_path: Path) -> None:
    engine, _, _ = station
    pay(engine, quoted_order(engine))
    run = cli("report", "shift", "--station", "st-1", "--shift", SHIFT,
              "--db", str(tmp_path / "shift.db"))
    assert run.returncode == 0, run.stderr
    assert "st-1" in run.stdout and SHIFT in run.stdout and "CNY" in run.stdout


def test_report_shift_of_an_unknown_shift_is_an_empty_report(station, tmp_path: Path) -> None:
    run = cli("report", "shift", "--station", "st-1", "--shift", "nope",
              "--db", str(tmp_path / "shift.db"), "--json")
    assert run.returncode == 0, run.stderr
    printed = json.loads(run.stdout)
    assert printed["orders"] == 0 and printed["totals"] == {}
    assert printed["orders_by_state"] == {}


def test_report_shift_exits_2_for_a_missing_database(tmp_path: Path) -> None:
    run = cli("report", "shift", "--station", "st-1", "--shift", SHIFT,
              "--db", str(tmp_path / "missing.db"), "--json")
    assert run.returncode == 2
    assert not (tmp_path / "missing.db").exists()


@pytest.mark.parametrize("station_id,shift_id", [("", SHIFT), ("st-1", "x" * 129)])
def test_report_shift_exits_2_for_a_bad_id(station, tmp_path: Path, station_id,
                                           shift_id) -> None:
    run = cli("report", "shift", "--station", station_id, "--shift", shift_id,
              "--db", str(tmp_path / "shift.db"), "--json")
    assert run.returncode == 2


def test_report_shift_json_keeps_currencies_apart(station, tmp_path: Path) -> None:
    engine, _, _ = station
    pay(engine, plain_order(engine, "n-1", 100_00))
    pay(engine, plain_order(engine, "n-2", 5_000, currency="JPY", volume_ml=20_000))
    run = cli("report", "shift", "--station", "st-1", "--shift", SHIFT,
              "--db", str(tmp_path / "shift.db"), "--json")
    assert run.returncode == 0, run.stderr
    printed = json.loads(run.stdout)
    assert set(printed["totals"]) == {"CNY", "JPY"}
    assert printed["totals"]["JPY"]["paid_minor"] == 5_000
    assert printed["totals"]["CNY"]["paid_minor"] == 100_00
    assert printed["orders"] == 2
