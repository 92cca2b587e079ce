"""Paying a trade order again: attempts."""

from __future__ import annotations

import dataclasses
import threading

import pytest

from payengine import (
    AttemptRefused,
    CashPart,
    ChannelNotification,
    ChannelReply,
    DuplicateSuspected,
    IdempotencyConflict,
    InvalidRequest,
    NotificationKind,
    OrderPolicy,
    PayDetails,
    PayScenario,
    UnknownOrder,
)

from .support import ScriptedChannel, fuel, uniq, wait_for

POLICY = OrderPolicy(pay_window_ms=60_000, query_schedule_ms=(200,) * 10)


def _open(world):
    wechat, alipay = ScriptedChannel("wechat"), ScriptedChannel("alipay")
    engine = world.open([wechat, alipay], policy=POLICY)
    return engine, wechat, alipay


def _closed(engine, receipt):
    engine.close(receipt.order_id)
    wait_for(lambda: engine.get_order(receipt.order_id).state == "closed", "closed")


def test_readme_example_second_attempt(world) -> None:
    # "second.attempt  # 2: a new order id and payment serial"
    # "engine.find_order("station-42", "pump3-000187")         # the latest attempt: the second"
    engine, _, alipay = _open(world)
    request = fuel("pump3-000187", total=100_00, user="alice")
    first = engine.submit(request)
    assert first.attempt == 1
    _closed(engine, first)
    second = engine.submit(dataclasses.replace(request, attempt=2, cash=CashPart(100_00, "alipay")))
    assert second.attempt == 2
    assert second.order_id != first.order_id
    assert second.payment_serial != first.payment_serial
    latest = engine.find_order("station-42", "pump3-000187")
    assert latest.order_id == second.order_id and latest.attempt == 2
    assert engine.find_order("station-42", "pump3-000187", attempt=1).state == "closed"
    assert engine.get_order(second.order_id).attempt == 2
    wait_for(lambda: alipay.pays_of(second.payment_serial), "attempt 2 paid on alipay")


def test_next_attempt_after_failure(world) -> None:
    # "When an attempt failed (the wallet refused, a voucher was short) ... the terminal may pay again"
    engine, wechat, _ = _open(world)
    wechat.pay_reply = lambda s, a: ChannelReply("SUCCESS", "PAYERROR")
    request = fuel()
    first = engine.submit(request)
    wait_for(lambda: engine.get_order(first.order_id).state == "failed", "failed")
    second = engine.submit(dataclasses.replace(request, attempt=2))
    assert second.attempt == 2


@pytest.mark.parametrize("attempt", [0, 11, -1])
def test_attempt_bounds(world, attempt) -> None:
    # "`PaymentRequest.attempt` is 1..10."
    engine, _, _ = _open(world)
    with pytest.raises(InvalidRequest):
        engine.submit(fuel(attempt=attempt))


def test_attempt_bool_refused(world) -> None:
    engine, _, _ = _open(world)
    with pytest.raises(InvalidRequest):
        engine.submit(fuel(attempt=True))


def test_attempt_refused_while_previous_may_succeed(world) -> None:
    # "otherwise `AttemptRefused` (code `attempt_refused`; attempt n is still `accepted`, `paying`...)
    #  nothing created."
    engine, _, _ = _open(world)
    request = fuel()
    first = engine.submit(request)
    with pytest.raises(AttemptRefused) as info:
        engine.submit(dataclasses.replace(request, attempt=2))
    assert info.value.code == "attempt_refused"
    assert engine.find_order(request.merchant_id, request.merchant_order_no).order_id == first.order_id
    with pytest.raises(UnknownOrder):
        engine.find_order(request.merchant_id, request.merchant_order_no, attempt=2)


def test_attempt_refused_after_success(world) -> None:
    # "attempt n is still ... `succeeded`"
    engine, wechat, _ = _open(world)
    wechat.pay_reply = lambda s, a: ChannelReply("SUCCESS", "SUCCESS", "T-" + s, a, "CNY")
    request = fuel()
    first = engine.submit(request)
    wait_for(lambda: engine.get_order(first.order_id).state == "succeeded", "paid")
    with pytest.raises(AttemptRefused):
        engine.submit(dataclasses.replace(request, attempt=2))


def test_attempt_refused_if_not_next(world) -> None:
    # "or the number is not the next one"
    engine, _, _ = _open(world)
    request = fuel()
    first = engine.submit(request)
    _closed(engine, first)
    with pytest.raises(AttemptRefused):
        engine.submit(dataclasses.replace(request, attempt=3))


def test_attempt_refused_if_first_never_submitted(world) -> None:
    # "or attempt 1 was never submitted"
    engine, _, _ = _open(world)
    request = fuel()
    with pytest.raises(AttemptRefused):
        engine.submit(dataclasses.replace(request, attempt=2))
    with pytest.raises(UnknownOrder):
        engine.find_order(request.merchant_id, request.merchant_order_no)


