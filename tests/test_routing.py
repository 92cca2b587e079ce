"""Routing (issue 11, item 3): the user picks a method, routing picks the executing channel
by limits, availability (circuit breakers), priority, fee and weight; the decision and why
are in the order's journal."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from payengine import (
    BreakerPolicy,
    CashPart,
    ChannelReply,
    Engine,
    EngineConfig,
    InvalidRequest,
    NoRoute,
    PaymentRequest,
    Route,
    RoutingTable,
    UnknownOrder,
)
from payengine.engine.health import Breaker, BreakerState
from payengine.engine.routing import choose_route, route_draw
from tests.helpers import ScriptedChannel, wait_for

QR = "qr"


def table(*routes: Route) -> RoutingTable:
    return RoutingTable(tuple(routes))


def choose(t: RoutingTable, amount: int = 10_000, currency: str = "CNY", *,
           unavailable: frozenset[str] = frozenset(), fee: dict[str, int] | None = None,
           draw: int = 0) -> str:
    return choose_route(t, QR, amount, currency, unavailable=unavailable, fee_ppm=fee or {},
                        draw=draw).channel


# ---------------------------------------------------------------- choose_route


def test_the_route_of_the_lowest_priority_is_chosen_whatever_its_fee() -> None:
    t = table(Route(QR, "b", priority=1), Route(QR, "a", priority=0))
    assert choose(t, fee={"a": 6_000, "b": 1}) == "a"


def test_among_equal_priorities_the_cheaper_fee_for_this_amount_wins() -> None:
    t = table(Route(QR, "a"), Route(QR, "b"))
    assert choose(t, fee={"a": 6_000, "b": 3_800}) == "b"
    assert choose(t, fee={"a": 3_800, "b": 6_000}) == "a"


def test_weights_share_the_draws_exactly_among_equal_routes() -> None:
    t = table(Route(QR, "a", weight=3), Route(QR, "b", weight=1))
    assert Counter(choose(t, draw=d) for d in range(400)) == {"a": 300, "b": 100}


def test_the_same_order_draws_the_same_route() -> None:
    assert route_draw("ord-1") == route_draw("ord-1") != route_draw("ord-2")


@pytest.mark.parametrize(("route", "why"), [
    (Route(QR, "a", amount_max_minor=9_999), "amount outside 1..9999"),
    (Route(QR, "a", amount_min_minor=10_001), "amount outside 10001.."),
    (Route(QR, "a", currencies=frozenset({"USD"})), "does not take CNY"),
])
def test_a_route_that_cannot_take_the_payment_is_skipped_and_named(route: Route,
                                                                    why: str) -> None:
    choice = choose_route(table(route, Route(QR, "b", priority=9)), QR, 10_000, "CNY",
                          unavailable=frozenset(), fee_ppm={}, draw=0)
    assert choice.channel == "b"
    assert ("a", f"skipped: {why}") in choice.considered or any(
        c == "a" and why in v for c, v in choice.considered)


def test_an_unavailable_channel_is_skipped_and_no_route_at_all_is_a_typed_refusal() -> None:
    t = table(Route(QR, "a"), Route(QR, "b", priority=1))
    assert choose(t, unavailable=frozenset({"a"})) == "b"
    with pytest.raises(NoRoute, match=r"a skipped: unavailable.*b skipped: unavailable"):
        choose(t, unavailable=frozenset({"a", "b"}))
    with pytest.raises(NoRoute, match="no route is configured"):
        choose_route(t, "card", 100, "CNY", unavailable=frozenset(), fee_ppm={}, draw=0)


def test_the_journal_cause_says_why_each_route_was_or_was_not_taken() -> None:
    t = table(Route(QR, "a", priority=0), Route(QR, "b", priority=1),
              Route(QR, "c", amount_max_minor=10))
    choice = choose_route(t, QR, 100, "CNY", unavailable=frozenset(), fee_ppm={}, draw=0)
    assert choice.cause == ("method qr: a chosen; b passed over: priority 1 after 0; "
                            "c skipped: amount outside 1..10")


@pytest.mark.parametrize("bad", [
    lambda: Route(QR, "a", weight=0), lambda: Route(QR, "a", priority=-1),
    lambda: Route(QR, "a", amount_min_minor=5, amount_max_minor=4),
    lambda: Route(QR, ""), lambda: table(Route(QR, "a"), Route(QR, "a", priority=2)),
    lambda: BreakerPolicy(calls_min=30, window_calls=20), lambda: BreakerPolicy(open_ms=0),
    lambda: Route(QR, "a", currencies=frozenset({"cny"})),
    lambda: Route(QR, "a", currencies=frozenset({"YUAN"})),
])
def test_a_bad_routing_setting_is_refused_when_built(bad: object) -> None:
    with pytest.raises(InvalidRequest):
        bad()  # type: ignore[operator]


routes = st.lists(st.builds(
    Route, st.just(QR), st.sampled_from("abcdef"), st.integers(0, 3), st.integers(1, 5),
    st.integers(1, 5_000), st.just(10_000)), min_size=1, max_size=6,
    unique_by=lambda r: r.channel)


@given(routes, st.integers(1, 10_000), st.frozensets(st.sampled_from("abcdef")),
       st.dictionaries(st.sampled_from("abcdef"), st.integers(0, 60_000)),
       st.integers(0, 2**64))
def test_the_chosen_route_qualifies_and_none_that_qualifies_is_strictly_better(
        rs: list[Route], amount: int, down: frozenset[str], fee: dict[str, int],
        draw: int) -> None:
    t = RoutingTable(tuple(rs))
    eligible = [r for r in rs if r.amount_min_minor <= amount <= r.amount_max_minor
                and r.channel not in down]
    if not eligible:
        with pytest.raises(NoRoute):
            choose_route(t, QR, amount, "CNY", unavailable=down, fee_ppm=fee, draw=draw)
        return
    chosen = choose_route(t, QR, amount, "CNY", unavailable=down, fee_ppm=fee, draw=draw)
    route = next(r for r in rs if r.channel == chosen.channel)
    assert route in eligible
    rank = (route.priority, fee.get(route.channel, 0))
    assert all((r.priority, fee.get(r.channel, 0)) >= rank for r in eligible)
    assert sorted(c for c, _ in chosen.considered) == sorted(r.channel for r in rs)


# ---------------------------------------------------------------- the breaker


POLICY = BreakerPolicy(window_calls=10, calls_min=4, failure_pct=50, open_ms=1_000)


def test_the_breaker_opens_at_the_threshold_and_not_before() -> None:
    b = Breaker()
    for answered in (False, False, True):
        b = b.record(answered, 0, POLICY)
    assert b.state(0) is BreakerState.CLOSED  # 3 outcomes: fewer than calls_min
    b = b.record(True, 0, POLICY)
    assert b.state(0) is BreakerState.OPEN  # 2 of 4 failed: 50 %
    assert not b.available(999) and b.available(1_000)


def test_a_half_open_breaker_closes_on_an_answer_and_reopens_on_a_failure() -> None:
    opened = Breaker((), 1_000)
    assert opened.state(1_000) is BreakerState.HALF_OPEN
    assert opened.record(True, 1_000, POLICY).state(1_000) is BreakerState.CLOSED
    again = opened.record(False, 1_500, POLICY)
    assert again.state(2_499) is BreakerState.OPEN and again.available(2_500)


@given(st.lists(st.booleans(), max_size=60))
def test_a_closed_breaker_opens_exactly_when_its_window_says_so(outcomes: list[bool]) -> None:
    b = Breaker()
    window: list[bool] = []
    for answered in outcomes:
        b = b.record(answered, 0, POLICY)
        window = [*window, answered][-POLICY.window_calls:]
        should_open = len(window) >= POLICY.calls_min and window.count(False) * 2 >= len(window)
        assert (b.state(0) is BreakerState.OPEN) == should_open
        if should_open:
            return


# ---------------------------------------------------------------- the engine


class FlakyChannel(ScriptedChannel):
    """Pays time out while ``down`` is set."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.down = threading.Event()

    def pay(self, payment_serial: str, amount_minor: int, currency: str, title: str
            ) -> ChannelReply:
        if self.down.is_set():
            with self._lock:
                self.calls.append(("pay", payment_serial, str(amount_minor)))
            raise TimeoutError(f"{self.name} did not answer")
        return super().pay(payment_serial, amount_minor, currency, title)


