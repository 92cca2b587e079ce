"""Situations planted bugs need are made on purpose in every run, not left to the draws."""

from __future__ import annotations

import pytest

from payengine.engine.order import OrderState
from payengine.sim.oracle import check_one_success_per_trade
from payengine.sim.simulation import SimConfig, SimResult, run


@pytest.fixture(scope="module")
def seed_4() -> SimResult:
    """Seed 4: most of its payments fail or close (its luck was poor)."""
    return run(SimConfig(seed=4))


def test_a_run_whose_payments_mostly_fail_still_meets_each_deliberate_situation(
    seed_4: SimResult,
) -> None:
    assert seed_4.ok, seed_4.violations
    faults = seed_4.faults
    assert faults["refund_twice"] >= 1  # refunded whole, then whole again
    assert faults["refund_twice_refused:refund_refused"] == faults["refund_twice"]
    assert faults["pay_again_at_once"] >= 1
    assert faults["stale_processing"] >= 1
    assert faults["quote_edit_at_once"] == 3


@pytest.mark.parametrize("bug, invariant", [
    ("over-refund", "over-asking-refund-refused"),
    ("two-attempts-succeed", "next-attempt-after-unpaid"),
    ("capture-above-authorisation", "capture-accepted-within-authorisation-once"),
    ("change-keeps-holds", "change-closes-previous"),
])
def test_a_bug_is_caught_by_the_check_of_its_deliberate_situation_under_a_poor_seed(
    bug: str, invariant: str,
) -> None:
    result = run(SimConfig(seed=4, plant_bug=bug))
    assert invariant in {v.invariant for v in result.violations}


class _Order:
    """What ``check_one_success_per_trade`` reads of an order."""

    def __init__(self, order_id: str, attempt: int, state: OrderState) -> None:
        self.order_id, self.attempt, self.state = order_id, attempt, state
        self.merchant_id, self.merchant_order_no = "m", "n1"


def test_an_attempt_that_succeeded_before_a_next_one_was_taken_is_a_violation() -> None:
    orders = [_Order("o1", 1, OrderState.SUCCEEDED), _Order("o2", 2, OrderState.FAILED)]
    [violation] = check_one_success_per_trade(orders)  # type: ignore[arg-type]
    assert violation.invariant == "one-success-per-trade"
    assert violation.detail == "attempt 1 succeeded, yet attempt 2 was taken after it"


def test_the_last_attempt_succeeding_after_unpaid_ones_is_no_violation() -> None:
    orders = [_Order("o1", 1, OrderState.CLOSED), _Order("o2", 2, OrderState.FAILED),
              _Order("o3", 3, OrderState.SUCCEEDED)]
    assert check_one_success_per_trade(orders) == []  # type: ignore[arg-type]
