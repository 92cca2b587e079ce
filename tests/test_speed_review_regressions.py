"""Regressions from the review of the speed work (issue 10): a failed commit leaves an
order's actor exactly as it was, and a new order's first actor takes the committed state."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from payengine import Engine
from payengine.engine.order import OrderState, PaymentOrder
from tests.helpers import (
    ScriptedChannel,
    fuel_request,
    fund_customer,
    open_engine,
    paid_reply,
    signed_callback,
    wait_for,
)


def _paid_with_a_failing_first_save(tmp_path: Path, fail_once: bool
                                    ) -> tuple[dict[str, dict[str, int]], list[tuple[str, ...]]]:
    engine = open_engine(tmp_path / "a.db", ScriptedChannel())
    try:
        fund_customer(engine)
        receipt = engine.submit(fuel_request("o-1"))
        wait_for(lambda: engine.get_order(receipt.order_id).state == "paying", what="paying")
        store = engine.store
        real_save = store.save_order
        failed = [False]

        def flaky(order: PaymentOrder, *args: Any, **kwargs: Any) -> None:
            # the commit of the notification's result (the one that takes the order out of
            # paying), not whatever commit comes first: the pay call's answer may still be
            # on its way when the order shows paying, and its commit must not be the one
            # that fails (the callback would then go through at once)
            before = kwargs.get("before")
            leaves_paying = (before is not None and before.state is OrderState.PAYING
                             and order.state is not OrderState.PAYING)
            if fail_once and leaves_paying and not failed[0]:
                failed[0] = True
                raise sqlite3.OperationalError("disk I/O error")
            real_save(order, *args, **kwargs)

        store.save_order = flaky  # type: ignore[method-assign]
        if fail_once:
            with pytest.raises(sqlite3.OperationalError):
                signed_callback(engine, "wechat", receipt.payment_serial,
                                paid_reply(receipt.payment_serial))
        # the wallet was not acknowledged: it sends the notification again
        signed_callback(engine, "wechat", receipt.payment_serial,
                        paid_reply(receipt.payment_serial))
        wait_for(lambda: engine.get_order(receipt.order_id).settled, timeout_s=60,
                 what="settled")
        return (engine.ledger_balances(receipt.order_id),
                [(e.part, e.from_state, e.to_state) for e in engine.journal(receipt.order_id)])
    finally:
        engine.shutdown()


def test_a_commit_that_failed_under_a_notification_is_written_once_on_its_retry(
        tmp_path: Path) -> None:
    (tmp_path / "clean").mkdir()
    (tmp_path / "flaky").mkdir()
    clean = _paid_with_a_failing_first_save(tmp_path / "clean", fail_once=False)
    flaky = _paid_with_a_failing_first_save(tmp_path / "flaky", fail_once=True)
    assert flaky[0] == clean[0]  # the same ledger: nothing posted twice
    assert sorted(flaky[1]) == sorted(clean[1])  # the same transitions (vouchers answer in
    # either order), none journalled twice


def _fresh_entries(engine: Engine) -> dict[str, Any]:
    return dict(engine._ctx.fresh_orders._orders)


def test_the_first_actor_of_a_new_order_takes_its_committed_state_and_leaves_nothing(
        tmp_path: Path) -> None:
    engine = open_engine(tmp_path / "a.db", ScriptedChannel())
    try:
        fund_customer(engine)
        receipt = engine.submit(fuel_request("o-1"))
        again = engine.submit(fuel_request("o-1"))  # a till's retry: the same receipt
        assert again == receipt
        wait_for(lambda: engine.get_order(receipt.order_id).state == "paying", what="paying")
        assert _fresh_entries(engine) == {}
        engine.close(receipt.order_id)
        wait_for(lambda: engine.get_order(receipt.order_id).settled, what="closed")
        engine.close(receipt.order_id)  # a later actor for it reads the database
        assert engine.broken_actors() == {}
        assert _fresh_entries(engine) == {}
    finally:
        engine.shutdown()
