"""What completions and chat completions share: checking a request against the model, running it
to a full response while watching for the client to leave, and streaming it as SSE.

An endpoint supplies a :class:`ResponseFormat` (how pieces look on the wire); everything about
the request's life (disconnects, aborts, errors before and after the first byte) is here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from fdpd.model.tokenizer import Tokenizer
from fdpd.outputs import TokenLogprobs
from fdpd.router.choices import Choices
from fdpd.router.core import RouterError, StreamBroken
from fdpd.router.errors import DEFAULT_RETRY_AFTER, APIError, bad_request, error_body
from fdpd.router.relay import Piece
from fdpd.sampling_params import SamplingParams, SamplingParamsError

log = logging.getLogger(__name__)
T = TypeVar("T")
# Status recorded (never really sent) when the client left before the response started;
# nginx's convention.
CLIENT_CLOSED = 499
SSE_DONE = b"data: [DONE]\n\n"


class ClientGone(Exception):
    """The client disconnected while its request was running."""


@dataclass
class Output:
    """A finished request, accumulated from its pieces."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_logprobs: list[TokenLogprobs] | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None

    def add(self, piece: Piece) -> None:
        self.text += piece.text
        self.token_ids.extend(piece.token_ids)
        if piece.logprobs is not None:
            self.logprobs = (self.logprobs or []) + list(piece.logprobs)
        if piece.token_logprobs is not None:
            self.token_logprobs = (self.token_logprobs or []) + piece.token_logprobs
        if piece.prompt_logprobs is not None:
            self.prompt_logprobs = piece.prompt_logprobs
        if piece.finished:
            self.finish_reason, self.stop_reason = piece.finish_reason, piece.stop_reason


class ResponseFormat(Protocol):
    """How one endpoint shows a request's ``n`` choices (``index``) on the wire."""

    def stream_start(self) -> list[dict[str, Any]]: ...
    def stream_chunk(self, index: int, piece: Piece) -> dict[str, Any] | None: ...
    def usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]: ...
    def response(self, outputs: list[Output], usage: dict[str, Any]) -> dict[str, Any]: ...


def output_logprobs(token_ids: list[int], floats: list[float] | None,
                    entries: list[TokenLogprobs] | None) -> list[TokenLogprobs] | None:
    """Each token's logprobs: the instances' entries, or (from an instance that sends only the
    chosen tokens' values) entries without rank or alternatives."""
    if entries is not None:
        return entries
    if floats is None:
        return None
    return [TokenLogprobs(t, lp, 0, (), ()) for t, lp in zip(token_ids, floats)]


def prompt_logprob_dicts(prompt_token_ids: list[int], entries: list[TokenLogprobs | None],
                         k: int, tokenizer: Tokenizer | None) -> list[dict | None]:
    """vLLM's ``prompt_logprobs``: None for the first token, then per prompt token a map
    token id -> {logprob, rank, decoded_token}: the token itself first, then the ``k`` most
    likely ones (rank 1..k)."""
    out: list[dict | None] = []
    for token, entry in zip(prompt_token_ids, entries):
        if entry is None:
            out.append(None)
            continue
        ranked = [(token, entry.logprob, entry.rank)]
        ranked += [(t, lp, i + 1) for i, (t, lp)
                   in enumerate(zip(entry.top_ids[:k], entry.top_logprobs[:k]))]
        step: dict[str, dict] = {}
        for t, lp, rank in ranked:
            step.setdefault(str(t), {"logprob": finite_logprob(lp), "rank": rank,
                                     "decoded_token": token_text(tokenizer, t)})
        out.append(step)
    return out


# Stands in for -inf/NaN in JSON (which has neither), as vLLM does.
LOGPROB_FLOOR = -9999.0


def finite_logprob(value: float) -> float:
    return value if math.isfinite(value) else LOGPROB_FLOOR


def token_text(tokenizer: Tokenizer | None, token_id: int) -> str:
    """How one token is shown in logprobs: its text, or ``token_id:N`` without a tokenizer
    (vLLM's convention)."""
    if tokenizer is None:
        return f"token_id:{token_id}"
    try:
        return tokenizer.decode([token_id], skip_special_tokens=False)
    except ValueError:
        return f"token_id:{token_id}"


# ---------------------------------------------------------------------- checking a request
# Integers travel to the instances as msgpack (64 bits): a larger one in a request is a 400
# here, not an encoding failure inside the core after it took the request.
WIRE_INT_LIMIT = 2**63


def sampling_params(build: Any, *args: Any, rename: dict[str, str] | None = None
                    ) -> SamplingParams:
    """``build(*args)``, with a bad value turned into a 400 that names the field (as the client
    called it: ``rename`` maps SamplingParams names to request names)."""
    rename = rename or {}
    try:
        params = build(*args)
    except SamplingParamsError as exc:
        param = rename.get(exc.field, exc.field)
        message = str(exc)
        if param != exc.field and message.startswith(f"{exc.field}: "):
            message = f"{param}: {message[len(exc.field) + 2:]}"
        raise bad_request(message, param) from None
    # What SamplingParams accepts but the wire cannot carry: huge ints, lone surrogates.
    for name, value in params.to_dict().items():
        param = rename.get(name, name)
        for item in value if isinstance(value, list) else (value,):
            if isinstance(item, str):
                check_text(item, param)
            elif isinstance(item, int) and not -WIRE_INT_LIMIT <= item < WIRE_INT_LIMIT:
                raise bad_request(f"{param}: {item} is out of range (|value| < 2**63)", param)
    return params


