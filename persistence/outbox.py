"""The durable outbox: every order state change, refund change and hold expiry, written in
the transaction of the change.

``Store`` calls ``create_schema`` when it opens, ``record_order_events`` inside the
transaction that writes an order and ``record_hold_events`` inside the one that writes a
voucher account, so an event exists if and only if its change was committed (the
transactional outbox pattern: no change without its message, no message without its
change). Everything else here is the delivery bookkeeping the notifier
(``actors.notifier``) keeps next to the events, in the same database:

- ``outbox``: one row per event: an order-level transition, a refund's status change (a
  merchant refund, the refund of a success the order could not keep, a second charge's
  refund), a hold's expiry. ``seq`` (the rowid) grows in commit order:
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
import json
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlite_utils

from payengine.engine.discounts import PricedSale, priced_sale_from_json, priced_sale_json
from payengine.engine.order import (
    Leg,
    LegStatus,
    OrderState,
    PaymentOrder,
    RefundStatus,
    Transition,
)

MERCHANTS = "~merchants"
"""Cursor of the merchant dispatcher. Subscriber names may not start with ``~``."""

ORDER_STATE_CHANGED = "order.state_changed"
"""``event_type`` of an order's state change: ``from_state``/``to_state`` are order states."""
REFUND_STATE_CHANGED = "refund.state_changed"
"""``event_type`` of a refund's status change: ``from_state``/``to_state`` are refund statuses
(``"" -> refunding`` when it is created; then ``succeeded``, ``failed`` or ``unknown``)."""
HOLD_STATE_CHANGED = "hold.state_changed"
"""``event_type`` of a voucher hold's change: ``pending -> expired`` (the voucher is available
to its owner again)."""
EVENT_TYPES = (ORDER_STATE_CHANGED, REFUND_STATE_CHANGED, HOLD_STATE_CHANGED)

LEG_REFUND_KIND = "error_refund"
"""``refund_kind`` of the refund an order makes of its own cash leg (差错退款): a success that
came after the close or a failure, or a payment whose post-deduct vouchers fell short. The
other kinds are ``engine.order.RefundKind``'s: ``merchant``, ``duplicate_charge``."""

_LEG_REFUND_STATUS = {
    LegStatus.REFUNDING.value: RefundStatus.REFUNDING.value,
    LegStatus.REFUNDED.value: RefundStatus.SUCCEEDED.value,
    LegStatus.REFUND_FAILED.value: RefundStatus.FAILED.value,
    LegStatus.REFUND_UNKNOWN.value: RefundStatus.UNKNOWN.value,
}
"""A cash leg's refund statuses, as the refund statuses they are in events."""


def filter_key(event_type: str, to_state: str) -> str:
    """What a merchant's ``states`` filter matches an event by: the order state for an order
    event, ``refund_<status>`` for a refund event, ``hold_<status>`` for a hold event."""
    if event_type == REFUND_STATE_CHANGED:
        return f"refund_{to_state}"
    if event_type == HOLD_STATE_CHANGED:
        return f"hold_{to_state}"
    return to_state


FILTER_KEYS = (
    *(state.value for state in OrderState),
    *(filter_key(REFUND_STATE_CHANGED, status.value) for status in RefundStatus),
    filter_key(HOLD_STATE_CHANGED, "expired"),
)
"""Every value a merchant's ``states`` may name."""


