"""One request's token stream from the core, turned into text pieces for an HTTP response.

The relay owns the front-end work the engines never do: incremental detokenization and stop
strings (``TextStream``), and the client-side metrics (time to first token, inter-token latency,
end-to-end latency, token counts). Its contract with the core: every way out that leaves the
core's stream unfinished (client gone, stop string, error) calls ``core.abort`` and closes the
core's generator, so P and D free the request's blocks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio

from fdpd.outputs import TextStream, TokenLogprobs, logprobs_from_wire
from fdpd.router.core import RouterError, StreamBroken
from fdpd.router.delta import Route, TokenDelta
from fdpd.router.http_metrics import RouterMetrics
from fdpd.router.timeline import RESUMED, upstream_phases
from fdpd.sampling_params import SamplingParams

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from fdpd.router.core import RouterCore


@dataclass
class Piece:
    """What a response may show after one core delta."""

    text: str
    token_ids: list[int]
    logprobs: list[float] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # With logprobs: each token's rank and top alternatives. On the first piece of a request
    # asking prompt_logprobs: None for the first prompt token, then one entry per prompt token.
    token_logprobs: list[TokenLogprobs] | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Relay:
    """Drives one ``core.generate`` call. Iterate :meth:`pieces` to the end, or close it."""

    def __init__(self, core: RouterCore, metrics: RouterMetrics, request_id: str,
                 prompt_token_ids: list[int], params: SamplingParams, arrival: float):
        self.core = core
        self.metrics = metrics
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.arrival = arrival
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_cached_tokens = 0
        self.num_output_tokens = 0
        self._last_token_at: float | None = None
        self._first_token_at: float | None = None
        self._route: Route | None = None
        self._timeline: dict | None = None
        self._have_prompt_logprobs = False

    def usage(self) -> dict:
        return {"prompt_tokens": self.num_prompt_tokens,
                "completion_tokens": self.num_output_tokens,
                "total_tokens": self.num_prompt_tokens + self.num_output_tokens,
                "prompt_tokens_details": {"cached_tokens": self.num_cached_tokens}}

    async def pieces(self) -> AsyncIterator[Piece]:
        """Pieces until one with a ``finish_reason``. Raises ``RouterError`` (nothing produced
        yet) or ``StreamBroken`` (tokens already produced)."""
        stream = TextStream(self.core.tokenizer, self.prompt_token_ids, self.params)
        deltas = self.core.generate(self.request_id, self.prompt_token_ids, self.params)
        finished = False
        abort_reason = "client disconnected"
        outcome: tuple[str, str | None] = ("aborted", "client disconnected")
        self.metrics.requests_running.inc()
        try:
            async for delta in deltas:
                self._account(delta)
                piece = Piece(stream.add(delta.token_ids, delta.finished),
                              list(delta.token_ids), delta.logprobs)
                self._read_logprobs(delta, piece)
                if stream.stop_reason is not None:
                    piece.finish_reason, piece.stop_reason = "stop", stream.stop_reason
                    if not delta.finished:
                        # The engines do not know about stop strings: tell them to stop now,
                        # before the client is even sent the last piece.
                        await self._end_core(deltas, "stop")
                elif delta.finished:
                    if delta.finish_reason == "error":
                        raise self._failure("the engine reported an error while generating")
                    piece.finish_reason = delta.finish_reason or "stop"
                    piece.stop_reason = delta.stop_reason
                if piece.finished:
                    finished = True
                    outcome = ("finished", piece.finish_reason)
                    self._record_finish(piece.finish_reason)
                    yield piece
                    return
                yield piece
            raise self._failure("the token stream ended before the request finished")
        except (GeneratorExit, asyncio.CancelledError):
            raise
        except BaseException as e:
            abort_reason = "error"
            outcome = ("error", getattr(e, "message", None) or type(e).__name__)
            raise
        finally:
            self.metrics.requests_running.dec()
            if not finished:
                await self._end_core(deltas, abort_reason)
            else:
                await _close(deltas)
            self._record_timeline(*outcome)

    async def _end_core(self, deltas: AsyncIterator[TokenDelta], reason: str) -> None:
        # Shielded: this often runs because the surrounding task is being cancelled (the client
        # went away), and the abort must still reach P and D.
        with anyio.CancelScope(shield=True):
            await self.core.abort(self.request_id, reason)
            await _close(deltas)

    def _read_logprobs(self, delta: TokenDelta, piece: Piece) -> None:
        try:
            piece.token_logprobs = logprobs_from_wire(delta.token_ids, delta.token_logprobs)
            # A resumed request's later attempts compute them again: the first ones stand.
            if delta.prompt_logprobs is not None and not self._have_prompt_logprobs:
                piece.prompt_logprobs = logprobs_from_wire(self.prompt_token_ids,
                                                           delta.prompt_logprobs)
                self._have_prompt_logprobs = True
        except ValueError as exc:
            raise self._failure(f"an instance sent malformed logprobs: {exc}") from None

    def _failure(self, message: str) -> Exception:
        if self.num_output_tokens:
            return StreamBroken(message)
        return RouterError(502, "engine_error", message)

    def _account(self, delta: TokenDelta) -> None:
        now = time.monotonic()
        if delta.num_prompt_tokens:
            self.num_prompt_tokens = delta.num_prompt_tokens
        self.num_cached_tokens = delta.num_cached_tokens
        if delta.finished:
            self._route, self._timeline = delta.route, delta.timeline
        n = len(delta.token_ids)
        if not n:
            return
        if self._last_token_at is None:
            self._first_token_at = now
            self.metrics.ttft.observe(now - self.arrival)
        else:
            gap = (now - self._last_token_at) / n
            for _ in range(n):
                self.metrics.itl.observe(gap)
        self._last_token_at = now
        self.num_output_tokens += n
        self.metrics.generation_tokens.inc(n)

    def _record_finish(self, reason: str) -> None:
        m = self.metrics
        m.e2e.observe(time.monotonic() - self.arrival)
        m.prompt_tokens.inc(self.num_prompt_tokens)
        m.cached_prompt_tokens.inc(self.num_cached_tokens)
        m.request_success.labels(finished_reason=reason).inc()

    def _record_timeline(self, status: str, detail: str | None) -> None:
        """The request's timeline (see ``fdpd.router.timeline``): histogram, log, buffer."""
        try:
            now = time.monotonic()
            e2e = now - self.arrival
            route, upstream = self._route, self._timeline or {}
            phases: dict[str, float] = {}
            if route is not None:
                _route_phases(phases, route, self.arrival)
            phases.update(upstream_phases(upstream))
            _bound_transfer_estimate(phases, upstream, e2e)
            ttft = (self._first_token_at - self.arrival
                    if self._first_token_at is not None else None)
            entry = {
                "request_id": self.request_id, "status": status,
                "finish_reason" if status == "finished" else "reason": detail,
                "arrival_time": round(time.time() - e2e, 3), "e2e_seconds": round(e2e, 6),
                "ttft_seconds": None if ttft is None else round(ttft, 6),
                "mode": route.mode if route else None,
                "prefill_instance": route.prefill if route else None,
                "decode_instance": route.decode if route else None,
                "attempts": route.attempts if route else None,
                "prompt_tokens": self.num_prompt_tokens,
                "cached_tokens": self.num_cached_tokens,
                "output_tokens": self.num_output_tokens,
                "num_preemptions": upstream.get("num_preemptions", 0),
                "resumes": list(route.resumes) if route else [],
                "phases": {k: round(v, 6) for k, v in phases.items()},
                "unaccounted_seconds": round(e2e - sum(phases.values()), 6),
            }
            self.metrics.timelines.record(entry)
        except Exception:                # bookkeeping must never break a response
            log.exception("recording the timeline of %s failed", self.request_id)


