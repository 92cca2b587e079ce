"""What the wallet needs, and what the payer is shown: PayDetails and Prepay."""

from __future__ import annotations

import contextlib
import dataclasses
import threading

import pytest

from payengine import (
    ChannelNotification,
    ChannelReply,
    EngineConfig,
    IdempotencyConflict,
    InvalidRequest,
    NotificationKind,
    OrderPolicy,
    PayDetails,
    PayScenario,
    Prepay,
    UnknownOrder,
)

from .support import WAITING, FourArgChannel, ScriptedChannel, fuel, uniq, wait_for

SLOW = OrderPolicy(pay_window_ms=60_000, query_schedule_ms=(200, 200, 200, 200, 200, 200, 200, 200))


def _engine(world, channel=None, **kw):
    channel = channel or ScriptedChannel("wechat")
    return world.open([channel], policy=kw.pop("policy", SLOW), **kw), channel


def test_scenario_values() -> None:
    # | `native` (default) | ... | `jsapi` | ... | `barcode` | ... | `app` | ... | `h5` |
    # | `withhold` | (made by Engine.withhold only) |
    assert [s.value for s in PayScenario] == ["native", "jsapi", "barcode", "app", "h5",
                                              "withhold"]
    assert PayDetails().scenario is PayScenario.NATIVE


BAD_DETAILS = [
    # "a scenario's required field present"
    (PayDetails(PayScenario.JSAPI), "payer_id"),
    (PayDetails(PayScenario.BARCODE), "auth_code"),
    (PayDetails(PayScenario.H5), "client_ip"),
    # "`auth_code` is 10 to 32 digits"
    (PayDetails(PayScenario.BARCODE, auth_code="123456789"), "auth_code"),
    (PayDetails(PayScenario.BARCODE, auth_code="1" * 33), "auth_code"),
    (PayDetails(PayScenario.BARCODE, auth_code="13467007045764711a"), "auth_code"),
    (PayDetails(PayScenario.BARCODE, auth_code="\uff11" * 12), "auth_code"),
    # "`client_ip` an IPv4 or IPv6 address"
    (PayDetails(PayScenario.H5, client_ip="300.1.2.3"), "client_ip"),
    (PayDetails(PayScenario.H5, client_ip="example.com"), "client_ip"),
    # "`notify_url` a URL with a scheme, at most 512 characters, no spaces"
    (PayDetails(notify_url="pay.example.com/notify"), "notify_url"),
    (PayDetails(notify_url="https://pay.example.com/a b"), "notify_url"),
    (PayDetails(notify_url="https://pay.example.com/" + "a" * 489), "notify_url"),
    # "`payer_id` and `device_id` are ids"
    (PayDetails(PayScenario.JSAPI, payer_id=""), "payer_id"),
    (PayDetails(PayScenario.JSAPI, payer_id="o" * 129), "payer_id"),
    (PayDetails(device_id="pump\n3"), "device_id"),
    (PayDetails(device_id=""), "device_id"),
]


@pytest.mark.parametrize(("details", "field"), BAD_DETAILS)
def test_bad_details_refused_naming_field_nothing_created(world, details, field) -> None:
    # "Checked at submit, each a typed `InvalidRequest` naming the field, nothing created"
    engine, channel = _engine(world)
    no = uniq()
    with pytest.raises(InvalidRequest) as info:
        engine.submit(fuel(no, details=details))
    assert field in str(info.value)
    with pytest.raises(UnknownOrder):
        engine.find_order("station-42", no)
    assert channel.pay_calls == []


GOOD_DETAILS = [
    PayDetails(PayScenario.BARCODE, auth_code="1" * 10),
    PayDetails(PayScenario.BARCODE, auth_code="134670070457647112", device_id="pump-3"),
    PayDetails(PayScenario.BARCODE, auth_code="9" * 32),
    PayDetails(PayScenario.H5, client_ip="2001:db8::1"),
    PayDetails(PayScenario.H5, client_ip="192.168.0.1"),
    PayDetails(PayScenario.JSAPI, payer_id="oUpF8uMuAJO_M2pxb1Q9zNjWeS6o"),
    PayDetails(PayScenario.APP),
    PayDetails(notify_url="https://pay.example.com/" + "a" * 488),  # exactly 512
]


