"""Signed merchant requests (issue 11 item 5): the wire format, every refusal, nonces."""

from __future__ import annotations

import hashlib
import hmac
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from payengine import (
    CashPart,
    Engine,
    EngineConfig,
    IllegalTransition,
    InvalidRequest,
    LegMode,
    MerchantRequestConfig,
    MerchantSigner,
    Overloaded,
    PaymentRequest,
    RequestRejected,
    UnknownOrder,
    VoucherPart,
)
from payengine.actors import merchant_auth
from payengine.engine.channel_data import PayDetails, PayScenario
from payengine.engine.merchant_request import (
    NONCE_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    CloseOp,
    PayOp,
    QueryOp,
    RefundOp,
    check_timestamp,
    encode_pay,
    parse_body,
    parse_envelope,
    string_to_sign,
)
from payengine.engine.order import OrderPolicy
from payengine.sim.runtime import Scheduler, SimRuntime
from tests.helpers import (
    SLOW_POLICY,
    ScriptedChannel,
    fund_customer,
    open_engine,
    paid_order,
    wait_for,
)

SECRET = "station-42-request-key-0123456789abcdef"
OTHER_SECRET = "someone-else-entirely-0123456789abcdef"
NONCE = "0123456789abcdef0123456789abcdef"
STAMP = 1_764_000_000_000
KAT_BODY = (b'{"op":"pay","merchant_order_no":"pump3-000187","user_id":"alice","currency":"CNY",'
            b'"total_minor":10000,"title":"Fuel","cash":{"amount_minor":10000,"channel":"wechat"}}')

RSA_PRIVATE_PEM = """\
-----BEGIN PRIVATE KEY-----
MIIEvgIBADANBgkqhkiG9w0BAQEFAASCBKgwggSkAgEAAoIBAQDDlLJdF8MQhm3A
QW8InhLSrS8b4tZQqpLkEMiOGmFCfp8sgI9K1wk4mavP63RU7Zs6y79BOKVzKuM6
qgDd0C7PPUBmlbKxFVoF4mpnK5JaSC7u7eU/6I4J67gUbW5l53sc8HRdEszJgYha
TnjDRt+6okZHOJP1szVUqc9WXhS1jsBYNhVDGOPKWXmYp0PpkhMj1ZuXUXkGZF42
wYSZOZwY+xdwP1wSuuRadOmLG69T+IW3aUMrEcJ2LbA5cTGkDNpOZ3H9Vaw3/ZBN
sx9GfJH341ArkTWa1HE8MPfPtDd6Uvv2rGX2zDDB/yMsqV7bwG0sAbxFrUtNyX2c
0rbhmD9xAgMBAAECggEAEcbguscaTaoNAhC7K7sudnlo/ZhjJtGHk3TrvcWBD0my
Dxn1AaDvr3YsSzREDnogW2TskobjEZzq1XNhVnKskTKojrUkQ6XvWPc+Tk1ZZUey
rbia10cR2K3/vSpAgsEFDC7WQiV0zrYC3kPMBI0wcGbSi3kFiIDMTqXhTiDesgJ0
JCWVC61qFwl6e4G/pZcQ86ptZaxm2oMy0oGANqEKYou4Zibz7DlcNdAcenOkr8of
5G94zF1t6J7rPWQGU3A8MvJ+VLxNWPPY3t45kmzIOlutaCt5n/bRHzUyW6syiLt/
rFEsLQMDbaga4uOuMIRRf4c9eIKIG4yt/GViG6WMxwKBgQD+cELV+idAKnPV+x5U
dfL3oRmwwde+8mGM2NeEVneWSDccGhD38f5C8719oR6FO3yAB59dKsloOaij49XK
bsAie/0eS+opxCteoUIcmNO2O+imogOoqdJMtC1W0Vv3Z4GMhq0u5M/v8jkjV+M2
LyQEgHNw6Ag32bZX6xS87JVHGwKBgQDEx/dvrc2DfOeSe6N1jOdVcHej612ywvpQ
0w88wg5IY3ddiOgAKI+EDGc6+7m+Yv+VwORIYT2eRa5VHXKd7rAO2OzRfOP9IzYk
WVfxnEoPtSK/UX0kgWyPwUe20RTkKIio5Z8OlD6EcO5zvL2THByKbVaKWboM4byg
z0lVJLVAYwKBgQC/WKGK1hOKl+KBO9b1YbaVL9xoJ38epJ1kFPcPGQ/aPvji819r
d9vlcfRBdFfFjpT0m8bng/Pvo90FU6RGFr/7rw8OJ700J8kN42waoXwmAivWlOT3
hK8Y7C9kqRHmnzq3+dhn+b+/DYSW5dODvjPyBr/KW1VC20HcIHh6E9m3nQKBgGTm
+JzebSRANuoo1c9f+fsYmXCHLtuMGRi6sPSBuRsrTbi7i+MQ6U5XodNf4oWac94R
M71dh2AR8OuaFvyeuM5UM1LUDH/vv0JyQaMVdfCJ/BBIM7g1WTp5bFF08pZvpmuc
mqu6HjiBQ/Q60qaNYqEkoZx9l+YlFjkLMVokYYBrAoGBAMilQHzeHdqlzxnFgyfl
Pi916TsUati71/zQJ6fyXsniGuYRC+u3X4NaI2In+kfnQwIcnIt9fYWIcDB9s9rv
6fLB6mIab3ZNQEn4Qn+C20DUt84tfPAJQW2HyN68auKnhZXKrb++PLphg/Ijcaog
WhPpmlNpquHrSLGPoFdT2Y1T
-----END PRIVATE KEY-----
"""
RSA_KAT_SIGNATURE = (
    "GoR4Q2VA5B1HD+Qk3xTZ++hmk/NoxPvYiiK/jCaLhhxuziFOCegmX2+5M8XYbVTW8MI2Tq194kkmcX4dDiG8Aupp"
    "PsWlSYhbGc7yz9N3YZDPDukgncteIZ6ShFgH8l0jFjEl17ZV0BvXDrU7jlt2xXVBG9WZy5ezB6AqnCOj65fnrP3m"
    "Ad8CBPk9PVGdcjuXHshdMoOXWdgxTvwxjwsErWceLI7CytKcmE0usHCTY2ILqD3zTj907I0Kej1G3IuG61E7iXeH"
    "07zIQ4LzgISI+tGmPMI2oDM2yn6TJcrD/7lveI2Bg9FC407xtn++YHn1lE4uVJhfoFq09KoECnTXOQ==")

