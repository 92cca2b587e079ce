"""The double-entry ledger: payer -> transit -> merchant, and back out for money that must
not stay. Every posting sums to zero; a closed order's money never reaches the merchant."""

from __future__ import annotations

from pathlib import Path

import pytest

from payengine import (
    CashPart,
    ChannelReply,
    Engine,
    EngineConfig,
    NotificationRejected,
    PaymentRequest,
)
from tests.helpers import (
    ScriptedChannel,
    fuel_request,
    fund_customer,
    open_engine,
    paid_order,
    paid_reply,
    signed_callback,
    wait_for,
)

REFUND_OK = ChannelReply("SUCCESS", "SUCCESS")


def nonzero(balances: dict[str, int]) -> dict[str, int]:
    return {account: amount for account, amount in balances.items() if amount}


def test_a_paid_order_moves_every_leg_through_transit_to_the_merchant_less_the_fee(
    tmp_path: Path
) -> None:
    channel = ScriptedChannel()
    engine = open_engine(tmp_path / "pay.db", channel,
                         config=EngineConfig(ask_timeout_s=5.0, fee_ppm={"wechat": 6_000},
                                             duplicate_guard_window_ms=0))
    try:
        fund_customer(engine)
        receipt = paid_order(engine)
        assert nonzero(engine.ledger_balances(receipt.order_id)["CNY"]) == {
            "payer:wechat": -9_600, "vouchers:alice/red-packet": -100,
            "vouchers:alice/points": -200, "vouchers:alice/phone": -100,
            "merchant:station-1": 10_000 - 58, "fees:wechat": 58,
        }
        assert engine.ledger_balances(receipt.order_id)["CNY"]["transit"] == 0
        assert list(engine.ledger_balances()) == ["CNY"]
        assert sum(engine.ledger_balances()["CNY"].values()) == 0
        assert engine.unbalanced_postings() == []
    finally:
        engine.shutdown()


def test_a_success_after_the_close_is_refunded_from_transit_and_never_reaches_the_merchant(
    engine: Engine, channel: ScriptedChannel
) -> None:
    channel.refund_reply = REFUND_OK
    receipt = engine.submit(fuel_request())
    wait_for(lambda: engine.get_order(receipt.order_id).state == "paying", what="holds")
    engine.close(receipt.order_id)
    signed_callback(engine, "wechat", receipt.payment_serial, paid_reply(receipt.payment_serial))
    wait_for(lambda: engine.get_order(receipt.order_id).settled, what="refunded")
    balances = engine.ledger_balances(receipt.order_id)["CNY"]
    assert "merchant:station-1" not in balances
    assert nonzero(balances) == {}
    entries = engine.store.ledger_entries(receipt.order_id)
    assert [(account, amount) for _, account, amount, _ in entries] == [
        ("payer:wechat", -9_600), ("transit", 9_600),
        ("transit", -9_600), ("payer:wechat", 9_600)]


def test_refunds_take_from_the_merchant_and_give_back_to_payer_and_vouchers(
    engine: Engine, channel: ScriptedChannel
) -> None:
    channel.refund_reply = REFUND_OK
    receipt = paid_order(engine)
    engine.refund(receipt.order_id, "rf-1", 9_700)
    second = ChannelReply("SUCCESS", "SUCCESS", "TX2", 9_600)
    channel.charge_query_reply = second  # the channel confirms the second charge when asked
    with pytest.raises(NotificationRejected, match="unconfirmed"):
        signed_callback(engine, "wechat", receipt.payment_serial, second)
    wait_for(lambda: engine.get_order(receipt.order_id).refunds[-1:] and engine.get_order(
        receipt.order_id).settled, what="refunds done")
    assert nonzero(engine.ledger_balances(receipt.order_id)["CNY"]) == {
        "merchant:station-1": 300, "vouchers:alice/points": -200,
        "vouchers:alice/phone": -100,
    }
    assert engine.unbalanced_postings() == []


def _pay_cash(engine: Engine, no: str, currency: str, amount_minor: int) -> str:
    receipt = engine.submit(PaymentRequest(
        merchant_id="station-1", merchant_order_no=no, user_id="bob", currency=currency,
        total_minor=amount_minor, title="Fuel", cash=CashPart(amount_minor, "wechat")))
    wait_for(lambda: engine.get_order(receipt.order_id).state == "paying", what="paying")
    signed_callback(engine, "wechat", receipt.payment_serial,
                           ChannelReply("SUCCESS", "SUCCESS", f"TX-{no}", amount_minor))
    wait_for(lambda: engine.get_order(receipt.order_id).settled, what="paid")
    return receipt.order_id


def test_balances_of_two_currencies_are_kept_apart(engine: Engine) -> None:
    """96.00 CNY and 96 JPY are not 192 of anything: each currency has its own balances,
    and in each they sum to zero."""
    cny_order = _pay_cash(engine, "cny-1", "CNY", 9_600)
    jpy_order = _pay_cash(engine, "jpy-1", "JPY", 96)
    paid = {"payer:wechat": -9_600, "merchant:station-1": 9_600, "transit": 0}
    assert engine.ledger_balances() == {
        "CNY": paid, "JPY": {"payer:wechat": -96, "merchant:station-1": 96, "transit": 0}}
    assert engine.ledger_balances(cny_order) == {"CNY": paid}
    assert engine.ledger_balances(jpy_order) == {
        "JPY": {"payer:wechat": -96, "merchant:station-1": 96, "transit": 0}}
    assert engine.unbalanced_postings() == []


def test_an_order_id_no_order_has_is_unknown_to_the_ledger_and_the_journal(
        engine: Engine) -> None:
    from payengine import UnknownOrder

    with pytest.raises(UnknownOrder):
        engine.ledger_balances("ord_nobody")
    with pytest.raises(UnknownOrder):
        engine.journal("ord_nobody")
