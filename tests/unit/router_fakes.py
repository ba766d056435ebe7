"""Stand-ins for ``fdpd.router.core.RouterCore`` to test the HTTP layer without a cluster.

``ScriptedCore`` replays a fixed token list (with knobs for errors, delays and hangs) and records
every call; ``EngineCore`` runs the real ``tiny`` engine in-process, so text and token ids are the
ones a real cluster would produce.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from prometheus_client.core import GaugeMetricFamily

from fdpd.model.tokenizer import ByteTokenizer, Tokenizer
from fdpd.outputs import logprobs_to_wire
from fdpd.router.core import RouterError, StreamBroken, TokenDelta
from fdpd.sampling_params import SamplingParams

TINY_VOCAB = 384


class MarkupByteTokenizer(ByteTokenizer):
    """A ``ByteTokenizer`` that reads ``<bos>``/``<eos>`` in text as the special ids, as Hugging
    Face tokenizers do with added tokens that chat templates write."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [self.BOS] if add_special_tokens else []
        for part in re.split(r"(<bos>|<eos>)", text):
            if part in ("<bos>", "<eos>"):
                ids.append(self.BOS if part == "<bos>" else self.EOS)
            else:
                ids.extend(part.encode("utf-8"))
        return ids


@dataclass
class Call:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass
class ScriptedCore:
    """Generates ``script`` (token ids), ``chunk`` tokens per delta, then EOS ("stop"), or stops
    at ``max_tokens`` ("length").

    ``error``: raise it before any token. ``break_after``: raise StreamBroken after that many
    tokens. ``hang_after``: after that many tokens wait until aborted (or forever).
    ``logprob``: the logprob reported for every token when the request asks for logprobs.
    """

    script: list[int] = field(default_factory=lambda: list(b"Hello world. The end."))
    model_name: str = "tiny"
    max_model_len: int = 128
    tokenizer: Tokenizer | None = field(default_factory=lambda: ByteTokenizer(TINY_VOCAB))
    chat_template: str | None = None
    chunk: int = 1
    delay: float = 0.0
    num_cached_tokens: int = 3
    error: RouterError | None = None
    break_after: int | None = None
    hang_after: int | None = None
    logprob: float = -0.5
    health: tuple[bool, str] = (True, "")
    calls: list[Call] = field(default_factory=list)
    aborts: list[tuple[str, str]] = field(default_factory=list)
    closed: list[str] = field(default_factory=list)
    _abort_events: dict[str, asyncio.Event] = field(default_factory=dict)

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[TokenDelta]:
        self.calls.append(Call(request_id, list(prompt_token_ids), params))
        aborted = self._abort_events.setdefault(request_id, asyncio.Event())
        try:
            if self.error is not None:
                raise self.error
            limit = params.max_tokens if params.max_tokens is not None else 10**9
            sent = 0
            while True:
                if self.hang_after is not None and sent >= self.hang_after:
                    await aborted.wait()
                    return
                if self.break_after is not None and sent >= self.break_after:
                    raise StreamBroken("decode instance died")
                if self.delay:
                    await asyncio.sleep(self.delay)
                if aborted.is_set():
                    return
                ids = self.script[sent:sent + min(self.chunk, limit - sent)]
                sent += len(ids)
                if sent >= limit:
                    reason, stop = "length", None
                elif sent >= len(self.script):
                    ids, reason, stop = ids + [ByteTokenizer.EOS], "stop", None
                    sent += 1
                else:
                    reason = stop = None
                lps = [self.logprob] * len(ids) if params.logprobs is not None else None
                yield TokenDelta(ids, lps, reason is not None, reason, stop,
                                 len(prompt_token_ids), self.num_cached_tokens)
                if reason is not None:
                    return
        finally:
            self.closed.append(request_id)

    async def abort(self, request_id: str, reason: str) -> None:
        self.aborts.append((request_id, reason))
        self._abort_events.setdefault(request_id, asyncio.Event()).set()

    def cluster(self) -> dict:
        return {"router": {"inflight": 0}, "instances": [{"instance_id": "fake", "role": "mixed"}]}

    def metrics_collector(self) -> _UpCollector:
        return _UpCollector()

    def healthy(self) -> tuple[bool, str]:
        return self.health


class EngineCore:
    """The real ``tiny`` engine behind the core interface (one in-process engine, stepped by
    whichever request is waiting for output). ``engine`` may be shared with an offline ``LLM``
    used as the reference, as long as the two are not used at the same time."""

    def __init__(self, engine=None, max_model_len: int = 512):
        from fdpd.config import EngineConfig
        from fdpd.engine.engine import Engine

        self.engine = engine or Engine(EngineConfig(model="tiny", max_model_len=max_model_len))
        self.model_name = "tiny"
        self.max_model_len = self.engine.max_model_len
        self.tokenizer = self.engine.loaded.tokenizer
        self.chat_template = None
        self.aborts: list[tuple[str, str]] = []
        self._queues: dict[str, asyncio.Queue] = {}
        self._lock: asyncio.Lock | None = None

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[TokenDelta]:
        from fdpd.engine.engine import RequestError as EngineRequestError

        if self._lock is None:
            self._lock = asyncio.Lock()
        queue: asyncio.Queue = asyncio.Queue()
        try:
            self.engine.add_request(request_id, prompt_token_ids, params)
        except EngineRequestError as exc:
            raise RouterError(400, "invalid_request", str(exc)) from None
        self._queues[request_id] = queue
        try:
            while True:
                while queue.empty():
                    async with self._lock:
                        if queue.empty():
                            self._step()
                    await asyncio.sleep(0)
                delta = queue.get_nowait()
                yield delta
                if delta.finished:
                    return
        finally:
            self._queues.pop(request_id, None)
            self.engine.abort_request(request_id)

    def _step(self) -> None:
        if not self.engine.has_unfinished_requests():
            raise StreamBroken("engine has no work but a request is waiting")
        for out in self.engine.step():
            queue = self._queues.get(out.request_id)
            if queue is not None:
                queue.put_nowait(TokenDelta(
                    out.new_token_ids, out.new_logprobs, out.finished, out.finish_reason,
                    out.stop_reason, out.num_prompt_tokens, out.num_cached_tokens,
                    token_logprobs=logprobs_to_wire(out.new_token_logprobs),
                    prompt_logprobs=logprobs_to_wire(out.prompt_logprobs)))

    async def abort(self, request_id: str, reason: str) -> None:
        self.aborts.append((request_id, reason))
        self.engine.abort_request(request_id)

    def cluster(self) -> dict:
        return {"instances": []}

    def metrics_collector(self) -> _UpCollector:
        return _UpCollector()

    def healthy(self) -> tuple[bool, str]:
        return True, ""


class _UpCollector:
    """The core's share of ``/metrics`` (the real core's is the cluster view)."""

    def collect(self):
        return [GaugeMetricFamily("fdpd:fake_core_up", "1 if the fake core is up.", value=1)]
