"""``fdpd bench engine``: offline throughput of fdpd's engine against ``transformers`` generate
and vLLM's offline ``LLM.generate``, side by side in one command.

Every engine runs the same batch of token-id prompts, greedy, the same output length per prompt,
on the same checkpoint with the same torch thread count (vLLM from its own venv, see
``scripts/setup-vllm``, pinned like fdpd to cores ``0..threads-1``). Nobody stops early: EOS is
ignored. Timings are around the generate call only; loading, compilation and a short warm-up
are excluded. Each engine runs ``--repeat`` times, interleaved (A B C A B C ...), and its fastest
run counts, so background load slows all alike. Both wall time (what a user waits) and CPU
seconds (every process of the engine: robust when the machine is shared) are reported.
Greedy outputs are compared per prompt; where they differ the first divergent position is shown
(expected in bfloat16, where summation order decides near-ties).

Workloads (``--workload``) are the ones fdpd was compared with vLLM on; each sets the batch
unless its options are given explicitly.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import click

from fdpd.bench.baselines import Run, Runner
from fdpd.config import KERNELS

WORKLOADS = {
    "mixed": {"num_prompts": 32, "min_len": 32, "max_len": 512, "output_len": 128,
              "min_output_len": None},
    "prefill": {"num_prompts": 16, "min_len": 512, "max_len": 512, "output_len": 1,
                "min_output_len": None},
    "decode": {"num_prompts": 32, "min_len": 32, "max_len": 32, "output_len": 128,
               "min_output_len": None},
}
# --quick: a sanity run in seconds, on a small synthetic model.
QUICK = {"num_prompts": 4, "min_len": 8, "max_len": 48, "output_len": 8, "repeat": 1,
         "hidden": 128, "layers": 2, "heads": 2, "vocab": 1024}
POSITIVE = click.IntRange(min=1)
SETTLE_S = 2.0


@dataclass(frozen=True)
class RunResult:
    name: str
    wall_s: float                   # fastest of the repeats
    cpu_s: float                    # fewest CPU seconds of the repeats
    output_tokens: int
    all_wall_s: tuple[float, ...] = ()

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s if self.wall_s > 0 else float("inf")

    @property
    def tokens_per_cpu_s(self) -> float:
        return self.output_tokens / self.cpu_s if self.cpu_s > 0 else float("inf")


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


def measure(runners: dict[str, Runner], prompts: list[list[int]], lens: list[int],
            repeat: int) -> tuple[dict[str, RunResult], dict[str, list[list[int]]]]:
    """Run each runner ``repeat`` times, interleaved (A B A B ...) so that background load hits
    all alike; keep each one's fastest run. Returns results and each runner's last tokens."""
    runs: dict[str, list[Run]] = {name: [] for name in runners}
    for _ in range(repeat):
        for name, run in runners.items():
            # vLLM's processes busy-poll their queues for a second after each request
            # (shm_broadcast's busy_loop_s): the next engine must not start on a core that
            # one of them still spins on.
            time.sleep(SETTLE_S)
            runs[name].append(run(prompts, lens))
    results = {name: RunResult(name, min(r.wall_s for r in rs), min(r.cpu_s for r in rs),
                               sum(map(len, rs[-1].tokens)), tuple(r.wall_s for r in rs))
               for name, rs in runs.items()}
    return results, {name: rs[-1].tokens for name, rs in runs.items()}


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> dict:
    """How many prompts' tokens are identical, and where the others first diverge."""
    firsts = []
    for a, b in zip(ours, theirs):
        if a != b:
            firsts.append(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y),
                               min(len(a), len(b))))
    return {"agree": len(ours) - len(firsts), "prompts": len(ours),
            "first_divergence": sorted(firsts)}


