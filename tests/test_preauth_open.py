"""``Engine.open`` refuses a channel that unsettled pump pre-authorisations use but that cannot
pre-authorise (``AuthorisationChannelsMissing``): their captures, voids and queries could never
be asked (README "Pump pre-authorisation")."""

from __future__ import annotations

from pathlib import Path

import pytest

from payengine import AuthorisationChannelsMissing, ChannelsMissing, Engine, EngineConfig
from payengine.sim.runtime import SimRuntime
from tests.helpers import ScriptedChannel
from tests.test_preauth import POLICY, Station


def _open_with_plain_wechat(s: Station) -> Engine:
    return Engine.open(s.path, channels=[ScriptedChannel("wechat")], policy=POLICY,
                       runtime=SimRuntime(s.scheduler),
                       config=EngineConfig(duplicate_guard_window_ms=0))


def test_an_open_whose_channel_of_an_unsettled_pre_authorisation_cannot_authorise_is_refused(
        tmp_path: Path) -> None:
    s = Station(tmp_path / "s.db")
    view = s.authorised()
    s.engine.shutdown()
    with pytest.raises(AuthorisationChannelsMissing) as refused:
        _open_with_plain_wechat(s)
    assert refused.value.code == "authorisation_channels_missing"
    assert refused.value.channels == {"wechat": 1}
    assert "AuthorisationChannel" in refused.value.message
    assert isinstance(refused.value, ChannelsMissing)  # the same remedy: open with them
    # nothing started or changed: the engine opens with the pump wallet and goes on
    s.engine = s.open()
    try:
        assert s.order(view.order_id).state == "authorised"
        s.engine.capture(view.order_id, 1_000, capture_id="c")
        s.run_until("settled", lambda: s.order(view.order_id).settled)
        assert s.order(view.order_id).state == "succeeded"
    finally:
        s.engine.shutdown()


def test_settled_pre_authorisations_do_not_stop_an_open_with_a_plain_channel(
        tmp_path: Path) -> None:
    s = Station(tmp_path / "s.db")
    view = s.authorised()
    s.engine.void(view.order_id)
    s.run_until("voided", lambda: s.order(view.order_id).settled)
    s.engine.shutdown()
    engine = _open_with_plain_wechat(s)
    try:
        assert engine.get_order(view.order_id).state == "closed"
    finally:
        engine.shutdown()


def test_a_captured_pre_authorisation_owing_only_a_refund_does_not_stop_an_open_with_a_plain_channel(
        tmp_path: Path) -> None:
    s = Station(tmp_path / "s.db")
    view = s.authorised()
    s.engine.capture(view.order_id, 1_000, capture_id="c")
    s.run_until("captured", lambda: s.order(view.order_id).settled)
    s.wallet.refund_reply = TimeoutError("refund timed out")
    s.engine.refund(view.order_id, "rf-1", 500)
    s.run_for(1_000)
    assert not s.order(view.order_id).settled  # the refund is in flight
    s.engine.shutdown()
    engine = _open_with_plain_wechat(s)
    try:
        assert engine.get_order(view.order_id).state == "succeeded"
    finally:
        engine.shutdown()
