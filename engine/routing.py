"""Routing: which channel executes the payment method the user picked (R-PROD).

The user picks a method ("WeChat Pay", "UnionPay card"); several channels may execute it
(several merchant numbers of one wallet, an acquirer and a wallet). ``choose_route`` picks
one by the configured routes: the method, the amount limits and currencies of each route,
availability (a channel whose circuit breaker is open is skipped), priority, then the fee
for this amount (the engine's ``fee_ppm`` table, the one the ledger books), then weights
among the routes still equal. The draw among weights is an argument (the shell derives it
from the order id), so a decision replays exactly; the decision and why are journalled.

Pure: no clock, no randomness; availability comes in as a set of channels.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass

from payengine.engine.checks import check_id, check_instance, check_int, check_setting, shown
from payengine.engine.errors import PaymentError
from payengine.engine.money import AMOUNT_MAX

ROUTES_MAX = 1_000
"""Most routes in one table."""
FALLBACKS_MAX = 3
"""Most fallbacks ``RoutingTable.fallbacks_max`` may allow (``engine.order`` holds the same
bound for what it stores)."""
WEIGHT_MAX = 1_000
FEE_PPM_MAX = 1_000_000
PRIORITY_MAX = 1_000


class NoRoute(PaymentError):
    """No configured route of the method can take this payment (limits, currency, or every
    channel of the method unavailable). Nothing was created: the user picks another method,
    or retries once a channel is back."""

    code = "no_route"


@dataclass(frozen=True, slots=True)
class Route:
    """One way to execute ``method``: through the channel named ``channel``."""

    method: str
    """What ``CashPart.channel`` names when the user picks this method."""
    channel: str
    """The executing channel (a ``Channel``'s ``name``)."""
    priority: int = 0
    """Lower is preferred (0..1000); a cheaper fee only decides among equal priorities."""
    weight: int = 1
    """Share among routes equal in priority and fee (1..1000)."""
    amount_min_minor: int = 1
    amount_max_minor: int = AMOUNT_MAX
    currencies: frozenset[str] = frozenset()
    """The currencies this route takes; empty: any."""
    fee_ppm: int | None = None
    """What this route costs, in parts per million of the amount, for ranking routes of
    equal priority (0..1,000,000); ``None``: the channel's configured ``fee``, else the
    engine's ``fee_ppm`` table."""

    def __post_init__(self) -> None:
        check_id(self.method, "route method")
        check_id(self.channel, "route channel")
        check_int(self.priority, "route priority", 0, PRIORITY_MAX)
        check_int(self.weight, "route weight", 1, WEIGHT_MAX)
        check_int(self.amount_min_minor, "route amount_min_minor", 1, AMOUNT_MAX)
        check_int(self.amount_max_minor, "route amount_max_minor", self.amount_min_minor,
                  AMOUNT_MAX)
        check_instance(self.currencies, frozenset, "route currencies")
        if self.fee_ppm is not None:
            check_int(self.fee_ppm, "route fee_ppm", 0, FEE_PPM_MAX)
        for currency in self.currencies:  # a code that can never match is a typo, refused
            check_setting(isinstance(currency, str) and len(currency) == 3
                          and currency.isascii() and currency.isupper() and currency.isalpha(),
                          f"route currency must be an ISO 4217 code such as CNY, not "
                          f"{shown(currency)}")


@dataclass(frozen=True, slots=True)
class RoutingTable:
    """Every route, by method. Built once at ``Engine.open``; a value, shared by threads."""

    routes: tuple[Route, ...] = ()
    fallbacks_max: int = 1
    """How many times a routed payment may go on to the next route after its channel's
    explicit retryable failure (0..3; 0: never). See ``engine.order`` (R-PROD)."""

    def __post_init__(self) -> None:
        routes = check_instance(self.routes, tuple, "routing routes")
        check_setting(len(routes) <= ROUTES_MAX, f"at most {ROUTES_MAX} routes")
        check_int(self.fallbacks_max, "routing fallbacks_max", 0, FALLBACKS_MAX)
        seen: set[tuple[str, str]] = set()
        for route in routes:
            check_instance(route, Route, "a route")
            check_setting((route.method, route.channel) not in seen,
                          f"route {route.method} -> {route.channel} is listed twice")
            seen.add((route.method, route.channel))

    @property
    def methods(self) -> frozenset[str]:
        return frozenset(route.method for route in self.routes)

    @property
    def channels(self) -> frozenset[str]:
        return frozenset(route.channel for route in self.routes)

    def of(self, method: str) -> tuple[Route, ...]:
        return tuple(route for route in self.routes if route.method == method)


@dataclass(frozen=True, slots=True)
class RouteChoice:
    """The channel chosen for a method, and why each route of the method was or was not."""

    method: str
    channel: str
    considered: tuple[tuple[str, str], ...]
    """(channel, verdict) for every route of the method, best first: ``chosen``,
    ``skipped: <why>`` or ``passed over: <why>``."""

    @property
    def cause(self) -> str:
        """One line for the journal."""
        return f"method {self.method}: " + "; ".join(f"{c} {v}" for c, v in self.considered)


def route_draw(order_id: str) -> int:
    """The draw among weights for ``order_id``: a digest, so the same order draws the same."""
    return int.from_bytes(hashlib.sha256(order_id.encode()).digest()[:8], "big")


def choose_route(table: RoutingTable, method: str, amount_minor: int, currency: str, *,
                 unavailable: Collection[str], fee_ppm: Mapping[str, int], draw: int,
                 known_channels: Collection[str] | None = None,
                 excluded: Mapping[str, str] | None = None,
                 fees_minor: Mapping[str, int] | None = None) -> RouteChoice:
    """The route for a payment of ``amount_minor`` ``currency`` by ``method``.

    The fee that ranks routes of equal priority: the route's own ``fee_ppm``, else
    ``fees_minor[channel]`` (what the channel's own configuration says it charges for this
    amount), else ``fee_ppm``'s share.

    ``unavailable``: channels to skip (circuit open); ``known_channels``: the engine's
    channels (a route to another is skipped, never chosen); ``excluded``: channels that
    cannot take this payment, with why (disabled, their own limits, no pay details): skipped.
    Raises ``NoRoute`` (with every route's reason) when none qualifies.
    """
    routes = table.of(method)
    fees_minor = fees_minor or {}
    verdicts: list[tuple[str, str]] = []
    eligible: list[Route] = []
    for route in routes:
        why = _skip_reason(route, amount_minor, currency, unavailable, known_channels)
        if why is None and excluded:
            why = excluded.get(route.channel)
        if why is None:
            eligible.append(route)
        else:
            verdicts.append((route.channel, f"skipped: {why}"))
    if not eligible:
        reasons = "; ".join(f"{c} {v}" for c, v in verdicts) or "no route is configured"
        raise NoRoute(f"no route of method {method!r} can take {amount_minor} {currency}: "
                      f"{reasons}")

    def fee(route: Route) -> int:  # in millionths of a minor unit: compared, never divided
        if route.fee_ppm is not None:
            return amount_minor * route.fee_ppm
        if route.channel in fees_minor:
            return fees_minor[route.channel] * 1_000_000
        return amount_minor * fee_ppm.get(route.channel, 0)

    eligible.sort(key=lambda r: (r.priority, fee(r), r.channel))
    best = [r for r in eligible if (r.priority, fee(r)) == (eligible[0].priority, fee(eligible[0]))]
    chosen = _weighted(best, draw)
    ranked = [chosen] + [r for r in eligible if r is not chosen]
    considered = [(r.channel, "chosen" if r is chosen else
                   f"passed over: {_why_not(r, chosen, fee)}") for r in ranked]
    return RouteChoice(method, chosen.channel, tuple(considered + verdicts))


def _skip_reason(route: Route, amount_minor: int, currency: str,
                 unavailable: Collection[str], known: Collection[str] | None) -> str | None:
    if known is not None and route.channel not in known:
        return "no such channel"
    if route.currencies and currency not in route.currencies:
        return f"does not take {currency}"
    if not route.amount_min_minor <= amount_minor <= route.amount_max_minor:
        return f"amount outside {route.amount_min_minor}..{route.amount_max_minor}"
    if route.channel in unavailable:
        return "unavailable (circuit open)"
    return None


def _weighted(routes: Iterable[Route], draw: int) -> Route:
    ordered = list(routes)
    total = sum(r.weight for r in ordered)
    point = draw % total
    for route in ordered:
        if point < route.weight:
            return route
        point -= route.weight
    raise AssertionError("a draw below the total weight lands on a route")


def _why_not(route: Route, chosen: Route, fee: Callable[[Route], int]) -> str:
    if route.priority != chosen.priority:
        return f"priority {route.priority} after {chosen.priority}"
    if fee(route) != fee(chosen):
        return "a higher fee"
    return f"weight {route.weight} not drawn"
