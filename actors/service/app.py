"""``create_app(engine, config=...)``: the ASGI application (FastAPI) over an open engine.

Threads: handlers are coroutines on the event loop; they only parse, check and convert.
Every engine call (each may block: an ask of an actor, a SQLite read) runs in a bounded
pool of worker threads (``ServiceConfig.threads``, an anyio ``CapacityLimiter``), never on
the loop. The app shuts the engine down when it stops (``ServiceConfig.shutdown_engine``),
after the in-flight requests drained (uvicorn) and the outbox was delivered (bounded).
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from payengine.actors.engine import Engine
from payengine.actors.messages import AccountView, HoldView, OrderView, Receipt, RefundView
from payengine.actors.metrics import EngineMetrics
from payengine.actors.service import models
from payengine.actors.service.answers import (
    NOTIFY_RESPONSES,
    AttentionOut,
    ChannelsOut,
    ErrorOut,
    JournalOut,
    OutcomeOut,
    StatusOut,
    ok,
)
from payengine.actors.service.config import ServiceConfig
from payengine.actors.service.errors import details_of, error_body, headers_of, status_of
from payengine.actors.service.limits import Bounds, TokenBuckets
from payengine.actors.service.notify import (
    AckFormat,
    ack_format,
    answer_notification,
    format_for_wallet,
    notify_channel,
    refusal,
)
from payengine.actors.service.views import to_json
from payengine.engine.discounts import Quote
from payengine.engine.errors import EngineClosed, ExtraMissing, PaymentError
from payengine.engine.operator import OrderPage, Resolution
from payengine.engine.shift_report import ShiftReport

T = TypeVar("T")

API_VERSION = "1"
VALIDATION_ERRORS_MAX = 20
"""Schema errors listed in a 422's details at most."""
DRAIN_POLL_S = 0.05
"""How often the shutdown looks whether the outbox is delivered."""
HEADERS_MAX = 100
"""Request headers handed to the engine at most (uvicorn bounds their size)."""
_RAW_JSON_BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"type": "object", "additionalProperties": True}}}}}


