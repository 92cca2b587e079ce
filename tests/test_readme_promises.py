"""README promises of *Risk*, *Signed merchant requests*, *Routing* and *Paying a trade order
again*, each checked as a new user reads it (issue 11, defects item 7)."""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import pytest

from payengine import (
    AttemptRefused,
    CashPart,
    Engine,
    EngineConfig,
    IdempotencyConflict,
    IllegalTransition,
    InvalidRequest,
    MerchantSigner,
    PaymentRequest,
    Receipt,
    RequestRejected,
    RiskBlocked,
    RiskConfig,
    RiskContext,
    RiskOutcome,
    RiskRules,
    RiskVerdict,
    Route,
    RoutingTable,
    VerificationFailed,
)
from payengine.engine.errors import PaymentError
from tests.helpers import (
    SLOW_POLICY,
    ScriptedChannel,
    open_engine,
    paid_reply,
    signed_callback,
    wait_for,
)

SECRET = "station-1-request-key-0123456789abcdef"
CODE = "424242"


def cash_only(no: str, user: str = "alice", total: int = 500, channel: str = "wechat",
              attempt: int = 1) -> PaymentRequest:
    return PaymentRequest("station-1", no, user, "CNY", total, "Fuel", CashPart(total, channel),
                          attempt=attempt)


# ------------------------------------------------------------------ Risk


def test_a_blocked_submit_publishes_nothing(tmp_path: Path) -> None:
    risk = RiskConfig(rules=RiskRules(blocked_users=frozenset({"alice"})))
    with Engine.open(tmp_path / "a.db", channels=[ScriptedChannel()], risk=risk) as engine:
        with pytest.raises(RiskBlocked):
            engine.submit(cash_only("b-1"))
        assert engine.notifications.events() == []
        assert engine.store.count_orders_by_state() == {}


def test_a_verification_window_never_outlasts_the_pay_window(tmp_path: Path) -> None:
    risk = RiskConfig(rules=RiskRules(step_up_amount={"CNY": 1}),
                      issue_code=lambda r, c: CODE, verification_window_ms=3_600_000)
    with Engine.open(tmp_path / "a.db", channels=[ScriptedChannel()], policy=SLOW_POLICY,
                     risk=risk) as engine:
        receipt = engine.submit(cash_only("s-1"))
        view = engine.get_order(receipt.order_id)
        assert view.verification is not None
        assert view.verification.expires_at_ms <= receipt.close_at_ms


def test_verify_after_passing_with_another_code_is_illegal(tmp_path: Path) -> None:
    risk = RiskConfig(rules=RiskRules(step_up_amount={"CNY": 1}), issue_code=lambda r, c: CODE)
    with Engine.open(tmp_path / "a.db", channels=[ScriptedChannel()], policy=SLOW_POLICY,
                     risk=risk) as engine:
        receipt = engine.submit(cash_only("s-1"))
        engine.verify(receipt.order_id, CODE)
        with pytest.raises(IllegalTransition):
            engine.verify(receipt.order_id, "000000")


@pytest.mark.parametrize("field,value", [
    ("hook_timeout_ms", 0), ("hook_timeout_ms", 10_001), ("hook_threads", 0),
    ("hook_threads", 65), ("verification_window_ms", 999),
    ("verification_window_ms", 3_600_001), ("verify_attempts_max", 11)])
def test_risk_settings_out_of_bounds_are_refused(field: str, value: int) -> None:
    with pytest.raises(InvalidRequest):
        RiskConfig(**{field: value})  # type: ignore[arg-type]


@pytest.mark.parametrize("field,value", [
    ("hook_timeout_ms", 1), ("hook_timeout_ms", 10_000), ("hook_threads", 1),
    ("hook_threads", 64), ("verification_window_ms", 1_000),
    ("verification_window_ms", 3_600_000), ("verify_attempts_max", 1),
    ("verify_attempts_max", 10)])
def test_risk_settings_at_their_bounds_are_taken(field: str, value: int) -> None:
    RiskConfig(**{field: value})  # type: ignore[arg-type]


