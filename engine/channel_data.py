"""What a cash channel needs to start a payment, and what it gives back for the payer.

A wallet cannot charge from an amount alone: a payment inside the wallet app (JSAPI, a mini
program) needs the payer's id there (an openid), a customer-presented barcode (被扫) needs
the code the terminal scanned, a mobile-web payment needs the client's IP. ``PayDetails`` is
that data, carried by the cash part, kept with the order (so a pay re-sent after a crash
sends the same) and given to ``Channel.pay``.

The pay reply in turn carries what the cashier page or terminal needs to let the user pay
(R-ASYNC, pre-payment): a prepay id, the QR code to show, a deeplink, or "the user is
paying: ask for the password". ``Prepay`` is that, kept with the order for polling.

Both come from outside (the caller, the channel's adapter), so both are checked here, field
by field, before anything stores them.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from dataclasses import dataclass

from payengine.engine.checks import check_instance, check_optional_id, check_text, shown
from payengine.engine.errors import InvalidRequest


class PayScenario(enum.StrEnum):
    """How the payer pays (the wallet's trade type)."""

    NATIVE = "native"
    """The terminal shows a QR code (``Prepay.code_url``) that the payer scans."""
    JSAPI = "jsapi"
    """Inside the wallet's app or a mini program: needs ``payer_id`` (the openid)."""
    BARCODE = "barcode"
    """The payer shows a code that the terminal scans (被扫, micropay): needs ``auth_code``."""
    APP = "app"
    """The merchant's own app hands the prepay id to the wallet's SDK."""
    H5 = "h5"
    """A mobile browser, sent to the wallet by ``Prepay.deeplink``: needs ``client_ip``."""
    WITHHOLD = "withhold"
    """Withholding (代扣) on a signed agreement, without the payer: needs ``agreement_id``.
    Made by ``Engine.withhold``; a request of its own with it is refused."""


URL_MAX = 512
"""Most characters in a URL (notify URL, QR code content, deeplink)."""
USER_ACTION_MAX = 64
"""Most characters in ``Prepay.user_action``."""

_AUTH_CODE = re.compile(r"[0-9]{10,32}")
"""Wallet payment codes are digits: WeChat's 18, Alipay's 16 to 24."""
_URL = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s]+")
"""A URL with a scheme (https, or a wallet's own: weixin://, alipays://) and no spaces."""


@dataclass(frozen=True, slots=True)
class PayDetails:
    """What the cash channel needs besides the amount; kept with the order."""

    scenario: PayScenario = PayScenario.NATIVE
    payer_id: str | None = None
    """The payer's id at the wallet (WeChat openid, Alipay buyer id); required for JSAPI."""
    auth_code: str | None = None
    """The payment code the terminal scanned (10 to 32 digits); required for BARCODE."""
    client_ip: str | None = None
    """The payer's IP address (v4 or v6); required for H5."""
    notify_url: str | None = None
    """Where the wallet posts its notification for this payment, if not the channel's."""
    device_id: str | None = None
    """The terminal or device that took the payment (a pump's terminal, a cash register)."""
    agreement_id: str | None = None
    """WITHHOLD: the engine's id of the agreement the wallet charges on."""


@dataclass(frozen=True, slots=True)
class Prepay:
    """What the cashier page or terminal needs to let the user pay, from the pay reply."""

    prepay_id: str | None = None
    """The wallet's prepay id (JSAPI, APP), handed to its SDK by the cashier page."""
    code_url: str | None = None
    """NATIVE: the content of the QR code to show."""
    deeplink: str | None = None
    """H5: where to send the payer's browser."""
    user_action: str | None = None
    """What the terminal should tell the payer while the wallet waits for them, e.g.
    ``"enter_password"`` when a barcode payment asks for the payer's PIN (USERPAYING)."""


_REQUIRED = {
    PayScenario.JSAPI: "payer_id",
    PayScenario.BARCODE: "auth_code",
    PayScenario.H5: "client_ip",
    PayScenario.WITHHOLD: "agreement_id",
}
"""The field a scenario cannot do without."""


