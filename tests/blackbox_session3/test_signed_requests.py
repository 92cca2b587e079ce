"""Signed merchant requests: every reason code, the wire format, nonces, statuses."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import threading
import time

import pytest

from payengine import (
    CashPart,
    ChannelReply,
    EngineConfig,
    IllegalTransition,
    InvalidRequest,
    MerchantRequestConfig,
    MerchantSigner,
    OrderPolicy,
    PaymentRequest,
    RequestRejected,
    UnknownOrder,
)

from .support import ScriptedChannel, uniq, wait_for

SECRET = "station-42-request-key-0123456789abcdef"
POLICY = OrderPolicy(pay_window_ms=60_000, query_schedule_ms=(200,) * 10)


def now_ms() -> int:
    return int(time.time() * 1000)


def sign(body: bytes, *, merchant: str = "station-42", secret: str = SECRET, ts: int | None = None,
         nonce: str | None = None, sign_type: str = "HMAC-SHA256") -> dict[str, str]:
    """The README's recipe, written independently of MerchantSigner."""
    ts = now_ms() if ts is None else ts
    nonce = nonce or secrets.token_hex(16)
    message = f"payengine-request-v1\n{sign_type}\n{merchant}\n{ts}\n{nonce}\n".encode() + body
    signature = hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()
    return {"X-Payengine-Merchant-Id": merchant, "X-Payengine-Timestamp": str(ts),
            "X-Payengine-Nonce": nonce, "X-Payengine-Sign-Type": sign_type,
            "X-Payengine-Signature": signature}


def pay_body(no: str, user: str | None = None, total: int = 50_00, **extra: object) -> bytes:
    obj: dict[str, object] = {"op": "pay", "merchant_order_no": no, "user_id": user or "u-" + no,
                              "currency": "CNY", "total_minor": total, "title": "Fuel",
                              "cash": {"amount_minor": total, "channel": "wechat"}}
    obj.update(extra)
    return json.dumps(obj, separators=(",", ":")).encode()


def op_body(op: str, no: str, **extra: object) -> bytes:
    return json.dumps({"op": op, "merchant_order_no": no, **extra}, separators=(",", ":")).encode()


@pytest.fixture
def env(world):
    channel = ScriptedChannel("wechat")
    engine = world.open([channel], policy=POLICY)
    engine.register_merchant_key("station-42", secret=SECRET)
    return engine, channel


def rejected(engine, call, body, headers, reason):
    before = engine.request_rejection_counts().get(reason, 0)
    with pytest.raises(RequestRejected) as info:
        call(body, headers)
    assert info.value.reason == reason, (info.value.reason, str(info.value))
    assert info.value.code == "request_rejected"
    assert engine.request_rejection_counts()[reason] == before + 1
    assert engine.rejected_requests(limit=1)[0].reason == reason
    return info.value


def test_pay_with_own_signer_is_taken(env) -> None:
    # "What is signed is five lines and then the exact body bytes"
    engine, channel = env
    no = uniq()
    receipt = engine.submit_signed(pay_body(no), sign(pay_body(no)))
    assert receipt.merchant_id == "station-42" and receipt.merchant_order_no == no
    wait_for(lambda: channel.pays_of(receipt.payment_serial), "pay")


def test_readme_signature_example_formula() -> None:
    # "e.g. in Python `hmac.new(secret.encode(), b"payengine-request-v1\nHMAC-SHA256\nstation-42\n"
    #  b"1764000000000\n0123456789abcdef0123456789abcdef\n" + body, hashlib.sha256).hexdigest()`"
    body = op_body("query", "n1")
    signer = MerchantSigner("station-42", secret=SECRET)
    headers = signer.sign(body, timestamp_ms=1764000000000, nonce="0123456789abcdef0123456789abcdef")
    expected = hmac.new(SECRET.encode(), b"payengine-request-v1\nHMAC-SHA256\nstation-42\n"
                        b"1764000000000\n0123456789abcdef0123456789abcdef\n" + body,
                        hashlib.sha256).hexdigest()
    assert headers["X-Payengine-Signature"] == expected


