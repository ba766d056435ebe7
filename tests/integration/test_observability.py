"""Metrics, per-request timelines and structured logs of a real PD cluster under traffic that
preempts, restores from a KV store, defers grants and gets refused.

The decodes have small pools and a short reserve horizon, so they preempt and restore from a
disk store; the prefill's store is a Redis URL where nothing listens, so its lookups fail (KV
store errors and misses); one request is too large for a decode's pool (a refused grant).
Every metric the operator guide names must exist and move, on the router's ``/metrics`` and on
the instances' own endpoints; every Grafana panel's metric must exist.
"""

from __future__ import annotations

import json
import random
import re
import threading
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

import fdpd
from fdpd import LLM, SamplingParams
from fdpd.router.timeline import PHASES
from fdpd.testing import Cluster, complete, free_port

pytestmark = pytest.mark.timeout(120)

GREEDY = {"temperature": 0, "ignore_eos": True, "return_token_ids": True}
DASHBOARD = Path(fdpd.__file__).resolve().parent.parent / "deploy/grafana/fdpd-dashboard.json"
PD_PHASES = ("router_queue", "prefill_queue", "prefill", "grant_wait", "kv_transfer",
             "decode_queue", "decode")
# Router /metrics: name -> label filter that must reach a value > 0 (histograms: _count).
ROUTER_MOVES = {
    "fdpd:time_to_first_token_seconds": "", "fdpd:inter_token_latency_seconds": "",
    "fdpd:e2e_request_latency_seconds": "",
    **{f"fdpd:request_phase_seconds/{p}": f'phase="{p}"' for p in PHASES},
    "fdpd:num_requests_running": "", "fdpd:num_requests_waiting": "",
    "fdpd:kv_cache_usage_perc": "", "fdpd:prefix_cache_hits_total": "",
    "fdpd:prefix_cache_queries_total": "", "fdpd:num_preemptions_total": "",
    "fdpd:kv_transfer_bytes_total/sent": 'direction="sent"',
    "fdpd:kv_transfer_bytes_total/received": 'direction="received"',
    "fdpd:grants_total/granted": 'result="granted"',
    "fdpd:grants_total/deferred": 'result="deferred"',
    "fdpd:grants_total/rejected": 'result="rejected"',
    "fdpd:reserved_blocks": "",
    "fdpd:kv_store_hits_total": "", "fdpd:kv_store_misses_total": "",
    "fdpd:kv_store_lookups_total": "",
    "fdpd:kv_store_bytes_total/write": 'op="write"',
    "fdpd:kv_store_bytes_total/restore": 'op="restore"',
    "fdpd:kv_store_errors_total": 'kind="error"',
    "fdpd:kv_store_write_seconds": "", "fdpd:kv_store_restore_seconds": "",
    "fdpd:num_restores_total": "", "fdpd:restored_tokens_total": "",
    "fdpd:recomputed_tokens_total": "",
}
# Present, but only moves for a blink here: a grant is pending while its prefill computes.
# The lease tests (test_pd_cluster.py) freeze a prefill holding a grant and check that it
# shows as pending, and then as expired, in /metrics.
ROUTER_EXISTS = ("fdpd:pending_grants", "fdpd:num_allocs_waiting", "fdpd:headroom_blocks",
                 "fdpd:instance_healthy", "fdpd:kv_transfer_failures_total")
# Each instance's own /metrics, by role.
INSTANCE_MOVES = {
    "prefill": ["fdpd:time_to_first_token_seconds", "fdpd:e2e_request_latency_seconds",
                "fdpd:kv_transfer_seconds", "fdpd:request_phase_seconds",
                "fdpd:prefix_cache_queries_total", "fdpd:kv_transfer_bytes_total",
                "fdpd:kv_store_errors_total", "fdpd:kv_store_misses_total",
                "fdpd:computed_prompt_tokens_total"],
    "decode": ["fdpd:inter_token_latency_seconds", "fdpd:e2e_request_latency_seconds",
               "fdpd:kv_transfer_seconds", "fdpd:grant_wait_seconds",
               "fdpd:request_phase_seconds", "fdpd:kv_store_write_seconds",
               "fdpd:kv_store_restore_seconds", "fdpd:num_preemptions_total",
               "fdpd:grants_total", "fdpd:kv_cache_usage_perc", "fdpd:num_requests_running",
               "fdpd:kv_transfer_bytes_total", "fdpd:kv_store_hits_total"],
}
SAMPLE = re.compile(r"^(fdpd:[a-z0-9_]+?)(_bucket|_sum|_count)?(\{[^}]*\})? (\S+)$")


def samples(text: str) -> list[tuple[str, str, str, float]]:
    out = []
    for line in text.splitlines():
        m = SAMPLE.match(line)
        if m:
            out.append((m.group(1), m.group(2) or "", m.group(3) or "", float(m.group(4))))
    return out


