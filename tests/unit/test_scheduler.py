"""Scheduler decisions without a model: budgets, chunking, admission, preemption, policies."""

from __future__ import annotations

import time

import pytest

from fdpd.engine.block_manager import BlockManager
from fdpd.engine.request import Request, RequestStatus
from fdpd.engine.scheduler import Scheduler
from fdpd.sampling_params import SamplingParams

BS = 4


def make(num_blocks=16, budget=16, max_seqs=8, policy="fcfs", caching=True):
    bm = BlockManager(num_blocks, BS, caching, hash_seed=b"s")
    return Scheduler(bm, max_num_seqs=max_seqs, max_num_batched_tokens=budget,
                     max_model_len=1024, policy=policy)


def req(rid, n, max_tokens=8, priority=0, arrival=0.0, first=0):
    return Request(rid, tuple(range(first, first + n)), SamplingParams(max_tokens=max_tokens),
                   max_tokens=max_tokens, seed=0, priority=priority, arrival_time=arrival)


def run_step(s, sample=7):
    """One step as the engine does it: advance everything, sample for caught-up requests."""
    out = s.schedule()
    plan = [(r.request_id, n) for r, n in out.scheduled]
    for r, n in out.scheduled:
        done = r.num_computed_tokens + n == r.num_tokens
        s.advance(r, n)
        if done:
            s.append_token(r, sample, None)
    s.check_integrity()
    return plan, [r.request_id for r in out.preempted]


def test_chunked_prefill_then_decode_batching():
    s = make(budget=8)
    s.add(req("a", 10))
    s.add(req("b", 3))
    assert run_step(s) == ([("a", 8)], [])               # a's prompt is chunked
    assert run_step(s) == ([("a", 2), ("b", 3)], [])     # a finishes prefill, b fits after
    assert run_step(s) == ([("a", 1), ("b", 1)], [])     # both decode in one batch
    a = s.requests["a"]
    assert a.output_token_ids == [7, 7] and a.num_computed_tokens == 11


def test_max_num_seqs_limits_admission():
    s = make(max_seqs=2, budget=64)
    for i in range(3):
        s.add(req(f"r{i}", 4))
    plan, _ = run_step(s)
    assert [rid for rid, _ in plan] == ["r0", "r1"]
    assert len(s.waiting) == 1


def test_head_of_line_waits_for_blocks():
    s = make(num_blocks=4, budget=64)
    s.add(req("big", 12, max_tokens=4))                  # 3 blocks
    s.add(req("next", 8, max_tokens=4))                  # 2 blocks: does not fit yet
    plan, _ = run_step(s)
    assert plan == [("big", 12)]
    assert s.requests["next"].status is RequestStatus.WAITING


def test_preemption_picks_newest_and_requeues_at_front():
    s = make(num_blocks=6, budget=64)
    s.add(req("old", 8, max_tokens=20))                  # 2 blocks each: the pool is full
    s.add(req("mid", 8, max_tokens=20, first=100))
    s.add(req("new", 8, max_tokens=20, first=200))
    run_step(s)
    # Each request now has 9 tokens; computing the 9th needs a third block.
    plan, preempted = run_step(s)
    assert preempted == ["new"]                          # newest first; its 2 blocks serve both
    assert plan == [("old", 1), ("mid", 1)]
    assert s.bm.owned("old") == [0, 1, 5] and s.bm.owned("mid") == [2, 3, 4]
    new = s.requests["new"]
    assert new.status is RequestStatus.PREEMPTED and new.num_computed_tokens == 0
    assert new.num_preemptions == 1 and new.output_token_ids == [7]
    # Preempted requests wait at the front, ahead of later arrivals.
    s.add(req("late", 3, first=300))
    assert [r.request_id for r in s.waiting] == ["new", "late"]
    # The prompt is never touched by preemption.
    assert new.prompt_token_ids == tuple(range(200, 208))


def test_preemption_cascades_until_the_oldest_can_grow():
    s = make(num_blocks=4, budget=64)
    s.add(req("old", 4, max_tokens=20))                  # 1 block each
    s.add(req("a", 4, max_tokens=20, first=100))
    s.add(req("b", 4, max_tokens=20, first=200))
    s.add(req("c", 4, max_tokens=20, first=300))
    run_step(s)
    plan, preempted = run_step(s)
    # All four need a 2nd block with 0 free: c goes (1 free) -> old grows; a needs one more:
    # b goes -> a grows; nothing left to preempt for b's turn.
    assert preempted == ["c", "b"]
    assert plan == [("old", 1), ("a", 1)]


def test_no_admission_in_a_step_that_preempted():
    s = make(num_blocks=4, budget=64)
    s.add(req("a", 8, max_tokens=20))
    s.add(req("b", 8, max_tokens=20, first=50))
    run_step(s)
    s.add(req("c", 1, first=90))
    plan, preempted = run_step(s)
    assert preempted == ["b"]
    assert "c" not in [rid for rid, _ in plan]


