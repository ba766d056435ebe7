"""Write-back and restore of KV blocks through a KV store, off the engine loop (DESIGN 7).

One worker thread talks to the store; the engine thread only enqueues jobs and, once per step,
collects results (``poll``). Block ownership makes this safe without a lock around the cache:

- a write-back reads blocks that are *pinned*: the BlockManager holds them under an owner
  ``wb:<request>:<n>`` until the worker reports the write finished, so they cannot be freed or
  reused while they are read (FastDeploy #7107 wrote back under the scheduler lock instead);
- a restore writes blocks that belong to a request in the scheduler's ``loading`` set, which no
  step schedules, so no forward pass reads them while they fill (the NaN of FastDeploy #6724);
- the worker never touches the request: it gets the keys (a snapshot of the block hashes) and
  block ids by value (FastDeploy #7107 mutated the prompt while writing).

A store that is slow, down or returns bad objects only produces misses: every store call has a
deadline (the store's timeout), a corrupt object fails its checksum, and a failed restore
leaves the request to recompute what did not load.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from fdpd.engine.block_manager import BlockManager
from fdpd.engine.request import Request
from fdpd.faults import fault_point
from fdpd.kvstore.base import KVStore, StoreUnavailable
from fdpd.kvstore.codec import KVObjectError, decode_block, encode_block

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WriteDone:
    owner: str
    written: int
    skipped: int              # already in the store
    failed: int
    seconds: float


@dataclass(frozen=True)
class LookupDone:
    req_id: str
    start: int                # block index the lookup began at
    present: int              # leading keys from ``start`` that the store holds


@dataclass(frozen=True)
class LoadDone:
    req_id: str
    loaded: int               # leading blocks restored intact
    seconds: float


@dataclass
class OffloadStats:
    blocks_written: int = 0
    blocks_skipped: int = 0
    bytes_written: int = 0
    blocks_restored: int = 0
    bytes_restored: int = 0
    lookups: int = 0
    lookup_blocks: int = 0    # blocks asked about (hits + misses)
    lookup_hit_blocks: int = 0
    store_errors: int = 0
    corrupt_objects: int = 0
    dropped_writes: int = 0   # the job queue was full: KV simply not stored
    write_seconds: list[float] = field(default_factory=list)
    restore_seconds: list[float] = field(default_factory=list)

    def take_latencies(self) -> tuple[list[float], list[float]]:
        w, r = self.write_seconds, self.restore_seconds
        self.write_seconds, self.restore_seconds = [], []
        return w, r


class KVOffload:
    def __init__(self, store: KVStore, kv_cache: torch.Tensor, fingerprint: bytes,
                 max_jobs: int = 1024):
        self.store = store
        self.kv_cache = kv_cache
        self.fingerprint = fingerprint
        self.block_shape = tuple(kv_cache.shape[1:])     # block-major: kv_cache[b] is a block
        self.stats = OffloadStats()
        self._jobs: queue.Queue = queue.Queue(max_jobs)
        # queue.Queue, not SimpleQueue: on CPython 3.11 SimpleQueue.get(timeout) can wait
        # forever when a signal handler runs during the wait (see transport.py).
        self._done: queue.Queue = queue.Queue()
        self._pending = 0
        self._worker = threading.Thread(target=self._run, name="kv-offload", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------ engine thread
    def submit(self, job: tuple) -> bool:
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            return False
        self._pending += 1
        return True

    def poll(self, timeout: float = 0.0) -> list:
        """Results of finished jobs; waits up to ``timeout`` for the first one."""
        out = []
        try:
            out.append(self._done.get(timeout=timeout) if timeout else self._done.get_nowait())
            while True:
                out.append(self._done.get_nowait())
        except queue.Empty:
            pass
        self._pending -= len(out)
        return out

    @property
    def pending(self) -> int:
        return self._pending

    def close(self) -> None:
        self._jobs.put(None)
        self._worker.join(10)
        self.store.close()

    # ------------------------------------------------------------------ worker thread
    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            kind, *args = job
            try:
                result = getattr(self, f"_do_{kind}")(*args)
            except Exception:  # a bug here must not kill the worker and strand pinned blocks
                log.exception("KV offload job %s failed", kind)
                self.stats.store_errors += 1
                result = self._failed(kind, *args)
            self._done.put(result)

    def _failed(self, kind: str, *args):
        if kind == "write":
            return WriteDone(args[0], 0, 0, len(args[1]), 0.0)
        if kind == "lookup":
            return LookupDone(args[0], args[1], 0)
        return LoadDone(args[0], 0, 0.0)

    def _do_write(self, owner: str, block_ids: Sequence[int], keys: Sequence[bytes]):
        t0 = time.monotonic()
        try:
            skip = self.store.contains_prefix(keys)
        except StoreUnavailable:
            skip = 0
        written = failed = 0
        for b, key in zip(block_ids[skip:], keys[skip:]):
            fault_point("kvstore.write")
            try:
                blob = encode_block(self.fingerprint, self.kv_cache[b], key=key)
                self.store.put(key, blob)
            except StoreUnavailable:
                failed += 1
                self.stats.store_errors += 1
                break                      # the store is down or full: stop, don't hammer it
            written += 1
            self.stats.bytes_written += len(blob)
        failed += len(keys) - skip - written - failed
        self.stats.blocks_written += written
        self.stats.blocks_skipped += skip
        seconds = time.monotonic() - t0
        self.stats.write_seconds.append(seconds)
        return WriteDone(owner, written, skip, failed, seconds)

    def _do_lookup(self, req_id: str, start: int, keys: Sequence[bytes]):
        self.stats.lookups += 1
        self.stats.lookup_blocks += len(keys)
        try:
            present = self.store.contains_prefix(keys)
        except StoreUnavailable:
            self.stats.store_errors += 1
            present = 0
        self.stats.lookup_hit_blocks += present
        return LookupDone(req_id, start, present)

    def _do_load(self, req_id: str, block_ids: Sequence[int], keys: Sequence[bytes]):
        t0 = time.monotonic()
        fault_point("kvstore.restore")
        try:
            blobs = self.store.get_many(keys)
        except StoreUnavailable:
            self.stats.store_errors += 1
            blobs = []
        loaded = 0
        for b, key, blob in zip(block_ids, keys, blobs):
            if blob is None:
                break
            try:
                block = decode_block(blob, self.fingerprint, self.kv_cache.dtype,
                                     self.block_shape, key=key)
            except KVObjectError as e:
                self.stats.corrupt_objects += 1
                log.warning("KV object %s... rejected (%s): recomputing", key.hex()[:12], e)
                break
            self.kv_cache[b].copy_(block)
            loaded += 1
            self.stats.bytes_restored += len(blob)
        self.stats.blocks_restored += loaded
        seconds = time.monotonic() - t0
        self.stats.restore_seconds.append(seconds)
        return LoadDone(req_id, loaded, seconds)


class StorePreemption:
    """The preemption handler that keeps the victim's KV: its full, computed blocks are written
    to the store while pinned, and return to the pool when the write is acknowledged. Restores
    leading blocks on readmission. With ``write_finished``, finished requests' KV is written
    too (output caching, for the next turn of a conversation on any instance)."""

    restores = True

    def __init__(self, offload: KVOffload, write_finished: bool = False):
        self.offload = offload
        self.write_finished = write_finished
        self.releasing: dict[str, int] = {}         # write-back owner -> blocks it pins
        self._checkpointed: dict[str, int] = {}     # running request -> leading blocks written
        self._seq = 0

    def preempt(self, request: Request, block_manager: BlockManager) -> None:
        self._write_back(request, block_manager)

    def retire(self, request: Request, block_manager: BlockManager) -> None:
        if self.write_finished:
            self._write_back(request, block_manager)
        else:
            block_manager.free(request.request_id)

    def releasing_blocks(self) -> int:
        return sum(self.releasing.values())

    def checkpoint(self, running: Sequence[Request], bm: BlockManager) -> None:
        """Write the running requests' newly filled blocks to the store
        (``--kv-store-checkpoint``), so that whoever resumes one after this instance died
        restores its KV. A full block no longer changes; each is pinned by a second owner
        (``ck:<request>:<n>``, a shared reference) until its write is acknowledged, so it
        cannot be freed and reused while the worker reads it, whatever the request does."""
        written = self._checkpointed
        self._checkpointed = {}
        for req in running:
            rid = req.request_id
            done = written.get(rid, 0)
            num_full = min(req.num_computed_tokens // bm.block_size, len(req.block_hashes),
                           len(bm.owned(rid)))
            self._checkpointed[rid] = done
            if num_full <= done:
                continue
            self._seq += 1
            owner = f"ck:{rid}:{self._seq}"
            blocks = list(bm.owned(rid)[done:num_full])
            bm.allocate(owner, len(blocks) * bm.block_size, cached_blocks=blocks)
            if not self.offload.submit(("write", owner, blocks,
                                        list(req.block_hashes[done:num_full]))):
                self.offload.stats.dropped_writes += 1
                bm.free(owner)
                continue
            self._checkpointed[rid] = num_full

    def lookup(self, req_id: str, start: int, keys: Sequence[bytes]) -> bool:
        return self.offload.submit(("lookup", req_id, start, list(keys)))

    def load(self, req_id: str, block_ids: Sequence[int], keys: Sequence[bytes]) -> bool:
        return self.offload.submit(("load", req_id, list(block_ids), list(keys)))

    def pending(self) -> int:
        return self.offload.pending

    def collect(self, scheduler, timeout: float = 0.0) -> None:
        for done in self.offload.poll(timeout):
            if isinstance(done, WriteDone):
                self.releasing.pop(done.owner, None)
                scheduler.bm.free(done.owner)
            elif isinstance(done, LookupDone):
                scheduler.lookup_done(done.req_id, done.start, done.present)
            else:
                scheduler.load_done(done.req_id, done.loaded)

    def _write_back(self, request: Request, bm: BlockManager) -> None:
        num_full = min(request.num_computed_tokens // bm.block_size, len(request.block_hashes))
        if num_full == 0:
            bm.free(request.request_id)
            return
        self._seq += 1
        owner = f"wb:{request.request_id}:{self._seq}"
        bm.transfer(request.request_id, owner)        # pinned until the write is acknowledged
        blocks = list(bm.owned(owner)[:num_full])
        keys = list(request.block_hashes[:num_full])  # a snapshot: the request moves on
        if not self.offload.submit(("write", owner, blocks, keys)):
            self.offload.stats.dropped_writes += 1
            bm.free(owner)
            return
        self.releasing[owner] = len(bm.owned(owner))

    def close(self) -> None:
        self.offload.close()
