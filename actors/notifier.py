"""Delivery of outbox events: to in-process subscribers and to merchants' callback URLs.

Every order state change, refund status change and hold expiry is an event in the outbox
(``persistence.outbox``), committed with the change. ``Engine.open`` builds one
``Notifications`` and calls ``start`` (which resumes everything undelivered, also after a
crash); the order actor calls ``kick`` after each commit that wrote transitions, the
account actor after a hold expired; ``Engine.shutdown`` and ``abandon`` call ``stop``.

Consumers, each driven by a ``_Pump`` (one delivery round at a time, on its own I/O lane):

- one per in-process subscriber (lane ``subscriber:NAME``): reads the events after its
  cursor in outbox order, calls the subscriber with each, then moves its cursor;
- the merchant pump (lane ``outbox``): turns new events of registered merchants into
  notification rows (``dispatch``), then starts the POST of each due notification, each
  on the ``notify`` lane; the POST's outcome is recorded (delivered, next attempt, given up).

Threads: nothing here owns a thread, sleeps or reads the clock. Rounds and POSTs run in
``runtime.run_io`` (I/O pool threads with ``ThreadRuntime``; the scheduler's thread, in
virtual time, with the simulator), timers through ``runtime.call_at``. Shared state (each
pump's flags, the set of POSTs in flight) is under a lock that is never held while waiting.

Guarantees (all survive restarts: positions and attempts are in SQLite):

- Subscribers: every event at least once, in outbox (commit) order, one at a time per
  subscriber; the next event only after the subscriber returned for the previous one.
  A subscriber that raises gets the same event again after ``subscriber_retry_ms[k]``;
  after the last retry the event is set aside as a dead letter (``dead_letters``, logged
  as an error) and delivery goes on. Deduplicate on ``OutboxEvent.event_id``.
- Merchants: each event of a registered merchant (in its ``states``) is POSTed, signed, until
  it is answered 2xx with the body ``SUCCESS``, at most ``len(merchant_schedule_ms)`` times
  with the gaps of that schedule; then it is ``given_up`` (logged as an error). At least
  once (a crash between the answer and its record sends it again); no order between
  notifications: the body carries ``order_version`` and ``at_ms`` to order them.
"""

from __future__ import annotations

import hmac
import http.client
import json
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from payengine.actors.runtime import Runtime, TimerHandle
from payengine.engine.checks import (
    check_id,
    check_ids,
    check_optional_id,
    check_text,
    shown,
)
from payengine.engine.errors import EngineClosed, InvalidRequest, Overloaded
from payengine.persistence import operator as store_operator
from payengine.persistence import outbox
from payengine.persistence.outbox import (
    MERCHANTS,
    Cursor,
    DeadLetter,
    DueNotification,
    MerchantEndpoint,
    Notification,
    NotificationStatus,
    OutboxEvent,
)

if TYPE_CHECKING:
    from payengine.actors.base import Context

Subscriber = Callable[[OutboxEvent], None]
"""An in-process consumer (settlement, terminal push, invoice, membership, marketing).

Called on an I/O lane thread of its own (never an actor's), one event at a time; it may
block briefly. Returning means "done"; raising means "try again later". It must tolerate an
event twice (deduplicate on ``event_id``).
"""

SIGNATURE_HEADER = "X-Payengine-Signature"
"""Hex HMAC-SHA256 of the exact request body, keyed with the merchant's secret."""
EVENT_ID_HEADER = "X-Payengine-Event-Id"
TIMESTAMP_HEADER = "X-Payengine-Timestamp"
"""Milliseconds since the epoch when this attempt was sent (also ``notified_at_ms`` in the
signed body)."""
SUCCESS_BODY = b"SUCCESS"
"""What the merchant answers (with a 2xx status) once it has taken the notification."""

NOTIFY_LANE = "notify"
OUTBOX_LANE = "outbox"

WECHAT_LIKE_NOTIFY_SCHEDULE_MS: tuple[int, ...] = (
    0, 15_000, 15_000, 30_000, 180_000, 600_000, 1_200_000, 1_800_000, 1_800_000, 1_800_000,
    3_600_000, 10_800_000, 10_800_000, 10_800_000, 21_600_000, 21_600_000,
)
"""WeChat Pay's notification gaps: 0 s, 15 s, 15 s, 30 s, 3 min, 10 min, 20 min, 30 min x3,
1 h, 3 h x3, 6 h x2 (16 attempts over 24 h 4 min)."""

