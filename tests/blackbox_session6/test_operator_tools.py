"""Operator tools from Python and from the command line (README *Operator tools*, *Command
line*): search orders, the attention queue, resolutions journalled with who and why; the
CLI reads the database beside the running engine that has it open."""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .support import payment_notification, run_cli, sign_notification, wait_for

SLOW_KEY = "bb-slow-key-00000002"
BOOKS_UP = [False]


def books(event: Any) -> None:
    """The bookkeeping consumer of the README's example, down until told otherwise."""
    if not BOOKS_UP[0]:
        raise ConnectionError("books service down")


@pytest.fixture(scope="module")
def station() -> Iterator[dict[str, Any]]:
    from payengine import CashPart, Engine, EngineConfig, FuelLine, FuelSale, PaymentRequest, ThreadRuntime
    from payengine.actors.notifier import NotificationConfig
    from payengine.sim.channel import ChannelFaults, SimulatedChannel
    world = ThreadRuntime()
    wechat = SimulatedChannel("wechat", world, seed=1, faults=ChannelFaults.none())
    slow = SimulatedChannel("slow", world, seed=2, signing_key=SLOW_KEY.encode(),
                            faults=dataclasses.replace(ChannelFaults.none(), user_never_pays=1.0))
    folder = Path(tempfile.mkdtemp())
    config = EngineConfig(notifications=NotificationConfig(subscriber_retry_ms=(10, 10)))
    engine = Engine.open(folder / "ops.db", channels=[wechat, slow], config=config,
                         subscribers={"books": books})
    wechat.attach(engine)
    slow.attach(engine)

    def fuel(no: str, user: str, channel: str, amount: int, station_id: str | None = None) -> Any:
        sale = None if station_id is None else FuelSale(
            station_id, pump=1, nozzle=1, line=FuelLine.by_amount("95", 800, amount))
        return engine.submit(PaymentRequest("station-1", no, user, "CNY", amount, "Fuel",
                                            CashPart(amount, channel), sale=sale))

    # other amounts: the duplicate guard refuses a user's second order of the same amount
    receipts = [fuel("A-1", "alice", "wechat", 80_00), fuel("A-2", "alice", "wechat", 80_01, "st-op"),
                fuel("A-3", "alice", "wechat", 80_02), fuel("B-1", "bob", "slow", 80_00)]
    for receipt in receipts[:3]:
        wait_for(lambda r=receipt: engine.get_order(r.order_id).settled)
    waiting = receipts[3]
    wait_for(lambda: engine.get_order(waiting.order_id).state == "paying")
    body, headers = sign_notification(SLOW_KEY, payment_notification(waiting.payment_serial, 1, "TX-odd"))
    engine.handle_notification("slow", body, headers)
    wait_for(lambda: engine.get_order(waiting.order_id).state == "needs_reconciliation")
    wait_for(lambda: any(i.kind == "dead_letter" for i in engine.attention()))
    yield {"engine": engine, "receipts": receipts, "db": folder / "ops.db", "folder": folder}
    engine.shutdown()
    world.shutdown()


# ---------------------------------------------------------------- Python

def test_find_orders_filters_by_user_state_channel_and_station(station: dict[str, Any]) -> None:
    engine, receipts = station["engine"], station["receipts"]
    alice = engine.find_orders(user_id="alice")
    assert [o.merchant_order_no for o in alice.orders] == ["A-1", "A-2", "A-3"]
    assert alice.next_after is None
    assert [o.order_id for o in engine.find_orders(channel="slow").orders] == [receipts[3].order_id]
    assert [o.merchant_order_no for o in engine.find_orders(station_id="st-op").orders] == ["A-2"]
    assert [o.merchant_order_no for o in engine.find_orders(state="needs_reconciliation").orders] == ["B-1"]
    summary = alice.orders[1]
    assert (summary.station_id, summary.channel, summary.state, summary.settled) == (
        "st-op", "wechat", "succeeded", True)