needs_rsa = pytest.mark.skipif(not merchant_auth.rsa_available(),
                               reason="the optional 'cryptography' package is not installed")


def public_pem() -> str:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(RSA_PRIVATE_PEM.encode(), password=None)
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def pay_request(no: str, user: str = "alice", total: int = 1_000, **kw: object) -> PaymentRequest:
    return PaymentRequest("station-42", no, user, "CNY", total, "Fuel",
                          cash=CashPart(total, "wechat"), **kw)  # type: ignore[arg-type]


def order_count(engine: Engine) -> int:
    return sum(engine.store.count_orders_by_state().values())


def nonce_rows(engine: Engine) -> int:
    with engine.store._read(snapshot=False) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM request_nonces").fetchone()[0])


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = open_engine(tmp_path / "signed.db", ScriptedChannel())
    engine.register_merchant_key("station-42", secret=SECRET)
    yield engine
    engine.shutdown()


@pytest.fixture
def signer() -> MerchantSigner:
    return MerchantSigner("station-42", secret=SECRET)


class Clocked:
    """An engine on a clock the test moves (the simulator's scheduler, never run)."""

    def __init__(self, path: Path, config: MerchantRequestConfig | None = None) -> None:
        self.scheduler = Scheduler(seed=1)
        self.path = path
        self.config = config or MerchantRequestConfig()
        self.engine = self.open()

    def open(self) -> Engine:
        return Engine.open(self.path, channels=[ScriptedChannel()], policy=SLOW_POLICY,
                           runtime=SimRuntime(self.scheduler),
                           config=EngineConfig(duplicate_guard_window_ms=0,
                                               merchant_requests=self.config))

    @property
    def now_ms(self) -> int:
        return self.scheduler.now_ms

    def advance(self, ms: int) -> None:
        self.scheduler.now_ms += ms


# --------------------------------------------------------------------------- the wire format


def test_the_string_to_sign_is_the_version_line_the_envelope_and_the_exact_body() -> None:
    assert string_to_sign("HMAC-SHA256", "station-42", STAMP, NONCE, b'{"a":1}') == (
        b"payengine-request-v1\nHMAC-SHA256\nstation-42\n1764000000000\n"
        b"0123456789abcdef0123456789abcdef\n{\"a\":1}")


def test_a_known_hmac_request_has_its_known_signature() -> None:
    headers = MerchantSigner("station-42", secret=SECRET).sign(
        KAT_BODY, timestamp_ms=STAMP, nonce=NONCE)
    assert headers == {
        "X-Payengine-Merchant-Id": "station-42", "X-Payengine-Timestamp": "1764000000000",
        "X-Payengine-Nonce": NONCE, "X-Payengine-Sign-Type": "HMAC-SHA256",
        "X-Payengine-Signature":
            "b2f452469cecc188287f160de0615d1b0e29bf019960c5b348e37795d59a7013"}
    # ... and it is the plain HMAC-SHA256 any language computes over the string to sign
    expected = hmac.new(SECRET.encode(), b"payengine-request-v1\nHMAC-SHA256\nstation-42\n"
                        b"1764000000000\n" + NONCE.encode() + b"\n" + KAT_BODY,
                        hashlib.sha256).hexdigest()
    assert headers["X-Payengine-Signature"] == expected


