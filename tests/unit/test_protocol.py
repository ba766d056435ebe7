"""Wire protocol and transport: round trips, malformed input, epochs, KV frames."""

from __future__ import annotations

import time

import msgpack
import pytest
import torch
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from fdpd.pd import kv_transfer
from fdpd.pd.protocol import (
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    Abort,
    AllocRequest,
    Codec,
    Error,
    Grant,
    KVBlocks,
    ProtocolError,
    Tokens,
    decode,
)
from fdpd.pd.transport import Transport

SAMPLES = [
    Grant("r1", "g1", [3, 4, 5], 1, 30.0),
    Tokens("r1", [1, 2], [-0.5, -0.25], True, "stop", "</s>", 10, 4),
    AllocRequest("r1", [1, 2, 3], {"max_tokens": 4}, 7, 4, "tcp://a:1", "tcp://b:2", 5.0),
    Error("malformed", "bad", ""),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: m.TYPE)
def test_round_trip(msg):
    env = decode(Codec("me", 42).encode(msg))
    assert (env.src, env.epoch) == ("me", 42)
    assert env.msg == msg


def test_sequence_numbers_increase():
    codec = Codec("me", 1)
    seqs = [decode(codec.encode(SAMPLES[0])).seq for _ in range(3)]
    assert seqs == [0, 1, 2]


def raw(t="grant", p=None, **env):
    base = {"v": PROTOCOL_VERSION, "t": t, "src": "x", "ep": 1, "seq": 0,
            "p": p if p is not None else SAMPLES[0].payload()}
    base.update(env)
    return msgpack.packb(base, use_bin_type=True)


@pytest.mark.parametrize("frame, match", [
    (b"\xc1\xc1garbage", "undecodable"),
    (msgpack.packb([1, 2, 3]), "must be a map"),
    (raw(v=99), "unsupported protocol version 99"),
    (raw(t="launch_missiles"), "unknown message type"),
    (raw(src=5), "src"),
    (raw(p={"req_id": "r"}), "missing field"),
    (raw(p={**SAMPLES[0].payload(), "evil": 1}), "unknown field 'evil'"),
    (raw(p={**SAMPLES[0].payload(), "block_ids": "0-3"}), "grant.block_ids"),
    (raw(p={**SAMPLES[0].payload(), "cached_blocks": True}), "cached_blocks"),
    (raw(p=[1]), "payload must be a map"),
])
def test_malformed_envelopes_raise_protocol_error(frame, match):
    with pytest.raises(ProtocolError, match=match):
        decode(frame)


@settings(max_examples=300, deadline=None, database=None)
@given(st.binary(max_size=200))
def test_decoder_never_raises_anything_but_protocol_error(data):
    try:
        decode(data)
    except ProtocolError:
        pass


@settings(max_examples=200, deadline=None, database=None)
@given(st.sampled_from(sorted(MESSAGE_TYPES)), st.dictionaries(
    st.text(max_size=8), st.one_of(st.integers(-2**63, 2**64 - 1), st.text(max_size=5), st.none(),
                                   st.lists(st.integers(0, 9), max_size=3)), max_size=5))
def test_random_payloads_for_every_type_are_rejected_cleanly(t, payload):
    try:
        decode(raw(t=t, p=payload))
    except ProtocolError:
        pass


# ---------------------------------------------------------------------- transport
@pytest.fixture
def pair():
    a = Transport("a", 1)
    b = Transport("b", 1)
    yield a, b
    a.close()
    b.close()


def wait_recv(t, timeout=5.0):
    inbound = t.recv(timeout)
    assert inbound is not None, "nothing received"
    return inbound


def test_message_with_kv_frame_arrives_intact(pair):
    a, b = pair
    kv = torch.randn(2, 2, 3, 4, 2, 8)
    a.send(b.address, KVBlocks("g", "r", 0, 3, "float32", list(kv.shape)),
           [kv_transfer.to_frame(kv)])
    inbound = wait_recv(b)
    assert inbound.envelope.src == "a"
    got = kv_transfer.from_frame(inbound.frames[0].buffer, "float32", inbound.msg.shape,
                              torch.float32, (2, 2, 99, 4, 2, 8))
    assert torch.equal(got, kv)


def test_kv_frame_checks_layout():
    kv = torch.zeros(2, 2, 1, 4, 2, 8)
    frame = kv_transfer.to_frame(kv)
    with pytest.raises(kv_transfer.KVFrameError, match="dtype"):
        kv_transfer.from_frame(frame, "float16", kv.shape, torch.float32, kv.shape)
    with pytest.raises(kv_transfer.KVFrameError, match="shape"):
        kv_transfer.from_frame(frame, "float32", [2, 2, 1, 4, 2, 4], torch.float32, kv.shape)
    with pytest.raises(kv_transfer.KVFrameError, match="bytes"):
        kv_transfer.from_frame(frame[:-4], "float32", kv.shape, torch.float32, kv.shape)


def test_malformed_frame_is_counted_and_answered(pair):
    _, b = pair
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(b.address)
    try:
        s.send(b"not msgpack at all \xc1")
        assert s.poll(5000), "no error reply"
        env = decode(s.recv())
        assert isinstance(env.msg, Error) and env.msg.code == "malformed"
        assert b.stats.malformed == 1
        assert b.recv(0.2) is None                       # nothing reached the engine
    finally:
        s.close()


def test_stale_epoch_is_dropped(pair):
    a, b = pair
    a.send(b.address, SAMPLES[0])
    wait_recv(b)
    old = Transport("a", 0)                               # an earlier incarnation of "a"
    try:
        old.send(b.address, SAMPLES[0])
        deadline = time.monotonic() + 5
        while b.stats.stale_epoch == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert b.stats.stale_epoch == 1
        assert b.recv(0.1) is None
    finally:
        old.close()


def test_a_loop_that_falls_behind_pauses_the_inbox_and_loses_nothing(pair, monkeypatch):
    import fdpd.pd.transport as transport_module

    monkeypatch.setattr(transport_module, "MAX_INBOUND", 40)
    a, b = pair
    for i in range(600):
        a.send(b.address, Abort(f"r{i}"))
    # Nobody reads b: its IO thread stops taking from the inbox near the bound (it drains at
    # most one batch of 256 per socket between checks) and the rest waits in ZMQ.
    deadline = time.monotonic() + 5
    while b.stats.inbox_paused == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    assert b.stats.inbox_paused >= 1
    assert b._inbound.qsize() < 40 + 256
    got = [wait_recv(b).msg.req_id for _ in range(600)]
    assert got == [f"r{i}" for i in range(600)]          # all of it, in order
    assert b.recv(0.1) is None
