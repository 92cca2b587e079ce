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
from typing import TYPE_CHECKING

import sqlite_utils

from payengine.engine.discounts import Quote, quote_from_json, quote_json
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
    with store._tx(3) as conn:
        conn.execute("DELETE FROM quotes WHERE quote_id IN (SELECT quote_id FROM quotes"
                     " WHERE expires_at_ms <= ? LIMIT ?)", (now_ms, PRUNE_BATCH))
        (kept,) = conn.execute("SELECT count(*) FROM quotes").fetchone()
        if kept >= quotes_max:
            raise Overloaded(f"{kept} unexpired quotes are stored (quotes_max {quotes_max}):"
                             " retry once some have expired")
        conn.execute("INSERT INTO quotes (quote_id, merchant_id, user_id, expires_at_ms, body)"
                     " VALUES (?, ?, ?, ?, ?)",
                     (quote.quote_id, quote.merchant_id, quote.user_id, quote.expires_at_ms,
                      json.dumps(quote_json(quote), separators=(",", ":"))))


def claim(store: Store, quote_id: str, merchant_order_no: str) -> str | None:
    """Claim the quote for ``merchant_order_no`` (the trade order it pays; its attempts and
    retries may use it again): ``None`` if it is now that trade's, else the merchant order
    number that claimed it first. One quote, one sale: a coupon in it is used once."""
    with store._tx(2) as conn:
        conn.execute("UPDATE quotes SET used_by = ? WHERE quote_id = ? AND used_by IS NULL",
                     (merchant_order_no, quote_id))
        row = conn.execute("SELECT used_by FROM quotes WHERE quote_id = ?",
                           (quote_id,)).fetchone()
    used_by = None if row is None else row[0]
    return None if used_by in (None, merchant_order_no) else str(used_by)


def load(store: Store, quote_id: str) -> Quote | None:
    """The stored quote, expired or not, until it is pruned; ``None`` if there is none."""
    with store._read(snapshot=False) as conn:
        row = conn.execute("SELECT body FROM quotes WHERE quote_id = ?", (quote_id,)).fetchone()
    return None if row is None else quote_from_json(json.loads(row[0]))
