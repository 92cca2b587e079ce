"""How often a notification the engine does not believe may make an order ask its channel.

A public callback URL can be flooded with forged notifications; each one the engine cannot
believe makes the order query the channel, so the queries must be bounded. The order's
actor bounds them too, but its memory goes when it stops (a settled order's actor stops
after every message), so the shell keeps the bound: at most one query per order per
interval for unverified reports, and a separate turn for verified ones, which a forger
cannot use up. The table is bounded (least recently used orders are forgotten first).
Thread-safe: called from whatever threads feed notifications.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

ORDERS_REMEMBERED_MAX = 10_000


class ConfirmLimiter:
    """``allow(order_id, verified, now_ms)``: whether this report may make the order ask."""

    def __init__(self, interval_ms: int, orders_max: int = ORDERS_REMEMBERED_MAX) -> None:
        assert interval_ms > 0 and orders_max > 0
        self._interval_ms = interval_ms
        self._orders_max = orders_max
        self._last: OrderedDict[tuple[str, bool], int] = OrderedDict()
        self._lock = threading.Lock()

    def allow(self, order_id: str, verified: bool, now_ms: int) -> bool:
        key = (order_id, verified)
        with self._lock:
            last = self._last.get(key)
            if last is not None and now_ms - last < self._interval_ms:
                return False
            self._last[key] = now_ms
            self._last.move_to_end(key)
            while len(self._last) > self._orders_max:
                self._last.popitem(last=False)
            return True
