"""The engine's views (frozen dataclasses: ``Receipt``, ``OrderView``, ``Quote``,
``ShiftReport``...) as JSON values. Field names are the Python ones, amounts stay integer
minor units, enums their values, tuples and sets lists (sets sorted). Pure, any thread."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Any

DEPTH_MAX = 32
"""Nesting the conversion follows; a view is far shallower (a broken one is a bug)."""


def to_json(value: object, depth: int = 0) -> Any:
    """``value`` as JSON-ready data."""
    assert depth <= DEPTH_MAX, "a view nested deeper than DEPTH_MAX"
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, enum.Enum):
        return to_json(value.value, depth + 1)
    if isinstance(value, float):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name), depth + 1)
                for f in dataclasses.fields(value) if f.repr or f.init}
    if isinstance(value, Mapping):
        return {str(to_json(k, depth + 1)): to_json(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (frozenset, set)):
        return sorted((to_json(v, depth + 1) for v in value), key=repr)
    if isinstance(value, (tuple, list)):
        return [to_json(v, depth + 1) for v in value]
    raise AssertionError(f"no JSON form for a {type(value).__name__}")
