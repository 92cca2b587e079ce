"""External voucher providers: the protocol, and the actor that talks to one.

A ``VoucherProvider`` is the integrator's code for one voucher system of another company
(a carrier's phone credit). Its calls block (network I/O), so the provider's actor runs them
on the provider's own bounded I/O lane (``Runtime.run_io``, lane ``provider:<name>``),
never on an actor thread. Each answer is raw codes; the provider's code tables decide what
they mean (``engine.provider``). "Processing" (or a call that raised) starts the command's
own query schedule (``query_schedule_ms``); a verified callback
(``Engine.handle_provider_callback``) may decide it sooner. A decided answer goes back to
the order as the ``VoucherReply`` an internal voucher account would send; a command still
undecided after its schedule is answered "unknown, ask again" (a retryable reply), and the
order's own voucher retry schedule and sentinel take over (a Try never decided is cancelled
and the payment fails; a Confirm or Cancel stays owed until answered).

Threads: the actor's state is touched only on its own thread (one message at a time);
``ProviderRecorder`` is read from API threads and locks.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from payengine.actors.base import ActorBehaviour, Context
from payengine.actors.directory import Directory, Key
from payengine.actors.messages import FromOrder
from payengine.actors.runtime import TimerHandle
from payengine.engine.checks import (
    check_id,
    check_instance,
    check_int,
    check_optional_id,
    check_schedule,
    shown,
)
from payengine.engine.codes import ResultKind
from payengine.engine.currency import currency_table
from payengine.engine.errors import InvalidRequest, PaymentError
from payengine.engine.order import (
    CancelHold,
    ClawBack,
    ConfirmHold,
    CreditVoucher,
    DebitVoucher,
    ReturnVoucher,
    TryHold,
    VoucherOp,
    VoucherReply,
)
from payengine.engine.provider import (
    PendingCommand,
    ProviderCodes,
    ProviderOp,
    ProviderReply,
    account_ref,
    check_provider_name,
    classify,
    next_step,
    provider_of,
    txn_id_of,
)

PROVIDERS_MAX = 100
"""Most providers one engine is given."""
QUERY_GAP_MS_MAX = 24 * 60 * 60 * 1000
"""The longest gap of a provider's query schedule: a day."""
PENDING_MAX_LIMIT = 1_000_000
RECORDING_KEEP_MAX = 100_000

_OP_OF = {TryHold: ProviderOp.TRY, ConfirmHold: ProviderOp.CONFIRM,
          CancelHold: ProviderOp.CANCEL}
_OTHER_OPS = {DebitVoucher: VoucherOp.DEBIT, ReturnVoucher: VoucherOp.RETURN,
              CreditVoucher: VoucherOp.CREDIT, ClawBack: VoucherOp.CLAWBACK}
_VOUCHER_OP = {ProviderOp.TRY: VoucherOp.TRY, ProviderOp.CONFIRM: VoucherOp.CONFIRM,
               ProviderOp.CANCEL: VoucherOp.CANCEL}


@dataclass(frozen=True, slots=True)
class ProviderCallback:
    """What a provider's callback says, once its adapter verified the signature: the
    answer to ``op`` of transaction ``txn_id``."""

    txn_id: str
    op: ProviderOp
    reply: ProviderReply


class VoucherProvider(Protocol):
    """One external voucher system. Every call may block; every one must be idempotent by
    ``txn_id``; ``cancel`` of a transaction never tried must succeed and be remembered (an
    empty rollback) so that a later ``try_hold`` of it is refused (anti-suspension)."""

    name: str
    unit: str
    """The unit its accounts count in: a currency (``CNY``: minor units) or points."""
    minor_per_unit: int | None
    """Order minor units one unit is worth; ``None`` for a currency unit."""
    codes: ProviderCodes
    query_schedule_ms: tuple[int, ...]
    pending_max: int
    """Most commands waiting for an answer at once; one more is answered "busy, ask
    again" (retryable) without calling the provider."""
    recording_keep: int
    """Most messages kept in memory (``Engine.provider_messages``)."""

    def try_hold(self, txn_id: str, account_ref: str, amount: int, unit: str
                 ) -> ProviderReply: ...

    def confirm(self, txn_id: str) -> ProviderReply: ...

    def cancel(self, txn_id: str) -> ProviderReply: ...

    def query(self, txn_id: str) -> ProviderReply:
        """The transaction's current state (read with the table of the pending op)."""
        ...

    def verify_callback(self, body: bytes, headers: Mapping[str, str]) -> ProviderCallback:
        """Check the signature over the exact ``body`` and parse it; raise if it does not
        verify (the engine rejects it, typed)."""
        ...


