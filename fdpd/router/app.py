"""The router's HTTP server: the OpenAI API on top of a :class:`RouterCore`.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``POST /tokenize``,
``POST /detokenize`` (``fdpd.router.tokenize``), ``GET /v1/models``, ``GET /v1/models/{model}``,
``GET /v1/cluster``, ``GET /v1/requests/recent`` (``?limit=N``),
``GET /v1/requests/{id}/timeline`` (see ``fdpd.router.timeline``), ``GET /health``,
``GET /metrics``. With an API
key, every ``/v1/*`` path needs ``Authorization: Bearer <key>``; ``/health`` and ``/metrics``
stay open for probes and scrapers. Overload: past ``--max-inflight-requests`` held generation
requests a new one gets 429 with Retry-After, and a body over ``--max-request-body-bytes`` gets
413, both before the body is read (``Admission``).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4 as CONTENT_TYPE
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fdpd.router.chat_completions import create_chat_completion
from fdpd.router.completions import create_completion
from fdpd.router.errors import (
    DEFAULT_RETRY_AFTER,
    APIError,
    install_error_handlers,
    internal_error,
)
from fdpd.router.http_metrics import RouterMetrics
from fdpd.router import tokenize as tokenizing
from fdpd.router.openai_api import ChatCompletionRequest, CompletionRequest, resolve_model
from fdpd.router.tokenize import DetokenizeRequest, TokenizeRequest

if TYPE_CHECKING:
    from fdpd.router.admission import Admission
    from fdpd.router.core import RouterCore

log = logging.getLogger(__name__)
# Requests that take an admission seat (see ``fdpd.router.admission.Admission``).
GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")


@dataclass
class AppContext:
    core: RouterCore
    metrics: RouterMetrics
    started: int
    # --served-model-name; empty: the core's model name.
    served_names: tuple[str, ...] = ()

    @property
    def served_model_names(self) -> tuple[str, ...]:
        """The names clients may ask for; responses name the one asked for (else the first)."""
        return self.served_names or (self.core.model_name,)


def create_app(core: RouterCore, *, api_key: str | None = None, start_core: bool = False,
               served_model_names: Sequence[str] = ()) -> FastAPI:
    """The OpenAI-compatible app for ``core``. With ``start_core``, the app's lifespan awaits
    ``core.start()`` / ``core.stop()`` (they must run on the server's event loop)."""
    lifespan = _core_lifespan(core) if start_core else None
    app = FastAPI(title="fdpd router", lifespan=lifespan)
    ctx = AppContext(core, RouterMetrics(core.metrics_collector()), int(time.time()),
                     tuple(served_model_names))
    app.state.ctx = ctx
    install_error_handlers(app)
    app.add_exception_handler(_BodyTooLarge, _answer_body_too_large)
    app.add_exception_handler(_BodyTooSlow, _answer_body_too_slow)
    # RouterCore's bounds; a test double of the core may have none (then nothing is bounded).
    admission = getattr(core, "admission", None)
    if admission is not None:
        app.add_middleware(_AdmissionMiddleware, admission=admission)
    app.add_middleware(_APIKeyMiddleware, api_key=api_key)
    # Added last, so it is outermost and counts every answer, 401s included.
    app.add_middleware(_HTTPMetricsMiddleware, metrics=ctx.metrics)

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest) -> Response:
        return await _guard(lambda: create_completion(request, body, ctx))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatCompletionRequest) -> Response:
        return await _guard(lambda: create_chat_completion(request, body, ctx))

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        return await _guard_sync(lambda: tokenizing.tokenize(body, ctx))

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        return await _guard_sync(lambda: tokenizing.detokenize(body, ctx))

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(ctx, n) for n in ctx.served_model_names]}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> dict[str, Any]:
        return _model_card(ctx, resolve_model(model, ctx.served_model_names))

    @app.get("/v1/cluster")
    async def cluster() -> JSONResponse:
        return JSONResponse(await _guard_sync(core.cluster))

    @app.get("/v1/requests/recent")
    async def recent_requests(limit: int = 100) -> dict[str, Any]:
        if not 1 <= limit <= ctx.metrics.timelines.capacity:
            raise APIError(400, f"limit must be 1..{ctx.metrics.timelines.capacity}",
                           param="limit")
        return {"object": "list", "data": ctx.metrics.timelines.recent(limit)}

    @app.get("/v1/requests/{request_id}/timeline")
    async def request_timeline(request_id: str) -> dict[str, Any]:
        entry = ctx.metrics.timelines.get(request_id)
        if entry is None:
            raise APIError(404, f"no timeline for request `{request_id}`: unknown, still "
                           f"running, or older than the last "
                           f"{ctx.metrics.timelines.capacity} requests",
                           code="request_not_found")
        return entry

    @app.get("/health")
    async def health() -> JSONResponse:
        ok, why = await _guard_sync(core.healthy)
        if ok:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unavailable", "reason": why}, status_code=503)

    # async on purpose: the cluster collector reads the core's state, which only the event
    # loop touches (a sync handler would run in a worker thread).
    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(ctx.metrics.render(), media_type=CONTENT_TYPE)

    return app


