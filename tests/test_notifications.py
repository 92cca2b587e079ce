"""Delivery of outbox events: in-process subscribers, and signed POSTs to a merchant's URL.

The merchant is a real ``http.server.ThreadingHTTPServer`` on loopback.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from payengine import CashPart, Engine, EngineConfig, InvalidRequest, PaymentRequest
from payengine.actors.notifier import (
    EVENT_ID_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    NotificationConfig,
    OutboxEvent,
    Subscriber,
    verify_signature,
)
from payengine.persistence import outbox as outbox_store
from payengine.sim.runtime import Scheduler, SimRuntime
from tests.helpers import SLOW_POLICY, ScriptedChannel, paid_reply, signed_callback, wait_for

SECRET = "s3cret-key-of-station-1"
CONSUMERS = ("settlement", "terminal-push", "invoice", "membership", "marketing")


def cash_request(no: str, merchant_id: str = "station-1") -> PaymentRequest:
    return PaymentRequest(merchant_id=merchant_id, merchant_order_no=no, user_id="alice",
                          currency="CNY", total_minor=500, title="Fuel",
                          cash=CashPart(500, "wechat"))


def open_with(path: Path, channel: ScriptedChannel, *, subscribers: dict[str, Subscriber] | None = None,
              **notify: Any) -> Engine:
    config = EngineConfig(ask_timeout_s=5.0, duplicate_guard_window_ms=0,
                          notifications=NotificationConfig(**notify))
    return Engine.open(path, channels=[channel], policy=SLOW_POLICY,  # type: ignore[list-item]
                       config=config, subscribers=subscribers)


def pay(engine: Engine, no: str, merchant_id: str = "station-1") -> str:
    receipt = engine.submit(cash_request(no, merchant_id))
    wait_for(lambda: engine.get_order(receipt.order_id).state == "paying", what="paying")
    signed_callback(engine, "wechat", receipt.payment_serial, paid_reply(receipt.payment_serial))
    wait_for(lambda: engine.get_order(receipt.order_id).settled, what="settled")
    return receipt.order_id


def close(engine: Engine, no: str) -> str:
    receipt = engine.submit(cash_request(no))
    wait_for(lambda: engine.get_order(receipt.order_id).state == "paying", what="paying")
    engine.close(receipt.order_id)
    wait_for(lambda: engine.get_order(receipt.order_id).settled, what="settled")
    return receipt.order_id


class Recorder:
    """A subscriber that records what it got; thread-safe. ``fail(event)`` decides refusals."""

    def __init__(self, fail: Any = None) -> None:
        self.got: list[OutboxEvent] = []
        self.calls: Counter[str] = Counter()
        self.fail = fail
        self._lock = threading.Lock()

    def __call__(self, event: OutboxEvent) -> None:
        with self._lock:
            self.calls[event.event_id] += 1
            calls = self.calls[event.event_id]
        if self.fail is not None and self.fail(event, calls):
            raise RuntimeError(f"refusing {event.event_id} (call {calls})")
        with self._lock:
            self.got.append(event)

    def ids(self) -> set[str]:
        with self._lock:
            return {e.event_id for e in self.got}


def all_ids(engine: Engine) -> set[str]:
    return {e.event_id for e in engine.notifications.events()}



# ---------------------------------------------------------------------- in-process subscribers


def test_every_subscriber_gets_every_event_in_outbox_order(
    tmp_path: Path, channel: ScriptedChannel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A subscriber's cursor is saved after it took the batch, so "got every event" does not
    yet mean "cursor saved": wait for the cursors themselves. The save is slowed down here so
    that reading the cursors too early fails every time, not one run in fifty."""
    save_cursor = outbox_store.save_cursor

    def slow_save_cursor(*args: Any, **kwargs: Any) -> None:
        time.sleep(0.05)
        save_cursor(*args, **kwargs)

    monkeypatch.setattr(outbox_store, "save_cursor", slow_save_cursor)
    recorders = {name: Recorder() for name in CONSUMERS}
    engine = open_with(tmp_path / "subs.db", channel, subscribers=dict(recorders))
    try:
        pay(engine, "o1")
        close(engine, "o2")
        expected = all_ids(engine)
        assert len(expected) >= 6
        for name, recorder in recorders.items():
            wait_for(lambda r=recorder: r.ids() == expected, what=f"{name} got every event")
            seqs = [e.seq for e in recorder.got]
            assert seqs == sorted(seqs), f"{name} got events out of order"
        last = max(e.seq for e in engine.notifications.events())

        def every_cursor_saved_at_last() -> bool:
            cursors = engine.notifications.cursors()
            return all(name in cursors and cursors[name].seq == last for name in CONSUMERS)

        wait_for(every_cursor_saved_at_last, what="every subscriber's cursor saved")
        cursors = engine.notifications.cursors()
        assert {name: (cursors[name].seq, cursors[name].attempts) for name in CONSUMERS} == {
            name: (last, 0) for name in CONSUMERS}
    finally:
        engine.shutdown()


