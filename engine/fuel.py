"""What a fuel-station trade order is about: the station, the pump and what it dispensed.

A fuel sale is priced per litre but paid in minor units, and the two must agree: a line of
40.00 litres at 7.89 a litre is 315.60, and a payment of 315.60 "for 41 litres" is a wrong
report somebody will reconcile by hand. ``FuelLine`` holds the volume (millilitres, so an
int), the list price per litre and the gross amount, and refuses a line whose three do not
agree. ``FuelSale`` adds where it happened (station, pump, nozzle, terminal) and who was on
duty (cashier, shift): the metadata every downstream consumer (shift report, invoice,
membership, marketing) needs and that the engine carries unchanged in every event.

Pure: integer arithmetic only, no clock. Everything here comes from a caller, so everything
is checked before it is believed (``check_fuel_sale``).
"""

from __future__ import annotations

from dataclasses import dataclass

from payengine.engine.checks import (
    check_id,
    check_instance,
    check_int,
    check_optional_id,
    shown,
)
from payengine.engine.errors import InvalidRequest

ML_PER_L = 1_000

VOLUME_ML_MAX = 2_000_000
"""Most millilitres in one sale: 2,000 litres, a tanker truck's fill; more is a typo."""

UNIT_PRICE_MINOR_MAX = 1_000_000
"""Highest list price per litre accepted, in minor units (10,000.00 a litre)."""

PUMP_MAX = 999
NOZZLE_MAX = 99


def price_of_volume(volume_ml: int, unit_price_minor: int) -> int:
    """The gross amount of ``volume_ml`` at ``unit_price_minor`` a litre, rounded half up to
    the minor unit (the pump's own display rule)."""
    return (volume_ml * unit_price_minor + ML_PER_L // 2) // ML_PER_L


def volume_of_amount(amount_minor: int, unit_price_minor: int) -> int:
    """The millilitres ``amount_minor`` buys at ``unit_price_minor`` a litre, rounded down:
    a pump stops before it dispenses more than was paid for."""
    return amount_minor * ML_PER_L // unit_price_minor


@dataclass(frozen=True, slots=True)
class FuelLine:
    """One grade dispensed (or to be dispensed): ``volume_ml`` at ``unit_price_minor`` a
    litre is ``gross_minor``. Build one with ``by_volume`` (the pump measured it) or
    ``by_amount`` (the user asked for "200.00 of 95"), which keep the three consistent."""

    grade: str
    unit_price_minor: int
    volume_ml: int
    gross_minor: int

    @classmethod
    def by_volume(cls, grade: str, unit_price_minor: int, volume_ml: int) -> FuelLine:
        return cls(grade, unit_price_minor, volume_ml,
                   price_of_volume(volume_ml, unit_price_minor))

    @classmethod
    def by_amount(cls, grade: str, unit_price_minor: int, amount_minor: int) -> FuelLine:
        check_int(unit_price_minor, "fuel line unit_price_minor", 1, UNIT_PRICE_MINOR_MAX)
        return cls(grade, unit_price_minor, volume_of_amount(amount_minor, unit_price_minor),
                   amount_minor)


@dataclass(frozen=True, slots=True)
class FuelSale:
    """Where and by whom a fuel line was sold. ``line`` is the list-price line; discounts
    are the quote's (``engine.discounts``), not the line's."""

    station_id: str
    pump: int
    nozzle: int
    line: FuelLine
    terminal_id: str | None = None
    cashier_id: str | None = None
    shift_id: str | None = None


def check_fuel_line(value: object, what: str = "fuel line") -> FuelLine:
    """Return ``value`` if it is a consistent ``FuelLine``; ``InvalidRequest`` otherwise."""
    line = check_instance(value, FuelLine, what)
    check_id(line.grade, f"{what} grade")
    check_int(line.unit_price_minor, f"{what} unit_price_minor", 1, UNIT_PRICE_MINOR_MAX)
    check_int(line.volume_ml, f"{what} volume_ml", 1, VOLUME_ML_MAX)
    check_int(line.gross_minor, f"{what} gross_minor", 1,
              price_of_volume(VOLUME_ML_MAX, UNIT_PRICE_MINOR_MAX))
    if not _consistent(line):
        raise InvalidRequest(
            f"{what}: {line.volume_ml} ml at {line.unit_price_minor} a litre is "
            f"{price_of_volume(line.volume_ml, line.unit_price_minor)}, not {line.gross_minor}"
            " (build it with FuelLine.by_volume or FuelLine.by_amount)")
    return line


def check_fuel_sale(value: object, what: str = "fuel sale") -> FuelSale:
    """Return ``value`` if it is a well-formed ``FuelSale``; ``InvalidRequest`` otherwise."""
    sale = check_instance(value, FuelSale, what)
    check_id(sale.station_id, f"{what} station_id")
    check_int(sale.pump, f"{what} pump", 1, PUMP_MAX)
    check_int(sale.nozzle, f"{what} nozzle", 1, NOZZLE_MAX)
    check_fuel_line(sale.line, f"{what} line")
    check_optional_id(sale.terminal_id, f"{what} terminal_id")
    check_optional_id(sale.cashier_id, f"{what} cashier_id")
    check_optional_id(sale.shift_id, f"{what} shift_id")
    return sale


def _consistent(line: FuelLine) -> bool:
    """By volume (the gross is the volume's price) or by amount (the volume is what the
    gross buys, rounded down)."""
    return (line.gross_minor == price_of_volume(line.volume_ml, line.unit_price_minor)
            or line.volume_ml == volume_of_amount(line.gross_minor, line.unit_price_minor))


def fuel_sale_json(sale: FuelSale | None) -> dict[str, object] | None:
    """The sale as stored with its order and carried in events (plain JSON values)."""
    if sale is None:
        return None
    line = sale.line
    return {"station_id": sale.station_id, "pump": sale.pump, "nozzle": sale.nozzle,
            "grade": line.grade, "unit_price_minor": line.unit_price_minor,
            "volume_ml": line.volume_ml, "gross_minor": line.gross_minor,
            "terminal_id": sale.terminal_id, "cashier_id": sale.cashier_id,
            "shift_id": sale.shift_id}


def fuel_sale_from_json(stored: object) -> FuelSale | None:
    """The inverse of ``fuel_sale_json``, checked again (a stored row is input too)."""
    if stored is None:
        return None
    if not isinstance(stored, dict):
        raise InvalidRequest(f"stored fuel sale must be an object, got {shown(stored)}")
    try:
        line = FuelLine(stored["grade"], stored["unit_price_minor"], stored["volume_ml"],
                        stored["gross_minor"])
        sale = FuelSale(stored["station_id"], stored["pump"], stored["nozzle"], line,
                        stored.get("terminal_id"), stored.get("cashier_id"),
                        stored.get("shift_id"))
    except KeyError as missing:
        raise InvalidRequest(f"stored fuel sale lacks {missing}") from None
    return check_fuel_sale(sale)
