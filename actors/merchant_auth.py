"""Checking merchant requests from outside the process, and signing them (the client side).

``MerchantGate`` is what ``Engine.submit_signed`` (and ``close_signed``, ``refund_signed``,
``query_signed``) run first: the wire format and the pure checks are
``engine.merchant_request``'s; here are the lookups (the merchant's key and status), RSA
(through the optional ``cryptography`` package: ``pip install 'payengine[rsa]'``), the
nonces (``persistence.merchants.NonceBook``) and the record of every refusal.

The order of the checks is chosen so that a refusal's reason can be believed: the headers'
form, the body's size, the merchant, the sign type, the signature (nothing of the body is
read before it verified), the timestamp (so ``stale_timestamp`` means "really signed by the
merchant, but long ago": a replay or a clock), the merchant's status, then the body's
fields, the user's status, the pay window of an order that exists, and last the nonce, in
the same transaction as the order a pay creates. A refusal at any step has stored nothing
but its record in ``rejected_requests``.

``MerchantSigner`` builds and signs requests as a merchant's server would: tests, the
simulator, and a model for a client in another language.

Threads: any thread may call any method; the state is the database's and the NonceBook's.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from payengine.engine.checks import check_id, check_int, check_text, shown
from payengine.engine.errors import EngineClosed, InvalidRequest, PaymentError, RequestRejected
from payengine.engine.merchant_request import (
    BODY_BYTES_MAX,
    MERCHANT_HEADER,
    NONCE_HEADER,
    NONCE_RE,
    SECRET_MAX,
    SECRET_MIN,
    SIGN_TYPE_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    AccountStatus,
    Envelope,
    MerchantOp,
    PayOp,
    SignType,
    check_status,
    check_timestamp,
    encode_close,
    encode_pay,
    encode_query,
    encode_refund,
    hmac_matches,
    hmac_signature,
    op_name,
    parse_body,
    parse_envelope,
    string_to_sign,
)
from payengine.engine.order import OrderPolicy, PaymentRequest
from payengine.persistence import merchants
from payengine.persistence.merchants import (
    MerchantRecord,
    NonceBook,
    NonceUse,
    RequestRejection,
)
from payengine.persistence.store import Store

PEM_MAX = 16 * 1024
"""The longest public key accepted, in PEM characters (an 8192-bit key is about 1.5 KiB)."""
RSA_BITS_MIN = 2048
RSA_BITS_MAX = 8192

_MONEY_OPS = frozenset({"pay", "refund"})
"""Operations a frozen or closed merchant is refused (a close or a query moves no money,
and a close gives the user's held vouchers back)."""


@dataclass(frozen=True)
class MerchantRequestConfig:
    """Bounds of signed merchant requests (``EngineConfig.merchant_requests``)."""

    timestamp_window_ms: int = 300_000
    """A request signed more than this before or after the engine's clock is refused
    (``stale_timestamp``); a nonce is remembered as long as its request could be taken."""
    nonces_max: int = 500_000
    """Nonces remembered at most (about 150 bytes each on disk); past it a request is refused
    ``Overloaded`` (at 200 requests/s a 5-minute window holds 60,000)."""
    nonce_prune_interval_ms: int = 1_000
    nonce_prune_batch_max: int = 1_000

    def __post_init__(self) -> None:
        """Settings are input: a bad one is ``InvalidRequest``, even under ``python -O``."""
        check_int(self.timestamp_window_ms, "timestamp_window_ms", 1_000, 3_600_000)
        check_int(self.nonces_max, "nonces_max", 1, 10_000_000)
        check_int(self.nonce_prune_interval_ms, "nonce_prune_interval_ms", 1, 3_600_000)
        check_int(self.nonce_prune_batch_max, "nonce_prune_batch_max", 1, 100_000)


@dataclass(frozen=True, slots=True)
class MerchantView:
    """A merchant's standing and how it signs (never its key)."""

    merchant_id: str
    status: str
    """``active``, ``frozen`` or ``closed``."""
    sign_type: str | None
    """``HMAC-SHA256``, ``RSA-SHA256``, or ``None`` (no key: it cannot sign requests)."""
    key_set_at_ms: int | None
    updated_at_ms: int

    @staticmethod
    def of(record: MerchantRecord) -> MerchantView:
        return MerchantView(record.merchant_id, record.status.value,
                            None if record.sign_type is None else record.sign_type.value,
                            record.key_set_at_ms, record.updated_at_ms)


@dataclass(frozen=True, slots=True)
class Verified:
    """A request whose envelope, signature, timestamp and body passed."""

    envelope: Envelope
    op: MerchantOp

    @property
    def nonce(self) -> NonceUse:
        env = self.envelope
        return NonceUse(env.merchant_id, env.nonce, env.timestamp_ms)


# ---------------------------------------------------------------------- RSA (optional)


def _rsa() -> Any:
    """The pieces of ``cryptography`` RSA needs, or ``None`` if it is not installed."""
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import padding, rsa
    except ImportError:
        return None
    return InvalidSignature, hashes, serialization, padding, rsa


def rsa_available() -> bool:
    """Whether RSA-SHA256 can be used here (the ``cryptography`` package is installed)."""
    return _rsa() is not None


_NO_RSA = ("RSA keys need the optional 'cryptography' package: pip install 'payengine[rsa]'")


@functools.lru_cache(maxsize=1_024)
def _public_key(pem: str) -> Any:
    """The RSA public key of ``pem`` (cached: parsing costs more than verifying)."""
    parts = _rsa()
    if parts is None:
        raise InvalidRequest(_NO_RSA)
    _, _, serialization, _, rsa = parts
    try:
        key = serialization.load_pem_public_key(pem.encode("ascii"))
    except (ValueError, TypeError, UnicodeEncodeError) as error:
        raise InvalidRequest(f"public_key_pem is not a PEM public key: {error}") from None
    except Exception as error:  # cryptography's UnsupportedAlgorithm and the like
        raise InvalidRequest(f"public_key_pem cannot be used: {type(error).__name__}") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise InvalidRequest(f"public_key_pem must be an RSA key, not {type(key).__name__}")
    if not RSA_BITS_MIN <= key.key_size <= RSA_BITS_MAX:
        raise InvalidRequest(f"an RSA key of {RSA_BITS_MIN}..{RSA_BITS_MAX} bits, not "
                             f"{key.key_size}")
    return key


def check_public_key(pem: object) -> str:
    """Return ``pem`` if it is a usable RSA public key (SubjectPublicKeyInfo PEM, 2048..8192
    bits); ``InvalidRequest`` otherwise, also when ``cryptography`` is not installed."""
    if not isinstance(pem, str) or not 0 < len(pem) <= PEM_MAX:
        raise InvalidRequest(f"public_key_pem must be a PEM str of at most {PEM_MAX} "
                             f"characters, not {shown(pem)}")
    _public_key(pem)
    return pem


def rsa_signature_matches(pem: str, message: bytes, signature_b64: str) -> bool:
    """Whether ``signature_b64`` is the RSA PKCS#1 v1.5 SHA-256 signature of ``message`` by
    the key of ``pem``. ``RequestRejected`` (``unsupported_sign_type``) without
    ``cryptography``: the engine cannot tell, so it does not believe."""
    parts = _rsa()
    if parts is None:
        raise RequestRejected(f"this engine cannot verify RSA-SHA256: {_NO_RSA}",
                              "unsupported_sign_type")
    invalid, hashes, _, padding, _ = parts
    try:
        signature = base64.b64decode(signature_b64, validate=True)
    except (binascii.Error, ValueError):
        return False
    if base64.b64encode(signature).decode("ascii") != signature_b64:
        return False  # one spelling only: unused bits set would be a second valid signature
    try:
        _public_key(pem).verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
    except invalid:
        return False
    return True


# ---------------------------------------------------------------------- the gate


class MerchantGate:
    """Verifies signed merchant requests for one engine; see the module docstring."""

    def __init__(self, store: Store, config: MerchantRequestConfig, policy: OrderPolicy,
                 currencies: Mapping[str, int], now_ms: Callable[[], int], log: Any,
                 planted_bugs: frozenset[str] = frozenset()) -> None:
        self._store = store
        self._config = config
        self._policy = policy
        self._currencies = currencies
        self._now_ms = now_ms
        self._log = log
        self._accept_bad_signature = "accept-bad-signature" in planted_bugs
        self.nonces = NonceBook(store, window_ms=config.timestamp_window_ms,
                                rows_max=config.nonces_max,
                                prune_interval_ms=config.nonce_prune_interval_ms,
                                prune_batch_max=config.nonce_prune_batch_max, now_ms=now_ms())
        self._restricted = merchants.any_restricted(store)
        """Whether any merchant or user was ever frozen or closed: until one is, a submit
        reads no status (this engine is the database's only writer, so it is exact)."""

    # ------------------------------------------------------------------ registry

    def register_key(self, merchant_id: object, secret: object,
                     public_key_pem: object) -> MerchantView:
        check_id(merchant_id, "merchant_id")
        assert isinstance(merchant_id, str)
        if (secret is None) == (public_key_pem is None):
            raise InvalidRequest("give a merchant exactly one key: secret (HMAC-SHA256) or "
                                 "public_key_pem (RSA-SHA256)")
        if secret is not None:
            check_text(secret, "secret", SECRET_MAX, required=True)
            assert isinstance(secret, str)
            if len(secret) < SECRET_MIN:
                raise InvalidRequest(f"an HMAC secret of {SECRET_MIN}..{SECRET_MAX} characters,"
                                     f" not {len(secret)}: a short one can be guessed")
            record = merchants.set_key(self._store, merchant_id, SignType.HMAC_SHA256, secret,
                                       None, self._now_ms())
        else:
            pem = check_public_key(public_key_pem)
            record = merchants.set_key(self._store, merchant_id, SignType.RSA_SHA256, None, pem,
                                       self._now_ms())
        self._log.info("merchant.key_registered", merchant_id=merchant_id,
                       sign_type=record.sign_type)
        return MerchantView.of(record)

    def merchant(self, merchant_id: object) -> MerchantView | None:
        check_id(merchant_id, "merchant_id")
        assert isinstance(merchant_id, str)
        record = merchants.load_merchant(self._store, merchant_id)
        return None if record is None else MerchantView.of(record)

    def set_status(self, kind: str, ident: object, status: object) -> str:
        check_id(ident, f"{kind}_id")
        assert isinstance(ident, str)
        try:
            wanted = AccountStatus(status)  # type: ignore[arg-type]
        except ValueError:
            raise InvalidRequest(f"status must be one of {[s.value for s in AccountStatus]}, "
                                 f"got {shown(status)}") from None
        if wanted is not AccountStatus.ACTIVE:
            self._restricted = True  # before the write: a submit after it must look
        before = merchants.set_status(self._store, kind, ident, wanted, self._now_ms())
        self._log.info(f"{kind}.status_set", **{f"{kind}_id": ident},
                       from_status=before.value, to_status=wanted.value)
        return before.value

    def user_status(self, user_id: object) -> str:
        check_id(user_id, "user_id")
        assert isinstance(user_id, str)
        return merchants.user_status(self._store, user_id).value

    @property
    def restricted(self) -> bool:
        """Whether any merchant or user was ever frozen or closed on this database."""
        return self._restricted

    def check_parties(self, merchant_id: str, user_id: str | None) -> None:
        """Refuse a merchant or user that is frozen or closed (``RequestRejected``: reason
        ``merchant_frozen``...). Reads nothing while nobody ever was."""
        if not self._restricted:
            return
        merchant, user = merchants.party_statuses(self._store, merchant_id, user_id)
        check_status("merchant", merchant_id, merchant)
        if user_id is not None:
            check_status("user", user_id, user)

    # ------------------------------------------------------------------ verification

    def verify(self, body: object, headers: object, expected_op: str) -> Verified:
        """Check a request up to (not including) its nonce and what its order says; refusals
        are recorded and raised as ``RequestRejected``."""
        envelope: Envelope | None = None
        op: MerchantOp | None = None
        try:
            envelope = parse_envelope(headers)
            if not isinstance(body, bytes) or not 0 < len(body) <= BODY_BYTES_MAX:
                raise RequestRejected(f"a request body is the raw bytes received, 1.."
                                      f"{BODY_BYTES_MAX} of them, not {shown(body)}",
                                      "malformed")
            merchant = merchants.load_merchant(self._store, envelope.merchant_id)
            if merchant is None or merchant.sign_type is None:
                raise RequestRejected(f"merchant {envelope.merchant_id} has no key registered",
                                      "unknown_merchant")
            if merchant.sign_type is not envelope.sign_type:
                raise RequestRejected(
                    f"merchant {envelope.merchant_id} signs with {merchant.sign_type.value}, "
                    f"not {envelope.sign_type.value}", "wrong_sign_type")
            if not self._signature_ok(merchant, envelope, body):
                raise RequestRejected("the signature does not verify with merchant "
                                      f"{envelope.merchant_id}'s key", "bad_signature")
            check_timestamp(envelope.timestamp_ms, self._now_ms(),
                            self._config.timestamp_window_ms, self.nonces.floor_ms)
            if expected_op in _MONEY_OPS:
                check_status("merchant", merchant.merchant_id, merchant.status)
            op = parse_body(body, envelope.merchant_id, policy=self._policy,
                            currencies=self._currencies)
            if op_name(op) != expected_op:
                raise RequestRejected(f"this call takes op {expected_op!r}, the body asks "
                                      f"{op_name(op)!r}", "malformed")
            if isinstance(op, PayOp):
                self.check_parties(envelope.merchant_id, op.request.user_id)
            if self.nonces.known(envelope.merchant_id, envelope.nonce):
                # a read, so a replay is named as one before anything else about its order;
                # the insert with the request's effect is what makes the nonce used once
                raise RequestRejected(f"merchant {envelope.merchant_id} used nonce "
                                      f"{envelope.nonce} before: a replay", "replayed_nonce")
            return Verified(envelope, op)
        except RequestRejected as error:
            self.reject(envelope, op, error, op_hint=expected_op)
            raise

    def _signature_ok(self, merchant: MerchantRecord, envelope: Envelope, body: bytes) -> bool:
        message = string_to_sign(envelope.sign_type, envelope.merchant_id,
                                 envelope.timestamp_ms, envelope.nonce, body)
        if envelope.sign_type is SignType.HMAC_SHA256:
            assert merchant.secret is not None, f"merchant {merchant.merchant_id}: no secret"
            ok = hmac_matches(merchant.secret, message, envelope.signature)
        else:
            assert merchant.public_key_pem is not None, f"{merchant.merchant_id}: no key"
            ok = rsa_signature_matches(merchant.public_key_pem, message, envelope.signature)
        return ok or self._accept_bad_signature  # the planted bug, for the simulator only

    def use_nonce(self, verified: Verified) -> None:
        """Record the request's nonce on its own (``replayed_nonce`` if used before)."""
        try:
            self.nonces.use(verified.nonce, self._now_ms())
        except RequestRejected as error:
            self.reject(verified.envelope, verified.op, error)
            raise

    def reject(self, envelope: Envelope | None, op: MerchantOp | None, error: PaymentError,
               op_hint: str = "") -> None:
        """Record and log a refusal (what the request claimed, clipped); ``op_hint``: the
        operation called, when the body was not read. Its reason: a ``RequestRejected``'s
        ``reason``, else the error's ``code`` (``risk_blocked``, ``idempotency_conflict``)."""
        reason = error.reason if isinstance(error, RequestRejected) else error.code
        merchant_id = "" if envelope is None else envelope.merchant_id
        name = op_hint if op is None else op_name(op)
        order_no = "" if op is None else (op.request.merchant_order_no if isinstance(op, PayOp)
                                          else op.merchant_order_no)
        nonce = "" if envelope is None else envelope.nonce
        with contextlib.suppress(EngineClosed):  # shutting down: the refusal stands anyway
            merchants.record_rejection(self._store, RequestRejection(
                self._now_ms(), merchant_id, name, order_no, nonce, reason, error.message))
        self._log.warning("merchant_request.rejected", merchant_id=merchant_id, op=name,
                          merchant_order_no=order_no, reason=reason,
                          detail=error.message)


# ---------------------------------------------------------------------- the client side


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class MerchantSigner:
    """Signs requests as merchant ``merchant_id``: with ``secret`` (HMAC-SHA256) or with
    ``private_key_pem`` (RSA-SHA256, PKCS#1 v1.5; needs ``cryptography``).

    Each method returns ``(body, headers)`` to send (or hand to ``Engine.submit_signed``...).
    Every call signs afresh: a new nonce (``secrets.token_hex(16)``) and the time now
    (``clock_ms``, the wall clock by default); pass ``timestamp_ms`` / ``nonce`` to choose
    them (tests, the simulator). A retry is signed again, never re-sent as it was: the
    engine refuses a nonce it has seen.
    """

    def __init__(self, merchant_id: str, *, secret: str | None = None,
                 private_key_pem: str | bytes | None = None,
                 clock_ms: Callable[[], int] = _wall_clock_ms) -> None:
        check_id(merchant_id, "merchant_id")
        if (secret is None) == (private_key_pem is None):
            raise InvalidRequest("a signer needs exactly one key: secret or private_key_pem")
        self.merchant_id = merchant_id
        self._secret = secret
        self._private_key: Any = None
        self.sign_type = SignType.HMAC_SHA256
        if private_key_pem is not None:
            parts = _rsa()
            if parts is None:
                raise InvalidRequest(_NO_RSA)
            serialization = parts[2]
            pem = private_key_pem.encode("ascii") if isinstance(private_key_pem, str) else (
                private_key_pem)
            self._private_key = serialization.load_pem_private_key(pem, password=None)
            self.sign_type = SignType.RSA_SHA256
        self._clock_ms = clock_ms

    def signature(self, message: bytes) -> str:
        """The signature of a string to sign (``engine.merchant_request.string_to_sign``)."""
        if self._secret is not None:
            return hmac_signature(self._secret, message)
        parts = _rsa()
        assert parts is not None
        _, hashes, _, padding, _ = parts
        raw = self._private_key.sign(message, padding.PKCS1v15(), hashes.SHA256())
        return base64.b64encode(raw).decode("ascii")

    def sign(self, body: bytes, *, timestamp_ms: int | None = None,
             nonce: str | None = None) -> dict[str, str]:
        """The headers that make ``body`` a signed request."""
        if not isinstance(body, bytes):
            raise InvalidRequest(f"a body to sign is bytes, not {shown(body)}")
        stamp = self._clock_ms() if timestamp_ms is None else timestamp_ms
        nonce = secrets.token_hex(16) if nonce is None else nonce
        if not NONCE_RE.fullmatch(nonce):
            raise InvalidRequest(f"a nonce is 16..64 characters of A-Z a-z 0-9 _ -, not "
                                 f"{shown(nonce)}")
        message = string_to_sign(self.sign_type, self.merchant_id, stamp, nonce, body)
        return {MERCHANT_HEADER: self.merchant_id, TIMESTAMP_HEADER: str(stamp),
                NONCE_HEADER: nonce, SIGN_TYPE_HEADER: self.sign_type.value,
                SIGNATURE_HEADER: self.signature(message)}

    def pay(self, request: PaymentRequest, *, timestamp_ms: int | None = None,
            nonce: str | None = None) -> tuple[bytes, dict[str, str]]:
        """``op: pay`` for ``request`` (its ``merchant_id`` must be this signer's)."""
        if request.merchant_id != self.merchant_id:
            raise InvalidRequest(f"request of merchant {request.merchant_id!r} signed as "
                                 f"{self.merchant_id!r}")
        body = encode_pay(request)
        return body, self.sign(body, timestamp_ms=timestamp_ms, nonce=nonce)

    def close(self, merchant_order_no: str, *, timestamp_ms: int | None = None,
              nonce: str | None = None) -> tuple[bytes, dict[str, str]]:
        body = encode_close(merchant_order_no)
        return body, self.sign(body, timestamp_ms=timestamp_ms, nonce=nonce)

    def refund(self, merchant_order_no: str, refund_no: str, amount_minor: int,
               reason: str = "", *, timestamp_ms: int | None = None,
               nonce: str | None = None) -> tuple[bytes, dict[str, str]]:
        body = encode_refund(merchant_order_no, refund_no, amount_minor, reason)
        return body, self.sign(body, timestamp_ms=timestamp_ms, nonce=nonce)

    def query(self, merchant_order_no: str, *, timestamp_ms: int | None = None,
              nonce: str | None = None) -> tuple[bytes, dict[str, str]]:
        body = encode_query(merchant_order_no)
        return body, self.sign(body, timestamp_ms=timestamp_ms, nonce=nonce)
