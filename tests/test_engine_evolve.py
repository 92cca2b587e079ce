"""``engine.evolve.evolve``: the core's cheaper ``dataclasses.replace``, the same result."""

from __future__ import annotations

import dataclasses

import pytest

from payengine.engine.errors import InvalidRequest
from payengine.engine.evolve import evolve
from payengine.engine.order import Leg, LegMode, LegStatus, OrderPolicy, OrderState, PaymentOrder
from payengine.engine.voucher import FenceKey


def _order() -> PaymentOrder:
    legs = (Leg(0, LegMode.CASH, None, 700, "CNY", 700, None, channel="wechat"),
            Leg(1, LegMode.PRE_DEDUCT, "c1/rp", 300, "CNY", 300, None))
    return PaymentOrder(
        order_id="ord1", merchant_id="m", merchant_order_no="n1", payment_serial="P1",
        user_id="u", title="Fuel", currency="CNY", total_minor=1_000, fingerprint="f",
        state=OrderState.ACCEPTED, cause="submitted", created_at_ms=1, close_at_ms=2,
        hold_expires_at_ms=3, legs=legs, pay_in_flight=True, confirm_query_at_ms=5)


def test_evolve_gives_what_replace_gives_and_leaves_the_original_alone() -> None:
    order = _order()
    changes = {"state": OrderState.PAYING, "version": 4, "next_query_at_ms": 9}
    new = evolve(order, **changes)
    assert new == dataclasses.replace(order, **changes)  # type: ignore[arg-type]
    assert type(new) is PaymentOrder and new is not order
    # fields not compared (the volatile ones) are copied too
    assert (new.pay_in_flight, new.confirm_query_at_ms) == (True, 5)
    assert (order.state, order.version, order.next_query_at_ms) == (OrderState.ACCEPTED, 0, None)
    leg = evolve(order.legs[1], status=LegStatus.TRYING)
    assert leg == dataclasses.replace(order.legs[1], status=LegStatus.TRYING)
    assert evolve(order) == order
    with pytest.raises(dataclasses.FrozenInstanceError):
        new.version = 5  # type: ignore[misc]
    key = FenceKey.order_leg("ord1", 1)
    assert evolve(key) == key and hash(evolve(key)) == hash(key)


def test_an_unknown_field_is_a_type_error_as_with_replace() -> None:
    with pytest.raises(TypeError, match="no field 'colour'"):
        evolve(_order(), colour="red")


def test_a_class_with_post_init_goes_through_replace_and_is_still_checked() -> None:
    policy = OrderPolicy()
    assert evolve(policy, pay_window_ms=1_000) == dataclasses.replace(policy,
                                                                      pay_window_ms=1_000)
    with pytest.raises(InvalidRequest):
        evolve(policy, pay_window_ms=-1)
