"""Quote snapshots (``engine.discounts.Quote``): stored when made, read when a submit names one.

A quote must outlive a crash of the station server between "the user saw 187.43" and "the
user pressed pay", so it is durable before ``Engine.quote`` returns it. It is also the one
thing a terminal can make without paying, so the table is bounded: an expired quote is
useless and is deleted first; when ``quotes_max`` unexpired quotes exist, a new one is
``Overloaded`` (nothing stored) rather than an unbounded table.

The functions take the ``Store`` and use its transaction helpers, as
``persistence.rejections`` does. Any thread.
"""

from __future__ import annotations

import json
import sqlite3
from typing import TYPE_CHECKING

import sqlite_utils

from payengine.engine.discounts import Quote, QuoteMismatch, quote_from_json, quote_json
from payengine.engine.errors import Overloaded

if TYPE_CHECKING:
    from payengine.persistence.store import Store

PRUNE_BATCH = 1_000
"""Most expired quotes one save deletes: a save's cost stays bounded."""


def create_schema(db: sqlite_utils.Database) -> None:
    """Create the table and its index if they do not exist (under the store's lock)."""
    db.table("quotes").create(
        {"quote_id": str, "merchant_id": str, "user_id": str, "expires_at_ms": int,
         "body": str, "used_by": str},
        pk="quote_id", not_null={"expires_at_ms", "body"}, if_not_exists=True)
    db.table("quotes").create_index(["expires_at_ms"], if_not_exists=True)


def save(store: Store, quote: Quote, *, now_ms: int, quotes_max: int) -> None:
    """Store ``quote`` (durable on return) after deleting up to ``PRUNE_BATCH`` expired
    quotes; ``Overloaded`` when ``quotes_max`` unexpired ones remain. Quote ids are unique
    (the engine's id source), so an insert never replaces another quote."""
    with store._tx() as conn:  # a change of its own: a refusal below must not undo it
        conn.execute("DELETE FROM quotes WHERE quote_id IN (SELECT quote_id FROM quotes"
                     " WHERE expires_at_ms <= ? LIMIT ?)", (now_ms, PRUNE_BATCH))
    with store._tx(2) as conn:
        (kept,) = conn.execute("SELECT count(*) FROM quotes WHERE expires_at_ms > ?",
                               (now_ms,)).fetchone()
        if kept >= quotes_max:
            raise Overloaded(f"{kept} unexpired quotes are stored (quotes_max {quotes_max}):"
                             " retry once some have expired")
        conn.execute("INSERT INTO quotes (quote_id, merchant_id, user_id, expires_at_ms, body)"
                     " VALUES (?, ?, ?, ?, ?)",
                     (quote.quote_id, quote.merchant_id, quote.user_id, quote.expires_at_ms,
                      json.dumps(quote_json(quote), separators=(",", ":"))))


def check_unclaimed(store: Store, quote_id: str, merchant_order_no: str) -> None:
    """``QuoteMismatch`` if another trade order than ``merchant_order_no`` claimed the quote
    (read only: a submit checks before it builds anything; ``claim`` decides)."""
    with store._read(snapshot=False) as conn:
        row = conn.execute("SELECT used_by FROM quotes WHERE quote_id = ?",
                           (quote_id,)).fetchone()
    _refuse_if_taken(quote_id, None if row is None else row[0], merchant_order_no)


def claim(conn: sqlite3.Connection, quote_id: str, merchant_order_no: str) -> None:
    """Claim the quote for ``merchant_order_no`` (the trade order it pays; that trade's
    retries and next attempts may name it again), inside the change that stores the order,
    so a submit refused before its insert claims nothing; ``QuoteMismatch`` (the change
    undone) if another trade order claimed it first. One quote, one sale: a coupon in it is
    used once."""
    conn.execute("UPDATE quotes SET used_by = ? WHERE quote_id = ? AND used_by IS NULL",
                 (merchant_order_no, quote_id))
    row = conn.execute("SELECT used_by FROM quotes WHERE quote_id = ?", (quote_id,)).fetchone()
    _refuse_if_taken(quote_id, None if row is None else row[0], merchant_order_no)


def _refuse_if_taken(quote_id: str, used_by: object, merchant_order_no: str) -> None:
    if used_by is not None and used_by != merchant_order_no:
        raise QuoteMismatch(f"quote {quote_id} pays merchant order {used_by} already: ask "
                            "for a new quote")


def load(store: Store, quote_id: str) -> Quote | None:
    """The stored quote, expired or not, until it is pruned; ``None`` if there is none."""
    with store._read(snapshot=False) as conn:
        row = conn.execute("SELECT body FROM quotes WHERE quote_id = ?", (quote_id,)).fetchone()
    return None if row is None else quote_from_json(json.loads(row[0]))