@pytest.mark.parametrize("make", [
    lambda: RiskVerdict.step_up("r", code="has space"),
    lambda: RiskVerdict.step_up("r", code="x" * 33),
    lambda: RiskVerdict.step_up("r", code=""),
    lambda: RiskVerdict.blocked("r" * 129),
])
def test_a_bad_verdict_from_the_hook_follows_on_timeout(tmp_path: Path, make: object) -> None:
    class Hook:
        def assess(self, request: object, context: object) -> object:
            return make()  # type: ignore[operator]

    risk = RiskConfig(hook=Hook(), on_timeout=RiskOutcome.BLOCK)
    with (Engine.open(tmp_path / "a.db", channels=[ScriptedChannel()], risk=risk) as engine,
          pytest.raises(RiskBlocked)):
        engine.submit(cash_only("h-1"))


def test_a_hook_that_raises_passes_by_default_and_the_journal_says_so(tmp_path: Path) -> None:
    class Hook:
        def assess(self, request: object, context: object) -> RiskVerdict:
            raise RuntimeError("down")

    with Engine.open(tmp_path / "a.db", channels=[ScriptedChannel()],
                     risk=RiskConfig(hook=Hook())) as engine:
        receipt = engine.submit(cash_only("h-1"))
        first = engine.journal(receipt.order_id)[0]
        assert first.to_state == "accepted"
        assert first.cause.startswith("submitted; risk pass by default")


def test_blocked_submits_do_not_count_for_velocity(tmp_path: Path) -> None:
    risk = RiskConfig(rules=RiskRules(user_orders_max=1, amount_max={"CNY": 1_000}))
    with Engine.open(tmp_path / "a.db", channels=[ScriptedChannel()],
                     config=EngineConfig(duplicate_guard_window_ms=0), risk=risk) as engine:
        for n in range(3):
            with pytest.raises(RiskBlocked) as blocked:
                engine.submit(cash_only(f"big-{n}", total=5_000))
            assert blocked.value.rule == "amount_max"
        engine.submit(cash_only("ok-1"))
        with pytest.raises(RiskBlocked) as blocked:
            engine.submit(cash_only("ok-2"))
        assert blocked.value.rule == "velocity_user"


class RecordingHook:
    """A risk service that passes everything and keeps what it was asked."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, str]] = []  # (merchant order number, order id)

    def assess(self, request: PaymentRequest, context: RiskContext) -> RiskVerdict:
        self.asked.append((request.merchant_order_no, context.order_id))
        return RiskVerdict.passed()


def test_a_refused_attempt_never_reaches_the_risk_service(tmp_path: Path) -> None:
    hook = RecordingHook()
    with Engine.open(tmp_path / "a.db", channels=[ScriptedChannel()], policy=SLOW_POLICY,
                     risk=RiskConfig(hook=hook)) as engine:
        engine.submit(cash_only("t-1"))
        with pytest.raises(AttemptRefused):
            engine.submit(cash_only("t-1", attempt=2))
        with pytest.raises(AttemptRefused):
            engine.submit(cash_only("t-9", attempt=2))
        assert [no for no, _ in hook.asked] == ["t-1"]


# ------------------------------------------------------------------ Signed merchant requests


@pytest.fixture
def signed(tmp_path: Path) -> Engine:
    engine = open_engine(tmp_path / "s.db", ScriptedChannel())
    engine.register_merchant_key("station-1", secret=SECRET)
    yield engine  # type: ignore[misc]
    engine.shutdown()


SIGNER = MerchantSigner("station-1", secret=SECRET)


def signed_and_paid(engine: Engine, no: str) -> Receipt:
    """A signed pay of ``no``, paid by the wallet's notification and settled."""
    channel = engine._ctx.channels["wechat"]
    receipt = engine.submit_signed(*SIGNER.pay(cash_only(no)))
    wait_for(lambda: channel.count("pay") == 1)  # type: ignore[attr-defined]
    signed_callback(engine, "wechat", receipt.payment_serial, paid_reply(receipt.payment_serial))
    wait_for(lambda: engine.get_order(receipt.order_id).settled)
    return receipt


def test_header_names_may_come_in_any_case(signed: Engine) -> None:
    body, headers = SIGNER.pay(cash_only("c-1"))
    lowered = {name.lower(): value for name, value in headers.items()}
    assert signed.submit_signed(body, lowered).merchant_order_no == "c-1"


