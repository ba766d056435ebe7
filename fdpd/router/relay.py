"""One request's token stream from the core, turned into text pieces for an HTTP response.

The relay owns the front-end work the engines never do: incremental detokenization and stop
strings (``TextStream``), and the client-side metrics (time to first token, inter-token latency,
end-to-end latency, token counts). Its contract with the core: every way out that leaves the
core's stream unfinished (client gone, stop string, error) calls ``core.abort`` and closes the
core's generator, so P and D free the request's blocks.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio

from fdpd.outputs import TextStream
from fdpd.router.core import RouterError, StreamBroken, TokenDelta
from fdpd.router.http_metrics import RouterMetrics
from fdpd.sampling_params import SamplingParams

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
        self.metrics.requests_running.inc()
        try:
            async for delta in deltas:
                self._account(delta)
                piece = Piece(stream.add(delta.token_ids, delta.finished),
                              list(delta.token_ids), delta.logprobs)
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
                    self._record_finish(piece.finish_reason)
                    yield piece
                    return
                yield piece
            raise self._failure("the token stream ended before the request finished")
        except (GeneratorExit, asyncio.CancelledError):
            raise
        except BaseException:
            abort_reason = "error"
            raise
        finally:
            self.metrics.requests_running.dec()
            if not finished:
                await self._end_core(deltas, abort_reason)
            else:
                await _close(deltas)

    async def _end_core(self, deltas: AsyncIterator[TokenDelta], reason: str) -> None:
        # Shielded: this often runs because the surrounding task is being cancelled (the client
        # went away), and the abort must still reach P and D.
        with anyio.CancelScope(shield=True):
            await self.core.abort(self.request_id, reason)
            await _close(deltas)

    def _failure(self, message: str) -> Exception:
        if self.num_output_tokens:
            return StreamBroken(message)
        return RouterError(502, "engine_error", message)

    def _account(self, delta: TokenDelta) -> None:
        now = time.monotonic()
        if delta.num_prompt_tokens:
            self.num_prompt_tokens = delta.num_prompt_tokens
        self.num_cached_tokens = delta.num_cached_tokens
        n = len(delta.token_ids)
        if not n:
            return
        if self._last_token_at is None:
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
        m.request_success.inc(finished_reason=reason)


async def _close(stream: AsyncIterator[TokenDelta]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        with anyio.CancelScope(shield=True):
            await aclose()