def _apply_presets(ctx: click.Context, values: dict) -> dict:
    """--workload then --quick fill every option the user did not give."""
    default = click.core.ParameterSource.DEFAULT
    presets = {**WORKLOADS[values["workload"]], **(QUICK if values["quick"] else {})}
    if values["quick"] and values["workload"] == "prefill":
        presets["output_len"] = 1
    return {k: (presets[k] if k in presets and ctx.get_parameter_source(k) == default else v)
            for k, v in values.items()}


@click.command(context_settings={"show_default": True})
@click.option("--workload", multiple=True, default=("mixed",),
              type=click.Choice(list(WORKLOADS)),
              help="Batch preset (repeat the option to run several on the same loaded "
              "engines): " + "; ".join(
                  f"{k}: {w['num_prompts']} prompts of {w['min_len']}..{w['max_len']} tokens, "
                  f"{w['output_len']} out" for k, w in WORKLOADS.items())
              + ". Options given explicitly override it.")
@click.option("--baseline", "baselines", multiple=True, default=("transformers",),
              type=click.Choice(["transformers", "vllm"]),
              help="Engine(s) to compare with (repeat the option for both). vllm runs vLLM's "
              "CPU build from .venv-vllm (scripts/setup-vllm).")
@click.option("--num-prompts", default=32, type=POSITIVE, help="Prompts in the batch.")
@click.option("--min-len", default=32, type=POSITIVE, help="Shortest prompt, tokens.")
@click.option("--max-len", default=512, type=POSITIVE, help="Longest prompt, tokens.")
@click.option("--output-len", default=128, type=POSITIVE,
              help="Tokens generated per prompt (every engine); the longest with "
              "--min-output-len.")
@click.option("--min-output-len", default=None, type=POSITIVE,
              help="Draw each prompt's output length uniformly from [this, --output-len] "
              "(as in real traffic) instead of all --output-len.")
@click.option("--model", default=None, type=click.Path(exists=True, file_okay=False),
              help="Hugging Face model directory. Default: a synthetic Llama of --hidden x "
              "--layers (--heads heads, half as many KV heads, vocab --vocab, seeded random "
              "weights) written to a temporary directory.")
@click.option("--hidden", default=256, type=POSITIVE, help="Synthetic model: hidden size.")
@click.option("--layers", default=4, type=POSITIVE, help="Synthetic model: layers.")
@click.option("--heads", default=4, type=POSITIVE,
              help="Synthetic model: attention heads (half as many KV heads).")
@click.option("--vocab", default=32000, type=POSITIVE, help="Synthetic model: vocabulary.")
@click.option("--dtype", default="float32", type=click.Choice(["float32", "bfloat16"]))
@click.option("--kernels", default="auto", type=click.Choice(list(KERNELS)),
              help="fdpd's GEMM backend (fdpd.model.kernels).")
@click.option("--max-num-seqs", default=32, type=POSITIVE,
              help="Batch limit of fdpd and vLLM; transformers' batch size per generate call.")
@click.option("--max-num-batched-tokens", default=512, type=POSITIVE,
              help="Token budget per step (fdpd and vLLM).")
@click.option("--threads", default=1, type=POSITIVE, help="torch threads (every engine).")
@click.option("--seed", default=0, help="Seed of the prompts.")
@click.option("--repeat", default=3, type=POSITIVE, help="Timed runs of each engine, "
              "interleaved; the fastest counts (this machine is shared and noisy).")
@click.option("--vllm-python", default=None, help="vLLM's interpreter (default: "
              "$FDPD_VLLM_PYTHON, else .venv-vllm/bin/python).")
@click.option("--vllm-log", default=None, type=click.Path(dir_okay=False),
              help="Append vLLM's own output to this file.")
@click.option("--profile", default=0, type=click.IntRange(min=0),
              help="After the timed runs, profile one more fdpd run (torch.profiler) and "
              "print its N costliest operators by self CPU time.")
