"""GEMM backends for the model's linear layers, chosen once after the weights are loaded.

On CPU 80-90% of a step is GEMMs (torch.profiler), so how each linear layer multiplies decides
the engine's speed. ``F.linear`` hands MKL a transposed weight and, for wide outputs such as the
LM head (32 x 512 -> 32000), runs at about half the speed of the same product on a weight packed
once at load (as vLLM's CPU backend does with oneDNN). fdpd's own packed GEMM
(``fdpd/model/csrc/packed_linear.cpp``) goes further: it is blocked for weights that arrive
cold every step, and beat oneDNN's by 1.1-1.25x on this AVX2 CPU (BENCHMARKS.md).

Backends (``EngineConfig.kernels``):

- ``auto``: ``native`` on a CPU where fdpd's kernels build, for float32 (and bfloat16 where the
  CPU has no bf16 GEMM instructions); ``onednn`` for bfloat16 where it has them (AMX, AVX-512
  BF16); else ``torch``;
- ``native``: :class:`NativeLinear`, fdpd's packed float32 GEMM (bf16 models through float32, as
  below); refused where the native kernels cannot be built or off CPU;
- ``onednn``: :class:`PackedLinear`, prepacked oneDNN weights, float32 or bfloat16 (native bf16
  GEMMs where the CPU has AVX-512 BF16 / AMX / AVX-NE-CONVERT, else bf16 emulated by float32
  GEMMs); refused on other devices and dtypes;
- ``torch``: plain ``F.linear`` (the reference path, and every non-CPU device).

bf16 on a CPU without bf16 GEMM instructions (oneDNN has no bf16 GEMM there, and ``F.linear`` in
bf16 runs ~8x slower than in float32): the bf16 weights are packed as the float32 numbers they
exactly are; each call upcasts the (small) activations, multiplies in float32 and rounds the
result to bf16: the contract of a native bf16 GEMM (bf16 inputs, float32 accumulation, bf16
output), at float32 GEMM speed, for twice the weight memory.

Packing changes the summation order inside a GEMM, so results differ from ``F.linear`` in the
last bits; greedy tokens stay identical to the dense reference (tests/unit/test_kernels.py runs
the exactness suite on both backends).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from fdpd.config import KERNELS
from fdpd.model import native

log = logging.getLogger(__name__)


class _PrepackedLinear(nn.Module):
    """``y = x @ W.T + b`` on a weight packed once at load for one GEMM backend. The packed
    weight is a buffer, not a parameter: the module is for inference only and is made from a
    loaded ``nn.Linear`` by :func:`select_kernels`, never loaded from a checkpoint.

    ``emulate_bf16``: a bfloat16 model multiplied in float32 (see the module's docstring)."""

    backend = ""

    def __init__(self, linear: nn.Linear, emulate_bf16: bool = False):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.emulate_bf16 = emulate_bf16
        weight = linear.weight.detach()
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        if emulate_bf16:
            weight = weight.float()
            bias = bias.float() if bias is not None else None
        self.register_buffer("packed_weight", self._pack(weight), persistent=False)
        self.register_buffer("bias", bias, persistent=False)

    def _pack(self, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _gemm(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.emulate_bf16:
            return self._gemm(x.float()).to(x.dtype)
        return self._gemm(x)

    def extra_repr(self) -> str:
        how = f"{self.backend}, bf16 via float32" if self.emulate_bf16 else self.backend
        return f"in_features={self.in_features}, out_features={self.out_features}, {how}"


class PackedLinear(_PrepackedLinear):
    """The weight in oneDNN's blocked layout (opaque, CPU only), float32 or bfloat16."""

    backend = "onednn"

    def _pack(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._reorder_linear_weight(weight, None)

    def _gemm(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [],
                                                  "")


class NativeLinear(_PrepackedLinear):
    """The weight in 16-column panels for fdpd's float32 GEMM (``native.packed_linear``)."""

    backend = "native"

    def __init__(self, linear: nn.Linear, emulate_bf16: bool = False):
        if linear.weight.dtype != torch.float32 and not emulate_bf16:
            raise ValueError(f"native linears are float32 (got {linear.weight.dtype})")
        super().__init__(linear, emulate_bf16)

    def _pack(self, weight: torch.Tensor) -> torch.Tensor:
        return native.pack_linear_weight(weight)

    def _gemm(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).contiguous()
        y = native.packed_linear(rows, self.packed_weight, self.bias, self.out_features)
        return y.view(*x.shape[:-1], self.out_features)


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


def native_supported(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """Whether fdpd's packed GEMM runs here, and why not when it doesn't."""
    if device.type != "cpu":
        return False, f"fdpd's native linears are CPU kernels (device is {device})"
    if dtype not in (torch.float32, torch.bfloat16):
        return False, f"no native {dtype} GEMM"
    why = native.load()
    return (True, "") if why is None else (False, f"fdpd's native kernels: {why}")


def resolve_kernels(kernels: str, device: torch.device, dtype: torch.dtype) -> str:
    """``auto`` -> the backend to use; an explicit backend is checked (ValueError if it cannot
    run here)."""
    if kernels not in KERNELS:
        raise ValueError(f"kernels: must be one of {list(KERNELS)}, got {kernels!r}")
    if kernels == "torch":
        return "torch"
    checks = {"native": native_supported, "onednn": onednn_supported}
    if kernels != "auto":
        ok, why = checks[kernels](device, dtype)
        if not ok:
            raise ValueError(f"kernels: {kernels} cannot run here: {why}")
        return kernels
    # bf16 with bf16 GEMM instructions: oneDNN's native bf16; else fdpd's float32 GEMM.
    order = (("onednn", "native") if dtype == torch.bfloat16 and device.type == "cpu"
             and torch.backends.mkldnn.is_available() and native_bf16_gemm()
             else ("native", "onednn"))
    for name in order:
        if checks[name](device, dtype)[0]:
            return name
    return "torch"


def select_kernels(model: nn.Module, kernels: str, device: torch.device,
                   dtype: torch.dtype) -> str:
    """Swap every ``nn.Linear`` of the loaded ``model`` for the chosen backend, in place.

    Returns the backend used. A tied LM head gets a packed copy of the embedding matrix (the
    embedding lookup keeps the original)."""
    backend = resolve_kernels(kernels, device, dtype)
    if backend == "torch":
        return backend
    emulate = dtype == torch.bfloat16 and (backend == "native" or not native_bf16_gemm())
    module = NativeLinear if backend == "native" else PackedLinear
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, module(child, emulate_bf16=emulate))
                replaced += 1
    log.info("kernels: %d linear layers prepacked for %s (%s%s)", replaced, backend,
             str(dtype).removeprefix("torch."),
             ", as float32 GEMMs: this CPU has no bf16 GEMM instructions" if emulate else "")
    return backend