@pytest.mark.parametrize("details", GOOD_DETAILS)
def test_good_details_reach_every_pay(world, details) -> None:
    # "are given to `Channel.pay(..., details=details)`"
    engine, channel = _engine(world)
    receipt = engine.submit(fuel(details=details))
    calls = wait_for(lambda: channel.pays_of(receipt.payment_serial), "pay")
    assert calls[0][4] == details


def test_details_are_part_of_fingerprint(world) -> None:
    # "The details are part of the idempotency fingerprint (a retry with other details is
    #  `IdempotencyConflict`"
    engine, _ = _engine(world)
    request = fuel(details=PayDetails(PayScenario.BARCODE, auth_code="134670070457647112"))
    receipt = engine.submit(request)
    assert engine.submit(request) == receipt
    other = dataclasses.replace(request, cash=dataclasses.replace(
        request.cash, details=PayDetails(PayScenario.BARCODE, auth_code="134670070457647113")))
    with pytest.raises(IdempotencyConflict):
        engine.submit(other)
    without = dataclasses.replace(request, cash=dataclasses.replace(request.cash, details=None))
    with pytest.raises(IdempotencyConflict):
        engine.submit(without)


def test_details_survive_a_restart_and_go_with_a_resent_pay(world) -> None:
    # "every pay of the serial, including one re-sent after a restart, carries the same"
    gate = threading.Event()
    first = ScriptedChannel("wechat")

    def stuck(serial, amount):
        gate.wait(10)
        return WAITING

    first.pay_reply = stuck
    engine, _ = _engine(world, first, db="restart.db")
    details = PayDetails(PayScenario.JSAPI, payer_id="openid-1", device_id="pump-3")
    receipt = engine.submit(fuel(details=details))
    wait_for(lambda: first.pays_of(receipt.payment_serial), "first pay")
    engine.abandon()
    gate.set()
    second = ScriptedChannel("wechat")
    world.open([second], policy=SLOW, db="restart.db")
    calls = wait_for(lambda: second.pays_of(receipt.payment_serial), "re-sent pay")
    assert all(c[4] == details for c in calls)
    assert first.pays_of(receipt.payment_serial)[0][4] == details


def test_four_argument_pay_still_works_without_details(world) -> None:
    # "A channel whose `pay` takes only four arguments still works: it is called without details"
    engine, channel = _engine(world, FourArgChannel("wechat"))
    receipt = engine.submit(fuel())
    calls = wait_for(lambda: channel.pays_of(receipt.payment_serial), "pay")
    assert calls[0][4] == "NO-DETAILS-PARAM"


def test_four_argument_pay_refuses_request_with_details(world) -> None:
    # "a request with details for it is refused (`InvalidRequest`, "takes no pay details")."
    engine, _ = _engine(world, FourArgChannel("wechat"))
    no = uniq()
    with pytest.raises(InvalidRequest, match="takes no pay details"):
        engine.submit(fuel(no, details=PayDetails(PayScenario.APP)))
    with pytest.raises(UnknownOrder):
        engine.find_order("station-42", no)


# --- Prepay -------------------------------------------------------------------------------


def test_prepay_none_until_wallet_answered(world) -> None:
    # "view.prepay          # None until the wallet answered the pay with one"
    gate = threading.Event()
    channel = ScriptedChannel("wechat")

    def slow(serial, amount):
        gate.wait(10)
        return ChannelReply("SUCCESS", "USERPAYING", prepay=Prepay(user_action="enter_password"))

    channel.pay_reply = slow
    engine, _ = _engine(world, channel)
    receipt = engine.submit(fuel(details=PayDetails(PayScenario.BARCODE, auth_code="134670070457647112")))
    wait_for(lambda: channel.pays_of(receipt.payment_serial), "pay")
    assert engine.get_order(receipt.order_id).prepay is None
    gate.set()
    view = wait_for(lambda: (v := engine.get_order(receipt.order_id)).prepay and v, "prepay")
    assert view.prepay == Prepay(user_action="enter_password")


