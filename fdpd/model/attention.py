"""Paged attention in plain torch: K/V live in fixed-size blocks, requests address them through
block tables.

One engine step runs a flat batch of ``T`` new tokens from many requests. Tokens are written to
the cache through ``slot_mapping`` (slot = block_id * block_size + offset), then each query reads
its keys back through the request's block table. Requests that add one token (decodes) are
attended together as one padded batch; requests that add a chunk of prompt are attended one by
one, since padding a 500-token chunk next to 30 single-token decodes would waste 30x the work.

Buffer rules: the metadata tensors are built once per step on the runner's device and only read
here; the KV cache is written only through ``write_kv``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PrefillSpan:
    """One request adding ``num_new`` tokens at positions ``start .. start+num_new-1``."""

    token_start: int              # index of its first new token in the flat batch
    num_new: int
    start: int                    # tokens already in the cache before this step
    # Cache slots of every key it attends to, [start + num_new]; None when start == 0 (the
    # chunk attends only to itself, straight from the fresh K/V).
    key_slots: torch.Tensor | None
    # [num_new, start+num_new] bool, True where visible. Required when start > 0; None (only
    # with start == 0) means plain causal over the chunk.
    mask: torch.Tensor | None


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor                 # [T] where each new token's K/V is written
    decode_token_index: torch.Tensor | None    # [B] flat-batch index of each decode token
    decode_key_slots: torch.Tensor | None      # [B, S] cache slots of keys, padded
    decode_mask: torch.Tensor | None           # [B, 1, 1, S] True where a key is visible
    prefills: list[PrefillSpan]
    # Decode tokens form one contiguous run in the flat batch, which saves a gather/scatter.
    decode_run: tuple[int, int] | None = None


def write_kv(cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store the new tokens' keys/values. ``cache`` is one layer: [2, blocks, block_size, H, D]."""
    k_flat = cache[0].view(-1, k.shape[1], k.shape[2])
    v_flat = cache[1].view(-1, v.shape[1], v.shape[2])
    k_flat.index_copy_(0, slot_mapping, k)
    v_flat.index_copy_(0, slot_mapping, v)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [T, Hq, D]; k, v: [T, Hkv, D] (already written to ``cache``). Returns [T, Hq, D]."""
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    k_flat = cache[0].view(-1, num_kv_heads, head_dim)
    v_flat = cache[1].view(-1, num_kv_heads, head_dim)
    out = torch.empty_like(q)

    for span in meta.prefills:
        rows = slice(span.token_start, span.token_start + span.num_new)
        if span.start == 0:
            keys, values = k[rows], v[rows]       # the chunk's own K/V: no cache read needed
        else:
            keys, values = k_flat[span.key_slots], v_flat[span.key_slots]
        o = F.scaled_dot_product_attention(
            q[rows].transpose(0, 1).unsqueeze(0),
            keys.transpose(0, 1).unsqueeze(0),
            values.transpose(0, 1).unsqueeze(0),
            attn_mask=span.mask, is_causal=span.mask is None, scale=scale, enable_gqa=True)
        out[rows] = o.squeeze(0).transpose(0, 1)

    if meta.decode_token_index is not None:
        if meta.decode_run is not None:
            rows = slice(*meta.decode_run)
            qd = q[rows]
        else:
            qd = q.index_select(0, meta.decode_token_index)
        keys = k_flat[meta.decode_key_slots].transpose(1, 2)      # [B, Hkv, S, D]
        values = v_flat[meta.decode_key_slots].transpose(1, 2)
        o = F.scaled_dot_product_attention(
            qd.unsqueeze(2), keys, values, attn_mask=meta.decode_mask, scale=scale,
            enable_gqa=True).squeeze(2)                           # [B, Hq, D]
        if meta.decode_run is not None:
            out[rows] = o
        else:
            out.index_copy_(0, meta.decode_token_index, o)
    return out
