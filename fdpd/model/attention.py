"""Paged attention in plain torch: K/V live in fixed-size blocks, requests address them through
block tables.

One engine step runs a flat batch of ``T`` new tokens from many requests. Tokens are written to
the cache at (``slot_blocks``, ``slot_offsets``), then each query reads its keys back through the
request's block table, whole blocks at a time (or, with the native kernels, in place through
the block table: ``PagedPrefill`` and ``DecodeGroup.seq_lens``). A layer's cache is a strided view
``[blocks, 2, block_size, H, D]`` of the runner's block-major tensor. Requests that add one
token (decodes) are attended in a few padded batches of similar context length (whole blocks
gathered at once: per-token gathers cost more than the attention itself on CPU); requests that
add a chunk of prompt are attended one by one, since padding a 500-token chunk next to 30
single-token decodes would waste 30x the work.

Buffer rules: the metadata tensors are built once per step on the runner's device and only read
here; the KV cache is written only through ``write_kv``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fdpd.model import native


@dataclass
class PrefillSpan:
    """One request adding ``num_new`` tokens at positions ``start .. start+num_new-1``."""

    token_start: int              # index of its first new token in the flat batch
    num_new: int
    start: int                    # tokens already in the cache before this step
    # The blocks holding every key it attends to (the first start + num_new slots of them);
    # None when start == 0 (the chunk attends only to itself, straight from the fresh K/V).
    key_blocks: torch.Tensor | None
    # [num_new, start+num_new] bool, True where visible. Required when start > 0; None (only
    # with start == 0) means plain causal over the chunk.
    mask: torch.Tensor | None


@dataclass
class PagedPrefill:
    """Every prompt chunk of the step, for the native kernel (``fdpd.model.native``), which
    reads their keys in place through the block tables: one call per layer, no mask."""

    spans: torch.Tensor               # [S, 3] int64: (token_start, num_new, start) per chunk
    block_table: torch.Tensor         # [S, W] int64: each chunk's blocks, padded with block 0


@dataclass
class DecodeGroup:
    """Requests adding one token each, attended as one batch.

    Two ways, chosen by the runner: with ``seq_lens`` the native kernel
    (``fdpd.model.native``) reads the blocks in place, one group for every decode of the step;
    with ``mask`` the blocks are gathered into a padded dense batch for SDPA (plain torch)."""

    token_index: torch.Tensor         # [B] flat-batch index of each decode token
    block_table: torch.Tensor         # [B, W] block ids, padded with block 0
    mask: torch.Tensor | None         # [B, 1, 1, W * block_size] True where a key is visible
    # The group's tokens form one contiguous run of the flat batch (saves a gather/scatter).
    run: tuple[int, int] | None = None
    seq_lens: torch.Tensor | None = None   # [B] int64 context length incl. the new token


@dataclass
class AttentionMetadata:
    slot_blocks: torch.Tensor                  # [T] the block each new token's K/V goes to
    slot_offsets: torch.Tensor                 # [T] and its offset in that block
    prefills: list[PrefillSpan]
    decodes: list[DecodeGroup]
    # The layer's elementwise steps run as fdpd.model.native's fused kernels.
    native: bool = False
    # The prompt chunks for the native prefill kernel (then ``prefills`` is empty).
    paged_prefill: PagedPrefill | None = None

    @classmethod
    def from_slots(cls, slots: torch.Tensor, block_size: int, prefills: list[PrefillSpan],
                   decodes: list[DecodeGroup], native: bool = False,
                   paged_prefill: PagedPrefill | None = None) -> AttentionMetadata:
        """``slots[i]`` = block id * block_size + offset of new token i."""
        return cls(torch.div(slots, block_size, rounding_mode="floor"), slots % block_size,
                   prefills, decodes, native, paged_prefill)


def write_kv(cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               meta: AttentionMetadata) -> None:
    """Store the new tokens' keys/values. ``cache`` is one layer: [blocks, 2, block_size, H, D]."""
    where = (meta.slot_blocks, meta.slot_offsets)
    cache[:, 0].index_put_(where, k)
    cache[:, 1].index_put_(where, v)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [T, Hq, D]; k, v: [T, Hkv, D] (already written to ``cache``). Returns [T, Hq, D]."""
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    k_cache, v_cache = cache[:, 0], cache[:, 1]            # [blocks, block_size, H, D] views
    out = torch.empty_like(q)

    if meta.paged_prefill is not None:
        native.paged_prefill_attention(out, q.contiguous(), cache, meta.paged_prefill.spans,
                                       meta.paged_prefill.block_table, scale)
    for span in meta.prefills:
        rows = slice(span.token_start, span.token_start + span.num_new)
        if span.start == 0:
            keys, values = k[rows], v[rows]       # the chunk's own K/V: no cache read needed
        else:
            total = span.start + span.num_new
            keys = k_cache.index_select(0, span.key_blocks).view(-1, num_kv_heads,
                                                                 head_dim)[:total]
            values = v_cache.index_select(0, span.key_blocks).view(-1, num_kv_heads,
                                                                   head_dim)[:total]
        o = F.scaled_dot_product_attention(
            q[rows].transpose(0, 1).unsqueeze(0),
            keys.transpose(0, 1).unsqueeze(0),
            values.transpose(0, 1).unsqueeze(0),
            attn_mask=span.mask, is_causal=span.mask is None, scale=scale, enable_gqa=True)
        out[rows] = o.squeeze(0).transpose(0, 1)

    for group in meta.decodes:
        qd = q[slice(*group.run)] if group.run else q.index_select(0, group.token_index)
        if group.seq_lens is not None:
            o = torch.empty_like(qd)
            native.paged_decode_attention(o, qd.contiguous(), cache, group.block_table,
                                          group.seq_lens, scale)
        else:
            o = _gathered_decode_attention(qd, k_cache, v_cache, group, num_kv_heads, head_dim,
                                           scale)
        if group.run:
            out[slice(*group.run)] = o
        else:
            out.index_copy_(0, group.token_index, o)
    return out


def _gathered_decode_attention(qd: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               group: DecodeGroup, num_kv_heads: int, head_dim: int,
                               scale: float) -> torch.Tensor:
    """Plain torch: gather the group's blocks into [B, W * bs, H, D], then masked SDPA."""
    b = group.block_table.shape[0]
    blocks = group.block_table.flatten()
    keys = k_cache.index_select(0, blocks).view(b, -1, num_kv_heads, head_dim)
    values = v_cache.index_select(0, blocks).view(b, -1, num_kv_heads, head_dim)
    return F.scaled_dot_product_attention(
        qd.unsqueeze(2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=group.mask,
        scale=scale, enable_gqa=True).squeeze(2)              # [B, Hq, D]
