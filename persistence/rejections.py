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
from typing import TYPE_CHECKING

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


def record(store: Store, rejection: Rejection) -> None:
    """Record one rejection and count it; prune the oldest beyond ``REJECTIONS_KEPT_MAX``."""
    with store._tx() as conn:
        cursor = conn.execute(
            "INSERT INTO rejected_notifications (at_ms, channel, payment_serial, refund_id, "
            "source, reason, detail) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (rejection.at_ms, _clip(rejection.channel), _clip(rejection.payment_serial),
             None if rejection.refund_id is None else _clip(rejection.refund_id),
             rejection.source, _clip(rejection.reason), _clip(rejection.detail)))
        conn.execute("INSERT INTO rejection_counts (reason, count) VALUES (?, 1) "
                     "ON CONFLICT(reason) DO UPDATE SET count = count + 1",
                     (_clip(rejection.reason),))
        seq = cursor.lastrowid
        if seq is not None and seq > REJECTIONS_KEPT_MAX and seq % 1_000 == 0:
            conn.execute("DELETE FROM rejected_notifications WHERE seq <= ?",
                         (seq - REJECTIONS_KEPT_MAX,))


def recent(store: Store, limit: int = 100) -> list[Rejection]:
    """The newest rejections first, at most ``limit``."""
    with store._read(snapshot=False) as conn:
        rows = conn.execute(
            "SELECT at_ms, channel, payment_serial, refund_id, source, reason, detail "
            "FROM rejected_notifications ORDER BY seq DESC LIMIT ?", (limit,)).fetchall()
    return [Rejection(*row) for row in rows]


def counts(store: Store) -> dict[str, int]:
    """Rejections ever recorded, by reason."""
    with store._read(snapshot=False) as conn:
        rows = conn.execute("SELECT reason, count FROM rejection_counts").fetchall()
    return {reason: count for reason, count in rows}


def txn_owner(store: Store, channel: str, channel_txn_id: str) -> str | None:
    """The order this channel transaction belongs to: its cash leg, or its refunded second
    charge (``None``: no order knows it)."""
    with store._read() as conn:
        row = conn.execute(
            "SELECT order_id FROM legs WHERE channel = ? AND channel_txn_id = ? LIMIT 1",
            (channel, channel_txn_id)).fetchone()
        if row is None:
            row = conn.execute(
                "SELECT r.order_id FROM refunds r JOIN legs l ON l.order_id = r.order_id "
                "AND l.mode = 'cash' WHERE r.refund_no = ? AND l.channel = ? LIMIT 1",
                (SECOND_CHARGE_PREFIX + channel_txn_id, channel)).fetchone()
    return None if row is None else str(row[0])
