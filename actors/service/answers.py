"""What each route answers, for the OpenAPI document: the engine's views (frozen
dataclasses, as ``views.to_json`` writes them) on success, the one error body on a refusal,
the wallet's own format on a notification route.

Documentation only: nothing here validates an answer (the views are built by the engine
and converted by ``to_json``); ``tests/test_service_openapi.py`` checks that real answers
match what is documented, so a client written from ``/openapi.json`` alone reads them
right. Pure: no I/O, any thread.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from payengine.engine.operator import AttentionItem, Resolution

Responses = dict[int | str, dict[str, Any]]


class ErrorDetail(BaseModel):
    code: str
    """The typed error's stable code (README "Errors")."""
    message: str
    details: dict[str, Any]


class ErrorOut(BaseModel):
    """Every refusal but a wallet notification's: ``{"error": {code, message, details}}``."""

    error: ErrorDetail


class StatusOut(BaseModel):
    account_id: str
    previous: str
    status: str


class AttentionOut(BaseModel):
    items: list[AttentionItem]
    counts: dict[str, int]


class JournalOut(BaseModel):
    resolutions: list[Resolution]


class OutcomeOut(BaseModel):
    outcome: str


class ChannelsOut(BaseModel):
    channels: dict[str, str]


ERROR_STATUSES = {
    400: "a typed error of the engine (invalid_request, ...)",
    401: "a merchant signature refused, or the API token missing",
    403: "risk_blocked, verification_failed, a frozen or closed party",
    404: "no such order, account, hold, quote, refund...",
    409: "the state does not allow it (illegal_transition, idempotency_conflict, ...)",
    413: "payload_too_large: the body is larger than max_body_bytes",
    422: "validation_error: the body or a query parameter is not the documented shape",
    429: "rate_limited, with Retry-After",
    503: "overloaded, engine_closed (with Retry-After), ...",
}
"""The refusals every ``/v1`` route may answer (README "Errors" has the codes)."""


def ok(model: Any, description: str = "Success") -> Responses:
    """A route's 200 answer, ``model`` documented (dataclasses through pydantic), with the
    error answers of ``/v1``."""
    return {200: {"model": model, "description": description}, **errors()}


def errors() -> Responses:
    return {status: {"model": ErrorOut, "description": what}
            for status, what in ERROR_STATUSES.items()}


_WALLET_TEXT = {"text/plain": {"schema": {"type": "string", "enum": ["success", "fail"]}}}
_WALLET_JSON = {"application/json": {"schema": {"type": "object", "properties": {
    "return_code": {"type": "string", "enum": ["SUCCESS", "FAIL"]},
    "return_msg": {"type": "string"},
    "code": {"type": "string", "enum": ["SUCCESS", "FAIL"]},
    "message": {"type": "string"}}}}}

NOTIFY_RESPONSES: Responses = {
    200: {"description": "Acknowledged once committed, in the wallet's format "
                         "(wechat: return_code SUCCESS; alipay: the text success; else "
                         "code SUCCESS); X-Payengine-Order-State has the order's state",
          "content": {**_WALLET_JSON, **_WALLET_TEXT}},
    **{status: {"description": f"Refused ({what}), in the wallet's format (return_code or "
                               f"code FAIL, or the text fail): the wallet sends it again",
                "content": {**_WALLET_JSON, **_WALLET_TEXT}}
       for status, what in ((400, "notification_rejected and other typed errors"),
                            (404, "unknown order"), (409, "unverified or unconfirmed"),
                            (405, "method_not_allowed"), (413, "payload_too_large"),
                            (422, "validation_error"), (429, "rate_limited"),
                            (500, "internal_error"),
                            (503, "engine_closed, overloaded"))},
}
"""``POST /v1/notify/{channel}``: never the JSON error body (README "Wallet
notifications")."""
