"""Channel data in and out (issue 11, item 1): what a channel needs besides the amount
(``PayDetails``) reaches it, and what the pay reply gives for the payer (``Prepay``) is kept
with the order and shown while the payer pays."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from payengine import (
    CashPart,
    ChannelReply,
    Engine,
    IdempotencyConflict,
    InvalidRequest,
    OrderPolicy,
    PayDetails,
    PaymentRequest,
    PayScenario,
    Prepay,
    UnknownOrder,
)
from payengine.engine.channel_data import (
    check_pay_details,
    check_prepay,
    details_from_json,
    details_json,
    prepay_from_json,
    prepay_json,
)
from payengine.engine.codes import ResultKind
from payengine.engine.order import (
    Activate,
    CashResult,
    LegStatus,
    PayCash,
    ResultSource,
    build_order,
    decide,
)
from tests.helpers import PROCESSING, ScriptedChannel, paid_reply, signed_callback, wait_for

POLICY = OrderPolicy()
JSAPI = PayDetails(PayScenario.JSAPI, payer_id="openid-42", device_id="pump-3")
QR = Prepay(code_url="weixin://wxpay/bizpayurl?pr=abc")


class DetailedChannel(ScriptedChannel):
    """A scripted channel whose ``pay`` takes the details and records them."""

    def __init__(self, name: str = "wechat") -> None:
        super().__init__(name)
        self.details_seen: list[PayDetails | None] = []
        self._seen_lock = threading.Lock()

    def pay(self, payment_serial: str, amount_minor: int, currency: str, title: str,
            details: PayDetails | None = None) -> ChannelReply:
        with self._seen_lock:
            self.details_seen.append(details)
        return super().pay(payment_serial, amount_minor, currency, title)


def request(no: str = "o-1", details: PayDetails | None = JSAPI,
            channel: str = "wechat") -> PaymentRequest:
    return PaymentRequest("station-1", no, "u1", "CNY", 9_600, "Fuel",
                          CashPart(9_600, channel, details))


def open_engine(path: Path, *channels: Any) -> Engine:
    return Engine.open(path, channels=list(channels))


# ---------------------------------------------------------------- checks


@pytest.mark.parametrize(("details", "complaint"), [
    (PayDetails(PayScenario.JSAPI), "needs payer_id"),
    (PayDetails(PayScenario.BARCODE), "needs auth_code"),
    (PayDetails(PayScenario.H5), "needs client_ip"),
    (PayDetails(PayScenario.BARCODE, auth_code="12345"), "10 to 32 digits"),
    (PayDetails(PayScenario.BARCODE, auth_code="13467007045764711x"), "10 to 32 digits"),
    (PayDetails(PayScenario.H5, client_ip="300.1.1.1"), "IPv4 or IPv6"),
    (PayDetails(notify_url="not a url"), "must be a URL"),
    (PayDetails(notify_url="https://x/" + "a" * 600), "must be a URL"),
    (PayDetails(device_id="pump\n3"), "device_id"),
    (PayDetails("jsapi", payer_id="o"), "PayScenario"),  # type: ignore[arg-type]
])
def test_details_a_scenario_cannot_use_are_refused_with_the_field_named(
        details: PayDetails, complaint: str) -> None:
    with pytest.raises(InvalidRequest, match=complaint):
        check_pay_details(details)


def test_well_formed_details_of_every_scenario_are_taken() -> None:
    for details in (PayDetails(), PayDetails(PayScenario.APP),
                    PayDetails(PayScenario.BARCODE, auth_code="134670070457647112"),
                    PayDetails(PayScenario.H5, client_ip="2001:db8::1",
                               notify_url="https://station.example/notify"),
                    JSAPI):
        assert check_pay_details(details) is details


@pytest.mark.parametrize("prepay", [
    Prepay(code_url="no scheme"), Prepay(deeplink="https://a b"), Prepay(user_action=""),
    Prepay(prepay_id="x" * 200), Prepay(user_action="a" * 65),
])
def test_a_malformed_prepay_from_an_adapter_is_refused(prepay: Prepay) -> None:
    with pytest.raises(InvalidRequest):
        check_prepay(prepay)


ids = st.text(st.characters(min_codepoint=33, max_codepoint=0x2FF), min_size=1, max_size=20)
details_strategy = st.builds(
    PayDetails, st.sampled_from(PayScenario), st.none() | ids,
    st.none() | st.from_regex(r"[0-9]{10,32}", fullmatch=True),
    st.none() | st.ip_addresses().map(str), st.none() | st.just("https://n.example/cb"),
    st.none() | ids)


@given(details_strategy)
def test_details_survive_their_stored_form(details: PayDetails) -> None:
    stored = json.loads(json.dumps(details_json(details)))
    assert details_from_json(stored) == details


@given(st.builds(Prepay, st.none() | ids, st.none() | st.just("weixin://qr/1"),
                 st.none() | st.just("https://h5.example/p"), st.none() | ids))
def test_a_prepay_survives_its_stored_form(prepay: Prepay) -> None:
    assert prepay_from_json(json.loads(json.dumps(prepay_json(prepay)))) == prepay


def test_a_request_without_details_keeps_the_digest_it_had_before_details_existed() -> None:
    plain = request(details=None)
    before = json.dumps(["station-1", "o-1", "u1", "CNY", 9_600, "Fuel", None,
                         [9_600, "wechat"], []], ensure_ascii=True, separators=(",", ":"))
    assert plain.fingerprint() == hashlib.sha256(before.encode()).hexdigest()
    assert request(details=JSAPI).fingerprint() != plain.fingerprint()
    assert request(details=PayDetails(PayScenario.JSAPI, payer_id="other")).fingerprint() != (
        request(details=JSAPI).fingerprint())


# ---------------------------------------------------------------- the core


def _paying(details: PayDetails | None = JSAPI) -> Any:
    order = build_order(request(details=details), order_id="o1", payment_serial="s1",
                        now_ms=0, accounts={}, policy=POLICY)
    decision = decide(order, Activate(), now_ms=1, policy=POLICY)
    return decision


def test_the_pay_effect_carries_the_requests_details() -> None:
    decision = _paying()
    pays = [e for e in decision.effects if isinstance(e, PayCash)]
    assert [p.details for p in pays] == [JSAPI]
    assert decision.order.pay_details == JSAPI


@pytest.mark.parametrize("source", [ResultSource.SYNC, ResultSource.QUERY])
def test_a_prepay_in_an_answer_to_the_engines_own_call_is_kept(source: ResultSource) -> None:
    order = _paying().order
    decision = decide(order, CashResult(ResultKind.PROCESSING, source, "USERPAYING",
                                        prepay=QR), now_ms=2, policy=POLICY)
    assert decision.order.prepay == QR
    assert decision.order.version == order.version + 1  # stored, so polling sees it


@pytest.mark.parametrize("source", [ResultSource.NOTIFICATION, ResultSource.CALLBACK,
                                    ResultSource.RECONCILIATION, ResultSource.CLOSE])
def test_a_prepay_from_anything_but_the_engines_own_call_is_not_kept(
        source: ResultSource) -> None:
    order = _paying().order
    decision = decide(order, CashResult(ResultKind.PROCESSING, source, "USERPAYING",
                                        prepay=QR), now_ms=2, policy=POLICY)
    assert decision.order.prepay is None


def test_a_prepay_arriving_after_the_cash_was_paid_is_not_kept() -> None:
    order = decide(_paying().order, CashResult(ResultKind.SUCCESS, ResultSource.SYNC, "SUCCESS",
                                               "TX1", 9_600), now_ms=2, policy=POLICY).order
    assert order.cash_leg is not None and order.cash_leg.status is LegStatus.PAID
    late = decide(order, CashResult(ResultKind.PROCESSING, ResultSource.QUERY, "USERPAYING",
                                    prepay=QR), now_ms=3, policy=POLICY)
    assert late.order.prepay is None


# ---------------------------------------------------------------- the engine


def test_the_channel_gets_the_details_and_polling_shows_its_prepay_until_paid(
        tmp_path: Path) -> None:
    channel = DetailedChannel()
    channel.pay_reply = ChannelReply("SUCCESS", "USERPAYING", prepay=QR)
    engine = open_engine(tmp_path / "a.db", channel)
    try:
        receipt = engine.submit(request())
        shown = wait_for(lambda: engine.get_order(receipt.order_id).prepay, what="prepay")
        assert shown == QR
        assert channel.details_seen == [JSAPI]
        signed_callback(engine, "wechat", receipt.payment_serial,
                        paid_reply(receipt.payment_serial, 9_600))
        view = wait_for(lambda: (v := engine.get_order(receipt.order_id)).settled and v,
                        what="settled")
        assert view.state == "succeeded" and view.prepay is None
    finally:
        engine.shutdown()


def test_details_and_prepay_survive_a_restart_and_a_repeated_pay_sends_the_same(
        tmp_path: Path) -> None:
    channel = DetailedChannel()
    channel.pay_reply = ChannelReply("SUCCESS", "USERPAYING", prepay=QR)
    engine = open_engine(tmp_path / "a.db", channel)
    receipt = engine.submit(request())
    wait_for(lambda: engine.get_order(receipt.order_id).prepay, what="prepay")
    engine.shutdown()
    engine = open_engine(tmp_path / "a.db", channel)
    try:
        assert engine.get_order(receipt.order_id).prepay == QR
        assert engine.store.load_order(receipt.order_id).pay_details == JSAPI  # type: ignore[union-attr]
        assert all(seen == JSAPI for seen in channel.details_seen)
    finally:
        engine.shutdown()


def test_a_retry_with_other_details_is_an_idempotency_conflict(tmp_path: Path) -> None:
    engine = open_engine(tmp_path / "a.db", DetailedChannel())
    try:
        engine.submit(request())
        with pytest.raises(IdempotencyConflict):
            engine.submit(request(details=PayDetails(PayScenario.JSAPI, payer_id="other")))
        assert engine.submit(request()).merchant_order_no == "o-1"
    finally:
        engine.shutdown()


def test_a_channel_with_a_four_argument_pay_still_works_and_is_refused_details(
        tmp_path: Path) -> None:
    legacy = ScriptedChannel()  # pay(serial, amount, currency, title)
    engine = open_engine(tmp_path / "a.db", legacy)
    try:
        with pytest.raises(InvalidRequest, match="takes no pay details"):
            engine.submit(request("o-1"))
        with pytest.raises(UnknownOrder):  # nothing was created for it
            engine.find_order("station-1", "o-1")
        receipt = engine.submit(request("o-2", details=None))
        wait_for(lambda: legacy.count("pay") == 1, what="pay")
        assert engine.get_order(receipt.order_id).state == "paying"
    finally:
        engine.shutdown()


def test_a_malformed_prepay_from_the_adapter_is_neither_kept_nor_believed(
        tmp_path: Path) -> None:
    channel = DetailedChannel()
    channel.pay_reply = ChannelReply("SUCCESS", "SUCCESS", "TX1", 9_600,
                                     prepay=Prepay(code_url="javascript alert(1)"))
    channel.query_reply = PROCESSING
    engine = open_engine(tmp_path / "a.db", channel)
    try:
        receipt = engine.submit(request())
        wait_for(lambda: channel.count("pay") == 1, what="pay")
        # the reply was classified on the I/O lane; its result is in the order's mailbox
        # before this ask, so the view below is the order after it
        wait_for(lambda: engine.store.load_order(receipt.order_id).legs[0].channel_code  # type: ignore[union-attr]
                 is not None, what="the reply applied")
        view = engine.get_order(receipt.order_id)
        assert view.prepay is None
        assert view.state == "paying"  # a reply that does not check is "processing: query"
        assert view.legs[0].channel_txn_id is None  # its "success" was not believed
    finally:
        engine.shutdown()



def test_the_payment_code_is_kept_only_while_the_cash_may_still_be_paid(tmp_path: Path) -> None:
    """A barcode is a one-time bearer credential: stored to re-send a pay after a crash,
    masked to its last four digits once the cash leg left ``paying``."""
    barcode = PayDetails(PayScenario.BARCODE, auth_code="134670070457647112")
    channel = DetailedChannel()
    engine = open_engine(tmp_path / "a.db", channel)
    try:
        receipt = engine.submit(request(details=barcode))
        wait_for(lambda: channel.count("pay") == 1, what="pay")
        stored = engine.store.load_order(receipt.order_id)
        assert stored is not None and stored.pay_details == barcode  # still paying
        signed_callback(engine, "wechat", receipt.payment_serial,
                        paid_reply(receipt.payment_serial, 9_600))
        wait_for(lambda: engine.get_order(receipt.order_id).settled, what="settled")
        stored = engine.store.load_order(receipt.order_id)
        assert stored is not None and stored.pay_details is not None
        assert stored.pay_details.auth_code == "**************7112"
        assert channel.details_seen == [barcode]
    finally:
        engine.shutdown()
