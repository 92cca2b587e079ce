"""Cross-cutting promises: typed errors, thread safety of change_order, the README's open()."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from payengine import (
    CashPart,
    Engine,
    EngineConfig,
    PaymentError,
    PaymentRequest,
    QuoteExpired,
    QuoteMismatch,
    QuoteRefused,
    UnknownQuote,
)
from tests.blackbox_session4.support import (
    README_RULES,
    open_station,
    quote_request,
    readme_benefits,
    readme_sale,
)
from tests.helpers import ScriptedChannel


def test_quote_refusals_are_typed_payment_errors_with_their_codes() -> None:
    for error, code in ((UnknownQuote, "unknown_quote"), (QuoteExpired, "quote_expired"),
                        (QuoteMismatch, "quote_mismatch")):
        assert issubclass(error, QuoteRefused) and issubclass(error, PaymentError)
        assert error.code == code


def test_the_readme_opens_the_engine_on_a_str_path(tmp_path: Path) -> None:
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        engine = Engine.open("station.db", channels=[ScriptedChannel("wallet")],
                             config=EngineConfig(discounts=README_RULES))
        try:
            engine.open_account("alice/points", "POINTS", minor_per_unit=10)
            engine.quote("station-42", "alice", readme_sale(), readme_benefits())
        finally:
            engine.shutdown()
        assert (tmp_path / "station.db").exists()
    finally:
        os.chdir(cwd)


def test_refusals_leave_every_actor_alive(tmp_path: Path) -> None:
    engine, clock, _ = open_station(tmp_path / "a.db")
    try:
        quote = engine.quote("station-42", "alice", readme_sale(), readme_benefits())
        for request in (quote_request(quote, quote.combinations[0], user="bob"),):
            with pytest.raises(QuoteRefused):
                engine.submit(request)
        clock.clock_ms = quote.expires_at_ms
        with pytest.raises(QuoteExpired):
            engine.submit(quote_request(quote, quote.combinations[0]))
        assert engine.broken_actors() == {}
    finally:
        engine.shutdown()


def test_concurrent_identical_changes_make_one_new_order(tmp_path: Path) -> None:
    engine, _, _ = open_station(tmp_path / "c.db")
    try:
        first = engine.submit(PaymentRequest("station-42", "n-1", "alice", "CNY", 100_00,
                                             "fuel", CashPart(100_00, "wechat")))
        request = PaymentRequest("station-42", "n-2", "alice", "CNY", 90_00, "fuel",
                                 CashPart(90_00, "wechat"))
        receipts: list = []
        errors: list = []

        def change() -> None:
            try:
                receipts.append(engine.change_order(first.order_id, request))
            except Exception as error:
                errors.append(error)
        threads = [threading.Thread(target=change) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert len({r.order_id for r in receipts}) == 1
        assert engine.get_order(first.order_id).state == "closed"
    finally:
        engine.shutdown()
