"""Operator tools over the store: order search, the attention queue, the operator journal.

Reads go through the store's reader connections, so they work on a store opened
``read_only`` beside a running engine (``payengine orders``, ``payengine attention``). The
writes (a resolution, a dead letter's replay request, a notification's requeue) are one
short transaction each on whatever connection the caller gives: the engine's writer, or the
CLI's own connection to a file an engine may have open (SQLite serialises the writers).

Tables (created with the store's schema, and by ``ensure_schema`` from the CLI for a file
an older engine made):

- ``operator_resolutions``: the journal: one row per (item, action, occurrence), at most
  ``RESOLUTIONS_KEPT_MAX`` rows (the oldest go);
- ``dead_letter_replays``: replays asked for and not yet made; the notifier makes them on
  its subscriber's next round (``take_replays``, ``finish_replay``).

Any thread.
"""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING, Any

from payengine.engine.authorisation import AuthorisationFlag
from payengine.engine.operator import (
    ATTENTION_ITEMS_MAX,
    RESOLUTIONS_KEPT_MAX,
    Action,
    AttentionItem,
    AttentionKind,
    OrderFilter,
    OrderPage,
    OrderSummary,
    Resolution,
    cursor_of,
    item_id,
)
from payengine.engine.order import (
    OWED_LEG_STATUSES,
    LegMode,
    LegStatus,
    OrderState,
    PartStatus,
    owed_commands,
)

if TYPE_CHECKING:
    import sqlite_utils

    from payengine.persistence.store import Store

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS operator_resolutions (item_id TEXT NOT NULL, action TEXT NOT NULL,"
    " occurrence INTEGER NOT NULL, kind TEXT NOT NULL, operator TEXT NOT NULL,"
    " reason TEXT NOT NULL, at_ms INTEGER NOT NULL, outcome TEXT NOT NULL,"
    " PRIMARY KEY (item_id, action, occurrence))",
    "CREATE TABLE IF NOT EXISTS dead_letter_replays (consumer TEXT NOT NULL, seq INTEGER NOT NULL,"
    " requested_at_ms INTEGER NOT NULL, PRIMARY KEY (consumer, seq))",
)
_INDEXES = (
    "CREATE INDEX IF NOT EXISTS idx_payment_orders_state_created ON payment_orders"
    " (state, created_at_ms, order_id)",
    "CREATE INDEX IF NOT EXISTS idx_payment_orders_merchant_created ON payment_orders"
    " (merchant_id, created_at_ms, order_id)",
    "CREATE INDEX IF NOT EXISTS idx_payment_orders_created ON payment_orders"
    " (created_at_ms, order_id)",
    "CREATE INDEX IF NOT EXISTS idx_refunds_status ON refunds (status)",
)


def create_schema(db: sqlite_utils.Database) -> None:
    """The operator tables and the search indexes (called under the store's lock)."""
    for statement in (*_SCHEMA, *_INDEXES):
        db.execute(statement)


def ensure_schema(conn: sqlite3.Connection) -> None:
    """The operator tables on a file an engine without them made (indexes are the engine's)."""
    for statement in _SCHEMA:
        conn.execute(statement)


def _has_table(conn: sqlite3.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                        (name,)).fetchone() is not None


# ---------------------------------------------------------------------- order search

_SUMMARY = (
    "SELECT o.order_id, o.merchant_id, o.merchant_order_no, o.user_id, o.state, o.cause,"
    " o.total_minor, o.currency, o.created_at_ms, o.settled, o.station_id,"
    " (SELECT l.channel FROM legs l WHERE l.order_id = o.order_id AND l.mode = 'cash')"
    " FROM payment_orders o"
)


