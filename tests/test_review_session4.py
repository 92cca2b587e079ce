"""Regressions for the fresh-eyes review of quotes, change_order and shift reports."""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest

from payengine import CashPart, Engine, EngineConfig, PaymentRequest, RequestRejected
from payengine.engine.discounts import QuoteMismatch
from payengine.engine.errors import UnknownAccount
from payengine.engine.order import LegMode, VoucherPart
from payengine.persistence import quotes as quotes_table
from payengine.sim.cli import main
from tests.helpers import ScriptedChannel, wait_for
from tests.test_discounts import at
from tests.test_quotes_engine import RULES, SALE, SetClock, request_for

PREVIOUS = PaymentRequest("m-1", "p-1", "alice", "CNY", 50_00, "95 fuel",
                          CashPart(50_00, "wechat"))


@pytest.fixture
def station(tmp_path: Path):
    clock = SetClock(at(13, 0))
    engine = Engine.open(tmp_path / "r.db", channels=[ScriptedChannel("wechat")],
                         runtime=clock,
                         config=EngineConfig(discounts=RULES, duplicate_guard_window_ms=0,
                                             quotes_max=3))
    yield engine, clock
    engine.shutdown()


def paying(engine: Engine, order_id: str) -> None:
    wait_for(lambda: engine.get_order(order_id).state == "paying", what="paying")


def test_a_change_naming_a_quote_another_order_claimed_closes_nothing(station):
    engine, _ = station
    previous = engine.submit(PREVIOUS)
    paying(engine, previous.order_id)
    quote = engine.quote("m-1", "alice", SALE)
    engine.submit(request_for(quote.quote_id, "c1", 19494, no="other"))
    with pytest.raises(QuoteMismatch, match="pays merchant order other"):
        engine.change_order(previous.order_id, request_for(quote.quote_id, "c1", 19494,
                                                           no="p-2"))
    assert engine.get_order(previous.order_id).state == "paying"


def test_a_submit_refused_on_the_way_claims_no_quote(station):
    engine, _ = station
    quote = engine.quote("m-1", "alice", SALE)
    wrong = replace(request_for(quote.quote_id, "c1", 19494, no="n-1"),
                    cash=CashPart(18494, "wechat"),
                    vouchers=(VoucherPart("nobody/rp", 10_00, LegMode.PRE_DEDUCT),))
    with pytest.raises(UnknownAccount):
        engine.submit(wrong)
    with pytest.raises(QuoteMismatch):
        engine.submit(replace(request_for(quote.quote_id, "c1", 19494, no="n-2"),
                              sale=replace(SALE, pump=9)))
    assert engine.submit(request_for(quote.quote_id, "c1", 19494, no="n-3")).attempt == 1


def test_the_same_change_again_returns_its_receipt_after_the_quote_expired(station):
    engine, clock = station
    previous = engine.submit(PREVIOUS)
    paying(engine, previous.order_id)
    quote = engine.quote("m-1", "alice", SALE)
    request = request_for(quote.quote_id, "c1", 19494, no="p-2")
    changed = engine.change_order(previous.order_id, request)
    clock.clock_ms = quote.expires_at_ms
    assert engine.change_order(previous.order_id, request) == changed


def test_a_change_for_a_frozen_user_is_refused_before_anything_is_closed(station):
    engine, _ = station
    previous = engine.submit(PREVIOUS)
    paying(engine, previous.order_id)
    engine.set_user_status("alice", "frozen")
    with pytest.raises(RequestRejected):
        engine.change_order(previous.order_id, replace(PREVIOUS, merchant_order_no="p-2"))
    assert engine.get_order(previous.order_id).state == "paying"


def test_expired_quotes_never_count_against_quotes_max(station, monkeypatch):
    engine, clock = station
    monkeypatch.setattr(quotes_table, "PRUNE_BATCH", 1)  # more expired rows than one prune
    for _ in range(3):
        engine.quote("m-1", "alice", SALE)
    clock.clock_ms += RULES.quote_ttl_ms
    for _ in range(3):  # each prunes one expired row only; none counts
        engine.quote("m-1", "alice", SALE)


def test_the_shift_report_reads_beside_a_writer_holding_the_database(tmp_path: Path, capsys):
    db = tmp_path / "w.db"
    with Engine.open(db, channels=[ScriptedChannel("wechat")]):
        pass
    writer = sqlite3.connect(db, isolation_level=None, timeout=0.1)
    writer.execute("BEGIN IMMEDIATE")
    try:
        assert main(["report", "shift", "--station", "s", "--shift", "A", "--db", str(db),
                     "--json"]) == 0
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    assert '"orders": 0' in capsys.readouterr().out
