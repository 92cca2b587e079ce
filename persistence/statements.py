"""Imported channel statement lines, so importing the same statement twice changes nothing.

Owned by the reconciliation work (issue 4 item 1). ``Store`` calls ``create_schema`` when
it opens. Three tables:

- ``statement_lines``: every line ever imported, unique by (channel, channel_txn_id, status,
  refund_id), with its verdict. A line is written only after the order it was fed to
  committed, so a crash mid-import re-feeds it next time (feeding is idempotent). A line the
  engine could not act on is written with ``final = 0``: it names its serial (so the order is
  not taken for absent from the statement) but the next import tries it again.
- ``statement_conflicts``: lines whose key was imported before with another serial or
  amount. Kept apart (the first word stands), but they too name their serial.
- ``statement_imports``: one row per import: the file's digest, its period and the counts.

The functions take the ``Store`` and use its transaction helpers, so they share its lock,
its connection discipline and its crash hook.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import sqlite_utils

from payengine.engine.order import LegMode, LegStatus, OrderState
from payengine.engine.statement import CHARGED_STATUSES, LineStatus, StatementLine

if TYPE_CHECKING:
    from payengine.persistence.store import Store

LineKey = tuple[str, str, str, str]
"""(channel, channel_txn_id, status, refund_id or "")."""


def create_schema(db: sqlite_utils.Database) -> None:
    """Create the statement tables if they do not exist (called under the store's lock)."""
    line_columns = {
        "channel": str, "channel_txn_id": str, "status": str, "refund_id": str,
        "out_trade_no": str, "amount_minor": int, "currency": str, "time_ms": int,
        "order_id": str, "verdict": str, "detail": str, "final": int, "import_id": int,
        "recorded_at_ms": int,
    }
    db.table("statement_lines").create(
        line_columns, pk=("channel", "channel_txn_id", "status", "refund_id"),
        not_null={"out_trade_no", "amount_minor", "currency", "verdict", "final"},
        if_not_exists=True,
    )
    db.table("statement_lines").create_index(["channel", "out_trade_no", "status"],
                                             if_not_exists=True)
    db.table("statement_conflicts").create(
        {"conflict_id": int, **line_columns}, pk="conflict_id", if_not_exists=True)
    db.table("statement_conflicts").create_index(["channel", "out_trade_no", "status"],
                                                 if_not_exists=True)
    db.table("statement_imports").create(
        {"import_id": int, "digest": str, "source": str, "lines": int, "period_start_ms": int,
         "period_end_ms": int, "started_at_ms": int, "finished_at_ms": int, "counts": str},
        pk="import_id", if_not_exists=True,
    )
    # The search for orders absent from a statement ranges over creation time.
    db.table("payment_orders").create_index(["created_at_ms", "order_id"], if_not_exists=True)


@dataclass(frozen=True, slots=True)
class RecordedLine:
    """A line as it is written: what it said, which order it was for, what it was found to be."""

    line: StatementLine
    order_id: str | None
    verdict: str
    detail: str
    final: bool


@dataclass(frozen=True, slots=True)
class PreviousLine:
    """A line imported before under the same key."""

    content: tuple[str, int, str]
    """(out_trade_no, amount_minor, currency), as ``StatementLine.content``."""
    verdict: str
    final: bool
    import_id: int


@dataclass(frozen=True, slots=True)
class ImportRecord:
    import_id: int
    digest: str
    source: str
    lines: int
    period_start_ms: int | None
    period_end_ms: int | None
    started_at_ms: int
    finished_at_ms: int | None
    counts: dict[str, int]


def begin_import(store: Store, *, digest: str, source: str, lines: int,
                 period: tuple[int, int] | None, now_ms: int) -> int:
    """Record that an import starts; returns its id. An import that never finishes (a crash)
    keeps ``finished_at_ms`` NULL, which is how it is told from a complete one."""
    start, end = period if period is not None else (None, None)
    with store._tx() as conn:
        cur = conn.execute(
            "INSERT INTO statement_imports (digest, source, lines, period_start_ms, period_end_ms,"
            " started_at_ms) VALUES (?, ?, ?, ?, ?, ?)",
            (digest, source, lines, start, end, now_ms))
        import_id = cur.lastrowid
    assert import_id is not None
    return import_id


def finish_import(store: Store, import_id: int, counts: Mapping[str, int], now_ms: int) -> None:
    with store._tx() as conn:
        conn.execute("UPDATE statement_imports SET finished_at_ms = ?, counts = ?"
                     " WHERE import_id = ?",
                     (now_ms, json.dumps(dict(counts), sort_keys=True), import_id))


def previous_lines(store: Store, keys: Iterable[LineKey]) -> dict[LineKey, PreviousLine]:
    """The lines among ``keys`` imported before (one read snapshot for a batch)."""
    found: dict[LineKey, PreviousLine] = {}
    with store._read() as conn:
        for key in dict.fromkeys(keys):
            row = conn.execute(
                "SELECT out_trade_no, amount_minor, currency, verdict, final, import_id"
                " FROM statement_lines WHERE channel = ? AND channel_txn_id = ? AND status = ?"
                " AND refund_id = ?", key).fetchone()
            if row is not None:
                found[key] = PreviousLine((str(row[0]), int(row[1]), str(row[2])), str(row[3]),
                                          bool(row[4]), int(row[5]))
    return found


def _line_row(import_id: int, rec: RecordedLine, now_ms: int) -> tuple[object, ...]:
    line = rec.line
    return (line.channel, line.channel_txn_id, line.status.value, line.refund_id or "",
            line.out_trade_no, line.amount_minor, line.currency, line.time_ms, rec.order_id,
            rec.verdict, rec.detail, int(rec.final), import_id, now_ms)


_LINE_COLUMNS = ("channel, channel_txn_id, status, refund_id, out_trade_no, amount_minor,"
                 " currency, time_ms, order_id, verdict, detail, final, import_id, recorded_at_ms")


def record_lines(store: Store, import_id: int, rows: Sequence[RecordedLine], now_ms: int) -> None:
    """Write a batch of processed lines in one commit. A line already written with
    ``final = 0`` is overwritten by its retry; a final one is never overwritten."""
    if not rows:
        return
    with store._tx() as conn:
        conn.executemany(
            f"INSERT INTO statement_lines ({_LINE_COLUMNS}) VALUES ({','.join('?' * 14)})"
            " ON CONFLICT (channel, channel_txn_id, status, refund_id) DO UPDATE SET"
            " order_id = excluded.order_id, verdict = excluded.verdict,"
            " detail = excluded.detail, final = excluded.final, import_id = excluded.import_id,"
            " recorded_at_ms = excluded.recorded_at_ms WHERE statement_lines.final = 0",
            [_line_row(import_id, rec, now_ms) for rec in rows])


def record_conflicts(store: Store, import_id: int, rows: Sequence[RecordedLine],
                     now_ms: int) -> None:
    if not rows:
        return
    with store._tx() as conn:
        conn.executemany(
            f"INSERT INTO statement_conflicts ({_LINE_COLUMNS}) VALUES ({','.join('?' * 14)})",
            [_line_row(import_id, rec, now_ms) for rec in rows])


_CANDIDATE_STATUSES = tuple(s.value for s in (*sorted(CHARGED_STATUSES), LegStatus.UNKNOWN))

_ABSENT_ORDERS = f"""
SELECT o.order_id, o.created_at_ms,
       EXISTS (SELECT 1 FROM statement_lines s
               WHERE s.channel = l.channel AND s.out_trade_no = o.payment_serial)
       OR EXISTS (SELECT 1 FROM statement_conflicts c
                  WHERE c.channel = l.channel AND c.out_trade_no = o.payment_serial)
FROM payment_orders o JOIN legs l ON l.order_id = o.order_id AND l.mode = '{LegMode.CASH.value}'
WHERE l.channel = ? AND o.created_at_ms BETWEEN ? AND ?
  AND (o.created_at_ms > ? OR (o.created_at_ms = ? AND o.order_id > ?))
  AND (l.status IN ({",".join("?" * len(_CANDIDATE_STATUSES))})
       OR (o.state = '{OrderState.NEEDS_RECONCILIATION.value}'
           AND l.status = '{LegStatus.PAYING.value}'))
  AND NOT EXISTS (SELECT 1 FROM statement_lines s WHERE s.channel = l.channel
                  AND s.out_trade_no = o.payment_serial AND s.status = '{LineStatus.SUCCESS.value}')
  AND NOT EXISTS (SELECT 1 FROM statement_conflicts c WHERE c.channel = l.channel
                  AND c.out_trade_no = o.payment_serial AND c.status = '{LineStatus.SUCCESS.value}')
ORDER BY o.created_at_ms, o.order_id
LIMIT ?
"""


def iter_absent_orders(store: Store, channel: str, start_ms: int, end_ms: int,
                       batch_size: int = 500) -> Iterator[tuple[str, bool]]:
    """Orders paid through ``channel``, created in [start_ms, end_ms], whose charge no
    imported line names, and whose cash leg says that matters: the engine believes in a
    charge, or does not know (awaiting reconciliation, or closed with the charge unknown).

    Yields (order_id, some other line such as a refund names its serial), in batches of
    ``batch_size`` read in separate snapshots, so memory stays bounded however many orders
    the period holds, and orders changed by the caller in between are simply not seen again.
    """
    after: tuple[int, str] = (start_ms - 1, "")
    while True:
        with store._read() as conn:
            rows = conn.execute(_ABSENT_ORDERS, (channel, start_ms, end_ms, after[0], after[0],
                                                 after[1], *_CANDIDATE_STATUSES,
                                                 batch_size)).fetchall()
        for order_id, _, any_line in rows:
            yield str(order_id), bool(any_line)
        if len(rows) < batch_size:
            return
        after = (int(rows[-1][1]), str(rows[-1][0]))


_REFUNDS_AWAITING = f"""
SELECT o.order_id, o.created_at_ms FROM payment_orders o
JOIN legs l ON l.order_id = o.order_id AND l.mode = '{LegMode.CASH.value}'
WHERE l.channel = ? AND o.created_at_ms BETWEEN ? AND ?
  AND (o.created_at_ms > ? OR (o.created_at_ms = ? AND o.order_id > ?))
  AND (l.status = '{LegStatus.REFUND_UNKNOWN.value}'
       OR EXISTS (SELECT 1 FROM refunds r WHERE r.order_id = o.order_id AND r.status = 'unknown'))
ORDER BY o.created_at_ms, o.order_id
LIMIT ?
"""


def iter_orders_with_unknown_refunds(store: Store, channel: str, start_ms: int, end_ms: int,
                                     batch_size: int = 500) -> Iterator[str]:
    """Orders paid through ``channel``, created in [start_ms, end_ms], with a refund whose
    outcome the engine never learnt (a cash leg ``refund_unknown`` or a refund ``unknown``),
    in keyset batches like ``iter_absent_orders``."""
    after: tuple[int, str] = (start_ms - 1, "")
    while True:
        with store._read() as conn:
            rows = conn.execute(_REFUNDS_AWAITING, (channel, start_ms, end_ms, after[0],
                                                    after[0], after[1], batch_size)).fetchall()
        for order_id, _ in rows:
            yield str(order_id)
        if len(rows) < batch_size:
            return
        after = (int(rows[-1][1]), str(rows[-1][0]))


def refund_on_statement(store: Store, channel: str, refund_id: str) -> bool:
    """Whether any imported statement line (or conflicting line) names this refund."""
    with store._read() as conn:
        row = conn.execute(
            "SELECT 1 FROM statement_lines WHERE channel = ? AND refund_id = ?"
            " UNION ALL SELECT 1 FROM statement_conflicts WHERE channel = ? AND refund_id = ?"
            " LIMIT 1", (channel, refund_id, channel, refund_id)).fetchone()
    return row is not None


def imports(store: Store) -> list[ImportRecord]:
    """Every import, oldest first (for reports and tests; one row per run, so few)."""
    with store._read() as conn:
        rows = conn.execute(
            "SELECT import_id, digest, source, lines, period_start_ms, period_end_ms,"
            " started_at_ms, finished_at_ms, counts FROM statement_imports ORDER BY import_id"
        ).fetchall()
    return [ImportRecord(int(r[0]), str(r[1]), str(r[2]), int(r[3]),
                         None if r[4] is None else int(r[4]), None if r[5] is None else int(r[5]),
                         int(r[6]), None if r[7] is None else int(r[7]),
                         json.loads(r[8]) if r[8] else {}) for r in rows]


def line_verdicts(store: Store, channel: str, out_trade_no: str) -> list[tuple[str, str, bool]]:
    """(status, verdict, final) of every imported line naming a serial (inspection, tests)."""
    with store._read() as conn:
        rows = conn.execute(
            "SELECT status, verdict, final FROM statement_lines WHERE channel = ?"
            " AND out_trade_no = ? ORDER BY status, channel_txn_id", (channel, out_trade_no)
        ).fetchall()
    return [(str(r[0]), str(r[1]), bool(r[2])) for r in rows]