def test_a_header_given_twice_in_two_cases_is_malformed(signed: Engine) -> None:
    body, headers = SIGNER.pay(cash_only("c-1"))
    twice = {**headers, "x-payengine-nonce": headers["X-Payengine-Nonce"]}
    with pytest.raises(RequestRejected) as refused:
        signed.submit_signed(body, twice)
    assert refused.value.reason == "malformed"


@pytest.mark.parametrize("nonce", ["a" * 15, "a" * 65, "a" * 20 + "!"])
def test_a_nonce_out_of_its_form_is_malformed(signed: Engine, nonce: str) -> None:
    body, headers = SIGNER.pay(cash_only("c-1"))
    with pytest.raises(RequestRejected) as refused:
        signed.submit_signed(body, {**headers, "X-Payengine-Nonce": nonce})
    assert refused.value.reason in ("malformed", "bad_signature")


@pytest.mark.parametrize("stamp", ["+1764000000000", "1764000000000.0", " 1764000000000"])
def test_a_timestamp_not_all_digits_is_malformed(signed: Engine, stamp: str) -> None:
    body, headers = SIGNER.pay(cash_only("c-1"))
    with pytest.raises(RequestRejected) as refused:
        signed.submit_signed(body, {**headers, "X-Payengine-Timestamp": stamp})
    assert refused.value.reason == "malformed"


def test_a_body_over_64_kib_is_malformed(signed: Engine) -> None:
    body = b'{"op":"query","merchant_order_no":"x"' + b" " * 70_000 + b"}"
    with pytest.raises(RequestRejected) as refused:
        signed.query_signed(body, SIGNER.sign(body))
    assert refused.value.reason == "malformed"


@pytest.mark.parametrize("body", [
    b'{"op":"query","merchant_order_no":"x","extra":1}',
    b'{"op":"query","merchant_order_no":"x","merchant_order_no":"y"}',
    b'{"op":"refund","merchant_order_no":"x","refund_no":"r","amount_minor":100.0}',
    b'{"op":"refund","merchant_order_no":"x","refund_no":"r","amount_minor":1e2}',
    b'{"op":"refund","merchant_order_no":"x","refund_no":"r","amount_minor":true}',
])
def test_unknown_repeated_float_or_boolean_fields_are_malformed(signed: Engine, body: bytes) -> None:
    call = signed.refund_signed if b"refund" in body else signed.query_signed
    with pytest.raises(RequestRejected) as refused:
        call(body, SIGNER.sign(body))
    assert refused.value.reason == "malformed"


def test_a_body_for_one_op_sent_to_another_call_is_malformed(signed: Engine) -> None:
    with pytest.raises(RequestRejected) as refused:
        signed.close_signed(*SIGNER.query("c-1"))
    assert refused.value.reason == "malformed"


def test_a_frozen_merchant_may_still_close_and_query(signed: Engine) -> None:
    receipt = signed.submit_signed(*SIGNER.pay(cash_only("c-1")))
    signed.set_merchant_status("station-1", "frozen")
    with pytest.raises(RequestRejected) as refused:
        signed.submit_signed(*SIGNER.pay(cash_only("c-2")))
    assert refused.value.reason == "merchant_frozen"
    assert signed.query_signed(*SIGNER.query("c-1")).order_id == receipt.order_id
    assert signed.close_signed(*SIGNER.close("c-1")).state == "closed"


def test_a_signed_close_that_fails_has_spent_its_nonce(signed: Engine) -> None:
    body, headers = SIGNER.close("nobody-has-it")
    with pytest.raises(PaymentError):
        signed.close_signed(body, headers)
    with pytest.raises(RequestRejected) as refused:
        signed.close_signed(body, headers)
    assert refused.value.reason == "replayed_nonce"


def test_one_nonce_from_many_threads_is_taken_once(signed: Engine) -> None:
    body, headers = SIGNER.query("c-1")
    signed.submit_signed(*SIGNER.pay(cash_only("c-1")))
    outcomes: list[str] = []
    lock = threading.Lock()

    def send() -> None:
        try:
            signed.query_signed(body, headers)
            result = "ok"
        except RequestRejected as error:
            result = error.reason
        except PaymentError as error:
            result = error.code
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=send) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["ok"] + ["replayed_nonce"] * 7


