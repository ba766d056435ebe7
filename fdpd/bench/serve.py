"""``fdpd bench serve``: an online serving benchmark against any OpenAI-compatible endpoint.

::

    fdpd bench serve --base-url http://127.0.0.1:8000 --dataset random --num-prompts 200 \\
        --request-rate 4 --slo ttft:2000,itl:200 --json out.json --plot-dir plots/

Streams every request (``stream_options.include_usage``), times each chunk, and reports TTFT,
TPOT, ITL and E2E (mean, p50, p90, p99), request and token throughput, goodput under ``--slo``
and the prefix-cache hit ratio from ``usage.prompt_tokens_details.cached_tokens``. Definitions
are in :mod:`fdpd.bench.metrics`, datasets in :mod:`fdpd.bench.datasets`.
"""

from __future__ import annotations

import json
import math
import urllib.request
from collections.abc import Callable
from pathlib import Path

import click

from fdpd.bench import datasets
from fdpd.bench.loadgen import LoadConfig, run_load
from fdpd.bench.metrics import ITL_STATS, SLO, RequestRecord, format_table, summarize

DATASETS = ("random", "shared-prefix", "multi-turn", "interference", "mooncake", "azure")


def workload_options(fn: Callable) -> Callable:
    """The dataset and load options, shared by ``bench serve`` and ``bench compare``."""
    options = [
        click.option("--dataset", type=click.Choice(DATASETS), default="random"),
        click.option("--num-prompts", type=int, default=100,
                     help="Requests to send (trace datasets: rows read from the trace)."),
        click.option("--random-input-len", type=int, default=256,
                     help="Prompt length (shared-prefix: suffix; multi-turn: tokens per turn)."),
        click.option("--random-output-len", type=int, default=64, help="Output length."),
        click.option("--random-range-ratio", type=float, default=0.0,
                     help="Lengths uniform in [len*(1-r), len*(1+r)]."),
        click.option("--prefix-len", type=int, default=512, help="shared-prefix: prefix tokens."),
        click.option("--num-groups", type=int, default=4, help="shared-prefix: prefixes."),
        click.option("--num-turns", type=int, default=4, help="multi-turn: turns per session."),
        click.option("--long-prompt-len", type=int, default=2048,
                     help="interference: long prompt tokens."),
        click.option("--long-output-len", type=int, default=8,
                     help="interference: output tokens of a long prompt."),
        click.option("--long-fraction", type=float, default=0.1,
                     help="interference: share of requests with a long prompt."),
        click.option("--trace", "trace_path", type=click.Path(dir_okay=False), default=None,
                     help="mooncake/azure: trace file (default: the conversation trace in "
                     "shared/data/traces)."),
        click.option("--trace-offset", type=int, default=0, help="Trace rows to skip."),
        click.option("--length-scale", type=float, default=1.0,
                     help="mooncake/azure: factor on input lengths."),
        click.option("--block-scale", type=float, default=None,
                     help="mooncake: factor on the 512-token hash block (default: "
                     "--length-scale, which keeps the trace's prefix reuse)."),
        click.option("--output-scale", type=float, default=None,
                     help="mooncake/azure: factor on output lengths (default: --length-scale)."),
        click.option("--ideal-cache-blocks", type=int, multiple=True,
                     help="mooncake: also report the ideal prefix hit ratio of one LRU cache "
                     "of this many trace blocks (512 tokens before scaling) over the replayed "
                     "rows (repeatable; 0 = unbounded)."),
        click.option("--max-input-len", type=int, default=None,
                     help="Cut longer prompts to this many tokens (keeps their prefix)."),
        click.option("--vocab-size", type=int, default=32000,
                     help="Token ids are drawn from [10, vocab-size)."),
        click.option("--seed", type=int, default=0),
        click.option("--request-rate", type=float, default=math.inf,
                     help="Poisson arrival rate (req/s); inf: all at once."),
        click.option("--burstiness", type=float, default=1.0,
                     help="Gamma shape of the gaps: 1 Poisson, <1 burstier, >1 smoother."),
        click.option("--max-concurrency", type=int, default=None,
                     help="Most requests in flight."),
        click.option("--arrival", type=click.Choice(["auto", "poisson", "trace"]),
                     default="auto", help="auto: trace times for mooncake/azure unless "
                     "--request-rate is given, else Poisson."),
        click.option("--speedup", type=float, default=1.0,
                     help="Trace arrivals: divide the trace's times by this."),
        click.option("--max-duration", type=float, default=600.0,
                     help="Start no request after this many seconds."),
        click.option("--request-timeout", type=float, default=300.0,
                     help="Deadline of one request (s)."),
        click.option("--warmup", type=int, default=2,
                     help="Short unrecorded requests (own prompts) before the run."),
        click.option("--temperature", type=float, default=0.0),
        click.option("--ignore-eos/--no-ignore-eos", default=True,
                     help="Generate exactly the output length (vLLM extension)."),
        click.option("--slo", default=None, help="Goodput SLO in ms: ttft:MS,itl:MS[,tpot:MS]"
                     "[,e2e:MS]."),
        click.option("--slo-itl-stat", type=click.Choice(ITL_STATS), default="max",
                     help="Which of a request's own ITLs is held against the itl SLO (max: "
                     "every gap)."),
    ]
    for opt in reversed(options):
        fn = opt(fn)
    return fn