def test_header_names_any_case_and_others_ignored(env) -> None:
    # "the headers (a mapping of str to str; names in any case; other headers are ignored)"
    engine, _ = env
    no = uniq()
    headers = {k.lower(): v for k, v in sign(pay_body(no)).items()}
    headers["X-Forwarded-For"] = "10.0.0.1"
    engine.submit_signed(pay_body(no), headers)


# --- malformed ------------------------------------------------------------------------------

HEADERS = ["X-Payengine-Merchant-Id", "X-Payengine-Timestamp", "X-Payengine-Nonce",
           "X-Payengine-Sign-Type", "X-Payengine-Signature"]


@pytest.mark.parametrize("missing", HEADERS)
def test_missing_header_malformed(env, missing) -> None:
    # "`malformed` | a header missing"
    engine, _ = env
    body = pay_body(uniq())
    headers = sign(body)
    del headers[missing]
    rejected(engine, engine.submit_signed, body, headers, "malformed")


def test_header_twice_in_two_cases_malformed(env) -> None:
    # "given twice (in two cases)"
    engine, _ = env
    body = pay_body(uniq())
    headers = sign(body)
    headers["x-payengine-nonce"] = headers["X-Payengine-Nonce"]
    rejected(engine, engine.submit_signed, body, headers, "malformed")


@pytest.mark.parametrize(("name", "value"), [
    ("X-Payengine-Timestamp", "+1764000000000"),
    ("X-Payengine-Timestamp", "1.764e12"),
    ("X-Payengine-Timestamp", " 1764000000000"),
    ("X-Payengine-Timestamp", "\uff11\uff17\uff16\uff14"),
    ("X-Payengine-Nonce", "a" * 15),
    ("X-Payengine-Nonce", "a" * 65),
    ("X-Payengine-Nonce", "abcdefghijklmnop!"),
    ("X-Payengine-Nonce", "abcdefghijklmnop qr"),
    ("X-Payengine-Merchant-Id", ""),
    ("X-Payengine-Merchant-Id", "station\n42"),
    ("X-Payengine-Sign-Type", "MD5"),
    ("X-Payengine-Sign-Type", "hmac-sha256"),
])
def test_header_not_in_its_form_malformed(env, name, value) -> None:
    # "or not in its form"; "decimal digits only"; "16..64 characters of `A-Z a-z 0-9 _ -`"
    engine, _ = env
    body = pay_body(uniq())
    headers = sign(body)
    headers[name] = value
    rejected(engine, engine.submit_signed, body, headers, "malformed")


def test_nonce_edges_accepted(env) -> None:
    engine, _ = env
    for nonce in ("a" * 16, "Z-_9" * 16):
        no = uniq()
        engine.submit_signed(pay_body(no), sign(pay_body(no), nonce=nonce))


BAD_BODIES = [
    b'{"op":"pay","merchant_order_no":"N","user_id":"u","currency":"CNY","total_minor":100,"title":"t",'
    b'"colour":"red"}',                                                            # unknown field
    b'{"op":"pay","merchant_order_no":"N","user_id":"u","currency":"CNY","total_minor":100,"title":"t",'
    b'"title":"t"}',                                                               # field twice
    b'{"op":"pay","merchant_order_no":"N","user_id":"u","currency":"CNY","total_minor":100.0,"title":"t"}',
    b'{"op":"pay","merchant_order_no":"N","user_id":"u","currency":"CNY","total_minor":1e2,"title":"t"}',
    b'{"op":"pay","merchant_order_no":"N","user_id":"u","currency":"CNY","total_minor":true,"title":"t"}',
    b'{"op":"pay","merchant_order_no":"N","user_id":"u","currency":"CNY","total_minor":"100","title":"t"}',
    b'{"op":"pay","merchant_order_no":"N","user_id":"u","currency":"CNY","total_minor":100,"title":"t",'
    b'"attempt":11}',                                                              # out of bounds
    b'{"op":"pay","merchant_order_no":"N","user_id":"u","currency":"CNY","total_minor":100,"title":"t",'
    b'"confirm_duplicate":1}',
    b'[{"op":"pay"}]',                                                             # not an object
    b'{"op":"pay",',                                                               # not JSON
    b'\xff\xfe{"op":"query","merchant_order_no":"N"}',                             # not UTF-8
    b'{"op":"teleport","merchant_order_no":"N"}',                                  # no such op
    b'{"merchant_order_no":"N"}',                                                  # no op
]


