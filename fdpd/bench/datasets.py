"""Workloads for ``fdpd bench serve``: sessions of requests with token-id prompts.

A workload is a list of :class:`Session`. A session is one or more turns sent one after the
other; in a *chained* session (multi-turn chat) each turn's prompt is the whole conversation so
far (earlier prompts, the tokens the server generated, then the new user tokens), as a chat
client sends it. Every other dataset makes one-turn sessions. A session may carry a trace
arrival time (seconds from the trace's start).

Datasets:

- ``random``: prompt and output lengths uniform in ``[len * (1 - r), len * (1 + r)]``.
- ``shared-prefix``: ``groups`` system prompts of ``prefix_len`` tokens, each request one of
  them plus a random suffix of the random lengths.
- ``multi-turn``: chained sessions of ``turns`` turns, each turn adding random-length user tokens.
- ``mooncake``: a Mooncake FAST'25 trace (JSONL: ``timestamp`` ms, ``input_length``,
  ``output_length``, ``hash_ids`` over 512-token blocks). Each hash id becomes a block of
  deterministic pseudo-random tokens seeded by the id, so two prompts share exactly the leading
  blocks their ids share. ``length_scale`` multiplies the input and output lengths,
  ``block_scale`` the 512-token block (use the same factor to keep the trace's reuse).
- ``interference``: the PD-vs-colocated workload: mostly short prompts with long outputs (steady
  decodes) and, with probability ``long_fraction``, long prompts with short outputs.
- ``azure``: an Azure LLM inference trace CSV (``TIMESTAMP,ContextTokens,GeneratedTokens``):
  arrivals and lengths, random tokens (the trace has no prefix information).
"""

from __future__ import annotations

import csv
import json
import math
import random
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

MOONCAKE_BLOCK = 512
# Token ids below this are left out of generated prompts (BOS/EOS/pad live there).
FIRST_TOKEN_ID = 10
DATA_DIR = Path("/work/shared/data/traces")


@dataclass
class Turn:
    """One request: the prompt tokens it adds and the output tokens it asks for."""

    prompt_ids: list[int]
    output_len: int


@dataclass
class Session:
    turns: list[Turn]
    arrival: float | None = None        # seconds from the trace's start, if from a trace
    chained: bool = False               # later turns carry the conversation so far

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(t.prompt_ids) for t in self.turns)


@dataclass
class Workload:
    name: str
    sessions: list[Session]
    notes: dict = field(default_factory=dict)      # scaling factors, truncations, sources

    @property
    def num_requests(self) -> int:
        return sum(len(s.turns) for s in self.sessions)


def _tokens(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(FIRST_TOKEN_ID, vocab) for _ in range(n)]


def _length(rng: random.Random, mean: int, ratio: float) -> int:
    low, high = max(1, int(mean * (1 - ratio))), max(1, int(mean * (1 + ratio)))
    return rng.randint(low, high)


def random_dataset(num_prompts: int, input_len: int, output_len: int, range_ratio: float = 0.0,
                   vocab: int = 32000, seed: int = 0) -> Workload:
    rng = random.Random(seed)
    sessions = [Session([Turn(_tokens(rng, _length(rng, input_len, range_ratio), vocab),
                              _length(rng, output_len, range_ratio))])
                for _ in range(num_prompts)]
    return Workload("random", sessions, {"input_len": input_len, "output_len": output_len,
                                         "range_ratio": range_ratio})


def shared_prefix_dataset(num_prompts: int, groups: int, prefix_len: int, input_len: int,
                          output_len: int, range_ratio: float = 0.0, vocab: int = 32000,
                          seed: int = 0) -> Workload:
    rng = random.Random(seed)
    prefixes = [_tokens(rng, prefix_len, vocab) for _ in range(groups)]
    sessions = [Session([Turn(prefixes[i % groups]
                              + _tokens(rng, _length(rng, input_len, range_ratio), vocab),
                              _length(rng, output_len, range_ratio))])
                for i in range(num_prompts)]
    return Workload("shared-prefix", sessions, {"groups": groups, "prefix_len": prefix_len,
                                                "suffix_len": input_len,
                                                "output_len": output_len})


