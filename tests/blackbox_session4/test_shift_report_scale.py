"""A shift of a few thousand orders: every order of the shift is in its report (README "Shift
reports": `orders_by_state` is every order of the shift)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from payengine import CashPart, FuelLine, FuelSale, PaymentRequest
from tests.blackbox_session4.support import open_station
from tests.helpers import paid_reply, signed_callback, wait_for

SHIFT = "2026-12-01/A"
ROOT = Path(__file__).resolve().parents[2]
ORDERS = 2_600


def test_every_order_of_a_long_shift_is_counted_and_summed(tmp_path: Path) -> None:
    engine, _, _ = open_station(tmp_path / "big.db", live_orders_max=10_000)
    try:
        receipts = []
        for i in range(ORDERS):
            shift = SHIFT if i % 2 == 0 else "2026-12-01/B"
            sale = FuelSale("st-1", 1 + i % 8, 1, FuelLine.by_volume("92", 1_000, 1_000),
                            shift_id=shift)
            receipts.append((shift, engine.submit(PaymentRequest(
                "station-42", f"n-{i}", f"user-{i}", "CNY", 10_00, "fuel",
                CashPart(10_00, "wechat"), sale=sale))))
        mine = [r for shift, r in receipts if shift == SHIFT]
        paid = mine[::3]
        for receipt in paid:
            wait_for(lambda r=receipt: engine.get_order(r.order_id).state == "paying",
                     what="paying")
            signed_callback(engine, "wechat", receipt.payment_serial,
                            paid_reply(receipt.payment_serial))
        wait_for(lambda: all(engine.get_order(r.order_id).settled for r in paid[-5:]),
                 timeout_s=60, what="paid")
        report = engine.shift_report("st-1", SHIFT)
        assert sum(report.orders_by_state.values()) == len(mine)
        assert report.orders_by_state.get("succeeded") == len(paid)
        assert report.totals["CNY"].paid_orders == len(paid)
        assert report.totals["CNY"].paid_minor == len(paid) * 10_00
        assert report.litres_ml_by_grade == {"92": len(paid) * 1_000}
        run = subprocess.run([sys.executable, "-m", "payengine.sim.cli", "report", "shift",
                              "--station", "st-1", "--shift", SHIFT,
                              "--db", str(tmp_path / "big.db"), "--json"],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        printed = json.loads(run.stdout)
        assert printed["orders"] == len(mine)
        assert printed["totals"]["CNY"]["paid_orders"] == len(paid)
    finally:
        engine.shutdown()