@needs_rsa
def test_a_known_rsa_request_has_its_known_signature_and_verifies() -> None:
    body = b'{"op":"query","merchant_order_no":"pump3-000187"}'
    headers = MerchantSigner("station-43", private_key_pem=RSA_PRIVATE_PEM).sign(
        body, timestamp_ms=STAMP, nonce=NONCE)
    assert headers["X-Payengine-Sign-Type"] == "RSA-SHA256"
    assert headers["X-Payengine-Signature"] == RSA_KAT_SIGNATURE  # PKCS#1 v1.5 is deterministic
    message = string_to_sign("RSA-SHA256", "station-43", STAMP, NONCE, body)
    assert merchant_auth.rsa_signature_matches(public_pem(), message, RSA_KAT_SIGNATURE)
    assert not merchant_auth.rsa_signature_matches(public_pem(), message + b" ",
                                                   RSA_KAT_SIGNATURE)


def _headers(**changes: str | None) -> dict[str, str]:
    headers = MerchantSigner("station-42", secret=SECRET).sign(KAT_BODY, timestamp_ms=STAMP,
                                                               nonce=NONCE)
    for name, value in changes.items():
        key = "X-Payengine-" + name.replace("_", "-")
        if value is None:
            del headers[key]
        else:
            headers[key] = value
    return headers


@pytest.mark.parametrize("headers", [
    _headers(Merchant_Id=None), _headers(Timestamp=None), _headers(Nonce=None),
    _headers(Sign_Type=None), _headers(Signature=None),
    _headers(Timestamp="-1"), _headers(Timestamp="1.5e12"), _headers(Timestamp=" 1764000000000"),
    _headers(Timestamp="99999999999999999"), _headers(Nonce="short"),
    _headers(Nonce="has space 0123456789"), _headers(Nonce="x" * 65),
    _headers(Sign_Type="HMAC-MD5"), _headers(Sign_Type="hmac-sha256"),
    _headers(Signature="B2F452469CECC188287F160DE0615D1B0E29BF019960C5B348E37795D59A7013"),
    _headers(Signature="b2f4"), _headers(Merchant_Id=""), _headers(Merchant_Id="a\nb"),
], ids=lambda h: ",".join(sorted(h))[:60])
def test_a_missing_or_misshapen_header_is_malformed(headers: dict[str, str]) -> None:
    with pytest.raises(RequestRejected) as caught:
        parse_envelope(headers)
    assert caught.value.reason == "malformed"
    assert caught.value.code == "request_rejected"


def test_header_names_are_read_in_any_case_but_never_twice() -> None:
    headers = {k.lower(): v for k, v in _headers().items()}
    assert parse_envelope(headers).nonce == NONCE
    twice = {**_headers(), "x-payengine-nonce": "another-nonce-0123456789"}
    with pytest.raises(RequestRejected, match="given 2 times"):
        parse_envelope(twice)
    with pytest.raises(RequestRejected):
        parse_envelope([("X-Payengine-Nonce", NONCE)])


@pytest.mark.parametrize("body", [
    b'{"op":"pay","merchant_order_no":"o","user_id":"u","currency":"CNY","total_minor":100.0,'
    b'"title":"t","cash":{"amount_minor":100,"channel":"wechat"}}',  # a float amount
    b'{"op":"pay","merchant_order_no":"o","user_id":"u","currency":"CNY","total_minor":1e2,'
    b'"title":"t","cash":{"amount_minor":100,"channel":"wechat"}}',
    b'{"op":"pay","merchant_order_no":"o","user_id":"u","currency":"CNY","total_minor":"100",'
    b'"title":"t","cash":{"amount_minor":100,"channel":"wechat"}}',  # a string amount
    b'{"op":"pay","merchant_order_no":"o","user_id":"u","currency":"CNY","total_minor":true,'
    b'"title":"t","cash":{"amount_minor":100,"channel":"wechat"}}',
    b'{"op":"pay","merchant_id":"station-1","merchant_order_no":"o","user_id":"u",'
    b'"currency":"CNY","total_minor":100,"title":"t"}',  # merchant_id is the header's
    b'{"op":"pay","merchant_order_no":"o","user_id":"u","currency":"CNY","total_minor":100,'
    b'"title":"t","cash":{"amount_minor":100,"channel":"wechat","tip":1}}',  # unknown field
    b'{"op":"pay","merchant_order_no":"o","merchant_order_no":"p","user_id":"u",'
    b'"currency":"CNY","total_minor":100,"title":"t"}',  # a field twice
    b'{"op":"pay","merchant_order_no":"o","user_id":"u","currency":"CNY","total_minor":100,'
    b'"title":"t","cash":{"amount_minor":100,"channel":"wechat"},"vouchers":[{"account_id":'
    b'"a","amount":1,"mode":"cash"}]}',  # a voucher part in cash mode
    b'{"op":"pay","merchant_order_no":"o","user_id":"u","currency":"CNY","total_minor":-5,'
    b'"title":"t","cash":{"amount_minor":100,"channel":"wechat"}}',
    b'{"op":"pay","merchant_order_no":"o","user_id":"u","currency":"CNY","total_minor":NaN,'
    b'"title":"t"}',
    b'{"op":"refund","merchant_order_no":"o","refund_no":"r","amount_minor":0}',
    b'{"op":"close"}', b'{"op":"transfer","merchant_order_no":"o"}', b'[]', b'"pay"',
    b'{"op":"close","merchant_order_no":"o"', b'\xff\xfe{}', b'\xef\xbb\xbf{"op":"close"}',
    b'[' * 5_000 + b']' * 5_000, b'{"op":"query","merchant_order_no":"o","n":' + b'9' * 5_000
    + b'}', b'',
], ids=lambda b: b[:50].decode("utf-8", "replace"))
def test_a_body_that_is_not_the_wire_format_is_malformed(body: bytes) -> None:
    with pytest.raises(RequestRejected) as caught:
        parse_body(body, "station-42", policy=OrderPolicy())
    assert caught.value.reason == "malformed"


