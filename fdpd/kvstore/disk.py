"""The embedded default store: one file per object in a local directory, capped, LRU.

Layout: ``PATH/ab/abcdef...`` (the key's hex, fanned out by its first two hex digits so no
directory grows past ~1/256 of the objects), plus ``PATH/.lock``.

- Atomic writes: the blob goes to a temp file in the object's own directory, then
  ``os.replace`` swaps it in, so a reader opens the old file, the new one, or none. No fsync:
  this is a cache, and a file torn by a power cut fails the codec's length/checksum check.
- LRU: an in-memory ``OrderedDict`` index (key -> size), oldest first. ``get`` refreshes
  recency and also stamps the file's mtime with a strictly increasing clock, so a restarted
  store rebuilds the same order from the directory (the kernel's own mtimes are too coarse,
  ~4 ms, to order back-to-back writes).
- Restart: the index is rebuilt from the directory; temp files left by a crashed writer are
  deleted, anything else unrecognised is left alone.
- One owner: an exclusive ``flock`` on ``PATH/.lock`` (released when the process dies), since
  two processes evicting from one directory would each count only their own bytes.
- ``timeout`` cannot bound a local syscall; keep ``PATH`` on a local filesystem.
"""

from __future__ import annotations

import fcntl
import itertools
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence

from fdpd.kvstore.base import KVStore, StatsCounter, StoreStats, StoreUnavailable, check_key

_TMP_SUFFIX = ".tmp"
_HEX = frozenset("0123456789abcdef")


class DiskStore(KVStore):
    def __init__(self, path: str | os.PathLike[str], capacity_bytes: int,
                 timeout: float = 2.0):
        if capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be positive, got {capacity_bytes}")
        self.path = os.fspath(path)
        self.capacity_bytes = int(capacity_bytes)
        self.timeout = timeout
        self._lock = threading.Lock()
        self._index: OrderedDict[bytes, int] = OrderedDict()   # key -> file size, LRU first
        self._total = 0
        self._last_stamp = 0
        self._tmp_ids = itertools.count()
        self._counters = StatsCounter()
        self._closed = False
        os.makedirs(self.path, exist_ok=True)
        self._lock_fd = os.open(os.path.join(self.path, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            raise RuntimeError(f"KV store directory {self.path} is in use by another process; "
                               "give each instance its own disk path, or share a redis:// "
                               "store") from None
        self._rebuild()

    # ----------------------------------------------------------------- layout
    def _file(self, key: bytes) -> str:
        name = key.hex()
        return os.path.join(self.path, name[:2], name)

    def _rebuild(self) -> None:
        found: list[tuple[int, str, bytes, int]] = []
        with os.scandir(self.path) as top:
            subdirs = [e.path for e in top if e.is_dir(follow_symlinks=False) and len(e.name) == 2]
        for sub in subdirs:
            with os.scandir(sub) as entries:
                for e in entries:
                    if e.name.endswith(_TMP_SUFFIX):
                        try:
                            os.unlink(e.path)   # a crashed writer's leftover
                        except FileNotFoundError:
                            pass
                        continue
                    if not (e.is_file(follow_symlinks=False) and e.name[:2] == sub[-2:]
                            and len(e.name) % 2 == 0 and set(e.name) <= _HEX):
                        continue
                    st = e.stat(follow_symlinks=False)
                    found.append((st.st_mtime_ns, e.name, bytes.fromhex(e.name), st.st_size))
        found.sort()
        for mtime_ns, _, key, size in found:
            self._index[key] = size
            self._total += size
            self._last_stamp = max(self._last_stamp, mtime_ns)
        with self._lock:
            self._evict_locked(0)

    def _stamp(self, path: str) -> None:
        """Give ``path`` an mtime later than every earlier stamp (the persisted LRU order)."""
        self._last_stamp = stamp = max(time.time_ns(), self._last_stamp + 1)
        os.utime(path, ns=(stamp, stamp))

    def _evict_locked(self, incoming: int) -> None:
        while self._index and self._total + incoming > self.capacity_bytes:
            key, size = self._index.popitem(last=False)
            self._total -= size
            try:
                os.unlink(self._file(key))
            except FileNotFoundError:
                pass
            self._counters.add(evictions=1)

    def _check_open(self) -> None:
        if self._closed:
            raise StoreUnavailable(f"disk store {self.path} is closed")

    # ----------------------------------------------------------------- contract
    def contains_prefix(self, keys: Sequence[bytes]) -> int:
        self._check_open()
        with self._lock:
            for n, key in enumerate(keys):
                if check_key(key) not in self._index:
                    return n
        return len(keys)

    def put(self, key: bytes, blob: bytes) -> None:
        self._check_open()
        final = self._file(check_key(key))
        size = len(blob)
        if size > self.capacity_bytes:
            self._counters.add(errors=1)   # dropped: it could never fit
            return
        directory = os.path.dirname(final)
        tmp = f"{final}.{os.getpid()}.{next(self._tmp_ids)}{_TMP_SUFFIX}"
        try:
            os.makedirs(directory, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(blob)
            with self._lock:
                old = self._index.pop(key, None)
                if old is not None:
                    self._total -= old
                self._evict_locked(size)
                os.replace(tmp, final)
                self._stamp(final)
                self._index[key] = size
                self._total += size
        except OSError as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            self._counters.add(errors=1)
            raise StoreUnavailable(f"disk store {self.path}: write failed: {e}") from e
        self._counters.add(puts=1, bytes_written=size)

    def get(self, key: bytes) -> bytes | None:
        self._check_open()
        path = self._file(check_key(key))
        with self._lock:
            present = key in self._index
        blob = None
        if present:
            try:
                # Outside the lock: an eviction may unlink the file meanwhile; an open file
                # stays readable after unlink, an unlinked one is a miss.
                with open(path, "rb") as f:
                    blob = f.read()
            except FileNotFoundError:
                pass
            except OSError as e:
                self._counters.add(gets=1, errors=1)
                raise StoreUnavailable(f"disk store {self.path}: read failed: {e}") from e
        with self._lock:
            if blob is not None and key in self._index:
                self._index.move_to_end(key)
                try:
                    self._stamp(path)
                except OSError:
                    pass
            elif present and key in self._index and not os.path.exists(path):
                self._total -= self._index.pop(key)   # file removed behind our back
        if blob is None:
            self._counters.add(gets=1, misses=1)
        else:
            self._counters.add(gets=1, hits=1, bytes_read=len(blob))
        return blob

    def delete(self, key: bytes) -> None:
        self._check_open()
        path = self._file(check_key(key))
        with self._lock:
            size = self._index.pop(key, None)
            if size is not None:
                self._total -= size
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as e:
                self._counters.add(errors=1)
                raise StoreUnavailable(f"disk store {self.path}: delete failed: {e}") from e

    def stats(self) -> StoreStats:
        with self._lock:
            objects, total = len(self._index), self._total
        return self._counters.snapshot(objects=objects, bytes_stored=total)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        os.close(self._lock_fd)   # releases the flock
