"""Money as integers: amounts, units, voucher values and the validation of a new order."""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from payengine.engine.errors import CurrencyMismatch, InvalidAmount, InvalidRequest, PaymentError
from payengine.engine.money import AMOUNT_MAX, Money, check_amount, check_unit, value_in_minor
from payengine.engine.order import (
    AccountUnit,
    CashPart,
    LegMode,
    LegStatus,
    OrderPolicy,
    OrderState,
    PaymentRequest,
    VoucherPart,
    build_order,
)
from payengine.engine.voucher import FenceKey

FAST = settings(max_examples=200, deadline=None)
POLICY = OrderPolicy()
T0 = 1_700_000_000_000
ACCOUNTS = {
    "redpacket": AccountUnit("CNY", None),
    "credit": AccountUnit("CNY", None),
    "points": AccountUnit("POINTS", 10),
    "dollars": AccountUnit("USD", None),
    "worthless": AccountUnit("STARS", 0),
}


def _request(
    total: object = 10_000,
    cash: CashPart | None = CashPart(10_000, "wechat"),  # noqa: B008 - frozen value
    vouchers: tuple[VoucherPart, ...] = (),
    **fields: object,
) -> PaymentRequest:
    base: dict[str, object] = {
        "merchant_id": "m1",
        "merchant_order_no": "mo-1",
        "user_id": "u1",
        "currency": "CNY",
        "total_minor": total,
        "title": "fuel 92#",
        "cash": cash,
        "vouchers": vouchers,
    }
    base.update(fields)
    return PaymentRequest(**base)  # type: ignore[arg-type]


def _build(request: PaymentRequest, policy: OrderPolicy = POLICY):
    return build_order(
        request, order_id="o1", payment_serial="s1", now_ms=T0, accounts=ACCOUNTS, policy=policy
    )


# --------------------------------------------------------------------------- check_amount


@FAST
@given(st.floats(allow_nan=True, allow_infinity=True))
def test_any_float_amount_is_refused_even_a_whole_one(amount: float) -> None:
    with pytest.raises(InvalidAmount):
        check_amount(amount)


@pytest.mark.parametrize("amount", [True, False])
def test_a_bool_is_not_an_amount_although_it_is_an_int(amount: bool) -> None:
    with pytest.raises(InvalidAmount):
        check_amount(amount)


@pytest.mark.parametrize("amount", ["100", None, Decimal("1"), Fraction(1), 1 + 0j, [1]])
def test_non_integer_amounts_are_refused(amount: object) -> None:
    with pytest.raises(InvalidAmount):
        check_amount(amount)


def test_zero_is_not_an_amount() -> None:
    with pytest.raises(InvalidAmount, match="positive"):
        check_amount(0)


@FAST
@given(st.integers(max_value=-1))
def test_negative_amounts_are_refused(amount: int) -> None:
    with pytest.raises(InvalidAmount, match="positive"):
        check_amount(amount)


@FAST
@given(st.integers(min_value=AMOUNT_MAX + 1))
def test_amounts_above_the_maximum_are_refused(amount: int) -> None:
    with pytest.raises(InvalidAmount, match="exceeds"):
        check_amount(amount)


@FAST
@given(st.integers(min_value=1, max_value=AMOUNT_MAX))
def test_every_positive_int_up_to_the_maximum_is_returned_unchanged(amount: int) -> None:
    assert check_amount(amount) == amount


def test_the_maximum_and_one_fen_are_the_bounds_of_a_valid_amount() -> None:
    assert check_amount(1) == 1
    assert check_amount(AMOUNT_MAX) == AMOUNT_MAX
    assert AMOUNT_MAX < 2**63


def test_an_invalid_amount_is_a_payment_error_with_its_code() -> None:
    with pytest.raises(PaymentError) as caught:
        check_amount(1.5, "cash")
    assert caught.value.code == "invalid_amount"
    assert "cash" in caught.value.message


# --------------------------------------------------------------------------- units and Money


@pytest.mark.parametrize("unit", ["CNY", "USD", "POINTS", "RED_PACKET", "A1"])
def test_upper_case_codes_are_units(unit: str) -> None:
    assert check_unit(unit) == unit


@pytest.mark.parametrize("unit", ["cny", "", "C", "1CNY", "CN Y", None, 156, "A" * 17])
def test_anything_else_is_not_a_unit(unit: object) -> None:
    with pytest.raises(InvalidRequest):
        check_unit(unit)


def test_money_refuses_a_float_amount_and_a_bad_currency() -> None:
    with pytest.raises(InvalidAmount):
        Money(1.0, "CNY")  # type: ignore[arg-type]
    with pytest.raises(InvalidAmount):
        Money(True, "CNY")
    with pytest.raises(InvalidAmount):
        Money(0, "CNY")
    with pytest.raises(InvalidRequest):
        Money(100, "cny")