def check_pay_details(value: object, what: str = "cash details") -> PayDetails:
    """Return ``value`` if it is a well-formed ``PayDetails`` with what its scenario needs;
    ``InvalidRequest`` otherwise."""
    details = check_instance(value, PayDetails, what)
    if not isinstance(details.scenario, PayScenario):
        raise InvalidRequest(f"{what} scenario must be a PayScenario, not "
                             f"{shown(details.scenario)}")
    check_optional_id(details.payer_id, f"{what} payer_id")
    check_optional_id(details.device_id, f"{what} device_id")
    check_optional_id(details.agreement_id, f"{what} agreement_id")
    if details.agreement_id is not None and details.scenario is not PayScenario.WITHHOLD:
        raise InvalidRequest(f"{what}: agreement_id is only for a withhold payment")
    if details.auth_code is not None and not (
        isinstance(details.auth_code, str) and _AUTH_CODE.fullmatch(details.auth_code)
    ):
        raise InvalidRequest(f"{what} auth_code must be 10 to 32 digits, got "
                             f"{shown(details.auth_code)}")
    if details.client_ip is not None:
        _check_ip(details.client_ip, f"{what} client_ip")
    _check_url(details.notify_url, f"{what} notify_url")
    needed = _REQUIRED.get(details.scenario)
    if needed is not None and getattr(details, needed) is None:
        raise InvalidRequest(f"{what}: a {details.scenario.value} payment needs {needed}")
    return details


def check_prepay(value: object, what: str = "prepay") -> Prepay:
    """Return ``value`` if it is a well-formed ``Prepay``; ``InvalidRequest`` otherwise. For
    what a channel's adapter returns: shown to the payer, so never taken unchecked."""
    prepay = check_instance(value, Prepay, what)
    check_optional_id(prepay.prepay_id, f"{what} prepay_id")
    _check_url(prepay.code_url, f"{what} code_url")
    _check_url(prepay.deeplink, f"{what} deeplink")
    if prepay.user_action is not None:
        check_text(prepay.user_action, f"{what} user_action", USER_ACTION_MAX, required=True)
    return prepay


def _check_ip(value: object, what: str) -> None:
    try:
        if not isinstance(value, str) or len(value) > 45:
            raise ValueError(value)
        ipaddress.ip_address(value)
    except ValueError:
        raise InvalidRequest(f"{what} must be an IPv4 or IPv6 address, got {shown(value)}"
                             ) from None


def _check_url(value: object, what: str) -> None:
    if value is not None and not (
        isinstance(value, str) and len(value) <= URL_MAX and _URL.fullmatch(value)
    ):
        raise InvalidRequest(f"{what} must be a URL of at most {URL_MAX} characters, got "
                             f"{shown(value)}")


AUTH_CODE_SHOWN = 4
"""Digits of a payment code kept once it can no longer be needed (``without_auth_code``)."""


def without_auth_code(details: PayDetails | None) -> PayDetails | None:
    """``details`` with the payer's payment code masked to its last digits: a barcode is a
    one-time bearer credential, needed only while a pay may still be sent, so it is not kept
    once the cash leg left ``paying``."""
    if details is None or details.auth_code is None or details.auth_code.startswith("*"):
        return details
    code = details.auth_code
    masked = "*" * (len(code) - AUTH_CODE_SHOWN) + code[-AUTH_CODE_SHOWN:]
    return PayDetails(details.scenario, details.payer_id, masked, details.client_ip,
                      details.notify_url, details.device_id, details.agreement_id)


def details_json(details: PayDetails | None) -> list[str | None] | None:
    """The stored form (a JSON array), also part of a request's fingerprint. The agreement
    id is appended only when there is one: older details keep their form and digests."""
    if details is None:
        return None
    stored = [details.scenario.value, details.payer_id, details.auth_code, details.client_ip,
              details.notify_url, details.device_id]
    if details.agreement_id is not None:
        stored.append(details.agreement_id)
    return stored


def details_from_json(stored: object) -> PayDetails | None:
    if stored is None:
        return None
    assert isinstance(stored, list) and len(stored) in (6, 7), f"stored pay details {stored!r}"
    scenario, payer_id, auth_code, client_ip, notify_url, device_id = stored[:6]
    return PayDetails(PayScenario(scenario), payer_id, auth_code, client_ip, notify_url,
                      device_id, stored[6] if len(stored) == 7 else None)


def prepay_json(prepay: Prepay | None) -> list[str | None] | None:
    if prepay is None:
        return None
    return [prepay.prepay_id, prepay.code_url, prepay.deeplink, prepay.user_action]


def prepay_from_json(stored: object) -> Prepay | None:
    if stored is None:
        return None
    assert isinstance(stored, list) and len(stored) == 4, f"stored prepay {stored!r}"
    return Prepay(*stored)
