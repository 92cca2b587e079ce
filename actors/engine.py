"""The public face of payengine: open an engine on a SQLite file and pay.

Threads: every method may be called from any thread except an actor's handler. Submits are
acknowledged synchronously (validated, committed, a receipt returned); the payment itself
runs on the actors. Reads (``get_order``, ``get_account``) come from the database, which is
the engine's truth, and never touch the channel.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from payengine.actors.account_actor import AccountBehaviour
from payengine.actors.admission import Admission, AdmissionStats
from payengine.actors.base import ActorBehaviour, Context, EngineConfig
from payengine.actors.beneficiary import (
    TRANSFER_MERCHANT,
    check_recharge_refund,
    check_recharge_target,
    check_transfer,
    transfer_request,
    transfer_source,
)
from payengine.actors.channel import (
    AgreementStatus,
    Channel,
    ChannelReply,
    NotificationKind,
    authorises,
    cash_result,
    check_notification,
    check_reply,
    refund_result,
    signs_agreements,
    takes_details,
)
from payengine.actors.claim import Claim, Claimed
from payengine.actors.confirm_limiter import ConfirmLimiter
from payengine.actors.directory import Directory, Key
from payengine.actors.health import ChannelHealth
from payengine.actors.logs import get_logger
from payengine.actors.merchant_auth import MerchantGate, MerchantView, Verified
from payengine.actors.messages import (
    AccountView,
    ExpireDue,
    Fund,
    HoldView,
    OrderView,
    PreHold,
    Receipt,
    RefundView,
    ReleaseHold,
    SetAccountStatus,
)
from payengine.actors.notifier import Notifications, Subscriber
from payengine.actors.observe import HOOK_ERRORS, NO_OBSERVER, Observer, Vitals, notify
from payengine.actors.operator import resolve_in_engine
from payengine.actors.order_actor import OrderBehaviour
from payengine.actors.pool import ActorPool, PooledRuntime
from payengine.actors.provider import (
    CallbackArrived,
    ProviderBehaviour,
    ProviderRouting,
    check_provider_callback,
)
from payengine.actors.provider_checks import (
    check_providers_of_unsettled,
    provider_slots,
    provider_units,
)
from payengine.actors.reconcile import ReconciliationReport, StatementSource
from payengine.actors.resume import ResumeFeeder, in_flight_for
from payengine.actors.risk_gate import RiskConfig, RiskGate
from payengine.actors.routes import choose_for
from payengine.actors.runtime import Runtime
from payengine.actors.voucher_link import DirectVoucherLink, VoucherLink
from payengine.actors.withholding import SUBSCRIBER_NAME as WITHHOLD_SUBSCRIBER
from payengine.actors.withholding import Withholder
from payengine.engine.agreement import Agreement
from payengine.engine.channel_data import PayDetails, PayScenario
from payengine.engine.checks import (
    check_bool,
    check_id,
    check_instance,
    check_int,
    check_optional_id,
    shown,
)
from payengine.engine.codes import ResultKind
from payengine.engine.currency import check_currency
from payengine.engine.discounts import (
    Benefits,
    PricedSale,
    Quote,
    UnknownQuote,
    check_benefits,
    check_quote_use,
    make_quote,
)
from payengine.engine.errors import (
    AttemptRefused,
    AuthorisationChannelsMissing,
    AuthorisationUnsupported,
    ChannelsMissing,
    DuplicateSuspected,
    EngineClosed,
    IdempotencyConflict,
    IllegalTransition,
    InvalidRequest,
    NotificationRejected,
    Overloaded,
    ProviderCallbackRejected,
    RequestRejected,
    RiskBlocked,
    UnknownAccount,
    UnknownHold,
    UnknownOrder,
    VerificationFailed,
)
from payengine.engine.fuel import FuelSale
from payengine.engine.merchant_request import (
    CloseOp,
    PayOp,
    QueryOp,
    RefundOp,
    pay_window_over,
)
from payengine.engine.money import check_amount, check_unit
from payengine.engine.operator import (
    FIND_ORDERS_LIMIT_DEFAULT,
    AttentionItem,
    OrderPage,
    Resolution,
    order_filter,
)
from payengine.engine.order import (
    ATTEMPTS_MAX,
    UNVERIFIED_SOURCES,
    Activate,
    CaptureAuthorisation,
    CashPart,
    CashResult,
    CloseCause,
    CloseOrder,
    OrderPolicy,
    OwedCommand,
    PaymentOrder,
    PaymentRequest,
    RefundResult,
    RequestRefund,
    ResultSource,
    Transition,
    VerifyCode,
    VoidAuthorisation,
    build_order,
    check_next_attempt,
    check_refund_request,
    check_report,
    check_request,
    needs_confirmation,
    owed_commands,
    report_agrees,
    suspected_duplicates,
    with_risk,
)
from payengine.engine.provider import provider_of
from payengine.engine.risk import VerificationStatus, check_code
from payengine.engine.routing import (
    RouteChoice,
)
from payengine.engine.shift_report import ShiftReport
from payengine.engine.voucher import FenceKey, VoucherAccount
from payengine.engine.withhold import Withholding
from payengine.persistence import merchants, quotes, rejections, reports
from payengine.persistence import operator as store_operator
from payengine.persistence.merchants import NonceUse, RequestRejection
from payengine.persistence.rejections import Rejection
from payengine.persistence.store import JournalEntry, Store


class IdSource(Protocol):
    """Where new ids come from: random in production, seeded in the simulator."""

    def new_order_id(self) -> str: ...

    def new_payment_serial(self) -> str: ...

    def new_hold_id(self) -> str: ...

    # Optional: ``new_quote_id() -> str`` (the simulator's seeded ids have it); without it
    # quote ids are random (``Engine._new_quote_id``).


class RandomIds:
    """uuid4-based ids; a payment serial is 32 characters, the usual channel limit."""

    def new_order_id(self) -> str:
        return f"ord_{uuid.uuid4().hex}"

    def new_payment_serial(self) -> str:
        return f"P{uuid.uuid4().hex[:31]}"

    def new_hold_id(self) -> str:
        return f"hold_{uuid.uuid4().hex}"

    def new_agreement_id(self) -> str:
        return f"agr_{uuid.uuid4().hex}"


def _check_notification(channel: object, payment_serial: object, reply: object, wait: object,
                        **ids: object) -> None:
    """The types of a wallet notification's arguments (``handle_callback``,
    ``handle_refund_callback``): ids, a ``ChannelReply`` of codes, a bool."""
    check_id(channel, "channel")
    check_id(payment_serial, "payment_serial")
    for name, value in ids.items():
        check_id(value, name)
    check_reply(reply)
    check_bool(wait, "wait")


SYNCHRONOUS_MODES = ("FULL", "NORMAL", "OFF")
"""SQLite's durability levels the engine runs with: FULL (the default) survives a power
loss; NORMAL in WAL mode may lose the last commits on one (never corrupts); OFF is for the
simulator."""

CHANNELS_MAX = 1_000

NOTIFICATION_BYTES_MAX = 64 * 1024
"""The largest notification body accepted: wallets send a few hundred bytes."""

ACKS_UNBELIEVED_BUG = "notify-acks-unbelieved"
"""A planted bug (``PLANTABLE_BUGS``): a notification or callback the engine does not believe
on its word (a second charge, a refund failure, an unverified report) answered as handled
instead of refused, and the channel never asked: the wallet stops sending it, so the engine
never learns what it says (``sim.oracle.check_wallet_notices`` sees the charge unknown)."""


def _channels_by_name(channels: Iterable[Channel]) -> dict[str, Channel]:
    """The channels by name: each named by an id, no name twice (a notification through
    one must never reach another's orders), at most ``CHANNELS_MAX``."""
    if isinstance(channels, str | bytes | Mapping) or not isinstance(channels, Iterable):
        raise InvalidRequest(f"channels is a list of Channel objects, not {shown(channels)}")
    by_name: dict[str, Channel] = {}
    for channel in itertools.islice(channels, CHANNELS_MAX + 1):
        name = check_id(getattr(channel, "name", None), "a channel's name")
        if name in by_name:
            raise InvalidRequest(f"two channels are named {name!r}")
        by_name[name] = channel
    if len(by_name) > CHANNELS_MAX:
        raise InvalidRequest(f"at most {CHANNELS_MAX} channels")
    return by_name


_ASSESSMENT_SLACK_S = 5.0
"""Beyond the risk gate's own calls, how long a submit waits for another submit of the same
attempt to be inserted (``Engine._one_assessment``)."""

_SCHEDULES = (("query_schedule_ms", "channel_query_schedules_ms"),
              ("refund_query_schedule_ms", "channel_refund_query_schedules_ms"))


def _with_channel_schedules(policy: OrderPolicy, channels: Mapping[str, Channel]
                            ) -> OrderPolicy:
    """``policy`` with the query schedules the channels carry (a configured channel's
    ``query_schedule_ms``, ``refund_query_schedule_ms``); one the policy names already
    for that channel is kept."""
    added: dict[str, list[tuple[str, tuple[int, ...]]]] = {}
    for channel_attribute, policy_field in _SCHEDULES:
        named = {pair[0] for pair in getattr(policy, policy_field)}
        for name, channel in channels.items():
            own = getattr(channel, channel_attribute, None)
            if own is not None and name not in named:
                added.setdefault(policy_field, []).append((name, own))
    if not added:
        return policy
    return dataclasses.replace(policy, **{
        field: getattr(policy, field) + tuple(pairs) for field, pairs in added.items()})


def _check_channels_of_unsettled(store: Store, channels: Mapping[str, Channel]) -> None:
    """Refuse (``ChannelsMissing``, the store closed, nothing started) an open without a
    channel that unsettled orders still use: their actors would find no channel for every
    query, close or refund they owe. Refusing is safe (no order moves, no money moves) and
    loud; the operator opens again with the channel."""
    missing = {name: n for name, n in sorted(store.unsettled_orders_by_channel().items())
               if name not in channels}
    if missing:
        store.close()
        named = ", ".join(f"{name!r} ({n} unsettled orders)" for name, n in missing.items())
        raise ChannelsMissing(
            f"unsettled orders use channels this engine was not given: {named}; open it "
            "with them (a channel taken out of routing: keep it configured, e.g. "
            "enabled = false, until its orders settled)", missing)
def _check_authorisation_channels(store: Store, channels: Mapping[str, Channel]) -> None:
    """Refuse (``AuthorisationChannelsMissing``, the store closed, nothing started) an open
    whose channel of an unsettled pre-authorisation cannot pre-authorise: every capture,
    void and query the order owes would fail as no answer, forever, while the wallet holds
    the payer's money. A channel not given at all is ``_check_channels_of_unsettled``'s."""
    missing = {name: n for name, n in sorted(store.unsettled_authorisations_by_channel().items())
               if name in channels and not authorises(channels[name])}
    if missing:
        store.close()
        named = ", ".join(f"{name!r} ({n} unsettled pre-authorisations)"
                          for name, n in missing.items())
        raise AuthorisationChannelsMissing(
            f"unsettled pump pre-authorisations use channels that do not implement "
            f"AuthorisationChannel: {named}; open the engine with channels that do "
            "(authorise, capture, void, query_authorisation)", missing)


def _without_close(channels: Mapping[str, Channel]) -> frozenset[str]:
    """Channels that cannot close a payment: an HTTP channel whose configuration has no
    ``close`` operation (its ``close`` raises), or one saying ``supports_close = False``."""
    out = set()
    for name, channel in channels.items():
        config = getattr(channel, "config", None)
        operations = getattr(config, "operations", None)
        if getattr(channel, "supports_close", True) is False or (
            getattr(config, "kind", None) == "http" and operations is not None
            and "close" not in operations
        ):
            out.add(name)
    return frozenset(out)


class Engine:
    """A payment engine on one SQLite file. Use ``Engine.open(path, channels=[...])``."""

    def __init__(self, ctx: Context, ids: IdSource, risk: RiskConfig | None = None) -> None:
        self._ctx = ctx
        self._ids = ids
        self._closed = False
        self._risk = None if risk is None else RiskGate(risk, ctx.store.count_recent_orders)
        self._assessing: dict[tuple[str, str, int], threading.Event] = {}
        """Submits being assessed and inserted, by attempt (``_one_assessment``)."""
        self._assessing_lock = threading.Lock()
        self._confirm_limiter = ConfirmLimiter(ctx.policy.confirm_query_interval_ms)
        self._channels_taking_details = frozenset(
            name for name, channel in ctx.channels.items() if takes_details(channel))
        store, directory, config = ctx.store, ctx.directory, ctx.config
        self._admission = Admission(
            submits_in_flight_max=config.submits_in_flight_max,
            wait_ms=config.admission_wait_ms,
            backlogs={
                "actor messages": (lambda: directory.backlog, config.actor_backlog_max),
                "writers of the database": (lambda: store.writer_backlog,
                                            config.writer_backlog_max),
            })
        self._resume_feeder = ResumeFeeder(ctx.directory, ctx.runtime, (),
                                           grace_ms=ctx.policy.hold_grace_ms, log=ctx.log)
        self._gate = MerchantGate(store, config.merchant_requests, ctx.policy,
                                  config.currency_table, ctx.runtime.now_ms, ctx.log,
                                  config.planted_bugs | ctx.policy.planted_bugs)
        self._withholder = Withholder(ctx, self._submit_withholding,
                                      getattr(ids, "new_agreement_id", None))

    # ------------------------------------------------------------------ lifecycle

    @property
    def notifications(self) -> Notifications:
        """Outbox delivery: register merchants' callback URLs, see delivery status."""
        notifications = self._ctx.notifications
        assert isinstance(notifications, Notifications)
        return notifications

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        channels: Iterable[Channel],
        policy: OrderPolicy | None = None,
        config: EngineConfig | None = None,
        runtime: Runtime | None = None,
        ids: IdSource | None = None,
        synchronous: str = "FULL",
        voucher_link: Callable[[Directory], VoucherLink] | None = None,
        subscribers: Mapping[str, Subscriber] | None = None,
        risk: RiskConfig | None = None,
        providers: Iterable[Any] = (),
    ) -> Engine:
        """Open (or create) the database at ``path`` and resume every unfinished order.

        Resuming: holds whose order already decided to confirm them get their expiry pushed
        out; every order with work left is started (it re-issues what was in flight and
        re-arms its timers); every account with pending holds is started (it expires those
        whose time has passed). ``providers``: external voucher providers
        (``actors.provider.VoucherProvider``, e.g. from ``load_providers``); an open without
        one that unsettled orders use is refused (``ProvidersMissing``).
        """
        by_name = _channels_by_name(channels)
        check_instance(policy or OrderPolicy(), OrderPolicy, "policy")
        check_instance(config or EngineConfig(), EngineConfig, "config")
        if risk is not None:
            check_instance(risk, RiskConfig, "risk")
        if synchronous not in SYNCHRONOUS_MODES:
            raise InvalidRequest(f"synchronous must be one of {SYNCHRONOUS_MODES}, got "
                                 f"{shown(synchronous)}")
        config = config or EngineConfig()
        policy = _with_channel_schedules(policy or OrderPolicy(), by_name)
        slots = provider_slots(providers, policy)  # external voucher providers (actors.provider)
        subscribers = dict(subscribers or {})
        withholds = any(signs_agreements(c) for c in by_name.values())
        if WITHHOLD_SUBSCRIBER in subscribers:
            raise InvalidRequest(f"subscriber name {WITHHOLD_SUBSCRIBER!r} is the engine's")
        policy = dataclasses.replace(
            policy, fallbacks_max=config.routing.fallbacks_max,
            channels_without_close=policy.channels_without_close | _without_close(by_name),
            voucher_providers=frozenset(slots))
        store = Store(path, synchronous=synchronous,  # first: a refused file starts nothing
                      group_commit=config.group_commit)
        if "open-without-needed-channel" not in config.planted_bugs | policy.planted_bugs:
            _check_channels_of_unsettled(store, by_name)
        if "open-with-non-authorising-channel" not in config.planted_bugs | policy.planted_bugs:
            _check_authorisation_channels(store, by_name)
        check_providers_of_unsettled(store, slots)
        runtime = runtime or PooledRuntime(actor_threads=config.actor_threads)
        for channel in by_name.values():  # a simulated wallet without a world of its own
            lend = getattr(channel, "use_runtime", None)
            if callable(lend):
                lend(runtime)
        ctx_holder: list[Context] = []

        def factory(key: Key, kept: Any) -> ActorBehaviour:
            if key[0] == "order":
                return OrderBehaviour(key, ctx_holder[0], kept)
            if key[0] == "provider":
                return ProviderBehaviour(key, ctx_holder[0])
            assert kept is None, "only orders are passivated"
            return AccountBehaviour(key, ctx_holder[0])

        ctx = Context(store=store, runtime=runtime, directory=Directory(runtime, factory),
                      channels=by_name, policy=policy or OrderPolicy(),
                      config=config,
                      log=get_logger().bind(db=store.path))
        ctx.providers = slots
        ctx.voucher_link = ProviderRouting((voucher_link or DirectVoucherLink)(ctx.directory),
                                           ctx.directory, frozenset(slots))
        engines: list[Engine] = []
        if withholds:  # the auto-retry hears every attempt's end through the outbox
            subscribers[WITHHOLD_SUBSCRIBER] = lambda event: engines[0]._withholder.on_event(
                event)
        ctx.notifications = Notifications(ctx, subscribers)
        ctx.health = ChannelHealth(by_name, config.breaker, runtime.now_ms)
        ctx_holder.append(ctx)
        engine = cls(ctx, ids or RandomIds(), risk)
        engines.append(engine)
        engine._resume()
        ctx.notifications.start()
        if withholds:
            engine._withholder.resume()
        return engine

    def _resume(self) -> None:
        ctx = self._ctx
        now_ms = ctx.runtime.now_ms()
        extended = ctx.store.extend_holds_of_unsettled_orders(now_ms, ctx.policy.hold_grace_ms)
        orders = ctx.store.unsettled_order_ids()
        self._resume_feeder = ResumeFeeder(
            ctx.directory, ctx.runtime, orders, grace_ms=ctx.policy.hold_grace_ms, log=ctx.log,
            in_flight_max=in_flight_for(ctx.config.actor_threads))
        self._resume_feeder.start()
        accounts = ctx.store.accounts_with_pending_holds()
        for account_id in accounts:
            ctx.directory.tell(("account", account_id), ExpireDue())
        ctx.log.info("engine.opened", resumed_orders=len(orders),
                     accounts_with_holds=len(accounts), holds_extended=extended)

    @property
    def is_open(self) -> bool:
        """Until ``shutdown`` (or ``abandon``): afterwards every call raises ``EngineClosed``."""
        return not self._closed

    def resuming(self) -> int:
        """Unsettled orders of the last ``open`` whose activation is not handled yet: the
        resume is paced (``actors.resume``), so ``open`` returns before it ends."""
        return self._resume_feeder.pending()

    def shutdown(self) -> None:
        """Stop accepting work and stop every actor; unfinished orders resume on next open."""
        if self._closed:
            return
        self._closed = True
        refs = self._ctx.directory.close()
        if self._risk is not None:
            self._risk.shutdown()
        self._ctx.notifications.stop()
        self._ctx.runtime.shutdown()
        for ref in refs:
            ref.stop()
        self._ctx.store.close()
        self._ctx.log.info("engine.shut_down", actors_stopped=len(refs))

    def abandon(self) -> None:
        """Simulate a crash: nothing commits from now on, in-flight messages are lost.

        For tests and the simulator. The file is left as a crash would leave it; open a new
        engine on it to recover.
        """
        self._closed = True
        # Refuse new messages first: an actor started after the kill would die loading its
        # state, and a caller racing the crash must see EngineClosed, not a dead actor.
        refs = self._ctx.directory.close()
        if self._risk is not None:
            self._risk.shutdown()
        self._ctx.store.kill()
        self._ctx.notifications.stop()
        self._ctx.runtime.shutdown()
        for ref in refs:
            ref.stop()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def _check_open(self) -> None:
        if self._closed:
            raise EngineClosed("the engine is shut down")

    @property
    def store(self) -> Store:
        """The engine's database, for inspection (reports, tests, the simulator's oracle)."""
        return self._ctx.store

    @property
    def runtime(self) -> Runtime:
        return self._ctx.runtime

    # ------------------------------------------------------------------ voucher accounts

    def open_account(self, account_id: str, unit: str, *,
                     minor_per_unit: int | None = None) -> AccountView:
        """Create a voucher account in ``unit`` (the currency, or e.g. ``"POINTS"``).

        ``minor_per_unit`` says what one unit is worth in minor units of an order's currency
        (points); ``None`` for money vouchers, which pay only orders in their own currency:
        their unit must then be a known currency (``InvalidRequest`` otherwise: a money
        voucher in a currency nobody knows could never pay). Opening an existing account
        with the same parameters returns it.
        """
        self._check_open()
        check_id(account_id, "account_id")
        if provider_of(account_id, self._ctx.providers) is not None:
            raise InvalidRequest(f"{account_id} names an account at voucher provider "
                                 f"{provider_of(account_id, self._ctx.providers)!r}: it is "
                                 "the provider's, not one this engine opens")
        check_unit(unit, "unit")
        if minor_per_unit is None:
            check_currency(unit, self._ctx.config.currency_table,
                           "unit (of a money voucher: without minor_per_unit)")
        else:
            check_amount(minor_per_unit, "minor_per_unit")
        account = self._ctx.store.create_account(
            VoucherAccount(account_id, unit, minor_per_unit), self._ctx.runtime.now_ms())
        return AccountView.of(account)

    def fund(self, account_id: str, amount: int, *, funding_id: str) -> AccountView:
        """Top up an account by ``amount`` of its unit; idempotent by ``funding_id``."""
        check_id(account_id, "account_id")
        check_amount(amount)
        check_id(funding_id, "funding_id (it makes a retried top-up safe)")
        return self._ask_account(account_id, Fund(funding_id, amount))  # type: ignore[no-any-return]

    def set_account_status(self, account_id: str, status: str) -> str:
        """``active``, ``frozen`` or ``closed`` (final); returns the previous status. A
        frozen or closed account takes nothing new (holds, debits, credits, top-ups:
        ``AccountFrozen``, ``AccountClosed``); what was decided before still completes."""
        check_id(account_id, "account_id")
        previous = self._ask_account(account_id, SetAccountStatus(status))
        assert isinstance(previous, str)
        return previous

    def pre_hold(self, account_id: str, amount: int, *, hold_id: str | None = None,
                 ttl_ms: int | None = None) -> HoldView:
        """Hold vouchers before ordering (the user ticked "use points").

        Reference the hold in a ``VoucherPart(mode=LegMode.PRE_HELD, hold_id=...)`` at submit;
        an order adopts it and confirms or cancels it. A hold no order adopts expires after
        ``ttl_ms``. Idempotent by ``hold_id``.
        """
        check_id(account_id, "account_id")
        check_amount(amount)
        check_optional_id(hold_id, "hold_id")
        cfg = self._ctx.config
        ttl = min(cfg.pre_hold_ttl_ms, cfg.pre_hold_ttl_ms_max) if ttl_ms is None else ttl_ms
        if isinstance(ttl, bool) or not isinstance(ttl, int) or not 0 < ttl <= cfg.pre_hold_ttl_ms_max:
            raise InvalidRequest(f"ttl_ms must be 1..{cfg.pre_hold_ttl_ms_max}")
        if hold_id is None:
            hold_id = self._ids.new_hold_id()
        expires = self._ctx.runtime.now_ms() + ttl
        return self._ask_account(account_id, PreHold(hold_id, amount, expires))  # type: ignore[no-any-return]

    def release_hold(self, account_id: str, hold_id: str) -> HoldView:
        """Release a pre-hold that no order adopted; idempotent."""
        check_id(account_id, "account_id")
        check_id(hold_id, "hold_id")
        return self._ask_account(account_id, ReleaseHold(hold_id))  # type: ignore[no-any-return]

    def get_account(self, account_id: str) -> AccountView:
        self._check_open()
        check_id(account_id, "account_id")
        account = self._ctx.store.load_account(account_id)
        if account is None:
            raise UnknownAccount(f"no voucher account {account_id}")
        return AccountView.of(account)

    def get_hold(self, account_id: str, hold_id: str) -> HoldView:
        """The caller's pre-hold ``hold_id``; the engine's own fences are not holds of the
        caller and are never found here, whatever the id."""
        self._check_open()
        check_id(account_id, "account_id")
        check_id(hold_id, "hold_id")
        fence = self._ctx.store.load_fence(account_id, FenceKey.user(hold_id))
        if fence is None:
            raise UnknownHold(f"no hold {hold_id} on account {account_id}")
        return HoldView.of(fence)

    def _ask_account(self, account_id: str, message: Any) -> Any:
        self._check_open()
        if self._ctx.store.load_account(account_id) is None:
            raise UnknownAccount(f"no voucher account {account_id}")
        return self._ctx.directory.ask(("account", account_id), message,
                                       self._ctx.config.ask_timeout_s)

    # ------------------------------------------------------------------ agreements

    def sign_agreement(self, user_id: str, channel: str) -> Agreement:
        """Sign a payment agreement of ``user_id`` on ``channel`` (an ``AgreementChannel``):
        stored ``signing``, then the wallet is asked; its answer (or later its callback)
        makes it ``active`` or ``failed``. A live agreement of the same user and channel is
        returned instead of a second one."""
        self._check_open()
        return self._withholder.sign(user_id, channel)

    def unsign_agreement(self, agreement_id: str) -> Agreement:
        """End an active agreement: ``unsigning`` at once, ``terminated`` once the wallet
        confirms (its answer or callback). ``AgreementInactive`` if it is not active."""
        self._check_open()
        return self._withholder.unsign(agreement_id)

    def get_agreement(self, agreement_id: str) -> Agreement:
        """The agreement (``AgreementNotFound`` if no agreement has this id)."""
        return self._withholder.get(agreement_id)

    def agreements_of(self, user_id: str) -> list[Agreement]:
        """The user's agreements in every state, oldest first."""
        return self._withholder.of(user_id)

    def handle_agreement_callback(self, channel: str, agreement_id: str, user_id: str,
                                  status: AgreementStatus) -> Agreement:
        """A wallet's callback on an agreement: ``signed``, ``failed`` (for one signing) or
        ``terminated`` (unsigned as asked, or revoked by the user in the wallet app).
        Checked first: an unknown agreement is ``AgreementNotFound``, another channel or
        user ``AgreementMismatch``, a status that does not apply ``IllegalTransition``;
        nothing changes then. The same callback again returns the agreement unchanged."""
        self._check_open()
        return self._withholder.callback(channel, agreement_id, user_id, status)

    def withhold(self, merchant_id: str, merchant_order_no: str, user_id: str,
                 amount_minor: int, currency: str, title: str, *,
                 agreement_ids: Sequence[str] | None = None) -> Withholding:
        """Charge ``user_id`` on an agreement (代扣), retrying by itself (see README,
        "Withholding and agreements"). ``agreement_ids``: the user's agreements to use, in
        order of preference, the first active; ``None``: all the user's active ones, oldest
        first. Returns the withholding (state ``paying``); attempt 1 is submitted. The
        same call again returns it; the key with other parameters is
        ``IdempotencyConflict``."""
        self._check_open()
        return self._withholder.withhold(merchant_id, merchant_order_no, user_id,
                                         amount_minor, currency, title, agreement_ids)

    def get_withholding(self, merchant_id: str, merchant_order_no: str) -> Withholding:
        """The withholding now (``UnknownWithholding`` if none has this key)."""
        return self._withholder.get_withholding(merchant_id, merchant_order_no)

    # ------------------------------------------------------------------ payments

    def submit(self, request: PaymentRequest) -> Receipt:
        """Accept a (combined) payment: validate, commit, acknowledge; the rest runs async.

        The same request again (same merchant_id and merchant_order_no, same parameters)
        returns an equal receipt, however many threads send it at once; the same key with
        other parameters raises ``IdempotencyConflict``. Above capacity it raises
        ``Overloaded`` at once, having created nothing (``actors.admission``).
        """
        self._check_open()
        self._refuse_withhold_scenario(request)
        observer = self._ctx.observer
        if not observer.enabled:
            return self._submit_withholding(request)
        started = time.perf_counter()
        receipt = self._submit_withholding(request)
        notify(observer.submitted, time.perf_counter() - started)
        return receipt

    @staticmethod
    def _refuse_withhold_scenario(request: PaymentRequest) -> None:
        check_instance(request, PaymentRequest, "the request")
        details = None if not isinstance(request.cash, CashPart) else request.cash.details
        if isinstance(details, PayDetails) and details.scenario is PayScenario.WITHHOLD:
            raise InvalidRequest("a withhold payment is made by Engine.withhold, on an "
                                 "active agreement, not submitted")

    def _check_submittable(self, request: PaymentRequest) -> None:
        """What every submit checks of a request before anything is looked up: its fields,
        a merchant id that is not reserved, the merchant's and user's status."""
        ctx = self._ctx
        check_request(request, policy=ctx.policy, currencies=ctx.config.currency_table)
        if request.merchant_id == TRANSFER_MERCHANT:
            raise InvalidRequest(f"merchant id {TRANSFER_MERCHANT!r} is reserved for "
                                 "transfers (Engine.transfer)")
        self._gate.check_parties(request.merchant_id, request.user_id)

    def _submit_withholding(self, request: PaymentRequest) -> Receipt:
        """``submit`` without the refusal of the WITHHOLD scenario: for ``Withholder``."""
        self._check_open()
        with self._admission.admit():  # first: a refusal above capacity must cost nothing
            self._check_submittable(request)
            return self._submit(request)

    @property
    def admission_stats(self) -> AdmissionStats:
        """Submits admitted and refused (``Overloaded``) since open."""
        return self._admission.stats

    def _submit(self, request: PaymentRequest, nonce: NonceUse | None = None) -> Receipt:
        """Create the order (or find the one its key names). ``nonce``: a signed request's,
        stored with the new order in one transaction, or on its own when the order exists
        (after its pay window is checked)."""
        ctx = self._ctx
        retried = self._retried(request, nonce)
        if retried is not None:
            return retried
        order, route = self._built(request, self._ids.new_order_id(),
                                   self._ids.new_payment_serial)
        now_ms = order.created_at_ms
        live, bound = ctx.directory.count("order"), ctx.config.live_orders_max
        if live >= bound:  # a retry was answered before (``_retried``): this one is new
            raise self._admission.refuse_live_orders(live, bound)
        self._guard_user_duplicates(request, now_ms)
        if nonce is not None:
            self._gate.nonces.reserve(now_ms)  # a full table refuses (Overloaded) first
        with self._one_assessment(request):
            order = self._assess_risk(request, order, now_ms)
            # Handed over before the commit makes the order visible: the first actor that
            # starts for it, whoever's message starts it, takes exactly the committed state.
            ctx.fresh_orders.put(order)
            try:
                existing = ctx.store.insert_order(
                    order, now_ms, () if route is None else (
                        Transition("route", route.method, route.channel, route.cause),),
                    may_follow=lambda latest: check_next_attempt(
                        latest, request, planted_bugs=ctx.config.planted_bugs),
                    nonce=nonce)
            except BaseException:
                ctx.fresh_orders.take(order.order_id)
                raise
        if existing is not None:
            ctx.fresh_orders.take(order.order_id)  # never stored: no actor will want it
            if nonce is not None:
                self._check_payable(existing, now_ms)
                self._gate.nonces.use(nonce, now_ms)
            return Receipt.of(existing)
        if nonce is not None:
            self._gate.nonces.added()
        ctx.log.info("transition", order_id=order.order_id, part="order", from_state="",
                     to_state=order.state.value, cause=order.cause,
                     merchant_order_no=order.merchant_order_no)
        try:
            ctx.directory.tell(("order", order.order_id), Activate())
        except EngineClosed:
            # Shut down between the commit and the start: the order is accepted and durable,
            # and the next Engine.open resumes it. Saying "refused" now would be a lie.
            ctx.log.info("submit.accepted_during_shutdown", order_id=order.order_id)
        return Receipt.of(order)

    def _built(self, request: PaymentRequest, order_id: str,
               new_serial: Callable[[], str], *, trial: bool = False
               ) -> tuple[PaymentOrder, RouteChoice | None]:
        """The order ``request`` makes, with its route, or the typed error that refuses it:
        everything a submit checks before its order is stored (the quote, the route, the
        channel, the accounts, the parts). Stores nothing. ``trial``: only to see whether it
        would be refused (``change_order``), so a half-open channel's single probe is not
        spent on it."""
        ctx = self._ctx
        priced = None if request.quote is None else self._quoted_terms(request)
        route = self._route(request, order_id, trial=trial)
        channel = route.channel if route is not None else (
            None if request.cash is None else request.cash.channel)
        if request.cash is not None and channel not in ctx.channels:
            raise InvalidRequest(f"unknown channel {request.cash.channel!r}; "
                                 f"known: {sorted(ctx.channels)}, methods: "
                                 f"{sorted(ctx.config.routing.methods)}")
        if request.authorise and channel is not None and not authorises(ctx.channels[channel]):
            raise AuthorisationUnsupported(f"channel {channel!r} cannot pre-authorise (it "
                                           "does not implement AuthorisationChannel)")
        if request.cash is not None and request.cash.details is not None and (
            channel not in self._channels_taking_details
        ):
            raise InvalidRequest(f"channel {channel!r} takes no pay details (its "
                                 "pay() has no 'details' parameter)")
        names = [part.account_id for part in request.vouchers]
        if request.credit_account is not None:
            names.append(request.credit_account)
        units = provider_units(request, ctx.providers)
        units.update(ctx.store.account_units([n for n in names if n not in units]))
        missing = [name for name in names if name not in units]
        if missing:
            raise UnknownAccount(f"no voucher account {missing[0]}")
        order = build_order(request, order_id=order_id, payment_serial=new_serial(),
                            now_ms=ctx.runtime.now_ms(), accounts=units, policy=ctx.policy,
                            currencies=ctx.config.currency_table, cash_channel=channel,
                            priced=priced)
        if route is not None:  # a routed payment may fall back to the method's next route
            order = dataclasses.replace(order, method=route.method)
        return order, route

    def _quoted_terms(self, request: PaymentRequest) -> PricedSale:
        """The terms of the quote ``request`` names, checked against it (its own merchant
        and user, unexpired now, the combination's total and points); a ``QuoteRefused``
        otherwise. Checked after ``_retried``: a retry of an accepted submit gets its
        receipt even once the quote has expired. A quote another trade order claimed is
        refused here; the claim itself is written with the order (``Store.insert_order``),
        so a submit refused on the way claims nothing."""
        assert request.quote is not None
        ctx = self._ctx
        quote = quotes.load(ctx.store, request.quote.quote_id)
        if quote is None:
            raise UnknownQuote(f"no quote {request.quote.quote_id} (never made, or pruned "
                               "after it expired)")
        points = sum(part.amount for part in request.vouchers
                     if part.account_id == quote.points_account_id)
        now_ms = ctx.runtime.now_ms()
        if "quote-price-drift" in ctx.config.planted_bugs:  # the bug: priced anew at submit
            quote = make_quote(quote.merchant_id, quote.user_id, quote.sale, Benefits(),
                               ctx.config.discounts, quote_id=quote.quote_id, now_ms=now_ms)
        combination = check_quote_use(
            quote, request.quote.combination_id, merchant_id=request.merchant_id,
            user_id=request.user_id, total_minor=request.total_minor, points=points,
            now_ms=now_ms)
        quotes.check_unclaimed(ctx.store, quote.quote_id, request.merchant_order_no)
        return PricedSale(quote.sale, quote.quote_id, combination.combination_id,
                          combination.discounts)

    # ------------------------------------------------------------------ quotes

    def quote(self, merchant_id: str, user_id: str, sale: FuelSale,
              benefits: Benefits | None = None) -> Quote:
        """The discount combinations for ``sale`` now (``engine.discounts.make_quote`` with
        ``EngineConfig.discounts``), stored as a snapshot before it is returned: a submit
        naming it (``PaymentRequest.quote``) is charged its amounts until it expires.
        Creates no order and holds nothing. Under admission (``Overloaded`` above capacity,
        or with ``quotes_max`` unexpired quotes stored)."""
        self._check_open()
        ctx = self._ctx
        with self._admission.admit():
            if benefits is not None:
                self._check_points_account(check_benefits(benefits))
            now_ms = ctx.runtime.now_ms()
            made = make_quote(merchant_id, user_id, sale,
                              Benefits() if benefits is None else benefits,
                              ctx.config.discounts, quote_id=self._new_quote_id(),
                              now_ms=now_ms)
            quotes.save(ctx.store, made, now_ms=now_ms, quotes_max=ctx.config.quotes_max)
            return made

    def _check_points_account(self, benefits: Benefits) -> None:
        """The points a quote offers must be payable: an account of this engine, its points
        worth what the benefits say (else the submit's parts would not add up)."""
        points = benefits.points
        if points is None:
            return
        unit = self._ctx.store.account_units([points.account_id]).get(points.account_id)
        if unit is None:
            raise UnknownAccount(f"no voucher account {points.account_id} (the benefits' "
                                 "points account)")
        if unit.minor_per_unit != points.minor_per_point:
            raise InvalidRequest(
                f"points of {points.account_id} are worth {unit.minor_per_unit} minor units "
                f"each, not {points.minor_per_point}")

    def get_quote(self, quote_id: str) -> Quote:
        """A stored quote, expired or not, until it is pruned (``UnknownQuote`` then)."""
        self._check_open()
        check_id(quote_id, "quote_id")
        found = quotes.load(self._ctx.store, quote_id)
        if found is None:
            raise UnknownQuote(f"no quote {quote_id}")
        return found

    def shift_report(self, station_id: str, shift_id: str) -> ShiftReport:
        """What ``station_id`` took during ``shift_id`` (the orders whose ``FuelSale`` names
        them), from the ledger: see ``engine.shift_report``. Reads only."""
        self._check_open()
        check_id(station_id, "station_id")
        check_id(shift_id, "shift_id")
        return reports.report_shift(self._ctx.store, station_id, shift_id,
                                    planted_bugs=self._ctx.config.planted_bugs)

    def _new_quote_id(self) -> str:
        new_quote_id = getattr(self._ids, "new_quote_id", None)
        return f"quote_{uuid.uuid4().hex}" if new_quote_id is None else str(new_quote_id())

    @contextlib.contextmanager
    def _one_assessment(self, request: PaymentRequest) -> Iterator[None]:
        """With a risk gate: the submits of one attempt of a trade order are assessed one at a
        time, each up to its insert. A retry that comes while the first submit is still with
        the risk service waits for that insert and then gets its receipt (``_assess_risk``
        skips an attempt that exists), instead of asking again: a second step-up would text
        the user a second code, and only the stored order's would work. Bounded: one entry
        per submit in flight (admission), a wait of at most the gate's own calls and then
        ``Overloaded``."""
        if self._risk is None:
            yield
            return
        key = (request.merchant_id, request.merchant_order_no, request.attempt)
        wait_s = 2 * self._risk.config.hook_timeout_ms / 1000 + _ASSESSMENT_SLACK_S
        while True:
            with self._assessing_lock:
                busy = self._assessing.get(key)
                if busy is None:
                    mine = self._assessing[key] = threading.Event()
                    break
            if not busy.wait(wait_s):
                raise Overloaded(
                    f"a submit of {request.merchant_id}/{request.merchant_order_no} attempt "
                    f"{request.attempt} is still being assessed: retry later")
        try:
            yield
        finally:
            with self._assessing_lock:
                del self._assessing[key]
            mine.set()

    def _assess_risk(self, request: PaymentRequest, order: PaymentOrder, now_ms: int
                     ) -> PaymentOrder:
        """The risk gate (``actors.risk_gate``): ``order`` as the gate decided (a step-up
        starts in ``needs_verification``), or ``RiskBlocked`` with nothing created. A retry
        of an accepted submit is not assessed again: it gets its receipt (another attempt
        of the same trade order is a new payment: it is)."""
        store = self._ctx.store
        if self._risk is None or store.attempt_order_id(
                request.merchant_id, request.merchant_order_no, request.attempt) is not None:
            return order
        if request.attempt != 1:
            # An attempt the insert would refuse must not reach the risk service (which may
            # text the user a code): checked here first, and again in the insert's transaction.
            latest_id = store.order_id_for_merchant(request.merchant_id,
                                                    request.merchant_order_no)
            latest = None if latest_id is None else store.load_order(latest_id)
            if latest is None:
                raise AttemptRefused(
                    f"trade order {request.merchant_id}/{request.merchant_order_no} was never "
                    f"submitted: attempt {request.attempt} needs attempt 1 first")
            check_next_attempt(latest, request, planted_bugs=self._ctx.config.planted_bugs)
        assessment = self._risk.assess(request, order_id=order.order_id, now_ms=now_ms)
        return with_risk(order, assessment.verification, assessment.note)

    def verify(self, order_id: str, code: str) -> OrderView:
        """The user's step-up code for an order in ``needs_verification``.

        The right code: the order goes on (holds, then the channel) and its view is returned
        (the right code again after that returns it again). A wrong one raises
        ``VerificationFailed`` with ``attempts_left``; the last wrong one fails the order and
        releases everything (``attempts_left`` 0, ``state`` ``failed``). An order not waiting
        for a code (never stepped up, failed, expired, closed) raises ``IllegalTransition``;
        so does a code that comes after the verification or pay window ended (the order is
        then failed or closed). Concurrent verifies and the window's timer are decided by
        the order's mailbox, one at a time. ``Overloaded`` means the code was withdrawn
        before the order looked at it (``_ask_claimed``): the caller's retry counts once.
        """
        check_id(order_id, "order_id")
        check_code(code)
        view = self._ask_claimed(order_id, VerifyCode(code))
        verification = view.verification
        assert verification is not None
        if verification.status == VerificationStatus.PASSED:
            return view
        if verification.status == VerificationStatus.PENDING:
            raise VerificationFailed(
                f"wrong verification code for order {order_id}; "
                f"{verification.attempts_left} attempts left", verification.attempts_left,
                view.state)
        if verification.status == VerificationStatus.FAILED:
            raise VerificationFailed(f"wrong verification code for order {order_id}: no "
                                     "attempts left, the order failed", 0, view.state)
        raise IllegalTransition(f"order {order_id} is {view.state}: its verification "
                                f"{verification.status} before the code came")

    def _ask_claimed(self, order_id: str, event: Any) -> OrderView:
        """Ask the order under a ``Claim`` (``actors.claim``): ``Overloaded`` only if the
        event was withdrawn unhandled, so a retry of the call is handled once; an event the
        actor took is answered, waiting up to ``ask_timeout_s`` more for its commit."""
        claim = Claim()
        try:
            return self._ask_order(order_id, Claimed(claim, event))
        except Overloaded:
            if claim.withdraw():
                raise Overloaded(f"order {order_id} did not take the request within "
                                 f"{self._ctx.config.ask_timeout_s} s; nothing was done: "
                                 "retry it") from None
        view = claim.outcome(self._ctx.config.ask_timeout_s)
        assert isinstance(view, OrderView)
        return view

    def _route(self, request: PaymentRequest, order_id: str, *, trial: bool = False
               ) -> RouteChoice | None:
        """The channel for a cash part that names a payment method (``EngineConfig.routing``);
        ``None`` for one that names its channel. ``NoRoute`` when no route can take it (see
        ``actors.routes.cannot_take`` besides the routes' own conditions). A retry of an
        accepted order never gets here (``_retried``): its stored channel stands. ``trial``:
        nothing is paid on the choice, so the channel's health is not told."""
        ctx = self._ctx
        if request.cash is None or request.cash.channel not in ctx.config.routing.methods:
            return None
        return choose_for(ctx, request.cash.channel, request.cash.amount_minor,
                          request.currency, request.cash.details, order_id,
                          taking_details=self._channels_taking_details, probe=not trial)

    def _guard_user_duplicates(self, request: PaymentRequest, now_ms: int) -> None:
        """Warn (``DuplicateSuspected``) of a new order like one the user made moments ago.

        A retry of an accepted submit was answered before (``_retried``) and is never
        warned. The guard is advisory: two such submits racing each other may both pass.
        """
        window_ms = self._ctx.config.duplicate_guard_window_ms
        store = self._ctx.store
        if request.confirm_duplicate or window_ms <= 0 or request.attempt != 1:
            return  # another attempt of the same trade: not a new purchase
        similar = suspected_duplicates(request, store.recent_user_orders(
            request.user_id, now_ms - window_ms, request.total_minor, request.currency),
            now_ms=now_ms, window_ms=window_ms)
        if similar:
            first = similar[0]
            raise DuplicateSuspected(
                f"user {request.user_id} has an order of {request.total_minor} "
                f"{request.currency} from {(now_ms - first.created_at_ms) // 1000} s ago "
                f"({first.merchant_order_no}, {first.state.value}); submit again with "
                "confirm_duplicate=True to pay anyway",
                tuple(o.order_id for o in similar))

    def close(self, order_id: str) -> OrderView:
        """The user (or cashier) closes an unpaid order. A paid order raises IllegalTransition."""
        check_id(order_id, "order_id")
        return self._ask_order(order_id, CloseOrder(CloseCause.USER))

    def capture(self, order_id: str, amount_minor: int, *, capture_id: str) -> OrderView:
        """Capture ``amount_minor`` (what the pump dispensed) of an authorised
        pre-authorisation; the rest of every hold is released. ``capture_id`` is the
        caller's idempotency key: the same capture again answers the same, the same id with
        another amount is ``IdempotencyConflict``, another id ``AlreadyCaptured``. Above
        the authorisation: ``CaptureAboveAuthorised``; after a void or expiry:
        ``AuthorisationVoided``; before it is authorised: ``IllegalTransition``. 0 voids.
        Returns once the capture is decided and committed (``capturing``); the order
        succeeds when the channel captured. Any refusal leaves the order untouched."""
        check_id(order_id, "order_id")
        check_id(capture_id, "capture_id")
        return self._ask_claimed(order_id, CaptureAuthorisation(capture_id, amount_minor))

    def void(self, order_id: str) -> OrderView:
        """Void a pre-authorisation that is not captured: holds released, the channel's
        authorisation voided (``voiding``, then ``closed``). Idempotent; ``AlreadyCaptured``
        once a capture was decided."""
        check_id(order_id, "order_id")
        return self._ask_claimed(order_id, VoidAuthorisation())

    def refund(self, order_id: str, refund_no: str, amount_minor: int, *,
               reason: str = "") -> RefundView:
        """Give back ``amount_minor`` of a succeeded payment by the original route.

        ``refund_no`` is the merchant's idempotency key for this refund: asking again with
        the same parameters returns the same refund; different parameters raise
        ``IdempotencyConflict``. Several partial refunds may add up to at most what was
        paid (``RefundRefused`` beyond). The cash part goes first, through the channel's
        refund (its callback, queries and reconciliation settle it); vouchers go back to
        their accounts once the cash part succeeded. Returns at once with the refund
        REFUNDING (or already done); follow it with ``get_order(...).refund(refund_no)``.
        Refunds of one order are serialised by its actor, so none can over-refund.
        """
        check_id(order_id, "order_id")
        request = RequestRefund(refund_no, amount_minor, reason)
        check_refund_request(request)
        order = self._ctx.store.load_order(order_id)
        if order is not None:
            if self._gate.restricted:  # a frozen or closed merchant gives no money back
                self._gate.check_parties(order.merchant_id, None)
            self._check_refund_channel(order)
            check_recharge_refund(self._ctx.store, order, refund_no, amount_minor)
        view = self._ask_order(order_id, request)
        return view.refund(refund_no)

    def change_order(self, previous_order_id: str, request: PaymentRequest) -> Receipt:
        """The user changed an unpaid order (another nozzle, amount, method or discount): close
        ``previous_order_id``, which releases its holds and pre-deducted vouchers, and submit
        ``request`` in its place, in one call, so locked points are never left behind by an
        edit (R-FUEL, pre-deduct mode). ``request`` is checked first (nothing is closed for a
        malformed one) and must be the same merchant's and user's. A previous order that is
        paid raises ``IllegalTransition`` and nothing is submitted; one already closed or
        failed is left as it is. A retry of the same call returns the same receipt. If the
        new submit is refused after the close (``Overloaded``, a risk block, a quote that
        expired...), the previous order stays closed: submit the new one again."""
        self._check_open()
        check_id(previous_order_id, "previous_order_id")
        self._refuse_withhold_scenario(request)
        self._check_submittable(request)
        previous = self._ctx.store.load_order(previous_order_id)
        if previous is None:
            raise UnknownOrder(f"no payment order {previous_order_id}")
        if (previous.merchant_id, previous.user_id) != (request.merchant_id, request.user_id):
            raise InvalidRequest(
                f"order {previous_order_id} is {previous.merchant_id}/{previous.user_id}'s: a "
                "change replaces an order of the same merchant and user")
        if (previous.merchant_order_no, previous.attempt) == (request.merchant_order_no,
                                                              request.attempt):
            raise InvalidRequest(
                f"the request is order {previous_order_id}'s own (merchant order number "
                f"{request.merchant_order_no}, attempt {request.attempt}): a change needs a "
                "new merchant order number or the next attempt")
        retried = self._retried(request, None)  # the same change again: its receipt
        if retried is None:
            self._built(request, "change-trial", lambda: "change-trial", trial=True)
        if "change-keeps-holds" not in self._ctx.config.planted_bugs:
            self.close(previous_order_id)
        return self.submit(request)

    def _check_refund_channel(self, order: PaymentOrder) -> None:
        """A refund's cash part goes back through the order's channel: one this engine was
        not given is refused (``ChannelsMissing``) before the order is asked."""
        cash = next((leg for leg in order.legs if leg.is_cash), None)
        if cash is not None and cash.channel is not None and (
                cash.channel not in self._ctx.channels):
            raise ChannelsMissing(
                f"order {order.order_id} was paid through channel {cash.channel!r}, which "
                "this engine was not given: its refund cannot go back", {cash.channel: 1})

    def recharge(self, merchant_id: str, merchant_order_no: str, account_id: str,
                 amount_minor: int, currency: str, cash: CashPart, *,
                 user_id: str | None = None, title: str = "recharge",
                 pay_window_ms: int | None = None, attempt: int = 1,
                 confirm_duplicate: bool = False) -> Receipt:
        """Top up the stored-value account ``account_id`` by ``amount_minor``, paid by
        ``cash`` (channel or method, and pay details, as for a payment).

        A payment order like any other (idempotent by merchant order number and attempt,
        risk, routing, polling), whose account is credited exactly once and only after the
        cash success is committed; then it is ``succeeded``. A success after the close is
        refunded and credits nothing. ``user_id`` defaults to the account id; the duplicate
        guard and ``confirm_duplicate`` are as for ``submit``. Runs on the caller's thread;
        returns at once with the receipt.
        """
        request = PaymentRequest(merchant_id, merchant_order_no,
                                 account_id if user_id is None else user_id, currency,
                                 amount_minor, title, cash, pay_window_ms=pay_window_ms,
                                 confirm_duplicate=confirm_duplicate, attempt=attempt,
                                 credit_account=account_id)
        self._check_open()
        check_request(request, policy=self._ctx.policy,
                      currencies=self._ctx.config.currency_table)  # before any look-up
        if self._retried(request, None) is None:  # a retry is answered as it was
            check_recharge_target(self._ctx.store, account_id)
        return self.submit(request)

    def transfer(self, transfer_id: str, from_account: str, to_account: str,
                 amount: int) -> Receipt:
        """Move ``amount`` between two money accounts of one currency: held on the source
        (Try), credited to the target, confirmed on the source; or, if the credit cannot
        happen, the hold is voided. All or nothing, idempotent by ``transfer_id`` (other
        parameters: ``IdempotencyConflict``). A new transfer is refused before anything is
        created (see ``actors.beneficiary.check_transfer``). Returns at once; follow it with
        ``get_transfer(transfer_id)``. Runs on the caller's thread.
        """
        self._check_open()
        store = self._ctx.store
        source = transfer_source(store, transfer_id, from_account, to_account, amount)
        request = transfer_request(transfer_id, from_account, to_account, amount, source)
        retried = self._retried(request, None)
        if retried is not None:  # answered as it was, whatever the balances are now
            return retried
        check_transfer(store, source, to_account, amount)
        with self._admission.admit():
            check_request(request, policy=self._ctx.policy,
                          currencies=self._ctx.config.currency_table)
            return self._submit(request)

    def get_transfer(self, transfer_id: str) -> OrderView:
        """The order of the transfer ``transfer_id`` (``UnknownOrder`` if never made)."""
        return self.find_order(TRANSFER_MERCHANT, transfer_id)

    def request_close(self, order_id: str) -> None:
        """Enqueue a user close without waiting for it (an illegal one is logged, not raised)."""
        self._check_open()
        check_id(order_id, "order_id")
        if self._ctx.store.load_order(order_id) is None:
            raise UnknownOrder(f"no payment order {order_id}")
        self._ctx.directory.tell(("order", order_id), CloseOrder(CloseCause.USER))

    def handle_notification(self, channel: str, body: bytes,
                            headers: Mapping[str, str] | None = None, *,
                            wait: bool = True) -> str:
        """Feed a wallet's notification exactly as received: the raw body and its headers.

        The channel's adapter verifies the signature over the exact ``body`` bytes and parses
        it (``Channel.verify_notification``); the engine then checks it against the order
        (channel, currency, amount, refund id and amount, and that its transaction id pays
        no other payment) and only then acts. Returns the order's state once the result is
        committed: acknowledge the notification to the wallet only then. A notification
        that does not verify or does not match raises ``NotificationRejected`` (recorded,
        counted; do not acknowledge it). Duplicated, late and out-of-order ones are safe.
        With ``wait=False`` it returns ``"queued"`` once the result is enqueued.
        """
        check_id(channel, "channel")
        check_bool(wait, "wait")
        if not isinstance(body, bytes) or not 0 < len(body) <= NOTIFICATION_BYTES_MAX:
            raise InvalidRequest(f"a notification body is the raw bytes received, 1.."
                                 f"{NOTIFICATION_BYTES_MAX} of them, not {shown(body)}")
        if headers is not None and not isinstance(headers, Mapping):
            raise InvalidRequest(f"headers are a mapping of str to str, not {shown(headers)}")
        chan = self._channel(channel)
        try:
            note = check_notification(chan.verify_notification(body, headers or {}))
        except NotificationRejected as error:
            self._reject(channel, "", None, "notification", error)
            raise
        except Exception as error:  # an adapter that cannot verify it: never believe it
            rejected = NotificationRejected(
                f"{channel} could not verify the notification: {type(error).__name__}",
                "bad_signature")
            self._reject(channel, "", None, "notification", rejected)
            raise rejected from None
        event: CashResult | RefundResult
        if note.kind is NotificationKind.REFUND:
            assert note.refund_id is not None
            event = refund_result(chan, note.refund_id, note.reply, ResultSource.NOTIFICATION,
                                  reported_by=channel)
        else:
            event = cash_result(chan, note.reply, ResultSource.NOTIFICATION, reported_by=channel)
        return self._feed_report(channel, note.payment_serial, event, wait)

    def handle_provider_callback(self, provider: str, body: bytes,
                                 headers: Mapping[str, str] | None = None) -> str:
        """Feed an external voucher provider's callback exactly as received.

        The provider's adapter verifies the signature over the exact ``body`` and parses it
        (``VoucherProvider.verify_callback``); the provider's actor then reads its codes
        with the provider's code table for the operation it answers and, if that decides
        the command, tells the order. Duplicated, late and out-of-order callbacks are safe
        (a decided leg ignores them). Returns ``"queued"`` once handed to the provider's
        actor: acknowledge the callback then. One that does not verify raises
        ``ProviderCallbackRejected`` (recorded with the provider's messages; do not
        acknowledge it). Any thread.
        """
        self._check_open()
        check_id(provider, "provider")
        if not isinstance(body, bytes) or not 0 < len(body) <= NOTIFICATION_BYTES_MAX:
            raise InvalidRequest(f"a callback body is the raw bytes received, 1.."
                                 f"{NOTIFICATION_BYTES_MAX} of them, not {shown(body)}")
        if headers is not None and not isinstance(headers, Mapping):
            raise InvalidRequest(f"headers are a mapping of str to str, not {shown(headers)}")
        slot = self._ctx.providers.get(provider)
        if slot is None:
            raise ProviderCallbackRejected(f"no voucher provider {provider!r}; known: "
                                           f"{sorted(self._ctx.providers)}")
        try:
            callback = check_provider_callback(slot.provider.verify_callback(body,
                                                                             headers or {}))
        except Exception as error:  # an adapter that cannot verify it: never believe it
            slot.recorder.record(self._ctx.runtime.now_ms(), "callback_rejected", "", "",
                                 error=type(error).__name__)
            raise ProviderCallbackRejected(
                f"{provider} callback rejected: {type(error).__name__}") from None
        self._ctx.directory.tell(("provider", provider), CallbackArrived(callback))
        return "queued"

    def provider_messages(self, provider: str, limit: int = 100) -> list[dict[str, Any]]:
        """The newest ``limit`` (1..10000) messages exchanged with ``provider``, oldest
        first: each a dict with ``at_ms``, ``provider``, ``kind`` (``request``, ``call``,
        ``query_request``, ``query``, ``callback``, ``callback_rejected``), ``txn_id``,
        ``op`` and the codes or error. Kept in memory, at most the provider's
        ``recording_keep``."""
        self._check_open()
        check_int(limit, "limit", 1, 10_000)
        slot = self._ctx.providers.get(provider)
        if slot is None:
            raise InvalidRequest(f"no voucher provider {provider!r}")
        return slot.recorder.records(limit)  # type: ignore[no-any-return]

    def handle_callback(self, channel: str, payment_serial: str, reply: ChannelReply, *,
                        wait: bool = True) -> str:
        """Feed a payment notification already parsed, which the engine cannot authenticate.

        After the same checks as ``handle_notification`` (channel, currency, amount,
        transaction owner): a reply that only agrees with what the order already knows
        (the same success again, "processing") returns the order's state. One that would
        change something is not believed: the order asks the channel (``query``; a second
        charge: ``query_charge``; at most once per ``OrderPolicy.confirm_query_interval_ms``)
        and this raises ``NotificationRejected`` (reason ``unverified``): do not acknowledge
        it; once the channel's answer is in, the wallet's next retry agrees and returns.
        Prefer ``handle_notification`` with the raw bytes.
        """
        _check_notification(channel, payment_serial, reply, wait)
        chan = self._channel(channel)
        return self._feed_report(channel, payment_serial, cash_result(
            chan, reply, ResultSource.CALLBACK, reported_by=channel), wait)

    def handle_refund_callback(self, channel: str, payment_serial: str, refund_id: str,
                               reply: ChannelReply, *, wait: bool = True) -> str:
        """Feed a refund notification already parsed; like ``handle_callback``, one that
        would change the refund only makes the order ask the channel (``query_refund``) and
        raises ``NotificationRejected`` (``unverified``)."""
        _check_notification(channel, payment_serial, reply, wait, refund_id=refund_id)
        chan = self._channel(channel)
        return self._feed_report(channel, payment_serial, refund_result(
            chan, refund_id, reply, ResultSource.CALLBACK, reported_by=channel), wait)

    def rejected_notifications(self, limit: int = 100) -> list[Rejection]:
        """The newest notifications (and statement lines) the engine refused, newest first."""
        self._check_open()
        if isinstance(limit, bool) or not isinstance(limit, int) or not 0 < limit <= 10_000:
            raise InvalidRequest("limit must be 1..10000")
        return rejections.recent(self._ctx.store, limit)

    def rejection_counts(self) -> dict[str, int]:
        """How many notifications were refused ever, by reason (``bad_signature``...)."""
        self._check_open()
        return rejections.counts(self._ctx.store)

    def _feed_report(self, channel: str, payment_serial: str,
                     event: CashResult | RefundResult, wait: bool) -> str:
        """Check a report from outside against the order, record a refusal, else feed it."""
        source = event.source.value
        refund_id = event.refund_id if isinstance(event, RefundResult) else None
        try:
            check_id(payment_serial, "payment_serial")
            if isinstance(event, CashResult):  # the serial says which route it is about
                event = replace(event, payment_serial=payment_serial)
            order_id = self._order_for_serial(payment_serial)
            order = self._ctx.store.load_order(order_id)
            if order is None:
                raise UnknownOrder(f"no payment order with serial {payment_serial}")
            check_report(order, event, self._ctx.policy)
            self._check_txn_owner(channel, order_id, event)
            unverified = event.source in UNVERIFIED_SOURCES
            if report_agrees(order, event) or "trust-forged-notification" in (
                self._ctx.policy.planted_bugs
            ) or not (unverified or needs_confirmation(order, event)):
                return self._feed(order_id, event, wait)
            # Not believed on its word: the order asks the channel (bounded), and this is
            # not acknowledged, so the wallet sends it again; once the channel's answer is
            # in, it agrees and returns the state.
            if ACKS_UNBELIEVED_BUG in self._ctx.policy.planted_bugs:
                return "queued"  # planted: answered as handled, never asked: not sent again
            if self._confirm_limiter.allow(order_id, not unverified, self._ctx.runtime.now_ms()):
                self._feed(order_id, event, False)
            what = "an unverified" if unverified else "a verified but unconfirmed"
            raise NotificationRejected(
                f"{what} {event.kind.value} for {payment_serial} is not believed: the channel "
                "is asked; acknowledge once the order shows it",
                "unverified" if unverified else "unconfirmed")
        except (NotificationRejected, UnknownOrder) as error:
            self._reject(channel, payment_serial, refund_id, source, error)
            raise

    def _check_txn_owner(self, channel: str, order_id: str,
                         event: CashResult | RefundResult) -> None:
        """A transaction id pays one payment only: one another order has is refused."""
        if not isinstance(event, CashResult) or event.kind is not ResultKind.SUCCESS or (
            event.channel_txn_id is None
        ):
            return
        owner = rejections.txn_owner(self._ctx.store, channel, event.channel_txn_id)
        if owner is not None and owner != order_id:
            raise NotificationRejected(
                f"transaction {event.channel_txn_id} belongs to order {owner}, not {order_id}",
                "foreign_transaction")

    def _reject(self, channel: str, payment_serial: str, refund_id: str | None, source: str,
                error: NotificationRejected | UnknownOrder) -> None:
        reason = error.reason if isinstance(error, NotificationRejected) else "unknown_order"
        with contextlib.suppress(EngineClosed):  # shutting down: the refusal stands anyway
            rejections.record(self._ctx.store, rejections.Rejection(
                self._ctx.runtime.now_ms(), channel, payment_serial, refund_id, source, reason,
                error.message))
        self._ctx.log.warning("notification.rejected", channel=channel, reason=reason,
                              payment_serial=payment_serial, detail=error.message)

    def _feed(self, order_id: str, event: Any, wait: bool) -> str:
        if wait:
            return self._ask_order(order_id, event).state
        self._ctx.directory.tell(("order", order_id), event)
        return "queued"

    def get_order(self, order_id: str) -> OrderView:
        """The order as the engine knows it (the database; never the channel)."""
        self._check_open()
        check_id(order_id, "order_id")
        order = self._ctx.store.load_order(order_id)
        if order is None:
            raise UnknownOrder(f"no payment order {order_id}")
        return OrderView.of(order)

    def find_order(self, merchant_id: str, merchant_order_no: str,
                   attempt: int | None = None) -> OrderView:
        """The order submitted under a merchant's order number: its latest attempt, or
        ``attempt`` (``UnknownOrder`` if that attempt was never made)."""
        self._check_open()
        check_id(merchant_id, "merchant_id")
        check_id(merchant_order_no, "merchant_order_no")
        store = self._ctx.store
        if attempt is None:
            order_id = store.order_id_for_merchant(merchant_id, merchant_order_no)
        else:
            check_int(attempt, "attempt", 1, ATTEMPTS_MAX)
            order_id = store.attempt_order_id(merchant_id, merchant_order_no, attempt)
        if order_id is None:
            which = "" if attempt is None else f" attempt {attempt}"
            raise UnknownOrder(f"no order for {merchant_id}/{merchant_order_no}{which}")
        return self.get_order(order_id)

    def journal(self, order_id: str) -> list[JournalEntry]:
        """Every recorded transition of the order and its legs, oldest first
        (``UnknownOrder`` for an id no order has)."""
        self._check_open()
        check_id(order_id, "order_id")
        self._known_order(order_id)
        return self._ctx.store.journal("order", order_id)

    def ledger_balances(self, order_id: str | None = None) -> dict[str, dict[str, int]]:
        """Double-entry balances ``{currency: {ledger account: minor units}}`` (see
        ``engine.ledger``): amounts in different currencies are kept apart, never added.

        In each currency the balances sum to zero. ``transit`` holds money between payer
        and merchant: for a settled order without unknowns its share is zero. With
        ``order_id``: that order's postings only (one currency, the order's; ``{}`` before
        its first posting; ``UnknownOrder`` for an id no order has).
        """
        self._check_open()
        check_optional_id(order_id, "order_id")
        if order_id is not None:
            self._known_order(order_id)
        return self._ctx.store.ledger_balances(order_id)

    def _known_order(self, order_id: str) -> None:
        if not self._ctx.store.order_exists(order_id):
            raise UnknownOrder(f"no payment order {order_id}")

    def unbalanced_postings(self) -> list[tuple[str, int]]:
        """Ledger postings whose entries do not sum to zero: always empty unless a bug."""
        self._check_open()
        return self._ctx.store.unbalanced_postings()

    def channel_health(self) -> dict[str, str]:
        """Each channel's circuit breaker: ``closed`` (in use), ``open`` (down: routing skips
        it) or ``half_open`` (routing may try it again). See ``engine.health``."""
        return {name: state.value for name, state in self._ctx.health.states().items()}

    def set_observer(self, observer: Observer) -> None:
        """Install the observation hooks (``actors.observe``; ``NO_OBSERVER``: none), e.g.
        an ``EngineMetrics``'s. One observer at a time: a later call replaces it. Any
        thread; hooks already running finish on the old one."""
        check_instance(observer, Observer, "observer")
        self._ctx.observer = observer
        self._ctx.store.on_commit(None if observer is NO_OBSERVER else functools.partial(
            notify, observer.group_commit))

    def vitals(self) -> Vitals:
        """The engine's load as its memory knows it (actors, queues, threads, breakers,
        commits, admission): no database read, any thread. For metrics and health checks."""
        ctx = self._ctx
        directory, store = ctx.directory, ctx.store
        pool = getattr(ctx.runtime, "pool", None)
        if not isinstance(pool, ActorPool):
            pool = None
        stats, admitted = store.commit_stats, self._admission.stats
        return Vitals(
            live_order_actors=directory.live_count("order"),
            orders_in_flight=directory.count("order"),
            live_account_actors=directory.live_count("account"),
            actor_backlog=directory.backlog, writer_backlog=store.writer_backlog,
            pool_ready=0 if pool is None else pool.ready_count(),
            pool_threads=0 if pool is None else pool.threads(),
            threads=threading.active_count(), breaker_states=self.channel_health(),
            commits=stats.commits, changes_committed=stats.changes,
            failed_changes=stats.failed_changes, largest_batch=stats.largest_batch,
            submits_admitted=admitted.admitted,
            submits_refused=(admitted.refused_busy + admitted.refused_backlog
                             + admitted.refused_live_orders),
            broken_actors=len(directory.broken()), observer_errors=HOOK_ERRORS[0])

    def broken_actors(self) -> dict[str, str]:
        """Orders and accounts quarantined on a broken invariant ("order:ID" -> error).

        Empty in a healthy engine. Monitor it: each entry is a bug that needs a fix and a
        reopen, and its money waits in the state last committed.
        """
        return {f"{kind}:{ident}": error
                for (kind, ident), error in self._ctx.directory.broken().items()}

    def owed(self, *, limit: int = 1_000) -> list[OwedCommand]:
        """Voucher follow-ups decided and not yet answered, oldest order first, at most
        ``limit`` (1..10000): each order's Confirms, Cancels (releases and reversals) and
        refund voucher returns that are sent and waiting, with ``flagged`` for those the
        voucher system left unanswered on the whole retry schedule (``confirm_unknown``,
        ``release_unknown``, a return ``unknown``), which the sentinel goes on re-sending
        until they are answered. Read from the database; empty when nothing is owed.
        """
        self._check_open()
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 10_000:
            raise InvalidRequest(f"limit must be 1..10000, got {limit!r}")
        store = self._ctx.store
        owed: list[OwedCommand] = []
        for order_id in store.orders_owing_follow_ups(limit):
            order = store.load_order(order_id)
            if order is not None:
                owed += owed_commands(order)
        return owed[:limit]

    # ------------------------------------------------------------------ operator tools
    # (issue 13 item 3; the queries: persistence.operator; resolutions: actors.operator)

    def find_orders(self, *, state: str | None = None, since_ms: int | None = None,
                    until_ms: int | None = None, merchant_id: str | None = None,
                    user_id: str | None = None, station_id: str | None = None,
                    channel: str | None = None, limit: int = FIND_ORDERS_LIMIT_DEFAULT,
                    after: str | None = None) -> OrderPage:
        """One page of the orders matching every filter given, oldest first (by creation
        time, then order id): ``since_ms <= created_at_ms < until_ms``, ``channel`` the cash
        leg's. ``limit`` 1..500 (default 100); ``after``: the previous page's
        ``next_after``. ``InvalidRequest`` names a bad filter. Read from the database; any
        thread."""
        self._check_open()
        flt = order_filter(state=state, since_ms=since_ms, until_ms=until_ms,
                           merchant_id=merchant_id, user_id=user_id, station_id=station_id,
                           channel=channel, limit=limit, after=after)
        return store_operator.find_orders(self._ctx.store, flt)

    def attention(self) -> list[AttentionItem]:
        """Everything that needs a person now (README "Operator tools"): orders
        ``needs_reconciliation`` (``amount_mismatch`` on their own), owed voucher follow-ups,
        refunds ``unknown``, dead letters, given-up merchant notifications, pump
        pre-authorisations unsettled or with a misreported capture amount; at most 1000 of
        each kind, oldest first; acknowledged ones left out. Any thread."""
        self._check_open()
        return store_operator.attention(self._ctx.store,
                                        planted_bugs=self._ctx.config.planted_bugs)

    def resolve(self, item: str, action: str, *, operator: str, reason: str) -> Resolution:
        """Act on an attention item (``retry`` or ``acknowledge``, as its kind allows) and
        journal who and why. Idempotent per occurrence: asked again, the first record comes
        back with ``repeated`` and nothing is done again. ``UnknownAttentionItem``,
        ``ActionNotApplicable``, ``InvalidRequest`` (operator an id, reason 1..500
        characters) change nothing. On the caller's thread; tells actors, never waits."""
        self._check_open()
        return resolve_in_engine(self._ctx, item, action, operator, reason)

    def operator_journal(self, limit: int = 1_000) -> list[Resolution]:
        """Resolutions made, newest first, at most ``limit`` (1..10000)."""
        self._check_open()
        check_int(limit, "limit", 1, 10_000)
        return store_operator.journal(self._ctx.store, limit)

    def unsettled_count(self) -> int:
        """Orders with work left (not terminal, or a leg's follow-up still in flight)."""
        self._check_open()
        return len(self._ctx.store.unsettled_order_ids())

    def _channel(self, name: str) -> Channel:
        self._check_open()
        try:
            return self._ctx.channels[name]
        except KeyError:
            raise InvalidRequest(f"unknown channel {name!r}") from None

    def _order_for_serial(self, payment_serial: str) -> str:
        order_id = self._ctx.store.order_id_for_serial(payment_serial)
        if order_id is None:
            raise UnknownOrder(f"no payment order with serial {payment_serial}")
        return order_id

    def _ask_order(self, order_id: str, message: Any) -> OrderView:
        self._check_open()
        if self._ctx.store.load_order(order_id) is None:
            raise UnknownOrder(f"no payment order {order_id}")
        view = self._ctx.directory.ask(("order", order_id), message,
                                       self._ctx.config.ask_timeout_s)
        assert isinstance(view, OrderView)
        return view

    # ------------------------------------------------------------------ reconciliation
    # (issue 4 item 1; kept at the end of the class, apart from the payment API above)

    def reconcile(self, statement: StatementSource, *, period_start_ms: int | None = None,
                  period_end_ms: int | None = None, channels: Iterable[str] | None = None
                  ) -> ReconciliationReport:
        """Import a channel statement: ``str`` is CSV text, a ``Path`` a CSV file.

        Each line is matched against its order by payment serial and fed to it as a
        RECONCILIATION result: an order waiting for its result gets it; a charge for a
        closed, failed or unknown order is refunded by the original route; a second charge
        is refunded; another amount is flagged, never a success. Orders of the period that
        the engine thinks were charged but the statement lacks are reported; ones awaiting
        reconciliation that it lacks, whose pay window closed by ``period_end_ms`` (default:
        the last line's time), fail (the channel never charged them) and release their
        holds. Importing the same statement again changes nothing. A malformed statement
        raises ``StatementError`` and nothing is applied. See ``actors.reconcile``.
        """
        from payengine.actors.reconcile import reconcile

        self._check_open()
        return reconcile(self, statement, period_start_ms=period_start_ms,
                         period_end_ms=period_end_ms, channels=channels)

    # ------------------------------------------------------------------ signed merchant requests
    # (issue 11 item 5; the wire format: engine.merchant_request; the checks: actors.merchant_auth)

    def register_merchant_key(self, merchant_id: str, *, secret: str | None = None,
                              public_key_pem: str | None = None) -> MerchantView:
        """Register (or replace) the key ``merchant_id`` signs its requests with: ``secret``
        for HMAC-SHA256 (32..256 characters), or ``public_key_pem`` for RSA-SHA256 (an RSA
        public key of 2048..8192 bits, SubjectPublicKeyInfo PEM; needs the ``cryptography``
        package, ``payengine[rsa]``, else ``InvalidRequest``). A new merchant is active; the
        old key stops verifying at once. Separate from ``notifications.register_merchant``
        (where the engine sends its notifications, with a secret of its own). The secret is
        stored in the database in the clear, like the rest of the engine's data."""
        self._check_open()
        return self._gate.register_key(merchant_id, secret, public_key_pem)

    def get_merchant(self, merchant_id: str) -> MerchantView | None:
        """The merchant's status and sign type (never its key); ``None`` if it has neither
        a key nor a status."""
        self._check_open()
        return self._gate.merchant(merchant_id)

    def set_merchant_status(self, merchant_id: str, status: str) -> str:
        """Set the merchant ``active``, ``frozen`` or ``closed`` (final: ``IllegalTransition``
        to leave it); returns the status it had. A frozen or closed merchant is refused new
        payments and refunds (``RequestRejected``: ``merchant_frozen``, ``merchant_closed``),
        signed or not; closes and queries go on. Journalled (``journal`` kind ``merchant``)."""
        self._check_open()
        return self._gate.set_status("merchant", merchant_id, status)

    def set_user_status(self, user_id: str, status: str) -> str:
        """Set the user ``active``, ``frozen`` or ``closed`` (final); returns the status it
        had. A frozen or closed user is refused new payments (``user_frozen``,
        ``user_closed``), signed or not; refunds to them go on."""
        self._check_open()
        return self._gate.set_status("user", user_id, status)

    def get_user_status(self, user_id: str) -> str:
        """``active`` (also for a user never given a status), ``frozen`` or ``closed``."""
        self._check_open()
        return self._gate.user_status(user_id)

    def submit_signed(self, body: bytes, headers: Mapping[str, str]) -> Receipt:
        """A merchant's signed pay request (``op: pay``), exactly as received: verified
        (signature, timestamp, merchant and user status, the pay window of an order that
        exists), then submitted as ``submit`` does, its nonce stored in the same transaction
        as the order. The same order again (signed anew, within its pay window) gets its
        receipt. A refusal is ``RequestRejected`` (recorded); after verification the
        submit's own errors (``IdempotencyConflict``, ``DuplicateSuspected``,
        ``UnknownAccount``, ``Overloaded``...) leave the nonce unused. See README, *Signed
        merchant requests*."""
        self._check_open()
        with self._admission.admit():
            verified = self._gate.verify(body, headers, "pay")
            assert isinstance(verified.op, PayOp)
            request = verified.op.request
            try:  # an order that exists: its pay window is checked first (``_retried``)
                return self._submit(request, verified.nonce)
            except (RequestRejected, RiskBlocked, IdempotencyConflict) as error:
                # refusals of the request itself (the same request never passes), recorded;
                # "ask again" ones (Overloaded, DuplicateSuspected...) are not
                self._gate.reject(verified.envelope, verified.op, error)
                raise

    def close_signed(self, body: bytes, headers: Mapping[str, str]) -> OrderView:
        """A merchant's signed close (``op: close``) of its order ``merchant_order_no``:
        verified, its nonce used, then ``close``. ``UnknownOrder`` if the merchant has no
        such order."""
        verified = self._verified(body, headers, "close")
        assert isinstance(verified.op, CloseOp)
        self._gate.use_nonce(verified)  # first: even a request that then fails is spent
        order_id = self._merchant_order(verified, verified.op.merchant_order_no)
        return self.close(order_id)

    def refund_signed(self, body: bytes, headers: Mapping[str, str]) -> RefundView:
        """A merchant's signed refund (``op: refund``): verified (a frozen or closed
        merchant is refused), its nonce used, then ``refund``."""
        verified = self._verified(body, headers, "refund")
        op = verified.op
        assert isinstance(op, RefundOp)
        self._gate.use_nonce(verified)  # first: even a request that then fails is spent
        order_id = self._merchant_order(verified, op.merchant_order_no)
        return self.refund(order_id, op.refund_no, op.amount_minor, reason=op.reason)

    def query_signed(self, body: bytes, headers: Mapping[str, str]) -> OrderView:
        """A merchant's signed query (``op: query``) of its order: verified, its nonce used,
        then the order as ``get_order`` reads it."""
        verified = self._verified(body, headers, "query")
        assert isinstance(verified.op, QueryOp)
        self._gate.use_nonce(verified)  # first: even a request that then fails is spent
        order_id = self._merchant_order(verified, verified.op.merchant_order_no)
        return self.get_order(order_id)

    def rejected_requests(self, limit: int = 100) -> list[RequestRejection]:
        """The newest signed merchant requests the engine refused, newest first."""
        self._check_open()
        if isinstance(limit, bool) or not isinstance(limit, int) or not 0 < limit <= 10_000:
            raise InvalidRequest("limit must be 1..10000")
        return merchants.recent_rejections(self._ctx.store, limit)

    def request_rejection_counts(self) -> dict[str, int]:
        """How many signed merchant requests were refused ever, by reason."""
        self._check_open()
        return merchants.rejection_counts(self._ctx.store)

    def _verified(self, body: bytes, headers: Mapping[str, str], op: str) -> Verified:
        """Verify under admission, as a submit is: a refusal is a write (the refusal log),
        so a flood of forged closes and queries is shed (``Overloaded``) once the writer or
        the actors are behind, instead of queueing a commit each."""
        self._check_open()
        with self._admission.admit():
            return self._gate.verify(body, headers, op)

    def _merchant_order(self, verified: Verified, merchant_order_no: str) -> str:
        merchant_id = verified.envelope.merchant_id
        order_id = self._ctx.store.order_id_for_merchant(merchant_id, merchant_order_no)
        if order_id is None:
            raise UnknownOrder(f"merchant {merchant_id} has no order {merchant_order_no}")
        return order_id

    def _retried(self, request: PaymentRequest, nonce: NonceUse | None) -> Receipt | None:
        """The receipt of a retried submit (its attempt exists with these parameters), before
        anything that may have changed since is looked at again (routing and channel
        health, a channel no longer configured, the risk gate, accounts): a retry is
        answered, never decided anew. ``None`` for a new one (the insert still backstops)."""
        store = self._ctx.store
        existing_id = store.attempt_order_id(request.merchant_id, request.merchant_order_no,
                                             request.attempt)
        if existing_id is None:
            return None
        existing = store.load_order(existing_id)
        assert existing is not None, "an order whose key exists is stored"
        now_ms = self._ctx.runtime.now_ms()
        if nonce is not None:  # a cached cashier URL: refused whatever it carries
            self._check_payable(existing, now_ms)
        if existing.fingerprint != request.fingerprint():
            raise IdempotencyConflict(
                f"merchant order {request.merchant_id}/{request.merchant_order_no} (attempt "
                f"{request.attempt}) was submitted before with different parameters")
        if nonce is not None:
            self._gate.nonces.use(nonce, now_ms)
        return Receipt.of(existing)

    def _check_payable(self, order: PaymentOrder, now_ms: int) -> None:
        """A pay request for an order that exists: refused once its pay window is over (it
        closed or failed, or its time ran out), so a cached cashier URL cannot pay again."""
        if pay_window_over(order, now_ms):
            raise RequestRejected(
                f"order {order.merchant_id}/{order.merchant_order_no} is {order.state.value} "
                f"and its pay window ended at {order.close_at_ms}: no payment for it any more",
                "pay_window_over")
