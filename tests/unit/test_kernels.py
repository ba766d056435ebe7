"""The engine's fast kernel paths against its plain-torch reference path.

- prepacked oneDNN linears (``fdpd.model.kernels``), float32 and bf16-via-float32;
- the native paged decode and prefill attention (``fdpd.model.native``) against gather + SDPA.

The exactness suite (test_engine_exactness.py) runs on the default (fast) paths against the dense
reference; here the fast and plain paths must give the same greedy tokens on a batch that
preempts, chunks and hits the prefix cache.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fdpd import LLM
from fdpd.config import ConfigError, EngineConfig
from fdpd.model import native
from fdpd.model.kernels import NativeLinear, PackedLinear, resolve_kernels
from tests.model_factory import make_checkpoint
from tests.unit.test_engine_exactness import ENGINE_ARGS, GREEDY, mixed_prompts, run_batch


@pytest.fixture(autouse=True)
def native_kernels_loaded():
    native.load()


def test_native_kernels_build_here():
    # CI's machine has a compiler: a silent fallback would hide a slower engine.
    assert native.load() is None


@pytest.mark.parametrize("q_heads,kv_heads,head_dim,block_size", [
    (4, 2, 64, 16), (8, 1, 32, 8), (2, 2, 128, 16), (6, 3, 16, 4), (4, 2, 12, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [7, 1])     # 1: one task per KV head instead of per request
def test_paged_decode_attention_equals_gathered_sdpa(q_heads, kv_heads, head_dim, block_size,
                                                     dtype, batch):
    torch.manual_seed(0)
    blocks, layers, width = 64, 3, 9
    cache = torch.randn(blocks, layers, 2, block_size, kv_heads, head_dim).to(dtype)
    layer = cache[:, 1]                                   # strided, as the runner passes it
    table = torch.stack([torch.randperm(blocks)[:width] for _ in range(batch)])
    lens = torch.tensor([1, 2, block_size, block_size + 1, width * block_size, 17, 30])[
        :batch] if batch > 1 else torch.tensor([width * block_size - 3])
    q = torch.randn(batch, q_heads, head_dim).to(dtype)
    scale = head_dim ** -0.5
    keys = layer[:, 0].index_select(0, table.flatten()).view(batch, -1, kv_heads, head_dim)
    values = layer[:, 1].index_select(0, table.flatten()).view(batch, -1, kv_heads, head_dim)
    mask = (torch.arange(width * block_size)[None, :] < lens[:, None])[:, None, None, :]
    expected = F.scaled_dot_product_attention(
        q.float().unsqueeze(2), keys.float().transpose(1, 2), values.float().transpose(1, 2),
        attn_mask=mask, scale=scale, enable_gqa=True).squeeze(2)
    out = torch.empty_like(q)
    native.paged_decode_attention(out, q, layer, table, lens, scale)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (out.float() - expected).abs().max().item() < tol
    assert torch.isfinite(out).all()


def _dense_causal_attention(q, layer, table_row, start, num_new, scale):
    """The reference: gather the span's context, mask to causal-with-prefix, SDPA in float32."""
    kv_heads, head_dim = layer.shape[3], layer.shape[4]
    total = start + num_new
    keys = layer[:, 0].index_select(0, table_row).reshape(-1, kv_heads, head_dim)[:total]
    values = layer[:, 1].index_select(0, table_row).reshape(-1, kv_heads, head_dim)[:total]
    mask = torch.arange(total)[None, :] <= torch.arange(start, total)[:, None]
    return F.scaled_dot_product_attention(
        q.float().transpose(0, 1).unsqueeze(0), keys.float().transpose(0, 1).unsqueeze(0),
        values.float().transpose(0, 1).unsqueeze(0), attn_mask=mask, scale=scale,
        enable_gqa=True).squeeze(0).transpose(0, 1)


