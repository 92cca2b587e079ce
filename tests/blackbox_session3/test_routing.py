"""Routing: payment methods, channels and their health."""

from __future__ import annotations

import pytest

from payengine import (
    BreakerPolicy,
    CashPart,
    ChannelReply,
    EngineConfig,
    InvalidRequest,
    NoRoute,
    OrderPolicy,
    PaymentRequest,
    Route,
    RoutingTable,
    UnknownOrder,
)

from .support import ScriptedChannel, fuel, uniq, wait_for

POLICY = OrderPolicy(pay_window_ms=60_000, query_schedule_ms=(100,) * 20)


def _open(world, names, routes, fee_ppm=None, breaker=None, policy=POLICY):
    channels = {n: ScriptedChannel(n) for n in names}
    kw = {"routing": RoutingTable(tuple(routes))}
    if fee_ppm:
        kw["fee_ppm"] = fee_ppm
    if breaker:
        kw["breaker"] = breaker
    engine = world.open(list(channels.values()), policy=policy, config=EngineConfig(**kw))
    return engine, channels


def _route_entry(engine, order_id):
    entries = [j for j in engine.journal(order_id) if j.part == "route"]
    assert len(entries) == 1
    return entries[0]


def test_method_is_routed_and_journalled(world) -> None:
    # "`engine.get_order(order_id).legs[0].channel     # "wechat-mch1": the executing channel`"
    # "an entry of part `route`, `from_state` the method, `to_state` the channel"
    engine, _ = _open(world, ["wechat-mch1", "wechat-mch2", "alipay"], [
        Route("qr", "wechat-mch1", amount_max_minor=150_00),
        Route("qr", "alipay", priority=1, currencies=frozenset({"CNY"})),
    ])
    receipt = engine.submit(fuel(channel="qr"))
    assert engine.get_order(receipt.order_id).legs[0].channel == "wechat-mch1"
    entry = _route_entry(engine, receipt.order_id)
    assert (entry.from_state, entry.to_state) == ("qr", "wechat-mch1")
    assert entry.cause.startswith("method qr: wechat-mch1 chosen")
    assert "alipay passed over: priority 1 after 0" in entry.cause


def test_channel_name_paid_directly(world) -> None:
    # "one that names a channel is paid there directly"
    engine, channels = _open(world, ["wechat-mch1", "alipay"], [Route("qr", "wechat-mch1")])
    receipt = engine.submit(fuel(channel="alipay"))
    assert engine.get_order(receipt.order_id).legs[0].channel == "alipay"
    wait_for(lambda: channels["alipay"].pays_of(receipt.payment_serial), "pay on alipay")


def test_name_both_method_and_channel_is_a_method(world) -> None:
    # "(a name that is both is a method)"
    engine, channels = _open(world, ["wechat", "alipay"], [Route("wechat", "alipay")])
    receipt = engine.submit(fuel(channel="wechat"))
    assert engine.get_order(receipt.order_id).legs[0].channel == "alipay"
    wait_for(lambda: channels["alipay"].pays_of(receipt.payment_serial), "pay on alipay")
    assert channels["wechat"].pay_calls == []


def test_amount_limit_skips_route(world) -> None:
    # "skipped: ... an amount outside its limits"
    engine, _ = _open(world, ["wechat-mch1", "alipay"], [
        Route("qr", "wechat-mch1", amount_max_minor=150_00),
        Route("qr", "alipay", priority=1),
    ])
    big = engine.submit(fuel(channel="qr", total=150_01))
    assert engine.get_order(big.order_id).legs[0].channel == "alipay"
    edge = engine.submit(fuel(channel="qr", total=150_00))
    assert engine.get_order(edge.order_id).legs[0].channel == "wechat-mch1"
    small_route = _route_entry(engine, big.order_id)
    assert "wechat-mch1 skipped" in small_route.cause


def test_amount_min_skips_route(world) -> None:
    engine, _ = _open(world, ["a", "b"], [Route("qr", "a", amount_min_minor=50_00),
                                          Route("qr", "b", priority=5)])
    receipt = engine.submit(fuel(channel="qr", total=49_99))
    assert engine.get_order(receipt.order_id).legs[0].channel == "b"


def test_currency_skips_route(world) -> None:
    # "skipped: ... a currency it does not take"
    engine, _ = _open(world, ["a", "b"], [
        Route("qr", "a", currencies=frozenset({"CNY"})), Route("qr", "b", priority=9)])
    usd = PaymentRequest("station-42", uniq(), "alice", "USD", 10_00, "Fuel", cash=CashPart(10_00, "qr"))
    receipt = engine.submit(usd)
    assert engine.get_order(receipt.order_id).legs[0].channel == "b"
    cny = engine.submit(fuel(channel="qr"))
    assert engine.get_order(cny.order_id).legs[0].channel == "a"


def test_missing_channel_skipped(world) -> None:
    # "skipped: a route to a channel the engine does not have"
    engine, _ = _open(world, ["b"], [Route("qr", "ghost"), Route("qr", "b", priority=3)])
    receipt = engine.submit(fuel(channel="qr"))
    assert engine.get_order(receipt.order_id).legs[0].channel == "b"
    assert "ghost skipped" in _route_entry(engine, receipt.order_id).cause


