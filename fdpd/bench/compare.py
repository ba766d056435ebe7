"""``fdpd bench compare``: PD disaggregation vs. colocated serving (fdpd's mixed instances,
and ``vllm serve``), same load, one run.

Starts on this machine, one after the other (``--systems pd,mixed,vllm``), a PD cluster (router +
``--num-prefill`` P + ``--num-decode`` D), a colocated one with as many engine processes (router
+ ``--num-mixed`` mixed) and ``vllm serve`` pinned to the same cores, each on the same model
directory, runs the same ``bench serve`` workload against each, and prints the results side by
side with PD's ratios to each other system: goodput, TTFT, TPOT, ITL, E2E, CPU per request.

Every fdpd process gets one torch thread (``fdpd.testing.Cluster``). The default model is a
synthetic Llama written to a temporary directory (``--hidden``/``--layers``/...).
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import tempfile
from pathlib import Path

import click

from fdpd.bench.metrics import SLO, format_table
from fdpd.bench.serve import build_workload, request_rows, workload_options, write_json
from fdpd.bench.systems import run_fdpd_system, run_vllm_system
from fdpd.bench.vllm_server import VLLMSettings, default_vllm_binary


def synthetic_model(directory: Path, hidden: int, layers: int, heads: int, kv_heads: int,
                    vocab: int, max_positions: int, config_only: bool = False,
                    tokenizer: bool = False) -> str:
    """Write a synthetic checkpoint (or, for cost-model runs, only its config.json; with
    ``tokenizer``, plus a trained BPE tokenizer, which vLLM needs)."""
    from fdpd.model.synthetic import synthetic_config, write_checkpoint, write_model_dir

    cfg = synthetic_config("llama", hidden=hidden, layers=layers, vocab=vocab, heads=heads,
                           kv_heads=kv_heads, max_positions=max_positions)
    if config_only:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2))
        return str(directory)
    if tokenizer:
        return str(write_model_dir(directory, cfg, seed=0))
    return str(write_checkpoint(directory, cfg, seed=0))


def _slo(v: dict) -> SLO:
    return SLO.parse(v["slo"], v["slo_itl_stat"])


# --systems names -> the report's keys ("colocated" is the historic key of the mixed cluster,
# which slo-table and older JSONs use).
SYSTEM_KEYS = {"pd": "pd", "mixed": "colocated", "colocated": "colocated", "vllm": "vllm"}
SYSTEM_SETS = {"both": "pd,mixed"}

# (ratio key prefix, how to read it off a result); every ratio is PD / the other system.
RATIO_METRICS = (
    ("goodput", lambda r: r.get("goodput")),
    ("throughput", lambda r: r["output_throughput"]),
    ("p50_ttft", lambda r: r["ttft_ms"]["p50"]),
    ("p99_ttft", lambda r: r["ttft_ms"]["p99"]),
    ("mean_tpot", lambda r: r["tpot_ms"]["mean"]),
    ("p99_tpot", lambda r: r["tpot_ms"]["p99"]),
    ("p99_itl", lambda r: r["itl_ms"]["p99"]),
    ("p99_e2e", lambda r: r["e2e_ms"]["p99"]),
    ("cpu_per_request", lambda r: sum(ms for role, ms in r["cpu_ms_per_request"].items()
                                      if role != "client")),
)


def parse_systems(text: str) -> list[str]:
    """``pd,mixed,vllm`` (any order, any subset; ``both`` = ``pd,mixed``) -> report keys."""
    out: list[str] = []
    for name in SYSTEM_SETS.get(text.strip(), text).split(","):
        key = SYSTEM_KEYS.get(name.strip())
        if key is None:
            raise click.BadParameter(f"unknown system {name.strip()!r}; choose from pd, mixed, "
                                     "vllm (comma-separated)", param_hint="--systems")
        if key not in out:
            out.append(key)
    return out


def ratios(results: dict[str, dict]) -> dict:
    """PD over every other system that ran (``p99_itl_pd_over_colocated``, ...)."""
    def ratio(a, b):
        return a / b if a is not None and b else None

    out: dict[str, float | None] = {}
    if "pd" not in results:
        return out
    for other, r in results.items():
        if other == "pd":
            continue
        for metric, read in RATIO_METRICS:
            try:
                out[f"{metric}_pd_over_{other}"] = ratio(read(results["pd"]), read(r))
            except (KeyError, TypeError):
                out[f"{metric}_pd_over_{other}"] = None
    return out


def ratio_table(report: dict, names: dict[str, str]) -> str:
    others = [k for k in names if k != "pd" and k in report]
    lines = ["| PD / | " + " | ".join(names[k] for k in others) + " |",
             "| --- | " + " | ".join("---:" for _ in others) + " |"]
    for metric, _ in RATIO_METRICS:
        cells = [report["ratios"].get(f"{metric}_pd_over_{k}") for k in others]
        lines.append(f"| {metric} | " + " | ".join("-" if c is None else f"{c:.3f}"
                                                   for c in cells) + " |")
    return "\n".join(lines)


def checkpoint_dtype(model: str) -> str:
    """The dtype a model directory's config.json names (float32 when it names none)."""
    try:
        cfg = json.loads((Path(model) / "config.json").read_text())
    except (OSError, ValueError):
        return "float32"
    return {"float": "float32", "half": "float16"}.get(cfg.get("torch_dtype"),
                                                        cfg.get("torch_dtype") or "float32")