def request(no: str, amount: int = 5_000) -> PaymentRequest:
    return PaymentRequest("station-1", no, f"u-{no}", "CNY", amount, "Fuel",
                          CashPart(amount, QR))


def open_engine(path: Path, *channels: ScriptedChannel, routing: RoutingTable,
                fee: dict[str, int] | None = None) -> Engine:
    config = EngineConfig(routing=routing, fee_ppm=fee or {}, duplicate_guard_window_ms=0,
                          breaker=BreakerPolicy(window_calls=4, calls_min=2, failure_pct=100,
                                                open_ms=60_000))
    return Engine.open(path, channels=list(channels), config=config)


def test_a_method_is_paid_through_the_chosen_channel_and_the_journal_says_why(
        tmp_path: Path) -> None:
    one, two = ScriptedChannel("wechat-1"), ScriptedChannel("wechat-2")
    engine = open_engine(tmp_path / "a.db", one, two, routing=table(
        Route(QR, "wechat-1"), Route(QR, "wechat-2", priority=1)))
    try:
        receipt = engine.submit(request("o-1"))
        wait_for(lambda: one.count("pay") == 1, what="pay through wechat-1")
        view = engine.get_order(receipt.order_id)
        assert view.legs[0].channel == "wechat-1" and two.count("pay") == 0
        routed = [e for e in engine.journal(receipt.order_id) if e.part == "route"]
        assert [(e.from_state, e.to_state, e.cause) for e in routed] == [
            (QR, "wechat-1", "method qr: wechat-1 chosen; wechat-2 passed over: priority 1 "
                             "after 0")]
        assert engine.submit(request("o-1")) == receipt  # a retry: the same receipt
    finally:
        engine.shutdown()


