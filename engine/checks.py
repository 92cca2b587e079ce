"""One rule per kind of field, for everything that crosses the public boundary.

A value that comes from a caller (an id, a text, a flag, a request part, a time) is checked
here before anything looks it up or stores it, so a bad one is a typed ``InvalidRequest``
with state untouched, never a ``UnicodeEncodeError`` from SQLite, an ``AttributeError`` on a
dict that should have been a ``VoucherPart``, or an int quietly stored as an id. Amounts have
their own rule (``engine.money.check_amount``: ``InvalidAmount``) and so do currencies
(``engine.currency.check_currency``).

Messages show a bad value through ``repr``, cut short: a lone surrogate is escaped, so the
message itself can be logged and encoded.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Mapping
from typing import TypeVar

from payengine.engine.errors import InvalidRequest

T = TypeVar("T")

ID_MAX = 128
"""Most characters in an id (merchant, order number, account, hold, refund, serial...)."""

TIME_MS_MAX = 253_402_300_799_999
"""The last millisecond of the year 9999: the latest epoch-ms time accepted from a caller
(well inside SQLite's 64-bit integers)."""

_NOT_IN_ID = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
"""Control characters (C0, DEL, C1) and lone surrogates (not encodable as UTF-8)."""

_NOT_IN_TEXT = re.compile(r"[\x00\ud800-\udfff]")
"""NUL (cut short by C strings) and lone surrogates; a text may hold line breaks and tabs."""


def shown(value: object, limit: int = 40) -> str:
    """``repr(value)`` cut to about ``limit`` characters, for error messages. Never raises
    (an int of 5,000 digits has no repr, a caller's object may have a broken one)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**limit:
        return f"an int of about {len(hex(value)) * 6 // 5} digits"
    try:
        text = repr(value)
    except Exception:
        return f"<a {type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_id(value: object, what: str) -> str:
    """Return ``value`` if it is an id: a non-empty ``str`` of at most ``ID_MAX`` characters,
    encodable as UTF-8, without control characters (NUL, newline, tab, DEL...)."""
    if not isinstance(value, str) or not value or len(value) > ID_MAX or _NOT_IN_ID.search(
        value
    ):
        raise InvalidRequest(f"{what} must be a non-empty string of at most {ID_MAX} characters,"
                             f" UTF-8 encodable, without control characters; got {shown(value)}")
    return value


def check_optional_id(value: object, what: str) -> str | None:
    """``None``, or an id (``check_id``)."""
    return None if value is None else check_id(value, what)


def check_text(value: object, what: str, max_len: int, *, required: bool = False) -> str:
    """Return ``value`` if it is a free text: a ``str`` of at most ``max_len`` characters,
    encodable as UTF-8, without NUL; ``required``: not empty either."""
    if (not isinstance(value, str) or len(value) > max_len or (required and not value)
            or _NOT_IN_TEXT.search(value)):
        need = "a non-empty" if required else "a"
        raise InvalidRequest(f"{what} must be {need} string of at most {max_len} characters, "
                             f"UTF-8 encodable, without NUL; got {shown(value)}")
    return value


def check_bool(value: object, what: str) -> bool:
    """Return ``value`` if it is ``True`` or ``False`` (not 1, not "yes", not None)."""
    if not isinstance(value, bool):
        raise InvalidRequest(f"{what} must be True or False, got {shown(value)}")
    return value


def check_instance(value: object, cls: type[T], what: str) -> T:
    """Return ``value`` if it is a ``cls`` (a dict with the same fields is not)."""
    if not isinstance(value, cls):
        raise InvalidRequest(f"{what} must be a {cls.__name__}, not {type(value).__name__} "
                             f"{shown(value)}")
    return value


def check_parts(value: object, cls: type[T], what: str, max_len: int) -> tuple[T, ...]:
    """Return ``value`` as a tuple if it is a tuple or list of at most ``max_len`` ``cls``."""
    if not isinstance(value, tuple | list):
        raise InvalidRequest(f"{what} must be a tuple of {cls.__name__}, not "
                             f"{type(value).__name__} {shown(value)}")
    if len(value) > max_len:
        raise InvalidRequest(f"{what}: at most {max_len}, got {len(value)}")
    for index, item in enumerate(value):
        check_instance(item, cls, f"{what}[{index}]")
    return tuple(value)


def check_ids(value: object, what: str, max_len: int) -> tuple[str, ...]:
    """Return a collection of ids (any iterable but one ``str``, bytes or a mapping) as a
    tuple of at most ``max_len``; it is read no further than that."""
    if isinstance(value, str | bytes | bytearray | Mapping) or not isinstance(value, Iterable):
        raise InvalidRequest(f"{what} must be a collection of names, not "
                             f"{type(value).__name__} {shown(value)}")
    items = list(itertools.islice(value, max_len + 1))
    if len(items) > max_len:
        raise InvalidRequest(f"{what}: at most {max_len}")
    return tuple(check_id(item, f"{what} item") for item in items)


def check_time_ms(value: object, what: str) -> int:
    """Return ``value`` if it is an epoch-milliseconds int in 0..``TIME_MS_MAX``."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= TIME_MS_MAX:
        raise InvalidRequest(f"{what} must be epoch milliseconds (an int 0..{TIME_MS_MAX}), "
                             f"got {shown(value)}")
    return value


def check_int(value: object, what: str, low: int, high: int) -> int:
    """Return ``value`` if it is an ``int`` (not a bool) in ``low..high``: for settings."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidRequest(f"{what} must be an int {low}..{high}, got {shown(value)}")
    return value


def check_schedule(value: object, what: str, *, gap_max: int, len_max: int = 100
                   ) -> tuple[int, ...]:
    """Return a schedule of gaps in ms: a non-empty tuple of at most ``len_max`` ints, each
    1..``gap_max``. Every schedule is finite, so nothing retries for ever."""
    if not isinstance(value, tuple) or not 0 < len(value) <= len_max:
        raise InvalidRequest(f"{what} must be a tuple of 1..{len_max} gaps in ms, got "
                             f"{shown(value)}")
    for gap in value:
        check_int(gap, f"{what} gap", 1, gap_max)
    return value


def check_setting(ok: bool, message: str) -> None:
    """A relation between settings that must hold: ``InvalidRequest`` with ``message``."""
    if not ok:
        raise InvalidRequest(message)