def build_workload(v: dict) -> datasets.Workload:
    name, n, vocab, seed = v["dataset"], v["num_prompts"], v["vocab_size"], v["seed"]
    ilen, olen, ratio = v["random_input_len"], v["random_output_len"], v["random_range_ratio"]
    if name == "random":
        return datasets.random_dataset(n, ilen, olen, ratio, vocab, seed)
    if name == "shared-prefix":
        return datasets.shared_prefix_dataset(n, v["num_groups"], v["prefix_len"], ilen, olen,
                                              ratio, vocab, seed)
    if name == "multi-turn":
        return datasets.multi_turn_dataset(n, v["num_turns"], ilen, olen, ratio, vocab, seed)
    if name == "interference":
        return datasets.interference_dataset(n, ilen, v["long_prompt_len"], olen,
                                             v["long_output_len"], v["long_fraction"], vocab,
                                             seed)
    path = v["trace_path"] or datasets.default_trace(name)
    if name == "mooncake":
        block = v["block_scale"] if v["block_scale"] is not None else v["length_scale"]
        return datasets.mooncake_dataset(path, n, v["length_scale"], block, v["output_scale"],
                                         vocab, v["trace_offset"], v["max_input_len"])
    return datasets.azure_dataset(path, n, v["length_scale"], v["output_scale"], vocab,
                                  v["trace_offset"], v["max_input_len"], seed)


def session_offsets(workload: datasets.Workload, v: dict) -> tuple[tuple[float, ...], str]:
    arrival = v["arrival"]
    has_times = all(s.arrival is not None for s in workload.sessions)
    if arrival == "trace" or (arrival == "auto" and has_times and math.isinf(v["request_rate"])):
        offsets = datasets.trace_offsets(workload.sessions, v["speedup"])
        return tuple(offsets), f"trace timestamps / speedup {v['speedup']:g}"
    offsets = datasets.poisson_offsets(len(workload.sessions), v["request_rate"],
                                       v["burstiness"], v["seed"])
    return tuple(offsets), (f"gamma arrivals, rate {v['request_rate']:g} req/s, burstiness "
                            f"{v['burstiness']:g}")


def load_config(base_url: str, v: dict, offsets: tuple[float, ...], **kw) -> LoadConfig:
    return LoadConfig(base_url=base_url, offsets=offsets, max_concurrency=v["max_concurrency"],
                      max_duration=v["max_duration"], request_timeout=v["request_timeout"],
                      ignore_eos=v["ignore_eos"], temperature=v["temperature"],
                      warmup=v["warmup"], vocab=v["vocab_size"], seed=v["seed"], **kw)


def cluster_stats(base_url: str) -> dict | None:
    """fdpd's /v1/cluster, summed over instances (None for other servers)."""
    try:
        with urllib.request.urlopen(base_url.rstrip("/") + "/v1/cluster", timeout=5) as r:
            view = json.load(r)
    except (OSError, ValueError):
        return None
    if not isinstance(view, dict) or "instances" not in view:
        return None
    return {"router": view.get("router"), "instances": [
        {k: i.get(k) for k in ("instance_id", "role", "num_preemptions", "num_blocks",
                               "kv_dropped", "transfer_failures") if k in i}
        for i in view["instances"]]}