def test_a_channel_that_stops_answering_is_skipped_once_its_breaker_opens(
        tmp_path: Path) -> None:
    one, two = FlakyChannel("wechat-1"), ScriptedChannel("wechat-2")
    engine = open_engine(tmp_path / "a.db", one, two, routing=table(
        Route(QR, "wechat-1"), Route(QR, "wechat-2", priority=1)))
    try:
        one.down.set()
        first = [engine.submit(request(f"o-{i}")) for i in range(2)]
        wait_for(lambda: engine.channel_health()["wechat-1"] == "open", what="breaker open")
        later = engine.submit(request("o-9"))
        assert [engine.get_order(r.order_id).legs[0].channel for r in first] == [
            "wechat-1", "wechat-1"]
        assert engine.get_order(later.order_id).legs[0].channel == "wechat-2"
        wait_for(lambda: two.count("pay") == 1, what="pay through wechat-2")
        assert engine.channel_health() == {"wechat-1": "open", "wechat-2": "closed"}
    finally:
        engine.shutdown()


def test_no_route_refuses_a_new_order_but_a_retry_of_an_accepted_one_gets_its_receipt(
        tmp_path: Path) -> None:
    one = FlakyChannel("wechat-1")
    engine = open_engine(tmp_path / "a.db", one, routing=table(Route(QR, "wechat-1")))
    try:
        accepted = engine.submit(request("o-1"))
        one.down.set()
        engine.submit(request("o-2"))
        wait_for(lambda: engine.channel_health()["wechat-1"] == "open", what="breaker open")
        with pytest.raises(NoRoute, match="unavailable"):
            engine.submit(request("o-3"))
        with pytest.raises(UnknownOrder):
            engine.find_order("station-1", "o-3")  # nothing was created
        assert engine.submit(request("o-1")) == accepted
    finally:
        engine.shutdown()


def test_a_cash_part_may_still_name_its_channel_directly(tmp_path: Path) -> None:
    one = ScriptedChannel("wechat-1")
    engine = open_engine(tmp_path / "a.db", one, routing=table(Route(QR, "wechat-1")))
    try:
        receipt = engine.submit(PaymentRequest("station-1", "o-1", "u", "CNY", 100, "Fuel",
                                               CashPart(100, "wechat-1")))
        assert engine.get_order(receipt.order_id).legs[0].channel == "wechat-1"
        assert [e for e in engine.journal(receipt.order_id) if e.part == "route"] == []
        with pytest.raises(InvalidRequest, match=r"methods: \[.qr.\]"):
            engine.submit(PaymentRequest("station-1", "o-2", "u", "CNY", 100, "Fuel",
                                         CashPart(100, "card")))
    finally:
        engine.shutdown()


def test_the_cheaper_channel_takes_the_payment_among_equal_priorities(tmp_path: Path) -> None:
    one, two = ScriptedChannel("wechat-1"), ScriptedChannel("wechat-2")
    engine = open_engine(tmp_path / "a.db", one, two, fee={"wechat-1": 6_000, "wechat-2": 2_000},
                         routing=table(Route(QR, "wechat-1"), Route(QR, "wechat-2")))
    try:
        receipts = [engine.submit(request(f"o-{i}")) for i in range(5)]
        assert {engine.get_order(r.order_id).legs[0].channel for r in receipts} == {"wechat-2"}
    finally:
        engine.shutdown()


def test_a_half_open_breaker_lets_one_probe_through_until_its_outcome_or_open_ms() -> None:
    half_open = Breaker((), 1_000)
    assert half_open.available(1_000)
    probing = half_open.probe(1_000, POLICY)
    assert probing.state(1_500) is BreakerState.HALF_OPEN
    assert not probing.available(1_500)  # the probe is out: nothing else goes there
    assert probing.available(2_000)  # no outcome within open_ms: another probe may go
    assert probing.record(True, 1_200, POLICY).available(1_200)  # it answered: closed
    reopened = probing.record(False, 1_200, POLICY)
    assert reopened.state(1_200) is BreakerState.OPEN and not reopened.available(2_199)
    assert Breaker().probe(0, POLICY) == Breaker()  # a closed breaker takes no probe


@given(st.lists(st.sampled_from(["route", "ok", "fail", "wait"]), max_size=40))
def test_a_half_open_breaker_never_has_two_probes_out_at_once(steps: list[str]) -> None:
    b, now, out = Breaker((), 0), 0, 0
    for step in steps:
        if step == "wait":
            now += 400
            if b.probe_until_ms is not None and now >= b.probe_until_ms:
                out = 0  # the probe's time is up: it no longer counts
        elif step == "route" and b.available(now):
            if b.state(now) is BreakerState.HALF_OPEN:
                out += 1
            b = b.probe(now, POLICY)
        elif step in ("ok", "fail"):
            b = b.record(step == "ok", now, POLICY)
            out = 0
        assert out <= 1
