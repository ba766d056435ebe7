"""KV transfer overlapped with prefill compute, handler by handler in process: a prefill
whose prompt takes several chunks sends each finished chunk's blocks while the next computes,
and the decode commits only the complete set, whatever the order, copies or losses of those
messages. Real engines (the tiny model) on both sides; messages carried by the test, so every
fault is exact (the cluster-level faults are in test_message_faults.py and test_chaos.py)."""

from __future__ import annotations

import time

import pytest
import torch

from fdpd.config import EngineConfig, InstanceConfig, PDConfig
from fdpd.engine.engine import Engine
from fdpd.pd.decode import DecodeService
from fdpd.pd.prefill import PrefillService
from fdpd.pd.protocol import (
    AllocRequest,
    Envelope,
    Grant,
    GrantExpired,
    KVBlocks,
    PrefillDone,
    Reject,
    Submit,
    SubmitAck,
    Tokens,
)
from fdpd.pd.transport import Inbound
from fdpd.sampling_params import SamplingParams

PROMPT = [(7 * i) % 250 + 1 for i in range(100)]     # 100 tokens: KV of blocks 0..6
CHUNK = 32                                            # prompt tokens per prefill step
PARAMS = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True).to_dict()


class Node:
    """A prefill or decode service whose outgoing messages (with their frames) are kept."""

    def __init__(self, cls, name: str, stream: bool = True):
        engine = Engine(EngineConfig(model="tiny", num_kv_blocks=64,
                                     max_num_batched_tokens=CHUNK))
        self.name = name
        self.svc = cls(engine, PDConfig(grant_ttl=5.0, transfer_timeout=5.0,
                                        stream_kv_chunks=stream),
                       InstanceConfig(role=cls.role, metrics_port=-1))
        self.sent: list[tuple[str, object, list]] = []
        self.svc.send = lambda address, msg, frames=(): self.sent.append(
            (address, msg, [bytes(f.buffer if hasattr(f, "buffer") else f) for f in frames]))
        self._seq = 0

    def deliver(self, msg, src: str, frames=()) -> None:
        self._seq += 1
        self.svc._dispatch(Inbound(Envelope(src, 1, self._seq, msg), list(frames),
                                   time.monotonic()))

    def take(self, kind=object) -> list[tuple[str, object, list]]:
        out = [s for s in self.sent if isinstance(s[1], kind)]
        self.sent = [s for s in self.sent if not isinstance(s[1], kind)]
        return out


@pytest.fixture
def pair():
    p, d = Node(PrefillService, "prefill-0"), Node(DecodeService, "decode-0")
    yield p, d
    d.svc.ledger.check()
    for n in (p, d):
        n.svc.close()


def start(p: Node, d: Node, req_id: str = "r1") -> Grant:
    """Submit to P, its AllocRequest to D, D's grant back to P."""
    p.deliver(Submit(req_id, PROMPT, PARAMS, 0, 4, "tcp://router", 30.0, "decode-0",
                     "tcp://d"), "router")
    (_, alloc, _), = p.take(AllocRequest)
    d.deliver(alloc, p.name)
    (_, grant, _), = d.take(Grant)
    p.deliver(grant, d.name)
    assert [type(m) for _, m, _ in p.take()] == [SubmitAck]
    return grant


def prefill(p: Node, req_id: str = "r1") -> list[list[str]]:
    """Step P until the request shipped; the message types P sent in each step."""
    steps = []
    while req_id in p.svc.jobs:
        before = len(p.sent)
        p.svc.on_step(p.svc.engine.step())
        steps.append([type(m).__name__ for _, m, _ in p.sent[before:]])
    return steps


def sent_kv(msgs) -> dict[int, bytes]:
    """Grant-relative block index -> the bytes P sent for it (one frame per block on CPU)."""
    out = {}
    for m, frames in msgs:
        if isinstance(m, KVBlocks):
            assert len(frames) == m.num_blocks
            out.update(zip(range(m.first_block, m.first_block + m.num_blocks), frames))
    return out


def assert_holds(d: Node, grant: Grant, kv: dict[int, bytes]) -> None:
    """D's granted blocks hold exactly the KV P sent, every block of it."""
    assert sorted(kv) == list(range(7))
    cache = d.svc.engine.runner.kv_cache
    for i, data in kv.items():
        block = cache[grant.block_ids[i]].contiguous()
        assert block.view(torch.uint8).numpy().tobytes() == data, f"block {i} differs"