class NotificationStatus(enum.StrEnum):
    PENDING = "pending"
    """Not yet answered with 2xx and ``SUCCESS``; ``next_at_ms`` says when it is tried next."""
    DELIVERED = "delivered"
    """The merchant answered 2xx with the body ``SUCCESS``. Final."""
    GIVEN_UP = "given_up"
    """Every attempt of the schedule failed (or the merchant was unregistered). Final."""


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    """One change, as published to subscribers and merchants; ``event_type`` says what kind.

    ``event_id`` is stable and unique: deduplicate on it, since delivery is at least once.
    Order and refund events of one commit are ``"{order_id}:{order_version}:{index}"`` (the
    order's version after the commit; the order's own transitions first, then its refunds');
    a hold's expiry is ``"hold:{account_id}:{account_version}:{index}"``.
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
    event_type: str = ORDER_STATE_CHANGED
    """``order.state_changed``, ``refund.state_changed`` or ``hold.state_changed``: what
    ``from_state`` and ``to_state`` are the states of."""
    user_id: str | None = None
    """The order's user (whom to tell); ``None`` for a hold no order adopted."""
    refund_id: str | None = None
    """Refund events: the refund's id (the channel knows its cash part by it)."""
    refund_no: str | None = None
    """Refund events: the merchant's refund number, ``charge:<txn>`` for a second charge,
    ``None`` for an ``error_refund``."""
    refund_kind: str | None = None
    """Refund events: ``merchant``, ``duplicate_charge`` or ``error_refund``."""
    account_id: str | None = None
    """Hold events: the voucher account."""
    hold_id: str | None = None
    """Hold events: the hold."""
    amount: int | None = None
    """Refund events: the refund's amount in minor units of ``currency``; hold events: the
    hold's amount in ``unit``."""
    unit: str | None = None
    """The unit of ``amount``: the order's currency, or the voucher account's unit."""
    sale: PricedSale | None = None
    """Order and refund events of an order with a ``FuelSale``: what was sold, where (station,
    pump, nozzle, grade, litres, cashier, shift) and the discounts it was charged."""
    split: tuple[tuple[str, int], ...] = ()
    """Order and refund events: how the order is paid, ``(method, minor)`` per part:
    ``cash:<channel>`` and ``voucher:<account_id>`` (vouchers at their value)."""
    refund_split: tuple[tuple[str, int], ...] = ()
    """Refund events: how this refund gives back, ``(method, minor)`` per part it has, in
    ``split``'s names (what an invoice reverses, what membership takes back); ``()`` for
    order and hold events."""

    def payload(self) -> dict[str, Any]:
        """The event as a JSON-ready mapping (what a merchant notification carries)."""
        return {
            "event_id": self.event_id, "event_type": self.event_type, "seq": self.seq,
            "order_id": self.order_id, "order_version": self.order_version,
            "merchant_id": self.merchant_id, "merchant_order_no": self.merchant_order_no,
            "payment_serial": self.payment_serial, "from_state": self.from_state,
            "to_state": self.to_state, "cause": self.cause, "total_minor": self.total_minor,
            "currency": self.currency, "at_ms": self.at_ms, "user_id": self.user_id,
            "refund_id": self.refund_id, "refund_no": self.refund_no,
            "refund_kind": self.refund_kind, "account_id": self.account_id,
            "hold_id": self.hold_id, "amount": self.amount, "unit": self.unit,
            "sale": priced_sale_json(self.sale), "split": [list(part) for part in self.split],
            "refund_split": [list(part) for part in self.refund_split],
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
    """What the merchant is notified of (``filter_key``: order states, ``refund_<status>``,
    ``hold_expired``); empty means every event."""
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
         "currency": str, "at_ms": int, **_EXTRA_COLUMNS},
        pk="seq", not_null={"event_id", "order_id", "order_version", "merchant_id", "at_ms"},
        if_not_exists=True,
    )
    outbox = db.table("outbox")
    missing = [name for name in _EXTRA_COLUMNS if name not in outbox.columns_dict]
    for name in missing:  # a database from before refund and hold events
        outbox.add_column(name, _EXTRA_COLUMNS[name])
    if missing:
        db.execute("UPDATE outbox SET event_type = ? WHERE event_type IS NULL",
                   [ORDER_STATE_CHANGED])
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

_EXTRA_COLUMNS: dict[str, type] = {
    "event_type": str, "user_id": str, "refund_id": str, "refund_no": str, "refund_kind": str,
    "account_id": str, "hold_id": str, "amount": int, "unit": str, "sale": str, "split": str,
    "refund_split": str,
}
"""Columns added with refund and hold events, then with sales and splits, then with refund
splits (``OutboxEvent``'s fields after ``at_ms``)."""