def test_a_subscriber_that_raises_gets_the_same_event_again_later(
    tmp_path: Path, channel: ScriptedChannel
) -> None:
    flaky = Recorder(fail=lambda event, calls: calls == 1)  # refuses every event once
    steady = Recorder()
    engine = open_with(tmp_path / "flaky.db", channel, subscribers={"flaky": flaky, "steady": steady},
                       subscriber_retry_ms=(20, 20, 20))
    try:
        pay(engine, "o1")
        expected = all_ids(engine)
        wait_for(lambda: flaky.ids() == expected, what="every event taken after a retry")
        wait_for(lambda: steady.ids() == expected, what="the other subscriber unaffected")
        assert all(flaky.calls[i] >= 2 for i in expected)
        assert [e.seq for e in flaky.got] == sorted(e.seq for e in flaky.got)
        assert engine.notifications.dead_letters() == []
    finally:
        engine.shutdown()


def test_an_event_refused_on_every_retry_is_set_aside_and_delivery_goes_on(
    tmp_path: Path, channel: ScriptedChannel
) -> None:
    picky = Recorder(fail=lambda event, calls: event.to_state == "paying")
    engine = open_with(tmp_path / "picky.db", channel, subscribers={"picky": picky},
                       subscriber_retry_ms=(10, 10))
    try:
        pay(engine, "o1")
        expected = all_ids(engine)
        refused = next(e for e in engine.notifications.events() if e.to_state == "paying")
        wait_for(lambda: picky.ids() == expected - {refused.event_id}, what="the rest delivered")
        letters = engine.notifications.dead_letters("picky")
        assert [(d.event_id, d.attempts) for d in letters] == [(refused.event_id, 3)]
        assert "refusing" in letters[0].error
        assert picky.calls[refused.event_id] == 3  # one try and the two retries, then no more
    finally:
        engine.shutdown()


def test_caught_up_says_whether_every_subscriber_and_merchant_has_everything(
    tmp_path: Path, channel: ScriptedChannel, merchant: Merchant
) -> None:
    refusing = threading.Event()
    refusing.set()
    subscriber = Recorder(fail=lambda event, calls: refusing.is_set())
    merchant.default = (503, b"busy")
    engine = open_with(tmp_path / "caught.db", channel, subscribers={"books": subscriber},
                       subscriber_retry_ms=(10,) * 30, merchant_schedule_ms=(0,) + (100,) * 31)
    try:
        assert engine.notifications.caught_up()  # nothing committed yet
        engine.notifications.register_merchant("station-1", merchant.url, SECRET)
        pay(engine, "o1")
        time.sleep(0.1)
        assert not engine.notifications.caught_up()  # the subscriber refuses, the POSTs fail
        refusing.clear()
        wait_for(lambda: subscriber.ids() == all_ids(engine), what="the subscriber has all")
        assert not engine.notifications.caught_up()  # the merchant still answers 503
        merchant.default = (200, b"SUCCESS")
        wait_for(engine.notifications.caught_up, what="caught up")
        assert engine.notifications.counts()["pending"] == 0
        assert engine.notifications.counts()["delivered"] == len(all_ids(engine))
    finally:
        engine.shutdown()


