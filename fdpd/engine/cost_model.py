"""A model runner that spends calibrated time instead of computing (``--cost-model``).

Everything around the forward pass stays real: the scheduler, chunked prefill, the block manager
and prefix cache, the decode ledger, the ZMQ control plane and the KV transfers (blocks of the
model's real KV shape are gathered, sent and copied; their contents are just never computed).
Only ``execute`` differs: it sleeps

    prefill_us_per_token * (prompt tokens in the step)
    + (decode_ms_per_step + decode_ms_per_seq * decodes)   if the step has any decode

and returns logits that make one token certain: a pure function of the last input token and its
position, never an EOS id. So outputs are deterministic and identical in PD and colocated mode
(P samples the first token, D the rest, from the same function), and every request runs to its
``max_tokens``.

Use it to measure the control plane (requests/s through router -> P -> D, routing quality on a
trace) and to plan fleets (DESIGN 8). Calibrate the two costs from a real run (DESIGN 9 lists
h=512 / 8 layers on this machine: ~0.7 ms per prefill token, ~17 ms per decode step). A config
with a tiny KV shape (one layer, one KV head, small head_dim) keeps memory small while the block
accounting is exactly the real one. Weights are never loaded: the model is built on torch's meta
device, so a directory with only ``config.json`` is enough.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fdpd.config import DTYPES, ConfigError, parse_cost_model
from fdpd.engine.runner import BatchItem
from fdpd.model.config import ModelConfig
from fdpd.model.llama import LlamaForCausalLM
from fdpd.model.loader import LoadedModel, load_model_metadata

# The chosen token's logit, against 0 for every other one: softmax puts all but ~e^-100 of the
# mass on it, so any temperature / top-k / top-p picks it.
_CHOSEN_LOGIT = 100.0
# Multipliers of the token function (odd, so consecutive positions give distinct tokens).
_POS_MUL, _TOKEN_MUL = 7919, 104729


@dataclass(frozen=True)
class StepCost:
    prefill_us_per_token: float
    decode_ms_per_step: float
    decode_ms_per_seq: float = 0.0

    @classmethod
    def parse(cls, text: str) -> StepCost:
        return cls(*parse_cost_model(text))

    def seconds(self, prefill_tokens: int, decodes: int) -> float:
        t = prefill_tokens * self.prefill_us_per_token * 1e-6
        if decodes:
            t += (self.decode_ms_per_step + decodes * self.decode_ms_per_seq) * 1e-3
        return t


def load_cost_model(model: str, dtype: str = "auto",
                    max_positions: int | None = None) -> LoadedModel:
    """The model's config and tokenizer, and a weightless (meta device) module for its shapes."""
    cfg, tokenizer = load_model_metadata(model)
    dtype_name = cfg.torch_dtype if dtype == "auto" else dtype
    if dtype_name not in DTYPES:
        raise ConfigError("dtype", f"must be auto or one of {sorted(DTYPES)}, got {dtype!r}")
    with torch.device("meta"):
        net = LlamaForCausalLM(cfg, max_positions)
    return LoadedModel(model=net, config=cfg, tokenizer=tokenizer, dtype=dtype_name,
                       source=model)


def next_token(last_token: int, position: int, vocab_size: int,
               eos_token_ids: Sequence[int] = ()) -> int:
    """The token a cost-model runner makes certain after ``last_token`` at ``position``."""
    token = (last_token * _TOKEN_MUL + (position + 1) * _POS_MUL + 3) % vocab_size
    while token in eos_token_ids:
        token = (token + 1) % vocab_size
    return token


class CostModelRunner:
    """Same interface as :class:`fdpd.engine.runner.ModelRunner`: ``kv_cache`` (the one KV
    allocation, real shape, zero-filled) and ``execute(items) -> logits``."""

    def __init__(self, config: ModelConfig, cost: StepCost, *, num_blocks: int,
                 block_size: int, device: torch.device, dtype: torch.dtype,
                 sleep=time.sleep):
        self.config = config
        self.cost = cost
        self.block_size = block_size
        self.device = device
        self.num_blocks = num_blocks
        self.kv_cache = torch.zeros(
            num_blocks, config.num_hidden_layers, 2, block_size, config.num_key_value_heads,
            config.head_dim, dtype=dtype, device=device)
        self._sleep = sleep
        self._eos = tuple(config.eos_token_ids)
        self.busy_seconds = 0.0          # total cost slept, for calibration checks

    def execute(self, items: Sequence[BatchItem]) -> torch.Tensor:
        prefill_tokens = sum(len(i.token_ids) for i in items if len(i.token_ids) > 1)
        decodes = sum(1 for i in items if len(i.token_ids) == 1)
        seconds = self.cost.seconds(prefill_tokens, decodes)
        if seconds > 0:
            self._sleep(seconds)
            self.busy_seconds += seconds
        vocab = self.config.vocab_size
        targets = [next_token(int(i.token_ids[-1]), i.start + len(i.token_ids) - 1, vocab,
                              self._eos) for i in items if i.needs_logits]
        logits = torch.zeros(len(targets), vocab, dtype=torch.float32, device=self.device)
        if targets:
            rows = torch.arange(len(targets), device=self.device)
            logits[rows, torch.tensor(targets, device=self.device)] = _CHOSEN_LOGIT
        return logits