def multi_turn_dataset(num_prompts: int, turns: int, input_len: int, output_len: int,
                       range_ratio: float = 0.0, vocab: int = 32000, seed: int = 0) -> Workload:
    rng = random.Random(seed)
    sessions, left = [], num_prompts
    while left > 0:
        n = min(turns, left)
        sessions.append(Session([Turn(_tokens(rng, _length(rng, input_len, range_ratio), vocab),
                                      _length(rng, output_len, range_ratio)) for _ in range(n)],
                                chained=True))
        left -= n
    return Workload("multi-turn", sessions, {"turns": turns, "turn_input_len": input_len,
                                             "output_len": output_len})


def interference_dataset(num_prompts: int, short_len: int, long_len: int, decode_len: int,
                         long_output_len: int, long_fraction: float, vocab: int = 32000,
                         seed: int = 0) -> Workload:
    rng = random.Random(seed)
    sessions, longs = [], 0
    for i in range(num_prompts):
        # Deterministic spacing (every k-th request is long) rather than coin flips, so a small
        # run has exactly its share of long prompts.
        is_long = long_fraction > 0 and math.floor((i + 1) * long_fraction) > longs
        longs += is_long
        n, out = (long_len, long_output_len) if is_long else (short_len, decode_len)
        sessions.append(Session([Turn(_tokens(rng, n, vocab), out)]))
    return Workload("interference", sessions, {
        "short_prompt_len": short_len, "decode_len": decode_len, "long_prompt_len": long_len,
        "long_output_len": long_output_len, "long_fraction": long_fraction,
        "long_requests": longs})


# ---------------------------------------------------------------------- Mooncake
class BlockTokens:
    """Deterministic tokens of a trace block id (cached: blocks repeat across requests)."""

    def __init__(self, block_len: int, vocab: int, salt: int = 0, cache_size: int = 65536):
        self.block_len = block_len
        self.vocab = vocab
        self.salt = salt
        self._cache: OrderedDict[int, list[int]] = OrderedDict()
        self._cache_size = cache_size

    def __call__(self, hash_id: int) -> list[int]:
        tokens = self._cache.get(hash_id)
        if tokens is None:
            rng = random.Random(hash_id * 1_000_003 + self.salt)
            tokens = _tokens(rng, self.block_len, self.vocab)
            self._cache[hash_id] = tokens
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(hash_id)
        return tokens


def read_mooncake(path: str | Path, offset: int = 0, limit: int | None = None) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i < offset or not line.strip():
                continue
            if limit is not None and len(rows) >= limit:
                break
            rows.append(json.loads(line))
    return rows