def test_events_committed_before_a_crash_and_not_delivered_are_delivered_after_reopen(
    tmp_path: Path, channel: ScriptedChannel
) -> None:
    path = tmp_path / "crash.db"
    down = Recorder(fail=lambda event, calls: True)  # the consumer is down: nothing taken
    engine = open_with(path, channel, subscribers={"settlement": down},
                       subscriber_retry_ms=(60_000,))
    order_id = pay(engine, "o1")
    wait_for(lambda: down.calls, what="a first (failed) delivery")
    before = all_ids(engine)
    engine.abandon()  # a crash: no shutdown

    up = Recorder()
    engine = open_with(path, channel, subscribers={"settlement": up})
    try:
        wait_for(lambda: up.ids() >= before, what="the events from before the crash")
        assert {e.order_id for e in up.got} == {order_id}
        later = pay(engine, "o2")
        wait_for(lambda: up.ids() == all_ids(engine), what="the events after the reopen")
        assert later in {e.order_id for e in up.got}
    finally:
        engine.shutdown()


def test_a_new_subscriber_starts_at_the_end_of_the_outbox(
    tmp_path: Path, channel: ScriptedChannel
) -> None:
    path = tmp_path / "late.db"
    engine = open_with(path, channel)
    pay(engine, "o1")
    engine.shutdown()
    late = Recorder()
    engine = open_with(path, channel, subscribers={"marketing": late})
    try:
        order_id = pay(engine, "o2")
        wait_for(lambda: late.got and late.got[-1].to_state == "succeeded", what="delivery")
        assert {e.order_id for e in late.got} == {order_id}
    finally:
        engine.shutdown()


def test_subscribers_are_retried_in_virtual_time_on_the_deterministic_runtime(
    tmp_path: Path, channel: ScriptedChannel
) -> None:
    scheduler = Scheduler(seed=5)
    flaky = Recorder(fail=lambda event, calls: calls < 3)
    config = EngineConfig(duplicate_guard_window_ms=0,
                          notifications=NotificationConfig(subscriber_retry_ms=(5_000, 5_000)))
    engine = Engine.open(tmp_path / "sim.db", channels=[channel],  # type: ignore[list-item]
                         policy=SLOW_POLICY, config=config, runtime=SimRuntime(scheduler),
                         subscribers={"invoice": flaky})
    try:
        receipt = engine.submit(cash_request("o1"))
        start = scheduler.now_ms
        scheduler.run_until_idle()  # the pay window passes: the order is closed
        assert engine.get_order(receipt.order_id).state == "closed"
        assert flaky.ids() == all_ids(engine)
        assert scheduler.now_ms - start >= 60_000
        assert all(flaky.calls[i] == 3 for i in flaky.ids())
    finally:
        engine.shutdown()


# ---------------------------------------------------------------------- merchant notifications


class Merchant:
    """A merchant's notification endpoint on loopback. ``answers`` are used in turn, then
    ``default`` forever. Records every request."""

    def __init__(self) -> None:
        self.answers: list[tuple[int, bytes]] = []
        self.default: tuple[int, bytes] = (200, b"SUCCESS")
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.lock = threading.Lock()
        merchant = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with merchant.lock:
                    merchant.requests.append((dict(self.headers.items()), body))
                    status, answer = (merchant.answers.pop(0) if merchant.answers
                                      else merchant.default)
                self.send_response(status)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/payengine/notify"

    def received(self) -> list[tuple[dict[str, str], bytes]]:
        with self.lock:
            return list(self.requests)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def merchant() -> Iterator[Merchant]:
    m = Merchant()
    yield m
    m.close()


