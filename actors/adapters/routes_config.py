"""Routes declared in the channel configuration file: ``[routing]`` with ``fallbacks_max`` and
a ``[[routing.route]]`` list (method, channel, priority, weight, fee_ppm, limits, currencies).

``load_routing`` reads the same file (or TOML text) as ``load_config`` and returns the
``RoutingTable`` for ``EngineConfig.routing``. Every mistake is a ``ConfigError`` naming the
key as written (``routing.route[2].channel``); a route naming a channel the file (or the
given ``channels``) does not declare is refused. No I/O but reading the file.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from payengine.actors.adapters.config import _int, _known, _text, read_toml
from payengine.engine.checks import shown
from payengine.engine.errors import ConfigError, PaymentError
from payengine.engine.money import AMOUNT_MAX
from payengine.engine.routing import (
    FALLBACKS_MAX,
    FEE_PPM_MAX,
    PRIORITY_MAX,
    ROUTES_MAX,
    WEIGHT_MAX,
    Route,
    RoutingTable,
)

_ROUTING_KEYS = ("fallbacks_max", "route")
_ROUTE_KEYS = ("method", "channel", "priority", "weight", "fee_ppm", "limits", "currencies")
_LIMIT_KEYS = ("amount_min_minor", "amount_max_minor")
CURRENCIES_MAX = 200
"""Most currencies one route lists."""


def load_routing(source: str | Path, channels: Collection[str] | None = None
                 ) -> RoutingTable:
    """The ``[routing]`` of a configuration file or TOML text (``RoutingTable()`` when it
    has none). ``channels``: the channel names routes may name (default: the file's own
    ``[channels.NAME]`` tables)."""
    parsed, _ = read_toml(source)
    return parse_routing(parsed, channels=channels)


def parse_routing(data: object, *, channels: Collection[str] | None = None) -> RoutingTable:
    """``load_routing`` of a parsed configuration (``{"channels": ..., "routing": ...}``)."""
    if not isinstance(data, Mapping):
        raise ConfigError("", f"a configuration is a table, not {shown(data)}")
    if channels is None:
        declared = data.get("channels", {})
        channels = frozenset(declared) if isinstance(declared, Mapping) else frozenset()
    if "routing" not in data:
        return RoutingTable()
    table = _known(data["routing"], "routing", _ROUTING_KEYS)
    fallbacks_max = _int(table.get("fallbacks_max", 1), "routing.fallbacks_max", 0,
                         FALLBACKS_MAX)
    listed = table.get("route", [])
    if not isinstance(listed, list):
        raise ConfigError("routing.route", "must be a list of tables: [[routing.route]]")
    if len(listed) > ROUTES_MAX:
        raise ConfigError("routing.route", f"at most {ROUTES_MAX} routes")
    routes = tuple(_route(spec, f"routing.route[{i}]", channels)
                   for i, spec in enumerate(listed))
    seen: dict[tuple[str, str], int] = {}
    for i, route in enumerate(routes):
        pair = (route.method, route.channel)
        if pair in seen:
            raise ConfigError(f"routing.route[{i}]", f"method {route.method} -> channel "
                                                     f"{route.channel} is already route "
                                                     f"[{seen[pair]}]")
        seen[pair] = i
    return RoutingTable(routes, fallbacks_max)


def _route(spec: object, key: str, channels: Collection[str]) -> Route:
    values = _known(spec, key, _ROUTE_KEYS)
    for required in ("method", "channel"):
        if required not in values:
            raise ConfigError(f"{key}.{required}", "missing")
    method = _text(values["method"], f"{key}.method", 64)
    channel = _text(values["channel"], f"{key}.channel", 64)
    if channel not in channels:
        raise ConfigError(f"{key}.channel", f"names no channel of this configuration: "
                                            f"{shown(channel)} (known: {sorted(channels)})")
    args: dict[str, Any] = {
        "priority": _int(values.get("priority", 0), f"{key}.priority", 0, PRIORITY_MAX),
        "weight": _int(values.get("weight", 1), f"{key}.weight", 1, WEIGHT_MAX),
    }
    if "fee_ppm" in values:
        args["fee_ppm"] = _int(values["fee_ppm"], f"{key}.fee_ppm", 0, FEE_PPM_MAX)
    if "limits" in values:
        limits = _known(values["limits"], f"{key}.limits", _LIMIT_KEYS)
        low = _int(limits.get("amount_min_minor", 1), f"{key}.limits.amount_min_minor", 1,
                   AMOUNT_MAX)
        args["amount_min_minor"] = low
        args["amount_max_minor"] = _int(limits.get("amount_max_minor", AMOUNT_MAX),
                                        f"{key}.limits.amount_max_minor", low, AMOUNT_MAX)
    if "currencies" in values:
        currencies = values["currencies"]
        if not isinstance(currencies, list) or len(currencies) > CURRENCIES_MAX:
            raise ConfigError(f"{key}.currencies", f"must be a list of at most "
                                                   f"{CURRENCIES_MAX} ISO 4217 codes, not "
                                                   f"{shown(currencies)}")
        args["currencies"] = frozenset(currencies)
    try:
        return Route(method, channel, **args)
    except PaymentError as error:  # the Route's own checks (a currency such as 'cny')
        field = "currencies" if "currenc" in error.message else "method"
        raise ConfigError(f"{key}.{field}", error.message) from None
