"""Recharges (a stored-value top-up paid by cash) and transfers between accounts, through
the public API: an order whose success credits a beneficiary account, exactly once."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from payengine import (
    AccountClosed,
    AccountFrozen,
    CashPart,
    ChannelReply,
    CurrencyMismatch,
    Engine,
    IdempotencyConflict,
    IllegalTransition,
    InsufficientBalance,
    InvalidRequest,
    PaymentRequest,
    Receipt,
    UnknownAccount,
    VoucherPart,
)
from tests.helpers import (
    SLOW_POLICY,
    ScriptedChannel,
    open_engine,
    paid_reply,
    signed_callback,
    wait_for,
)

REFUND_OK = ChannelReply("SUCCESS", "SUCCESS")
REFUND_CLOSED = ChannelReply("SUCCESS", "REFUNDCLOSE")


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[Engine, ScriptedChannel]]:
    channel = ScriptedChannel()
    engine = open_engine(tmp_path / "pay.db", channel)
    engine.open_account("alice/wallet", "CNY")
    engine.fund("alice/wallet", 5_000, funding_id="alice-start")
    engine.open_account("bob/wallet", "CNY")
    engine.open_account("alice/points", "POINTS", minor_per_unit=10)
    engine.open_account("carol/usd", "USD")
    yield engine, channel
    engine.shutdown()


def recharge_paying(engine: Engine, no: str, amount: int) -> Receipt:
    """A recharge of bob's wallet whose cash the wallet was asked for."""
    receipt = engine.recharge("shop-1", no, "bob/wallet", amount, "CNY",
                              CashPart(amount, "wechat"))
    wait_for(lambda: engine.get_order(receipt.order_id).state == "paying", what="paying")
    return receipt


def paid_recharge(engine: Engine, no: str = "top-1", amount: int = 3_000) -> str:
    receipt = recharge_paying(engine, no, amount)
    signed_callback(engine, "wechat", receipt.payment_serial, paid_reply(receipt.payment_serial))
    wait_for(lambda: engine.get_order(receipt.order_id).settled, what="recharge settled")
    return receipt.order_id


def credit_leg(engine: Engine, order_id: str) -> tuple[str, str]:
    leg = next(leg for leg in engine.get_order(order_id).legs if leg.mode == "credit")
    return leg.account_id or "", leg.status


def test_a_paid_recharge_credits_its_account_once_through_the_ledger(
        world: tuple[Engine, ScriptedChannel]) -> None:
    engine, _ = world
    order_id = paid_recharge(engine)
    order = engine.get_order(order_id)
    assert order.state == "succeeded"
    assert credit_leg(engine, order_id) == ("bob/wallet", "credited")
    account = engine.get_account("bob/wallet")
    assert (account.funded, account.available) == (3_000, 3_000)
    assert engine.ledger_balances(order_id) == {
        "CNY": {"payer:wechat": -3_000, "transit": 0, "vouchers:bob/wallet": 3_000}}
    assert engine.unbalanced_postings() == []


def test_a_recharge_retried_with_the_same_parameters_gets_the_same_receipt_and_one_credit(
        world: tuple[Engine, ScriptedChannel]) -> None:
    engine, _ = world
    order_id = paid_recharge(engine)
    again = engine.recharge("shop-1", "top-1", "bob/wallet", 3_000, "CNY",
                            CashPart(3_000, "wechat"))
    assert again.order_id == order_id
    assert engine.get_account("bob/wallet").available == 3_000
    with pytest.raises(IdempotencyConflict):
        engine.recharge("shop-1", "top-1", "alice/wallet", 3_000, "CNY",
                        CashPart(3_000, "wechat"))


def test_a_recharge_closed_unpaid_credits_nothing_and_a_late_success_is_refunded(
        world: tuple[Engine, ScriptedChannel]) -> None:
    engine, channel = world
    channel.refund_reply = REFUND_OK
    receipt = recharge_paying(engine, "top-2", 1_000)
    engine.close(receipt.order_id)
    signed_callback(engine, "wechat", receipt.payment_serial, paid_reply(receipt.payment_serial))
    order = wait_for(lambda: (o := engine.get_order(receipt.order_id)).settled and o,
                     what="refund after close")
    assert order.state == "closed"
    assert credit_leg(engine, receipt.order_id) == ("bob/wallet", "cancelled")
    assert next(leg for leg in order.legs if leg.mode == "cash").status == "refunded"
    assert engine.get_account("bob/wallet").funded == 0
    assert engine.ledger_balances(receipt.order_id)["CNY"].get("vouchers:bob/wallet", 0) == 0


