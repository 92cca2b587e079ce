"""Routing, falling back to the next route, and routes in the configuration file."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from payengine import (
    CashPart,
    ChannelReply,
    CodeTable,
    ConfigError,
    Engine,
    EngineConfig,
    InvalidRequest,
    LegMode,
    NoRoute,
    OrderPolicy,
    PaymentRequest,
    Route,
    RoutingTable,
    VoucherPart,
    load_routing,
)
from tests.blackbox_session4b.support import Wallet, open_with, paid
from tests.helpers import wait_for

BANK_DOWN = ChannelReply("SUCCESS", "BANK_DOWN")
NOT_FOUND = ChannelReply("SUCCESS", "ORDERNOTEXIST")
CLOSED = ChannelReply("SUCCESS", "CLOSED")
PAYERROR = ChannelReply("SUCCESS", "PAYERROR")
WAITING = ChannelReply("SUCCESS", "USERPAYING")


def pays(serial: str, amount: int, details: Any) -> ChannelReply:
    return paid(serial, amount)


def down(name: str) -> Wallet:
    """Refuses every pay with a retryable code; query: not found; close: closed."""
    return Wallet(name, pay=BANK_DOWN, query=NOT_FOUND, close=CLOSED)


def up(name: str) -> Wallet:
    return Wallet(name, pay=pays, query=WAITING)


def open_routed(path: Path, wallets: list[Wallet], routes: tuple[Route, ...],
                fallbacks_max: int = 1, policy: OrderPolicy | None = None,
                **config: Any) -> Engine:
    return open_with(path, wallets, policy=policy or OrderPolicy(
        pay_window_ms=10_000, query_schedule_ms=(50, 100, 200),
        refund_query_schedule_ms=(100,)),
        routing=RoutingTable(routes, fallbacks_max=fallbacks_max), **config)


def request(no: str = "fuel-1", amount: int = 50_00, method: str = "qr",
            currency: str = "CNY") -> PaymentRequest:
    return PaymentRequest("station-1", no, "alice", currency, amount, "Fuel",
                          cash=CashPart(amount, method))


def final(engine: Engine, order_id: str) -> Any:
    return wait_for(lambda: (o := engine.get_order(order_id)).state in
                    ("succeeded", "failed", "closed") and o, what="order final")


def route_entries(engine: Engine, order_id: str) -> list[Any]:
    return [e for e in engine.journal(order_id) if e.part == "route"]


# --- the README's runnable example ----------------------------------------------------

CODES = CodeTable("wallet", communication_ok=frozenset({"SUCCESS"}),
                  success=frozenset({"SUCCESS"}),
                  failure=frozenset({"PAYERROR", "CLOSED", "BANK_DOWN"}),
                  retryable=frozenset({"BANK_DOWN"}),
                  not_found=frozenset({"ORDERNOTEXIST"}))


class ReadmeWallet:
    pay_codes = refund_codes = CODES

    def __init__(self, name: str, pay: ChannelReply, query: ChannelReply | None = None,
                 close: ChannelReply | None = None) -> None:
        self.name, self.replies = name, {"pay": pay, "query": query, "close": close}

    def pay(self, serial: str, amount_minor: int, currency: str, title: str) -> Any:
        return self.replies["pay"]

    def query(self, serial: str) -> Any:
        return self.replies["query"]

    def close(self, serial: str) -> Any:
        return self.replies["close"]

    def query_charge(self, serial: str, txn: str) -> ChannelReply:
        return ChannelReply("SUCCESS", "ORDERNOTEXIST")

    def refund(self, serial: str, refund_id: str, amount_minor: int, currency: str
               ) -> ChannelReply:
        return ChannelReply("SUCCESS", "SUCCESS")

    def query_refund(self, serial: str, refund_id: str) -> ChannelReply:
        return ChannelReply("SUCCESS", "SUCCESS")

    def verify_notification(self, body: bytes, headers: Any) -> Any:
        raise ValueError("not in this example")


def test_the_readme_fallback_example_prints_wechat_2_true_and_the_two_tries() -> None:
    d = ReadmeWallet("wechat-1", ChannelReply("SUCCESS", "BANK_DOWN"),
                     ChannelReply("SUCCESS", "ORDERNOTEXIST"), ChannelReply("SUCCESS", "CLOSED"))
    u = ReadmeWallet("wechat-2", ChannelReply("SUCCESS", "SUCCESS", "TX-1", 50_00))
    routing = RoutingTable((Route("qr", "wechat-1"), Route("qr", "wechat-2", priority=1)),
                           fallbacks_max=1)
    with tempfile.TemporaryDirectory() as folder:
        engine = Engine.open(f"{folder}/pay.db", channels=[d, u],
                             config=EngineConfig(routing=routing))
        try:
            receipt = engine.submit(PaymentRequest("station-1", "fuel-1", "alice", "CNY",
                                                   50_00, "Fuel", cash=CashPart(50_00, "qr")))
            deadline = time.monotonic() + 20
            while (view := engine.get_order(receipt.order_id)).state != "succeeded":
                assert time.monotonic() < deadline, view
                time.sleep(0.01)
            assert view.legs[0].channel == "wechat-2"
            assert view.payment_serial == receipt.payment_serial + "-F1"
            tried = [(t.channel, t.outcome, t.code) for t in view.legs[0].channels_tried]
            assert tried == [("wechat-1", "unpaid", "BANK_DOWN"), ("wechat-2", "paid", "SUCCESS")]
            first = view.legs[0].channels_tried[0]
            assert first.payment_serial == receipt.payment_serial
            assert view.legs[0].channels_tried[1].payment_serial == view.payment_serial
        finally:
            engine.shutdown()


# --- Route / RoutingTable validation -------------------------------------------------

def test_route_defaults_are_those_of_the_readme() -> None:
    r = Route("qr", "wechat-1")
    assert (r.priority, r.weight, r.amount_min_minor, r.amount_max_minor, r.currencies,
            r.fee_ppm) == (0, 1, 1, 10**15, frozenset(), None)
    assert RoutingTable(()).fallbacks_max == 1
    assert RoutingTable((r,)).fallbacks_max == 1


@pytest.mark.parametrize("kwargs", [
    {"priority": -1}, {"priority": 1001}, {"weight": 0}, {"weight": 1001},
    {"fee_ppm": -1}, {"fee_ppm": 1_000_001}, {"currencies": frozenset({"cny"})},
    {"currencies": frozenset({"CN"})}, {"amount_min_minor": 0},
    {"amount_min_minor": 100, "amount_max_minor": 99}, {"amount_max_minor": 10**15 + 1},
    {"priority": True}])
def test_a_bad_route_is_invalid_request_when_built(kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest):
        Route("qr", "wechat-1", **kwargs)


@pytest.mark.parametrize("kwargs", [{"priority": 0}, {"priority": 1000}, {"weight": 1},
                                    {"weight": 1000}, {"fee_ppm": 0}, {"fee_ppm": 1_000_000},
                                    {"currencies": frozenset({"CNY", "JPY"})}])
def test_route_bounds_are_inclusive(kwargs: dict[str, Any]) -> None:
    Route("qr", "wechat-1", **kwargs)


@pytest.mark.parametrize("method,channel", [("", "c"), ("qr", ""), ("q\nr", "c"),
                                            ("qr", "x" * 129)])
def test_a_route_with_a_bad_method_or_channel_id_is_invalid_request(method: str, channel: str
                                                                     ) -> None:
    with pytest.raises(InvalidRequest):
        Route(method, channel)


@pytest.mark.parametrize("fallbacks", [-1, 4])
def test_fallbacks_max_outside_zero_to_three_is_invalid_request(fallbacks: int) -> None:
    with pytest.raises(InvalidRequest):
        RoutingTable((Route("qr", "a"),), fallbacks_max=fallbacks)


def test_fallbacks_max_zero_and_three_are_taken() -> None:
    assert RoutingTable((), fallbacks_max=0).fallbacks_max == 0
    assert RoutingTable((), fallbacks_max=3).fallbacks_max == 3


def test_a_method_channel_pair_listed_twice_is_invalid_request() -> None:
    with pytest.raises(InvalidRequest):
        RoutingTable((Route("qr", "a"), Route("qr", "a", priority=2)))


def test_at_most_a_thousand_routes() -> None:
    RoutingTable(tuple(Route("qr", f"c{i}") for i in range(1000)))
    with pytest.raises(InvalidRequest):
        RoutingTable(tuple(Route("qr", f"c{i}") for i in range(1001)))


# --- choosing a route --------------------------------------------------------------------

@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return tmp_path


def test_the_lowest_priority_wins(folder: Path) -> None:
    a, b = up("a"), up("b")
    eng = open_routed(folder / "x.db", [a, b], (Route("qr", "a", priority=5),
                                                 Route("qr", "b", priority=2)))
    try:
        r = eng.submit(request())
        assert eng.get_order(r.order_id).legs[0].channel == "b"
    finally:
        eng.shutdown()


def test_among_equal_priorities_the_lowest_fee_wins_route_fee_before_engine_fee(folder: Path
                                                                                 ) -> None:
    a, b = up("a"), up("b")
    eng = open_routed(folder / "x.db", [a, b],
                      (Route("qr", "a", weight=1000), Route("qr", "b", fee_ppm=1_000)),
                      fee_ppm={"a": 6_000})
    try:
        for i in range(5):
            r = eng.submit(request(f"fuel-{i}"))
            assert eng.get_order(r.order_id).legs[0].channel == "b"
    finally:
        eng.shutdown()


def test_the_route_own_fee_ranks_even_when_higher_than_the_engine_fee(folder: Path) -> None:
    a, b = up("a"), up("b")
    eng = open_routed(folder / "x.db", [a, b],
                      (Route("qr", "a", fee_ppm=9_000), Route("qr", "b")),
                      fee_ppm={"a": 1_000, "b": 6_000})
    try:
        r = eng.submit(request())
        assert eng.get_order(r.order_id).legs[0].channel == "b"
    finally:
        eng.shutdown()


def test_the_weighted_draw_is_the_same_for_the_same_order(folder: Path) -> None:
    a, b = up("a"), up("b")
    eng = open_routed(folder / "x.db", [a, b], (Route("qr", "a", weight=3), Route("qr", "b")))
    try:
        r = eng.submit(request())
        chosen = eng.get_order(r.order_id).legs[0].channel
        assert eng.submit(request()) == r
        assert eng.get_order(r.order_id).legs[0].channel == chosen
    finally:
        eng.shutdown()


def test_weights_spread_orders_roughly_in_proportion(folder: Path) -> None:
    a, b = up("a"), up("b")
    eng = open_routed(folder / "x.db", [a, b], (Route("qr", "a", weight=3), Route("qr", "b")))
    try:
        chosen = [eng.get_order(eng.submit(request(f"n-{i}", amount=100 + i)).order_id)
                  .legs[0].channel for i in range(80)]
        assert 40 <= chosen.count("a") <= 75
    finally:
        eng.shutdown()


def test_an_amount_above_a_routes_cap_goes_to_the_next_route(folder: Path) -> None:
    a, b = up("a"), up("b")
    eng = open_routed(folder / "x.db", [a, b],
                      (Route("qr", "a", amount_max_minor=150_00), Route("qr", "b", priority=1)))
    try:
        at_cap = eng.submit(request("n-1", 150_00))
        above = eng.submit(request("n-2", 150_01))
        assert eng.get_order(at_cap.order_id).legs[0].channel == "a"
        assert eng.get_order(above.order_id).legs[0].channel == "b"
    finally:
        eng.shutdown()


def test_an_amount_below_a_routes_minimum_is_skipped(folder: Path) -> None:
    a, b = up("a"), up("b")
    eng = open_routed(folder / "x.db", [a, b],
                      (Route("qr", "a", amount_min_minor=10_00), Route("qr", "b", priority=1)))
    try:
        assert eng.get_order(eng.submit(request("n-1", 9_99)).order_id).legs[0].channel == "b"
        assert eng.get_order(eng.submit(request("n-2", 10_00)).order_id).legs[0].channel == "a"
    finally:
        eng.shutdown()


def test_a_currency_a_route_does_not_take_is_skipped(folder: Path) -> None:
    a, b = up("a"), up("b")
    eng = open_routed(folder / "x.db", [a, b],
                      (Route("qr", "a", currencies=frozenset({"CNY"})),
                       Route("qr", "b", priority=1)))
    try:
        r = eng.submit(request("n-1", currency="USD"))
        assert eng.get_order(r.order_id).legs[0].channel == "b"
    finally:
        eng.shutdown()


def test_no_route_left_is_no_route_naming_each_route_and_nothing_created(folder: Path) -> None:
    a = up("a")
    eng = open_routed(folder / "x.db", [a],
                      (Route("qr", "a", amount_max_minor=10_00), Route("qr", "ghost")))
    try:
        with pytest.raises(NoRoute) as caught:
            eng.submit(request("n-1", 50_00))
        assert caught.value.code == "no_route"
        assert "a" in str(caught.value) and "ghost" in str(caught.value)
        from payengine import UnknownOrder
        with pytest.raises(UnknownOrder):
            eng.find_order("station-1", "n-1")
    finally:
        eng.shutdown()


def test_a_name_that_is_both_a_method_and_a_channel_is_routed_as_a_method(folder: Path) -> None:
    a, b = up("qr"), up("b")
    eng = open_routed(folder / "x.db", [a, b], (Route("qr", "b"),))
    try:
        r = eng.submit(request())
        assert eng.get_order(r.order_id).legs[0].channel == "b"
    finally:
        eng.shutdown()


def test_a_cash_part_naming_a_channel_is_paid_there_directly(folder: Path) -> None:
    a, b = up("a"), up("b")
    eng = open_routed(folder / "x.db", [a, b], (Route("qr", "a"),))
    try:
        r = eng.submit(request(method="b"))
        assert eng.get_order(r.order_id).legs[0].channel == "b"
    finally:
        eng.shutdown()


def test_the_route_decision_is_journalled_with_every_routes_verdict(folder: Path) -> None:
    a, b, c = up("a"), up("b"), up("c")
    eng = open_routed(folder / "x.db", [a, b, c],
                      (Route("qr", "a"), Route("qr", "b", priority=1),
                       Route("qr", "c", amount_max_minor=1_00)))
    try:
        r = eng.submit(request())
        entry = route_entries(eng, r.order_id)[0]
        assert (entry.from_state, entry.to_state) == ("qr", "a")
        assert "a chosen" in entry.cause
        assert "b passed over: priority 1 after 0" in entry.cause
        assert "c skipped" in entry.cause
    finally:
        eng.shutdown()


def test_a_retry_of_an_accepted_routed_order_is_not_routed_again(folder: Path) -> None:
    a, b = up("a"), up("b")
    eng = open_routed(folder / "x.db", [a, b], (Route("qr", "a"), Route("qr", "b", priority=1)),
                      breaker=__import__("payengine").BreakerPolicy(
                          window_calls=5, calls_min=1, failure_pct=50, open_ms=60_000))
    try:
        r = eng.submit(request())
        assert eng.get_order(r.order_id).legs[0].channel == "a"
        a.pay_reply = ConnectionError("down")
        a.query_reply = ConnectionError("down")
        eng.submit(request("n-2", amount=51_00))
        wait_for(lambda: eng.channel_health()["a"] == "open", what="breaker open")
        assert eng.submit(request()) == r
        third = eng.submit(request("n-3", amount=52_00))
        assert eng.get_order(third.order_id).legs[0].channel == "b"
    finally:
        eng.shutdown()


def test_channel_health_reports_every_channel_closed_at_first(folder: Path) -> None:
    a, b = up("a"), up("b")
    eng = open_routed(folder / "x.db", [a, b], (Route("qr", "a"),))
    try:
        assert eng.channel_health() == {"a": "closed", "b": "closed"}
    finally:
        eng.shutdown()


def test_a_four_argument_pay_channel_is_skipped_for_a_payment_with_details(folder: Path
                                                                            ) -> None:
    from payengine import PayDetails, PayScenario
    old = ReadmeWallet("a", ChannelReply("SUCCESS", "USERPAYING"))
    b = up("b")
    eng = open_routed(folder / "x.db", [old, b],  # type: ignore[list-item]
                      (Route("qr", "a"), Route("qr", "b", priority=1)))
    try:
        req = PaymentRequest("station-1", "n-1", "alice", "CNY", 50_00, "Fuel",
                             cash=CashPart(50_00, "qr", PayDetails(PayScenario.NATIVE,
                                                                   device_id="pump-3")))
        r = eng.submit(req)
        assert eng.get_order(r.order_id).legs[0].channel == "b"
        assert "takes no pay details" in route_entries(eng, r.order_id)[0].cause
    finally:
        eng.shutdown()


# --- falling back ------------------------------------------------------------------------

def test_fallback_queries_then_closes_the_old_serial_before_paying_the_next_route(
        folder: Path) -> None:
    d, u = down("a"), up("b")
    eng = open_routed(folder / "x.db", [d, u], (Route("qr", "a"), Route("qr", "b", priority=1)))
    try:
        r = eng.submit(request())
        view = final(eng, r.order_id)
        assert view.state == "succeeded"
        kinds = [c[0] for c in d.calls]
        assert kinds.index("query") < kinds.index("close")
        assert d.calls_of("close")[0][1] == r.payment_serial
        assert u.calls_of("pay")[0][1] == r.payment_serial + "-F1"
        moves = [e for e in route_entries(eng, r.order_id)
                 if e.from_state == "a" and e.to_state == "b"]
        assert len(moves) == 1
        assert "BANK_DOWN (retryable" in moves[0].cause
        assert "ORDERNOTEXIST (not found)" in moves[0].cause
        assert "CLOSED (failure)" in moves[0].cause
        assert "tried already" in moves[0].cause
    finally:
        eng.shutdown()


def test_fallbacks_max_zero_never_falls_back_and_the_order_fails(folder: Path) -> None:
    d, u = down("a"), up("b")
    eng = open_routed(folder / "x.db", [d, u], (Route("qr", "a"), Route("qr", "b", priority=1)),
                      fallbacks_max=0)
    try:
        r = eng.submit(request())
        assert final(eng, r.order_id).state == "failed"
        assert u.count("pay") == 0
    finally:
        eng.shutdown()


def test_a_non_retryable_refusal_fails_the_order_without_a_fallback(folder: Path) -> None:
    d, u = Wallet("a", pay=PAYERROR, query=NOT_FOUND), up("b")
    eng = open_routed(folder / "x.db", [d, u], (Route("qr", "a"), Route("qr", "b", priority=1)))
    try:
        r = eng.submit(request())
        view = final(eng, r.order_id)
        assert view.state == "failed"
        assert u.count("pay") == 0
        assert [t.channel for t in view.legs[0].channels_tried] == ["a"]
    finally:
        eng.shutdown()


def test_a_payment_sent_to_a_channel_directly_never_falls_back(folder: Path) -> None:
    d, u = down("a"), up("b")
    eng = open_routed(folder / "x.db", [d, u], (Route("qr", "a"), Route("qr", "b", priority=1)))
    try:
        r = eng.submit(request(method="a"))
        assert final(eng, r.order_id).state == "failed"
        assert u.count("pay") == 0
    finally:
        eng.shutdown()


def test_a_query_answering_success_means_the_order_is_paid_by_the_old_channel(folder: Path
                                                                                ) -> None:
    d = Wallet("a", pay=BANK_DOWN, query=lambda serial: paid(serial, 50_00), close=CLOSED)
    u = up("b")
    eng = open_routed(folder / "x.db", [d, u], (Route("qr", "a"), Route("qr", "b", priority=1)))
    try:
        r = eng.submit(request())
        view = final(eng, r.order_id)
        assert view.state == "succeeded"
        assert view.legs[0].channel == "a"
        assert u.count("pay") == 0
        assert d.count("close") == 0
    finally:
        eng.shutdown()


def test_a_query_answering_a_non_retryable_failure_fails_the_order(folder: Path) -> None:
    d, u = Wallet("a", pay=BANK_DOWN, query=PAYERROR, close=CLOSED), up("b")
    eng = open_routed(folder / "x.db", [d, u], (Route("qr", "a"), Route("qr", "b", priority=1)))
    try:
        r = eng.submit(request())
        assert final(eng, r.order_id).state == "failed"
        assert u.count("pay") == 0
    finally:
        eng.shutdown()


def test_a_query_that_stays_undecided_ends_in_no_fallback_and_a_failed_order(folder: Path
                                                                              ) -> None:
    d, u = Wallet("a", pay=BANK_DOWN, query=WAITING, close=CLOSED), up("b")
    eng = open_routed(folder / "x.db", [d, u], (Route("qr", "a"), Route("qr", "b", priority=1)))
    try:
        r = eng.submit(request())
        assert final(eng, r.order_id).state == "failed"
        assert u.count("pay") == 0
        assert d.count("query") >= 3
    finally:
        eng.shutdown()


def test_a_close_answering_success_means_it_was_paid_there_after_all(folder: Path) -> None:
    d = Wallet("a", pay=BANK_DOWN, query=NOT_FOUND,
               close=lambda serial: paid(serial, 50_00))
    u = up("b")
    eng = open_routed(folder / "x.db", [d, u], (Route("qr", "a"), Route("qr", "b", priority=1)))
    try:
        r = eng.submit(request())
        view = final(eng, r.order_id)
        assert view.state == "succeeded"
        assert view.legs[0].channel == "a"
        assert u.count("pay") == 0
    finally:
        eng.shutdown()


def test_no_route_left_after_a_refusal_fails_the_order_with_a_cause_saying_so(folder: Path
                                                                               ) -> None:
    d = down("a")
    eng = open_routed(folder / "x.db", [d], (Route("qr", "a"),))
    try:
        r = eng.submit(request())
        view = final(eng, r.order_id)
        assert view.state == "failed"
        assert "no route left" in (view.cause or "")
    finally:
        eng.shutdown()


def test_fallbacks_max_one_stops_after_one_fallback(folder: Path) -> None:
    a, b, c = down("a"), down("b"), up("c")
    eng = open_routed(folder / "x.db", [a, b, c],
                      (Route("qr", "a"), Route("qr", "b", priority=1),
                       Route("qr", "c", priority=2)))
    try:
        r = eng.submit(request())
        view = final(eng, r.order_id)
        assert view.state == "failed"
        assert c.count("pay") == 0
        assert [t.channel for t in view.legs[0].channels_tried] == ["a", "b"]
    finally:
        eng.shutdown()


def test_fallbacks_max_two_reaches_the_third_route_under_serial_f2(folder: Path) -> None:
    a, b, c = down("a"), down("b"), up("c")
    eng = open_routed(folder / "x.db", [a, b, c],
                      (Route("qr", "a"), Route("qr", "b", priority=1),
                       Route("qr", "c", priority=2)), fallbacks_max=2)
    try:
        r = eng.submit(request())
        view = final(eng, r.order_id)
        assert view.state == "succeeded"
        assert view.payment_serial == r.payment_serial + "-F2"
        assert [(t.channel, t.outcome, t.code) for t in view.legs[0].channels_tried] == [
            ("a", "unpaid", "BANK_DOWN"), ("b", "unpaid", "BANK_DOWN"), ("c", "paid", "SUCCESS")]
        assert b.calls_of("pay")[0][1] == r.payment_serial + "-F1"
    finally:
        eng.shutdown()


def test_not_found_on_a_query_without_an_explicit_refusal_is_no_fallback(folder: Path) -> None:
    a = Wallet("a", pay=WAITING, query=NOT_FOUND, close=CLOSED)
    b = up("b")
    eng = open_routed(folder / "x.db", [a, b], (Route("qr", "a"), Route("qr", "b", priority=1)))
    try:
        r = eng.submit(request())
        time.sleep(1.0)
        view = eng.get_order(r.order_id)
        assert view.legs[0].channel == "a"
        assert b.count("pay") == 0
    finally:
        eng.shutdown()


def test_a_channel_that_cannot_close_skips_the_close_step_and_the_journal_says_no_close(
        folder: Path) -> None:
    a = down("a")
    a.supports_close = False  # type: ignore[attr-defined]
    b = up("b")
    eng = open_routed(folder / "x.db", [a, b], (Route("qr", "a"), Route("qr", "b", priority=1)))
    try:
        r = eng.submit(request())
        assert final(eng, r.order_id).state == "succeeded"
        assert a.count("close") == 0
        assert any("no close" in (e.cause or "") for e in route_entries(eng, r.order_id))
    finally:
        eng.shutdown()


def test_the_pay_window_is_not_extended_by_a_fallback(folder: Path) -> None:
    a = Wallet("a", pay=BANK_DOWN, query=WAITING, close=CLOSED)
    b = up("b")
    eng = open_routed(folder / "x.db", [a, b], (Route("qr", "a"), Route("qr", "b", priority=1)),
                      policy=OrderPolicy(pay_window_ms=300, query_schedule_ms=(1_000, 1_000)))
    try:
        r = eng.submit(request())
        view = final(eng, r.order_id)
        assert view.state in ("closed", "failed")
        assert b.count("pay") == 0
    finally:
        eng.shutdown()


def test_channels_tried_is_empty_for_voucher_legs_and_one_entry_for_a_direct_payment(
        folder: Path) -> None:
    a = up("a")
    eng = open_routed(folder / "x.db", [a], (Route("qr", "a"),))
    try:
        eng.open_account("alice/rp", "CNY")
        eng.fund("alice/rp", 1_00, funding_id="rp")
        req = PaymentRequest("station-1", "n-1", "alice", "CNY", 51_00, "Fuel",
                             cash=CashPart(50_00, "a"),
                             vouchers=(VoucherPart("alice/rp", 1_00, LegMode.PRE_DEDUCT),))
        r = eng.submit(req)
        view = wait_for(lambda: (o := eng.get_order(r.order_id)).settled and o)
        assert view.legs[1].channels_tried == ()
        only = view.legs[0].channels_tried
        assert len(only) == 1
        assert (only[0].channel, only[0].payment_serial, only[0].outcome, only[0].code) == (
            "a", r.payment_serial, "paid", "SUCCESS")
    finally:
        eng.shutdown()


def test_a_late_success_on_a_left_route_is_refunded_as_a_duplicate_charge(folder: Path) -> None:
    a, b = down("a"), up("b")
    eng = open_routed(folder / "x.db", [a, b], (Route("qr", "a"), Route("qr", "b", priority=1)))
    try:
        r = eng.submit(request())
        view = final(eng, r.order_id)
        assert view.state == "succeeded"
        # the left wallet now says it charged the first serial after all
        a.query_reply = ChannelReply("SUCCESS", "SUCCESS", "TX-LATE", 50_00)
        a.query_charge = lambda serial, txn: ChannelReply(  # type: ignore[method-assign]
            "SUCCESS", "SUCCESS", "TX-LATE", 50_00)
        from tests.helpers import signed_callback
        for _ in range(50):
            try:
                signed_callback(eng, "a", r.payment_serial, a.query_reply)
                break
            except Exception:
                time.sleep(0.1)
        late = wait_for(lambda: (o := eng.get_order(r.order_id)).refund("charge:TX-LATE") and o,
                        what="late refund")
        refund = late.refund("charge:TX-LATE")
        assert refund.kind == "duplicate_charge"
        assert late.state == "succeeded"
        assert late.legs[0].channel == "b"
        wait_for(lambda: eng.get_order(r.order_id).legs[0].channels_tried[0].outcome
                 == "charged_late", what="charged_late")
        assert any(c[0] == "refund" and c[1] == r.payment_serial for c in a.calls)
    finally:
        eng.shutdown()


# --- routes in the configuration file ---------------------------------------------------

CHANNELS = """
[channels.wechat-1]
kind = "simulated"
wallet = "wechat"
merchant_no = "m1"
credentials = { key = "simulated-wallet-key-0001" }

