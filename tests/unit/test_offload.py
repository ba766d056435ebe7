"""Preemption with a KV store: exact across write-back and restore, and every hazard made
deterministic with a FaultyStore (blocked writes, a dying store, corrupt or lying objects)."""

from __future__ import annotations

import random
import threading

import pytest
import torch

from fdpd import LLM, SamplingParams
from fdpd.engine.request import RequestStatus
from fdpd.kvstore.disk import DiskStore
from fdpd.kvstore.offload import KVOffload, StorePreemption
from fdpd.testing.faulty_store import FaultyStore

GREEDY = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
POOL = dict(num_kv_blocks=24, block_size=8, max_num_batched_tokens=64)


def prompts(n=16, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(rng.randrange(20, 60))] for _ in range(n)]


@pytest.fixture(scope="module")
def expected():
    """Outputs of a run whose pool never forces a preemption."""
    llm = LLM("tiny", num_kv_blocks=1024, block_size=8)
    outs = llm.generate(prompts(), GREEDY)
    assert llm.engine.scheduler.num_preemptions == 0
    return [o.outputs[0].token_ids for o in outs]


def store_llm(tmp_path, **kw):
    """A small-pool engine whose preemptions go through a FaultyStore over a disk store."""
    llm = LLM("tiny", **POOL, **kw)
    faulty = FaultyStore(DiskStore(str(tmp_path / "store"), capacity_bytes=1 << 30, timeout=2.0),
                         max_block=5.0)
    offload = KVOffload(faulty, llm.engine.runner.kv_cache, llm.engine.fingerprint)
    llm.engine.scheduler.preemption = StorePreemption(offload)
    return llm, faulty


def finish_clean(llm):
    llm.engine.check_integrity()
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks, "blocks leaked"
    assert not llm.engine.scheduler.preemption.releasing
    llm.engine.close()


def outputs(llm, params=GREEDY, seed=0):
    return [o.outputs[0].token_ids for o in llm.generate(prompts(seed=seed), params)]


def test_store_restores_and_outputs_stay_exact(tmp_path, expected):
    recompute = LLM("tiny", **POOL)
    assert outputs(recompute) == expected
    llm, faulty = store_llm(tmp_path)
    assert outputs(llm) == expected
    s = llm.engine.scheduler
    stats = s.preemption.offload.stats
    assert s.num_preemptions > 0 and stats.blocks_written > 0
    assert stats.blocks_restored > 0 and s.num_restored_tokens > 0
    # Restoring replaces most of the recompute a store-less engine does.
    assert s.num_recomputed_tokens < 0.5 * recompute.engine.scheduler.num_recomputed_tokens
    finish_clean(llm)


def test_pinned_blocks_are_not_reused_while_a_write_is_blocked(tmp_path, expected):
    llm, faulty = store_llm(tmp_path)
    gate = threading.Event()
    faulty.block_writes = gate
    engine = llm.engine
    for i, p in enumerate(prompts()):
        engine.add_request(f"r{i}", p, GREEDY)
    results: dict[str, list[int]] = {}

    def step():
        for out in engine.step():
            results.setdefault(out.request_id, []).extend(out.new_token_ids)

    while faulty.blocked_puts == 0:                      # run until a write-back is in flight
        step()
    preemption = engine.scheduler.preemption
    pinned = {b for owner in preemption.releasing for b in engine.block_manager.owned(owner)}
    assert pinned
    snapshot = engine.runner.kv_cache[sorted(pinned)].clone()
    for _ in range(30):                                  # pressure while the write hangs
        step()
        owners = engine.block_manager.owners()
        for owner, blocks in owners.items():
            if not owner.startswith("wb:"):
                assert not pinned & set(blocks), f"{owner} got a pinned block"
        assert not pinned & set(engine.block_manager._free)
    # Nobody wrote into the pinned blocks either.
    assert torch.equal(engine.runner.kv_cache[sorted(pinned)], snapshot)
    gate.set()
    while engine.has_unfinished_requests():
        step()
    assert [results[f"r{i}"] for i in range(len(expected))] == expected
    finish_clean(llm)


def test_store_dying_mid_run_falls_back_to_recompute(tmp_path, expected):
    llm, faulty = store_llm(tmp_path)
    engine = llm.engine
    for i, p in enumerate(prompts()):
        engine.add_request(f"r{i}", p, GREEDY)
    results: dict[str, list[int]] = {}
    steps = 0
    while engine.has_unfinished_requests():
        steps += 1
        if steps == 40:
            faulty.down = True
        for out in engine.step():
            results.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert faulty.calls["put"] + faulty.calls["contains_prefix"] > 0
    assert engine.scheduler.preemption.offload.stats.store_errors > 0
    assert [results[f"r{i}"] for i in range(len(expected))] == expected
    finish_clean(llm)


@pytest.mark.parametrize("fault", ["corrupt_reads", "lie_contains"])
def test_bad_objects_are_misses_never_wrong_tokens(tmp_path, expected, fault):
    llm, faulty = store_llm(tmp_path)
    setattr(faulty, fault, True)
    assert outputs(llm) == expected
    stats = llm.engine.scheduler.preemption.offload.stats
    if fault == "corrupt_reads":
        assert stats.corrupt_objects > 0 and stats.blocks_restored == 0
    else:
        assert stats.lookup_hit_blocks > stats.blocks_restored
    finish_clean(llm)


