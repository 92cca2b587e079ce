"""``payengine orders``, ``payengine attention``, ``payengine resolve``: the operator tools
over a database file, beside a running engine or without one (README "Operator tools").

``orders`` and ``attention`` open the store read-only. ``resolve`` reads the item the same
way and writes its journal row (and a dead letter's replay request, or a notification's
requeue) in one short transaction of its own; the engine that has the file open picks them
up on its notifier's next round, or the next engine at its open. Runs on the main thread.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import click

from payengine.engine.operator import (
    FIND_ORDERS_LIMIT_DEFAULT,
    FIND_ORDERS_LIMIT_MAX,
    Action,
    AttentionItem,
    Resolution,
)
from payengine.engine.order import OrderState
from payengine.sim.cli_common import (
    config_option,
    database,
    db_option,
    fail,
    json_option,
    open_for_reading,
    out,
    store_for_reading,
)


def _time_ms(value: str | None, name: str) -> int | None:
    """Epoch milliseconds, or ISO-8601 UTC (``2026-12-01T10:00:00Z``)."""
    from payengine.engine.errors import InvalidRequest
    from payengine.engine.statement import StatementError, parse_time

    if value is None:
        return None
    if value.isdigit() and len(value) <= 16:
        return int(value)
    try:
        return parse_time(value)
    except StatementError as error:
        raise InvalidRequest(f"{name}: epoch milliseconds or {error.message}") from None


@click.command(short_help="list and search orders in a database",
               help="Lists the orders matching every filter given, oldest first (by creation "
                    "time, then order id), one page at a time: --limit orders (1.."
                    f"{FIND_ORDERS_LIMIT_MAX}, default {FIND_ORDERS_LIMIT_DEFAULT}); when "
                    "more match it prints the cursor to pass as --after for the next page. "
                    "Reads only: safe beside a running engine.")
@db_option
@config_option
@click.option("--state", type=click.Choice([s.value for s in OrderState]), default=None)
@click.option("--since", default=None, metavar="TIME",
              help="created at or after: epoch ms or ISO-8601 UTC")
@click.option("--until", default=None, metavar="TIME",
              help="created before: epoch ms or ISO-8601 UTC")
@click.option("--merchant", default=None, help="merchant_id")
@click.option("--user", default=None, help="user_id")
@click.option("--station", default=None, help="the FuelSale station_id")
@click.option("--channel", default=None, help="the cash leg's channel")
@click.option("--limit", type=int, default=FIND_ORDERS_LIMIT_DEFAULT, show_default=True)
@click.option("--after", default=None, metavar="CURSOR", help="the previous page's next cursor")
@json_option('print {"orders": [...], "next_after": CURSOR or null}')
def orders(db: str | None, config: str | None, state: str | None, since: str | None,
           until: str | None, merchant: str | None, user: str | None, station: str | None,
           channel: str | None, limit: int, after: str | None, as_json: bool) -> int:
    from payengine.engine.errors import InvalidRequest
    from payengine.engine.operator import order_filter
    from payengine.persistence.operator import find_orders

    try:
        flt = order_filter(state=state, since_ms=_time_ms(since, "--since"),
                           until_ms=_time_ms(until, "--until"), merchant_id=merchant,
                           user_id=user, station_id=station, channel=channel, limit=limit,
                           after=after)
    except InvalidRequest as error:
        return fail("orders", error.message)
    store = open_for_reading("orders", db, config)
    if store is None:
        return 2
    try:
        page = find_orders(store, flt)
    finally:
        store.close()
    if as_json:
        out(json.dumps({"orders": [dataclasses.asdict(o) for o in page.orders],
                        "next_after": page.next_after}))
        return 0
    lines = [f"{o.order_id}  {o.created_at_ms}  {o.state:<20} {o.total_minor:>10} {o.currency}"
             f"  {o.merchant_id}/{o.merchant_order_no}  user {o.user_id or '-'}"
             f"  {o.channel or '-'}{'  station ' + o.station_id if o.station_id else ''}"
             for o in page.orders]
    lines.append(f"{len(page.orders)} orders"
                 + (f"; next page: --after {page.next_after}" if page.next_after else ""))
    out("\n".join(lines))
    return 0


def _item_json(item: AttentionItem) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(item).items()}


@click.command(short_help="what needs a person: the attention queue of a database",
               help="Lists everything the engine cannot finish by itself: orders "
                    "needs_reconciliation (amount_mismatch on their own), owed voucher "
                    "follow-ups, refunds unknown, outbox dead letters, given-up merchant "
                    "notifications, pump pre-authorisations unsettled or with a misreported "
                    "capture amount; at most 1000 of each kind, oldest first, acknowledged "
                    "ones left out. Reads only: safe beside a running engine. Exit status 0 "
                    "if the queue is empty, 1 if not.")
@db_option
@config_option
@json_option('print {"items": [...], "counts": {kind: n}}')
def attention(db: str | None, config: str | None, as_json: bool) -> int:
    from payengine.persistence.operator import attention as queue

    store = open_for_reading("attention", db, config)
    if store is None:
        return 2
    try:
        items = queue(store)
    finally:
        store.close()
    counts: dict[str, int] = {}
    for item in items:
        counts[item.kind.value] = counts.get(item.kind.value, 0) + 1
    if as_json:
        out(json.dumps({"items": [_item_json(i) for i in items], "counts": counts}))
    else:
        lines = [f"{i.item_id}  since {i.since_ms}  {i.why}" for i in items]
        lines.append(f"{len(items)} items" + "".join(f"  {k} {n}" for k, n in counts.items()))
        out("\n".join(lines))
    return 1 if items else 0


@click.command(short_help="act on an attention item and journal who and why",
               help="Acts on ITEM (an item id from 'payengine attention') with ACTION: "
                    "acknowledge (handled by a person: the item leaves the queue) or retry "
                    "(a dead letter is replayed to its subscriber, a given-up notification "
                    "POSTed once more, by the engine that has the file open on its next "
                    "round, or the next one at its open; an owed follow-up can be retried "
                    "only in the engine's process, Engine.resolve). Journalled with "
                    "--operator and --reason; the same item and action again does nothing "
                    "more and prints the first record. Exit status 0 done, 1 refused "
                    "(unknown_attention_item, action_not_applicable), 2 usage error.")
@click.argument("item")
@click.argument("action", type=click.Choice([a.value for a in Action]))
@click.option("--operator", required=True, help="who acts (an id: no spaces needed)")
@click.option("--reason", required=True, help="why (1..500 characters)")
@db_option
@config_option
@json_option("print the journalled resolution as one JSON object")
def resolve(item: str, action: str, operator: str, reason: str, db: str | None,
            config: str | None, as_json: bool) -> int:
    from payengine.actors.operator import resolve_in_file
    from payengine.engine.errors import InvalidRequest, PaymentError

    path = database("resolve", db, config)
    if path is None:
        return 2
    store = store_for_reading(path, "resolve")
    if store is None:
        return 2
    try:
        done = resolve_in_file(path, store, item, action, operator, reason,
                               int(time.time() * 1000))
    except InvalidRequest as error:
        return fail("resolve", f"{error.code}: {error.message}")
    except PaymentError as error:
        return fail("resolve", f"{error.code}: {error.message}", 1)
    finally:
        store.close()
    out(json.dumps(resolution_json(done)) if as_json else
        f"{done.item_id}: {done.outcome} by {done.operator} at {done.at_ms}"
        + (" (resolved so before: nothing done again)" if done.repeated else ""))
    return 0


def resolution_json(done: Resolution) -> dict[str, Any]:
    return dataclasses.asdict(done)


def register(group: click.Group) -> None:
    for command in (orders, attention, resolve):
        group.add_command(command)