def mooncake_prompt(row: dict, block_tokens: BlockTokens, length_scale: float,
                    index: int) -> list[int]:
    """Prompt of one trace row: its hash ids' blocks, cut to the scaled input length. If the
    scaled length needs more blocks than the row has ids (``block_scale < length_scale``), the
    extra blocks are unique to this request."""
    n = max(1, math.ceil(row["input_length"] * length_scale))
    ids = list(row["hash_ids"])
    need = -(-n // block_tokens.block_len)
    ids += [-(index * 4096 + k + 1) for k in range(max(0, need - len(ids)))]
    out: list[int] = []
    for h in ids[:need]:
        out.extend(block_tokens(h))
    return out[:n]


def mooncake_dataset(path: str | Path, num_prompts: int | None, length_scale: float,
                     block_scale: float, output_scale: float | None = None,
                     vocab: int = 32000, offset: int = 0,
                     max_input_len: int | None = None) -> Workload:
    if length_scale <= 0 or block_scale <= 0:
        raise ValueError("length_scale and block_scale must be > 0")
    output_scale = length_scale if output_scale is None else output_scale
    block_len = max(1, round(MOONCAKE_BLOCK * block_scale))
    blocks = BlockTokens(block_len, vocab)
    rows = read_mooncake(path, offset, num_prompts)
    sessions, truncated = [], 0
    t0 = rows[0]["timestamp"] if rows else 0
    for i, row in enumerate(rows):
        prompt = mooncake_prompt(row, blocks, length_scale, offset + i)
        if max_input_len is not None and len(prompt) > max_input_len:
            prompt, truncated = prompt[:max_input_len], truncated + 1
        out = max(1, math.ceil(row["output_length"] * output_scale))
        sessions.append(Session([Turn(prompt, out)], arrival=(row["timestamp"] - t0) / 1000))
    return Workload("mooncake", sessions, {
        "trace": str(path), "offset": offset, "rows": len(rows), "length_scale": length_scale,
        "block_scale": block_scale, "output_scale": output_scale,
        "block_tokens": block_len, "max_input_len": max_input_len, "truncated": truncated})


def ideal_prefix_hit_ratio(rows: Iterable[dict], capacity_blocks: int | None) -> float:
    """Token-weighted prefix hit ratio of an LRU cache of ``capacity_blocks`` trace blocks
    (None: unbounded) over ``rows`` in order: DATA.md's "ideal" column, for any slice of a
    trace (scaling lengths and blocks by one factor leaves it unchanged)."""
    lru: OrderedDict[int, None] = OrderedDict()
    hit = total = 0
    block = MOONCAKE_BLOCK
    for row in rows:
        n = row["input_length"]
        total += n
        k = 0
        for h in row["hash_ids"]:
            if h not in lru:
                break
            k += 1
        hit += min(k * block, n)
        for h in row["hash_ids"]:
            if h in lru:
                lru.move_to_end(h)
            else:
                lru[h] = None
                if capacity_blocks is not None and len(lru) > capacity_blocks:
                    lru.popitem(last=False)
    return hit / total if total else 0.0


# ---------------------------------------------------------------------- Azure
def _azure_time(text: str) -> float:
    # "2023-11-16 18:15:46.6805900": seven fractional digits, more than fromisoformat takes.
    head, _, frac = text.strip().partition(".")
    return datetime.fromisoformat(head).timestamp() + (float("0." + frac) if frac else 0.0)


def azure_dataset(path: str | Path, num_prompts: int | None, length_scale: float = 1.0,
                  output_scale: float | None = None, vocab: int = 32000, offset: int = 0,
                  max_input_len: int | None = None, seed: int = 0) -> Workload:
    output_scale = length_scale if output_scale is None else output_scale
    rng = random.Random(seed)
    sessions: list[Session] = []
    t0 = None
    truncated = 0
    with open(path, encoding="utf-8", newline="") as f:
        for i, row in enumerate(csv.DictReader(f)):
            if i < offset:
                continue
            if num_prompts is not None and len(sessions) >= num_prompts:
                break
            t = _azure_time(row["TIMESTAMP"])
            t0 = t if t0 is None else t0
            n = max(1, math.ceil(int(row["ContextTokens"]) * length_scale))
            if max_input_len is not None and n > max_input_len:
                n, truncated = max_input_len, truncated + 1
            out = max(1, math.ceil(int(row["GeneratedTokens"]) * output_scale))
            sessions.append(Session([Turn(_tokens(rng, n, vocab), out)], arrival=t - t0))
    return Workload("azure", sessions, {"trace": str(path), "offset": offset,
                                        "length_scale": length_scale,
                                        "output_scale": output_scale, "truncated": truncated})


# ---------------------------------------------------------------------- arrivals
def poisson_offsets(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Send times (s) of ``n`` requests at ``rate`` req/s: gaps drawn from a gamma distribution
    with shape ``burstiness`` and mean ``1/rate`` (shape 1 = Poisson; < 1 burstier; > 1 more
    regular), as vLLM's benchmark_serving. ``rate`` inf: everything at time 0."""
    if rate <= 0 or burstiness <= 0:
        raise ValueError("rate and burstiness must be > 0")
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    theta = 1.0 / (rate * burstiness)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.gammavariate(burstiness, theta)
    return out


def trace_offsets(sessions: Sequence[Session], speedup: float = 1.0) -> list[float]:
    if speedup <= 0:
        raise ValueError("speedup must be > 0")
    if any(s.arrival is None for s in sessions):
        raise ValueError("this dataset has no arrival times; use --request-rate")
    return [s.arrival / speedup for s in sessions]


def default_trace(name: str) -> Path:
    return {"mooncake": DATA_DIR / "conversation_trace.jsonl",
            "azure": DATA_DIR / "AzureLLMInferenceTrace_conv.csv"}[name]