def check_provider(provider: object) -> VoucherProvider:
    """Refuse (``InvalidRequest``) an object that is not a usable provider: checked once, at
    ``Engine.open``, so a bad one never reaches an order."""
    for attr in ("try_hold", "confirm", "cancel", "query", "verify_callback"):
        if not callable(getattr(provider, attr, None)):
            raise InvalidRequest(f"a voucher provider needs a {attr}() method: {shown(provider)}")
    name = check_provider_name(getattr(provider, "name", None))
    unit = getattr(provider, "unit", None)
    minor = getattr(provider, "minor_per_unit", None)
    check_id(unit, f"provider {name} unit")
    is_currency = isinstance(unit, str) and unit in currency_table()
    if is_currency and minor is not None:
        raise InvalidRequest(f"provider {name}: a currency unit takes no minor_per_unit")
    if not is_currency:
        check_int(minor, f"provider {name} minor_per_unit", 1, 1_000_000)
    check_instance(getattr(provider, "codes", None), ProviderCodes, f"provider {name} codes")
    check_schedule(getattr(provider, "query_schedule_ms", None), f"provider {name} "
                   "query_schedule_ms", gap_max=QUERY_GAP_MS_MAX)
    check_int(getattr(provider, "pending_max", None), f"provider {name} pending_max", 1,
              PENDING_MAX_LIMIT)
    check_int(getattr(provider, "recording_keep", None), f"provider {name} recording_keep",
              0, RECORDING_KEEP_MAX)
    return provider  # type: ignore[return-value]


def check_provider_callback(callback: object) -> ProviderCallback:
    """What an adapter's ``verify_callback`` returned, checked before it is believed: a
    ``ProviderCallback`` of an id, a ``ProviderOp`` and a ``ProviderReply`` of ids or
    ``None``; ``InvalidRequest`` otherwise."""
    callback = check_instance(callback, ProviderCallback, "provider callback")
    check_id(callback.txn_id, "provider callback txn_id")
    check_instance(callback.op, ProviderOp, "provider callback op")
    reply = check_instance(callback.reply, ProviderReply, "provider callback reply")
    check_optional_id(reply.return_code, "provider callback return_code")
    check_optional_id(reply.result_code, "provider callback result_code")
    return callback


class ProviderRecorder:
    """Every message to and from one provider, the newest ``keep``: requests, answers,
    queries, callbacks (verified or rejected). Any thread."""

    def __init__(self, provider: str, keep: int) -> None:
        self.provider = provider
        self._records: deque[dict[str, Any]] = deque(maxlen=max(keep, 1))
        self._keep = keep
        self._lock = threading.Lock()

    def record(self, at_ms: int, kind: str, txn_id: str, op: str, **fields: Any) -> None:
        if self._keep == 0:
            return
        entry = {"at_ms": at_ms, "provider": self.provider, "kind": kind, "txn_id": txn_id,
                 "op": op, **fields}
        with self._lock:
            self._records.append(entry)

    def records(self, limit: int) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._records)[-limit:] if limit > 0 else []


@dataclass(frozen=True, slots=True)
class ProviderSlot:
    """A provider the engine was given, and its recorder. Shared by the engine's threads."""

    provider: VoucherProvider
    recorder: ProviderRecorder


class ProviderRouting:
    """A ``VoucherLink`` that sends commands for provider accounts (``<provider>:<ref>``) to
    that provider's actor and every other command to ``inner`` (the accounts of this
    engine). Replies go back through ``inner``. Any thread; never blocks."""

    def __init__(self, inner: Any, directory: Directory, providers: frozenset[str]) -> None:
        self._inner = inner
        self._directory = directory
        self._providers = providers

    def request(self, account_id: str, command: FromOrder) -> None:
        name = provider_of(account_id, self._providers)
        if name is None:
            self._inner.request(account_id, command)
        else:
            self._directory.tell(("provider", name), command)

    def reply(self, order_id: str, reply: VoucherReply) -> None:
        self._inner.reply(order_id, reply)


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class ProviderAnswer:
    """A call's or query's result, back on the actor's thread: the reply, or ``None`` with
    ``error`` when the call raised (unknown)."""

    txn_id: str
    op: ProviderOp
    source: str
    reply: ProviderReply | None
    error: str = ""


@dataclass(frozen=True, slots=True)
class QueryDue:
    txn_id: str
    op: ProviderOp
    queries_done: int