def find_orders(store: Store, flt: OrderFilter) -> OrderPage:
    """One page of the orders matching ``flt``, oldest first (by creation, then id)."""
    where: list[str] = []
    args: list[Any] = []
    for column, value in (("o.state", flt.state), ("o.merchant_id", flt.merchant_id),
                          ("o.user_id", flt.user_id), ("o.station_id", flt.station_id)):
        if value is not None:
            where.append(f"{column} = ?")
            args.append(value)
    if flt.since_ms is not None:
        where.append("o.created_at_ms >= ?")
        args.append(flt.since_ms)
    if flt.until_ms is not None:
        where.append("o.created_at_ms < ?")
        args.append(flt.until_ms)
    if flt.channel is not None:
        where.append("EXISTS (SELECT 1 FROM legs l WHERE l.order_id = o.order_id"
                     " AND l.mode = 'cash' AND l.channel = ?)")
        args.append(flt.channel)
    if flt.after is not None:
        where.append("(o.created_at_ms > ? OR (o.created_at_ms = ? AND o.order_id > ?))")
        args += [flt.after[0], flt.after[0], flt.after[1]]
    sql = (_SUMMARY + (" WHERE " + " AND ".join(where) if where else "")
           + " ORDER BY o.created_at_ms, o.order_id LIMIT ?")
    with store._read(snapshot=False) as conn:
        rows = conn.execute(sql, (*args, flt.limit + 1)).fetchall()
    orders = tuple(OrderSummary(str(r[0]), str(r[1]), str(r[2]), str(r[3] or ""), str(r[4]),
                                str(r[5] or ""), int(r[6]), str(r[7]), int(r[8] or 0),
                                bool(r[9]), None if r[10] is None else str(r[10]),
                                None if r[11] is None else str(r[11]))
                   for r in rows[:flt.limit])
    more = len(rows) > flt.limit
    return OrderPage(orders, cursor_of(orders[-1]) if more else None)


# ---------------------------------------------------------------------- the attention queue


def attention(store: Store, *, planted_bugs: frozenset[str] = frozenset(),
              include_resolved: bool = False) -> list[AttentionItem]:
    """Everything that needs a person now, by kind, oldest first within a kind; at most
    ``ATTENTION_ITEMS_MAX`` per kind. Acknowledged occurrences are left out unless
    ``include_resolved``. ``attention-misses-owed`` (planted): owed follow-ups left out."""
    items = [*_orders_in_doubt(store), *_refunds_unknown(store)]
    if "attention-misses-owed" not in planted_bugs:
        items += _owed(store)
    items += _refused(store)
    items += _authorisations_flagged(store)
    items += [*_dead_letters(store), *_given_up(store)]
    if include_resolved:
        return items
    with store._read(snapshot=False) as conn:
        if not _has_table(conn, "operator_resolutions"):
            return items
        return [i for i in items if conn.execute(
            "SELECT 1 FROM operator_resolutions WHERE item_id = ? AND action = ?"
            " AND occurrence = ?", (i.item_id, Action.ACKNOWLEDGE.value, i.occurrence)
        ).fetchone() is None]


def find_item(store: Store, wanted: str) -> AttentionItem | None:
    """The item with id ``wanted`` if it is in the queue now (acknowledged or not)."""
    return next((i for i in attention(store, include_resolved=True) if i.item_id == wanted), None)


def _orders_in_doubt(store: Store) -> list[AttentionItem]:
    with store._read(snapshot=False) as conn:
        rows = conn.execute(
            "SELECT order_id, cause, COALESCE(updated_at_ms, created_at_ms), total_minor, currency"
            " FROM payment_orders WHERE state = ? ORDER BY created_at_ms, order_id LIMIT ?",
            (OrderState.NEEDS_RECONCILIATION.value, ATTENTION_ITEMS_MAX)).fetchall()
    items = []
    for order_id, cause, at_ms, total, currency in rows:
        if str(cause or "").startswith("amount_mismatch"):
            kind, why = AttentionKind.AMOUNT_MISMATCH, (
                f"the channel reported a charge of another amount than {total} {currency}")
        else:
            kind, why = AttentionKind.NEEDS_RECONCILIATION, (
                f"cash result unknown after every query ({cause}): money may have moved")
        items.append(AttentionItem(item_id(kind, order_id), kind, int(at_ms or 0), why,
                                   order_id=str(order_id)))
    return items


def _refunds_unknown(store: Store) -> list[AttentionItem]:
    with store._read(snapshot=False) as conn:
        rows = conn.execute(
            "SELECT order_id, refund_id, refund_no, amount_minor, requested_at_ms FROM refunds"
            " WHERE status = 'unknown' ORDER BY requested_at_ms, order_id, refund_id LIMIT ?",
            (ATTENTION_ITEMS_MAX,)).fetchall()
    kind = AttentionKind.REFUND_UNKNOWN
    return [AttentionItem(item_id(kind, order_id, refund_id), kind, int(at_ms or 0),
                          f"refund {refund_no} of {amount}: no definitive answer after every "
                          "query", order_id=str(order_id), refund_id=str(refund_id))
            for order_id, refund_id, refund_no, amount, at_ms in rows]