_DAY_MS = 24 * 60 * 60 * 1000
_RETENTION_MIN_MS = 1_000
_ERROR_MAX = 500
_RESPONSE_READ_MAX = 1024


Transport = Callable[[str, bytes, Mapping[str, str], float], tuple[bool, str]]
"""(url, body, headers, timeout_s) -> (accepted, what happened): one merchant POST."""


@dataclass(frozen=True)
class NotificationConfig:
    """Schedules and bounds of outbox delivery (``EngineConfig.notifications``)."""

    merchant_schedule_ms: tuple[int, ...] = WECHAT_LIKE_NOTIFY_SCHEDULE_MS
    """Gap before each POST attempt: the first ``[0]`` ms after the event is dispatched,
    attempt k+1 ``[k]`` ms after attempt k failed. After the last, the notification is
    given up. 1..32 entries of 0 ms .. 7 days."""
    subscriber_retry_ms: tuple[int, ...] = (1_000, 2_000, 5_000, 10_000, 30_000, 60_000,
                                            120_000, 300_000)
    """Gaps before retrying an event a subscriber raised on; after the last retry fails
    the event becomes a dead letter. 0..32 entries of 0 ms .. 1 day."""
    batch_max: int = 100
    """Events per delivery round (per subscriber, and per dispatch)."""
    posts_in_flight_max: int = 16
    """Merchant POSTs started and not yet answered, at most."""
    http_timeout_s: float = 5.0
    """Connect and read timeout of one POST."""
    round_error_backoff_ms: int = 1_000
    """After a round failed (database busy or closed, lane full), try again this much later;
    also how often due notifications are looked at again while POSTs are in flight."""
    outbox_retention_ms: int | None = 7 * _DAY_MS
    """Events every consumer is done with (and their final merchant notifications) are
    deleted once this old, so the outbox does not grow for ever; ``None`` keeps them all.
    1 s .. 365 days. Only the subscribers of the current ``Engine.open`` hold events back:
    a subscriber left out of the opens for longer than this misses what was pruned."""
    prune_interval_ms: int = 60_000
    """Pruning runs at most this often, after a commit (an idle engine adds nothing to
    prune), deleting up to ``prune_batch_max`` events per transaction."""
    prune_batch_max: int = 1_000
    transport: Transport | None = None
    """How a POST is made: ``post`` (urllib) if None. The simulator passes a merchant of its
    own, so notifications run in virtual time with their faults; it must block like ``post``
    and answer (accepted, what happened)."""

    def __post_init__(self) -> None:
        _check_schedule(self.merchant_schedule_ms, "merchant_schedule_ms", 1, 7 * _DAY_MS)
        _check_schedule(self.subscriber_retry_ms, "subscriber_retry_ms", 0, _DAY_MS)
        for name, value, high in (("batch_max", self.batch_max, 10_000),
                                  ("posts_in_flight_max", self.posts_in_flight_max, 256),
                                  ("round_error_backoff_ms", self.round_error_backoff_ms,
                                   60_000),
                                  ("prune_interval_ms", self.prune_interval_ms, _DAY_MS),
                                  ("prune_batch_max", self.prune_batch_max, 100_000)):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
                raise InvalidRequest(f"{name} must be an int in 1..{high}, got {value!r}")
        retention = self.outbox_retention_ms
        if retention is not None and (isinstance(retention, bool) or not isinstance(
                retention, int) or not _RETENTION_MIN_MS <= retention <= 365 * _DAY_MS):
            raise InvalidRequest(f"outbox_retention_ms must be None or an int in "
                                 f"{_RETENTION_MIN_MS}..{365 * _DAY_MS}, got {retention!r}")
        timeout = self.http_timeout_s
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not (
            0 < timeout <= 60
        ):
            raise InvalidRequest(f"http_timeout_s must be in (0, 60], got {timeout!r}")


def _check_schedule(schedule: object, name: str, min_len: int, max_gap_ms: int) -> None:
    if not isinstance(schedule, tuple) or not min_len <= len(schedule) <= 32 or any(
        isinstance(gap, bool) or not isinstance(gap, int) or not 0 <= gap <= max_gap_ms
        for gap in schedule
    ):
        raise InvalidRequest(f"{name} must be a tuple of {min_len}..32 ints in "
                             f"0..{max_gap_ms} ms, got {schedule!r}")


# ---------------------------------------------------------------------- signing and HTTP


