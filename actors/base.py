"""What order and account actors share: the engine context and the message loop discipline.

Every handler runs on the actor's own thread, one message at a time. The discipline:
decide (pure core), persist, then act. A typed ``PaymentError`` from a told message is logged
and dropped (it never kills the actor); from an asked one it goes back to the asker. An
``AssertionError`` is a bug: it propagates and pykka logs it and stops the actor; the
directory restarts it from the database on the next message.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from payengine.actors.channel import Channel
from payengine.actors.directory import Directory, Key
from payengine.actors.health import ChannelHealth
from payengine.actors.merchant_auth import MerchantRequestConfig
from payengine.actors.messages import Asked, Paced
from payengine.actors.notifier import NotificationConfig
from payengine.actors.observe import NO_OBSERVER, Observer
from payengine.actors.runtime import Runtime, TimerHandle
from payengine.engine.checks import check_id, check_instance, check_int, check_setting, shown
from payengine.engine.currency import currency_table
from payengine.engine.discounts import DiscountRules, check_rules
from payengine.engine.errors import EngineClosed, PaymentError
from payengine.engine.health import BreakerPolicy
from payengine.engine.order import PLANTABLE_BUGS, OrderPolicy, PaymentOrder
from payengine.engine.routing import RoutingTable
from payengine.engine.withhold import WithholdConfig
from payengine.persistence.group_commit import GroupCommitConfig
from payengine.persistence.store import Store


@dataclass(frozen=True)
class EngineConfig:
    """Bounds and timings of the actor shell. Every queue and every wait has a limit."""

    ask_timeout_s: float = 10.0
    account_idle_ms: int = 30_000
    """An account actor with nothing to do stops after this long (its state is in SQLite)."""
    live_orders_max: int = 200_000
    """Submits beyond this many orders in flight are refused with ``Overloaded``. An order at
    work is a live actor (a few KiB, no thread of its own: ``actor_threads``); one only
    waiting for its user is passivated, a directory entry and its timers (``Directory``)."""
    actor_threads: int = 8
    """Threads that run every actor (``actors.pool.PooledRuntime``, made by ``Engine.open``
    when no runtime is given): at most this many handlers run (or wait on SQLite) at once,
    however many orders are in flight."""
    submits_in_flight_max: int = 16
    """Submits being taken at once; one more waits ``admission_wait_ms`` for a slot, then is
    refused with ``Overloaded`` (``actors.admission``)."""
    admission_wait_ms: int = 2
    actor_backlog_max: int = 256
    """Messages told to actors and not yet handled beyond which a submit is refused at once
    with ``Overloaded``: the actors are behind, and the orders they already have come first."""
    writer_backlog_max: int = 24
    """Writers waiting for the database connection beyond which a submit is refused at
    once: the disk is behind, and the orders already taken come first. Writers are threads
    (actor threads, submit slots, delivery lanes), so the default is the actor threads and
    submit slots of the default config: all of them waiting."""
    pre_hold_ttl_ms: int = 15 * 60 * 1000
    pre_hold_ttl_ms_max: int = 24 * 60 * 60 * 1000
    duplicate_guard_window_ms: int = 60_000
    fee_ppm: Mapping[str, int] = field(default_factory=dict)
    """Each channel's fee in parts per million of the cash it takes (ledger: fees:<channel>)."""
    planted_bugs: frozenset[str] = frozenset()
    """For the simulator only (``engine.order.PLANTABLE_BUGS``); empty in a real engine."""
    notifications: NotificationConfig = field(default_factory=NotificationConfig)
    """Outbox delivery: merchant notification schedule, subscriber retries, batch bounds."""
    currencies: Mapping[str, int] = field(default_factory=dict)
    """Currencies added to (or overriding) ISO 4217 for this engine: code -> minor digits,
    e.g. ``{"XTS": 2}``. Orders, money vouchers and statements use only known currencies."""
    group_commit: GroupCommitConfig = field(default_factory=GroupCommitConfig)
    """Bounds of one commit of the database writer: changes, statements, wait."""
    routing: RoutingTable = field(default_factory=RoutingTable)
    """Payment methods and the channels that execute them (``engine.routing``); empty: a
    ``CashPart.channel`` names its channel directly."""
    breaker: BreakerPolicy = field(default_factory=BreakerPolicy)
    """When a channel counts as down, and for how long routing skips it (``engine.health``)."""
    merchant_requests: MerchantRequestConfig = field(default_factory=MerchantRequestConfig)
    """Signed merchant requests: timestamp window, nonces remembered at most."""
    withholding: WithholdConfig = field(default_factory=WithholdConfig)
    """Agreements and withholdings: attempts, agreements per user, open withholdings."""
    discounts: DiscountRules = field(default_factory=DiscountRules)
    """The station's discount rules for ``Engine.quote`` (``engine.discounts``); default none
    (a quote then lists the user's coupons and points only)."""
    quotes_max: int = 100_000
    """Most unexpired quotes stored at once; beyond, ``Engine.quote`` is ``Overloaded``."""
    currency_table: Mapping[str, int] = field(init=False, repr=False, compare=False)
    """ISO 4217 merged with ``currencies`` (``engine.currency.currency_table``); derived."""

    def __post_init__(self) -> None:
        """Settings are input too: a bad one is ``InvalidRequest``, even under ``python -O``."""
        timeout = self.ask_timeout_s
        check_setting(not isinstance(timeout, bool) and isinstance(timeout, int | float)
                      and 0 < timeout <= 3_600, f"ask_timeout_s must be 0..3600 s, got "
                      f"{shown(timeout)}")
        day_ms = 24 * 60 * 60 * 1000
        check_int(self.account_idle_ms, "account_idle_ms", 1, day_ms)
        check_int(self.live_orders_max, "live_orders_max", 1, 10_000_000)
        check_int(self.submits_in_flight_max, "submits_in_flight_max", 1, 100_000)
        check_int(self.admission_wait_ms, "admission_wait_ms", 0, 60_000)
        check_int(self.writer_backlog_max, "writer_backlog_max", 1, 1_000_000)
        check_int(self.actor_backlog_max, "actor_backlog_max", 1, 10_000_000)
        check_int(self.actor_threads, "actor_threads", 1, 256)
        check_int(self.pre_hold_ttl_ms_max, "pre_hold_ttl_ms_max", 1, 7 * day_ms)
        # a default TTL above the maximum is used as the maximum (a config that only lowers
        # the maximum is meant as is)
        check_int(self.pre_hold_ttl_ms, "pre_hold_ttl_ms", 1, 7 * day_ms)
        check_int(self.duplicate_guard_window_ms, "duplicate_guard_window_ms", 0, day_ms)
        check_setting(isinstance(self.fee_ppm, Mapping), "fee_ppm maps channel names to ppm")
        for channel, ppm in self.fee_ppm.items():
            check_id(channel, "fee_ppm channel")
            check_int(ppm, f"fee_ppm[{channel!r}]", 0, 999_999)  # a fee below the payment
        unknown = set(self.planted_bugs) - PLANTABLE_BUGS
        check_setting(not unknown, f"unknown planted bugs {sorted(unknown)}")
        check_instance(self.notifications, NotificationConfig, "notifications")
        check_instance(self.group_commit, GroupCommitConfig, "group_commit")
        check_instance(self.routing, RoutingTable, "routing")
        check_instance(self.breaker, BreakerPolicy, "breaker")
        check_instance(self.merchant_requests, MerchantRequestConfig, "merchant_requests")
        check_instance(self.withholding, WithholdConfig, "withholding")
        check_rules(self.discounts, "discounts")
        check_int(self.quotes_max, "quotes_max", 1, 10_000_000)
        # Merged once here (and validated: a bad entry refuses the config, typed), since
        # every submit and every statement line looks currencies up.
        object.__setattr__(self, "currency_table", currency_table(self.currencies))


