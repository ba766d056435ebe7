"""The systems ``fdpd bench compare`` runs, one after the other, under the same ``bench serve``
load: an fdpd cluster (PD or colocated ``mixed`` instances, through ``fdpd.testing.Cluster``)
or ``vllm serve`` (:mod:`fdpd.bench.vllm_server`). Each system starts once and serves one or
more loads (a rate sweep) in turn; each load returns the ``bench serve`` result plus the CPU
its processes spent per request.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import click

from fdpd.bench.cpu import CPUMeter
from fdpd.bench.metrics import SLO, summarize
from fdpd.bench.serve import build_workload, run_benchmark
from fdpd.bench.vllm_server import VLLMServer, VLLMSettings

log = logging.getLogger(__name__)
# The production default (the test harness's 0.2 s is for fast failure detection): heartbeats
# come from the engine loop, and on a shared 2-core machine one 512-token prefill step of the
# h512 x 8 model took long enough that the router declared the prefill dead 25 times in a
# 40-request run (bench compare, 1.5 req/s, machine load ~8).
HEARTBEAT_INTERVAL = 0.5


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


def run_fdpd_system(name: str, counts: tuple[int, int, int], model: str,
                    engine_args: list[str], role_args: dict[str, list[str]], loads: list[dict],
                    log_dir: Path | None, progress: bool) -> list[tuple[dict, list]]:
    """A router + ``counts`` = (prefill, decode, mixed) instances, one torch thread each,
    started once and run under each of ``loads`` in turn (a rate sweep)."""
    from fdpd.testing import Cluster
    from fdpd.testing.harness import ClusterError

    cluster = Cluster(*counts, model=model, common_args=engine_args,
                      prefill_args=role_args["prefill"], decode_args=role_args["decode"],
                      mixed_args=role_args["mixed"],
                      log_dir=(log_dir / name) if log_dir else None, startup_timeout=180,
                      quiescent_timeout=60, heartbeat_interval=HEARTBEAT_INTERVAL)
    click.echo(f"[{name}] starting router + {counts[0]} prefill + {counts[1]} decode + "
               f"{counts[2]} mixed", err=True)
    cluster.start()
    runs = []
    try:
        for v in loads:
            workload = build_workload(v)
            meter = CPUMeter([("router", cluster.router.pid)]
                             + [(p.role, p.pid) for p in cluster.processes])
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
            quiescent = True
            try:
                cluster.assert_quiescent()
            except ClusterError as e:
                quiescent = False
                log.warning("[%s] not quiescent after the run: %s", name,
                            str(e).splitlines()[0])
            result["cluster"] = {"prefill": counts[0], "decode": counts[1],
                                 "mixed": counts[2], "quiescent_after_run": quiescent,
                                 "instances": cluster.cluster()["instances"]}
            split_by_prompt(result, records, workload.name, v)
            runs.append((result, records))
    finally:
        cluster.close(check=False)
    return runs


def run_vllm_system(name: str, settings: VLLMSettings, model: str, loads: list[dict],
                    log_dir: Path | None, progress: bool) -> list[tuple[dict, list]]:
    """``vllm serve`` on ``model``, started once (minutes: it compiles) and run under each of
    ``loads`` in turn; its CPU is the API server's and the engine core's (the process tree)."""
    log_path = (log_dir if log_dir else Path(tempfile.mkdtemp(prefix="fdpd-vllm-"))) / name \
        / "vllm.log"
    server = VLLMServer(settings, model, log_path)
    click.echo(f"[{name}] starting vllm serve (OMP threads bound to {settings.threads_bind}, "
               f"log {log_path})", err=True)
    server.start()
    runs = []
    try:
        for v in loads:
            workload = build_workload(v)
            meter = CPUMeter([("vllm", server.pid)])
            result, records = run_benchmark(server.base_url, v, workload, model=None,
                                            progress=progress)
            result["cpu_ms_per_request"] = meter.per_request_ms(result["completed"])
            result["server"] = {"vllm": " ".join(settings.command(model, server.port)),
                                "threads_bind": settings.threads_bind,
                                "kvcache_gib": settings.kvcache_gib}
            split_by_prompt(result, records, workload.name, v)
            runs.append((result, records))
    finally:
        server.close()
    return runs


def split_by_prompt(result: dict, records: list, workload_name: str, v: dict) -> None:
    """Interference load: the short-prompt (decode-heavy) and long-prompt requests apart."""
    if workload_name == "interference":
        slo = SLO.parse(v["slo"], v["slo_itl_stat"])
        result["short_requests"] = summarize([r for r in records if not r.long_prompt], slo)
        result["long_requests"] = summarize([r for r in records if r.long_prompt], slo)
