"""BlockManager scenarios with exact block ids, ref counts and hit counts."""

from __future__ import annotations

import pytest

from fdpd.engine.block_manager import (
    BlockAccountingError,
    BlockManager,
    chain_hash,
    compute_block_hashes,
)

BS = 4
SEED = b"model-fingerprint"


@pytest.fixture
def bm():
    m = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=True, hash_seed=SEED)
    yield m
    m.check_integrity()


def hashes(tokens):
    return compute_block_hashes(SEED, tokens, BS)


def admit(bm, owner, tokens):
    """Admit like the scheduler does: match the prefix, allocate, compute, commit."""
    h = hashes(tokens)
    cached = bm.match_prefix(h, len(tokens))
    assert bm.allocate(owner, len(tokens), cached)
    bm.commit(owner, h, len(tokens))
    return cached


def test_hash_chain_is_canonical_and_seeded():
    a = compute_block_hashes(SEED, [1, 2, 3, 4, 5, 6, 7, 8, 9], BS)
    assert len(a) == 2                                   # only full blocks are hashed
    assert a[0] == chain_hash(SEED, [1, 2, 3, 4])
    assert a[1] == chain_hash(a[0], [5, 6, 7, 8])
    assert compute_block_hashes(b"other-model", [1, 2, 3, 4], BS)[0] != a[0]
    # Same block content after a different prefix hashes differently.
    assert compute_block_hashes(SEED, [9, 9, 9, 9, 5, 6, 7, 8], BS)[1] != a[1]
    # Extending a known prefix computes only the new blocks.
    known = a[:1]
    assert compute_block_hashes(SEED, [1, 2, 3, 4, 5, 6, 7, 8], BS, known) is known
    assert known == a


def test_allocation_order_and_free_returns_blocks(bm):
    assert bm.allocate("a", 10)                          # 3 blocks
    assert bm.owned("a") == [0, 1, 2]
    assert bm.allocate("b", 4)
    assert bm.owned("b") == [3]
    assert bm.num_free_blocks == 4
    assert bm.grow("b", 5)
    assert bm.owned("b") == [3, 4]
    assert bm.free("a") == [0, 1, 2]
    assert bm.num_free_blocks == 6
    # Unhashed freed blocks are reused first (front of the queue).
    assert bm.allocate("c", 4)
    assert bm.owned("c") == [0]


def test_all_or_nothing(bm):
    assert bm.allocate("a", 24)                          # 6 of 8 blocks
    assert not bm.allocate("b", 12)                      # needs 3, only 2 free
    assert "b" not in bm.owners()
    assert bm.num_free_blocks == 2
    assert not bm.grow("a", 36)                          # needs 3 more
    assert bm.owned("a") == [0, 1, 2, 3, 4, 5]
    assert bm.grow("a", 32)
    assert bm.num_free_blocks == 0


def test_shared_prefix_hits_and_ref_counts(bm):
    prompt = list(range(100, 110))                       # 2 full blocks + 2 tokens
    assert admit(bm, "a", prompt) == []
    assert bm.owned("a") == [0, 1, 2]
    # Same first 8 tokens, different tail: shares blocks 0 and 1.
    cached = admit(bm, "b", prompt[:8] + [7, 7, 7])
    assert cached == [0, 1]
    assert bm.owned("b") == [0, 1, 3]
    assert bm.ref_counts[:4] == [2, 2, 1, 1]
    s = bm.stats()
    assert (s.queried_tokens, s.hit_tokens) == (10 + 11, 8)


def test_match_leaves_one_token_to_compute(bm):
    prompt = list(range(8))                              # exactly 2 full blocks
    admit(bm, "a", prompt)
    # The whole prompt is cached, but its last token must be recomputed for logits.
    assert bm.match_prefix(hashes(prompt), len(prompt)) == [0]