def test_priority_policy_orders_admission_and_preemption():
    s = make(num_blocks=6, budget=64, policy="priority")
    s.add(req("low", 8, max_tokens=20, priority=5, arrival=0.0))
    s.add(req("high", 8, max_tokens=20, priority=0, arrival=1.0, first=100))
    s.add(req("mid", 8, max_tokens=20, priority=2, arrival=2.0, first=200))
    plan, _ = run_step(s)
    assert [rid for rid, _ in plan] == ["high", "mid", "low"]
    plan, preempted = run_step(s)
    assert preempted == ["low"]                          # lowest priority goes, not newest
    assert plan == [("high", 1), ("mid", 1)]


def test_shortest_policy_runs_a_short_prompt_ahead_of_a_long_ones_chunks():
    plans = {}
    for policy in ("fcfs", "shortest"):
        s = make(num_blocks=64, budget=16, policy=policy)
        now = time.monotonic()
        s.add(req("long", 64, arrival=now))
        assert run_step(s) == ([("long", 16)], [])
        s.add(req("short", 6, arrival=now, first=100))
        plans[policy] = [run_step(s)[0] for _ in range(3)]
    # FCFS: the short prompt waits for budget the long one's chunks leave over.
    assert plans["fcfs"] == [[("long", 16)], [("long", 16)], [("long", 16)]]
    # Shortest first: it runs at once, and alone (a partial chunk of the long one would make
    # that step, and the short prompt's first token, later); then its decodes go first and
    # the long one takes what is left.
    assert plans["shortest"] == [[("short", 6)], [("short", 1), ("long", 15)],
                                 [("short", 1), ("long", 15)]]


def test_shortest_policy_ages_a_long_wait_ahead_of_fresh_short_prompts():
    s = make(num_blocks=64, budget=16, policy="shortest")
    now = time.monotonic()
    # 64 tokens left, waited 1 s: 64 - 100 = -36 comes before a fresh 6-token prompt.
    s.add(req("fresh", 6, arrival=now, first=100))
    s.add(req("waited", 64, arrival=now - 1.0))
    assert run_step(s) == ([("waited", 16)], [])
    assert run_step(s) == ([("waited", 16)], [])


def test_shortest_policy_lets_prompts_that_finish_share_a_step():
    s = make(num_blocks=64, budget=16, policy="shortest")
    now = time.monotonic()
    s.add(req("long", 40, arrival=now))
    assert run_step(s) == ([("long", 16)], [])
    for rid, n in (("a", 5), ("b", 6), ("c", 9)):
        s.add(req(rid, n, arrival=now, first=100 * len(rid) + n))
    # a and b finish their prompts in this step; c (9) would not fit whole in the 5 left and
    # the long one's chunk would be partial: both wait for the next step.
    assert run_step(s) == ([("a", 5), ("b", 6)], [])
    # Decodes never hold a chunk back, but c's prompt completing does.
    assert run_step(s) == ([("a", 1), ("b", 1), ("c", 9)], [])
    assert run_step(s) == ([("a", 1), ("b", 1), ("c", 1), ("long", 13)], [])


def test_auto_policy_is_shortest_on_a_prefill_instance_only():
    from fdpd.config import EngineConfig

    config = EngineConfig(model="tiny")
    assert [config.resolved_policy(r) for r in ("prefill", "decode", "mixed")] == \
        ["shortest", "fcfs", "fcfs"]
    assert EngineConfig(model="tiny", scheduling_policy="fcfs").resolved_policy("prefill") \
        == "fcfs"


def test_preempted_request_resumes_with_prefix_cache_hits():
    s = make(num_blocks=7, budget=64)
    s.add(req("old", 8, max_tokens=20))
    s.add(req("new", 8, max_tokens=20, first=100))
    s.add(req("x", 8, max_tokens=20, first=200))
    run_step(s)
    _, preempted = run_step(s)
    # old took the free block; new needed one more, so x (blocks 4, 5) was preempted and new
    # took x's tail block 5 (evicting its hash). x's head block 4 is still cached.
    assert preempted == ["x"]
    assert s.bm.owned("new") == [2, 3, 5]
    s.finish(s.requests["old"], RequestStatus.FINISHED_ABORTED)
    plan, _ = run_step(s)
    assert ("x", 9 - 4) in plan                          # its first block came from the cache
    assert s.bm.owned("x")[0] == 4
    s.check_integrity()


def test_finish_while_waiting_is_skipped():
    s = make()
    s.add(req("a", 4))
    s.add(req("b", 4))
    s.finish(s.requests["a"], RequestStatus.FINISHED_ABORTED)
    assert len(s.waiting) == 1
    plan, _ = run_step(s)
    assert plan == [("b", 4)]


def test_request_finishes_on_max_tokens_and_frees_blocks():
    s = make()
    s.add(req("a", 4, max_tokens=2))
    run_step(s)
    run_step(s)
    assert "a" not in s.requests
    assert s.bm.num_free_blocks == 16
    assert not s.has_work()


def test_duplicate_request_id_rejected():
    s = make()
    s.add(req("a", 4))
    with pytest.raises(ValueError, match="already"):
        s.add(req("a", 4))
