"""What a reopen keeps: the sale in events of a resumed order, the shift report, quotes."""

from __future__ import annotations

from pathlib import Path

import pytest

from payengine import CashPart, EngineClosed, PaymentRequest
from tests.blackbox_session4.support import (
    open_station,
    pay,
    quote_request,
    readme_benefits,
    readme_sale,
)
from tests.helpers import wait_for

SHIFT = "2026-12-01/A"


def test_events_of_a_resumed_order_still_carry_its_sale_and_split(tmp_path: Path) -> None:
    engine, clock, wechat = open_station(tmp_path / "r.db")
    quote = engine.quote("station-42", "alice", readme_sale(shift_id=SHIFT), readme_benefits())
    receipt = engine.submit(quote_request(quote, quote.combinations[0]))
    wait_for(lambda: engine.get_order(receipt.order_id).state == "paying", what="paying")
    priced = engine.get_order(receipt.order_id).sale
    engine.shutdown()
    seen: list = []
    engine, _, _ = open_station(tmp_path / "r.db", clock.clock_ms, channel=wechat,
                                subscribers={"settlement": seen.append})
    try:
        pay(engine, receipt)
        wait_for(lambda: any(e.to_state == "succeeded" and e.order_id == receipt.order_id
                             for e in list(seen)), what="the success event")
        event = next(e for e in list(seen) if e.to_state == "succeeded")
        assert event.sale == priced
        assert tuple(event.split) == (("cash:wechat", 174_94), ("voucher:alice/points", 10_00))
        report = engine.shift_report("st-1", SHIFT)
        assert report.totals["CNY"].discounts_by_rule == {"noon": 506, "fixed-10": 10_00}
    finally:
        engine.shutdown()


def test_the_shift_report_is_the_same_after_a_reopen(tmp_path: Path) -> None:
    engine, clock, wechat = open_station(tmp_path / "s.db", fee_ppm={"wechat": 6_000})
    quote = engine.quote("station-42", "alice", readme_sale(shift_id=SHIFT), readme_benefits())
    pay(engine, engine.submit(quote_request(quote, quote.combinations[0])))
    before = engine.shift_report("st-1", SHIFT)
    engine.shutdown()
    engine, _, _ = open_station(tmp_path / "s.db", clock.clock_ms, channel=wechat,
                                fee_ppm={"wechat": 6_000})
    try:
        assert engine.shift_report("st-1", SHIFT) == before
    finally:
        engine.shutdown()


def test_the_closed_previous_order_of_a_change_keeps_its_sale_in_its_events(
        tmp_path: Path) -> None:
    seen: list = []
    engine, _, _ = open_station(tmp_path / "c.db", subscribers={"s": seen.append})
    try:
        sale = readme_sale(shift_id=SHIFT)
        first = engine.submit(PaymentRequest("station-42", "n-1", "alice", "CNY", 200_00,
                                             "fuel", CashPart(200_00, "wechat"), sale=sale))
        engine.change_order(first.order_id, PaymentRequest(
            "station-42", "n-2", "alice", "CNY", 200_00, "fuel", CashPart(200_00, "wechat"),
            sale=sale))
        closed = wait_for(lambda: [e for e in list(seen) if e.order_id == first.order_id
                                   and e.to_state == "closed"], what="the close event")
        assert closed[0].sale.sale == sale
        assert tuple(closed[0].split) == (("cash:wechat", 200_00),)
        assert engine.shift_report("st-1", SHIFT).orders_by_state in (
            {"closed": 1, "accepted": 1}, {"closed": 1, "paying": 1})
    finally:
        engine.shutdown()


@pytest.mark.parametrize("call", ["quote", "get_quote", "change_order", "shift_report"])
def test_calls_after_shutdown_raise_engine_closed(tmp_path: Path, call) -> None:
    engine, _, _ = open_station(tmp_path / "x.db")
    quote = engine.quote("station-42", "alice", readme_sale())
    first = engine.submit(PaymentRequest("station-42", "n-1", "alice", "CNY", 10_00, "fuel",
                                         CashPart(10_00, "wechat")))
    engine.shutdown()
    calls = {
        "quote": lambda: engine.quote("station-42", "alice", readme_sale()),
        "get_quote": lambda: engine.get_quote(quote.quote_id),
        "change_order": lambda: engine.change_order(first.order_id, PaymentRequest(
            "station-42", "n-2", "alice", "CNY", 10_00, "fuel", CashPart(10_00, "wechat"))),
        "shift_report": lambda: engine.shift_report("st-1", SHIFT),
    }
    with pytest.raises(EngineClosed):
        calls[call]()
