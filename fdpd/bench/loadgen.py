"""The load generator of ``fdpd bench serve``: sends a workload's requests to an
OpenAI-compatible server as streaming requests (httpx, asyncio) and times every chunk.

Sessions start at their arrival offsets (Poisson/gamma or trace times); a session's turns run
one after the other. ``max_concurrency`` bounds the requests in flight (a semaphore, FIFO), so
with an infinite rate it is a closed loop of that many clients. Every run is bounded: no session
starts after ``max_duration`` seconds and every request has a deadline of ``request_timeout``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import httpx

from fdpd.bench.datasets import FIRST_TOKEN_ID, Session, Workload
from fdpd.bench.metrics import RequestRecord

_WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
          "juliet", "kilo", "lima", "mike", "november", "oscar", "papa")


@dataclass(frozen=True)
class LoadConfig:
    base_url: str
    endpoint: str = "completions"              # completions | chat
    model: str | None = None                   # None: the first of /v1/models
    offsets: tuple[float, ...] = ()            # session start times (s); empty: all at 0
    max_concurrency: int | None = None
    max_duration: float = 600.0
    request_timeout: float = 300.0
    ignore_eos: bool = True
    temperature: float = 0.0
    return_token_ids: bool = True
    api_key: str | None = None
    warmup: int = 0
    warmup_prompt_len: int = 32
    vocab: int = 32000
    seed: int = 0


def ids_to_text(ids: Sequence[int]) -> str:
    """Deterministic text standing in for token ids (chat endpoint): one word per id."""
    return " ".join(f"{_WORDS[t % 16]}{t // 16}" for t in ids)


class LoadGenerator:
    def __init__(self, config: LoadConfig, workload: Workload,
                 on_done: Callable[[RequestRecord], None] | None = None):
        self.cfg = config
        self.workload = workload
        self.on_done = on_done
        self.records: list[RequestRecord] = []
        self.t0 = 0.0
        self.sessions_started = 0
        self.model = config.model

    # ------------------------------------------------------------------ the run
    async def run(self) -> list[RequestRecord]:
        cfg = self.cfg
        headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
        limit = cfg.max_concurrency or 10_000
        limits = httpx.Limits(max_connections=limit, max_keepalive_connections=limit)
        async with httpx.AsyncClient(base_url=cfg.base_url.rstrip("/"), headers=headers,
                                     timeout=httpx.Timeout(cfg.request_timeout),
                                     limits=limits) as client:
            self.client = client
            if self.model is None:
                self.model = await self._first_model()
            if cfg.warmup:
                await self._warmup()
            sem = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
            self.t0 = time.perf_counter()
            offsets = list(cfg.offsets) or [0.0] * len(self.workload.sessions)
            tasks = []
            index = 0
            for session, offset in zip(self.workload.sessions, offsets):
                if offset > cfg.max_duration:
                    break
                delay = offset - (time.perf_counter() - self.t0)
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(self._session(session, index, sem)))
                self.sessions_started += 1
                index += len(session.turns)
            if tasks:
                await asyncio.gather(*tasks)
        self.records.sort(key=lambda r: r.index)
        return self.records

    async def _first_model(self) -> str:
        r = await self.client.get("/v1/models")
        r.raise_for_status()
        return r.json()["data"][0]["id"]

    async def _warmup(self) -> None:
        # Prompts of their own (never the workload's), so no prefix of the run is pre-cached.
        rng = random.Random(self.cfg.seed + 7777)
        prompts = [[rng.randrange(FIRST_TOKEN_ID, self.cfg.vocab)
                    for _ in range(self.cfg.warmup_prompt_len)] for _ in range(self.cfg.warmup)]
        self.t0 = time.perf_counter()
        await asyncio.gather(*(self._send(RequestRecord(-1), p, 4) for p in prompts))

    async def _session(self, session: Session, first_index: int,
                       sem: asyncio.Semaphore | None) -> None:
        history: list[int] = []
        messages: list[dict] = []
        for k, turn in enumerate(session.turns):
            if k and time.perf_counter() - self.t0 > self.cfg.max_duration:
                return
            prompt = history + turn.prompt_ids if session.chained else turn.prompt_ids
            if self.cfg.endpoint == "chat":
                messages = messages if session.chained else []
                messages.append({"role": "user", "content": ids_to_text(turn.prompt_ids)})
            record = RequestRecord(first_index + k)
            if sem is not None:
                async with sem:
                    output = await self._send(record, prompt, turn.output_len, messages)
            else:
                output = await self._send(record, prompt, turn.output_len, messages)
            self.records.append(record)
            if self.on_done is not None:
                self.on_done(record)
            if not record.ok:
                return                          # a broken conversation does not go on
            if session.chained:
                history = prompt + output[0]
                messages.append({"role": "assistant", "content": output[1]})

    # ------------------------------------------------------------------ one request
    def _body(self, prompt: list[int], max_tokens: int,
              messages: list[dict] | None) -> tuple[str, dict]:
        cfg = self.cfg
        body: dict = {"model": self.model, "max_tokens": max_tokens, "stream": True,
                      "stream_options": {"include_usage": True},
                      "temperature": cfg.temperature}
        if cfg.ignore_eos:
            body["ignore_eos"] = True
        if cfg.return_token_ids:
            body["return_token_ids"] = True
        if cfg.endpoint == "chat":
            body["messages"] = list(messages or [{"role": "user",
                                                  "content": ids_to_text(prompt)}])
            return "/v1/chat/completions", body
        body["prompt"] = prompt
        return "/v1/completions", body

    async def _send(self, record: RequestRecord, prompt: list[int], max_tokens: int,
                    messages: list[dict] | None = None) -> tuple[list[int], str]:
        """Send one streaming request, filling ``record``; returns the output (ids, text)."""
        path, body = self._body(prompt, max_tokens, messages)
        record.prompt_tokens = len(prompt)
        out_ids: list[int] = []
        out_text: list[str] = []
        counted = 0
        record.start = time.perf_counter() - self.t0
        try:
            async with self.client.stream("POST", path, json=body) as response:
                if response.status_code != 200:
                    text = (await response.aread()).decode(errors="replace")
                    record.error = f"HTTP {response.status_code}: {_error_message(text)}"
                    return out_ids, ""
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    now = time.perf_counter() - self.t0
                    chunk = json.loads(data)
                    if "error" in chunk:
                        record.error = "stream error: " + _error_message(json.dumps(chunk))
                        return out_ids, "".join(out_text)
                    usage = chunk.get("usage")
                    if usage:
                        record.prompt_tokens = usage.get("prompt_tokens", record.prompt_tokens)
                        record.output_tokens = usage.get("completion_tokens", counted)
                        details = usage.get("prompt_tokens_details") or {}
                        if details.get("cached_tokens") is not None:
                            record.cached_tokens = details["cached_tokens"]
                    n = _chunk_output(chunk, out_ids, out_text)
                    if n:
                        counted += n
                        record.chunk_times.append(now)
            record.end = time.perf_counter() - self.t0
            if not record.output_tokens:
                record.output_tokens = counted
            record.ok = bool(record.chunk_times)
            if not record.ok:
                record.error = "the stream ended without output"
        except (httpx.HTTPError, json.JSONDecodeError, OSError) as e:
            record.error = f"{type(e).__name__}: {e}"[:200]
        return out_ids, "".join(out_text)



def _chunk_output(chunk: dict, out_ids: list[int], out_text: list[str]) -> int:
    """Output tokens in one chunk (its token_ids, else 1 if it has text); appends them."""
    n = 0
    for choice in chunk.get("choices") or []:
        ids = choice.get("token_ids")
        text = choice.get("text")
        if text is None:
            text = (choice.get("delta") or {}).get("content")
        if ids:
            out_ids.extend(ids)
            n += len(ids)
        elif text:
            n += 1
        if text:
            out_text.append(text)
    return n


def _error_message(text: str) -> str:
    try:
        obj = json.loads(text)
        return str(obj.get("error", {}).get("message", text))[:160]
    except (ValueError, AttributeError):
        return text[:160]


def run_load(config: LoadConfig, workload: Workload, progress: bool = True
             ) -> tuple[list[RequestRecord], float]:
    """Run ``workload``; returns (records, duration from first send to last response)."""
    # The CLI logs at info; one httpx line per request would drown the progress bar.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=workload.num_requests, unit="req", dynamic_ncols=True)
    gen = LoadGenerator(config, workload, on_done=(lambda r: bar.update(1)) if bar else None)
    try:
        records = asyncio.run(gen.run())
    finally:
        if bar is not None:
            bar.close()
    ends = [r.end for r in records if r.end is not None]
    duration = max(ends) if ends else 0.0
    return records, duration if math.isfinite(duration) else 0.0
