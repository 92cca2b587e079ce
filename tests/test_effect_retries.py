"""A committed decision whose effects fail to go out is retried with a backoff, a bounded
number of times (actors.order_actor._carry_out_all); the retries stop and start over once
the effects go out."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from payengine import Engine, EngineConfig, OrderPolicy
from payengine.actors import order_actor
from payengine.actors.directory import Directory
from payengine.actors.messages import FromOrder
from payengine.actors.voucher_link import DirectVoucherLink
from tests.helpers import ScriptedChannel, fuel_request, fund_customer, wait_for


class BrokenLink(DirectVoucherLink):
    """A link to the voucher accounts that raises while ``broken``: the order's TryHold
    cannot go out. Counts the attempts."""

    def __init__(self, directory: Directory) -> None:
        super().__init__(directory)
        self.broken = True
        self.attempts = 0

    def request(self, account_id: str, command: FromOrder) -> None:
        self.attempts += 1
        if self.broken:
            raise RuntimeError("voucher system unreachable")
        super().request(account_id, command)


@pytest.fixture
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(order_actor, "EFFECT_RETRY_FIRST_MS", 5)
    monkeypatch.setattr(order_actor, "EFFECT_RETRY_MAX_MS", 20)
    monkeypatch.setattr(order_actor, "EFFECT_RETRIES_MAX", 4)


def open_engine(path: Path, links: list[BrokenLink]) -> Engine:
    def link(directory: Directory) -> BrokenLink:
        links.append(BrokenLink(directory))
        return links[-1]

    policy = OrderPolicy(pay_window_ms=600_000, voucher_retry_schedule_ms=(600_000,),
                         hold_grace_ms=1_300_000)  # the voucher schedule never fires here
    return Engine.open(path, channels=[ScriptedChannel()], policy=policy,
                       config=EngineConfig(duplicate_guard_window_ms=0), voucher_link=link)


def test_an_effect_that_keeps_failing_is_retried_a_bounded_number_of_times(
        tmp_path: Path, quick_retries: None) -> None:
    links: list[BrokenLink] = []
    with open_engine(tmp_path / "e.db", links) as engine:
        fund_customer(engine)
        receipt = engine.submit(fuel_request())
        legs = len(engine.get_order(receipt.order_id).legs) - 1  # the voucher legs' Trys
        wait_for(lambda: links[0].attempts >= legs * 5, what="the first try and 4 retries")
        time.sleep(1.5)  # beyond the whole backoff (55 ms): nothing more may come
        assert links[0].attempts == legs * (1 + 4)
        assert engine.get_order(receipt.order_id).state == "accepted"  # nothing acted on


def test_retries_stop_once_the_effects_go_out_and_the_order_goes_on(
        tmp_path: Path, quick_retries: None) -> None:
    links: list[BrokenLink] = []
    with open_engine(tmp_path / "e.db", links) as engine:
        fund_customer(engine)
        receipt = engine.submit(fuel_request())
        legs = len(engine.get_order(receipt.order_id).legs) - 1
        wait_for(lambda: links[0].attempts >= legs * 2, what="a retry")
        links[0].broken = False
        wait_for(lambda: engine.get_order(receipt.order_id).state == "paying",
                 what="holds placed once the link works again")