def test_a_recharge_into_an_account_of_another_unit_is_refused_and_creates_nothing(
        world: tuple[Engine, ScriptedChannel]) -> None:
    engine, _ = world
    for account in ("alice/points", "carol/usd"):
        with pytest.raises(CurrencyMismatch):
            engine.recharge("shop-1", f"bad-{account}", account, 1_000, "CNY",
                            CashPart(1_000, "wechat"))
    with pytest.raises(UnknownAccount):
        engine.recharge("shop-1", "bad-ghost", "ghost", 1_000, "CNY", CashPart(1_000, "wechat"))
    with pytest.raises(InvalidRequest):
        engine.recharge("shop-1", "bad-split", "bob/wallet", 1_000, "CNY",
                        CashPart(900, "wechat"))
    assert engine.unsettled_count() == 0


def test_a_recharge_refund_takes_the_value_back_from_the_account_before_the_cash(
        world: tuple[Engine, ScriptedChannel]) -> None:
    engine, channel = world
    order_id = paid_recharge(engine)
    channel.refund_reply = REFUND_OK
    engine.refund(order_id, "rf-1", 1_000)
    refund = wait_for(lambda: (r := engine.get_order(order_id).refund("rf-1")).status
                      == "succeeded" and r, what="refund done")
    assert sorted(p[2] for p in refund.parts) == ["done", "done"]
    assert engine.get_account("bob/wallet").available == 2_000
    assert engine.ledger_balances(order_id)["CNY"] == {
        "payer:wechat": -2_000, "transit": 0, "vouchers:bob/wallet": 2_000,
        "merchant:shop-1": 0}


def test_a_recharge_refund_larger_than_the_balance_left_is_refused_and_moves_nothing(
        world: tuple[Engine, ScriptedChannel]) -> None:
    engine, channel = world
    order_id = paid_recharge(engine)
    engine.transfer("t-spend", "bob/wallet", "alice/wallet", 2_500)
    wait_for(lambda: engine.get_transfer("t-spend").settled, what="transfer settled")
    with pytest.raises(InsufficientBalance):
        engine.refund(order_id, "rf-big", 1_000)
    assert engine.get_order(order_id).refunds == ()
    assert engine.get_account("bob/wallet").available == 500
    assert not any(call[0] == "refund" for call in channel.calls)


def test_a_refund_the_channel_refuses_gives_the_clawed_back_value_to_the_account_again(
        world: tuple[Engine, ScriptedChannel]) -> None:
    engine, channel = world
    order_id = paid_recharge(engine)
    channel.refund_reply = REFUND_CLOSED
    engine.refund(order_id, "rf-no", 3_000)
    wait_for(lambda: engine.get_order(order_id).refund("rf-no").status == "failed",
             what="refund failed")
    wait_for(lambda: engine.get_order(order_id).settled, what="clawback undone")
    parts = dict((leg, status) for leg, _, status in engine.get_order(order_id).refund(
        "rf-no").parts)
    assert parts == {0: "failed", 1: "reversed"}
    assert engine.get_account("bob/wallet").available == 3_000
    balances = engine.ledger_balances(order_id)["CNY"]
    assert balances["vouchers:bob/wallet"] == 3_000 and balances["merchant:shop-1"] == 0