def sign(secret: str, body: bytes) -> str:
    """The ``X-Payengine-Signature`` of ``body``: hex HMAC-SHA256 keyed with ``secret``."""
    # one-shot (no HMAC object): the same hex, in half the time
    return hmac.digest(secret.encode("utf-8"), body, "sha256").hex()


def verify_signature(secret: str, body: bytes, signature: str) -> bool:
    """What a merchant does with each notification before trusting it (constant time)."""
    return hmac.compare_digest(sign(secret, body), signature.strip().lower())


def build_request(event: OutboxEvent, attempt: int, now_ms: int, secret: str
                  ) -> tuple[bytes, dict[str, str]]:
    """The body (compact JSON, UTF-8) and headers of one attempt to notify ``event``."""
    payload = event.payload()
    payload["attempt"] = attempt
    payload["notified_at_ms"] = now_ms
    body = json.dumps(payload, separators=(",", ":"), sort_keys=True,
                      ensure_ascii=False).encode("utf-8")
    headers = {
        "Content-Type": "application/json; charset=utf-8",
        "User-Agent": "payengine-notifier/1",
        EVENT_ID_HEADER: event.event_id,
        TIMESTAMP_HEADER: str(now_ms),
        SIGNATURE_HEADER: sign(secret, body),
    }
    return body, headers


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is an answer other than SUCCESS: not followed (the body is signed for the
    registered URL, and a redirect must not carry it elsewhere)."""

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> None:
        return None


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())
"""Direct connections only (no proxy from the environment), no redirects."""


def post(url: str, body: bytes, headers: Mapping[str, str], timeout_s: float
         ) -> tuple[bool, str]:
    """POST ``body`` to ``url``; (accepted, what happened). Blocking: an I/O lane only.

    Accepted means a 2xx status and the body ``SUCCESS`` (surrounding whitespace ignored).
    Any other status or body, a redirect, a timeout or a connection error is not.
    """
    request = urllib.request.Request(url, data=body, headers=dict(headers), method="POST")
    try:
        with _OPENER.open(request, timeout=timeout_s) as response:
            status = int(response.status)
            answer = response.read(_RESPONSE_READ_MAX)
    except urllib.error.HTTPError as error:
        error.close()
        return False, f"HTTP {error.code}"
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as error:
        return False, repr(error)[:_ERROR_MAX]
    if 200 <= status < 300 and answer.strip() == SUCCESS_BODY:
        return True, f"HTTP {status}"
    return False, f"HTTP {status}, body {answer[:64]!r}"


# ---------------------------------------------------------------------- pumps

_Next = tuple["int | None", bool]
"""What a round returns: when to run next (``None``: when kicked), and whether to hold
until then (ignore kicks: a subscriber backing off)."""


class _Pump:
    """One consumer's delivery rounds: at most one at a time, on its own I/O lane.

    A round is a blocking function run with ``runtime.run_io`` (it reads and writes the
    database, calls subscribers); it returns a ``_Next``. A kick during a round makes it run
    once more right after; a kick while holding is ignored (the timer ends the hold).

    Threads: ``kick`` from any thread (an order actor after its commit), ``_done`` on an
    I/O thread, ``_fire`` on the timer thread. The flags are under ``_lock``; nothing that
    waits is called under it (only ``runtime.call_at``, which is quick).
    """

    def __init__(self, lane: str, runtime: Runtime, round_fn: Callable[[], _Next], log: Any,
                 error_backoff_ms: int) -> None:
        self.lane = lane
        self._runtime = runtime
        self._round = round_fn
        self._log = log
        self._error_backoff_ms = error_backoff_ms
        self._lock = threading.Lock()
        self._busy = False
        self._again = False
        self._held = False
        self._stopped = False
        self._timer: TimerHandle | None = None
        self._timer_at: int | None = None

    def kick(self) -> None:
        """Run a round soon. Never blocks, never raises."""
        with self._lock:
            if self._stopped or self._held:
                return
            if self._busy:
                self._again = True
                return
            self._busy = True
        self._submit()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            timer, self._timer, self._timer_at = self._timer, None, None
        if timer is not None:
            timer.cancel()

    def _fire(self) -> None:
        with self._lock:
            self._timer, self._timer_at = None, None
            if self._stopped:
                return
            self._held = False
            if self._busy:
                self._again = True
                return
            self._busy = True
        self._submit()

    def _submit(self) -> None:
        try:
            self._runtime.run_io(self.lane, self._round, self._done)
        except Exception as error:  # the runtime is shut down: nothing more to do
            with self._lock:
                self._busy = False
            if not isinstance(error, EngineClosed):
                self._log.warning("notifier.round_not_started", lane=self.lane,
                                  error=repr(error))

    def _done(self, result: Any) -> None:
        now_ms = self._runtime.now_ms()
        with self._lock:
            self._busy = False
            if self._stopped:
                return
            next_at: int | None
            if isinstance(result, BaseException):
                next_at, hold = now_ms + self._error_backoff_ms, True
            else:
                next_at, hold = result
            again, self._again = self._again, False
            if hold:
                self._held = True
            elif again or (next_at is not None and next_at <= now_ms):
                self._busy = True
                next_at = None
            if next_at is not None:
                self._arm(next_at)
            run = self._busy
        if isinstance(result, BaseException) and not isinstance(result, EngineClosed):
            self._log.warning("notifier.round_failed", lane=self.lane, error=repr(result))
        if run:
            self._submit()

    def _arm(self, due_at_ms: int) -> None:
        """Under the lock: make sure a round runs by ``due_at_ms`` (keeps an earlier timer)."""
        if self._timer is not None and self._timer_at is not None and (
            self._timer_at <= due_at_ms
        ):
            return
        if self._timer is not None:
            self._timer.cancel()
        try:
            self._timer = self._runtime.call_at(due_at_ms, self._fire)
            self._timer_at = due_at_ms
        except Exception as error:  # timers stopped (shutting down) or full
            self._timer, self._timer_at = None, None
            self._log.warning("notifier.timer_refused", lane=self.lane, error=repr(error))


# ---------------------------------------------------------------------- the notifier


class Notifications:
    """Delivers every outbox event at least once to each subscriber and merchant.

    ``Engine.notifications`` returns it. Its public methods may be called from any thread
    except an actor's handler (they read or write the database on the caller's thread).
    """

    def __init__(self, ctx: Context, subscribers: Mapping[str, Subscriber]) -> None:
        """Called by ``Engine.open`` before any order resumes, so that a new subscriber's
        cursor starts at the end of the outbox as it was when the engine opened (a new
        subscriber gets the events from then on, not the history)."""
        self.ctx = ctx
        self.config: NotificationConfig = ctx.config.notifications
        self.subscribers: dict[str, Subscriber] = dict(subscribers)
        try:
            for name, fn in self.subscribers.items():
                _check_subscriber(name, fn)
        except InvalidRequest:
            ctx.store.close()  # Engine.open fails here: do not leave the file locked
            raise
        self.log = ctx.log.bind(component="notifier")
        self._lock = threading.Lock()
        self._inflight: set[str] = set()
        self._started = False
        self._stopped = False
        if self.subscribers:
            with ctx.store._tx() as conn:
                outbox.ensure_cursors(conn, self.subscribers, ctx.runtime.now_ms())
        with ctx.store._read() as conn:
            self._has_merchants = outbox.merchant_count(conn) > 0
        backoff = self.config.round_error_backoff_ms
        self._pumps = [_Pump(f"subscriber:{name}", ctx.runtime,
                             partial(self._subscriber_round, name), self.log, backoff)
                       for name in self.subscribers]
        self._merchant_pump = _Pump(OUTBOX_LANE, ctx.runtime, self._merchant_round, self.log,
                                    backoff)
        self._prune_pump = _Pump(OUTBOX_LANE, ctx.runtime, self._prune_round, self.log, backoff)
        self._prune_after_ms = 0
        """No pruning round is started before this (``prune_interval_ms`` after the last)."""

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Resume delivery of everything not yet delivered (after a restart too).

        Subscribers resume at their cursor at once (a backoff in progress is cut short:
        a restart is a good moment to retry, and the attempts already made still count).
        Pending merchant notifications keep their ``next_at_ms``; overdue ones go at once.
        """
        with self._lock:
            if self._started or self._stopped:
                return
            self._started = True
        if self.subscribers or self._has_merchants:
            self.log.info("notifier.started", subscribers=sorted(self.subscribers),
                          merchants=self._has_merchants)
        self.kick()

    def kick(self) -> None:
        """New events were committed: deliver them soon. Any thread; never blocks or raises.

        Without subscribers and registered merchants it does nothing (the events wait in
        the outbox), so an engine that publishes to nobody pays only for the outbox rows.
        """
        if not self._started or self._stopped:
            return
        for pump in self._pumps:
            pump.kick()
        if self._has_merchants:
            self._merchant_pump.kick()
        if self.config.outbox_retention_ms is not None:
            now_ms = self.ctx.runtime.now_ms()
            with self._lock:
                due = now_ms >= self._prune_after_ms
                if due:
                    self._prune_after_ms = now_ms + self.config.prune_interval_ms
            if due:
                self._prune_pump.kick()

    def stop(self) -> None:
        """Stop delivering; undelivered events stay in the outbox for the next open.

        A round or POST already running finishes; its record fails if the database is
        closed by then, so its event is delivered again after the next open.
        """
        with self._lock:
            self._stopped = True
        for pump in self._pumps:
            pump.stop()
        self._merchant_pump.stop()
        self._prune_pump.stop()

    # ------------------------------------------------------------------ merchants

    def register_merchant(self, merchant_id: str, callback_url: str, secret: str, *,
                          states: Iterable[str] | None = None) -> MerchantEndpoint:
        """Notify ``merchant_id`` of its orders' changes (state, refunds, holds expiring) at
        ``callback_url``.

        Each notification is a POST of a JSON body signed with ``secret`` (see ``sign``),
        retried on ``NotificationConfig.merchant_schedule_ms`` until answered 2xx with the
        body ``SUCCESS``. ``states``: only these events (default: every event of the
        merchant): order states such as ``succeeded`` for an order's changes into them,
        ``refund_refunding`` (a refund started), ``refund_succeeded``, ``refund_failed``,
        ``refund_unknown`` for its refunds, ``hold_expired`` for its holds expiring.
        Events committed from now on are notified; registering again changes the
        URL, secret and states (pending notifications use the new ones). The secret is
        stored in the database in the clear, like the rest of the engine's data: protect
        the file. Raises ``InvalidRequest`` for a bad id, URL (http or https only), secret
        (16..256 characters) or state.
        """
        check_id(merchant_id, "merchant_id")
        url = _check_url(callback_url)
        _check_text(secret, "secret", 16, 256)
        wanted = _check_states(states)
        self._check_open()
        with self.ctx.store._tx() as conn:
            endpoint = outbox.upsert_merchant(conn, merchant_id, url, secret, wanted,
                                              self.ctx.runtime.now_ms())
        self._has_merchants = True
        self.log.info("notifier.merchant_registered", merchant_id=merchant_id,
                      callback_url=url, states=list(wanted))
        self.kick()
        return endpoint

    def unregister_merchant(self, merchant_id: str) -> int:
        """Stop notifying ``merchant_id``; its pending notifications are given up.

        Returns how many were pending. Raises ``InvalidRequest`` if it is not registered.
        """
        check_id(merchant_id, "merchant_id")
        self._check_open()
        with self.ctx.store._tx() as conn:
            if outbox.load_merchant(conn, merchant_id) is None:
                raise InvalidRequest(f"no callback URL registered for merchant {merchant_id!r}")
            dropped = outbox.delete_merchant(conn, merchant_id, "merchant unregistered",
                                             self.ctx.runtime.now_ms())
            self._has_merchants = outbox.merchant_count(conn) > 0
        self.log.info("notifier.merchant_unregistered", merchant_id=merchant_id,
                      pending_given_up=dropped)
        return dropped

    def merchant(self, merchant_id: str) -> MerchantEndpoint | None:
        check_id(merchant_id, "merchant_id")
        with self.ctx.store._read() as conn:
            return outbox.load_merchant(conn, merchant_id)

    # ------------------------------------------------------------------ status

    def status(self, event_id: str) -> Notification | None:
        """The merchant notification of an event; ``None`` if there is none (its merchant is
        not registered, the state is not in its ``states``, or it is not dispatched yet)."""
        check_text(event_id, "event_id", 512, required=True)
        with self.ctx.store._read() as conn:
            return outbox.load_notification(conn, event_id)

    def notifications_of(self, order_id: str) -> list[Notification]:
        """Every merchant notification of an order, in event order."""
        check_id(order_id, "order_id")
        with self.ctx.store._read() as conn:
            return outbox.notifications_of(conn, order_id)

    def counts(self) -> dict[str, int]:
        """Merchant notifications by status: ``pending``, ``delivered``, ``given_up``."""
        with self.ctx.store._read() as conn:
            return outbox.notification_counts(conn)

    def events(self, order_id: str | None = None, *, after_seq: int = 0,
               limit: int = 1_000) -> list[OutboxEvent]:
        """Outbox events after ``after_seq`` in commit order (of one order, if given).

        For inspection: filtering by order scans the events after ``after_seq``.
        """
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 10_000:
            raise InvalidRequest(f"limit must be 1..10000, got {limit!r}")
        if isinstance(after_seq, bool) or not isinstance(after_seq, int) or after_seq < 0:
            raise InvalidRequest(f"after_seq must be an int >= 0, got {shown(after_seq)}")
        check_optional_id(order_id, "order_id")
        with self.ctx.store._read() as conn:
            return outbox.read_events(conn, after_seq, limit, order_id)

    def cursors(self) -> dict[str, Cursor]:
        """Each consumer's position (subscribers by name; ``~merchants``: the dispatcher).

        A subscriber has received every event up to ``seq``; ``attempts`` > 0 means it is
        backing off on the next one (``last_error``, ``next_at_ms``).
        """
        with self.ctx.store._read() as conn:
            return {c.consumer: c for c in outbox.all_cursors(conn)}

    def caught_up(self) -> bool:
        """True if everything committed so far was delivered: every subscriber's cursor and
        the merchant dispatcher at the outbox's newest event, no merchant notification
        pending. For waiting until deliveries settle (a graceful shutdown, a test); given up
        notifications and dead letters count as done. Read in one snapshot."""
        with self.ctx.store._read() as conn:
            newest = outbox.last_seq(conn)
            positions = {c.consumer: c.seq for c in outbox.all_cursors(conn)}
            pending = outbox.notification_counts(conn)[NotificationStatus.PENDING.value]
        consumers = [*self.subscribers, MERCHANTS] if self._has_merchants else list(self.subscribers)
        return not pending and all(positions.get(c, 0) >= newest for c in consumers)

    def lag(self) -> dict[str, int]:
        """Events each consumer (subscribers by name, ``~merchants``: the dispatcher) has
        not handled yet: the outbox's newest seq minus its cursor. One snapshot; for
        metrics."""
        with self.ctx.store._read() as conn:
            newest = outbox.last_seq(conn)
            return {c.consumer: max(0, newest - c.seq) for c in outbox.all_cursors(conn)}

    def dead_letter_counts(self) -> dict[str, int]:
        """Dead letters by subscriber (those that have any); for metrics."""
        with self.ctx.store._read() as conn:
            return outbox.dead_letter_counts(conn)

    def dead_letters(self, subscriber: str | None = None) -> list[DeadLetter]:
        """Events a subscriber refused on every attempt and was then skipped."""
        check_optional_id(subscriber, "subscriber")
        with self.ctx.store._read() as conn:
            return outbox.dead_letters(conn, subscriber)

    def _check_open(self) -> None:
        if self._stopped:
            raise EngineClosed("the engine is shut down")

    # ------------------------------------------------------------------ subscriber rounds

    def _subscriber_round(self, name: str) -> _Next:
        """Deliver up to ``batch_max`` events to one subscriber. On its I/O lane."""
        fn, store, runtime = self.subscribers[name], self.ctx.store, self.ctx.runtime
        batch = self.config.batch_max
        self._replay_dead_letters(name)
        with store._read() as conn:
            cursor = outbox.load_cursor(conn, name)
            events = outbox.read_events(conn, cursor.seq, batch)
        delivered, attempts = cursor.seq, cursor.attempts
        failed: tuple[OutboxEvent, Exception] | None = None
        for event in events:
            if self._stopped:
                break
            try:
                fn(event)
            except Exception as exc:  # the subscriber's failure: retried, never ours
                failed = (event, exc)
                break
            delivered, attempts = event.seq, 0
        now_ms = runtime.now_ms()
        if failed is None:
            if delivered != cursor.seq or cursor.attempts:
                with store._tx() as conn:
                    outbox.save_cursor(conn, Cursor(name, delivered, 0, None, None), now_ms)
            more = len(events) >= batch and not self._stopped
            return (now_ms if more else None), False
        event, error = failed
        attempts += 1
        text = repr(error)[:_ERROR_MAX]
        schedule = self.config.subscriber_retry_ms
        if attempts > len(schedule):
            self.log.error("notifier.subscriber_gave_up", subscriber=name,
                           event_id=event.event_id, attempts=attempts, error=text)
            with store._tx() as conn:
                outbox.add_dead_letter(conn, name, event, attempts, text, now_ms)
                outbox.save_cursor(conn, Cursor(name, event.seq, 0, None, None), now_ms)
            return now_ms, False
        retry_at = now_ms + schedule[attempts - 1]
        self.log.warning("notifier.subscriber_failed", subscriber=name, event_id=event.event_id,
                         attempt=attempts, retry_at_ms=retry_at, error=text)
        with store._tx() as conn:
            outbox.save_cursor(conn, Cursor(name, delivered, attempts, retry_at, text), now_ms)
        return retry_at, True

    def _replay_dead_letters(self, name: str) -> None:
        """Hand the dead letters an operator asked to replay (``Engine.resolve`` or
        ``payengine resolve``, journalled there) to the subscriber once more: delivered, the
        dead letter goes; refused, it stays, set aside anew. On the subscriber's lane."""
        fn, store = self.subscribers[name], self.ctx.store
        with store._read(snapshot=False) as conn:
            seqs = store_operator.take_replays(conn, name, self.config.batch_max)
        for seq in seqs:
            if self._stopped:
                return
            with store._read(snapshot=False) as conn:
                events = outbox.read_events(conn, seq - 1, 1)
            error: str | None = "the event was pruned from the outbox"
            if events and events[0].seq == seq:
                try:
                    fn(events[0])
                    error = None
                except Exception as exc:  # the subscriber's failure: stays a dead letter
                    error = repr(exc)[:_ERROR_MAX]
            with store._tx() as conn:
                store_operator.finish_replay(conn, name, seq, error, self.ctx.runtime.now_ms())
            self.log.info("notifier.dead_letter_replayed", subscriber=name, seq=seq,
                          delivered=error is None, error=error)

    # ------------------------------------------------------------------ retention

    def _prune_round(self) -> _Next:
        """Delete one batch of events everybody is done with. On the outbox lane.

        A full batch runs again at once (a backlog drains in bounded transactions); otherwise
        the next round waits for a commit after ``prune_interval_ms``: no timer keeps an idle
        engine busy.
        """
        retention = self.config.outbox_retention_ms
        assert retention is not None
        now_ms = self.ctx.runtime.now_ms()
        consumers = list(self.subscribers)
        if self._has_merchants:
            consumers.append(MERCHANTS)
        with self.ctx.store._tx() as conn:
            pruned = outbox.prune(conn, consumers, now_ms - retention, self.config.prune_batch_max)
        if pruned:
            self.log.info("notifier.outbox_pruned", events=pruned, before_ms=now_ms - retention)
        full = pruned >= self.config.prune_batch_max and not self._stopped
        return (now_ms if full else None), False

    # ------------------------------------------------------------------ merchant rounds

    def _merchant_round(self) -> _Next:
        """Dispatch new events, start due POSTs, say when to look again. On the outbox lane."""
        store, cfg = self.ctx.store, self.config
        now_ms = self.ctx.runtime.now_ms()
        with store._read(snapshot=False) as conn:
            undispatched = outbox.undispatched(conn)
        full = False
        if undispatched:
            with store._tx() as conn:
                full = outbox.dispatch(conn, cfg.batch_max, now_ms)
        with self._lock:
            busy = set(self._inflight)
        slots = cfg.posts_in_flight_max - len(busy)
        due: list[DueNotification] = []
        if slots > 0:
            with store._read(snapshot=False) as conn:
                due = outbox.due_notifications(conn, now_ms, slots + len(busy))
        launch: list[DueNotification] = []
        with self._lock:
            for item in due:
                if len(self._inflight) >= cfg.posts_in_flight_max or self._stopped:
                    break
                if item.event.event_id not in self._inflight:
                    self._inflight.add(item.event.event_id)
                    launch.append(item)
        for item in launch:
            self._send(item)
        if full:
            return now_ms, False
        with store._read(snapshot=False) as conn:
            next_at = outbox.next_pending_at(conn)
        if next_at is not None and next_at <= now_ms:
            # Due but in flight, or not started for lack of a slot: look again a bit later
            # (a POST's completion also kicks this pump).
            next_at = now_ms + cfg.round_error_backoff_ms
        return next_at, False

    def _send(self, item: DueNotification) -> None:
        """Start one POST on the notify lane; its completion frees the slot and kicks."""
        event_id = item.event.event_id

        def done(result: Any) -> None:
            with self._lock:
                self._inflight.discard(event_id)
            if isinstance(result, BaseException):
                if not isinstance(result, EngineClosed):
                    self.log.warning("notifier.post_failed", event_id=event_id,
                                     error=repr(result))
                if isinstance(result, Overloaded | EngineClosed):
                    return  # the pump looks again after its backoff; no hot loop
            self._merchant_pump.kick()

        try:
            self.ctx.runtime.run_io(NOTIFY_LANE, partial(self._post_and_record, item), done)
        except EngineClosed:
            with self._lock:
                self._inflight.discard(event_id)

    def _post_and_record(self, item: DueNotification) -> str:
        """POST one notification and record the outcome. Blocking: on the notify lane."""
        store, runtime, cfg = self.ctx.store, self.ctx.runtime, self.config
        event = item.event
        now_ms = runtime.now_ms()
        with store._read(snapshot=False) as conn:
            if not outbox.still_due(conn, event.event_id, item.attempts, now_ms):
                return "skipped"  # recorded meanwhile by an earlier round's POST
        attempt = item.attempts + 1
        if item.callback_url is None or item.secret is None:
            accepted, detail, final = False, "merchant unregistered", True
        else:
            body, headers = build_request(event, attempt, now_ms, item.secret)
            send = cfg.transport or post
            accepted, detail = send(item.callback_url, body, headers, cfg.http_timeout_s)
            final = attempt >= len(cfg.merchant_schedule_ms)
        done_ms = runtime.now_ms()
        next_at: int | None = None
        if accepted:
            status = NotificationStatus.DELIVERED
        elif final:
            status = NotificationStatus.GIVEN_UP
        else:
            status = NotificationStatus.PENDING
            next_at = done_ms + cfg.merchant_schedule_ms[attempt]
        with store._tx() as conn:
            recorded = outbox.record_attempt(conn, event.event_id, item.attempts, status,
                                             next_at, None if accepted else detail, done_ms)
        fields = {"event_id": event.event_id, "merchant_id": event.merchant_id,
                  "order_id": event.order_id, "attempt": attempt, "detail": detail}
        if not recorded:
            self.log.info("notifier.attempt_superseded", **fields)
        elif status is NotificationStatus.DELIVERED:
            self.log.info("notifier.delivered", **fields)
        elif status is NotificationStatus.GIVEN_UP:
            self.log.error("notifier.given_up", **fields)
        else:
            self.log.warning("notifier.not_accepted", retry_at_ms=next_at, **fields)
        return status.value


