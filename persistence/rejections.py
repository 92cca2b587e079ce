"""Rejected channel notifications, and who owns a channel transaction id.

Every notification (or statement line) the engine refused to believe is recorded here with
its reason, so an operator sees forgery attempts and misrouted callbacks, and the counts
can be monitored (``Engine.rejected_notifications``, ``Engine.rejection_counts``). The table
is bounded: past ``REJECTIONS_KEPT_MAX`` rows the oldest go, the counts by reason stay
exact in ``rejection_counts``.

A channel transaction id belongs to one payment only: ``txn_owner`` finds the order that a
cash leg (or a refunded second charge) already binds it to.

The functions take the ``Store`` and use its transaction helpers (its lock, connection
discipline and crash hook), as ``persistence.statements`` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlite_utils

from payengine.engine.order import SECOND_CHARGE_PREFIX

if TYPE_CHECKING:
    from payengine.persistence.store import Store

REJECTIONS_KEPT_MAX = 100_000
"""Rejected notifications kept in detail; older ones are deleted (their counts are kept)."""

TEXT_MAX = 512
"""Longest detail or field stored for a rejection: a forger chooses what is in it."""


def create_schema(db: sqlite_utils.Database) -> None:
    """Create the tables and indexes if they do not exist (called under the store's lock)."""
    db.table("rejected_notifications").create(
        {"seq": int, "at_ms": int, "channel": str, "payment_serial": str, "refund_id": str,
         "source": str, "reason": str, "detail": str},
        pk="seq", not_null={"reason"}, if_not_exists=True,
    )
    db.table("rejection_counts").create({"reason": str, "count": int}, pk="reason",
                                        if_not_exists=True)
    db.table("legs").create_index(["channel", "channel_txn_id"], if_not_exists=True)
    db.table("refunds").create_index(["refund_no"], if_not_exists=True)


@dataclass(frozen=True, slots=True)
class Rejection:
    """One notification the engine refused to believe, and why."""

    at_ms: int
    channel: str
    payment_serial: str
    refund_id: str | None
    source: str
    """``notification`` (signed, raw), ``callback`` (parsed) or ``statement``."""
    reason: str
    """``bad_signature``, ``wrong_channel``, ``wrong_currency``, ``wrong_amount``,
    ``foreign_transaction``, ``unknown_refund``, ``unknown_order``, ``malformed``,
    ``unverified``."""
    detail: str


def _clip(value: object) -> str:
    """A bounded, storable text of whatever the notification carried (lone surrogates too)."""
    text = value if isinstance(value, str) else repr(value)
    return text[:TEXT_MAX].encode("utf-8", "backslashreplace").decode("utf-8")


def append_refusal(store: Store, table: str, counts_table: str, fields: dict[str, object],
                   kept_max: int) -> None:
    """Append one refusal to ``table`` (its text fields clipped) and count its ``reason`` in
    ``counts_table``, in one change; past ``kept_max`` rows the oldest go (every 1,000th
    insert prunes), the counts stay exact. Shared by the notification and request logs."""
    columns = ", ".join(fields)
    values = [v if v is None or isinstance(v, int) else _clip(v) for v in fields.values()]
    with store._tx(3) as conn:
        cursor = conn.execute(
            f"INSERT INTO {table} ({columns}) VALUES ({', '.join('?' * len(fields))})", values)
        conn.execute(f"INSERT INTO {counts_table} (reason, count) VALUES (?, 1)"
                     " ON CONFLICT (reason) DO UPDATE SET count = count + 1",
                     (_clip(fields["reason"]),))
        seq = cursor.lastrowid
        if seq is not None and seq > kept_max and seq % 1_000 == 0:
            conn.execute(f"DELETE FROM {table} WHERE seq <= ?", (seq - kept_max,))


def newest_refusals(store: Store, table: str, columns: str, limit: int) -> list[Any]:
    """The newest rows of a refusal log first, at most ``limit``."""
    with store._read(snapshot=False) as conn:
        return conn.execute(f"SELECT {columns} FROM {table} ORDER BY seq DESC LIMIT ?",
                            (limit,)).fetchall()


def refusal_counts(store: Store, counts_table: str) -> dict[str, int]:
    """Refusals ever recorded in a log, by reason."""
    with store._read(snapshot=False) as conn:
        rows = conn.execute(f"SELECT reason, count FROM {counts_table}").fetchall()
    return {str(reason): int(count) for reason, count in rows}


_COLUMNS = "at_ms, channel, payment_serial, refund_id, source, reason, detail"


def record(store: Store, rejection: Rejection) -> None:
    """Record one rejection and count it; prune the oldest beyond ``REJECTIONS_KEPT_MAX``."""
    append_refusal(store, "rejected_notifications", "rejection_counts", {
        "at_ms": rejection.at_ms, "channel": rejection.channel,
        "payment_serial": rejection.payment_serial, "refund_id": rejection.refund_id,
        "source": rejection.source, "reason": rejection.reason, "detail": rejection.detail,
    }, REJECTIONS_KEPT_MAX)


def recent(store: Store, limit: int = 100) -> list[Rejection]:
    """The newest rejections first, at most ``limit``."""
    return [Rejection(*row) for row in newest_refusals(store, "rejected_notifications",
                                                         _COLUMNS, limit)]


def counts(store: Store) -> dict[str, int]:
    """Rejections ever recorded, by reason."""
    return refusal_counts(store, "rejection_counts")


def txn_owner(store: Store, channel: str, channel_txn_id: str) -> str | None:
    """The order this channel transaction belongs to: its cash leg, or its refunded second
    charge or late charge on a route it left (``None``: no order knows it)."""
    with store._read() as conn:
        row = conn.execute(
            "SELECT order_id FROM legs WHERE channel = ? AND channel_txn_id = ? LIMIT 1",
            (channel, channel_txn_id)).fetchone()
        if row is None:
            row = conn.execute(
                "SELECT r.order_id FROM refunds r JOIN legs l ON l.order_id = r.order_id "
                "AND l.mode = 'cash' WHERE r.refund_no = ?"
                " AND COALESCE(r.channel, l.channel) = ? LIMIT 1",  # a left route's: its own
                (SECOND_CHARGE_PREFIX + channel_txn_id, channel)).fetchone()
    return None if row is None else str(row[0])
