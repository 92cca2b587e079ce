"""The shift report (issue 12, item 5): one station's shift from the ledger, exact figures
for a small shift, the same through ``Engine.shift_report`` and ``payengine report shift``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from payengine import CashPart, ChannelReply, Engine, EngineConfig, PaymentRequest
from payengine.engine.discounts import DiscountRules, PriceCut, QuoteUse
from payengine.engine.fuel import FuelLine, FuelSale
from payengine.engine.order import LegMode, VoucherPart
from payengine.sim.cli import main
from tests.helpers import ScriptedChannel, paid_reply, signed_callback, wait_for
from tests.test_discounts import at
from tests.test_quotes_engine import SetClock

RULES = DiscountRules(price_cuts=(PriceCut("noon", 20, from_minute=11 * 60,
                                           to_minute=14 * 60),))


def sale(shift: str, pump: int, amount_minor: int, station: str = "st-1") -> FuelSale:
    return FuelSale(station, pump, 1, FuelLine.by_amount("95", 800, amount_minor),
                    cashier_id="cs-1", shift_id=shift)


def settled(engine: Engine, order_id: str, state: str) -> None:
    wait_for(lambda: engine.get_order(order_id).state == state
             and engine.get_order(order_id).settled, what=state)


def paid(engine: Engine, order_id: str) -> None:
    wait_for(lambda: engine.get_order(order_id).state == "paying", what="paying")
    serial = engine.get_order(order_id).payment_serial
    signed_callback(engine, "wechat", serial, paid_reply(serial))
    settled(engine, order_id, "succeeded")


def run_shift(path: Path) -> Engine:
    wechat = ScriptedChannel("wechat")
    wechat.refund_reply = ChannelReply("SUCCESS", "SUCCESS")  # the refund is done at once
    engine = Engine.open(path, channels=[wechat],
                         runtime=SetClock(at(12, 0)),
                         config=EngineConfig(discounts=RULES, fee_ppm={"wechat": 6_000},
                                             duplicate_guard_window_ms=0))
    engine.open_account("alice/rp", "CNY")
    engine.fund("alice/rp", 5_00, funding_id="rp")
    # 1: quoted, 100.00 of 95 = 12.5 litres, the noon cut 0.20/l = 2.50 off: 97.50
    quote = engine.quote("m-1", "alice", sale("A", 1, 100_00))
    quoted = engine.submit(PaymentRequest(
        "m-1", "n-1", "alice", "CNY", 97_50, "95", CashPart(96_50, "wechat"),
        (VoucherPart("alice/rp", 1_00, LegMode.PRE_DEDUCT),),
        quote=QuoteUse(quote.quote_id, "c1")))
    paid(engine, quoted.order_id)
    # 2: a sale without quote, 40.00, then 15.00 refunded
    refunded = engine.submit(PaymentRequest("m-1", "n-2", "bob", "CNY", 40_00, "95",
                                            CashPart(40_00, "wechat"), sale=sale("A", 2, 40_00)))
    paid(engine, refunded.order_id)
    engine.refund(refunded.order_id, "r-1", 15_00)
    wait_for(lambda: engine.get_order(refunded.order_id).refunds[0].status == "succeeded",
             what="refunded")
    # 3: closed unpaid; 4: another shift; 5: another station
    closed = engine.submit(PaymentRequest("m-1", "n-3", "carol", "CNY", 30_00, "95",
                                          CashPart(30_00, "wechat"), sale=sale("A", 3, 30_00)))
    wait_for(lambda: engine.get_order(closed.order_id).state == "paying", what="paying")
    engine.close(closed.order_id)
    settled(engine, closed.order_id, "closed")
    for no, other in (("n-4", sale("B", 1, 50_00)), ("n-5", sale("A", 1, 50_00, "st-2"))):
        other_order = engine.submit(PaymentRequest("m-1", no, "dave", "CNY", 50_00, "95",
                                                   CashPart(50_00, "wechat"), sale=other))
        paid(engine, other_order.order_id)
    return engine


def test_a_shift_report_counts_its_own_orders_from_the_ledger(tmp_path: Path):
    with run_shift(tmp_path / "s.db") as engine:
        report = engine.shift_report("st-1", "A")
    assert report.orders_by_state == {"closed": 1, "succeeded": 2}
    assert report.litres_ml_by_grade == {"95": 12_500 + 5_000}
    (currency, totals), = report.totals.items()
    assert currency == "CNY"
    assert (totals.paid_orders, totals.paid_minor, totals.gross_minor) == (2, 137_50, 140_00)
    assert (totals.discount_minor, totals.discounts_by_rule) == (2_50, {"noon": 2_50})
    # cash in 96.50 + 40.00, less the 15.00 refund's cash part; the red packet 1.00
    assert totals.collected_by_method == {"cash:wechat": 121_50, "voucher:CNY": 1_00}
    assert (totals.refunds, totals.refunded_minor) == (1, 15_00)
    fees = 58 + 24  # 0.6 % of 96.50 and of 40.00, each rounded half up (engine.ledger)
    assert totals.fees_minor == fees
    assert totals.merchant_net_minor + totals.fees_minor + totals.in_transit_minor == 122_50
    assert totals.in_transit_minor == 0


def test_the_command_line_prints_the_same_report_as_json_and_as_a_table(tmp_path: Path,
                                                                          capsys):
    db = tmp_path / "s.db"
    with run_shift(db) as engine:
        expected = engine.shift_report("st-1", "A")
    assert main(["report", "shift", "--db", str(db), "--station", "st-1", "--shift", "A",
                 "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["orders"] == 3 and printed["totals"]["CNY"]["paid_minor"] == 137_50
    assert printed["orders_by_state"] == expected.orders_by_state
    assert main(["report", "shift", "--db", str(db), "--station", "st-1", "--shift", "A"]) == 0
    table = capsys.readouterr().out
    assert "shift A at station st-1: 3 orders closed 1 succeeded 2" in table
    assert "collected cash:wechat" in table and "12150" in table


def test_an_unknown_shift_is_an_empty_report_and_a_missing_database_exits_2(tmp_path: Path,
                                                                           capsys):
    with Engine.open(tmp_path / "e.db", channels=[ScriptedChannel("wechat")]) as engine:
        empty = engine.shift_report("st-9", "Z")
    assert (empty.orders, empty.totals) == (0, {})
    assert main(["report", "shift", "--db", str(tmp_path / "none.db"), "--station", "s",
                 "--shift", "A"]) == 2
    assert "no database" in capsys.readouterr().err


@pytest.mark.parametrize("content", [b"", b"not a database at all", None])
def test_a_file_that_is_no_payengine_database_is_refused_2_and_left_as_it_was(
        tmp_path: Path, capsys, content: bytes | None):
    db = tmp_path / "x.db"
    if content is None:
        db.mkdir()
    else:
        db.write_bytes(content)
    for command in (["report", "shift", "--station", "s", "--shift", "A"], ["show", "o-1"]):
        assert main([*command, "--db", str(db)]) == 2
        assert "payengine" in capsys.readouterr().err
    if content is not None:
        assert db.read_bytes() == content
        assert sorted(p.name for p in tmp_path.iterdir()) == ["x.db"]
