"""Promises that join the new sections: channel configs in routing, schedules, risk x attempts,
signed requests carrying details, nonce bound."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time

import pytest

from payengine import (
    AttemptRefused,
    CashPart,
    EngineConfig,
    InvalidRequest,
    LegMode,
    MerchantRequestConfig,
    MerchantSigner,
    OrderPolicy,
    Overloaded,
    PayDetails,
    PaymentRequest,
    PayScenario,
    RefundView,
    RequestRejected,
    RiskBlocked,
    RiskConfig,
    RiskOutcome,
    RiskRules,
    RiskVerdict,
    Route,
    RoutingTable,
    UnknownOrder,
    VerificationFailed,
    VoucherPart,
    load_channels,
)

from .support import ScriptedChannel, fuel, uniq, wait_for
from .wallet import Wallet

SIM_TOML = """
[channels.sim-a]
kind = "simulated"
wallet = "wechat"
merchant_no = "a"
enabled = false
credentials = { key = "simulated-wallet-key-000a" }
simulated = { faults = "none" }

[channels.sim-b]
kind = "simulated"
wallet = "wechat"
merchant_no = "b"
credentials = { key = "simulated-wallet-key-000b" }
simulated = { faults = "none" }
limits = { amount_max_minor = 1000 }
fee = { basis_points = 100 }

[channels.sim-c]
kind = "simulated"
wallet = "wechat"
merchant_no = "c"
credentials = { key = "simulated-wallet-key-000c" }
simulated = { faults = "none" }
fee = { basis_points = 10 }
"""


def _routed(world, routes, total):
    channels = load_channels(SIM_TOML, world=world.runtime)
    engine = world.open(channels, config=EngineConfig(routing=RoutingTable(tuple(routes))))
    receipt = engine.submit(fuel(total=total, channel="qr"))
    return engine.get_order(receipt.order_id).legs[0].channel, engine


def test_disabled_channel_not_offered_by_routing(world) -> None:
    # "`enabled` | `true` | `false`: still built (orders that used it still need queries and refunds),
    #  offered for no new payment by the routing"
    channel, _ = _routed(world, [Route("qr", "sim-a"), Route("qr", "sim-c", priority=1)], 500)
    assert channel == "sim-c"


def test_disabled_channel_still_built(world) -> None:
    # "still built (orders that used it still need queries and refunds)"
    names = [c.name for c in load_channels(SIM_TOML, world=world.runtime)]
    assert "sim-a" in names


def test_config_limits_used_by_routing(world) -> None:
    # "`[channels.NAME.limits]` `amount_min_minor` ... `amount_max_minor` ...: `config.limits.allows(amount)`.
    #  Fee, limits and `enabled` are for the routing"
    channel, _ = _routed(world, [Route("qr", "sim-b"), Route("qr", "sim-c", priority=1)], 2000)
    assert channel == "sim-c"


def test_config_fee_used_by_routing(world) -> None:
    # "among those the lowest fee for this amount"; "Fee, limits and `enabled` are for the routing"
    channels = load_channels(SIM_TOML, world=world.runtime)
    engine = world.open(channels, config=EngineConfig(routing=RoutingTable((Route("qr", "sim-b"),
                                                                             Route("qr", "sim-c")))))
    chosen = {engine.get_order(engine.submit(fuel(total=500, channel="qr")).order_id).legs[0].channel
              for _ in range(12)}
    assert chosen == {"sim-c"}


CONFIG_TOML = """
[channels.wechat-9]
kind = "http"
wallet = "wechat"
merchant_no = "1900000199"
base_url = "{url}"
query_schedule_ms = [50, 50, 50, 50, 50, 50, 50, 50, 50, 50]
credentials = {{ key = "192006250b4c09247ec02edce69f6a2d" }}
signing = {{ method = "md5" }}

[channels.wechat-9.operations.pay]
path = "/pay/unifiedorder"
fields = {{ out_trade_no = "{{serial}}", total_fee = "{{amount}}", nonce_str = "{{nonce}}" }}
reply = {{ rename_result = {{ SUCCESS = "NOTPAY" }} }}

[channels.wechat-9.operations.query]
path = "/pay/orderquery"
fields = {{ out_trade_no = "{{serial}}", nonce_str = "{{nonce}}" }}
reply = {{ result_code = "trade_state" }}

