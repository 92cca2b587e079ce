"""The ``[discounts]`` table of the one TOML file: ``engine.discounts.DiscountRules``.

```toml
[discounts]
utc_offset_minutes = 480
[[discounts.price_cuts]]
rule_id = "noon"
cut_minor_per_l = 20
grades = ["92", "95"]
from_minute = 660
to_minute = 840
[[discounts.level_cuts]]
rule_id = "gold"
level = "gold"
cut_minor_per_l = 10
```

Every key is one field of ``DiscountRules``, ``PriceCut`` or ``LevelCut`` (sets are TOML
arrays). Each value is checked here, where its full key is known, so a mistake is a
``ConfigError`` naming it (``discounts.price_cuts[1].grades``); ``check_rules`` then runs
on the built rules as the engine's own last word. Pure: no I/O, any thread; needs no extra.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from payengine.actors.adapters.config import _bool, _int, _known
from payengine.engine.checks import ID_MAX, check_id, shown
from payengine.engine.discounts import (
    COMBINATIONS_MAX,
    CUT_MINOR_PER_L_MAX,
    MINUTES_PER_DAY,
    PPM,
    QUOTE_TTL_MS_MAX,
    RULES_MAX,
    DiscountRules,
    LevelCut,
    PriceCut,
    check_rules,
)
from payengine.engine.errors import ConfigError, PaymentError

UTC_OFFSET_MINUTES_MIN = -720
UTC_OFFSET_MINUTES_MAX = 840
WEEKDAY_MAX = 6
"""Weekdays are 0 (Monday) .. 6 (Sunday), as ``datetime.weekday``."""

_SCALARS = {
    "utc_offset_minutes": (UTC_OFFSET_MINUTES_MIN, UTC_OFFSET_MINUTES_MAX),
    "discount_share_max_ppm": (0, PPM),
    "points_share_max_ppm": (0, PPM),
    "combinations_max": (1, COMBINATIONS_MAX),
    "quote_ttl_ms": (1, QUOTE_TTL_MS_MAX),
}
_RULES_KEYS = tuple(f.name for f in dataclasses.fields(DiscountRules))
_PRICE_CUT_KEYS = tuple(f.name for f in dataclasses.fields(PriceCut))
_LEVEL_CUT_KEYS = tuple(f.name for f in dataclasses.fields(LevelCut))
assert set(_RULES_KEYS) == {*_SCALARS, "price_cuts", "level_cuts"}, \
    "DiscountRules gained a field the [discounts] table does not read"


def parse_discounts(table: object, key: str = "discounts") -> DiscountRules:
    """The ``DiscountRules`` of a parsed ``[discounts]`` table; ``ConfigError`` naming the
    first wrong key. An absent key is the dataclass's default."""
    values = _known(table, key, _RULES_KEYS)
    scalars = {name: _int(values[name], f"{key}.{name}", low, high)
               for name, (low, high) in _SCALARS.items() if name in values}
    price_cuts = tuple(_price_cut(spec, f"{key}.price_cuts[{i}]") for i, spec in
                       enumerate(_list(values.get("price_cuts", []), f"{key}.price_cuts")))
    level_cuts = tuple(_level_cut(spec, f"{key}.level_cuts[{i}]") for i, spec in
                       enumerate(_list(values.get("level_cuts", []), f"{key}.level_cuts")))
    _unique_rule_ids(price_cuts, level_cuts, key)
    rules = DiscountRules(price_cuts=price_cuts, level_cuts=level_cuts, **scalars)
    try:  # every field was checked above; the engine's check stays the final word
        return check_rules(rules, key)
    except PaymentError as error:
        raise ConfigError(key, error.message) from None


def _list(value: object, key: str) -> list[Any]:
    if not isinstance(value, list):
        raise ConfigError(key, f"must be a list of tables ([[{key}]]), not a "
                               f"{type(value).__name__}")
    if len(value) > RULES_MAX:
        raise ConfigError(key, f"at most {RULES_MAX} rules, not {len(value)}")
    return value