def peak(text: str, peaks: dict) -> None:
    """Record the largest value seen per (name, suffix, labels)."""
    for name, suffix, labels, value in samples(text):
        key = (name, suffix, labels)
        peaks[key] = max(peaks.get(key, 0.0), value)


def moved(peaks: dict, name: str, label: str = "") -> bool:
    for (n, suffix, labels), value in peaks.items():
        if n == name and suffix in ("", "_count") and label in labels and value > 0:
            return True
    return False


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("observability")
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    with Cluster(1, 2, log_dir=tmp / "logs",
                 common_args=["--log-format", "json", "--log-level", "debug"],
                 # Small prefill steps: grants stay pending while it works through them.
                 prefill_args=["--kv-store", dead_redis, "--kv-store-timeout", "0.5",
                               "--max-num-batched-tokens", "16"],
                 # No local prefix cache on decode: a preempted request comes back from the
                 # store (restore phase), not from blocks that happen to be still cached.
                 decode_args=["--num-kv-blocks", "24", "--reserve-tokens", "8",
                              "--no-enable-prefix-caching"],
                 instance_args={f"decode-{i}": ["--kv-store", f"disk:{tmp / f'store{i}'}"]
                                for i in range(2)}) as c:
        yield c


def workload(n: int = 20) -> list[dict]:
    rng = random.Random(5)
    shared = [rng.randrange(256) for _ in range(32)]
    return [{**GREEDY, "prompt": shared + [rng.randrange(256) for _ in range(rng.randint(8, 24))],
             "max_tokens": rng.randint(70, 100), "stream": i % 2 == 0} for i in range(n)]


def reference(bodies: list[dict]) -> list[list[int]]:
    torch.set_num_threads(1)
    outs = LLM("tiny", num_kv_blocks=1024).generate(
        [{"prompt_token_ids": b["prompt"]} for b in bodies],
        [SamplingParams(max_tokens=b["max_tokens"], temperature=0, ignore_eos=True)
         for b in bodies])
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.fixture(scope="module")
def traffic(cluster):
    """Run the workload while sampling the router's and instances' metrics every 50 ms."""
    client = cluster.client(limits=httpx.Limits(max_connections=64))
    urls = {p.name: p.ready_line()["metrics"] for p in cluster.processes}
    router_peaks: dict = {}
    instance_peaks: dict = defaultdict(dict)
    stop = threading.Event()

    def scrape() -> None:
        with httpx.Client(timeout=5) as http:
            for name, url in urls.items():
                peak(http.get(url + "/metrics").text, instance_peaks[name])
            peak(cluster.metrics(), router_peaks)

    def sampler() -> None:
        while not stop.wait(0.05):
            scrape()

    thread = threading.Thread(target=sampler, daemon=True)
    thread.start()
    bodies = workload()
    try:
        with ThreadPoolExecutor(len(bodies)) as pool:
            results = list(pool.map(lambda b: complete(client, "/v1/completions", b), bodies))
        too_big = complete(client, "/v1/completions", {**GREEDY, "prompt": list(range(100)),
                                                       "max_tokens": 300})
    finally:
        stop.set()
        thread.join(10)
    cluster.assert_quiescent()                  # a heartbeat after the traffic: final counters
    scrape()
    return {"bodies": bodies, "results": results, "too_big": too_big,
            "router": router_peaks, "instances": instance_peaks, "client": client}


def test_outputs_exact_under_preemption_and_store_faults(cluster, traffic):
    problems = [(r.status, r.error) for r in traffic["results"] if not r.ok]
    assert not problems, problems
    assert [r.token_ids for r in traffic["results"]] == reference(traffic["bodies"])
    refused = traffic["too_big"]
    assert refused.status == 400 and "KV blocks" in refused.error["message"], refused.error


def test_every_metric_exists_and_moves_on_the_router(cluster, traffic):
    peaks = traffic["router"]
    still = [key for key, label in ROUTER_MOVES.items()
             if not moved(peaks, key.split("/")[0], label)]
    assert not still, f"metrics that never moved on the router: {still}\n{cluster.logs()}"
    names = {name for name, *_ in peaks}
    assert set(ROUTER_EXISTS) <= names, sorted(set(ROUTER_EXISTS) - names)


def test_every_instance_serves_its_own_metrics(cluster, traffic):
    problems = []
    for proc in cluster.processes:
        peaks = traffic["instances"][proc.name]
        wanted = INSTANCE_MOVES[proc.role]
        if proc.role == "decode" and not moved(peaks, "fdpd:num_preemptions_total"):
            wanted = [m for m in wanted if "kv_store" not in m and "preemption" not in m]
        problems += [f"{proc.name}: {m}" for m in wanted if not moved(peaks, m)]
    assert not problems, f"instance metrics that never moved: {problems}"
    # Health of the instance itself, on the same port.
    url = cluster.processes[0].ready_line()["metrics"]
    health = httpx.get(url + "/health").json()
    assert health["status"] == "ok" and health["registered"] and health["instance_id"]
    assert httpx.get(url + "/nope").status_code == 404
    # /v1/cluster tells where each instance's endpoint is.
    view = cluster.view(cluster.processes[0])
    assert view["metrics_address"] == url


