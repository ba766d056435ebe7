"""A KV store wrapper that misbehaves on demand, for hazard tests of the offload path.

Every knob is a plain attribute a test flips while the store is in use:

- ``down``: every call raises :class:`StoreUnavailable` at once;
- ``slow_seconds``: sleep before each call; with ``timeout`` set, a delay past it sleeps
  ``timeout`` and raises, as a well-behaved backend against a slow server would;
- ``block_writes``: a ``threading.Event``; ``put`` waits for it to be set before writing (a
  write held in flight, to prove its blocks stay pinned), but at most ``max_block`` seconds,
  then raises, so a forgotten event never hangs a test;
- ``corrupt_reads``: flip one byte (at ``corrupt_offset``) of every blob returned;
- ``lie_contains``: ``contains_prefix`` claims every key is present.

``calls`` counts calls by method name (also the failed ones); ``blocked_puts`` is how many
``put`` calls wait on ``block_writes`` right now (see :meth:`wait_for_blocked_put`).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Sequence

from fdpd.kvstore.base import KVStore, StoreStats, StoreUnavailable


class FaultyStore(KVStore):
    def __init__(self, inner: KVStore, timeout: float | None = None, max_block: float = 10.0):
        self.inner = inner
        self.timeout = timeout if timeout is not None else inner.timeout
        self.replaces_on_put = inner.replaces_on_put
        self._strict_timeout = timeout
        self.max_block = max_block
        self.down = False
        self.slow_seconds = 0.0
        self.block_writes: threading.Event | None = None
        self.corrupt_reads = False
        self.corrupt_offset = -1
        self.lie_contains = False
        self.calls: Counter[str] = Counter()
        self.blocked_puts = 0
        self._cond = threading.Condition()

    def _enter(self, method: str) -> None:
        with self._cond:
            self.calls[method] += 1
        if self.down:
            raise StoreUnavailable(f"faulty store: down ({method})")
        delay = self.slow_seconds
        if delay > 0:
            limit = self._strict_timeout
            if limit is not None and delay > limit:
                time.sleep(limit)
                raise StoreUnavailable(f"faulty store: {method} slower than {limit} s")
            time.sleep(delay)

    def _corrupt(self, blob: bytes | None) -> bytes | None:
        if blob is None or not self.corrupt_reads or not blob:
            return blob
        damaged = bytearray(blob)
        damaged[self.corrupt_offset % len(damaged)] ^= 0xFF
        return bytes(damaged)

    def wait_for_blocked_put(self, timeout: float = 5.0) -> bool:
        """Wait until some ``put`` is held by ``block_writes``; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self.blocked_puts > 0, timeout)

    def contains_prefix(self, keys: Sequence[bytes]) -> int:
        self._enter("contains_prefix")
        if self.lie_contains:
            return len(keys)
        return self.inner.contains_prefix(keys)

    def put(self, key: bytes, blob: bytes) -> None:
        self._enter("put")
        gate = self.block_writes
        if gate is not None:
            with self._cond:
                self.blocked_puts += 1
                self._cond.notify_all()
            try:
                released = gate.wait(self.max_block)
            finally:
                with self._cond:
                    self.blocked_puts -= 1
            if not released:
                raise StoreUnavailable(f"faulty store: put held past max_block="
                                       f"{self.max_block} s")
            if self.down:
                raise StoreUnavailable("faulty store: went down during put")
        self.inner.put(key, blob)

    def get(self, key: bytes) -> bytes | None:
        self._enter("get")
        return self._corrupt(self.inner.get(key))

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        self._enter("get_many")
        return [self._corrupt(b) for b in self.inner.get_many(keys)]

    def delete(self, key: bytes) -> None:
        self._enter("delete")
        self.inner.delete(key)

    def stats(self) -> StoreStats:
        return self.inner.stats()

    def close(self) -> None:
        with self._cond:
            self.calls["close"] += 1
        self.inner.close()
