"""The actor shell and the public API of payengine.

    from actors import Engine, PaymentRequest, CashPart, VoucherPart, LegMode

``Engine`` is the entry point; see README.md for a runnable example.
"""

from actors.base import EngineConfig
from actors.channel import Channel, ChannelReply
from actors.engine import Engine, IdSource, RandomIds
from actors.messages import AccountView, HoldView, LegView, OrderView, Receipt, RefundView
from actors.notifier import NotificationConfig
from actors.reconcile import ReconciliationReport
from actors.runtime import Runtime, ThreadRuntime
from engine.codes import CodeTable, ResultKind
from engine.errors import (
    AccountExists,
    ActorBroken,
    CurrencyMismatch,
    DatabaseInUse,
    DuplicateSuspected,
    EngineClosed,
    HoldNotPending,
    HoldRefused,
    IdempotencyConflict,
    IllegalTransition,
    InsufficientBalance,
    InvalidAmount,
    InvalidRequest,
    Overloaded,
    PaymentError,
    RefundRefused,
    UnknownAccount,
    UnknownHold,
    UnknownOrder,
)
from engine.order import CashPart, LegMode, OrderPolicy, OrderState, PaymentRequest, VoucherPart
from engine.statement import StatementError
from persistence.outbox import OutboxEvent

__all__ = [
    "AccountExists", "AccountView", "ActorBroken", "CashPart", "Channel", "ChannelReply",
    "CodeTable", "CurrencyMismatch", "DatabaseInUse", "DuplicateSuspected", "Engine",
    "EngineClosed", "EngineConfig", "HoldNotPending", "HoldRefused", "HoldView", "IdSource",
    "IdempotencyConflict", "IllegalTransition", "InsufficientBalance", "InvalidAmount",
    "InvalidRequest", "LegMode", "LegView", "NotificationConfig", "OrderPolicy", "OrderState",
    "OrderView", "OutboxEvent", "Overloaded", "PaymentError", "PaymentRequest", "RandomIds",
    "Receipt", "ReconciliationReport", "RefundRefused", "RefundView", "ResultKind", "Runtime",
    "StatementError", "ThreadRuntime", "UnknownAccount", "UnknownHold", "UnknownOrder",
    "VoucherPart",
]
