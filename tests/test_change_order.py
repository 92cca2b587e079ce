"""Changing an unpaid order (issue 12, item 6): ``Engine.change_order`` closes the previous
order, releasing its holds, and submits the new one in one call; a paid previous order, a
foreign or malformed request change nothing."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from payengine import (
    CashPart,
    Engine,
    EngineConfig,
    IllegalTransition,
    InvalidAmount,
    InvalidRequest,
    PaymentError,
    PaymentRequest,
    UnknownOrder,
)
from payengine.engine.order import LegMode, VoucherPart
from tests.helpers import ScriptedChannel, paid_reply, signed_callback, wait_for

FIRST = PaymentRequest("m-1", "pump3-001", "alice", "CNY", 200_00, "95 fuel",
                       CashPart(195_00, "wechat"),
                       (VoucherPart("alice/points", 50, LegMode.PRE_DEDUCT),))
CHANGED = replace(FIRST, merchant_order_no="pump4-001", total_minor=150_00,
                  cash=CashPart(146_00, "wechat"),
                  vouchers=(VoucherPart("alice/points", 40, LegMode.PRE_DEDUCT),))


@pytest.fixture
def engine(tmp_path: Path):
    with Engine.open(tmp_path / "c.db", channels=[ScriptedChannel("wechat")],
                     config=EngineConfig(duplicate_guard_window_ms=0)) as opened:
        opened.open_account("alice/points", "POINTS", minor_per_unit=10)
        opened.fund("alice/points", 60, funding_id="welcome")
        yield opened


def paying(engine: Engine, order_id: str) -> None:
    wait_for(lambda: engine.get_order(order_id).state == "paying", what="paying")


def test_a_change_closes_the_previous_order_and_its_points_pay_the_new_one(engine: Engine):
    first = engine.submit(FIRST)
    paying(engine, first.order_id)
    assert engine.get_account("alice/points").held == 50  # 10 left: 40 would not fit
    changed = engine.change_order(first.order_id, CHANGED)
    assert engine.get_order(first.order_id).state == "closed"
    paying(engine, changed.order_id)
    points = engine.get_account("alice/points")
    assert (points.held, points.available) == (40, 20)
    assert engine.change_order(first.order_id, CHANGED) == changed  # a retry: same receipt


def test_a_paid_order_cannot_be_changed_and_nothing_new_is_submitted(engine: Engine):
    first = engine.submit(FIRST)
    paying(engine, first.order_id)
    serial = engine.get_order(first.order_id).payment_serial
    signed_callback(engine, "wechat", serial, paid_reply(serial))
    wait_for(lambda: engine.get_order(first.order_id).state == "succeeded", what="paid")
    with pytest.raises(IllegalTransition):
        engine.change_order(first.order_id, CHANGED)
    with pytest.raises(UnknownOrder):
        engine.find_order("m-1", "pump4-001")


@pytest.mark.parametrize("change, error", [
    ({"user_id": "bob"}, InvalidRequest), ({"merchant_id": "m-2"}, InvalidRequest),
    ({"total_minor": 0}, InvalidAmount), ({"title": ""}, InvalidRequest),
])
def test_a_foreign_or_malformed_change_leaves_the_previous_order_as_it_was(
        engine: Engine, change: dict[str, object], error: type[Exception]):
    first = engine.submit(FIRST)
    paying(engine, first.order_id)
    with pytest.raises(error):
        engine.change_order(first.order_id, replace(CHANGED, **change))  # type: ignore[arg-type]
    assert engine.get_order(first.order_id).state == "paying"
    assert engine.get_account("alice/points").held == 50


def test_changing_an_order_nobody_has_is_unknown_order(engine: Engine):
    with pytest.raises(UnknownOrder):
        engine.change_order("ord-nope", CHANGED)


@pytest.mark.parametrize("change", [
    {"cash": CashPart(145_00, "wechat")},                       # parts do not add up
    {"cash": CashPart(146_00, "no-such-wallet")},               # an unknown channel
    {"vouchers": (VoucherPart("alice/points", 20, LegMode.PRE_DEDUCT),
                  VoucherPart("alice/points", 20, LegMode.PRE_DEDUCT))},  # one account twice
    {"vouchers": (VoucherPart("nobody/points", 40, LegMode.PRE_DEDUCT),)},  # no such account
])
def test_a_request_a_submit_would_refuse_is_refused_before_anything_is_closed(
        engine: Engine, change: dict[str, object]):
    first = engine.submit(FIRST)
    paying(engine, first.order_id)
    with pytest.raises(PaymentError):
        engine.change_order(first.order_id, replace(CHANGED, **change))  # type: ignore[arg-type]
    assert engine.get_order(first.order_id).state == "paying"
    assert engine.get_account("alice/points").held == 50


def test_the_previous_orders_own_request_is_not_a_change(engine: Engine):
    first = engine.submit(FIRST)
    paying(engine, first.order_id)
    with pytest.raises(InvalidRequest, match="new merchant order number or the next attempt"):
        engine.change_order(first.order_id, FIRST)
    assert engine.get_order(first.order_id).state == "paying"


def test_the_next_attempt_of_the_same_trade_is_a_change(engine: Engine):
    first = engine.submit(FIRST)
    paying(engine, first.order_id)
    second = engine.change_order(first.order_id, replace(FIRST, attempt=2,
                                                         cash=CashPart(195_00, "wechat")))
    assert (second.attempt, engine.get_order(first.order_id).state) == (2, "closed")


def test_an_order_view_says_whose_order_it_is_and_what_for(engine: Engine):
    view = engine.get_order(engine.submit(FIRST).order_id)
    assert (view.user_id, view.title) == ("alice", "95 fuel")
