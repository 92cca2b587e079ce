"""rsa-sha256 signing of an HTTP channel: private key file, wallet public key, sorted-pairs, base64."""

from __future__ import annotations

import base64
import json

import pytest

from payengine import ConfigError, load_channels, load_config

from .wallet import Wallet

cryptography = pytest.importorskip("cryptography")

from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import padding, rsa  # noqa: E402

RSA_TOML = """
[channels.rsa-1]
kind = "http"
wallet = "alipay"
merchant_no = "2088"
base_url = "{url}"
credentials = {{ private_key_file = "merchant.pem", wallet_public_key_file = "wallet.pub" }}
signing = {{ method = "rsa-sha256", verify_replies = true }}

[channels.rsa-1.operations.pay]
path = "/pay"
fields = {{ out_trade_no = "{{serial}}", total_fee = "{{amount}}" }}

[channels.rsa-1.operations.query]
path = "/query"
fields = {{ out_trade_no = "{{serial}}" }}
"""


def _pem_private(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem_public(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def _pairs(fields) -> bytes:
    return "&".join(f"{k}={v}" for k, v in sorted(fields.items()) if k != "sign" and str(v) != "").encode()


@pytest.fixture
def keys():
    return (rsa.generate_private_key(public_exponent=65537, key_size=2048),
            rsa.generate_private_key(public_exponent=65537, key_size=2048))


def test_rsa_request_signed_and_reply_verified(tmp_path, world, keys) -> None:
    # "`"sorted-pairs"`: ... (RSA appends nothing)"; "`encoding` | `"hex-upper"` (`"base64"` for RSA)";
    # "`private_key_file` | `rsa-sha256`: the merchant's unencrypted PEM private key, RSA ≥ 2048 bits (path
    #  relative to the file's folder"
    merchant, wallet_key = keys
    (tmp_path / "merchant.pem").write_bytes(_pem_private(merchant))
    (tmp_path / "wallet.pub").write_bytes(_pem_public(wallet_key))
    wallet = Wallet()
    wallet.sign_replies = False
    try:
        reply = {"return_code": "SUCCESS", "result_code": "NOTPAY"}
        reply["sign"] = base64.b64encode(wallet_key.sign(_pairs(reply), padding.PKCS1v15(),
                                                         hashes.SHA256())).decode()
        wallet.script["/query"] = lambda body: (200, json.dumps(reply).encode())
        path = tmp_path / "rsa.toml"
        path.write_text(RSA_TOML.format(url=wallet.url))
        (channel,) = load_channels(path, world=world.runtime)
        assert channel.query("P1").result_code == "NOTPAY"
        body = wallet.of("/query")[-1]["body"]
        merchant.public_key().verify(base64.b64decode(body["sign"]), _pairs(body), padding.PKCS1v15(),
                                     hashes.SHA256())
        forged = dict(reply, result_code="SUCCESS")
        wallet.script["/query"] = lambda body: (200, json.dumps(forged).encode())
        with pytest.raises(Exception):  # noqa: B017
            channel.query("P1")
    finally:
        wallet.close()


def test_rsa_key_too_small_is_config_error(tmp_path) -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    (tmp_path / "merchant.pem").write_bytes(_pem_private(small))
    (tmp_path / "wallet.pub").write_bytes(_pem_public(small))
    path = tmp_path / "rsa.toml"
    path.write_text(RSA_TOML.format(url="http://127.0.0.1:1"))
    with pytest.raises(ConfigError):
        load_config(path)