def test_every_operation_parses_back_to_what_was_encoded() -> None:
    signer = MerchantSigner("station-42", secret=SECRET)
    request = PaymentRequest(
        "station-42", "o-1", "alice", "CNY", 10_000, "Fuel, pump 3",
        cash=CashPart(9_700, "wechat", PayDetails(PayScenario.JSAPI, payer_id="openid-1",
                                                  device_id="pump-3")),
        vouchers=(VoucherPart("alice/rp", 100), VoucherPart("alice/pts", 10, LegMode.PRE_HELD,
                                                            hold_id="h-1"),
                  VoucherPart("alice/phone", 100, LegMode.POST_DEDUCT)),
        pay_window_ms=60_000, confirm_duplicate=True)
    policy = OrderPolicy()
    assert parse_body(signer.pay(request)[0], "station-42", policy=policy) == PayOp(request)
    assert parse_body(signer.close("o-1")[0], "station-42", policy=policy) == CloseOp("o-1")
    assert parse_body(signer.refund("o-1", "r-1", 50, "pump stopped")[0], "station-42",
                      policy=policy) == RefundOp("o-1", "r-1", 50, "pump stopped")
    assert parse_body(signer.query("o-1")[0], "station-42", policy=policy) == QueryOp("o-1")


@given(st.binary(max_size=300))
def test_any_bytes_parse_to_an_operation_or_are_malformed(body: bytes) -> None:
    try:
        parse_body(body, "station-42", policy=OrderPolicy())
    except RequestRejected as error:
        assert error.reason == "malformed"


def test_the_timestamp_window_takes_its_edges_and_nothing_beyond() -> None:
    now, window = 1_000_000, 300_000
    for inside in (now - window, now, now + window):
        check_timestamp(inside, now, window)
    for outside in (now - window - 1, now + window + 1):
        with pytest.raises(RequestRejected) as caught:
            check_timestamp(outside, now, window)
        assert caught.value.reason == "stale_timestamp"
    with pytest.raises(RequestRejected):  # a floor left by a widened window
        check_timestamp(now - 10, now, window, floor_ms=now - 5)


# --------------------------------------------------------------------------- the engine


def test_a_signed_pay_creates_the_order_and_uses_up_its_nonce(
        engine: Engine, signer: MerchantSigner) -> None:
    body, headers = signer.pay(pay_request("o-1"))
    receipt = engine.submit_signed(body, headers)
    order = engine.find_order("station-42", "o-1")
    assert (order.order_id, order.total_minor) == (receipt.order_id, 1_000)
    assert order.state in ("accepted", "paying")  # its actor may have started already
    assert engine._gate.nonces.known("station-42", headers[NONCE_HEADER])
    assert engine.request_rejection_counts() == {}


def test_the_same_request_again_is_a_replay_refused_and_creates_nothing(
        engine: Engine, signer: MerchantSigner) -> None:
    body, headers = signer.pay(pay_request("o-1"))
    engine.submit_signed(body, headers)
    before = (order_count(engine), nonce_rows(engine))
    for replay in (body, body):  # the exact bytes, twice more
        with pytest.raises(RequestRejected) as caught:
            engine.submit_signed(replay, headers)
        assert caught.value.reason == "replayed_nonce"
    assert (order_count(engine), nonce_rows(engine)) == before
    assert engine.request_rejection_counts() == {"replayed_nonce": 2}
    rejection = engine.rejected_requests()[0]
    assert (rejection.merchant_id, rejection.op, rejection.merchant_order_no, rejection.nonce,
            rejection.reason) == ("station-42", "pay", "o-1", headers[NONCE_HEADER],
                                  "replayed_nonce")


