"""``fdpd bench engine``: offline throughput of fdpd's engine against ``transformers`` generate.

Both run the same mixed-length batch of token-id prompts, greedy, the same number of output
tokens per prompt, on the same weights, in one process with the same torch thread count.
``transformers`` runs the way people batch it: left padding plus an attention mask,
``--max-num-seqs`` prompts per ``generate`` call (fdpd's batch limit), its default dynamic KV
cache. Neither stops early: fdpd ignores EOS, and ``transformers``' generation config has its EOS
removed (``min_new_tokens`` would mask the EOS logit instead, which changes greedy choices and
breaks the token-for-token comparison).

Timings are wall clock around ``generate`` only; model loading and a short warm-up run of each
are excluded. Each engine runs ``--repeat`` times, interleaved, and its fastest run counts: on a
shared machine, background load then slows both alike instead of whichever ran second. Greedy
outputs are compared per prompt; in float32 they should agree, and the count is printed either
way.
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import click

# --quick: a sanity run in seconds, on a small synthetic model.
QUICK = {"num_prompts": 4, "min_len": 8, "max_len": 48, "output_len": 8, "repeat": 1}
QUICK_MODEL = {"hidden": 64, "layers": 2, "vocab": 1024}
DEFAULT_MODEL = {"hidden": 256, "layers": 4, "vocab": 32000}
POSITIVE = click.IntRange(min=1)


@dataclass(frozen=True)
class RunResult:
    name: str
    wall_s: float                   # fastest of the repeats
    output_tokens: int
    all_wall_s: tuple[float, ...] = ()

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s if self.wall_s > 0 else float("inf")


def make_output_lens(num: int, min_len: int | None, max_len: int, seed: int) -> list[int]:
    """Output length per prompt: all ``max_len``, or uniform in [min_len, max_len]."""
    if min_len is None:
        return [max_len] * num
    rng = random.Random(seed + 1)
    return [rng.randint(min_len, max_len) for _ in range(num)]


def make_prompts(num: int, min_len: int, max_len: int, vocab: int, seed: int) -> list[list[int]]:
    """Random token ids, lengths uniform in [min_len, max_len]; ids 0..2 (pad/bos/eos of the
    synthetic checkpoints) are avoided."""
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(min_len, max_len))]
            for _ in range(num)]


Runner = Callable[[], list[list[int]]]


def prepare_fdpd(model: str, prompts: list[list[int]], output_lens: list[int], dtype: str,
                 max_num_seqs: int, max_num_batched_tokens: int) -> Runner:
    """Load fdpd and warm it up; return a function that generates the whole batch (each prompt
    its own output length: continuous batching admits the next prompt when one finishes)."""
    from fdpd.llm import LLM
    from fdpd.sampling_params import SamplingParams

    block_size = 16
    longest = max(map(len, prompts)) + max(output_lens)
    llm = LLM(model, dtype=dtype, max_num_seqs=max_num_seqs,
              max_num_batched_tokens=max_num_batched_tokens, block_size=block_size,
              # Room for the whole batch: this measures throughput, not preemption.
              num_kv_blocks=-(-longest // block_size) * max_num_seqs + 1)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in output_lens]
    llm.generate([prompts[0][:8]], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))

    def run() -> list[list[int]]:
        # A repeat must not find the previous repeat's prompts in the prefix cache.
        llm.engine.block_manager.reset_prefix_cache()
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]

    return run


def prepare_transformers(model: str, prompts: list[list[int]], output_lens: list[int],
                         dtype: str, batch_size: int) -> Runner:
    """Load the same weights into ``transformers`` and warm up; return a function that
    generates the whole batch, ``batch_size`` left-padded prompts per ``generate`` call. A
    static batch runs until its longest output is done; each prompt keeps its own length."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)).eval()
    hf.generation_config.eos_token_id = None
    pad = 0

    def generate(batch: list[list[int]], new_tokens: int) -> list[list[int]]:
        width = max(map(len, batch))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=mask, do_sample=False,
                              max_new_tokens=new_tokens, pad_token_id=pad)
        return out[:, width:].tolist()

    generate([prompts[0][:8]], 2)

    def run() -> list[list[int]]:
        tokens: list[list[int]] = []
        for i in range(0, len(prompts), batch_size):
            lens = output_lens[i:i + batch_size]
            out = generate(prompts[i:i + batch_size], max(lens))
            tokens += [row[:n] for row, n in zip(out, lens)]
        return tokens

    return run