def _model_card(ctx: AppContext, name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": ctx.started, "owned_by": "fdpd",
            "root": ctx.core.model_name, "parent": None,
            "max_model_len": ctx.core.max_model_len}


async def _guard(handler: Callable[[], Awaitable[Response]]) -> Response:
    """Run a handler; anything that is not an APIError is a bug: log it, answer a generic 500."""
    try:
        return await handler()
    except APIError:
        raise
    except Exception:
        log.exception("unhandled error in a request handler")
        raise internal_error() from None


async def _guard_sync(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except APIError:
        raise
    except Exception:
        log.exception("%s failed", getattr(fn, "__name__", "core call"))
        raise internal_error() from None


def _core_lifespan(core: RouterCore) -> Callable[[FastAPI], Any]:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await core.start()
        try:
            yield
        finally:
            await core.stop()
    return lifespan


class _APIKeyMiddleware:
    """401 for ``/v1/*`` without ``Authorization: Bearer <api_key>`` (when a key is set)."""

    def __init__(self, app: ASGIApp, api_key: str | None):
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (self.expected is None or scope["type"] != "http"
                or not scope["path"].startswith("/v1")):
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(b"authorization", b"")
        if hmac.compare_digest(given, self.expected):
            await self.app(scope, receive, send)
            return
        error = APIError(401, "missing or incorrect API key; send 'Authorization: Bearer "
                         "<key>'", code="invalid_api_key",
                         headers={"WWW-Authenticate": "Bearer"})
        await error.response()(scope, receive, send)


class _AdmissionMiddleware:
    """Bounds what the router holds (``Admission``) before reading any body: a body over the
    limit gets 413, at once when its Content-Length says so, else as soon as what was read
    outgrows it (chunked); a generation request finding no seat free gets 429 with
    Retry-After. A seat is held until the response has ended, streams included."""

    def __init__(self, app: ASGIApp, admission: Admission):
        self.app = app
        self.admission = admission

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.admission.max_body_bytes
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            await _body_too_large(limit).response()(scope, receive, send)
            return
        bounded = _bounded_receive(receive, limit, self.admission.body_timeout)
        if scope["method"] != "POST" or scope["path"] not in GENERATION_PATHS:
            await self.app(scope, bounded, send)
            return
        if not self.admission.enter():
            error = APIError(429, f"the router holds its limit of {self.admission.limit} "
                             f"requests (--max-inflight-requests); retry after "
                             f"{DEFAULT_RETRY_AFTER} s", code="rate_limit_exceeded",
                             headers={"Retry-After": str(DEFAULT_RETRY_AFTER)})
            await error.response()(scope, receive, send)
            return
        try:
            await self.app(scope, bounded, send)
        finally:
            self.admission.leave()


class _BodyTooLarge(StarletteHTTPException):
    """Raised while a body is read; FastAPI hands HTTPExceptions from body reading on to the
    app's exception handlers (anything else would become a 400)."""

    def __init__(self, limit: int):
        super().__init__(413)
        self.limit = limit


def _body_too_large(limit: int) -> APIError:
    # No "Connection: close": closing with the body still arriving resets the connection, and
    # the client may lose the 413 with it. The server reads the rest and drops it (bounded
    # memory: uvicorn buffers at most 64 KiB of a body the app does not read).
    return APIError(413, f"the request body exceeds {limit} bytes "
                    "(--max-request-body-bytes)", code="request_too_large")


async def _answer_body_too_large(request: Request, exc: Exception) -> Response:
    return _body_too_large(exc.limit).response()


class _BodyTooSlow(StarletteHTTPException):
    """The body did not arrive within --request-body-timeout (a trickling client would
    otherwise hold its admission seat for as long as it likes)."""

    def __init__(self, timeout: float):
        super().__init__(408)
        self.timeout = timeout


async def _answer_body_too_slow(request: Request, exc: Exception) -> Response:
    return APIError(408, f"the request body did not arrive within {exc.timeout:g} s "
                    "(--request-body-timeout)", code="request_timeout").response()


# Python >= 3.11: a deadline on the current task; before that, wait_for (a task per call).
_timeout_at = getattr(asyncio, "timeout_at", None)


def _bounded_receive(receive: Receive, limit: int, timeout: float) -> Receive:
    """``receive`` while the body arrives: at most ``limit`` bytes within ``timeout`` seconds
    of the first read; after the body (disconnect watching) it is ``receive`` unchanged."""
    received = 0
    deadline: float | None = None
    body_done = False

    async def bounded() -> Message:
        nonlocal received, deadline, body_done
        if body_done:
            return await receive()
        loop = asyncio.get_running_loop()
        if deadline is None:
            deadline = loop.time() + timeout
        try:
            if _timeout_at is not None:          # no task per read (every request reads once)
                async with _timeout_at(deadline):
                    message = await receive()
            else:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError:
            raise _BodyTooSlow(timeout) from None
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise _BodyTooLarge(limit)
            body_done = not message.get("more_body", False)
        else:
            body_done = True
        return message

    return bounded


class _HTTPMetricsMiddleware:
    def __init__(self, app: ASGIApp, metrics: RouterMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            self.metrics.http_requests.labels(
                endpoint=self.metrics.endpoint_label(scope["path"]), status=str(status)).inc()