@pytest.mark.parametrize("body", BAD_BODIES)
def test_body_not_in_wire_format_malformed(env, body) -> None:
    # "Parsing is strict: an unknown field, a field given twice, a float (`100.0` or `1e2` is not an
    #  amount), `true` where a number goes, a value of the wrong JSON type or out of its bounds, a body
    #  that is not a UTF-8 JSON object ... is `malformed`."
    engine, _ = env
    rejected(engine, engine.submit_signed, body, sign(body), "malformed")


def test_body_over_64_kib_malformed(env) -> None:
    # "or has more than 64 KiB is `malformed`"
    engine, _ = env
    body = pay_body(uniq(), title="x" * (64 * 1024))
    rejected(engine, engine.submit_signed, body, sign(body), "malformed")


@pytest.mark.parametrize(("op", "call"), [("query", "close_signed"), ("close", "query_signed"),
                                          ("query", "refund_signed"), ("query", "submit_signed")])
def test_body_for_another_op_malformed(env, op, call) -> None:
    # "A body for one `op` sent to another call (a signed query to `close_signed`) is `malformed` too."
    engine, _ = env
    body = op_body(op, uniq())
    rejected(engine, getattr(engine, call), body, sign(body), "malformed")


def test_absent_optional_and_null_same(env) -> None:
    # "An absent optional field and `null` are the same."
    engine, _ = env
    no = uniq()
    body = pay_body(no, pay_window_ms=None, attempt=None, vouchers=None)
    receipt = engine.submit_signed(body, sign(body))
    assert receipt.attempt == 1


# --- identity and signature -------------------------------------------------------------------


def test_unknown_merchant(env) -> None:
    # "`unknown_merchant` | no key is registered for the merchant"
    engine, _ = env
    body = pay_body(uniq())
    rejected(engine, engine.submit_signed, body, sign(body, merchant="station-99"), "unknown_merchant")


def test_wrong_sign_type(env) -> None:
    # "`wrong_sign_type` | the sign type is not that of the merchant's key"
    engine, _ = env
    body = pay_body(uniq())
    rejected(engine, engine.submit_signed, body, sign(body, sign_type="RSA-SHA256"), "wrong_sign_type")


def test_bad_signature_other_key(env) -> None:
    engine, _ = env
    body = pay_body(uniq())
    rejected(engine, engine.submit_signed, body, sign(body, secret="another-secret-0123456789abcdefgh"),
             "bad_signature")


def test_bad_signature_upper_case_hex(env) -> None:
    # "A signature has one spelling only (no upper-case hex, canonical base64)"
    engine, _ = env
    body = pay_body(uniq())
    headers = sign(body)
    headers["X-Payengine-Signature"] = headers["X-Payengine-Signature"].upper()
    with pytest.raises(RequestRejected) as info:
        engine.submit_signed(body, headers)
    assert info.value.reason in ("bad_signature", "malformed")


def test_bad_signature_body_changed(env) -> None:
    engine, _ = env
    no = uniq()
    body = pay_body(no)
    headers = sign(body)
    rejected(engine, engine.submit_signed, body.replace(b"5000", b"5001"), headers, "bad_signature")
    with pytest.raises(UnknownOrder):
        engine.find_order("station-42", no)


@pytest.mark.parametrize("header", ["X-Payengine-Timestamp", "X-Payengine-Nonce",
                                    "X-Payengine-Merchant-Id"])
def test_bad_signature_header_changed(env, header) -> None:
    # "so no byte of a signed request can change and leave it valid"
    engine, _ = env
    engine.register_merchant_key("station-4", secret=SECRET)
    body = pay_body(uniq())
    headers = sign(body, ts=now_ms() - 1000, nonce="n" * 32)
    headers[header] = {"X-Payengine-Timestamp": str(now_ms()), "X-Payengine-Nonce": "m" * 32,
                       "X-Payengine-Merchant-Id": "station-4"}[header]
    rejected(engine, engine.submit_signed, body, headers, "bad_signature")