def measure(runners: dict[str, Runner], repeat: int) -> tuple[dict[str, RunResult],
                                                              dict[str, list[list[int]]]]:
    """Run each runner ``repeat`` times, interleaved (A B A B ...) so that background load hits
    both alike; keep each one's fastest run. Returns results and each runner's last tokens."""
    walls: dict[str, list[float]] = {name: [] for name in runners}
    tokens: dict[str, list[list[int]]] = {}
    for _ in range(repeat):
        for name, run in runners.items():
            start = time.perf_counter()
            tokens[name] = run()
            walls[name].append(time.perf_counter() - start)
    results = {name: RunResult(name, min(w), sum(map(len, tokens[name])), tuple(w))
               for name, w in walls.items()}
    return results, tokens


def _overrides_for_quick(ctx: click.Context, values: dict) -> dict:
    source = click.core.ParameterSource.DEFAULT
    return {k: (QUICK[k] if k in QUICK and ctx.get_parameter_source(k) == source else v)
            for k, v in values.items()}


@click.command(context_settings={"show_default": True})
@click.option("--num-prompts", default=32, type=POSITIVE, help="Prompts in the batch.")
@click.option("--min-len", default=32, type=POSITIVE, help="Shortest prompt, tokens.")
@click.option("--max-len", default=512, type=POSITIVE, help="Longest prompt, tokens.")
@click.option("--output-len", default=128, type=POSITIVE,
              help="Tokens generated per prompt (both engines); the longest with "
              "--min-output-len.")
@click.option("--min-output-len", default=None, type=POSITIVE,
              help="Draw each prompt's output length uniformly from [this, --output-len] "
              "(as in real traffic) instead of all --output-len.")
@click.option("--model", default=None, type=click.Path(exists=True, file_okay=False),
              help="Hugging Face model directory. Default: a synthetic Llama (hidden 256, "
              "4 layers, 4 heads / 2 KV heads, vocab 32000, seeded random weights) written to a "
              "temporary directory.")
@click.option("--dtype", default="float32", type=click.Choice(["float32", "bfloat16"]))
@click.option("--max-num-seqs", default=32, type=POSITIVE,
              help="fdpd's batch limit; also transformers' batch size per generate call.")
@click.option("--max-num-batched-tokens", default=512, type=POSITIVE,
              help="fdpd's token budget per step.")
@click.option("--threads", default=1, type=POSITIVE, help="torch threads (both engines).")
@click.option("--seed", default=0, help="Seed of the prompts.")
@click.option("--repeat", default=3, type=POSITIVE, help="Timed runs of each engine, "
              "interleaved; the fastest counts (this machine is shared and noisy).")
