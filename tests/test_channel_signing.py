"""Signing vectors: known answers for HMAC-SHA256 and MD5 (WeChat Pay v2's published
example, RFC 4231) and RSA-SHA256 (a signature made by the openssl command line), and the
adapter's signatures checked by an independent implementation."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from pathlib import Path

import pytest

from payengine.actors.adapters import Credentials, Signing, parse_config
from payengine.actors.adapters import signing as sig
from payengine.actors.adapters.mapping import assemble, request_values
from payengine.engine.errors import ConfigError

DATA = Path(__file__).parent / "data"

WECHAT_FIELDS = {"appid": "wxd930ea5d5a258f4f", "mch_id": "10000100", "device_info": "1000",
                 "body": "test", "nonce_str": "ibuaiVcKdpRxkhJA", "sign": "ignored",
                 "empty": ""}
WECHAT_KEY = "192006250b4c09247ec02edce69f6a2d"


def test_wechat_v2_md5_known_answer() -> None:
    """WeChat Pay v2's documented example: stringA sorted, empty and sign left out."""
    signing = Signing(method="md5")
    credentials = Credentials(key=WECHAT_KEY)
    message = sig.message_of_pairs(signing, credentials, WECHAT_FIELDS)
    assert message == (b"appid=wxd930ea5d5a258f4f&body=test&device_info=1000&mch_id=10000100"
                       b"&nonce_str=ibuaiVcKdpRxkhJA&key=192006250b4c09247ec02edce69f6a2d")
    assert sig.sign(signing, credentials, message) == "9A0A8659F005D6984697E2CA0A9CF3B7"
    assert sig.verify(signing, credentials, message, "9a0a8659f005d6984697e2ca0a9cf3b7")
    assert not sig.verify(signing, credentials, message, "9A0A8659F005D6984697E2CA0A9CF3B8")


def test_wechat_v2_hmac_sha256_known_answer() -> None:
    signing = Signing(method="hmac-sha256")
    credentials = Credentials(key=WECHAT_KEY)
    message = sig.message_of_pairs(signing, credentials, WECHAT_FIELDS)
    assert sig.sign(signing, credentials, message) == (
        "6A9AE1657590FD6257D693A078E1C3E4BB6BA4DC30B23E0EE2496E54170DACD6")