@click.option("--quick", is_flag=True, help=f"Sanity run: {QUICK}, unless given explicitly.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.pass_context
def command(ctx: click.Context, **values) -> None:
    """Throughput of fdpd vs transformers and/or vLLM on one batch per workload (greedy)."""
    import torch

    plans = [_apply_presets(ctx, {**values, "workload": w})
             for w in dict.fromkeys(values["workload"])]
    for v in plans:
        if not 1 <= v["min_len"] <= v["max_len"]:
            raise click.BadParameter("need 1 <= --min-len <= --max-len", param_hint="--min-len")
    v0 = plans[0]
    baselines = list(dict.fromkeys(v0["baselines"]))
    torch.set_num_threads(v0["threads"])
    if "vllm" in baselines and hasattr(os, "sched_setaffinity"):
        # vLLM binds its model worker to cores 0..threads-1; fdpd gets the same cores.
        os.sched_setaffinity(0, set(range(v0["threads"])))
    max_model_len = max(-(-(v["max_len"] + v["output_len"] + 1) // 16) * 16 for v in plans)
    closers, outputs = [], []
    with tempfile.TemporaryDirectory(prefix="fdpd-bench-") as tmp:
        model, model_desc = _resolve_model(v0, Path(tmp))
        vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
        # Every engine is loaded once and runs every workload.
        runners: dict[str, Runner] = {"fdpd": _prepare(v0, model, max_model_len)}
        fp32 = (_prepare({**v0, "dtype": "float32"}, model, max_model_len)
                if v0["dtype"] != "float32" else None)
        try:
            for name in baselines:
                runners[name], closer = _prepare_baseline(name, v0, model, max_model_len)
                closers.append(closer)
            for v in plans:
                outputs.append(_run_workload(v, runners, fp32, vocab, model_desc, baselines))
        finally:
            for close in closers:
                close()
    if v0["as_json"]:
        reports = [report for report, _, _ in outputs]
        click.echo(json.dumps(reports[0] if len(reports) == 1 else reports, indent=2))
        return
    for i, (report, results, profile) in enumerate(outputs):
        if i:
            click.echo("")
        _print_table(plans[i], report, results)
        if profile:
            click.echo("\nfdpd profile (one run, self CPU time):\n" + profile)


def _run_workload(v: dict, runners: dict[str, Runner], fp32: Runner | None, vocab: int,
                  model_desc: dict, baselines: list[str]):
    prompts = make_prompts(v["num_prompts"], v["min_len"], v["max_len"], vocab, v["seed"])
    lens = make_output_lens(v["num_prompts"], v["min_output_len"], v["output_len"], v["seed"])
    results, tokens = measure(runners, prompts, lens, v["repeat"])
    profile = _profile(runners["fdpd"], prompts, lens, v["profile"]) if v["profile"] else None
    # Where the lower precision first changes a greedy choice.
    reference = agreement(tokens["fdpd"], fp32(prompts, lens).tokens) if fp32 else None
    report = _report(v, model_desc, prompts, results, tokens, baselines, reference)
    return report, results, profile


def _profile(run: Runner, prompts: list[list[int]], lens: list[int], rows: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run(prompts, lens)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def _prepare(v: dict, model: str, max_model_len: int) -> Runner:
    from fdpd.bench.baselines import prepare_fdpd

    return prepare_fdpd(model, v["dtype"], v["max_num_seqs"], v["max_num_batched_tokens"],
                        max_model_len, v["kernels"])


def _prepare_baseline(name: str, v: dict, model: str, max_model_len: int):
    from fdpd.bench import baselines as b

    if name == "transformers":
        return b.prepare_transformers(model, v["dtype"], v["max_num_seqs"]), lambda: None
    try:
        return b.prepare_vllm(model, v["dtype"], v["threads"], v["max_num_seqs"],
                              v["max_num_batched_tokens"], max_model_len,
                              v["vllm_python"] or b.default_vllm_python(), v["vllm_log"])
    except (FileNotFoundError, RuntimeError) as e:
        raise click.ClickException(str(e)) from None


def _report(v: dict, model_desc: dict, prompts: list[list[int]],
            results: dict[str, RunResult], tokens: dict[str, list[list[int]]],
            baselines: list[str], reference: dict | None) -> dict:
    ours = results["fdpd"]
    report = {
        "config": {k: v[k] for k in ("workload", "num_prompts", "min_len", "max_len",
                                      "output_len", "min_output_len", "dtype", "kernels",
                                      "max_num_seqs", "max_num_batched_tokens", "threads",
                                      "seed", "repeat")},
        "model": model_desc,
        "prompt_tokens": sum(map(len, prompts)),
        "results": [{**vars(r), "tokens_per_s": r.tokens_per_s,
                     "tokens_per_cpu_s": r.tokens_per_cpu_s} for r in results.values()],
        "ratios": {name: {"wall": results[name].wall_s / ours.wall_s,
                          "cpu": results[name].cpu_s / ours.cpu_s} for name in baselines},
        "greedy_agreement": {name: agreement(tokens["fdpd"], tokens[name])
                             for name in baselines},
    }
    if reference is not None:
        report["agreement_with_fdpd_float32"] = reference
    return report


def _print_table(v: dict, report: dict, results: dict[str, RunResult]) -> None:
    click.echo("model: " + _describe(report["model"]))
    click.echo(f"workload {v['workload']}: {v['num_prompts']} prompts of "
               f"{v['min_len']}..{v['max_len']} tokens ({report['prompt_tokens']} prompt "
               f"tokens), " + (f"{v['output_len']} output tokens each"
                               if v["min_output_len"] is None else
                               f"{v['min_output_len']}..{v['output_len']} output tokens")
               + f", {v['dtype']}, {v['threads']} thread(s), fdpd kernels {v['kernels']}")
    click.echo(f"timing: fastest of {v['repeat']} interleaved run(s) of each")
    click.echo("")
    click.echo(f"| {'engine':<12} | {'wall s':>8} | {'CPU s':>8} | {'output tokens':>13} | "
               f"{'tokens/s':>9} |")
    click.echo(f"| {'-' * 12} | {'-' * 8}:| {'-' * 8}:| {'-' * 13}:| {'-' * 9}:|")
    for r in results.values():
        click.echo(f"| {r.name:<12} | {r.wall_s:>8.2f} | {r.cpu_s:>8.2f} | "
                   f"{r.output_tokens:>13} | {r.tokens_per_s:>9.1f} |")
    click.echo("")
    for name, ratio in report["ratios"].items():
        agree = report["greedy_agreement"][name]
        click.echo(f"fdpd / {name}: {ratio['wall']:.2f}x throughput (wall), "
                   f"{ratio['cpu']:.2f}x (CPU s); greedy outputs identical: "
                   f"{agree['agree']}/{agree['prompts']} prompts"
                   + (f", first divergence at {agree['first_divergence']}"
                      if agree["first_divergence"] else ""))
    ref = report.get("agreement_with_fdpd_float32")
    if ref is not None:
        click.echo(f"fdpd {v['dtype']} vs fdpd float32: {ref['agree']}/{ref['prompts']} "
                   f"identical" + (f", first divergence at {ref['first_divergence']}"
                                   if ref["first_divergence"] else ""))


def _resolve_model(v: dict, tmp: Path) -> tuple[str, dict]:
    model = v["model"]
    if model is not None:
        if not (Path(model) / "config.json").is_file():
            raise click.BadParameter(f"{model} has no config.json", param_hint="--model")
        cfg = json.loads((Path(model) / "config.json").read_text())
        keys = ("architectures", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "intermediate_size", "vocab_size")
        return model, {"path": model, **{k: cfg.get(k) for k in keys}}
    from fdpd.model.synthetic import synthetic_config, write_checkpoint

    cfg = synthetic_config("llama", hidden=v["hidden"], layers=v["layers"], vocab=v["vocab"],
                           heads=v["heads"])
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
