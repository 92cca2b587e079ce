"""Withholding under a risk gate: a block is raised and nothing kept; a step-up nobody
answers fails the withholding; transfers pass the gate."""

from __future__ import annotations

from pathlib import Path

import pytest

from payengine import (
    Engine,
    EngineConfig,
    InsufficientBalance,
    OrderPolicy,
    RiskBlocked,
    RiskConfig,
    RiskRules,
    UnknownWithholding,
)
from tests.blackbox_session4b.support import AgreementWallet, Wallet
from tests.helpers import wait_for


def open_risky(path: Path, channels: list[object], rules: RiskRules, **risk: object) -> Engine:
    return Engine.open(path, channels=channels,  # type: ignore[arg-type]
                       policy=OrderPolicy(pay_window_ms=60_000, query_schedule_ms=(60_000,),
                                          refund_query_schedule_ms=(60_000,)),
                       config=EngineConfig(ask_timeout_s=5.0, duplicate_guard_window_ms=0),
                       risk=RiskConfig(rules=rules, **risk))  # type: ignore[arg-type]


def test_a_withhold_the_risk_gate_blocks_raises_risk_blocked_and_keeps_nothing(tmp_path: Path
                                                                              ) -> None:
    wx = AgreementWallet("wx")
    eng = open_risky(tmp_path / "x.db", [wx], RiskRules(amount_max={"CNY": 50_00}))
    try:
        eng.sign_agreement("alice", "wx")
        with pytest.raises(RiskBlocked) as caught:
            eng.withhold("gym-1", "sub-1", "alice", 99_00, "CNY", "Monthly")
        assert caught.value.rule == "amount_max"
        with pytest.raises(UnknownWithholding):
            eng.get_withholding("gym-1", "sub-1")
        assert wx.count("pay") == 0
        assert eng.withhold("gym-1", "sub-2", "alice", 49_00, "CNY", "Monthly").state == "paying"
    finally:
        eng.shutdown()


def test_a_withholding_whose_step_up_nobody_answers_fails(tmp_path: Path) -> None:
    wx = AgreementWallet("wx")
    eng = open_risky(tmp_path / "x.db", [wx], RiskRules(step_up_amount={"CNY": 50_00}),
                     issue_code=lambda request, context: "123456",
                     verification_window_ms=1_000)
    try:
        eng.sign_agreement("alice", "wx")
        eng.sign_agreement("alice", "wx")
        eng.withhold("gym-1", "sub-1", "alice", 99_00, "CNY", "Monthly")
        w = wait_for(lambda: (x := eng.get_withholding("gym-1", "sub-1")).state != "paying"
                     and x, timeout_s=15, what="withholding decided")
        assert (w.state, w.attempt) == ("failed", 1)
        assert wx.count("pay") == 0
    finally:
        eng.shutdown()


def test_a_transfer_the_risk_gate_blocks_is_refused_before_anything_moves(tmp_path: Path
                                                                          ) -> None:
    eng = open_risky(tmp_path / "x.db", [Wallet("wx")], RiskRules(blocked_users=frozenset({"a"})))
    try:
        eng.open_account("a", "CNY")
        eng.open_account("b", "CNY")
        eng.fund("a", 100, funding_id="f")
        with pytest.raises(RiskBlocked):
            eng.transfer("t1", "a", "b", 50)
        assert eng.get_account("a").available == 100
        with pytest.raises(InsufficientBalance):
            eng.transfer("t2", "a", "b", 101)
    finally:
        eng.shutdown()