def test_a_merchant_with_neither_key_nor_status_is_none(signed: Engine) -> None:
    assert signed.get_merchant("nobody") is None
    view = signed.get_merchant("station-1")
    assert view is not None and view.status == "active"
    assert SECRET not in repr(view)


def test_registering_again_replaces_the_key_at_once(signed: Engine) -> None:
    other = "another-secret-for-station-1-0123456789"
    signed.register_merchant_key("station-1", secret=other)
    with pytest.raises(RequestRejected) as refused:
        signed.query_signed(*SIGNER.query("c-1"))
    assert refused.value.reason == "bad_signature"


@pytest.mark.parametrize("secret", ["s" * 31, "s" * 257])
def test_a_secret_out_of_its_bounds_is_refused(signed: Engine, secret: str) -> None:
    with pytest.raises(InvalidRequest):
        signed.register_merchant_key("station-2", secret=secret)


# ------------------------------------------------------------------ Routing


def routed_engine(tmp_path: Path, routes: tuple[Route, ...], *names: str) -> Engine:
    return Engine.open(tmp_path / "r.db", channels=[ScriptedChannel(n) for n in names],
                       policy=SLOW_POLICY,
                       config=EngineConfig(routing=RoutingTable(routes),
                                           duplicate_guard_window_ms=0))


def test_a_name_that_is_both_a_method_and_a_channel_is_a_method(tmp_path: Path) -> None:
    with routed_engine(tmp_path, (Route("wechat", "alipay"),), "wechat", "alipay") as engine:
        receipt = engine.submit(cash_only("r-1", channel="wechat"))
        assert engine.get_order(receipt.order_id).legs[0].channel == "alipay"


def test_no_route_names_each_route_and_why_and_creates_nothing(tmp_path: Path) -> None:
    from payengine import NoRoute

    routes = (Route("qr", "ghost"), Route("qr", "wechat", amount_max_minor=100))
    with routed_engine(tmp_path, routes, "wechat") as engine:
        with pytest.raises(NoRoute) as refused:
            engine.submit(cash_only("r-1", channel="qr"))
        assert refused.value.code == "no_route"
        assert "ghost" in refused.value.message and "wechat" in refused.value.message
        assert engine.store.count_orders_by_state() == {}


def test_the_route_decision_is_journalled(tmp_path: Path) -> None:
    routes = (Route("qr", "wechat"), Route("qr", "alipay", priority=1))
    with routed_engine(tmp_path, routes, "wechat", "alipay") as engine:
        receipt = engine.submit(cash_only("r-1", channel="qr"))
        (route,) = [e for e in engine.journal(receipt.order_id) if e.part == "route"]
        assert (route.from_state, route.to_state) == ("qr", "wechat")
        assert "wechat chosen" in route.cause and "alipay passed over" in route.cause


@pytest.mark.parametrize("make", [
    lambda: Route("qr", "w", priority=1001), lambda: Route("qr", "w", priority=-1),
    lambda: Route("qr", "w", weight=0), lambda: Route("qr", "w", weight=1001),
    lambda: Route("qr", "w", currencies=frozenset({"cny"})),
    lambda: RoutingTable((Route("qr", "w"), Route("qr", "w", priority=2))),
    lambda: RoutingTable(tuple(Route("qr", f"w{n}") for n in range(1_001))),
])
def test_bad_routes_are_refused_when_built(make: object) -> None:
    with pytest.raises(InvalidRequest):
        make()  # type: ignore[operator]


def test_a_retry_of_an_accepted_order_is_not_routed_again(tmp_path: Path) -> None:
    routes = (Route("qr", "wechat"), Route("qr", "alipay", priority=1))
    with routed_engine(tmp_path, routes, "wechat", "alipay") as engine:
        receipt = engine.submit(cash_only("r-1", channel="qr"))
        for _ in range(30):
            engine._ctx.health.record("wechat", False)
        assert engine.channel_health()["wechat"] == "open"
        assert engine.submit(cash_only("r-1", channel="qr")) == receipt
        assert engine.submit(cash_only("r-2", channel="qr", user="bob")).order_id
        assert engine.get_order(engine.find_order("station-1", "r-2").order_id).legs[
            0].channel == "alipay"


