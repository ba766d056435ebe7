"""Graceful drain: SIGTERM on a decode (or mixed) instance stops new work, writes its running
requests' KV to the store, and the router resumes them on another instance: every client sees
one continuous, token-exact stream. SIGTERM on a prefill finishes its queue. Both exit 0."""

from __future__ import annotations

import random
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from fdpd import LLM, SamplingParams
from fdpd.testing.expected import offline_greedy
from fdpd.testing import complete

pytestmark = pytest.mark.timeout(240)

NUM = 6
MAX_TOKENS = 800          # long enough (~2 s of decoding here) that SIGTERM lands mid-stream


def prompts(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(rng.randrange(20, 70))] for _ in range(NUM)]


@pytest.fixture(scope="module")
def expected() -> list[list[int]]:
    return offline_greedy(prompts(), MAX_TOKENS)


def stream(client, prompt):
    return complete(client, "/v1/completions", {
        "model": "tiny", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
        "ignore_eos": True, "return_token_ids": True, "stream": True,
        "stream_options": {"include_usage": True}})


def drain_busiest(cluster, role: str):
    """SIGTERM the instance of ``role`` with the most running requests, once it has some;
    returns (it, its running count before the drain, seconds the drain took)."""
    def busiest():
        views = [(cluster.view(p) or {}, p) for p in cluster.instances(role)]
        running, proc = max(((v.get("running") or 0, p) for v, p in views),
                            key=lambda x: x[0])
        return (proc, running) if running else None

    proc, running = cluster.wait_for(busiest, timeout=60, what=f"a {role} running requests")
    start = time.monotonic()
    cluster.kill(proc, signal.SIGTERM)              # returns once it exited
    return proc, running, time.monotonic() - start


@pytest.mark.parametrize("topology", ["pd+store", "pd", "mixed+store"])
def test_sigterm_moves_running_streams_to_another_instance_exactly(
        cluster_factory, expected, topology, request):
    store = (["--kv-store", request.getfixturevalue("redis_url")]
             if topology.endswith("+store") else [])
    if topology.startswith("mixed"):
        cluster = cluster_factory(num_prefill=0, num_decode=0, num_mixed=2, mixed_args=store)
        role = "mixed"
    else:
        cluster = cluster_factory(num_prefill=1, num_decode=2, prefill_args=store,
                                  decode_args=store)
        role = "decode"
    client = cluster.client()
    with ThreadPoolExecutor(NUM) as pool:
        futures = [pool.submit(stream, client, p) for p in prompts()]
        drained, running, seconds = drain_busiest(cluster, role)
        results = [f.result() for f in futures]

    assert drained.proc.returncode == 0, drained.log_tail()
    for out, want in zip(results, expected):
        assert out.ok, (out.status, out.error, cluster.logs())   # no error event, no gap
        assert out.token_ids == want
    router = cluster.cluster()["router"]
    assert router["migrations"] >= running >= 1, router
    assert router["retries"] == 0, router
    if store:
        # Whoever resumed the moved requests restored their KV from the store.
        served_by = [cluster.view(p) for p in cluster.instances()
                     if p is not drained and p.role in ("prefill", "mixed")]
        restored = sum(v["kv_store"]["blocks_restored"] for v in served_by if v)
        assert restored > 0, served_by
    print(f"{topology}: drained {drained.name} with {running} running in {seconds:.2f} s")


def test_sigterm_on_a_prefill_finishes_its_queue(cluster_factory):
    cluster = cluster_factory(num_prefill=2, num_decode=1)
    client = cluster.client()
    rng = random.Random(3)
    work = [[rng.randrange(256) for _ in range(rng.randrange(1000, 2000))] for _ in range(16)]
    llm = LLM("tiny", num_kv_blocks=2048)
    want = [o.outputs[0].token_ids for o in llm.generate(
        work, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))]

    def one(prompt):
        return complete(client, "/v1/completions", {
            "model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True})

    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(one, p) for p in work]
        target = cluster.wait_for(
            lambda: next((p for p in cluster.instances("prefill")
                          if (cluster.view(p) or {}).get("waiting")), None),
            timeout=60, what="a prefill with queued requests")
        sigterm_at = time.time()
        cluster.kill(target, signal.SIGTERM)
        results = [f.result() for f in futures]
    assert target.proc.returncode == 0, target.log_tail()
    assert [r.token_ids for r in results] == want, [(r.status, r.error) for r in results]
    # The drained prefill finished work it had queued: requests it prefilled ended after the
    # SIGTERM (wall clock, from the router's request timelines).
    recent = cluster.client().get("/v1/requests/recent", params={"limit": 100}).json()["data"]
    finished_after = [t for t in recent if t["prefill_instance"] == target.name
                      and t["arrival_time"] + t["e2e_seconds"] > sigterm_at]
    assert finished_after, recent