class Service:
    """The app's state: the engine, the worker limiter, whether it is closing."""

    def __init__(self, engine: Engine, config: ServiceConfig,
                 formats: Mapping[str, AckFormat]) -> None:
        self.engine = engine
        self.config = config
        self.formats = dict(formats)
        self.closing = False
        self.limiter: anyio.CapacityLimiter | None = None

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` on a worker thread (at most ``threads`` at once)."""
        if self.closing:
            raise EngineClosed("the service is shutting down: ask again after its restart")
        if self.limiter is None:  # served without its lifespan (a bare test client)
            self.limiter = anyio.CapacityLimiter(self.config.threads)
        return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs),
                                              limiter=self.limiter)

    async def drain(self) -> None:
        """Stop taking engine calls, wait (bounded) for the outbox, shut the engine down."""
        self.closing = True
        deadline = time.monotonic() + self.config.notify_drain_timeout_ms / 1000
        while time.monotonic() < deadline:
            try:
                caught_up = await anyio.to_thread.run_sync(
                    self.engine.notifications.caught_up)
            except PaymentError:  # shut down already (by its owner): nothing to wait for
                break
            if caught_up:
                break
            await anyio.sleep(DRAIN_POLL_S)
        if self.config.shutdown_engine:
            await anyio.to_thread.run_sync(self.engine.shutdown)

    def ack(self, channel: str) -> AckFormat:
        """The channel's named format, else ``json``: never guessed from its name."""
        return self.formats.get(channel) or format_for_wallet("json")


def create_app(engine: Engine, *, config: ServiceConfig | None = None,
               notify_formats: Mapping[str, str] | None = None,
               metrics: EngineMetrics | None = None) -> FastAPI:
    """The HTTP service over ``engine`` (open, owned by the caller until the app stops).

    ``notify_formats``: channel name -> acknowledgement format (``wechat``, ``alipay``,
    ``json``) of ``POST /v1/notify/{channel}``; a channel not named answers ``json``.
    ``metrics``: the engine's ``EngineMetrics`` if the caller made one (an engine has one
    observer); ``None`` makes one (``GET /metrics``), or none without prometheus-client."""
    config = config or ServiceConfig()
    if metrics is None:
        with contextlib.suppress(ExtraMissing):
            metrics = EngineMetrics(engine)
    formats = {name: ack_format(kind) for name, kind in (notify_formats or {}).items()}
    service = Service(engine, config, formats)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.limiter = anyio.CapacityLimiter(config.threads)
        yield
        await service.drain()

    app = FastAPI(title="payengine", version=API_VERSION, lifespan=lifespan,
                  description="A payment engine's HTTP service: see README.md, "
                              "'HTTP service'.")
    app.state.service = service
    _errors(app, service)
    _probes(app, service)
    _metrics(app, service, metrics)
    _payments(app, service)
    _accounts(app, service)
    _operator(app, service)
    _signed(app, service)
    _notify(app, service)
    app.add_middleware(Bounds, max_body_bytes=config.max_body_bytes,
                       buckets=TokenBuckets(config.rate_per_s, config.rate_burst,
                                            config.rate_clients_max),
                       api_token=config.api_token(), ack_for=service.ack)
    return app


def _error(status: int, code: str, message: str, details: Mapping[str, Any] | None = None,
           headers: Mapping[str, str] | None = None) -> Response:
    return Response(error_body(code, message, details), status_code=status,
                    media_type="application/json", headers=dict(headers or {}))


def _refused(service: Service, request: Request, status: int, code: str, message: str,
             details: Mapping[str, Any] | None = None,
             headers: Mapping[str, str] | None = None) -> Response:
    """The one error body; on a wallet's notification route, the wallet's own failure
    (status and headers kept): a wallet reads only its format, and retries on non-2xx."""
    channel = notify_channel(request.scope.get("path", ""))
    if channel is None:
        return _error(status, code, message, details, headers)
    answer = refusal(service.ack(channel), status, code, headers)
    return Response(answer.body, status_code=answer.status, media_type=answer.media_type,
                    headers=answer.headers)


def _errors(app: FastAPI, service: Service) -> None:
    @app.exception_handler(PaymentError)
    async def typed(request: Request, error: PaymentError) -> Response:
        return _refused(service, request, status_of(error), error.code, error.message,
                        details_of(error), headers_of(error))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> Response:
        listed = [{"loc": [str(part) for part in e.get("loc", ())], "msg": str(e.get("msg")),
                   "type": str(e.get("type"))} for e in error.errors()[:VALIDATION_ERRORS_MAX]]
        return _refused(service, request, 422, "validation_error", "the request does not "
                        "have the documented shape", {"errors": listed})

    @app.exception_handler(StarletteHTTPException)
    async def http(request: Request, error: StarletteHTTPException) -> Response:
        if error.status_code == 400:  # a body FastAPI could not parse (not UTF-8 JSON)
            return _refused(service, request, 422, "validation_error",
                            "the body is not UTF-8 JSON", {"errors": []})
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code,
                                                                 "http_error")
        return _refused(service, request, error.status_code, code, str(error.detail), {},
                        error.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> Response:
        return _refused(service, request, 500, "internal_error", "the service failed; "
                        "nothing was changed by this answer, ask again or read the state")


def _probes(app: FastAPI, service: Service) -> None:
    @app.get("/healthz", tags=["probes"])
    async def healthz() -> dict[str, str]:
        """The process is up (answers even while the engine resumes or closes)."""
        return {"status": "up"}

    @app.get("/readyz", tags=["probes"], responses={503: {
        "model": ErrorOut, "description": "not_ready: resuming or closing"}})
    async def readyz() -> Response:
        """The engine is open, has resumed every unfinished order, and is not closing."""
        resuming = service.engine.resuming()
        closing = service.closing or not service.engine.is_open
        if closing or resuming:
            return _error(503, "not_ready", "the engine is resuming or closing",
                          {"resuming": resuming, "closing": closing}, {"Retry-After": "1"})
        return JSONResponse({"status": "ready"})

    @app.get("/v1/channels/health", tags=["channels"], responses=ok(ChannelsOut))
    async def channel_health() -> dict[str, Any]:
        """Each channel's circuit breaker: ``closed``, ``open`` or ``half_open``."""
        return {"channels": await service.call(service.engine.channel_health)}


def _metrics(app: FastAPI, service: Service, metrics: EngineMetrics | None) -> None:
    @app.get("/metrics", tags=["probes"], response_class=Response)
    async def scrape() -> Response:
        """The engine's metrics in the Prometheus text format (README, *Metrics*); 501
        ``extra_missing`` without prometheus-client. Read on a worker thread (a scrape
        counts a few rows through the engine's readers)."""
        if metrics is None:
            return _error(501, "extra_missing", "metrics need prometheus-client: pip "
                                                "install 'payengine[metrics]'", {"extra": "metrics"})
        text = await anyio.to_thread.run_sync(metrics.text)
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")


def _payments(app: FastAPI, service: Service) -> None:
    engine = service.engine

    @app.post("/v1/quotes", tags=["quotes"], responses=ok(Quote))
    async def create_quote(body: models.QuoteIn) -> Any:
        benefits = None if body.benefits is None else body.benefits.build()
        return to_json(await service.call(engine.quote, body.merchant_id, body.user_id,
                                          body.sale.build(), benefits))

    @app.get("/v1/quotes/{quote_id}", tags=["quotes"], responses=ok(Quote))
    async def get_quote(quote_id: str) -> Any:
        return to_json(await service.call(engine.get_quote, quote_id))

    @app.post("/v1/orders", tags=["orders"], responses=ok(Receipt))
    async def submit(body: models.PaymentIn) -> Any:
        """Submit a payment; the same request again returns the same receipt."""
        return to_json(await service.call(engine.submit, body.build()))

    @app.get("/v1/orders", tags=["orders"], responses=ok(OrderView))
    async def find_order(merchant_id: str, merchant_order_no: str,
                         attempt: int | None = Query(None)) -> Any:
        """The order of a merchant order number (the latest attempt, or that one)."""
        return to_json(await service.call(engine.find_order, merchant_id, merchant_order_no,
                                          attempt))

    @app.get("/v1/orders/{order_id}", tags=["orders"], responses=ok(OrderView))
    async def get_order(order_id: str) -> Any:
        return to_json(await service.call(engine.get_order, order_id))

    @app.post("/v1/orders/{order_id}/close", tags=["orders"], responses=ok(OrderView))
    async def close(order_id: str) -> Any:
        return to_json(await service.call(engine.close, order_id))

    @app.post("/v1/orders/{order_id}/verify", tags=["orders"], responses=ok(OrderView))
    async def verify(order_id: str, body: models.VerifyIn) -> Any:
        return to_json(await service.call(engine.verify, order_id, body.code))

    @app.post("/v1/orders/{order_id}/change", tags=["orders"], responses=ok(Receipt))
    async def change(order_id: str, body: models.PaymentIn) -> Any:
        return to_json(await service.call(engine.change_order, order_id, body.build()))

    @app.post("/v1/orders/{order_id}/capture", tags=["pre-authorisations"], responses=ok(OrderView))
    async def capture(order_id: str, body: models.CaptureIn) -> Any:
        """Capture what the pump dispensed of an authorised pre-authorisation."""
        return to_json(await service.call(engine.capture, order_id, body.amount_minor,
                                          capture_id=body.capture_id))

    @app.post("/v1/orders/{order_id}/void", tags=["pre-authorisations"], responses=ok(OrderView))
    async def void(order_id: str) -> Any:
        """Void a pre-authorisation not captured: holds released, the channel's voided."""
        return to_json(await service.call(engine.void, order_id))

    @app.post("/v1/orders/{order_id}/refunds", tags=["refunds"], responses=ok(RefundView))
    async def refund(order_id: str, body: models.RefundIn) -> Any:
        return to_json(await service.call(engine.refund, order_id, body.refund_no,
                                          body.amount_minor, reason=body.reason))

    @app.get("/v1/orders/{order_id}/refunds/{refund_no:path}", tags=["refunds"], responses=ok(RefundView))
    async def get_refund(order_id: str, refund_no: str) -> Any:
        view = await service.call(engine.get_order, order_id)
        for found in view.refunds:
            if found.refund_no == refund_no:
                return to_json(found)
        return _error(404, "unknown_refund", f"order {order_id} has no refund {refund_no!r}")

    @app.get("/v1/shifts", tags=["reports"], responses=ok(ShiftReport))
    async def shift_report(station_id: str, shift_id: str) -> Any:
        return to_json(await service.call(engine.shift_report, station_id, shift_id))


def _accounts(app: FastAPI, service: Service) -> None:
    engine = service.engine

    @app.post("/v1/accounts", tags=["accounts"], responses=ok(AccountView))
    async def open_account(body: models.AccountIn) -> Any:
        return to_json(await service.call(engine.open_account, body.account_id, body.unit,
                                          minor_per_unit=body.minor_per_unit))

    @app.get("/v1/accounts", tags=["accounts"], responses=ok(AccountView))
    async def get_account(account_id: str) -> Any:
        return to_json(await service.call(engine.get_account, account_id))

    @app.post("/v1/accounts/fund", tags=["accounts"], responses=ok(AccountView))
    async def fund(body: models.FundIn) -> Any:
        return to_json(await service.call(engine.fund, body.account_id, body.amount,
                                          funding_id=body.funding_id))

    @app.post("/v1/accounts/status", tags=["accounts"], responses=ok(StatusOut))
    async def set_status(body: models.StatusIn) -> Any:
        previous = await service.call(engine.set_account_status, body.account_id, body.status)
        return {"account_id": body.account_id, "previous": previous, "status": body.status}

    @app.post("/v1/holds", tags=["holds"], responses=ok(HoldView))
    async def pre_hold(body: models.HoldIn) -> Any:
        return to_json(await service.call(engine.pre_hold, body.account_id, body.amount,
                                          hold_id=body.hold_id, ttl_ms=body.ttl_ms))

    @app.get("/v1/holds", tags=["holds"], responses=ok(HoldView))
    async def get_hold(account_id: str, hold_id: str) -> Any:
        return to_json(await service.call(engine.get_hold, account_id, hold_id))

    @app.post("/v1/holds/release", tags=["holds"], responses=ok(HoldView))
    async def release_hold(body: models.ReleaseIn) -> Any:
        return to_json(await service.call(engine.release_hold, body.account_id, body.hold_id))


def _operator(app: FastAPI, service: Service) -> None:
    """The operator tools (README "Operator tools") over HTTP, as the CLI's ``orders``,
    ``attention`` and ``resolve``."""
    engine = service.engine

    @app.get("/v1/operator/orders", tags=["operator"], responses=ok(OrderPage))
    async def find_orders(state: str | None = None, since_ms: int | None = None,
                          until_ms: int | None = None, merchant_id: str | None = None,
                          user_id: str | None = None, station_id: str | None = None,
                          channel: str | None = None, limit: int = 100,
                          after: str | None = None) -> Any:
        """One page of ``Engine.find_orders``: ``{"orders": [...], "next_after": ...}``."""
        return to_json(await service.call(
            engine.find_orders, state=state, since_ms=since_ms, until_ms=until_ms,
            merchant_id=merchant_id, user_id=user_id, station_id=station_id,
            channel=channel, limit=limit, after=after))

    @app.get("/v1/operator/attention", tags=["operator"], responses=ok(AttentionOut))
    async def attention() -> Any:
        """The attention queue: ``{"items": [...], "counts": {kind: n}}``."""
        items = await service.call(engine.attention)
        counts: dict[str, int] = {}
        for item in items:
            counts[item.kind.value] = counts.get(item.kind.value, 0) + 1
        return {"items": to_json(items), "counts": counts}

    @app.post("/v1/operator/resolve", tags=["operator"], responses=ok(Resolution))
    async def resolve(body: models.ResolveIn) -> Any:
        """``Engine.resolve``: journalled with who and why; the same again: ``repeated``."""
        return to_json(await service.call(engine.resolve, body.item, body.action,
                                          operator=body.operator, reason=body.reason))

    @app.get("/v1/operator/journal", tags=["operator"], responses=ok(JournalOut))
    async def journal(limit: int = 100) -> Any:
        """Resolutions made, newest first (``Engine.operator_journal``)."""
        return {"resolutions": to_json(await service.call(engine.operator_journal, limit))}


def request_headers(request: Request) -> dict[str, str]:
    """The headers as the engine takes them; one name given twice keeps both, under two
    spellings, so the engine's own check (a header given twice) refuses the request."""
    headers: dict[str, str] = {}
    for raw_name, raw_value in request.headers.raw[:HEADERS_MAX]:
        name, value = raw_name.decode("latin-1"), raw_value.decode("latin-1")
        for spelling in (name.lower(), name.title(), name.upper()):
            if spelling not in headers:
                headers[spelling] = value
                break
    return headers


def _signed(app: FastAPI, service: Service) -> None:
    engine = service.engine
    calls: dict[str, Callable[[bytes, Mapping[str, str]], object]] = {
        "pay": engine.submit_signed, "close": engine.close_signed,
        "refund": engine.refund_signed, "query": engine.query_signed}
    answers: dict[str, Any] = {"pay": Receipt, "close": OrderView, "refund": RefundView,
                               "query": OrderView}

    def route(op: str) -> None:
        call = calls[op]

        async def signed(request: Request) -> Any:
            body = await request.body()
            return to_json(await service.call(call, body, request_headers(request)))

        signed.__doc__ = (f"A merchant's signed ``{op}`` request: the raw body and the "
                          f"X-Payengine-* headers, verified by the engine.")
        app.post(f"/v1/signed/{op}", tags=["signed merchant requests"], name=f"signed_{op}",
                 openapi_extra=_RAW_JSON_BODY, responses=ok(answers[op]))(signed)

    for op in calls:
        route(op)


def _notify(app: FastAPI, service: Service) -> None:
    @app.post("/v1/providers/{provider}/callback", tags=["voucher provider callbacks"],
              openapi_extra=_RAW_JSON_BODY, responses=ok(OutcomeOut))
    async def provider_callback(provider: str, request: Request) -> Any:
        """An external voucher provider's callback, exactly as received: verified by its
        adapter (``provider_callback_rejected``, 400, if not), then queued to its actor."""
        body = await request.body()
        outcome = await service.call(service.engine.handle_provider_callback, provider, body,
                                     request_headers(request))
        return {"outcome": outcome}

    @app.post("/v1/notify/{channel}", tags=["wallet notifications"],
              openapi_extra=_RAW_JSON_BODY, responses=NOTIFY_RESPONSES)
    async def notify(channel: str, request: Request) -> Response:
        """A wallet's notification, exactly as received: verified by the channel's adapter,
        checked and committed by the engine, then acknowledged in the wallet's format."""
        fmt = service.ack(channel)
        body = await request.body()
        answer = await service.call(answer_notification, service.engine, channel, body,
                                    request_headers(request), fmt)
        return Response(answer.body, status_code=answer.status, media_type=answer.media_type,
                        headers=answer.headers)