def test_hmac_sha256_over_the_body_rfc_4231_case_2() -> None:
    signing = Signing(method="hmac-sha256", form="body", header="X-Sign", encoding="hex")
    credentials = Credentials(key="Jefe")
    message = sig.message_of_body(signing, credentials, b"what do ya want for nothing?")
    assert sig.sign(signing, credentials, message) == (
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")


def test_md5_over_the_body_appends_the_key() -> None:
    signing = Signing(method="md5", form="body", header="X-Sign", encoding="hex")
    credentials = Credentials(key="k3y")
    message = sig.message_of_body(signing, credentials, b'{"a":1}')
    assert sig.sign(signing, credentials, message) == hashlib.md5(b'{"a":1}k3y').hexdigest()


def test_malformed_signatures_never_verify_and_never_raise() -> None:
    signing = Signing(method="hmac-sha256")
    credentials = Credentials(key="k")
    for given in (None, 12, "", "zz", "é" * 10, "A" * 5_000, ["x"]):
        assert not sig.verify(signing, credentials, b"m", given)


def test_a_request_signed_by_the_adapter_verifies_independently() -> None:
    config = parse_config({"channels": {"w": {
        "kind": "http", "wallet": "wechat", "merchant_no": "10000100",
        "base_url": "https://api.example.com", "credentials": {"key": WECHAT_KEY},
        "signing": {"method": "hmac-sha256"},
        "operations": {"pay": {"path": "/pay", "fields": {
            "mch_id": "{merchant_no}", "out_trade_no": "{serial}", "total_fee": "{amount}",
            "body": "{title}", "openid": "{payer_id}", "flag": True}},
            "query": {"path": "/q", "fields": {"out_trade_no": "{serial}"}}}}}})[0]
    values = request_values(config, "pay", serial="P1", now_ms=0, nonce="n",
                            amount_minor=1234, currency="CNY", title="加油 fuel")
    _method, _path, body, _headers, fields = assemble(config, "pay", values)
    sent = json.loads(body)
    assert sent == {"mch_id": "10000100", "out_trade_no": "P1", "total_fee": 1234,
                    "body": "加油 fuel", "flag": True, "sign": fields["sign"]}
    text = "&".join(f"{k}={'true' if v is True else v}" for k, v in sorted(sent.items())
                    if k != "sign") + f"&key={WECHAT_KEY}"
    assert sent["sign"] == hmac.new(WECHAT_KEY.encode(), text.encode(),
                                    hashlib.sha256).hexdigest().upper()


# ---------------------------------------------------------------------------- RSA

cryptography = pytest.importorskip("cryptography", reason="RSA needs payengine[rsa]")


def _rsa_credentials() -> Credentials:
    return Credentials(private_key_pem=(DATA / "rsa_test_private.pem").read_bytes(),
                       wallet_public_key_pem=(DATA / "rsa_test_public.pem").read_bytes())


def test_rsa_sha256_known_answer_made_by_openssl() -> None:
    """``openssl dgst -sha256 -sign rsa_test_private.pem`` of the same bytes (PKCS#1 v1.5
    signatures are deterministic), base64."""
    signing = Signing(method="rsa-sha256")
    credentials = _rsa_credentials()
    message = sig.message_of_pairs(signing, credentials,
                                   {"out_trade_no": "P1", "amount": 100, "sign": "x"})
    assert message == b"amount=100&out_trade_no=P1"  # RSA appends no key
    expected = (DATA / "rsa_test_signature.b64").read_text().strip()
    assert sig.sign(signing, credentials, message) == expected
    assert sig.verify(signing, credentials, message, expected)
    assert not sig.verify(signing, credentials, message + b" ", expected)
    assert not sig.verify(signing, credentials, message, "not base64!")
    tampered = base64.b64encode(b"\0" + base64.b64decode(expected)[1:]).decode()
    assert not sig.verify(signing, credentials, message, tampered)


def test_rsa_keys_are_checked_at_load(tmp_path: Path) -> None:
    (tmp_path / "bad.pem").write_text("-----BEGIN PRIVATE KEY-----\nnope\n")
    for name in ("rsa_test_private.pem", "rsa_test_public.pem"):
        (tmp_path / name).write_bytes((DATA / name).read_bytes())
    table = {"kind": "http", "wallet": "alipay", "merchant_no": "2088",
             "base_url": "https://a.b", "signing": {"method": "rsa-sha256",
                                                    "verify_replies": True},
             "credentials": {"private_key_file": "rsa_test_private.pem",
                             "wallet_public_key_file": "rsa_test_public.pem"},
             "operations": {"pay": {"path": "/p"}, "query": {"path": "/q"}}}
    (config,) = parse_config({"channels": {"a": table}}, base_dir=tmp_path)
    assert config.credentials.private_key_pem is not None
    assert "BEGIN" not in repr(config)
    table["credentials"] = {"private_key_file": "bad.pem",
                            "wallet_public_key_file": "rsa_test_public.pem"}
    with pytest.raises(ConfigError) as caught:
        parse_config({"channels": {"a": table}}, base_dir=tmp_path)
    assert caught.value.key == "channels.a.credentials.private_key_file"
    table["credentials"] = {"private_key_file": "rsa_test_private.pem"}
    with pytest.raises(ConfigError) as caught:
        parse_config({"channels": {"a": table}}, base_dir=tmp_path)
    assert caught.value.key == "channels.a.credentials.wallet_public_key_file"


def test_without_cryptography_rsa_is_a_clear_config_error(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    import builtins

    real_import = builtins.__import__

    def no_cryptography(name: str, *args: object, **kwargs: object) -> object:
        if name.startswith("cryptography"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", no_cryptography)
    with pytest.raises(ConfigError, match=r"payengine\[rsa\]"):
        sig.check_rsa_keys(_rsa_credentials())
