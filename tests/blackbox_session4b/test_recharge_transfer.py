"""Recharge and transfer, set_account_status, and their ledger, from the README."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from payengine import (
    AccountClosed,
    AccountFrozen,
    CashPart,
    ChannelReply,
    CurrencyMismatch,
    DuplicateSuspected,
    Engine,
    IdempotencyConflict,
    IllegalTransition,
    InsufficientBalance,
    InvalidAmount,
    InvalidRequest,
    OrderPolicy,
    PaymentRequest,
    ThreadRuntime,
    UnknownAccount,
    UnknownOrder,
)
from payengine.sim.channel import ChannelFaults, SimulatedChannel
from tests.blackbox_session4b.support import Wallet, open_with, paid
from tests.helpers import signed_callback, wait_for


@pytest.fixture
def wallet() -> Wallet:
    return Wallet("wx")


@pytest.fixture
def engine(tmp_path: Path, wallet: Wallet) -> Iterator[Engine]:
    eng = open_with(tmp_path / "r.db", [wallet])
    for acc in ("alice/balance", "bob/balance"):
        eng.open_account(acc, "CNY")
    yield eng
    eng.shutdown()


def settled(engine: Engine, order_id: str) -> Any:
    return wait_for(lambda: (o := engine.get_order(order_id)).settled and o, what="settled")


def paid_recharge(engine: Engine, no: str = "topup-1", amount: int = 50_00,
                  account: str = "alice/balance") -> Any:
    receipt = engine.recharge("shop-1", no, account, amount, "CNY", CashPart(amount, "wx"))
    wait_for(lambda: engine.get_order(receipt.order_id).state == "paying")
    signed_callback(engine, "wx", receipt.payment_serial, paid(receipt.payment_serial))
    return settled(engine, receipt.order_id)


# --- the README's example -----------------------------------------------------------------

def test_the_readme_recharge_and_transfer_example_prints_what_it_says() -> None:
    world = ThreadRuntime()
    wechat = SimulatedChannel("wechat", world, seed=1, faults=ChannelFaults.none())
    engine = Engine.open(Path(tempfile.mkdtemp()) / "wallet.db", channels=[wechat],
                         policy=OrderPolicy(pay_window_ms=3_000))
    try:
        wechat.attach(engine)
        engine.open_account("alice/balance", "CNY")
        engine.open_account("bob/balance", "CNY")
        receipt = engine.recharge("shop-1", "topup-0001", "alice/balance", 50_00, "CNY",
                                  CashPart(50_00, "wechat"))
        order = wait_for(lambda: (o := engine.get_order(receipt.order_id)).settled and o)
        assert order.state == "succeeded"
        assert [(leg.mode, leg.status) for leg in order.legs] == [("cash", "paid"),
                                                                  ("credit", "credited")]
        assert engine.ledger_balances(receipt.order_id) == {
            "CNY": {"payer:wechat": -5000, "transit": 0, "vouchers:alice/balance": 5000}}
        engine.transfer("tr-0001", "alice/balance", "bob/balance", 20_00)
        moved = wait_for(lambda: (m := engine.get_transfer("tr-0001")).settled and m)
        assert moved.state == "succeeded"
        assert engine.get_account("bob/balance").available == 2000
        with pytest.raises(InsufficientBalance) as caught:
            engine.refund(receipt.order_id, "rf-1", 40_00)
        print("refused:", caught.value.code)
        assert engine.get_order(receipt.order_id).refunds == ()
        engine.refund(receipt.order_id, "rf-2", 30_00)
        refund = wait_for(lambda: (r := engine.get_order(receipt.order_id).refund("rf-2"))
                          .status != "refunding" and r)
        assert refund.status == "succeeded"
        assert engine.get_account("alice/balance").available == 0
    finally:
        engine.shutdown()
        world.shutdown()


# --- recharge ----------------------------------------------------------------------------

def test_a_recharge_credits_once_only_after_the_cash_success(engine: Engine) -> None:
    receipt = engine.recharge("shop-1", "topup-1", "alice/balance", 50_00, "CNY",
                              CashPart(50_00, "wx"))
    view = wait_for(lambda: (o := engine.get_order(receipt.order_id)).state == "paying" and o)
    assert view.legs[-1].mode == "credit"
    assert view.legs[-1].account_id == "alice/balance"
    assert view.legs[-1].status == "new"
    assert engine.get_account("alice/balance").available == 0
    signed_callback(engine, "wx", receipt.payment_serial, paid(receipt.payment_serial))
    order = settled(engine, receipt.order_id)
    assert order.state == "succeeded"
    assert order.legs[-1].status == "credited"
    account = engine.get_account("alice/balance")
    assert (account.available, account.funded) == (50_00, 50_00)
    signed_callback(engine, "wx", receipt.payment_serial, paid(receipt.payment_serial))
    assert engine.get_account("alice/balance").funded == 50_00


def test_a_recharge_is_idempotent_and_other_parameters_are_idempotency_conflict(
        engine: Engine) -> None:
    first = engine.recharge("shop-1", "topup-1", "alice/balance", 50_00, "CNY",
                            CashPart(50_00, "wx"))
    assert engine.recharge("shop-1", "topup-1", "alice/balance", 50_00, "CNY",
                           CashPart(50_00, "wx")) == first
    with pytest.raises(IdempotencyConflict):
        engine.recharge("shop-1", "topup-1", "bob/balance", 50_00, "CNY", CashPart(50_00, "wx"))
    with pytest.raises(IdempotencyConflict):
        engine.recharge("shop-1", "topup-1", "alice/balance", 40_00, "CNY",
                        CashPart(40_00, "wx"))


def test_a_recharge_whose_cash_differs_from_its_amount_is_invalid_request(engine: Engine
                                                                          ) -> None:
    with pytest.raises(InvalidRequest):
        engine.recharge("shop-1", "topup-1", "alice/balance", 50_00, "CNY",
                        CashPart(40_00, "wx"))


def test_a_recharge_of_an_unknown_account_is_unknown_account(engine: Engine) -> None:
    with pytest.raises(UnknownAccount):
        engine.recharge("shop-1", "topup-1", "carol/balance", 50_00, "CNY",
                        CashPart(50_00, "wx"))
    with pytest.raises(UnknownOrder):
        engine.find_order("shop-1", "topup-1")


def test_a_recharge_of_a_points_account_or_in_another_currency_is_currency_mismatch(
        engine: Engine) -> None:
    engine.open_account("alice/points", "POINTS", minor_per_unit=10)
    with pytest.raises(CurrencyMismatch):
        engine.recharge("shop-1", "topup-1", "alice/points", 50_00, "CNY",
                        CashPart(50_00, "wx"))
    with pytest.raises(CurrencyMismatch):
        engine.recharge("shop-1", "topup-2", "alice/balance", 50_00, "USD",
                        CashPart(50_00, "wx"))


@pytest.mark.parametrize("status,error", [("frozen", AccountFrozen), ("closed", AccountClosed)])
def test_a_recharge_of_a_frozen_or_closed_account_is_refused_nothing_created(
        engine: Engine, status: str, error: type[Exception]) -> None:
    engine.set_account_status("alice/balance", status)
    with pytest.raises(error):
        engine.recharge("shop-1", "topup-1", "alice/balance", 50_00, "CNY",
                        CashPart(50_00, "wx"))
    with pytest.raises(UnknownOrder):
        engine.find_order("shop-1", "topup-1")


def caught_ids(engine: Engine, order_id: str) -> tuple[str, ...]:
    try:
        engine.recharge("shop-1", "topup-3", "alice/balance", 50_00, "CNY",
                        CashPart(50_00, "wx"))
    except DuplicateSuspected as error:
        return tuple(error.order_ids)
    return ()


def test_a_recharge_uses_the_account_id_as_user_for_the_duplicate_guard(
        tmp_path: Path, wallet: Wallet) -> None:
    eng = open_with(tmp_path / "g.db", [wallet], duplicate_guard_window_ms=60_000)
    try:
        eng.open_account("alice/balance", "CNY")
        first = eng.recharge("shop-1", "topup-1", "alice/balance", 50_00, "CNY",
                             CashPart(50_00, "wx"))
        with pytest.raises(DuplicateSuspected):
            eng.recharge("shop-1", "topup-2", "alice/balance", 50_00, "CNY",
                         CashPart(50_00, "wx"))
        assert first.order_id in caught_ids(eng, first.order_id)
        eng.recharge("shop-1", "topup-2", "alice/balance", 50_00, "CNY",
                     CashPart(50_00, "wx"), confirm_duplicate=True)
    finally:
        eng.shutdown()


def test_a_recharge_title_defaults_to_recharge(engine: Engine) -> None:
    r = engine.recharge("shop-1", "topup-1", "alice/balance", 50_00, "CNY",
                        CashPart(50_00, "wx"))
    assert r.title == "recharge"  # OrderView has no title: the Receipt shows it


def test_a_recharge_whose_account_is_frozen_after_submit_fails_and_refunds_the_cash(
        engine: Engine, wallet: Wallet) -> None:
    receipt = engine.recharge("shop-1", "topup-1", "alice/balance", 50_00, "CNY",
                              CashPart(50_00, "wx"))
    wait_for(lambda: engine.get_order(receipt.order_id).state == "paying")
    engine.set_account_status("alice/balance", "frozen")
    signed_callback(engine, "wx", receipt.payment_serial, paid(receipt.payment_serial))
    order = wait_for(lambda: (o := engine.get_order(receipt.order_id)).state == "failed"
                     and o.legs[0].status == "refunded" and o, what="failed and refunded")
    assert order.cause == "credit_refused"
    assert order.legs[-1].status == "refused"
    assert engine.get_account("alice/balance").funded == 0
    assert wallet.count("refund") == 1


def test_a_recharge_closed_before_it_was_paid_credits_nothing(engine: Engine) -> None:
    receipt = engine.recharge("shop-1", "topup-1", "alice/balance", 50_00, "CNY",
                              CashPart(50_00, "wx"))
    wait_for(lambda: engine.get_order(receipt.order_id).state == "paying")
    engine.close(receipt.order_id)
    order = settled(engine, receipt.order_id)
    assert order.state == "closed"
    assert order.legs[-1].status == "cancelled"
    assert engine.get_account("alice/balance").funded == 0


def test_a_recharge_success_after_its_close_is_refunded_and_not_credited(
        engine: Engine, wallet: Wallet) -> None:
    receipt = engine.recharge("shop-1", "topup-1", "alice/balance", 50_00, "CNY",
                              CashPart(50_00, "wx"))
    wait_for(lambda: engine.get_order(receipt.order_id).state == "paying")
    engine.close(receipt.order_id)
    settled(engine, receipt.order_id)
    wallet.query_reply = paid(receipt.payment_serial)
    for _ in range(30):
        try:
            signed_callback(engine, "wx", receipt.payment_serial, paid(receipt.payment_serial))
            break
        except Exception:
            time.sleep(0.1)  # may be confirmed with the channel first
    wait_for(lambda: wallet.count("refund") == 1, what="late success refunded")
    time.sleep(0.3)
    assert engine.get_account("alice/balance").funded == 0
    assert engine.get_order(receipt.order_id).state == "closed"


def test_the_ledger_of_a_recharge_settles_to_the_credited_account(engine: Engine) -> None:
    order = paid_recharge(engine)
    assert engine.ledger_balances(order.order_id) == {
        "CNY": {"payer:wx": -5000, "transit": 0, "vouchers:alice/balance": 5000}}
    assert engine.unbalanced_postings() == []


# --- refund of a recharge -------------------------------------------------------------

def test_a_refund_larger_than_the_available_balance_is_insufficient_balance_nothing_created(
        engine: Engine) -> None:
    order = paid_recharge(engine)
    engine.transfer("t1", "alice/balance", "bob/balance", 20_00)
    wait_for(lambda: engine.get_transfer("t1").settled)
    with pytest.raises(InsufficientBalance):
        engine.refund(order.order_id, "rf-1", 40_00)
    assert engine.get_order(order.order_id).refunds == ()


def test_a_refund_of_a_recharge_claws_back_then_pays_cash_and_books_the_ledger(
        engine: Engine, wallet: Wallet) -> None:
    order = paid_recharge(engine)
    engine.refund(order.order_id, "rf-1", 30_00)
    refund = wait_for(lambda: (r := engine.get_order(order.order_id).refund("rf-1"))
                      .status == "succeeded" and r, what="refund succeeded")
    account = engine.get_account("alice/balance")
    assert account.available == 20_00
    assert ("refund", order.payment_serial, wallet.calls_of("refund")[0][2], 30_00) \
        == wallet.calls_of("refund")[0]
    assert all(part[-1] == "done" for part in refund.parts)
    assert len(refund.parts) == 2
    balances = engine.ledger_balances(order.order_id)["CNY"]
    assert balances["vouchers:alice/balance"] == 20_00
    assert balances["payer:wx"] == -20_00
    assert balances.get("merchant:shop-1", 0) == 0
    assert balances["transit"] == 0


@pytest.mark.parametrize("status,error", [("frozen", AccountFrozen), ("closed", AccountClosed)])
def test_a_refund_of_a_recharge_to_a_frozen_or_closed_account_is_refused(
        engine: Engine, status: str, error: type[Exception]) -> None:
    order = paid_recharge(engine)
    engine.set_account_status("alice/balance", status)
    with pytest.raises(error):
        engine.refund(order.order_id, "rf-1", 10_00)
    assert engine.get_order(order.order_id).refunds == ()


def test_a_refund_of_a_recharge_refused_by_the_channel_gives_the_clawback_back(
        engine: Engine, wallet: Wallet) -> None:
    order = paid_recharge(engine)
    wallet.refund_reply = ChannelReply("SUCCESS", "REFUNDCLOSE")
    engine.refund(order.order_id, "rf-1", 30_00)
    refund = wait_for(lambda: (r := engine.get_order(order.order_id).refund("rf-1"))
                      .status == "failed" and r, what="refund failed")
    wait_for(lambda: engine.get_account("alice/balance").available == 50_00,
             what="clawback reversed")
    assert refund.status == "failed"
    assert "reversed" in [p[-1] for p in refund.parts]


# --- set_account_status ------------------------------------------------------------------

def test_set_account_status_returns_the_previous_status_and_get_account_shows_it(
        engine: Engine) -> None:
    assert engine.get_account("alice/balance").status == "active"
    assert engine.set_account_status("alice/balance", "frozen") == "active"
    assert engine.get_account("alice/balance").status == "frozen"
    assert engine.set_account_status("alice/balance", "active") == "frozen"
    assert engine.set_account_status("alice/balance", "closed") == "active"


@pytest.mark.parametrize("target", ["active", "frozen", "closed"])
def test_leaving_closed_is_an_illegal_transition(engine: Engine, target: str) -> None:
    engine.set_account_status("alice/balance", "closed")
    if target == "closed":
        assert engine.set_account_status("alice/balance", "closed") == "closed"
        return
    with pytest.raises(IllegalTransition):
        engine.set_account_status("alice/balance", target)


@pytest.mark.parametrize("status", ["deleted", "", "ACTIVE", None])
def test_another_status_is_invalid_request(engine: Engine, status: Any) -> None:
    with pytest.raises(InvalidRequest):
        engine.set_account_status("alice/balance", status)


def test_set_account_status_of_an_unknown_account_is_unknown_account(engine: Engine) -> None:
    with pytest.raises(UnknownAccount):
        engine.set_account_status("carol/balance", "frozen")


@pytest.mark.parametrize("status,error", [("frozen", AccountFrozen), ("closed", AccountClosed)])
def test_a_frozen_or_closed_account_takes_no_top_up_or_hold(engine: Engine, status: str,
                                                             error: type[Exception]) -> None:
    engine.fund("alice/balance", 10_00, funding_id="f1")
    engine.set_account_status("alice/balance", status)
    with pytest.raises(error) as caught:
        engine.fund("alice/balance", 10_00, funding_id="f2")
    assert caught.value.code == f"account_{status}"
    with pytest.raises(error):
        engine.pre_hold("alice/balance", 1_00)
    assert engine.get_account("alice/balance").funded == 10_00


# --- transfer ---------------------------------------------------------------------------

def funded(engine: Engine, amount: int = 50_00) -> None:
    engine.fund("alice/balance", amount, funding_id=f"fund-alice-{amount}")


def test_a_transfer_moves_the_amount_all_or_nothing_with_the_readmes_legs(engine: Engine
                                                                          ) -> None:
    funded(engine)
    receipt = engine.transfer("t1", "alice/balance", "bob/balance", 20_00)
    moved = wait_for(lambda: (m := engine.get_transfer("t1")).settled and m)
    assert moved.order_id == receipt.order_id
    assert moved.state == "succeeded"
    assert (moved.merchant_id, moved.merchant_order_no) == ("payengine:transfer", "t1")
    assert engine.find_order("payengine:transfer", "t1").order_id == receipt.order_id
    assert [(leg.mode, leg.status) for leg in moved.legs] == [("pre_deduct", "confirmed"),
                                                              ("credit", "credited")]
    alice, bob = engine.get_account("alice/balance"), engine.get_account("bob/balance")
    assert (alice.available, alice.spent, alice.held) == (30_00, 20_00, 0)
    assert (bob.available, bob.funded) == (20_00, 20_00)
    assert engine.get_order(receipt.order_id) == moved


def test_a_transfer_is_idempotent_by_its_id_whatever_the_balances_are_now(engine: Engine
                                                                          ) -> None:
    funded(engine)
    first = engine.transfer("t1", "alice/balance", "bob/balance", 50_00)
    wait_for(lambda: engine.get_transfer("t1").settled)
    assert engine.transfer("t1", "alice/balance", "bob/balance", 50_00) == first
    with pytest.raises(IdempotencyConflict):
        engine.transfer("t1", "alice/balance", "bob/balance", 40_00)
    with pytest.raises(IdempotencyConflict):
        engine.transfer("t1", "bob/balance", "alice/balance", 50_00)


def test_a_transfer_to_the_same_account_is_invalid_request(engine: Engine) -> None:
    funded(engine)
    with pytest.raises(InvalidRequest):
        engine.transfer("t1", "alice/balance", "alice/balance", 1_00)


@pytest.mark.parametrize("amount", [0, -5, True, 10**15 + 1, 2.0])
def test_a_transfer_of_a_bad_amount_is_invalid_amount(engine: Engine, amount: Any) -> None:
    funded(engine)
    with pytest.raises(InvalidAmount):
        engine.transfer("t1", "alice/balance", "bob/balance", amount)


@pytest.mark.parametrize("ids", [("", "alice/balance", "bob/balance"),
                                 ("t\n1", "alice/balance", "bob/balance"),
                                 ("t1", "", "bob/balance"), ("t1", "alice/balance", 7)])
def test_a_transfer_with_a_bad_id_is_invalid_request(engine: Engine, ids: tuple[Any, ...]
                                                     ) -> None:
    funded(engine)
    with pytest.raises(InvalidRequest):
        engine.transfer(ids[0], ids[1], ids[2], 1_00)


@pytest.mark.parametrize("source,target", [("carol/balance", "bob/balance"),
                                           ("alice/balance", "carol/balance")])
def test_a_transfer_naming_an_unknown_account_is_unknown_account(engine: Engine, source: str,
                                                                  target: str) -> None:
    funded(engine)
    with pytest.raises(UnknownAccount):
        engine.transfer("t1", source, target, 1_00)
    with pytest.raises(UnknownOrder):
        engine.get_transfer("t1")


@pytest.mark.parametrize("which", ["alice/balance", "bob/balance"])
@pytest.mark.parametrize("status,error", [("frozen", AccountFrozen), ("closed", AccountClosed)])
def test_a_transfer_with_a_frozen_or_closed_account_is_refused(
        engine: Engine, which: str, status: str, error: type[Exception]) -> None:
    funded(engine)
    engine.set_account_status(which, status)
    with pytest.raises(error):
        engine.transfer("t1", "alice/balance", "bob/balance", 1_00)


def test_a_transfer_between_currencies_or_of_points_is_currency_mismatch(engine: Engine
                                                                         ) -> None:
    funded(engine)
    engine.open_account("bob/usd", "USD")
    engine.open_account("alice/points", "POINTS", minor_per_unit=10)
    engine.fund("alice/points", 100, funding_id="pts")
    engine.open_account("bob/points", "POINTS", minor_per_unit=10)
    with pytest.raises(CurrencyMismatch):
        engine.transfer("t1", "alice/balance", "bob/usd", 1_00)
    with pytest.raises(CurrencyMismatch):
        engine.transfer("t2", "alice/points", "bob/points", 10)


def test_a_transfer_above_the_available_balance_is_insufficient_balance(engine: Engine) -> None:
    funded(engine, 10_00)
    with pytest.raises(InsufficientBalance):
        engine.transfer("t1", "alice/balance", "bob/balance", 10_01)
    with pytest.raises(UnknownOrder):
        engine.get_transfer("t1")


def test_a_transfer_of_exactly_the_available_balance_is_taken(engine: Engine) -> None:
    funded(engine, 10_00)
    engine.transfer("t1", "alice/balance", "bob/balance", 10_00)
    assert wait_for(lambda: (m := engine.get_transfer("t1")).settled and m).state == "succeeded"


def test_a_transfer_whose_target_is_frozen_meanwhile_fails_and_voids_the_hold(
        engine: Engine) -> None:
    funded(engine)
    engine.set_account_status("bob/balance", "active")
    # freeze the target between the submit's checks and the credit: race it
    receipt = engine.transfer("t1", "alice/balance", "bob/balance", 20_00)
    engine.set_account_status("bob/balance", "frozen")
    moved = wait_for(lambda: (m := engine.get_transfer("t1")).settled and m)
    alice = engine.get_account("alice/balance")
    if moved.state == "failed":
        assert moved.legs[0].status == "cancelled"
        assert (alice.available, alice.held, alice.spent) == (50_00, 0, 0)
        assert engine.get_account("bob/balance").funded == 0
    else:  # the credit landed before the freeze
        assert moved.state == "succeeded"
        assert alice.spent == 20_00
    assert engine.get_order(receipt.order_id).state == moved.state


def test_a_transfer_is_not_refunded(engine: Engine) -> None:
    funded(engine)
    receipt = engine.transfer("t1", "alice/balance", "bob/balance", 20_00)
    wait_for(lambda: engine.get_transfer("t1").settled)
    with pytest.raises(IllegalTransition):
        engine.refund(receipt.order_id, "rf-1", 1_00)


def test_a_merchants_submit_under_payengine_transfer_is_invalid_request(engine: Engine
                                                                         ) -> None:
    with pytest.raises(InvalidRequest):
        engine.submit(PaymentRequest("payengine:transfer", "x-1", "alice", "CNY", 1_00, "t",
                                     cash=CashPart(1_00, "wx")))


def test_the_duplicate_guard_does_not_apply_to_transfers(tmp_path: Path, wallet: Wallet
                                                         ) -> None:
    eng = open_with(tmp_path / "g.db", [wallet], duplicate_guard_window_ms=60_000)
    try:
        eng.open_account("alice/balance", "CNY")
        eng.open_account("bob/balance", "CNY")
        eng.fund("alice/balance", 10_00, funding_id="f")
        eng.transfer("t1", "alice/balance", "bob/balance", 1_00)
        eng.transfer("t2", "alice/balance", "bob/balance", 1_00)
    finally:
        eng.shutdown()


def test_the_ledger_of_a_transfer_moves_value_between_the_two_accounts(engine: Engine) -> None:
    funded(engine)
    receipt = engine.transfer("t1", "alice/balance", "bob/balance", 20_00)
    wait_for(lambda: engine.get_transfer("t1").settled)
    balances = engine.ledger_balances(receipt.order_id)["CNY"]
    assert balances["vouchers:alice/balance"] == -20_00
    assert balances["vouchers:bob/balance"] == 20_00
    assert balances.get("transit", 0) == 0
    assert sum(balances.values()) == 0


def test_a_recharge_above_ten_to_the_fifteen_is_invalid_amount(engine: Engine) -> None:
    with pytest.raises(InvalidAmount):
        engine.recharge("shop-1", "topup-1", "alice/balance", 10**15 + 1, "CNY",
                        CashPart(10**15 + 1, "wx"))


def test_a_recharge_that_would_push_funded_past_ten_to_the_fifteen_fails_and_is_undone(
        engine: Engine, wallet: Wallet) -> None:
    engine.fund("alice/balance", 10**15, funding_id="big")
    receipt = engine.recharge("shop-1", "topup-1", "alice/balance", 1_00, "CNY",
                              CashPart(1_00, "wx"))
    wait_for(lambda: engine.get_order(receipt.order_id).state == "paying")
    signed_callback(engine, "wx", receipt.payment_serial, paid(receipt.payment_serial))
    order = wait_for(lambda: (o := engine.get_order(receipt.order_id)).state == "failed" and o,
                     what="failed at the credit")
    assert engine.get_account("alice/balance").funded == 10**15
    wait_for(lambda: wallet.count("refund") == 1, what="cash refunded")
    assert order.legs[-1].status == "refused"
