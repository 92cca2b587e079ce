"""Admission: above capacity a submit is refused at once with ``Overloaded``, nothing created;
orders already taken go on (actors/admission.py)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from payengine import EngineConfig, InvalidRequest, Overloaded, UnknownOrder
from payengine.actors.admission import Admission
from tests.helpers import (
    PAID,
    ScriptedChannel,
    fuel_request,
    fund_customer,
    open_engine,
    signed_callback,
    wait_for,
)


def _config(**bounds: int) -> EngineConfig:
    return EngineConfig(ask_timeout_s=5.0, duplicate_guard_window_ms=0, **bounds)


def test_a_submit_behind_a_long_writer_queue_is_refused_at_once_and_creates_nothing(
        tmp_path: Path) -> None:
    engine = open_engine(tmp_path / "a.db", ScriptedChannel(), config=_config(
        writer_backlog_max=4))
    try:
        fund_customer(engine)
        writer = engine.store._writer
        writer._waiting += 5  # five writers waiting for the database: beyond the bound
        try:
            started = time.monotonic()
            with pytest.raises(Overloaded, match="writers of the database queued"):
                engine.submit(fuel_request("o-1"))
            assert time.monotonic() - started < 0.5
        finally:
            writer._waiting -= 5
        with pytest.raises(UnknownOrder):
            engine.find_order("station-1", "o-1")
        assert engine.admission_stats.refused_backlog == 1
        receipt = engine.submit(fuel_request("o-1"))  # retried once the queue drained
        assert engine.find_order("station-1", "o-1").order_id == receipt.order_id
    finally:
        engine.shutdown()


def test_a_submit_refused_for_actor_backlog_leaves_accepted_orders_to_finish(
        tmp_path: Path) -> None:
    channel = ScriptedChannel()
    engine = open_engine(tmp_path / "a.db", channel, config=_config(actor_backlog_max=1))
    try:
        fund_customer(engine)
        first = engine.submit(fuel_request("o-1"))
        directory = engine._ctx.directory
        directory._told += 10  # the actors are ten messages behind
        try:
            with pytest.raises(Overloaded, match="actor messages queued"):
                engine.submit(fuel_request("o-2"))
        finally:
            directory._told -= 10
        wait_for(lambda: engine.get_order(first.order_id).state == "paying", what="paying")
        signed_callback(engine, "wechat", first.payment_serial, PAID)
        wait_for(lambda: engine.get_order(first.order_id).state == "succeeded",
                 what="the accepted order finished")
        with pytest.raises(UnknownOrder):
            engine.find_order("station-1", "o-2")
    finally:
        engine.shutdown()


def test_the_actor_backlog_returns_to_zero_when_every_message_was_handled(
        tmp_path: Path) -> None:
    engine = open_engine(tmp_path / "a.db", ScriptedChannel())
    try:
        fund_customer(engine, red_packet=10_000, points=10_000, phone=10_000)
        receipts = [engine.submit(fuel_request(f"o-{n}")) for n in range(5)]
        wait_for(lambda: all(engine.get_order(r.order_id).state == "paying" for r in receipts),
                 what="every order paying")
        wait_for(lambda: engine._ctx.directory.backlog == 0, what="no backlog")
    finally:
        engine.shutdown()


def test_when_every_slot_is_busy_a_submit_waits_no_longer_than_its_bound() -> None:
    admission = Admission(submits_in_flight_max=1, wait_ms=20, backlogs={})
    inside, leave = threading.Event(), threading.Event()

    def hold_the_slot() -> None:
        with admission.admit():
            inside.set()
            leave.wait(5)

    holder = threading.Thread(target=hold_the_slot)
    holder.start()
    try:
        assert inside.wait(5)
        started = time.monotonic()
        with pytest.raises(Overloaded, match="every submit slot is busy"), admission.admit():
            pass
        waited_s = time.monotonic() - started
        assert 0.015 <= waited_s < 1.0
    finally:
        leave.set()
        holder.join(5)
    with admission.admit():  # the slot is free again
        pass
    assert (admission.stats.admitted, admission.stats.refused_busy) == (2, 1)


@pytest.mark.parametrize("setting", ["submits_in_flight_max", "writer_backlog_max",
                                     "actor_backlog_max"])
def test_admission_bounds_are_checked_settings(setting: str) -> None:
    with pytest.raises(InvalidRequest, match=setting):
        EngineConfig(**{setting: 0})