@dataclass(frozen=True, slots=True)
class CallbackArrived:
    """A callback the provider's adapter verified (``Engine.handle_provider_callback``)."""

    callback: ProviderCallback


KNOWN_TXNS_MAX = 100_000
"""Transactions remembered after their command was decided, so a late or repeated callback
still reaches its order (which ignores what it no longer waits for)."""


class ProviderBehaviour(ActorBehaviour):
    """The actor of one provider, key ``("provider", name)``. All state on its thread.

    Nothing of it is durable, and nothing needs to be: the order persisted its leg's status
    before the command went out and re-sends it on its retry schedule and at every start
    (idempotent at the provider by ``txn_id``), so after a restart the re-sent command
    resumes it here."""

    def __init__(self, key: Key, ctx: Context) -> None:
        super().__init__(key, ctx)
        slot = ctx.providers[key[1]]
        assert isinstance(slot, ProviderSlot)
        self.provider = slot.provider
        self.recorder = slot.recorder
        self.pending: dict[str, PendingCommand] = {}
        self.timers: dict[str, TimerHandle] = {}
        self.known: OrderedDict[str, tuple[str, int, Any]] = OrderedDict()
        """txn id -> (order id, leg, fence), the newest ``KNOWN_TXNS_MAX``."""
        self.bugs = ctx.policy.planted_bugs | ctx.config.planted_bugs

    def load(self) -> None:
        """Nothing to load: see the class docstring."""

    def cancel_timers(self) -> None:
        for timer in self.timers.values():
            timer.cancel()
        self.timers.clear()

    def handle(self, message: Any) -> Any:
        match message:
            case FromOrder():
                self._command(message)
            case ProviderAnswer():
                self._answer(message)
            case QueryDue():
                self._query_due(message)
            case CallbackArrived():
                self._callback(message.callback)
            case _:
                raise InvalidRequest(f"a provider cannot handle {type(message).__name__}")
        return None

    # ------------------------------------------------------------------ commands

    def _command(self, command: FromOrder) -> None:
        effect = command.effect
        op = _OP_OF.get(type(effect))
        if op is None:  # submit refuses debits and credits, refund refuses returns
            self._reply(command.order_id, effect.leg_no, effect.fence,
                        _OTHER_OPS[type(effect)], False,
                        f"provider {self.provider.name} takes only try, confirm and cancel")
            return
        txn_id = txn_id_of(effect.fence)
        current = self.pending.get(txn_id)
        if current is not None and current.op is op:
            return  # a re-send while the first is still being asked about: one is enough
        if current is None and len(self.pending) >= self.provider.pending_max:
            self._reply(command.order_id, effect.leg_no, effect.fence, _VOUCHER_OP[op], False,
                        f"provider {self.provider.name} busy", retryable=True)
            return
        amount = effect.amount if isinstance(effect, TryHold) else 0
        account_id = getattr(effect, "account_id", "")
        pending = PendingCommand(txn_id, op, command.order_id, effect.leg_no, effect.fence,
                                 account_ref(account_id), amount)
        self._forget_timer(txn_id)
        self.pending[txn_id] = pending
        self._remember(pending)
        self._call(pending)

    def _call(self, pending: PendingCommand) -> None:
        provider, txn_id = self.provider, pending.txn_id
        self.recorder.record(self._now(), "request", txn_id, pending.op.value,
                             account_ref=pending.account_ref, amount=pending.amount)
        fn: Any
        match pending.op:
            case ProviderOp.TRY:
                def fn() -> ProviderReply:
                    return provider.try_hold(txn_id, pending.account_ref, pending.amount,
                                             provider.unit)
            case ProviderOp.CONFIRM:
                def fn() -> ProviderReply:
                    return provider.confirm(txn_id)
            case ProviderOp.CANCEL:
                def fn() -> ProviderReply:
                    return provider.cancel(txn_id)
        self._io(fn, txn_id, pending.op, "call")

    def _io(self, fn: Any, txn_id: str, op: ProviderOp, source: str) -> None:
        directory, key = self.ctx.directory, self.key

        def done(result: Any) -> None:
            if isinstance(result, ProviderReply):
                answer = ProviderAnswer(txn_id, op, source, result)
            else:
                answer = ProviderAnswer(txn_id, op, source, None, _error_text(result))
            directory.tell(key, answer)

        self.ctx.runtime.run_io(f"provider:{self.provider.name}", fn, done)

    # ------------------------------------------------------------------ answers

    def _answer(self, answer: ProviderAnswer) -> None:
        reply = answer.reply
        self.recorder.record(
            self._now(), answer.source, answer.txn_id, answer.op.value,
            return_code=None if reply is None else reply.return_code,
            result_code=None if reply is None else reply.result_code,
            error=answer.error)
        self._decide(answer.txn_id, answer.op, reply, answer.error or "no decision")

    def _decide(self, txn_id: str, op: ProviderOp, reply: ProviderReply | None,
                why: str) -> None:
        kind = classify(self.provider.codes, op, reply)
        pending = self.pending.get(txn_id)
        if pending is None or pending.op is not op:
            self._late(txn_id, op, kind, reply)
            return
        step = next_step(pending, kind, schedule_ms=self.provider.query_schedule_ms,
                         now_ms=self._now(), planted_bugs=self.bugs)
        if step.ok is not None:
            self._finish(pending, step.ok, _reason(reply, step.ok))
        elif step.query_at_ms is not None:
            if txn_id in self.timers:
                return  # a query is already armed (a callback said "processing" too)
            self.timers[txn_id] = self.tell_later(
                step.query_at_ms, QueryDue(txn_id, op, pending.queries_done))
        else:
            self._finish(pending, False, f"provider {self.provider.name} did not decide "
                         f"({why}); ask again", retryable=True)

    def _late(self, txn_id: str, op: ProviderOp, kind: ResultKind,
              reply: ProviderReply | None) -> None:
        """An answer for a command no longer pending (decided, superseded, given up): a
        decided one still goes to its order, which ignores it unless it waits for it."""
        known = self.known.get(txn_id)
        if known is None or kind is ResultKind.PROCESSING:
            return
        order_id, leg_no, fence = known
        ok = kind is ResultKind.SUCCESS
        self._reply(order_id, leg_no, fence, _VOUCHER_OP[op], ok, _reason(reply, ok))

    def _query_due(self, due: QueryDue) -> None:
        pending = self.pending.get(due.txn_id)
        if pending is None or pending.op is not due.op or (
                pending.queries_done != due.queries_done):
            return
        self.timers.pop(due.txn_id, None)
        self.pending[due.txn_id] = PendingCommand(
            pending.txn_id, pending.op, pending.order_id, pending.leg_no, pending.fence,
            pending.account_ref, pending.amount, pending.queries_done + 1)
        provider, txn_id = self.provider, due.txn_id
        self.recorder.record(self._now(), "query_request", txn_id, due.op.value)

        def fn() -> ProviderReply:
            return provider.query(txn_id)

        self._io(fn, txn_id, due.op, "query")

    def _callback(self, callback: ProviderCallback) -> None:
        reply = callback.reply
        self.recorder.record(self._now(), "callback", callback.txn_id, callback.op.value,
                             return_code=reply.return_code, result_code=reply.result_code)
        self._decide(callback.txn_id, callback.op, reply, "callback said processing")

    def _finish(self, pending: PendingCommand, ok: bool, reason: str, *,
                retryable: bool = False) -> None:
        del self.pending[pending.txn_id]
        self._forget_timer(pending.txn_id)
        self._reply(pending.order_id, pending.leg_no, pending.fence, _VOUCHER_OP[pending.op],
                    ok, reason, retryable=retryable)

    def _reply(self, order_id: str, leg_no: int, fence: Any, op: VoucherOp, ok: bool,
               reason: str, *, retryable: bool = False) -> None:
        self.ctx.voucher_link.reply(order_id, VoucherReply(leg_no, fence, op, ok, reason,
                                                           retryable))

    # ------------------------------------------------------------------ helpers

    def _remember(self, pending: PendingCommand) -> None:
        self.known[pending.txn_id] = (pending.order_id, pending.leg_no, pending.fence)
        self.known.move_to_end(pending.txn_id)
        while len(self.known) > KNOWN_TXNS_MAX:
            self.known.popitem(last=False)

    def _forget_timer(self, txn_id: str) -> None:
        timer = self.timers.pop(txn_id, None)
        if timer is not None:
            timer.cancel()

    def _now(self) -> int:
        return self.ctx.runtime.now_ms()


def _reason(reply: ProviderReply | None, ok: bool) -> str:
    code = "" if reply is None else f"{reply.return_code}/{reply.result_code}"
    return f"{'accepted' if ok else 'refused'} by provider ({code})"


def _error_text(error: object) -> str:
    if isinstance(error, PaymentError):
        return f"{error.code}: {error.message}"[:200]
    if isinstance(error, BaseException):
        return type(error).__name__
    return f"not a ProviderReply: {shown(error)}"