def _route_phases(phases: dict[str, float], route: Route, arrival: float) -> None:
    """The router's own phases. A resumed request (``fdpd.router.resume``) queued until its
    first dispatch, and spent ``resumed`` between losing its stream and dispatching it again;
    the serving attempt's phases come from its instances, the lost attempts' are unaccounted."""
    if route.resumes:
        phases["router_queue"] = max(0.0, route.first_dispatched_at - arrival)
        phases[RESUMED] = route.resumed_seconds
    else:
        phases["router_queue"] = max(0.0, route.dispatched_at - arrival)


def _bound_transfer_estimate(phases: dict[str, float], upstream: dict, e2e: float) -> None:
    """``kv_transfer`` is the one phase not measured on one clock (its in-flight part is half
    a round trip). Every other phase is a measured interval on the request's causal chain,
    so when the sum overshoots the end-to-end time, the estimate is what is wrong: shorten
    it, down to its measured part (``kv_send``) at most."""
    over = sum(phases.values()) - e2e
    if over > 0 and "kv_transfer" in phases:
        kv_send = upstream.get("kv_send")
        floor = min(phases["kv_transfer"], kv_send if isinstance(kv_send, (int, float)) else 0.0)
        phases["kv_transfer"] = max(floor, phases["kv_transfer"] - over)


async def _close(stream: AsyncIterator[TokenDelta]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        with anyio.CancelScope(shield=True):
            await aclose()