def vllm_settings(binary: str | None, threads_bind: str, kvcache_gib: float, args: str,
                  startup_timeout: float) -> VLLMSettings:
    binary = binary or default_vllm_binary()
    if not binary:
        raise click.ClickException("--systems vllm: no vllm executable; run scripts/setup-vllm "
                                   "(makes .venv-vllm) or pass --vllm-bin / FDPD_VLLM_BIN")
    try:
        return VLLMSettings(binary=binary, threads_bind=threads_bind, kvcache_gib=kvcache_gib,
                            args=tuple(shlex.split(args)), startup_timeout=startup_timeout)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


@click.command("compare")
@click.option("--model", default=None, help="Model directory (default: a synthetic Llama of "
              "the shape below, written to a temporary directory, with a trained tokenizer "
              "when vllm runs; `fdpd model synth` writes the same for reuse).")
@click.option("--hidden", default=512, show_default=True)
@click.option("--layers", default=8, show_default=True)
@click.option("--heads", default=8, show_default=True)
@click.option("--kv-heads", default=2, show_default=True)
@click.option("--vocab", default=32000, show_default=True)
@click.option("--max-positions", default=8192, show_default=True)
@click.option("--num-prefill", default=1, show_default=True)
@click.option("--num-decode", default=1, show_default=True)
@click.option("--num-mixed", default=2, show_default=True,
              help="Colocated instances (default: as many processes as P + D).")
@click.option("--engine-args", default="", help="Engine flags for every instance, e.g. "
              "'--num-kv-blocks 2048 --max-num-batched-tokens 512' or '--cost-model 700,17'.")
@click.option("--prefill-args", default="", help="Extra flags for prefill instances.")
@click.option("--decode-args", default="", help="Extra flags for decode instances.")
@click.option("--mixed-args", default="", help="Extra flags for mixed instances.")
@click.option("--systems", default="pd,mixed", show_default=True,
              help="Systems to run, in this order, comma-separated: pd (router + P + D), "
              "mixed (router + mixed instances), vllm (`vllm serve`); 'both' = pd,mixed.")
@click.option("--order", type=click.Choice(["pd-first", "colocated-first"]), default=None,
              help="Deprecated spelling of the --systems order (pd,mixed or mixed,pd).")
@click.option("--vllm-bin", default=None, envvar="FDPD_VLLM_BIN", show_envvar=True,
              help="The vllm executable (default: .venv-vllm/bin/vllm of this checkout, "
              "else vllm on PATH).")
@click.option("--vllm-threads-bind", default="0-1", show_default=True,
              help="VLLM_CPU_OMP_THREADS_BIND: cores vLLM's OpenMP threads are pinned to "
              "(0-1 = the two cores the fdpd clusters' processes share).")
