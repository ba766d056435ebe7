"""``fdpd bench overload``: a burst far past capacity against a local cluster. How much is
refused (429/503) and how fast, how much memory the processes take, how soon service is normal
again.

One cluster (``fdpd.testing.Cluster``, 1 P + 1 D by default, ``--cost-model`` so that capacity
comes from the configured step costs rather than from whatever else runs on the machine), two
loads from the ``bench serve`` load generator (``fdpd.bench.loadgen``, streaming requests):

1. capacity: a closed loop of ``--concurrency`` clients for ``--capacity-seconds``; capacity =
   completed requests per second.
2. one open-loop schedule (evenly spaced arrivals): a probe load at ``--probe-factor`` x
   capacity throughout, and on top of it, after ``--baseline-seconds``, a burst at
   ``--burst-factor`` x capacity for ``--burst-seconds``; then ``--recovery-seconds`` of probe
   load alone.

3. refusal cost: every admission seat held by a connection that sent headers and no body,
   ``--refusals`` requests one after the other: the router's CPU time per 429 (``/proc``) and
   the latency of a 429 on an otherwise idle client.

Reported: per phase, the share of 200 / 429 / 503 / other answers; how fast answers come back
(p50/p99, sent -> answer, as the load generator sees it: a client that falls behind its
schedule, e.g. on a machine busy with other work, inflates them; the largest send lag and the
client's CPU time say whether it did); the probe's baseline latency (p50 end to end, before the
burst); the time to recover: from the burst's end to the start of the first probe request from
which every probe request succeeded within 2x that baseline; each process's peak RSS (VmHWM)
and its growth during the open-loop run; the peaks of the router's admission seats, its
requests in flight and the instances' queues (``/v1/cluster`` sampled every 100 ms).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import resource
import shlex
import socket
import statistics
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import click
import httpx

from fdpd.bench import datasets
from fdpd.bench.loadgen import LoadConfig, LoadGenerator
from fdpd.bench.metrics import RequestRecord

log = logging.getLogger(__name__)
_STATUS = re.compile(r"^HTTP (\d{3}):")
PHASES = ("baseline", "burst", "after")


# ---------------------------------------------------------------------- measurements
def vm_kib(pid: int, key: str) -> int | None:
    """``VmHWM`` (peak RSS) or ``VmRSS`` of a process in KiB (Linux /proc; None if gone)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def status_of(record: RequestRecord) -> str:
    """"200", the HTTP status of a refusal ("429", "503", ...), or "other" (a broken stream,
    a transport error)."""
    if record.ok:
        return "200"
    m = _STATUS.match(record.error)
    return m.group(1) if m else "other"


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1)]


@dataclass
class ClusterSampler:
    """Polls the router's ``/v1/cluster`` from a thread: the peaks of the router's admission
    seats and requests in flight, and of each instance's queue as its bound counts it (the
    instances' load reports come with their heartbeats, so a queue that fills and empties
    between two heartbeats is missed)."""

    base_url: str
    interval: float = 0.1
    peaks: Counter = field(default_factory=Counter)
    samples: int = 0
    failures: int = 0

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cluster-sampler", daemon=True)

    def start(self) -> ClusterSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        with httpx.Client(base_url=self.base_url, timeout=5) as http:
            while not self._stop.wait(self.interval):
                try:
                    view = http.get("/v1/cluster").json()
                except (httpx.HTTPError, ValueError):
                    self.failures += 1
                    continue
                self.samples += 1
                router = view["router"]
                self._peak("router_held", router.get("admission", {}).get("held", 0))
                self._peak("router_inflight", router["inflight"])
                for inst in view["instances"]:
                    name, role = inst["instance_id"], inst["role"]
                    waiting = inst.get("waiting") or 0
                    if role == "prefill":          # what its queue bound counts
                        self._peak(f"{name} not yet prefilled",
                                   waiting + (inst.get("running") or 0))
                    elif role == "mixed":
                        self._peak(f"{name} waiting", waiting)
                    else:
                        self._peak(f"{name} grant requests waiting",
                                   inst.get("waiting_allocs") or 0)

    def _peak(self, key: str, value: int) -> None:
        self.peaks[key] = max(self.peaks[key], int(value))