def test_signature_checked_before_body_read(env) -> None:
    # "`bad_signature` | the signature does not verify (checked before any field of the body is read)"
    engine, _ = env
    body = b'{"op":"pay","bogus":1.5}'
    headers = sign(body, secret="another-secret-0123456789abcdefgh")
    rejected(engine, engine.submit_signed, body, headers, "bad_signature")


def test_old_key_stops_at_once(env) -> None:
    # "Registering again replaces the key (the old one stops verifying at once)."
    engine, _ = env
    new = "station-42-new-key-0123456789abcdefghijkl"
    engine.register_merchant_key("station-42", secret=new)
    body = pay_body(uniq())
    rejected(engine, engine.submit_signed, body, sign(body), "bad_signature")
    no = uniq()
    engine.submit_signed(pay_body(no), sign(pay_body(no), secret=new))


@pytest.mark.parametrize("secret", ["s" * 31, "s" * 257, ""])
def test_secret_length_bounds(env, secret) -> None:
    # "HMAC-SHA256, 32..256 characters"
    engine, _ = env
    with pytest.raises(InvalidRequest):
        engine.register_merchant_key("station-50", secret=secret)


def test_secret_length_edges_ok(env) -> None:
    engine, _ = env
    engine.register_merchant_key("station-51", secret="s" * 32)
    engine.register_merchant_key("station-52", secret="s" * 256)


def test_get_merchant_never_the_key(env) -> None:
    # "`get_merchant(id)` → `MerchantView(merchant_id, status, sign_type, key_set_at_ms, updated_at_ms)`
    #  (never the key)"
    engine, _ = env
    view = engine.get_merchant("station-42")
    assert view.merchant_id == "station-42" and view.status == "active"
    assert SECRET not in repr(view)
    assert engine.get_merchant("nobody-here") is None


# --- time window ------------------------------------------------------------------------------


@pytest.mark.parametrize("offset", [-310_000, 310_000])
def test_stale_timestamp(env, offset) -> None:
    # "`stale_timestamp` | signed more than the window before or after the engine's clock"
    engine, _ = env
    no = uniq()
    body = pay_body(no)
    rejected(engine, engine.submit_signed, body, sign(body, ts=now_ms() + offset), "stale_timestamp")
    with pytest.raises(UnknownOrder):
        engine.find_order("station-42", no)


@pytest.mark.parametrize("offset", [-290_000, 290_000])
def test_inside_window_taken(env, offset) -> None:
    engine, _ = env
    no = uniq()
    engine.submit_signed(pay_body(no), sign(pay_body(no), ts=now_ms() + offset))


def test_window_configurable(world) -> None:
    # "| `timestamp_window_ms` | 300,000 (±5 min) | 1,000..3,600,000 |"
    engine = world.open([ScriptedChannel("wechat")], policy=POLICY, config=EngineConfig(
        merchant_requests=MerchantRequestConfig(timestamp_window_ms=5_000)))
    engine.register_merchant_key("station-42", secret=SECRET)
    body = pay_body(uniq())
    rejected(engine, engine.submit_signed, body, sign(body, ts=now_ms() - 20_000), "stale_timestamp")


@pytest.mark.parametrize("kwargs", [{"timestamp_window_ms": 999}, {"timestamp_window_ms": 3_600_001},
                                    {"nonces_max": 0}, {"nonces_max": 10_000_001},
                                    {"nonce_prune_interval_ms": 0}, {"nonce_prune_batch_max": 0},
                                    {"nonce_prune_batch_max": 100_001}])
def test_merchant_request_config_bounds(kwargs) -> None:
    with pytest.raises(InvalidRequest):
        MerchantRequestConfig(**kwargs)


def test_merchant_request_config_defaults() -> None:
    config = MerchantRequestConfig()
    assert (config.timestamp_window_ms, config.nonces_max, config.nonce_prune_interval_ms,
            config.nonce_prune_batch_max) == (300_000, 500_000, 1_000, 1_000)


# --- statuses ---------------------------------------------------------------------------------