_EVENT_COLUMNS = (
    "seq, event_id, order_id, order_version, merchant_id, merchant_order_no, payment_serial,"
    " from_state, to_state, cause, total_minor, currency, at_ms, " + ", ".join(_EXTRA_COLUMNS)
)
_INSERT_EVENT = (
    "INSERT INTO outbox (event_id, order_id, order_version, merchant_id, merchant_order_no,"
    " payment_serial, from_state, to_state, cause, total_minor, currency, at_ms, "
    + ", ".join(_EXTRA_COLUMNS) + ") VALUES (" + ", ".join("?" * (12 + len(_EXTRA_COLUMNS)))
    + ")"
)


def record_order_events(conn: sqlite3.Connection, order: PaymentOrder,
                        transitions: Sequence[Transition], now_ms: int) -> None:
    """Append the events of one commit of ``order`` (inside the caller's transaction).

    One per order-level transition, then one per refund status change: a refund's own
    (``refund:<id>``; its parts' changes are not events) or the cash leg's refund (the leg's
    ``refunding``, ``refunded``, ``refund_failed``, ``refund_unknown``). Other leg changes
    are not events (they are in the journal). Runs on the thread of whoever commits the
    order (an order actor, or the API thread of a submit).
    """
    rows: list[tuple[object, ...]] = []
    described: list[str | None] = []  # the sale and the split, made once per commit

    def add(t: Transition, from_state: str, to_state: str, event_type: str,
            refund: tuple[str | None, str | None, str | None, int | None],
            refund_split: str | None = None) -> None:
        refund_id, refund_no, kind, amount = refund
        if not described:
            described.extend(_describe(order))
        rows.append((f"{order.order_id}:{order.version}:{len(rows)}", order.order_id,
                     order.version, order.merchant_id, order.merchant_order_no,
                     order.payment_serial, from_state, to_state, t.cause,
                     order.total_minor, order.currency, now_ms, event_type, order.user_id,
                     refund_id, refund_no, kind, None, None, amount,
                     None if amount is None else order.currency, *described, refund_split))

    for t in transitions:
        if t.entity == "order":
            add(t, t.from_state, t.to_state, ORDER_STATE_CHANGED, (None, None, None, None))
    cash = order.cash_leg
    for t in transitions:
        if t.from_state == t.to_state:
            continue
        if t.entity.startswith("refund:") and t.entity.count(":") == 1:
            refund = order.refund(refund_id=t.entity[len("refund:"):])
            assert refund is not None, t
            add(t, t.from_state, t.to_state, REFUND_STATE_CHANGED,
                (refund.refund_id, refund.refund_no, refund.kind.value, refund.amount_minor),
                _json([[_method(order.leg(p.leg_no)), p.value_minor] for p in refund.parts]))
        elif cash is not None and t.entity == f"leg:{cash.leg_no}" and (
            t.to_state in _LEG_REFUND_STATUS
        ):
            assert cash.refund_id is not None, t
            add(t, _LEG_REFUND_STATUS.get(t.from_state, ""), _LEG_REFUND_STATUS[t.to_state],
                REFUND_STATE_CHANGED, (cash.refund_id, None, LEG_REFUND_KIND, cash.amount),
                _json([[_method(cash), cash.amount]]))
    if rows:
        conn.executemany(_INSERT_EVENT, rows)


def _describe(order: PaymentOrder) -> tuple[str | None, str]:
    """The order's sale and split as stored with its events (JSON texts)."""
    sale = priced_sale_json(order.sale)
    split = [[_method(leg), leg.value_minor] for leg in order.legs if leg.pays]  # not a
    return None if sale is None else _json(sale), _json(split)  # beneficiary's leg


def _method(leg: Leg) -> str:
    """A leg's name in ``split`` and ``refund_split``."""
    return f"cash:{leg.channel}" if leg.is_cash else f"voucher:{leg.account_id}"


