"""The HTTP adapter beyond the README's example file: GET, path placeholders, body signing in a header,
base64, dotted reply paths, `@status`, `=TEXT`, decimal amounts, placeholders' types."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import urllib.parse
from typing import Any

import pytest

from payengine import (
    CashPart,
    ConfigError,
    NotificationKind,
    NotificationRejected,
    OrderPolicy,
    PaymentRequest,
    load_channels,
    load_config,
)

from .support import uniq, wait_for
from .wallet import Wallet

V3_KEY = "v3-shared-key-0123456789abcdef"

V3_TOML = """
[channels.v3-1]
kind = "http"
wallet = "wxv3"
merchant_no = "m-3"
base_url = "{url}/v3"
currency = "CNY"
headers = {{ "User-Agent" = "pos/1.0" }}
credentials = {{ key = "{key}" }}

[channels.v3-1.signing]
method = "hmac-sha256"
form = "body"
header = "X-Sig"
encoding = "base64"
verify_replies = true

[channels.v3-1.reply]
return_code = "@status"
result_code = "data.trade_state"
channel_txn_id = "data.txn"
amount = "data.amount.total"
amount_format = "decimal"
currency = "data.amount.currency"
code_url = "data.code_url"

[channels.v3-1.operations.pay]
path = "/pay/transactions/native"
reply = {{ result_code = "=NOTPAY" }}
[channels.v3-1.operations.pay.fields]
mchid = "{{merchant_no}}"
out_trade_no = "{{serial}}"
description = "{{title}}"
ts = "{{timestamp}}"
tsm = "{{timestamp_ms}}"
literal = "{{{{x}}}}"
tagged = "n-{{amount}}"
flag = true
count = 3
amount = {{ total = "{{amount}}", decimal = "{{amount_decimal}}", currency = "{{currency}}" }}

[channels.v3-1.operations.query]
path = "/pay/transactions/out-trade-no/{{serial}}"
method = "GET"
fields = {{ mchid = "{{merchant_no}}" }}

[channels.v3-1.codes.pay]
communication_ok = ["HTTP_200"]
success = ["SUCCESS"]
failure = ["CLOSED", "PAYERROR"]
processing = ["NOTPAY", "USERPAYING"]

