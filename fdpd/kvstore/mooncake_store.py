"""Mooncake Store (``mooncake-transfer-engine``) as a shared, memory-pooled KV store.

URL: ``mooncake://MASTER_HOST:PORT?metadata=P2PHANDSHAKE&protocol=tcp&segment_mb=256``
with optional ``buffer_mb`` (client transfer buffer, must exceed the largest object),
``local_hostname`` (default: the local address that routes to the master) and ``device``
(RDMA device names for ``protocol=rdma``). ``metadata`` is ``P2PHANDSHAKE`` (default, no
metadata server) or an ``http://...`` / ``etcd://...`` metadata server.

What the library does, as measured with 0.3.13 (non-CUDA wheel, TCP):
- Each client contributes ``segment_mb`` of its own memory to the cluster's pool; objects live
  in some client's segment, so a store is only as durable as the clients that host it.
- ``put`` on an existing key succeeds and keeps the OLD value: objects are immutable, which is
  what makes ``put`` atomic (a reader in another client sees the whole object or nothing).
  ``upsert`` is NOT atomic: while one key was upserted 300 times, a reader in another client
  got misses and torn objects (codec checksum failures). So ``put`` here keeps
  the first object (``replaces_on_put = False``); keys are content hashes, so it is the same
  block. To replace a bad object, ``delete`` then ``put``.
- ``delete`` forces removal past the master's read lease (``default_kv_lease_ttl``, 10 s after
  each get, otherwise -706). A read racing the delete of the same key could then see a torn
  object; the codec rejects it (checksum) and it is a miss.
- A full pool fails writes (-600) rather than evicting objects still under a read lease.
- ``get`` returns ``b""`` both for a missing key and on an RPC failure, so a failed read is
  counted as a miss; ``is_exist``/``remove`` return negative codes (-704 not found, -900 RPC).
- Against a dead master each call blocks ~4.5 s and a new client's ``setup`` ~90 s, so every
  call goes through :class:`DeadlineCaller` (the bindings release the GIL while blocked).
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from typing import TypeVar
from urllib.parse import parse_qs, urlsplit

from fdpd.kvstore.base import (
    DeadlineCaller,
    KVStore,
    StatsCounter,
    StoreStats,
    StoreUnavailable,
    check_key,
)

T = TypeVar("T")
_OBJECT_NOT_FOUND = -704


def _route_address(host: str, port: int) -> str:
    """The local IP this host would use to reach ``host`` (no packet is sent)."""
    if host in ("localhost", "127.0.0.1", "::1"):
        return "127.0.0.1"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, port))
            return s.getsockname()[0]
    except OSError:
        return socket.gethostbyname(socket.gethostname())


def parse_mooncake_url(url: str) -> dict[str, object]:
    parts = urlsplit(url)
    if parts.scheme != "mooncake" or not parts.hostname or not parts.port:
        raise ValueError(f"bad Mooncake store URL {url!r}; expected "
                         "mooncake://MASTER_HOST:PORT?metadata=P2PHANDSHAKE&protocol=tcp"
                         "&segment_mb=256")
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    known = {"metadata", "protocol", "segment_mb", "buffer_mb", "local_hostname", "device"}
    unknown = set(query) - known
    if unknown:
        raise ValueError(f"unknown Mooncake URL parameter(s) {sorted(unknown)}; known: "
                         f"{sorted(known)}")
    return {
        "master": f"{parts.hostname}:{parts.port}",
        "metadata": query.get("metadata", "P2PHANDSHAKE"),
        "protocol": query.get("protocol", "tcp"),
        "segment_bytes": int(float(query.get("segment_mb", 256)) * (1 << 20)),
        "buffer_bytes": int(float(query.get("buffer_mb", 64)) * (1 << 20)),
        "local_hostname": query.get("local_hostname") or _route_address(parts.hostname,
                                                                         parts.port),
        "device": query.get("device", ""),
    }


class MooncakeStore(KVStore):
    replaces_on_put = False

    def __init__(self, url: str, timeout: float = 2.0, key_prefix: str | bytes = "fdpd:kv:",
                 setup_timeout: float | None = None):
        self.config = parse_mooncake_url(url)
        try:
            from mooncake.store import MooncakeDistributedStore
        except (ImportError, OSError) as e:
            raise RuntimeError("the mooncake KV store needs the Mooncake wheel: pip install "
                               "mooncake-transfer-engine-non-cuda (and apt-get install "
                               f"libibverbs1): {e}") from e
        self.url = url
        self.timeout = timeout
        # Mooncake keys are strings: our binary keys travel as hex after this prefix.
        self.key_prefix = key_prefix.decode() if isinstance(key_prefix, bytes) else key_prefix
        self._counters = StatsCounter()
        self._closed = False
        self._caller = DeadlineCaller("mooncake-store")
        self._store = MooncakeDistributedStore()
        c = self.config
        try:
            rc = self._caller.call(lambda: self._store.setup(
                c["local_hostname"], c["metadata"], c["segment_bytes"], c["buffer_bytes"],
                c["protocol"], c["device"], c["master"]),
                setup_timeout if setup_timeout is not None else max(10.0, 5 * timeout))
        except StoreUnavailable as e:
            self._caller.close()
            raise StoreUnavailable(f"mooncake store: no master at {c['master']}? {e}") from e
        if rc != 0:
            self._caller.close()
            raise StoreUnavailable(f"mooncake store: setup against master {c['master']} "
                                   f"failed with code {rc}")

    def _k(self, key: bytes) -> str:
        return self.key_prefix + check_key(key).hex()

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        if self._closed:
            raise StoreUnavailable(f"mooncake store {self.url} is closed")
        try:
            return self._caller.call(fn, self.timeout)
        except StoreUnavailable as e:
            self._counters.add(errors=1)
            raise StoreUnavailable(f"mooncake store: {what}: {e}") from e

    def _fail(self, what: str, rc: int) -> StoreUnavailable:
        self._counters.add(errors=1)
        return StoreUnavailable(f"mooncake store {self.config['master']}: {what} failed "
                                f"with code {rc}")

    def contains_prefix(self, keys: Sequence[bytes]) -> int:
        if not keys:
            return 0
        names = [self._k(k) for k in keys]
        codes = self._call("batch_is_exist", lambda: self._store.batch_is_exist(names))
        for n, code in enumerate(codes):
            if code == 0:
                return n
            if code != 1:
                raise self._fail("batch_is_exist", code)
        return len(keys)

    def put(self, key: bytes, blob: bytes) -> None:
        name = self._k(key)
        rc = self._call("put", lambda: self._store.put(name, blob))
        if rc != 0:
            raise self._fail("put", rc)
        self._counters.add(puts=1, bytes_written=len(blob))

    def get(self, key: bytes) -> bytes | None:
        return self.get_many([key])[0]

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        if not keys:
            return []
        names = [self._k(k) for k in keys]
        try:
            if len(names) == 1:
                raw = [self._call("get", lambda: self._store.get(names[0]))]
            else:
                raw = self._call("get_batch", lambda: self._store.get_batch(names))
        except StoreUnavailable:
            self._counters.add(gets=len(keys))
            raise
        blobs = [bytes(b) if b else None for b in raw]   # b"" = missing (or a failed read)
        hits = [b for b in blobs if b is not None]
        self._counters.add(gets=len(keys), hits=len(hits), misses=len(keys) - len(hits),
                           bytes_read=sum(len(b) for b in hits))
        return blobs

    def delete(self, key: bytes) -> None:
        name = self._k(key)
        # force: skip the read lease, which otherwise refuses removal for 10 s after a get
        rc = self._call("remove", lambda: self._store.remove(name, True))
        if rc not in (0, _OBJECT_NOT_FOUND):
            raise self._fail("remove", rc)

    def stats(self) -> StoreStats:
        return self._counters.snapshot()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            # Unmounts this client's segment: objects it hosted leave the pool.
            self._caller.call(self._store.close, self.timeout)
        except StoreUnavailable:
            pass   # master unreachable: the library finishes (or not) in the background
        finally:
            self._caller.close()
