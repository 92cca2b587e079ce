"""The durable outbox: every order state change, written in the transaction of the change.

``Store`` calls ``create_schema`` when it opens and ``record_order_events`` inside the
transaction that writes an order, so an event exists if and only if its change was committed
(the transactional outbox pattern: no change without its message, no message without its
change). Everything else here is the delivery bookkeeping the notifier
(``actors.notifier``) keeps next to the events, in the same database:

- ``outbox``: one row per order-level transition. ``seq`` (the rowid) grows in commit order:
  the store has one writer at a time (``BEGIN IMMEDIATE``), so a reader that sees ``seq`` N
  has seen every event before it. Events are never updated; ``prune`` deletes those every
  consumer is done with, once they are older than the retention.
- ``outbox_cursors``: per consumer (an in-process subscriber, or ``MERCHANTS`` for the
  dispatcher of merchant notifications) the last ``seq`` it has fully handled, and the
  failed attempts at the next one.
- ``outbox_dead_letters``: events a subscriber kept refusing until its retries ran out.
- ``merchant_endpoints``: callback URL and signing secret per merchant.
- ``merchant_notifications``: one row per event to POST to its merchant: attempts,
  ``next_at_ms``, status.

Every function takes the ``sqlite3`` connection of a transaction (``Store._tx``) or of a
read snapshot (``Store._read``) and never commits. Fixed SQL only: ``record_order_events`` is
on the hot path of every order commit (one ``INSERT`` per order-level transition, into a
rowid table without a secondary index).
"""

from __future__ import annotations

import enum
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlite_utils

from payengine.engine.order import PaymentOrder, Transition

MERCHANTS = "~merchants"
"""Cursor of the merchant dispatcher. Subscriber names may not start with ``~``."""

ORDER_STATE_CHANGED = "order.state_changed"
"""The ``event_type`` of every outbox event (the only kind so far)."""


class NotificationStatus(enum.StrEnum):
    PENDING = "pending"
    """Not yet answered with 2xx and ``SUCCESS``; ``next_at_ms`` says when it is tried next."""
    DELIVERED = "delivered"
    """The merchant answered 2xx with the body ``SUCCESS``. Final."""
    GIVEN_UP = "given_up"
    """Every attempt of the schedule failed (or the merchant was unregistered). Final."""


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    """One order state change, as published to subscribers and merchants.

    ``event_id`` is stable (``"{order_id}:{order_version}:{index}"``: the order's version
    after the commit and the transition's position among that commit's order-level
    transitions) and unique: deduplicate on it, since delivery is at least once.
    """

    seq: int
    """Position in the outbox; grows in commit order."""
    event_id: str
    order_id: str
    order_version: int
    merchant_id: str
    merchant_order_no: str
    payment_serial: str
    from_state: str
    """``""`` for the submit."""
    to_state: str
    cause: str
    total_minor: int
    currency: str
    at_ms: int
    """When the change was committed (the engine's clock)."""

    def payload(self) -> dict[str, Any]:
        """The event as a JSON-ready mapping (what a merchant notification carries)."""
        return {
            "event_id": self.event_id, "event_type": ORDER_STATE_CHANGED, "seq": self.seq,
            "order_id": self.order_id, "order_version": self.order_version,
            "merchant_id": self.merchant_id, "merchant_order_no": self.merchant_order_no,
            "payment_serial": self.payment_serial, "from_state": self.from_state,
            "to_state": self.to_state, "cause": self.cause, "total_minor": self.total_minor,
            "currency": self.currency, "at_ms": self.at_ms,
        }