def test_a_transfer_holds_credits_then_confirms_and_conserves_the_total(
        world: tuple[Engine, ScriptedChannel]) -> None:
    engine, _ = world
    receipt = engine.transfer("t-1", "alice/wallet", "bob/wallet", 1_200)
    order = wait_for(lambda: (o := engine.get_transfer("t-1")).settled and o, what="settled")
    assert order.order_id == receipt.order_id and order.state == "succeeded"
    assert [(leg.mode, leg.status) for leg in order.legs] == [
        ("pre_deduct", "confirmed"), ("credit", "credited")]
    alice, bob = engine.get_account("alice/wallet"), engine.get_account("bob/wallet")
    assert (alice.available, alice.spent, bob.available) == (3_800, 1_200, 1_200)
    assert engine.ledger_balances(receipt.order_id) == {
        "CNY": {"vouchers:alice/wallet": -1_200, "transit": 0, "vouchers:bob/wallet": 1_200}}
    assert engine.transfer("t-1", "alice/wallet", "bob/wallet", 1_200) == receipt
    with pytest.raises(IdempotencyConflict):
        engine.transfer("t-1", "alice/wallet", "bob/wallet", 1_201)


def test_a_transfer_is_not_refunded(world: tuple[Engine, ScriptedChannel]) -> None:
    engine, _ = world
    receipt = engine.transfer("t-2", "alice/wallet", "bob/wallet", 100)
    wait_for(lambda: engine.get_transfer("t-2").settled, what="settled")
    with pytest.raises(IllegalTransition):
        engine.refund(receipt.order_id, "rf", 100)


@pytest.mark.parametrize(("source", "target", "amount", "error"), [
    ("alice/wallet", "alice/wallet", 100, InvalidRequest),
    ("alice/wallet", "ghost", 100, UnknownAccount),
    ("ghost", "bob/wallet", 100, UnknownAccount),
    ("alice/wallet", "carol/usd", 100, CurrencyMismatch),
    ("alice/wallet", "alice/points", 100, CurrencyMismatch),
    ("alice/wallet", "bob/wallet", 5_001, InsufficientBalance),
])
def test_a_transfer_that_cannot_be_made_is_refused_and_nothing_moves(
        world: tuple[Engine, ScriptedChannel], source: str, target: str, amount: int,
        error: type[Exception]) -> None:
    engine, _ = world
    with pytest.raises(error):
        engine.transfer("t-bad", source, target, amount)
    assert engine.get_account("alice/wallet").available == 5_000
    assert engine.get_account("bob/wallet").funded == 0
    assert engine.unsettled_count() == 0


def test_a_merchant_cannot_submit_under_the_transfer_merchant_id(
        world: tuple[Engine, ScriptedChannel]) -> None:
    engine, _ = world
    with pytest.raises(InvalidRequest):
        engine.submit(PaymentRequest("payengine:transfer", "t-x", "alice", "CNY", 100, "x",
                                     vouchers=(VoucherPart("alice/wallet", 100),),
                                     credit_account="bob/wallet"))


def test_a_recharge_whose_cash_succeeded_before_a_crash_is_credited_once_after_the_restart(
        tmp_path: Path) -> None:
    channel = ScriptedChannel()
    # the credit leaves the order, and the account never hears of it: then the crash
    engine = Engine.open(tmp_path / "pay.db", channels=[channel],  # type: ignore[list-item]
                         policy=SLOW_POLICY, voucher_link=lambda directory: _Dropping())
    engine.open_account("bob/wallet", "CNY")
    receipt = recharge_paying(engine, "top-c", 700)
    signed_callback(engine, "wechat", receipt.payment_serial, paid_reply(receipt.payment_serial))
    wait_for(lambda: credit_leg(engine, receipt.order_id)[1] == "crediting", what="crediting")
    engine.abandon()
    engine = open_engine(tmp_path / "pay.db", channel)
    order = wait_for(lambda: (o := engine.get_order(receipt.order_id)).settled and o,
                     what="credited after restart")
    assert order.state == "succeeded"
    assert engine.get_account("bob/wallet").funded == 700
    engine.shutdown()


class _Dropping:
    """A voucher link that loses every command: the account never hears of it."""

    def request(self, account_id: str, command: object) -> None:
        pass

    def reply(self, order_id: str, reply: object) -> None:
        pass


@pytest.mark.parametrize(("status", "error"), [("frozen", AccountFrozen),
                                               ("closed", AccountClosed)])