def test_prepay_from_pay_shown_then_hidden_once_paid(world) -> None:
    # "`OrderView.prepay` shows it only then (`None` once paid, failed or closed)"
    channel = ScriptedChannel("wechat")
    channel.pay_reply = lambda s, a: ChannelReply("SUCCESS", "NOTPAY",
                                                  prepay=Prepay(code_url="weixin://wxpay/bizpayurl?pr=abc"))
    paid: set[str] = set()
    channel.query_reply = lambda s: (ChannelReply("SUCCESS", "SUCCESS", "T-" + s, 100_00, "CNY")
                                     if s in paid else ChannelReply("SUCCESS", "NOTPAY"))
    engine, _ = _engine(world, channel)
    receipt = engine.submit(fuel())
    view = wait_for(lambda: (v := engine.get_order(receipt.order_id)).prepay and v, "prepay")
    assert view.prepay.code_url == "weixin://wxpay/bizpayurl?pr=abc"
    assert view.state == "paying"
    paid.add(receipt.payment_serial)
    view = wait_for(lambda: (v := engine.get_order(receipt.order_id)).state == "succeeded" and v, "paid")
    assert view.prepay is None


def test_prepay_newest_from_query_kept(world) -> None:
    # "(or from `query` while the payer has not paid) ... the newest one is kept"
    channel = ScriptedChannel("wechat")
    channel.pay_reply = lambda s, a: ChannelReply("SUCCESS", "NOTPAY", prepay=Prepay(prepay_id="wx-first"))
    second = Prepay(prepay_id="wx-second")
    channel.query_reply = lambda s: ChannelReply("SUCCESS", "USERPAYING", prepay=second)
    engine, _ = _engine(world, channel)
    receipt = engine.submit(fuel())
    wait_for(lambda: channel.query_calls, "a query")
    view = wait_for(lambda: (v := engine.get_order(receipt.order_id)).prepay
                    and v.prepay.prepay_id == "wx-second" and v, "newest prepay")
    assert view.prepay == Prepay(prepay_id="wx-second")


def test_prepay_hidden_once_closed(world) -> None:
    # "`None` once paid, failed or closed"
    channel = ScriptedChannel("wechat")
    channel.pay_reply = lambda s, a: ChannelReply("SUCCESS", "NOTPAY", prepay=Prepay(prepay_id="wx-1"))
    channel.query_reply = lambda s: ChannelReply("SUCCESS", "NOTPAY")
    engine, _ = _engine(world, channel)
    receipt = engine.submit(fuel())
    wait_for(lambda: engine.get_order(receipt.order_id).prepay, "prepay")
    view = engine.close(receipt.order_id)
    view = wait_for(lambda: (v := engine.get_order(receipt.order_id)).state == "closed" and v, "closed")
    assert view.prepay is None


def test_prepay_hidden_once_failed(world) -> None:
    channel = ScriptedChannel("wechat")
    channel.pay_reply = lambda s, a: ChannelReply("SUCCESS", "NOTPAY", prepay=Prepay(prepay_id="wx-1"))
    channel.query_reply = lambda s: ChannelReply("SUCCESS", "PAYERROR")
    engine, _ = _engine(world, channel)
    receipt = engine.submit(fuel())
    view = wait_for(lambda: (v := engine.get_order(receipt.order_id)).state == "failed" and v, "failed")
    assert view.prepay is None


