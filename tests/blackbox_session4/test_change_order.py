"""Black-box tests of README "Changing an order before it is paid" (Engine.change_order)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from payengine import (
    CashPart,
    IllegalTransition,
    InvalidAmount,
    InvalidRequest,
    PaymentRequest,
    QuoteExpired,
    UnknownOrder,
    VoucherPart,
)
from tests.blackbox_session4.support import (
    open_station,
    pay,
    quote_request,
    readme_benefits,
    readme_sale,
)
from tests.helpers import wait_for


@pytest.fixture
def station(tmp_path: Path):
    engine, clock, wechat = open_station(tmp_path / "c.db")
    yield engine, clock, wechat
    engine.shutdown()


def order(no: str, total: int = 100_00, points: int = 20, user: str = "alice",
          merchant: str = "station-42", **kw: object) -> PaymentRequest:
    vouchers = (VoucherPart("alice/points", points),) if points else ()
    return PaymentRequest(merchant, no, user, "CNY", total, "95 fuel",
                          CashPart(total - points * 10, "wechat"), vouchers,
                          **kw)  # type: ignore[arg-type]


def placed(engine, receipt) -> None:
    wait_for(lambda: engine.get_order(receipt.order_id).state == "paying", what="holds placed")


def test_change_order_closes_the_previous_order_releases_its_holds_and_submits_the_new(
        station) -> None:
    engine, _, _ = station
    first = engine.submit(order("n-1", points=20))
    placed(engine, first)
    assert engine.get_account("alice/points").held == 20
    second = engine.change_order(first.order_id, order("n-2", total=120_00, points=30))
    assert engine.get_order(first.order_id).state == "closed"
    assert second.order_id != first.order_id
    assert (second.merchant_order_no, second.total_minor) == ("n-2", 120_00)
    placed(engine, second)
    wait_for(lambda: engine.get_order(first.order_id).settled, what="first settled")
    account = engine.get_account("alice/points")
    assert account.held == 30 and account.available == 5_000 - 30


def test_the_same_change_again_returns_the_same_receipt(station) -> None:
    engine, _, _ = station
    first = engine.submit(order("n-1"))
    request = order("n-2", total=90_00)
    receipt = engine.change_order(first.order_id, request)
    assert engine.change_order(first.order_id, request) == receipt


def test_the_new_order_may_be_the_next_attempt_of_the_same_number(station) -> None:
    engine, _, _ = station
    first = engine.submit(order("n-1"))
    second = engine.change_order(first.order_id, order("n-1", attempt=2))
    assert second.attempt == 2
    assert engine.find_order("station-42", "n-1").order_id == second.order_id
    assert engine.find_order("station-42", "n-1", attempt=1).state == "closed"


@pytest.mark.parametrize("who", ["merchant", "user"])
def test_a_request_of_another_merchant_or_user_is_invalid_and_changes_nothing(
        station, who) -> None:
    engine, _, _ = station
    first = engine.submit(order("n-1"))
    placed(engine, first)
    other = order("n-2", merchant="station-43") if who == "merchant" else \
        order("n-2", user="bob", points=0)
    with pytest.raises(InvalidRequest):
        engine.change_order(first.order_id, other)
    assert engine.get_order(first.order_id).state == "paying"
    with pytest.raises(UnknownOrder):
        engine.find_order(other.merchant_id, "n-2")


MALFORMED = {
    "a zero total": (InvalidAmount, dict(total_minor=0)),
    "an empty title": (InvalidRequest, dict(title="")),
    "parts that do not add up": (InvalidRequest, dict(total_minor=99_99)),
    "an unknown currency": (InvalidRequest, dict(currency="XXX")),
    "a cash part through an unknown channel": (InvalidRequest,
                                                dict(cash=CashPart(98_00, "nowhere"))),
}


MALFORMED["one account in two parts"] = (InvalidRequest, dict(
    total_minor=100_00, cash=CashPart(99_60, "wechat"),
    vouchers=(VoucherPart("alice/points", 2), VoucherPart("alice/points", 2))))


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_request_is_refused_before_anything_is_closed(station, case) -> None:
    engine, _, _ = station
    first = engine.submit(order("n-1"))
    placed(engine, first)
    error, change = MALFORMED[case]
    with pytest.raises(error):
        engine.change_order(first.order_id, replace(order("n-2"), **change))
    assert engine.get_order(first.order_id).state == "paying"


def test_a_paid_previous_order_is_illegal_and_nothing_is_submitted(station) -> None:
    engine, _, _ = station
    first = engine.submit(order("n-1"))
    pay(engine, first)
    with pytest.raises(IllegalTransition):
        engine.change_order(first.order_id, order("n-2"))
    assert engine.get_order(first.order_id).state == "succeeded"
    with pytest.raises(UnknownOrder):
        engine.find_order("station-42", "n-2")


def test_a_previous_order_already_closed_is_left_as_it_is(station) -> None:
    engine, _, _ = station
    first = engine.submit(order("n-1"))
    closed = engine.close(first.order_id)
    receipt = engine.change_order(first.order_id, order("n-2"))
    assert engine.get_order(first.order_id).state == "closed"
    assert engine.get_order(first.order_id).cause == closed.cause
    assert engine.get_order(receipt.order_id).merchant_order_no == "n-2"


def test_a_previous_order_already_failed_is_left_as_it_is(station) -> None:
    engine, _, _ = station
    first = engine.submit(order("n-1", total=700_00, points=6_000))  # more than alice has
    wait_for(lambda: engine.get_order(first.order_id).state == "failed", what="failed")
    receipt = engine.change_order(first.order_id, order("n-2"))
    assert engine.get_order(first.order_id).state == "failed"
    assert engine.get_order(receipt.order_id).state in ("accepted", "paying")


def test_an_unknown_previous_order_is_unknown_order(station) -> None:
    engine, _, _ = station
    with pytest.raises(UnknownOrder):
        engine.change_order("no-such-order", order("n-2"))
    with pytest.raises(UnknownOrder):
        engine.find_order("station-42", "n-2")


def test_a_bad_previous_order_id_is_invalid_request(station) -> None:
    engine, _, _ = station
    with pytest.raises(InvalidRequest):
        engine.change_order("", order("n-2"))


def test_a_request_naming_an_expired_quote_is_refused_before_anything_is_closed(
        station) -> None:
    # "validated first, as far as a submit would refuse it without storing anything
    #  (..., the quote it names)"
    engine, clock, _ = station
    first = engine.submit(order("n-1"))
    placed(engine, first)
    quote = engine.quote("station-42", "alice", readme_sale(), readme_benefits())
    clock.clock_ms = quote.expires_at_ms
    request = quote_request(quote, quote.combinations[0], no="n-2")
    with pytest.raises(QuoteExpired):
        engine.change_order(first.order_id, request)
    assert engine.get_order(first.order_id).state == "paying"
    with pytest.raises(UnknownOrder):
        engine.find_order("station-42", "n-2")


def test_a_late_payment_of_the_changed_order_is_refunded(station) -> None:
    from tests.helpers import paid_reply, signed_callback
    engine, _, wechat = station
    first = engine.submit(order("n-1"))
    placed(engine, first)
    engine.change_order(first.order_id, order("n-2"))
    signed_callback(engine, "wechat", first.payment_serial, paid_reply(first.payment_serial))
    wait_for(lambda: wechat.count("refund") == 1, what="the late payment refunded")
    assert engine.get_order(first.order_id).state == "closed"


def test_change_order_with_a_quote_charges_the_quote(station) -> None:
    engine, _, _ = station
    first = engine.submit(order("n-1"))
    quote = engine.quote("station-42", "alice", readme_sale(), readme_benefits())
    receipt = engine.change_order(first.order_id,
                                  quote_request(quote, quote.combinations[0], no="n-2"))
    assert receipt.total_minor == 184_94
    assert engine.get_order(receipt.order_id).sale.quote_id == quote.quote_id