# ------------------------------------------------------------------ attempts


@pytest.mark.parametrize("attempt", [0, 11, True])
def test_an_attempt_out_of_1_to_10_is_invalid(tmp_path: Path, attempt: object) -> None:
    with open_engine(tmp_path / "a.db", ScriptedChannel()) as engine, pytest.raises(InvalidRequest):
        engine.submit(cash_only("t-1", attempt=attempt))  # type: ignore[arg-type]


def test_attempts_follow_the_rules(tmp_path: Path) -> None:
    with open_engine(tmp_path / "a.db", ScriptedChannel()) as engine:
        with pytest.raises(AttemptRefused):
            engine.submit(cash_only("t-1", attempt=2))  # attempt 1 never submitted
        first = engine.submit(cash_only("t-1"))
        with pytest.raises(AttemptRefused):
            engine.submit(cash_only("t-1", attempt=2))  # attempt 1 still payable
        engine.close(first.order_id)
        with pytest.raises(AttemptRefused):
            engine.submit(cash_only("t-1", attempt=3))  # not the next one
        with pytest.raises(IdempotencyConflict):
            engine.submit(cash_only("t-1", total=600, attempt=2))  # another trade
        second = engine.submit(replace(cash_only("t-1", attempt=2), cash=CashPart(500, "wechat")))
        assert second.attempt == 2 and second.order_id != first.order_id
        assert second.payment_serial != first.payment_serial
        assert engine.find_order("station-1", "t-1").order_id == second.order_id
        assert engine.find_order("station-1", "t-1", attempt=1).state == "closed"
        assert engine.submit(cash_only("t-1", attempt=2)) == second


def test_the_duplicate_guard_does_not_warn_about_a_next_attempt(tmp_path: Path) -> None:
    with Engine.open(tmp_path / "a.db", channels=[ScriptedChannel()],
                     policy=SLOW_POLICY) as engine:
        first = engine.submit(cash_only("t-1"))
        engine.close(first.order_id)
        assert engine.submit(cash_only("t-1", attempt=2)).attempt == 2


def test_a_success_for_an_older_attempt_is_refunded(tmp_path: Path) -> None:
    channel = ScriptedChannel()
    with open_engine(tmp_path / "a.db", channel) as engine:
        first = engine.submit(cash_only("t-1"))
        wait_for(lambda: channel.count("pay") == 1, what="paid")
        engine.close(first.order_id)
        wait_for(lambda: engine.get_order(first.order_id).state == "closed")
        second = engine.submit(cash_only("t-1", attempt=2))
        assert second.attempt == 2
        signed_callback(engine, "wechat", first.payment_serial, paid_reply(first.payment_serial),
                        wait=True)
        wait_for(lambda: channel.count("refund") >= 1, what="the older attempt refunded")
        assert engine.get_order(first.order_id).state == "closed"


def test_the_hook_sees_the_id_the_order_will_have(tmp_path: Path) -> None:
    hook = RecordingHook()
    with Engine.open(tmp_path / "a.db", channels=[ScriptedChannel()], policy=SLOW_POLICY,
                     risk=RiskConfig(hook=hook)) as engine:
        receipt = engine.submit(cash_only("h-1"))
        assert hook.asked == [("h-1", receipt.order_id)]
        assert engine.submit(cash_only("h-1")) == receipt  # a retry: not assessed again
        assert hook.asked == [("h-1", receipt.order_id)]


def test_a_failing_issue_code_blocks_fail_closed(tmp_path: Path) -> None:
    def broken(request: object, context: object) -> str:
        raise RuntimeError("sms gateway down")

    risk = RiskConfig(rules=RiskRules(step_up_amount={"CNY": 1}), issue_code=broken)
    with Engine.open(tmp_path / "a.db", channels=[ScriptedChannel()], risk=risk) as engine:
        with pytest.raises(RiskBlocked) as blocked:
            engine.submit(cash_only("s-1"))
        assert blocked.value.rule == "step_up_unavailable"
        assert engine.store.count_orders_by_state() == {}


