"""Every message exchanged with a channel is recorded, bounded, its secrets redacted; a
recording replays as a channel (regression against recorded messages)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from payengine import (
    CashPart,
    Engine,
    HttpChannel,
    NotificationRejected,
    OrderPolicy,
    PayDetails,
    PaymentRequest,
    PayScenario,
    RecordedChannel,
    load_channels,
    load_config,
    read_records,
    replay_mismatches,
)
from payengine.actors.adapters import Recording
from payengine.actors.adapters.recording import NotRecorded, Recorder, Redactor
from payengine.engine.codes import CodeTable
from tests.channel_configs import KEY_1, KEY_2, MERCHANT_1, MERCHANT_2, readme_toml_at
from tests.helpers import wait_for
from tests.wallet_server import ScriptedWallet, serve

_PATIENT_MS = (100, 200) + (500,) * 98
FAST = OrderPolicy(pay_window_ms=60_000, query_schedule_ms=(100, 200, 400, 800),
                   refund_query_schedule_ms=_PATIENT_MS,
                   channel_query_schedules_ms=(("wechat-1", _PATIENT_MS),))
"""wechat-1's query schedule (the README's 1, 2, 5, 10, 30 s) and the refund re-asks replaced
by short gaps that last long enough (about 49 s) for a busy machine: how many queries a run
needs varies with the load, never whether it ends."""
WAIT_S = 60.0
"""How long a step of a live run may take on a busy machine (a wait ends as soon as it can)."""
REPLAY = OrderPolicy(pay_window_ms=60_000,
                     channel_query_schedules_ms=(("wechat-1", (20,) * 100),))
"""A replay walks through the recorded answers at once: at most 100 queries, more than any
serial of a live run within its waits was asked."""
AUTH_CODE = "134567890123456789"


@pytest.fixture(autouse=True)
def _recordings_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A configuration given as text records to a file relative to the current folder:
    keep it out of the repository (a run used to leave, and commit, ./wechat-1.jsonl)."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def wallet() -> ScriptedWallet:
    return ScriptedWallet({MERCHANT_1: KEY_1, MERCHANT_2: KEY_2})


@pytest.fixture
def url(wallet: ScriptedWallet) -> Iterator[str]:
    with serve(wallet) as base:
        yield base


def _run_payments(tmp_path: Path, wallet: ScriptedWallet, url: str) -> tuple[Path, dict[str, str]]:
    """A live run through wechat-1: a barcode payment paid (query), a refund, one never
    paid and closed. Returns the config file and each order's final state."""
    path = tmp_path / "channels.toml"
    path.write_text(readme_toml_at(url), encoding="utf-8")
    channels = load_channels(path)
    engine = Engine.open(tmp_path / "live.db", channels=channels, policy=FAST)
    states = {}
    try:
        paid = engine.submit(PaymentRequest("s", "paid", "u1", "CNY", 500, "fuel", cash=CashPart(
            500, "wechat-1", PayDetails(PayScenario.BARCODE, auth_code=AUTH_CODE))))
        unpaid = engine.submit(PaymentRequest("s", "unpaid", "u2", "CNY", 700, "fuel",
                                              cash=CashPart(700, "wechat-1")))
        for receipt in (paid, unpaid):
            wait_for(lambda r=receipt: engine.get_order(r.order_id).prepay, timeout_s=WAIT_S,
                     what="prepay")
        serial = engine.get_order(paid.order_id).payment_serial
        wallet.user_pays(serial)
        wait_for(lambda: engine.get_order(paid.order_id).state == "succeeded", timeout_s=WAIT_S,
                 what="paid")
        engine.refund(paid.order_id, "rf-1", 200)
        wait_for(lambda: wallet.trades[serial].refunds, timeout_s=WAIT_S, what="refund sent")
        wallet.refund_done(serial, next(iter(wallet.trades[serial].refunds)))
        wait_for(lambda: engine.get_order(paid.order_id).refunds[0].status == "succeeded",
                 timeout_s=WAIT_S, what="refund done")
        engine.request_close(unpaid.order_id)
        wait_for(lambda: engine.get_order(unpaid.order_id).state == "closed",
                 timeout_s=WAIT_S, what="closed")
        # the wallet's close runs on the channel's lane after the order closed: its record
        # is written when the call returned
        wechat_1 = next(c for c in channels if c.name == "wechat-1")
        assert isinstance(wechat_1, HttpChannel)
        wait_for(lambda: any(r["operation"] == "close" for r in wechat_1.recorder.records()),
                 timeout_s=WAIT_S, what="the close recorded")
        states = {"paid": engine.get_order(paid.order_id).state,
                  "unpaid": engine.get_order(unpaid.order_id).state}
    finally:
        engine.shutdown()
    return path, states