def test_find_orders_pages_with_the_cursor_and_the_time_range_excludes_its_end(
        station: dict[str, Any]) -> None:
    engine = station["engine"]
    first = engine.find_orders(user_id="alice", limit=2)
    assert [o.merchant_order_no for o in first.orders] == ["A-1", "A-2"]
    created, order_id = first.next_after.split(":", 1)
    assert (int(created), order_id) == (first.orders[1].created_at_ms, first.orders[1].order_id)
    rest = engine.find_orders(user_id="alice", limit=2, after=first.next_after)
    assert ([o.merchant_order_no for o in rest.orders], rest.next_after) == (["A-3"], None)
    a1 = first.orders[0]
    assert list(engine.find_orders(user_id="alice", until_ms=a1.created_at_ms).orders) == []
    assert engine.find_orders(user_id="alice", since_ms=a1.created_at_ms,
                              until_ms=a1.created_at_ms + 1).orders[0].order_id == a1.order_id


@pytest.mark.parametrize("bad", [{"limit": 0}, {"limit": 501}, {"state": "flying"},
                                 {"after": "not-a-cursor"}, {"user_id": ""}])
def test_a_bad_filter_is_invalid_request(station: dict[str, Any], bad: dict[str, Any]) -> None:
    from payengine import InvalidRequest
    with pytest.raises(InvalidRequest):
        station["engine"].find_orders(**bad)


def test_the_attention_queue_lists_the_dead_letter_and_the_amount_mismatch(
        station: dict[str, Any]) -> None:
    engine, waiting = station["engine"], station["receipts"][3]
    listed = {item.item_id: item for item in engine.attention()}
    assert f"amount_mismatch:{waiting.order_id}" in listed
    dead = listed["dead_letter:books:1"]
    assert (dead.kind, dead.subscriber) == ("dead_letter", "books")
    kinds = [item.kind for item in engine.attention()]
    assert kinds == sorted(kinds, key=kinds.index)       # grouped by kind


def test_resolve_refusals_change_nothing(station: dict[str, Any]) -> None:
    from payengine import ActionNotApplicable, InvalidRequest, UnknownAttentionItem
    engine, waiting = station["engine"], station["receipts"][3]
    item = f"amount_mismatch:{waiting.order_id}"
    with pytest.raises(ActionNotApplicable) as not_applicable:
        engine.resolve(item, "retry", operator="ops-anna", reason="try")
    assert not_applicable.value.code == "action_not_applicable"
    with pytest.raises(UnknownAttentionItem) as unknown:
        engine.resolve("dead_letter:nobody:9", "acknowledge", operator="ops-anna", reason="r")
    assert unknown.value.code == "unknown_attention_item"
    with pytest.raises(InvalidRequest):
        engine.resolve(item, "acknowledge", operator="ops-anna", reason="x" * 501)
    assert item in {i.item_id for i in engine.attention()}
    assert list(engine.operator_journal()) == []


# ---------------------------------------------------------------- command line, beside the engine

def cli(station: dict[str, Any], *args: str) -> Any:
    return run_cli([*args, "--db", str(station["db"])], cwd=station["folder"])


def test_payengine_orders_json_is_one_page_of_find_orders(station: dict[str, Any]) -> None:
    result = cli(station, "orders", "--user", "alice", "--json")
    assert result.returncode == 0, result.stderr
    page = json.loads(result.stdout)
    assert [o["merchant_order_no"] for o in page["orders"]] == ["A-1", "A-2", "A-3"]
    assert page["next_after"] is None
    assert set(page["orders"][0]) == {"order_id", "merchant_id", "merchant_order_no", "user_id",
                                      "state", "cause", "total_minor", "currency", "created_at_ms",
                                      "settled", "station_id", "channel"}


def test_payengine_orders_text_pages_and_names_the_next_cursor(station: dict[str, Any]) -> None:
    result = cli(station, "orders", "--user", "alice", "--limit", "2", "--since",
                 "2000-01-01T00:00:00Z")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len([line for line in lines if line.startswith("ord_")]) == 2
    assert "next page: --after " in lines[-1]
    assert lines[-1].startswith("2 orders")