def test_the_journal_says_how_many_wrong_codes_failed_it(tmp_path: Path) -> None:
    risk = RiskConfig(rules=RiskRules(step_up_amount={"CNY": 1}), issue_code=lambda r, c: CODE,
                      verify_attempts_max=3)
    with Engine.open(tmp_path / "a.db", channels=[ScriptedChannel()], policy=SLOW_POLICY,
                     risk=risk) as engine:
        receipt = engine.submit(cash_only("s-1"))
        for code in ("000001", "000002", "000003"):
            with pytest.raises(VerificationFailed):
                engine.verify(receipt.order_id, code)
        last = [e for e in engine.journal(receipt.order_id) if e.part == "order"][-1]
        assert (last.from_state, last.to_state) == ("needs_verification", "failed")
        assert last.cause == "verification_failed (3 wrong of 3)"


def test_a_step_up_survives_a_restart_and_its_code_still_works(tmp_path: Path) -> None:
    risk = RiskConfig(rules=RiskRules(step_up_amount={"CNY": 1}), issue_code=lambda r, c: CODE)
    engine = Engine.open(tmp_path / "a.db", channels=[ScriptedChannel()], policy=SLOW_POLICY,
                         risk=risk)
    receipt = engine.submit(cash_only("s-1"))
    engine.shutdown()
    with Engine.open(tmp_path / "a.db", channels=[ScriptedChannel()], policy=SLOW_POLICY,
                     risk=risk) as again:
        assert again.get_order(receipt.order_id).state == "needs_verification"
        assert again.verify(receipt.order_id, CODE).state in ("accepted", "paying")


def test_the_timestamp_window_edges_are_inside(tmp_path: Path) -> None:
    from payengine import MerchantRequestConfig

    engine = open_engine(tmp_path / "s.db", ScriptedChannel())
    try:
        engine.register_merchant_key("station-1", secret=SECRET)
        clock = engine.runtime.now_ms()
        window = MerchantRequestConfig().timestamp_window_ms
        for stamp in (clock - window + 2_000, clock + window - 2_000):
            engine.submit_signed(*SIGNER.pay(cash_only(f"e-{stamp}", user=f"u{stamp}"),
                                             timestamp_ms=stamp))
        for stamp in (clock - window - 2_000, clock + window + 2_000):
            with pytest.raises(RequestRejected) as refused:
                engine.submit_signed(*SIGNER.pay(cash_only("late"), timestamp_ms=stamp))
            assert refused.value.reason == "stale_timestamp"
    finally:
        engine.shutdown()


def test_a_signed_pay_for_a_closed_order_is_pay_window_over(signed: Engine) -> None:
    receipt = signed.submit_signed(*SIGNER.pay(cash_only("c-1")))
    assert signed.submit_signed(*SIGNER.pay(cash_only("c-1"))) == receipt  # a retry
    signed.close(receipt.order_id)
    with pytest.raises(RequestRejected) as refused:
        signed.submit_signed(*SIGNER.pay(cash_only("c-1")))
    assert refused.value.reason == "pay_window_over"
    assert signed.submit_signed(*SIGNER.pay(cash_only("c-1", attempt=2))).attempt == 2


def test_an_unknown_merchant_and_a_wrong_sign_type_are_refused_by_name(signed: Engine) -> None:
    stranger = MerchantSigner("station-9", secret=SECRET)
    with pytest.raises(RequestRejected) as refused:
        signed.submit_signed(*stranger.pay(replace(cash_only("c-1"), merchant_id="station-9")))
    assert refused.value.reason == "unknown_merchant"
    body, headers = SIGNER.query("c-1")
    with pytest.raises(RequestRejected) as refused:
        signed.query_signed(body, {**headers, "X-Payengine-Sign-Type": "RSA-SHA256"})
    assert refused.value.reason == "wrong_sign_type"


def test_a_frozen_user_pays_nothing_but_is_refunded(signed: Engine) -> None:
    signed_and_paid(signed, "c-1")
    signed.set_user_status("alice", "frozen")
    with pytest.raises(RequestRejected) as refused:
        signed.submit_signed(*SIGNER.pay(cash_only("c-2")))
    assert refused.value.reason == "user_frozen"
    assert signed.refund_signed(*SIGNER.refund("c-1", "r-1", 100)).refund_no == "r-1"