@pytest.mark.parametrize("q_heads,kv_heads,head_dim,block_size", [
    (4, 2, 64, 16), (8, 1, 32, 8), (2, 2, 128, 16), (6, 3, 12, 4), (5, 5, 80, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_prefill_attention_equals_masked_sdpa(q_heads, kv_heads, head_dim, block_size,
                                                    dtype):
    # Chunks of a step next to decode tokens: fresh prompts (start 0), chunks after a cached
    # prefix, a chunk crossing several query tiles and key tiles (100 new after 70 cached), one
    # starting mid-block, a one-token-past-prefix chunk; blocks scattered over the cache.
    torch.manual_seed(0)
    blocks, layers = 96, 2
    cache = torch.randn(blocks, layers, 2, block_size, kv_heads, head_dim).to(dtype)
    layer = cache[:, 1]                                   # strided, as the runner passes it
    shapes = [(0, 5), (13, 100), (0, 1 * block_size), (70, 100), (block_size + 3, 2), (0, 61)]
    decodes = 3                                           # flat rows owned by no span
    rows = decodes + sum(n for _, n in shapes)
    q = torch.randn(rows, q_heads, head_dim).to(dtype)
    width = max(-(-(s + n) // block_size) for s, n in shapes)
    perm = torch.randperm(blocks)
    table = torch.zeros(len(shapes), width, dtype=torch.long)
    spans, first, used = [], decodes, 0
    for i, (start, n) in enumerate(shapes):
        w = -(-(start + n) // block_size)
        table[i, :w] = perm[used:used + w]
        used += w
        spans.append((first, n, start))
        first += n
    scale = head_dim ** -0.5
    out = torch.full_like(q, 7.0)
    native.paged_prefill_attention(out, q, layer, torch.tensor(spans), table, scale)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    for i, (first, n, start) in enumerate(spans):
        want = _dense_causal_attention(q[first:first + n], layer, table[i], start, n, scale)
        assert (out[first:first + n].float() - want).abs().max().item() < tol, (start, n)
    assert (out[:decodes] == 7.0).all()                   # rows of no span are untouched
    assert torch.isfinite(out).all()


def test_attention_kernels_reject_tables_that_would_read_outside_the_cache():
    # An error, never a read past the cache: spans or lengths past their blocks, block ids
    # outside the cache.
    layer = torch.zeros(4, 2, 16, 1, 8)
    q = torch.zeros(20, 1, 8)
    with pytest.raises(RuntimeError, match="does not fit"):
        native.paged_prefill_attention(torch.empty_like(q), q, layer,
                                       torch.tensor([[0, 20, 0]]), torch.tensor([[1]]), 1.0)
    with pytest.raises(RuntimeError, match="outside the cache's 4 blocks"):
        native.paged_prefill_attention(torch.empty_like(q), q, layer,
                                       torch.tensor([[0, 20, 0]]), torch.tensor([[1, 4]]), 1.0)
    qd = torch.zeros(2, 1, 8)
    with pytest.raises(RuntimeError, match="has 33 tokens"):
        native.paged_decode_attention(torch.empty_like(qd), qd, layer,
                                      torch.tensor([[0, 1], [2, 3]]), torch.tensor([5, 33]), 1.0)
    with pytest.raises(RuntimeError, match="block id -1 outside"):
        native.paged_decode_attention(torch.empty_like(qd), qd, layer,
                                      torch.tensor([[0, 1], [2, -1]]), torch.tensor([5, 20]),
                                      1.0)


@pytest.mark.parametrize("module", [PackedLinear, NativeLinear])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("emulate", [False, True])
def test_packed_linear_equals_f_linear(module, bias, emulate):
    torch.manual_seed(0)
    dtype = torch.bfloat16 if emulate else torch.float32
    layer = torch.nn.Linear(96, 200, bias=bias).to(dtype)
    packed = module(layer, emulate_bf16=emulate)
    x = torch.randn(5, 3, 96).to(dtype)
    with torch.inference_mode():
        got, want = packed(x), F.linear(x.float(), layer.weight.float(),
                                       None if layer.bias is None else layer.bias.float())
    assert got.dtype == dtype and got.shape == (5, 3, 200)
    assert (got.float() - want).abs().max().item() < (1e-4 if not emulate else 0.1)


@pytest.mark.parametrize("M,K,N", [(1, 8, 5), (7, 33, 17), (6, 64, 48), (97, 40, 33),
                                   (200, 16, 1000), (96, 512, 16)])
def test_native_packed_gemm_equals_f_linear(M, K, N):
    # Row blocks (96) and strips (6) with tails, panels (16) with a ragged last one, bias.
    torch.manual_seed(0)
    x, w, b = torch.randn(M, K), torch.randn(N, K), torch.randn(N)
    packed = native.pack_linear_weight(w)
    assert packed.shape == (-(-N // 16), K, 16)
    for bias in (None, b):
        got = native.packed_linear(x, packed, bias, N)
        assert got.shape == (M, N)
        assert torch.allclose(got, F.linear(x, w, bias), rtol=1e-4, atol=1e-4)
    with pytest.raises(RuntimeError, match="packed for K"):
        native.packed_linear(torch.randn(3, K + 1), packed, None, N)


@pytest.mark.parametrize("case", [{"arch": "llama"}, {"arch": "qwen2", "tie": True}])
def test_fast_and_plain_kernels_give_the_same_tokens(tmp_path, case):
    path = make_checkpoint(tmp_path, **case)
    outs = {}
    for kernels in ("auto", "onednn", "torch"):
        llm = LLM(str(path), kernels=kernels, **ENGINE_ARGS)
        assert llm.engine.loaded.kernels == {"auto": "native"}.get(kernels, kernels)
        assert llm.engine.runner.native_attention == (kernels != "torch")
        prompts = mixed_prompts(llm.engine.model_config.vocab_size, seed=2)
        outs[kernels] = [o.outputs[0].token_ids for o in run_batch(llm, prompts, GREEDY)]
        assert llm.engine.scheduler.num_preemptions > 0
    assert outs["auto"] == outs["torch"] == outs["onednn"]


def test_kernel_choice_is_checked():
    with pytest.raises(ConfigError, match="kernels"):
        EngineConfig(kernels="mkl")
    with pytest.raises(ValueError, match="onednn cannot run here"):
        resolve_kernels("onednn", torch.device("meta"), torch.float32)
    with pytest.raises(ValueError, match="native cannot run here"):
        resolve_kernels("native", torch.device("meta"), torch.float32)
    assert resolve_kernels("auto", torch.device("cpu"), torch.float32) == "native"
    assert resolve_kernels("auto", torch.device("cpu"), torch.float16) == "torch"
    # bf16: oneDNN's own bf16 GEMM where the CPU has one, else fdpd's float32 GEMM.
    from fdpd.model.kernels import native_bf16_gemm
    assert resolve_kernels("auto", torch.device("cpu"), torch.bfloat16) == (
        "onednn" if native_bf16_gemm() else "native")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rope_and_kv_write_equal_the_torch_steps(dtype):
    from fdpd.model.attention import AttentionMetadata, write_kv
    from fdpd.model.llama import RotaryEmbedding
    from fdpd.model.synthetic import synthetic_config

    cfg = synthetic_config("llama", hidden=128, heads=4, kv_heads=2, layers=1)
    rope = RotaryEmbedding(cfg, 256)
    torch.manual_seed(0)
    tokens, hq, hkv, d, bs = 13, 4, 2, 32, 8
    qkv = torch.randn(tokens, (hq + 2 * hkv) * d).to(dtype)
    positions = torch.randint(0, 256, (tokens,))
    slots = torch.randperm(40 * bs)[:tokens]
    meta = AttentionMetadata.from_slots(slots, bs, [], [])
    caches = [torch.zeros(40, 3, 2, bs, hkv, d, dtype=dtype) for _ in range(2)]
    q, k = native.rope_and_write_kv(qkv, positions, rope.cos, rope.sin, caches[0][:, 1],
                                    meta.slot_blocks, meta.slot_offsets, hq, hkv, d)
    q_ref, k_ref = rope(positions, qkv[:, :hq * d].view(-1, hq, d).float(),
                        qkv[:, hq * d:(hq + hkv) * d].view(-1, hkv, d).float())
    v = qkv[:, (hq + hkv) * d:].view(-1, hkv, d)
    write_kv(caches[1][:, 1], k_ref.to(dtype), v, meta)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert (q.float() - q_ref).abs().max() < tol and (k.float() - k_ref).abs().max() < tol
    assert (caches[0].float() - caches[1].float()).abs().max() < tol
    assert caches[0][:, [0, 2]].abs().sum() == 0        # other layers untouched


def test_greedy_pick_equals_torch_max():
    # First index of the max (ties), NaN wins at its first position, -inf rows, a ragged tail.
    torch.manual_seed(0)
    x = torch.randn(6, 1003)
    x[1, [7, 500, 1002]] = 50.0                         # a tie: the first one
    x[2, [900, 30]] = float("nan")                      # NaN wins, the first NaN
    x[3] = -torch.inf
    x[4, 1001] = 1e30                                   # in the scalar tail
    x[5, 0] = float("nan")
    want = x.max(dim=-1).indices
    assert native.greedy_pick(x).tolist() == want.tolist() == [
        want[0].item(), 7, 30, 0, 1001, 0]


def test_fused_silu_and_mul_equals_torch():
    torch.manual_seed(0)
    gate_up = torch.randn(7, 2 * 100) * 6
    gate_up[0, 0] = float("nan")
    gate_up[1, 1] = -200.0                               # exp(200) overflows float32
    got = native.silu_and_mul(gate_up)
    gate, up = gate_up.split(100, dim=-1)
    want = F.silu(gate) * up
    assert torch.isnan(got[0, 0])
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rms_norm_equals_the_module(dtype):
    from fdpd.model.llama import RMSNorm

    torch.manual_seed(0)
    norm = RMSNorm(200, 1e-6).to(dtype)
    norm.weight.data.normal_()
    x = (torch.randn(9, 200) * 3).to(dtype)
    with torch.inference_mode():
        got, want = norm(x, fused=True), norm(x)
    assert got.dtype == dtype
    assert (got.float() - want.float()).abs().max() <= (1e-5 if dtype == torch.float32 else 0.05)


def test_bench_kernels_reports_every_kernel_side_by_side():
    from click.testing import CliRunner

    from fdpd.cli import main

    result = CliRunner().invoke(main, [
        "bench", "kernels", "--hidden", "64", "--intermediate", "96", "--layers", "2",
        "--vocab", "500", "--chunk", "40", "--batch", "3", "--context", "50", "--repeat", "1"])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if line.startswith("| ") and "x** |"
            in line]
    labels = [r.split("|")[1].strip() for r in rows]
    assert [label.split(",")[0].split(" (")[0] for label in labels] == [
        "2 layers' linears", "2 layers' linears", "LM head 3 x 64 -> 500", "prefill attention",
        "prefill attention", "decode attention", "greedy pick"]
    assert all(float(r.split("**")[1].rstrip("x")) > 0 for r in rows)
