"""The error list: each error of these sections is a PaymentError with the code the README names."""

from __future__ import annotations

import pytest

import payengine


@pytest.mark.parametrize("name,code", [
    ("AgreementNotFound", "agreement_not_found"), ("AgreementInactive", "agreement_inactive"),
    ("AgreementMismatch", "agreement_mismatch"),
    ("AgreementsUnsupported", "agreements_unsupported"),
    ("UnknownWithholding", "unknown_withholding"), ("ChannelsMissing", "channels_missing"),
    ("NoRoute", "no_route"), ("AccountFrozen", "account_frozen"),
    ("AccountClosed", "account_closed"), ("ConfigError", "config_error"),
    ("InsufficientBalance", "insufficient_balance"),
    ("NotificationRejected", "notification_rejected"),
    ("AttemptRefused", "attempt_refused"),
])
def test_the_error_is_a_payment_error_with_the_readmes_code(name: str, code: str) -> None:
    error = getattr(payengine, name)
    assert issubclass(error, payengine.PaymentError)
    assert error.code == code


@pytest.mark.parametrize("name", [
    "InvalidAmount", "InvalidRequest", "CurrencyMismatch", "UnknownOrder", "UnknownAccount",
    "IdempotencyConflict", "IllegalTransition", "RefundRefused", "Overloaded",
    "RequestRejected", "EngineClosed", "DatabaseInUse", "DuplicateSuspected", "RiskBlocked"])
def test_every_other_named_error_is_a_payment_error_with_a_code(name: str) -> None:
    error = getattr(payengine, name)
    assert issubclass(error, payengine.PaymentError)
    assert isinstance(error.code, str) and error.code


def test_every_name_these_sections_use_is_importable_from_the_top() -> None:
    for name in ("AgreementStatus", "AgreementState", "Agreement", "Withholding",
                 "WithholdState", "WithholdConfig", "AgreementChannel", "Route",
                 "RoutingTable", "BreakerPolicy", "ChannelTry", "load_routing", "load_channels",
                 "PayScenario", "PayDetails"):
        assert hasattr(payengine, name), name
