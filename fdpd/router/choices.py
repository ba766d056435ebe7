"""``n`` samples of one prompt: one :class:`Relay` per choice, their pieces merged as they come.

Choice i is an engine request of its own, seeded ``seed + i`` (``SamplingParams.for_choice``,
as vLLM seeds its child requests), so a seeded request repeats choice by choice. The prompt is
prefilled once: choice 0 goes first, and the others are sent only once its first token is out.
By then its prompt's full blocks are in the prefix cache of the instance that computed them, and
the router's prefix affinity sends the other choices to that same instance (in PD, the decode
holding choice 0 also reports those blocks as already present, so the prefill ships only the
rest). Only choice 0 asks for ``prompt_logprobs`` (computing them bypasses the prefix cache);
every choice shows its values.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import anyio

from fdpd.router.http_metrics import RouterMetrics
from fdpd.router.relay import Piece, Relay
from fdpd.sampling_params import SamplingParams

if TYPE_CHECKING:
    from fdpd.router.core import RouterCore


class Choices:
    """Iterate :meth:`pieces` (``(index, piece)``) until every choice finished, or close it:
    closing ends every choice's relay, which aborts what still runs."""

    def __init__(self, core: RouterCore, metrics: RouterMetrics, request_id: str,
                 prompt_token_ids: list[int], params: SamplingParams, arrival: float):
        self.request_id = request_id
        self.n = params.n
        self.relays = []
        for i in range(params.n):
            choice = params.for_choice(i)
            if i:
                choice = dataclasses.replace(choice, prompt_logprobs=None)
            self.relays.append(Relay(core, metrics, request_id if params.n == 1
                                     else f"{request_id}-{i}", prompt_token_ids, choice,
                                     arrival))
        self._prompt_logprobs: list | None = None
        self._shown = {0}                   # choices whose prompt logprobs went out

    def usage(self) -> dict:
        """The prompt counted once (as vLLM does), completion tokens of every choice."""
        first = self.relays[0].usage()
        completion = sum(r.num_output_tokens for r in self.relays)
        return {**first, "completion_tokens": completion,
                "total_tokens": first["prompt_tokens"] + completion}

    async def pieces(self) -> AsyncIterator[tuple[int, Piece]]:
        """Raises what a relay raises (``RouterError``/``StreamBroken``); the other choices
        are then ended too."""
        if self.n == 1:
            pieces = self.relays[0].pieces()
            try:
                async for piece in pieces:
                    yield 0, piece
            finally:
                # Closing this generator must close the relay's now (its abort), not at GC.
                with anyio.CancelScope(shield=True):
                    await pieces.aclose()
            return
        queue: asyncio.Queue = asyncio.Queue()
        tasks = [asyncio.ensure_future(self._pump(0, queue))]
        running = self.n
        try:
            while running:
                index, piece, error = await queue.get()
                if error is not None:
                    raise error
                if piece is None:
                    running -= 1
                    continue
                if index == 0 and len(tasks) == 1:
                    # Choice 0's prompt is computed and cached: the others can share it.
                    tasks += [asyncio.ensure_future(self._pump(i, queue))
                              for i in range(1, self.n)]
                if piece.prompt_logprobs is not None:
                    self._prompt_logprobs = piece.prompt_logprobs
                elif index and self._prompt_logprobs is not None:
                    piece.prompt_logprobs = self._first_piece_logprobs(index)
                yield index, piece
        finally:
            for task in tasks:
                task.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.gather(*tasks, return_exceptions=True)

    def _first_piece_logprobs(self, index: int) -> list | None:
        """The prompt logprobs for a choice's first piece (only once per choice)."""
        if index in self._shown:
            return None
        self._shown.add(index)
        return self._prompt_logprobs

    async def _pump(self, index: int, queue: asyncio.Queue) -> None:
        pieces = self.relays[index].pieces()
        try:
            async for piece in pieces:
                queue.put_nowait((index, piece, None))
            queue.put_nowait((index, None, None))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            queue.put_nowait((index, None, exc))
        finally:
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await pieces.aclose()
