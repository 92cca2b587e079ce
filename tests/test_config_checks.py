"""Settings are input too: a bad OrderPolicy, EngineConfig or Engine.open argument is a
typed ``InvalidRequest`` (not an ``AssertionError`` that ``python -O`` would skip)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from payengine import Engine, EngineConfig, InvalidRequest, OrderPolicy
from tests.helpers import ScriptedChannel


@pytest.mark.parametrize("settings", [
    {"pay_window_ms": 0}, {"pay_window_ms": 1.5}, {"pay_window_ms": True},
    {"hold_grace_ms": 10}, {"query_schedule_ms": ()}, {"query_schedule_ms": (0,)},
    {"query_schedule_ms": [1_000]}, {"refund_query_schedule_ms": (1, -1)},
    {"voucher_retry_schedule_ms": ()}, {"refunds_max": 0}, {"legs_max": 0},
    {"confirm_query_interval_ms": 0}, {"voucher_sentinel_interval_ms": 2 * 3_600_000},
    {"planted_bugs": frozenset({"no-such-bug"})},
])
def test_a_bad_order_policy_is_refused_typed(settings: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest):
        OrderPolicy(**settings)


@pytest.mark.parametrize("settings", [
    {"ask_timeout_s": 0}, {"ask_timeout_s": "5"}, {"live_orders_max": 0},
    {"account_idle_ms": -1}, {"pre_hold_ttl_ms": 0}, {"duplicate_guard_window_ms": -1},
    {"fee_ppm": {"wechat": 2_000_000}}, {"fee_ppm": {"wechat": -1}}, {"fee_ppm": {"": 10}},
    {"fee_ppm": [("wechat", 10)]}, {"planted_bugs": frozenset({"nope"})},
    {"actor_threads": 0}, {"actor_threads": 257}, {"actor_threads": True},
    {"actor_threads": 2.0},
])
def test_a_bad_engine_config_is_refused_typed(settings: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest):
        EngineConfig(**settings)


def test_engine_open_refuses_a_bad_durability_level_and_two_channels_of_one_name(
        tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="synchronous"):
        Engine.open(tmp_path / "a.db", channels=[ScriptedChannel()],  # type: ignore[list-item]
                    synchronous="BOGUS")
    with pytest.raises(InvalidRequest, match="two channels"):
        Engine.open(tmp_path / "b.db",
                    channels=[ScriptedChannel(), ScriptedChannel()])  # type: ignore[list-item]
    assert not (tmp_path / "a.db").exists() and not (tmp_path / "b.db").exists()


def test_a_lower_maximum_pre_hold_ttl_caps_the_default(tmp_path: Path) -> None:
    engine = Engine.open(tmp_path / "c.db", channels=[ScriptedChannel()],  # type: ignore[list-item]
                         config=EngineConfig(pre_hold_ttl_ms_max=60_000))
    try:
        engine.open_account("pts", "POINTS", minor_per_unit=10)
        engine.fund("pts", 10, funding_id="f")
        before = engine.runtime.now_ms()
        hold = engine.pre_hold("pts", 1, hold_id="h")
        assert hold.expires_at_ms is not None
        assert before + 60_000 <= hold.expires_at_ms <= engine.runtime.now_ms() + 60_000
        with pytest.raises(InvalidRequest):
            engine.pre_hold("pts", 1, hold_id="h2", ttl_ms=60_001)
    finally:
        engine.shutdown()


def test_the_defaults_are_valid() -> None:
    assert OrderPolicy().pay_window_ms == 15 * 60 * 1000
    assert EngineConfig().live_orders_max == 200_000  # 100,000 open orders fit
    assert EngineConfig().actor_threads == 8