[channels.wechat-2]
kind = "simulated"
wallet = "wechat"
merchant_no = "m2"
credentials = { key = "simulated-wallet-key-0002" }
"""

ROUTING = """
[routing]
fallbacks_max = 1

[[routing.route]]
method = "qr"
channel = "wechat-1"
priority = 0
weight = 3
fee_ppm = 6000
limits = { amount_min_minor = 1, amount_max_minor = 15000 }
currencies = ["CNY"]

[[routing.route]]
method = "qr"
channel = "wechat-2"
priority = 1
"""


def test_the_readmes_routing_table_loads_with_its_figures() -> None:
    table = load_routing(CHANNELS + ROUTING)
    assert table.fallbacks_max == 1
    first, second = table.routes
    assert (first.method, first.channel, first.priority, first.weight, first.fee_ppm,
            first.amount_min_minor, first.amount_max_minor, first.currencies) == (
        "qr", "wechat-1", 0, 3, 6000, 1, 15000, frozenset({"CNY"}))
    assert (second.channel, second.priority, second.weight, second.fee_ppm,
            second.amount_max_minor, second.currencies) == (
        "wechat-2", 1, 1, None, 10**15, frozenset())


def test_load_routing_reads_a_path(tmp_path: Path) -> None:
    path = tmp_path / "channels.toml"
    path.write_text(CHANNELS + ROUTING)
    assert len(load_routing(path).routes) == 2
    assert len(load_routing(str(path)).routes) == 2


def test_a_file_without_routing_gives_an_empty_table_with_fallbacks_max_one() -> None:
    table = load_routing(CHANNELS)
    assert table.routes == ()
    assert table.fallbacks_max == 1
    assert table == RoutingTable()


def test_load_channels_and_load_config_ignore_the_routing_tables() -> None:
    from payengine import load_config
    names = sorted(c.name for c in load_config(CHANNELS + ROUTING))
    assert names == ["wechat-1", "wechat-2"]


def test_channels_may_be_given_instead_of_the_files_channel_tables() -> None:
    table = load_routing(ROUTING, channels={"wechat-1", "wechat-2"})
    assert len(table.routes) == 2


def test_channels_may_be_passed_positionally_as_the_readmes_signature_shows() -> None:
    table = load_routing(ROUTING, ["wechat-1", "wechat-2"])  # type: ignore[misc]
    assert len(table.routes) == 2


@pytest.mark.parametrize("snippet,key", [
    ("[routing]\nfallbacks_max = 4\n", "routing.fallbacks_max"),
    ("[routing]\nfallbacks_max = -1\n", "routing.fallbacks_max"),
    ('[[routing.route]]\nmethod = "qr"\nchannel = "wechat-1"\n'
     '[[routing.route]]\nmethod = "qr"\nchannel = "nope"\n', "routing.route[1].channel"),
    ('[[routing.route]]\nmethod = "qr"\nchannel = "wechat-1"\n'
     '[[routing.route]]\nmethod = "qr"\n', "routing.route[1].channel"),
    ('[[routing.route]]\nmethod = "qr"\nchannel = "wechat-1"\nweight = 0\n',
     "routing.route[0].weight"),
    ('[[routing.route]]\nmethod = "qr"\nchannel = "wechat-1"\npriority = 1001\n',
     "routing.route[0].priority"),
    ('[[routing.route]]\nmethod = "qr"\nchannel = "wechat-1"\nfee_ppm = 1000001\n',
     "routing.route[0].fee_ppm"),
    ('[[routing.route]]\nmethod = "qr"\nchannel = "wechat-1"\n'
     'limits = { amount_min_minor = 100, amount_max_minor = 99 }\n',
     "routing.route[0].limits.amount_max_minor"),
    ('[[routing.route]]\nmethod = "qr"\nchannel = "wechat-1"\ncurrencies = ["yuan"]\n',
     "routing.route[0].currencies"),
    ('[[routing.route]]\nmethod = "qr"\nchannel = "wechat-1"\ncolour = "red"\n',
     "routing.route[0].colour"),
    ('[[routing.route]]\nmethod = "qr"\nchannel = "wechat-1"\n'
     '[[routing.route]]\nmethod = "qr"\nchannel = "wechat-1"\n', "routing.route[1]"),
])
def test_every_routing_mistake_is_a_config_error_whose_key_names_it(snippet: str, key: str
                                                                     ) -> None:
    with pytest.raises(ConfigError) as caught:
        load_routing(CHANNELS + snippet)
    assert caught.value.key == key
    assert caught.value.code == "config_error"


def test_more_than_a_thousand_routes_in_the_file_is_a_config_error() -> None:
    routes = "".join(f'[[routing.route]]\nmethod = "m{i}"\nchannel = "wechat-1"\n'
                     for i in range(1001))
    with pytest.raises(ConfigError):
        load_routing(CHANNELS + routes)
    ok = "".join(f'[[routing.route]]\nmethod = "m{i}"\nchannel = "wechat-1"\n'
                 for i in range(1000))
    assert len(load_routing(CHANNELS + ok).routes) == 1000


def test_an_unknown_key_in_the_routing_table_itself_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as caught:
        load_routing(CHANNELS + "[routing]\nfallback_max = 1\n")
    assert caught.value.key.startswith("routing.")


def test_the_readme_use_line_opens_an_engine_routed_by_the_file(tmp_path: Path) -> None:
    from payengine import load_channels
    path = tmp_path / "channels.toml"
    path.write_text(CHANNELS + ROUTING)
    eng = Engine.open(tmp_path / "x.db", channels=load_channels(path),
                      config=EngineConfig(routing=load_routing(path)))
    try:
        small = eng.submit(request("n-1", 150_00))
        big = eng.submit(request("n-2", 150_01))
        assert eng.get_order(small.order_id).legs[0].channel == "wechat-1"
        assert eng.get_order(big.order_id).legs[0].channel == "wechat-2"
    finally:
        eng.shutdown()


def test_a_disabled_channel_from_the_file_is_skipped_by_the_routing(tmp_path: Path) -> None:
    from payengine import load_channels
    text = CHANNELS.replace('merchant_no = "m1"', 'merchant_no = "m1"\nenabled = false') + ROUTING
    eng = Engine.open(tmp_path / "x.db", channels=load_channels(text),
                      config=EngineConfig(routing=load_routing(text)))
    try:
        r = eng.submit(request("n-1", 100_00))
        assert eng.get_order(r.order_id).legs[0].channel == "wechat-2"
        assert "disabled" in route_entries(eng, r.order_id)[0].cause
    finally:
        eng.shutdown()


def test_fallbacks_max_three_reaches_the_fourth_route_under_serial_f3(folder: Path) -> None:
    wallets = [down("a"), down("b"), down("c"), up("d")]
    eng = open_routed(folder / "x.db", wallets,
                      tuple(Route("qr", w.name, priority=i) for i, w in enumerate(wallets)),
                      fallbacks_max=3)
    try:
        r = eng.submit(request())
        view = final(eng, r.order_id)
        assert view.state == "succeeded"
        assert view.payment_serial == r.payment_serial + "-F3"
        assert [t.channel for t in view.legs[0].channels_tried] == ["a", "b", "c", "d"]
    finally:
        eng.shutdown()


def test_the_routing_tables_fallbacks_max_is_copied_over_the_policys(folder: Path) -> None:
    d, u = down("a"), up("b")
    policy = OrderPolicy(pay_window_ms=10_000, query_schedule_ms=(50, 100, 200),
                         fallbacks_max=0)
    eng = open_routed(folder / "x.db", [d, u], (Route("qr", "a"), Route("qr", "b", priority=1)),
                      fallbacks_max=1, policy=policy)
    try:
        r = eng.submit(request())
        assert final(eng, r.order_id).state == "succeeded"
        assert u.count("pay") == 1
    finally:
        eng.shutdown()
