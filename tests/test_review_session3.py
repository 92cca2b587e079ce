"""Fresh-eyes review of issue 11's seams (session 3): one regression test per defect."""

from __future__ import annotations

import json
import threading
import time
import tomllib
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from payengine import (
    AttemptRefused,
    CashPart,
    Engine,
    EngineConfig,
    PaymentRequest,
    Receipt,
)
from payengine.actors.adapters import ReplyError, parse_config
from payengine.actors.adapters.config import ChannelConfig, Limits
from payengine.actors.adapters.mapping import read_reply
from payengine.actors.channel import ChannelReply
from payengine.actors.risk_gate import RiskConfig, RiskContext
from payengine.engine.channel_data import PayDetails, PayScenario
from payengine.engine.health import BreakerPolicy
from payengine.engine.risk import RiskVerdict
from payengine.engine.routing import NoRoute, Route, RoutingTable
from tests.channel_configs import readme_toml_at
from tests.helpers import ScriptedChannel, wait_for

FIRST = PaymentRequest("station-1", "pump3-0187", "alice", "CNY", 9_600, "Fuel",
                       CashPart(9_600, "wechat"))
SECOND = replace(FIRST, cash=CashPart(9_600, "alipay"), attempt=2)


class CountingHook:
    """A risk service that counts what it was asked (each ask may text the user a code)."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, int]] = []

    def assess(self, request: PaymentRequest, context: RiskContext) -> RiskVerdict:
        self.asked.append((request.merchant_order_no, request.attempt))
        return RiskVerdict.step_up("new_device", "9876") if request.attempt > 1 else (
            RiskVerdict.passed())


def test_an_attempt_refused_for_its_predecessor_is_never_put_to_the_risk_service(
        tmp_path: Path) -> None:
    """The gate ran before the attempt check: a next attempt made while attempt 1 was still
    paying asked the risk service (which texts the user a step-up code) and then was
    refused. Now the refusal comes first and the service is asked nothing."""
    hook = CountingHook()
    engine = Engine.open(tmp_path / "a.db", channels=[ScriptedChannel("wechat"),
                                                      ScriptedChannel("alipay")],
                         config=EngineConfig(duplicate_guard_window_ms=0),
                         risk=RiskConfig(hook=hook))
    try:
        first = engine.submit(FIRST)
        wait_for(lambda: engine.get_order(first.order_id).state == "paying", what="paying")
        with pytest.raises(AttemptRefused, match=r"attempt 1 .* is paying"):
            engine.submit(SECOND)
        with pytest.raises(AttemptRefused, match="the next is 2, not 3"):
            engine.submit(replace(SECOND, attempt=3))
        assert hook.asked == [("pump3-0187", 1)]
    finally:
        engine.shutdown()


# ---------------------------------------------------------------- routing and pay details

QR = "qr"


class DetailsChannel(ScriptedChannel):
    """A channel whose ``pay`` takes the cash part's details."""

    def pay(self, payment_serial: str, amount_minor: int, currency: str, title: str,
            details: PayDetails | None = None) -> ChannelReply:
        return super().pay(payment_serial, amount_minor, currency, title)


def _routed(path: Path) -> tuple[Engine, DetailsChannel, ScriptedChannel]:
    takes, plain = DetailsChannel("wechat-1"), ScriptedChannel("wechat-2")
    config = EngineConfig(routing=RoutingTable((Route(QR, "wechat-1"),
                                                Route(QR, "wechat-2", priority=1))),
                          duplicate_guard_window_ms=0,
                          breaker=BreakerPolicy(window_calls=4, calls_min=2, failure_pct=100,
                                                open_ms=60_000))
    return Engine.open(path, channels=[takes, plain], config=config), takes, plain


def _with_details(no: str) -> PaymentRequest:
    return PaymentRequest("station-1", no, f"u-{no}", "CNY", 5_000, "Fuel",
                          CashPart(5_000, QR, PayDetails(PayScenario.JSAPI, payer_id="openid-1")))