def test_slow_store_is_bounded(tmp_path, expected):
    llm, faulty = store_llm(tmp_path)
    faulty.slow_seconds = 0.01
    assert outputs(llm) == expected
    finish_clean(llm)


def test_write_back_never_mutates_the_prompt(tmp_path):
    llm, faulty = store_llm(tmp_path)
    engine = llm.engine
    ps = prompts()
    reqs = [engine.add_request(f"r{i}", p, GREEDY) for i, p in enumerate(ps)]
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.scheduler.num_preemptions > 0
    for req, p in zip(reqs, ps):
        assert req.prompt_token_ids == tuple(p)
        assert req.all_token_ids[:len(p)] == p
    finish_clean(llm)


def test_abort_while_loading_frees_blocks_after_the_load(tmp_path, expected):
    llm, faulty = store_llm(tmp_path)
    engine = llm.engine
    for i, p in enumerate(prompts()):
        engine.add_request(f"r{i}", p, GREEDY)
    seen_loading = False
    while engine.has_unfinished_requests():
        engine.step()
        for req_id in list(engine.scheduler.loading):
            seen_loading = True
            engine.abort_request(req_id)
            assert engine.scheduler.loading[req_id].status is RequestStatus.FINISHED_ABORTED
    assert seen_loading
    finish_clean(llm)


def test_output_caching_lets_the_next_turn_load_its_history(tmp_path):
    url = f"disk:{tmp_path / 'shared'}"
    first = LLM("tiny", num_kv_blocks=256, block_size=8, kv_store=url,
                kv_store_write_finished=True)
    turn1 = list(range(40, 140))
    out1 = first.generate([turn1], GREEDY)[0].outputs[0].token_ids
    first.engine.close()                                 # releases the disk store's lock
    # A different engine (another instance) continues the conversation.
    second = LLM("tiny", num_kv_blocks=256, block_size=8, kv_store=url)
    turn2 = turn1 + out1 + [7, 8, 9]
    result = second.generate([turn2], GREEDY)[0]
    assert result.num_cached_tokens >= (len(turn1) + len(out1)) // 8 * 8 - 8
    plain = LLM("tiny", num_kv_blocks=256, block_size=8).generate([turn2], GREEDY)[0]
    assert result.outputs[0].token_ids == plain.outputs[0].token_ids
    second.engine.close()


def test_checkpoint_writes_running_blocks_pinned_until_written(tmp_path, expected):
    """--kv-store-checkpoint: running requests' filled blocks reach the store while they run;
    each write pins its blocks under a second owner, so a request that finishes while its
    write hangs does not free them for reuse; a resumed context then restores them."""
    llm = LLM("tiny", num_kv_blocks=1024, block_size=8)
    faulty = FaultyStore(DiskStore(str(tmp_path / "store"), capacity_bytes=1 << 30,
                                   timeout=2.0), max_block=60.0)
    engine = llm.engine
    preemption = StorePreemption(KVOffload(faulty, engine.runner.kv_cache, engine.fingerprint))
    engine.scheduler.preemption = preemption
    for i, p in enumerate(prompts()):
        engine.add_request(f"r{i}", p, GREEDY)
    results: dict[str, list[int]] = {}
    hashes: dict[str, list[bytes]] = {}

    def step():
        for out in engine.step():
            results.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finished:
                finished.add(out.request_id)
        preemption.checkpoint(engine.scheduler.running, engine.block_manager)
        for req in engine.scheduler.running:      # what the checkpoint covered
            hashes[req.request_id] = list(req.block_hashes[:req.num_computed_tokens // 8])

    finished: set[str] = set()
    # Admission asks the store (lookups queue behind writes on its one worker): hold the
    # writes only once every request runs.
    while len(engine.scheduler.running) < len(expected):
        step()
    gate = threading.Event()
    faulty.block_writes = gate
    while faulty.blocked_puts == 0:
        step()
    pinned = {b for owner, blocks in engine.block_manager.owners().items()
              if owner.startswith("ck:") for b in blocks}
    assert pinned
    snapshot = engine.runner.kv_cache[sorted(pinned)].clone()
    while len(finished) < len(expected):               # every request ends meanwhile
        step()
        engine.check_integrity()
        assert not pinned & set(engine.block_manager._free)
    assert torch.equal(engine.runner.kv_cache[sorted(pinned)], snapshot)
    gate.set()
    while engine.has_unfinished_requests():            # the writes complete, pins go
        step()
    assert [results[f"r{i}"] for i in range(len(expected))] == expected
    # Each request's full blocks (as last seen running) are in the store.
    for rid, keys in hashes.items():
        assert faulty.contains_prefix(keys) == len(keys), rid
    finish_clean(llm)
    # Another engine resumes r0 from prompt + its tokens: restores instead of recomputing.
    second = LLM("tiny", num_kv_blocks=256, block_size=8, kv_store=f"disk:{tmp_path / 'store'}")
    context = prompts()[0] + results["r0"][:30]
    out = second.generate([context], SamplingParams(max_tokens=10, temperature=0,
                                                    ignore_eos=True))[0]
    assert second.engine.scheduler.preemption.offload.stats.blocks_restored > 0
    assert out.outputs[0].token_ids == expected[0][30:40]
    second.engine.close()