def test_lowest_fee_wins_at_equal_priority(world) -> None:
    # "of the rest, the lowest `priority`; among those the lowest fee for this amount"
    engine, _ = _open(world, ["cheap", "dear"], [Route("qr", "dear", weight=1000), Route("qr", "cheap")],
                      fee_ppm={"cheap": 3_000, "dear": 6_000})
    for _ in range(5):
        receipt = engine.submit(fuel(channel="qr"))
        assert engine.get_order(receipt.order_id).legs[0].channel == "cheap"


def test_priority_before_fee(world) -> None:
    engine, _ = _open(world, ["cheap", "dear"], [Route("qr", "dear"), Route("qr", "cheap", priority=1)],
                      fee_ppm={"cheap": 0, "dear": 9_000})
    receipt = engine.submit(fuel(channel="qr"))
    assert engine.get_order(receipt.order_id).legs[0].channel == "dear"


def test_weight_draw(world) -> None:
    # "among those still equal, by `weight`, with a draw derived from the order id"
    engine, _ = _open(world, ["light", "heavy"], [Route("qr", "light", weight=1),
                                                  Route("qr", "heavy", weight=1000)])
    chosen = [engine.get_order(engine.submit(fuel(channel="qr")).order_id).legs[0].channel for _ in range(20)]
    assert chosen.count("heavy") >= 15


def test_no_route_names_each_route_nothing_created(world) -> None:
    # "No route left: `NoRoute` (code `no_route`; the message names each route and why it was
    #  skipped), nothing created."
    engine, _ = _open(world, ["a", "b"], [
        Route("qr", "a", amount_max_minor=10_00), Route("qr", "b", currencies=frozenset({"USD"})),
        Route("qr", "ghost")])
    no = uniq()
    with pytest.raises(NoRoute) as info:
        engine.submit(fuel(no, channel="qr"))
    assert info.value.code == "no_route"
    for name in ("a", "b", "ghost"):
        assert name in str(info.value)
    with pytest.raises(UnknownOrder):
        engine.find_order("station-42", no)


def test_unknown_method_without_route_is_refused(world) -> None:
    # "one cash part at most, through a known channel"
    engine, _ = _open(world, ["a"], [Route("qr", "a")])
    with pytest.raises((InvalidRequest, NoRoute)):
        engine.submit(fuel(channel="nowhere"))


@pytest.mark.parametrize("kwargs", [
    {"priority": -1}, {"priority": 1001}, {"weight": 0}, {"weight": 1001},
    {"amount_min_minor": 0}, {"amount_min_minor": 10, "amount_max_minor": 5},
    {"amount_max_minor": 10**15 + 1},
])
def test_bad_route_refused_when_built(kwargs) -> None:
    # "A bad route is `InvalidRequest` when built." (`priority` 0..1000 ...; `weight` 1..1000)
    with pytest.raises(InvalidRequest):
        RoutingTable((Route("qr", "a", **kwargs),))


def test_route_bounds_accepted() -> None:
    RoutingTable((Route("qr", "a", priority=1000, weight=1000), Route("qr", "b", priority=0, weight=1)))


def test_pair_once_and_at_most_1000_routes() -> None:
    # "`RoutingTable(routes)`: at most 1,000 routes, a (method, channel) pair once."
    with pytest.raises(InvalidRequest):
        RoutingTable((Route("qr", "a"), Route("qr", "a", priority=2)))
    RoutingTable(tuple(Route(f"m{i}", "a") for i in range(1000)))
    with pytest.raises(InvalidRequest):
        RoutingTable(tuple(Route(f"m{i}", "a") for i in range(1001)))


# --- health -------------------------------------------------------------------------------

BREAKER = BreakerPolicy(window_calls=4, calls_min=2, failure_pct=50, open_ms=1_500)


LONG_OPEN = BreakerPolicy(window_calls=4, calls_min=2, failure_pct=50, open_ms=60_000)


def test_breaker_policy_defaults() -> None:
    # "`BreakerPolicy(window_calls=20, calls_min=5, failure_pct=50, open_ms=30_000)`"
    policy = BreakerPolicy()
    assert (policy.window_calls, policy.calls_min, policy.failure_pct, policy.open_ms) == (20, 5, 50, 30_000)
    assert EngineConfig().breaker == policy


def test_channel_health_lists_every_channel_closed(world) -> None:
    # "`engine.channel_health()` → `{channel: "closed" | "open" | "half_open"}`"
    engine, _ = _open(world, ["a", "b"], [Route("qr", "a")])
    assert engine.channel_health() == {"a": "closed", "b": "closed"}


def _break(engine, channel, name):
    channel.pay_raises = ConnectionResetError("reset")
    channel.query_raises = ConnectionResetError("reset")
    for _ in range(2):
        engine.submit(fuel(channel=name))
    wait_for(lambda: engine.channel_health()[name] == "open", "breaker open")