def test_a_retry_of_an_order_with_details_gets_its_receipt_when_routing_now_picks_a_plain_channel(
        tmp_path: Path) -> None:
    """The retry was routed afresh: with the details-taking channel's breaker open it went to
    one whose pay takes no details and was refused ``InvalidRequest``, although its order
    was accepted. A retry is answered with the stored order, whatever routing says now."""
    engine, _, _ = _routed(tmp_path / "a.db")
    try:
        accepted = engine.submit(_with_details("o-1"))
        assert engine.get_order(accepted.order_id).legs[0].channel == "wechat-1"
        for _ in range(2):
            engine._ctx.health.record("wechat-1", False)
        assert engine.channel_health()["wechat-1"] == "open"
        assert engine.submit(_with_details("o-1")) == accepted
    finally:
        engine.shutdown()


def test_a_new_order_with_details_is_not_routed_to_a_channel_that_cannot_take_them(
        tmp_path: Path) -> None:
    """Routing chose the plain channel and the submit then failed ``InvalidRequest``; a
    channel that cannot take the details is a route that cannot take the payment: skipped,
    and when no other is left the refusal is ``NoRoute`` saying why."""
    engine, _, _ = _routed(tmp_path / "a.db")
    try:
        for _ in range(2):
            engine._ctx.health.record("wechat-1", False)
        with pytest.raises(NoRoute, match="wechat-2 skipped: takes no pay details"):
            engine.submit(_with_details("o-2"))
        plain_order = engine.submit(replace(_with_details("o-3"), cash=CashPart(5_000, QR)))
        assert engine.get_order(plain_order.order_id).legs[0].channel == "wechat-2"
    finally:
        engine.shutdown()


# ---------------------------------------------------------------- the breaker's bookkeeping


def test_a_malformed_pay_reply_still_reaches_the_order_and_its_close_goes_out(
        tmp_path: Path) -> None:
    """The breaker's ``communicated`` read the reply before ``cash_result`` guarded it: a
    return code that is not a string (unhashable) raised in the I/O callback, the pay's
    answer never reached the order, which then waited for it forever and never sent the
    close. Now the malformed reply counts as a failure and the order hears it (processing)."""
    channel = ScriptedChannel("wechat")
    channel.pay_reply = ChannelReply(["SUCCESS"], "NOTPAY")  # type: ignore[arg-type]
    engine = Engine.open(tmp_path / "a.db", channels=[channel],
                         config=EngineConfig(duplicate_guard_window_ms=0))
    try:
        receipt = engine.submit(FIRST)
        wait_for(lambda: channel.count("pay") == 1, what="the pay call")
        engine.close(receipt.order_id)
        wait_for(lambda: channel.count("close") >= 1, what="the channel close")
        assert engine.get_order(receipt.order_id).state == "closed"
    finally:
        engine.shutdown()


# ---------------------------------------------------------------- configured channels in routing


class ConfiguredChannel(ScriptedChannel):
    """A channel built from a configuration: it carries its ``config`` (``enabled``,
    ``limits``), as ``load_channels`` builds them."""

    def __init__(self, name: str, *, enabled: bool = True, limits: Limits | None = None
                 ) -> None:
        super().__init__(name)
        self.config = SimpleNamespace(enabled=enabled, limits=limits or Limits())


def test_routing_offers_no_new_payment_to_a_disabled_channel_nor_one_outside_its_limits(
        tmp_path: Path) -> None:
    """README: ``enabled = false`` is "offered for no new payment by the routing", and a
    channel's ``limits`` are "for the routing"; the engine read neither, so a merchant number
    switched off still took every payment its route drew."""
    off = ConfiguredChannel("wechat-1", enabled=False)
    small = ConfiguredChannel("wechat-2", limits=Limits(1, 1_000))
    spare = ConfiguredChannel("wechat-3")
    config = EngineConfig(routing=RoutingTable((Route(QR, "wechat-1"),
                                                Route(QR, "wechat-2", priority=1),
                                                Route(QR, "wechat-3", priority=2))),
                          duplicate_guard_window_ms=0)
    engine = Engine.open(tmp_path / "a.db", channels=[off, small, spare], config=config)
    try:
        cheap = engine.submit(PaymentRequest("station-1", "o-1", "u-1", "CNY", 500, "Fuel",
                                             CashPart(500, QR)))
        assert engine.get_order(cheap.order_id).legs[0].channel == "wechat-2"
        big = engine.submit(PaymentRequest("station-1", "o-2", "u-2", "CNY", 5_000, "Fuel",
                                           CashPart(5_000, QR)))
        assert engine.get_order(big.order_id).legs[0].channel == "wechat-3"
        routed = [e.cause for e in engine.journal(big.order_id) if e.part == "route"]
        assert routed == ["method qr: wechat-3 chosen; wechat-1 skipped: disabled; wechat-2 "
                          "skipped: amount outside the channel's limits 1..1000"]
        assert off.count("pay") == 0
    finally:
        engine.shutdown()


