"""Regression tests for the known defects left by the last session (issue 11, defects list).

Each test reproduces one defect and failed before its fix."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from payengine import (
    CashPart,
    ChannelsMissing,
    Engine,
    EngineConfig,
    PaymentRequest,
)
from tests.helpers import (
    SLOW_POLICY,
    ScriptedChannel,
    fuel_request,
    fund_customer,
    open_engine,
    paid_order,
    wait_for,
)

# ------------------------------------------------------------------ 1. a channel gone at reopen


def test_reopening_without_a_channel_unsettled_orders_use_is_refused_naming_it(
        tmp_path: Path) -> None:
    wechat, alipay = ScriptedChannel("wechat"), ScriptedChannel("alipay")
    engine = Engine.open(tmp_path / "pay.db", channels=[wechat, alipay], policy=SLOW_POLICY,
                         config=EngineConfig(duplicate_guard_window_ms=0))
    fund_customer(engine)
    for no in ("a-1", "a-2"):
        engine.submit(fuel_request(no))
    engine.submit(PaymentRequest("station-1", "b-1", "bob", "CNY", 500, "Fuel",
                                 CashPart(500, "alipay")))
    wait_for(lambda: wechat.count("pay") == 2 and alipay.count("pay") == 1, what="paying")
    engine.shutdown()

    with pytest.raises(ChannelsMissing) as refused:
        Engine.open(tmp_path / "pay.db", channels=[ScriptedChannel("alipay")],
                    policy=SLOW_POLICY)
    assert refused.value.code == "channels_missing"
    assert refused.value.channels == {"wechat": 2}
    assert "wechat" in refused.value.message and "2 unsettled" in refused.value.message
    # refused before anything started: the file is free, and nothing moved
    with Engine.open(tmp_path / "pay.db", channels=[wechat, alipay],
                     policy=SLOW_POLICY) as again:
        assert again.unsettled_count() == 3
        assert {again.get_order(o.order_id).state for o in again.store.iter_orders()} == {
            "paying"}


def test_reopening_without_a_channel_only_settled_orders_used_is_allowed(
        tmp_path: Path) -> None:
    wechat = ScriptedChannel("wechat")
    engine = open_engine(tmp_path / "pay.db", wechat)
    fund_customer(engine)
    paid_order(engine)
    engine.shutdown()
    with Engine.open(tmp_path / "pay.db", channels=[ScriptedChannel("alipay")]) as again:
        assert again.unsettled_count() == 0


def test_a_refund_through_a_channel_no_longer_configured_is_refused_and_changes_nothing(
        tmp_path: Path) -> None:
    wechat = ScriptedChannel("wechat")
    engine = open_engine(tmp_path / "pay.db", wechat)
    fund_customer(engine)
    order = paid_order(engine)
    engine.shutdown()
    with Engine.open(tmp_path / "pay.db", channels=[ScriptedChannel("alipay")]) as again:
        with pytest.raises(ChannelsMissing) as refused:
            again.refund(order.order_id, "r-1", 100)
        assert refused.value.channels == {"wechat": 1}
        assert again.get_order(order.order_id).refunds == ()
        assert again.unsettled_count() == 0


@pytest.fixture
def no_threads_left() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    wait_for(lambda: not [t for t in threading.enumerate() if t not in before],
             what="every thread started by the test to end")
