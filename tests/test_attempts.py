"""A trade order paid again (issue 11, item 7): attempt n+1 under the same merchant order
number once attempt n failed or closed, maybe with another method; only one attempt can
succeed, and a success on an older attempt is refunded."""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from payengine import (
    AttemptRefused,
    CashPart,
    Engine,
    EngineConfig,
    IdempotencyConflict,
    OrderPolicy,
    OrderState,
    PaymentRequest,
    UnknownOrder,
)
from payengine.engine.order import build_order, check_next_attempt
from tests.helpers import ScriptedChannel, paid_reply, signed_callback, wait_for

FIRST = PaymentRequest("station-1", "pump3-0187", "alice", "CNY", 9_600, "Fuel",
                       CashPart(9_600, "wechat"))
SECOND = replace(FIRST, cash=CashPart(9_600, "alipay"), attempt=2)


def open_engine(path: Path) -> tuple[Engine, ScriptedChannel, ScriptedChannel]:
    wechat, alipay = ScriptedChannel("wechat"), ScriptedChannel("alipay")
    engine = Engine.open(path, channels=[wechat, alipay],
                         config=EngineConfig(duplicate_guard_window_ms=0))
    return engine, wechat, alipay


def closed(engine: Engine, order_id: str) -> None:
    wait_for(lambda: engine.get_order(order_id).state == "paying", what="paying")
    engine.close(order_id)
    wait_for(lambda: engine.get_order(order_id).settled, what="closed and settled")


# ---------------------------------------------------------------- the rule, pure


def _latest(state: OrderState, attempt: int = 1) -> object:
    order = build_order(replace(FIRST, attempt=attempt), order_id="o1", payment_serial="s1",
                        now_ms=0, accounts={}, policy=OrderPolicy())
    return replace(order, state=state)


@given(st.sampled_from(OrderState), st.integers(1, 4), st.integers(1, 6),
       st.sampled_from([9_600, 9_601]), st.sampled_from(["alice", "bob"]))
def test_a_next_attempt_is_taken_exactly_after_a_failed_or_closed_one_of_the_same_trade(
        state: OrderState, latest_no: int, attempt: int, total: int, user: str) -> None:
    latest = _latest(state, latest_no)
    request = replace(FIRST, attempt=attempt, total_minor=total, user_id=user,
                      cash=CashPart(total, "alipay"))
    ok = (attempt == latest_no + 1 and state in (OrderState.FAILED, OrderState.CLOSED)
          and (total, user) == (9_600, "alice"))
    try:
        check_next_attempt(latest, request)  # type: ignore[arg-type]
    except (AttemptRefused, IdempotencyConflict) as error:
        assert not ok, error
        if attempt == latest_no + 1 and state in (OrderState.FAILED, OrderState.CLOSED):
            assert isinstance(error, IdempotencyConflict)
    else:
        assert ok


# ---------------------------------------------------------------- the engine


def test_a_closed_order_is_paid_again_as_attempt_two_through_another_method(
        tmp_path: Path) -> None:
    engine, _, alipay = open_engine(tmp_path / "a.db")
    try:
        first = engine.submit(FIRST)
        closed(engine, first.order_id)
        second = engine.submit(SECOND)
        assert (first.attempt, second.attempt) == (1, 2)
        assert second.order_id != first.order_id
        assert second.payment_serial != first.payment_serial
        assert engine.find_order("station-1", "pump3-0187").order_id == second.order_id
        assert engine.find_order("station-1", "pump3-0187", attempt=1).state == "closed"
        wait_for(lambda: alipay.count("pay") == 1, what="attempt 2 paid through alipay")
        assert engine.submit(SECOND) == second  # a retry of attempt 2: the same receipt
        assert engine.submit(FIRST) == first  # and of attempt 1
    finally:
        engine.shutdown()


@pytest.mark.parametrize("until", ["paying", "succeeded"])
def test_no_next_attempt_while_the_latest_may_still_succeed_or_did(tmp_path: Path,
                                                                   until: str) -> None:
    engine, _, _ = open_engine(tmp_path / "a.db")
    try:
        first = engine.submit(FIRST)
        wait_for(lambda: engine.get_order(first.order_id).state == "paying", what="paying")
        if until == "succeeded":
            signed_callback(engine, "wechat", first.payment_serial,
                            paid_reply(first.payment_serial, 9_600))
        with pytest.raises(AttemptRefused, match=f"attempt 1 .* is {until}"):
            engine.submit(SECOND)
        with pytest.raises(UnknownOrder):
            engine.find_order("station-1", "pump3-0187", attempt=2)  # nothing created
    finally:
        engine.shutdown()


def test_attempts_are_numbered_in_order_and_pay_the_same_trade(tmp_path: Path) -> None:
    engine, _, _ = open_engine(tmp_path / "a.db")
    try:
        with pytest.raises(AttemptRefused, match="never submitted"):
            engine.submit(SECOND)
        first = engine.submit(FIRST)
        closed(engine, first.order_id)
        with pytest.raises(AttemptRefused, match="the next is 2, not 3"):
            engine.submit(replace(SECOND, attempt=3))
        with pytest.raises(IdempotencyConflict, match="same trade"):
            engine.submit(replace(SECOND, total_minor=9_500, cash=CashPart(9_500, "alipay")))
        engine.submit(SECOND)
        with pytest.raises(IdempotencyConflict):  # attempt 2 again, other parameters
            engine.submit(replace(SECOND, cash=CashPart(9_600, "wechat")))
    finally:
        engine.shutdown()


