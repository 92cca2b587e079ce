"""ChannelsMissing: Engine.open refusing a channel list, and a refund through a missing channel."""

from __future__ import annotations

from pathlib import Path

import pytest

from payengine import CashPart, ChannelsMissing, PaymentRequest, UnknownOrder, load_channels
from tests.blackbox_session4b.support import SLOW, Wallet, open_with, paid
from tests.helpers import signed_callback, wait_for


def submit(engine: object, no: str, channel: str) -> object:
    return engine.submit(PaymentRequest(  # type: ignore[attr-defined]
        "station-1", no, "alice", "CNY", 50_00, "Fuel", cash=CashPart(50_00, channel)))


def test_open_without_a_channel_unsettled_orders_still_pay_through_is_channels_missing(
        tmp_path: Path) -> None:
    a, b = Wallet("a"), Wallet("b")
    eng = open_with(tmp_path / "x.db", [a, b])
    r1 = submit(eng, "n-1", "a")
    submit(eng, "n-2", "a")
    submit(eng, "n-3", "b")
    wait_for(lambda: a.count("pay") == 2)
    eng.shutdown()
    pays_before = Wallet("b")
    with pytest.raises(ChannelsMissing) as caught:
        open_with(tmp_path / "x.db", [pays_before])
    error = caught.value
    assert error.code == "channels_missing"
    assert set(error.channels) == {"a"}
    assert "'a'" in str(error)
    assert pays_before.calls == []  # nothing moved: no order resumed
    again = open_with(tmp_path / "x.db", [Wallet("a"), Wallet("b")])
    try:
        assert again.get_order(r1.order_id).state == "paying"  # type: ignore[attr-defined]
    finally:
        again.shutdown()


def test_channels_missing_maps_each_missing_channel_to_how_many_unsettled_orders_use_it(
        tmp_path: Path) -> None:
    a = Wallet("a")
    eng = open_with(tmp_path / "x.db", [a])
    submit(eng, "n-1", "a")
    submit(eng, "n-2", "a")
    wait_for(lambda: a.count("pay") == 2)
    eng.shutdown()
    with pytest.raises(ChannelsMissing) as caught:
        open_with(tmp_path / "x.db", [])
    assert caught.value.channels == {"a": 2}
    assert "'a'" in str(caught.value) and "2" in str(caught.value)


def test_open_without_any_channel_names_every_missing_one(tmp_path: Path) -> None:
    a, b = Wallet("a"), Wallet("b")
    eng = open_with(tmp_path / "x.db", [a, b])
    submit(eng, "n-1", "a")
    submit(eng, "n-2", "b")
    wait_for(lambda: a.count("pay") == 1 and b.count("pay") == 1)
    eng.shutdown()
    with pytest.raises(ChannelsMissing) as caught:
        open_with(tmp_path / "x.db", [])
    assert set(caught.value.channels) == {"a", "b"}


def test_open_without_a_channel_only_settled_orders_used_is_fine(tmp_path: Path) -> None:
    a, b = Wallet("a"), Wallet("b")
    eng = open_with(tmp_path / "x.db", [a, b])
    r = submit(eng, "n-1", "a")
    wait_for(lambda: eng.get_order(r.order_id).state == "paying")  # type: ignore[attr-defined]
    signed_callback(eng, "a", r.payment_serial, paid(r.payment_serial))  # type: ignore[attr-defined]
    wait_for(lambda: eng.get_order(r.order_id).settled)  # type: ignore[attr-defined]
    eng.shutdown()
    eng = open_with(tmp_path / "x.db", [b])
    try:
        assert eng.get_order(r.order_id).state == "succeeded"  # type: ignore[attr-defined]
        with pytest.raises(ChannelsMissing) as caught:
            eng.refund(r.order_id, "rf-1", 10_00)  # type: ignore[attr-defined]
        assert caught.value.code == "channels_missing"
        view = eng.get_order(r.order_id)  # type: ignore[attr-defined]
        assert view.refunds == ()
        assert view.refunded_minor == 0
    finally:
        eng.shutdown()


def test_an_order_with_a_refund_in_flight_needs_its_channel_at_open(tmp_path: Path) -> None:
    from payengine import ChannelReply
    a = Wallet("a")
    a.refund_reply = ChannelReply("SUCCESS", "PROCESSING")
    a.query_refund_reply = ChannelReply("SUCCESS", "PROCESSING")
    eng = open_with(tmp_path / "x.db", [a, Wallet("b")], policy=SLOW)
    r = submit(eng, "n-1", "a")
    wait_for(lambda: eng.get_order(r.order_id).state == "paying")  # type: ignore[attr-defined]
    signed_callback(eng, "a", r.payment_serial, paid(r.payment_serial))  # type: ignore[attr-defined]
    wait_for(lambda: eng.get_order(r.order_id).settled)  # type: ignore[attr-defined]
    eng.refund(r.order_id, "rf-1", 10_00)  # type: ignore[attr-defined]
    wait_for(lambda: a.count("refund") == 1)
    eng.shutdown()
    with pytest.raises(ChannelsMissing) as caught:
        open_with(tmp_path / "x.db", [Wallet("b")])
    assert set(caught.value.channels) == {"a"}


def test_a_channel_kept_configured_with_enabled_false_lets_its_orders_resume(tmp_path: Path
                                                                            ) -> None:
    text = """
[channels.sim-a]
kind = "simulated"
wallet = "wechat"
merchant_no = "m1"
credentials = { key = "simulated-wallet-key-0001" }
simulated = { faults = "none" }
"""
    eng = open_with(tmp_path / "x.db", load_channels(text))
    eng.submit(PaymentRequest("station-1", "n-1", "alice", "CNY", 50_00, "Fuel",
                              cash=CashPart(50_00, "sim-a")))
    eng.shutdown()
    disabled = text.replace('merchant_no = "m1"', 'merchant_no = "m1"\nenabled = false')
    eng = open_with(tmp_path / "x.db", load_channels(disabled))
    try:
        assert eng.find_order("station-1", "n-1").order_id
        with pytest.raises(UnknownOrder):
            eng.find_order("station-1", "n-2")
    finally:
        eng.shutdown()


def test_channels_missing_is_a_payment_error_listed_at_the_top_of_the_package() -> None:
    import payengine
    assert issubclass(payengine.ChannelsMissing, payengine.PaymentError)


def test_an_order_left_for_reconciliation_still_needs_its_channel_at_open(tmp_path: Path
                                                                          ) -> None:
    from payengine import OrderPolicy
    a = Wallet("a")
    quick = OrderPolicy(pay_window_ms=300, query_schedule_ms=(50, 50),
                        refund_query_schedule_ms=(50,))
    a.close_reply = ConnectionError("down")  # type: ignore[assignment]
    a.query_reply = ConnectionError("down")  # type: ignore[assignment]
    eng = open_with(tmp_path / "x.db", [a, Wallet("b")], policy=quick)
    r = submit(eng, "n-1", "a")
    wait_for(lambda: eng.get_order(r.order_id).state  # type: ignore[attr-defined]
             not in ("accepted", "paying"), timeout_s=15, what="left the paying state")
    view = eng.get_order(r.order_id)  # type: ignore[attr-defined]
    eng.shutdown()
    if view.settled:
        pytest.skip(f"the order settled as {view.state}: nothing to resume")
    with pytest.raises(ChannelsMissing):
        open_with(tmp_path / "x.db", [Wallet("b")], policy=quick)