# ---------------------------------------------------------------------- the two loads
def measure_capacity(base_url: str, *, concurrency: int, seconds: float, prompt_len: int,
                     output_len: int, vocab: int, seed: int) -> dict:
    """Completed requests/s of a closed loop: ``concurrency`` clients, each sending its next
    request when the last one ended, none starting after ``seconds``."""
    turns_each = int(seconds * 50) + 1             # more than any client can send in time
    pool = datasets.random_dataset(concurrency * turns_each, prompt_len, output_len,
                                   vocab=vocab, seed=seed).sessions
    sessions = [datasets.Session([s.turns[0] for s in pool[i::concurrency]])
                for i in range(concurrency)]
    cfg = LoadConfig(base_url, max_duration=seconds, request_timeout=120.0, warmup=4,
                     warmup_prompt_len=prompt_len, vocab=vocab, seed=seed)
    records = asyncio.run(LoadGenerator(cfg, datasets.Workload("closed-loop", sessions)).run())
    ok = [r for r in records if r.ok]
    duration = max((r.end for r in ok), default=0.0)
    if not ok or duration <= 0:
        errors = Counter(r.error for r in records if not r.ok).most_common(3)
        raise click.ClickException(f"the capacity run completed no request: {errors}")
    return {"requests_per_s": len(ok) / duration, "completed": len(ok),
            "failed": len(records) - len(ok), "duration_s": duration,
            "concurrency": concurrency, "e2e_p50_ms": 1e3 * statistics.median(
                r.e2e for r in ok)}


@dataclass(frozen=True)
class Schedule:
    """Send offsets (s) in order, and which load each request belongs to."""

    offsets: list[float]
    kinds: list[str]                  # "probe" | "burst"
    burst_start: float
    burst_end: float

    @classmethod
    def build(cls, probe_rate: float, burst_rate: float, baseline_s: float, burst_s: float,
              recovery_s: float) -> Schedule:
        end = baseline_s + burst_s + recovery_s
        probes = [i / probe_rate for i in range(int(end * probe_rate))]
        burst = [baseline_s + i / burst_rate for i in range(int(burst_s * burst_rate))]
        merged = sorted([(t, "probe") for t in probes] + [(t, "burst") for t in burst])
        return cls([t for t, _ in merged], [k for _, k in merged], baseline_s,
                   baseline_s + burst_s)

    def phase(self, offset: float) -> str:
        if offset < self.burst_start:
            return "baseline"
        return "burst" if offset < self.burst_end else "after"


def run_open_loop(base_url: str, schedule: Schedule, *, prompt_len: int, output_len: int,
                  vocab: int, seed: int) -> tuple[list[RequestRecord], dict[int, float], float]:
    """Send the schedule; returns the records, when each request's answer ended (seconds from
    the generator's t0; refusals included, which the records leave without an end), and the
    largest lag of a send behind its schedule."""
    workload = datasets.random_dataset(len(schedule.offsets), prompt_len, output_len,
                                       vocab=vocab, seed=seed + 1)
    answered: dict[int, float] = {}
    cfg = LoadConfig(base_url, offsets=tuple(schedule.offsets),
                     max_duration=schedule.offsets[-1] + 1, request_timeout=120.0,
                     vocab=vocab, seed=seed)

    def done(record: RequestRecord) -> None:
        answered[record.index] = time.perf_counter() - gen.t0

    gen = LoadGenerator(cfg, workload, on_done=done)
    records = asyncio.run(gen.run())
    lag = max((r.start - schedule.offsets[r.index] for r in records), default=0.0)
    return records, answered, lag


def refusal_cost(cluster, requests: int) -> dict:
    """Router CPU and latency of a 429 alone: every admission seat is taken by a connection
    that sent a request's headers and never its body (the seat is taken before the body is
    read), then ``requests`` requests are sent one after the other on one connection, each
    refused; the router's CPU time over them (``/proc``) divided by their number."""
    from fdpd.bench.cpu import cpu_seconds

    http = httpx.Client(base_url=cluster.base_url, timeout=10)
    limit = http.get("/v1/cluster").json()["router"]["admission"]["limit"]
    host, port = cluster.base_url.rsplit("/", 1)[1].split(":")
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: "
            "application/json\r\nContent-Length: 64\r\n\r\n").encode()
    holders = [socket.create_connection((host, int(port))) for _ in range(limit)]
    try:
        for s in holders:
            s.sendall(head)
        cluster.wait_for(lambda: http.get("/v1/cluster").json()["router"]["admission"]
                         ["held"] == limit, 30, what="every admission seat held")
        body = {"prompt": [11, 12, 13], "max_tokens": 4}
        statuses: Counter = Counter()
        latencies = []
        before = cpu_seconds(cluster.router.pid)
        for _ in range(requests):
            start = time.perf_counter()
            statuses[http.post("/v1/completions", json=body).status_code] += 1
            latencies.append(time.perf_counter() - start)
        cpu = cpu_seconds(cluster.router.pid) - before
    finally:
        for s in holders:
            s.close()
        http.close()
    return {"requests": requests, "statuses": dict(statuses), "seats": limit,
            "router_cpu_us_per_request": 1e6 * cpu / requests,
            "latency_ms": {"p50": 1e3 * percentile(latencies, 50),
                           "p99": 1e3 * percentile(latencies, 99)}}


