"""The user-dimension duplicate guard (R-DUP): the same user, the same amount, within the
window (60 s by default) -> the submit answers with a warning the caller must confirm."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import pytest

from payengine import DuplicateSuspected, Engine, EngineConfig
from payengine.engine.order import OrderState, suspected_duplicates
from tests.helpers import ScriptedChannel, fuel_request, fund_customer, open_engine, wait_for
from tests.test_engine_order import T0, make_order


def guarded(tmp_path: Path, channel: ScriptedChannel, window_ms: int = 60_000) -> Engine:
    return open_engine(tmp_path / "pay.db", channel, config=EngineConfig(
        ask_timeout_s=5.0, duplicate_guard_window_ms=window_ms))


def test_the_same_user_and_amount_within_the_window_is_warned_and_nothing_is_created(
    tmp_path: Path
) -> None:
    engine = guarded(tmp_path, ScriptedChannel())
    try:
        fund_customer(engine)
        first = engine.submit(fuel_request("pump-1"))
        with pytest.raises(DuplicateSuspected, match="confirm_duplicate=True") as warned:
            engine.submit(fuel_request("pump-2"))
        assert warned.value.order_ids == (first.order_id,)
        assert warned.value.code == "duplicate_suspected"
        assert engine.store.order_id_for_merchant("station-1", "pump-2") is None
        # the user says "pay anyway"
        second = engine.submit(replace(fuel_request("pump-2"), confirm_duplicate=True))
        assert second.order_id != first.order_id
        # a retry of an accepted submit is not new: the same receipt, never a warning
        assert engine.submit(fuel_request("pump-2")) == second
        assert engine.submit(fuel_request("pump-1")) == first
    finally:
        engine.shutdown()


def test_another_amount_another_user_or_a_failed_order_is_not_warned(tmp_path: Path) -> None:
    engine = guarded(tmp_path, ScriptedChannel())
    try:
        fund_customer(engine)
        fund_customer(engine, who="bob")
        first = engine.submit(fuel_request("pump-1"))
        engine.submit(fuel_request("bob-1", who="bob"))
        other_amount = fuel_request("pump-2")
        other_amount = replace(other_amount, total_minor=10_100,
                               cash=replace(other_amount.cash, amount_minor=9_700))
        engine.submit(other_amount)
        wait_for(lambda: engine.get_order(first.order_id).state == "paying", what="paying")
        engine.close(first.order_id)  # closed: the user may try again in good faith
        engine.submit(fuel_request("pump-3"))
    finally:
        engine.shutdown()


def test_after_the_window_the_same_amount_is_not_warned(tmp_path: Path) -> None:
    engine = guarded(tmp_path, ScriptedChannel(), window_ms=50)
    try:
        fund_customer(engine)
        engine.submit(fuel_request("pump-1"))
        time.sleep(0.1)
        engine.submit(fuel_request("pump-2"))
    finally:
        engine.shutdown()


def test_the_guard_in_the_core_looks_at_user_amount_currency_state_and_time() -> None:
    request = replace(fuel_request("new"), user_id="u1", merchant_id="m1", total_minor=10_000)
    base = replace(make_order("cash"), created_at_ms=T0, state=OrderState.PAYING)
    assert suspected_duplicates(request, [base], now_ms=T0 + 1_000, window_ms=60_000) == [base]
    for other in (replace(base, user_id="u2"), replace(base, total_minor=9_999),
                  replace(base, currency="USD"), replace(base, state=OrderState.FAILED),
                  replace(base, state=OrderState.CLOSED),
                  replace(base, merchant_id="m1", merchant_order_no="new"),
                  replace(base, created_at_ms=T0 - 61_000)):
        assert suspected_duplicates(request, [other], now_ms=T0 + 1_000, window_ms=60_000) == []
    confirmed = replace(request, confirm_duplicate=True)
    assert suspected_duplicates(confirmed, [base], now_ms=T0 + 1_000, window_ms=60_000) == []
    assert confirmed.fingerprint() == request.fingerprint()