# ---------------------------------------------------------------------- validation


def _check_text(value: object, what: str, low: int, high: int) -> None:
    check_text(value, what, high, required=low > 0)
    assert isinstance(value, str)
    if not low <= len(value) <= high:
        raise InvalidRequest(f"{what} must be a string of {low}..{high} characters")


def _check_url(url: object) -> str:
    _check_text(url, "callback_url", 1, 2048)
    assert isinstance(url, str)
    if any(ch.isspace() or ord(ch) < 32 for ch in url):
        raise InvalidRequest("callback_url must not contain spaces or control characters")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port  # raises ValueError when not a number in 0..65535
    except ValueError as error:
        raise InvalidRequest(f"callback_url is not a valid URL: {error}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequest(f"callback_url must be an http(s) URL with a host, got {url!r}")
    if port == 0:
        raise InvalidRequest("callback_url must not use port 0")
    return url


def _check_states(states: Iterable[str] | None) -> tuple[str, ...]:
    if states is None:
        return ()
    known = set(outbox.FILTER_KEYS)
    wanted = tuple(dict.fromkeys(check_ids(states, "states", len(known))))
    bad = [s for s in wanted if s not in known]
    if bad or not wanted:
        raise InvalidRequest(f"states must be order states or refund and hold events among "
                             f"{list(outbox.FILTER_KEYS)}, got {list(wanted)!r}")
    return wanted


def _check_subscriber(name: object, fn: object) -> None:
    if not isinstance(name, str) or not 1 <= len(name) <= 128 or name.startswith("~"):
        raise InvalidRequest(f"subscriber name must be 1..128 characters, not starting with "
                             f"'~', got {name!r}")
    if not callable(fn):
        raise InvalidRequest(f"subscriber {name!r} must be callable")


__all__ = [
    "EVENT_ID_HEADER", "MERCHANTS", "SIGNATURE_HEADER", "SUCCESS_BODY", "TIMESTAMP_HEADER",
    "WECHAT_LIKE_NOTIFY_SCHEDULE_MS", "Cursor", "DeadLetter", "MerchantEndpoint",
    "Notification", "NotificationConfig", "NotificationStatus", "Notifications", "OutboxEvent",
    "Subscriber", "build_request", "post", "sign", "verify_signature",
]