def test_a_retry_signed_anew_gets_the_same_receipt_and_uses_its_own_nonce(
        engine: Engine, signer: MerchantSigner) -> None:
    first = engine.submit_signed(*signer.pay(pay_request("o-1")))
    body, headers = signer.pay(pay_request("o-1"))
    assert engine.submit_signed(body, headers) == first
    assert order_count(engine) == 1
    assert engine._gate.nonces.known("station-42", headers[NONCE_HEADER])


def test_a_replay_after_a_restart_is_still_refused(tmp_path: Path,
                                                   signer: MerchantSigner) -> None:
    engine = open_engine(tmp_path / "restart.db", ScriptedChannel())
    engine.register_merchant_key("station-42", secret=SECRET)
    body, headers = signer.pay(pay_request("o-1"))
    engine.submit_signed(body, headers)
    engine.shutdown()
    engine = open_engine(tmp_path / "restart.db", ScriptedChannel())
    try:
        with pytest.raises(RequestRejected) as caught:
            engine.submit_signed(body, headers)
        assert caught.value.reason == "replayed_nonce"
        assert order_count(engine) == 1
    finally:
        engine.shutdown()


_PARTS = ("body", SIGNATURE_HEADER, TIMESTAMP_HEADER, NONCE_HEADER, "X-Payengine-Merchant-Id")


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(part=st.sampled_from(_PARTS), where=st.integers(min_value=0, max_value=10_000),
       new=st.integers(min_value=0, max_value=255))
def test_any_byte_changed_in_body_signature_timestamp_nonce_or_merchant_is_refused_and_creates_nothing(
        engine: Engine, signer: MerchantSigner, part: str, where: int, new: int) -> None:
    body, headers = signer.pay(pay_request(f"flip-{where}-{new}"))
    if part == "body":
        at = where % len(body)
        if body[at] == new:
            new = (new + 1) % 256
        body = body[:at] + bytes([new]) + body[at + 1:]
    else:
        value = headers[part]
        at = where % len(value)
        char = chr(32 + new % 95)
        if value[at] == char:
            char = chr(32 + (new + 1) % 95)
        headers = {**headers, part: value[:at] + char + value[at + 1:]}
    orders, nonces = order_count(engine), nonce_rows(engine)
    with pytest.raises(RequestRejected) as caught:
        engine.submit_signed(body, headers)
    assert caught.value.reason in ("bad_signature", "malformed", "unknown_merchant")
    assert (order_count(engine), nonce_rows(engine)) == (orders, nonces)


def test_the_same_nonce_sent_from_8_threads_at_once_is_taken_exactly_once(
        engine: Engine, signer: MerchantSigner) -> None:
    body, headers = signer.pay(pay_request("o-race"))
    start = threading.Barrier(8)
    outcomes: list[str] = []
    lock = threading.Lock()

    def send() -> None:
        start.wait()
        try:
            engine.submit_signed(body, headers)
            outcome = "accepted"
        except RequestRejected as error:
            outcome = error.reason
        except Overloaded:
            outcome = "overloaded"
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=send) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes.count("accepted") == 1, outcomes
    assert set(outcomes) <= {"accepted", "replayed_nonce", "overloaded"}
    assert order_count(engine) == 1 and nonce_rows(engine) == 1


def test_the_timestamp_window_edges_are_exact_at_the_engine(tmp_path: Path) -> None:
    clocked = Clocked(tmp_path / "edges.db", MerchantRequestConfig(timestamp_window_ms=60_000))
    engine = clocked.engine
    engine.register_merchant_key("station-42", secret=SECRET)
    signer = MerchantSigner("station-42", secret=SECRET)
    now = clocked.now_ms
    try:
        for n, stamp in enumerate((now - 60_000, now + 60_000)):
            engine.submit_signed(*signer.pay(pay_request(f"edge-{n}"), timestamp_ms=stamp))
        for n, stamp in enumerate((now - 60_001, now + 60_001)):
            with pytest.raises(RequestRejected) as caught:
                engine.submit_signed(*signer.pay(pay_request(f"out-{n}"), timestamp_ms=stamp))
            assert caught.value.reason == "stale_timestamp"
        assert order_count(engine) == 2 and nonce_rows(engine) == 2
    finally:
        engine.shutdown()


