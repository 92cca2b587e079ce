"""Reports read from the store: the shift report (``engine.shift_report``).

The orders of one station's shift come by the (station, shift) index, in batches; each
order's ledger balances are read on their own (one statement), so memory stays bounded by
the report's totals, not by the shift's size. Reads only: safe on a store opened without
the exclusive lock (``payengine report shift`` beside a running engine). Any thread.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from payengine.engine.shift_report import ShiftReport, shift_report

if TYPE_CHECKING:
    from payengine.persistence.store import Store


def report_shift(store: Store, station_id: str, shift_id: str, *,
                 planted_bugs: frozenset[str] = frozenset()) -> ShiftReport:
    """The shift report of ``station_id``'s ``shift_id`` as the store has it now."""
    return shift_report(station_id, shift_id, (
        (order, store.ledger_balances(order.order_id).get(order.currency, {}))
        for order in store.orders_of_shift(station_id, shift_id)), planted_bugs=planted_bugs)