@pytest.mark.parametrize("bad", [
    Prepay(user_action="x" * 65),
    Prepay(user_action=""),
    Prepay(code_url="not a url"),
    Prepay(deeplink="weixin//nothing"),
    Prepay(prepay_id="wx\n1"),
])
def test_bad_prepay_is_processing_nothing_kept(world, bad) -> None:
    # "A reply whose prepay does not check is treated like any malformed reply: "processing,
    #  query it", nothing kept."
    channel = ScriptedChannel("wechat")
    channel.pay_reply = lambda s, a: ChannelReply("SUCCESS", "NOTPAY", prepay=bad)
    channel.query_reply = lambda s: ChannelReply("SUCCESS", "NOTPAY")
    engine, _ = _engine(world, channel)
    receipt = engine.submit(fuel())
    wait_for(lambda: channel.query_calls, "queried")
    view = engine.get_order(receipt.order_id)
    assert view.prepay is None
    assert view.state == "paying"


def test_prepay_user_action_64_chars_kept(world) -> None:
    # "`user_action` a short text (1..64 characters"
    channel = ScriptedChannel("wechat")
    longest = Prepay(user_action="p" * 64)
    channel.pay_reply = lambda s, a: ChannelReply("SUCCESS", "USERPAYING", prepay=longest)
    engine, _ = _engine(world, channel)
    receipt = engine.submit(fuel())
    view = wait_for(lambda: (v := engine.get_order(receipt.order_id)).prepay and v, "prepay")
    assert view.prepay.user_action == "p" * 64


def test_notification_never_sets_prepay(world) -> None:
    # "Only an answer to the engine's own call (pay, query) sets it, never a notification"
    channel = ScriptedChannel("wechat")
    engine, _ = _engine(world, channel)
    receipt = engine.submit(fuel())
    wait_for(lambda: channel.pays_of(receipt.payment_serial), "pay")
    note = ChannelNotification(NotificationKind.PAYMENT, receipt.payment_serial,
                               ChannelReply("SUCCESS", "USERPAYING", prepay=Prepay(prepay_id="wx-forged")))
    body, headers = channel.notifications.sign(note)
    with contextlib.suppress(Exception):
        engine.handle_notification("wechat", body, headers)
    assert engine.get_order(receipt.order_id).prepay is None


def test_default_config_is_fine(world) -> None:
    # sanity: an EngineConfig with defaults opens with a scripted channel
    engine, _ = _engine(world, config=EngineConfig())
    assert engine.get_order is not None


@pytest.mark.parametrize("details", [
    {"scenario": "native"},
    PayDetails(scenario="jsapi", payer_id="x"),   # type: ignore[arg-type]
    PayDetails(scenario="bogus"),                  # type: ignore[arg-type]
])
def test_details_must_be_pay_details(world, details) -> None:
    # "`cash` is a `CashPart` (its `details` `None` or a `PayDetails`...)": otherwise `InvalidRequest`
    engine, _ = _engine(world)
    with pytest.raises(InvalidRequest):
        engine.submit(fuel(details=details))


def test_prepay_not_a_prepay_is_processing(world) -> None:
    channel = ScriptedChannel("wechat")
    channel.pay_reply = lambda s, a: ChannelReply("SUCCESS", "NOTPAY", prepay={"prepay_id": "x"})
    engine, _ = _engine(world, channel)
    receipt = engine.submit(fuel())
    wait_for(lambda: channel.query_calls.count(receipt.payment_serial) >= 1, "queried")
    view = engine.get_order(receipt.order_id)
    assert view.prepay is None and view.state == "paying"


def test_prepay_kept_when_query_has_none(world) -> None:
    # "the newest one is kept while the cash leg is `paying` and the order is not terminal"
    channel = ScriptedChannel("wechat")
    channel.pay_reply = lambda s, a: ChannelReply("SUCCESS", "NOTPAY", prepay=Prepay(prepay_id="wx-A"))
    channel.query_reply = lambda s: ChannelReply("SUCCESS", "NOTPAY")
    engine, _ = _engine(world, channel)
    receipt = engine.submit(fuel())
    wait_for(lambda: engine.get_order(receipt.order_id).prepay, "prepay")
    wait_for(lambda: channel.query_calls.count(receipt.payment_serial) >= 2, "queried twice")
    assert engine.get_order(receipt.order_id).prepay == Prepay(prepay_id="wx-A")
