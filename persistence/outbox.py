"""The durable outbox: every order state change, written in the transaction of the change.

Owned by the notifications work (issue 4 item 5). ``Store`` calls ``create_schema`` when it
opens and ``record_order_events`` inside the transaction that writes an order, so an event
exists if and only if its change was committed.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

import sqlite_utils

from engine.order import PaymentOrder, Transition


def create_schema(db: sqlite_utils.Database) -> None:
    """Create the outbox tables if they do not exist (called under the store's lock)."""


def record_order_events(conn: sqlite3.Connection, order: PaymentOrder,
                        transitions: Sequence[Transition], now_ms: int) -> None:
    """Append one event per order-level transition of ``order`` (inside the caller's tx)."""
