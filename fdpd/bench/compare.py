"""``fdpd bench compare``: PD disaggregation vs. colocated serving, same load, one run.

Starts on this machine a PD cluster (router + ``--num-prefill`` P + ``--num-decode`` D) and a
colocated one with as many engine processes (router + ``--num-mixed`` mixed), one after the
other, each with the same model, engine flags and router, runs the same ``bench serve``
workload against each, and prints the two results side by side with the ratios that matter:
p99 ITL PD / colocated (interference of prefills with decodes) and goodput PD / colocated.

Every process gets one torch thread (``fdpd.testing.Cluster``). The default model is a
synthetic Llama written to a temporary directory (``--hidden``/``--layers``/...).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shlex
import tempfile
from pathlib import Path

import click

from fdpd.bench.metrics import format_table, summarize
from fdpd.bench.serve import (
    build_workload,
    request_rows,
    run_benchmark,
    workload_options,
    write_json,
)

log = logging.getLogger(__name__)


def synthetic_model(directory: Path, hidden: int, layers: int, heads: int, kv_heads: int,
                    vocab: int, max_positions: int, config_only: bool = False) -> str:
    """Write a synthetic checkpoint (or, for cost-model runs, only its config.json)."""
    from fdpd.model.synthetic import synthetic_config, write_checkpoint

    cfg = synthetic_config("llama", hidden=hidden, layers=layers, vocab=vocab, heads=heads,
                           kv_heads=kv_heads, max_positions=max_positions)
    if config_only:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2))
        return str(directory)
    return str(write_checkpoint(directory, cfg, seed=0))


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU time of a process so far (Linux /proc; None elsewhere or if gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError, TypeError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _own_cpu() -> float:
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


class CPUMeter:
    """CPU seconds each cluster process (and this client) spends during a run, per role: a
    cost per request that does not depend on what else the machine is running."""

    def __init__(self, cluster):
        self.procs = [("router", cluster.router.pid)] + [(p.role, p.pid)
                                                         for p in cluster.processes]
        self.start = [cpu_seconds(pid) for _, pid in self.procs]
        self.client = _own_cpu()

    def per_request_ms(self, requests: int) -> dict[str, float | None]:
        out: dict[str, float] = {}
        for (role, pid), before in zip(self.procs, self.start):
            after = cpu_seconds(pid)
            if before is not None and after is not None:
                out[role] = out.get(role, 0.0) + after - before
        out["client"] = _own_cpu() - self.client
        n = max(1, requests)
        return {role: 1e3 * sec / n for role, sec in out.items()}


def router_ttft(cluster) -> tuple[float, int]:
    """(sum of seconds, count) of the router's own TTFT histogram (handler entry -> first token
    at the router): what it adds is client TTFT minus this."""
    total, count = 0.0, 0
    for line in cluster.metrics().splitlines():
        if line.startswith("fdpd:time_to_first_token_seconds_sum"):
            total = float(line.split()[-1])
        elif line.startswith("fdpd:time_to_first_token_seconds_count"):
            count = int(float(line.split()[-1]))
    return total, count


def run_system(name: str, counts: tuple[int, int, int], model: str, engine_args: list[str],
               role_args: dict[str, list[str]], v: dict, log_dir: Path | None,
               progress: bool) -> tuple[dict, list]:
    from fdpd.testing import Cluster
    from fdpd.testing.harness import ClusterError

    workload = build_workload(v)
    cluster = Cluster(*counts, model=model, common_args=engine_args,
                      prefill_args=role_args["prefill"], decode_args=role_args["decode"],
                      mixed_args=role_args["mixed"],
                      log_dir=(log_dir / name) if log_dir else None, startup_timeout=180,
                      quiescent_timeout=60)
    click.echo(f"[{name}] starting router + {counts[0]} prefill + {counts[1]} decode + "
               f"{counts[2]} mixed", err=True)
    cluster.start()
    quiescent = True
    try:
        meter = CPUMeter(cluster)
        ttft0 = router_ttft(cluster)
        result, records = run_benchmark(cluster.base_url, v, workload, model=None,
                                        progress=progress)
        ttft1 = router_ttft(cluster)
        if ttft1[1] > ttft0[1]:
            # Includes the few warm-up requests (sent before the run's own).
            result["router_side_ttft_mean_ms"] = (1e3 * (ttft1[0] - ttft0[0])
                                                  / (ttft1[1] - ttft0[1]))
        # Includes the warm-up requests (a few) and the client's own work.
        result["cpu_ms_per_request"] = meter.per_request_ms(result["completed"])
        try:
            cluster.assert_quiescent()
        except ClusterError as e:
            quiescent = False
            log.warning("[%s] not quiescent after the run: %s", name, str(e).splitlines()[0])
        result["cluster"] = {"prefill": counts[0], "decode": counts[1], "mixed": counts[2],
                             "quiescent_after_run": quiescent,
                             "instances": cluster.cluster()["instances"]}
    finally:
        cluster.close(check=False)
    if workload.name == "interference":
        result["short_requests"] = summarize([r for r in records if not r.long_prompt],
                                             _slo(v))
        result["long_requests"] = summarize([r for r in records if r.long_prompt], _slo(v))
    return result, records


def _slo(v: dict):
    from fdpd.bench.metrics import SLO

    return SLO.parse(v["slo"], v["slo_itl_stat"])


def ratios(pd: dict, co: dict) -> dict:
    def ratio(a, b):
        return a / b if a is not None and b else None

    out = {"p99_itl_pd_over_colocated": ratio(pd["itl_ms"]["p99"], co["itl_ms"]["p99"]),
           "p99_ttft_pd_over_colocated": ratio(pd["ttft_ms"]["p99"], co["ttft_ms"]["p99"]),
           "p99_tpot_pd_over_colocated": ratio(pd["tpot_ms"]["p99"], co["tpot_ms"]["p99"]),
           "throughput_pd_over_colocated": ratio(pd["output_throughput"],
                                                 co["output_throughput"])}
    if "goodput" in pd and "goodput" in co:
        out["goodput_pd_over_colocated"] = ratio(pd["goodput"], co["goodput"])
    return out


@click.command("compare")
@click.option("--model", default=None, help="Model directory (default: a synthetic Llama of "
              "the shape below, written to a temporary directory).")
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
@click.option("--order", type=click.Choice(["pd-first", "colocated-first"]), default="pd-first",
              show_default=True)
@click.option("--systems", type=click.Choice(["both", "pd", "colocated"]), default="both",
              show_default=True, help="Run only one of the two clusters (no ratios then).")
@workload_options
@click.option("--json", "json_path", default=None, help="Write both results and the ratios.")
@click.option("--save-requests", is_flag=True, help="Include per-request timings in --json.")
@click.option("--plot-dir", default=None, help="Write overlaid CDF / ITL-over-time PNGs here.")
@click.option("--plot-prefix", default="compare_", show_default=True)
@click.option("--log-dir", default=None, help="Keep every process's log here.")
@click.option("--progress/--no-progress", default=True, show_default=True)
def command(model, hidden, layers, heads, kv_heads, vocab, max_positions, num_prefill,
            num_decode, num_mixed, engine_args, prefill_args, decode_args, mixed_args, order,
            systems, json_path, save_requests, plot_dir, plot_prefix, log_dir, progress, **v):
    """PD (P + D) vs. colocated (mixed) clusters under the same `bench serve` load."""
    try:
        build_workload(v)
        _slo(v)
    except (ValueError, OSError) as e:
        raise click.ClickException(str(e)) from None
    args = shlex.split(engine_args)
    role_args = {"prefill": shlex.split(prefill_args), "decode": shlex.split(decode_args),
                 "mixed": shlex.split(mixed_args)}
    tmp = Path(tempfile.mkdtemp(prefix="fdpd-bench-compare-"))
    if model is None:
        model = synthetic_model(tmp / "model", hidden, layers, heads, kv_heads, vocab,
                                max_positions, config_only="--cost-model" in args)
        model_desc = {"synthetic": True, "hidden": hidden, "layers": layers, "heads": heads,
                      "kv_heads": kv_heads, "vocab": vocab}
    else:
        model_desc = {"path": model}
    names = {"pd": f"PD {num_prefill}P+{num_decode}D", "colocated": f"colocated {num_mixed}x "
             "mixed"}
    plan = [("pd", (num_prefill, num_decode, 0)), ("colocated", (0, 0, num_mixed))]
    if order == "colocated-first":
        plan.reverse()
    results, records = {}, {}
    for name, counts in plan:
        if systems in ("both", name):
            results[name], records[name] = run_system(
                name, counts, model, args, role_args, v, Path(log_dir) if log_dir else None,
                progress)
    report = {"model": model_desc, "engine_args": args, "role_args": role_args,
              "order": order, **results}
    if len(results) == 2:
        report["ratios"] = ratios(results["pd"], results["colocated"])
    first = next(iter(results.values()))
    click.echo(f"model: {json.dumps(model_desc)}; engine args: {' '.join(args) or '-'}")
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
    click.echo("")
    for k, r in report.get("ratios", {}).items():
        click.echo(f"{k}: {'-' if r is None else f'{r:.3f}'}")
    if json_path:
        if save_requests:
            for k, rs in records.items():
                report[k] = {**report[k], "requests": request_rows(rs)}
        write_json(json_path, report)
    if plot_dir:
        from fdpd.bench.plots import plot_runs

        dataset = first["config"]["dataset"]
        title = f"{dataset}: PD vs colocated" if len(results) == 2 else dataset
        for p in plot_runs({names[k]: rs for k, rs in records.items()}, plot_dir,
                           prefix=plot_prefix, title=title):
            click.echo(f"wrote {p}")
