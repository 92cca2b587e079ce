"""More of README "Changing an order before it is paid": the duplicate guard, pre-holds,
pre-deducted vouchers, and what a second change does."""

from __future__ import annotations

from pathlib import Path

import pytest

from payengine import (
    CashPart,
    DuplicateSuspected,
    IdempotencyConflict,
    LegMode,
    PaymentRequest,
    VoucherPart,
)
from tests.blackbox_session4.support import open_station
from tests.helpers import wait_for


def order(no: str, total: int = 100_00, vouchers: tuple = (), cash: int | None = None,
          **kw: object) -> PaymentRequest:
    paid = sum(v.amount * (10 if v.account_id.endswith("points") else 1) for v in vouchers)
    return PaymentRequest("station-42", no, "alice", "CNY", total, "95 fuel",
                          CashPart(total - paid if cash is None else cash, "wechat"),
                          vouchers, **kw)  # type: ignore[arg-type]


def test_the_duplicate_guard_does_not_warn_about_the_order_being_replaced(
        tmp_path: Path) -> None:
    engine, _, _ = open_station(tmp_path / "g.db", duplicate_guard_window_ms=60_000)
    try:
        first = engine.submit(order("n-1"))
        second = engine.change_order(first.order_id, order("n-2"))
        assert engine.get_order(first.order_id).state == "closed"
        assert second.merchant_order_no == "n-2"
        with pytest.raises(DuplicateSuspected):          # the guard itself is on
            engine.submit(order("n-3"))
    finally:
        engine.shutdown()


def test_pre_deducted_money_vouchers_are_given_back(tmp_path: Path) -> None:
    engine, _, _ = open_station(tmp_path / "d.db")
    try:
        engine.open_account("alice/phone", "CNY")
        engine.fund("alice/phone", 10_00, funding_id="ph")
        first = engine.submit(order("n-1", vouchers=(
            VoucherPart("alice/phone", 3_00, LegMode.PRE_DEDUCT),)))
        wait_for(lambda: engine.get_order(first.order_id).state == "paying", what="paying")
        assert engine.get_account("alice/phone").available == 7_00
        engine.change_order(first.order_id, order("n-2"))
        wait_for(lambda: engine.get_order(first.order_id).settled, what="first settled")
        assert engine.get_account("alice/phone").available == 10_00
    finally:
        engine.shutdown()


def test_a_second_change_of_the_same_closed_order_submits_the_other_request(
        tmp_path: Path) -> None:
    engine, _, _ = open_station(tmp_path / "s.db")
    try:
        first = engine.submit(order("n-1"))
        second = engine.change_order(first.order_id, order("n-2"))
        third = engine.change_order(first.order_id, order("n-3", total=90_00))
        assert third.order_id != second.order_id
        assert engine.get_order(second.order_id).state in ("accepted", "paying")
    finally:
        engine.shutdown()


def test_change_order_of_the_order_it_created_replaces_it_again(tmp_path: Path) -> None:
    engine, _, _ = open_station(tmp_path / "t.db")
    try:
        first = engine.submit(order("n-1", vouchers=(VoucherPart("alice/points", 20),)))
        second = engine.change_order(first.order_id, order(
            "n-2", vouchers=(VoucherPart("alice/points", 30),)))
        third = engine.change_order(second.order_id, order(
            "n-3", vouchers=(VoucherPart("alice/points", 40),)))
        wait_for(lambda: engine.get_order(third.order_id).state == "paying", what="paying")
        wait_for(lambda: engine.get_order(second.order_id).settled, what="second settled")
        wait_for(lambda: engine.get_order(first.order_id).settled, what="first settled")
        assert engine.get_account("alice/points").held == 40
        assert [engine.get_order(r.order_id).state for r in (first, second)] == [
            "closed", "closed"]
    finally:
        engine.shutdown()


def test_a_pre_held_hold_adopted_by_the_previous_order_is_released_with_it(
        tmp_path: Path) -> None:
    engine, _, _ = open_station(tmp_path / "h.db")
    try:
        hold = engine.pre_hold("alice/points", 20, ttl_ms=60_000)
        first = engine.submit(order("n-1", vouchers=(
            VoucherPart("alice/points", 20, LegMode.PRE_HELD, hold_id=hold.hold_id),)))
        wait_for(lambda: engine.get_order(first.order_id).state == "paying", what="paying")
        engine.change_order(first.order_id, order("n-2"))
        wait_for(lambda: engine.get_order(first.order_id).settled, what="first settled")
        account = engine.get_account("alice/points")
        assert account.held == 0 and account.available == 5_000
    finally:
        engine.shutdown()