def test_grafana_dashboard_uses_only_existing_metrics(traffic):
    exposed = {name for name, *_ in traffic["router"]}
    for peaks in traffic["instances"].values():
        exposed |= {name for name, *_ in peaks}
    exprs = [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"]
             for t in p.get("targets", [])]
    assert len(exprs) > 20
    used = {re.sub(r"_(bucket|sum|count)$", "", m) for e in exprs
            for m in re.findall(r"fdpd:[a-z0-9_]+", e)}
    assert used - exposed == set(), sorted(used - exposed)
    # Every label a panel groups by is on that metric's series (prometheus-client writes
    # the labels; a renamed one would leave the panel empty).
    labels: dict[str, set[str]] = defaultdict(set)
    for peaks in (traffic["router"], *traffic["instances"].values()):
        for name, _, series in peaks:
            labels[name] |= set(re.findall(r'(\w+)="', series))
    missing = []
    for e in exprs:
        for grouping in re.findall(r"by \(([^)]*)\)", e):
            (metric,) = {re.sub(r"_(bucket|sum|count)$", "", m)
                         for m in re.findall(r"fdpd:[a-z0-9_]+", e)}
            missing += [(metric, g.strip()) for g in grouping.split(",")
                        if g.strip() not in labels[metric] | {"instance"}]
    assert not missing, missing


def test_timelines_of_preempted_requests(cluster, traffic):
    data = traffic["client"].get("/v1/requests/recent", params={"limit": 50}).json()["data"]
    finished = [d for d in data if d["status"] == "finished"]
    assert len(finished) == len(traffic["bodies"])
    for entry in data:
        assert all(v >= 0 for v in entry["phases"].values()), entry
        assert sum(entry["phases"].values()) <= entry["e2e_seconds"] + 1e-5, entry
    preempted = [d for d in finished if d["phases"].get("preempted")]
    assert preempted, "no timeline shows a preemption"
    assert any(d["phases"].get("restore") for d in preempted), preempted
    assert all(d["num_preemptions"] >= 1 for d in preempted)
    refused = next(d for d in data if d["status"] == "error")
    assert refused["output_tokens"] == 0 and refused["reason"]


def test_timeline_of_one_pd_request(cluster, traffic):
    client = traffic["client"]
    res = complete(client, "/v1/completions", {**GREEDY, "prompt": "where does time go",
                                               "max_tokens": 12})
    assert res.ok
    rid = res.body["id"]
    entry = client.get(f"/v1/requests/{rid}/timeline").json()
    assert entry["request_id"] == rid and entry["status"] == "finished"
    assert entry["mode"] == "pd" and entry["prefill_instance"] == "prefill-0"
    assert entry["decode_instance"] in ("decode-0", "decode-1")
    assert set(PD_PHASES) <= set(entry["phases"]), entry
    assert all(v >= 0 for v in entry["phases"].values()), entry
    total = sum(entry["phases"].values())
    assert total <= entry["e2e_seconds"] + 1e-5, entry
    assert entry["unaccounted_seconds"] >= -1e-5
    assert 0 < entry["ttft_seconds"] <= entry["e2e_seconds"]
    assert (entry["prompt_tokens"], entry["output_tokens"]) == (len(res.prompt_token_ids), 12)
    newest = client.get("/v1/requests/recent", params={"limit": 1}).json()["data"]
    assert newest == [entry]
    # The router's JSON log has the same line, with the request id.
    lines = [json.loads(line) for line in cluster.router.log_path.read_text().splitlines()
             if line.startswith("{")]
    logged = [x for x in lines if x.get("request_id") == rid and x["logger"] == "fdpd.requests"]
    assert len(logged) == 1, lines[-3:]
    assert logged[0]["phases"] == entry["phases"] and logged[0]["process"] == "router"
    assert logged[0]["level"] == "info" and logged[0]["status"] == "finished"
    # One id follows the request through every process's log (debug lines here).
    for proc, message in ((cluster.router, "dispatch"), (cluster.instance("prefill-0"), "submit"),
                          (cluster.instance(entry["decode_instance"]), "adopted")):
        mine = [json.loads(line) for line in proc.log_path.read_text().splitlines()
                if line.startswith("{") and rid in line]
        assert any(x.get("request_id") == rid and x["msg"].startswith(message)
                   and x["process"] == proc.name for x in mine), (proc.name, mine)
    # Errors are OpenAI-shaped.
    missing = client.get("/v1/requests/cmpl-nope/timeline")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == \
        "request_not_found"
    assert client.get("/v1/requests/recent", params={"limit": 0}).status_code == 400
