"""Operator tools: order search (``find_orders``), the attention queue, journalled
resolutions (README "Operator tools")."""

from __future__ import annotations

import sqlite3
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from payengine import Engine, EngineConfig, OrderPolicy
from payengine.actors.notifier import NotificationConfig
from payengine.actors.operator import resolve_in_file
from payengine.engine.errors import (
    ActionNotApplicable,
    InvalidRequest,
    UnknownAttentionItem,
)
from payengine.engine.operator import (
    FIND_ORDERS_LIMIT_MAX,
    AttentionItem,
    AttentionKind,
    check_resolution,
    order_filter,
)
from payengine.persistence import operator as store_operator
from payengine.persistence.outbox import OutboxEvent
from payengine.persistence.store import Store
from tests.helpers import ScriptedChannel, fuel_request, fund_customer, open_engine, wait_for

STATES = ("accepted", "paying", "needs_reconciliation", "succeeded", "failed", "closed")
MERCHANTS = ("m1", "m2")
USERS = ("u1", "u2", "u3")
STATIONS = (None, "st-1", "st-2")
CHANNELS = (None, "wechat", "alipay")


def _insert(db: Path, rows: list[dict[str, Any]]) -> None:
    """Orders as the store keeps them, written straight into the tables (fast enough for
    hypothesis; the engine's own submits are exercised below)."""
    conn = sqlite3.connect(db)
    with conn:
        for r in rows:
            conn.execute(
                "INSERT INTO payment_orders (order_id, merchant_id, merchant_order_no,"
                " payment_serial, user_id, currency, total_minor, state, cause, created_at_ms,"
                " updated_at_ms, version, settled, station_id, attempt)"
                " VALUES (?, ?, ?, ?, ?, 'CNY', ?, ?, ?, ?, ?, 1, 0, ?, 1)",
                (r["order_id"], r["merchant_id"], r["order_id"], "S" + r["order_id"],
                 r["user_id"], r["total"], r["state"], r.get("cause", "test"), r["at"],
                 r["at"], r["station_id"]))
            if r["channel"] is not None:
                conn.execute("INSERT INTO legs (order_id, leg_no, mode, amount, unit, status,"
                             " channel) VALUES (?, 1, 'cash', ?, 'CNY', 'paying', ?)",
                             (r["order_id"], r["total"], r["channel"]))
    conn.close()


@pytest.fixture
def fresh_db() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "ops.db"
        Store(path).close()
        yield path


orders_strategy = st.lists(st.fixed_dictionaries({
    "state": st.sampled_from(STATES), "merchant_id": st.sampled_from(MERCHANTS),
    "user_id": st.sampled_from(USERS), "station_id": st.sampled_from(STATIONS),
    "channel": st.sampled_from(CHANNELS), "at": st.integers(0, 20),
    "total": st.integers(1, 10_000)}), max_size=30)
filters_strategy = st.fixed_dictionaries({}, optional={
    "state": st.sampled_from(STATES), "merchant_id": st.sampled_from(MERCHANTS),
    "user_id": st.sampled_from(USERS), "station_id": st.sampled_from(("st-1", "st-2")),
    "channel": st.sampled_from(("wechat", "alipay")), "since_ms": st.integers(0, 21),
    "until_ms": st.integers(0, 21)})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(orders=orders_strategy, filters=filters_strategy, page=st.integers(1, 7))
