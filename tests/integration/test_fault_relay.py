"""The fault-injecting relay (``fdpd.testing.relay.FaultRelay``) that test_message_faults.py puts
in front of every instance: it forwards frames and routes replies back, and its drops,
duplicates, delays and reorders are counted and replayable from a seed. Also the
``--advertise-address`` an instance gives its peers instead of its own inbox (the relay's).

The seed is printed; ``FDPD_FAULT_SEED=N`` replays it.
"""

from __future__ import annotations

import os
import random
import time

import pytest
import zmq

from fdpd.config import ConfigError, InstanceConfig
from fdpd.pd.protocol import Abort, Error, KVBlocks, decode
from fdpd.pd.transport import Transport
from fdpd.testing.relay import FaultPlan, FaultRelay

SEED = int(os.environ.get("FDPD_FAULT_SEED") or random.SystemRandom().randrange(2**31))


@pytest.fixture
def pair():
    """A sender and a receiver transport, and a relay in front of the receiver."""
    print(f"relay seed: {SEED} (replay with FDPD_FAULT_SEED={SEED})")
    made: list = []
    try:
        receiver = Transport("decode", 1)
        made.append(receiver)
        sender = Transport("prefill", 1)
        made.append(sender)
        relay = FaultRelay(receiver.address, seed=SEED, name="unit")
        made.append(relay)
        yield sender, receiver, relay
    finally:
        for thing in reversed(made):
            thing.close()


def wait_until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def receive_all(transport: Transport, n: int, timeout: float = 5.0) -> list:
    out, deadline = [], time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        inbound = transport.recv(0.05)
        if inbound is not None:
            out.append(inbound)
    return out


@pytest.mark.timeout(30)
def test_relay_forwards_frames_and_routes_replies_back(pair):
    sender, receiver, relay = pair
    frame = bytes(range(256)) * 64
    for i in range(50):
        sender.send(relay.address, KVBlocks(f"g{i}", f"r{i}", 0, 1, "float32", [1]), [frame])
    got = receive_all(receiver, 50)
    assert [m.msg.req_id for m in got] == [f"r{i}" for i in range(50)]
    assert all(m.frames[0].bytes == frame and m.envelope.src == "prefill" for m in got)
    assert relay.counts() == {("forwarded", "kv_blocks"): 50}
    # The receiver answers a malformed message on its connection: the relay routes it back.
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(relay.address)
        sock.send(b"\xc1 not msgpack")
        assert sock.poll(5000), "no reply came back through the relay"
        reply = decode(sock.recv()).msg
    finally:
        sock.close()
        ctx.term()
    assert isinstance(reply, Error) and reply.code == "malformed"
    assert relay.counts()[("forwarded", "?")] == 1


@pytest.mark.timeout(30)
def test_relay_faults_are_counted_and_replayable(pair):
    sender, receiver, relay = pair
    relay.set_plan(FaultPlan(drop=0.2, duplicate=0.2, reorder=0.3, delay=0.1,
                             types=frozenset({"abort"})), seed=SEED)
    n = 200
    for i in range(n):
        sender.send(relay.address, Abort(f"r{i}"))
    sender.send(relay.address, KVBlocks("g", "last", 0, 1, "float32", [1]), [b"x"])
    wait_until(lambda: relay.received == n + 1)
    counts = relay.counts()
    expected = n - counts["dropped", "abort"] + counts["duplicated", "abort"] + 1
    got = receive_all(receiver, expected)
    assert len(got) == expected and receive_all(receiver, 1, 0.3) == [], relay.report()
    ids = [m.msg.req_id for m in got]
    dropped = {e.req_id for e in relay.events() if e.action == "dropped"}
    duplicated = [e.req_id for e in relay.events() if e.action == "duplicated"]
    assert set(ids) == {f"r{i}" for i in range(n)} - dropped | {"last"}
    assert sorted(r for r in set(ids) if ids.count(r) == 2) == sorted(duplicated)
    assert ids != sorted(ids, key=lambda r: (r != "last", int(r[1:]) if r != "last" else 0))
    for action in ("dropped", "duplicated", "reordered", "delayed"):
        assert relay.total(action, "abort") > 0, relay.report()
    assert counts["forwarded", "kv_blocks"] == 1            # not in the plan's types
    # The same seed makes the same decisions for the same sequence of messages.
    first = [(e.n, e.action) for e in relay.events()]
    relay.set_plan(relay.plan, seed=SEED)
    relay.reset_counts()
    for i in range(n):
        sender.send(relay.address, Abort(f"r{i}"))
    receive_all(receiver, expected - 1, 5.0)
    assert [(e.n - n - 1, e.action) for e in relay.events()] == first


def test_fault_plan_rejects_nonsense():
    with pytest.raises(ValueError, match="drop"):
        FaultPlan(drop=1.5)
    with pytest.raises(ValueError, match="unknown message types"):
        FaultPlan(types=frozenset({"submitt"}))
    with pytest.raises(ValueError, match="delay_ms"):
        FaultPlan(delay_ms=(50.0, 1.0))


def test_advertise_address_is_validated():
    inst = InstanceConfig(role="decode", advertise_address="tcp://127.0.0.1:5555")
    assert inst.advertised("tcp://127.0.0.1:4444") == "tcp://127.0.0.1:5555"
    assert InstanceConfig(role="decode").advertised("tcp://0.0.0.0:4444") != \
        "tcp://0.0.0.0:4444"
    for bad in ("127.0.0.1:5555", "tcp://:5555", "tcp://h:0", "tcp://h:70000", "tcp://h"):
        with pytest.raises(ConfigError, match="advertise_address: expected tcp://HOST:PORT"):
            InstanceConfig(role="decode", advertise_address=bad)
