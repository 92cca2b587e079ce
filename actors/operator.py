"""Operator resolutions: carried out in the engine (``Engine.resolve``) or on a file an
engine may have open (``payengine resolve``, another process).

A resolution is journalled in the same transaction as the change it makes in the database
(a dead letter's replay request, a notification's requeue), and at most once per (item,
action, occurrence): asked again, the first record is returned and nothing is done again.
In the engine a retry of an owed follow-up, or of a pre-authorisation's unsettled capture or
void, sends its order an ``Activate``, which re-sends what the order decided already
(idempotent by fence, by capture id): money moves only through the engine's own
decisions. Another process cannot reach the engine's actors, so there that retry is refused
(the sentinel re-sends meanwhile); its dead letter replays and requeues are picked up by the
engine's notifier on its next round (after its next commit, or at the next open). Runs on
the caller's thread; never waits for an actor.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING

from payengine.engine.errors import UnknownAttentionItem
from payengine.engine.operator import (
    RETRY_NEEDS_ENGINE,
    Action,
    AttentionItem,
    AttentionKind,
    Resolution,
    check_resolution,
    outcome_of,
    parse_item_id,
)
from payengine.engine.order import Activate
from payengine.persistence import operator as store_operator

if TYPE_CHECKING:
    from payengine.actors.base import Context
    from payengine.persistence.store import Store


def _item(store: Store, wanted: object, action: object) -> AttentionItem | Resolution:
    """The item in the queue now; else, if this action resolved it before (it left the
    queue since), that resolution as a repeat; else ``UnknownAttentionItem``."""
    parse_item_id(wanted)
    assert isinstance(wanted, str)
    item = store_operator.find_item(store, wanted)
    if item is not None:
        return item
    if isinstance(action, str) and action in {a.value for a in Action}:
        before = store_operator.latest(store, wanted, Action(str(action)))
        if before is not None:
            return before
    raise UnknownAttentionItem(f"no attention item {wanted} now (resolved, or never was)")


def _apply(conn: sqlite3.Connection, item: AttentionItem, action: Action, operator: str,
           reason: str, now_ms: int) -> tuple[Resolution, bool]:
    """Journal and make the database's part of it; (resolution, done now)."""
    before = store_operator.recorded(conn, item, action)
    if before is not None:
        return before, False
    if action is Action.RETRY and item.kind is AttentionKind.DEAD_LETTER:
        store_operator.request_replay(conn, item, now_ms)
    elif action is Action.RETRY and item.kind is AttentionKind.NOTIFICATION_GIVEN_UP:
        store_operator.requeue_notification(conn, item, now_ms)
    resolution = Resolution(item.item_id, item.kind, action, operator, reason, now_ms,
                            item.occurrence, outcome_of(item.kind, action))
    store_operator.record(conn, resolution)
    return resolution, True


def resolve_in_engine(ctx: Context, wanted: object, action: object, operator: object,
                      reason: object) -> Resolution:
    """``Engine.resolve``: on the caller's thread; tells, never asks, an actor."""
    item = _item(ctx.store, wanted, action)
    if isinstance(item, Resolution):
        return item
    chosen = check_resolution(item, action, operator, reason, in_engine=True)
    assert isinstance(operator, str) and isinstance(reason, str)
    with ctx.store._tx() as conn:
        resolution, done = _apply(conn, item, chosen, operator, reason, ctx.runtime.now_ms())
    if done and chosen is Action.RETRY:
        if item.kind in RETRY_NEEDS_ENGINE:  # the order re-sends what it decided already
            assert item.order_id is not None
            ctx.directory.tell(("order", item.order_id), Activate())
        else:
            ctx.notifications.kick()
    ctx.log.info("operator.resolved", item=item.item_id, action=chosen.value,
                 operator=operator, outcome=resolution.outcome, repeated=resolution.repeated)
    return resolution


def resolve_in_file(path: str | Path, store: Store, wanted: object, action: object,
                    operator: object, reason: object, now_ms: int) -> Resolution:
    """``payengine resolve``: the item read through ``store`` (opened read-only by the
    caller, who closes it), the resolution written on a connection of its own, beside a
    running engine if there is one."""
    item = _item(store, wanted, action)
    if isinstance(item, Resolution):
        return item
    chosen = check_resolution(item, action, operator, reason, in_engine=False)
    assert isinstance(operator, str) and isinstance(reason, str)
    conn = sqlite3.connect(str(path), isolation_level=None, timeout=30.0)
    try:
        conn.execute("PRAGMA busy_timeout=30000")
        store_operator.ensure_schema(conn)
        conn.execute("BEGIN IMMEDIATE")
        try:
            resolution, _ = _apply(conn, item, chosen, operator, reason, now_ms)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    finally:
        conn.close()
    return resolution