@dataclass(frozen=True, slots=True)
class Cursor:
    """How far one consumer got: every event up to ``seq`` handled."""

    consumer: str
    seq: int
    attempts: int
    """Failed attempts at the event after ``seq`` (0 when the last one succeeded)."""
    next_at_ms: int | None
    last_error: str | None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An event a subscriber refused on every attempt; it was skipped after the last one."""

    subscriber: str
    event_id: str
    seq: int
    attempts: int
    error: str
    at_ms: int


@dataclass(frozen=True, slots=True)
class MerchantEndpoint:
    """Where a merchant's notifications go. The secret is kept out of views and logs."""

    merchant_id: str
    callback_url: str
    states: tuple[str, ...]
    """Order states (``to_state``) the merchant is notified of; empty means every change."""
    from_seq: int
    """Events after this outbox position are notified (the position at registration)."""
    registered_at_ms: int


@dataclass(frozen=True, slots=True)
class Notification:
    """The delivery state of one event's notification to its merchant."""

    event_id: str
    merchant_id: str
    order_id: str
    seq: int
    status: str
    attempts: int
    next_at_ms: int | None
    """When the next attempt is due (``None`` once delivered or given up)."""
    last_error: str | None
    created_at_ms: int
    delivered_at_ms: int | None


@dataclass(frozen=True, slots=True)
class DueNotification:
    """A notification due to be POSTed, with what the POST needs."""

    event: OutboxEvent
    attempts: int
    callback_url: str | None
    """``None`` if the merchant was unregistered meanwhile."""
    secret: str | None


# ---------------------------------------------------------------------- schema


def create_schema(db: sqlite_utils.Database) -> None:
    """Create the outbox tables if they do not exist (called under the store's lock)."""
    db.table("outbox").create(
        {"seq": int, "event_id": str, "order_id": str, "order_version": int,
         "merchant_id": str, "merchant_order_no": str, "payment_serial": str,
         "from_state": str, "to_state": str, "cause": str, "total_minor": int,
         "currency": str, "at_ms": int},
        pk="seq", not_null={"event_id", "order_id", "order_version", "merchant_id", "at_ms"},
        if_not_exists=True,
    )
    db.table("outbox_cursors").create(
        {"consumer": str, "seq": int, "attempts": int, "next_at_ms": int, "last_error": str,
         "updated_at_ms": int},
        pk="consumer", not_null={"seq", "attempts"}, if_not_exists=True,
    )
    db.table("outbox_dead_letters").create(
        {"consumer": str, "seq": int, "event_id": str, "attempts": int, "error": str,
         "at_ms": int},
        pk=("consumer", "seq"), if_not_exists=True,
    )
    db.table("merchant_endpoints").create(
        {"merchant_id": str, "callback_url": str, "secret": str, "states": str,
         "from_seq": int, "registered_at_ms": int, "updated_at_ms": int},
        pk="merchant_id", not_null={"callback_url", "secret", "from_seq"}, if_not_exists=True,
    )
    db.table("merchant_notifications").create(
        {"event_id": str, "seq": int, "merchant_id": str, "order_id": str, "status": str,
         "attempts": int, "next_at_ms": int, "last_error": str, "created_at_ms": int,
         "updated_at_ms": int, "delivered_at_ms": int},
        pk="event_id", not_null={"seq", "merchant_id", "status", "attempts"},
        if_not_exists=True,
    )
    db.table("merchant_notifications").create_index(["status", "next_at_ms"],
                                                    if_not_exists=True)
    db.table("merchant_notifications").create_index(["order_id"], if_not_exists=True)


# ---------------------------------------------------------------------- the hot path

