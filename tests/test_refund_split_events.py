"""Refund events say how the refund gives back, by method (``OutboxEvent.refund_split``):
what an invoice consumer reverses and membership takes back, beside the order's ``split``."""

from __future__ import annotations

import json
from pathlib import Path

from payengine import Engine, EngineConfig
from payengine.persistence.outbox import REFUND_STATE_CHANGED, OutboxEvent
from tests.helpers import (
    SLOW_POLICY,
    ScriptedChannel,
    fund_customer,
    paid_order,
    wait_for,
)


def test_a_partial_refund_s_events_carry_its_own_split_and_order_events_none(
        tmp_path: Path) -> None:
    seen: list[OutboxEvent] = []
    channel = ScriptedChannel("wechat")
    channel.refund_reply = channel.refund_query_reply  # the wallet refunds at once
    engine = Engine.open(tmp_path / "e.db", channels=[channel], policy=SLOW_POLICY,
                         config=EngineConfig(duplicate_guard_window_ms=0),
                         subscribers={"invoice": seen.append})
    with engine:
        fund_customer(engine)
        order = paid_order(engine)
        engine.refund(order.order_id, "r-1", 9_650)
        wait_for(lambda: any(e.event_type == REFUND_STATE_CHANGED and e.to_state == "succeeded"
                             for e in seen), what="the refund's success")
    refunds = [e for e in seen if e.event_type == REFUND_STATE_CHANGED]
    assert [e.to_state for e in refunds] == ["refunding", "succeeded"]
    for event in refunds:
        assert event.refund_split == (("cash:wechat", 9_600), ("voucher:alice/red-packet", 50))
        assert event.split == (("cash:wechat", 9_600), ("voucher:alice/red-packet", 100),
                               ("voucher:alice/points", 200), ("voucher:alice/phone", 100))
    assert all(e.refund_split == () for e in seen if e.event_type != REFUND_STATE_CHANGED)
    payload = json.loads(json.dumps(refunds[-1].payload()))
    assert payload["refund_split"] == [["cash:wechat", 9_600], ["voucher:alice/red-packet", 50]]
