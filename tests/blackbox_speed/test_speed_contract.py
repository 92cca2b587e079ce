"""Black-box checks of the README's *Durability, group commit and capacity* and *Threads and
bounds* sections, ``journal`` / ``ledger_balances`` / ``unbalanced_postings``, and the
``bench`` and ``sigkill`` command lines. Written from README.md, ``help()`` of the public
names and the CLIs' ``--help`` only."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from payengine import (
    ChannelReply,
    EngineClosed,
    EngineConfig,
    GroupCommitConfig,
    IllegalTransition,
    InvalidRequest,
    NotificationRejected,
    OrderPolicy,
    Overloaded,
    UnknownOrder,
)

from ._harness import (
    InstantChannel,
    SilentChannel,
    open_engine,
    request,
    run_threads,
    setup_accounts,
    wait_until,
)

ROOT = Path(__file__).resolve().parents[2]
M = "station-42"


# --------------------------------------------------------------------------------------
# Settings: the defaults of the "Threads and bounds" table and their bounds
# --------------------------------------------------------------------------------------


def test_defaults_are_the_documented_ones() -> None:
    c = EngineConfig()
    assert c.actor_threads == 8
    assert c.live_orders_max == 200_000
    assert c.ask_timeout_s == 10
    assert c.account_idle_ms == 30_000
    assert c.actor_backlog_max == 256
    assert c.writer_backlog_max == 24
    assert c.submits_in_flight_max == 16
    assert c.admission_wait_ms == 2
    assert c.group_commit == GroupCommitConfig(changes_max=512, statements_max=8192, wait_max_ms=20)
    g = GroupCommitConfig()
    assert (g.changes_max, g.statements_max, g.wait_max_ms) == (512, 8192, 20)


ENGINE_BOUNDS = {
    "actor_threads": (1, 256),
    "live_orders_max": (1, 10_000_000),
    "actor_backlog_max": (1, 10_000_000),
    "writer_backlog_max": (1, 1_000_000),
    "submits_in_flight_max": (1, 100_000),
    "admission_wait_ms": (0, 60_000),
}
GROUP_BOUNDS = {
    "changes_max": (1, 100_000),
    "statements_max": (1, 10_000_000),
    "wait_max_ms": (1, 10_000),
}


@pytest.mark.parametrize("name", sorted(ENGINE_BOUNDS))
def test_engine_config_bounds(name: str) -> None:
    lo, hi = ENGINE_BOUNDS[name]
    assert getattr(EngineConfig(**{name: lo}), name) == lo
    assert getattr(EngineConfig(**{name: hi}), name) == hi
    for bad in (lo - 1, hi + 1, 1.5, "8", None):
        with pytest.raises(InvalidRequest) as info:
            EngineConfig(**{name: bad})
        assert name in str(info.value), f"the error should name {name}: {info.value}"


@pytest.mark.parametrize("name", sorted(GROUP_BOUNDS))
def test_group_commit_config_bounds(name: str) -> None:
    lo, hi = GROUP_BOUNDS[name]
    assert getattr(GroupCommitConfig(**{name: lo}), name) == lo
    assert getattr(GroupCommitConfig(**{name: hi}), name) == hi
    for bad in (lo - 1, hi + 1, 1.5, "8", None):
        with pytest.raises(InvalidRequest) as info:
            GroupCommitConfig(**{name: bad})
        assert name in str(info.value), f"the error should name {name}: {info.value}"


@pytest.mark.parametrize("bad", [{"changes_max": 5}, None, 5])
def test_group_commit_must_be_a_group_commit_config(bad: object) -> None:
    with pytest.raises(InvalidRequest) as info:
        EngineConfig(group_commit=bad)  # type: ignore[arg-type]
    assert "group_commit" in str(info.value)


def test_bad_settings_refused_even_under_python_O() -> None:
    code = (
        "from payengine import EngineConfig, GroupCommitConfig, InvalidRequest\n"
        "bad = [lambda: EngineConfig(actor_threads=0), lambda: EngineConfig(admission_wait_ms=-1),\n"
        "       lambda: EngineConfig(live_orders_max=0), lambda: GroupCommitConfig(wait_max_ms=0)]\n"
        "for make in bad:\n"
        "    try:\n"
        "        make()\n"
        "    except InvalidRequest:\n"
        "        continue\n"
        "    raise SystemExit('accepted under -O')\n"
    )
    done = subprocess.run([sys.executable, "-O", "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


# --------------------------------------------------------------------------------------
# Durability: every acknowledged submit / decision survives a crash (Engine.abandon)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "group_commit",
    [
        GroupCommitConfig(),
        GroupCommitConfig(changes_max=1, statements_max=1, wait_max_ms=1),
        GroupCommitConfig(changes_max=100_000, statements_max=10_000_000, wait_max_ms=10_000),
    ],
    ids=["default", "tiny-batches", "huge-batches"],
)
def test_every_acknowledged_submit_survives_abandon(tmp_path: Path, group_commit: GroupCommitConfig) -> None:
    channel = InstantChannel()
    config = EngineConfig(group_commit=group_commit)
    engine = open_engine(tmp_path / "pay.db", channel, config=config)
    setup_accounts(engine, 4)
    acked: dict[str, object] = {}
    stop = threading.Event()
    errors: list[BaseException] = []

    def client(i: int) -> None:
        for k in itertools.count():
            if stop.is_set():
                return
            no = f"t{i}-{k}"
            try:
                acked[no] = engine.submit(request(no, user=f"u{i % 4}"))
            except Overloaded:
                time.sleep(0.001)
            except EngineClosed:
                return
            except BaseException as error:  # anything else is a finding
                errors.append(error)
                return

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    engine.abandon()  # a crash, with submits still racing it
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(acked) > 20

    engine = open_engine(tmp_path / "pay.db", channel, config=config)
    try:
        for no, receipt in acked.items():
            assert engine.find_order(M, no).order_id == receipt.order_id  # type: ignore[attr-defined]
        assert wait_until(lambda: engine.unsettled_count() == 0, 30)
        states = Counter(engine.get_order(r.order_id).state for r in acked.values())  # type: ignore[attr-defined]
        assert set(states) == {"succeeded"}, states
        assert engine.unbalanced_postings() == []
    finally:
        engine.shutdown()


def test_acknowledged_close_and_refund_survive_abandon(tmp_path: Path) -> None:
    silent = SilentChannel()
    policy = OrderPolicy(pay_window_ms=60_000, query_schedule_ms=(30_000,))
    engine = open_engine(tmp_path / "a.db", silent, policy=policy)
    setup_accounts(engine)
    open_one = engine.submit(request("to-close"))
    assert wait_until(lambda: silent.pay_calls == 1)
    assert engine.close(open_one.order_id).state == "closed"
    engine.abandon()
    engine = open_engine(tmp_path / "a.db", silent, policy=policy)
    try:
        assert engine.get_order(open_one.order_id).state == "closed"
    finally:
        engine.shutdown()

    instant = InstantChannel()
    engine = open_engine(tmp_path / "b.db", instant)
    setup_accounts(engine)
    paid = engine.submit(request("to-refund"))
    assert wait_until(lambda: engine.get_order(paid.order_id).settled)
    refund = engine.refund(paid.order_id, "rf-1", 40_00, reason="pump stopped")
    engine.abandon()
    engine = open_engine(tmp_path / "b.db", instant)
    try:
        again = engine.get_order(paid.order_id).refund("rf-1")
        assert again.refund_id == refund.refund_id and again.amount_minor == 40_00
        assert wait_until(lambda: engine.get_order(paid.order_id).settled)
        assert engine.get_order(paid.order_id).refund("rf-1").status == "succeeded"
    finally:
        engine.shutdown()


# --------------------------------------------------------------------------------------
# Admission: Overloaded at once, nothing created; accepted orders all settle
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "kind"),
    [
        (EngineConfig(submits_in_flight_max=1, admission_wait_ms=0), "refused_busy"),
        (EngineConfig(actor_backlog_max=1), "refused_backlog"),
        (EngineConfig(writer_backlog_max=1), "refused_backlog"),
        (EngineConfig(submits_in_flight_max=2, admission_wait_ms=1, actor_backlog_max=4), None),
    ],
    ids=["in-flight-1-wait-0", "actor-backlog-1", "writer-backlog-1", "mixed"],
)
def test_overloaded_refusals_create_nothing_and_accepted_settle(
    tmp_path: Path, config: EngineConfig, kind: str | None
) -> None:
    engine = open_engine(tmp_path / "pay.db", InstantChannel(), config=config)
    try:
        setup_accounts(engine, 4)
        accepted: dict[str, object] = {}
        refused: dict[str, float] = {}

        def client(i: int) -> None:
            for k in range(25):
                no = f"t{i}-{k}"
                start = time.monotonic()
                try:
                    accepted[no] = engine.submit(request(no, user=f"u{i % 4}"))
                except Overloaded:
                    refused[no] = time.monotonic() - start

        run_threads(16, client)
        assert len(accepted) + len(refused) == 400
        assert refused, "tiny bounds and 16 concurrent clients: some submit must be refused"
        assert accepted
        # "refused Overloaded at once": never queued into a slow answer
        assert max(refused.values()) < 1.0, max(refused.values())
        for no in refused:
            with pytest.raises(UnknownOrder):
                engine.find_order(M, no)
        stats = engine.admission_stats
        assert stats.admitted == len(accepted)
        assert stats.refused_busy + stats.refused_backlog == len(refused)
        if kind is not None:
            assert getattr(stats, kind) > 0, stats
        assert wait_until(
            lambda: all(engine.get_order(r.order_id).settled for r in accepted.values()),
            30,  # type: ignore[attr-defined]
        )
        assert {engine.get_order(r.order_id).state for r in accepted.values()} == {"succeeded"}  # type: ignore[attr-defined]
        assert engine.unbalanced_postings() == []
    finally:
        engine.shutdown()


def test_admission_wait_lets_a_submit_wait_for_a_slot(tmp_path: Path) -> None:
    """One slot, but a long ``admission_wait_ms``: no submit is refused for want of a slot."""
    config = EngineConfig(submits_in_flight_max=1, admission_wait_ms=10_000)
    engine = open_engine(tmp_path / "pay.db", InstantChannel(), config=config)
    try:
        setup_accounts(engine, 4)
        busy: list[str] = []

        def client(i: int) -> None:
            for k in range(10):
                try:
                    engine.submit(request(f"w{i}-{k}", user=f"u{i % 4}"))
                except Overloaded:
                    busy.append(f"w{i}-{k}")

        run_threads(8, client)
        stats = engine.admission_stats
        assert stats.refused_busy == 0, stats
        assert stats.admitted + stats.refused_backlog == 80
    finally:
        engine.shutdown()


def test_admission_stats_fields(tmp_path: Path) -> None:
    engine = open_engine(tmp_path / "pay.db", InstantChannel())
    try:
        stats = engine.admission_stats  # a property, as the table's "admission_stats → AdmissionStats"
        assert (stats.admitted, stats.refused_busy, stats.refused_backlog) == (0, 0, 0)
        setup_accounts(engine)
        engine.submit(request("one"))
        assert engine.admission_stats.admitted == 1
    finally:
        engine.shutdown()


def test_live_orders_max_refuses_past_the_bound(tmp_path: Path) -> None:
    silent = SilentChannel()
    policy = OrderPolicy(pay_window_ms=60_000, query_schedule_ms=(30_000,))
    engine = open_engine(tmp_path / "pay.db", silent, policy=policy, config=EngineConfig(live_orders_max=5))
    try:
        setup_accounts(engine)
        receipts = [engine.submit(request(f"o{i}")) for i in range(5)]
        assert wait_until(lambda: silent.pay_calls == 5)
        time.sleep(0.3)  # idle open orders are passivated, and "still count as in flight"
        start = time.monotonic()
        with pytest.raises(Overloaded):
            engine.submit(request("o5"))
        assert time.monotonic() - start < 1.0
        with pytest.raises(UnknownOrder):
            engine.find_order(M, "o5")
        # an order that leaves flight frees its place
        engine.close(receipts[0].order_id)
        assert wait_until(lambda: engine.get_order(receipts[0].order_id).settled)
        assert engine.submit(request("o5")).merchant_order_no == "o5"
    finally:
        engine.shutdown()


def test_admission_stats_count_a_live_orders_refusal(tmp_path: Path) -> None:
    silent = SilentChannel()
    policy = OrderPolicy(pay_window_ms=60_000, query_schedule_ms=(30_000,))
    engine = open_engine(tmp_path / "pay.db", silent, policy=policy, config=EngineConfig(live_orders_max=2))
    try:
        setup_accounts(engine)
        engine.submit(request("a"))
        engine.submit(request("b"))
        with pytest.raises(Overloaded):
            engine.submit(request("c"))
        stats = engine.admission_stats
        # README: `admitted` counts submits past the gate (the live-order bound is checked
        # after it); the refusal is counted in `refused_live_orders`.
        assert (stats.admitted, stats.refused_live_orders) == (3, 1), stats
        assert stats.refused_busy + stats.refused_backlog == 0, stats
        assert engine.submit(request("a")).merchant_order_no == "a"  # a retry is not new
    finally:
        engine.shutdown()


def test_a_client_retrying_overloaded_at_once_is_paced_by_the_admission_wait(
        tmp_path: Path) -> None:
    """README: a backlog refusal waits, sleeping, at most ``admission_wait_ms`` for the
    backlog to drain, which paces a client that retries at once (it would otherwise take
    the CPU the engine needs). Checked as behaviour, not as a speed: a refusal for a
    backlog takes at least the wait, and a backlog that drains within it admits."""
    engine = open_engine(tmp_path / "p.db", InstantChannel(),
                         config=EngineConfig(actor_backlog_max=1, admission_wait_ms=20))
    try:
        setup_accounts(engine, 1)
        directory = engine._ctx.directory
        directory._told += 10  # the actors are ten messages behind
        started = time.monotonic()
        with pytest.raises(Overloaded):
            engine.submit(request("paced-1", user="u0"))
        assert time.monotonic() - started >= 0.015  # slept the wait, not refused at once
        drained = threading.Timer(0.005, lambda: setattr(directory, "_told",
                                                         directory._told - 10))
        drained.start()
        receipt = engine.submit(request("paced-2", user="u0"))  # drains within the wait
        drained.join()
        assert engine.find_order(receipt.merchant_id, "paced-2").order_id == receipt.order_id
        stats = engine.admission_stats
        assert (stats.refused_backlog, stats.admitted) == (1, 1), stats
    finally:
        engine.shutdown()


# --------------------------------------------------------------------------------------
# Threads and bounds: open orders cost no thread; passivated orders still paid / closed
# --------------------------------------------------------------------------------------


def _engine_threads_bound(actor_threads: int, channels: int = 1) -> int:
    # README: the actor threads, one timer thread, an I/O lane of 4 threads per channel
    # and one for notification delivery
    return actor_threads + 1 + 4 * (channels + 1)


def _submit_retrying(engine, requests, workers: int = 8) -> dict[str, object]:  # type: ignore[no-untyped-def]
    receipts: dict[str, object] = {}
    queue = iter(requests)
    lock = threading.Lock()

    def client(_: int) -> None:
        while True:
            with lock:
                req = next(queue, None)
            if req is None:
                return
            while True:
                try:
                    receipts[req.merchant_order_no] = engine.submit(req)
                    break
                except Overloaded:
                    time.sleep(0.002)

    run_threads(workers, client)
    return receipts


def test_two_thousand_open_orders_keep_threads_bounded(tmp_path: Path) -> None:
    baseline = threading.active_count()
    silent = SilentChannel()
    policy = OrderPolicy(pay_window_ms=600_000, query_schedule_ms=(300_000,))
    config = EngineConfig(actor_threads=2)
    engine = open_engine(tmp_path / "pay.db", silent, policy=policy, config=config)
    bound = baseline + _engine_threads_bound(2)
    try:
        setup_accounts(engine, 4)
        n = 2000
        receipts = _submit_retrying(
            engine, [request(f"o{i}", user=f"u{i % 4}", vouchers=i % 4 == 0) for i in range(n)]
        )
        assert len(receipts) == n
        assert wait_until(lambda: silent.pay_calls >= n, 30)
        time.sleep(0.2)
        assert threading.active_count() <= bound, [t.name for t in threading.enumerate()]
        assert engine.unsettled_count() == n
    finally:
        engine.shutdown()

    engine = open_engine(tmp_path / "pay.db", silent, policy=policy, config=config)
    try:
        first = engine.resuming()
        assert 0 <= first <= n
        assert wait_until(lambda: engine.resuming() == 0, 30)
        time.sleep(0.2)
        assert threading.active_count() <= bound, [t.name for t in threading.enumerate()]
        assert engine.unsettled_count() == n
        some = next(iter(receipts.values()))
        assert engine.get_order(some.order_id).state == "paying"  # type: ignore[attr-defined]
    finally:
        engine.shutdown()


def test_resuming_is_zero_on_a_fresh_engine(tmp_path: Path) -> None:
    engine = open_engine(tmp_path / "pay.db", InstantChannel())
    try:
        assert engine.resuming() == 0
    finally:
        engine.shutdown()


@pytest.mark.parametrize("reopen", [False, True], ids=["passivated", "after-reopen"])
def test_idle_open_orders_are_paid_by_a_later_notification_or_closed_at_the_window(
    tmp_path: Path, reopen: bool
) -> None:
    silent = SilentChannel()
    policy = OrderPolicy(pay_window_ms=4_000, query_schedule_ms=(60_000,))
    config = EngineConfig(actor_threads=2)
    baseline = threading.active_count()
    engine = open_engine(tmp_path / "pay.db", silent, policy=policy, config=config)
    try:
        setup_accounts(engine, 4)
        n = 120
        receipts = list(
            _submit_retrying(
                engine, [request(f"o{i}", user=f"u{i % 4}") for i in range(n)], workers=4
            ).values()
        )
        assert wait_until(lambda: silent.pay_calls >= n)
        if reopen:
            engine.shutdown()
            engine = open_engine(tmp_path / "pay.db", silent, policy=policy, config=config)
            assert wait_until(lambda: engine.resuming() == 0)
        time.sleep(0.3)  # idle: only waiting for the user
        assert threading.active_count() <= baseline + _engine_threads_bound(2)

        paid = receipts[0::3]
        by_callback = receipts[1::6]  # a parsed callback, which is not believed but asked
        replies = {}
        for r in by_callback:
            silent.user_pays(r.payment_serial)  # type: ignore[attr-defined]
            txn, amount, cur = silent.paid[r.payment_serial]  # type: ignore[attr-defined]
            replies[r.payment_serial] = ChannelReply("SUCCESS", "SUCCESS", txn, amount, cur)  # type: ignore[attr-defined]
        waiting = set(replies)

        def wallet_retries() -> bool:
            for serial in sorted(waiting):
                try:
                    state = engine.handle_callback("wechat", serial, replies[serial])
                except NotificationRejected as error:
                    assert error.reason == "unverified"
                    continue
                assert state == "succeeded", state
                waiting.discard(serial)
            return not waiting

        wallet_retries()  # first delivery: not believed, the order asks its channel
        for r in paid:
            body, headers = silent.user_pays(r.payment_serial)  # type: ignore[attr-defined]
            assert engine.handle_notification("wechat", body, headers) in ("succeeded", "deducting")
        assert wait_until(wallet_retries, 10, 0.1)  # the wallet's retries agree once the answer is in
        assert wait_until(lambda: engine.unsettled_count() == 0, 20)
        won = {r.order_id for r in paid + by_callback}  # type: ignore[attr-defined]
        for r in receipts:
            order = engine.get_order(r.order_id)  # type: ignore[attr-defined]
            assert order.settled
            assert order.state == ("succeeded" if r.order_id in won else "closed"), order  # type: ignore[attr-defined]
        for i in range(4):
            assert engine.get_account(f"u{i}/rp").held == 0
        # "re-sending nothing" (passivation): one pay per order. A reopen may re-send a pay
        # whose answer was not committed yet ("in-flight ... channel commands re-sent").
        if reopen:
            assert silent.pay_calls >= n
        else:
            assert silent.pay_calls == n
        # a close only for the unpaid ones
        assert len(silent.closed) == n - len(won)
        assert engine.unbalanced_postings() == []
    finally:
        engine.shutdown()


# --------------------------------------------------------------------------------------
# journal() and the ledger after a payment, a refund and a close
# --------------------------------------------------------------------------------------


def _check_journal(entries) -> None:  # type: ignore[no-untyped-def]
    seqs = [e.seq for e in entries]
    assert seqs == sorted(seqs), "oldest first"
    last: dict[str, str] = {}
    for e in entries:
        if e.part in last:
            assert e.from_state == last[e.part], (e, last[e.part])
        last[e.part] = e.to_state
    assert (entries[0].part, entries[0].from_state, entries[0].to_state) == ("order", "", "accepted")


def test_journal_and_ledger_after_payment_refund_and_close(tmp_path: Path) -> None:
    silent = SilentChannel()
    instant = InstantChannel("alipay")
    policy = OrderPolicy(pay_window_ms=60_000, query_schedule_ms=(30_000,))
    from payengine import Engine

    engine = Engine.open(tmp_path / "pay.db", channels=[silent, instant], policy=policy)
    try:
        setup_accounts(engine)
        paid = engine.submit(request("paid", channel="alipay"))
        assert wait_until(lambda: engine.get_order(paid.order_id).settled)
        journal = engine.journal(paid.order_id)
        _check_journal(journal)
        assert [e.to_state for e in journal if e.part == "order"] == ["accepted", "paying", "succeeded"]
        assert {e.entity_id for e in journal} == {paid.order_id}
        balances = engine.ledger_balances(paid.order_id)
        assert list(balances) == ["CNY"]
        cny = balances["CNY"]
        assert cny[f"merchant:{M}"] == 100_00
        assert cny["payer:alipay"] == -97_00
        assert cny["vouchers:u0/rp"] == -100 and cny["vouchers:u0/points"] == -200
        assert cny.get("transit", 0) == 0 and sum(cny.values()) == 0

        engine.refund(paid.order_id, "rf-1", 98_00, reason="pump stopped early")
        assert wait_until(lambda: engine.get_order(paid.order_id).settled)
        refund = engine.get_order(paid.order_id).refund("rf-1")
        assert refund.status == "succeeded"
        assert refund.parts == ((0, 97_00, "done"), (1, 100, "done"))  # cash first, then vouchers
        journal = engine.journal(paid.order_id)
        _check_journal(journal)
        assert any(e.part.startswith("refund:") and e.to_state == "succeeded" for e in journal)
        cny = engine.ledger_balances(paid.order_id)["CNY"]
        assert cny[f"merchant:{M}"] == 2_00
        assert cny["payer:alipay"] == 0 and cny["vouchers:u0/rp"] == 0
        assert cny.get("transit", 0) == 0 and sum(cny.values()) == 0

        closed = engine.submit(request("closed"))
        assert wait_until(lambda: silent.pay_calls == 1)
        assert engine.close(closed.order_id).state == "closed"
        assert wait_until(lambda: engine.get_order(closed.order_id).settled)
        with pytest.raises(IllegalTransition):
            engine.close(paid.order_id)
        journal = engine.journal(closed.order_id)
        _check_journal(journal)
        assert journal[-1].to_state in ("cancelled", "closed", "unpaid")
        assert [e.to_state for e in journal if e.part == "order"][-1] == "closed"
        nothing = engine.ledger_balances(closed.order_id)
        assert nothing == {} or all(v == 0 for v in nothing.get("CNY", {}).values()), nothing

        everything = engine.ledger_balances()
        assert sum(everything["CNY"].values()) == 0
        assert everything["CNY"][f"merchant:{M}"] == 2_00
        assert engine.unbalanced_postings() == []
        for call in (engine.journal, engine.ledger_balances):
            with pytest.raises(UnknownOrder):
                call("ord_nobody")
    finally:
        engine.shutdown()


# --------------------------------------------------------------------------------------
# The command line: payengine bench, python -m payengine.sim.sigkill
# --------------------------------------------------------------------------------------

PAYENGINE = [
    sys.executable,
    "-c",
    "import sys; sys.argv[0] = 'payengine'; from payengine.sim.cli import main; sys.exit(main())",
]


def _run(
    args: list[str], timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def test_bench_help_lists_the_documented_options() -> None:
    done = _run([*PAYENGINE, "bench", "--help"])
    assert done.returncode == 0
    for option in (
        "--payments",
        "--workers",
        "--rate",
        "--synchronous",
        "--open-orders",
        "--json",
        "--overload",
    ):
        assert option in done.stdout, option


def test_bench_text() -> None:
    done = _run([*PAYENGINE, "bench", "--payments", "200"])
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "200/200" in out
    for text in (
        "payments/s",
        "submit->receipt",
        "submit->settled",
        "p50",
        "p99",
        "commits",
        "write statements",
        "rows",
        "peak threads",
        "max RSS",
    ):
        assert text in out, (text, out)


def test_bench_json_is_one_object_with_the_documented_fields() -> None:
    done = _run([*PAYENGINE, "bench", "--payments", "200", "--json"])
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(done.stdout)  # one object, nothing else on stdout
    for key in (
        "payments_per_s",
        "receipt_p50_ms",
        "receipt_p99_ms",
        "settled_p50_ms",
        "settled_p99_ms",
        "commits_per_payment",
        "write_statements_per_payment",
        "rows_per_payment",
        "peak_threads",
        "max_rss_mib",
    ):
        assert isinstance(figures[key], (int, float)), key
    assert figures["payments"] == figures["settled"] == 200


def test_bench_paced_rate() -> None:
    done = _run([*PAYENGINE, "bench", "--rate", "50", "--payments", "200", "--json"])
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(done.stdout)
    assert figures["settled"] == 200
    # paced: 200 at 50/s take at least about 4 s; how much longer depends on the machine's
    # load, which a test must not assert (the figures are the bench's to print)
    assert 0 < figures["payments_per_s"] <= 55, figures
    assert figures["wall_s"] >= 3.5


def test_bench_overload() -> None:
    done = _run([*PAYENGINE, "bench", "--overload", "--payments", "200"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert "of capacity" in done.stdout and "refused" in done.stdout, done.stdout


def test_bench_open_orders() -> None:
    done = _run([*PAYENGINE, "bench", "--open-orders", "500", "--json"])
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(done.stdout)
    assert figures["accepted"] == 500
    assert figures["threads"] <= 20  # bounded by configuration, not by the 500 open orders
    assert figures["bytes_per_open_order"] > 0
    assert figures["reopen_s"] >= figures["reopen_returned_s"] >= 0
    text = _run([*PAYENGINE, "bench", "--open-orders", "500"])
    assert text.returncode == 0
    assert "threads" in text.stdout and "RSS" in text.stdout and "per open order" in text.stdout


def test_sigkill_text_and_json(tmp_path: Path) -> None:
    sigkill = [sys.executable, "-m", "payengine.sim.sigkill", "run", "--kills", "3", "--no-progress"]
    done = _run([*sigkill, "--db", str(tmp_path / "text")])
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    assert "3 SIGKILLs" in done.stdout and "violations     0" in done.stdout, done.stdout
    assert "acknowledged" in done.stdout and "orders" in done.stdout
    done = _run([*sigkill, "--json", "--seed", "3", "--db", str(tmp_path / "json")])
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["kills"] == 3 and report["violations"] == []
    assert report["acknowledgements"]["submit"] > 0
    assert sum(report["final_states"].values()) == report["orders"]
    assert set(report["final_states"]) <= {"succeeded", "failed", "closed"}


def test_sigkill_without_violation_removes_its_temporary_folder(tmp_path: Path) -> None:
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(private_tmp)}
    done = _run(
        [sys.executable, "-m", "payengine.sim.sigkill", "run", "--kills", "2", "--no-progress"], env=env
    )
    assert done.returncode == 0, done.stdout
    left = [p.name for p in private_tmp.iterdir()]
    assert left == [], left