[channels.v3-1.notifications]
serial = "data.out_trade_no"
reply = {{ return_code = "=HTTP_200" }}
"""


def sig(raw: bytes, key: str = V3_KEY) -> str:
    return base64.b64encode(hmac.new(key.encode(), raw, hashlib.sha256).digest()).decode()


def reply(obj: Any, status: int = 200, signed: bool = True, key: str = V3_KEY):
    raw = json.dumps(obj).encode()

    def go(h) -> None:
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(raw)))
        if signed:
            h.send_header("X-Sig", sig(raw, key))
        h.end_headers()
        h.wfile.write(raw)
    return go


@pytest.fixture
def v3(tmp_path, world):
    wallet = Wallet()
    wallet.sign_replies = False
    path = tmp_path / "v3.toml"
    path.write_text(V3_TOML.format(url=wallet.url, key=V3_KEY))
    (channel,) = load_channels(path, world=world.runtime)
    yield wallet, channel
    wallet.close()


def paid(serial: str, total: str = "12.34") -> dict[str, Any]:
    return {"data": {"trade_state": "SUCCESS", "txn": "42" + serial, "out_trade_no": serial,
                     "amount": {"total": total, "currency": "CNY"}}}


def test_pay_request_body_types_and_header_signature(v3) -> None:
    # "A field that is one placeholder alone keeps the value's type (`"{amount}"` is a JSON number; every
    #  other value is text)"; "`{{` and `}}` are literal braces"; "nested tables ... = nested objects"
    wallet, channel = v3
    wallet.script["/v3/pay/transactions/native"] = lambda body: reply({"data": {"code_url": "weixin://x/1"}})
    answer = channel.pay("P1", 1234, "CNY", "Fuel", None)
    request = wallet.of("/v3/pay/transactions/native")[-1]
    body = request["body"]
    assert body["mchid"] == "m-3" and body["out_trade_no"] == "P1" and body["description"] == "Fuel"
    assert body["amount"] == {"total": 1234, "decimal": "12.34", "currency": "CNY"}
    assert body["literal"] == "{x}"
    assert body["tagged"] == "n-1234"
    assert body["flag"] is True and body["count"] == 3
    assert isinstance(body["ts"], int) or body["ts"].isdigit()
    assert str(body["tsm"]).isdigit() and len(str(body["tsm"])) == 13
    # "`"body"`: the exact body bytes ..." in the `header`, base64
    assert request["headers"]["X-Sig"] == sig(request["raw"])
    assert request["headers"]["User-Agent"] == "pos/1.0"
    assert answer.return_code == "HTTP_200" and answer.result_code == "NOTPAY"
    assert answer.prepay.code_url == "weixin://x/1"


def test_get_query_string_path_placeholder_and_signature(v3) -> None:
    # "`"GET"` (fields in the query string)"; "placeholders, URL-quoted: `"/orders/{serial}"`";
    # "`"body"`: the exact body bytes (a GET's query string)"
    wallet, channel = v3
    wallet.script["/v3/pay/transactions/out-trade-no/P 2/x"] = lambda body: reply(paid("P 2/x"))
    wallet.script["/v3/pay/transactions/out-trade-no/P%202%2Fx"] = lambda body: reply(paid("P 2/x"))
    answer = channel.query("P 2/x")
    request = wallet.requests[-1]
    path, _, query = request["path"].partition("?")
    assert path == "/v3/pay/transactions/out-trade-no/P%202%2Fx"
    assert urllib.parse.parse_qs(query) == {"mchid": ["m-3"]}
    assert request["headers"]["X-Sig"] == sig(query.encode())
    # "`"decimal"` (`"88.88"` in the major unit, by the currency's digits)"
    assert (answer.result_code, answer.channel_txn_id, answer.amount_minor, answer.currency) == (
        "SUCCESS", "42P 2/x", 1234, "CNY")


def test_at_status_maps_http_status(v3) -> None:
    # "`"@status"` (the HTTP status as `HTTP_200`...)"
    wallet, channel = v3
    wallet.script["/v3/pay/transactions/out-trade-no/P3"] = lambda body: reply(paid("P3"), status=202)
    assert channel.query("P3").return_code == "HTTP_202"


def test_unsigned_or_wrong_key_reply_raises(v3) -> None:
    wallet, channel = v3
    wallet.script["/v3/pay/transactions/out-trade-no/P4"] = lambda body: reply(paid("P4"), signed=False)
    with pytest.raises(Exception):  # noqa: B017
        channel.query("P4")
    wallet.script["/v3/pay/transactions/out-trade-no/P4"] = lambda body: reply(paid("P4"), key="other-key-xx")
    with pytest.raises(Exception):  # noqa: B017
        channel.query("P4")


@pytest.mark.parametrize("total", [
    "12.345", "-12.34", "12,34", "0x10", "NaN",
    pytest.param("0.00"),
    pytest.param("1e3"),
])
def test_decimal_amount_must_have_currency_digits(v3, total) -> None:
    # "`"decimal"` (`"88.88"` in the major unit, by the currency's digits)"; "a positive amount";
    # "Nothing is ever guessed."
    wallet, channel = v3
    wallet.script["/v3/pay/transactions/out-trade-no/P5"] = lambda body: reply(paid("P5", total))
    with pytest.raises(Exception):  # noqa: B017
        channel.query("P5")


def test_decimal_amount_number_exact(v3) -> None:
    # "it is a JSON object (decimals kept exact)"
    wallet, channel = v3
    raw = b'{"data":{"trade_state":"SUCCESS","txn":"42P6","amount":{"total":12.34,"currency":"CNY"}}}'

    def go(h) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(len(raw)))
        h.send_header("X-Sig", sig(raw))
        h.end_headers()
        h.wfile.write(raw)

    wallet.script["/v3/pay/transactions/out-trade-no/P6"] = lambda body: go
    assert channel.query("P6").amount_minor == 1234


def test_reply_currency_checked_against_order(tmp_path, world) -> None:
    # "`currency` | `""` | the reply's currency (checked against the order's when present)"
    wallet = Wallet()
    wallet.sign_replies = False
    try:
        path = tmp_path / "v3.toml"
        path.write_text(V3_TOML.format(url=wallet.url, key=V3_KEY))
        (channel,) = load_channels(path, world=world.runtime)
        engine = world.open([channel], policy=OrderPolicy(query_schedule_ms=(100,) * 30))
        receipt = engine.submit(PaymentRequest("station-42", uniq(), "alice", "CNY", 1234, "t",
                                               cash=CashPart(1234, "v3-1")))
        serial = receipt.payment_serial
        usd = paid(serial)
        usd["data"]["amount"]["currency"] = "USD"
        wallet.script[f"/v3/pay/transactions/out-trade-no/{serial}"] = lambda body: reply(usd)
        # "A verified success of *another* amount is never a success (the cash leg goes `unknown`, for
        #  reconciliation)": a success in another currency is not this payment's
        view = wait_for(lambda: (v := engine.get_order(receipt.order_id)).state == "needs_reconciliation"
                        and v, "not believed")
        assert view.legs[0].status == "unknown"
        assert "USD" in engine.journal(receipt.order_id)[-1].cause
    finally:
        wallet.close()


def test_notification_body_signature_in_header(v3, world) -> None:
    # "Notifications are always verified this way over the **exact body bytes** received"
    # "`"=TEXT"` (the constant `TEXT`, e.g. `return_code = "=HTTP_200"` in `notifications.reply` of such
    #  a wallet: a notification has no status)"
    _, channel = v3
    raw = json.dumps(paid("P7")).encode()
    note = channel.verify_notification(raw, {"x-sig": sig(raw)})
    assert note.kind is NotificationKind.PAYMENT and note.payment_serial == "P7"
    answer = (note.reply.return_code, note.reply.result_code, note.reply.amount_minor)
    assert answer == ("HTTP_200", "SUCCESS", 1234)
    engine = world.open([channel])
    with pytest.raises(NotificationRejected) as info:
        engine.handle_notification("v3-1", raw + b" ", {"X-Sig": sig(raw)})
    assert info.value.reason == "bad_signature"


def test_unconfigured_operation_raises(v3) -> None:
    # "An operation that is not configured raises when called (the engine queries later)."
    _, channel = v3
    with pytest.raises(Exception):  # noqa: B017
        channel.close("P8")
    with pytest.raises(Exception):  # noqa: B017
        channel.refund("P8", "R8", 100, "CNY")


@pytest.mark.parametrize(("old", "new"), [
    ('form = "body"\nheader = "X-Sig"', 'form = "body"'),                       # header required with body
    ('path = "/pay/transactions/native"', 'path = "/pay/{refund_id}"'),        # not a pay placeholder
    ('mchid = "{{merchant_no}}"\nout_trade_no', 'mchid = "{{merchant}}"\nout_trade_no'),
    ('method = "GET"', 'method = "PUT"'),
    ('amount_format = "decimal"', 'amount_format = "cents"'),
    ('currency = "CNY"\nheaders', 'currency = "RMB"\nheaders'),
])
def test_generic_config_errors(old, new) -> None:
    text = V3_TOML.format(url="http://127.0.0.1:1", key=V3_KEY)
    old = old.replace("{{", "{").replace("}}", "}")
    new = new.replace("{{", "{").replace("}}", "}")
    assert old in text, old
    with pytest.raises(ConfigError):
        load_config(text.replace(old, new))


def test_sorted_pairs_needs_flat_fields() -> None:
    # "the fields must then be flat"
    text = V3_TOML.format(url="http://127.0.0.1:1", key=V3_KEY).replace(
        'form = "body"\nheader = "X-Sig"', 'form = "sorted-pairs"')
    with pytest.raises(ConfigError):
        load_config(text)


def test_currency_needed_for_decimal_query_replies(tmp_path, world) -> None:
    # "`currency` | — | ISO 4217 code of the wallet's amounts when a reply names none (needed for
    #  `amount_format = "decimal"` in query replies)": with neither, such a reply cannot be read
    wallet = Wallet()
    try:
        text = V3_TOML.format(url=wallet.url, key=V3_KEY)
        text = text.replace('currency = "CNY"\nheaders', "headers")
        text = text.replace('currency = "data.amount.currency"\n', "")
        path = tmp_path / "v3.toml"
        path.write_text(text)
        try:
            (channel,) = load_channels(path, world=world.runtime)
        except ConfigError:
            return
        wallet.script["/v3/pay/transactions/out-trade-no/P10"] = lambda body: reply(paid("P10"))
        with pytest.raises(Exception):  # noqa: B017
            channel.query("P10")
    finally:
        wallet.close()


def test_form_body(tmp_path, world) -> None:
    # "`body` | `"json"` | request body: `"json"` (a JSON object) or `"form"` (form-urlencoded)"
    wallet = Wallet()
    wallet.sign_replies = False
    try:
        text = V3_TOML.format(url=wallet.url, key=V3_KEY).replace(
            'currency = "CNY"\nheaders', 'currency = "CNY"\nbody = "form"\nheaders').replace(
            "amount = { total", "#amount = { total")
        path = tmp_path / "v3.toml"
        path.write_text(text)
        (channel,) = load_channels(path, world=world.runtime)
        wallet.script["/v3/pay/transactions/native"] = lambda body: reply({"data": {}})
        channel.pay("P9", 100, "CNY", "a b&c", None)
        raw = wallet.of("/v3/pay/transactions/native")[-1]["raw"]
        form = urllib.parse.parse_qs(raw.decode())
        assert form["description"] == ["a b&c"] and form["out_trade_no"] == ["P9"]
        assert wallet.of("/v3/pay/transactions/native")[-1]["headers"]["X-Sig"] == sig(raw)
    finally:
        wallet.close()


def test_zero_amount_success_never_pays(tmp_path, world) -> None:
    # "A reply is mapped only if ... its values are well formed (... a positive amount ...); anything else
    #  ... raises, which the engine reads as "processing: query it". Nothing is ever guessed."
    wallet = Wallet()
    wallet.sign_replies = False
    try:
        path = tmp_path / "v3.toml"
        path.write_text(V3_TOML.format(url=wallet.url, key=V3_KEY))
        (channel,) = load_channels(path, world=world.runtime)
        engine = world.open([channel], policy=OrderPolicy(query_schedule_ms=(100,) * 30))
        receipt = engine.submit(PaymentRequest("station-42", uniq(), "alice", "CNY", 1234, "t",
                                               cash=CashPart(1234, "v3-1")))
        serial = receipt.payment_serial
        zero = paid(serial, "0.00")
        wallet.script[f"/v3/pay/transactions/out-trade-no/{serial}"] = lambda body: reply(zero)
        wait_for(lambda: len([r for r in wallet.requests if serial in r["path"]]) >= 3
                 or engine.get_order(receipt.order_id).state == "succeeded", "queried")
        assert engine.get_order(receipt.order_id).state == "paying"
    finally:
        wallet.close()