def test_merchant_frozen_and_closed(env) -> None:
    # "`merchant_frozen`, `merchant_closed` | a pay or a refund of a merchant that is not active (a close
    #  or a query goes on ...)"
    engine, _ = env
    no = uniq()
    receipt = engine.submit_signed(pay_body(no), sign(pay_body(no)))
    assert engine.set_merchant_status("station-42", "frozen") == "active"
    body = pay_body(uniq())
    rejected(engine, engine.submit_signed, body, sign(body), "merchant_frozen")
    refund = op_body("refund", no, refund_no="r1", amount_minor=100)
    rejected(engine, engine.refund_signed, refund, sign(refund), "merchant_frozen")
    query = op_body("query", no)
    assert engine.query_signed(query, sign(query)).order_id == receipt.order_id
    close = op_body("close", no)
    engine.close_signed(close, sign(close))
    assert engine.set_merchant_status("station-42", "closed") == "frozen"
    body = pay_body(uniq())
    rejected(engine, engine.submit_signed, body, sign(body), "merchant_closed")
    with pytest.raises(IllegalTransition):
        engine.set_merchant_status("station-42", "active")


def test_user_frozen_and_closed(env) -> None:
    # "`user_frozen`, `user_closed` | a pay for a user that is not active"
    engine, _ = env
    assert engine.set_user_status("bob", "frozen") == "active"
    assert engine.get_user_status("bob") == "frozen"
    body = pay_body(uniq(), user="bob")
    rejected(engine, engine.submit_signed, body, sign(body), "user_frozen")
    engine.set_user_status("carol", "closed")
    body = pay_body(uniq(), user="carol")
    rejected(engine, engine.submit_signed, body, sign(body), "user_closed")
    with pytest.raises(IllegalTransition):
        engine.set_user_status("carol", "active")
    # in-process submit too
    with pytest.raises(RequestRejected) as info:
        engine.submit(PaymentRequest("station-42", uniq(), "bob", "CNY", 100, "t",
                                     cash=CashPart(100, "wechat")))
    assert info.value.reason == "user_frozen"


def test_refused_pay_leaves_nonce_unused(env) -> None:
    # "a pay refused for any reason, even after verification ..., leaves its nonce unused"
    engine, _ = env
    engine.set_user_status("dave", "frozen")
    body = pay_body(uniq(), user="dave")
    headers = sign(body)
    rejected(engine, engine.submit_signed, body, headers, "user_frozen")
    engine.set_user_status("dave", "active")
    engine.submit_signed(body, headers)


def test_status_journalled(env) -> None:
    # "and are journalled (`engine.store.journal("merchant", id)`, `"user"`)"
    engine, _ = env
    engine.set_merchant_status("station-7", "frozen")
    engine.set_user_status("erin", "frozen")
    assert engine.store.journal("merchant", "station-7")
    assert engine.store.journal("user", "erin")


def test_bad_status_value(env) -> None:
    engine, _ = env
    with pytest.raises(InvalidRequest):
        engine.set_user_status("frank", "suspended")


# --- nonces -----------------------------------------------------------------------------------


def test_replayed_nonce_pay(env) -> None:
    engine, _ = env
    no = uniq()
    body, headers = pay_body(no), sign(pay_body(no))
    receipt = engine.submit_signed(body, headers)
    rejected(engine, engine.submit_signed, body, headers, "replayed_nonce")
    # "A pay for an order that exists, within its pay window, with the same parameters (a retry,
    #  signed anew) gets the order's receipt."
    assert engine.submit_signed(body, sign(body)) == receipt


def test_nonce_shared_across_ops(env) -> None:
    # "`replayed_nonce` | the merchant used the nonce before"
    engine, _ = env
    no = uniq()
    engine.submit_signed(pay_body(no), sign(pay_body(no), nonce="q" * 20))
    query = op_body("query", no)
    rejected(engine, engine.query_signed, query, sign(query, nonce="q" * 20), "replayed_nonce")