def run_benchmark(base_url: str, v: dict, workload: datasets.Workload, *, model: str | None,
                  endpoint: str = "completions", api_key: str | None = None,
                  progress: bool = True) -> tuple[dict, list[RequestRecord]]:
    """One ``bench serve`` run: returns (result dict, per-request records)."""
    slo = SLO.parse(v["slo"], v["slo_itl_stat"])
    offsets, arrival_desc = session_offsets(workload, v)
    cfg = load_config(base_url, v, offsets, endpoint=endpoint, model=model, api_key=api_key)
    records, duration = run_load(cfg, workload, progress)
    if workload.name == "interference":
        longs = _long_indices(workload)
        for r in records:
            r.long_prompt = r.index in longs
    result = summarize(records, slo)
    result["benchmark_duration_s"] = duration
    result["config"] = {"base_url": base_url, "endpoint": endpoint, "dataset": workload.name,
                        "num_requests": workload.num_requests, "arrival": arrival_desc,
                        "max_concurrency": v["max_concurrency"], "ignore_eos": v["ignore_eos"],
                        "temperature": v["temperature"], "seed": v["seed"],
                        "workload": workload.notes}
    result["not_sent"] = workload.num_requests - len(records)
    if workload.name == "mooncake" and v.get("ideal_cache_blocks"):
        n = workload.notes
        rows = datasets.read_mooncake(n["trace"], n["offset"], len(records))
        result["ideal_prefix_hit_ratio"] = {
            str(c or "unbounded"): datasets.ideal_prefix_hit_ratio(rows, c or None)
            for c in v["ideal_cache_blocks"]}
    return result, records


def _long_indices(workload: datasets.Workload) -> set[int]:
    long_len = workload.notes.get("long_prompt_len")
    return {i for i, s in enumerate(workload.sessions) if len(s.turns[0].prompt_ids) == long_len}


def request_rows(records: list[RequestRecord]) -> list[dict]:
    """Per-request timings (seconds) for JSON: enough to recompute any SLO offline."""
    return [{"start": r.start, "ok": r.ok, "error": r.error, "ttft": r.ttft, "e2e": r.e2e,
             "itls": r.itls, "prompt_tokens": r.prompt_tokens, "output_tokens": r.output_tokens,
             "cached_tokens": r.cached_tokens, "long_prompt": r.long_prompt} for r in records]


def write_json(path: str, obj: dict, records: list[RequestRecord] | None = None) -> None:
    if records is not None:
        obj = {**obj, "requests": request_rows(records)}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=2, default=str))


@click.command("serve")
@click.option("--base-url", default="http://127.0.0.1:8000", show_default=True,
              help="The server (scheme://host:port, without /v1).")
@click.option("--endpoint", type=click.Choice(["completions", "chat"]), default="completions",
              show_default=True, help="completions sends token-id prompts; chat sends text "
              "messages standing in for them.")
@click.option("--model", default=None, help="Model name (default: the first of /v1/models).")
@click.option("--api-key", default=None, envvar="OPENAI_API_KEY")
@workload_options
@click.option("--json", "json_path", default=None, help="Write the result here.")
@click.option("--save-requests", is_flag=True, help="Include per-request timings in --json.")
@click.option("--plot-dir", default=None, help="Write latency CDF and ITL-over-time PNGs here.")
@click.option("--label", default="run", show_default=True, help="Name of the run in plots.")
@click.option("--progress/--no-progress", default=True, show_default=True)
def command(base_url, endpoint, model, api_key, json_path, save_requests, plot_dir, label,
            progress, **v):
    """Online serving benchmark against any OpenAI-compatible endpoint."""
    try:
        workload = build_workload(v)
        SLO.parse(v["slo"], v["slo_itl_stat"])
    except (ValueError, OSError) as e:
        raise click.ClickException(str(e)) from None
    result, records = run_benchmark(base_url, v, workload, model=model, endpoint=endpoint,
                                    api_key=api_key, progress=progress)
    server = cluster_stats(base_url)
    if server is not None:
        result["server"] = server
    click.echo(f"workload: {workload.name} {json.dumps(workload.notes)}")
    click.echo(f"arrivals: {result['config']['arrival']}; max concurrency "
               f"{v['max_concurrency'] or 'unbounded'}")
    if "slo" in result:
        click.echo(f"goodput SLO: {result['slo']['description']}")
    click.echo(format_table({label: result}))
    for cap, ratio in result.get("ideal_prefix_hit_ratio", {}).items():
        click.echo(f"ideal prefix hit ratio, one LRU of {cap} trace blocks: {ratio:.3f}")
    if result["errors"]:
        click.echo(f"errors: {result['errors']}")
    if json_path:
        write_json(json_path, result, records if save_requests else None)
    if plot_dir:
        from fdpd.bench.plots import plot_runs

        for p in plot_runs({label: records}, plot_dir, title=f"{workload.name}, {label}"):
            click.echo(f"wrote {p}")
