"""Channels from a configuration file: the README's TOML against a scripted loopback wallet."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from payengine import (
    CashPart,
    ChannelConfig,
    ChannelReply,
    ConfigError,
    Credentials,
    NotificationKind,
    NotificationRejected,
    Operation,
    OrderPolicy,
    PayDetails,
    PaymentError,
    PaymentRequest,
    PayScenario,
    RecordedChannel,
    Signing,
    load_channels,
    load_config,
    read_records,
    replay_mismatches,
)

from .support import uniq, wait_for
from .wallet import KEY, Wallet, sorted_pairs, trickle

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
TOML = re.findall(r"```toml\n(.*?)```", README, re.S)[0]
FAST = OrderPolicy(pay_window_ms=60_000, query_schedule_ms=(100,) * 20,
                   channel_query_schedules_ms=(("wechat-1", (100,) * 20),),
                   channel_refund_query_schedules_ms=(("wechat-1", (100,) * 20),))


@pytest.fixture
def wallet():
    w = Wallet()
    yield w
    w.close()


@pytest.fixture
def cfg(tmp_path: Path, wallet: Wallet) -> Path:
    """The README's file, only `base_url` pointing at the scripted wallet."""
    path = tmp_path / "channels.toml"
    path.write_text(TOML.replace("http://127.0.0.1:8801", wallet.url))
    return path


def chans(cfg: Path, world, text: str | None = None):
    source = cfg if text is None else text
    return {c.name: c for c in load_channels(source, world=world.runtime)}


def test_readme_file_loads_as_it_is(tmp_path, world) -> None:
    # "This file loads as it is (a WeChat-Pay-v2-like wallet speaking JSON, two merchant numbers, and a
    #  simulated wallet)"
    path = tmp_path / "channels.toml"
    path.write_text(TOML)
    channels = {c.name: c for c in load_channels(path, world=world.runtime)}
    assert set(channels) == {"wechat-1", "wechat-2", "sim-wallet"}
    configs = {c.name: c for c in load_config(path)}
    assert configs["wechat-2"].merchant_no == "1900000110"
    assert configs["wechat-2"].base_url == "http://127.0.0.1:8802"
    # "`like` ...: its table, with this one's keys merged over it (...`credentials` replaced whole)"
    assert configs["wechat-2"].credentials.app_id == "wx2421b1c4370ec43b"
    assert configs["wechat-2"].credentials.key == "8934e7d15453e97507ef794cf7b0519d"
    assert configs["wechat-2"].operations["pay"] == configs["wechat-1"].operations["pay"]
    assert configs["wechat-2"].signing == configs["wechat-1"].signing
    assert configs["wechat-1"].timeout_ms == 3000
    assert configs["sim-wallet"].kind == "simulated"


def test_load_channels_accepts_text_dict_and_objects(cfg, world) -> None:
    # "a path, TOML text, a dict, or ChannelConfig objects"
    import tomllib

    text = cfg.read_text().replace('file = "wechat-1.jsonl"', "").replace(
        'recording = { file = "wechat-2.jsonl" }', "")
    names = {"wechat-1", "wechat-2", "sim-wallet"}
    assert {c.name for c in load_channels(text, world=world.runtime)} == names
    as_dict = tomllib.loads(text)
    assert {c.name for c in load_channels(as_dict, world=world.runtime)} == names
    configs = load_config(cfg)
    assert [c.name for c in load_channels(configs, world=world.runtime)] == [c.name for c in configs]


def test_credentials_masked_in_repr(cfg) -> None:
    # "`[channels.NAME.credentials]` — never shown: `repr` masks them"
    config = {c.name: c for c in load_config(cfg)}["wechat-1"]
    assert KEY not in repr(config)
    assert KEY not in repr(config.credentials)
    assert "wx2421b1c4370ec43b" in repr(config)  # app_id is not secret


# --- requests -------------------------------------------------------------------------------------


def test_pay_request_assembly_and_md5_signature(cfg, world, wallet) -> None:
    # "`sorted-pairs`: the request's fields sorted by name, empty ones and the signature left out, as
    #  `k1=v1&k2=v2`, then `&key=KEY` for `hmac-sha256` and `md5`"; "A field that is one placeholder
    #  alone keeps the value's type (`"{amount}"` is a JSON number ...); a field whose placeholder has no
    #  value (`{payer_id}` without a payer) is left out."
    channel = chans(cfg, world)["wechat-1"]
    channel.pay("P100", 1234, "CNY", "Fuel, pump 3", PayDetails(PayScenario.NATIVE))
    request = wallet.of("/pay/unifiedorder")[-1]
    body = request["body"]
    assert body["appid"] == "wx2421b1c4370ec43b" and body["mch_id"] == "1900000109"
    assert body["out_trade_no"] == "P100" and body["body"] == "Fuel, pump 3"
    assert body["total_fee"] == 1234 and isinstance(body["total_fee"], int)
    assert body["fee_type"] == "CNY"
    assert body["notify_url"] == "https://pay.example.com/notify/wechat-1"
    assert body["trade_type"] == "NATIVE"
    assert re.fullmatch(r"[0-9a-f]{32}", body["nonce_str"])  # "`{nonce}` (32 random hex digits per call)"
    assert "openid" not in body and "auth_code" not in body and "spbill_create_ip" not in body
    assert body["sign"] == sorted_pairs(body)  # hex-upper by default
    assert wallet.bad_request_signatures == []


