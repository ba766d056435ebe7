"""The KV store contract that every backend (disk, Redis, Mooncake) implements.

A store holds opaque blobs (``fdpd.kvstore.codec`` objects) under binary keys (block prefix
hashes). It is a *cache*: any object may vanish at any time (eviction, TTL, a restarted
server), so every answer is a hint and a miss is always a correct answer. Validating what comes
back is the codec's job, not the store's.

Threading and time, for every method of every backend:
- The offload module calls a store from one worker thread, never from the engine loop and
  never under the scheduler's lock. Implementations are nevertheless thread-safe (the contract
  tests read and write from several threads).
- Every method returns within about ``timeout`` seconds or raises :class:`StoreUnavailable`;
  nothing blocks forever. A backend whose client library cannot bound a call runs it through
  :class:`DeadlineCaller`.
- Only :class:`StoreUnavailable` (the backend is down, slow or refused the operation) and
  ``ValueError`` (a bad key: the caller's bug) leave a method.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import TypeVar

T = TypeVar("T")
MAX_KEY_BYTES = 128


class StoreUnavailable(RuntimeError):
    """The backend is down, too slow (past the store's timeout) or refused the operation.
    The caller treats the operation as failed: a read is a miss, a write did not happen."""


@dataclass(frozen=True)
class StoreStats:
    """Counters since the store object was created. ``objects``/``bytes_stored`` are ``None``
    where the backend cannot tell cheaply (a shared Redis or Mooncake cluster)."""

    puts: int = 0
    gets: int = 0             # keys asked for by get/get_many
    hits: int = 0
    misses: int = 0
    bytes_written: int = 0
    bytes_read: int = 0
    errors: int = 0           # calls that raised StoreUnavailable or dropped a write
    evictions: int = 0        # objects this store object removed to stay under its capacity
    objects: int | None = None
    bytes_stored: int | None = None


class StatsCounter:
    """Thread-safe mutable counters behind :meth:`KVStore.stats`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values = {f.name: 0 for f in fields(StoreStats) if f.default == 0}

    def add(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                self._values[name] += delta

    def snapshot(self, objects: int | None = None, bytes_stored: int | None = None) -> StoreStats:
        with self._lock:
            return StoreStats(**self._values, objects=objects, bytes_stored=bytes_stored)


def check_key(key: bytes) -> bytes:
    if not isinstance(key, bytes) or not 0 < len(key) <= MAX_KEY_BYTES:
        raise ValueError(f"a KV store key is 1..{MAX_KEY_BYTES} bytes (a block prefix hash), "
                         f"got {type(key).__name__} {key!r:.40}")
    return key


class KVStore(ABC):
    """A cache of KV block objects. See the module docstring for threading and deadlines."""

    timeout: float
    #: False where ``put`` on an existing key keeps the first object (Mooncake: objects are
    #: immutable, which is what makes its writes atomic); replace with ``delete`` + ``put``.
    replaces_on_put: bool = True

    @abstractmethod
    def contains_prefix(self, keys: Sequence[bytes]) -> int:
        """How many LEADING ``keys`` are present: stops at the first absent key, so
        ``[k0, k1, missing, k3]`` gives 2. One batched round trip where the backend allows.
        A hint only: an object counted here may be gone by the time it is read. No mutation
        (does not refresh LRU recency)."""

    @abstractmethod
    def put(self, key: bytes, blob: bytes) -> None:
        """Store ``blob`` under ``key``, replacing any older object unless
        ``replaces_on_put`` is False (then the first object stays: keys are content hashes, so
        both are the same block). Atomic: a concurrent or later reader sees a whole object or
        nothing, never a mix. May evict other objects to stay under a capacity."""

    @abstractmethod
    def get(self, key: bytes) -> bytes | None:
        """The object's bytes, or ``None`` when absent. Refreshes LRU recency where the
        backend keeps one. The bytes are the caller's (no aliasing of store buffers)."""

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """``[get(k) for k in keys]``, in one round trip where the backend allows."""
        return [self.get(k) for k in keys]

    @abstractmethod
    def delete(self, key: bytes) -> None:
        """Remove the object if present; deleting an absent key is not an error."""

    @abstractmethod
    def stats(self) -> StoreStats:
        """A consistent snapshot of the counters. Never touches the backend."""

    @abstractmethod
    def close(self) -> None:
        """Release connections, files and threads. Idempotent; other calls afterwards raise
        :class:`StoreUnavailable`."""

    def __enter__(self) -> KVStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DeadlineCaller:
    """Runs blocking client calls on one private daemon thread, waiting at most a deadline.

    For client libraries that can block longer than our timeout (Mooncake's RPC retries take
    ~4.5 s per call against a dead master, its setup ~90 s). Calls from several threads run
    one at a time, each waiting at most its own deadline (queueing included). A call that
    overruns raises :class:`StoreUnavailable` and keeps running in the background; until it
    returns, further calls fail at once instead of queueing behind it, so a caller is never
    held longer than one deadline. The library must release the GIL while it blocks
    (pybind11 bindings that do IO do; the Mooncake dead-master test checks it).
    """

    def __init__(self, name: str):
        self._name = name
        self._cond = threading.Condition()
        self._job: tuple[Callable[[], object], list[object]] | None = None
        self._busy = False     # a call is queued or running on the thread
        self._stuck = False    # ... and it has overrun its caller's deadline
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _refuse(self) -> str | None:
        if self._closed:
            return "store is closed"
        if self._stuck:
            return "an earlier call is still stuck in the client library past its deadline"
        return None

    def call(self, fn: Callable[[], T], timeout: float) -> T:
        deadline = time.monotonic() + timeout
        box: list[object] = [False, None, None]   # done, value, exception
        with self._cond:
            free = self._cond.wait_for(lambda: not self._busy or self._refuse(), timeout)
            reason = self._refuse()
            if reason:
                raise StoreUnavailable(f"{self._name}: {reason}")
            if not free:
                raise StoreUnavailable(f"{self._name}: no turn within {timeout:.3g} s")
            self._busy = True
            self._job = (fn, box)
            self._cond.notify_all()
            if not self._cond.wait_for(lambda: box[0], max(0.0, deadline - time.monotonic())):
                self._stuck = True
                self._cond.notify_all()
                raise StoreUnavailable(f"{self._name}: no answer within {timeout:.3g} s")
        if box[2] is not None:
            raise box[2]  # type: ignore[misc]
        return box[1]  # type: ignore[return-value]

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._job is not None or self._closed)
                if self._job is None:
                    return
                fn, box = self._job
                self._job = None
            try:
                box[1] = fn()
            except BaseException as e:  # handed to the caller, not swallowed
                box[2] = e
            with self._cond:
                box[0] = True
                self._busy = self._stuck = False
                self._cond.notify_all()