_EVENT_COLUMNS = (
    "seq, event_id, order_id, order_version, merchant_id, merchant_order_no, payment_serial,"
    " from_state, to_state, cause, total_minor, currency, at_ms"
)
_INSERT_EVENT = (
    "INSERT INTO outbox (event_id, order_id, order_version, merchant_id, merchant_order_no,"
    " payment_serial, from_state, to_state, cause, total_minor, currency, at_ms)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def record_order_events(conn: sqlite3.Connection, order: PaymentOrder,
                        transitions: Sequence[Transition], now_ms: int) -> None:
    """Append one event per order-level transition of ``order`` (inside the caller's tx).

    Leg and refund transitions are not events (they are in the journal). Runs on the thread
    of whoever commits the order (an order actor, or the API thread of a submit).
    """
    rows: list[tuple[object, ...]] = []
    for t in transitions:
        if t.entity == "order":
            rows.append((f"{order.order_id}:{order.version}:{len(rows)}", order.order_id,
                         order.version, order.merchant_id, order.merchant_order_no,
                         order.payment_serial, t.from_state, t.to_state, t.cause,
                         order.total_minor, order.currency, now_ms))
    if rows:
        conn.executemany(_INSERT_EVENT, rows)


# ---------------------------------------------------------------------- reading events


def _event(row: Sequence[Any]) -> OutboxEvent:
    (seq, event_id, order_id, version, merchant_id, merchant_order_no, serial, from_state,
     to_state, cause, total, currency, at_ms) = row
    return OutboxEvent(int(seq), str(event_id), str(order_id), int(version), str(merchant_id),
                       str(merchant_order_no), str(serial), str(from_state), str(to_state),
                       str(cause), int(total), str(currency), int(at_ms))


def read_events(conn: sqlite3.Connection, after_seq: int, limit: int,
                order_id: str | None = None) -> list[OutboxEvent]:
    """Events after ``after_seq`` in outbox order, at most ``limit``.

    With ``order_id`` only that order's (a scan of the events after ``after_seq``: for
    inspection and tests, not the hot path).
    """
    if order_id is None:
        rows = conn.execute(f"SELECT {_EVENT_COLUMNS} FROM outbox WHERE seq > ?"
                            " ORDER BY seq LIMIT ?", (after_seq, limit)).fetchall()
    else:
        rows = conn.execute(f"SELECT {_EVENT_COLUMNS} FROM outbox WHERE seq > ?"
                            " AND order_id = ? ORDER BY seq LIMIT ?",
                            (after_seq, order_id, limit)).fetchall()
    return [_event(r) for r in rows]