def test_records_are_redacted_in_memory_and_in_the_file(
        tmp_path: Path, wallet: ScriptedWallet, url: str) -> None:
    _path, _ = _run_payments(tmp_path, wallet, url)
    text = (tmp_path / "wechat-1.jsonl").read_text(encoding="utf-8")
    records = read_records(tmp_path / "wechat-1.jsonl")
    assert {r["operation"] for r in records} >= {"pay", "query", "refund", "query_refund",
                                                 "close"}
    assert KEY_1 not in text
    assert AUTH_CODE not in text and "13**************89" in text
    pay = next(r for r in records if r["operation"] == "pay")
    assert pay["request"]["body"]["sign"] == "***" and pay["reply"]["body"]["sign"] == "***"
    assert pay["status"] == 200 and pay["duration_ms"] >= 0 and pay["channel"] == "wechat-1"
    assert pay["result"]["prepay"] is not None
    assert all(KEY_1 not in json.dumps(r, default=str) for r in records)
    assert not (tmp_path / "wechat-2.jsonl").exists()  # the other merchant number: untouched


def test_redaction_covers_headers_named_fields_and_secrets_in_any_text() -> None:
    redactor = Redactor(["s3cret-key"], ["openid", "sign"], ["X-Sign"])
    assert redactor.value({"openid": "o1", "nested": [{"sign": "AB"}], "note": "s3cret-key!",
                           "auth_code": "12"}) == {
        "openid": "***", "nested": [{"sign": "***"}], "note": "***!", "auth_code": "***"}
    assert redactor.header_values({"x-sign": "AB", "Authorization": "Bearer t",
                                   "Accept": "s3cret-key"}) == {
        "x-sign": "***", "Authorization": "***", "Accept": "***"}


def test_the_ring_is_bounded_and_the_file_rotates(tmp_path: Path) -> None:
    recorder = Recorder("w", Recording(keep=3, file="w.jsonl", file_bytes_max=2_048),
                        Redactor([], [], []), tmp_path)
    for i in range(40):
        recorder.record({"operation": "query", "serial": f"P{i}", "status": 200,
                         "reply": {"body": {"x": "y" * 50}}})
    assert [r["serial"] for r in recorder.records()] == ["P37", "P38", "P39"]
    assert (tmp_path / "w.jsonl.1").exists()
    assert (tmp_path / "w.jsonl").stat().st_size <= 2_048
    kept = read_records(tmp_path / "w.jsonl")
    assert kept[-1]["serial"] == "P39" and len(kept) < 40


def test_a_recording_replays_as_the_channel_and_reproduces_the_run(
        tmp_path: Path, wallet: ScriptedWallet, url: str) -> None:
    path, states = _run_payments(tmp_path, wallet, url)
    assert states == {"paid": "succeeded", "unpaid": "closed"}
    config = {c.name: c for c in load_config(path)}["wechat-1"]
    records = read_records(tmp_path / "wechat-1.jsonl")
    assert replay_mismatches(records, config) == []
    for remap in (True, False):  # mapped again through the config, or as recorded
        channel = RecordedChannel.from_file(tmp_path / "wechat-1.jsonl", config=config,
                                            remap=remap)
        for record in records:
            if record["operation"] == "notification" or record.get("error"):
                continue
            assert channel.replay(record) == channel.replay(record)
        pay = next(r for r in records if r["operation"] == "pay")
        reply = channel.pay(pay["serial"], 500, "CNY", "fuel")
        assert reply.prepay is not None and reply.result_code == "NOTPAY"
    # the same payments, replayed through a new engine with the same ids, end the same
    # the paid order's serial is the refunded one (the two pay calls run at once on the
    # channel's lane: the order of their records is the order they were answered in)
    paid_serial = next(str(r["serial"]) for r in records if r["operation"] == "refund")
    engine = Engine.open(tmp_path / "replay.db", channels=[
        RecordedChannel.from_file(tmp_path / "wechat-1.jsonl", config=config)],
        policy=REPLAY, ids=_Serials([paid_serial]))
    try:
        paid = engine.submit(PaymentRequest("s", "paid", "u1", "CNY", 500, "fuel", cash=CashPart(
            500, "wechat-1", PayDetails(PayScenario.BARCODE, auth_code=AUTH_CODE))))
        wait_for(lambda: engine.get_order(paid.order_id).state == "succeeded",
                 timeout_s=WAIT_S, what="paid, replayed")
    finally:
        engine.shutdown()


