"""Retries of quoted submits (README: "A retry of an accepted submit gets its receipt even after
the quote expired") and the store's bound counting only unexpired quotes."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from payengine import IdempotencyConflict, Overloaded
from tests.blackbox_session4.support import (
    open_station,
    quote_request,
    readme_benefits,
    readme_sale,
)


def test_a_retry_gets_its_receipt_after_the_quote_was_pruned(tmp_path: Path) -> None:
    engine, clock, _ = open_station(tmp_path / "p.db")
    try:
        quote = engine.quote("station-42", "alice", readme_sale(), readme_benefits())
        request = quote_request(quote, quote.combinations[0])
        receipt = engine.submit(request)
        clock.clock_ms = quote.expires_at_ms + 1
        engine.quote("station-42", "alice", readme_sale())       # prunes the expired one
        assert engine.submit(request) == receipt
    finally:
        engine.shutdown()


def test_a_retry_gets_its_receipt_after_a_reopen_and_the_expiry(tmp_path: Path) -> None:
    engine, _clock, wechat = open_station(tmp_path / "r.db")
    quote = engine.quote("station-42", "alice", readme_sale(), readme_benefits())
    request = quote_request(quote, quote.combinations[0])
    receipt = engine.submit(request)
    engine.shutdown()
    engine, _, _ = open_station(tmp_path / "r.db", quote.expires_at_ms + 60_000, channel=wechat)
    try:
        assert engine.submit(request) == receipt
    finally:
        engine.shutdown()


def test_a_retry_naming_another_combination_is_a_conflict_not_a_new_order(
        tmp_path: Path) -> None:
    engine, _, _ = open_station(tmp_path / "c.db")
    try:
        quote = engine.quote("station-42", "alice", readme_sale(), readme_benefits())
        engine.submit(quote_request(quote, quote.combinations[0]))
        with pytest.raises(IdempotencyConflict):
            engine.submit(quote_request(quote, quote.combinations[1]))
    finally:
        engine.shutdown()


def test_a_retry_that_sends_the_quotes_sale_is_the_same_submit(tmp_path: Path) -> None:
    """README: "leave `sale` out, or send the quote's": either way the order's sale is the
    quote's, so the retry should be the same request."""
    engine, _, _ = open_station(tmp_path / "s.db")
    try:
        quote = engine.quote("station-42", "alice", readme_sale(), readme_benefits())
        request = quote_request(quote, quote.combinations[0])
        receipt = engine.submit(request)
        assert engine.submit(replace(request, sale=quote.sale)) == receipt
    finally:
        engine.shutdown()


def test_only_unexpired_quotes_count_towards_quotes_max(tmp_path: Path) -> None:
    engine, clock, _ = open_station(tmp_path / "m.db", quotes_max=3)
    try:
        for _ in range(3):
            engine.quote("station-42", "alice", readme_sale())
        clock.clock_ms += 5 * 60_000                      # all three expired (end excluded)
        for _ in range(3):
            engine.quote("station-42", "alice", readme_sale())
        with pytest.raises(Overloaded):
            engine.quote("station-42", "alice", readme_sale())
    finally:
        engine.shutdown()


def test_an_overloaded_quote_stores_nothing(tmp_path: Path) -> None:
    engine, _clock, _ = open_station(tmp_path / "o.db", quotes_max=1)
    try:
        kept = engine.quote("station-42", "alice", readme_sale())
        with pytest.raises(Overloaded):
            engine.quote("station-42", "alice", readme_sale())
        assert engine.get_quote(kept.quote_id) == kept
    finally:
        engine.shutdown()
