"""Resume on failure: a decode that dies (SIGKILL) or freezes past the liveness timeout
(SIGSTOP) mid-stream costs its clients nothing. The router resumes every request it held on
the surviving decode from prompt + the tokens already sent (``fdpd.router.resume``): 24 of 24
token-exact, no error event, ``usage`` counting each token once, ledgers back to zero, and
the loss counted in ``fdpd:request_resumes_total`` and each request's timeline.

A killed process is noticed from its dropped connection (``fdpd.router.liveness``), well
before the heartbeat timeout; the test prints kill -> first resumed token for each resumed
stream.
"""

from __future__ import annotations

import random
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from fdpd.testing.expected import offline_greedy
from fdpd.testing import Completion, complete

pytestmark = pytest.mark.timeout(120)

NUM = 24
MAX_TOKENS = 120
POOL = ["--num-kv-blocks", "1024"]


def prompts(seed: int = 7) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(rng.randrange(20, 60))] for _ in range(NUM)]


@pytest.fixture(scope="module")
def expected() -> list[list[int]]:
    return offline_greedy(prompts(), MAX_TOKENS)


def request(client, prompt: list[int], stream: bool, times: list[float]) -> Completion:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return complete(client, "/v1/completions", body,
                    on_event=lambda out: times.append(time.monotonic()))


def usage_of(out: Completion) -> dict:
    if out.body is not None:
        return out.body["usage"]
    return next(e["usage"] for e in reversed(out.events) if e.get("usage"))


def run_with_a_decode_lost(cluster, lose) -> tuple[list[Completion], list[list[float]], float]:
    """24 requests, half streamed; once the busiest decode runs some of them, ``lose`` it.
    Returns the outputs, each stream's event times and when the decode was lost."""
    client = cluster.client()
    times: list[list[float]] = [[] for _ in range(NUM)]

    def busiest():
        views = [((cluster.view(p) or {}).get("running") or 0, p)
                 for p in cluster.instances("decode")]
        running, proc = max(views, key=lambda x: x[0])
        return proc if running >= 4 else None

    with ThreadPoolExecutor(NUM) as pool:
        futures = [pool.submit(request, client, p, i % 2 == 0, times[i])
                   for i, p in enumerate(prompts())]
        victim = cluster.wait_for(busiest, timeout=60, what="a decode running requests")
        lost_at = time.monotonic()
        lose(victim)
        results = [f.result() for f in futures]
    return results, times, lost_at


def assert_exact_once(cluster, results: list[Completion], expected) -> None:
    for i, (out, want) in enumerate(zip(results, expected)):
        assert out.ok, (i, out.status, out.error, cluster.logs())   # no error event
        assert out.token_ids == want, i                              # no gap, no repeat
        usage = usage_of(out)
        assert usage["completion_tokens"] == MAX_TOKENS, usage
        assert usage["prompt_tokens"] == len(prompts()[i]), usage


def resumed_timelines(cluster) -> list[dict]:
    recent = cluster.client().get("/v1/requests/recent",
                                  params={"limit": 100}).json()["data"]
    return [t for t in recent if t["resumes"]]


def kill_to_resumed_token(results, times, lost_at, resumed: list[dict]) -> list[float]:
    ids = {t["request_id"] for t in resumed}
    out = []
    for res, ts in zip(results, times):
        if res.events and res.events[0].get("id") in ids:
            after = [t for t in ts if t > lost_at]
            if after:
                out.append(after[0] - lost_at)
    return sorted(out)


def test_decode_sigkilled_mid_stream_every_request_resumes_exactly(cluster_factory, expected):
    cluster = cluster_factory(num_prefill=1, num_decode=2, common_args=POOL)
    killed = []

    def sigkill(victim):
        cluster.kill(victim)
        killed.append(victim)

    results, times, lost_at = run_with_a_decode_lost(cluster, sigkill)
    assert_exact_once(cluster, results, expected)
    resumed = resumed_timelines(cluster)
    assert len(resumed) >= 4, resumed
    for t in resumed:
        move = t["resumes"][0]
        assert move["instance"] == killed[0].name, t
        assert move["reason"] in ("disconnected", "instance_died"), t
        assert t["phases"]["resumed"] >= 0, t
    # Noticed from the dropped connection, not at the heartbeat timeout.
    assert {t["resumes"][0]["reason"] for t in resumed} == {"disconnected"}, resumed
    router = cluster.cluster()["router"]
    assert router["resumes"].get("disconnected") == len(resumed), router
    assert 'fdpd:request_resumes_total{reason="disconnected"}' in cluster.metrics()
    gaps = kill_to_resumed_token(results, times, lost_at, resumed) or [float("nan")]
    print(f"SIGKILL: {len(resumed)} resumed; kill -> first resumed token p50 "
          f"{gaps[len(gaps) // 2]:.3f} s, max {gaps[-1]:.3f} s")


def test_decode_sigstopped_past_the_liveness_timeout(cluster_factory, expected):
    cluster = cluster_factory(num_prefill=1, num_decode=2, common_args=POOL)
    frozen = []

    def sigstop(victim):
        cluster.pause(victim)
        frozen.append(victim)

    results, _, _ = run_with_a_decode_lost(cluster, sigstop)
    assert_exact_once(cluster, results, expected)
    resumed = resumed_timelines(cluster)
    assert resumed and {t["resumes"][0]["reason"] for t in resumed} == {"instance_died"}
    # Woken, it drops the streams it lost (the router aborted them), registers again and
    # its ledger returns to zero (checked by the harness at exit).
    cluster.resume(frozen[0])
    cluster.wait_for(lambda: (cluster.view(frozen[0]) or {}).get("healthy"), 15,
                     what=f"{frozen[0].name} registered again")


def test_resumed_requests_restore_their_kv_from_redis(cluster_factory, expected, redis_url):
    store = ["--kv-store", redis_url, "--kv-store-checkpoint"]
    cluster = cluster_factory(num_prefill=1, num_decode=2, common_args=POOL,
                              prefill_args=store, decode_args=store)
    results, _, _ = run_with_a_decode_lost(cluster, lambda victim: cluster.kill(victim,
                                                                             signal.SIGKILL))
    assert_exact_once(cluster, results, expected)
    assert resumed_timelines(cluster)
    prefill = cluster.view(cluster.instances("prefill")[0])
    # The resumed contexts' blocks came back from the store, written by the dead decode.
    assert prefill["kv_store"]["blocks_restored"] > 0, prefill["kv_store"]
