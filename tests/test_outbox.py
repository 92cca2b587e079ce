"""The durable outbox: one event per order state change, committed with the change or not at all."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from payengine import CashPart, Engine, OrderPolicy, OrderState, PaymentRequest
from payengine.engine.order import Transition, build_order
from payengine.persistence import outbox
from payengine.persistence.store import Store
from tests.helpers import (
    ScriptedChannel,
    fuel_request,
    open_engine,
    paid_reply,
    signed_callback,
    wait_for,
)


def cash_request(no: str, merchant_id: str = "station-1", total_minor: int = 500) -> PaymentRequest:
    return PaymentRequest(merchant_id=merchant_id, merchant_order_no=no, user_id="alice",
                          currency="CNY", total_minor=total_minor, title="Fuel",
                          cash=CashPart(total_minor, "wechat"))




def order_transitions(engine: Engine, order_id: str) -> list[tuple[str, str, str, int]]:
    return [(j.from_state, j.to_state, j.cause, j.at_ms) for j in engine.journal(order_id)
            if j.part == "order"]


def test_every_order_state_change_has_exactly_one_outbox_event_and_leg_changes_have_none(
    engine: Engine, channel: ScriptedChannel
) -> None:
    receipt = engine.submit(fuel_request())
    wait_for(lambda: engine.get_order(receipt.order_id).state == "paying", what="paying")
    signed_callback(engine, "wechat", receipt.payment_serial, paid_reply(receipt.payment_serial))
    wait_for(lambda: engine.get_order(receipt.order_id).settled, what="settled")

    events = engine.notifications.events(receipt.order_id)
    journal = engine.journal(receipt.order_id)
    assert any(j.part.startswith("leg:") for j in journal)  # leg changes exist, but no events
    assert [(e.from_state, e.to_state, e.cause, e.at_ms) for e in events] == order_transitions(
        engine, receipt.order_id)
    assert events[0].from_state == "" and events[0].to_state == "accepted"
    assert events[-1].to_state == "succeeded"
    for event in events:
        assert (event.order_id, event.merchant_id, event.merchant_order_no) == (
            receipt.order_id, "station-1", "order-1")
        assert (event.payment_serial, event.total_minor, event.currency) == (
            receipt.payment_serial, 10_000, "CNY")
    assert [e.seq for e in events] == sorted({e.seq for e in events})
    assert [e.order_version for e in events] == sorted(e.order_version for e in events)


def test_event_ids_are_unique_and_stay_the_same_across_reads_and_a_reopen(
    tmp_path: Path, channel: ScriptedChannel
) -> None:
    path = tmp_path / "ids.db"
    engine = open_engine(path, channel)
    try:
        receipts = [engine.submit(cash_request(f"o{i}")) for i in range(4)]
        for r in receipts:
            wait_for(lambda r=r: engine.get_order(r.order_id).state == "paying", what="paying")
        signed_callback(engine, "wechat", receipts[0].payment_serial, paid_reply(receipts[0].payment_serial))
        engine.close(receipts[1].order_id)
        wait_for(lambda: engine.get_order(receipts[0].order_id).settled, what="settled")
        first = engine.notifications.events()
        assert engine.notifications.events() == first
    finally:
        engine.shutdown()
    ids = [e.event_id for e in first]
    assert len(ids) == len(set(ids)) >= 4 * 2 + 2
    for event in first:
        assert event.event_id.startswith(f"{event.order_id}:{event.order_version}:")

    engine = open_engine(path, channel)
    try:
        assert engine.notifications.events()[: len(first)] == first
        # paging by seq gives the same events
        page = engine.notifications.events(after_seq=first[2].seq, limit=3)
        assert page == first[3:6]
    finally:
        engine.shutdown()


# ---------------------------------------------------------------------- atomicity


class Boom(RuntimeError):
    pass


def _failing_after_write(real: Any) -> Any:
    def record(*args: Any, **kwargs: Any) -> None:
        real(*args, **kwargs)  # the event row is written inside the transaction ...
        raise Boom("the transaction fails after the event was written")  # ... then it fails

    return record


def _events(store: Store) -> list[outbox.OutboxEvent]:
    with store._read() as conn:
        return outbox.read_events(conn, 0, 100)


def test_an_order_change_whose_transaction_fails_leaves_no_event_and_no_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(tmp_path / "atomic.db")
    try:
        order = build_order(cash_request("o1"), order_id="ord-1", payment_serial="P1",
                            now_ms=1_000, accounts={}, policy=OrderPolicy())
        real = outbox.record_order_events
        monkeypatch.setattr(outbox, "record_order_events", _failing_after_write(real))
        with pytest.raises(Boom):
            store.insert_order(order, 1_000)
        assert store.load_order("ord-1") is None and _events(store) == []
        assert store.journal("order", "ord-1") == []

        monkeypatch.setattr(outbox, "record_order_events", real)
        assert store.insert_order(order, 1_000) is None
        assert [(e.event_id, e.to_state) for e in _events(store)] == [("ord-1:0:0", "accepted")]

        paying = dataclasses.replace(order, state=OrderState.PAYING, version=1)
        moved = [Transition("order", "accepted", "paying", "cash requested"),
                 Transition("leg:1", "paying", "paying", "not an order event")]
        monkeypatch.setattr(outbox, "record_order_events", _failing_after_write(real))
        with pytest.raises(Boom):
            store.save_order(paying, moved, 2_000)
        stored = store.load_order("ord-1")
        assert stored is not None and stored.state is OrderState.ACCEPTED and stored.version == 0
        assert len(_events(store)) == 1

        monkeypatch.setattr(outbox, "record_order_events", real)
        store.save_order(paying, moved, 2_000)
        assert [(e.event_id, e.from_state, e.to_state, e.at_ms) for e in _events(store)] == [
            ("ord-1:0:0", "", "accepted", 1_000), ("ord-1:1:0", "accepted", "paying", 2_000)]
    finally:
        store.close()


def test_a_losing_duplicate_submit_writes_no_event(engine: Engine) -> None:
    first = engine.submit(cash_request("dup"))
    again = engine.submit(cash_request("dup"))
    assert again == first
    submits = [e for e in engine.notifications.events() if e.from_state == ""]
    assert [e.order_id for e in submits] == [first.order_id]