def _owed(store: Store) -> list[AttentionItem]:
    statuses = [s.value for s in OWED_LEG_STATUSES]
    with store._read(snapshot=False) as conn:
        rows = conn.execute(
            "SELECT o.order_id, COALESCE(o.updated_at_ms, o.created_at_ms) FROM payment_orders o"
            " WHERE o.settled = 0 AND (EXISTS (SELECT 1 FROM legs l WHERE l.order_id ="
            f" o.order_id AND l.status IN ({','.join('?' * len(statuses))})) OR EXISTS"
            " (SELECT 1 FROM refunds r JOIN json_each(r.parts) p JOIN legs v"
            " ON v.order_id = r.order_id AND v.leg_no = json_extract(p.value, '$[0]')"
            " AND v.mode != ? WHERE r.order_id = o.order_id"
            " AND json_extract(p.value, '$[3]') = ?))"
            " ORDER BY o.created_at_ms, o.order_id LIMIT ?",
            (*statuses, LegMode.CASH.value, PartStatus.UNKNOWN.value, ATTENTION_ITEMS_MAX)
        ).fetchall()
    kind = AttentionKind.OWED_FOLLOW_UP
    items = []
    for order_id, at_ms in rows:
        order = store.load_order(str(order_id))
        if order is None:
            continue
        for owed in owed_commands(order):
            if not owed.flagged:
                continue
            parts: list[str | int] = [order.order_id, owed.leg_no, owed.operation]
            if owed.refund_id is not None:
                parts.append(owed.refund_id)
            items.append(AttentionItem(
                item_id(kind, *parts), kind, int(at_ms or 0),
                f"{owed.operation} of {owed.amount} on {owed.account_id} ({owed.status}) "
                "unanswered on its whole retry schedule; the sentinel re-sends it",
                order_id=order.order_id, refund_id=owed.refund_id))
    return items


REFUSED_LEG_STATUSES = (LegStatus.CONFIRM_FAILED, LegStatus.RELEASE_FAILED)
"""A follow-up the voucher system refused: final for the order, a person's for the money."""


def _refused(store: Store) -> list[AttentionItem]:
    statuses = [s.value for s in REFUSED_LEG_STATUSES]
    with store._read(snapshot=False) as conn:
        rows = conn.execute(
            "SELECT l.order_id, l.leg_no, l.status, l.account_id, l.amount,"
            " COALESCE(o.updated_at_ms, o.created_at_ms) FROM legs l JOIN payment_orders o"
            f" ON o.order_id = l.order_id WHERE l.status IN ({','.join('?' * len(statuses))})"
            " ORDER BY o.created_at_ms, l.order_id, l.leg_no LIMIT ?",
            (*statuses, ATTENTION_ITEMS_MAX)).fetchall()
    kind = AttentionKind.FOLLOW_UP_REFUSED
    return [AttentionItem(item_id(kind, order_id, leg_no), kind, int(at_ms or 0),
                          f"{'Confirm' if status == LegStatus.CONFIRM_FAILED.value else 'release'}"
                          f" of {amount} on {account_id} refused by its voucher system "
                          f"({status}): settle it with that system", order_id=str(order_id))
            for order_id, leg_no, status, account_id, amount, at_ms in rows]


AUTHORISATION_FLAG_KINDS = {AuthorisationFlag.UNSETTLED: AttentionKind.AUTHORISATION_UNSETTLED,
                            AuthorisationFlag.AMOUNT_MISMATCH:
                                AttentionKind.CAPTURE_AMOUNT_MISMATCH}
"""The attention kind of each ``Authorisation.flag``."""
AUTHORISATION_UNSETTLED_LEG_STATUSES = (LegStatus.CAPTURING, LegStatus.VOIDING)
"""A flagged pre-authorisation is listed while its cash leg is in one of these."""


