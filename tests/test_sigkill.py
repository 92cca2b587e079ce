"""Real SIGKILLs of a real engine process (``payengine.sim.sigkill``), and the checker's teeth.

The first test runs the harness for a few short kills (the 200-kill run is a command: see
README.md); the others feed the final check acknowledgements the database does not honour
and assert each one is reported, so a clean run means something.
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

from payengine import Engine
from payengine.sim.sigkill import (
    CONFIG,
    POLICY,
    Acks,
    DurableWallet,
    account_plans,
    check_database,
    order_plan,
    run_kills,
)
from tests.helpers import wait_for


def test_a_few_sigkills_under_load_lose_nothing_acknowledged(tmp_path: Path) -> None:
    report = run_kills(8, seed=3, db_dir=tmp_path / "run", delay_ms=(50, 400))
    assert report.violations == []
    assert report.kills == 8
    assert report.acknowledgements.get("submit", 0) > 0, report.render()
    assert report.acknowledgements.get("fund", 0) > 0
    assert report.orders > 0
    assert set(report.final_states) <= {"succeeded", "failed"}


@pytest.fixture
def settled_db(tmp_path: Path) -> tuple[Path, Path, Acks]:
    """A database of three settled orders (one refunded) made in-process, with the
    acknowledgements a child would have printed for them."""
    db, wallet_path = tmp_path / "engine.db", tmp_path / "wallet.db"
    wallet = DurableWallet(wallet_path)
    engine = Engine.open(db, channels=[wallet], policy=POLICY, config=CONFIG)
    acks = Acks()
    try:
        for account in account_plans():
            engine.open_account(account.account_id, account.unit,
                                minor_per_unit=account.minor_per_unit)
            engine.fund(account.account_id, account.funded, funding_id=account.funding_id)
            acks.record({"ack": "fund", "account_id": account.account_id,
                         "funding_id": account.funding_id, "amount": account.funded})
        for plan in (order_plan(0, n) for n in (0, 2, 4)):
            if plan.pre_hold is not None:  # the user ticked "use points" first
                assert plan.pre_hold.hold_id is not None
                engine.pre_hold(plan.pre_hold.account_id, plan.pre_hold.amount,
                                hold_id=plan.pre_hold.hold_id)
                acks.record({"ack": "pre_hold", "account_id": plan.pre_hold.account_id,
                             "hold_id": plan.pre_hold.hold_id})
            receipt = engine.submit(plan.request)
            acks.record({"ack": "submit", "n": plan.n,
                         "merchant_order_no": plan.request.merchant_order_no,
                         "order_id": receipt.order_id})
        order_id = receipt.order_id
        wait_for(lambda: engine.unsettled_count() == 0, what="the orders settled")
        refund = engine.refund(order_id, "rf-test", 1_000)
        acks.record({"ack": "refund", "order_id": order_id, "refund_no": "rf-test",
                     "refund_id": refund.refund_id, "amount_minor": refund.amount_minor})
    finally:
        engine.shutdown()
        wallet.disconnect()
    return db, wallet_path, acks


def _invariants(db: Path, wallet_path: Path, acks: Acks) -> set[str]:
    return {v.invariant for v in check_database(db, wallet_path, acks,
                                                settle_timeout_s=10).violations}


def test_the_check_passes_a_database_that_honours_its_acknowledgements(
    settled_db: tuple[Path, Path, Acks]
) -> None:
    assert _invariants(*settled_db) == set()


def test_the_check_reports_an_acknowledged_submit_that_does_not_exist(
    settled_db: tuple[Path, Path, Acks]
) -> None:
    db, wallet_path, acks = settled_db
    acks.record({"ack": "submit", "n": 999, "merchant_order_no": "k999", "order_id": "O-lost"})
    assert "acknowledged-submit-survives" in _invariants(db, wallet_path, acks)


def test_the_check_reports_a_receipt_that_names_another_order(
    settled_db: tuple[Path, Path, Acks]
) -> None:
    db, wallet_path, acks = settled_db
    acks.record({"ack": "submit", "n": 0, "merchant_order_no": "k0", "order_id": "O-other"})
    assert {"acknowledged-submit-survives", "one-receipt-per-key"} <= _invariants(
        db, wallet_path, acks)


def test_the_check_reports_an_acknowledged_refund_that_does_not_exist(
    settled_db: tuple[Path, Path, Acks]
) -> None:
    db, wallet_path, acks = settled_db
    order_id = next(iter(acks.submits["k0"]))
    acks.record({"ack": "refund", "order_id": order_id, "refund_no": "rf-lost",
                 "refund_id": "R-lost", "amount_minor": 500})
    assert "acknowledged-refund-survives" in _invariants(db, wallet_path, acks)


def test_the_check_reports_an_acknowledged_order_deleted_from_a_copy_of_the_database(
    settled_db: tuple[Path, Path, Acks], tmp_path: Path
) -> None:
    db, wallet_path, acks = settled_db
    copy = tmp_path / "copy.db"
    shutil.copy(db, copy)
    order_id = next(iter(acks.submits["k0"]))
    with sqlite3.connect(copy) as conn:  # as if the commit that made it had been lost
        for table in ("trade_orders", "payment_orders", "legs"):
            conn.execute(f"DELETE FROM {table} WHERE order_id = ?", (order_id,))
    found = _invariants(copy, wallet_path, acks)
    assert "acknowledged-submit-survives" in found
    assert "wallet-charge-has-an-order" in found  # and the money it took is seen
