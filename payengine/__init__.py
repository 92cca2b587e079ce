"""payengine: an in-process payment engine for a point-of-sale or fuel-station server.

This module is the public face: everything a user imports is here, typed.

    from payengine import Engine, PaymentRequest, CashPart, VoucherPart, LegMode

The layers sit beneath it and import one way: ``payengine.sim`` (the simulated world)
-> ``payengine.actors`` (the actor shell) -> ``payengine.persistence`` (SQLite) ->
``payengine.engine`` (the pure core, standard library only). See README.md for a runnable
example.

payengine is quiet when embedded: it logs through structlog into the standard library's
``logging`` logger ``"payengine"`` (children ``payengine.runtime``...), which has only a
``NullHandler``. Configure ``logging`` in your application to see the records.
"""

from payengine.actors.adapters import (
    ChannelConfig,
    Credentials,
    HttpChannel,
    Operation,
    RecordedChannel,
    ReplyMapping,
    Signing,
    load_channels,
    load_config,
    load_routing,
    parse_config,
    read_records,
    replay_mismatches,
)
from payengine.actors.adapters.providers import (
    ConfiguredProvider,
    ProviderConfig,
    ProviderTransport,
    load_providers,
    parse_providers,
)
from payengine.actors.admission import AdmissionStats
from payengine.actors.base import EngineConfig
from payengine.actors.channel import (
    AgreementChannel,
    AgreementStatus,
    Channel,
    ChannelNotification,
    ChannelReply,
    NotificationKind,
    SignedJsonNotifications,
)
from payengine.actors.engine import Engine, IdSource, RandomIds
from payengine.actors.merchant_auth import MerchantRequestConfig, MerchantSigner, MerchantView
from payengine.actors.messages import (
    AccountView,
    ChannelTry,
    HoldView,
    LegView,
    OrderView,
    Receipt,
    RefundView,
    VerificationView,
)
from payengine.actors.metrics import EngineMetrics
from payengine.actors.notifier import NotificationConfig
from payengine.actors.provider import ProviderCallback, VoucherProvider
from payengine.actors.reconcile import ReconciliationReport
from payengine.actors.risk_gate import RiskConfig, RiskContext, RiskHook
from payengine.actors.runtime import Runtime, ThreadRuntime
from payengine.engine.agreement import Agreement, AgreementState
from payengine.engine.channel_data import PayDetails, PayScenario, Prepay
from payengine.engine.codes import CodeTable, ResultKind
from payengine.engine.discounts import (
    AppliedDiscount,
    Benefits,
    Combination,
    Coupon,
    CouponKind,
    DiscountKind,
    DiscountRules,
    LevelCut,
    PointsBalance,
    PriceCut,
    PricedSale,
    Quote,
    QuoteExpired,
    QuoteMismatch,
    QuoteRefused,
    QuoteUse,
    UnknownQuote,
)
from payengine.engine.errors import (
    AccountClosed,
    AccountExists,
    AccountFrozen,
    ActionNotApplicable,
    ActorBroken,
    AgreementInactive,
    AgreementMismatch,
    AgreementNotFound,
    AgreementsUnsupported,
    AttemptRefused,
    ChannelsMissing,
    ConfigError,
    CurrencyMismatch,
    DatabaseInUse,
    DuplicateSuspected,
    EngineClosed,
    ExtraMissing,
    HoldNotPending,
    HoldRefused,
    IdempotencyConflict,
    IllegalTransition,
    IncompatibleDatabase,
    InsufficientBalance,
    InvalidAmount,
    InvalidRequest,
    NotificationRejected,
    Overloaded,
    PaymentError,
    ProviderCallbackRejected,
    ProvidersMissing,
    RefundRefused,
    RequestRejected,
    RiskBlocked,
    UnknownAccount,
    UnknownAttentionItem,
    UnknownHold,
    UnknownOrder,
    UnknownWithholding,
    VerificationFailed,
)
from payengine.engine.fuel import FuelLine, FuelSale
from payengine.engine.health import BreakerPolicy
from payengine.engine.operator import (
    Action,
    AttentionItem,
    AttentionKind,
    OrderPage,
    OrderSummary,
    Resolution,
)
from payengine.engine.order import (
    CashPart,
    LegMode,
    OrderPolicy,
    OrderState,
    OwedCommand,
    PaymentRequest,
    VoucherPart,
)
from payengine.engine.provider import ProviderCodes, ProviderOp, ProviderReply
from payengine.engine.risk import RiskOutcome, RiskRules, RiskVerdict
from payengine.engine.routing import NoRoute, Route, RoutingTable
from payengine.engine.shift_report import ShiftReport, ShiftTotals
from payengine.engine.statement import StatementError
from payengine.engine.withhold import WithholdConfig, Withholding, WithholdState
from payengine.persistence.group_commit import GroupCommitConfig
from payengine.persistence.merchants import RequestRejection
from payengine.persistence.outbox import OutboxEvent
from payengine.persistence.rejections import Rejection

