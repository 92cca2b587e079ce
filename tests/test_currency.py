"""Currencies come from one table (ISO 4217 with each code's minor digits, extensible per
engine by ``EngineConfig(currencies=...)``): orders, money vouchers and statements in a
currency the table does not know are refused, typed, with nothing created."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from payengine import (
    CashPart,
    Engine,
    EngineConfig,
    InvalidRequest,
    PaymentRequest,
    UnknownOrder,
    VoucherPart,
)
from payengine.engine.currency import (
    ISO_4217,
    MINOR_DIGITS_MAX,
    check_currency,
    currency_table,
    minor_digits,
)
from payengine.engine.statement import (
    StatementError,
    format_amount,
    format_time,
    parse_amount,
    parse_statement,
)
from tests.helpers import PAID, ScriptedChannel, open_engine, signed_callback, wait_for

T = "2026-11-24T10:15:00Z"
HEADER = "channel,channel_txn_id,out_trade_no,amount,currency,status,time"

COMMON = {
    "CNY": 2, "USD": 2, "EUR": 2, "GBP": 2, "HKD": 2, "JPY": 0, "KRW": 0, "TWD": 2, "SGD": 2,
    "MOP": 2, "AUD": 2, "CAD": 2, "CHF": 2, "THB": 2, "MYR": 2, "IDR": 2, "PHP": 2, "VND": 0,
    "INR": 2, "RUB": 2, "BHD": 3, "KWD": 3, "JOD": 3, "OMR": 3, "TND": 3, "CLF": 4,
}


def config(**currencies: int) -> EngineConfig:
    return EngineConfig(ask_timeout_s=5.0, duplicate_guard_window_ms=0, currencies=currencies)


def cash_request(no: str, currency: str, amount_minor: int = 9_600) -> PaymentRequest:
    return PaymentRequest(merchant_id="station-1", merchant_order_no=no, user_id="alice",
                          currency=currency, total_minor=amount_minor, title="Fuel",
                          cash=CashPart(amount_minor, "wechat"))


@pytest.fixture
def engine(tmp_path: Path, channel: ScriptedChannel) -> Iterator[Engine]:
    """An engine that also knows the testing currency XTS (3 digits, unlike ISO's none)."""
    eng = open_engine(tmp_path / "pay.db", channel, config=config(XTS=3))
    yield eng
    eng.shutdown()


# --------------------------------------------------------------------------- the table


@pytest.mark.parametrize(("code", "digits"), sorted(COMMON.items()))
def test_the_table_knows_the_common_currencies_and_their_minor_digits(code: str,
                                                                       digits: int) -> None:
    assert ISO_4217[code] == digits
    assert minor_digits(code) == digits


@pytest.mark.parametrize("code", ["XXZ", "XTS", "XAU", "cny", "CN", "POINTS", "", "RMB"])
def test_codes_that_are_not_known_currencies_are_refused(code: str) -> None:
    with pytest.raises(InvalidRequest, match="known currency"):
        check_currency(code)


def test_configuration_adds_and_overrides_entries_for_one_table_only() -> None:
    table = currency_table({"XTS": 2, "JPY": 2})
    assert (table["XTS"], table["JPY"], table["CNY"]) == (2, 2, 2)
    assert "XTS" not in ISO_4217 and ISO_4217["JPY"] == 0
    assert config(XTS=2).currency_table["XTS"] == 2
    assert "XTS" not in EngineConfig().currency_table
    copied = copy.deepcopy(config(XTS=2))  # a config can be copied (and pickled) whole
    assert copied.currency_table["XTS"] == 2 and copied.currencies == {"XTS": 2}


@pytest.mark.parametrize("extra", [
    {"xts": 2}, {"POINTS": 2}, {"XT": 2}, {"XTS": MINOR_DIGITS_MAX + 1}, {"XTS": -1},
    {"XTS": True}, {"XTS": 2.0}, {"XTS": "2"}, {3: 2},
])
def test_a_bad_configured_currency_refuses_the_config(extra: dict[object, object]) -> None:
    with pytest.raises(InvalidRequest):
        EngineConfig(currencies=extra)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- orders


def test_an_order_in_an_unknown_currency_is_refused_and_nothing_is_created(
    engine: Engine, channel: ScriptedChannel
) -> None:
    with pytest.raises(InvalidRequest, match="known currency") as caught:
        engine.submit(cash_request("xxz-1", "XXZ"))
    assert caught.value.code == "invalid_request"
    with pytest.raises(UnknownOrder):
        engine.find_order("station-1", "xxz-1")
    assert channel.calls == []
    assert engine.ledger_balances() == {}
    assert engine.notifications.events() == []


def test_a_configured_currency_is_accepted_and_paid(engine: Engine,
                                                     channel: ScriptedChannel) -> None:
    receipt = engine.submit(cash_request("xts-1", "XTS", 1_005))
    wait_for(lambda: engine.get_order(receipt.order_id).state == "paying", what="paying")
    signed_callback(engine, "wechat", receipt.payment_serial, PAID)
    order = wait_for(lambda: (o := engine.get_order(receipt.order_id)).settled and o,
                     what="paid")
    assert (order.state, order.currency) == ("succeeded", "XTS")
    assert channel.calls[0] == ("pay", receipt.payment_serial, "1005")


def test_without_the_configuration_the_same_currency_is_refused(
    tmp_path: Path, channel: ScriptedChannel
) -> None:
    plain = open_engine(tmp_path / "plain.db", channel)
    try:
        with pytest.raises(InvalidRequest, match="known currency"):
            plain.submit(cash_request("xts-1", "XTS"))
        assert channel.calls == []
    finally:
        plain.shutdown()


# --------------------------------------------------------------------------- voucher accounts


def test_a_money_voucher_must_be_in_a_known_currency(engine: Engine) -> None:
    """Without ``minor_per_unit`` an account is a money voucher in its unit: a unit nobody
    knows as a currency would be a voucher that can never pay."""
    for unit in ("XXZ", "POINTS", "RED_PACKET"):
        with pytest.raises(InvalidRequest, match="known currency"):
            engine.open_account(f"alice/{unit}", unit)
    assert engine.open_account("alice/yen", "JPY").unit == "JPY"
    assert engine.open_account("alice/test", "XTS").unit == "XTS"  # configured


def test_a_points_like_unit_with_a_value_may_be_any_code(engine: Engine) -> None:
    for unit in ("POINTS", "XXZ", "MILES"):
        assert engine.open_account(f"alice/{unit}", unit, minor_per_unit=10).unit == unit
    engine.fund("alice/XXZ", 100, funding_id="f-1")
    receipt = engine.submit(PaymentRequest(
        merchant_id="station-1", merchant_order_no="pts-1", user_id="alice", currency="CNY",
        total_minor=500, title="Fuel", vouchers=(VoucherPart("alice/XXZ", 50),)))
    assert engine.get_order(receipt.order_id).total_minor == 500


# --------------------------------------------------------------------------- statements


def test_a_statement_line_in_an_unknown_currency_is_refused_naming_the_line() -> None:
    text = f"{HEADER}\nwechat,T1,P1,96.00,CNY,SUCCESS,{T}\nwechat,T2,P2,96.00,XXZ,SUCCESS,{T}\n"
    with pytest.raises(StatementError, match="known currency") as caught:
        parse_statement(text)
    assert caught.value.line_no == 3


def test_statement_amounts_use_the_engines_table() -> None:
    table = currency_table({"XTS": 3, "JPY": 2})
    (line,) = parse_statement(f"{HEADER}\nwechat,T1,P1,1.005,XTS,SUCCESS,{T}\n", table)
    assert (line.amount_minor, line.currency) == (1_005, "XTS")
    assert parse_amount("96.00", "JPY", currencies=table) == 9_600
    with pytest.raises(StatementError):
        parse_amount("96", "JPY", currencies=table)
    with pytest.raises(StatementError, match="known currency"):
        format_amount(1_005, "XTS")
    assert format_amount(1_005, "XTS", table) == "1.005"


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted(ISO_4217)), st.integers(1, 10**15))
def test_every_known_currency_round_trips_with_its_own_digits(currency: str,
                                                              amount: int) -> None:
    text = format_amount(amount, currency)
    digits = ISO_4217[currency]
    assert (text.partition(".")[2] == "") if digits == 0 else len(text.partition(".")[2]) == digits
    assert parse_amount(text, currency) == amount


def test_reconcile_reads_amounts_in_a_configured_currency_and_refuses_an_unknown_one(
    engine: Engine, channel: ScriptedChannel
) -> None:
    receipt = engine.submit(cash_request("xts-2", "XTS", 1_005))
    wait_for(lambda: engine.get_order(receipt.order_id).state == "paying", what="paying")
    serial = receipt.payment_serial
    unknown = f"{HEADER}\nwechat,T9,{serial},1.005,XXZ,SUCCESS,{T}\n"
    with pytest.raises(StatementError, match="known currency"):
        engine.reconcile(unknown)
    assert engine.get_order(receipt.order_id).state == "paying"
    now = format_time(engine.runtime.now_ms())
    report = engine.reconcile(f"{HEADER}\nwechat,T9,{serial},1.005,XTS,SUCCESS,{now}\n")
    assert [e.verdict.value for e in report.entries] == ["RESOLVED_SUCCESS"]
    order = wait_for(lambda: (o := engine.get_order(receipt.order_id)).settled and o,
                     what="paid by the statement")
    assert order.state == "succeeded"
    assert "1.005 XTS" in report.to_table(routine=True)
