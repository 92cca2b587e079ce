"""External voucher providers: the pure rules of one asynchronous TCC leg.

A voucher provider is a voucher system run by another company (a carrier's phone credit or
data, an airline's miles) that implements Try / Confirm / Cancel over the network and may
answer "processing" now and the result later, by callback. The engine reaches it like a cash
channel: its raw codes mean something only through its code tables (one per operation), a
call that raises or answers an unlisted code means "processing: ask again", and every
command is idempotent by its transaction id at the provider.

This module holds what does not need a thread or a clock: how a provider account is named,
the transaction id a leg's fence has at the provider, how one answer maps onto the
``VoucherReply`` the order already understands, and the query schedule of one pending
command. The actor (``actors.provider``) does the calls, the timers and the recording.
Pure: standard library only; time is an argument.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass

from payengine.engine.codes import CodeTable, ResultKind
from payengine.engine.errors import InvalidRequest
from payengine.engine.voucher import FenceKey

PROVIDER_SEPARATOR = ":"
"""A provider account is named ``<provider>:<account at the provider>``, e.g.
``carrier-x:13800000000``: the provider's name, this separator, the provider's own
reference of the account (a phone number, a member id)."""

_PROVIDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
"""A provider's name: letters, digits, ``_ . -``; no ``:`` (it ends at the separator)."""

PROVIDER_OPS = ("try", "confirm", "cancel")
"""The operations a provider implements; each has its own code table."""


class ProviderOp(enum.StrEnum):
    TRY = "try"
    CONFIRM = "confirm"
    CANCEL = "cancel"


def check_provider_name(name: object, what: str = "provider name") -> str:
    """A provider's name, or ``InvalidRequest``."""
    if not isinstance(name, str) or _PROVIDER_NAME.fullmatch(name) is None:
        raise InvalidRequest(f"{what} must be 1-64 letters, digits, '_', '.', '-' "
                             f"(starting with a letter or digit), not {name!r}")
    return name


def provider_of(account_id: str, providers: Mapping[str, object] | frozenset[str]) -> str | None:
    """The provider ``account_id`` names (``carrier-x`` for ``carrier-x:138...``) if that
    provider is one of ``providers``; ``None`` for an account of this engine."""
    name, sep, ref = account_id.partition(PROVIDER_SEPARATOR)
    if not sep or not ref or name not in providers:
        return None
    return name


def account_ref(account_id: str) -> str:
    """The provider's own reference of a provider account: what follows the separator."""
    _, sep, ref = account_id.partition(PROVIDER_SEPARATOR)
    assert sep and ref, f"{account_id!r} names no provider account"
    return ref


def txn_id_of(fence: FenceKey) -> str:
    """The transaction id a leg's fence has at the provider: the fence's journal label
    (``fence:order:<leg>:<order id>``), unique per order and leg, the same on every re-send
    and after a restart, so the provider's idempotency and anti-suspension work on it."""
    return fence.journal_part


@dataclass(frozen=True, slots=True)
class ProviderCodes:
    """A provider's code tables, one per operation. The codes of a query's answer are read
    with the table of the operation the query is about (a query after a Cancel answering
    ``HELD`` means "the Cancel has not landed yet": processing, if the cancel table says
    nothing of ``HELD``)."""

    try_: CodeTable
    confirm: CodeTable
    cancel: CodeTable

    def table(self, op: ProviderOp) -> CodeTable:
        match op:
            case ProviderOp.TRY:
                return self.try_
            case ProviderOp.CONFIRM:
                return self.confirm
            case ProviderOp.CANCEL:
                return self.cancel


@dataclass(frozen=True, slots=True)
class ProviderReply:
    """A provider's answer to a call, a query or a callback, as raw codes."""

    return_code: str | None
    result_code: str | None
    message: str = ""


def classify(codes: ProviderCodes, op: ProviderOp, reply: ProviderReply | None) -> ResultKind:
    """What ``reply`` says about ``op``; ``None`` (the call raised: a timeout, a reset)
    and any unlisted code are ``PROCESSING``: only a listed code decides."""
    if reply is None:
        return ResultKind.PROCESSING
    return codes.table(op).classify(reply.return_code, reply.result_code)


def decided(op: ProviderOp, kind: ResultKind, *, planted_bugs: frozenset[str] = frozenset()
            ) -> bool | None:
    """Whether ``op`` succeeded (``True``), failed (``False``) or is not decided (``None``).

    With the planted bug ``async-leg-ignored`` a Try still processing counts as held: the
    order pays its cash before the provider has held anything (the simulator must see it)."""
    if kind is ResultKind.SUCCESS:
        return True
    if kind is ResultKind.FAILURE:
        return False
    if op is ProviderOp.TRY and "async-leg-ignored" in planted_bugs:
        return True
    return None


@dataclass(frozen=True, slots=True)
class PendingCommand:
    """One command sent to a provider and not decided yet. Immutable; owned by the
    provider's actor (its thread)."""

    txn_id: str
    op: ProviderOp
    order_id: str
    leg_no: int
    fence: FenceKey
    account_ref: str
    amount: int
    queries_done: int = 0
    next_query_at_ms: int | None = None


@dataclass(frozen=True, slots=True)
class NextStep:
    """What to do after a command's answer: reply to the order (``ok`` decided), query
    again at ``query_at_ms``, or give up for now (``unknown``: the order re-sends)."""

    ok: bool | None = None
    query_at_ms: int | None = None
    unknown: bool = False


def next_step(command: PendingCommand, kind: ResultKind, *, schedule_ms: tuple[int, ...],
              now_ms: int, planted_bugs: frozenset[str] = frozenset()) -> NextStep:
    """After an answer (of the call, a query or a callback) to ``command``: decided, or the
    next query after the schedule's next gap, or unknown once the schedule is spent."""
    outcome = decided(command.op, kind, planted_bugs=planted_bugs)
    if outcome is not None:
        return NextStep(ok=outcome)
    if command.queries_done < len(schedule_ms):
        return NextStep(query_at_ms=now_ms + schedule_ms[command.queries_done])
    return NextStep(unknown=True)
