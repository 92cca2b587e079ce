"""The simulated wallet sends a notification again until the merchant acknowledges it.

As WeChat Pay does (15 s, 15 s, 30 s, 3 min, ... after the first send), at most
``notify_sends_max`` times; the oracle then holds the engine to what that promises.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from itertools import accumulate, pairwise

from hypothesis import given, settings
from hypothesis import strategies as st

from payengine.engine.errors import NotificationRejected
from payengine.sim.channel import (
    NOTIFY_RESEND_SCHEDULE_MS,
    NOTIFY_SENDS_MAX,
    ChannelFaults,
    SimulatedChannel,
)
from payengine.sim.oracle import check_wallet_notices
from payengine.sim.runtime import Scheduler, SimWorld
from payengine.sim.simulation import SimConfig, run

ACK, REFUSE, SILENT = "ack", "refuse", "silent"


class ScriptedMerchant:
    """A merchant endpoint answering each send as its script says: a state (acknowledged),
    ``NotificationRejected`` (refused) or an error (no answer); then it acknowledges."""

    def __init__(self, world: SimWorld, script: list[str]) -> None:
        self.world = world
        self.answers: Iterator[str] = iter(script)
        self.sent_at_ms: list[int] = []

    def handle_notification(self, channel: str, body: bytes,
                            headers: Mapping[str, str] | None = None, *,
                            wait: bool = True) -> str:
        self.sent_at_ms.append(self.world.now_ms())
        answer = next(self.answers, ACK)
        if answer == REFUSE:
            raise NotificationRejected("not believed yet", "unconfirmed")
        if answer == SILENT:
            raise TimeoutError("no answer")
        return "succeeded"


def _wallet(script: list[str], faults: ChannelFaults | None = None
            ) -> tuple[Scheduler, SimulatedChannel, ScriptedMerchant]:
    scheduler = Scheduler(seed=3)
    world = SimWorld(scheduler, io_latency_ms=(1, 1))
    wallet = SimulatedChannel("wechat", world, seed=1, wait_for_ack=False,
                              faults=faults or ChannelFaults.none())
    merchant = ScriptedMerchant(world, script)
    wallet.attach(merchant)
    return scheduler, wallet, merchant


def _paid(scheduler: Scheduler, wallet: SimulatedChannel) -> None:
    """A user pays one payment; the wallet notifies; time runs until nothing is left."""
    wallet.pay("P1", 1_000, "CNY", "Fuel")
    scheduler.run_until_idle()


def _gaps(times: list[int]) -> list[int]:
    return [later - earlier for earlier, later in pairwise(times)]


def test_a_refused_notification_is_sent_again_on_the_wechat_schedule_until_acknowledged(
) -> None:
    scheduler, wallet, merchant = _wallet([REFUSE, REFUSE, ACK])
    _paid(scheduler, wallet)
    assert _gaps(merchant.sent_at_ms) == [15_000, 15_000]
    [notice] = wallet.notices.values()
    assert notice.sends == 3 and not notice.gave_up
    assert notice.acknowledged_at_ms == merchant.sent_at_ms[-1]  # answered at once
    assert notice.refusals == ["notification_rejected:unconfirmed"] * 2
    assert wallet.unacknowledged() == []
    assert wallet.counts["notify_resent"] == 2


def test_a_notification_nobody_answers_is_sent_at_most_notify_sends_max_times_then_given_up(
) -> None:
    scheduler, wallet, merchant = _wallet([SILENT] * 100)
    _paid(scheduler, wallet)
    assert len(merchant.sent_at_ms) == NOTIFY_SENDS_MAX
    assert _gaps(merchant.sent_at_ms) == [15_000, 15_000, 30_000, 180_000]
    [notice] = wallet.unacknowledged()
    assert notice.gave_up and notice.sends == NOTIFY_SENDS_MAX
    assert notice.refusals == ["no_answer"] * NOTIFY_SENDS_MAX
    assert wallet.counts["notify_gave_up"] == 1


def test_a_merchant_that_is_down_is_sent_the_notification_again_once_it_is_back() -> None:
    scheduler, wallet, merchant = _wallet([])
    wallet.attach(None)
    wallet.pay("P1", 1_000, "CNY", "Fuel")
    scheduler.run_until(lambda: any(n.sends for n in wallet.notices.values()),
                        deadline_ms=scheduler.now_ms + 2_000)
    wallet.attach(merchant)  # the engine reopened
    scheduler.run_until_idle()
    [notice] = wallet.notices.values()
    assert notice.sends == 2 and notice.acknowledged_at_ms is not None
    assert notice.refusals == ["no_answer"] and len(merchant.sent_at_ms) == 1


def test_a_lost_notification_is_sent_again_and_a_network_copy_is_not_a_send() -> None:
    scheduler, wallet, merchant = _wallet([], ChannelFaults(callback_lost=1.0))
    wallet.pay("P1", 1_000, "CNY", "Fuel")
    scheduler.run_until(lambda: bool(wallet.notices), deadline_ms=scheduler.now_ms + 2_000)
    wallet.faults = ChannelFaults(callback_duplicated=0.0)
    scheduler.run_until_idle()
    [notice] = wallet.notices.values()
    assert notice.sends == 2 and len(merchant.sent_at_ms) == 1
    assert notice.acknowledged_at_ms is not None

    scheduler, wallet, merchant = _wallet([], ChannelFaults(callback_duplicated=1.0,
                                                            callback_delay_ms=(5, 5)))
    _paid(scheduler, wallet)
    [notice] = wallet.notices.values()
    assert notice.sends == 1 and len(merchant.sent_at_ms) == 2  # both copies acknowledged


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([ACK, REFUSE, SILENT]), max_size=8))
def test_whatever_the_answers_the_sends_follow_the_schedule_and_stop_at_the_first_ack(
    script: list[str],
) -> None:
    scheduler, wallet, merchant = _wallet(script)
    _paid(scheduler, wallet)
    [notice] = wallet.notices.values()
    answers = (script + [ACK] * NOTIFY_SENDS_MAX)[:NOTIFY_SENDS_MAX]
    first_ack = answers.index(ACK) if ACK in answers else None
    expected_sends = NOTIFY_SENDS_MAX if first_ack is None else first_ack + 1
    assert notice.sends == len(merchant.sent_at_ms) == expected_sends
    offsets = [t - merchant.sent_at_ms[0] for t in merchant.sent_at_ms[1:]]
    assert offsets == list(accumulate(NOTIFY_RESEND_SCHEDULE_MS[:expected_sends - 1]))
    assert (notice.acknowledged_at_ms is None) == (first_ack is None) == notice.gave_up
    assert len(notice.refusals) == expected_sends - (first_ack is not None)


def test_the_oracle_names_a_charge_the_engine_does_not_know_and_a_notice_never_acknowledged(
    tmp_path: object,
) -> None:
    from payengine.persistence.store import Store

    scheduler, wallet, _ = _wallet([SILENT] * 100)
    _paid(scheduler, wallet)
    store = Store(f"{tmp_path}/empty.db")
    try:
        violations = check_wallet_notices(store, {"wechat": wallet})
    finally:
        store.close()
    assert [v.invariant for v in violations] == ["wallet-charges-known",
                                                 "wallet-notification-acknowledged"]
    assert "never acknowledged" in violations[0].detail
    assert violations[1].subject == "notification payment P1 T000000000000"


def test_an_engine_that_acknowledges_what_it_does_not_believe_is_caught_by_a_default_run(
) -> None:
    result = run(SimConfig(seed=0, plant_bug="notify-acks-unbelieved"))
    assert {v.invariant for v in result.violations} == {"wallet-charges-known"}
    assert all("its notification was acknowledged" in v.detail for v in result.violations)


def test_with_double_charges_on_the_wallet_resends_refused_second_charges_and_all_is_known(
) -> None:
    result = run(SimConfig(seed=1, orders=60, faults=frozenset({"double-charge"})))
    assert result.ok, result.violations
    assert result.fault_mix == ["double-charge"]  # seed 1 draws it on
    assert result.faults["double_charge_forced"] + result.faults.get("double_charge", 0) >= 3
    assert result.faults["notify_resent"] >= 3  # each second charge refused once at least
