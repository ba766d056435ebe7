"""A Redis (or Redis-protocol) server as the shared KV store of a multi-host cluster.

The object layout, batching and counters are :mod:`fdpd.kvstore.redis_base`'s; here every key
lives on the one server, so a batch is one pipeline (one MGET, or one EXISTS per key).

Deadlines: ``socket_timeout`` and ``socket_connect_timeout`` are the store's ``timeout`` and
redis-py's retries are off, so a dead server fails a call at once (connection refused/reset)
and a stalled one within one timeout per socket operation (connect, then read: ~2x timeout in
the worst case). Every redis-py error becomes :class:`StoreUnavailable` and counts in ``errors``;
the client reconnects by itself on the next call once the server is back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fdpd.kvstore.redis_base import REDIS_MISSING, KeyGroup, RedisProtocolStore

try:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry
except ImportError:  # pragma: no cover - depends on the install
    redis = None


class RedisStore(RedisProtocolStore):
    def __init__(self, url: str, timeout: float = 2.0, ttl_seconds: int | None = None,
                 key_prefix: bytes = b"fdpd:kv:"):
        if redis is None:
            raise RuntimeError(REDIS_MISSING)
        super().__init__(url, timeout, ttl_seconds, key_prefix)
        self._client = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0), retry_on_timeout=False, health_check_interval=0)

    def _route(self, names: Sequence[bytes]) -> list[KeyGroup]:
        return [KeyGroup(self._client, [list(range(len(names)))])]

    def _client_for(self, name: bytes) -> Any:
        return self._client

    def _close_clients(self) -> None:
        self._client.close()
