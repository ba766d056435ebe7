"""The decode-side reservation ledger: exact headroom arithmetic, deferral, leases, commits."""

from __future__ import annotations

import pytest

from fdpd.engine.block_manager import BlockManager, compute_block_hashes
from fdpd.engine.request import Request
from fdpd.engine.scheduler import Scheduler
from fdpd.pd.ledger import GrantState, QueueFull, ReservationLedger
from fdpd.pd.protocol import AllocRequest
from fdpd.sampling_params import SamplingParams

BS = 4
SEED = b"fp"


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.fixture
def setup():
    bm = BlockManager(20, BS, True, SEED)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=512)
    clock = Clock()
    ledger = ReservationLedger(sched, horizon=8, grant_ttl=5.0, clock=clock)
    yield ledger, sched, bm, clock
    ledger.check()


def alloc(req_id, prompt, max_tokens, timeout=10.0):
    return AllocRequest(req_id, list(prompt), SamplingParams(max_tokens=max_tokens).to_dict(),
                        0, max_tokens, "tcp://p", "tcp://r", timeout)


def offer(ledger, msg):
    return ledger.offer(msg, "prefill-0", compute_block_hashes(SEED, msg.prompt_token_ids, BS))


def commit(ledger, sched, grant, first_token=7):
    """What DecodeService does when PrefillDone arrives with every block."""
    for i in range(grant.cached_blocks, grant.num_kv_blocks):
        assert ledger.receive(grant.grant_id, i, 1) is not None
    ledger.commit(grant.grant_id, grant.num_expected)
    m = grant.msg
    req = Request(m.req_id, tuple(m.prompt_token_ids), SamplingParams(max_tokens=m.max_tokens),
                  max_tokens=m.max_tokens, seed=0)
    req.append_output(first_token)
    sched.adopt(req, grant.owner)
    return req


def test_headroom_arithmetic_defer_and_later_grant(setup):
    ledger, sched, bm, clock = setup
    # A: prompt 10, max 20 -> horizon footprint ceil((10+1+8)/4) = 5 blocks; holds ceil(11/4)=3.
    a = offer(ledger, alloc("A", range(10), 20))
    assert a.block_ids == [0, 1, 2] and a.cached_blocks == 0
    assert ledger.pending_blocks() == 2
    assert ledger.headroom() == 17 - 0 - 2
    commit(ledger, sched, a)
    assert ledger.reserved_blocks() == 2                     # ceil((11+8)/4) - 3
    assert ledger.pending_blocks() == 0
    assert ledger.headroom() == 15
    # B: prompt 40, max 30 -> needs ceil((41+8)/4) = 13 <= 15: granted, holds 11 blocks.
    b = offer(ledger, alloc("B", range(100, 140), 30))
    assert len(b.block_ids) == 11
    assert (bm.num_free_blocks, ledger.reserved_blocks(), ledger.pending_blocks()) == (6, 2, 2)
    assert ledger.headroom() == 2
    # C: prompt 4, max 4 -> needs ceil((5+3)/4) = 2 == headroom: granted.
    c = offer(ledger, alloc("C", range(200, 204), 4))
    assert c.block_ids == [14, 15]
    assert ledger.headroom() == 0
    # D needs 1 block, headroom is 0 although 4 blocks are physically free: deferred.
    assert bm.num_free_blocks == 4
    assert offer(ledger, alloc("D", [1], 1)) is None
    snap = ledger.snapshot()
    assert snap["waiting_allocs"] == 1 and snap["pending_grants"] == 2
    assert snap["headroom_blocks"] == (snap["free_blocks"] - snap["reserved_blocks"]
                                       - snap["pending_reserved_blocks"])
    assert ledger.retry_waiting() == ([], [])
    # B is aborted: its 11 blocks return, and D is granted on the next retry.
    ledger.release(b.grant_id)
    granted, timed_out = ledger.retry_waiting()
    assert [g.req_id for g in granted] == ["D"] and timed_out == []
    ledger.release(granted[0].grant_id)
    ledger.release(c.grant_id)