@pytest.mark.parametrize(("details", "trade_type", "extra"), [
    (PayDetails(PayScenario.JSAPI, payer_id="oUpF8u"), "JSAPI", {"openid": "oUpF8u"}),
    (PayDetails(PayScenario.BARCODE, auth_code="134670070457647112"), "MICROPAY",
     {"auth_code": "134670070457647112"}),
    (PayDetails(PayScenario.APP), "APP", {}),
    (PayDetails(PayScenario.H5, client_ip="203.0.113.9"), "MWEB", {"spbill_create_ip": "203.0.113.9"}),
    (None, "NATIVE", {}),
])
def test_scenarios_map_to_trade_types(cfg, world, wallet, details, trade_type, extra) -> None:
    # "`scenarios` | WeChat's | `{ native = "NATIVE", jsapi = "JSAPI", barcode = "MICROPAY", app = "APP",
    #  h5 = "MWEB" }`"
    channel = chans(cfg, world)["wechat-1"]
    channel.pay("P200", 100, "CNY", "t", details)
    body = wallet.of("/pay/unifiedorder")[-1]["body"]
    assert body["trade_type"] == trade_type
    for key, value in extra.items():
        assert body[key] == value


def test_details_notify_url_overrides(cfg, world, wallet) -> None:
    # "`notify_url` | — | `{notify_url}` (unless the payment's `PayDetails.notify_url` says otherwise)"
    channel = chans(cfg, world)["wechat-1"]
    channel.pay("P300", 100, "CNY", "t", PayDetails(notify_url="https://other.example.com/n"))
    assert wallet.of("/pay/unifiedorder")[-1]["body"]["notify_url"] == "https://other.example.com/n"


def test_pay_reply_mapped_renamed_with_prepay(cfg, world) -> None:
    # "WeChat v2's order creation answers `SUCCESS` for "created", so `{ SUCCESS = "NOTPAY" }`"
    channel = chans(cfg, world)["wechat-1"]
    reply = channel.pay("P400", 100, "CNY", "t", None)
    assert (reply.return_code, reply.result_code) == ("SUCCESS", "NOTPAY")
    assert reply.prepay.prepay_id == "wxP400"
    assert reply.prepay.code_url == "weixin://wxpay/bizpayurl?pr=P400"


def test_query_close_refund_mapping(cfg, world, wallet) -> None:
    channel = chans(cfg, world)["wechat-1"]
    assert channel.query("P500").result_code == "NOTPAY"
    wallet.paid["P500"] = 777
    reply = channel.query("P500")
    assert (reply.result_code, reply.channel_txn_id, reply.amount_minor) == ("SUCCESS", "4200P500", 777)
    assert channel.close("P501").result_code == "CLOSED"
    # "when a `refund` reply is not decided by the refund code table (WeChat's answers "accepted"), the
    #  adapter asks `query_refund` at once and answers its state if that one is decided."
    refund = channel.refund("P500", "R500", 100, "CNY")
    assert refund.result_code == "SUCCESS" and refund.amount_minor == 100
    assert wallet.of("/pay/refundquery")
    body = wallet.of("/secapi/pay/refund")[-1]["body"]
    assert body["out_refund_no"] == "R500" and body["refund_fee"] == 100
    assert body["notify_url"] == "https://pay.example.com/notify/wechat-1"  # refund_notify_url default


def _raises_processing(call) -> None:
    # "anything else ... raises, which the engine reads as "processing: query it""
    with pytest.raises(Exception):  # noqa: B017 - the README says "raises", no type
        call()


def test_unsigned_reply_raises_with_verify_replies(cfg, world, wallet) -> None:
    # "`verify_replies` ...: one that does not verify is an error, never a result"
    channel = chans(cfg, world)["wechat-1"]
    wallet.sign_replies = False
    _raises_processing(lambda: channel.query("P600"))


def test_tampered_reply_raises(cfg, world, wallet) -> None:
    channel = chans(cfg, world)["wechat-1"]
    from .wallet import signed

    reply = signed({"return_code": "SUCCESS", "result_code": "SUCCESS", "trade_state": "NOTPAY"})
    reply["trade_state"] = "SUCCESS"
    wallet.script["/pay/orderquery"] = lambda body: (200, json.dumps(reply).encode())
    _raises_processing(lambda: channel.query("P601"))