def test_nonces_are_forgotten_only_once_their_requests_are_stale_and_a_full_book_refuses(
        tmp_path: Path) -> None:
    clocked = Clocked(tmp_path / "book.db", MerchantRequestConfig(
        timestamp_window_ms=10_000, nonces_max=3, nonce_prune_interval_ms=1))
    engine = clocked.engine
    engine.register_merchant_key("station-42", secret=SECRET)
    signer = MerchantSigner("station-42", secret=SECRET)
    try:
        sent = [signer.pay(pay_request(f"b-{n}"), timestamp_ms=clocked.now_ms)
                for n in range(2)]
        for body, headers in sent:
            engine.submit_signed(body, headers)
        clocked.advance(10_000)  # the window's edge: still remembered
        with pytest.raises(RequestRejected) as caught:
            engine.submit_signed(*sent[0])
        assert caught.value.reason == "replayed_nonce"
        engine.submit_signed(*signer.pay(pay_request("b-2"), timestamp_ms=clocked.now_ms))
        with pytest.raises(Overloaded):  # a flood past the bound is refused, not stored
            engine.submit_signed(*signer.pay(pay_request("b-3"), timestamp_ms=clocked.now_ms))
        assert nonce_rows(engine) == 3 and order_count(engine) == 3
        clocked.advance(1)  # past it: the first two are forgotten, and room is made
        engine.submit_signed(*signer.pay(pay_request("b-3"), timestamp_ms=clocked.now_ms))
        assert nonce_rows(engine) == 2 and order_count(engine) == 4
        with pytest.raises(RequestRejected) as caught:  # a replay is now stale instead
            engine.submit_signed(*sent[0])
        assert caught.value.reason == "stale_timestamp"
    finally:
        engine.shutdown()


def test_a_window_widened_at_a_restart_does_not_let_a_forgotten_nonce_back_in(
        tmp_path: Path) -> None:
    clocked = Clocked(tmp_path / "widen.db", MerchantRequestConfig(
        timestamp_window_ms=10_000, nonce_prune_interval_ms=1))
    engine = clocked.engine
    engine.register_merchant_key("station-42", secret=SECRET)
    signer = MerchantSigner("station-42", secret=SECRET)
    old = signer.pay(pay_request("w-1"), timestamp_ms=clocked.now_ms)
    engine.submit_signed(*old)
    clocked.advance(10_001)
    engine.submit_signed(*signer.pay(pay_request("w-2"), timestamp_ms=clocked.now_ms))
    assert not engine._gate.nonces.known("station-42", old[1][NONCE_HEADER])  # pruned
    engine.shutdown()
    clocked.config = MerchantRequestConfig(timestamp_window_ms=60_000)
    for _ in range(2):  # and again: the floor is kept in the database, not only in memory
        engine = clocked.open()
        try:
            with pytest.raises(RequestRejected) as caught:
                engine.submit_signed(*old)
            assert caught.value.reason == "stale_timestamp"
            assert order_count(engine) == 2
        finally:
            engine.shutdown()


def test_a_merchant_signs_only_for_itself_and_with_its_own_kind_of_key(
        engine: Engine) -> None:
    engine.register_merchant_key("station-7", secret=OTHER_SECRET)
    body = encode_pay(pay_request("o-1"))
    for signer, reason in ((MerchantSigner("station-42", secret=OTHER_SECRET), "bad_signature"),
                           (MerchantSigner("station-99", secret=SECRET), "unknown_merchant")):
        with pytest.raises(RequestRejected) as caught:
            engine.submit_signed(body, signer.sign(body))
        assert caught.value.reason == reason
    # station-7's own valid signature cannot act for station-42: the header names the
    # merchant, and the body has no merchant of its own
    station_7 = MerchantSigner("station-7", secret=OTHER_SECRET)
    assert engine.submit_signed(body, station_7.sign(body)).merchant_id == "station-7"
    with pytest.raises(UnknownOrder):
        engine.find_order("station-42", "o-1")
    headers = {**MerchantSigner("station-42", secret=SECRET).sign(body),
               "X-Payengine-Sign-Type": "RSA-SHA256", SIGNATURE_HEADER: RSA_KAT_SIGNATURE}
    with pytest.raises(RequestRejected) as caught:
        engine.submit_signed(body, headers)
    assert caught.value.reason == "wrong_sign_type"


def test_a_signature_for_one_operation_is_refused_by_another(
        engine: Engine, signer: MerchantSigner) -> None:
    engine.submit_signed(*signer.pay(pay_request("o-1")))
    body, headers = signer.query("o-1")
    with pytest.raises(RequestRejected) as caught:
        engine.close_signed(body, headers)
    assert caught.value.reason == "malformed"
    assert engine.get_order(engine.find_order("station-42", "o-1").order_id).state != "closed"
    assert engine.query_signed(body, headers).merchant_order_no == "o-1"  # nonce unused