def test_breaker_opens_on_raising_calls_and_routing_skips(world) -> None:
    # "the breaker opens when at least `calls_min` of the last `window_calls` outcomes are there
    #  and `failure_pct` percent or more failed; open, routing skips the channel"
    engine, channels = _open(world, ["wechat-mch1", "wechat-mch2"], [
        Route("qr", "wechat-mch1"), Route("qr", "wechat-mch2", priority=1)], breaker=BREAKER)
    _break(engine, channels["wechat-mch1"], "wechat-mch1")
    receipt = engine.submit(fuel(channel="qr"))
    assert engine.get_order(receipt.order_id).legs[0].channel == "wechat-mch2"
    cause = _route_entry(engine, receipt.order_id).cause
    assert "wechat-mch1 skipped: unavailable (circuit open)" in cause


def test_breaker_open_only_route_is_no_route(world) -> None:
    engine, channels = _open(world, ["a"], [Route("qr", "a")], breaker=BREAKER)
    _break(engine, channels["a"], "a")
    with pytest.raises(NoRoute):
        engine.submit(fuel(channel="qr"))


def test_breaker_counts_bad_return_code_as_failure(world) -> None:
    # "A call *fails* when ... its `return_code` is not in the code table's `communication_ok`"
    engine, channels = _open(world, ["a"], [Route("qr", "a")], breaker=BREAKER)
    channels["a"].pay_reply = lambda s, a: ChannelReply("FAIL", None)
    channels["a"].query_reply = lambda s: ChannelReply("FAIL", None)
    for _ in range(2):
        engine.submit(fuel(channel="a"))
    wait_for(lambda: engine.channel_health()["a"] == "open", "breaker open")


def test_business_refusal_is_an_answer(world) -> None:
    # "a business refusal is an answer"
    engine, channels = _open(world, ["a"], [Route("qr", "a")], breaker=BREAKER)
    channels["a"].pay_reply = lambda s, a: ChannelReply("SUCCESS", "PAYERROR")
    receipts = [engine.submit(fuel(channel="a")) for _ in range(4)]
    for r in receipts:
        wait_for(lambda r=r: engine.get_order(r.order_id).state == "failed", "failed")
    assert engine.channel_health()["a"] == "closed"


def test_half_open_after_open_ms_then_closes(world) -> None:
    # "then it is `half_open` (routing may use it again) until the next outcome closes it"
    engine, channels = _open(world, ["a"], [Route("qr", "a")], breaker=BREAKER)
    _break(engine, channels["a"], "a")
    channels["a"].pay_raises = None
    channels["a"].query_raises = None
    wait_for(lambda: engine.channel_health()["a"] != "open", "half open", deadline_s=10)
    # the queries of the open orders are outcomes too; either it is half_open now or already closed
    assert engine.channel_health()["a"] in ("half_open", "closed")
    receipt = engine.submit(fuel(channel="qr"))
    assert engine.get_order(receipt.order_id).legs[0].channel == "a"
    wait_for(lambda: engine.channel_health()["a"] == "closed", "closed again")


def test_open_breaker_keeps_querying_orders_on_it(world) -> None:
    # "A breaker affects routing only: orders already on a channel keep querying it."
    engine, channels = _open(world, ["a"], [Route("qr", "a")],
                             breaker=LONG_OPEN)
    _break(engine, channels["a"], "a")
    seen = len(channels["a"].query_calls)
    wait_for(lambda: len(channels["a"].query_calls) > seen + 2, "queries continue")
    assert engine.channel_health()["a"] == "open"


def test_retry_of_accepted_order_gets_receipt_whatever_health(world) -> None:
    # "A retry of an accepted order gets its receipt whatever the channels' health now."
    engine, channels = _open(world, ["a"], [Route("qr", "a")],
                             breaker=LONG_OPEN)
    request = fuel(channel="qr")
    receipt = engine.submit(request)
    _break(engine, channels["a"], "a")
    assert engine.submit(request) == receipt


def test_order_stays_on_its_channel_for_refunds(world) -> None:
    # "The order then stays on its channel for its whole life (pay, queries, close, refunds by the
    #  original route)."
    engine, channels = _open(world, ["a", "b"], [Route("qr", "a"), Route("qr", "b", priority=1)])
    channels["a"].pay_reply = lambda s, a: ChannelReply("SUCCESS", "SUCCESS", "T-" + s, a, "CNY")
    receipt = engine.submit(fuel(channel="qr"))
    wait_for(lambda: engine.get_order(receipt.order_id).settled, "settled")
    engine.refund(receipt.order_id, "r1", 10_00)
    wait_for(lambda: channels["a"].refund_calls, "refund on a")
    assert channels["b"].refund_calls == [] and channels["b"].pay_calls == []


def test_two_channels_one_name_refused(world) -> None:
    # "so do ... two channels of one name at `Engine.open`" (InvalidRequest)
    with pytest.raises(InvalidRequest):
        world.open([ScriptedChannel("a"), ScriptedChannel("a")])