@click.option("--quick", is_flag=True, help=f"Sanity run: {QUICK} on a small synthetic model "
              f"{QUICK_MODEL}, unless given explicitly.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.pass_context
def command(ctx: click.Context, **values) -> None:
    """Throughput of fdpd vs transformers generate on one mixed-length batch (greedy)."""
    import torch

    if values["quick"]:
        values = _overrides_for_quick(ctx, values)
    v = values
    if not 1 <= v["min_len"] <= v["max_len"]:
        raise click.BadParameter("need 1 <= --min-len <= --max-len", param_hint="--min-len")
    torch.set_num_threads(v["threads"])
    with tempfile.TemporaryDirectory(prefix="fdpd-bench-") as tmp:
        model, model_desc = _resolve_model(v["model"], v["quick"], Path(tmp))
        vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
        prompts = make_prompts(v["num_prompts"], v["min_len"], v["max_len"], vocab, v["seed"])
        lens = make_output_lens(v["num_prompts"], v["min_output_len"], v["output_len"],
                                v["seed"])
        runners = {
            "fdpd": prepare_fdpd(model, prompts, lens, v["dtype"], v["max_num_seqs"],
                                 v["max_num_batched_tokens"]),
            "transformers": prepare_transformers(model, prompts, lens, v["dtype"],
                                                 v["max_num_seqs"]),
        }
        results, tokens = measure(runners, v["repeat"])
    fdpd_result, hf_result = results["fdpd"], results["transformers"]
    fdpd_tokens, hf_tokens = tokens["fdpd"], tokens["transformers"]
    agree = sum(a == b for a, b in zip(fdpd_tokens, hf_tokens))
    ratio = fdpd_result.tokens_per_s / hf_result.tokens_per_s
    report = {
        "config": {k: v[k] for k in ("num_prompts", "min_len", "max_len", "output_len",
                                      "min_output_len", "dtype",
                                      "max_num_seqs", "max_num_batched_tokens", "threads",
                                      "seed", "repeat")},
        "model": model_desc,
        "prompt_tokens": sum(map(len, prompts)),
        "results": [{**asdict(r), "tokens_per_s": r.tokens_per_s}
                    for r in (fdpd_result, hf_result)],
        "ratio_fdpd_over_transformers": ratio,
        "greedy_agreement": {"agree": agree, "prompts": len(prompts)},
    }
    if v["as_json"]:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo("model: " + _describe(model_desc))
    click.echo(f"batch: {len(prompts)} prompts of {v['min_len']}..{v['max_len']} tokens "
               f"({report['prompt_tokens']} prompt tokens), "
               + (f"{v['output_len']} output tokens each" if v["min_output_len"] is None else
                  f"{v['min_output_len']}..{v['output_len']} output tokens")
               + f", {v['dtype']}, {v['threads']} torch thread(s)")
    click.echo(f"timing: fastest of {v['repeat']} interleaved run(s) of each")
    click.echo("")
    click.echo(f"| {'engine':<12} | {'wall s':>8} | {'output tokens':>13} | {'tokens/s':>9} |")
    click.echo(f"| {'-' * 12} | {'-' * 8}:| {'-' * 13}:| {'-' * 9}:|")
    for r in (fdpd_result, hf_result):
        click.echo(f"| {r.name:<12} | {r.wall_s:>8.2f} | {r.output_tokens:>13} | "
                   f"{r.tokens_per_s:>9.1f} |")
    click.echo("")
    click.echo(f"throughput ratio fdpd / transformers: {ratio:.2f}x")
    click.echo(f"greedy outputs identical: {agree}/{len(prompts)} prompts")


def _resolve_model(model: str | None, quick: bool, tmp: Path) -> tuple[str, dict]:
    if model is not None:
        if not (Path(model) / "config.json").is_file():
            raise click.BadParameter(f"{model} has no config.json", param_hint="--model")
        cfg = json.loads((Path(model) / "config.json").read_text())
        keys = ("architectures", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "intermediate_size", "vocab_size")
        return model, {"path": model, **{k: cfg.get(k) for k in keys}}
    from fdpd.model.synthetic import synthetic_config, write_checkpoint

    shape = QUICK_MODEL if quick else DEFAULT_MODEL
    cfg = synthetic_config("llama", **shape)
    path = write_checkpoint(tmp / "model", cfg, seed=0)
    return str(path), {"path": "synthetic", "architectures": [cfg.architecture],
                       "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_hidden_layers,
                       "num_attention_heads": cfg.num_attention_heads,
                       "num_key_value_heads": cfg.num_key_value_heads,
                       "intermediate_size": cfg.intermediate_size, "vocab_size": cfg.vocab_size}


def _describe(m: dict) -> str:
    arch = (m.get("architectures") or ["?"])[0]
    return (f"{m['path']} {arch}: hidden {m['hidden_size']}, {m['num_hidden_layers']} layers, "
            f"{m['num_attention_heads']} heads / {m['num_key_value_heads']} KV heads, "
            f"intermediate {m['intermediate_size']}, vocab {m['vocab_size']}")