__version__ = "0.2.0"

__all__ = [
    "AccountClosed",
    "AccountExists",
    "AccountFrozen",
    "AccountView",
    "Action",
    "ActionNotApplicable",
    "ActorBroken",
    "AdmissionStats",
    "Agreement",
    "AgreementChannel",
    "AgreementInactive",
    "AgreementMismatch",
    "AgreementNotFound",
    "AgreementState",
    "AgreementStatus",
    "AgreementsUnsupported",
    "AppliedDiscount",
    "AttemptRefused",
    "AttentionItem",
    "AttentionKind",
    "Benefits",
    "BreakerPolicy",
    "CashPart",
    "Channel",
    "ChannelConfig",
    "ChannelNotification",
    "ChannelReply",
    "ChannelTry",
    "ChannelsMissing",
    "CodeTable",
    "Combination",
    "ConfigError",
    "ConfiguredProvider",
    "Coupon",
    "CouponKind",
    "Credentials",
    "CurrencyMismatch",
    "DatabaseInUse",
    "DiscountKind",
    "DiscountRules",
    "DuplicateSuspected",
    "Engine",
    "EngineClosed",
    "EngineConfig",
    "EngineMetrics",
    "ExtraMissing",
    "FuelLine",
    "FuelSale",
    "GroupCommitConfig",
    "HoldNotPending",
    "HoldRefused",
    "HoldView",
    "HttpChannel",
    "IdSource",
    "IdempotencyConflict",
    "IllegalTransition",
    "IncompatibleDatabase",
    "InsufficientBalance",
    "InvalidAmount",
    "InvalidRequest",
    "LegMode",
    "LegView",
    "LevelCut",
    "MerchantRequestConfig",
    "MerchantSigner",
    "MerchantView",
    "NoRoute",
    "NotificationConfig",
    "NotificationKind",
    "NotificationRejected",
    "Operation",
    "OrderPage",
    "OrderPolicy",
    "OrderState",
    "OrderSummary",
    "OrderView",
    "OutboxEvent",
    "Overloaded",
    "OwedCommand",
    "PayDetails",
    "PayScenario",
    "PaymentError",
    "PaymentRequest",
    "PointsBalance",
    "Prepay",
    "PriceCut",
    "PricedSale",
    "ProviderCallback",
    "ProviderCallbackRejected",
    "ProviderCodes",
    "ProviderConfig",
    "ProviderOp",
    "ProviderReply",
    "ProviderTransport",
    "ProvidersMissing",
    "Quote",
    "QuoteExpired",
    "QuoteMismatch",
    "QuoteRefused",
    "QuoteUse",
    "RandomIds",
    "Receipt",
    "ReconciliationReport",
    "RecordedChannel",
    "RefundRefused",
    "RefundView",
    "Rejection",
    "ReplyMapping",
    "RequestRejected",
    "RequestRejection",
    "Resolution",
    "ResultKind",
    "RiskBlocked",
    "RiskConfig",
    "RiskContext",
    "RiskHook",
    "RiskOutcome",
    "RiskRules",
    "RiskVerdict",
    "Route",
    "RoutingTable",
    "Runtime",
    "ShiftReport",
    "ShiftTotals",
    "SignedJsonNotifications",
    "Signing",
    "StatementError",
    "ThreadRuntime",
    "UnknownAccount",
    "UnknownAttentionItem",
    "UnknownHold",
    "UnknownOrder",
    "UnknownQuote",
    "UnknownWithholding",
    "VerificationFailed",
    "VerificationView",
    "VoucherPart",
    "VoucherProvider",
    "WithholdConfig",
    "WithholdState",
    "Withholding",
    "__version__",
    "load_channels",
    "load_config",
    "load_providers",
    "load_routing",
    "parse_config",
    "parse_providers",
    "read_records",
    "replay_mismatches",
]