def _price_cut(spec: object, key: str) -> PriceCut:
    values = _known(spec, key, _PRICE_CUT_KEYS)
    _required(values, key, ("rule_id", "cut_minor_per_l"))
    from_minute = _int(values.get("from_minute", 0), f"{key}.from_minute", 0,
                       MINUTES_PER_DAY - 1)
    to_minute = _int(values.get("to_minute", MINUTES_PER_DAY), f"{key}.to_minute", 1,
                     MINUTES_PER_DAY)
    if from_minute == to_minute:
        raise ConfigError(f"{key}.to_minute", f"equals from_minute ({from_minute}): an "
                                              f"empty window (0 to 1440 is the whole day)")
    weekdays = _set(values.get("weekdays", []), f"{key}.weekdays",
                    lambda v, k: _int(v, k, 0, WEEKDAY_MAX))
    return PriceCut(
        rule_id=_id(values["rule_id"], f"{key}.rule_id"),
        cut_minor_per_l=_int(values["cut_minor_per_l"], f"{key}.cut_minor_per_l", 1,
                             CUT_MINOR_PER_L_MAX),
        grades=_grades(values.get("grades", []), f"{key}.grades"),
        from_minute=from_minute, to_minute=to_minute, weekdays=weekdays,
        with_level=_bool(values.get("with_level", True), f"{key}.with_level"))


def _level_cut(spec: object, key: str) -> LevelCut:
    values = _known(spec, key, _LEVEL_CUT_KEYS)
    _required(values, key, ("rule_id", "level", "cut_minor_per_l"))
    return LevelCut(
        rule_id=_id(values["rule_id"], f"{key}.rule_id"),
        level=_id(values["level"], f"{key}.level"),
        cut_minor_per_l=_int(values["cut_minor_per_l"], f"{key}.cut_minor_per_l", 1,
                             CUT_MINOR_PER_L_MAX),
        grades=_grades(values.get("grades", []), f"{key}.grades"))


def _required(values: Mapping[str, Any], key: str, names: tuple[str, ...]) -> None:
    for name in names:
        if name not in values:
            raise ConfigError(f"{key}.{name}", "missing")


def _id(value: object, key: str) -> str:
    try:
        return check_id(value, key)
    except PaymentError:
        raise ConfigError(key, f"must be a non-empty string of at most {ID_MAX} characters "
                               f"without control characters, not {shown(value)}") from None


def _grades(value: object, key: str) -> frozenset[str]:
    return _set(value, key, _id)


def _set(value: object, key: str, item: Any) -> frozenset[Any]:
    """A TOML array as a frozenset: each item checked by ``item(v, key[i])``; an item
    listed twice is a mistake (it says something other than the writer meant)."""
    if not isinstance(value, list):
        raise ConfigError(key, f"must be a list, not a {type(value).__name__}")
    if len(value) > RULES_MAX:
        raise ConfigError(key, f"at most {RULES_MAX} items, not {len(value)}")
    seen: set[Any] = set()
    for i, v in enumerate(value):
        checked = item(v, f"{key}[{i}]")
        if checked in seen:
            raise ConfigError(f"{key}[{i}]", f"{checked!r} is listed twice")
        seen.add(checked)
    return frozenset(seen)


def _unique_rule_ids(price_cuts: tuple[PriceCut, ...], level_cuts: tuple[LevelCut, ...],
                     key: str) -> None:
    """A rule id names one rule among price and level cuts (a quote's discounts say which
    rule took what off)."""
    seen: set[str] = set()
    named = [(f"{key}.price_cuts[{i}].rule_id", c.rule_id) for i, c in enumerate(price_cuts)]
    named += [(f"{key}.level_cuts[{i}].rule_id", c.rule_id) for i, c in enumerate(level_cuts)]
    for where, rule_id in named:
        if rule_id in seen:
            raise ConfigError(where, f"{rule_id!r} names another rule already")
        seen.add(rule_id)