def test_signed_close_refund_and_query_act_on_the_merchants_own_order(
        engine: Engine, signer: MerchantSigner) -> None:
    engine.submit_signed(*signer.pay(pay_request("o-open")))
    assert engine.close_signed(*signer.close("o-open")).state == "closed"
    fund_customer(engine)
    paid = paid_order(engine, "o-paid")  # station-1's order: not station-42's
    with pytest.raises(UnknownOrder):
        engine.refund_signed(*signer.refund(paid.merchant_order_no, "r-1", 100))
    assert paid.refunds == ()
    view = engine.query_signed(*signer.query("o-open"))
    assert (view.merchant_id, view.state) == ("station-42", "closed")
    with pytest.raises(UnknownOrder):
        engine.query_signed(*signer.query("nobody"))


def test_a_signed_refund_gives_money_back_once(tmp_path: Path) -> None:
    engine = open_engine(tmp_path / "refund.db", ScriptedChannel())
    try:
        engine.register_merchant_key("station-1", secret=SECRET)
        signer = MerchantSigner("station-1", secret=SECRET)
        fund_customer(engine)
        paid = paid_order(engine, "o-paid")
        body, headers = signer.refund("o-paid", "r-1", 500, "pump stopped")
        refund = engine.refund_signed(body, headers)
        assert (refund.refund_no, refund.amount_minor) == ("r-1", 500)
        with pytest.raises(RequestRejected) as caught:
            engine.refund_signed(body, headers)
        assert caught.value.reason == "replayed_nonce"
        assert len(engine.get_order(paid.order_id).refunds) == 1
    finally:
        engine.shutdown()


def test_a_pay_for_an_order_whose_pay_window_is_over_is_refused_and_changes_nothing(
        engine: Engine, signer: MerchantSigner) -> None:
    first = engine.submit_signed(*signer.pay(pay_request("o-short", pay_window_ms=1)))
    wait_for(lambda: engine.get_order(first.order_id).state == "closed", what="timeout close")
    closed = engine.submit_signed(*signer.pay(pay_request("o-closed")))
    engine.close(closed.order_id)
    for no, window in (("o-short", 1), ("o-closed", None)):
        body, headers = signer.pay(pay_request(no, pay_window_ms=window))  # a cached URL
        with pytest.raises(RequestRejected) as caught:
            engine.submit_signed(body, headers)
        assert caught.value.reason == "pay_window_over"
        assert not engine._gate.nonces.known("station-42", headers[NONCE_HEADER])
    assert order_count(engine) == 2
    assert engine.get_order(closed.order_id).state == "closed"


def test_frozen_and_closed_merchants_pay_and_refund_nothing_but_may_close_and_query(
        engine: Engine, signer: MerchantSigner) -> None:
    engine.submit_signed(*signer.pay(pay_request("o-1")))
    for status in ("frozen", "closed"):
        engine.set_merchant_status("station-42", status)
        for call, body_headers in ((engine.submit_signed, signer.pay(pay_request("o-2"))),
                                   (engine.refund_signed, signer.refund("o-1", "r", 1))):
            with pytest.raises(RequestRejected) as caught:
                call(*body_headers)  # type: ignore[operator]
            assert caught.value.reason == f"merchant_{status}"
        with pytest.raises(RequestRejected) as caught:  # in-process too
            engine.submit(pay_request("o-3"))
        assert caught.value.reason == f"merchant_{status}"
        assert engine.query_signed(*signer.query("o-1")).merchant_order_no == "o-1"
    assert engine.close_signed(*signer.close("o-1")).state == "closed"
    assert order_count(engine) == 1
    with pytest.raises(IllegalTransition):  # closed is final
        engine.set_merchant_status("station-42", "active")
    assert engine.get_merchant("station-42").status == "closed"  # type: ignore[union-attr]
    assert [e.to_state for e in engine.store.journal("merchant", "station-42")] == [
        "HMAC-SHA256", "frozen", "closed"]


def test_frozen_and_closed_users_are_refused_new_payments_signed_or_not(
        engine: Engine, signer: MerchantSigner) -> None:
    assert engine.get_user_status("bob") == "active"
    engine.set_user_status("bob", "frozen")
    for n, call in enumerate((lambda: engine.submit_signed(*signer.pay(pay_request("b-1",
                                                                                    "bob"))),
                              lambda: engine.submit(pay_request("b-2", "bob")))):
        with pytest.raises(RequestRejected) as caught:
            call()
        assert caught.value.reason == "user_frozen", n
    assert engine.set_user_status("bob", "active") == "frozen"
    engine.submit_signed(*signer.pay(pay_request("b-1", "bob")))
    engine.set_user_status("carol", "closed")
    with pytest.raises(RequestRejected) as caught:
        engine.submit_signed(*signer.pay(pay_request("c-1", "carol")))
    assert caught.value.reason == "user_closed"
    with pytest.raises(IllegalTransition):
        engine.set_user_status("carol", "frozen")
    with pytest.raises(InvalidRequest):
        engine.set_user_status("carol", "suspended")
    assert order_count(engine) == 1 and nonce_rows(engine) == 1


