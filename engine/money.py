"""Money and voucher units as integers.

Money is an integer count of minor units (fen, cents) with an ISO 4217 currency code (see
``engine.currency`` for the codes and their minor digits).
Points and other voucher units are their own unit (e.g. ``"POINTS"``) and are worth a fixed
number of minor units each (``minor_per_unit``). No float ever enters: a float amount is
rejected, not rounded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from payengine.engine.checks import shown
from payengine.engine.currency import describe
from payengine.engine.errors import CurrencyMismatch, InvalidAmount, InvalidRequest

AMOUNT_MAX = 10**15
"""The largest amount (minor units or voucher units) accepted anywhere: 10 trillion yuan.

Far above any payment, far below 2**63, so sums of a few thousand amounts never overflow
SQLite's 64-bit integers."""

_UNIT_PATTERN = re.compile(r"^[A-Z][A-Z0-9_]{1,15}$")


def check_amount(amount: object, what: str = "amount") -> int:
    """Return ``amount`` if it is a positive int no larger than ``AMOUNT_MAX``.

    ``bool`` is refused although it is an ``int`` subclass: ``True`` is not one fen.
    """
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise InvalidAmount(
            f"{what} must be an integer count of minor units, got {type(amount).__name__} "
            f"{shown(amount)}"
        )
    if amount <= 0:
        raise InvalidAmount(f"{what} must be positive, got {shown(amount)}")
    if amount > AMOUNT_MAX:
        raise InvalidAmount(f"{what} {shown(amount)} exceeds the maximum {AMOUNT_MAX}")
    return amount


def check_unit(unit: object, what: str = "currency") -> str:
    """Return ``unit`` if it looks like a currency or voucher unit code (``CNY``, ``POINTS``)."""
    if not isinstance(unit, str) or not _UNIT_PATTERN.fullmatch(unit):
        raise InvalidRequest(f"{what} must be an upper-case code such as 'CNY', got "
                             f"{shown(unit)}")
    return unit


@dataclass(frozen=True, slots=True)
class Money:
    """An amount of money: ``amount_minor`` minor units of ``currency``."""

    amount_minor: int
    currency: str

    def __post_init__(self) -> None:
        check_amount(self.amount_minor, "amount_minor")
        check_unit(self.currency)

    def add(self, other: Money) -> Money:
        """Sum of two amounts of the same currency; a different currency is a typed error."""
        if other.currency != self.currency:
            raise CurrencyMismatch(f"cannot add {other.currency} to {self.currency}")
        return Money(self.amount_minor + other.amount_minor, self.currency)

    def __str__(self) -> str:
        """``96.00 CNY``, ``96 JPY``, ``1.005 KWD``: the currency's own minor digits."""
        return describe(self.amount_minor, self.currency)


def value_in_minor(amount: int, unit: str, minor_per_unit: int | None, currency: str) -> int:
    """What ``amount`` of a voucher ``unit`` is worth in minor units of ``currency``.

    A money voucher (red packet, phone credit) has the order's currency as its unit and is
    worth its face value. A points-like unit has ``minor_per_unit`` set. A voucher in another
    currency is a ``CurrencyMismatch``.
    """
    if minor_per_unit is not None:
        value = amount * minor_per_unit
        if value > AMOUNT_MAX:
            raise InvalidAmount(f"{amount} {unit} is worth more than the maximum {AMOUNT_MAX}")
        return value
    if unit != currency:
        raise CurrencyMismatch(f"a voucher in {unit} cannot pay an order in {currency}")
    return amount
