"""Engine services in-process, around the edges of their lifetime: a drain whose streams are
aborted while their KV is still being written, and a prefill whose decode vanished while zero-copy
KV frames still viewed its cache blocks."""

from __future__ import annotations

import time

import pytest
import torch

from fdpd.config import EngineConfig, InstanceConfig, PDConfig
from fdpd.engine.engine import Engine
from fdpd.pd.mixed import MixedService
from fdpd.pd.prefill import PrefillService
from fdpd.pd.protocol import Abort, Envelope, Grant, Migrate, Submit
from fdpd.pd.transport import Inbound
from fdpd.sampling_params import SamplingParams
from fdpd.testing.processes import free_port

PARAMS = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True).to_dict()
ROUTER = "tcp://127.0.0.1:9"          # never dialled: sends are recorded


def make(cls, pd: PDConfig | None = None, record: bool = True):
    torch.set_num_threads(1)
    svc = cls(Engine(EngineConfig(model="tiny", num_kv_blocks=64)), pd or PDConfig(),
              InstanceConfig(role=cls.role, metrics_port=-1))
    sent: list = []
    if record:
        svc.send = lambda address, msg, frames=(): sent.append((address, msg))
    return svc, sent


def deliver(svc, msg, src: str = "router") -> None:
    svc._dispatch(Inbound(Envelope(src, 1, 0, msg), [], time.monotonic()))


def test_a_stream_aborted_while_its_migration_waits_is_skipped(monkeypatch):
    """Was: KeyError out of drain_step (the process died, the other streams never moved)."""
    svc, sent = make(MixedService)
    try:
        for rid in ("a", "b"):
            deliver(svc, Submit(rid, [1, 2, 3, 4, 5], PARAMS, 7, 64, ROUTER, 30.0))
        for _ in range(3):
            svc.on_step(svc.engine.step())
        # Write-backs in flight: the Migrate messages wait for them.
        monkeypatch.setattr(svc.engine.scheduler.preemption, "pending", lambda: 1)
        svc.start_drain(30.0)
        assert svc.drain_step() is False
        assert not [m for _, m in sent if isinstance(m, Migrate)]
        deliver(svc, Abort("a", "client gone"))
        monkeypatch.setattr(svc.engine.scheduler.preemption, "pending", lambda: 0)
        assert svc.drain_step() is True
        migrated = [m for _, m in sent if isinstance(m, Migrate)]
        assert [(m.req_id, m.num_output_tokens) for m in migrated] == [("b", 3)]
        assert not svc.streams and svc.engine.block_manager.num_free_blocks == 64
    finally:
        svc.close()


@pytest.mark.timeout(60)
def test_kv_frames_to_a_vanished_decode_release_the_blocks_after_the_grant_ttl():
    """Was: the shipped blocks stayed held for good (their frames never left the queue)."""
    svc, _ = make(PrefillService, PDConfig(grant_ttl=0.5), record=False)
    try:
        nowhere = f"tcp://127.0.0.1:{free_port()}"        # nobody listens here
        deliver(svc, Submit("r", list(range(1, 41)), PARAMS, 7, 8, ROUTER, 30.0,
                            decode_id="decode-x", decode_address=nowhere))
        deliver(svc, Grant("r", "g", [0, 1, 2, 3], 0, 0.5), src="decode-x")
        while "r" in svc.jobs:
            svc.on_step(svc.engine.step())
        bm = svc.engine.block_manager
        assert len(svc.sending) == 1 and bm.num_free_blocks < bm.num_blocks   # held
        deadline = time.monotonic() + 10
        while svc.sending and time.monotonic() < deadline:
            svc.tick()
            time.sleep(0.05)
        assert not svc.sending and bm.num_free_blocks == bm.num_blocks
        assert svc.counters["kv_sends_abandoned"] == 1
    finally:
        svc.close()
