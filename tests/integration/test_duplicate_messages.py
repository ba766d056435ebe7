"""Each bug the message-fault relay found (test_message_faults.py), pinned in process, handler
by handler: a prefill or decode service on the tiny model is fed the duplicated, late and
reordered messages the relay produced, and what it sends back is recorded.
"""

from __future__ import annotations

import time

import pytest

from fdpd.config import EngineConfig, InstanceConfig, PDConfig
from fdpd.engine.engine import Engine
from fdpd.pd import kv_transfer
from fdpd.pd.decode import DecodeService
from fdpd.pd.prefill import PrefillService
from fdpd.pd.protocol import (
    Abort,
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
    TransferResult,
)
from fdpd.pd.transport import Inbound
from fdpd.sampling_params import SamplingParams

PROMPT = list(range(1, 41))              # 3 blocks of 16: KV for blocks 0..2
PARAMS = SamplingParams(max_tokens=8, temperature=0).to_dict()


class Service:
    """A prefill or decode service on the tiny model whose outgoing messages are recorded."""

    def __init__(self, cls):
        engine = Engine(EngineConfig(model="tiny", num_kv_blocks=64))
        self.svc = cls(engine, PDConfig(grant_ttl=2.0, transfer_timeout=2.0),
                       InstanceConfig(role=cls.role, metrics_port=-1))
        self.sent: list[tuple[str, object]] = []
        self.svc.send = lambda address, msg, frames=(): self.sent.append((address, msg))
        self._seq = 0

    def deliver(self, msg, src: str, frames=()) -> None:
        self._seq += 1
        self.svc._dispatch(Inbound(Envelope(src, 1, self._seq, msg), list(frames),
                                   time.monotonic()))

    def take(self) -> list[tuple[str, object]]:
        sent, self.sent = self.sent, []
        return sent


@pytest.fixture
def decode_service():
    d = Service(DecodeService)
    yield d
    d.svc.ledger.check()
    d.svc.close()


@pytest.fixture
def prefill_service():
    p = Service(PrefillService)
    yield p
    p.svc.close()


def alloc(req_id: str) -> AllocRequest:
    return AllocRequest(req_id, PROMPT, PARAMS, 0, 8, "tcp://p", "tcp://router", 5.0)


def kv_for(d: Service, grant: Grant) -> tuple[KVBlocks, list[bytes]]:
    """The KVBlocks message and frame for every block of ``grant`` (zeros)."""
    cache = d.svc.engine.runner.kv_cache
    n = 3 - grant.cached_blocks
    shape = kv_transfer.wire_shape(cache, n)
    data = bytes(cache[:n].numel() * cache.element_size())
    return (KVBlocks(grant.grant_id, grant.req_id, grant.cached_blocks, n,
                     kv_transfer.DTYPE_NAMES[cache.dtype], shape), [data])


def done_for(grant: Grant) -> PrefillDone:
    return PrefillDone(grant.grant_id, grant.req_id, 7, None, 3 - grant.cached_blocks, 0)


def types(sent) -> list[str]:
    return [type(m).__name__ for _, m in sent]


@pytest.mark.timeout(60)
def test_decode_grants_a_duplicated_alloc_request_once(decode_service):
    """Was: the copy got a Reject (the prefill then failed the request), or, arriving after
    the commit, a second grant, whose give-back Abort ended the running request."""
    d = decode_service
    d.deliver(alloc("r1"), "prefill-0")
    d.deliver(alloc("r1"), "prefill-0")
    ((_, grant),) = d.take()
    assert isinstance(grant, Grant) and len(d.svc.ledger.grants) == 1
    kv, frames = kv_for(d, grant)
    d.deliver(kv, "prefill-0", frames)
    d.deliver(done_for(grant), "prefill-0")
    assert types(d.take()) == ["TransferResult", "Tokens"]
    assert "r1" in d.svc.engine.scheduler.requests
    d.deliver(alloc("r1"), "prefill-0")                   # late copy, request running
    d.deliver(done_for(grant), "prefill-0")               # and PrefillDone's copy
    d.deliver(kv, "prefill-0", frames)
    assert d.take() == [] and "r1" in d.svc.engine.scheduler.requests
    assert d.svc.counters["duplicates"] == 3 and d.svc.counters["kv_dropped"] == 1
    assert not d.svc.ledger.grants
    d.deliver(Abort("r1"), "router")
    assert not d.svc.engine.scheduler.requests
    # An Abort that overtook its AllocRequest: the AllocRequest gets no grant to leak.
    d.deliver(Abort("r2"), "prefill-0")
    d.deliver(alloc("r2"), "prefill-0")
    assert d.take() == [] and not d.svc.ledger.grants
    assert d.svc.engine.block_manager.num_free_blocks == 64