def test_fifo_order_is_kept_while_someone_waits(setup):
    ledger, sched, bm, clock = setup
    big = offer(ledger, alloc("big", range(60), 8))          # ceil((61+7)/4) = 17 blocks
    assert big is not None
    assert offer(ledger, alloc("w1", range(300, 330), 8)) is None
    # A small request that would fit must not jump the queue.
    assert offer(ledger, alloc("small", [5], 1)) is None
    assert [p.msg.req_id for p in ledger.waiting_allocs] == ["w1", "small"]
    ledger.release(big.grant_id)
    granted, _ = ledger.retry_waiting()
    assert [g.req_id for g in granted] == ["w1", "small"]
    for g in granted:
        ledger.release(g.grant_id)


def test_waiting_alloc_times_out_into_a_reject(setup):
    ledger, sched, bm, clock = setup
    big = offer(ledger, alloc("big", range(60), 8))
    assert offer(ledger, alloc("late", range(300, 330), 8, timeout=2.0)) is None
    clock.now += 2.5
    granted, timed_out = ledger.retry_waiting()
    assert granted == [] and [p.msg.req_id for p in timed_out] == ["late"]
    assert ledger.counters["rejected"] == 1
    ledger.release(big.grant_id)


def test_waiting_queue_is_bounded(setup):
    _, sched, bm, clock = setup
    ledger = ReservationLedger(sched, horizon=8, grant_ttl=5.0, max_pending_allocs=2,
                               clock=clock)
    big = offer(ledger, alloc("big", range(60), 8))          # all 17 blocks of headroom
    assert offer(ledger, alloc("w1", range(300, 330), 8)) is None
    assert offer(ledger, alloc("w2", [5], 1)) is None
    with pytest.raises(QueueFull, match=r"decode queue is full \(2 requests wait"):
        offer(ledger, alloc("w3", [6], 1))
    assert [p.msg.req_id for p in ledger.waiting_allocs] == ["w1", "w2"]
    assert ledger.counters["refused_queue_full"] == 1 and ledger.counters["deferred"] == 2
    # Room comes back: the queue drains in order and takes new requests again.
    ledger.release(big.grant_id)
    granted, timed_out = ledger.retry_waiting()
    assert [g.req_id for g in granted] == ["w1", "w2"] and timed_out == []
    w3 = offer(ledger, alloc("w3", [6], 1))
    assert w3 is not None
    for g in (*granted, w3):
        ledger.release(g.grant_id)
    ledger.check()
    assert ledger.is_quiescent()


def test_never_fitting_request_is_refused_at_once(setup):
    ledger, *_ = setup
    with pytest.raises(ValueError, match="needs 25 blocks, the decode pool has 20"):
        offer(ledger, alloc("huge", range(60), 40))          # ceil((60+40)/4) = 25 > 20
    assert not ledger.waiting_allocs


def test_lease_expiry_frees_blocks_and_drops_late_kv(setup):
    ledger, sched, bm, clock = setup
    g = offer(ledger, alloc("A", range(10), 4))
    assert ledger.receive(g.grant_id, 0, 1) == [g.block_ids[0]]
    assert ledger.grants[g.grant_id].state is GrantState.LOADING
    clock.now += 4.9
    assert ledger.expire() == []
    clock.now += 0.2
    expired = ledger.expire()
    assert [e.grant_id for e in expired] == [g.grant_id]
    assert bm.num_free_blocks == 20 and ledger.is_quiescent()
    # KV that arrives late for the expired grant is dropped, never written.
    assert ledger.receive(g.grant_id, 1, 1) is None
    assert ledger.counters["stale_kv"] == 1 and ledger.counters["expired"] == 1
    with pytest.raises(KeyError):
        ledger.commit(g.grant_id, 2)


def test_kv_arriving_renews_the_lease(setup):
    """Chunks streamed during a long prefill keep its grant alive; one TTL after the last
    chunk the lease ends (a prefill that stopped between chunks)."""
    ledger, sched, bm, clock = setup
    g = offer(ledger, alloc("A", range(40), 4))
    for k in range(3):                              # a chunk every 4 s: 12 s > one TTL
        clock.now += 4.0
        assert ledger.expire() == []
        assert ledger.receive(g.grant_id, k, 1) == [g.block_ids[k]]
    clock.now += 4.9
    assert ledger.expire() == []
    clock.now += 0.2
    assert [e.grant_id for e in ledger.expire()] == [g.grant_id]
    assert bm.num_free_blocks == 20 and ledger.is_quiescent()