# ---------------------------------------------------------------------- analysis
def analyse(records: list[RequestRecord], answered: dict[int, float], schedule: Schedule
            ) -> dict:
    by_phase: dict[str, Counter] = {p: Counter() for p in PHASES}
    burst_only: Counter = Counter()
    latency: dict[str, list[float]] = {}
    errors: Counter = Counter()
    for r in records:
        status = status_of(r)
        if status != "200":
            errors[r.error[:100]] += 1
        by_phase[schedule.phase(schedule.offsets[r.index])][status] += 1
        if schedule.kinds[r.index] == "burst":
            burst_only[status] += 1
        if r.index in answered:
            latency.setdefault(status, []).append(answered[r.index] - r.start)
    probes = sorted((r for r in records if schedule.kinds[r.index] == "probe"),
                    key=lambda r: r.start)
    baseline = [r.e2e for r in probes if r.ok and schedule.phase(r.start) == "baseline"]
    base_ms = 1e3 * statistics.median(baseline) if baseline else None
    return {
        "answers_by_phase": {p: dict(c) for p, c in by_phase.items()},
        "burst_requests": dict(burst_only),
        "latency_ms": {s: {"n": len(v), "p50": 1e3 * percentile(v, 50),
                           "p99": 1e3 * percentile(v, 99)} for s, v in sorted(latency.items())},
        "probe_baseline_e2e_p50_ms": base_ms,
        "recovery": recovery(probes, schedule.burst_end, base_ms),
        "errors": dict(errors.most_common(8)),
    }


def recovery(probes: list[RequestRecord], burst_end: float, base_ms: float | None) -> dict:
    """When probe requests are back to normal: the start of the first probe after the burst
    from which every probe succeeded within 2x the baseline latency."""
    after = [r for r in probes if r.start >= burst_end]
    if base_ms is None or not after:
        return {"seconds": None, "why": "no baseline or no probe after the burst"}
    limit = 2 * base_ms / 1e3
    bad = [i for i, r in enumerate(after) if not (r.ok and r.e2e <= limit)]
    out = {"limit_ms": 1e3 * limit, "probes_after": len(after), "probes_not_ok": len(bad),
           "seconds": None}
    if not bad:
        out["seconds"] = max(0.0, after[0].start - burst_end)
    elif bad[-1] + 1 < len(after):
        out["seconds"] = after[bad[-1] + 1].start - burst_end
    else:
        out["why"] = "the last probe request was still not back to normal"
    return out


