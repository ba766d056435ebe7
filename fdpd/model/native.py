"""fdpd's native CPU kernels (``fdpd/model/csrc``), compiled on first use.

``paged_decode_attention`` (csrc/paged_attention.cpp) attends each decode token to its context
straight through the block table, instead of gathering the context into a dense copy first;
``paged_prefill_attention`` (csrc/prefill_attention.cpp) does the same for every prompt chunk of
a step in one call (flash-style tiles, causal over the chunk and its cached prefix);
``rope_and_write_kv`` and ``silu_and_mul`` (csrc/fused_ops.cpp) do a layer's elementwise steps
in one pass each; ``packed_linear`` (csrc/packed_linear.cpp) is the linear layers' float32 GEMM
on weights packed once (``fdpd.model.kernels.NativeLinear``); ``greedy_pick`` (csrc/greedy.cpp)
the sampler's argmax.
It is built with ``torch.utils.cpp_extension`` (gcc + ninja) into torch's extension cache
(``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``), once per machine: the first
process pays the compile (a minute on a 2-core VM), later ones load the cached library.
It is compiled for this CPU (``-march=native``); an image built on one machine and run on others
sets ``FDPD_NATIVE_MARCH`` (e.g. ``x86-64-v3``: AVX2 + FMA), as deploy/Dockerfile does.
``scripts/setup`` builds it ahead (``python -m fdpd.model.native``), so that no server start or
test waits for a compiler.

Where it cannot be built (no compiler, no ninja, not x86/ARM Linux) the engine logs why once
and runs the plain-torch attention: same tokens, slower.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import sys
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
SOURCES = {CSRC / "paged_attention.cpp", CSRC / "prefill_attention.cpp", CSRC / "fused_ops.cpp",
           CSRC / "packed_linear.cpp", CSRC / "greedy.cpp"}
HEADERS = {CSRC / "vec.h", CSRC / "block_table.h", CSRC / "dtypes.h", CSRC / "micro_kernel.h"}


@functools.cache
def load() -> str | None:
    """Build (if needed) and load the kernels. Returns None when loaded, else why not."""
    if os.environ.get("FDPD_NATIVE_KERNELS", "1") == "0":
        return "disabled by FDPD_NATIVE_KERNELS=0"
    cflags = ["-O3", f"-march={os.environ.get('FDPD_NATIVE_MARCH', 'native')}", "-fopenmp"]
    # One build directory per checkout, source version and flags: a process never loads a
    # library built from other sources, and two checkouts sharing the extension cache never
    # take turns rebuilding one directory (its build.ninja names the sources by path).
    digest = hashlib.sha256(" ".join([*cflags, str(CSRC.resolve())]).encode())
    for path in sorted(SOURCES.union(HEADERS)):
        digest.update(path.read_bytes())
    try:
        from torch.utils import cpp_extension

        cpp_extension.load(
            name=f"fdpd_native_{digest.hexdigest()[:16]}", sources=[str(s) for s in SOURCES],
            is_python_module=False, extra_cflags=cflags, verbose=False)
    except Exception as e:   # compiler, ninja or loader missing: fall back, say why
        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e) else ''}"
        log.warning("native kernels unavailable, using plain torch attention (%s)", reason)
        return reason
    return None


def available(device: torch.device) -> bool:
    return device.type == "cpu" and load() is None


# The wrappers below are on the step's hot path: they assume load() succeeded (the runner only
# picks them when ``available``), and torch.ops raises AttributeError otherwise.


def paged_decode_attention(out: torch.Tensor, q: torch.Tensor, layer_cache: torch.Tensor,
                           block_table: torch.Tensor, seq_lens: torch.Tensor,
                           scale: float) -> None:
    """``out[B, Hq, D]`` = attention of ``q[B, Hq, D]`` (one token per request) over the first
    ``seq_lens[b]`` positions of request b's blocks in ``layer_cache[blocks, 2, bs, Hkv, D]``."""
    torch.ops.fdpd.paged_decode_attention(out, q, layer_cache, block_table, seq_lens, scale)


def paged_prefill_attention(out: torch.Tensor, q: torch.Tensor, layer_cache: torch.Tensor,
                            spans: torch.Tensor, block_table: torch.Tensor,
                            scale: float) -> None:
    """``out[T, Hq, D]`` = causal attention of the prompt chunks in ``q[T, Hq, D]``: row s of
    ``spans[S, 3]`` = (first flat token, new tokens, tokens cached before them); chunk s's
    token i (position start + i) sees positions 0 .. start + i of ``block_table[s]``'s blocks
    in ``layer_cache[blocks, 2, bs, Hkv, D]`` (its own K/V already written there). Rows of
    ``out`` outside every span are left untouched."""
    torch.ops.fdpd.paged_prefill_attention(out, q, layer_cache, spans, block_table, scale)


def rope_and_write_kv(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor, layer_cache: torch.Tensor, slot_blocks: torch.Tensor,
                      slot_offsets: torch.Tensor, q_heads: int, kv_heads: int,
                      head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE on q and k of the fused projection ``qkv[T, (Hq + 2 Hkv) * D]`` (contiguous), and
    k, v of each token written to its slot of ``layer_cache``. Returns (q [T, Hq, D], k [T, Hkv,
    D]); v stays a view of ``qkv``. ``cos``/``sin`` are the float32 tables [positions, D]."""
    tokens = qkv.shape[0]
    q = torch.empty(tokens, q_heads, head_dim, dtype=qkv.dtype)
    k = torch.empty(tokens, kv_heads, head_dim, dtype=qkv.dtype)
    torch.ops.fdpd.rope_and_write_kv(q, k, qkv, positions, cos, sin, layer_cache, slot_blocks,
                                     slot_offsets)
    return q, k


def pack_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    """A float32 ``[N, K]`` weight as ``[ceil(N / 16), K, 16]`` panels for ``packed_linear``."""
    return torch.ops.fdpd.pack_linear_weight(weight.contiguous())


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None,
                  out_features: int) -> torch.Tensor:
    """``x[M, K] @ W.T (+ bias)`` for float32 ``x`` (contiguous) and ``W`` packed above."""
    return torch.ops.fdpd.packed_linear(x, packed, bias, out_features)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up for ``gate_up[T, 2 I]`` (contiguous, gate first)."""
    out = torch.empty(gate_up.shape[0], gate_up.shape[1] // 2, dtype=gate_up.dtype)
    torch.ops.fdpd.silu_and_mul(out, gate_up)
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * x / sqrt(mean(x^2) + eps)`` over the last dim (``x`` contiguous)."""
    out = torch.empty_like(x)
    torch.ops.fdpd.rms_norm(out, x, weight, eps)
    return out


def greedy_pick(logits: torch.Tensor) -> torch.Tensor:
    """The first index of each row's maximum (NaN counts as the maximum), as
    ``logits.max(dim=-1).indices``, for float32 ``logits[R, V]``."""
    out = torch.empty(logits.shape[0], dtype=torch.long)
    torch.ops.fdpd.greedy_pick(out, logits.contiguous())
    return out


def main() -> None:
    """``python -m fdpd.model.native``: build the kernels now (scripts/setup runs it)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    why = load()
    if why is None:
        print("fdpd native kernels: ready")
    else:
        print(f"fdpd native kernels: unavailable ({why}); the engine uses plain torch")
    sys.exit(0)


if __name__ == "__main__":
    main()
