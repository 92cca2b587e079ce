"""The generic HTTP adapter, configured by the README's file, driving a scripted wallet on
loopback through a real engine: pay with its prepay, a verified notification, queries,
close, refund; two merchant numbers isolated while one hangs; replies that are not results."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from payengine import (
    CashPart,
    ChannelReply,
    Engine,
    HttpChannel,
    NotificationRejected,
    OrderPolicy,
    PayDetails,
    PaymentRequest,
    PayScenario,
    load_channels,
)
from payengine.actors.adapters import ChannelHttpError, ReplyError, parse_config
from payengine.actors.adapters.http import ReplyTooLarge, http_call
from payengine.actors.adapters.mapping import OperationNotConfigured
from tests.channel_configs import KEY_1, KEY_2, MERCHANT_1, MERCHANT_2, readme_toml_at
from tests.helpers import wait_for
from tests.wallet_server import ScriptedWallet, pairs_sign, serve

FAST = OrderPolicy(pay_window_ms=60_000, query_schedule_ms=(100, 200, 400, 800),
                   refund_query_schedule_ms=(100, 200, 400, 800))


@pytest.fixture
def wallet() -> ScriptedWallet:
    return ScriptedWallet({MERCHANT_1: KEY_1, MERCHANT_2: KEY_2})


@pytest.fixture(autouse=True)
def _recordings_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A configuration given as text records to a file relative to the current folder:
    keep it out of the repository (a run used to leave, and commit, ./wechat-1.jsonl)."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def url(wallet: ScriptedWallet) -> Iterator[str]:
    with serve(wallet) as base:
        yield base


def _config_file(tmp_path: Path, url: str, **replace: str) -> Path:
    path = tmp_path / "channels.toml"
    path.write_text(readme_toml_at(url, **replace), encoding="utf-8")
    return path


def _request(no: str, channel: str = "wechat-1", amount: int = 12_34,
             details: PayDetails | None = None) -> PaymentRequest:
    return PaymentRequest("station-1", no, f"user-{no}", "CNY", amount, "fuel",
                          cash=CashPart(amount, channel, details))


def test_pay_prepay_notification_query_and_refund_end_to_end(
        tmp_path: Path, wallet: ScriptedWallet, url: str) -> None:
    channels = load_channels(_config_file(tmp_path, url))
    engine = Engine.open(tmp_path / "pay.db", channels=channels, policy=FAST)
    try:
        receipt = engine.submit(_request("o-1", details=PayDetails(
            PayScenario.JSAPI, payer_id="o7LFAwOpenId")))
        view = wait_for(lambda: (v := engine.get_order(receipt.order_id)).prepay and v,
                        what="the prepay")
        serial = view.payment_serial
        assert view.state == "paying"
        assert view.prepay.prepay_id == f"wx{serial}"
        assert view.prepay.code_url == f"weixin://wxpay/bizpayurl?pr={serial}"
        path, sent = wallet.requests[0]
        assert path == "/pay/unifiedorder" and wallet.bad_signatures == 0
        assert sent["mch_id"] == MERCHANT_1 and sent["out_trade_no"] == serial
        assert sent["total_fee"] == 1234 and sent["trade_type"] == "JSAPI"
        assert sent["openid"] == "o7LFAwOpenId" and "auth_code" not in sent
        assert sent["notify_url"] == "https://pay.example.com/notify/wechat-1"
        # the payer pays; the wallet's notification is verified over its exact bytes
        wallet.user_pays(serial)
        body, headers = wallet.notification(serial)
        forged = body.replace(b'"total_fee": 1234', b'"total_fee": 1')
        with pytest.raises(NotificationRejected) as rejected:
            engine.handle_notification("wechat-1", forged, headers)
        assert rejected.value.reason == "bad_signature"
        assert engine.handle_notification("wechat-1", body, headers) == "succeeded"
        assert engine.get_order(receipt.order_id).legs[0].channel_txn_id == \
            wallet.trades[serial].txn_id
        # a refund: accepted (processing), then the engine's own query finds it done
        engine.refund(receipt.order_id, "rf-1", 234)
        wait_for(lambda: wallet.trades[serial].refunds, what="the refund request")
        (refund_id,) = wallet.trades[serial].refunds
        wallet.refund_done(serial, refund_id)
        done = wait_for(lambda: (v := engine.get_order(receipt.order_id)).refunds[0].status
                        == "succeeded" and v, what="the refund, by query")
        assert done.refunded_minor == 234
        assert any(p == "/pay/refundquery" for p, _ in wallet.requests)
    finally:
        engine.shutdown()


def test_without_a_notification_the_query_finds_the_payment(
        tmp_path: Path, wallet: ScriptedWallet, url: str) -> None:
    engine = Engine.open(tmp_path / "pay.db", channels=load_channels(
        _config_file(tmp_path, url)), policy=FAST)
    try:
        receipt = engine.submit(_request("o-2", channel="wechat-2"))
        serial = wait_for(lambda: engine.get_order(receipt.order_id).prepay,
                          what="the prepay") and engine.get_order(receipt.order_id).payment_serial
        assert wallet.trades[serial].mch_id == MERCHANT_2  # the second merchant number
        wallet.user_pays(serial)
        wait_for(lambda: engine.get_order(receipt.order_id).state == "succeeded",
                 what="success by query")
        assert engine.get_order(receipt.order_id).prepay is None
        # a user close of an unpaid order closes it at the wallet
        other = engine.submit(_request("o-3", channel="wechat-2"))
        wait_for(lambda: engine.get_order(other.order_id).prepay, what="the prepay")
        engine.request_close(other.order_id)
        wait_for(lambda: engine.get_order(other.order_id).state == "closed", what="closed")
        assert wallet.trades[engine.get_order(other.order_id).payment_serial].state == "CLOSED"
        assert wallet.bad_signatures == 0
    finally:
        engine.shutdown()


def test_a_hung_merchant_number_times_out_and_never_holds_the_other(
        tmp_path: Path, wallet: ScriptedWallet, url: str) -> None:
    """wechat-1's wallet hangs (sleeps 3 s) past its 300 ms timeout: its calls end in
    TimeoutError within the timeout, the order stays paying (never failed), and wechat-2,
    the same wallet's other merchant number, pays meanwhile."""
    path = _config_file(tmp_path, url, **{"timeout_ms = 3000": "timeout_ms = 300"})
    channels = load_channels(path)
    wallet.delay_s[MERCHANT_1] = 3.0
    engine = Engine.open(tmp_path / "pay.db", channels=channels, policy=FAST)
    try:
        hung = [engine.submit(_request(f"h-{i}")) for i in range(6)]  # more than a lane's workers
        ok = engine.submit(_request("ok-1", channel="wechat-2"))
        started = time.monotonic()
        wait_for(lambda: engine.get_order(ok.order_id).prepay, timeout_s=2.0,
                 what="wechat-2's prepay while wechat-1 hangs")
        assert time.monotonic() - started < 1.5
        serial = engine.get_order(ok.order_id).payment_serial
        wallet.user_pays(serial)
        body, headers = wallet.notification(serial)
        assert engine.handle_notification("wechat-2", body, headers) == "succeeded"
        recorder = channels[0].recorder  # type: ignore[attr-defined]
        wait_for(lambda: any(r.get("error", "") and "TimeoutError" in r["error"]
                             for r in recorder.records()), what="a timed-out call")
        timed_out = [r for r in recorder.records() if "TimeoutError" in (r.get("error") or "")]
        assert all(r["duration_ms"] < 1_000 for r in timed_out)
        for receipt in hung:
            assert engine.get_order(receipt.order_id).state == "paying"
    finally:
        wallet.delay_s.clear()
        engine.shutdown()