def _json(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class HoldChange:
    """A hold's change that is an event (its expiry), with what the event tells of it."""

    account_id: str
    hold_id: str
    amount: int
    unit: str
    order_id: str | None
    from_state: str
    to_state: str
    cause: str


def record_hold_events(conn: sqlite3.Connection, account_version: int,
                       changes: Sequence[HoldChange], now_ms: int) -> None:
    """Append one event per hold change (inside the transaction that writes the account).

    A hold its order adopted belongs to that order's merchant (and is notified to it); a
    user's pre-hold no order adopted has no merchant: in-process subscribers only.
    """
    rows: list[tuple[object, ...]] = []
    for change in changes:
        order = None if change.order_id is None else conn.execute(
            "SELECT order_id, version, merchant_id, merchant_order_no, payment_serial,"
            " total_minor, currency, user_id FROM payment_orders WHERE order_id = ?",
            (change.order_id,)).fetchone()
        if order is None:
            order = ("", 0, "", "", "", 0, "", None)
        order_id, version, merchant_id, merchant_order_no, serial, total, currency, user = order
        rows.append((f"hold:{change.account_id}:{account_version}:{len(rows)}", order_id,
                     version, merchant_id, merchant_order_no, serial, change.from_state,
                     change.to_state, change.cause, total, currency, now_ms,
                     HOLD_STATE_CHANGED, user, None, None, None, change.account_id,
                     change.hold_id, change.amount, change.unit, None, None, None))
    if rows:
        conn.executemany(_INSERT_EVENT, rows)


# ---------------------------------------------------------------------- reading events


def _event(row: Sequence[Any]) -> OutboxEvent:
    (seq, event_id, order_id, version, merchant_id, merchant_order_no, serial, from_state,
     to_state, cause, total, currency, at_ms, event_type, user_id, refund_id, refund_no,
     refund_kind, account_id, hold_id, amount, unit, sale, split, refund_split) = row

    def text(value: Any) -> str | None:
        return None if value is None else str(value)

    return OutboxEvent(int(seq), str(event_id), str(order_id), int(version), str(merchant_id),
                       str(merchant_order_no), str(serial), str(from_state), str(to_state),
                       str(cause), int(total), str(currency), int(at_ms),
                       str(event_type or ORDER_STATE_CHANGED), text(user_id), text(refund_id),
                       text(refund_no), text(refund_kind), text(account_id), text(hold_id),
                       None if amount is None else int(amount), text(unit),
                       None if sale is None else priced_sale_from_json(json.loads(sale)),
                       _parts(split), _parts(refund_split))


def _parts(text: str | None) -> tuple[tuple[str, int], ...]:
    """A stored split (JSON ``[[method, minor], ...]``; ``None``: none) as pairs."""
    if text is None:
        return ()
    return tuple((str(method), int(minor)) for method, minor in json.loads(text))


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


def dead_letter_counts(conn: sqlite3.Connection) -> dict[str, int]:
    """Dead letters by consumer (one row per consumer that has any)."""
    rows = conn.execute("SELECT consumer, COUNT(*) FROM outbox_dead_letters GROUP BY consumer"
                        " ORDER BY consumer").fetchall()
    return {str(consumer): int(n) for consumer, n in rows}


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
    ``from_seq`` whose ``filter_key`` is in their ``states`` get a notification, due at
    once. An event with no merchant (a user's pre-hold expiring) is never notified. Returns True if
    ``limit`` was reached (more may follow: call again).
    """
    cursor = load_cursor(conn, MERCHANTS)
    rows = conn.execute(
        "SELECT o.seq, o.event_id, o.merchant_id, o.order_id, o.to_state, m.states,"
        " o.event_type FROM outbox o JOIN merchant_endpoints m ON m.merchant_id = o.merchant_id"
        " WHERE o.seq > ? AND o.seq > m.from_seq ORDER BY o.seq LIMIT ?",
        (cursor.seq, limit)).fetchall()
    full = len(rows) >= limit
    end = int(rows[-1][0]) if full else last_seq(conn)
    wanted = [(r[1], r[0], r[2], r[3], NotificationStatus.PENDING.value, now_ms, now_ms, now_ms)
              for r in rows if not r[5] or filter_key(str(r[6] or ORDER_STATE_CHANGED),
                                                      str(r[4])) in str(r[5]).split(",")]
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
