"""``fdpd bench restore``: resuming a preempted long-context request from the KV store vs.
recomputing it, on the same engine configuration, measured side by side in one run.

Each trial: a request with a long prompt runs until it has decoded a few tokens, is preempted
(its KV written back to the store, pinned until acknowledged), the engine's local prefix cache is
dropped (so the only copy of the KV is in the store, as after an eviction or on another
instance), and the time from readmission to its next token is measured. The recompute engine
does the same without a store. Trials alternate between the two engines; the median counts.
"""

from __future__ import annotations

import json
import random
import statistics
import tempfile
import time

import click


def _resume_seconds(engine, prompt: list[int], req_id: str, decode_first: int) -> float:
    from fdpd.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=decode_first + 8, temperature=0, ignore_eos=True)
    engine.add_request(req_id, prompt, params)
    req = engine.scheduler.requests[req_id]
    while req.num_output_tokens < decode_first:
        engine.step()
    engine.scheduler.preempt(req_id)
    preemption = engine.scheduler.preemption
    while preemption.releasing_blocks():            # the write-back is acknowledged
        preemption.collect(engine.scheduler, timeout=0.01)
    engine.block_manager.reset_prefix_cache()
    before = req.num_output_tokens
    t0 = time.perf_counter()
    while req.num_output_tokens == before:
        engine.step()
    seconds = time.perf_counter() - t0
    engine.abort_request(req_id)
    return seconds


def run(prompt_len: int, decode_first: int, trials: int, store_url: str | None,
        hidden: int, layers: int, model: str | None) -> dict:
    import torch

    from fdpd.config import EngineConfig
    from fdpd.engine.engine import Engine
    from fdpd.model.synthetic import write_synthetic_checkpoint

    torch.set_num_threads(1)
    tmp = tempfile.mkdtemp(prefix="fdpd-bench-restore-")
    if model is None:
        model = str(write_synthetic_checkpoint(f"{tmp}/model", hidden=hidden, layers=layers,
                                               heads=hidden // 64, kv_heads=hidden // 64,
                                               max_positions=max(4096, prompt_len * 2)))
    store_url = store_url or f"disk:{tmp}/store"
    common = dict(model=model, block_size=16, num_kv_blocks=prompt_len // 16 + 64,
                  max_num_batched_tokens=512, max_num_seqs=4)
    restore = Engine(EngineConfig(kv_store=store_url, **common))
    recompute = Engine(EngineConfig(**common))
    rng = random.Random(0)
    prompt = [rng.randrange(3, 32000) for _ in range(prompt_len)]
    times: dict[str, list[float]] = {"restore": [], "recompute": []}
    try:
        for t in range(trials + 1):                 # trial 0 warms both up
            for name, engine in (("restore", restore), ("recompute", recompute)):
                seconds = _resume_seconds(engine, prompt, f"{name}-{t}", decode_first)
                if t:
                    times[name].append(seconds)
        stats = restore.scheduler.preemption.offload.stats
        restored_tokens = restore.scheduler.num_restored_tokens
    finally:
        restore.close()
        recompute.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"prompt_len": prompt_len, "store": store_url.split(":", 1)[0], "model": model,
            "hidden": hidden, "layers": layers, "trials": trials,
            "restore_s": med["restore"], "recompute_s": med["recompute"],
            "speedup": med["recompute"] / med["restore"],
            "restored_tokens_total": restored_tokens,
            "blocks_restored_total": stats.blocks_restored, "all": times}


@click.command()
@click.option("--prompt-len", default=2048, show_default=True, help="Context of the request.")
@click.option("--decode-first", default=4, show_default=True,
              help="Tokens decoded before the preemption.")
@click.option("--trials", default=3, show_default=True)
@click.option("--kv-store", default=None, help="Store URL (default: a temporary disk store); "
              "e.g. redis://127.0.0.1:6379/0 or redis-cluster://HOST:PORT,HOST:PORT.")
@click.option("--hidden", default=512, show_default=True)
@click.option("--layers", default=8, show_default=True)
@click.option("--model", default=None, help="A model directory instead of a synthetic one.")
@click.option("--json", "as_json", is_flag=True)
def command(prompt_len, decode_first, trials, kv_store, hidden, layers, model, as_json):
    """Resume a preempted long request: KV-store restore vs. recompute, side by side."""
    r = run(prompt_len, decode_first, trials, kv_store, hidden, layers, model)
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    click.echo(f"model: hidden {hidden}, {layers} layers, float32, 1 torch thread; "
               f"context {prompt_len} tokens; store: {r['store']}; median of {trials}")
    click.echo(f"resume by restore:   {r['restore_s'] * 1e3:8.1f} ms "
               f"({r['blocks_restored_total']} blocks restored over all trials)")
    click.echo(f"resume by recompute: {r['recompute_s'] * 1e3:8.1f} ms")
    click.echo(f"restore is {r['speedup']:.1f}x faster")