def test_paging_through_find_orders_gives_exactly_the_orders_a_model_filter_keeps_in_order(
        orders: list[dict[str, Any]], filters: dict[str, Any], page: int) -> None:
    rows = [{**o, "order_id": f"ord{i:03d}"} for i, o in enumerate(orders)]
    with tempfile.TemporaryDirectory() as folder:
        db = Path(folder) / "ops.db"
        Store(db).close()
        _insert(db, rows)

        def keep(r: dict[str, Any]) -> bool:
            return all(
                r[key] == filters[key] for key in
                ("state", "merchant_id", "user_id", "station_id", "channel") if key in filters
            ) and filters.get("since_ms", 0) <= r["at"] < filters.get("until_ms", 10**9)

        expected = [r["order_id"] for r in sorted(rows, key=lambda r: (r["at"], r["order_id"]))
                    if keep(r)]
        store = Store(db, read_only=True)
        try:
            got: list[str] = []
            after = None
            for _ in range(len(rows) + 2):
                result = store_operator.find_orders(
                    store, order_filter(**filters, limit=page, after=after))
                assert len(result.orders) <= page
                got += [o.order_id for o in result.orders]
                after = result.next_after
                if after is None:
                    break
        finally:
            store.close()
    assert got == expected


def test_an_order_summary_carries_the_cash_channel_station_and_state(fresh_db: Path) -> None:
    _insert(fresh_db, [{"order_id": "o1", "merchant_id": "m1", "user_id": "u1",
                        "station_id": "st-1", "channel": "wechat", "at": 5, "total": 700,
                        "state": "succeeded"}])
    store = Store(fresh_db, read_only=True)
    try:
        page = store_operator.find_orders(store, order_filter())
    finally:
        store.close()
    (summary,) = page.orders
    assert (summary.order_id, summary.merchant_id, summary.user_id, summary.state,
            summary.total_minor, summary.currency, summary.created_at_ms, summary.station_id,
            summary.channel, summary.settled) == (
        "o1", "m1", "u1", "succeeded", 700, "CNY", 5, "st-1", "wechat", False)
    assert page.next_after is None


@pytest.mark.parametrize("bad", [
    {"state": "lost"}, {"limit": 0}, {"limit": FIND_ORDERS_LIMIT_MAX + 1}, {"limit": True},
    {"since_ms": -1}, {"merchant_id": ""}, {"user_id": "a\nb"}, {"after": "x"},
    {"after": "12:"}, {"channel": 5},
])
def test_a_bad_search_filter_is_refused_as_an_invalid_request_naming_it(
        bad: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest) as refused:
        order_filter(**bad)
    assert next(iter(bad)).split("_")[0] in refused.value.message


def test_the_engine_finds_its_own_orders_by_user_and_pages_them(engine: Engine) -> None:
    fund_customer(engine, "bob")
    for n in range(3):
        engine.submit(fuel_request(f"a-{n}", "alice"))
    engine.submit(fuel_request("b-0", "bob"))
    first = engine.find_orders(user_id="alice", limit=2)
    assert [o.merchant_order_no for o in first.orders] == ["a-0", "a-1"]
    assert first.next_after is not None
    second = engine.find_orders(user_id="alice", limit=2, after=first.next_after)
    assert [o.merchant_order_no for o in second.orders] == ["a-2"]
    assert second.next_after is None
    assert [o.user_id for o in engine.find_orders(channel="wechat").orders].count("bob") == 1


# ---------------------------------------------------------------------- the attention queue


def _doubtful_db(path: Path, n: int) -> None:
    Store(path).close()
    _insert(path, [{"order_id": f"nr{i}", "merchant_id": "m1", "user_id": "u1",
                    "station_id": None, "channel": "wechat", "at": i, "total": 100,
                    "state": "needs_reconciliation",
                    "cause": "amount_mismatch" if i == 0 else "queries_exhausted"}
                   for i in range(n)])