@pytest.mark.parametrize("answer", [
    (500, json.dumps({"return_code": "SUCCESS"}).encode()),
    (200, b"<xml>not json</xml>"),
    (200, b"[1, 2]"),
    (302, b""),
])
def test_bad_replies_raise(cfg, world, wallet, answer) -> None:
    # "A reply is mapped only if its status is 2xx, it is a JSON object ..."
    channel = chans(cfg, world)["wechat-1"]
    wallet.script["/pay/orderquery"] = lambda body: answer
    _raises_processing(lambda: channel.query("P602"))


def test_negative_amount_raises(cfg, world, wallet) -> None:
    # "its values are well formed (... a positive amount ...)"
    from .wallet import signed

    channel = chans(cfg, world)["wechat-1"]
    reply = signed({"return_code": "SUCCESS", "result_code": "SUCCESS", "trade_state": "SUCCESS",
                    "transaction_id": "T1", "total_fee": -5})
    wallet.script["/pay/orderquery"] = lambda body: (200, json.dumps(reply).encode())
    _raises_processing(lambda: channel.query("P603"))


def test_reply_too_long_raises(cfg, world, wallet) -> None:
    # "`reply_bytes_max` | `65536` | ... a longer reply is an error"
    from .wallet import signed

    channel = chans(cfg, world)["wechat-1"]
    reply = signed({"return_code": "SUCCESS", "result_code": "SUCCESS", "trade_state": "NOTPAY",
                    "padding": "x" * 70_000})
    wallet.script["/pay/orderquery"] = lambda body: (200, json.dumps(reply).encode())
    _raises_processing(lambda: channel.query("P604"))


def test_trickling_wallet_times_out(cfg, world, wallet) -> None:
    # "`timeout_ms` ... the most **one call** may take in all (connecting, sending, every read of the
    #  reply); then it raises `TimeoutError`"
    text = cfg.read_text().replace("timeout_ms = 3000", "timeout_ms = 300")
    cfg.write_text(text)
    channel = chans(cfg, world)["wechat-1"]
    wallet.script["/pay/orderquery"] = lambda body: trickle(0.1, 60)
    with pytest.raises(TimeoutError):
        channel.query("P605")


# --- notifications --------------------------------------------------------------------------------


def test_notification_verified_over_json_pairs(cfg, world, wallet) -> None:
    # "Notifications are always verified this way over the **exact body bytes** received (with
    #  `form = "sorted-pairs"`, over the pairs of the JSON object in them)"
    channel = chans(cfg, world)["wechat-1"]
    note = channel.verify_notification(wallet.notification("P700", 900), {})
    assert note.kind is NotificationKind.PAYMENT
    assert note.payment_serial == "P700"
    assert (note.reply.result_code, note.reply.channel_txn_id, note.reply.amount_minor) == (
        "SUCCESS", "4200P700", 900)


def test_refund_notification_kind(cfg, world, wallet) -> None:
    # "`refund_id` (default `"out_refund_no"`; a notification that has one is a refund's), ... `refund_reply`"
    from .wallet import signed

    channel = chans(cfg, world)["wechat-1"]
    body = json.dumps(signed({"return_code": "SUCCESS", "out_trade_no": "P701", "out_refund_no": "R701",
                              "refund_status": "SUCCESS", "refund_fee": 50})).encode()
    note = channel.verify_notification(body, {})
    assert note.kind is NotificationKind.REFUND
    assert note.refund_id == "R701"
    assert (note.reply.result_code, note.reply.amount_minor) == ("SUCCESS", 50)


def test_notification_with_other_key_refused(cfg, world, wallet) -> None:
    channels = chans(cfg, world)
    engine = world.open([channels["wechat-1"]], policy=FAST)
    receipt = engine.submit(PaymentRequest("station-42", uniq(), "alice", "CNY", 100, "Fuel",
                                           cash=CashPart(100, "wechat-1")))
    body = wallet.notification(receipt.payment_serial, 100, key="8934e7d15453e97507ef794cf7b0519d")
    with pytest.raises(NotificationRejected) as info:
        engine.handle_notification("wechat-1", body, {})
    assert info.value.reason == "bad_signature"


def test_method_none_believes_no_notification(tmp_path, world, wallet) -> None:
    # "a channel with `method = "none"` believes no notification (`bad_signature`)"
    config = ChannelConfig(name="plain-1", kind="http", wallet="plain", merchant_no="m1",
                           base_url=wallet.url, credentials=Credentials(key=KEY),
                           operations={"pay": Operation("/pay/unifiedorder",
                                                        fields={"out_trade_no": "{serial}"}),
                                       "query": Operation("/pay/orderquery",
                                                          fields={"out_trade_no": "{serial}"})})
    (channel,) = load_channels([config])
    engine = world.open([channel], policy=FAST)
    receipt = engine.submit(PaymentRequest("station-42", uniq(), "alice", "CNY", 100, "Fuel",
                                           cash=CashPart(100, "plain-1")))
    with pytest.raises(NotificationRejected) as info:
        engine.handle_notification("plain-1", wallet.notification(receipt.payment_serial, 100), {})
    assert info.value.reason == "bad_signature"