def _authorisations_flagged(store: Store) -> list[AttentionItem]:
    """Pre-authorisations flagged (``payment_orders.authorisation``'s 5th item) whose
    capture or void is still unsettled."""
    statuses = [s.value for s in AUTHORISATION_UNSETTLED_LEG_STATUSES]
    with store._read(snapshot=False) as conn:
        rows = conn.execute(
            "SELECT o.order_id, json_extract(o.authorisation, '$[4]'),"
            " json_extract(o.authorisation, '$[5]'), COALESCE(o.updated_at_ms, o.created_at_ms),"
            " COALESCE(json_extract(o.authorisation, '$[6]'), 0), o.next_query_at_ms"
            " FROM payment_orders o WHERE o.settled = 0 AND o.authorisation IS NOT NULL"
            " AND json_extract(o.authorisation, '$[4]') IS NOT NULL AND EXISTS (SELECT 1 FROM"
            " legs l WHERE l.order_id = o.order_id AND l.mode = ? AND l.status IN"
            f" ({','.join('?' * len(statuses))})) ORDER BY o.created_at_ms, o.order_id LIMIT ?",
            (LegMode.CASH.value, *statuses, ATTENTION_ITEMS_MAX)).fetchall()
    items = []
    for order_id, flag, note, at_ms, flagged_at_ms, next_query_at_ms in rows:
        kind = AUTHORISATION_FLAG_KINDS[AuthorisationFlag(str(flag))]
        asking = ("the sentinel goes on asking the wallet" if next_query_at_ms is not None
                  else "the sentinel stopped asking: retry asks the wallet again")
        items.append(AttentionItem(item_id(kind, order_id), kind,
                                   int(flagged_at_ms or at_ms or 0), f"{note}; {asking}",
                                   occurrence=int(flagged_at_ms), order_id=str(order_id)))
    return items


def _dead_letters(store: Store) -> list[AttentionItem]:
    with store._read(snapshot=False) as conn:
        rows = conn.execute(
            "SELECT consumer, seq, event_id, attempts, error, at_ms FROM outbox_dead_letters"
            " ORDER BY at_ms, consumer, seq LIMIT ?", (ATTENTION_ITEMS_MAX,)).fetchall()
    kind = AttentionKind.DEAD_LETTER
    return [AttentionItem(item_id(kind, consumer, seq), kind, int(at_ms),
                          f"subscriber {consumer} refused event {event_id} {attempts} times: "
                          f"{error}", occurrence=int(at_ms), event_id=str(event_id),
                          subscriber=str(consumer))
            for consumer, seq, event_id, attempts, error, at_ms in rows]


def _given_up(store: Store) -> list[AttentionItem]:
    with store._read(snapshot=False) as conn:
        rows = conn.execute(
            "SELECT event_id, merchant_id, order_id, attempts, last_error, updated_at_ms"
            " FROM merchant_notifications WHERE status = 'given_up'"
            " ORDER BY updated_at_ms, event_id LIMIT ?", (ATTENTION_ITEMS_MAX,)).fetchall()
    kind = AttentionKind.NOTIFICATION_GIVEN_UP
    return [AttentionItem(item_id(kind, event_id), kind, int(at_ms or 0),
                          f"merchant {merchant_id} never accepted it in {attempts} attempts: "
                          f"{error}", occurrence=int(attempts), order_id=str(order_id),
                          event_id=str(event_id))
            for event_id, merchant_id, order_id, attempts, error, at_ms in rows]


# ---------------------------------------------------------------------- the journal


def recorded(conn: sqlite3.Connection, item: AttentionItem, action: Action) -> Resolution | None:
    """The resolution of this occurrence by ``action`` made before, if any."""
    if not _has_table(conn, "operator_resolutions"):
        return None
    row = conn.execute(
        "SELECT operator, reason, at_ms, outcome FROM operator_resolutions"
        " WHERE item_id = ? AND action = ? AND occurrence = ?",
        (item.item_id, action.value, item.occurrence)).fetchone()
    if row is None:
        return None
    return Resolution(item.item_id, item.kind, action, str(row[0]), str(row[1]), int(row[2]),
                      item.occurrence, str(row[3]), repeated=True)