def succeeded_event(engine: Engine, order_id: str) -> OutboxEvent:
    return next(e for e in engine.notifications.events(order_id) if e.to_state == "succeeded")


def test_a_signed_notification_is_retried_until_the_merchant_answers_success(
    tmp_path: Path, channel: ScriptedChannel, merchant: Merchant
) -> None:
    merchant.answers = [(500, b"oops"), (200, b"FAIL"), (302, b"")]
    engine = open_with(tmp_path / "notify.db", channel, merchant_schedule_ms=(0, 30, 30, 30, 30))
    try:
        before = pay(engine, "o0")  # before the registration: not notified
        endpoint = engine.notifications.register_merchant("station-1", merchant.url, SECRET,
                                                          states=["succeeded"])
        assert endpoint.callback_url == merchant.url and endpoint.states == ("succeeded",)
        order_id = pay(engine, "o1")
        event = succeeded_event(engine, order_id)
        status = wait_for(lambda: (s := engine.notifications.status(event.event_id)) is not None
                          and s.status == "delivered" and s, what="delivered")
        assert status.attempts == 4 and status.delivered_at_ms is not None
        assert status.last_error is None

        requests = merchant.received()
        assert len(requests) == 4  # 500, FAIL, a redirect, then SUCCESS
        for attempt, (headers, body) in enumerate(requests, start=1):
            assert verify_signature(SECRET, body, headers[SIGNATURE_HEADER])
            assert not verify_signature("another-secret-0000", body, headers[SIGNATURE_HEADER])
            assert not verify_signature(SECRET, body + b" ", headers[SIGNATURE_HEADER])
            payload = json.loads(body)
            assert headers[EVENT_ID_HEADER] == payload["event_id"] == event.event_id
            assert int(headers[TIMESTAMP_HEADER]) == payload["notified_at_ms"]
            assert payload["attempt"] == attempt
            assert (payload["order_id"], payload["merchant_order_no"], payload["from_state"],
                    payload["to_state"], payload["total_minor"], payload["currency"]) == (
                order_id, "o1", "paying", "succeeded", 500, "CNY")
        # only the agreed states, only from the registration on
        assert [n.event_id for n in engine.notifications.notifications_of(order_id)] == [
            event.event_id]
        assert engine.notifications.notifications_of(before) == []
        assert engine.notifications.counts() == {"pending": 0, "delivered": 1, "given_up": 0}
    finally:
        engine.shutdown()


def test_notifications_stop_after_the_bounded_schedule_and_are_given_up(
    tmp_path: Path, channel: ScriptedChannel, merchant: Merchant
) -> None:
    merchant.default = (503, b"busy")
    engine = open_with(tmp_path / "giveup.db", channel, merchant_schedule_ms=(0, 20, 20))
    try:
        engine.notifications.register_merchant("station-1", merchant.url, SECRET)
        order_id = pay(engine, "o1")
        events = engine.notifications.events(order_id)
        wait_for(lambda: engine.notifications.counts()["given_up"] == len(events),
                 what="every notification given up")
        time.sleep(0.2)  # nothing more is sent
        per_event = Counter(h[EVENT_ID_HEADER] for h, _ in merchant.received())
        assert per_event == {e.event_id: 3 for e in events}
        status = engine.notifications.status(events[-1].event_id)
        assert status is not None and status.status == "given_up" and status.attempts == 3
        assert status.next_at_ms is None and status.last_error == "HTTP 503"
    finally:
        engine.shutdown()


