"""A Redis Cluster as the shared KV store: one store's objects hashed across many servers'
memory (``redis-cluster://HOST:PORT[,HOST:PORT...]``, any reachable nodes of the cluster).

redis-py's ``RedisCluster`` holds the topology (which primary owns each of the 16384 hash
slots); the commands themselves go straight to that primary's own ``redis.Redis`` client, one
pipeline per shard with one MGET per slot, so a batch never sends a cross-slot command and costs
one round trip per shard it touches. We do not use ``RedisCluster``'s own command path because
its retries and topology refreshes run inside the command, and a dead shard must be a quick
miss for its keys, not a failure of the whole batch or a wait (see ``redis_base``).

A dead or stalled shard: its keys are misses (counted in ``errors``), the other shards keep
answering. Run the servers with ``cluster-require-full-coverage no``, or the live shards refuse
every key (CLUSTERDOWN, also a miss) once the cluster notices the dead one. After a server error
the slot map is refreshed, at most once per :data:`REFRESH_INTERVAL_S` and by the next call,
so a failover to a replica is picked up. Deadlines are the single server's: a socket timeout of
``timeout`` per operation, no retries; a refresh asks the nodes in turn, each bounded the same.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from fdpd.kvstore.base import StoreUnavailable
from fdpd.kvstore.redis_base import REDIS_MISSING, KeyGroup, RedisProtocolStore

try:
    import redis
    from redis.backoff import NoBackoff
    from redis.cluster import ClusterNode, RedisCluster
    from redis.crc import key_slot
    from redis.exceptions import RedisClusterException
    from redis.retry import Retry
except ImportError:  # pragma: no cover - depends on the install
    redis = None

SCHEME = "redis-cluster://"
REFRESH_INTERVAL_S = 5.0


def parse_cluster_url(url: str) -> list[tuple[str, int]]:
    """``redis-cluster://h1:p1,h2:p2`` -> ``[(h1, p1), (h2, p2)]``; a clear error otherwise."""
    form = f"{SCHEME}HOST:PORT[,HOST:PORT...]"
    if not url.startswith(SCHEME):
        raise ValueError(f"a Redis Cluster store URL starts with {SCHEME}, got {url!r}")
    rest = url[len(SCHEME):].rstrip("/")
    if not rest or any(c in rest for c in "?#@/"):
        raise ValueError(f"Redis Cluster store URL {url!r} must be {form} "
                         "(no database, user or options: a cluster has one keyspace)")
    nodes = []
    for part in rest.split(","):
        try:
            parsed = urlsplit(f"//{part.strip()}")
            host, port = parsed.hostname, parsed.port
        except ValueError as e:
            raise ValueError(f"bad node {part!r} in {url!r}: {e}; expected {form}") from e
        if not host or port is None:
            raise ValueError(f"bad node {part!r} in {url!r}: expected {form}")
        nodes.append((host, port))
    return nodes


class RedisClusterStore(RedisProtocolStore):
    kind = "redis-cluster"

    def __init__(self, url: str, timeout: float = 2.0, ttl_seconds: int | None = None,
                 key_prefix: bytes = b"fdpd:kv:"):
        if redis is None:
            raise RuntimeError(REDIS_MISSING)
        super().__init__(url, timeout, ttl_seconds, key_prefix)
        self.startup_nodes = parse_cluster_url(url)
        self._lock = threading.Lock()
        self._cluster: Any = None          # RedisCluster, built once a node answered
        self._refresh_due = True
        self._next_refresh = 0.0

    # ------------------------------------------------------------------ topology
    def _connect(self) -> Any:
        return RedisCluster(
            startup_nodes=[ClusterNode(h, p) for h, p in self.startup_nodes],
            socket_timeout=self.timeout, socket_connect_timeout=self.timeout,
            retry=Retry(NoBackoff(), 0), require_full_coverage=False,
            dynamic_startup_nodes=True)

    def _topology(self) -> Any:
        """The cluster client, connected (or refreshed) first when that is due and allowed.
        A refresh that fails keeps the old slot map (its live shards still answer)."""
        with self._lock:
            self._check_open()
            now = time.monotonic()
            if self._refresh_due and now >= self._next_refresh:
                self._next_refresh = now + REFRESH_INTERVAL_S
                try:
                    if self._cluster is None:
                        self._cluster = self._connect()
                    else:
                        self._cluster.nodes_manager.initialize()
                    self._refresh_due = False
                except (redis.RedisError, RedisClusterException, OSError) as e:
                    if self._cluster is None:
                        raise self._fail("cluster discovery", e) from e
            if self._cluster is None:
                raise StoreUnavailable(f"{self.kind} store {self.url}: no node reachable yet "
                                       f"(next try in {self._next_refresh - now:.1f} s)")
            return self._cluster

    def _server_failed(self, error: Exception) -> None:
        self._refresh_due = True

    def _primary(self, cluster: Any, slot: int) -> Any | None:
        """The client of the slot's primary; None (and a refresh due) for a slot that no
        node serves in our map (a cluster being resharded or not fully set up)."""
        owners = cluster.nodes_manager.slots_cache.get(slot)
        if not owners:
            self._refresh_due = True
            return None
        return cluster.get_redis_connection(owners[0])

    # ------------------------------------------------------------------ routing
    def _route(self, names: Sequence[bytes]) -> list[KeyGroup]:
        """Keys of an unserved slot are left out of every group: misses, counted as errors."""
        cluster = self._topology()
        by_slot: dict[int, list[int]] = {}
        for i, name in enumerate(names):
            by_slot.setdefault(key_slot(name), []).append(i)
        groups: dict[int, KeyGroup] = {}
        for slot, positions in by_slot.items():
            client = self._primary(cluster, slot)
            if client is None:
                self._counters.add(errors=1)
                continue
            groups.setdefault(id(client), KeyGroup(client, [])).slots.append(positions)
        return list(groups.values())

    def _client_for(self, name: bytes) -> Any:
        slot = key_slot(name)
        client = self._primary(self._topology(), slot)
        if client is None:
            self._counters.add(errors=1)
            raise StoreUnavailable(f"{self.kind} store {self.url}: hash slot {slot} has no "
                                   "primary in the cluster's slot map")
        return client

    def _close_clients(self) -> None:
        with self._lock:
            if self._cluster is not None:
                self._cluster.close()
