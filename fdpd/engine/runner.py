"""The model runner: owns the KV cache (its one allocation site) and turns a scheduled batch into
one forward pass.

KV layout: a single block-major tensor ``[num_blocks, layers, 2, block_size, kv_heads,
head_dim]``. One block's KV across all layers (``kv_cache[b]``) is one contiguous piece of
memory, which is the unit that moves: a KV transfer sends it zero-copy and a KV-store write-back
encodes it without a gather. Attention reads per-layer strided views (``kv_cache[:, layer]``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fdpd.model import native
from fdpd.model.attention import AttentionMetadata, DecodeGroup, PagedPrefill, PrefillSpan
from fdpd.model.llama import LlamaForCausalLM

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchItem:
    """One request's slice of a step: ``token_ids`` at positions ``start..start+len-1``.
    ``all_logits``: a logits row for every position (prompt logprobs), not just the last."""

    token_ids: Sequence[int]
    start: int
    block_ids: Sequence[int]
    needs_logits: bool
    all_logits: bool = False


def kv_block_bytes(model: LlamaForCausalLM, block_size: int, dtype: torch.dtype) -> int:
    c = model.config
    return (c.num_hidden_layers * 2 * block_size * c.num_key_value_heads * c.head_dim
            * torch.empty((), dtype=dtype).element_size())


# Padding waste vs. one more attention call: 4 groups measured best for 32-64 decodes on CPU.
MAX_DECODE_GROUPS = 4


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, *, num_blocks: int, block_size: int,
                 device: torch.device, dtype: torch.dtype, kernels: str = "auto"):
        c = model.config
        self.model = model
        # Decode attention through the block table in place, and the fused elementwise
        # kernels (fdpd.model.native), unless plain torch is asked for or they cannot be built.
        self.native_attention = kernels != "torch" and native.available(device)
        self.block_size = block_size
        self.device = device
        self.num_blocks = num_blocks
        # The only place KV memory is allocated (see DESIGN 10: FastDeploy #7420).
        self.kv_cache = torch.zeros(
            num_blocks, c.num_hidden_layers, 2, block_size, c.num_key_value_heads, c.head_dim,
            dtype=dtype, device=device)
        log.info("KV cache: %d blocks x %d tokens, %.1f MiB", num_blocks, block_size,
                 self.kv_cache.numel() * self.kv_cache.element_size() / 2**20)

    def execute(self, items: Sequence[BatchItem]) -> torch.Tensor:
        """Run one step. Returns float32 logits: one row per item with ``needs_logits``, or
        one per token of an item with ``all_logits``, in item order."""
        input_ids, positions, slots, logit_rows = [], [], [], []
        decodes: list[tuple[int, BatchItem]] = []
        chunks: list[tuple[int, BatchItem]] = []
        bs = self.block_size
        for item in items:
            first = len(input_ids)
            n = len(item.token_ids)
            input_ids.extend(item.token_ids)
            positions.extend(range(item.start, item.start + n))
            blocks = item.block_ids
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(item.start, item.start + n))
            if item.all_logits:
                logit_rows.extend(range(first, first + n))
            elif item.needs_logits:
                logit_rows.append(first + n - 1)
            if n == 1:
                decodes.append((first, item))
            else:
                chunks.append((first, item))
        dev = self.device
        if self.native_attention:
            prefills, paged = [], self._paged_prefill(chunks)
        else:
            prefills, paged = [self._prefill_span(f, item) for f, item in chunks], None
        meta = AttentionMetadata.from_slots(torch.tensor(slots, dtype=torch.long, device=dev),
                                            bs, prefills, self._decode_groups(decodes),
                                            native=self.native_attention, paged_prefill=paged)
        hidden = self.model(torch.tensor(input_ids, dtype=torch.long, device=dev),
                            torch.tensor(positions, dtype=torch.long, device=dev),
                            self.kv_cache, meta)
        if not logit_rows:
            return torch.empty(0, self.model.config.vocab_size, device=dev)
        rows = torch.tensor(logit_rows, dtype=torch.long, device=dev)
        return self.model.compute_logits(hidden.index_select(0, rows))

    def _prefill_span(self, first: int, item: BatchItem) -> PrefillSpan:
        n, start = len(item.token_ids), item.start
        total = start + n
        if start == 0:
            return PrefillSpan(first, n, 0, key_blocks=None, mask=None)
        dev = self.device
        blocks = torch.tensor(item.block_ids[: -(-total // self.block_size)], device=dev)
        q_pos = torch.arange(start, total, device=dev)
        mask = torch.arange(total, device=dev)[None, :] <= q_pos[:, None]
        return PrefillSpan(first, n, start, key_blocks=blocks, mask=mask)

    def _paged_prefill(self, chunks: list[tuple[int, BatchItem]]) -> PagedPrefill | None:
        """Every prompt chunk of the step for the native kernel: (first flat token, new tokens,
        cached tokens) and the blocks covering each chunk's context, padded with block 0."""
        if not chunks:
            return None
        spans = [(first, len(item.token_ids), item.start) for first, item in chunks]
        return PagedPrefill(torch.tensor(spans, dtype=torch.long, device=self.device),
                            self._block_table([item for _, item in chunks]))

    def _block_table(self, items: list[BatchItem]) -> torch.Tensor:
        """[items, W] int64: the blocks holding each item's context after this step (start +
        new tokens), padded with block 0 to the longest."""
        widths = [-(-(item.start + len(item.token_ids)) // self.block_size) for item in items]
        width = max(widths)
        rows = [list(item.block_ids[:w]) + [0] * (width - w)
                for item, w in zip(items, widths, strict=True)]
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    def _decode_groups(self, decodes: list[tuple[int, BatchItem]]) -> list[DecodeGroup]:
        """The native kernel takes every decode of the step at once (nothing is padded). For
        plain torch, split decodes into up to ``MAX_DECODE_GROUPS`` batches of similar context
        length, so a short request is not padded to the longest one in the step."""
        if not decodes:
            return []
        if self.native_attention:
            return [self._decode_group(decodes, native=True)]
        decodes = sorted(decodes, key=lambda d: d[1].start)
        size = -(-len(decodes) // MAX_DECODE_GROUPS)
        return [self._decode_group(decodes[i:i + size]) for i in range(0, len(decodes), size)]

    def _decode_group(self, decodes: list[tuple[int, BatchItem]],
                      native: bool = False) -> DecodeGroup:
        """One batch of decodes: their block tables padded to the longest context, and either
        the context lengths (native kernel) or the visibility mask (padded SDPA)."""
        dev = self.device
        lens_t = torch.tensor([item.start + 1 for _, item in decodes], dtype=torch.long,
                              device=dev)
        index = [first for first, _ in decodes]
        run = ((index[0], index[0] + len(index))
               if index == list(range(index[0], index[0] + len(index))) else None)
        index_t = torch.tensor(index, dtype=torch.long, device=dev)
        table_t = self._block_table([item for _, item in decodes])
        if native:
            return DecodeGroup(index_t, table_t, None, run, seq_lens=lens_t)
        mask = (torch.arange(table_t.shape[1] * self.block_size, device=dev)[None, :]
                < lens_t[:, None])
        return DecodeGroup(index_t, table_t, mask[:, None, None, :], run)