def test_close_that_fails_still_uses_nonce(env) -> None:
    # "A close, refund or query uses its nonce just before it is carried out, so it can never be carried
    #  out twice, even if it then fails."
    engine, channel = env
    channel.pay_reply = lambda s, a: ChannelReply("SUCCESS", "SUCCESS", "T-" + s, a, "CNY")
    no = uniq()
    receipt = engine.submit_signed(pay_body(no), sign(pay_body(no)))
    wait_for(lambda: engine.get_order(receipt.order_id).settled, "paid")
    close = op_body("close", no)
    headers = sign(close)
    with pytest.raises(IllegalTransition):
        engine.close_signed(close, headers)
    rejected(engine, engine.close_signed, close, headers, "replayed_nonce")


def test_close_of_unknown_order_uses_nonce(env) -> None:
    # "A close, refund or query uses its nonce just before it is carried out, so it can never be carried
    #  out twice, even if it then fails." / "Always sign a retry anew ...: the same bytes again are a
    #  replay."
    engine, _ = env
    no = uniq()
    close = op_body("close", no)
    headers = sign(close)
    with pytest.raises(UnknownOrder):
        engine.close_signed(close, headers)
    receipt = engine.submit_signed(pay_body(no), sign(pay_body(no)))
    try:
        rejected(engine, engine.close_signed, close, headers, "replayed_nonce")
    finally:
        # whatever happened, the order must not have been closed by the replayed bytes
        assert engine.get_order(receipt.order_id).state != "closed"


