"""KV store for preempted and reusable KV blocks: the contract (``base``), the object format
(``codec``) and the backends (``disk``, ``redis_store``, ``redis_cluster``, ``mooncake_store``).

Backends are chosen by URL with :func:`open_store`; the Redis and Mooncake client libraries are
imported only when such a store is opened.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs

from fdpd.kvstore.base import KVStore, StoreStats, StoreUnavailable
from fdpd.kvstore.codec import KVObjectError, decode_block, encode_block

DEFAULT_DISK_CAPACITY_MB = 4096
URL_FORMS = ("disk:PATH[?capacity_mb=N]", "redis://HOST:PORT/DB", "rediss://HOST:PORT/DB",
             "redis-cluster://HOST:PORT[,HOST:PORT...]",
             "mooncake://MASTER_HOST:PORT?metadata=P2PHANDSHAKE&protocol=tcp&segment_mb=N")

__all__ = ["KVObjectError", "KVStore", "StoreStats", "StoreUnavailable", "decode_block",
           "encode_block", "open_store"]


def open_store(url: str, timeout: float = 2.0, **kw: Any) -> KVStore:
    """Open the store named by ``url``; ``kw`` goes to the backend's constructor
    (``capacity_bytes`` for disk, ``ttl_seconds``/``key_prefix`` for Redis and Redis Cluster,
    ``key_prefix``/``setup_timeout`` for Mooncake)."""
    if url.startswith("disk:"):
        from fdpd.kvstore.disk import DiskStore

        path, _, query = url[len("disk:"):].partition("?")
        if path.startswith("//"):          # disk:///abs/path
            path = path[2:]
        if not path:
            raise ValueError(f"KV store URL {url!r} names no directory; use disk:PATH")
        params = parse_qs(query)
        unknown = set(params) - {"capacity_mb"}
        if unknown:
            raise ValueError(f"unknown disk store parameter(s) {sorted(unknown)} in {url!r}; "
                             "the only one is capacity_mb")
        if "capacity_bytes" not in kw:
            mb = float(params.get("capacity_mb", [DEFAULT_DISK_CAPACITY_MB])[-1])
            kw["capacity_bytes"] = int(mb * (1 << 20))
        return DiskStore(path, timeout=timeout, **kw)
    if url.startswith(("redis://", "rediss://")):
        from fdpd.kvstore.redis_store import RedisStore

        return RedisStore(url, timeout=timeout, **kw)
    if url.startswith("redis-cluster://"):
        from fdpd.kvstore.redis_cluster import RedisClusterStore

        return RedisClusterStore(url, timeout=timeout, **kw)
    if url.startswith("mooncake://"):
        from fdpd.kvstore.mooncake_store import MooncakeStore

        return MooncakeStore(url, timeout=timeout, **kw)
    raise ValueError(f"unknown KV store URL {url!r}; accepted forms: {', '.join(URL_FORMS)}")