def latest(store: Store, wanted: str, action: Action) -> Resolution | None:
    """The last resolution of item ``wanted`` by ``action`` (of any occurrence), as a
    repeat: what a resolve of an item no longer in the queue answers."""
    with store._read(snapshot=False) as conn:
        if not _has_table(conn, "operator_resolutions"):
            return None
        row = conn.execute(
            "SELECT kind, operator, reason, at_ms, occurrence, outcome FROM operator_resolutions"
            " WHERE item_id = ? AND action = ? ORDER BY rowid DESC LIMIT 1",
            (wanted, action.value)).fetchone()
    if row is None:
        return None
    return Resolution(wanted, AttentionKind(row[0]), action, str(row[1]), str(row[2]),
                      int(row[3]), int(row[4]), str(row[5]), repeated=True)


def record(conn: sqlite3.Connection, resolution: Resolution) -> None:
    """Journal ``resolution`` (in the caller's transaction) and keep the journal bounded."""
    conn.execute(
        "INSERT INTO operator_resolutions (item_id, action, occurrence, kind, operator, reason,"
        " at_ms, outcome) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (resolution.item_id, resolution.action.value, resolution.occurrence,
         resolution.kind.value, resolution.operator, resolution.reason, resolution.at_ms,
         resolution.outcome))
    conn.execute("DELETE FROM operator_resolutions WHERE rowid <= (SELECT MAX(rowid) FROM"
                 " operator_resolutions) - ?", (RESOLUTIONS_KEPT_MAX,))


def journal(store: Store, limit: int = 1_000) -> list[Resolution]:
    """The newest resolutions first, at most ``limit``."""
    with store._read(snapshot=False) as conn:
        if not _has_table(conn, "operator_resolutions"):
            return []
        rows = conn.execute(
            "SELECT item_id, kind, action, operator, reason, at_ms, occurrence, outcome"
            " FROM operator_resolutions ORDER BY rowid DESC LIMIT ?", (limit,)).fetchall()
    return [Resolution(str(r[0]), AttentionKind(r[1]), Action(r[2]), str(r[3]), str(r[4]),
                       int(r[5]), int(r[6]), str(r[7])) for r in rows]


def request_replay(conn: sqlite3.Connection, item: AttentionItem, now_ms: int) -> None:
    """Ask the notifier to hand the dead letter to its subscriber again (its next round)."""
    assert item.kind is AttentionKind.DEAD_LETTER and item.subscriber is not None
    seq = int(item.item_id.rsplit(":", 1)[1])
    conn.execute("INSERT OR IGNORE INTO dead_letter_replays (consumer, seq, requested_at_ms)"
                 " VALUES (?, ?, ?)", (item.subscriber, seq, now_ms))


def requeue_notification(conn: sqlite3.Connection, item: AttentionItem, now_ms: int) -> None:
    """One more POST of a given-up notification, due now (given up again if it fails)."""
    assert item.kind is AttentionKind.NOTIFICATION_GIVEN_UP
    conn.execute("UPDATE merchant_notifications SET status = 'pending', next_at_ms = ?,"
                 " attempts = MAX(attempts - 1, 0), updated_at_ms = ?"
                 " WHERE event_id = ? AND status = 'given_up'", (now_ms, now_ms, item.event_id))


def take_replays(conn: sqlite3.Connection, consumer: str, limit: int) -> list[int]:
    """Seqs of the dead letters of ``consumer`` whose replay was asked for (the engine's
    store has the table: ``create_schema`` at open)."""
    return [int(r[0]) for r in conn.execute(
        "SELECT seq FROM dead_letter_replays WHERE consumer = ? ORDER BY seq LIMIT ?",
        (consumer, limit)).fetchall()]


def finish_replay(conn: sqlite3.Connection, consumer: str, seq: int, error: str | None,
                  now_ms: int) -> None:
    """The replay was made: delivered (``error`` ``None``: the dead letter goes) or refused
    again (it stays, set aside anew at ``now_ms``, which is a new occurrence)."""
    conn.execute("DELETE FROM dead_letter_replays WHERE consumer = ? AND seq = ?", (consumer, seq))
    if error is None:
        conn.execute("DELETE FROM outbox_dead_letters WHERE consumer = ? AND seq = ?",
                     (consumer, seq))
    else:
        conn.execute("UPDATE outbox_dead_letters SET attempts = attempts + 1, error = ?,"
                     " at_ms = ? WHERE consumer = ? AND seq = ?", (error, now_ms, consumer, seq))