def test_a_transfer_from_or_to_a_frozen_or_closed_account_is_refused_and_nothing_moves(
        world: tuple[Engine, ScriptedChannel], status: str, error: type[Exception]) -> None:
    engine, _ = world
    engine.open_account("dave/wallet", "CNY")
    assert engine.set_account_status("dave/wallet", status) == "active"
    with pytest.raises(error):
        engine.transfer("t-to", "alice/wallet", "dave/wallet", 100)
    with pytest.raises(error):
        engine.transfer("t-from", "dave/wallet", "alice/wallet", 100)
    with pytest.raises(error):
        engine.recharge("shop-1", "top-f", "dave/wallet", 100, "CNY", CashPart(100, "wechat"))
    assert engine.get_account("alice/wallet").available == 5_000
    assert engine.get_account("dave/wallet").status == status
    assert engine.unsettled_count() == 0


def test_a_closed_account_stays_closed(world: tuple[Engine, ScriptedChannel]) -> None:
    engine, _ = world
    engine.set_account_status("bob/wallet", "closed")
    with pytest.raises(IllegalTransition):
        engine.set_account_status("bob/wallet", "active")
    with pytest.raises(InvalidRequest):
        engine.set_account_status("alice/wallet", "asleep")
    with pytest.raises(AccountClosed):
        engine.fund("bob/wallet", 100, funding_id="late")


def test_a_recharge_whose_account_froze_before_the_cash_came_is_refunded_not_credited(
        world: tuple[Engine, ScriptedChannel]) -> None:
    engine, channel = world
    channel.refund_reply = REFUND_OK
    receipt = recharge_paying(engine, "top-z", 900)
    engine.set_account_status("bob/wallet", "frozen")
    signed_callback(engine, "wechat", receipt.payment_serial, paid_reply(receipt.payment_serial))
    order = wait_for(lambda: (o := engine.get_order(receipt.order_id)).settled and o,
                     what="refunded")
    assert order.state == "failed" and order.cause == "credit_refused"
    assert [(leg.mode, leg.status) for leg in order.legs] == [
        ("cash", "refunded"), ("credit", "refused")]
    assert engine.get_account("bob/wallet").funded == 0
    assert engine.ledger_balances(receipt.order_id)["CNY"] == {"payer:wechat": 0, "transit": 0}


def test_a_transfer_whose_target_froze_after_the_hold_is_cancelled_all_or_nothing(
        tmp_path: Path) -> None:
    channel = ScriptedChannel()
    dropping = _Dropping()
    engine = Engine.open(tmp_path / "pay.db", channels=[channel],  # type: ignore[list-item]
                         policy=SLOW_POLICY, voucher_link=lambda directory: dropping)
    engine.open_account("alice/wallet", "CNY")
    engine.fund("alice/wallet", 1_000, funding_id="a")
    engine.open_account("bob/wallet", "CNY")
    receipt = engine.transfer("t-f", "alice/wallet", "bob/wallet", 400)
    engine.set_account_status("bob/wallet", "frozen")  # before the Try even arrives
    engine.abandon()
    engine = open_engine(tmp_path / "pay.db", channel)  # the commands go out again
    order = wait_for(lambda: (o := engine.get_order(receipt.order_id)).settled and o,
                     what="transfer undone")
    assert order.state == "failed"
    assert [(leg.mode, leg.status) for leg in order.legs] == [
        ("pre_deduct", "cancelled"), ("credit", "refused")]
    alice = engine.get_account("alice/wallet")
    assert (alice.available, alice.held, alice.spent) == (1_000, 0, 0)
    assert engine.get_account("bob/wallet").funded == 0
    engine.shutdown()


def test_the_readmes_recharge_and_transfer_example_runs_as_it_is(
        capsys: pytest.CaptureFixture[str]) -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("### Recharge and transfer"):]
    example = section.split("```python", 1)[1].split("```", 1)[0]
    exec(compile(example, "README.md", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert out == ["succeeded [('cash', 'paid'), ('credit', 'credited')]",
                   "{'CNY': {'payer:wechat': -5000, 'transit': 0, "
                   "'vouchers:alice/balance': 5000}}",
                   "succeeded 2000", "refused: insufficient_balance"]
