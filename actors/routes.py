"""Routing in the shell: the route for a payment method at submit, and the next route when
a payment falls back (``engine.order``'s ``ChooseRoute``).

Reads the engine's routing table, each channel's own configuration (``enabled``, ``limits``,
``fee``) and the channels' breakers (``actors.health``); the choice itself is the pure
``engine.routing.choose_route``. Runs on the submitting thread or on the order actor's, and
blocks on nothing (the breakers are a lock away).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import replace

from payengine.actors.base import Context
from payengine.actors.channel import takes_details
from payengine.engine.channel_data import PayDetails
from payengine.engine.money import AMOUNT_MAX
from payengine.engine.routing import RouteChoice, RoutingTable, choose_route, route_draw

TRIED = "tried already: it refused this payment with a retryable code"
"""Why a fallback skips the routes the payment left (in the journalled choice)."""


def choose_for(ctx: Context, method: str, amount_minor: int, currency: str,
               details: PayDetails | None, order_id: str, *,
               taking_details: Collection[str] | None = None,
               tried: Collection[str] = (), probe: bool = True) -> RouteChoice:
    """The route of ``method`` for this payment; ``NoRoute`` when none can take it.

    ``tried``: channels the payment already left (a fallback), skipped. ``taking_details``:
    the channels whose ``pay`` takes pay details (computed when not given). ``probe``: the
    payment will be sent, so a half-open channel's single probe is spent on it (not for a
    trial that only checks the request would be taken).
    """
    table = ctx.config.routing
    if "route-ignores-limits" in ctx.config.planted_bugs:
        table = RoutingTable(tuple(replace(r, amount_max_minor=AMOUNT_MAX)
                                   for r in table.routes), table.fallbacks_max)
    if taking_details is None:
        taking_details = frozenset(n for n, c in ctx.channels.items() if takes_details(c))
    excluded: dict[str, str] = {}
    fees: dict[str, int] = {}
    for route in table.of(method):
        why = TRIED if route.channel in tried else cannot_take(
            ctx.channels, route.channel, amount_minor, details, taking_details)
        if why is not None:
            excluded[route.channel] = why
        fee = getattr(getattr(ctx.channels.get(route.channel), "config", None), "fee", None)
        if fee is not None and (fee.basis_points or fee.fixed_minor):
            fees[route.channel] = fee.of(amount_minor)
    choice = choose_route(table, method, amount_minor, currency,
                          unavailable=ctx.health.unavailable(), fee_ppm=ctx.config.fee_ppm,
                          draw=route_draw(order_id), known_channels=ctx.channels.keys(),
                          excluded=excluded, fees_minor=fees)
    if probe:
        ctx.health.chosen(choice.channel)
    return choice


def cannot_take(channels: Mapping[str, object], channel: str, amount_minor: int,
                details: PayDetails | None, taking_details: Collection[str]) -> str | None:
    """Why routing must not give the payment to ``channel`` (its configuration says
    ``enabled = false``, or its ``limits`` leave the amount out; its ``pay`` takes no
    details and the payment has some), or ``None``."""
    config = getattr(channels.get(channel), "config", None)
    if getattr(config, "enabled", True) is False:
        return "disabled"
    limits = getattr(config, "limits", None)
    if limits is not None and not limits.allows(amount_minor):
        return (f"amount outside the channel's limits {limits.amount_min_minor}.."
                f"{limits.amount_max_minor}")
    if details is not None and channel not in taking_details:
        return "takes no pay details"
    return None
