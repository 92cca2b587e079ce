"""Fresh-eyes review of issue 11's seams (session 3): one regression test per defect."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from payengine import (
    AttemptRefused,
    CashPart,
    Engine,
    EngineConfig,
    PaymentRequest,
)
from payengine.actors.risk_gate import RiskConfig, RiskContext
from payengine.engine.risk import RiskVerdict
from tests.helpers import ScriptedChannel, wait_for

FIRST = PaymentRequest("station-1", "pump3-0187", "alice", "CNY", 9_600, "Fuel",
                       CashPart(9_600, "wechat"))
SECOND = replace(FIRST, cash=CashPart(9_600, "alipay"), attempt=2)


class CountingHook:
    """A risk service that counts what it was asked (each ask may text the user a code)."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, int]] = []

    def assess(self, request: PaymentRequest, context: RiskContext) -> RiskVerdict:
        self.asked.append((request.merchant_order_no, request.attempt))
        return RiskVerdict.step_up("new_device", "9876") if request.attempt > 1 else (
            RiskVerdict.passed())


def test_an_attempt_refused_for_its_predecessor_is_never_put_to_the_risk_service(
        tmp_path: Path) -> None:
    """The gate ran before the attempt check: a next attempt made while attempt 1 was still
    paying asked the risk service (which texts the user a step-up code) and then was
    refused. Now the refusal comes first and the service is asked nothing."""
    hook = CountingHook()
    engine = Engine.open(tmp_path / "a.db", channels=[ScriptedChannel("wechat"),
                                                      ScriptedChannel("alipay")],
                         config=EngineConfig(duplicate_guard_window_ms=0),
                         risk=RiskConfig(hook=hook))
    try:
        first = engine.submit(FIRST)
        wait_for(lambda: engine.get_order(first.order_id).state == "paying", what="paying")
        with pytest.raises(AttemptRefused, match=r"attempt 1 .* is paying"):
            engine.submit(SECOND)
        with pytest.raises(AttemptRefused, match="the next is 2, not 3"):
            engine.submit(replace(SECOND, attempt=3))
        assert hook.asked == [("pump3-0187", 1)]
    finally:
        engine.shutdown()
