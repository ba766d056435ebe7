"""``fdpd bench kernels``: each native CPU kernel against the path it replaced, side by side.

One process, one thread by default, interleaved repeats, fastest of each counts:

- linear layers: fdpd's packed GEMM vs oneDNN's packed GEMM, on a model's layer shapes with a
  distinct weight per layer (so weights arrive cold, as in a real step), for a prefill chunk
  (M = --chunk rows) and a decode step (M = --batch rows), plus the LM head;
- prefill attention: the native kernel vs the plain path (gather the context, build the causal
  mask, SDPA), for a fresh chunk and a chunk after a cached prefix;
- decode attention: the native kernel vs the plain path (gather, masked SDPA);
- the greedy pick vs ``torch.max(dim=-1).indices``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import click


def _fastest(fns: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    best = {name: float("inf") for name in fns}
    for fn in fns.values():
        fn()                                         # warm-up (oneDNN primitives, caches)
    for _ in range(repeat):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def _row(label: str, ours: float, theirs: float, flop: float | None = None) -> str:
    rate = (f" | {flop / ours / 1e9:6.1f} | {flop / theirs / 1e9:6.1f}" if flop
            else " |      - |      -")
    return (f"| {label:<44} | {ours * 1e3:9.2f} | {theirs * 1e3:9.2f}{rate} | "
            f"**{theirs / ours:.2f}x** |")


def _gemm_rows(hidden: int, inter: int, heads: int, kv_heads: int, layers: int, vocab: int,
               chunk: int, batch: int, repeat: int) -> list[str]:
    import torch

    from fdpd.model import native

    head_dim = hidden // heads
    shapes = [(hidden, (heads + 2 * kv_heads) * head_dim), (heads * head_dim, hidden),
              (hidden, 2 * inter), (inter, hidden)]                       # (K, N) per linear
    weights = [[torch.randn(n, k) for k, n in shapes] for _ in range(layers)]
    onednn = [[torch.ops.mkldnn._reorder_linear_weight(w, None) for w in layer]
              for layer in weights]
    ours = [[native.pack_linear_weight(w) for w in layer] for layer in weights]
    rows = []
    for m, what in ((chunk, "prefill chunk"), (batch, "decode step")):
        xs = {k: torch.randn(m, k) for k, _ in shapes}

        def run_onednn(m=m, xs=xs):
            for layer in onednn:
                for (k, _), w in zip(shapes, layer, strict=True):
                    torch.ops.mkldnn._linear_pointwise(xs[k], w, None, "none", [], "")

        def run_native(m=m, xs=xs):
            for layer in ours:
                for (k, n), w in zip(shapes, layer, strict=True):
                    native.packed_linear(xs[k], w, None, n)

        t = _fastest({"native": run_native, "onednn": run_onednn}, repeat)
        flop = layers * sum(2 * m * k * n for k, n in shapes)
        rows.append(_row(f"{layers} layers' linears, {what} (M={m})", t["native"], t["onednn"],
                         flop))
    head = torch.randn(vocab, hidden)
    head_dnn, head_ours = torch.ops.mkldnn._reorder_linear_weight(head, None), \
        native.pack_linear_weight(head)
    x = torch.randn(batch, hidden)
    t = _fastest({
        "native": lambda: native.packed_linear(x, head_ours, None, vocab),
        "onednn": lambda: torch.ops.mkldnn._linear_pointwise(x, head_dnn, None, "none", [], "")},
        repeat)
    rows.append(_row(f"LM head {batch} x {hidden} -> {vocab}", t["native"], t["onednn"],
                     2 * batch * hidden * vocab))
    return rows


def _attention_rows(heads: int, kv_heads: int, head_dim: int, chunk: int, batch: int,
                    context: int, repeat: int) -> list[str]:
    import torch
    import torch.nn.functional as F

    from fdpd.model import native

    bs, layers = 16, 4
    rows = []
    for start in (0, context):
        total = start + chunk
        nblocks = -(-total // bs)
        layer = torch.randn(nblocks + 8, layers, 2, bs, kv_heads, head_dim)[:, 1]
        table = torch.randperm(nblocks + 8)[:nblocks]
        q = torch.randn(chunk, heads, head_dim)
        out = torch.empty_like(q)
        spans = torch.tensor([[0, chunk, start]])

        def plain(layer=layer, table=table, q=q, start=start, total=total):
            keys = layer[:, 0].index_select(0, table).reshape(-1, kv_heads, head_dim)[:total]
            values = layer[:, 1].index_select(0, table).reshape(-1, kv_heads, head_dim)[:total]
            mask = (None if start == 0 else
                    torch.arange(total)[None, :] <= torch.arange(start, total)[:, None])
            return F.scaled_dot_product_attention(
                q.transpose(0, 1)[None], keys.transpose(0, 1)[None],
                values.transpose(0, 1)[None], attn_mask=mask, is_causal=mask is None,
                enable_gqa=True)

        t = _fastest({"native": lambda layer=layer, table=table, q=q, out=out, spans=spans:
                      native.paged_prefill_attention(out, q, layer, spans, table[None],
                                                     head_dim ** -0.5),
                      "torch": plain}, repeat)
        flop = 4 * heads * head_dim * (chunk * start + chunk * (chunk + 1) / 2)
        rows.append(_row(f"prefill attention, {chunk} new after {start} cached", t["native"],
                         t["torch"], flop))
    # Decode: a batch of requests with `context` tokens each, scattered blocks, cold cache.
    width = -(-(context + 1) // bs)
    nblocks = batch * width * 2
    layer = torch.randn(nblocks, layers, 2, bs, kv_heads, head_dim)[:, 1]
    table = torch.stack([torch.randperm(nblocks)[:width] for _ in range(batch)])
    lens = torch.full((batch,), context + 1)
    q = torch.randn(batch, heads, head_dim)
    out = torch.empty_like(q)
    mask = (torch.arange(width * bs)[None, :] < lens[:, None])[:, None, None, :]

    def plain_decode():
        keys = layer[:, 0].index_select(0, table.flatten()).view(batch, -1, kv_heads, head_dim)
        values = layer[:, 1].index_select(0, table.flatten()).view(batch, -1, kv_heads,
                                                                   head_dim)
        return F.scaled_dot_product_attention(
            q.unsqueeze(2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask,
            enable_gqa=True)

    t = _fastest({"native": lambda: native.paged_decode_attention(out, q, layer, table, lens,
                                                                  head_dim ** -0.5),
                  "torch": plain_decode}, repeat)
    rows.append(_row(f"decode attention, {batch} x {context + 1} tokens", t["native"],
                     t["torch"], 4 * heads * head_dim * batch * (context + 1)))
    logits = torch.randn(batch, 32000)
    t = _fastest({"native": lambda: native.greedy_pick(logits),
                  "torch": lambda: logits.max(dim=-1).indices}, repeat * 4)
    rows.append(_row(f"greedy pick, {batch} x 32000 logits", t["native"], t["torch"]))
    return rows


@click.command("kernels")
@click.option("--hidden", default=512, show_default=True, type=click.IntRange(min=8))
@click.option("--intermediate", default=1536, show_default=True, type=click.IntRange(min=8))
@click.option("--heads", default=4, show_default=True, type=click.IntRange(min=1))
@click.option("--kv-heads", default=2, show_default=True, type=click.IntRange(min=1))
@click.option("--layers", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--vocab", default=32000, show_default=True, type=click.IntRange(min=1))
@click.option("--chunk", default=512, show_default=True, type=click.IntRange(min=1),
              help="Rows of a prefill chunk.")
@click.option("--batch", default=32, show_default=True, type=click.IntRange(min=1),
              help="Requests in a decode step.")
@click.option("--context", default=1536, show_default=True, type=click.IntRange(min=1),
              help="Cached tokens before the second prefill chunk and of each decode.")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--repeat", default=5, show_default=True, type=click.IntRange(min=1))
def command(hidden: int, intermediate: int, heads: int, kv_heads: int, layers: int, vocab: int,
            chunk: int, batch: int, context: int, threads: int, repeat: int) -> None:
    """fdpd's native CPU kernels vs the paths they replaced, side by side (fastest of N)."""
    import torch

    from fdpd.model import native

    if heads % kv_heads or hidden % heads:
        raise click.BadParameter("need heads % kv-heads == 0 and hidden % heads == 0")
    why = native.load()
    if why is not None:
        raise click.ClickException(f"native kernels unavailable: {why}")
    torch.set_num_threads(threads)
    click.echo(f"{threads} thread(s), fastest of {repeat}; h{hidden} x {layers} layers, {heads} "
               f"heads / {kv_heads} KV heads x {hidden // heads}, intermediate {intermediate}\n")
    click.echo("| kernel | native ms | replaced ms | native GFLOP/s | replaced GFLOP/s | "
               "speedup |")
    click.echo("| --- | ---: | ---: | ---: | ---: | ---: |")
    for row in _gemm_rows(hidden, intermediate, heads, kv_heads, layers, vocab, chunk, batch,
                          repeat):
        click.echo(row)
    for row in _attention_rows(heads, kv_heads, hidden // heads, chunk, batch, context, repeat):
        click.echo(row)
    click.echo("\n(replaced = oneDNN's packed GEMM for the linears; gather + mask + SDPA for "
               "attention; torch.max for the greedy pick)")
