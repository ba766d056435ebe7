"""GEMM backends for the model's linear layers, chosen once after the weights are loaded.

On CPU more than 80% of a step is ``aten::mm`` (torch.profiler, decode-heavy batch), so how each
linear layer multiplies decides the engine's speed. ``F.linear`` hands MKL a transposed weight
and, for wide outputs such as the LM head (32 x 512 -> 32000), runs at about half the speed of
the same product on a weight prepacked into oneDNN's blocked layout (measured here: 54 vs 32 ms,
AVX2). So on CPU every ``nn.Linear`` becomes a :class:`PackedLinear`: its weight is reordered
once at load (as vLLM's CPU backend does) and each call reuses it.

Backends (``EngineConfig.kernels``):

- ``auto``: ``onednn`` where this CPU and dtype support it, else ``torch``;
- ``onednn``: prepacked oneDNN weights, float32 or bfloat16 (native bf16 GEMMs where the CPU
  has AVX-512 BF16 / AMX / AVX-NE-CONVERT, else bf16 emulated by float32 GEMMs, see
  :class:`PackedLinear`); refused on other devices and dtypes;
- ``torch``: plain ``F.linear`` (the reference path, and every non-CPU device).

Packing changes the summation order inside a GEMM, so results differ from ``F.linear`` in the
last bits; greedy tokens stay identical to the dense reference (tests/unit/test_kernels.py runs
the exactness suite on both backends).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from fdpd.config import KERNELS

log = logging.getLogger(__name__)


class PackedLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` held in oneDNN's blocked layout (opaque, CPU only).

    ``emulate_bf16``: a bfloat16 model on a CPU without bf16 dot-product instructions (oneDNN
    has no bf16 GEMM there, and ``F.linear`` in bf16 runs ~8x slower than in float32). The bf16
    weights are packed as the float32 numbers they exactly are; each call upcasts the (small)
    activations, multiplies in float32 and rounds the result to bf16: the contract of a native
    bf16 GEMM (bf16 inputs, float32 accumulation, bf16 output), at float32 GEMM speed, for twice
    the weight memory.

    The packed weight is a buffer, not a parameter: the module is for inference only and is made
    from a loaded ``nn.Linear`` by :func:`select_kernels`, never loaded from a checkpoint."""

    def __init__(self, linear: nn.Linear, emulate_bf16: bool = False):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.emulate_bf16 = emulate_bf16
        weight = linear.weight.detach()
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        if emulate_bf16:
            weight = weight.float()
            bias = bias.float() if bias is not None else None
        self.register_buffer("packed_weight",
                             torch.ops.mkldnn._reorder_linear_weight(weight, None),
                             persistent=False)
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.emulate_bf16:
            y = torch.ops.mkldnn._linear_pointwise(x.float(), self.packed_weight, self.bias,
                                                   "none", [], "")
            return y.to(x.dtype)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [],
                                                  "")

    def extra_repr(self) -> str:
        how = "onednn, bf16 via float32" if self.emulate_bf16 else "onednn"
        return f"in_features={self.in_features}, out_features={self.out_features}, {how}"


def native_bf16_gemm() -> bool:
    """Whether oneDNN has bf16 GEMMs on this CPU (AVX-512 BF16, AMX or AVX-NE-CONVERT)."""
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=torch.bfloat16), None)
        return True
    except RuntimeError:   # the bf16 reorder needs instructions this CPU lacks
        return False


def onednn_supported(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """Whether prepacked oneDNN linears run here, and why not when they don't."""
    if device.type != "cpu":
        return False, f"oneDNN linears are CPU kernels (device is {device})"
    if not torch.backends.mkldnn.is_available():
        return False, "this torch build has no oneDNN"
    if dtype in (torch.float32, torch.bfloat16):
        return True, ""
    return False, f"no oneDNN {dtype} GEMM here"


def resolve_kernels(kernels: str, device: torch.device, dtype: torch.dtype) -> str:
    """``auto`` -> the backend to use; an explicit backend is checked (ValueError if it cannot
    run here)."""
    if kernels not in KERNELS:
        raise ValueError(f"kernels: must be one of {list(KERNELS)}, got {kernels!r}")
    if kernels == "torch":
        return "torch"
    ok, why = onednn_supported(device, dtype)
    if kernels == "onednn" and not ok:
        raise ValueError(f"kernels: onednn cannot run here: {why}")
    return "onednn" if ok else "torch"


def select_kernels(model: nn.Module, kernels: str, device: torch.device,
                   dtype: torch.dtype) -> str:
    """Swap every ``nn.Linear`` of the loaded ``model`` for the chosen backend, in place.

    Returns the backend used. A tied LM head gets a packed copy of the embedding matrix (the
    embedding lookup keeps the original)."""
    backend = resolve_kernels(kernels, device, dtype)
    if backend == "torch":
        return backend
    emulate = dtype == torch.bfloat16 and not native_bf16_gemm()
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, PackedLinear(child, emulate_bf16=emulate))
                replaced += 1
    log.info("kernels: %d linear layers prepacked for oneDNN (%s%s)", replaced,
             str(dtype).removeprefix("torch."),
             ", as float32 GEMMs: this CPU has no bf16 GEMM instructions" if emulate else "")
    return backend