@click.option("--vllm-kvcache-gib", default=4.0, show_default=True,
              help="VLLM_CPU_KVCACHE_SPACE: vLLM's KV cache in GiB.")
@click.option("--vllm-args", default="", help="Extra `vllm serve` flags, e.g. "
              "'--max-num-batched-tokens 512 --no-enable-prefix-caching'.")
@click.option("--vllm-startup-timeout", default=600.0, show_default=True,
              help="Seconds `vllm serve` may take to answer /v1/models.")
@workload_options
@click.option("--sweep", default=None, metavar="RATE,RATE,...",
              help="Run each system once at each of these request rates (req/s) instead of "
              "--request-rate, lowest first, starting it only once (rate i draws its prompts "
              "with --seed + i: no prefix-cache hits across rates); --json PATH then writes "
              "one file per rate (PATH with _rate<R> before its suffix, per-request timings "
              "included) and the SLO attainment table of `bench slo-table` ends the output.")
@click.option("--json", "json_path", default=None, help="Write every result and the ratios.")
@click.option("--save-requests", is_flag=True, help="Include per-request timings in --json.")
@click.option("--plot-dir", default=None, help="Write overlaid CDF / ITL-over-time PNGs here.")
@click.option("--plot-prefix", default="compare_", show_default=True)
@click.option("--log-dir", default=None, help="Keep every process's log here.")
@click.option("--progress/--no-progress", default=True, show_default=True)
def command(model, hidden, layers, heads, kv_heads, vocab, max_positions, num_prefill,
            num_decode, num_mixed, engine_args, prefill_args, decode_args, mixed_args, systems,
            order, vllm_bin, vllm_threads_bind, vllm_kvcache_gib, vllm_args,
            vllm_startup_timeout, sweep, json_path, save_requests, plot_dir, plot_prefix,
            log_dir, progress, **v):
    """PD (P + D) vs. colocated (mixed) clusters vs. vLLM under the same `bench serve` load."""
    try:
        build_workload(v)
        _slo(v)
    except (ValueError, OSError) as e:
        raise click.ClickException(str(e)) from None
    plan = parse_systems(systems)
    if order is not None:
        plan = sorted(plan, key=lambda k: (k != "pd") if order == "pd-first" else (k == "pd"))
    args = shlex.split(engine_args)
    role_args = {"prefill": shlex.split(prefill_args), "decode": shlex.split(decode_args),
                 "mixed": shlex.split(mixed_args)}
    cost_model = "--cost-model" in args
    if "vllm" in plan and cost_model:
        raise click.BadParameter("vllm computes the model; drop --cost-model from "
                                 "--engine-args or vllm from --systems", param_hint="--systems")
    settings = (vllm_settings(vllm_bin, vllm_threads_bind, vllm_kvcache_gib, vllm_args,
                              vllm_startup_timeout) if "vllm" in plan else None)
    tmp = Path(tempfile.mkdtemp(prefix="fdpd-bench-compare-"))
    if model is None:
        model = synthetic_model(tmp / "model", hidden, layers, heads, kv_heads, vocab,
                                max_positions, config_only=cost_model,
                                tokenizer="vllm" in plan)
        model_desc = {"synthetic": True, "hidden": hidden, "layers": layers, "heads": heads,
                      "kv_heads": kv_heads, "vocab": vocab}
    else:
        model_desc = {"path": model}
    if settings is not None and "--dtype" not in settings.args:
        # The dtype fdpd's engines run (the checkpoint's, "auto"): vLLM's CPU build turns a
        # float32 checkpoint into bfloat16 by default, ~5x slower on a CPU without bf16 GEMMs.
        settings = dataclasses.replace(settings, dtype=checkpoint_dtype(model))
    names = {"pd": f"PD {num_prefill}P+{num_decode}D", "colocated": f"colocated {num_mixed}x "
             "mixed", "vllm": f"vLLM (cores {vllm_threads_bind})"}
    counts = {"pd": (num_prefill, num_decode, 0), "colocated": (0, 0, num_mixed)}
    logs = Path(log_dir) if log_dir else None
    try:
        rates = sorted(float(r) for r in sweep.split(",")) if sweep else [v["request_rate"]]
    except ValueError:
        raise click.BadParameter(f"not a list of rates: {sweep!r}", param_hint="--sweep") \
            from None
    # Each rate gets its own prompts (seed + i): the same prompts again would hit the prefix
    # cache that the previous rate filled on the same running system.
    loads = [{**v, "request_rate": r, "seed": v["seed"] + i} for i, r in enumerate(rates)]
    runs = {}
    for key in plan:
        if key == "vllm":
            runs[key] = run_vllm_system(key, settings, model, loads, logs, progress)
        else:
            runs[key] = run_fdpd_system(key, counts[key], model, args, role_args, loads, logs,
                                        progress)
    paths = []
    for i, rate in enumerate(rates):
        results = {k: runs[k][i][0] for k in plan}
        records = {k: runs[k][i][1] for k in plan}
        report = {"model": model_desc, "engine_args": args, "role_args": role_args,
                  "systems": plan, **results}
        if "pd" in results and len(results) > 1:
            report["ratios"] = ratios(results)
        if sweep:
            click.echo(f"\n## {rate:g} req/s")
        _print_report(report, results, {k: names[k] for k in plan})
        if json_path:
            if save_requests or sweep:
                for k, rs in records.items():
                    report[k] = {**report[k], "requests": request_rows(rs)}
            path = Path(json_path)
            if sweep:
                path = path.with_name(f"{path.stem}_rate{rate:g}{path.suffix}")
            write_json(str(path), report)
            paths.append(str(path))
        if plot_dir:
            from fdpd.bench.plots import plot_runs

            dataset = next(iter(results.values()))["config"]["dataset"]
            title = f"{dataset}: " + " vs ".join(names[k] for k in plan)
            prefix = f"{plot_prefix}rate{rate:g}_" if sweep else plot_prefix
            for p in plot_runs({names[k]: rs for k, rs in records.items()}, plot_dir,
                               prefix=prefix, title=title):
                click.echo(f"wrote {p}")
    if sweep and paths and v.get("slo"):
        from fdpd.bench import slo_table

        slo_table.command.callback(
            results=paths, slos=(v["slo"],), slo_itl_stat=v["slo_itl_stat"], target=0.9,
            plot=str(Path(plot_dir) / f"{plot_prefix}slo_attainment.png") if plot_dir
            else None)


