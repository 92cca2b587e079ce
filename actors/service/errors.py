"""Typed errors to HTTP: one status per error code and one JSON body for every error.

``{"error": {"code": ..., "message": ..., "details": {...}}}``: ``code`` is the typed
error's stable ``code`` (or one of the service's own: ``validation_error``,
``payload_too_large``, ``rate_limited``, ``unauthorized``, ``not_found``,
``method_not_allowed``, ``internal_error``); ``details`` carries the error's public fields
(``reason``, ``rule``, ``attempts_left``, ``order_ids``...). Pure: no I/O, any thread.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from payengine.engine.discounts import QuoteRefused, UnknownQuote
from payengine.engine.errors import (
    AccountClosed,
    AccountExists,
    AccountFrozen,
    ActionNotApplicable,
    AgreementInactive,
    AgreementMismatch,
    AgreementNotFound,
    AlreadyCaptured,
    AttemptRefused,
    AuthorisationVoided,
    CaptureAboveAuthorised,
    ChannelsMissing,
    DatabaseInUse,
    DuplicateSuspected,
    EngineClosed,
    HoldNotPending,
    HoldRefused,
    IdempotencyConflict,
    IllegalTransition,
    IncompatibleDatabase,
    InsufficientBalance,
    NotificationRejected,
    Overloaded,
    PaymentError,
    RefundRefused,
    RequestRejected,
    RiskBlocked,
    UnknownAccount,
    UnknownAttentionItem,
    UnknownHold,
    UnknownOrder,
    UnknownWithholding,
    VerificationFailed,
)

RETRY_AFTER_S = 1
"""What ``Retry-After`` says for ``Overloaded`` and ``EngineClosed`` (seconds)."""

_STATUS: tuple[tuple[type[PaymentError], int], ...] = (
    (UnknownQuote, 404), (UnknownOrder, 404), (UnknownAccount, 404), (UnknownHold, 404),
    (UnknownWithholding, 404), (AgreementNotFound, 404), (UnknownAttentionItem, 404),
    (ActionNotApplicable, 409), (AlreadyCaptured, 409), (CaptureAboveAuthorised, 409),
    (AuthorisationVoided, 409),
    (IdempotencyConflict, 409), (IllegalTransition, 409), (AccountExists, 409),
    (HoldRefused, 409), (HoldNotPending, 409), (AttemptRefused, 409), (RefundRefused, 409),
    (DuplicateSuspected, 409), (QuoteRefused, 409), (AgreementInactive, 409),
    (AgreementMismatch, 409), (InsufficientBalance, 409), (AccountFrozen, 409),
    (AccountClosed, 409), (ChannelsMissing, 409),
    (RiskBlocked, 403), (VerificationFailed, 403),
    (Overloaded, 503), (EngineClosed, 503), (DatabaseInUse, 503), (IncompatibleDatabase, 503),
)
"""Checked in order (a subclass before its base); anything else typed is 400."""

_REQUEST_STATUS = {
    "malformed": 400, "unknown_merchant": 401, "wrong_sign_type": 401,
    "unsupported_sign_type": 401, "bad_signature": 401, "stale_timestamp": 401,
    "replayed_nonce": 409, "merchant_frozen": 403, "merchant_closed": 403,
    "user_frozen": 403, "user_closed": 403, "pay_window_over": 409,
}
"""``RequestRejected`` by its reason."""

_DETAIL_FIELDS = ("reason", "rule", "attempts_left", "state", "order_ids", "channels", "key")


def status_of(error: PaymentError) -> int:
    """The HTTP status a typed error is answered with."""
    if isinstance(error, RequestRejected):
        return _REQUEST_STATUS.get(error.reason, 400)
    if isinstance(error, NotificationRejected):
        return 409 if error.reason in ("unverified", "unconfirmed") else 400
    for kind, status in _STATUS:
        if isinstance(error, kind):
            return status
    return 400


def details_of(error: PaymentError) -> dict[str, Any]:
    """The typed error's public fields (never a stack, a key, or data it matched)."""
    details: dict[str, Any] = {}
    for name in _DETAIL_FIELDS:
        value = getattr(error, name, None)
        if value is None or value == "" or (name == "state" and not value):
            continue
        details[name] = list(value) if isinstance(value, tuple) else value
    return details


def error_body(code: str, message: str, details: Mapping[str, Any] | None = None) -> bytes:
    """The one error body, as JSON bytes."""
    return json.dumps({"error": {"code": code, "message": message,
                                 "details": dict(details or {})}},
                      ensure_ascii=False, separators=(",", ":")).encode()


def headers_of(error: PaymentError) -> dict[str, str]:
    """Extra response headers: ``Retry-After`` when asking again later may work."""
    if isinstance(error, (Overloaded, EngineClosed)):
        return {"Retry-After": str(RETRY_AFTER_S)}
    return {}