@dataclass
class Context:
    """What every actor of one engine shares. Built once by ``Engine.open``."""

    store: Store
    runtime: Runtime
    directory: Directory
    channels: Mapping[str, Channel]
    policy: OrderPolicy
    config: EngineConfig
    log: Any
    voucher_link: Any = None
    """An ``actors.voucher_link.VoucherLink``; set by ``Engine.open``."""
    notifications: Any = None
    """The ``actors.notifier.Notifications`` of this engine; set by ``Engine.open``."""
    providers: Mapping[str, Any] = field(default_factory=dict)
    """External voucher providers by name: ``actors.provider.ProviderSlot``s."""
    pays_in_flight: PaysInFlight = field(default_factory=lambda: PaysInFlight())
    """Payment serials whose ``pay`` call this process made and has not had back."""
    fresh_orders: FreshOrders = field(default_factory=lambda: FreshOrders())
    """Orders a submit just committed, for their actor's first load (no re-read)."""
    health: ChannelHealth = field(default_factory=lambda: ChannelHealth((), BreakerPolicy(),
                                                                        lambda: 0))
    """Every channel's circuit breaker; set by ``Engine.open``."""
    observer: Observer = NO_OBSERVER
    """Observation hooks (``actors.observe``); set by ``Engine.set_observer``, read on every
    thread: one attribute, replaced whole."""


class FreshOrders:
    """Orders just committed by a submit, handed to the actor that starts for them.

    A new order's actor would otherwise read back the rows the submit wrote a moment before;
    the committed object is the same state. Put before the insert commits (no actor can
    start for an order that is not stored yet) and taken by the first actor that starts for
    it, so it is never stale. Bounded: an entry nobody takes (the engine shut down between)
    is evicted in time. Thread-safe.
    """

    def __init__(self, entries_max: int = 4_096) -> None:
        self._orders: dict[str, PaymentOrder] = {}
        self._entries_max = entries_max
        self._lock = threading.Lock()

    def put(self, order: PaymentOrder) -> None:
        with self._lock:
            if len(self._orders) >= self._entries_max:
                del self._orders[next(iter(self._orders))]  # the oldest
            self._orders[order.order_id] = order

    def take(self, order_id: str) -> PaymentOrder | None:
        with self._lock:
            return self._orders.pop(order_id, None)


