"""Per-channel return-code tables.

A channel answers with two levels of codes: a *communication* code (did the request reach
the channel and get a well-formed answer) and a *business* code (what happened to the
payment). Only an explicitly mapped business success code means success, only an explicitly
mapped failure code means failure; anything else, including an unknown code, a timeout or a
communication error, means "processing: query it". This is the rule that keeps a network
blip from being read as a failure (and the money then charged twice).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from payengine.engine.errors import InvalidRequest


class ResultKind(enum.StrEnum):
    SUCCESS = "success"
    FAILURE = "failure"
    PROCESSING = "processing"


@dataclass(frozen=True, slots=True)
class CodeTable:
    """The codes of one channel. Frozen sets so a table is a value that can be shared.

    ``processing`` and ``retryable`` are optional, for tables written in a configuration:
    ``processing`` names codes known to mean "not decided yet" (they classify as any
    unlisted code does, but a table that lists them cannot also list them as success or
    failure by mistake); ``retryable`` names the failure codes after which paying the same
    amount by another route is safe (nothing was charged and nothing will be: a balance too
    low, a card refused), for the routing to use. A communication failure is never
    retryable: the request may have reached the channel.

    ``not_found`` names the codes a query answers for a payment the channel does not know
    ("order not found", WeChat's ORDERNOTEXIST). They classify as *processing*, never as a
    failure: right after a pay request "not found" may only mean "not arrived yet". The
    routing fallback alone reads them, and only after the channel's explicit retryable
    failure, within the pay window (``engine.order``, R-PROD)."""

    channel: str
    communication_ok: frozenset[str]
    success: frozenset[str]
    failure: frozenset[str]
    processing: frozenset[str] = frozenset()
    retryable: frozenset[str] = frozenset()
    not_found: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        """A code meaning both success and failure would decide money by accident."""
        for name in ("communication_ok", "success", "failure", "processing", "retryable",
                     "not_found"):
            value = getattr(self, name)
            if not isinstance(value, frozenset) or not all(isinstance(c, str) for c in value):
                raise InvalidRequest(f"{self.channel}: {name} must be a frozenset of str")
        overlap = self.success & self.failure
        if overlap:
            raise InvalidRequest(f"{self.channel}: codes both success and failure: "
                                 f"{sorted(overlap)}")
        overlap = self.processing & (self.success | self.failure)
        if overlap:
            raise InvalidRequest(f"{self.channel}: codes both processing and decided: "
                                 f"{sorted(overlap)}")
        overlap = self.not_found & (self.success | self.failure)
        if overlap:
            raise InvalidRequest(f"{self.channel}: not_found codes must not be success or "
                                 f"failure codes (they mean 'processing'): {sorted(overlap)}")
        stray = self.retryable - self.failure
        if stray:
            raise InvalidRequest(f"{self.channel}: retryable codes must be failure codes: "
                                 f"{sorted(stray)}")

    def classify(self, communication_code: str | None, business_code: str | None) -> ResultKind:
        """Map a reply's two codes to a result; unknown or missing codes mean PROCESSING."""
        if communication_code is None or communication_code not in self.communication_ok:
            return ResultKind.PROCESSING
        if business_code in self.success:
            return ResultKind.SUCCESS
        if business_code in self.failure:
            return ResultKind.FAILURE
        return ResultKind.PROCESSING

    def is_retryable(self, communication_code: str | None, business_code: str | None) -> bool:
        """Whether the reply is a failure after which another route may be tried."""
        return (self.classify(communication_code, business_code) is ResultKind.FAILURE
                and business_code in self.retryable)

    def is_not_found(self, communication_code: str | None, business_code: str | None) -> bool:
        """Whether the reply says the channel does not know the payment (see ``not_found``)."""
        return (communication_code is not None and communication_code in self.communication_ok
                and business_code in self.not_found)


WECHAT_LIKE_PAY_CODES = CodeTable(
    channel="wechat",
    communication_ok=frozenset({"SUCCESS"}),
    success=frozenset({"SUCCESS"}),
    failure=frozenset({"PAYERROR", "CLOSED", "REVOKED"}),
    not_found=frozenset({"ORDERNOTEXIST"}),
)
"""Trade states of a WeChat-Pay-like channel. USERPAYING, NOTPAY, SYSTEMERROR and anything
unknown are processing: the order keeps being queried. ORDERNOTEXIST (a query's "order not
found") is processing too, listed as ``not_found`` for the routing fallback; no failure
code is retryable here (a deployment's configuration names its own)."""

WECHAT_LIKE_REFUND_CODES = CodeTable(
    channel="wechat-refund",
    communication_ok=frozenset({"SUCCESS"}),
    success=frozenset({"SUCCESS"}),
    failure=frozenset({"REFUNDCLOSE"}),
)
"""Refund states; PROCESSING and unknown codes are queried again. Only REFUNDCLOSE says
nothing was given back. CHANGE (WeChat's "refund abnormal": the money left the merchant but
the payer's original account refused it) is not a failure: the refund stays unknown, counts
as refunded, and is left to reconciliation and a person."""