@FAST
@given(st.integers(1, AMOUNT_MAX // 2), st.integers(1, AMOUNT_MAX // 2))
def test_money_of_one_currency_adds_exactly(a: int, b: int) -> None:
    assert Money(a, "CNY").add(Money(b, "CNY")) == Money(a + b, "CNY")


def test_money_of_two_currencies_does_not_add() -> None:
    with pytest.raises(CurrencyMismatch):
        Money(100, "CNY").add(Money(100, "USD"))


def test_a_sum_above_the_maximum_is_refused() -> None:
    with pytest.raises(InvalidAmount):
        Money(AMOUNT_MAX, "CNY").add(Money(1, "CNY"))


@pytest.mark.parametrize(
    ("amount", "text"), [(1, "0.01 CNY"), (100, "1.00 CNY"), (9_605, "96.05 CNY")]
)
def test_money_prints_as_whole_and_two_minor_digits(amount: int, text: str) -> None:
    assert str(Money(amount, "CNY")) == text


@pytest.mark.parametrize(
    ("amount", "currency", "text"),
    [(96, "JPY", "96 JPY"), (1_005, "KWD", "1.005 KWD"), (12_345, "CLF", "1.2345 CLF"),
     (5, "BHD", "0.005 BHD"), (9_600, "USD", "96.00 USD"), (100, "VND", "100 VND")],
)
def test_money_prints_with_its_currency_minor_digits(amount: int, currency: str,
                                                      text: str) -> None:
    """Yen have no minor unit and dinars three: 96 JPY is not "0.96 JPY"."""
    assert str(Money(amount, currency)) == text


def test_money_in_a_code_the_table_does_not_know_prints_its_minor_units() -> None:
    assert str(Money(9_600, "XXZ")) == "9600 minor units of XXZ"


def test_a_money_voucher_is_worth_its_face_value_in_its_own_currency() -> None:
    assert value_in_minor(100, "CNY", None, "CNY") == 100


def test_points_are_worth_their_rate_in_minor_units() -> None:
    assert value_in_minor(20, "POINTS", 10, "CNY") == 200


def test_a_voucher_in_another_currency_cannot_pay() -> None:
    with pytest.raises(CurrencyMismatch):
        value_in_minor(100, "USD", None, "CNY")


def test_points_worth_more_than_the_maximum_are_refused() -> None:
    with pytest.raises(InvalidAmount):
        value_in_minor(AMOUNT_MAX, "POINTS", 2, "CNY")


# --------------------------------------------------------------------------- build_order


def test_the_combined_payment_of_the_seeds_builds_four_legs_in_accepted() -> None:
    # 100.00 = 96.00 cash + 1.00 red packet + 20 points (0.10 each) + 1.00 phone credit
    order = _build(
        _request(
            total=10_000,
            cash=CashPart(9_600, "wechat"),
            vouchers=(
                VoucherPart("redpacket", 100),
                VoucherPart("points", 20, LegMode.POST_DEDUCT),
                VoucherPart("credit", 100, LegMode.PRE_HELD, hold_id="pre-1"),
            ),
        )
    )
    assert order.state is OrderState.ACCEPTED
    assert order.version == 0
    legs = [(leg.leg_no, leg.mode, leg.amount, leg.unit, leg.value_minor) for leg in order.legs]
    assert legs == [
        (0, LegMode.CASH, 9_600, "CNY", 9_600),
        (1, LegMode.PRE_DEDUCT, 100, "CNY", 100),
        (2, LegMode.POST_DEDUCT, 20, "POINTS", 200),
        (3, LegMode.PRE_HELD, 100, "CNY", 100),
    ]
    # only the pre-held leg names a caller's hold; the others are fenced in the order's scope
    assert [leg.hold_id for leg in order.legs] == [None, None, None, "pre-1"]
    assert [order.fence_of(leg) for leg in order.legs[1:]] == [
        FenceKey.order_leg("o1", 1), FenceKey.order_leg("o1", 2), FenceKey.user("pre-1")]
    assert all(leg.status is LegStatus.NEW for leg in order.legs)
    assert order.cash_leg is not None and order.cash_leg.channel == "wechat"
    assert order.close_at_ms == T0 + POLICY.pay_window_ms
    assert order.hold_expires_at_ms == order.close_at_ms + POLICY.hold_grace_ms


@FAST
@given(
    cash=st.integers(1, 10**9),
    red=st.integers(1, 10**6),
    points=st.integers(1, 10**6),
    delta=st.integers(-(10**6), 10**6).filter(lambda d: d != 0),
)
def test_legs_that_do_not_add_up_to_the_total_are_an_invalid_request(
    cash: int, red: int, points: int, delta: int
) -> None:
    parts = (VoucherPart("redpacket", red), VoucherPart("points", points))
    exact = cash + red + points * 10
    assert _build(_request(total=exact, cash=CashPart(cash, "wechat"), vouchers=parts))
    if exact + delta <= 0:
        return
    with pytest.raises(InvalidRequest, match="add up"):
        _build(_request(total=exact + delta, cash=CashPart(cash, "wechat"), vouchers=parts))


def test_a_voucher_in_another_currency_is_a_currency_mismatch() -> None:
    with pytest.raises(CurrencyMismatch):
        _build(
            _request(
                total=10_000, cash=CashPart(9_000, "wechat"),
                vouchers=(VoucherPart("dollars", 1_000),),
            )
        )


_FLOAT = 100.0
_HALF_FLOAT = 50.0


@pytest.mark.parametrize(
    "request_",
    [
        pytest.param(_request(total=_FLOAT, cash=CashPart(100, "wechat")), id="total"),
        pytest.param(_request(total=100, cash=CashPart(_FLOAT, "wechat")), id="cash"),  # type: ignore[arg-type]
        pytest.param(
            _request(
                total=100, cash=CashPart(50, "wechat"),
                vouchers=(VoucherPart("redpacket", _HALF_FLOAT),),  # type: ignore[arg-type]
            ),
            id="voucher",
        ),
        pytest.param(_request(total=True, cash=CashPart(True, "wechat")), id="bool"),
    ],
)
def test_float_or_bool_amounts_anywhere_in_a_request_are_refused(request_: PaymentRequest) -> None:
    with pytest.raises(InvalidAmount):
        _build(request_)


def test_a_negative_or_zero_voucher_part_is_refused() -> None:
    for amount in (0, -50):
        with pytest.raises(InvalidAmount):
            _build(
                _request(
                    total=100, cash=CashPart(100 - amount, "wechat"),
                    vouchers=(VoucherPart("redpacket", amount),),
                )
            )


def test_a_voucher_worth_nothing_is_refused() -> None:
    with pytest.raises(InvalidAmount, match="worth nothing"):
        _build(
            _request(
                total=100, cash=CashPart(100, "wechat"), vouchers=(VoucherPart("worthless", 5),)
            )
        )


def test_a_request_without_any_part_is_refused() -> None:
    with pytest.raises(InvalidRequest, match="needs a cash part"):
        _build(_request(cash=None, vouchers=()))


def test_the_same_account_in_two_parts_is_refused() -> None:
    with pytest.raises(InvalidRequest, match="two parts"):
        _build(
            _request(
                total=300, cash=CashPart(100, "wechat"),
                vouchers=(VoucherPart("redpacket", 100), VoucherPart("redpacket", 100)),
            )
        )


def test_a_pre_held_part_needs_a_hold_id_and_only_it_may_name_one() -> None:
    with pytest.raises(InvalidRequest, match="names no hold_id"):
        _build(
            _request(
                total=200, cash=CashPart(100, "wechat"),
                vouchers=(VoucherPart("redpacket", 100, LegMode.PRE_HELD),),
            )
        )
    with pytest.raises(InvalidRequest, match="only for pre_held"):
        _build(
            _request(
                total=200, cash=CashPart(100, "wechat"),
                vouchers=(VoucherPart("redpacket", 100, LegMode.PRE_DEDUCT, hold_id="h"),),
            )
        )


def test_a_voucher_part_in_cash_mode_is_refused() -> None:
    with pytest.raises(InvalidRequest, match="voucher mode"):
        _build(
            _request(
                total=200, cash=CashPart(100, "wechat"),
                vouchers=(VoucherPart("redpacket", 100, LegMode.CASH),),
            )
        )


@pytest.mark.parametrize("window", [0, -1, True, 1.5, POLICY.pay_window_ms_max + 1])
def test_a_pay_window_out_of_range_is_refused(window: object) -> None:
    with pytest.raises(InvalidRequest, match="pay_window_ms"):
        _build(_request(pay_window_ms=window))


@pytest.mark.parametrize("field", ["merchant_id", "merchant_order_no", "user_id", "title"])
@pytest.mark.parametrize("value", ["", None, "x" * 129])
def test_missing_or_overlong_text_fields_are_refused(field: str, value: object) -> None:
    with pytest.raises(InvalidRequest, match=field):
        _build(_request(**{field: value}))


def test_a_lower_case_currency_is_refused() -> None:
    with pytest.raises(InvalidRequest):
        _build(_request(currency="cny"))


def test_a_cash_part_needs_a_channel() -> None:
    with pytest.raises(InvalidRequest, match="channel"):
        _build(_request(cash=CashPart(10_000, "")))


def test_more_parts_than_the_policy_allows_are_refused() -> None:
    policy = OrderPolicy(legs_max=2)
    accounts = {"a": AccountUnit("CNY", None), "b": AccountUnit("CNY", None)}
    request = _request(
        total=300, cash=CashPart(100, "wechat"),
        vouchers=(VoucherPart("a", 100), VoucherPart("b", 100)),
    )
    with pytest.raises(InvalidRequest, match="at most 1"):
        build_order(
            request, order_id="o1", payment_serial="s1", now_ms=T0, accounts=accounts, policy=policy
        )


def test_equal_requests_have_equal_fingerprints_and_any_difference_changes_it() -> None:
    a = _request()
    assert a.fingerprint() == _request().fingerprint()
    assert _build(a).fingerprint == a.fingerprint()
    assert a.fingerprint() != _request(title="fuel 95#").fingerprint()
    assert a.fingerprint() != _request(total=10_001, cash=CashPart(10_001, "wechat")).fingerprint()
    assert a.fingerprint() != _request(cash=CashPart(10_000, "alipay")).fingerprint()