@pytest.mark.parametrize("stop", ["shutdown", "abandon"])
def test_a_pending_notification_survives_a_restart_and_is_delivered_after_reopen(
    tmp_path: Path, channel: ScriptedChannel, merchant: Merchant, stop: str
) -> None:
    path = tmp_path / "restart.db"
    schedule = dict(merchant_schedule_ms=(0, 200, 200, 200, 200, 200))
    merchant.default = (500, b"down")
    engine = open_with(path, channel, **schedule)
    engine.notifications.register_merchant("station-1", merchant.url, SECRET,
                                           states=["succeeded"])
    event = succeeded_event(engine, pay(engine, "o1"))
    wait_for(lambda: (s := engine.notifications.status(event.event_id)) is not None
             and s.attempts >= 1, what="a failed first attempt")
    getattr(engine, stop)()

    with merchant.lock:
        merchant.default = (200, b"SUCCESS")
    engine = open_with(path, channel, **schedule)
    try:
        status = wait_for(lambda: (s := engine.notifications.status(event.event_id)) is not None
                          and s.status == "delivered" and s, what="delivered after reopen")
        assert status.attempts >= 2
        last_headers, _ = merchant.received()[-1]
        assert last_headers[EVENT_ID_HEADER] == event.event_id
        endpoint = engine.notifications.merchant("station-1")
        assert endpoint is not None and endpoint.callback_url == merchant.url
    finally:
        engine.shutdown()


def test_unregistering_a_merchant_gives_up_its_pending_notifications(
    tmp_path: Path, channel: ScriptedChannel, merchant: Merchant
) -> None:
    merchant.default = (500, b"down")
    engine = open_with(tmp_path / "unreg.db", channel, merchant_schedule_ms=(0, 60_000))
    try:
        engine.notifications.register_merchant("station-1", merchant.url, SECRET)
        order_id = pay(engine, "o1")
        count = len(engine.notifications.events(order_id))
        wait_for(lambda: all(n.attempts == 1 for n in engine.notifications.notifications_of(order_id))
                 and len(engine.notifications.notifications_of(order_id)) == count,
                 what="every notification tried once")
        assert engine.notifications.unregister_merchant("station-1") == count
        assert engine.notifications.counts() == {"pending": 0, "delivered": 0, "given_up": count}
        assert engine.notifications.merchant("station-1") is None
        with pytest.raises(InvalidRequest):
            engine.notifications.unregister_merchant("station-1")
    finally:
        engine.shutdown()


def test_bad_registrations_and_configurations_are_refused_with_typed_errors(
    tmp_path: Path, channel: ScriptedChannel
) -> None:
    engine = open_with(tmp_path / "bad.db", channel)
    try:
        register = engine.notifications.register_merchant
        for url in ("ftp://example.com/notify", "example.com/notify", "http:///notify",
                    "http://exa mple.com/", "http://example.com:99999/", "", 42):
            with pytest.raises(InvalidRequest):
                register("station-1", url, SECRET)  # type: ignore[arg-type]
        for secret in ("", "short", None, "x" * 257):
            with pytest.raises(InvalidRequest):
                register("station-1", "https://example.com/notify", secret)  # type: ignore[arg-type]
        for states in (["paid"], [], "succeeded"):
            with pytest.raises(InvalidRequest):
                register("station-1", "https://example.com/notify", SECRET, states=states)
        with pytest.raises(InvalidRequest):
            register("", "https://example.com/notify", SECRET)
        assert engine.notifications.merchant("station-1") is None
    finally:
        engine.shutdown()

    for bad in (dict(merchant_schedule_ms=()), dict(merchant_schedule_ms=(0, -1)),
                dict(merchant_schedule_ms=[0, 10]), dict(batch_max=0),
                dict(http_timeout_s=0), dict(subscriber_retry_ms=(1.5,))):
        with pytest.raises(InvalidRequest):
            NotificationConfig(**bad)  # type: ignore[arg-type]

    with pytest.raises(InvalidRequest):
        open_with(tmp_path / "bad.db", channel, subscribers={"~merchants": Recorder()})
    open_with(tmp_path / "bad.db", channel).shutdown()  # the refused open left it unlocked