# ---------------------------------------------------------------------- the command
def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def report_text(result: dict) -> str:
    cap, run = result["capacity"], result["overload"]
    rates = result["rates"]
    lines = [f"capacity: {cap['requests_per_s']:.1f} req/s (closed loop of "
             f"{cap['concurrency']}, {cap['completed']} completed in {cap['duration_s']:.1f} s, "
             f"e2e p50 {cap['e2e_p50_ms']:.0f} ms)",
             f"open loop: probe {rates['probe']:.1f} req/s throughout; burst "
             f"{rates['burst']:.1f} req/s for {result['config']['burst_seconds']:g} s after "
             f"{result['config']['baseline_seconds']:g} s; largest send lag "
             f"{run['send_lag_s'] * 1e3:.0f} ms, client CPU {run['client_cpu_s']:.1f} s in "
             f"{run['wall_s']:.1f} s", ""]
    header = f"{'answers (by send time)':<26}{'sent':>7}{'200':>8}{'429':>8}{'503':>8}" \
             f"{'other':>8}"
    lines.append(header)
    rows = [(f"{p} (all)", run["answers_by_phase"][p]) for p in PHASES]
    rows.insert(2, ("burst requests only", run["burst_requests"]))
    for name, counts in rows:
        n = sum(counts.values())
        share = {k: 100 * v / n if n else 0.0 for k, v in counts.items()}
        other = sum(v for k, v in share.items() if k not in ("200", "429", "503"))
        lines.append(f"{name:<26}{n:>7}" + "".join(f"{share.get(k, 0.0):>7.1f}%"
                                                    for k in ("200", "429", "503"))
                     + f"{other:>7.1f}%")
    lines.append("")
    for status, lat in run["latency_ms"].items():
        lines.append(f"latency of {status} answers: p50 {lat['p50']:.1f} ms, p99 "
                     f"{lat['p99']:.1f} ms (n={lat['n']})")
    odd = {e: n for e, n in run["errors"].items() if not _STATUS.match(e)
           or _STATUS.match(e).group(1) not in ("429", "503")}
    if odd:
        lines.append(f"other answers: {odd}")
    rec = run["recovery"]
    lines.append(f"probe baseline e2e p50: {_fmt(run['probe_baseline_e2e_p50_ms'])} ms; time to "
                 f"recover (every later probe ok within {_fmt(rec.get('limit_ms'), '.0f')} ms): "
                 f"{_fmt(rec['seconds'], '.2f')} s after the burst"
                 + (f" ({rec['why']})" if rec.get("why") else ""))
    peaks = result["peaks"]
    cost = result["refusal_cost"]
    lines.append(f"a 429 alone (every seat held, {cost['requests']} requests one at a time): "
                 f"router CPU {cost['router_cpu_us_per_request']:.0f} us per request, latency "
                 f"p50 {cost['latency_ms']['p50']:.2f} ms, p99 {cost['latency_ms']['p99']:.2f} "
                 f"ms; answers {cost['statuses']}")
    lines.append(f"router: admission seats peak {peaks.get('router_held', 0)} of "
                 f"{result['router_admission']['limit']}, requests in flight peak "
                 f"{peaks.get('router_inflight', 0)}; "
                 + ", ".join(f"{k} peak {v}" for k, v in sorted(peaks.items())
                             if not k.startswith("router_")))
    mem = result["memory_mib"]
    lines.append("peak RSS (VmHWM, MiB; growth during the open-loop run): " + ", ".join(
        f"{name} {m['peak']:.0f} (+{m['growth']:.0f})" for name, m in mem.items()))
    lines.append(f"quiescent after the run: {result['quiescent_after_run']}")
    return "\n".join(lines)


@click.command("overload")
@click.option("--num-prefill", default=1, show_default=True)
@click.option("--num-decode", default=1, show_default=True)
@click.option("--cost-model", default="2500,25,1", show_default=True,
              help="Step costs of every engine (see `fdpd launch --help`); 'none': compute "
              "for real with --model.")
@click.option("--model", default="tiny", show_default=True,
              help="With --cost-model none: the model to run.")
@click.option("--engine-args", default="--num-kv-blocks 4096", show_default=True,
              help="Flags for every engine instance.")
@click.option("--router-args", default="", help="Flags for the router, e.g. "
              "'--max-inflight-requests 64'.")
@click.option("--prefill-args", default="", help="Flags for prefill instances, e.g. "
              "'--max-queued-requests 16'.")
@click.option("--decode-args", default="", help="Flags for decode instances.")
@click.option("--prompt-len", default=64, show_default=True)
@click.option("--output-len", default=16, show_default=True)
@click.option("--concurrency", default=16, show_default=True,
              help="Clients of the closed loop that measures capacity.")
@click.option("--capacity-seconds", default=10.0, show_default=True)
@click.option("--probe-factor", default=0.5, show_default=True,
              help="Probe load, as a multiple of the measured capacity.")
@click.option("--burst-factor", default=10.0, show_default=True,
              help="Burst load, as a multiple of the measured capacity.")
@click.option("--baseline-seconds", default=8.0, show_default=True)
@click.option("--burst-seconds", default=10.0, show_default=True)
@click.option("--recovery-seconds", default=30.0, show_default=True)
@click.option("--refusals", default=1000, show_default=True,
              help="Requests of the refusal-cost phase (router CPU per 429).")
