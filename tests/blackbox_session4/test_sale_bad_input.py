"""Bad sales and quote uses on a submit (README: bounds, "ids as everywhere", typed errors
raised before anything is stored)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from payengine import (
    CashPart,
    FuelLine,
    FuelSale,
    InvalidRequest,
    PaymentRequest,
    UnknownOrder,
)
from tests.blackbox_session4.support import (
    open_station,
    quote_request,
    readme_benefits,
    readme_sale,
)

LINE = FuelLine.by_volume("95", 1_000, 10_000)
GOOD = FuelSale("st-1", 1, 1, LINE, terminal_id="t-1", cashier_id="cs-1", shift_id="A")


@pytest.fixture
def station(tmp_path: Path):
    engine, clock, wechat = open_station(tmp_path / "b.db")
    yield engine, clock, wechat
    engine.shutdown()


def with_sale(sale: object) -> PaymentRequest:
    return PaymentRequest("station-42", "n-1", "alice", "CNY", 100_00, "fuel",
                          CashPart(100_00, "wechat"), sale=sale)  # type: ignore[arg-type]


BAD_SALES = {
    "pump True": replace(GOOD, pump=True),
    "pump 1.0": replace(GOOD, pump=1.0),
    "pump 1000": replace(GOOD, pump=1_000),
    "nozzle 100": replace(GOOD, nozzle=100),
    "nozzle False": replace(GOOD, nozzle=False),
    "empty station": replace(GOOD, station_id=""),
    "station with NUL": replace(GOOD, station_id="a\x00"),
    "terminal too long": replace(GOOD, terminal_id="t" * 129),
    "empty cashier": replace(GOOD, cashier_id=""),
    "shift with newline": replace(GOOD, shift_id="A\n"),
    "shift not str": replace(GOOD, shift_id=7),
    "grade empty": replace(GOOD, line=replace(LINE, grade="")),
    "volume float": replace(GOOD, line=replace(LINE, volume_ml=10_000.0)),
    "price bool": replace(GOOD, line=FuelLine("95", True, 10_000, 10)),
    "line inconsistent": replace(GOOD, line=replace(LINE, gross_minor=99_00)),
    "line not a FuelLine": replace(GOOD, line=("95", 1_000, 10_000, 100_00)),
    "not a FuelSale": {"station_id": "st-1"},
}


@pytest.mark.parametrize("case", sorted(BAD_SALES))
def test_a_submit_with_a_bad_sale_is_invalid_request_and_creates_nothing(station,
                                                                         case) -> None:
    engine, _, _ = station
    with pytest.raises(InvalidRequest):
        engine.submit(with_sale(BAD_SALES[case]))
    with pytest.raises(UnknownOrder):
        engine.find_order("station-42", "n-1")


@pytest.mark.parametrize("case", sorted(BAD_SALES))
def test_a_quote_of_a_bad_sale_is_invalid_request(station, case) -> None:
    engine, _, _ = station
    with pytest.raises(InvalidRequest):
        engine.quote("station-42", "alice", BAD_SALES[case])  # type: ignore[arg-type]


def test_by_amount_buying_more_than_the_volume_bound_is_refused(station) -> None:
    engine, _, _ = station
    with pytest.raises(InvalidRequest):
        line = FuelLine.by_amount("95", 1_000, 20_000_01)        # 2,000.001 l
        engine.quote("station-42", "alice", FuelSale("st-1", 1, 1, line))
    engine.quote("station-42", "alice", FuelSale("st-1", 1, 1,
                                                 FuelLine.by_amount("95", 1_000, 20_000_00)))


def test_a_quote_use_that_is_not_a_quote_use_is_invalid_request(station) -> None:
    engine, _, _ = station
    quote = engine.quote("station-42", "alice", readme_sale(), readme_benefits())
    request = quote_request(quote, quote.combinations[0])
    with pytest.raises(InvalidRequest):
        engine.submit(replace(request, quote=(quote.quote_id, "c1")))


def test_a_good_sale_is_accepted_and_kept(station) -> None:
    engine, _, _ = station
    receipt = engine.submit(with_sale(GOOD))
    assert engine.get_order(receipt.order_id).sale.sale == GOOD