# --- end to end ------------------------------------------------------------------------------------


def test_engine_pays_through_http_wallet(cfg, world, wallet) -> None:
    # "CashPart(amount, "wechat-1") pays through merchant number 1900000109"
    # "the wallet's notifications: engine.handle_notification("wechat-1", raw_body, headers)"
    channels = chans(cfg, world)
    engine = world.open(list(channels.values()), policy=FAST)
    request = PaymentRequest("station-42", uniq(), "alice", "CNY", 96_00, "Fuel",
                             cash=CashPart(96_00, "wechat-1", PayDetails(PayScenario.NATIVE)))
    receipt = engine.submit(request)
    view = wait_for(lambda: (v := engine.get_order(receipt.order_id)).prepay and v, "prepay")
    assert view.prepay.code_url == f"weixin://wxpay/bizpayurl?pr={receipt.payment_serial}"
    assert wallet.of("/pay/unifiedorder")[-1]["body"]["mch_id"] == "1900000109"
    wallet.paid[receipt.payment_serial] = 96_00
    state = engine.handle_notification("wechat-1", wallet.notification(receipt.payment_serial, 96_00), {})
    assert state in ("succeeded", "deducting")
    wait_for(lambda: engine.get_order(receipt.order_id).settled, "settled")
    engine.refund(receipt.order_id, "refund-1", 10_00)
    refund = wait_for(lambda: (r := engine.get_order(receipt.order_id).refund("refund-1")).status
                      != "refunding" and r, "refund done")
    assert refund.status == "succeeded"
    assert wallet.of("/secapi/pay/refund")[-1]["body"]["refund_fee"] == 10_00


def test_engine_queries_http_wallet_to_success(cfg, world, wallet) -> None:
    channels = chans(cfg, world)
    engine = world.open([channels["wechat-1"]], policy=FAST)
    receipt = engine.submit(PaymentRequest("station-42", uniq(), "alice", "CNY", 5_00, "Fuel",
                                           cash=CashPart(5_00, "wechat-1")))
    wait_for(lambda: wallet.of("/pay/unifiedorder"), "pay sent")
    wallet.paid[receipt.payment_serial] = 5_00
    view = wait_for(lambda: (v := engine.get_order(receipt.order_id)).state == "succeeded" and v, "paid")
    assert view.legs[0].channel_txn_id == "4200" + receipt.payment_serial


def test_simulated_wallet_from_config(cfg, world) -> None:
    # "`txn_prefix` (default `"T"` ...)"; "`attach(engine)` it to have its notifications delivered"
    channels = chans(cfg, world)
    sim = channels["sim-wallet"]
    engine = world.open([sim], policy=FAST)
    sim.attach(engine)
    receipt = engine.submit(PaymentRequest("station-42", uniq(), "alice", "CNY", 5_00, "Fuel",
                                           cash=CashPart(5_00, "sim-wallet")))
    view = wait_for(lambda: (v := engine.get_order(receipt.order_id)).state == "succeeded" and v, "paid")
    assert view.legs[0].channel_txn_id.startswith("S")


# --- recording and replay -------------------------------------------------------------------------


def _drive(channel, wallet) -> None:
    channel.pay("P800", 1234, "CNY", "Fuel", PayDetails(PayScenario.JSAPI, payer_id="openid-secret-1"))
    channel.pay("P801", 1234, "CNY", "Fuel", PayDetails(PayScenario.BARCODE, auth_code="134670070457647112"))
    channel.query("P800")
    wallet.paid["P800"] = 1234
    channel.query("P800")
    channel.close("P801")
    channel.refund("P800", "R800", 100, "CNY")
    channel.verify_notification(wallet.notification("P800", 1234), {})


def test_recording_file_and_redaction(cfg, world, wallet) -> None:
    # "every one appended as a JSON line to `file` (... relative to the configuration file's folder"
    # "Redacted before anything is kept: the credentials ..., the signature field ..., the payer's payment
    #  code (`{auth_code}`: masked to its first and last two digits ...) and the fields named in `redact`."
    channel = chans(cfg, world)["wechat-1"]
    _drive(channel, wallet)
    path = cfg.parent / "wechat-1.jsonl"
    assert path.exists()
    text = path.read_text()
    assert KEY not in text
    assert "134670070457647112" not in text
    assert "openid-secret-1" not in text
    records = [json.loads(line) for line in text.splitlines()]
    assert records == read_records(path) or len(records) == len(read_records(path))
    pay = next(r for r in records if r["operation"] == "pay" and r["serial"] == "P801")
    assert pay["request"]["body"]["auth_code"] == "13" + "*" * 14 + "12"
    assert pay["request"]["body"]["sign"] == "***"
    assert pay["v"] == 1 and pay["channel"] == "wechat-1" and pay["method"] == "POST"
    assert pay["path"] == "/pay/unifiedorder" and pay["status"] == 200
    assert pay["result"]["result_code"] == "NOTPAY"
    assert pay["result"]["prepay"]["prepay_id"] == "wxP801"
    assert any(r["operation"] == "notification" for r in records)
    # "`keep` (default 1,000 ...) newest exchanges in memory (`channel.recorder.records()`)"
    assert len(channel.recorder.records()) == len(records)