@click.option("--seed", default=0, show_default=True)
@click.option("--json", "json_path", default=None, help="Write the result here.")
@click.option("--log-dir", default=None, help="Keep every process's log here.")
def command(num_prefill, num_decode, cost_model, model, engine_args, router_args,
            prefill_args, decode_args, prompt_len, output_len, concurrency, capacity_seconds,
            probe_factor, burst_factor, baseline_seconds, burst_seconds, recovery_seconds,
            refusals, seed, json_path, log_dir):
    """A burst at --burst-factor x capacity: refusals, their latency, memory, recovery."""
    from fdpd.bench.compare import synthetic_model
    from fdpd.bench.cpu import own_cpu as _own_cpu
    from fdpd.testing import Cluster
    from fdpd.testing.harness import ClusterError

    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = shlex.split(engine_args)
    vocab = 256
    if cost_model.lower() != "none":
        args += ["--cost-model", cost_model]
        model = synthetic_model(Path(tempfile.mkdtemp(prefix="fdpd-bench-overload-")),
                                hidden=16, layers=1, heads=2, kv_heads=1, vocab=32000,
                                max_positions=4096, config_only=True)
        vocab = 32000
    cluster = Cluster(num_prefill, num_decode, model=model, common_args=args,
                      router_args=shlex.split(router_args),
                      prefill_args=shlex.split(prefill_args),
                      decode_args=shlex.split(decode_args), log_dir=log_dir,
                      startup_timeout=180, quiescent_timeout=60)
    click.echo(f"starting router + {num_prefill} prefill + {num_decode} decode", err=True)
    cluster.start()
    try:
        procs = {"router": cluster.router.pid, **{p.name: p.pid for p in cluster.processes}}
        lengths = {"prompt_len": prompt_len, "output_len": output_len, "vocab": vocab,
                   "seed": seed}
        click.echo(f"measuring capacity ({capacity_seconds:g} s closed loop)", err=True)
        capacity = measure_capacity(cluster.base_url, concurrency=concurrency,
                                    seconds=capacity_seconds, **lengths)
        rates = {"probe": probe_factor * capacity["requests_per_s"],
                 "burst": burst_factor * capacity["requests_per_s"]}
        schedule = Schedule.build(rates["probe"], rates["burst"], baseline_seconds,
                                  burst_seconds, recovery_seconds)
        rss_before = {name: vm_kib(pid, "VmRSS") for name, pid in procs.items()}
        click.echo(f"open loop: {len(schedule.offsets)} requests over "
                   f"{schedule.offsets[-1]:.0f} s", err=True)
        sampler = ClusterSampler(cluster.base_url).start()
        cpu0, wall0 = _own_cpu(), time.perf_counter()
        try:
            records, answered, lag = run_open_loop(cluster.base_url, schedule, **lengths)
        finally:
            sampler.stop()
        client_cpu, wall = _own_cpu() - cpu0, time.perf_counter() - wall0
        memory = {}
        for name, pid in procs.items():
            peak = vm_kib(pid, "VmHWM")
            if peak is not None and rss_before[name] is not None:
                memory[name] = {"peak": peak / 1024,
                                "growth": max(0, peak - rss_before[name]) / 1024}
        memory["bench client"] = {"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                  / 1024, "growth": 0.0}
        click.echo("router CPU per refusal", err=True)
        cost = refusal_cost(cluster, refusals)
        cluster.wait_for(lambda: cluster.cluster()["router"]["admission"]["held"] == 0, 30,
                         what="the seats given back")
        try:
            cluster.assert_quiescent()
            quiescent = True
        except ClusterError as e:
            quiescent = False
            log.warning("not quiescent after the run: %s", str(e).splitlines()[0])
        result = {
            "config": {"num_prefill": num_prefill, "num_decode": num_decode,
                       "cost_model": cost_model, "model": model, "engine_args": args,
                       "router_args": router_args, "prefill_args": prefill_args,
                       "decode_args": decode_args, "prompt_len": prompt_len,
                       "output_len": output_len, "baseline_seconds": baseline_seconds,
                       "burst_seconds": burst_seconds, "recovery_seconds": recovery_seconds},
            "capacity": capacity, "rates": rates,
            "overload": {**analyse(records, answered, schedule), "send_lag_s": lag,
                         "client_cpu_s": client_cpu, "wall_s": wall,
                         "requests": len(records)},
            "peaks": dict(sampler.peaks), "samples": sampler.samples,
            "router_admission": cluster.cluster()["router"].get("admission", {}),
            "memory_mib": memory, "refusal_cost": cost, "quiescent_after_run": quiescent,
        }
    finally:
        cluster.close(check=False)
    click.echo(report_text(result))
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=2, default=str))