def test_payengine_orders_with_a_bad_state_or_limit_is_a_usage_error_2(station: dict[str, Any]) -> None:
    assert cli(station, "orders", "--state", "flying").returncode == 2
    assert cli(station, "orders", "--limit", "0").returncode == 2


def test_payengine_attention_exits_1_when_the_queue_is_not_empty_and_its_json_has_items_and_counts(
        station: dict[str, Any]) -> None:
    result = cli(station, "attention", "--json")
    assert result.returncode == 1, result.stderr
    queue = json.loads(result.stdout)
    ids = {item["item_id"] for item in queue["items"]}
    assert "dead_letter:books:1" in ids
    assert queue["counts"]["dead_letter"] >= 1
    assert queue["counts"]["amount_mismatch"] == 1
    text = cli(station, "attention")
    assert text.returncode == 1
    assert any(line.startswith("dead_letter:books:1 ") for line in text.stdout.splitlines())


def test_payengine_resolve_journals_the_resolution_and_a_repeat_does_nothing_again(
        station: dict[str, Any]) -> None:
    engine, waiting = station["engine"], station["receipts"][3]
    item = f"amount_mismatch:{waiting.order_id}"
    done = cli(station, "resolve", item, "acknowledge", "--operator", "ops-anna",
               "--reason", "called the wallet", "--json")
    assert done.returncode == 0, done.stderr
    resolution = json.loads(done.stdout)
    assert {k: resolution[k] for k in ("item_id", "kind", "action", "operator", "reason",
                                       "outcome", "repeated")} == {
        "item_id": item, "kind": "amount_mismatch", "action": "acknowledge",
        "operator": "ops-anna", "reason": "called the wallet", "outcome": "acknowledged",
        "repeated": False}
    again = cli(station, "resolve", item, "acknowledge", "--operator", "ops-anna", "--reason", "again")
    assert again.returncode == 0
    assert again.stdout.startswith(f"{item}: acknowledged by ops-anna at ")
    assert "(resolved so before: nothing done again)" in again.stdout
    journal = engine.operator_journal()
    assert [(r.item_id, r.operator, r.reason) for r in journal] == [(item, "ops-anna", "called the wallet")]
    assert item not in {i.item_id for i in engine.attention()}


def test_payengine_resolve_refusals_exit_1_with_the_code_and_usage_errors_exit_2(
        station: dict[str, Any]) -> None:
    unknown = cli(station, "resolve", "dead_letter:nobody:9", "acknowledge", "--operator", "ops",
                  "--reason", "r")
    assert unknown.returncode == 1
    assert unknown.stderr.startswith("payengine resolve: unknown_attention_item: ")
    no_reason = cli(station, "resolve", "dead_letter:books:1", "acknowledge", "--operator", "ops")
    assert no_reason.returncode == 2
    too_long = cli(station, "resolve", "dead_letter:books:1", "acknowledge", "--operator", "ops",
                   "--reason", "x" * 501)
    assert too_long.returncode == 2
    assert "dead_letter:books:1" in {i.item_id for i in station["engine"].attention()}


def test_a_dead_letter_retried_from_the_cli_is_replayed_by_the_running_engine(
        station: dict[str, Any]) -> None:
    engine = station["engine"]
    BOOKS_UP[0] = True
    done = cli(station, "resolve", "dead_letter:books:1", "retry", "--operator", "ops-anna",
               "--reason", "books is back", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["outcome"] == "replay_requested"
    from payengine import CashPart, PaymentRequest
    engine.submit(PaymentRequest("station-1", "C-1", "carol", "CNY", 1_00, "Fuel",
                                 CashPart(1_00, "wechat")))           # "after its next commit"
    assert wait_for(lambda: "dead_letter:books:1" not in {i.item_id for i in engine.attention()})