def test_the_deadline_bounds_a_reply_trickled_byte_by_byte() -> None:
    """Each read returning in time is not enough: the whole call has one deadline."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    stop = threading.Event()

    def trickle() -> None:
        conn, _ = server.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        while not stop.is_set():
            try:
                conn.sendall(b"x")
            except OSError:
                break
            time.sleep(0.05)
        conn.close()

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    started = time.monotonic()
    try:
        with pytest.raises(TimeoutError):
            http_call(f"http://127.0.0.1:{server.getsockname()[1]}/pay", "POST", b"{}", {},
                      0.4, 65536)
        assert time.monotonic() - started < 1.0
    finally:
        stop.set()
        thread.join(timeout=2)
        server.close()


def test_a_refused_connection_raises() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    with pytest.raises(OSError):
        http_call(f"http://127.0.0.1:{port}/", "POST", b"", {}, 1.0, 1024)


def _channel(url: str, **replace: str) -> HttpChannel:
    (channel, _, _) = load_channels(readme_toml_at(url, **replace))
    assert isinstance(channel, HttpChannel)
    return channel


def test_replies_that_are_not_results_raise(wallet: ScriptedWallet, url: str) -> None:
    channel = _channel(url)
    assert channel.pay("P1", 100, "CNY", "t").result_code == "NOTPAY"
    wallet.sign_replies = False  # verify_replies = true: an unsigned reply is no result
    with pytest.raises(ReplyError, match="signature"):
        channel.query("P1")
    wallet.sign_replies = True
    original = wallet.handle
    wallet.handle = lambda path, request: {**original(path, request), "sign": "00"}  # type: ignore[method-assign]
    with pytest.raises(ReplyError, match="signature"):
        channel.query("P1")
    wallet.handle = original  # type: ignore[method-assign]
    with pytest.raises(ChannelHttpError):
        channel._transport = lambda *a: (502, {}, b"{}")  # type: ignore[method-assign]
        channel.query("P1")
    for body in (b"<xml/>", b"[1, 2]", json.dumps({"return_code": ["x"]}).encode()):
        channel._transport = lambda *a, b=body: (200, {}, b)  # type: ignore[method-assign]
        with pytest.raises(ReplyError):
            channel._call("query", "P1", None)
    records = channel.recorder.records()
    assert sum(1 for r in records if r.get("error")) == 6


def test_a_reply_too_long_and_an_unconfigured_operation_raise(url: str) -> None:
    with pytest.raises(ReplyTooLarge):
        http_call(f"{url}/pay/unifiedorder", "POST", b'{"mch_id": "x"}', {}, 2.0, 16)
    config = parse_config({"channels": {"w": {
        "kind": "http", "wallet": "w", "merchant_no": "1", "base_url": url,
        "operations": {"pay": {"path": "/pay/unifiedorder"}, "query": {"path": "/q"}}}}})[0]
    with pytest.raises(OperationNotConfigured):
        HttpChannel(config).close("P1")


def test_body_signing_in_a_header_form_encoding_get_and_decimal_amounts() -> None:
    """An Alipay-like wallet: form-encoded pay, GET query, HMAC over the exact body in a
    header, decimal amounts in yuan, codes under a nested object, @status."""
    seen: list[tuple[str, str, bytes, dict[str, str]]] = []
    key = "alipay-like-shared-key"

    def transport(url: str, method: str, body: bytes, headers: dict[str, str],
                  timeout_s: float, bytes_max: int) -> tuple[int, dict[str, str], bytes]:
        seen.append((url, method, body, dict(headers)))
        import hashlib
        import hmac
        signed = body if method == "POST" else url.split("?", 1)[1].encode()
        assert headers["X-Sign"] == hmac.new(key.encode(), signed, hashlib.sha256).hexdigest()
        reply = json.dumps({"data": {"trade_status": "TRADE_SUCCESS", "trade_no": "2024X1",
                                     "total_amount": 12.34}}).encode()
        return 200, {"X-Sign": hmac.new(key.encode(), reply, hashlib.sha256).hexdigest()}, reply

    config = parse_config({"channels": {"ali-1": {
        "kind": "http", "wallet": "alipay", "merchant_no": "2088", "base_url": "https://a.b",
        "body": "form", "currency": "CNY",
        "credentials": {"key": key},
        "signing": {"method": "hmac-sha256", "form": "body", "header": "X-Sign",
                    "encoding": "hex", "verify_replies": True},
        "reply": {"return_code": "@status", "result_code": "data.trade_status",
                  "channel_txn_id": "data.trade_no", "amount": "data.total_amount",
                  "amount_format": "decimal", "prepay_id": "", "code_url": "",
                  "deeplink": ""},
        "codes": {"pay": {"communication_ok": ["HTTP_200"], "success": ["TRADE_SUCCESS"],
                          "failure": ["TRADE_CLOSED"]}},
        "operations": {
            "pay": {"path": "/gateway?method=pay", "fields": {
                "out_trade_no": "{serial}", "total_amount": "{amount_decimal}",
                "subject": "{title}", "biz": "x{{y}}"}},
            "query": {"path": "/query", "method": "GET",
                      "fields": {"out_trade_no": "{serial}"}}}}}})[0]
    channel = HttpChannel(config, transport=transport)  # type: ignore[arg-type]
    reply = channel.pay("P1", 1234, "CNY", "fuel & snacks")
    assert reply == ChannelReply("HTTP_200", "TRADE_SUCCESS", "2024X1", 1234)
    assert channel.pay_codes.classify(reply.return_code, reply.result_code).value == "success"
    url, method, body, headers = seen[0]
    assert url == "https://a.b/gateway?method=pay" and method == "POST"
    assert body == b"out_trade_no=P1&total_amount=12.34&subject=fuel+%26+snacks&biz=x%7By%7D"
    assert headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert channel.query("P1").amount_minor == 1234
    assert seen[1][0] == "https://a.b/query?out_trade_no=P1" and seen[1][2] == b""


def test_notifications_of_an_unsigned_channel_are_never_believed(url: str) -> None:
    channel = _channel(url, **{'method = "md5"': 'method = "none"',
                               "verify_replies = true": "verify_replies = false"})
    body = json.dumps({"return_code": "SUCCESS", "result_code": "SUCCESS",
                       "out_trade_no": "P1"}).encode()
    with pytest.raises(NotificationRejected) as rejected:
        channel.verify_notification(body, {})
    assert rejected.value.reason == "bad_signature"


def test_a_verified_but_malformed_notification_is_malformed(url: str) -> None:
    channel = _channel(url)
    fields = {"return_code": "SUCCESS", "result_code": "SUCCESS", "total_fee": "12.5",
              "out_trade_no": "P1"}
    fields["sign"] = pairs_sign(fields, KEY_1)
    with pytest.raises(NotificationRejected) as rejected:
        channel.verify_notification(json.dumps(fields).encode(), {})
    assert rejected.value.reason == "malformed"
    with pytest.raises(NotificationRejected) as rejected:
        channel.verify_notification(b"not json", {})
    assert rejected.value.reason == "malformed"


def test_a_channel_s_own_query_schedule_is_the_one_its_orders_use(
        tmp_path: Path, wallet: ScriptedWallet, url: str) -> None:
    """The engine's default schedule waits a minute; the configured channel's says 100 ms."""
    slow = OrderPolicy(pay_window_ms=60_000, query_schedule_ms=(60_000,),
                       refund_query_schedule_ms=(60_000,))
    path = _config_file(tmp_path, url, **{"query_schedule_ms = [1000, 2000, 5000, 10000, 30000]":
                                          "query_schedule_ms = [100, 200, 400]"})
    engine = Engine.open(tmp_path / "pay.db", channels=load_channels(path), policy=slow)
    try:
        assert engine._ctx.policy.query_schedule_for("wechat-2") == (100, 200, 400)
        assert engine._ctx.policy.query_schedule_for("sim-wallet") == (60_000,)
        receipt = engine.submit(_request("o-5", channel="wechat-2"))
        wait_for(lambda: engine.get_order(receipt.order_id).prepay, what="the prepay")
        wallet.user_pays(engine.get_order(receipt.order_id).payment_serial)
        wait_for(lambda: engine.get_order(receipt.order_id).state == "succeeded",
                 timeout_s=5.0, what="success by the channel's own query schedule")
    finally:
        engine.shutdown()


def test_a_policy_s_channel_schedules_are_checked() -> None:
    from payengine import InvalidRequest

    with pytest.raises(InvalidRequest):
        OrderPolicy(channel_query_schedules_ms=(("w", ()),))
    with pytest.raises(InvalidRequest):
        OrderPolicy(channel_query_schedules_ms=(("w", (5,)), ("w", (6,))))
    policy = OrderPolicy(channel_refund_query_schedules_ms=(("w", (5,)),))
    assert policy.refund_query_schedule_for("w") == (5,)
    assert policy.refund_query_schedule_for("x") == policy.refund_query_schedule_ms