def test_commit_requires_every_block(setup):
    ledger, sched, bm, clock = setup
    g = offer(ledger, alloc("A", range(10), 4))              # 3 prompt blocks expected
    ledger.receive(g.grant_id, 0, 2)
    with pytest.raises(ValueError, match="got 2 of 3"):
        ledger.commit(g.grant_id, 3)
    with pytest.raises(ValueError):
        ledger.commit(g.grant_id, 2)                         # sender's count disagrees too
    assert ledger.receive(g.grant_id, 2, 5) is None          # out of range: dropped
    ledger.receive(g.grant_id, 2, 1)
    commit_ok = ledger.commit(g.grant_id, 3)
    assert commit_ok.state is GrantState.COMMITTED
    # Committed blocks are still held (by the grant owner) until the service adopts them.
    req = Request("A", tuple(range(10)), SamplingParams(max_tokens=4), max_tokens=4, seed=0)
    req.append_output(3)
    sched.adopt(req, g.owner)
    assert bm.owned("A") == g.block_ids


def test_kv_received_twice_or_out_of_order_counts_once(setup):
    """A relay that duplicates and reorders KV frames: the grant is complete when every
    block is in, whatever the order, and a block sent twice counts once (the decode holds an
    early PrefillDone until then)."""
    ledger, sched, bm, clock = setup
    g = offer(ledger, alloc("A", range(10), 4))              # 3 prompt blocks expected
    assert ledger.receive(g.grant_id, 2, 1) == [g.block_ids[2]]
    assert ledger.receive(g.grant_id, 0, 2) == g.block_ids[0:2]
    assert ledger.receive(g.grant_id, 0, 2) == g.block_ids[0:2]      # the duplicate
    assert g.kv_complete and len(g.received) == 3
    ledger.commit(g.grant_id, 3)
    assert ledger.receive(g.grant_id, 2, 1) is None                  # after the commit
    assert ledger.counters["stale_kv"] == 1
    h = offer(ledger, alloc("B", range(50, 60), 4))
    ledger.receive(h.grant_id, 1, 2)
    assert not h.kv_complete
    ledger.release(h.grant_id)
    req = Request("A", tuple(range(10)), SamplingParams(max_tokens=4), max_tokens=4, seed=0)
    req.append_output(3)
    sched.adopt(req, g.owner)


def test_cached_prefix_blocks_are_not_resent(setup):
    ledger, sched, bm, clock = setup
    a = offer(ledger, alloc("A", range(12), 4))
    req = commit(ledger, sched, a)
    sched.finish(req, req.status.FINISHED_STOPPED)           # blocks stay cached
    b = offer(ledger, alloc("B", list(range(12)) + [99], 4))
    assert b.cached_blocks == 3 and b.block_ids[:3] == a.block_ids[:3]
    assert b.num_expected == 1                               # only the 4th block travels
    assert ledger.receive(b.grant_id, 0, 1) is None          # cached blocks are not writable
    ledger.release(b.grant_id)


def test_admissions_never_preempt_running_requests_within_the_horizon(setup):
    ledger, sched, bm, clock = setup
    running = []
    for i in range(8):
        g = offer(ledger, alloc(f"r{i}", range(i * 50, i * 50 + 6), 9))
        if g is None:
            break
        running.append(commit(ledger, sched, g))
    assert len(running) >= 2 and ledger.waiting_allocs
    # Decode every running request to the end of its horizon (8 tokens).
    for _ in range(8):
        out = sched.schedule()
        assert out.preempted == []
        for r, n in out.scheduled:
            sched.advance(r, n)
            if r.num_computed_tokens == r.num_tokens:
                sched.append_token(r, 1, None)
    assert sched.num_preemptions == 0
