"""The KV block pool: allocation, ref counts and the prefix cache.

Block ids index the runner's KV tensor. Every block is in exactly one of two places:
- the free queue (ref count 0), in LRU order: the front is taken first. A freed block keeps its
  prefix hash until it is taken again (lazy eviction), so a later request with the same prefix
  can revive it;
- owned: held by one or more owners (a request, or later a grant or a store write-back), with
  ``ref_count == number of owner lists that contain it``.

Prefix hashes chain over full blocks, ``h_k = sha256(h_{k-1} || tokens_k as little-endian u32)``,
seeded by the model fingerprint, so identical token prefixes of the same model (and only those)
share blocks. All operations are O(blocks touched); nothing scans the pool.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass


class BlockAccountingError(RuntimeError):
    """The pool's bookkeeping is inconsistent. Always a bug, never an input error."""


def chain_hash(parent: bytes, tokens: Sequence[int]) -> bytes:
    """Hash of one full block given its parent's hash (canonical bytes, never pickle)."""
    return hashlib.sha256(parent + struct.pack(f"<{len(tokens)}I", *tokens)).digest()


def compute_block_hashes(seed: bytes, token_ids: Sequence[int], block_size: int,
                         known: list[bytes] | None = None) -> list[bytes]:
    """Extend ``known`` (hashes already computed for a prefix) to every full block."""
    hashes = known if known is not None else []
    parent = hashes[-1] if hashes else seed
    for k in range(len(hashes), len(token_ids) // block_size):
        parent = chain_hash(parent, token_ids[k * block_size:(k + 1) * block_size])
        hashes.append(parent)
    return hashes


@dataclass(frozen=True)
class PrefixCacheStats:
    queried_tokens: int
    hit_tokens: int
    evicted_blocks: int

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 hash_seed: bytes = b""):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.hash_seed = hash_seed
        self.ref_counts = [0] * num_blocks
        self.block_hashes: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}           # prefix hash -> block holding it
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._owned: dict[str, list[int]] = {}
        self._num_hashed: dict[str, int] = {}        # owner -> leading blocks already hashed
        self._queried_tokens = 0
        self._hit_tokens = 0
        self._evicted = 0

    # ----------------------------------------------------------------- queries (no mutation)
    @property
    def num_free_blocks(self) -> int:
        """Blocks that an allocation can take now (includes cached, unreferenced ones)."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def owned(self, owner: str) -> list[int]:
        return self._owned.get(owner, [])

    def owners(self) -> dict[str, list[int]]:
        return self._owned

    def stats(self) -> PrefixCacheStats:
        return PrefixCacheStats(self._queried_tokens, self._hit_tokens, self._evicted)

    def match_prefix(self, block_hashes: Sequence[bytes], num_tokens: int,
                     record: bool = True) -> list[int]:
        """Cached blocks holding the longest leading run of ``block_hashes``. At least one token
        is always left to compute (its logits give the next token). With ``record``, counts a
        query in the hit statistics (callers that retry the same match pass False and call
        ``record_query`` once)."""
        if not self.enable_prefix_caching:
            return []
        limit = min(len(block_hashes), (num_tokens - 1) // self.block_size)
        hits: list[int] = []
        for h in block_hashes[:limit]:
            block = self.cached.get(h)
            if block is None:
                break
            hits.append(block)
        if record:
            self.record_query(num_tokens, len(hits))
        return hits

    def record_query(self, num_tokens: int, num_hit_blocks: int) -> None:
        self._queried_tokens += num_tokens
        self._hit_tokens += num_hit_blocks * self.block_size

    def can_allocate(self, num_blocks: int, cached_blocks: Sequence[int] = ()) -> bool:
        # Reviving a cached block that sits in the free queue takes it out of the queue too.
        revived = sum(1 for b in cached_blocks if self.ref_counts[b] == 0)
        return num_blocks + revived <= len(self._free)

    # ----------------------------------------------------------------- mutations
    def allocate(self, owner: str, num_tokens: int, cached_blocks: Sequence[int] = ()) -> bool:
        """Give ``owner`` (which holds nothing yet) ``cached_blocks`` plus fresh blocks to cover
        ``num_tokens``. All or nothing: returns False and changes nothing if the pool is short."""
        if owner in self._owned:
            raise BlockAccountingError(f"{owner} already holds blocks")
        num_new = max(0, self.blocks_for(num_tokens) - len(cached_blocks))
        if not self.can_allocate(num_new, cached_blocks):
            return False
        blocks = []
        for b in cached_blocks:
            if self.ref_counts[b] == 0:
                del self._free[b]
            self.ref_counts[b] += 1
            blocks.append(b)
        blocks += self._take(num_new)
        self._owned[owner] = blocks
        self._num_hashed[owner] = len(cached_blocks)
        return True

    def grow(self, owner: str, num_tokens: int) -> bool:
        """Make ``owner``'s blocks cover ``num_tokens``. All or nothing."""
        blocks = self._owned[owner]
        num_new = self.blocks_for(num_tokens) - len(blocks)
        if num_new <= 0:
            return True
        if num_new > len(self._free):
            return False
        blocks += self._take(num_new)
        return True

    def commit(self, owner: str, block_hashes: Sequence[bytes], num_computed_tokens: int) -> None:
        """Publish the hashes of ``owner``'s blocks that are now full of computed KV."""
        if not self.enable_prefix_caching:
            return
        blocks = self._owned[owner]
        full = min(num_computed_tokens // self.block_size, len(block_hashes), len(blocks))
        for k in range(self._num_hashed[owner], full):
            h, b = block_hashes[k], blocks[k]
            if self.block_hashes[b] is None and h not in self.cached:
                self.block_hashes[b] = h
                self.cached[h] = b
            # else: another block already holds this content (computed concurrently); this
            # one stays unhashed and returns to the pool as plain free space.
        self._num_hashed[owner] = max(self._num_hashed[owner], full)

    def free(self, owner: str) -> list[int]:
        """Drop ``owner``'s references. Blocks reaching zero go to the free queue: unhashed
        ones to the front (reused first), hashed ones to the back in reverse order, so a
        sequence's tail is evicted before its more widely shared head."""
        blocks = self._owned.pop(owner)
        self._num_hashed.pop(owner, None)
        for b in reversed(blocks):
            self.ref_counts[b] -= 1
            if self.ref_counts[b] < 0:
                raise BlockAccountingError(f"block {b} ref count went negative")
            if self.ref_counts[b] == 0:
                self._free[b] = None
                if self.block_hashes[b] is None:
                    self._free.move_to_end(b, last=False)
        return blocks

    def _take(self, n: int) -> list[int]:
        taken = []
        for _ in range(n):
            b, _ = self._free.popitem(last=False)
            h = self.block_hashes[b]
            if h is not None:                  # lazy eviction happens here
                del self.cached[h]
                self.block_hashes[b] = None
                self._evicted += 1
            self.ref_counts[b] = 1
            taken.append(b)
        return taken

    def transfer(self, owner: str, new_owner: str) -> None:
        """Hand ``owner``'s blocks to ``new_owner`` (a grant becoming a request, a finished
        prefill keeping its KV until it is shipped). Ref counts do not change."""
        if new_owner in self._owned:
            raise BlockAccountingError(f"{new_owner} already holds blocks")
        self._owned[new_owner] = self._owned.pop(owner)
        self._num_hashed[new_owner] = self._num_hashed.pop(owner, 0)

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash of unreferenced blocks (e.g. after new weights)."""
        for b in self._free:
            h = self.block_hashes[b]
            if h is not None:
                del self.cached[h]
                self.block_hashes[b] = None

    # ----------------------------------------------------------------- invariants
    def check_integrity(self) -> None:
        """Raise BlockAccountingError on any inconsistency. O(pool): for tests and idle time."""
        refs = [0] * self.num_blocks
        for owner, blocks in self._owned.items():
            if len(set(blocks)) != len(blocks):
                raise BlockAccountingError(f"{owner} holds a block twice: {blocks}")
            for b in blocks:
                refs[b] += 1
        for b in range(self.num_blocks):
            if refs[b] != self.ref_counts[b]:
                raise BlockAccountingError(f"block {b}: ref count {self.ref_counts[b]} but "
                                           f"{refs[b]} owners")
            if (refs[b] == 0) != (b in self._free):
                raise BlockAccountingError(f"block {b}: ref count {refs[b]}, in free queue: "
                                           f"{b in self._free}")
            h = self.block_hashes[b]
            if h is not None and self.cached.get(h) != b:
                raise BlockAccountingError(f"block {b}: hash not indexed")
        if len(self.cached) != sum(h is not None for h in self.block_hashes):
            raise BlockAccountingError("prefix index holds hashes of no block")
        if len(self._free) + sum(r > 0 for r in refs) != self.num_blocks:
            raise BlockAccountingError("free + used != total")
