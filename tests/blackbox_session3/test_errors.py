"""The error-code list."""

from __future__ import annotations

import pytest

import payengine

# "Expected failures are typed (`payengine.PaymentError` subclasses, each with a `code`)"
LISTED = [
    "InvalidAmount", "InvalidRequest", "CurrencyMismatch", "UnknownOrder", "UnknownAccount", "UnknownHold",
    "AccountExists", "InsufficientBalance", "HoldRefused", "HoldNotPending", "IdempotencyConflict",
    "IllegalTransition", "RefundRefused", "DuplicateSuspected", "NoRoute", "AttemptRefused", "RiskBlocked",
    "VerificationFailed", "NotificationRejected", "RequestRejected", "Overloaded", "EngineClosed",
    "DatabaseInUse",
]

# codes the README spells out
CODES = {
    "NoRoute": "no_route", "AttemptRefused": "attempt_refused", "RiskBlocked": "risk_blocked",
    "VerificationFailed": "verification_failed", "NotificationRejected": "notification_rejected",
    "RequestRejected": "request_rejected", "StatementError": "bad_statement", "ConfigError": "config_error",
}


@pytest.mark.parametrize("name", LISTED)
def test_listed_error_is_exported_typed_with_code(name) -> None:
    cls = getattr(payengine, name)
    assert issubclass(cls, payengine.PaymentError)
    assert isinstance(cls.code, str) and cls.code


@pytest.mark.parametrize(("name", "code"), sorted(CODES.items()))
def test_spelled_out_codes(name, code) -> None:
    assert getattr(payengine, name).code == code


def test_codes_are_distinct() -> None:
    codes = [getattr(payengine, n).code for n in LISTED]
    assert len(set(codes)) == len(codes)


def test_statement_error_is_invalid_request() -> None:
    # "raises `StatementError` (an `InvalidRequest`, code `bad_statement`, naming the line)"
    assert issubclass(payengine.StatementError, payengine.InvalidRequest)


def test_config_error_is_payment_error() -> None:
    # "`payengine.ConfigError` (a `PaymentError`, code `config_error`)"
    assert issubclass(payengine.ConfigError, payengine.PaymentError)