def check_text(text: str, param: str) -> None:
    """A 400 for text that is not valid Unicode: a JSON string may hold a lone surrogate
    (``"\\ud800"``), which UTF-8 (the tokenizer, the wire) cannot encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise bad_request(f"{param} is not valid Unicode: it contains the lone surrogate "
                          f"{text[exc.start]!r}", param) from None


def fit_to_context(params: SamplingParams, prompt_len: int, max_model_len: int,
                   prompt_param: str = "prompt", max_tokens_param: str = "max_tokens"
                   ) -> SamplingParams:
    """Check prompt + max_tokens against the context length; resolve ``max_tokens`` None to
    the room left."""
    try:
        max_tokens = params.resolved_max_tokens(max_model_len, prompt_len)
    except SamplingParamsError as exc:
        names = {"prompt": prompt_param, "max_tokens": max_tokens_param}
        message = f"{exc} (this model's context length is {max_model_len} tokens)"
        raise bad_request(message, names.get(exc.field, exc.field)) from None
    if params.max_tokens != max_tokens:
        params = dataclasses.replace(params, max_tokens=max_tokens)
    return params


def check_prompt_ids(ids: list[int], tokenizer: Tokenizer | None, param: str = "prompt") -> None:
    if not ids:
        raise bad_request(f"{param} is empty", param)
    # Without a tokenizer the instances check the vocabulary; ids must still fit the wire.
    limit = tokenizer.vocab_size if tokenizer is not None else WIRE_INT_LIMIT
    bad = next((t for t in ids if t >= limit), None)
    if bad is not None:
        raise bad_request(f"token id {bad} is outside the vocabulary [0, {limit})"
                          if tokenizer is not None else
                          f"token id {bad} is out of range (< 2**63)", param)


def check_text_needs(params: SamplingParams, tokenizer: Tokenizer | None) -> None:
    if params.stop and tokenizer is None:
        raise bad_request("stop strings need a tokenizer and this model has none; use "
                          "stop_token_ids", "stop")


def router_error(exc: RouterError) -> APIError:
    headers = None
    if exc.status in (429, 503):
        wait = getattr(exc, "retry_after", 0) or DEFAULT_RETRY_AFTER
        headers = {"Retry-After": str(max(1, math.ceil(wait)))}
    return APIError(exc.status, exc.message, code=exc.code, headers=headers)


# ---------------------------------------------------------------------- running a request
async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; if the client disconnects first, cancel it (its cleanup aborts the
    request in the core) and raise :class:`ClientGone`."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise ClientGone()
    finally:
        for t in (watch, task):
            if not t.done():
                t.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.gather(watch, task, return_exceptions=True)


async def _wait_for_disconnect(request: Request) -> None:
    # After the body is read, the server's receive() only returns on disconnect (or, in some
    # servers, at response end; this task is cancelled before that).
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def full_response(request: Request, relay: Choices, fmt: ResponseFormat) -> Response:
    async def collect() -> list[Output]:
        outputs = [Output() for _ in range(relay.n)]
        pieces = relay.pieces()
        try:
            async for index, piece in pieces:
                outputs[index].add(piece)
        finally:
            await pieces.aclose()
        return outputs

    try:
        outputs = await until_disconnected(request, collect())
    except ClientGone:
        return Response(status_code=CLIENT_CLOSED)
    except RouterError as exc:
        raise router_error(exc) from None
    except StreamBroken as exc:
        raise APIError(502, f"generation failed: {exc.message}", code=502) from None
    return JSONResponse(fmt.response(outputs, relay.usage()))


async def streaming_response(request: Request, relay: Choices, fmt: ResponseFormat,
                             include_usage: bool) -> Response:
    pieces = relay.pieces()
    # Wait for the first piece before committing to a 200, so a request the cluster cannot take
    # (no capacity, timeout) gets its real status and Retry-After, not a 200 and an error event.
    try:
        first = await until_disconnected(request, pieces.__anext__())
    except ClientGone:
        await pieces.aclose()
        return Response(status_code=CLIENT_CLOSED)
    except RouterError as exc:
        await pieces.aclose()
        raise router_error(exc) from None
    except StreamBroken as exc:
        await pieces.aclose()
        raise APIError(502, f"generation failed: {exc.message}", code=502) from None
    return EventStreamResponse(_sse(relay, pieces, first, fmt, include_usage))


async def _sse(relay: Choices, pieces: AsyncIterator[tuple[int, Piece]],
               first: tuple[int, Piece], fmt: ResponseFormat,
               include_usage: bool) -> AsyncIterator[bytes]:
    try:
        for chunk in fmt.stream_start():
            yield sse_event(chunk)
        item: tuple[int, Piece] | None = first
        while item is not None:
            chunk = fmt.stream_chunk(*item)
            if chunk is not None:
                yield sse_event(chunk)
            item = await anext(pieces, None)
        if include_usage:
            yield sse_event(fmt.usage_chunk(relay.usage()))
    except (StreamBroken, RouterError) as exc:
        yield sse_event(error_body(f"generation failed: {exc.message}", "server_error",
                                   code=502))
    except Exception:
        log.exception("request %s: streaming failed", relay.request_id)
        yield sse_event(error_body("internal server error; the router log has the details",
                                   "server_error", code=500))
    finally:
        await pieces.aclose()
    yield SSE_DONE


def sse_event(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


class EventStreamResponse(StreamingResponse):
    """SSE response that always closes its body iterator, however the response ends: Starlette
    only cancels the task on disconnect, which can leave the iterator suspended at a yield (and
    its request running in the cluster) until garbage collection."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes]):
        super().__init__(content, headers={"Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
        self._content = content

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._content.aclose()  # type: ignore[attr-defined]