def test_chunks_travel_while_the_next_chunk_computes(pair):
    p, d = pair
    grant = start(p, d)
    steps = prefill(p)
    # 100 tokens in 32-token chunks: 4 steps. Blocks 0,1 after chunk 1; 2,3 after chunk 2;
    # 4,5 after chunk 3 (96 tokens); the last step sends block 6, the token, PrefillDone.
    assert steps == [["KVBlocks"], ["KVBlocks"], ["KVBlocks"],
                     ["Tokens", "KVBlocks", "PrefillDone"]], steps
    kv = [(m.first_block, m.num_blocks) for _, m, _ in p.sent if isinstance(m, KVBlocks)]
    assert kv == [(0, 2), (2, 2), (4, 2), (6, 1)]
    (_, done, _), = [s for s in p.sent if isinstance(s[1], PrefillDone)]
    assert done.num_kv_blocks == 7 and done.timeline["kv_streamed_blocks"] == 6
    assert p.svc.counters["kv_blocks_streamed"] == 6
    # The streamed blocks are P's KV as the finished request holds it (none was sent early).
    owned = p.svc.engine.block_manager.owned(f"kv:{done.req_id}")[:7]
    msgs = [(m, f) for _, m, f in p.take() if isinstance(m, (KVBlocks, PrefillDone))]
    kv = sent_kv(msgs)
    for i, b in enumerate(owned):
        assert p.svc.engine.runner.kv_cache[b].view(torch.uint8).numpy().tobytes() == kv[i]
    # Delivered to D in order: D holds exactly that KV, and decodes.
    for m, f in msgs:
        d.deliver(m, p.name, f)
    assert_holds(d, grant, kv)
    assert "r1" in d.svc.streams


def test_without_streaming_everything_moves_after_the_last_chunk(pair):
    p, d = Node(PrefillService, "prefill-0", stream=False), pair[1]
    start(p, d)
    assert prefill(p) == [[], [], [], ["Tokens", "KVBlocks", "PrefillDone"]]
    p.svc.close()


@pytest.mark.parametrize("fault", ["reorder", "duplicate", "drop", "late", "killed"])
def test_chunk_faults_end_exact_or_with_nothing_held(pair, fault):
    """reorder: PrefillDone first, chunks backwards; duplicate: every message twice; drop: one
    chunk lost; late: a chunk arrives after the lease expired; killed: the prefill died after
    its first chunk (no more KV, no PrefillDone)."""
    p, d = pair
    grant = start(p, d)
    prefill(p)
    msgs = [(m, f) for _, m, f in p.take() if isinstance(m, (KVBlocks, PrefillDone))]
    kv = sent_kv(msgs)
    late = None
    if fault == "reorder":
        msgs = msgs[-1:] + msgs[-2::-1]
    elif fault == "duplicate":
        msgs = [x for x in msgs for _ in (0, 1)]
    elif fault == "drop":
        del msgs[1]
    elif fault == "late":
        late = msgs.pop(1)
    elif fault == "killed":
        msgs = msgs[:1]
    for m, f in msgs:
        d.deliver(m, p.name, f)
    if fault in ("reorder", "duplicate"):
        assert "r1" in d.svc.streams, d.svc.counters
        assert_holds(d, grant, kv)
        assert d.svc.ledger.grants == {}
        return
    # Incomplete: nothing is decoded; the lease ends it and frees every block.
    assert "r1" not in d.svc.streams and grant.grant_id in d.svc.ledger.grants
    free_before = d.svc.engine.block_manager.num_free_blocks
    d.svc.ledger.clock = lambda: time.monotonic() + 60
    d.svc.tick()
    assert d.svc.ledger.grants == {} and not d.svc.engine.scheduler.requests
    assert d.svc.engine.block_manager.num_free_blocks == free_before + len(grant.block_ids)
    sent = d.take()
    assert {type(m) for _, m, _ in sent} == {GrantExpired}, sent
    if late is not None:
        d.deliver(late[0], p.name, late[1])        # for a grant gone: dropped, never written
        assert d.svc.counters["kv_dropped"] >= 1
    # The prefill, told, gives the request back to the router (a retry, no token sent twice).
    p.deliver(sent[0][1], d.name)
    assert not any(isinstance(m, Tokens) for _, m, _ in p.sent)


def test_grant_expiring_mid_stream_on_the_prefill_side(pair):
    """The decode's lease ends while chunks are still being computed: the prefill drops the
    job at once (its engine stops computing it; nothing it holds stays held), tells the
    router, and later chunks are never sent."""
    p, d = pair
    grant = start(p, d)
    p.svc.on_step(p.svc.engine.step())                # first chunk: blocks 0, 1 sent
    assert [type(m).__name__ for _, m, _ in p.take()] == ["KVBlocks"]
    p.deliver(GrantExpired(grant.grant_id, "r1"), d.name)
    assert "r1" not in p.svc.jobs and not p.svc.engine.scheduler.requests
    assert [type(m) for _, m, _ in p.take()] == [Reject]
    p.svc.on_step(p.svc.engine.step())
    assert p.take() == []
    bm = p.svc.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not bm.owners()
