"""The state sequences the README gives for transfers and recharges, read from the journal."""

from __future__ import annotations

from pathlib import Path

from payengine import CashPart
from tests.blackbox_session4b.support import Wallet, open_with, paid
from tests.helpers import signed_callback, wait_for


def moves(engine: object, order_id: str, part: str) -> list[tuple[str, str]]:
    return [(e.from_state, e.to_state)
            for e in engine.journal(order_id) if e.part == part]  # type: ignore[attr-defined]


def test_a_transfer_goes_accepted_deducting_succeeded_with_the_readmes_leg_states(
        tmp_path: Path) -> None:
    eng = open_with(tmp_path / "x.db", [Wallet("wx")])
    try:
        eng.open_account("a", "CNY")
        eng.open_account("b", "CNY")
        eng.fund("a", 100, funding_id="f")
        r = eng.transfer("t1", "a", "b", 50)
        wait_for(lambda: eng.get_transfer("t1").settled)
        order = [s for _, s in moves(eng, r.order_id, "order")]
        assert order == ["accepted", "deducting", "succeeded"]
        source = [s for _, s in moves(eng, r.order_id, "leg:1")]
        assert source == ["trying", "held", "confirming", "confirmed"]
        target = [s for _, s in moves(eng, r.order_id, "leg:2")]
        assert target == ["crediting", "credited"]
        journal = [(e.part, e.to_state) for e in eng.journal(r.order_id)]
        assert journal.index(("leg:2", "credited")) < journal.index(("leg:1", "confirming"))
    finally:
        eng.shutdown()


def test_a_recharge_credits_only_after_paying_moved_to_deducting(tmp_path: Path) -> None:
    w = Wallet("wx")
    eng = open_with(tmp_path / "x.db", [w])
    try:
        eng.open_account("a", "CNY")
        r = eng.recharge("shop-1", "t-1", "a", 50_00, "CNY", CashPart(50_00, "wx"))
        wait_for(lambda: eng.get_order(r.order_id).state == "paying")
        signed_callback(eng, "wx", r.payment_serial, paid(r.payment_serial))
        wait_for(lambda: eng.get_order(r.order_id).settled)
        journal = [(e.part, e.from_state, e.to_state) for e in eng.journal(r.order_id)]
        order = [t for p, _, t in journal if p == "order"]
        assert order[-3:] == ["paying", "deducting", "succeeded"]
        credit = [(f, t) for p, f, t in journal if p == "leg:1"]
        assert credit == [("new", "crediting"), ("crediting", "credited")]
        assert journal.index(("order", "paying", "deducting")) \
            < journal.index(("leg:1", "new", "crediting"))
    finally:
        eng.shutdown()


def test_a_transfers_legs_name_the_source_and_the_target_accounts(tmp_path: Path) -> None:
    eng = open_with(tmp_path / "x.db", [Wallet("wx")])
    try:
        eng.open_account("a", "CNY")
        eng.open_account("b", "CNY")
        eng.fund("a", 100, funding_id="f")
        eng.transfer("t1", "a", "b", 50)
        view = wait_for(lambda: (m := eng.get_transfer("t1")).settled and m)
        assert [(leg.mode, leg.account_id) for leg in view.legs] == [("pre_deduct", "a"),
                                                                     ("credit", "b")]
        assert view.total_minor == 50
        assert view.currency == "CNY"
    finally:
        eng.shutdown()