[channels.wechat-9.codes.pay]
communication_ok = ["SUCCESS"]
success = ["SUCCESS"]
failure = ["PAYERROR", "CLOSED"]
processing = ["NOTPAY"]
"""


def test_channel_query_schedule_added_to_policy(world) -> None:
    # "`query_schedule_ms` ...: this channel's own schedule of status queries ...; `Engine.open` adds it
    #  to `OrderPolicy.channel_query_schedules_ms`"
    wallet = Wallet()
    try:
        (channel,) = load_channels(CONFIG_TOML.format(url=wallet.url), world=world.runtime)
        engine = world.open([channel])  # the engine's default schedule starts at 1 s, then 2 s, 5 s...
        engine.submit(PaymentRequest("station-42", uniq(), "alice", "CNY", 100, "t",
                                     cash=CashPart(100, "wechat-9")))
        wait_for(lambda: len(wallet.of("/pay/orderquery")) >= 4, "channel's own fast schedule", 2.5)
    finally:
        wallet.close()


def test_policy_schedule_for_channel_wins(world) -> None:
    # "(pairs `(channel, schedule)`; one the policy already names for the channel wins)"
    wallet = Wallet()
    try:
        (channel,) = load_channels(CONFIG_TOML.format(url=wallet.url), world=world.runtime)
        policy = OrderPolicy(channel_query_schedules_ms=(("wechat-9", (60_000,)),))
        engine = world.open([channel], policy=policy)
        engine.submit(PaymentRequest("station-42", uniq(), "alice", "CNY", 100, "t",
                                     cash=CashPart(100, "wechat-9")))
        wait_for(lambda: wallet.of("/pay/unifiedorder"), "pay")
        time.sleep(1.0)
        assert wallet.of("/pay/orderquery") == []
    finally:
        wallet.close()


# --- risk x attempts ------------------------------------------------------------------------------


def _issue(request, context):
    return "424242"


def test_last_wrong_code_error_state(world) -> None:
    # "a wrong one raises `VerificationFailed` (`.attempts_left`; the last one fails the order, `.state`
    #  `failed`)"
    engine = world.open([ScriptedChannel("wechat")], risk=RiskConfig(
        rules=RiskRules(step_up_amount={"CNY": 1}), issue_code=_issue, verify_attempts_max=2))
    receipt = engine.submit(fuel())
    with pytest.raises(VerificationFailed) as first:
        engine.verify(receipt.order_id, "1")
    assert first.value.attempts_left == 1
    with pytest.raises(VerificationFailed) as last:
        engine.verify(receipt.order_id, "1")
    assert last.value.attempts_left == 0
    assert last.value.state == "failed"


@pytest.mark.parametrize("code", [424242, None, ""])
def test_verify_bad_argument(world, code) -> None:
    # "Every other bad argument is `InvalidRequest`"
    engine = world.open([ScriptedChannel("wechat")], risk=RiskConfig(
        rules=RiskRules(step_up_amount={"CNY": 1}), issue_code=_issue))
    receipt = engine.submit(fuel())
    with pytest.raises(InvalidRequest):
        engine.verify(receipt.order_id, code)
    assert engine.get_order(receipt.order_id).verification.attempts_left == 3


def test_verify_unknown_order(world) -> None:
    engine = world.open([ScriptedChannel("wechat")])
    with pytest.raises(UnknownOrder):
        engine.verify("ord_nobody", "424242")


def test_no_new_attempt_while_waiting_for_code(world) -> None:
    # "a trade order waiting for its step-up code cannot be paid again meanwhile"
    engine = world.open([ScriptedChannel("wechat")], risk=RiskConfig(
        rules=RiskRules(step_up_amount={"CNY": 1}), issue_code=_issue))
    request = fuel()
    engine.submit(request)
    with pytest.raises(AttemptRefused):
        engine.submit(dataclasses.replace(request, attempt=2))


def test_new_attempt_is_assessed(world) -> None:
    # "a new attempt of a trade order (see *Paying a trade order again*) is a new payment, and is."
    seen: list = []

    class Hook:
        def assess(self, request, context):
            seen.append((request.attempt, context.order_id, context.now_ms > 0))
            assert hasattr(context, "rules") and hasattr(context, "velocity")
            return RiskVerdict.passed()

    engine = world.open([ScriptedChannel("wechat")], risk=RiskConfig(hook=Hook()))
    request = fuel()
    first = engine.submit(request)
    engine.close(first.order_id)
    wait_for(lambda: engine.get_order(first.order_id).state == "closed", "closed")
    second = engine.submit(dataclasses.replace(request, attempt=2))
    assert [(a, o) for a, o, _ in seen] == [(1, first.order_id), (2, second.order_id)]
    assert all(ok for _, _, ok in seen)


def test_hook_pool_full_follows_on_timeout_at_once(world) -> None:
    # "`RiskConfig.hook_threads` | 4 | threads calling the hook (1..64); at most twice as many calls out
    #  at once, a submit beyond follows `on_timeout` at once."
    release = threading.Event()
    entered = threading.Semaphore(0)

    class Hook:
        def assess(self, request, context):
            entered.release()
            release.wait(20)
            return RiskVerdict.passed()

    engine = world.open([ScriptedChannel("wechat")], config=EngineConfig(duplicate_guard_window_ms=0),
                        risk=RiskConfig(hook=Hook(), hook_threads=1, hook_timeout_ms=10_000,
                                        on_timeout=RiskOutcome.BLOCK))
    threads = [threading.Thread(target=lambda: _swallow(engine.submit, fuel())) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        assert entered.acquire(timeout=10)
        time.sleep(0.3)  # let the second call queue behind the first (two calls out: the bound)
        with pytest.raises(RiskBlocked):
            engine.submit(fuel())
    finally:
        release.set()
        for t in threads:
            t.join(20)


def _swallow(fn, *args):
    with contextlib.suppress(Exception):
        fn(*args)


# --- signed requests ------------------------------------------------------------------------------

SECRET = "station-42-request-key-0123456789abcdef"


def test_signed_pay_with_details_and_vouchers(world) -> None:
    # "`pay` | ... optional `cash` (`amount_minor`, `channel`, optional `details`: ...), `vouchers` (a list
    #  of `account_id`, `amount`, optional `mode`: ..., and `hold_id`)"
    channel = ScriptedChannel("wechat")
    engine = world.open([channel])
    engine.register_merchant_key("station-42", secret=SECRET)
    engine.open_account("amy/pts", "POINTS", minor_per_unit=10)
    engine.fund("amy/pts", 100, funding_id=uniq("f"))
    engine.open_account("amy/rp", "CNY")
    engine.fund("amy/rp", 500, funding_id=uniq("f"))
    hold = engine.pre_hold("amy/pts", 10, ttl_ms=60_000)
    details = PayDetails(PayScenario.BARCODE, auth_code="134670070457647112", device_id="pump-3")
    request = PaymentRequest("station-42", uniq(), "amy", "CNY", 10_00, "Fuel",
                             cash=CashPart(8_00, "wechat", details),
                             vouchers=(VoucherPart("amy/pts", 10, LegMode.PRE_HELD, hold_id=hold.hold_id),
                                       VoucherPart("amy/rp", 100)))
    signer = MerchantSigner("station-42", secret=SECRET)
    receipt = engine.submit_signed(*signer.pay(request))
    assert receipt == engine.submit(request)  # the same order as the in-process call
    calls = wait_for(lambda: channel.pays_of(receipt.payment_serial), "pay")
    assert calls[0][4] == details
    view = engine.get_order(receipt.order_id)
    assert [leg.mode for leg in view.legs] == ["cash", "pre_held", "pre_deduct"]


def test_signed_refund_and_close_answers(world) -> None:
    # "| `refund` | ... | `RefundView` |", "| `close` | `merchant_order_no` | `OrderView` |"
    from payengine import ChannelReply

    channel = ScriptedChannel("wechat")
    channel.pay_reply = lambda s, a: ChannelReply("SUCCESS", "SUCCESS", "T-" + s, a, "CNY")
    engine = world.open([channel])
    engine.register_merchant_key("station-42", secret=SECRET)
    signer = MerchantSigner("station-42", secret=SECRET)
    request = fuel()
    receipt = engine.submit_signed(*signer.pay(request))
    wait_for(lambda: engine.get_order(receipt.order_id).settled, "paid")
    refund = engine.refund_signed(*signer.refund(request.merchant_order_no, "r-1", 1_00, "pump"))
    assert isinstance(refund, RefundView) and refund.amount_minor == 1_00 and refund.reason == "pump"
    channel.pay_reply = lambda s, a: ChannelReply("SUCCESS", "USERPAYING")
    other = fuel()
    receipt2 = engine.submit_signed(*signer.pay(other))
    closed = engine.close_signed(*signer.close(other.merchant_order_no))
    assert closed.order_id == receipt2.order_id


def test_nonces_max_overloaded_never_stored(world) -> None:
    # "At most `nonces_max` are remembered: past it a request is refused `Overloaded` (retry later), never
    #  stored."
    engine = world.open([ScriptedChannel("wechat")], config=EngineConfig(
        merchant_requests=MerchantRequestConfig(nonces_max=2)))
    engine.register_merchant_key("station-42", secret=SECRET)
    signer = MerchantSigner("station-42", secret=SECRET)
    engine.submit_signed(*signer.pay(fuel()))
    engine.submit_signed(*signer.pay(fuel()))
    third = fuel()
    with pytest.raises(Overloaded):
        engine.submit_signed(*signer.pay(third))
    with pytest.raises(UnknownOrder):
        engine.find_order("station-42", third.merchant_order_no)


def test_rejected_requests_newest_first(world) -> None:
    # "`rejected_requests(limit=100)` → `[RequestRejection]` ... newest first"
    engine = world.open([ScriptedChannel("wechat")])
    engine.register_merchant_key("station-42", secret=SECRET)
    for merchant in ("ghost-1", "ghost-2", "ghost-3"):
        signer = MerchantSigner(merchant, secret=SECRET)
        with pytest.raises(RequestRejected):
            engine.submit_signed(*signer.pay(fuel(merchant=merchant)))
    assert [r.merchant_id for r in engine.rejected_requests(limit=2)] == ["ghost-3", "ghost-2"]
    assert engine.request_rejection_counts() == {"unknown_merchant": 3}