def test_orders_in_doubt_are_in_the_queue_with_amount_mismatches_on_their_own(
        fresh_db: Path) -> None:
    _insert(fresh_db, [
        {"order_id": "a", "merchant_id": "m1", "user_id": "u1", "station_id": None,
         "channel": "wechat", "at": 1, "total": 100, "state": "needs_reconciliation",
         "cause": "queries_exhausted"},
        {"order_id": "b", "merchant_id": "m1", "user_id": "u1", "station_id": None,
         "channel": "wechat", "at": 2, "total": 100, "state": "needs_reconciliation",
         "cause": "amount_mismatch: channel charged 99 CNY, asked 100 CNY"},
        {"order_id": "c", "merchant_id": "m1", "user_id": "u1", "station_id": None,
         "channel": "wechat", "at": 3, "total": 100, "state": "succeeded"}])
    store = Store(fresh_db, read_only=True)
    try:
        items = store_operator.attention(store)
    finally:
        store.close()
    assert [(i.item_id, i.kind, i.order_id) for i in items] == [
        ("needs_reconciliation:a", AttentionKind.NEEDS_RECONCILIATION, "a"),
        ("amount_mismatch:b", AttentionKind.AMOUNT_MISMATCH, "b")]


def test_an_acknowledged_item_leaves_the_queue_and_a_second_acknowledge_does_nothing_more(
        fresh_db: Path) -> None:
    _doubtful_db(fresh_db, 2)
    store = Store(fresh_db, read_only=True)
    try:
        first = resolve_in_file(fresh_db, store, "needs_reconciliation:nr1", "acknowledge",
                                "ops-anna", "called the wallet: not charged", 1_000)
        again = resolve_in_file(fresh_db, store, "needs_reconciliation:nr1", "acknowledge",
                                "ops-ben", "another reason", 2_000)
        queue = [i.item_id for i in store_operator.attention(store)]
        journal = store_operator.journal(store)
    finally:
        store.close()
    assert (first.outcome, first.operator, first.at_ms, first.repeated) == (
        "acknowledged", "ops-anna", 1_000, False)
    assert (again.operator, again.reason, again.at_ms, again.repeated) == (
        "ops-anna", "called the wallet: not charged", 1_000, True)
    assert queue == ["amount_mismatch:nr0"]
    assert [(r.item_id, r.action, r.operator) for r in journal] == [
        ("needs_reconciliation:nr1", "acknowledge", "ops-anna")]


@pytest.mark.parametrize("item,action,operator,reason,error", [
    ("needs_reconciliation:nobody", "acknowledge", "ops", "why", UnknownAttentionItem),
    ("no_such_kind:nr1", "acknowledge", "ops", "why", UnknownAttentionItem),
    ("needs_reconciliation:nr1", "retry", "ops", "why", ActionNotApplicable),
    ("needs_reconciliation:nr1", "delete", "ops", "why", InvalidRequest),
    ("needs_reconciliation:nr1", "acknowledge", "", "why", InvalidRequest),
    ("needs_reconciliation:nr1", "acknowledge", "ops", "", InvalidRequest),
    ("needs_reconciliation:nr1", "acknowledge", "ops", "x" * 501, InvalidRequest),
    ("needs_reconciliation:nr1", ["acknowledge"], "ops", "why", InvalidRequest),
    (None, "acknowledge", "ops", "why", InvalidRequest),
    ("needs_reconciliation:nr1", "acknowledge", 7, "why", InvalidRequest),
])
def test_a_refused_resolution_is_typed_and_journals_nothing(
        fresh_db: Path, item: object, action: object, operator: object, reason: object,
        error: type[Exception]) -> None:
    _doubtful_db(fresh_db, 2)
    store = Store(fresh_db, read_only=True)
    try:
        with pytest.raises(error):
            resolve_in_file(fresh_db, store, item, action, operator, reason, 1_000)
        assert store_operator.journal(store) == []
        assert len(store_operator.attention(store)) == 2
    finally:
        store.close()


def test_retrying_an_owed_follow_up_is_refused_outside_the_engines_process() -> None:
    item = AttentionItem("owed_follow_up:o1:2:confirm", AttentionKind.OWED_FOLLOW_UP, 0, "why",
                         order_id="o1")
    with pytest.raises(ActionNotApplicable) as refused:
        check_resolution(item, "retry", "ops", "why", in_engine=False)
    assert refused.value.code == "action_not_applicable"
    assert check_resolution(item, "retry", "ops", "why", in_engine=True) == "retry"


