"""Payment agreements and withholding (代扣) with the system auto-retry (issue 11, item 6)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from payengine import (
    AgreementInactive,
    AgreementMismatch,
    AgreementNotFound,
    AgreementState,
    AgreementStatus,
    AgreementsUnsupported,
    CashPart,
    ChannelReply,
    CodeTable,
    Engine,
    EngineClosed,
    EngineConfig,
    IdempotencyConflict,
    InvalidRequest,
    OrderPolicy,
    OrderView,
    PayDetails,
    PaymentRequest,
    PayScenario,
    UnknownOrder,
    UnknownWithholding,
    WithholdConfig,
    WithholdState,
)
from tests.helpers import PROCESSING, ScriptedChannel, paid_reply, signed_callback, wait_for

WALLET_CODES = CodeTable(
    channel="wallet", communication_ok=frozenset({"SUCCESS"}),
    success=frozenset({"SUCCESS"}),
    failure=frozenset({"PAYERROR", "CLOSED", "NOTENOUGH"}),
    retryable=frozenset({"NOTENOUGH"}))
"""A wallet whose balance-too-low code (NOTENOUGH) is retryable and whose PAYERROR is not."""
NOTENOUGH = ChannelReply("SUCCESS", "NOTENOUGH")


class AgreementWallet(ScriptedChannel):
    """A scripted wallet that signs agreements and takes pay details."""

    pay_codes = WALLET_CODES

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.sign_answer: AgreementStatus = AgreementStatus.SIGNED
        self.unsign_answer: AgreementStatus = AgreementStatus.TERMINATED
        self.details: list[PayDetails | None] = []

    def pay(self, payment_serial: str, amount_minor: int, currency: str, title: str,
            details: PayDetails | None = None) -> ChannelReply:
        self.details.append(details)
        return super().pay(payment_serial, amount_minor, currency, title)

    def sign(self, agreement_id: str, user_id: str) -> AgreementStatus:
        self.calls.append(("sign", agreement_id, user_id))
        return self.sign_answer

    def unsign(self, agreement_id: str) -> AgreementStatus:
        self.calls.append(("unsign", agreement_id))
        return self.unsign_answer


POLICY = OrderPolicy(pay_window_ms=60_000, query_schedule_ms=(60_000,),
                     refund_query_schedule_ms=(60_000,))
CONFIG = EngineConfig(ask_timeout_s=5.0, duplicate_guard_window_ms=0,
                      withholding=WithholdConfig(recheck_ms=20))


def open_wallets(path: Path, policy: OrderPolicy = POLICY
                 ) -> tuple[Engine, AgreementWallet, AgreementWallet]:
    wechat, alipay = AgreementWallet("wechat"), AgreementWallet("alipay")
    return Engine.open(path, channels=[wechat, alipay], policy=policy, config=CONFIG), \
        wechat, alipay


@pytest.fixture
def wallets(tmp_path: Path) -> Iterator[tuple[Engine, AgreementWallet, AgreementWallet]]:
    engine, wechat, alipay = open_wallets(tmp_path / "pay.db")
    yield engine, wechat, alipay
    engine.shutdown()


def attempt_order(engine: Engine, attempt: int, no: str = "sub-2026-12") -> str:
    """The order of ``attempt``, once submitted (a retry is decided, then submitted)."""
    def found() -> str | None:
        try:
            return engine.find_order("gym-1", no, attempt).order_id
        except UnknownOrder:
            return None
    return wait_for(found, what=f"attempt {attempt}'s order")


def cash_channel(order: OrderView) -> str | None:
    return next(leg.channel for leg in order.legs if leg.mode == "cash")


# ---------------------------------------------------------------------- agreements


def test_a_signed_agreement_is_active_and_listed_for_its_user(wallets) -> None:
    engine, wechat, _ = wallets
    agreement = engine.sign_agreement("alice", "wechat")
    assert agreement.state is AgreementState.ACTIVE
    assert (agreement.user_id, agreement.channel) == ("alice", "wechat")
    assert engine.get_agreement(agreement.agreement_id) == agreement
    assert engine.agreements_of("alice") == [agreement]
    assert engine.agreements_of("bob") == []
    assert ("sign", agreement.agreement_id, "alice") in wechat.calls


def test_signing_again_returns_the_live_agreement_instead_of_a_second(wallets) -> None:
    engine, wechat, _ = wallets
    first = engine.sign_agreement("alice", "wechat")
    assert engine.sign_agreement("alice", "wechat") == first
    assert wechat.count("sign") == 1


def test_a_channel_without_sign_refuses_agreements_and_stores_nothing(tmp_path: Path) -> None:
    engine = Engine.open(tmp_path / "pay.db", channels=[ScriptedChannel("wechat")],
                         config=CONFIG)
    try:
        with pytest.raises(AgreementsUnsupported):
            engine.sign_agreement("alice", "wechat")
        assert engine.agreements_of("alice") == []
    finally:
        engine.shutdown()


def test_a_pending_signature_is_activated_by_the_wallet_callback(wallets) -> None:
    engine, wechat, _ = wallets
    wechat.sign_answer = AgreementStatus.PENDING
    agreement = engine.sign_agreement("alice", "wechat")
    assert agreement.state is AgreementState.SIGNING
    signed = engine.handle_agreement_callback("wechat", agreement.agreement_id, "alice",
                                              AgreementStatus.SIGNED)
    assert signed.state is AgreementState.ACTIVE
    again = engine.handle_agreement_callback("wechat", agreement.agreement_id, "alice",
                                             AgreementStatus.SIGNED)
    assert again == signed


def test_signing_again_asks_the_wallet_again_about_an_agreement_still_signing(
        wallets) -> None:
    engine, wechat, _ = wallets
    wechat.sign_answer = AgreementStatus.PENDING
    pending = engine.sign_agreement("alice", "wechat")
    wechat.sign_answer = AgreementStatus.SIGNED
    signed = engine.sign_agreement("alice", "wechat")
    assert signed.agreement_id == pending.agreement_id
    assert signed.state is AgreementState.ACTIVE
    assert [c for c in wechat.calls if c[0] == "sign"] == [
        ("sign", pending.agreement_id, "alice")] * 2


def test_an_agreement_callback_naming_another_channel_user_or_agreement_changes_nothing(
        wallets) -> None:
    engine, _, _ = wallets
    agreement = engine.sign_agreement("alice", "wechat")
    with pytest.raises(AgreementMismatch):
        engine.handle_agreement_callback("alipay", agreement.agreement_id, "alice",
                                         AgreementStatus.TERMINATED)
    with pytest.raises(AgreementMismatch):
        engine.handle_agreement_callback("wechat", agreement.agreement_id, "mallory",
                                         AgreementStatus.TERMINATED)
    with pytest.raises(AgreementNotFound):
        engine.handle_agreement_callback("wechat", "agr-unknown", "alice",
                                         AgreementStatus.TERMINATED)
    with pytest.raises(InvalidRequest):
        engine.handle_agreement_callback("wechat", agreement.agreement_id, "alice",
                                         "terminated")  # type: ignore[arg-type]
    assert engine.get_agreement(agreement.agreement_id) == agreement


def test_a_revocation_in_the_wallet_app_terminates_the_agreement(wallets) -> None:
    engine, _, _ = wallets
    agreement = engine.sign_agreement("alice", "wechat")
    revoked = engine.handle_agreement_callback("wechat", agreement.agreement_id, "alice",
                                               AgreementStatus.TERMINATED)
    assert revoked.state is AgreementState.TERMINATED
    assert [e.to_state for e in engine.store.journal("agreement", agreement.agreement_id)] \
        == ["signing", "active", "terminated"]


def test_unsign_terminates_an_active_agreement_and_refuses_one_still_signing(wallets) -> None:
    engine, wechat, _ = wallets
    agreement = engine.sign_agreement("alice", "wechat")
    ended = engine.unsign_agreement(agreement.agreement_id)
    assert ended.state is AgreementState.TERMINATED
    assert engine.unsign_agreement(agreement.agreement_id) == ended
    wechat.sign_answer = AgreementStatus.PENDING
    signing = engine.sign_agreement("alice", "wechat")
    with pytest.raises(AgreementInactive):
        engine.unsign_agreement(signing.agreement_id)
    assert engine.get_agreement(signing.agreement_id).state is AgreementState.SIGNING


def test_an_unsign_the_wallet_has_not_confirmed_stops_payments_at_once(wallets) -> None:
    engine, wechat, _ = wallets
    agreement = engine.sign_agreement("alice", "wechat")
    wechat.unsign_answer = AgreementStatus.PENDING
    assert engine.unsign_agreement(agreement.agreement_id).state is AgreementState.UNSIGNING
    with pytest.raises(AgreementInactive):
        engine.withhold("gym-1", "sub-2026-12", "alice", 5_000, "CNY", "Gym")
    done = engine.handle_agreement_callback("wechat", agreement.agreement_id, "alice",
                                            AgreementStatus.TERMINATED)
    assert done.state is AgreementState.TERMINATED


# ---------------------------------------------------------------------- withholding


def test_withholding_without_an_active_agreement_is_refused_and_creates_nothing(
        wallets) -> None:
    engine, wechat, _ = wallets
    with pytest.raises(AgreementNotFound):
        engine.withhold("gym-1", "sub-2026-12", "alice", 5_000, "CNY", "Gym")
    wechat.sign_answer = AgreementStatus.FAILED
    failed = engine.sign_agreement("alice", "wechat")
    assert failed.state is AgreementState.FAILED
    with pytest.raises(AgreementInactive):
        engine.withhold("gym-1", "sub-2026-12", "alice", 5_000, "CNY", "Gym")
    with pytest.raises(AgreementInactive):
        engine.withhold("gym-1", "sub-2026-12", "alice", 5_000, "CNY", "Gym",
                        agreement_ids=[failed.agreement_id])
    with pytest.raises(UnknownOrder):
        engine.find_order("gym-1", "sub-2026-12")
    with pytest.raises(UnknownWithholding):
        engine.get_withholding("gym-1", "sub-2026-12")
    assert wechat.count("pay") == 0


def test_another_users_agreement_cannot_be_named(wallets) -> None:
    engine, _, _ = wallets
    bobs = engine.sign_agreement("bob", "wechat")
    with pytest.raises(AgreementNotFound):
        engine.withhold("gym-1", "sub-2026-12", "alice", 5_000, "CNY", "Gym",
                        agreement_ids=[bobs.agreement_id])


def test_a_withholding_pays_on_the_agreement_with_the_withhold_scenario(wallets) -> None:
    engine, wechat, _ = wallets
    agreement = engine.sign_agreement("alice", "wechat")
    wechat.pay_reply = PROCESSING
    w = engine.withhold("gym-1", "sub-2026-12", "alice", 5_000, "CNY", "Gym")
    assert (w.state, w.attempt, w.agreement_id) == (WithholdState.PAYING, 1,
                                                   agreement.agreement_id)
    order_id = attempt_order(engine, 1)
    serial = engine.get_order(order_id).payment_serial
    wait_for(lambda: wechat.details, what="the pay call")
    assert wechat.details[0] == PayDetails(PayScenario.WITHHOLD,
                                           agreement_id=agreement.agreement_id)
    signed_callback(engine, "wechat", serial, paid_reply(serial))
    wait_for(lambda: engine.get_withholding("gym-1", "sub-2026-12").state
             is WithholdState.SUCCEEDED, what="the withholding succeeded")
    assert engine.get_order(order_id).state == "succeeded"


def test_the_same_withhold_again_returns_it_and_another_amount_conflicts(wallets) -> None:
    engine, _, _ = wallets
    engine.sign_agreement("alice", "wechat")
    first = engine.withhold("gym-1", "sub-2026-12", "alice", 5_000, "CNY", "Gym")
    assert engine.withhold("gym-1", "sub-2026-12", "alice", 5_000, "CNY", "Gym") == first
    with pytest.raises(IdempotencyConflict):
        engine.withhold("gym-1", "sub-2026-12", "alice", 6_000, "CNY", "Gym")


def test_a_declined_attempt_is_retried_by_the_engine_on_the_next_agreement(wallets) -> None:
    engine, wechat, alipay = wallets
    on_wechat = engine.sign_agreement("alice", "wechat")
    on_alipay = engine.sign_agreement("alice", "alipay")
    wechat.pay_reply = NOTENOUGH
    alipay.pay_reply = PROCESSING
    engine.withhold("gym-1", "sub-2026-12", "alice", 5_000, "CNY", "Gym")
    w = wait_for(lambda: (w := engine.get_withholding("gym-1", "sub-2026-12")).attempt == 2
                 and w, what="the second attempt")
    assert w.attempts == (on_wechat.agreement_id, on_alipay.agreement_id)
    assert w.declined == (on_wechat.agreement_id,)
    second = engine.get_order(attempt_order(engine, 2))
    assert cash_channel(second) == "alipay"
    signed_callback(engine, "alipay", second.payment_serial, paid_reply(second.payment_serial))
    wait_for(lambda: engine.get_withholding("gym-1", "sub-2026-12").state
             is WithholdState.SUCCEEDED, what="the withholding succeeded")
    assert engine.get_order(attempt_order(engine, 1)).state == "failed"


def test_a_failure_that_is_not_retryable_ends_the_withholding_after_one_attempt(
        wallets) -> None:
    engine, wechat, alipay = wallets
    engine.sign_agreement("alice", "wechat")
    engine.sign_agreement("alice", "alipay")
    wechat.pay_reply = ChannelReply("SUCCESS", "PAYERROR")
    engine.withhold("gym-1", "sub-2026-12", "alice", 5_000, "CNY", "Gym")
    w = wait_for(lambda: (w := engine.get_withholding("gym-1", "sub-2026-12")).state
                 is WithholdState.FAILED and w, what="the withholding failed")
    assert w.attempt == 1
    assert alipay.count("pay") == 0


def test_retries_stop_at_withhold_attempts_max(tmp_path: Path) -> None:
    wallets = [AgreementWallet(f"bank-{i}") for i in range(4)]
    for wallet in wallets:
        wallet.pay_reply = NOTENOUGH
    config = EngineConfig(ask_timeout_s=5.0, duplicate_guard_window_ms=0,
                          withholding=WithholdConfig(withhold_attempts_max=2))
    engine = Engine.open(tmp_path / "pay.db", channels=wallets, policy=POLICY, config=config)
    try:
        for wallet in wallets:
            engine.sign_agreement("alice", wallet.name)
        engine.withhold("gym-1", "sub-2026-12", "alice", 5_000, "CNY", "Gym")
        w = wait_for(lambda: (w := engine.get_withholding("gym-1", "sub-2026-12")).state
                     is WithholdState.FAILED and w, what="the withholding failed")
        assert w.attempt == 2
        assert "withhold_attempts_max 2" in w.cause
        assert sum(wallet.count("pay") for wallet in wallets) == 2
    finally:
        engine.shutdown()


def test_a_timed_out_attempt_is_retried_only_once_its_close_is_confirmed(
        tmp_path: Path) -> None:
    policy = OrderPolicy(pay_window_ms=200, query_schedule_ms=(60_000,),
                         refund_query_schedule_ms=(60_000,))
    engine, wechat, _ = open_wallets(tmp_path / "pay.db", policy)
    try:
        engine.sign_agreement("alice", "wechat")
        wechat.pay_reply = TimeoutError("no answer")
        wechat.close_reply = TimeoutError("no answer")
        engine.withhold("gym-1", "sub-2026-12", "alice", 5_000, "CNY", "Gym")
        first = attempt_order(engine, 1)
        wait_for(lambda: wechat.count("close") >= 1, what="the close at the pay window's end")
        assert engine.get_order(first).state == "closed"
        engine._withholder.advance("gym-1", "sub-2026-12")  # whatever the subscriber did
        assert engine.get_withholding("gym-1", "sub-2026-12").attempt == 1
        with pytest.raises(UnknownOrder):
            engine.find_order("gym-1", "sub-2026-12", 2)
        wechat.pay_reply = PROCESSING
        serial = engine.get_order(first).payment_serial
        signed_callback(engine, "wechat", serial, ChannelReply("SUCCESS", "CLOSED"))
        w = wait_for(lambda: (w := engine.get_withholding("gym-1", "sub-2026-12")).attempt
                     == 2 and w, what="the retry after the confirmed close")
        assert w.attempts[0] == w.attempts[1]  # a timeout says nothing of the balance
        unpaid = [e.seq for e in engine.journal(first) if e.to_state == "unpaid"]
        created = engine.journal(attempt_order(engine, 2))[0].seq
        assert unpaid and unpaid[0] < created
    finally:
        engine.shutdown()


def test_a_revoked_agreement_is_never_paid_on_again(wallets) -> None:
    engine, wechat, alipay = wallets
    engine.sign_agreement("alice", "wechat")
    on_alipay = engine.sign_agreement("alice", "alipay")
    wechat.pay_reply = PROCESSING
    engine.withhold("gym-1", "sub-2026-12", "alice", 5_000, "CNY", "Gym")
    engine.handle_agreement_callback("alipay", on_alipay.agreement_id, "alice",
                                     AgreementStatus.TERMINATED)
    serial = engine.get_order(attempt_order(engine, 1)).payment_serial
    signed_callback(engine, "wechat", serial, NOTENOUGH)
    w = wait_for(lambda: (w := engine.get_withholding("gym-1", "sub-2026-12")).state
                 is WithholdState.FAILED and w, what="the withholding failed")
    assert w.attempt == 1 and "no other active agreement" in w.cause
    assert alipay.count("pay") == 0


def test_a_retry_decided_before_a_crash_is_submitted_at_the_next_open(tmp_path: Path) -> None:
    engine, wechat, alipay = open_wallets(tmp_path / "pay.db")
    engine.sign_agreement("alice", "wechat")
    engine.sign_agreement("alice", "alipay")
    wechat.pay_reply = PROCESSING

    def crash(request: PaymentRequest) -> object:
        raise EngineClosed("crashed between the decision and the submit")

    engine.withhold("gym-1", "sub-2026-12", "alice", 5_000, "CNY", "Gym")
    engine._withholder._submit = crash  # type: ignore[method-assign]
    serial = engine.get_order(attempt_order(engine, 1)).payment_serial
    signed_callback(engine, "wechat", serial, NOTENOUGH)
    wait_for(lambda: engine.get_withholding("gym-1", "sub-2026-12").attempt == 2,
             what="the retry decided")
    with pytest.raises(UnknownOrder):
        engine.find_order("gym-1", "sub-2026-12", 2)
    engine.abandon()
    alipay.pay_reply = PROCESSING
    engine = Engine.open(tmp_path / "pay.db", channels=[wechat, alipay], policy=POLICY,
                         config=CONFIG)
    try:
        order = engine.get_order(attempt_order(engine, 2))
        assert cash_channel(order) == "alipay"
    finally:
        engine.shutdown()


def test_submit_refuses_a_withhold_payment_made_by_hand(wallets) -> None:
    engine, _, _ = wallets
    agreement = engine.sign_agreement("alice", "wechat")
    request = PaymentRequest(
        "gym-1", "sub-2026-12", "alice", "CNY", 5_000, "Gym",
        CashPart(5_000, "wechat", PayDetails(PayScenario.WITHHOLD,
                                             agreement_id=agreement.agreement_id)))
    with pytest.raises(InvalidRequest):
        engine.submit(request)
    with pytest.raises(UnknownOrder):
        engine.find_order("gym-1", "sub-2026-12")


def test_the_withholding_subscriber_name_is_reserved(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest):
        Engine.open(tmp_path / "pay.db", channels=[AgreementWallet("wechat")], config=CONFIG,
                    subscribers={"payengine.withholding": lambda event: None})
