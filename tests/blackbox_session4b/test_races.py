"""Concurrent calls of one key make one thing: agreements, withholdings, transfers, recharges."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from payengine import CashPart, OrderPolicy
from tests.blackbox_session4b.support import AgreementWallet, Wallet, open_with
from tests.helpers import wait_for

SLOWISH = OrderPolicy(pay_window_ms=60_000, query_schedule_ms=(60_000,),
                      refund_query_schedule_ms=(60_000,))


def together(n: int, call: Callable[[], Any]) -> list[Any]:
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = call()
        except Exception as error:
            results[i] = error

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_concurrent_sign_agreements_of_one_user_and_channel_make_one_agreement(tmp_path: Path
                                                                              ) -> None:
    eng = open_with(tmp_path / "x.db", [AgreementWallet("wx")], policy=SLOWISH)
    try:
        results = together(8, lambda: eng.sign_agreement("alice", "wx"))
        assert not [r for r in results if isinstance(r, Exception)], results
        assert len({r.agreement_id for r in results}) == 1
        assert len(eng.agreements_of("alice")) == 1
    finally:
        eng.shutdown()


def test_concurrent_withholds_of_one_key_make_one_withholding_and_one_payment(tmp_path: Path
                                                                              ) -> None:
    wallet = AgreementWallet("wx")
    eng = open_with(tmp_path / "x.db", [wallet], policy=SLOWISH)
    try:
        eng.sign_agreement("alice", "wx")
        results = together(8, lambda: eng.withhold("gym-1", "sub-1", "alice", 99_00, "CNY",
                                                   "Monthly"))
        assert not [r for r in results if isinstance(r, Exception)], results
        assert {(r.attempt, r.attempts) for r in results} == {(1, results[0].attempts)}
        wait_for(lambda: wallet.count("pay") >= 1)
        import time
        time.sleep(0.3)
        assert wallet.count("pay") == 1
    finally:
        eng.shutdown()


def test_concurrent_transfers_of_one_id_move_the_amount_once(tmp_path: Path) -> None:
    eng = open_with(tmp_path / "x.db", [Wallet("wx")], policy=SLOWISH)
    try:
        eng.open_account("alice/balance", "CNY")
        eng.open_account("bob/balance", "CNY")
        eng.fund("alice/balance", 50_00, funding_id="a")
        results = together(8, lambda: eng.transfer("t1", "alice/balance", "bob/balance", 20_00))
        assert not [r for r in results if isinstance(r, Exception)], results
        assert len({r.order_id for r in results}) == 1
        wait_for(lambda: eng.get_transfer("t1").settled)
        assert eng.get_account("bob/balance").funded == 20_00
        assert eng.get_account("alice/balance").spent == 20_00
    finally:
        eng.shutdown()


def test_concurrent_transfers_of_different_ids_never_overdraw_the_source(tmp_path: Path) -> None:
    eng = open_with(tmp_path / "x.db", [Wallet("wx")], policy=SLOWISH)
    try:
        eng.open_account("alice/balance", "CNY")
        eng.open_account("bob/balance", "CNY")
        eng.fund("alice/balance", 50_00, funding_id="a")
        counter = iter(range(100))
        lock = threading.Lock()

        def one() -> Any:
            with lock:
                n = next(counter)
            return eng.transfer(f"t{n}", "alice/balance", "bob/balance", 20_00)

        results = together(6, one)
        receipts = [r for r in results if not isinstance(r, Exception)]
        for r in receipts:
            wait_for(lambda r=r: eng.get_order(r.order_id).settled)
        alice, bob = eng.get_account("alice/balance"), eng.get_account("bob/balance")
        assert alice.spent <= 50_00
        assert alice.spent == bob.funded
        assert alice.available + alice.held + alice.spent == 50_00
        assert alice.spent in (0, 20_00, 40_00)
    finally:
        eng.shutdown()


def test_concurrent_recharges_of_one_key_make_one_order(tmp_path: Path) -> None:
    wallet = Wallet("wx")
    eng = open_with(tmp_path / "x.db", [wallet], policy=SLOWISH)
    try:
        eng.open_account("alice/balance", "CNY")
        results = together(8, lambda: eng.recharge("shop-1", "t-1", "alice/balance", 50_00,
                                                   "CNY", CashPart(50_00, "wx")))
        assert not [r for r in results if isinstance(r, Exception)], results
        assert len({r.order_id for r in results}) == 1
    finally:
        eng.shutdown()