def test_a_success_on_the_older_attempt_is_refunded_and_only_one_payment_is_kept(
        tmp_path: Path) -> None:
    engine, wechat, _ = open_engine(tmp_path / "a.db")
    try:
        first = engine.submit(FIRST)
        closed(engine, first.order_id)
        second = engine.submit(SECOND)
        wait_for(lambda: engine.get_order(second.order_id).state == "paying", what="paying")
        signed_callback(engine, "alipay", second.payment_serial,
                        paid_reply(second.payment_serial, 9_600))
        # the user had paid attempt 1 in the wallet after all: its late success
        wechat.refund_reply = wechat.refund_query_reply = wechat.query_reply = paid_reply(
            first.payment_serial, 9_600)
        signed_callback(engine, "wechat", first.payment_serial,
                        paid_reply(first.payment_serial, 9_600))
        wait_for(lambda: engine.get_order(first.order_id).legs[0].status == "refunded",
                 what="attempt 1 refunded")
        wait_for(lambda: engine.get_order(second.order_id).settled, what="attempt 2 settled")
        states = [engine.find_order("station-1", "pump3-0187", attempt=n).state
                  for n in (1, 2)]
        assert states == ["closed", "succeeded"]
        assert engine.ledger_balances()["CNY"]["merchant:station-1"] == 9_600
    finally:
        engine.shutdown()


def test_the_same_next_attempt_submitted_at_once_from_eight_threads_makes_one_order(
        tmp_path: Path) -> None:
    engine, _, _ = open_engine(tmp_path / "a.db")
    try:
        first = engine.submit(FIRST)
        closed(engine, first.order_id)
        receipts: list[object] = []
        gate = threading.Barrier(8)

        def submit() -> None:
            gate.wait()
            receipts.append(engine.submit(SECOND))

        threads = [threading.Thread(target=submit) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(receipts) == 8 and len(set(receipts)) == 1  # type: ignore[arg-type]
        assert engine.find_order("station-1", "pump3-0187").attempt == 2
    finally:
        engine.shutdown()


def test_attempts_survive_a_reopen(tmp_path: Path) -> None:
    engine, _, _ = open_engine(tmp_path / "a.db")
    first = engine.submit(FIRST)
    closed(engine, first.order_id)
    second = engine.submit(SECOND)
    engine.shutdown()
    engine, _, _ = open_engine(tmp_path / "a.db")
    try:
        assert engine.find_order("station-1", "pump3-0187").order_id == second.order_id
        assert engine.get_order(second.order_id).attempt == 2
        assert engine.submit(SECOND) == second
    finally:
        engine.shutdown()


def test_a_signed_pay_of_the_next_attempt_is_taken_after_the_first_closed(
        tmp_path: Path) -> None:
    from payengine import MerchantSigner, RequestRejected

    engine, _, alipay = open_engine(tmp_path / "a.db")
    try:
        secret = "station-1-request-key-0123456789abcdef"
        engine.register_merchant_key("station-1", secret=secret)
        signer = MerchantSigner("station-1", secret=secret)
        first = engine.submit_signed(*signer.pay(FIRST))
        closed(engine, first.order_id)
        with pytest.raises(RequestRejected) as refused:  # the cached attempt-1 URL again
            engine.submit_signed(*signer.pay(FIRST))
        assert refused.value.reason == "pay_window_over"
        second = engine.submit_signed(*signer.pay(SECOND))
        assert second.attempt == 2 and second.order_id != first.order_id
        assert engine.submit_signed(*signer.pay(SECOND)) == second  # a retry, signed anew
        wait_for(lambda: alipay.count("pay") == 1, what="attempt 2 paid through alipay")
    finally:
        engine.shutdown()


def test_a_retry_is_answered_with_its_receipt_even_once_its_channel_is_gone(
        tmp_path: Path) -> None:
    """A retried submit is answered, never decided anew: not by a channel the engine no
    longer has (review finding: it was InvalidRequest), nor by an account deleted since.
    The order is settled first: an engine is not opened at all without a channel that
    unsettled orders use (``ChannelsMissing``, tests/test_defects.py)."""
    engine, _, _ = open_engine(tmp_path / "a.db")
    first = engine.submit(FIRST)
    closed(engine, first.order_id)
    engine.shutdown()
    reopened = Engine.open(tmp_path / "a.db", channels=[ScriptedChannel("alipay")],
                           config=EngineConfig(duplicate_guard_window_ms=0))
    try:
        assert reopened.submit(FIRST) == first
        with pytest.raises(IdempotencyConflict):
            reopened.submit(replace(FIRST, title="Fuel, pump 4"))
    finally:
        reopened.shutdown()