class _Serials:
    """Ids for a replay: the recorded payment serials given, in that order."""

    def __init__(self, serials: list[str]) -> None:
        self.serials = list(serials)
        self.n = 0

    def new_order_id(self) -> str:
        self.n += 1
        return f"ord-{self.n}"

    def new_payment_serial(self) -> str:
        return self.serials.pop(0)

    def new_hold_id(self) -> str:
        return f"hold-{time.monotonic_ns()}"


def test_a_changed_code_table_shows_as_replay_mismatches(
        tmp_path: Path, wallet: ScriptedWallet, url: str) -> None:
    path, _ = _run_payments(tmp_path, wallet, url)
    config = {c.name: c for c in load_config(path)}["wechat-1"]
    records = read_records(tmp_path / "wechat-1.jsonl")
    pay_op = config.operations["pay"]
    assert pay_op.reply is not None
    changed = replace(config, operations={**config.operations, "pay": replace(
        pay_op, reply=replace(pay_op.reply, rename_result={}))})
    problems = replay_mismatches(records, changed)
    assert problems and all("pay" in line for line in problems)
    # a code table is the engine's reading; replay gives the same replies, the engine
    # classifies them by the channel's table
    strict = replace(config, pay_codes=CodeTable("wechat-1", frozenset({"SUCCESS"}),
                                                 frozenset({"SUCCESS"}), frozenset()))
    assert replay_mismatches(records, strict) == []


def test_a_call_never_recorded_and_recorded_errors_raise() -> None:
    records = [
        {"v": 1, "channel": "w", "operation": "query", "serial": "P1", "status": None,
         "error": "TimeoutError: the channel call timed out", "result": None},
        {"v": 1, "channel": "w", "operation": "query", "serial": "P1", "status": 200,
         "result": {"return_code": "SUCCESS", "result_code": "SUCCESS",
                    "channel_txn_id": "T1", "amount_minor": 5, "currency": None,
                    "prepay": None}},
    ]
    channel = RecordedChannel(records)
    assert channel.name == "w"
    with pytest.raises(TimeoutError):
        channel.query("P1")
    assert channel.query("P1").channel_txn_id == "T1"
    assert channel.query("P1").channel_txn_id == "T1"  # the last answer repeats
    assert channel.query_charge("P1", "T1").amount_minor == 5  # falls back to query
    with pytest.raises(NotRecorded):
        channel.query("P2")
    with pytest.raises(NotificationRejected) as rejected:
        channel.verify_notification(b"{}", {})
    assert rejected.value.reason == "bad_signature"


def test_notifications_are_recorded_and_verified_by_a_configured_replay(
        tmp_path: Path, wallet: ScriptedWallet, url: str) -> None:
    path = tmp_path / "channels.toml"
    path.write_text(readme_toml_at(url), encoding="utf-8")
    channel = load_channels(path)[0]
    assert isinstance(channel, HttpChannel)
    channel.pay("P1", 100, "CNY", "fuel")
    wallet.user_pays("P1")
    body, headers = wallet.notification("P1")
    assert channel.verify_notification(body, headers).reply.result_code == "SUCCESS"
    with pytest.raises(NotificationRejected):
        channel.verify_notification(body.replace(b"P1", b"P2"), headers)
    notes = [r for r in channel.recorder.records() if r["operation"] == "notification"]
    assert len(notes) == 2 and notes[0]["kind"] == "payment"
    assert "bad_signature" in notes[1]["error"]
    replayed = RecordedChannel.from_recorder(channel.recorder, config=channel.config)
    assert replayed.verify_notification(body, headers).payment_serial == "P1"


def test_an_auth_code_sent_under_another_name_is_masked_too(url: str) -> None:
    """The payer's payment code is masked wherever it appears: in the field a template
    sends it in (whatever its name), and as text anywhere else in the exchange."""
    toml = readme_toml_at(url, **{'auth_code = "{auth_code}"': 'dynamic_id = "{auth_code}"\n'
                                  'remark = "code {auth_code}"'})
    channel = load_channels(toml)[0]
    assert isinstance(channel, HttpChannel)
    channel.pay("P1", 100, "CNY", "fuel", PayDetails(PayScenario.BARCODE, auth_code=AUTH_CODE))
    (record,) = channel.recorder.records()
    assert AUTH_CODE not in json.dumps(record, default=str)
    assert record["request"]["body"]["dynamic_id"] == "13**************89"
    assert record["request"]["body"]["remark"] == "code 13**************89"
