"""The actor shell and the public API of payengine.

    from actors import Engine, PaymentRequest, CashPart, VoucherPart, LegMode

``Engine`` is the entry point; see README.md for a runnable example.
"""

from actors.base import EngineConfig
from actors.channel import Channel, ChannelReply
from actors.engine import Engine, IdSource, RandomIds
from actors.messages import AccountView, HoldView, LegView, OrderView, Receipt
from actors.runtime import Runtime, ThreadRuntime
from engine.codes import CodeTable, ResultKind
from engine.errors import (
    AccountExists,
    ActorBroken,
    CurrencyMismatch,
    DatabaseInUse,
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
    UnknownAccount,
    UnknownHold,
    UnknownOrder,
)
from engine.order import CashPart, LegMode, OrderPolicy, OrderState, PaymentRequest, VoucherPart

__all__ = [
    "AccountExists", "AccountView", "ActorBroken", "CashPart", "Channel", "ChannelReply", "CodeTable",
    "CurrencyMismatch", "DatabaseInUse", "Engine", "EngineClosed", "EngineConfig", "HoldNotPending",
    "HoldRefused", "HoldView", "IdSource", "IdempotencyConflict", "IllegalTransition",
    "InsufficientBalance", "InvalidAmount", "InvalidRequest", "LegMode", "LegView",
    "OrderPolicy", "OrderState", "OrderView", "Overloaded", "PaymentError", "PaymentRequest",
    "RandomIds", "Receipt", "ResultKind", "Runtime", "ThreadRuntime", "UnknownAccount",
    "UnknownHold", "UnknownOrder", "VoucherPart",
]