class PaysInFlight:
    """The serials whose ``Channel.pay`` call is running in this process. Thread-safe.

    Kept by the shell, not by an order's actor: an actor restarted in this process (after
    a crash of its handler) must still know its serial's pay is running, so it neither
    closes nor pays it again; a new process starts with none, since the calls of a dead one
    can no longer answer.
    """

    def __init__(self) -> None:
        self._serials: set[str] = set()
        self._lock = threading.Lock()

    def add(self, serial: str) -> None:
        with self._lock:
            self._serials.add(serial)

    def discard(self, serial: str) -> None:
        with self._lock:
            self._serials.discard(serial)

    def __contains__(self, serial: object) -> bool:
        with self._lock:
            return serial in self._serials


class ActorBehaviour:
    """Base of the order and account behaviours: counting, error discipline, passivation."""

    def __init__(self, key: Key, ctx: Context) -> None:
        self.key = key
        self.ctx = ctx
        self.handled = 0
        self.stopped = False
        self.answering = False
        """True while handling an asked message: its reply must be durable."""

    @functools.cached_property
    def log(self) -> Any:
        """The actor's bound logger, made on first use: most actors never log (a start of
        each of 100,000 orders at a reopen bound one for nothing)."""
        return self.ctx.log.bind(actor=f"{self.key[0]}:{self.key[1]}")

    def on_start(self) -> None:
        self.load()

    def on_stop(self) -> None:
        self.stopped = True
        self.cancel_timers()

    def on_failed(self) -> None:
        """On the actor's thread: a told message raised something unexpected and the actor
        stops (pykka's discipline). Messages still queued will never be handled: the
        directory takes them out of its backlog now (they kept admission refusing submits
        for as long as nobody wrote to this key again) and forgets this actor. Its timers
        stay armed: one that fires starts a fresh actor from the database."""
        self.stopped = True
        self.ctx.directory.stopped(self.key, self)

    def on_message(self, message: Any) -> Any:
        if isinstance(message, Paced):
            try:
                return self.on_message(message.message)
            finally:
                message.done()
        self.handled += 1
        asked = isinstance(message, Asked)
        self.answering = asked
        payload = message.message if asked else message
        try:
            result = self.handle(payload)
            return self.reply(result) if asked else None
        except EngineClosed:
            if asked:
                raise
            return None
        except PaymentError as error:
            if asked:
                raise
            self.log.warning("message.refused", message=type(payload).__name__,
                             error=error.code, detail=error.message)
            return None
        except AssertionError as error:
            self.log.critical("invariant.broken", message=type(payload).__name__,
                              error=repr(error))
            self.ctx.directory.quarantine(self.key, repr(error))
            self.stopped = True
            raise
        finally:
            self.ctx.directory.note_handled()
            if not self.stopped and not self.ctx.store.closed and self.idle():
                self.try_release()

    def try_release(self) -> None:
        kept = self.passive_state()
        if self.ctx.directory.release(self.key, self, self.handled, kept):
            if kept is None:
                self.cancel_timers()
            else:
                self.handed_over()

    # -- for subclasses

    def load(self) -> None:
        raise NotImplementedError

    def handle(self, message: Any) -> Any:
        raise NotImplementedError

    def reply(self, result: Any) -> Any:
        """What an asker gets for ``handle``'s result; built only when someone asked (most
        messages are tells, and a view of the state per message is not free)."""
        return result

    def idle(self) -> bool:
        """True when this actor may stop after the current message."""
        return False

    def passive_state(self) -> Any:
        """When ``idle`` with work still to come: what the next actor for the key needs
        and the database does not hold (``Directory.release``). ``None``: the actor is done,
        its timers are cancelled when it stops."""
        return None

    def handed_over(self) -> None:
        """``passive_state`` went to the directory: forget it (the next actor owns it)."""

    def cancel_timers(self) -> None:
        """Cancel timers that would only wake a stopped actor for nothing."""

    def tell_later(self, due_at_ms: int, message: Any) -> TimerHandle:
        """Arm a timer that tells ``message`` to this actor (restarting it if it stopped)."""
        directory, key = self.ctx.directory, self.key
        return self.ctx.runtime.call_at(due_at_ms, _TellLater(directory, key, message))


class _TellLater:
    """A timer's tell: one slotted object per timer, where a ``partial`` was a partial and
    its argument tuple (and a closure twice that); a passivated open order is little more
    than its two timers, for hours."""

    __slots__ = ("directory", "key", "message")

    def __init__(self, directory: Directory, key: Key, message: Any) -> None:
        self.directory = directory
        self.key = key
        self.message = message

    def __call__(self) -> None:
        with contextlib.suppress(EngineClosed):
            self.directory.tell(self.key, self.message)