def test_auth_code_masked_wherever_its_digits_appear(tmp_path, world, wallet) -> None:
    # "masked to its first and last two digits, in whatever field it is sent and wherever else its
    #  digits appear"
    text = TOML.replace("http://127.0.0.1:8801", wallet.url).replace(
        'spbill_create_ip = "{client_ip}"', 'spbill_create_ip = "{client_ip}"\nremark = "code {auth_code}"')
    path = tmp_path / "channels.toml"
    path.write_text(text)
    channel = {c.name: c for c in load_channels(path, world=world.runtime)}["wechat-1"]
    channel.pay("P850", 100, "CNY", "t", PayDetails(PayScenario.BARCODE, auth_code="134670070457647112"))
    assert wallet.of("/pay/unifiedorder")[-1]["body"]["remark"] == "code 134670070457647112"
    assert "134670070457647112" not in (tmp_path / "wechat-1.jsonl").read_text()


def test_record_has_error_field(cfg, world, wallet) -> None:
    # README record: `"error": null, "duration_ms": 6.7,` and "(`error`, e.g. `"TimeoutError: ..."`, for a
    # call that ended in one ...)"
    channel = chans(cfg, world)["wechat-1"]
    channel.query("P860")
    record = channel.recorder.records()[-1]
    record = record if isinstance(record, dict) else json.loads(json.dumps(record, default=vars))
    assert "error" in record and record["error"] is None


