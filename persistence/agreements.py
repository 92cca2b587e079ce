"""Agreements and withholdings in SQLite (schema version 7).

Every change is one transaction that also journals it (``journal`` rows of kind
``agreement`` or ``withholding``), so the journal's ``seq`` orders an agreement's end, a
withholding's decisions and its attempts' orders against each other (the simulator's
oracle reads that). Runs on whichever thread calls (an API thread, the withholding
subscriber's lane); the functions use the store's own transaction helpers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import sqlite_utils

from payengine.engine.agreement import Agreement, AgreementState
from payengine.engine.order import Transition
from payengine.engine.withhold import Withholding, WithholdState

if TYPE_CHECKING:
    from payengine.persistence.store import Store


def create_schema(db: sqlite_utils.Database) -> None:
    """Create the tables and indexes if they do not exist (called under the store's lock)."""
    db.table("agreements").create(
        {"agreement_id": str, "user_id": str, "channel": str, "state": str, "cause": str,
         "created_at_ms": int, "updated_at_ms": int, "version": int},
        pk="agreement_id", not_null={"user_id", "channel", "state"}, if_not_exists=True)
    db.table("agreements").create_index(["user_id", "channel"], if_not_exists=True)
    db.table("withholdings").create(
        {"merchant_id": str, "merchant_order_no": str, "user_id": str, "amount_minor": int,
         "currency": str, "title": str, "agreement_ids": str, "attempts": str, "state": str,
         "cause": str, "created_at_ms": int, "updated_at_ms": int, "declined": str,
         "version": int},
        pk=("merchant_id", "merchant_order_no"), not_null={"state"}, if_not_exists=True)
    db.table("withholdings").create_index(["state"], if_not_exists=True)


_AGREEMENT_COLUMNS = ("agreement_id, user_id, channel, state, cause, created_at_ms, "
                      "updated_at_ms, version")


def _agreement(row: Sequence[Any]) -> Agreement:
    a_id, user, channel, state, cause, created, updated, version = row
    return Agreement(str(a_id), str(user), str(channel), AgreementState(state), str(cause),
                     int(created), int(updated), int(version))


def insert_agreement(store: Store, agreement: Agreement) -> None:
    with store._tx(2) as conn:
        conn.execute(f"INSERT INTO agreements ({_AGREEMENT_COLUMNS}) VALUES (?,?,?,?,?,?,?,?)",
                     (agreement.agreement_id, agreement.user_id, agreement.channel,
                      agreement.state.value, agreement.cause, agreement.created_at_ms,
                      agreement.updated_at_ms, agreement.version))
        store._journal(conn, agreement.updated_at_ms, "agreement", agreement.agreement_id,
                       [Transition("agreement", "", agreement.state.value, agreement.cause)])


def save_agreement(store: Store, before: Agreement, after: Agreement) -> bool:
    """Store ``after`` if the stored one is still ``before`` (its version); ``False`` if
    another change came first (the caller reads again and decides again)."""
    with store._tx(2) as conn:
        changed = conn.execute(
            "UPDATE agreements SET state = ?, cause = ?, updated_at_ms = ?, version = ?"
            " WHERE agreement_id = ? AND version = ?",
            (after.state.value, after.cause, after.updated_at_ms, after.version,
             after.agreement_id, before.version)).rowcount
        if changed:
            store._journal(conn, after.updated_at_ms, "agreement", after.agreement_id,
                           [Transition("agreement", before.state.value, after.state.value,
                                       after.cause)])
    return bool(changed)


def load_agreement(store: Store, agreement_id: str) -> Agreement | None:
    with store._read(snapshot=False) as conn:
        row = conn.execute(f"SELECT {_AGREEMENT_COLUMNS} FROM agreements WHERE agreement_id = ?",
                           (agreement_id,)).fetchone()
    return None if row is None else _agreement(row)


def agreements_of(store: Store, user_id: str, limit: int) -> list[Agreement]:
    """The user's agreements, oldest first, at most ``limit``."""
    with store._read(snapshot=False) as conn:
        rows = conn.execute(f"SELECT {_AGREEMENT_COLUMNS} FROM agreements WHERE user_id = ?"
                            " ORDER BY created_at_ms, rowid LIMIT ?",
                            (user_id, limit)).fetchall()
    return [_agreement(row) for row in rows]


_WITHHOLD_COLUMNS = ("merchant_id, merchant_order_no, user_id, amount_minor, currency, title, "
                     "agreement_ids, attempts, state, cause, created_at_ms, updated_at_ms, "
                     "declined, version")


def _withholding(row: Sequence[Any]) -> Withholding:
    (merchant, number, user, amount, currency, title, agreement_ids, attempts, state, cause,
     created, updated, declined, version) = row
    return Withholding(str(merchant), str(number), str(user), int(amount), str(currency),
                       str(title), tuple(json.loads(agreement_ids)),
                       tuple(json.loads(attempts)), WithholdState(state), str(cause),
                       int(created), int(updated), tuple(json.loads(declined)), int(version))


def _withholding_row(w: Withholding) -> tuple[object, ...]:
    return (w.merchant_id, w.merchant_order_no, w.user_id, w.amount_minor, w.currency,
            w.title, json.dumps(w.agreement_ids), json.dumps(w.attempts), w.state.value,
            w.cause, w.created_at_ms, w.updated_at_ms, json.dumps(w.declined), w.version)


def _journal_withholding(store: Store, conn: Any, w: Withholding, from_state: str) -> None:
    store._journal(conn, w.updated_at_ms, "withholding",
                   f"{w.merchant_id}/{w.merchant_order_no}",
                   [Transition(f"attempt:{w.attempt}", from_state, w.state.value,
                               f"{w.cause} (agreement {w.agreement_id})")])


def insert_withholding(store: Store, w: Withholding) -> Withholding | None:
    """Insert ``w``; or return the withholding that holds its key already."""
    with store._tx(3) as conn:
        row = conn.execute(f"SELECT {_WITHHOLD_COLUMNS} FROM withholdings WHERE merchant_id = ?"
                           " AND merchant_order_no = ?",
                           (w.merchant_id, w.merchant_order_no)).fetchone()
        if row is not None:
            return _withholding(row)
        conn.execute(f"INSERT INTO withholdings ({_WITHHOLD_COLUMNS}) VALUES "
                     f"({', '.join('?' * 14)})", _withholding_row(w))
        _journal_withholding(store, conn, w, "")
    return None


def delete_withholding(store: Store, w: Withholding, why: str) -> None:
    """Undo ``insert_withholding`` when its first attempt was refused: nothing was created
    (the journal keeps both lines, so the refusal is seen)."""
    with store._tx(2) as conn:
        conn.execute("DELETE FROM withholdings WHERE merchant_id = ? AND merchant_order_no = ?"
                     " AND version = 0", (w.merchant_id, w.merchant_order_no))
        store._journal(conn, w.updated_at_ms, "withholding",
                       f"{w.merchant_id}/{w.merchant_order_no}",
                       [Transition("attempt:1", w.state.value, "", f"refused: {why}")])


def save_withholding(store: Store, before: Withholding, after: Withholding) -> bool:
    """Store ``after`` if the stored one is still ``before``; ``False`` otherwise."""
    with store._tx(2) as conn:
        changed = conn.execute(
            "UPDATE withholdings SET attempts = ?, state = ?, cause = ?, updated_at_ms = ?,"
            " declined = ?, version = ? WHERE merchant_id = ? AND merchant_order_no = ?"
            " AND version = ?",
            (json.dumps(after.attempts), after.state.value, after.cause, after.updated_at_ms,
             json.dumps(after.declined), after.version, after.merchant_id,
             after.merchant_order_no, before.version)).rowcount
        if changed:
            _journal_withholding(store, conn, after, before.state.value)
    return bool(changed)


def load_withholding(store: Store, merchant_id: str, merchant_order_no: str
                     ) -> Withholding | None:
    with store._read(snapshot=False) as conn:
        row = conn.execute(f"SELECT {_WITHHOLD_COLUMNS} FROM withholdings WHERE merchant_id = ?"
                           " AND merchant_order_no = ?",
                           (merchant_id, merchant_order_no)).fetchone()
    return None if row is None else _withholding(row)


def open_withholdings(store: Store, limit: int) -> list[Withholding]:
    """Withholdings still paying, oldest first, at most ``limit``."""
    with store._read(snapshot=False) as conn:
        rows = conn.execute(f"SELECT {_WITHHOLD_COLUMNS} FROM withholdings WHERE state = ?"
                            " ORDER BY created_at_ms LIMIT ?",
                            (WithholdState.PAYING.value, limit)).fetchall()
    return [_withholding(row) for row in rows]


def count_open_withholdings(store: Store) -> int:
    with store._read(snapshot=False) as conn:
        row = conn.execute("SELECT COUNT(*) FROM withholdings WHERE state = ?",
                           (WithholdState.PAYING.value,)).fetchone()
    return int(row[0])


def all_withholdings(store: Store, limit: int = 1_000_000) -> list[Withholding]:
    """Every withholding (for reports and the simulator's oracle), at most ``limit``."""
    with store._read(snapshot=False) as conn:
        rows = conn.execute(f"SELECT {_WITHHOLD_COLUMNS} FROM withholdings"
                            " ORDER BY created_at_ms LIMIT ?", (limit,)).fetchall()
    return [_withholding(row) for row in rows]