@pytest.mark.parametrize("limit", [0, 10_001, True])
def test_rejected_requests_limit_is_bounded(signed: Engine, limit: object) -> None:
    with pytest.raises(InvalidRequest):
        signed.rejected_requests(limit)  # type: ignore[arg-type]


def test_the_lowest_fee_wins_among_equal_priorities(tmp_path: Path) -> None:
    routes = (Route("qr", "dear"), Route("qr", "cheap"))
    with Engine.open(tmp_path / "r.db", channels=[ScriptedChannel("dear"),
                                                  ScriptedChannel("cheap")],
                     policy=SLOW_POLICY,
                     config=EngineConfig(routing=RoutingTable(routes),
                                         fee_ppm={"dear": 6_000, "cheap": 2_000},
                                         duplicate_guard_window_ms=0)) as engine:
        for n in range(5):
            receipt = engine.submit(cash_only(f"r-{n}", user=f"u{n}", channel="qr"))
            assert engine.get_order(receipt.order_id).legs[0].channel == "cheap"


def test_concurrent_submits_of_one_attempt_make_one_order(tmp_path: Path) -> None:
    with open_engine(tmp_path / "a.db", ScriptedChannel()) as engine:
        first = engine.submit(cash_only("t-1"))
        engine.close(first.order_id)
        receipts = []
        lock = threading.Lock()

        def submit() -> None:
            receipt = engine.submit(cash_only("t-1", attempt=2))
            with lock:
                receipts.append(receipt)

        threads = [threading.Thread(target=submit) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(receipts) == 6 and len(set(receipts)) == 1


def test_a_trade_waiting_for_its_step_up_code_cannot_be_paid_again(tmp_path: Path) -> None:
    risk = RiskConfig(rules=RiskRules(step_up_amount={"CNY": 1}), issue_code=lambda r, c: CODE)
    with Engine.open(tmp_path / "a.db", channels=[ScriptedChannel()], policy=SLOW_POLICY,
                     risk=risk) as engine:
        engine.submit(cash_only("s-1"))
        with pytest.raises(AttemptRefused):
            engine.submit(cash_only("s-1", attempt=2))


def test_nonces_past_their_bound_are_refused_overloaded_and_not_stored(tmp_path: Path) -> None:
    from payengine import MerchantRequestConfig, Overloaded

    config = EngineConfig(merchant_requests=MerchantRequestConfig(nonces_max=2),
                          duplicate_guard_window_ms=0)
    with Engine.open(tmp_path / "a.db", channels=[ScriptedChannel()], policy=SLOW_POLICY,
                     config=config) as engine:
        engine.register_merchant_key("station-1", secret=SECRET)
        engine.submit_signed(*SIGNER.pay(cash_only("c-1")))
        engine.query_signed(*SIGNER.query("c-1"))
        body, headers = SIGNER.query("c-1")
        with pytest.raises(Overloaded):
            engine.query_signed(body, headers)
        with pytest.raises(Overloaded):
            engine.submit_signed(*SIGNER.pay(cash_only("c-2", user="bob")))
        assert engine.find_order("station-1", "c-1").order_id
        with pytest.raises(PaymentError):
            engine.find_order("station-1", "c-2")


def test_a_signed_attempt_above_10_is_malformed(signed: Engine) -> None:
    body = (b'{"op":"pay","merchant_order_no":"c-1","user_id":"alice","currency":"CNY",'
            b'"total_minor":500,"title":"Fuel","cash":{"amount_minor":500,"channel":"wechat"},'
            b'"attempt":11}')
    with pytest.raises(RequestRejected) as refused:
        signed.submit_signed(body, SIGNER.sign(body))
    assert refused.value.reason == "malformed"


def test_a_frozen_merchant_gets_no_signed_refund(signed: Engine) -> None:
    receipt = signed_and_paid(signed, "c-1")
    signed.set_merchant_status("station-1", "frozen")
    with pytest.raises(RequestRejected) as refused:
        signed.refund_signed(*SIGNER.refund("c-1", "r-1", 100))
    assert refused.value.reason == "merchant_frozen"
    assert signed.get_order(receipt.order_id).refunds == ()