def last_seq(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT MAX(seq) FROM outbox").fetchone()
    return 0 if row is None or row[0] is None else int(row[0])


# ---------------------------------------------------------------------- cursors


def ensure_cursors(conn: sqlite3.Connection, consumers: Iterable[str], now_ms: int) -> None:
    """Give each new consumer a cursor at the current end of the outbox (kept if it exists)."""
    end = last_seq(conn)
    conn.executemany(
        "INSERT OR IGNORE INTO outbox_cursors (consumer, seq, attempts, updated_at_ms)"
        " VALUES (?, ?, 0, ?)", [(name, end, now_ms) for name in consumers])


def load_cursor(conn: sqlite3.Connection, consumer: str) -> Cursor:
    row = conn.execute("SELECT seq, attempts, next_at_ms, last_error FROM outbox_cursors"
                       " WHERE consumer = ?", (consumer,)).fetchone()
    if row is None:
        return Cursor(consumer, 0, 0, None, None)
    return Cursor(consumer, int(row[0]), int(row[1]), None if row[2] is None else int(row[2]),
                  None if row[3] is None else str(row[3]))


def all_cursors(conn: sqlite3.Connection) -> list[Cursor]:
    rows = conn.execute("SELECT consumer FROM outbox_cursors ORDER BY consumer").fetchall()
    return [load_cursor(conn, str(r[0])) for r in rows]


def save_cursor(conn: sqlite3.Connection, cursor: Cursor, now_ms: int) -> None:
    conn.execute(
        "INSERT INTO outbox_cursors (consumer, seq, attempts, next_at_ms, last_error,"
        " updated_at_ms) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (consumer) DO UPDATE SET"
        " seq = excluded.seq, attempts = excluded.attempts, next_at_ms = excluded.next_at_ms,"
        " last_error = excluded.last_error, updated_at_ms = excluded.updated_at_ms",
        (cursor.consumer, cursor.seq, cursor.attempts, cursor.next_at_ms, cursor.last_error,
         now_ms))


def add_dead_letter(conn: sqlite3.Connection, consumer: str, event: OutboxEvent,
                    attempts: int, error: str, now_ms: int) -> None:
    conn.execute("INSERT OR REPLACE INTO outbox_dead_letters (consumer, seq, event_id,"
                 " attempts, error, at_ms) VALUES (?, ?, ?, ?, ?, ?)",
                 (consumer, event.seq, event.event_id, attempts, error, now_ms))


def dead_letters(conn: sqlite3.Connection, consumer: str | None = None) -> list[DeadLetter]:
    sql = "SELECT consumer, event_id, seq, attempts, error, at_ms FROM outbox_dead_letters"
    params: tuple[Any, ...] = ()
    if consumer is not None:
        sql += " WHERE consumer = ?"
        params = (consumer,)
    rows = conn.execute(sql + " ORDER BY consumer, seq", params).fetchall()
    return [DeadLetter(str(r[0]), str(r[1]), int(r[2]), int(r[3]), str(r[4]), int(r[5]))
            for r in rows]


# ---------------------------------------------------------------------- retention


def prune(conn: sqlite3.Connection, consumers: Iterable[str], before_ms: int, limit: int) -> int:
    """Delete up to ``limit`` events that every consumer is done with; return how many.

    An event goes when it was committed before ``before_ms``, every cursor in ``consumers``
    is at or past it, and its merchant notification (if any) is final; that notification
    goes with it. The newest event always stays: ``seq`` is a rowid without AUTOINCREMENT,
    so an empty table would hand out seq 1 again, behind every cursor. Dead letters stay
    (an operator reads them). Call inside a transaction (``Store._tx``).
    """
    names = list(dict.fromkeys(consumers))
    floor = last_seq(conn) - 1
    for name in names:
        floor = min(floor, load_cursor(conn, name).seq)
    if floor <= 0:
        return 0
    rows = conn.execute(
        "SELECT o.seq, o.event_id FROM outbox o WHERE o.seq <= ? AND o.at_ms < ?"
        " AND NOT EXISTS (SELECT 1 FROM merchant_notifications n"
        " WHERE n.event_id = o.event_id AND n.status = ?) ORDER BY o.seq LIMIT ?",
        (floor, before_ms, NotificationStatus.PENDING.value, limit)).fetchall()
    conn.executemany("DELETE FROM merchant_notifications WHERE event_id = ?",
                     [(str(r[1]),) for r in rows])
    conn.executemany("DELETE FROM outbox WHERE seq = ?", [(int(r[0]),) for r in rows])
    return len(rows)


# ---------------------------------------------------------------------- merchants


def _endpoint(row: Sequence[Any]) -> MerchantEndpoint:
    merchant_id, url, states, from_seq, registered = row
    return MerchantEndpoint(str(merchant_id), str(url),
                            tuple(s for s in str(states or "").split(",") if s),
                            int(from_seq), int(registered))


def upsert_merchant(conn: sqlite3.Connection, merchant_id: str, callback_url: str, secret: str,
                    states: Sequence[str], now_ms: int) -> MerchantEndpoint:
    """Register a merchant, or change its URL, secret or states (keeping its ``from_seq``).

    A first registration starts at the current end of the outbox: earlier events are not
    notified. The merchant dispatcher's cursor is created there too if it has none yet, so
    that it does not scan events from before any merchant existed.
    """
    end = last_seq(conn)
    conn.execute(
        "INSERT INTO merchant_endpoints (merchant_id, callback_url, secret, states, from_seq,"
        " registered_at_ms, updated_at_ms) VALUES (?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (merchant_id) DO UPDATE SET callback_url = excluded.callback_url,"
        " secret = excluded.secret, states = excluded.states,"
        " updated_at_ms = excluded.updated_at_ms",
        (merchant_id, callback_url, secret, ",".join(states), end, now_ms, now_ms))
    conn.execute("INSERT OR IGNORE INTO outbox_cursors (consumer, seq, attempts, updated_at_ms)"
                 " VALUES (?, ?, 0, ?)", (MERCHANTS, end, now_ms))
    endpoint = load_merchant(conn, merchant_id)
    assert endpoint is not None
    return endpoint


def load_merchant(conn: sqlite3.Connection, merchant_id: str) -> MerchantEndpoint | None:
    row = conn.execute("SELECT merchant_id, callback_url, states, from_seq, registered_at_ms"
                       " FROM merchant_endpoints WHERE merchant_id = ?",
                       (merchant_id,)).fetchone()
    return None if row is None else _endpoint(row)


def delete_merchant(conn: sqlite3.Connection, merchant_id: str, error: str, now_ms: int) -> int:
    """Unregister; its pending notifications are given up. Returns how many were pending."""
    conn.execute("DELETE FROM merchant_endpoints WHERE merchant_id = ?", (merchant_id,))
    cur = conn.execute(
        "UPDATE merchant_notifications SET status = ?, next_at_ms = NULL, last_error = ?,"
        " updated_at_ms = ? WHERE merchant_id = ? AND status = ?",
        (NotificationStatus.GIVEN_UP.value, error, now_ms, merchant_id,
         NotificationStatus.PENDING.value))
    return int(cur.rowcount)


def merchant_count(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT COUNT(*) FROM merchant_endpoints").fetchone()[0])


# ---------------------------------------------------------------------- notifications


def dispatch(conn: sqlite3.Connection, limit: int, now_ms: int) -> bool:
    """Create the notifications of up to ``limit`` events past the dispatcher's cursor.

    Call inside a write transaction. Only events of registered merchants after their
    ``from_seq`` and in their ``states`` get a notification, due at once. Returns True if
    ``limit`` was reached (more may follow: call again).
    """
    cursor = load_cursor(conn, MERCHANTS)
    rows = conn.execute(
        "SELECT o.seq, o.event_id, o.merchant_id, o.order_id, o.to_state, m.states"
        " FROM outbox o JOIN merchant_endpoints m ON m.merchant_id = o.merchant_id"
        " WHERE o.seq > ? AND o.seq > m.from_seq ORDER BY o.seq LIMIT ?",
        (cursor.seq, limit)).fetchall()
    full = len(rows) >= limit
    end = int(rows[-1][0]) if full else last_seq(conn)
    wanted = [(r[1], r[0], r[2], r[3], NotificationStatus.PENDING.value, now_ms, now_ms, now_ms)
              for r in rows if not r[5] or str(r[4]) in str(r[5]).split(",")]
    if wanted:
        conn.executemany(
            "INSERT OR IGNORE INTO merchant_notifications (event_id, seq, merchant_id, order_id,"
            " status, attempts, next_at_ms, created_at_ms, updated_at_ms)"
            " VALUES (?, ?, ?, ?, ?, 0, ?, ?, ?)", wanted)
    if end != cursor.seq:
        save_cursor(conn, Cursor(MERCHANTS, end, 0, None, None), now_ms)
    return full


def undispatched(conn: sqlite3.Connection) -> bool:
    """True if events were committed after the dispatcher's cursor (one statement, so it
    needs no snapshot)."""
    row = conn.execute(
        "SELECT COALESCE((SELECT MAX(seq) FROM outbox), 0)"
        " > COALESCE((SELECT seq FROM outbox_cursors WHERE consumer = ?), 0)",
        (MERCHANTS,)).fetchone()
    return bool(row[0])


def due_notifications(conn: sqlite3.Connection, now_ms: int, limit: int) -> list[DueNotification]:
    rows = conn.execute(
        "SELECT n.attempts, m.callback_url, m.secret,"
        f" {', '.join('e.' + c.strip() for c in _EVENT_COLUMNS.split(','))}"
        " FROM merchant_notifications n JOIN outbox e ON e.seq = n.seq"
        " LEFT JOIN merchant_endpoints m ON m.merchant_id = n.merchant_id"
        " WHERE n.status = ? AND n.next_at_ms <= ? ORDER BY n.next_at_ms, n.seq LIMIT ?",
        (NotificationStatus.PENDING.value, now_ms, limit)).fetchall()
    return [DueNotification(_event(r[3:]), int(r[0]), None if r[1] is None else str(r[1]),
                            None if r[2] is None else str(r[2])) for r in rows]


def next_pending_at(conn: sqlite3.Connection) -> int | None:
    """The earliest ``next_at_ms`` of a pending notification (in the past if one is due)."""
    row = conn.execute("SELECT MIN(next_at_ms) FROM merchant_notifications WHERE status = ?",
                       (NotificationStatus.PENDING.value,)).fetchone()
    return None if row is None or row[0] is None else int(row[0])


def still_due(conn: sqlite3.Connection, event_id: str, attempts: int, now_ms: int) -> bool:
    """True if the notification is pending, due, and nobody recorded an attempt meanwhile."""
    row = conn.execute("SELECT 1 FROM merchant_notifications WHERE event_id = ? AND status = ?"
                       " AND attempts = ? AND next_at_ms <= ?",
                       (event_id, NotificationStatus.PENDING.value, attempts, now_ms)).fetchone()
    return row is not None


def record_attempt(conn: sqlite3.Connection, event_id: str, attempts_before: int,
                   status: NotificationStatus, next_at_ms: int | None, error: str | None,
                   now_ms: int) -> bool:
    """Record one POST's outcome; False if another attempt was recorded first (a race)."""
    cur = conn.execute(
        "UPDATE merchant_notifications SET status = ?, attempts = ?, next_at_ms = ?,"
        " last_error = ?, updated_at_ms = ?, delivered_at_ms = ?"
        " WHERE event_id = ? AND status = ? AND attempts = ?",
        (status.value, attempts_before + 1, next_at_ms, error, now_ms,
         now_ms if status is NotificationStatus.DELIVERED else None, event_id,
         NotificationStatus.PENDING.value, attempts_before))
    return cur.rowcount == 1


_NOTIFICATION_COLUMNS = (
    "event_id, merchant_id, order_id, seq, status, attempts, next_at_ms, last_error,"
    " created_at_ms, delivered_at_ms"
)


def _notification(r: Sequence[Any]) -> Notification:
    return Notification(str(r[0]), str(r[1]), str(r[2]), int(r[3]), str(r[4]), int(r[5]),
                        None if r[6] is None else int(r[6]), None if r[7] is None else str(r[7]),
                        int(r[8]), None if r[9] is None else int(r[9]))


def load_notification(conn: sqlite3.Connection, event_id: str) -> Notification | None:
    row = conn.execute(f"SELECT {_NOTIFICATION_COLUMNS} FROM merchant_notifications"
                       " WHERE event_id = ?", (event_id,)).fetchone()
    return None if row is None else _notification(row)


def notifications_of(conn: sqlite3.Connection, order_id: str) -> list[Notification]:
    rows = conn.execute(f"SELECT {_NOTIFICATION_COLUMNS} FROM merchant_notifications"
                        " WHERE order_id = ? ORDER BY seq", (order_id,)).fetchall()
    return [_notification(r) for r in rows]


def notification_counts(conn: sqlite3.Connection) -> dict[str, int]:
    counts = {status.value: 0 for status in NotificationStatus}
    for status, count in conn.execute("SELECT status, COUNT(*) FROM merchant_notifications"
                                      " GROUP BY status"):
        counts[str(status)] = int(count)
    return counts