def test_keys_are_checked_when_registered(engine: Engine) -> None:
    for kwargs in ({}, {"secret": "short"}, {"secret": SECRET, "public_key_pem": "x"},
                   {"secret": "a\x00" * 20}, {"public_key_pem": "-----BEGIN nothing"}):
        with pytest.raises(InvalidRequest):
            engine.register_merchant_key("station-9", **kwargs)  # type: ignore[arg-type]
    assert engine.get_merchant("station-9") is None


@needs_rsa
def test_an_rsa_merchant_pays_with_its_private_key_and_nothing_else_verifies(
        engine: Engine) -> None:
    view = engine.register_merchant_key("station-43", public_key_pem=public_pem())
    assert view.sign_type == "RSA-SHA256"
    signer = MerchantSigner("station-43", private_key_pem=RSA_PRIVATE_PEM)
    request = PaymentRequest("station-43", "r-1", "alice", "CNY", 500, "Fuel",
                             cash=CashPart(500, "wechat"))
    body, headers = signer.pay(request)
    assert engine.submit_signed(body, headers).merchant_id == "station-43"
    body, headers = signer.pay(PaymentRequest("station-43", "r-2", "alice", "CNY", 500, "Fuel",
                                              cash=CashPart(500, "wechat")))
    signature = headers[SIGNATURE_HEADER]
    tail = "A" if signature[-3] != "A" else "B"  # another base64 spelling of other bytes
    for forged in (signature[:-3] + tail + signature[-2:], OTHER_SECRET + "=="):
        with pytest.raises(RequestRejected) as caught:
            engine.submit_signed(body, {**headers, SIGNATURE_HEADER: forged})
        assert caught.value.reason in ("bad_signature", "malformed")
    assert order_count(engine) == 1


@needs_rsa
def test_without_cryptography_rsa_is_a_typed_refusal_not_a_crash(
        engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    public = public_pem()
    engine.register_merchant_key("station-43", public_key_pem=public)
    body, headers = MerchantSigner("station-43", private_key_pem=RSA_PRIVATE_PEM).query("x")
    for name in [m for m in sys.modules if m == "cryptography" or m.startswith("cryptography.")]:
        monkeypatch.setitem(sys.modules, name, None)  # as if it were not installed
    merchant_auth._public_key.cache_clear()
    assert not merchant_auth.rsa_available()
    with pytest.raises(InvalidRequest, match=r"payengine\[rsa\]"):
        engine.register_merchant_key("station-44", public_key_pem=public)
    with pytest.raises(RequestRejected) as caught:
        engine.query_signed(body, headers)
    assert caught.value.reason == "unsupported_sign_type"


def test_settings_are_bounded() -> None:
    for bad in ({"timestamp_window_ms": 999}, {"timestamp_window_ms": 3_600_001},
                {"nonces_max": 0}, {"nonce_prune_batch_max": 0}):
        with pytest.raises(InvalidRequest):
            MerchantRequestConfig(**bad)  # type: ignore[arg-type]



def test_the_simulated_forger_plays_every_attack_and_each_is_refused_for_its_reason() -> None:
    from payengine.sim.signed_requests import ATTACKS
    from payengine.sim.simulation import SimConfig, run

    result = run(SimConfig(seed=0, orders=120, faults=frozenset({"forged-request", "crash"})))
    assert result.ok, result.violations[:3]
    assert "forged-request" in result.fault_mix  # this seed draws it (swarm testing)
    played = {kind.split(":", 1)[1] for kind in result.faults
              if kind.startswith("forged_request:")}
    assert played == set(ATTACKS)
    refused = sum(n for kind, n in result.faults.items()
                  if kind.startswith("forged_request_refused:"))
    assert refused == sum(n for kind, n in result.faults.items()
                          if kind.startswith("forged_request:"))
    assert result.faults["signed_pay"] >= 5


def test_signed_closes_and_queries_are_verified_under_admission_so_a_flood_is_shed(
        tmp_path: Path) -> None:
    """A refused request is a write (the refusal log): forged closes and queries go through
    the admission gate as submits do, and are refused Overloaded while it is closed."""
    from payengine import MerchantSigner, Overloaded

    engine = Engine.open(tmp_path / "a.db", channels=[])
    try:
        engine.register_merchant_key("m-1", secret="m-1-request-key-0123456789abcdef0123")
        forger = MerchantSigner("m-1", secret="not-the-key-0123456789abcdef0123456789")
        before = engine.admission_stats.admitted
        with pytest.raises(RequestRejected):
            engine.query_signed(*forger.query("o-1"))
        assert engine.admission_stats.admitted == before + 1
        engine._admission._backlogs["test: always behind"] = (lambda: 1, 0)
        with pytest.raises(Overloaded):
            engine.close_signed(*forger.close("o-1"))
        assert engine.request_rejection_counts() == {"bad_signature": 1}  # nothing written
    finally:
        engine.shutdown()