def test_record_error_for_timeout(cfg, world, wallet) -> None:
    cfg.write_text(cfg.read_text().replace("timeout_ms = 3000", "timeout_ms = 300"))
    channel = chans(cfg, world)["wechat-1"]
    wallet.script["/pay/orderquery"] = lambda body: trickle(0.1, 60)
    with pytest.raises(TimeoutError):
        channel.query("P861")
    lines = (cfg.parent / "wechat-1.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["error"].startswith("TimeoutError")


def test_replay_answers_as_recorded_and_no_mismatch(cfg, world, wallet) -> None:
    # "assert replay_mismatches(read_records("wechat-1.jsonl"), config) == []"
    channel = chans(cfg, world)["wechat-1"]
    _drive(channel, wallet)
    path = cfg.parent / "wechat-1.jsonl"
    config = {c.name: c for c in load_config(cfg)}["wechat-1"]
    assert replay_mismatches(read_records(path), config) == []
    replay = RecordedChannel.from_file(path, config=config)
    # "answers each call by (operation, serial, refund id) in the order recorded, repeating the last
    #  answer once they are used up"
    assert replay.query("P800").result_code == "NOTPAY"
    assert replay.query("P800").result_code == "SUCCESS"
    assert replay.query("P800").result_code == "SUCCESS"
    assert replay.pay("P800", 1234, "CNY", "Fuel", None).prepay.prepay_id == "wxP800"
    # "(`NotRecorded` for a call never recorded: "processing" to the engine)"
    with pytest.raises(Exception) as info:
        replay.query("P999")
    assert type(info.value).__name__ == "NotRecorded"


def test_replay_reports_changed_mapping(cfg, world, wallet) -> None:
    # "`replay_mismatches` lists every record the configuration now reads otherwise than it did"
    channel = chans(cfg, world)["wechat-1"]
    _drive(channel, wallet)
    changed = cfg.read_text().replace('processing = ["NOTPAY", "USERPAYING"]',
                                      'processing = ["USERPAYING"]').replace(
        'reply = { result_code = "trade_state" }', 'reply = { result_code = "result_code" }')
    changed_cfg = cfg.parent / "changed.toml"
    changed_cfg.write_text(changed.replace('file = "wechat-1.jsonl"', 'file = "other-1.jsonl"'))
    config = {c.name: c for c in load_config(changed_cfg)}["wechat-1"]
    assert replay_mismatches(read_records(cfg.parent / "wechat-1.jsonl"), config) != []


def test_replay_from_recorder_and_without_config(cfg, world, wallet) -> None:
    # "without a config it answers the recorded results, and refuses notifications"
    channel = chans(cfg, world)["wechat-1"]
    _drive(channel, wallet)
    replay = RecordedChannel.from_recorder(channel.recorder)
    assert replay.close("P801").result_code == "CLOSED"
    with pytest.raises(Exception):  # noqa: B017
        replay.verify_notification(wallet.notification("P800", 1234), {})


def test_engine_on_recorded_channel(cfg, world, wallet, tmp_path) -> None:
    # "engine = Engine.open("replay.db", channels=[channel])                  # answers as recorded"
    channel = chans(cfg, world)["wechat-1"]
    live = world.open([channel], policy=FAST, db="live.db")
    receipt = live.submit(PaymentRequest("station-42", "rec-1", "alice", "CNY", 5_00, "Fuel",
                                         cash=CashPart(5_00, "wechat-1")))
    wait_for(lambda: wallet.of("/pay/orderquery"), "queried")
    wallet.paid[receipt.payment_serial] = 5_00
    wait_for(lambda: live.get_order(receipt.order_id).state == "succeeded", "paid live")
    config = {c.name: c for c in load_config(cfg)}["wechat-1"]
    replay = RecordedChannel.from_recorder(channel.recorder, config=config)
    assert replay.name == "wechat-1"
    assert replay.query(receipt.payment_serial).result_code in ("NOTPAY", "SUCCESS")


# --- configuration errors -------------------------------------------------------------------------


def _err(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(text)
    assert isinstance(info.value, PaymentError) and info.value.code == "config_error"
    return info.value


def _readme_with(old: str, new: str) -> str:
    assert old in TOML, old
    return TOML.replace(old, new).replace('file = "wechat-1.jsonl"', "").replace(
        'recording = { file = "wechat-2.jsonl" }', "")


def test_sha1_error_message_exact() -> None:
    # "`channels.wechat-1.signing.method: must be one of none, hmac-sha256, md5, rsa-sha256; not 'sha1'`"
    error = _err(_readme_with('method = "md5"', 'method = "sha1"'))
    assert error.key == "channels.wechat-1.signing.method"
    assert str(error) == ("channels.wechat-1.signing.method: must be one of none, hmac-sha256, md5, "
                          "rsa-sha256; not 'sha1'")


@pytest.mark.parametrize(("old", "new", "key"), [
    ('timeout_ms = 3000', 'timeout_ms = 3000\ntimeuot_ms = 5', "channels.wechat-1.timeuot_ms"),
    ('timeout_ms = 3000', 'timeout_ms = 0', "channels.wechat-1.timeout_ms"),
    ('timeout_ms = 3000', 'timeout_ms = 120001', "channels.wechat-1.timeout_ms"),
    ('kind = "http"', 'kind = "ftp"', "channels.wechat-1.kind"),
    ('base_url = "http://127.0.0.1:8801"', 'base_url = "http://127.0.0.1:8801/?x=1"',
     "channels.wechat-1.base_url"),
    ('base_url = "http://127.0.0.1:8801"', 'base_url = "ftp://127.0.0.1:8801"', "channels.wechat-1.base_url"),
    ('form = "sorted-pairs"', 'form = "sorted"', "channels.wechat-1.signing.form"),
    ('encoding', 'encoding', ""),
    ('success = ["SUCCESS"]\nfailure = ["PAYERROR", "CLOSED", "REVOKED"]',
     'success = ["SUCCESS", "NOTPAY"]\nfailure = ["PAYERROR", "CLOSED", "REVOKED"]',
     "channels.wechat-1.codes.pay"),
    ('retryable = ["PAYERROR"]', 'retryable = ["NOTPAY"]', "channels.wechat-1.codes.pay"),
    ('body = "{title}"', 'body = "{titel}"', "channels.wechat-1.operations.pay"),
    ('out_refund_no = "{refund_id}", refund_fee',
     'out_refund_no = "{refund_id}", x = "{auth_code}", refund_fee',
     "channels.wechat-1.operations.refund"),
    ('[channels.wechat-1.operations.query_refund]\npath = "/pay/refundquery"',
     '[channels.wechat-1.operations.query_refundx]\npath = "/pay/refundquery"',
     "channels.wechat-1.operations"),
    ('like = "wechat-1"', 'like = "wechat-9"', "channels.wechat-2.like"),
    ('[channels.wechat-1]\nkind = "http"', '[channels.wechat-1]\nlike = "wechat-2"\nkind = "http"',
     "channels.wechat-"),
    ('[channels.sim-wallet]', '[channels."-sim-wallet"]', "channels.-sim-wallet"),
    ('credentials = { key = "simulated-wallet-key-0001" }', 'credentials = { key = "short" }',
     "channels.sim-wallet.credentials"),
    ('txn_prefix = "S"', 'txn_prefix = "S!"', "channels.sim-wallet.simulated.txn_prefix"),
    ('basis_points = 60', 'basis_points = 10001', "channels.wechat-1.fee.basis_points"),
    ('keep = 1000', 'keep = 100001', "channels.wechat-1.recording.keep"),
    ('recording = { file = "wechat-2.jsonl" }', 'recording = { file = "wechat-1.jsonl" }',
     "channels.wechat-"),
    ('wallet = "wechat"\nmerchant_no = "1900000109"', 'wallet = "wechat"\nmerchant_no = ""',
     "channels.wechat-1.merchant_no"),
])
def test_config_errors_name_the_key(old, new, key) -> None:
    # "Every mistake is one typed error, `payengine.ConfigError` ..., whose `.key` names the setting as
    #  written"; "Unknown keys are errors too (a typo is never ignored)."
    if old == "encoding":
        text = _readme_with('field = "sign"', 'field = "sign"\nencoding = "hex-lower"')
        key = "channels.wechat-1.signing.encoding"
    else:
        text = TOML.replace(old, new)
        assert text != TOML, old
        if "wechat-2.jsonl" not in new:
            text = text.replace('recording = { file = "wechat-2.jsonl" }', "")
    with pytest.raises(ConfigError) as info:
        load_config(text)
    assert info.value.key.startswith(key), (info.value.key, str(info.value))
    assert str(info.value).startswith(info.value.key)


def test_pay_and_query_required_for_http() -> None:
    # "`OP` is `pay`, `query` (both required for `http`)"
    base = dict(name="w-1", kind="http", wallet="w", merchant_no="1", base_url="https://api.example.com",
                credentials=Credentials(key="k" * 32), signing=Signing(method="hmac-sha256"))
    with pytest.raises(ConfigError):
        load_channels([ChannelConfig(**base, operations={"pay": Operation("/pay")})])
    with pytest.raises(ConfigError):
        load_channels([ChannelConfig(**base, operations={"query": Operation("/q")})])
    with pytest.raises(ConfigError):
        load_channels([ChannelConfig(**base, operations={"pay": Operation("/pay"), "query": Operation("/q"),
                                                         "refund": Operation("/r")})])


def test_python_config_example_runs_as_written(tmp_path) -> None:
    # "The same checks run when the configuration is written in Python:" (the example)
    block = next(b for b in re.findall(r"```python\n(.*?)```", README, re.S) if 'name="wechat-3"' in b)
    script = tmp_path / "example.py"
    script.write_text(block + "\nprint([c.name for c in channels])\n")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['wechat-3']"


def test_key_env(tmp_path, monkeypatch, world, wallet) -> None:
    # "`key_env` | instead of `key`: the environment variable holding it"
    monkeypatch.setenv("BB3_WECHAT_1_KEY", KEY)
    text = TOML.replace("http://127.0.0.1:8801", wallet.url).replace(
        'key = "192006250b4c09247ec02edce69f6a2d"   # better: key_env = "WECHAT_1_KEY"',
        'key_env = "BB3_WECHAT_1_KEY"')
    path = tmp_path / "channels.toml"
    path.write_text(text)
    channel = {c.name: c for c in load_channels(path, world=world.runtime)}["wechat-1"]
    channel.pay("P900", 100, "CNY", "t", None)
    assert wallet.bad_request_signatures == []


def test_fee_and_limits(cfg) -> None:
    # "`config.fee.of(amount)` = fixed + amount x bp / 10,000 rounded half up"
    config = {c.name: c for c in load_config(cfg)}["wechat-1"]
    assert config.fee.of(10_000) == 60
    assert config.fee.of(250) == 2   # 1.5 -> 2 (half up)
    assert config.fee.of(249) == 1   # 1.494
    assert config.limits.allows(5_000_000) and config.limits.allows(1)
    assert not config.limits.allows(5_000_001)
    assert not config.limits.allows(0)


def test_channel_carries_config(cfg, world) -> None:
    # "each built channel carries its `config`"
    channels = chans(cfg, world)
    assert channels["wechat-1"].config.merchant_no == "1900000109"
    assert channels["wechat-2"].config.merchant_no == "1900000110"


def test_codes_processing_stays_processing(cfg, world, wallet) -> None:
    # "anything else (listed as processing or unknown) is processing"
    channels = chans(cfg, world)
    table = channels["wechat-1"].pay_codes
    assert table.is_retryable("SUCCESS", "PAYERROR")
    assert not table.is_retryable("SUCCESS", "CLOSED")
    engine = world.open([channels["wechat-1"]], policy=FAST)
    receipt = engine.submit(PaymentRequest("station-42", uniq(), "alice", "CNY", 5_00, "Fuel",
                                           cash=CashPart(5_00, "wechat-1")))
    wait_for(lambda: len(wallet.of("/pay/orderquery")) >= 3, "queried while NOTPAY")
    assert engine.get_order(receipt.order_id).state == "paying"
    assert ChannelReply("SUCCESS", "NOTPAY").result_code == "NOTPAY"


@pytest.mark.parametrize("amount", [0, "0"])
def test_zero_minor_amount_raises(cfg, world, wallet, amount) -> None:
    # "its values are well formed (codes and ids texts of at most 128 characters, a positive amount, ...);
    #  anything else ... raises"
    from .wallet import signed

    channel = chans(cfg, world)["wechat-1"]
    reply = signed({"return_code": "SUCCESS", "result_code": "SUCCESS", "trade_state": "SUCCESS",
                    "transaction_id": "T1", "total_fee": amount})
    wallet.script["/pay/orderquery"] = lambda body: (200, json.dumps(reply).encode())
    _raises_processing(lambda: channel.query("P606"))


def test_zero_amount_notification_refused(cfg, world, wallet) -> None:
    # "What an adapter returns is checked like any input (ids, codes, a positive int amount): a malformed one
    #  is refused as `malformed` even when its signature is right."
    # "A verified success of *another* amount is never a success (the cash leg goes `unknown`...)"
    channels = chans(cfg, world)
    engine = world.open([channels["wechat-1"]], policy=FAST)
    receipt = engine.submit(PaymentRequest("station-42", uniq(), "alice", "CNY", 96_00, "Fuel",
                                           cash=CashPart(96_00, "wechat-1")))
    wait_for(lambda: wallet.of("/pay/unifiedorder"), "pay sent")
    body = wallet.notification(receipt.payment_serial, 0)
    try:
        with pytest.raises(NotificationRejected) as info:
            engine.handle_notification("wechat-1", body, {})
        assert info.value.reason == "malformed"
    finally:
        assert engine.get_order(receipt.order_id).state != "succeeded"


def test_keep_rotation_and_header_redaction(tmp_path, world, wallet) -> None:
    # "`keep` (default 1,000, 0..100,000) newest exchanges in memory"; "rotated to `file.1` past
    #  `file_bytes_max`"; "Redacted ...: the credentials (wherever their text appears), ... `Authorization`
    #  and `Cookie` headers"
    from .wallet import signed

    text = TOML.replace("http://127.0.0.1:8801", wallet.url).replace(
        'keep = 1000\nfile = "wechat-1.jsonl"',
        'keep = 2\nfile = "wechat-1.jsonl"\nfile_bytes_max = 4096').replace(
        "timeout_ms = 3000", 'timeout_ms = 3000\nheaders = { Authorization = "Bearer tok-SECRET-1", '
                             'Cookie = "sid=COOKIE-2", "X-Plain" = "visible" }')
    path = tmp_path / "channels.toml"
    path.write_text(text)
    channel = {c.name: c for c in load_channels(path, world=world.runtime)}["wechat-1"]
    echo = signed({"return_code": "SUCCESS", "result_code": "SUCCESS", "trade_state": "NOTPAY",
                   "echo": "your key is " + KEY})
    wallet.script["/pay/orderquery"] = lambda body: (200, json.dumps(echo).encode())
    for i in range(12):
        channel.query(f"P{i}")
    assert len(channel.recorder.records()) == 2
    assert (tmp_path / "wechat-1.jsonl.1").exists()
    assert wallet.requests[-1]["headers"]["Authorization"] == "Bearer tok-SECRET-1"
    for name in ("wechat-1.jsonl", "wechat-1.jsonl.1"):
        recorded = (tmp_path / name).read_text()
        assert KEY not in recorded and "tok-SECRET-1" not in recorded and "COOKIE-2" not in recorded
        assert "visible" in recorded


def test_like_chain_merges_tables_key_by_key(tmp_path, world) -> None:
    # "`like` | ... its table, with this one's keys merged over it (tables key by key, anything else
    #  replaced ...); chains allowed, no circles"
    text = TOML.replace('file = "wechat-1.jsonl"', "").replace('recording = { file = "wechat-2.jsonl" }', "")
    text += '''
[channels.wechat-3]
like = "wechat-2"
merchant_no = "1900000111"
signing = { verify_replies = false }
'''
    configs = {c.name: c for c in load_config(text)}
    three = configs["wechat-3"]
    assert three.merchant_no == "1900000111"
    assert three.base_url == "http://127.0.0.1:8802"              # from wechat-2
    assert three.credentials.key == "8934e7d15453e97507ef794cf7b0519d"
    assert three.signing.method == "md5"                          # table merged key by key
    assert three.signing.verify_replies is False
    assert three.operations["pay"] == configs["wechat-1"].operations["pay"]


def test_simulated_faults_table(world) -> None:
    # "`faults`: `"none"` ..., `"default"`, or a table of `payengine.sim.channel.ChannelFaults` fields"
    text = '''
[channels.sim-x]
kind = "simulated"
wallet = "wechat"
merchant_no = "x"
credentials = { key = "simulated-wallet-key-000x" }
simulated = { seed = 3, faults = { user_never_pays = 1.0, callback_delay_ms = [10, 20] } }
'''
    (channel,) = load_channels(text, world=world.runtime)
    engine = world.open([channel], policy=OrderPolicy(pay_window_ms=2_000, query_schedule_ms=(100,) * 5))
    channel.attach(engine)
    receipt = engine.submit(PaymentRequest("station-42", uniq(), "alice", "CNY", 100, "t",
                                           cash=CashPart(100, "sim-x")))
    wait_for(lambda: engine.get_order(receipt.order_id).state == "closed", "never paid: closed")
    with pytest.raises(ConfigError):
        load_config(text.replace("user_never_pays = 1.0", "user_never_pays = 1.5"))
    with pytest.raises(ConfigError):
        load_config(text.replace("user_never_pays = 1.0", "user_never_pay = 0.5"))