# ---------------------------------------------------------------- amounts from a wallet


def _wechat_1() -> ChannelConfig:
    return parse_config(tomllib.loads(readme_toml_at("http://127.0.0.1:1")))[0]


@pytest.mark.parametrize("amount", [0, "0"])
def test_a_success_reporting_an_amount_of_zero_is_not_a_reply_whose_amount_is_unknown(
        amount: object) -> None:
    """A reported amount of 0 was read as "no amount reported", and the engine checks only a
    reported amount against the order's: a wallet saying "SUCCESS, total_fee 0" was taken as
    the order paid in full. A success of nothing is not a success to believe: ``ReplyError``
    (the engine then reads the call as processing and asks again)."""
    config = _wechat_1()
    body = json.dumps({"return_code": "SUCCESS", "trade_state": "SUCCESS",
                       "transaction_id": "T1", "total_fee": amount}).encode()
    with pytest.raises(ReplyError, match="amount 0"):
        read_reply(config, "query", 200, body, {}, verify=False)


def test_an_amount_of_zero_in_a_reply_that_is_no_success_still_reads_as_none() -> None:
    config = _wechat_1()
    body = json.dumps({"return_code": "SUCCESS", "trade_state": "NOTPAY",
                       "total_fee": 0}).encode()
    assert read_reply(config, "query", 200, body, {}, verify=False) == ChannelReply(
        "SUCCESS", "NOTPAY")


# ---------------------------------------------------------------- a retry during the assessment


class SlowStepUp:
    """A risk service that steps every payment up with a fresh code, texted to the user; the
    first call waits for ``gate``."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.codes: list[str] = []
        self._lock = threading.Lock()

    def assess(self, request: PaymentRequest, context: RiskContext) -> RiskVerdict:
        with self._lock:
            code = f"{100_000 + len(self.codes)}"
            self.codes.append(code)
            first = len(self.codes) == 1
        if first:
            self.gate.wait(10)
        return RiskVerdict.step_up("new_device", code)


def test_a_retry_while_the_first_submit_is_with_the_risk_service_texts_no_second_code(
        tmp_path: Path) -> None:
    """A client retrying a submit whose answer is slow (the risk service takes its time) got
    its retry assessed too: a second step-up code texted to the user, of which only the one
    of the submit that inserted first works. The retry now waits for that insert and gets
    its receipt."""
    hook = SlowStepUp()
    engine = Engine.open(tmp_path / "a.db", channels=[ScriptedChannel("wechat")],
                         config=EngineConfig(duplicate_guard_window_ms=0),
                         risk=RiskConfig(hook=hook, hook_timeout_ms=10_000))
    receipts: list[Receipt] = []
    try:
        first = threading.Thread(target=lambda: receipts.append(engine.submit(FIRST)))
        first.start()
        wait_for(lambda: hook.codes, what="the first submit with the risk service")
        retry = threading.Thread(target=lambda: receipts.append(engine.submit(FIRST)))
        retry.start()
        wait_for(lambda: engine.admission_stats.admitted == 2, what="the retry admitted")
        time.sleep(0.2)  # lets the retry reach the risk gate (it can only make the bug show)
        hook.gate.set()
        first.join(10)
        retry.join(10)
        assert len(receipts) == 2 and receipts[0] == receipts[1]
        assert hook.codes == ["100000"]
        engine.verify(receipts[0].order_id, "100000")
    finally:
        hook.gate.set()
        engine.shutdown()