def test_cash_only_previous_order_is_closed_at_the_channel(tmp_path: Path) -> None:
    engine, _, wechat = open_station(tmp_path / "c.db")
    try:
        first = engine.submit(order("n-1"))
        wait_for(lambda: engine.get_order(first.order_id).state == "paying", what="paying")
        engine.change_order(first.order_id, order("n-2", cash=100_00))
        wait_for(lambda: wechat.count("close") >= 1, what="the channel's close")
    finally:
        engine.shutdown()


def test_a_request_that_is_the_previous_order_itself_is_refused_before_the_close(
        tmp_path: Path) -> None:
    from payengine import InvalidRequest
    engine, _, _ = open_station(tmp_path / "self.db")
    try:
        request = order("n-1")
        first = engine.submit(request)
        wait_for(lambda: engine.get_order(first.order_id).state == "paying", what="paying")
        with pytest.raises((InvalidRequest, IdempotencyConflict)):
            engine.change_order(first.order_id, request)
        assert engine.get_order(first.order_id).state == "paying"
    finally:
        engine.shutdown()


@pytest.mark.parametrize("case", ["attempt 2 of a number never submitted",
                                  "the number of another order, other parameters"])
def test_a_new_submit_refused_after_the_close_leaves_the_previous_closed(
        tmp_path: Path, case) -> None:
    from payengine import AttemptRefused
    engine, _, _ = open_station(tmp_path / "r.db")
    try:
        engine.submit(order("n-5"))
        first = engine.submit(order("n-1"))
        if case.startswith("attempt"):
            request, error = order("n-6", attempt=2), AttemptRefused
        else:
            request, error = order("n-5", total=50_00), IdempotencyConflict
        with pytest.raises(error):
            engine.change_order(first.order_id, request)
        # a key another order holds with other parameters is refused before the close
        # (README: the request is validated first as a submit would); an attempt whose
        # trade was never submitted only by the submit after it
        state = engine.get_order(first.order_id).state
        assert state == "closed" if case.startswith("attempt") else state != "closed"
    finally:
        engine.shutdown()


@pytest.mark.parametrize("mode", [LegMode.PRE_DEDUCT, LegMode.PRE_HELD])
def test_the_new_order_can_use_the_points_the_previous_one_held(tmp_path: Path, mode) -> None:
    """README: the old order must go "or its points stay locked": the new order, submitted
    in its place in one call, holds the same points."""
    engine, _, _ = open_station(tmp_path / "p.db")
    try:
        engine.open_account("bob/points", "POINTS", minor_per_unit=10)
        engine.fund("bob/points", 100, funding_id="bob-pts")

        def part(points: int) -> VoucherPart:
            if mode is LegMode.PRE_HELD:
                hold = engine.pre_hold("bob/points", points, ttl_ms=60_000)
                return VoucherPart("bob/points", points, LegMode.PRE_HELD, hold_id=hold.hold_id)
            return VoucherPart("bob/points", points)

        def bobs(no: str, total: int, voucher: VoucherPart) -> PaymentRequest:
            return PaymentRequest("station-42", no, "bob", "CNY", total, "95 fuel",
                                  CashPart(total - 10_00, "wechat"), (voucher,))

        first = engine.submit(bobs("n-1", 100_00, part(100)))
        wait_for(lambda: engine.get_order(first.order_id).state == "paying", what="paying")
        if mode is LegMode.PRE_HELD:
            # the user's app cannot pre-hold again before the close: nothing is available
            second = engine.change_order(first.order_id, bobs("n-2", 120_00, VoucherPart(
                "bob/points", 100)))
        else:
            second = engine.change_order(first.order_id, bobs("n-2", 120_00, part(100)))
        state = wait_for(lambda: (s := engine.get_order(second.order_id).state) != "accepted"
                         and s, what="the new order's holds decided")
        assert state == "paying", engine.get_order(second.order_id)
        assert engine.get_account("bob/points").held == 100
    finally:
        engine.shutdown()
