"""What reopening does to holds: stale ones expire, ones being confirmed are kept."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from payengine.engine.order import (
    AccountUnit,
    CashPart,
    LegStatus,
    OrderPolicy,
    OrderState,
    PaymentRequest,
    Transition,
    VoucherPart,
    build_order,
)
from payengine.engine.voucher import Fence, FenceKind, FenceStatus, VoucherAccount
from payengine.persistence.store import Store
from tests.helpers import ScriptedChannel, open_engine, wait_for


def test_a_stale_pre_hold_is_expired_when_the_engine_reopens(tmp_path: Path) -> None:
    path = tmp_path / "pay.db"
    engine = open_engine(path, ScriptedChannel())
    engine.open_account("alice/points", "POINTS", minor_per_unit=10)
    engine.fund("alice/points", 100, funding_id="f")
    hold = engine.pre_hold("alice/points", 40, ttl_ms=150)
    engine.shutdown()  # down before the hold falls due
    time.sleep(0.3)
    engine = open_engine(path, ScriptedChannel())
    try:
        wait_for(lambda: engine.get_hold("alice/points", hold.hold_id).status == "expired")
        account = engine.get_account("alice/points")
        assert (account.available, account.held) == (100, 0)
    finally:
        engine.shutdown()


def test_a_hold_whose_order_decided_success_survives_an_outage_past_its_expiry(
    tmp_path: Path,
) -> None:
    """The crash came after the order committed 'confirming' but before the account saw the
    Confirm, and the engine stayed down past the hold's expiry. Expiring the hold would take
    the voucher back from a payment that went through; the reopen must confirm it instead."""
    path = tmp_path / "pay.db"
    store = Store(path)
    now = int(time.time() * 1000)
    account = store.create_account(VoucherAccount("alice/points", "POINTS", 10), now - 10_000)
    funded = VoucherAccount("alice/points", "POINTS", 10, 100, 80, 20, 0)
    order = build_order(
        PaymentRequest("station-1", "crashed-1", "alice", "CNY", 1_000, "Fuel",
                       CashPart(800, "wechat"), (VoucherPart("alice/points", 20),)),
        order_id="ord-1", payment_serial="P1", now_ms=now - 10_000,
        accounts={"alice/points": AccountUnit("POINTS", 10)}, policy=OrderPolicy())
    fence = order.fence_of(order.legs[1])
    store.insert_order(order, now - 10_000)
    decided = replace(order, state=OrderState.SUCCEEDED, cause="paid (callback)", version=1,
                      legs=(replace(order.legs[0], status=LegStatus.PAID),
                            replace(order.legs[1], status=LegStatus.CONFIRMING)))
    store.save_order(decided, [Transition("order", "paying", "succeeded", "paid")], now - 9_000)
    store.save_account(account, funded, [Fence(fence, "alice/points", FenceKind.HOLD,
                                               FenceStatus.PENDING, 20, "ord-1", now - 5_000,
                                               now - 10_000)],
                       [], now - 10_000)
    store.close()

    engine = open_engine(path, ScriptedChannel())
    try:
        wait_for(lambda: engine.get_order("ord-1").settled, what="order settled")
        assert engine.get_order("ord-1").legs[1].status == "confirmed"
        points = engine.get_account("alice/points")
        assert (points.funded, points.available, points.held, points.spent) == (100, 80, 0, 20)
    finally:
        engine.shutdown()
    reader = Store(path, exclusive=False)
    try:
        posted = reader.load_fence("alice/points", fence)
        assert posted is not None and posted.status is FenceStatus.POSTED
    finally:
        reader.close()