def test_request_finishing_while_another_shares_blocks(bm):
    prompt = list(range(12))
    admit(bm, "a", prompt)                               # blocks 0,1,2
    admit(bm, "b", prompt + [50])                        # shares 0,1,2 + block 3
    assert bm.owned("b") == [0, 1, 2, 3]
    bm.free("a")
    assert bm.ref_counts[:4] == [1, 1, 1, 1]
    assert bm.num_free_blocks == 4                       # nothing of b's went free
    bm.free("b")
    assert bm.ref_counts[:4] == [0, 0, 0, 0]
    # Freed hashed blocks stay cached (lazy eviction) and can be revived.
    assert admit(bm, "c", prompt + [60]) == [0, 1, 2]


def test_lru_eviction_order(bm):
    admit(bm, "a", list(range(0, 8)) + [0])              # blocks 0,1 hashed + 2
    admit(bm, "b", list(range(20, 28)) + [0])            # blocks 3,4 hashed + 5
    bm.free("a")                                         # a's blocks freed first -> older
    bm.free("b")
    # Free queue now: unhashed 5, 2 at the front, then a's 1, 0, then b's 4, 3.
    assert list(bm._free) == [5, 2, 6, 7, 1, 0, 4, 3]
    evicted_before = bm.stats().evicted_blocks
    assert bm.allocate("c", 4 * 5)                       # takes 5, 2, 6, 7, then evicts 1
    assert bm.owned("c") == [5, 2, 6, 7, 1]
    assert bm.stats().evicted_blocks == evicted_before + 1
    # a's tail (block 1) was evicted before its head (block 0): a's prefix still hits 1 block.
    assert bm.match_prefix(hashes(list(range(8)) + [0]), 9) == [0]
    assert bm.match_prefix(hashes(list(range(20, 28)) + [0]), 9) == [3, 4]
    bm.free("c")


def test_reviving_cached_free_block_counts_against_capacity(bm):
    admit(bm, "a", list(range(8)) + [1])                 # blocks 0,1 (hashed), 2
    bm.free("a")
    assert bm.allocate("x", 4 * 6)                       # 6 fresh blocks: 2,3,4,5,6,7
    assert bm.num_free_blocks == 2                       # the cached 1, 0 remain
    h = hashes(list(range(8)) + [1])
    cached = bm.match_prefix(h, 9)
    assert cached == [0, 1]
    # Reviving both cached blocks uses the last two free blocks: one more block won't fit.
    assert not bm.allocate("b", 9, cached)
    assert bm.ref_counts[0] == 0 and bm.ref_counts[1] == 0
    assert bm.allocate("b", 8, cached)
    assert bm.owned("b") == [0, 1]
    bm.free("x")


def test_duplicate_content_is_not_double_indexed(bm):
    prompt = list(range(9))
    h = hashes(prompt)
    # Two owners compute the same prefix concurrently (neither saw the other's cache).
    assert bm.allocate("a", 9) and bm.allocate("b", 9)
    bm.commit("a", h, 9)
    bm.commit("b", h, 9)
    assert bm.cached[h[0]] == 0 and bm.cached[h[1]] == 1
    assert bm.block_hashes[3] is None                    # b's copy stays unhashed
    bm.free("a")
    bm.free("b")


def test_prefix_caching_disabled():
    m = BlockManager(8, BS, enable_prefix_caching=False, hash_seed=SEED)
    h = hashes(list(range(9)))
    assert m.allocate("a", 9)
    m.commit("a", h, 9)
    assert m.cached == {}
    assert m.match_prefix(h, 9) == []
    m.free("a")
    m.check_integrity()


def test_check_integrity_catches_corruption(bm):
    assert bm.allocate("a", 8)
    bm.ref_counts[0] += 1
    with pytest.raises(BlockAccountingError, match="block 0"):
        bm.check_integrity()
    bm.ref_counts[0] -= 1
    bm._free[1] = None                                   # owned block also marked free
    with pytest.raises(BlockAccountingError):
        bm.check_integrity()
    del bm._free[1]
    bm.free("a")


def test_double_allocate_is_an_error(bm):
    assert bm.allocate("a", 4)
    with pytest.raises(BlockAccountingError):
        bm.allocate("a", 4)
    bm.free("a")
