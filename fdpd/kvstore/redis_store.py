"""A Redis (or Redis-protocol) server as the shared KV store of a multi-host cluster.

One object = one Redis string under ``key_prefix + key`` (binary keys, no hex). Redis runs each
command atomically, so ``put`` is one SET (optionally with EX) and a reader sees the old value,
the new one or nothing. Size and eviction are the server's: run it with ``maxmemory`` and
``maxmemory-policy allkeys-lru`` (our ``evictions``/``objects`` counters stay 0/None).

Deadlines: ``socket_timeout`` and ``socket_connect_timeout`` are the store's ``timeout`` and
redis-py's retries are off, so a dead server fails a call at once (connection refused/reset)
and a stalled one within one timeout per socket operation (connect, then read: ~2x timeout in
the worst case). Every redis-py error becomes :class:`StoreUnavailable` and counts in ``errors``;
the client reconnects by itself on the next call once the server is back.
"""

from __future__ import annotations

from collections.abc import Sequence

from fdpd.kvstore.base import KVStore, StatsCounter, StoreStats, StoreUnavailable, check_key

try:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry
except ImportError:  # pragma: no cover - depends on the install
    redis = None


class RedisStore(KVStore):
    def __init__(self, url: str, timeout: float = 2.0, ttl_seconds: int | None = None,
                 key_prefix: bytes = b"fdpd:kv:"):
        if redis is None:
            raise RuntimeError("the redis KV store needs redis-py: pip install 'redis>=5' hiredis")
        if ttl_seconds is not None and ttl_seconds <= 0:
            raise ValueError(f"ttl_seconds must be positive or None, got {ttl_seconds}")
        self.url = url
        self.timeout = timeout
        self.ttl_seconds = ttl_seconds
        self.key_prefix = bytes(key_prefix)
        self._counters = StatsCounter()
        self._closed = False
        self._client = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0), retry_on_timeout=False, health_check_interval=0)

    def _k(self, key: bytes) -> bytes:
        return self.key_prefix + check_key(key)

    def _fail(self, what: str, e: Exception) -> StoreUnavailable:
        self._counters.add(errors=1)
        return StoreUnavailable(f"redis store {self.url}: {what} failed: "
                                f"{type(e).__name__}: {e}")

    def _check_open(self) -> None:
        if self._closed:
            raise StoreUnavailable(f"redis store {self.url} is closed")

    def contains_prefix(self, keys: Sequence[bytes]) -> int:
        self._check_open()
        if not keys:
            return 0
        names = [self._k(k) for k in keys]
        try:
            pipe = self._client.pipeline(transaction=False)
            for name in names:
                pipe.exists(name)
            present = pipe.execute()
        except redis.RedisError as e:
            raise self._fail("EXISTS", e) from e
        for n, hit in enumerate(present):
            if not hit:
                return n
        return len(keys)

    def put(self, key: bytes, blob: bytes) -> None:
        self._check_open()
        name = self._k(key)
        try:
            self._client.set(name, blob, ex=self.ttl_seconds)
        except redis.RedisError as e:
            raise self._fail("SET", e) from e
        self._counters.add(puts=1, bytes_written=len(blob))

    def get(self, key: bytes) -> bytes | None:
        return self.get_many([key])[0]

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        self._check_open()
        if not keys:
            return []
        names = [self._k(k) for k in keys]
        try:
            blobs = self._client.mget(names)
        except redis.RedisError as e:
            self._counters.add(gets=len(keys))
            raise self._fail("GET", e) from e
        hits = [b for b in blobs if b is not None]
        self._counters.add(gets=len(keys), hits=len(hits), misses=len(keys) - len(hits),
                           bytes_read=sum(len(b) for b in hits))
        return blobs

    def delete(self, key: bytes) -> None:
        self._check_open()
        try:
            self._client.delete(self._k(key))
        except redis.RedisError as e:
            raise self._fail("DEL", e) from e

    def stats(self) -> StoreStats:
        return self._counters.snapshot()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._client.close()
        except redis.RedisError:
            pass   # closing a connection to a dead server: nothing left to release
