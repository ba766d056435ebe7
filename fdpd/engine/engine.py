"""The engine core every role runs: Scheduler + BlockManager + ModelRunner + Sampler.

``Engine.step()`` is one iteration of the loop: schedule, run the model, sample, update. The
engine works on token ids only; text (detokenization, stop strings) belongs to the front end.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fdpd.config import ConfigError, EngineConfig
from fdpd.engine import logprobs as logprob_math
from fdpd.engine.block_manager import BlockManager
from fdpd.engine.request import Request, RequestStatus
from fdpd.engine.runner import BatchItem, ModelRunner, kv_block_bytes
from fdpd.engine.sampler import Sampler, SamplingRow
from fdpd.engine.scheduler import PreemptionHandler, Scheduler
from fdpd.model.config import ModelConfig
from fdpd.model.loader import LoadedModel, load_model, load_model_metadata
from fdpd.sampling_params import SamplingParams

log = logging.getLogger(__name__)


def resolve_max_model_len(mc: ModelConfig, asked: int | None) -> int:
    limit = mc.max_position_embeddings
    if mc.sliding_window is not None and mc.sliding_window < limit:
        # Within the window, sliding-window attention equals full attention; beyond it the
        # paged kernel would need a window mask, so the context stops there.
        limit = mc.sliding_window
    if asked is None:
        return limit
    if asked > limit:
        raise ConfigError("max_model_len", f"{asked} exceeds the model's limit of {limit} "
                          "tokens (max_position_embeddings or sliding_window)")
    return asked


class RequestError(ValueError):
    """A request the engine cannot serve. Names the offending field; other requests go on."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class StepOutput:
    """What one step did for one request."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[float] | None
    finished: bool
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    # With sampling_params.logprobs: each new token's rank and top alternatives
    # (fdpd.outputs.TokenLogprobs). With prompt_logprobs: on this engine's first
    # sample of the request, the prompt's entries (None for its first token).
    new_token_logprobs: list | None = None
    prompt_logprobs: list | None = None


class Engine:
    def __init__(self, config: EngineConfig, *, loaded: LoadedModel | None = None,
                 preemption: PreemptionHandler | None = None):
        self.config = config
        self.device = torch.device(config.device)
        if loaded is None:
            # Check the context limit before building anything sized by it (the RoPE table).
            limit = resolve_max_model_len(load_model_metadata(config.model)[0],
                                          config.max_model_len)
            if config.cost_model:
                from fdpd.engine.cost_model import load_cost_model

                loaded = load_cost_model(config.model, config.dtype, limit)
            else:
                loaded = load_model(config.model, dtype=config.dtype, device=config.device,
                                    max_positions=limit, kernels=config.kernels)
        self.loaded = loaded
        mc = self.loaded.config
        self.model_config = mc
        self.dtype = getattr(torch, self.loaded.dtype)
        self.max_model_len = resolve_max_model_len(mc, config.max_model_len)
        bytes_per_block = kv_block_bytes(self.loaded.model, config.block_size, self.dtype)
        num_blocks = config.num_kv_blocks or max(1, config.kv_cache_memory // bytes_per_block)
        # A cost model's KV is never computed: a fingerprint of its own keeps it out of real
        # caches and stores.
        self.kv_kind = (f"cost-model/{self.loaded.dtype}" if config.cost_model
                        else self.loaded.dtype)
        self.fingerprint = mc.fingerprint(self.kv_kind, config.block_size)
        self.block_manager = BlockManager(num_blocks, config.block_size,
                                          config.enable_prefix_caching, self.fingerprint)
        if config.cost_model:
            from fdpd.engine.cost_model import CostModelRunner, StepCost

            self.runner = CostModelRunner(mc, StepCost.parse(config.cost_model),
                                          num_blocks=num_blocks, block_size=config.block_size,
                                          device=self.device, dtype=self.dtype)
        else:
            self.runner = ModelRunner(self.loaded.model, num_blocks=num_blocks,
                                      block_size=config.block_size, device=self.device,
                                      dtype=self.dtype, kernels=config.kernels)
        if preemption is None and config.kv_store:
            preemption = self._store_preemption()
        self.scheduler = Scheduler(
            self.block_manager, max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=self.max_model_len, policy=config.resolved_policy("mixed"),
            preemption=preemption)
        self.sampler = Sampler(mc.vocab_size, self.device,
                               native_kernels=config.kernels != "torch")
        self._seeds = random.Random(config.seed)
        self.eos_token_ids = self._eos_token_ids()

    def _store_preemption(self):
        from fdpd.kvstore import open_store
        from fdpd.kvstore.offload import KVOffload, StorePreemption

        try:
            store = open_store(self.config.kv_store, timeout=self.config.kv_store_timeout)
        except ValueError as e:
            raise ConfigError("kv_store", str(e)) from None
        offload = KVOffload(store, self.runner.kv_cache, self.fingerprint)
        return StorePreemption(offload, self.config.kv_store_write_finished)

    def close(self) -> None:
        """Stop background work (the KV-store worker) and close the store."""
        close = getattr(self.scheduler.preemption, "close", None)
        if close is not None:
            close()

    def _eos_token_ids(self) -> tuple[int, ...]:
        ids = set(self.model_config.eos_token_ids)
        if self.loaded.tokenizer is not None:
            ids.update(self.loaded.tokenizer.eos_token_ids)
        return tuple(sorted(ids))

    # ---------------------------------------------------------------- requests in and out
    def make_request(self, request_id: str, prompt_token_ids: Sequence[int],
                     params: SamplingParams, priority: int = 0, *, seed: int | None = None,
                     max_tokens: int | None = None, num_output_tokens: int = 0) -> Request:
        """Validate and build a request without admitting it. ``seed``/``max_tokens`` override
        the values derived from ``params`` (the router fixes them for P and D alike).

        A resumed request (moved off a draining instance) comes with ``num_output_tokens``: the
        last that many of ``prompt_token_ids`` are tokens it already generated. They become
        its outputs again (so sampling, penalties and stop rules see what they saw before),
        and ``max_tokens`` then counts only the tokens still to generate."""
        if not isinstance(params, SamplingParams):
            raise RequestError("sampling_params", f"expected SamplingParams, got "
                               f"{type(params).__name__}")
        ids = list(prompt_token_ids)
        if not ids:
            raise RequestError("prompt", "the prompt is empty")
        vocab = self.model_config.vocab_size
        # A list, not next(..., None): None is itself a bad token id.
        bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool)
               or not 0 <= t < vocab]
        if bad:
            raise RequestError("prompt", f"token id {bad[0]!r} is outside the vocabulary "
                               f"[0, {vocab})")
        n, limit = len(ids), self.max_model_len
        resumed = num_output_tokens
        if (not isinstance(resumed, int) or isinstance(resumed, bool)
                or not 0 <= resumed < n or (resumed and max_tokens is None)):
            raise RequestError("num_output_tokens", f"must be an integer in [0, {n}) with "
                               f"max_tokens given, got {num_output_tokens!r}")
        if n >= limit:
            raise RequestError("prompt", f"the prompt has {n} tokens; max_model_len is {limit} "
                               "and at least one token must be generated")
        if params.max_tokens is not None and n - resumed + params.max_tokens > limit:
            raise RequestError("max_tokens", f"prompt ({n} tokens) + max_tokens "
                               f"({params.max_tokens}) exceeds max_model_len ({limit})")
        if max_tokens is None:
            max_tokens = params.max_tokens if params.max_tokens is not None else limit - n
        elif not 1 <= max_tokens <= limit - n:
            raise RequestError("max_tokens", f"{max_tokens} does not fit: prompt has {n} "
                               f"tokens, max_model_len is {limit}")
        need = self.block_manager.blocks_for(n + max_tokens)
        if need > self.block_manager.num_blocks:
            raise RequestError("max_tokens", f"prompt + max_tokens needs {need} KV blocks but "
                               f"the pool has {self.block_manager.num_blocks}")
        if params.n != 1:
            raise RequestError("n", f"an engine request is one sample, got n={params.n}; "
                               "fan out SamplingParams.for_choice(i) for i < n")
        if params.prompt_logprobs is not None and self.config.cost_model:
            raise RequestError("prompt_logprobs", "a cost-model engine computes no logits")
        if seed is None:
            seed = params.seed if params.seed is not None else self._seeds.getrandbits(63)
        req = Request(request_id, tuple(ids[:n - resumed]), params,
                      max_tokens=max_tokens + resumed, seed=seed,
                      eos_token_ids=self.eos_token_ids, priority=priority)
        for token in ids[n - resumed:]:
            req.append_output(token)
        if params.prompt_logprobs is not None:
            req.prompt_logprobs = [None]
        return req

    def add_request(self, request_id: str, prompt_token_ids: Sequence[int],
                    params: SamplingParams, priority: int = 0) -> Request:
        req = self.make_request(request_id, prompt_token_ids, params, priority)
        self.scheduler.add(req)
        return req

    def abort_request(self, request_id: str,
                      status: RequestStatus = RequestStatus.FINISHED_ABORTED) -> bool:
        req = self.scheduler.requests.get(request_id)
        if req is None:
            return False
        self.scheduler.finish(req, status)
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work()

    # ---------------------------------------------------------------- the loop body
    def step(self) -> list[StepOutput]:
        sched = self.scheduler.schedule()
        if not sched.scheduled:
            # Nothing runnable: only store work in flight (a lookup, a load, a write-back that
            # frees blocks). Wait for it briefly rather than spin.
            if self.scheduler.preemption.pending():
                self.scheduler.preemption.collect(self.scheduler, timeout=0.005)
            return []
        items, sampling = [], []
        for req, n in sched.scheduled:
            start = req.num_computed_tokens
            done = start + n == req.num_tokens
            items.append(BatchItem(req.all_token_ids[start:start + n], start,
                                   self.block_manager.owned(req.request_id), done,
                                   req.needs_prompt_logits))
            if done:
                sampling.append(req)
        logits = self.runner.execute(items)
        if any(item.all_logits for item in items):
            logits = logprob_math.split_step_logits(
                logits, sched.scheduled, [i.all_logits for i in items],
                [i.needs_logits for i in items], self.model_config.vocab_size)
        for req, n in sched.scheduled:
            self.scheduler.advance(req, n)
        if not sampling:
            return []
        rows = [SamplingRow(r.sampling_params, r.seed, r.num_tokens, r.prompt_token_ids,
                            r.output_token_ids, r.eos_token_ids) for r in sampling]
        sampled = self.sampler.sample(logits, rows)
        details = logprob_math.sampled_logprobs(
            logits, sampled.token_ids, [r.sampling_params.logprobs for r in sampling],
            self.model_config.vocab_size) if sampled.logprobs else [None] * len(sampling)
        outputs = []
        for i, req in enumerate(sampling):
            token = sampled.token_ids[i]
            wants_logprob = req.sampling_params.logprobs is not None
            logprob = sampled.logprobs[i] if wants_logprob and sampled.logprobs else None
            finished = self.scheduler.append_token(req, token, logprob)
            outputs.append(StepOutput(
                req.request_id, [token], None if logprob is None else [logprob], finished,
                req.status.finish_reason if finished else None, req.stop_reason,
                req.num_prompt_tokens, req.num_cached_tokens,
                None if details[i] is None else [details[i]], self._take_prompt_logprobs(req)))
        return outputs

    @staticmethod
    def _take_prompt_logprobs(req: Request) -> list | None:
        """The request's prompt logprobs, once: with the first token this engine samples."""
        if req.prompt_logprobs is None or req.prompt_logprobs_sent:
            return None
        req.prompt_logprobs_sent = True
        return list(req.prompt_logprobs)

    def check_integrity(self, other_owners: set[str] | frozenset[str] = frozenset()) -> None:
        self.scheduler.check_integrity(other_owners)