@pytest.mark.parametrize("change", [
    {"user_id": "bob"}, {"title": "Car wash"}, {"total_minor": 99_00},
    {"currency": "USD"},
])
def test_attempt_pays_the_same_trade(world, change) -> None:
    # "An attempt pays the same trade: the same `user_id`, `currency`, `total_minor` and `title` as the
    #  one before (`IdempotencyConflict` otherwise)"
    engine, _, _ = _open(world)
    request = fuel()
    first = engine.submit(request)
    _closed(engine, first)
    other = dataclasses.replace(request, attempt=2, **change)
    if "total_minor" in change:
        other = dataclasses.replace(other, cash=CashPart(change["total_minor"], "wechat"))
    if "currency" in change:
        other = dataclasses.replace(other, cash=CashPart(request.total_minor, "wechat"))
    with pytest.raises(IdempotencyConflict):
        engine.submit(other)


def test_attempt_parts_method_details_may_differ(world) -> None:
    # "its parts, method and details may differ"
    engine, _, alipay = _open(world)
    request = fuel()
    first = engine.submit(request)
    _closed(engine, first)
    details = PayDetails(PayScenario.BARCODE, auth_code="134670070457647112")
    second = engine.submit(dataclasses.replace(request, attempt=2,
                                               cash=CashPart(request.total_minor, "alipay", details)))
    calls = wait_for(lambda: alipay.pays_of(second.payment_serial), "pay")
    assert calls[0][4] == details


def test_each_attempt_idempotent_on_its_own(world) -> None:
    # "the same attempt again returns its receipt ..., other parameters are `IdempotencyConflict`"
    engine, _, _ = _open(world)
    request = fuel()
    first = engine.submit(request)
    _closed(engine, first)
    again = dataclasses.replace(request, attempt=2, cash=CashPart(request.total_minor, "alipay"))
    second = engine.submit(again)
    assert engine.submit(again) == second
    assert engine.submit(request) == first  # attempt 1 again: its own receipt
    with pytest.raises(IdempotencyConflict):
        engine.submit(dataclasses.replace(again, cash=CashPart(request.total_minor, "wechat")))


def test_concurrent_submits_of_one_attempt_make_one_order(world) -> None:
    # "concurrent submits of one attempt make one order"
    engine, _, _ = _open(world)
    request = fuel()
    first = engine.submit(request)
    _closed(engine, first)
    again = dataclasses.replace(request, attempt=2)
    results: list[object] = []
    barrier = threading.Barrier(6)

    def go() -> None:
        barrier.wait()
        try:
            results.append(engine.submit(again))
        except Exception as error:
            results.append(error)

    threads = [threading.Thread(target=go) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    receipts = {r.order_id for r in results if hasattr(r, "order_id")}
    assert len(receipts) == 1, results


def test_next_attempt_is_not_a_duplicate(world) -> None:
    # "A next attempt is not a new purchase: the duplicate guard does not warn about it."
    engine, _, _ = _open(world)
    request = fuel(user="dup-user")
    first = engine.submit(request)
    # another trade of the same user and amount is suspected (the guard is on)
    with pytest.raises(DuplicateSuspected):
        engine.submit(fuel(user="dup-user"))
    _closed(engine, first)
    engine.submit(dataclasses.replace(request, attempt=2))


def test_late_success_of_older_attempt_refunded_by_original_route(world) -> None:
    # "a success that still comes for it (the user paid it in the wallet after all) is refunded by its
    #  original route, as for any closed order"
    engine, wechat, alipay = _open(world)
    request = fuel()
    first = engine.submit(request)
    _closed(engine, first)
    engine.submit(dataclasses.replace(request, attempt=2, cash=CashPart(request.total_minor, "alipay")))
    note = ChannelNotification(NotificationKind.PAYMENT, first.payment_serial,
                               ChannelReply("SUCCESS", "SUCCESS", "T-late", request.total_minor, "CNY"))
    wechat.query_reply = lambda s: ChannelReply("SUCCESS", "SUCCESS", "T-late", request.total_minor, "CNY")
    body, headers = wechat.notifications.sign(note)
    state = engine.handle_notification("wechat", body, headers)
    assert state == "closed"
    wait_for(lambda: wechat.refund_calls, "refund by original route")
    assert wechat.refund_calls[0][0] == first.payment_serial
    assert wechat.refund_calls[0][1] == f"{first.payment_serial}-R1"
    assert alipay.refund_calls == []
    leg = wait_for(lambda: (v := engine.get_order(first.order_id)).legs[0].status == "refunded" and v,
                   "refunded")
    assert leg.state == "closed"


def test_unknown_attempt_lookup(world) -> None:
    # "`find_order(merchant_id, no, attempt=None)` → `OrderView` (the latest attempt, or that `attempt`)"
    engine, _, _ = _open(world)
    request = fuel()
    engine.submit(request)
    with pytest.raises(UnknownOrder):
        engine.find_order(request.merchant_id, request.merchant_order_no, attempt=2)
    with pytest.raises(UnknownOrder):
        engine.find_order(request.merchant_id, uniq())


def test_attempt_refused_while_needs_reconciliation(world) -> None:
    # "attempt n is still ... `needs_reconciliation`"
    wechat = ScriptedChannel("wechat")
    wechat.query_raises = ConnectionError("wallet unreachable")
    engine = world.open([wechat], policy=OrderPolicy(pay_window_ms=60_000, query_schedule_ms=(50, 50)))
    request = fuel()
    first = engine.submit(request)
    wait_for(lambda: engine.get_order(first.order_id).state == "needs_reconciliation", "awaiting statement")
    with pytest.raises(AttemptRefused):
        engine.submit(dataclasses.replace(request, attempt=2))