@settings(max_examples=25, deadline=None, suppress_health_check=[
    HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(calls=st.lists(st.tuples(st.sampled_from(["needs_reconciliation:nr1",
                                                 "amount_mismatch:nr0",
                                                 "needs_reconciliation:nr9"]),
                                st.sampled_from(["acknowledge", "retry"]),
                                st.sampled_from(["ops-a", "ops-b"])), max_size=8))
def test_resolutions_are_idempotent_per_item_and_action_whatever_the_sequence(
        calls: list[tuple[str, str, str]]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        db = Path(folder) / "ops.db"
        _doubtful_db(db, 2)
        store = Store(db, read_only=True)
        first: dict[tuple[str, str], str] = {}
        try:
            for at, (item, action, operator) in enumerate(calls):
                try:
                    done = resolve_in_file(db, store, item, action, operator, "why", at)
                except (UnknownAttentionItem, ActionNotApplicable):
                    assert item.endswith("nr9") or action == "retry"
                    continue
                assert done.repeated == ((item, action) in first)
                assert done.operator == first.setdefault((item, action), operator)
            journal = store_operator.journal(store)
            queue = {i.item_id for i in store_operator.attention(store)}
        finally:
            store.close()
    assert {(r.item_id, r.action.value) for r in journal} == set(first)
    assert len(journal) == len(first)
    assert queue == {"needs_reconciliation:nr1", "amount_mismatch:nr0"} - {
        item for item, _ in first}


# ---------------------------------------------------------------------- through the engine


class Picky:
    """A subscriber that refuses every event while ``refusing`` is set."""

    def __init__(self) -> None:
        self.refusing = threading.Event()
        self.refusing.set()
        self.got: list[str] = []

    def __call__(self, event: OutboxEvent) -> None:
        if self.refusing.is_set():
            raise RuntimeError("refusing")
        self.got.append(event.event_id)


def test_a_dead_letter_retried_by_an_operator_is_replayed_to_its_subscriber_and_leaves(
        tmp_path: Path, channel: ScriptedChannel) -> None:
    picky = Picky()
    config = EngineConfig(ask_timeout_s=5.0, duplicate_guard_window_ms=0,
                          notifications=NotificationConfig(subscriber_retry_ms=(5,)))
    engine = Engine.open(tmp_path / "dl.db", channels=[channel],  # type: ignore[list-item]
                         config=config, subscribers={"books": picky})
    try:
        fund_customer(engine)
        engine.submit(fuel_request("o1"))
        letters = wait_for(lambda: [i for i in engine.attention()
                                    if i.kind is AttentionKind.DEAD_LETTER], what="dead letter")
        item = letters[0]
        assert item.subscriber == "books" and item.item_id.startswith("dead_letter:books:")
        picky.refusing.clear()
        done = engine.resolve(item.item_id, "retry", operator="ops-anna", reason="books fixed")
        assert (done.outcome, done.repeated) == ("replay_requested", False)
        wait_for(lambda: item.event_id in picky.got, what="the replay")
        wait_for(lambda: item.item_id not in {i.item_id for i in engine.attention()},
                 what="the dead letter to leave the queue")
        assert engine.notifications.dead_letters("books") == [
            d for d in engine.notifications.dead_letters("books") if d.event_id != item.event_id]
        again = engine.resolve(item.item_id, "retry", operator="ops-ben", reason="again")
        assert (again.operator, again.reason, again.repeated) == ("ops-anna", "books fixed",
                                                                  True)
        assert [(r.item_id, r.outcome) for r in engine.operator_journal()
                if r.item_id == item.item_id] == [(item.item_id, "replay_requested")]
    finally:
        engine.shutdown()


def test_a_given_up_notification_retried_by_an_operator_is_posted_once_more(
        tmp_path: Path, channel: ScriptedChannel) -> None:
    answers = {"accept": False}
    posted: list[str] = []

    def transport(url: str, body: bytes, headers: Any, timeout_s: float) -> tuple[bool, str]:
        posted.append(headers["X-Payengine-Event-Id"])
        return (True, "200 SUCCESS") if answers["accept"] else (False, "503 busy")

    config = EngineConfig(ask_timeout_s=5.0, duplicate_guard_window_ms=0,
                          notifications=NotificationConfig(merchant_schedule_ms=(0,),
                                                           transport=transport))
    engine = Engine.open(tmp_path / "gu.db", channels=[channel],  # type: ignore[list-item]
                         config=config)
    try:
        fund_customer(engine)
        engine.notifications.register_merchant("station-1", "https://m.example/notify",
                                               "s" * 32)
        engine.submit(fuel_request("o1"))
        given_up = wait_for(lambda: [i for i in engine.attention()
                                     if i.kind is AttentionKind.NOTIFICATION_GIVEN_UP],
                            what="a given-up notification")
        item = given_up[0]
        answers["accept"] = True
        done = engine.resolve(item.item_id, "retry", operator="ops-ben", reason="merchant up")
        assert done.outcome == "requeued"
        assert engine.resolve(item.item_id, "retry", operator="ops-ben",
                              reason="twice").repeated is True
        assert item.event_id is not None
        wait_for(lambda: (n := engine.notifications.status(item.event_id)) is not None
                 and n.status == "delivered", what="delivered on the retry")
        assert posted.count(item.event_id) == 2
    finally:
        engine.shutdown()


def test_an_order_left_in_doubt_by_the_channel_comes_up_and_is_acknowledged_in_the_engine(
        tmp_path: Path, channel: ScriptedChannel) -> None:
    policy = OrderPolicy(pay_window_ms=60_000, query_schedule_ms=(10, 10),
                         refund_query_schedule_ms=(60_000,))
    engine = open_engine(tmp_path / "nr.db", channel, policy)
    try:
        fund_customer(engine)
        receipt = engine.submit(fuel_request("o1"))
        wait_for(lambda: engine.get_order(receipt.order_id).state == "needs_reconciliation",
                 what="queries exhausted")
        (item,) = engine.attention()
        assert (item.item_id, item.kind, item.order_id) == (
            f"needs_reconciliation:{receipt.order_id}", AttentionKind.NEEDS_RECONCILIATION,
            receipt.order_id)
        with pytest.raises(ActionNotApplicable):
            engine.resolve(item.item_id, "retry", operator="ops", reason="try")
        engine.resolve(item.item_id, "acknowledge", operator="ops", reason="in the statement")
        assert engine.attention() == []
        assert engine.get_order(receipt.order_id).state == "needs_reconciliation"
    finally:
        engine.shutdown()


def test_the_readme_operator_example_runs_as_written_and_prints_what_it_says(
        tmp_path: Path) -> None:
    import os
    import re
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    section = readme[readme.index("### Operator tools"):]
    block = re.findall(r"```python\n(.*?)```", section, re.S)[0]
    promised = [line[2:] for line in block.splitlines() if line.startswith("# ")]
    script = tmp_path / "example.py"
    script.write_text(block)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == promised


def test_an_owed_confirm_retried_by_an_operator_is_sent_again_at_once_and_leaves_the_queue(
        tmp_path: Path, channel: ScriptedChannel) -> None:
    from payengine.actors.messages import FromOrder
    from payengine.actors.voucher_link import DirectVoucherLink
    from payengine.engine.order import ConfirmHold
    from tests.helpers import paid_reply, signed_callback

    class SilentConfirms(DirectVoucherLink):
        """The voucher systems never get a Confirm while ``silent`` is set."""

        silent = threading.Event()

        def request(self, account_id: str, command: FromOrder) -> None:
            if isinstance(command.effect, ConfirmHold) and self.silent.is_set():
                return
            super().request(account_id, command)

    SilentConfirms.silent.set()
    policy = OrderPolicy(pay_window_ms=60_000, query_schedule_ms=(60_000,),
                         voucher_retry_schedule_ms=(20, 20),
                         voucher_sentinel_interval_ms=3_600_000)  # only the operator re-sends
    engine = Engine.open(tmp_path / "owed.db", channels=[channel],  # type: ignore[list-item]
                         policy=policy, config=EngineConfig(duplicate_guard_window_ms=0),
                         voucher_link=lambda directory: SilentConfirms(directory))
    try:
        fund_customer(engine)
        receipt = engine.submit(fuel_request("o1"))
        wait_for(lambda: engine.get_order(receipt.order_id).state == "paying", what="held")
        signed_callback(engine, "wechat", receipt.payment_serial,
                        paid_reply(receipt.payment_serial))
        owed = wait_for(lambda: len(items := [i for i in engine.attention() if i.kind
                                              is AttentionKind.OWED_FOLLOW_UP]) == 3 and items,
                        what="three confirms unanswered on their schedule")
        assert sorted(i.item_id for i in owed) == [
            f"owed_follow_up:{receipt.order_id}:{leg}:confirm" for leg in (1, 2, 3)]
        SilentConfirms.silent.clear()
        done = engine.resolve(owed[0].item_id, "retry", operator="ops", reason="points back up")
        assert (done.outcome, done.repeated) == ("resent", False)
        wait_for(lambda: engine.get_order(receipt.order_id).settled, what="confirmed")
        assert [leg.status for leg in engine.get_order(receipt.order_id).legs] == [
            "paid", "confirmed", "confirmed", "confirmed"]
        assert engine.attention() == []
        assert engine.resolve(owed[0].item_id, "retry", operator="ops",
                              reason="again").repeated is True
    finally:
        engine.shutdown()



def test_a_follow_up_its_voucher_system_refused_is_in_the_queue_until_acknowledged(
        fresh_db: Path) -> None:
    _insert(fresh_db, [
        {"order_id": "p", "merchant_id": "m1", "user_id": "u1", "station_id": None,
         "channel": "wechat", "at": 1, "total": 100, "state": "succeeded"},
        {"order_id": "q", "merchant_id": "m1", "user_id": "u1", "station_id": None,
         "channel": "wechat", "at": 2, "total": 100, "state": "failed"}])
    conn = sqlite3.connect(fresh_db)
    with conn:
        conn.execute("INSERT INTO legs (order_id, leg_no, mode, account_id, amount, unit,"
                     " status) VALUES ('p', 2, 'pre_deduct', 'carrier-x:138', 50, 'CNY',"
                     " 'confirm_failed')")
        conn.execute("INSERT INTO legs (order_id, leg_no, mode, account_id, amount, unit,"
                     " status) VALUES ('q', 2, 'pre_deduct', 'rp-1', 30, 'CNY',"
                     " 'release_failed')")
        conn.execute("INSERT INTO legs (order_id, leg_no, mode, account_id, amount, unit,"
                     " status) VALUES ('q', 3, 'pre_deduct', 'rp-2', 30, 'CNY', 'cancelled')")
    conn.close()
    store = Store(fresh_db, read_only=True)
    try:
        items = store_operator.attention(store)
        assert [(i.item_id, i.kind, i.order_id) for i in items] == [
            ("follow_up_refused:p:2", AttentionKind.FOLLOW_UP_REFUSED, "p"),
            ("follow_up_refused:q:2", AttentionKind.FOLLOW_UP_REFUSED, "q")]
        assert items[0].why.startswith("Confirm of 50 on carrier-x:138 refused")
        with pytest.raises(ActionNotApplicable):
            resolve_in_file(fresh_db, store, "follow_up_refused:p:2", "retry", "ops", "x", 5)
        done = resolve_in_file(fresh_db, store, "follow_up_refused:p:2", "acknowledge",
                               "ops-anna", "carrier credited by hand", 10)
        assert done.outcome == "acknowledged"
        assert [i.item_id for i in store_operator.attention(store)] == ["follow_up_refused:q:2"]
    finally:
        store.close()
