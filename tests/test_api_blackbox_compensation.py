"""Black-box tests of compensation, money conservation and races, written from the README
("Using the engine from Python", "Refunds", "The ledger", "Reconciliation", "Notifications
and the outbox", "Order states") and SPEC.md (R-COMP, R-DUP, R-RECON) only.

The cash channel is the scripted fake of ``tests/helpers.py``: the tests feed every callback
themselves, no timer fires unless a test asks for a short schedule.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from payengine import (
    CashPart,
    ChannelReply,
    DuplicateSuspected,
    Engine,
    EngineConfig,
    IdempotencyConflict,
    IllegalTransition,
    NotificationConfig,
    NotificationRejected,
    OrderView,
    OutboxEvent,
    PaymentError,
    PaymentRequest,
    RefundRefused,
    RefundView,
    StatementError,
    VoucherPart,
)
from tests.helpers import (
    NO_ANSWER,
    REFUND_CLOSED,
    REFUND_OK,
    SLOW_POLICY,
    ScriptedChannel,
    fuel_request,
    fund_customer,
    open_engine,
    paid_order,
    paid_reply,
    signed_callback,
    signed_refund_callback,
    wait_for,
)

PAY_FAILED = ChannelReply("SUCCESS", "PAYERROR")
HEADER = "channel,channel_txn_id,out_trade_no,amount,currency,status,time,refund_id\n"
T = 5.0  # generous polling timeout; every test finishes far below it


# --------------------------------------------------------------------------- fixtures




# --------------------------------------------------------------------------- helpers


def settled(engine: Engine, order_id: str) -> OrderView:
    return wait_for(lambda: (o := engine.get_order(order_id)).settled and o, T,
                    what=f"order {order_id} settled")


def refund_of(engine: Engine, order_id: str, refund_no: str) -> RefundView:
    view = engine.get_order(order_id).refund(refund_no)
    assert view is not None
    return view


def refund_settled(engine: Engine, order_id: str, refund_no: str, timeout_s: float = T
                   ) -> RefundView:
    return wait_for(
        lambda: (r := refund_of(engine, order_id, refund_no)).status != "refunding" and r,
        timeout_s,
        what=f"refund {refund_no} decided")


def refund_calls(channel: ScriptedChannel) -> list[tuple[str, ...]]:
    with channel._lock:
        return [c for c in channel.calls if c[0] == "refund"]


def paying(engine: Engine, request: PaymentRequest) -> OrderView:
    receipt = engine.submit(request)
    return wait_for(lambda: (o := engine.get_order(receipt.order_id)).state == "paying" and o,
                    T, what="order paying")


def cash_request(no: str, total: int = 10_000, who: str = "alice",
                 merchant: str = "station-1") -> PaymentRequest:
    return PaymentRequest(merchant_id=merchant, merchant_order_no=no, user_id=who,
                          currency="CNY", total_minor=total, title="Fuel",
                          cash=CashPart(total, "wechat"))


def points_request(no: str) -> PaymentRequest:
    """100.00 = 96.00 cash + 40 points (4.00): the points leg is the last one."""
    return PaymentRequest(merchant_id="station-1", merchant_order_no=no, user_id="alice",
                          currency="CNY", total_minor=10_000, title="Fuel",
                          cash=CashPart(9_600, "wechat"),
                          vouchers=(VoucherPart("alice/points", 40),))


def pay(engine: Engine, request: PaymentRequest, txn: str = "TX1") -> OrderView:
    order = paying(engine, request)
    signed_callback(engine, "wechat", order.payment_serial,
                           ChannelReply("SUCCESS", "SUCCESS", txn, None))
    done = settled(engine, order.order_id)
    assert done.state == "succeeded"
    return done


def balances(engine: Engine, who: str = "alice") -> dict[str, tuple[int, int, int, int]]:
    out = {}
    for name in ("red-packet", "points", "phone"):
        a = engine.get_account(f"{who}/{name}")
        out[name] = (a.funded, a.available, a.held, a.spent)
    return out


def cny(ledger: dict[str, dict[str, int]]) -> dict[str, int]:
    """The CNY balances of ``Engine.ledger_balances`` (none if nothing was posted)."""
    return ledger.get("CNY", {})


def amount_text(minor: int) -> str:
    return f"{minor // 100}.{minor % 100:02d}"


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def line(serial: str, txn: str, minor: int, status: str = "SUCCESS", refund_id: str = "",
         at_ms: int | None = None) -> str:
    at = iso(at_ms if at_ms is not None else int(time.time() * 1000))
    return f"wechat,{txn},{serial},{amount_text(minor)},CNY,{status},{at},{refund_id}\n"


def verdicts(report: object) -> Counter[str]:
    counts = report.counts  # type: ignore[attr-defined]
    return Counter({str(getattr(k, "value", k)).upper(): v for k, v in counts.items() if v})


def assert_ledger_balanced(engine: Engine) -> None:
    assert not engine.unbalanced_postings()
    assert all(sum(by_account.values()) == 0 for by_account in engine.ledger_balances().values())


# =========================================================================== refunds


def test_full_refund_goes_cash_first_then_vouchers_and_gives_everything_back(
        engine: Engine, channel: ScriptedChannel) -> None:
    before = balances(engine)
    order = paid_order(engine)
    assert balances(engine)["points"] == (1_000, 980, 0, 20)

    refund = engine.refund(order.order_id, "full", 10_000, reason="pump stopped")
    assert refund.refund_no == "full"
    assert refund.kind == "merchant"
    assert refund.amount_minor == 10_000
    assert refund.status == "refunding"
    # cash first, then the vouchers in leg order, each in its own unit; vouchers wait
    # for the cash part to succeed
    assert refund.parts == ((0, 9_600, "sent"), (1, 100, "waiting"), (2, 20, "waiting"),
                            (3, 100, "waiting"))
    wait_for(lambda: refund_calls(channel), T, what="channel refund call")
    assert refund_calls(channel) == [("refund", order.payment_serial, refund.refund_id, "9600")]
    # nothing is returned to the voucher accounts before the cash went back
    assert balances(engine)["points"] == (1_000, 980, 0, 20)

    signed_refund_callback(engine, "wechat", order.payment_serial, refund.refund_id, REFUND_OK)
    done = settled(engine, order.order_id)
    assert done.state == "succeeded"  # a refunded order stays succeeded
    assert done.refunded_minor == 10_000
    final = done.refund("full")
    assert final is not None and final.status == "succeeded"
    assert final.parts == ((0, 9_600, "done"), (1, 100, "done"), (2, 20, "done"),
                           (3, 100, "done"))
    assert balances(engine) == before
    ledger = engine.ledger_balances(order.order_id)["CNY"]
    assert ledger["transit"] == 0
    assert ledger["merchant:station-1"] == 0
    assert all(v == 0 for v in ledger.values()), ledger
    assert_ledger_balanced(engine)


def test_partial_refund_takes_cash_only_and_reduces_the_merchant(
        engine: Engine, channel: ScriptedChannel) -> None:
    order = paid_order(engine)
    refund = engine.refund(order.order_id, "r-30", 3_000)
    assert refund.parts == ((0, 3_000, "sent"),)
    signed_refund_callback(engine, "wechat", order.payment_serial, refund.refund_id, REFUND_OK)
    assert refund_settled(engine, order.order_id, "r-30").status == "succeeded"
    done = settled(engine, order.order_id)
    assert done.refunded_minor == 3_000
    assert refund_calls(channel) == [("refund", order.payment_serial, refund.refund_id, "3000")]
    ledger = engine.ledger_balances(order.order_id)["CNY"]
    assert ledger["merchant:station-1"] == 7_000
    assert ledger["transit"] == 0
    assert ledger["payer:wechat"] == -6_600
    # vouchers untouched: still spent
    assert balances(engine)["points"] == (1_000, 980, 0, 20)
    assert_ledger_balanced(engine)


def test_refund_spilling_over_the_cash_takes_vouchers_in_leg_order(
        engine: Engine, channel: ScriptedChannel) -> None:
    order = paid_order(engine)
    # 96.00 cash + 1.00 red packet + 20 points (2.00) + 0.05 phone credit
    refund = engine.refund(order.order_id, "spill", 9_905)
    assert refund.parts == ((0, 9_600, "sent"), (1, 100, "waiting"), (2, 20, "waiting"),
                            (3, 5, "waiting"))
    signed_refund_callback(engine, "wechat", order.payment_serial, refund.refund_id, REFUND_OK)
    settled(engine, order.order_id)
    assert refund_of(engine, order.order_id, "spill").status == "succeeded"
    assert balances(engine) == {"red-packet": (1_000, 1_000, 0, 0),
                                "points": (1_000, 1_000, 0, 0),
                                "phone": (1_000, 905, 0, 95)}
    assert engine.ledger_balances(order.order_id)["CNY"]["merchant:station-1"] == 95
    assert engine.ledger_balances(order.order_id)["CNY"]["transit"] == 0


def test_points_refund_in_whole_units_only(engine: Engine, channel: ScriptedChannel) -> None:
    order = pay(engine, points_request("pts-1"))
    journal_before = list(engine.journal(order.order_id))
    # 0.05 on a points leg worth 0.10 per point cannot be split exactly
    with pytest.raises(RefundRefused):
        engine.refund(order.order_id, "odd", 9_605)
    after = engine.get_order(order.order_id)
    assert after.refunds == () and after.refunded_minor == 0
    assert list(engine.journal(order.order_id)) == journal_before
    # 0.10 is one point
    refund = engine.refund(order.order_id, "one-point", 9_610)
    assert refund.parts == ((0, 9_600, "sent"), (1, 1, "waiting"))
    signed_refund_callback(engine, "wechat", order.payment_serial, refund.refund_id, REFUND_OK)
    settled(engine, order.order_id)
    assert engine.get_account("alice/points").available == 1_000 - 40 + 1
    assert engine.ledger_balances(order.order_id)["CNY"]["merchant:station-1"] == 390


def test_refund_is_idempotent_by_refund_no(engine: Engine, channel: ScriptedChannel) -> None:
    order = paid_order(engine)
    first = engine.refund(order.order_id, "r1", 2_000, reason="r")
    again = engine.refund(order.order_id, "r1", 2_000, reason="r")
    assert again.refund_id == first.refund_id
    assert again.amount_minor == 2_000
    with pytest.raises(IdempotencyConflict):
        engine.refund(order.order_id, "r1", 2_500, reason="r")
    with pytest.raises(IdempotencyConflict):
        engine.refund(order.order_id, "r1", 2_000, reason="another reason")
    view = engine.get_order(order.order_id)
    assert len(view.refunds) == 1
    assert view.refunded_minor == 2_000
    wait_for(lambda: refund_calls(channel), T, what="refund call")
    signed_refund_callback(engine, "wechat", order.payment_serial, first.refund_id, REFUND_OK)
    settled(engine, order.order_id)
    # a retry after the refund succeeded still returns the same refund, no new money moves
    late = engine.refund(order.order_id, "r1", 2_000, reason="r")
    assert late.refund_id == first.refund_id and late.status == "succeeded"
    assert refund_calls(channel) == [("refund", order.payment_serial, first.refund_id, "2000")]
    assert engine.get_order(order.order_id).refunded_minor == 2_000


def test_over_refund_refused_and_state_untouched(engine: Engine, channel: ScriptedChannel
                                                 ) -> None:
    order = paid_order(engine)
    with pytest.raises(RefundRefused):
        engine.refund(order.order_id, "too-much", 10_001)
    engine.refund(order.order_id, "a", 6_000)
    journal = list(engine.journal(order.order_id))
    ledger = engine.ledger_balances(order.order_id)["CNY"]
    with pytest.raises(RefundRefused):
        engine.refund(order.order_id, "b", 4_001)
    view = engine.get_order(order.order_id)
    assert [r.refund_no for r in view.refunds] == ["a"]
    assert view.refunded_minor == 6_000
    assert list(engine.journal(order.order_id)) == journal
    assert engine.ledger_balances(order.order_id)["CNY"] == ledger
    # exactly what is left is fine
    rest = engine.refund(order.order_id, "b-exact", 4_000)
    assert rest.amount_minor == 4_000
    assert engine.get_order(order.order_id).refunded_minor == 10_000
    wait_for(lambda: len(refund_calls(channel)) == 2, T, what="two channel refunds")
    # what is left is 36.00 cash and the vouchers: only the cash goes to the channel
    assert rest.parts == ((0, 3_600, "sent"), (1, 100, "waiting"), (2, 20, "waiting"),
                          (3, 100, "waiting"))
    assert [c[3] for c in refund_calls(channel)] == ["6000", "3600"]


def test_refund_of_an_order_that_did_not_succeed_is_an_illegal_transition(
        engine: Engine, channel: ScriptedChannel) -> None:
    order = paying(engine, fuel_request("not-paid"))
    with pytest.raises(IllegalTransition):
        engine.refund(order.order_id, "r", 1_000)
    engine.close(order.order_id)
    closed = settled(engine, order.order_id)
    assert closed.state == "closed"
    with pytest.raises(IllegalTransition):
        engine.refund(order.order_id, "r", 1_000)
    assert engine.get_order(order.order_id).refunds == ()
    assert refund_calls(channel) == []


def test_refund_no_may_not_use_the_charge_prefix(engine: Engine) -> None:
    order = paid_order(engine)
    with pytest.raises(PaymentError):
        engine.refund(order.order_id, "charge:TX9", 1_000)
    assert engine.get_order(order.order_id).refunds == ()


def test_racing_refunds_never_exceed_what_was_paid(engine: Engine, channel: ScriptedChannel
                                                   ) -> None:
    order = paid_order(engine)
    barrier = threading.Barrier(20)
    accepted: list[RefundView] = []
    refused: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def ask(i: int) -> None:
        barrier.wait()
        try:
            view = engine.refund(order.order_id, f"race-{i}", 1_000)
        except RefundRefused:
            with lock:
                refused.append(i)
        except BaseException as error:  # reported below
            with lock:
                errors.append(error)
        else:
            with lock:
                accepted.append(view)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(T)
    assert errors == []
    assert len(accepted) == 10 and len(refused) == 10
    assert len({r.refund_id for r in accepted}) == 10
    view = engine.get_order(order.order_id)
    assert view.refunded_minor == 10_000
    assert sum(r.amount_minor for r in view.refunds) == 10_000
    # the channel is asked for the cash part only, 96.00 in all
    wait_for(lambda: len(refund_calls(channel)) == 10, T, what="10 channel refunds")
    assert sum(int(c[3]) for c in refund_calls(channel)) == 9_600
    for r in accepted:
        signed_refund_callback(engine, "wechat", order.payment_serial, r.refund_id, REFUND_OK)
    done = settled(engine, order.order_id)
    assert all(r.status == "succeeded" for r in done.refunds)
    ledger = engine.ledger_balances(order.order_id)["CNY"]
    assert ledger["merchant:station-1"] == 0 and ledger["transit"] == 0
    assert all(v == 0 for v in ledger.values()), ledger
    assert balances(engine)["points"] == (1_000, 1_000, 0, 0)
    assert_ledger_balanced(engine)


def test_racing_retries_of_one_refund_no_make_one_refund(engine: Engine,
                                                         channel: ScriptedChannel) -> None:
    order = paid_order(engine)
    barrier = threading.Barrier(12)
    got: list[str] = []
    lock = threading.Lock()

    def ask() -> None:
        barrier.wait()
        view = engine.refund(order.order_id, "same", 5_000)
        with lock:
            got.append(view.refund_id)

    threads = [threading.Thread(target=ask) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(T)
    assert len(got) == 12 and len(set(got)) == 1
    assert engine.get_order(order.order_id).refunded_minor == 5_000
    wait_for(lambda: refund_calls(channel), T)
    signed_refund_callback(engine, "wechat", order.payment_serial, got[0], REFUND_OK)
    settled(engine, order.order_id)
    assert {c[2] for c in refund_calls(channel)} == {got[0]}
    assert engine.ledger_balances(order.order_id)["CNY"]["merchant:station-1"] == 5_000


def test_duplicated_and_late_refund_callbacks_change_nothing(
        engine: Engine, channel: ScriptedChannel) -> None:
    order = paid_order(engine)
    refund = engine.refund(order.order_id, "r", 9_700)  # cash + the red packet
    for _ in range(3):
        signed_refund_callback(engine, "wechat", order.payment_serial, refund.refund_id,
                                      REFUND_OK)
    done = settled(engine, order.order_id)
    assert done.refund("r").status == "succeeded"  # type: ignore[union-attr]
    snapshot = (balances(engine), engine.ledger_balances(), done.refunded_minor)
    assert snapshot[0]["red-packet"] == (1_000, 1_000, 0, 0)
    # a late, contradicting answer for a refund already settled does not move it back
    # (and is not acknowledged: a failure is believed only once the channel says so)
    with pytest.raises(NotificationRejected):
        signed_refund_callback(engine, "wechat", order.payment_serial, refund.refund_id,
                               REFUND_CLOSED)
    signed_refund_callback(engine, "wechat", order.payment_serial, refund.refund_id, REFUND_OK)
    after = settled(engine, order.order_id)
    assert after.refund("r").status == "succeeded"  # type: ignore[union-attr]
    assert (balances(engine), engine.ledger_balances(), after.refunded_minor) == snapshot
    assert engine.ledger_balances(order.order_id)["CNY"]["merchant:station-1"] == 300
    assert_ledger_balanced(engine)


def test_refund_closed_by_the_channel_gives_nothing_and_frees_the_amount(
        engine: Engine, channel: ScriptedChannel) -> None:
    order = paid_order(engine)
    refund = engine.refund(order.order_id, "r1", 10_000)
    channel.refund_query_reply = REFUND_CLOSED  # the channel's own answer, asked before belief
    with pytest.raises(NotificationRejected, match="unconfirmed"):
        signed_refund_callback(engine, "wechat", order.payment_serial, refund.refund_id,
                               REFUND_CLOSED)
    failed = refund_settled(engine, order.order_id, "r1")
    # sent again by the wallet, it now agrees with what the channel answered: acknowledged
    signed_refund_callback(engine, "wechat", order.payment_serial, refund.refund_id,
                           REFUND_CLOSED)
    assert failed.status == "failed"
    assert ("query_refund", order.payment_serial, refund.refund_id) in channel.calls
    assert failed.parts[0] == (0, 9_600, "failed")
    assert [p[2] for p in failed.parts[1:]] == ["not_sent"] * 3
    view = settled(engine, order.order_id)
    assert view.refunded_minor == 0
    assert balances(engine)["points"] == (1_000, 980, 0, 20)  # vouchers not given back
    assert engine.ledger_balances(order.order_id)["CNY"]["merchant:station-1"] == 10_000
    # the amount may be asked again under a new refund_no
    again = engine.refund(order.order_id, "r2", 10_000)
    assert again.refund_id != refund.refund_id
    signed_refund_callback(engine, "wechat", order.payment_serial, again.refund_id, REFUND_OK)
    wait_for(lambda: refund_of(engine, order.order_id, "r2").status == "succeeded", T)
    done = settled(engine, order.order_id)
    assert done.refunded_minor == 10_000
    assert engine.ledger_balances(order.order_id)["CNY"]["merchant:station-1"] == 0
    assert balances(engine)["points"] == (1_000, 1_000, 0, 0)


def test_refund_refused_synchronously_by_the_channel_is_failed(
        engine: Engine, channel: ScriptedChannel) -> None:
    order = paid_order(engine)
    channel.refund_reply = REFUND_CLOSED
    engine.refund(order.order_id, "r1", 4_000)
    assert refund_settled(engine, order.order_id, "r1").status == "failed"
    assert engine.get_order(order.order_id).refunded_minor == 0
    assert engine.ledger_balances(order.order_id)["CNY"]["merchant:station-1"] == 10_000


# =========================================================================== ledger


def test_ledger_of_a_succeeded_order_pays_the_merchant_the_total(engine: Engine) -> None:
    order = paid_order(engine)
    ledger = engine.ledger_balances(order.order_id)["CNY"]
    assert ledger == {"merchant:station-1": 10_000, "payer:wechat": -9_600, "transit": 0,
                      "vouchers:alice/phone": -100, "vouchers:alice/points": -200,
                      "vouchers:alice/red-packet": -100}
    assert_ledger_balanced(engine)


def test_failed_order_leaves_nothing_with_the_merchant(engine: Engine,
                                                       channel: ScriptedChannel) -> None:
    order = paying(engine, fuel_request("fails"))
    signed_callback(engine, "wechat", order.payment_serial, PAY_FAILED)
    done = settled(engine, order.order_id)
    assert done.state == "failed"
    ledger = cny(engine.ledger_balances(order.order_id))
    assert ledger.get("merchant:station-1", 0) == 0
    assert ledger.get("transit", 0) == 0
    assert balances(engine)["points"] == (1_000, 1_000, 0, 0)
    assert_ledger_balanced(engine)


def test_success_after_close_is_refunded_and_never_reaches_the_merchant(
        engine: Engine, channel: ScriptedChannel) -> None:
    order = paying(engine, fuel_request("late"))
    engine.close(order.order_id)
    wait_for(lambda: engine.get_order(order.order_id).state == "closed", T)
    signed_callback(engine, "wechat", order.payment_serial, paid_reply(order.payment_serial))
    wait_for(lambda: refund_calls(channel), T, what="automatic refund")
    calls = refund_calls(channel)
    assert len(calls) == 1 and calls[0][1] == order.payment_serial and calls[0][3] == "9600"
    view = engine.get_order(order.order_id)
    assert view.state == "closed"
    # the refund is recorded on the cash leg (cash statuses: ... refunding, refunded)
    assert view.legs[0].status == "refunding"
    assert view.legs[0].refund_id == calls[0][2]
    assert view.legs[0].channel_txn_id == f"TX-{order.payment_serial}"
    assert not view.settled
    signed_refund_callback(engine, "wechat", order.payment_serial, calls[0][2], REFUND_OK)
    done = settled(engine, order.order_id)
    assert done.state == "closed"
    assert done.legs[0].status == "refunded"
    assert done.refunded_minor == 0  # not a merchant refund
    ledger = engine.ledger_balances(order.order_id)["CNY"]
    assert ledger.get("merchant:station-1", 0) == 0
    assert ledger.get("transit", 0) == 0
    assert ledger.get("payer:wechat", 0) == 0
    assert balances(engine)["points"] == (1_000, 1_000, 0, 0)
    # the merchant's refundable amount was never involved
    with pytest.raises(IllegalTransition):
        engine.refund(order.order_id, "m", 100)
    assert_ledger_balanced(engine)


def test_second_charge_is_refunded_whole_without_using_the_refundable_amount(
        engine: Engine, channel: ScriptedChannel) -> None:
    order = paid_order(engine)
    # the channel confirms the second charge when asked (query_charge): only then refunded
    channel.charge_query_reply = ChannelReply("SUCCESS", "SUCCESS", "TX2", 9_600)
    with pytest.raises(NotificationRejected, match="unconfirmed"):
        signed_callback(engine, "wechat", order.payment_serial,
                        ChannelReply("SUCCESS", "SUCCESS", "TX2", None))
    wait_for(lambda: refund_calls(channel), T, what="refund of the second charge")
    view = engine.get_order(order.order_id)
    dup = view.refund("charge:TX2")
    assert dup is not None and dup.kind == "duplicate_charge" and dup.amount_minor == 9_600
    assert refund_calls(channel)[0][3] == "9600"
    signed_refund_callback(engine, "wechat", order.payment_serial, dup.refund_id, REFUND_OK)
    done = settled(engine, order.order_id)
    assert done.state == "succeeded"
    # the merchant may still refund everything
    full = engine.refund(order.order_id, "m-full", 10_000)
    assert full.amount_minor == 10_000
    assert engine.ledger_balances(order.order_id)["CNY"]["transit"] >= 0
    signed_refund_callback(engine, "wechat", order.payment_serial, full.refund_id, REFUND_OK)
    settled(engine, order.order_id)
    ledger = engine.ledger_balances(order.order_id)["CNY"]
    assert ledger["merchant:station-1"] == 0 and ledger["transit"] == 0
    assert_ledger_balanced(engine)


# =========================================================================== reconciliation


def recon_engine(tmp_path: Path, channel: ScriptedChannel) -> Engine:
    policy = dataclasses.replace(SLOW_POLICY, query_schedule_ms=(30, 30))
    eng = open_engine(tmp_path / "recon.db", channel, policy=policy)
    fund_customer(eng)
    return eng


def needs_reconciliation(engine: Engine, no: str) -> OrderView:
    order = paying(engine, fuel_request(no))
    return wait_for(lambda: (o := engine.get_order(order.order_id)).state
                    == "needs_reconciliation" and o, T, what="needs_reconciliation")


def test_reconciliation_matches_resolves_and_flags(tmp_path: Path) -> None:
    channel = ScriptedChannel("wechat")
    engine = recon_engine(tmp_path, channel)
    try:
        matched = paid_order(engine, "matched")
        waiting = needs_reconciliation(engine, "waiting")
        mismatch = needs_reconciliation(engine, "mismatch")
        closed = paying(engine, fuel_request("closed"))
        engine.close(closed.order_id)
        wait_for(lambda: engine.get_order(closed.order_id).state == "closed", T)
        statement = HEADER + "".join([
            line(matched.payment_serial, f"TX-{matched.payment_serial}", 9_600),
            line(waiting.payment_serial, "TXW", 9_600),
            line(mismatch.payment_serial, "TXM", 9_500),
            line("P-nobody-knows", "TXU", 1_234),
            line(closed.payment_serial, "TXC", 9_600),
        ])
        report = engine.reconcile(statement)
        counts = verdicts(report)
        assert counts["MATCHED"] == 1
        assert counts["RESOLVED_SUCCESS"] == 1
        assert counts["AMOUNT_MISMATCH"] == 1
        assert counts["UNKNOWN_ORDER"] == 1
        assert counts["ERROR_REFUND"] == 1

        assert settled(engine, waiting.order_id).state == "succeeded"
        assert engine.get_order(matched.order_id).state == "succeeded"
        mm = engine.get_order(mismatch.order_id)
        assert mm.state != "succeeded"
        assert mm.legs[0].status == "unknown"
        assert cny(engine.ledger_balances(mismatch.order_id)).get("merchant:station-1", 0) == 0
        # the charged closed order is refunded by the original route, stays closed
        wait_for(lambda: any(c[1] == closed.payment_serial for c in refund_calls(channel)), T)
        c = [c for c in refund_calls(channel) if c[1] == closed.payment_serial]
        assert len(c) == 1 and c[0][3] == "9600"
        closed_view = engine.get_order(closed.order_id)
        assert closed_view.state == "closed"
        assert closed_view.legs[0].status == "refunding"
        assert closed_view.legs[0].refund_id == c[0][2]
        assert cny(engine.ledger_balances(closed.order_id)).get("merchant:station-1", 0) == 0

        # importing the same statement again changes nothing
        snapshot = ([engine.get_order(o.order_id) for o in (matched, waiting, mismatch, closed)],
                    engine.ledger_balances(), list(channel.calls))
        again = engine.reconcile(statement)
        assert set(verdicts(again)) <= {"ALREADY_IMPORTED"}
        assert ([engine.get_order(o.order_id) for o in (matched, waiting, mismatch, closed)],
                engine.ledger_balances(), list(channel.calls)) == snapshot
        assert_ledger_balanced(engine)
    finally:
        engine.shutdown()


def test_amount_mismatch_is_never_a_success(tmp_path: Path) -> None:
    channel = ScriptedChannel("wechat")
    engine = recon_engine(tmp_path, channel)
    try:
        order = needs_reconciliation(engine, "mm")
        report = engine.reconcile(HEADER + line(order.payment_serial, "TXM", 9_601))
        assert verdicts(report)["AMOUNT_MISMATCH"] == 1
        view = engine.get_order(order.order_id)
        assert view.state == "needs_reconciliation"
        assert view.legs[0].status == "unknown"
        assert balances(engine)["points"][3] == 0  # nothing spent
        assert cny(engine.ledger_balances(order.order_id)).get("merchant:station-1", 0) == 0
    finally:
        engine.shutdown()


def test_malformed_statement_raises_and_applies_nothing(tmp_path: Path) -> None:
    channel = ScriptedChannel("wechat")
    engine = recon_engine(tmp_path, channel)
    try:
        order = needs_reconciliation(engine, "w")
        good = line(order.payment_serial, "TXW", 9_600)
        for bad in (line("P-x", "TXX", 100).replace("1.00", "1.0"),
                    line("P-x", "TXX", 100).replace("SUCCESS", "PAID"),
                    line("P-x", "TXX", 100).replace(",CNY,", ",,"),
                    "wechat,TXX,P-x,1.00,CNY,SUCCESS\n"):
            with pytest.raises(StatementError) as info:
                engine.reconcile(HEADER + good + bad)
            assert info.value.code == "bad_statement"
            assert "3" in str(info.value)  # names the line (header is line 1)
            assert engine.get_order(order.order_id).state == "needs_reconciliation"
        # a bad header too
        with pytest.raises(StatementError):
            engine.reconcile("channel,txn,serial\n" + good)
        assert engine.get_order(order.order_id).state == "needs_reconciliation"
        # the good statement still imports afterwards (nothing was recorded as imported)
        report = engine.reconcile(HEADER + good)
        assert verdicts(report)["RESOLVED_SUCCESS"] == 1
        assert settled(engine, order.order_id).state == "succeeded"
    finally:
        engine.shutdown()


def test_reconciliation_from_a_path_and_refund_line(tmp_path: Path) -> None:
    channel = ScriptedChannel("wechat")
    engine = recon_engine(tmp_path, channel)
    try:
        order = paid_order(engine, "paid")
        refund = engine.refund(order.order_id, "r1", 2_000)
        wait_for(lambda: refund_calls(channel), T)
        path = tmp_path / "statement.csv"
        path.write_text(HEADER + line(order.payment_serial, f"TX-{order.payment_serial}", 9_600)
                        + line(order.payment_serial, "TX1-R", 2_000, "REFUND", refund.refund_id),
                        encoding="utf-8")
        report = engine.reconcile(path)
        counts = verdicts(report)
        assert counts["MATCHED"] == 1
        assert counts["REFUND_RESOLVED"] + counts["REFUND_MATCHED"] == 1
        assert refund_settled(engine, order.order_id, "r1").status == "succeeded"
        settled(engine, order.order_id)
        assert engine.ledger_balances(order.order_id)["CNY"]["merchant:station-1"] == 8_000
        assert len(refund_calls(channel)) == 1
    finally:
        engine.shutdown()


def test_refund_the_channel_calls_abnormal_is_re_asked_then_unknown(tmp_path: Path) -> None:
    channel = ScriptedChannel("wechat")
    channel.refund_reply = ChannelReply("SUCCESS", "CHANGE")  # every re-ask says abnormal
    policy = dataclasses.replace(SLOW_POLICY, refund_query_schedule_ms=(20, 20))
    engine = open_engine(tmp_path / "abnormal.db", channel, policy=policy)
    try:
        fund_customer(engine)
        order = paid_order(engine)
        refund = engine.refund(order.order_id, "r1", 6_000)
        signed_refund_callback(engine, "wechat", order.payment_serial, refund.refund_id,
                                      ChannelReply("SUCCESS", "CHANGE"))
        # abnormal is not a failure: it counts as refunded while it is re-asked
        assert engine.get_order(order.order_id).refunded_minor == 6_000
        decided = refund_settled(engine, order.order_id, "r1")
        assert decided.status == "unknown"
        assert decided.parts == ((0, 6_000, "unknown"),)
        assert engine.get_order(order.order_id).refunded_minor == 6_000
        assert len(refund_calls(channel)) >= 2
    finally:
        engine.shutdown()


def test_unknown_refund_counts_as_refunded_and_is_resent_by_reconciliation(
        tmp_path: Path) -> None:
    channel = ScriptedChannel("wechat")
    policy = dataclasses.replace(SLOW_POLICY, refund_query_schedule_ms=(20, 20))
    engine = open_engine(tmp_path / "unknown.db", channel, policy=policy)
    try:
        fund_customer(engine)
        start = int(time.time() * 1000) - 60_000
        order = paid_order(engine, "silent")
        channel.refund_query_reply = NO_ANSWER
        refund = engine.refund(order.order_id, "r1", 6_000)
        decided = refund_settled(engine, order.order_id, "r1")
        assert decided.status == "unknown" and decided.parts == ((0, 6_000, "unknown"),)
        # unknown counts as refunded: only 40.00 is left
        assert engine.get_order(order.order_id).refunded_minor == 6_000
        with pytest.raises(RefundRefused):
            engine.refund(order.order_id, "r2", 4_001)
        asked = len(refund_calls(channel))
        # a statement that lacks the refund makes the engine ask the channel again
        statement = HEADER + line(order.payment_serial, f"TX-{order.payment_serial}", 9_600)
        report = engine.reconcile(statement, period_start_ms=start,
                                  period_end_ms=int(time.time() * 1000) + 1_000)
        assert verdicts(report)["REFUND_RESENT"] == 1
        wait_for(lambda: len(refund_calls(channel)) > asked, T, what="refund asked again")
        assert {c[2] for c in refund_calls(channel)} == {refund.refund_id}
        assert {c[3] for c in refund_calls(channel)} == {"6000"}
        assert refund_of(engine, order.order_id, "r1").status != "failed"
        signed_refund_callback(engine, "wechat", order.payment_serial, refund.refund_id,
                                      REFUND_OK)
        wait_for(lambda: refund_of(engine, order.order_id, "r1").status == "succeeded", T)
        settled(engine, order.order_id)
        ledger = engine.ledger_balances(order.order_id)["CNY"]
        assert ledger["merchant:station-1"] == 4_000 and ledger["transit"] == 0
        assert_ledger_balanced(engine)
    finally:
        engine.shutdown()


def test_statement_second_charge_and_missing_and_expired_orders(tmp_path: Path) -> None:
    channel = ScriptedChannel("wechat")
    engine = recon_engine(tmp_path, channel)
    try:
        start = int(time.time() * 1000) - 1_000
        charged_twice = paid_order(engine, "twice")
        missing = paid_order(engine, "missing")
        expired = needs_reconciliation(engine, "expired")
        end = start + 10 * 60_000  # the 60 s pay window closed by the period's end
        twice_txn = f"TX-{charged_twice.payment_serial}"
        statement = HEADER + (line(charged_twice.payment_serial, twice_txn, 9_600)
                              + line(charged_twice.payment_serial, "TX2", 9_600))
        report = engine.reconcile(statement, period_start_ms=start, period_end_ms=end)
        counts = verdicts(report)
        assert counts["MATCHED"] == 1
        assert counts["DUPLICATE_CHARGE"] == 1
        assert counts["MISSING_ON_STATEMENT"] == 1
        assert counts["RESOLVED_FAILED"] == 1
        # the second charge is refunded whole by the original route
        wait_for(lambda: engine.get_order(charged_twice.order_id).refund("charge:TX2"), T)
        dup = engine.get_order(charged_twice.order_id).refund("charge:TX2")
        assert dup is not None and dup.kind == "duplicate_charge" and dup.amount_minor == 9_600
        # reported, never changed
        assert engine.get_order(missing.order_id) == missing
        # the channel never charged it: unpaid, holds released
        gone = settled(engine, expired.order_id)
        assert gone.state in ("failed", "closed")
        assert gone.legs[0].status == "unpaid"
        assert engine.get_account("alice/points").held == 0
        assert cny(engine.ledger_balances(expired.order_id)).get("merchant:station-1", 0) == 0
    finally:
        engine.shutdown()


# =========================================================================== duplicate guard


@pytest.fixture
def guarded(tmp_path: Path, channel: ScriptedChannel) -> Iterator[Engine]:
    eng = open_engine(tmp_path / "guard.db", channel,
                      config=EngineConfig(ask_timeout_s=5.0, duplicate_guard_window_ms=60_000))
    yield eng
    eng.shutdown()


def test_duplicate_guard_warns_creates_nothing_and_can_be_overridden(guarded: Engine) -> None:
    first = guarded.submit(cash_request("a"))
    with pytest.raises(DuplicateSuspected) as info:
        guarded.submit(cash_request("b"))
    assert list(info.value.order_ids) == [first.order_id]
    with pytest.raises(PaymentError):
        guarded.find_order("station-1", "b")
    # the retried accepted submit gets the same receipt, without a warning
    assert guarded.submit(cash_request("a")) == first
    # the user says "pay anyway"
    second = guarded.submit(dataclasses.replace(cash_request("b"), confirm_duplicate=True))
    assert second.order_id != first.order_id
    assert guarded.find_order("station-1", "b").order_id == second.order_id
    # confirm_duplicate is not part of the fingerprint: a plain retry is the same order
    assert guarded.submit(cash_request("b")) == second
    # another user, or another amount, is not suspicious
    guarded.submit(cash_request("c", who="bob"))
    guarded.submit(cash_request("d", total=10_001))


def test_duplicate_guard_ignores_orders_that_can_no_longer_be_paid(
        guarded: Engine, channel: ScriptedChannel) -> None:
    first = paying(guarded, cash_request("a"))
    signed_callback(guarded, "wechat", first.payment_serial, PAY_FAILED)
    assert settled(guarded, first.order_id).state == "failed"
    second = guarded.submit(cash_request("b"))
    assert second.order_id != first.order_id


def test_duplicate_guard_warns_about_a_paid_order(guarded: Engine) -> None:
    first = paying(guarded, cash_request("a"))
    signed_callback(guarded, "wechat", first.payment_serial, paid_reply(first.payment_serial))
    assert settled(guarded, first.order_id).state == "succeeded"
    with pytest.raises(DuplicateSuspected) as info:
        guarded.submit(cash_request("b"))
    assert list(info.value.order_ids) == [first.order_id]


# =========================================================================== outbox


def test_subscribers_get_every_state_change_with_stable_ids(tmp_path: Path,
                                                            channel: ScriptedChannel) -> None:
    got: list[OutboxEvent] = []
    lock = threading.Lock()

    def settlement(event: OutboxEvent) -> None:
        with lock:
            got.append(event)

    engine = Engine.open(tmp_path / "ob.db", channels=[channel], policy=SLOW_POLICY,
                         config=EngineConfig(ask_timeout_s=5.0, duplicate_guard_window_ms=0),
                         subscribers={"settlement": settlement})
    try:
        fund_customer(engine)
        order = paid_order(engine)
        failed = paying(engine, fuel_request("f"))
        signed_callback(engine, "wechat", failed.payment_serial, PAY_FAILED)
        settled(engine, failed.order_id)

        def changes(order_id: str) -> list[tuple[str, str]]:
            with lock:
                events = {e.event_id: e for e in got if e.order_id == order_id}
            return [(e.from_state, e.to_state)
                    for e in sorted(events.values(), key=lambda e: e.seq)]

        wait_for(lambda: ("paying", "succeeded") in changes(order.order_id), T)
        wait_for(lambda: ("paying", "failed") in changes(failed.order_id), T)
        assert changes(order.order_id) == [("", "accepted"), ("accepted", "paying"),
                                           ("paying", "succeeded")]
        assert changes(failed.order_id) == [("", "accepted"), ("accepted", "paying"),
                                            ("paying", "failed")]
        with lock:
            events = list(got)
        for e in events:
            assert e.event_id.startswith(f"{e.order_id}:{e.order_version}:")
            assert e.merchant_id == "station-1" and e.total_minor == 10_000
        # in commit order: seq strictly increasing, one at a time
        assert [e.seq for e in events] == sorted(e.seq for e in events)
        # the same event id always carries the same event
        by_id: dict[str, OutboxEvent] = {}
        for e in events:
            assert by_id.setdefault(e.event_id, e) == e
    finally:
        engine.shutdown()


def test_a_raising_subscriber_gets_the_same_event_again(tmp_path: Path,
                                                        channel: ScriptedChannel) -> None:
    got: list[str] = []
    failures = {"left": 2}
    lock = threading.Lock()

    def flaky(event: OutboxEvent) -> None:
        with lock:
            got.append(event.event_id)
            if failures["left"]:
                failures["left"] -= 1
                raise RuntimeError("settlement system down")

    config = EngineConfig(ask_timeout_s=5.0, duplicate_guard_window_ms=0,
                          notifications=NotificationConfig(subscriber_retry_ms=(20, 20, 20, 20)))
    engine = Engine.open(tmp_path / "flaky.db", channels=[channel], policy=SLOW_POLICY,
                         config=config, subscribers={"settlement": flaky})
    try:
        fund_customer(engine)
        order = paid_order(engine)
        wait_for(lambda: len(set(got)) >= 3, T, what="three events delivered")
        with lock:
            seen = list(got)
        first = seen[0]
        assert seen[:3] == [first, first, first]  # retried until accepted, nothing skipped
        distinct = list(dict.fromkeys(seen))
        assert distinct[0] == first and first.startswith(order.order_id)
        assert len(seen) == len(distinct) + 2
        assert list(engine.notifications.dead_letters()) == []
    finally:
        engine.shutdown()


def test_events_not_delivered_before_shutdown_come_after_reopen(
        tmp_path: Path, channel: ScriptedChannel) -> None:
    path = tmp_path / "reopen.db"
    refused: list[str] = []

    def down(event: OutboxEvent) -> None:
        refused.append(event.event_id)
        raise RuntimeError("down")

    config = EngineConfig(ask_timeout_s=5.0, duplicate_guard_window_ms=0,
                          notifications=NotificationConfig(subscriber_retry_ms=(60_000,)))
    engine = Engine.open(path, channels=[channel], policy=SLOW_POLICY, config=config,
                         subscribers={"settlement": down})
    fund_customer(engine)
    order = paid_order(engine)
    wait_for(lambda: refused, T, what="first attempt")
    engine.shutdown()

    got: list[OutboxEvent] = []
    engine = Engine.open(path, channels=[channel], policy=SLOW_POLICY, config=config,
                         subscribers={"settlement": got.append})
    try:
        wait_for(lambda: any(e.to_state == "succeeded" for e in got), T, what="redelivery")
        assert got[0].event_id == refused[0]
        assert [(e.from_state, e.to_state) for e in got if e.order_id == order.order_id] == [
            ("", "accepted"), ("accepted", "paying"), ("paying", "succeeded")]
    finally:
        engine.shutdown()

