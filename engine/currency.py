"""Currencies the engine knows, with their minor digits (ISO 4217).

An order is in a currency of this table, or it is refused: a code nobody knows ("XXZ") would
be committed and sent to the wallet, and an amount in it could not even be written down
(is 9600 "96.00" or "9600"?). The minor digits say how an amount in minor units is written
in major units: 2 for CNY (9600 is "96.00"), 0 for JPY (96 is "96"), 3 for KWD.

``ISO_4217`` is the default table (active codes with a minor unit; not the metals, the SDR
or the testing code XTS). An engine can add or override entries
(``EngineConfig(currencies={"XTS": 2})``): ``currency_table`` merges and validates them,
and every caller passes the merged table where it matters (orders, voucher accounts,
statements), so one engine has one notion of what a currency is.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType

from payengine.engine.checks import shown
from payengine.engine.errors import InvalidRequest

MINOR_DIGITS_MAX = 4
"""The most minor digits a currency may have (CLF and UYW have 4, as many as any in ISO 4217)."""

_CODE = re.compile(r"[A-Z]{3}", re.ASCII)


def _codes(digits: int, codes: str) -> dict[str, int]:
    return dict.fromkeys(codes.split(), digits)


ISO_4217: Mapping[str, int] = MappingProxyType({
    **_codes(2, """
        AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BMD BND BOB BOV BRL BSD BTN
        BWP BYN BZD CAD CDF CHE CHF CHW CNY COP COU CRC CUC CUP CVE CZK DKK DOP DZD EGP ERN
        ETB EUR FJD FKP GBP GEL GHS GIP GMD GTQ GYD HKD HNL HTG HUF IDR ILS INR IRR JMD KES
        KGS KHR KPW KYD KZT LAK LBP LKR LRD LSL MAD MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK
        MXN MXV MYR MZN NAD NGN NIO NOK NPR NZD PAB PEN PGK PHP PKR PLN QAR RON RSD RUB SAR
        SBD SCR SDG SEK SGD SHP SLE SOS SRD SSP STN SVC SYP SZL THB TJS TMT TOP TRY TTD TWD
        TZS UAH USD USN UYU UZS VED VES WST XCD XCG YER ZAR ZMW ZWG"""),
    **_codes(0, "BIF CLP DJF GNF ISK JPY KMF KRW PYG RWF UGX UYI VND VUV XAF XOF XPF"),
    **_codes(3, "BHD IQD JOD KWD LYD OMR TND"),
    **_codes(4, "CLF UYW"),
})
"""ISO 4217 currency code -> minor digits, for the codes in use that have a minor unit."""


def currency_table(extra: Mapping[str, int] | None = None) -> dict[str, int]:
    """``ISO_4217`` with ``extra``'s entries added or overriding, as a new dict (a plain one,
    so that a config holding it can be copied and pickled).

    Each extra code is three upper-case letters (a points unit such as ``POINTS`` is not a
    currency: it is an account unit with ``minor_per_unit``) with 0..``MINOR_DIGITS_MAX``
    digits; anything else is an ``InvalidRequest``, so a typo in the configuration stops the
    engine from opening instead of mispricing a statement.
    """
    if extra is None:
        return dict(ISO_4217)
    if not isinstance(extra, Mapping):
        raise InvalidRequest(f"currencies must map a code to its minor digits, not "
                             f"{type(extra).__name__}")
    for code, digits in extra.items():
        if not isinstance(code, str) or not _CODE.fullmatch(code):
            raise InvalidRequest(f"a currency code is three upper-case letters, got {shown(code)}")
        if isinstance(digits, bool) or not isinstance(digits, int) or not (
            0 <= digits <= MINOR_DIGITS_MAX
        ):
            raise InvalidRequest(f"currency {code}: minor digits must be an int "
                                 f"0..{MINOR_DIGITS_MAX}, got {shown(digits)}")
    return {**ISO_4217, **extra}


def check_currency(currency: object, currencies: Mapping[str, int] = ISO_4217,
                   what: str = "currency") -> str:
    """Return ``currency`` if ``currencies`` knows it; otherwise ``InvalidRequest``."""
    if not isinstance(currency, str) or currency not in currencies:
        raise InvalidRequest(f"{what} must be a known currency code such as 'CNY' "
                             f"(ISO 4217, or added by EngineConfig.currencies), got "
                             f"{shown(currency)}")
    return currency


def minor_digits(currency: str, currencies: Mapping[str, int] = ISO_4217) -> int:
    """How many minor digits ``currency`` has (``InvalidRequest`` if it is unknown)."""
    return currencies[check_currency(currency, currencies)]


def describe(amount_minor: int, currency: str,
             currencies: Mapping[str, int] = ISO_4217) -> str:
    """``9600, "CNY"`` -> ``"96.00 CNY"``: for messages and reports, never for parsing.

    A code the table does not know (an account unit, an order stored before the table was
    narrowed) is shown in minor units rather than guessed: ``"9600 minor units of XXZ"``.
    """
    digits = currencies.get(currency) if isinstance(currency, str) else None
    if digits is None:
        return f"{amount_minor} minor units of {currency}"
    return f"{format_minor(amount_minor, digits)} {currency}"


def format_minor(amount_minor: int, digits: int) -> str:
    """``9600, 2`` -> ``"96.00"``; ``96, 0`` -> ``"96"``; a negative amount keeps its sign."""
    sign = "-" if amount_minor < 0 else ""
    whole, minor = divmod(abs(amount_minor), 10**digits)
    return f"{sign}{whole}.{minor:0{digits}d}" if digits else f"{sign}{whole}"