def _print_report(report: dict, results: dict[str, dict], names: dict[str, str]) -> None:
    first = next(iter(results.values()))
    click.echo(f"model: {json.dumps(report['model'])}; engine args: "
               f"{' '.join(report['engine_args']) or '-'}")
    click.echo(f"workload: {first['config']['dataset']} "
               f"{json.dumps(first['config']['workload'])}; "
               f"arrivals: {first['config']['arrival']}")
    if "slo" in first:
        click.echo(f"goodput SLO: {first['slo']['description']}")
    click.echo(format_table({names[k]: r for k, r in results.items()}))
    for cap, ratio in first.get("ideal_prefix_hit_ratio", {}).items():
        click.echo(f"ideal prefix hit ratio, one LRU of {cap} trace blocks: {ratio:.3f}")
    for k, r in results.items():
        cpu = ", ".join(f"{role} {ms:.2f}" for role, ms in r["cpu_ms_per_request"].items())
        click.echo(f"{names[k]}: CPU ms per request (all processes of a role): {cpu}")
    if "short_requests" in first:
        click.echo("")
        click.echo(format_table({names[k]: r["short_requests"] for k, r in results.items()},
                                "short-prompt (decode-heavy) requests only:"))
    if "ratios" in report:
        click.echo("")
        click.echo(ratio_table(report, names))
        click.echo("")
        for k, r in report["ratios"].items():
            click.echo(f"{k}: {'-' if r is None else f'{r:.3f}'}")
