"""The Redis Cluster store's own hazards, against real local clusters (the shared contract runs
in test_kvstore_contract.py): keys spread over every shard, batches that span slots, and a
shard that dies or stalls is a quick miss for its keys while the others keep answering."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import time

import pytest

from fdpd.kvstore import StoreUnavailable, open_store
from fdpd.kvstore.redis_cluster import RedisClusterStore, parse_cluster_url
from fdpd.testing.processes import free_port
from fdpd.testing.servers import LocalRedisCluster
from redis.crc import key_slot

pytestmark = pytest.mark.timeout(120)
TIMEOUT = 0.5


def key(name: object) -> bytes:
    return hashlib.sha256(repr(name).encode()).digest()


@pytest.fixture
def own_cluster(tmp_path):
    """A cluster of this test's own (it gets broken)."""
    for binary in ("redis-server", "redis-cli"):
        if shutil.which(binary) is None:
            pytest.skip(f"{binary} binary not found (apt-get install -y redis-server)")
    cluster = LocalRedisCluster(tmp_path / "rc").start()
    yield cluster
    cluster.stop()


def shard_of(store: RedisClusterStore, k: bytes) -> int:
    """Which of the cluster's primaries (by port order in the URL) holds ``k``."""
    name = store.key_prefix + k
    port = store._client_for(name).connection_pool.connection_kwargs["port"]
    return [p for _, p in store.startup_nodes].index(port)


def dbsize(port: int) -> int:
    out = subprocess.run(["redis-cli", "-p", str(port), "dbsize"], capture_output=True,
                         text=True, timeout=10)
    return int(out.stdout)


def test_url_forms():
    assert parse_cluster_url("redis-cluster://a:1,b.example:2, 10.0.0.3:6379/") == [
        ("a", 1), ("b.example", 2), ("10.0.0.3", 6379)]


def test_keys_spread_over_every_shard_and_batches_span_slots(redis_cluster):
    store = open_store(redis_cluster.url, timeout=TIMEOUT, key_prefix=b"spread:")
    keys = [key(i) for i in range(60)]
    before = [dbsize(p) for p in redis_cluster.ports]
    for i, k in enumerate(keys):
        store.put(k, bytes([i]) * 100)
    grew = [dbsize(p) - b for p, b in zip(redis_cluster.ports, before)]
    assert sum(grew) == 60 and all(n > 5 for n in grew), grew
    # One batch over ~60 slots on 3 shards: no CROSSSLOT error, every value in its place.
    assert store.get_many(keys) == [bytes([i]) * 100 for i in range(60)]
    assert store.contains_prefix(keys) == 60
    store.delete(keys[30])
    assert store.contains_prefix(keys) == 30
    assert store.stats().errors == 0
    store.close()


def test_a_dead_shard_is_a_quick_miss_and_the_others_answer(own_cluster):
    store = open_store(own_cluster.url, timeout=TIMEOUT)
    keys = [key(i) for i in range(30)]
    for k in keys:
        store.put(k, k * 4)
    shards = [shard_of(store, k) for k in keys]
    dead = shards[5]
    own_cluster.kill_shard(dead)
    start = time.monotonic()
    got = store.get_many(keys)
    prefix = store.contains_prefix(keys)
    assert time.monotonic() - start < TIMEOUT
    assert got == [None if s == dead else k * 4 for k, s in zip(keys, shards)]
    assert prefix == shards.index(dead)
    with pytest.raises(StoreUnavailable):
        store.put(keys[5], b"x")
    live = next(k for k, s in zip(keys, shards) if s != dead)
    store.put(live, b"still served")
    assert store.get(live) == b"still served"
    assert store.stats().errors == 3
    # Past the node timeout the live shards know it is dead; they still serve (no full
    # coverage required), and so does the store.
    time.sleep(2.5)
    assert store.get(live) == b"still served"
    store.close()


def test_a_stalled_shard_is_a_miss_within_the_timeout(own_cluster):
    store = open_store(own_cluster.url, timeout=TIMEOUT)
    keys = [key(("s", i)) for i in range(30)]
    for k in keys:
        store.put(k, k)
    shards = [shard_of(store, k) for k in keys]
    stalled = own_cluster.procs[shards[0]]
    os.kill(stalled.pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        got = store.get_many(keys)
        assert time.monotonic() - start < 2 * TIMEOUT + 0.5
        assert got == [None if s == shards[0] else k for k, s in zip(keys, shards)]
    finally:
        os.kill(stalled.pid, signal.SIGCONT)
    store.close()


def test_no_node_reachable_fails_fast_without_failing_to_open():
    store = open_store(f"redis-cluster://127.0.0.1:{free_port()},127.0.0.1:{free_port()}",
                       timeout=TIMEOUT)
    for call in (lambda: store.get(key(1)), lambda: store.put(key(1), b"x"),
                 lambda: store.contains_prefix([key(1)])):
        start = time.monotonic()
        with pytest.raises(StoreUnavailable):
            call()
        assert time.monotonic() - start < TIMEOUT
    store.close()
    with pytest.raises(StoreUnavailable, match="closed"):
        store.get(key(1))


def test_a_slot_missing_from_the_map_is_a_miss_until_the_map_is_refreshed(redis_cluster):
    store = open_store(redis_cluster.url, timeout=TIMEOUT, key_prefix=b"unmapped:")
    keys = [key(("u", i)) for i in range(8)]
    for k in keys:
        store.put(k, k)
    slots = store._cluster.nodes_manager.slots_cache
    lost = key_slot(store.key_prefix + keys[3])
    slots.pop(lost)                               # as while the cluster is resharded
    got = store.get_many(keys)
    assert got[3] is None and [g for i, g in enumerate(got) if i != 3] == keys[:3] + keys[4:]
    with pytest.raises(StoreUnavailable, match="no primary"):
        store.put(keys[3], b"x")
    assert store.stats().errors == 2
    store._next_refresh = 0.0                     # the refresh interval has passed
    assert store.get_many(keys) == keys
    assert lost in store._cluster.nodes_manager.slots_cache
    store.close()