def test_same_nonce_many_threads_one_taken(env) -> None:
    # "Of the same nonce sent from many threads at once exactly one is taken"
    engine, _ = env
    query_no = uniq()
    engine.submit_signed(pay_body(query_no), sign(pay_body(query_no)))
    body = op_body("query", query_no)
    headers = sign(body)
    outcomes: list[str] = []
    barrier = threading.Barrier(8)

    def go() -> None:
        barrier.wait()
        try:
            engine.query_signed(body, headers)
            outcomes.append("ok")
        except RequestRejected as error:
            outcomes.append(error.reason)

    threads = [threading.Thread(target=go) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert sorted(outcomes) == ["ok"] + ["replayed_nonce"] * 7


def test_merchant_reaches_only_its_own_orders(env) -> None:
    # "so a merchant only ever pays, closes, refunds and reads its own orders"
    engine, _ = env
    other = "station-43-request-key-0123456789abcdef"
    engine.register_merchant_key("station-43", secret=other)
    no = uniq()
    engine.submit_signed(pay_body(no), sign(pay_body(no)))
    query = op_body("query", no)
    with pytest.raises(UnknownOrder):
        engine.query_signed(query, sign(query, merchant="station-43", secret=other))


# --- pay window ---------------------------------------------------------------------------------


def test_pay_window_over_closed_order(env) -> None:
    # "`pay_window_over` | a pay for an order that exists ... and closed, failed, or whose pay window
    #  ended ...; to pay a failed or closed trade again, sign the next `attempt`"
    engine, _ = env
    no = uniq()
    body = pay_body(no, user="gina")
    receipt = engine.submit_signed(body, sign(body))
    engine.close(receipt.order_id)
    wait_for(lambda: engine.get_order(receipt.order_id).state == "closed", "closed")
    rejected(engine, engine.submit_signed, body, sign(body), "pay_window_over")
    second = pay_body(no, user="gina", attempt=2)
    assert engine.submit_signed(second, sign(second)).attempt == 2


def test_pay_window_over_by_time(env) -> None:
    engine, _ = env
    no = uniq()
    body = pay_body(no, pay_window_ms=1_000)
    receipt = engine.submit_signed(body, sign(body))
    wait_for(lambda: engine.get_order(receipt.order_id).state == "closed", "window closed")
    rejected(engine, engine.submit_signed, body, sign(body), "pay_window_over")


def test_rejection_record_fields(env) -> None:
    # "Every refusal is recorded (`rejected_requests()`: time, merchant as claimed, op, merchant order
    #  number, nonce, reason, detail"
    engine, _ = env
    no = uniq()
    body = pay_body(no)
    headers = sign(body, merchant="ghost-merchant", nonce="z" * 24)
    with pytest.raises(RequestRejected):
        engine.submit_signed(body, headers)
    record = engine.rejected_requests()[0]
    assert record.merchant_id == "ghost-merchant"
    assert record.nonce == "z" * 24
    assert record.reason == "unknown_merchant"
    assert record.at_ms > 0


# --- RSA --------------------------------------------------------------------------------------

def _rsa(bits=2048):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    return key, pem


def _rsa_sign(key, body, merchant="station-43", ts=None, nonce=None):
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    ts = now_ms() if ts is None else ts
    nonce = nonce or secrets.token_hex(16)
    message = f"payengine-request-v1\nRSA-SHA256\n{merchant}\n{ts}\n{nonce}\n".encode() + body
    sig = base64.b64encode(key.sign(message, padding.PKCS1v15(), hashes.SHA256())).decode()
    return {"X-Payengine-Merchant-Id": merchant, "X-Payengine-Timestamp": str(ts),
            "X-Payengine-Nonce": nonce, "X-Payengine-Sign-Type": "RSA-SHA256", "X-Payengine-Signature": sig}


def test_rsa_merchant(env) -> None:
    # "RSA: standard base64 (with padding) of the PKCS#1 v1.5 SHA-256 signature (`SHA256withRSA`)"
    engine, _ = env
    key, pem = _rsa()
    engine.register_merchant_key("station-43", public_key_pem=pem)
    no = uniq()
    body = pay_body(no)
    engine.submit_signed(body, _rsa_sign(key, body))
    rejected(engine, engine.submit_signed, body, sign(body, merchant="station-43"), "wrong_sign_type")
    other, _ = _rsa()
    body = pay_body(uniq())
    rejected(engine, engine.submit_signed, body, _rsa_sign(other, body), "bad_signature")


def test_rsa_non_canonical_base64_refused(env) -> None:
    engine, _ = env
    key, pem = _rsa()
    engine.register_merchant_key("station-43", public_key_pem=pem)
    body = pay_body(uniq())
    headers = _rsa_sign(key, body)
    headers["X-Payengine-Signature"] = headers["X-Payengine-Signature"].rstrip("=")
    with pytest.raises(RequestRejected) as info:
        engine.submit_signed(body, headers)
    assert info.value.reason in ("bad_signature", "malformed")


def test_rsa_key_too_small(env) -> None:
    # "RSA-SHA256, 2048..8192 bits"
    engine, _ = env
    _, pem = _rsa(1024)
    with pytest.raises(InvalidRequest):
        engine.register_merchant_key("station-44", public_key_pem=pem)


def test_register_needs_exactly_one_key(env) -> None:
    engine, _ = env
    _, pem = _rsa()
    with pytest.raises(InvalidRequest):
        engine.register_merchant_key("station-45")
    with pytest.raises(InvalidRequest):
        engine.register_merchant_key("station-45", secret=SECRET, public_key_pem=pem)


# --- order of the checks -------------------------------------------------------------------------


def test_checks_in_order(env) -> None:
    # "**What is checked, in order.**" malformed, unknown_merchant, wrong_sign_type, ..., bad_signature,
    # stale_timestamp, merchant_frozen..., user_frozen..., replayed_nonce, pay_window_over
    engine, _ = env
    body = pay_body(uniq())
    headers = sign(body, merchant="nobody-registered", nonce="short")
    rejected(engine, engine.submit_signed, body, headers, "malformed")
    headers = sign(body, merchant="nobody-registered", sign_type="RSA-SHA256")
    rejected(engine, engine.submit_signed, body, headers, "unknown_merchant")
    headers = sign(body, sign_type="RSA-SHA256", ts=now_ms() - 10**7)
    rejected(engine, engine.submit_signed, body, headers, "wrong_sign_type")
    headers = sign(body, secret="another-secret-0123456789abcdefgh", ts=now_ms() - 10**7)
    rejected(engine, engine.submit_signed, body, headers, "bad_signature")
    engine.set_merchant_status("station-42", "frozen")
    engine.set_user_status("hank", "frozen")
    frozen_user = pay_body(uniq(), user="hank")
    rejected(engine, engine.submit_signed, frozen_user, sign(frozen_user, ts=now_ms() - 10**7),
             "stale_timestamp")
    rejected(engine, engine.submit_signed, frozen_user, sign(frozen_user), "merchant_frozen")
    engine.set_merchant_status("station-42", "active")
    rejected(engine, engine.submit_signed, frozen_user, sign(frozen_user), "user_frozen")
    no = uniq()
    headers = sign(pay_body(no))
    receipt = engine.submit_signed(pay_body(no), headers)
    engine.close(receipt.order_id)
    wait_for(lambda: engine.get_order(receipt.order_id).state == "closed", "closed")
    rejected(engine, engine.submit_signed, pay_body(no), headers, "replayed_nonce")


def test_duplicate_suspected_leaves_nonce_unused(world) -> None:
    # "so a pay refused for any reason, even after verification (`DuplicateSuspected`, `Overloaded`...),
    #  leaves its nonce unused"
    from payengine import DuplicateSuspected

    channel = ScriptedChannel("wechat")
    engine = world.open([channel], policy=POLICY)
    engine.register_merchant_key("station-42", secret=SECRET)
    first_no = uniq()
    first = engine.submit_signed(pay_body(first_no, user="ivy"), sign(pay_body(first_no, user="ivy")))
    body = pay_body(uniq(), user="ivy")
    headers = sign(body)
    with pytest.raises(DuplicateSuspected):
        engine.submit_signed(body, headers)
    engine.close(first.order_id)
    wait_for(lambda: engine.get_order(first.order_id).state == "closed", "closed")
    assert engine.submit_signed(body, headers).merchant_id == "station-42"


def test_refund_reason_null_is_absent(env) -> None:
    # "An absent optional field and `null` are the same."
    engine, channel = env
    channel.pay_reply = lambda s, a: ChannelReply("SUCCESS", "SUCCESS", "T-" + s, a, "CNY")
    no = uniq()
    receipt = engine.submit_signed(pay_body(no), sign(pay_body(no)))
    wait_for(lambda: engine.get_order(receipt.order_id).settled, "paid")
    body = op_body("refund", no, refund_no="r-null", amount_minor=100, reason=None)
    assert engine.refund_signed(body, sign(body)).reason == ""


def test_replay_after_window_is_stale(world) -> None:
    # "A nonce is remembered while a request with its timestamp could be taken, then pruned ...; a replay
    #  after that is `stale_timestamp`."
    engine = world.open([ScriptedChannel("wechat")], policy=POLICY, config=EngineConfig(
        merchant_requests=MerchantRequestConfig(timestamp_window_ms=1_000, nonce_prune_interval_ms=10)))
    engine.register_merchant_key("station-42", secret=SECRET)
    no = uniq()
    ts = now_ms()
    body, headers = pay_body(no), sign(pay_body(no), ts=ts)
    engine.submit_signed(body, headers)
    wait_for(lambda: now_ms() > ts + 1_500, "window passed")
    rejected(engine, engine.submit_signed, body, headers, "stale_timestamp")


def test_widened_window_after_restart(world) -> None:
    # "A window widened at a restart does not let in a request whose nonce the narrower window already
    #  forgot: until the wider window has passed, timestamps older than the old window's reach at the
    #  restart are `stale_timestamp`."
    narrow = EngineConfig(merchant_requests=MerchantRequestConfig(timestamp_window_ms=2_000,
                                                                  nonce_prune_interval_ms=10))
    engine = world.open([ScriptedChannel("wechat")], policy=POLICY, config=narrow, db="widen.db")
    engine.register_merchant_key("station-42", secret=SECRET)
    no = uniq()
    ts = now_ms()
    body, headers = pay_body(no), sign(pay_body(no), ts=ts)
    engine.submit_signed(body, headers)
    wait_for(lambda: now_ms() > ts + 3_000, "narrow window passed")
    engine.shutdown()
    wide = EngineConfig(merchant_requests=MerchantRequestConfig(timestamp_window_ms=600_000))
    engine = world.open([ScriptedChannel("wechat")], policy=POLICY, config=wide, db="widen.db")
    rejected(engine, engine.submit_signed, body, headers, "stale_timestamp")
    # a new request signed 100 s ago is inside the wide window but older than the old reach: stale too
    no2 = uniq()
    rejected(engine, engine.submit_signed, pay_body(no2), sign(pay_body(no2), ts=now_ms() - 100_000),
             "stale_timestamp")
