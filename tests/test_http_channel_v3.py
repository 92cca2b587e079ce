"""A second wallet shape, configured from the README's keys alone: nested JSON (WeChat Pay
v3-like), HMAC-SHA256 over the exact body in a header (requests, replies, notifications),
the HTTP status as the communication code, nested reply paths, a GET query — through a real
engine on loopback."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from payengine import CashPart, Engine, NotificationRejected, OrderPolicy, PaymentRequest, load_channels
from tests.helpers import wait_for

KEY = "v3-shared-key-0123456789abcdef"
MCH = "1230000109"

CONFIG = """
[channels.wx3]
kind = "http"
wallet = "wechat"
merchant_no = "1230000109"
base_url = "{url}/v3"
currency = "CNY"
timeout_ms = 2000
credentials = {{ key = "{key}", app_id = "wxd678efh567hg6787" }}

[channels.wx3.signing]
method = "hmac-sha256"
form = "body"
header = "Wechatpay-Signature"
encoding = "hex"
verify_replies = true

[channels.wx3.reply]
return_code = "@status"
result_code = "trade_state"
channel_txn_id = "transaction_id"
amount = "amount.total"
currency = "amount.currency"
prepay_id = "prepay_id"
code_url = "code_url"
deeplink = ""

[channels.wx3.operations.pay]
path = "/pay/transactions/native"
reply = {{ rename_result = {{ CREATED = "NOTPAY" }} }}
[channels.wx3.operations.pay.fields]
appid = "{{app_id}}"
mchid = "{{merchant_no}}"
description = "{{title}}"
out_trade_no = "{{serial}}"
amount = {{ total = "{{amount}}", currency = "{{currency}}" }}
payer = {{ openid = "{{payer_id}}" }}

[channels.wx3.operations.query]
path = "/pay/transactions/out-trade-no/{{serial}}"
method = "GET"
fields = {{ mchid = "{{merchant_no}}" }}

[channels.wx3.notifications]
serial = "resource.out_trade_no"
refund_id = "resource.out_refund_no"

[channels.wx3.notifications.reply]
return_code = "=HTTP_200"
result_code = "resource.trade_state"
channel_txn_id = "resource.transaction_id"
amount = "resource.amount.total"
currency = "resource.amount.currency"
prepay_id = ""
code_url = ""

[channels.wx3.codes.pay]
communication_ok = ["HTTP_200"]
success = ["SUCCESS"]
failure = ["CLOSED", "PAYERROR"]
processing = ["NOTPAY", "USERPAYING"]
"""


def _sign(body: bytes) -> str:
    return hmac.new(KEY.encode(), body, hashlib.sha256).hexdigest()


class V3Wallet:
    def __init__(self) -> None:
        self.trades: dict[str, dict[str, Any]] = {}
        self.bad_signatures = 0

    def handle(self, method: str, path: str, body: bytes, signature: str | None
               ) -> tuple[int, dict[str, Any]]:
        signed = body if method == "POST" else urlsplit(path).query.encode()
        if signature != _sign(signed):
            self.bad_signatures += 1
            return 401, {"code": "SIGN_ERROR"}
        parts = urlsplit(path)
        if method == "POST" and parts.path == "/v3/pay/transactions/native":
            request = json.loads(body)
            self.trades.setdefault(request["out_trade_no"], {
                "trade_state": "CREATED", "amount": request["amount"]})
            return 200, {"trade_state": "CREATED",
                         "code_url": f"weixin://wxpay/bizpayurl?pr={request['out_trade_no']}"}
        if method == "GET" and parts.path.startswith("/v3/pay/transactions/out-trade-no/"):
            assert parse_qs(parts.query) == {"mchid": [MCH]}
            serial = parts.path.rsplit("/", 1)[1]
            trade = self.trades.get(serial)
            if trade is None:
                return 404, {"code": "ORDER_NOT_EXIST"}
            return 200, {"out_trade_no": serial, **trade}
        return 404, {"code": "NOT_FOUND"}


@pytest.fixture
def wallet_url() -> Iterator[tuple[V3Wallet, str]]:
    wallet = V3Wallet()

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            status, reply = wallet.handle(method, self.path, body,
                                          self.headers.get("Wechatpay-Signature"))
            data = json.dumps(reply).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Wechatpay-Signature", _sign(data))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:
            self._answer("POST")

        def do_GET(self) -> None:
            self._answer("GET")

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield wallet, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_v3_like_wallet_through_the_engine(tmp_path: Path,
                                              wallet_url: tuple[V3Wallet, str]) -> None:
    wallet, url = wallet_url
    channels = load_channels(CONFIG.format(url=url, key=KEY))
    policy = OrderPolicy(pay_window_ms=60_000, query_schedule_ms=(100, 200, 400, 800))
    engine = Engine.open(tmp_path / "pay.db", channels=channels, policy=policy)
    try:
        receipt = engine.submit(PaymentRequest("s", "o-1", "u", "CNY", 880, "fuel",
                                               cash=CashPart(880, "wx3")))
        view = wait_for(lambda: (v := engine.get_order(receipt.order_id)).prepay and v,
                        what="the prepay")
        serial = view.payment_serial
        assert view.prepay.code_url == f"weixin://wxpay/bizpayurl?pr={serial}"
        assert wallet.trades[serial]["amount"] == {"total": 880, "currency": "CNY"}
        # the payer pays; a notification signed over its exact body pays the order
        wallet.trades[serial].update(trade_state="SUCCESS", transaction_id="4200X1")
        note = json.dumps({"event_type": "TRANSACTION.SUCCESS", "resource": {
            "out_trade_no": serial, "trade_state": "SUCCESS", "transaction_id": "4200X1",
            "amount": {"total": 880, "currency": "CNY"}}}).encode()
        with pytest.raises(NotificationRejected) as rejected:
            engine.handle_notification("wx3", note, {"Wechatpay-Signature": _sign(note + b" ")})
        assert rejected.value.reason == "bad_signature"
        assert engine.handle_notification(
            "wx3", note, {"wechatpay-signature": _sign(note)}) == "succeeded"
        # another order is found paid by the engine's own GET query
        other = engine.submit(PaymentRequest("s", "o-2", "u2", "CNY", 990, "fuel",
                                             cash=CashPart(990, "wx3")))
        wait_for(lambda: engine.get_order(other.order_id).prepay, what="the second prepay")
        serial_2 = engine.get_order(other.order_id).payment_serial
        wallet.trades[serial_2].update(trade_state="SUCCESS", transaction_id="4200X2")
        wait_for(lambda: engine.get_order(other.order_id).state == "succeeded",
                 what="success by query")
        assert engine.get_order(other.order_id).legs[0].channel_txn_id == "4200X2"
        assert wallet.bad_signatures == 0
    finally:
        engine.shutdown()
