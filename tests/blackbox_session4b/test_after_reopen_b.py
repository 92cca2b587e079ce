"""Agreements, withholdings and transfers are read from the database after a reopen."""

from __future__ import annotations

from pathlib import Path

from payengine import AgreementStatus
from tests.blackbox_session4b.support import SLOW, AgreementWallet, Wallet, open_with
from tests.helpers import wait_for


def test_agreements_and_withholdings_survive_a_reopen(tmp_path: Path) -> None:
    wx = AgreementWallet("wx")
    eng = open_with(tmp_path / "x.db", [wx], policy=SLOW)
    a = eng.sign_agreement("alice", "wx")
    w = eng.withhold("gym-1", "sub-1", "alice", 99_00, "CNY", "Monthly")
    wait_for(lambda: wx.count("pay") == 1)
    eng.shutdown()
    eng = open_with(tmp_path / "x.db", [wx], policy=SLOW)
    try:
        assert eng.get_agreement(a.agreement_id).state == "active"
        assert eng.sign_agreement("alice", "wx").agreement_id == a.agreement_id
        again = eng.get_withholding("gym-1", "sub-1")
        assert (again.state, again.attempt, again.attempts) == ("paying", 1, w.attempts)
        assert eng.withhold("gym-1", "sub-1", "alice", 99_00, "CNY", "Monthly").attempt == 1
        wait_for(lambda: eng.resuming() == 0)
        assert wx.count("pay") >= 1
    finally:
        eng.shutdown()


def test_an_agreement_signing_at_shutdown_takes_its_callback_after_the_reopen(tmp_path: Path
                                                                             ) -> None:
    wx = AgreementWallet("wx", sign=AgreementStatus.PENDING)
    eng = open_with(tmp_path / "x.db", [wx], policy=SLOW)
    a = eng.sign_agreement("alice", "wx")
    eng.shutdown()
    eng = open_with(tmp_path / "x.db", [wx], policy=SLOW)
    try:
        assert eng.handle_agreement_callback("wx", a.agreement_id, "alice",
                                             AgreementStatus.SIGNED).state == "active"
    finally:
        eng.shutdown()


def test_a_transfer_is_found_by_its_id_after_a_reopen(tmp_path: Path) -> None:
    eng = open_with(tmp_path / "x.db", [Wallet("wx")], policy=SLOW)
    eng.open_account("a", "CNY")
    eng.open_account("b", "CNY")
    eng.fund("a", 100, funding_id="f")
    r = eng.transfer("t1", "a", "b", 50)
    wait_for(lambda: eng.get_transfer("t1").settled)
    eng.shutdown()
    eng = open_with(tmp_path / "x.db", [Wallet("wx")], policy=SLOW)
    try:
        assert eng.get_transfer("t1").order_id == r.order_id
        assert eng.transfer("t1", "a", "b", 50) == r
        assert eng.get_account("b").funded == 50
    finally:
        eng.shutdown()