@pytest.mark.timeout(60)
def test_decode_prefill_done_before_its_kv_waits_for_it(decode_service):
    """Was: a PrefillDone that overtook some of its KV failed the transfer at once (and the
    request, with one decode); its duplicate was answered with a failed TransferResult."""
    d = decode_service
    d.deliver(alloc("r1"), "prefill-0")
    ((_, grant),) = d.take()
    kv, frames = kv_for(d, grant)
    d.deliver(done_for(grant), "prefill-0")
    assert d.take() == [] and d.svc.ledger.grants[grant.grant_id].early_done is not None
    d.deliver(done_for(grant), "prefill-0")               # its duplicate changes nothing
    d.deliver(kv, "prefill-0", frames)
    sent = d.take()
    assert types(sent) == ["TransferResult", "Tokens"], sent
    assert sent[0][1].ok and sent[1][1].token_ids == [7]
    assert "r1" in d.svc.engine.scheduler.requests and not d.svc.ledger.grants
    d.deliver(Abort("r1"), "router")
    # The KV never comes: the lease ends the wait, frees the blocks and says so.
    d.deliver(alloc("r2"), "prefill-0")
    ((_, grant),) = d.take()
    d.deliver(done_for(grant), "prefill-0")
    d.svc.ledger.clock = lambda: time.monotonic() + 2.0
    d.svc.tick()
    assert [(a, type(m)) for a, m in d.take()] == [("tcp://p", GrantExpired),
                                                  ("tcp://router", GrantExpired)]
    assert not d.svc.ledger.grants and d.svc.engine.block_manager.num_free_blocks == 64


def submit(req_id: str) -> Submit:
    return Submit(req_id, PROMPT, PARAMS, 0, 8, "tcp://router", 5.0, decode_id="decode-0",
                  decode_address="tcp://d")


@pytest.mark.timeout(60)
def test_prefill_takes_a_duplicated_submit_and_grant_once(prefill_service):
    """Was: the Submit's copy was refused as 'already in the engine' (HTTP 400 for a healthy
    request); a copy of the grant arriving after the KV went out was 'given back' with an Abort
    that ended the request on the decode."""
    p = prefill_service
    p.deliver(submit("r1"), "router")
    p.deliver(submit("r1"), "router")
    sent = p.take()
    assert [type(m) for _, m in sent] == [SubmitAck, AllocRequest], sent
    assert list(p.svc.engine.scheduler.requests) == ["r1"]
    grant = Grant("r1", "g1", [0, 1, 2], 0, 2.0)
    p.deliver(grant, "decode-0")
    while "r1" in p.svc.jobs:
        p.svc.on_step(p.svc.engine.step())
    # The first token goes to the router first (early), then the KV and PrefillDone.
    assert types(p.take()) == ["Tokens", "KVBlocks", "PrefillDone"]
    p.deliver(grant, "decode-0")
    p.deliver(submit("r1"), "router")
    assert p.take() == [] and not p.svc.jobs and p.svc.counters["duplicates"] == 3
    # A grant for a request this prefill gave up on is still given back at once.
    p.deliver(Grant("gone", "g2", [3], 0, 2.0), "decode-0")
    assert [(a, type(m)) for a, m in p.take()] == [("tcp://d", Abort)]
    # An Abort that overtook its Submit: the Submit starts nothing.
    p.deliver(Abort("r3"), "router")
    p.deliver(submit("r3"), "router")
    assert p.take() == [] and not p.svc.engine.scheduler.requests and not p.svc.jobs
    assert not any(isinstance(m, (Reject, Tokens, TransferResult)) for _, m in p.sent)
