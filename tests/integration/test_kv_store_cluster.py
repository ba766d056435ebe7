"""PD clusters with a KV store: preempted KV is written back and restored, exactly, with the
disk, the Redis and the Redis Cluster backend (also with a cluster shard killed mid-run); a
conversation's next turn on another prefill instance loads the earlier turns' KV from the shared
store."""

from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from fdpd import LLM, SamplingParams
from fdpd.testing import complete
from fdpd.testing.servers import LocalRedisCluster

pytestmark = pytest.mark.timeout(240)

NUM = 32
MAX_TOKENS = 64
# A decode pool that holds ~5 of these requests at full length: admissions within the reserve
# horizon (16 tokens) succeed, and growth past it forces preemptions.
DECODE_POOL = ["--num-kv-blocks", "48", "--reserve-tokens", "16", "--block-size", "16"]


def workload(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(rng.randrange(40, 120))] for _ in range(NUM)]


@pytest.fixture(scope="module")
def expected() -> list[list[int]]:
    torch.set_num_threads(1)
    llm = LLM("tiny", num_kv_blocks=2048)
    outs = llm.generate(workload(), SamplingParams(max_tokens=MAX_TOKENS, temperature=0,
                                                   ignore_eos=True))
    return [o.outputs[0].token_ids for o in outs]


def run_workload(cluster) -> list[list[int]]:
    client = cluster.client()

    def one(prompt):
        out = complete(client, "/v1/completions", {
            "model": "tiny", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True, "stream": True})
        assert out.ok, (out.status, out.error, cluster.logs())
        return out.token_ids

    with ThreadPoolExecutor(NUM) as pool:
        return list(pool.map(one, workload()))


def decode_counters(cluster) -> dict:
    """The decode's preemption/restore counters from its latest heartbeat."""
    return cluster.view(cluster.instances("decode")[0])


def wait_counters(cluster) -> dict:
    """Counters after the run, from a heartbeat sent once everything was idle."""
    cluster.assert_quiescent()
    return decode_counters(cluster)


_WITHOUT_STORE: list[dict] = []


def without_store(cluster_factory, expected) -> dict:
    """The decode's counters after the workload with no store: the same for every backend, so
    it runs once per module (its first caller's)."""
    if not _WITHOUT_STORE:
        cluster = cluster_factory(decode_args=DECODE_POOL)
        assert run_workload(cluster) == expected, cluster.logs()
        _WITHOUT_STORE.append(wait_counters(cluster))
        cluster.close()
    return _WITHOUT_STORE[0]


@pytest.mark.parametrize("backend", ["disk", "redis", "redis-cluster"])
def test_preemption_restores_from_the_store_exactly(cluster_factory, tmp_path, expected,
                                                    backend, request):
    url = {"disk": lambda: f"disk:{tmp_path / 'decode-store'}",
           "redis": lambda: request.getfixturevalue("redis_url"),
           "redis-cluster": lambda: request.getfixturevalue("redis_cluster").url}[backend]()
    cluster = cluster_factory(decode_args=[*DECODE_POOL, "--kv-store", url])
    assert run_workload(cluster) == expected, cluster.logs()
    d = wait_counters(cluster)
    cluster.close()
    assert d["num_preemptions"] > 0, d
    store = d["kv_store"]
    assert store["blocks_written"] > 0 and store["blocks_restored"] > 0, d
    assert store["corrupt_objects"] == 0 and store["errors"] == 0, d
    # The same workload without a store recomputes what the store restored.
    plain = without_store(cluster_factory, expected)
    assert plain["num_preemptions"] > 0
    assert d["num_recomputed_tokens"] < 0.5 * plain["num_recomputed_tokens"], (d, plain)


def test_a_redis_cluster_shard_killed_mid_run_keeps_outputs_exact(cluster_factory, tmp_path,
                                                                   expected, redis_cluster):
    """Once write-backs flow, one of the three primaries dies: its objects are gone and its
    slots unreachable, so those reads and writes are misses (recomputed) and the rest restore."""
    own = LocalRedisCluster(tmp_path / "rc").start()
    try:
        cluster = cluster_factory(decode_args=[*DECODE_POOL, "--kv-store", own.url,
                                               "--kv-store-timeout", "0.5"])
        killed = threading.Event()

        def kill_once_written():
            cluster.wait_for(lambda: decode_counters(cluster)["kv_store"]["blocks_written"] > 0,
                             timeout=60, what="the first write-back")
            own.kill_shard(1)
            killed.set()

        killer = threading.Thread(target=kill_once_written, daemon=True)
        killer.start()
        got = run_workload(cluster)
        killer.join(timeout=70)
        assert killed.is_set(), "no write-back happened before the workload ended"
        assert got == expected, cluster.logs()
        d = wait_counters(cluster)
    finally:
        own.stop()
    store = d["kv_store"]
    assert d["num_preemptions"] > 0, d
    assert store["blocks_restored"] > 0 and store["errors"] > 0, d
    assert store["corrupt_objects"] == 0, d


def test_next_turn_on_another_prefill_loads_history_from_the_store(cluster_factory,
                                                                   redis_url):
    store = ["--kv-store", redis_url]
    turn1 = list(range(30, 130))                       # 100 prompt tokens
    params = {"model": "tiny", "max_tokens": 40, "temperature": 0, "ignore_eos": True,
              "return_token_ids": True}
    cluster = cluster_factory(num_prefill=2, prefill_args=store,
                              decode_args=[*store, "--kv-store-write-finished"])
    if True:
        client = cluster.client()
        first = complete(client, "/v1/completions", {**params, "prompt": turn1})
        assert first.ok, first.error
        served = [cluster.view(p)["prefix_queried_tokens"] for p in cluster.instances("prefill")]
        busy = cluster.instances("prefill")[served.index(max(served))]
        cluster.wait_for(lambda: decode_counters(cluster)["kv_store"]["blocks_written"] > 0,
                         timeout=10, what="the finished turn written to the store")
        # Take the prefill that served turn 1 out, so turn 2 must go to the other one.
        cluster.kill(busy)
        cluster.wait_for(lambda: not cluster.view(busy)["healthy"], timeout=10,
                         what="the killed prefill marked dead")
        turn2 = turn1 + first.token_ids + [10, 11, 12, 13]
        second = complete(client, "/v1/completions", {**params, "prompt": turn2})
        assert second.ok, (second.error, cluster.logs())
        cached = second.body["usage"]["prompt_tokens_details"]["cached_tokens"]
    history = len(turn1) + len(first.token_ids)
    assert cached >= (history // 16 - 1) * 16, (cached, history)
    llm = LLM("tiny", num_kv_blocks=512)
    want = llm.generate([turn2], SamplingParams(max_tokens=40, temperature=0,
                                                ignore_eos=True))[0].outputs[0].token_ids
    assert second.token_ids == want
