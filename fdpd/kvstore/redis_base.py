"""What the single-server Redis store and the Redis Cluster store share: one object = one Redis
string under ``key_prefix + key`` (binary keys, no hex), written by one SET, read by batched
GET/EXISTS pipelines, with the same counters and errors.

The backends differ only in *where* a key lives: :meth:`RedisProtocolStore._route` splits a batch
into groups that one connection can answer in one round trip (the single server: everything; the
cluster: one group per shard, one MGET per hash slot inside it, so no command ever spans slots).
A group whose server fails is a miss for its keys; a batch in which every group failed raises
:class:`StoreUnavailable` (so a single dead server behaves as before: the call fails).

Redis runs each command atomically, so ``put`` is one SET (optionally with EX) and a reader sees
the old value, the new one or nothing. Size and eviction are the server's: run it with
``maxmemory`` and ``maxmemory-policy allkeys-lru`` (our ``evictions``/``objects`` counters stay
0/None).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import Any, NamedTuple

from fdpd.kvstore.base import KVStore, StatsCounter, StoreStats, StoreUnavailable, check_key

try:
    import redis
except ImportError:  # pragma: no cover - depends on the install
    redis = None

REDIS_MISSING = "the redis KV store needs redis-py: pip install 'redis>=5' hiredis"


class KeyGroup(NamedTuple):
    """Positions of a batch that one connection answers in one pipeline; ``slots`` splits
    ``positions`` into runs that one multi-key command may carry (same hash slot)."""

    client: Any                      # a redis.Redis talking to one server
    slots: list[list[int]]


class RedisProtocolStore(KVStore):
    """A store on servers that speak the Redis protocol; subclasses say how keys route."""

    kind = "redis"

    def __init__(self, url: str, timeout: float, ttl_seconds: int | None, key_prefix: bytes):
        if redis is None:
            raise RuntimeError(REDIS_MISSING)
        if ttl_seconds is not None and ttl_seconds <= 0:
            raise ValueError(f"ttl_seconds must be positive or None, got {ttl_seconds}")
        self.url = url
        self.timeout = timeout
        self.ttl_seconds = ttl_seconds
        self.key_prefix = bytes(key_prefix)
        self._counters = StatsCounter()
        self._closed = False

    # ------------------------------------------------------------------ what backends provide
    @abstractmethod
    def _route(self, names: Sequence[bytes]) -> list[KeyGroup]:
        """Split ``names`` (prefixed keys) into groups; raises :class:`StoreUnavailable` when
        no route is known at all (a cluster whose every node is unreachable)."""

    @abstractmethod
    def _client_for(self, name: bytes) -> Any:
        """The redis.Redis that owns ``name``."""

    def _server_failed(self, error: Exception) -> None:
        """Called after a server failed a command (a hook: the cluster refreshes its map)."""

    @abstractmethod
    def _close_clients(self) -> None:
        """Release every connection."""

    # ------------------------------------------------------------------ the contract
    def _k(self, key: bytes) -> bytes:
        return self.key_prefix + check_key(key)

    def _fail(self, what: str, e: Exception) -> StoreUnavailable:
        self._counters.add(errors=1)
        self._server_failed(e)
        return StoreUnavailable(f"{self.kind} store {self.url}: {what} failed: "
                                f"{type(e).__name__}: {e}")

    def _check_open(self) -> None:
        if self._closed:
            raise StoreUnavailable(f"{self.kind} store {self.url} is closed")

    def _read_many(self, command: str, names: list[bytes]) -> list[Any]:
        """``command`` (EXISTS or GET) for each name, in one pipeline per group; a failed
        group's answers are ``None`` (a miss). Raises only when every group failed."""
        results: list[Any] = [None] * len(names)
        groups = self._route(names)
        failures: list[Exception] = []
        for group in groups:
            try:
                pipe = group.client.pipeline(transaction=False)
                for run in group.slots:
                    if command == "GET":
                        pipe.mget([names[i] for i in run])
                    else:
                        for i in run:
                            pipe.exists(names[i])
                replies = pipe.execute()
            except redis.RedisError as e:
                failures.append(e)
                continue
            if command == "GET":
                for run, values in zip(group.slots, replies):
                    for i, value in zip(run, values):
                        results[i] = value
            else:
                flat = [i for run in group.slots for i in run]
                for i, value in zip(flat, replies):
                    results[i] = value
        if failures:
            errors = [self._fail(command, e) for e in failures]
            if len(failures) == len(groups):
                raise errors[0] from failures[0]
        return results

    def contains_prefix(self, keys: Sequence[bytes]) -> int:
        self._check_open()
        if not keys:
            return 0
        present = self._read_many("EXISTS", [self._k(k) for k in keys])
        for n, hit in enumerate(present):
            if not hit:
                return n
        return len(keys)

    def put(self, key: bytes, blob: bytes) -> None:
        self._check_open()
        name = self._k(key)
        try:
            self._client_for(name).set(name, blob, ex=self.ttl_seconds)
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
            blobs = self._read_many("GET", names)
        except StoreUnavailable:
            self._counters.add(gets=len(keys))
            raise
        hits = [b for b in blobs if b is not None]
        self._counters.add(gets=len(keys), hits=len(hits), misses=len(keys) - len(hits),
                           bytes_read=sum(len(b) for b in hits))
        return blobs

    def delete(self, key: bytes) -> None:
        self._check_open()
        name = self._k(key)
        try:
            self._client_for(name).delete(name)
        except redis.RedisError as e:
            raise self._fail("DEL", e) from e

    def stats(self) -> StoreStats:
        return self._counters.snapshot()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._close_clients()
        except redis.RedisError:
            pass   # closing a connection to a dead server: nothing left to release
