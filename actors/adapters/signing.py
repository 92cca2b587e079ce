"""Signatures of a configured channel: HMAC-SHA256, MD5 (WeChat Pay v2 style) and RSA-SHA256.

What is signed (``Signing.form``):

* ``sorted-pairs``: the message's fields sorted by name, those with an empty value and the
  signature field itself left out, as ``k1=v1&k2=v2``; the shared-key methods then append
  ``&key=KEY`` (``Signing.key_param``), as WeChat Pay v2 does (RSA appends nothing).
* ``body``: the exact body bytes; MD5 appends the key's bytes (MD5 has no key of its own).

How: ``hmac-sha256`` is HMAC-SHA256 under the shared key; ``md5`` the MD5 digest;
``rsa-sha256`` RSASSA-PKCS1-v1_5 with SHA-256, signed with the merchant's private key and
verified with the wallet's public key (the ``cryptography`` package: ``pip install
'payengine[rsa]'``). The signature is hex (``hex-upper`` by default for the shared-key
methods) or base64 (RSA's default).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from payengine.actors.adapters.config import Credentials, Signing
from payengine.engine.errors import ConfigError


def pairs_text(fields: Mapping[str, Any], *, leave_out: str | None) -> str:
    """``k1=v1&k2=v2...`` over ``fields`` sorted by name; empty values and ``leave_out``
    (the signature field) are left out."""
    parts = []
    for name in sorted(fields):
        value = fields[name]
        if name == leave_out or value is None or value == "":
            continue
        parts.append(f"{name}={scalar_text(value)}")
    return "&".join(parts)


def scalar_text(value: Any) -> str:
    """A field's value as the text that is signed and sent in a form."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | Decimal):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)


def message_of_pairs(signing: Signing, credentials: Credentials,
                     fields: Mapping[str, Any]) -> bytes:
    """The bytes a ``sorted-pairs`` signature is computed over."""
    text = pairs_text(fields, leave_out=signing.field)
    if signing.method in ("hmac-sha256", "md5"):
        assert credentials.key is not None
        text = f"{text}&{signing.key_param}={credentials.key}"
    return text.encode("utf-8")


def message_of_body(signing: Signing, credentials: Credentials, body: bytes) -> bytes:
    """The bytes a ``body`` signature is computed over."""
    if signing.method == "md5":
        assert credentials.key is not None
        return body + credentials.key.encode("utf-8")
    return body


def sign(signing: Signing, credentials: Credentials, message: bytes) -> str:
    """The signature of ``message`` (from ``message_of_pairs`` or ``message_of_body``)."""
    method = signing.method
    if method == "hmac-sha256":
        assert credentials.key is not None
        raw = hmac.new(credentials.key.encode("utf-8"), message, hashlib.sha256).digest()
    elif method == "md5":
        raw = hashlib.md5(message, usedforsecurity=False).digest()
    elif method == "rsa-sha256":
        raw = _rsa_sign(credentials, message)
    else:
        raise ValueError(f"signing method {method} does not sign")
    return _encode(raw, signing.signature_encoding)


def verify(signing: Signing, credentials: Credentials, message: bytes, signature: object
           ) -> bool:
    """Whether ``signature`` is the wallet's signature of ``message``. Never raises on a
    malformed signature: it just does not verify."""
    if not isinstance(signature, str) or not signature or len(signature) > 4_096:
        return False
    if signing.method == "rsa-sha256":
        try:
            raw = base64.b64decode(signature, validate=True) if (
                signing.signature_encoding == "base64") else bytes.fromhex(signature)
        except ValueError:
            return False
        return _rsa_verify(credentials, message, raw)
    expected = sign(signing, credentials, message)
    if signing.signature_encoding == "base64":
        return hmac.compare_digest(expected.encode(), signature.encode("utf-8", "replace"))
    return hmac.compare_digest(expected.lower().encode(),
                               signature.lower().encode("utf-8", "replace"))


def _encode(raw: bytes, encoding: str) -> str:
    if encoding == "base64":
        return base64.b64encode(raw).decode("ascii")
    return raw.hex().upper() if encoding == "hex-upper" else raw.hex()


# ---------------------------------------------------------------------------- RSA


def _cryptography() -> Any:
    try:
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import padding, rsa
    except ImportError:
        raise ConfigError("signing.method", "rsa-sha256 needs the cryptography package: "
                                            "pip install 'payengine[rsa]'") from None
    return hashes, serialization, padding, rsa


def check_rsa_keys(credentials: Credentials) -> None:
    """Load the RSA keys once, so a bad key file is a ``ConfigError`` at load, not a failed
    payment later."""
    _, serialization, _, rsa = _cryptography()
    if credentials.private_key_pem is not None:
        try:
            key = serialization.load_pem_private_key(credentials.private_key_pem, None)
        except (ValueError, TypeError) as error:
            raise ConfigError("credentials.private_key_file",
                              f"not an unencrypted PEM private key: {error}") from None
        if not isinstance(key, rsa.RSAPrivateKey) or key.key_size < 2048:
            raise ConfigError("credentials.private_key_file", "must be an RSA key of at least "
                                                              "2048 bits")
    if credentials.wallet_public_key_pem is not None:
        try:
            public = serialization.load_pem_public_key(credentials.wallet_public_key_pem)
        except (ValueError, TypeError) as error:
            raise ConfigError("credentials.wallet_public_key_file",
                              f"not a PEM public key: {error}") from None
        if not isinstance(public, rsa.RSAPublicKey):
            raise ConfigError("credentials.wallet_public_key_file", "must be an RSA key")


def _rsa_sign(credentials: Credentials, message: bytes) -> bytes:
    hashes, serialization, padding, _ = _cryptography()
    assert credentials.private_key_pem is not None
    key = serialization.load_pem_private_key(credentials.private_key_pem, None)
    return bytes(key.sign(message, padding.PKCS1v15(), hashes.SHA256()))


def _rsa_verify(credentials: Credentials, message: bytes, signature: bytes) -> bool:
    hashes, serialization, padding, _ = _cryptography()
    if credentials.wallet_public_key_pem is None:
        return False
    from cryptography.exceptions import InvalidSignature

    key = serialization.load_pem_public_key(credentials.wallet_public_key_pem)
    try:
        key.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        return False
    return True
