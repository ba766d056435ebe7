"""A real 1P1D cluster fed hostile ZeroMQ frames (issue 7, "Bad input").

From the test, a DEALER per instance sends seeded random and mutated frames (the strategies of
``tests/unit/test_fuzz_protocol.py``) to the decode's and the prefill's inbox: random bytes,
mutated envelopes of every message type, well-formed messages with hostile contents, multipart
messages with random extra frames, and KV headers with lying shapes, dtypes, ranges and frame
sizes for grants that do and do not exist. A scripted fake prefill also walks real grants
through a lying transfer (a first token outside the vocabulary, which used to crash the
decode's engine loop) and an honest one. Every address in what is sent points at the test's own
ROUTER socket, so the instances answer the test and dial nothing else.

Afterwards: every process is alive and healthy, no handler raised, each instance counted
exactly the frames the decoder refuses as ``malformed``, requests through the router are still
token-exact against the offline engine, and the harness's quiescence check at exit (nothing
running, every block free, the decode's ledger back to zero) passes.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from fdpd.pd.protocol import (
    Abort,
    AllocRequest,
    Codec,
    Grant,
    KVBlocks,
    Message,
    PrefillDone,
    ProtocolError,
    Tokens,
    TransferResult,
    decode,
)
from fdpd.sampling_params import SamplingParams
from fdpd.testing import Cluster, free_port

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # see test_model.py
from tests.integration import test_pd_cluster
from tests.integration.test_pd_cluster import POOL, assert_exact, run_concurrently, why, workload
from tests.unit.test_fuzz_protocol import (
    ADDRESS_FIELDS,
    ANY_FRAME,
    DURATION_FIELDS,
    FUZZ_EXAMPLES,
    INT64,
    JUNK,
    MESSAGES,
    mutated_frames,
)

reference = test_pd_cluster.reference       # fixture: the offline engine's greedy outputs
FRAMES_PER_INSTANCE = FUZZ_EXAMPLES or 300
VOCAB = 384
# A KV block of the tiny model: [layers, 2, blocks, block_size, kv_heads, head_dim] float32.
KV_TAIL = [4, 2, 1, 16, 2, 32]
CI_GREEDY = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True).to_dict()


@st.composite
def live_messages(draw, sink: str) -> Message:
    """A message the decoder accepts, aimed at the test: addresses are ``sink``, durations at
    most 2 s; requests are sometimes valid for the tiny model (so they take real state)."""
    msg = draw(MESSAGES)
    changes = {}
    for f in dataclasses.fields(msg):
        if f.name in ADDRESS_FIELDS or f.name == "decode_address":
            changes[f.name] = sink
        elif f.name in DURATION_FIELDS:
            changes[f.name] = min(getattr(msg, f.name), 2.0)
        elif f.name == "load":
            changes[f.name] = {k: v for k, v in msg.load.items() if k != "address"}
    if hasattr(msg, "prompt_token_ids") and draw(st.booleans()):
        changes.update(prompt_token_ids=draw(st.lists(st.integers(0, VOCAB - 1), min_size=1,
                                                      max_size=24)),
                       params=CI_GREEDY, max_tokens=3, num_output_tokens=0)
    return dataclasses.replace(msg, **changes)


# Lies about KV for a grant: index -1 means a grant id that does not exist.
KV_LIES = st.fixed_dictionaries({
    "grant": st.integers(-1, 3), "first": st.integers(-2, 4) | INT64,
    "count": st.integers(-1, 4) | INT64,
    "dtype": st.sampled_from(["float32", "float16", "int8", "", "float32 "]),
    "shape": st.sampled_from(["right", "zero", "negative", "tail", "short"]) | st.lists(
        INT64, max_size=7),
    "frames": st.lists(st.binary(max_size=64) | st.sampled_from([bytes(16384), b""]),
                       max_size=3)})


class FakePeer:
    """The test's sockets: a DEALER per instance inbox, and the ROUTER (``sink``) every
    address in what we send points at."""

    def __init__(self, addresses: dict[str, str]):
        self.ctx = zmq.Context()
        self.sink_socket = self.ctx.socket(zmq.ROUTER)
        self.sink_socket.setsockopt(zmq.LINGER, 0)
        port = free_port()
        self.sink = f"tcp://127.0.0.1:{port}"
        self.sink_socket.bind(self.sink)
        self.dealers = {}
        for name, address in addresses.items():
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(address)
            self.dealers[name] = sock
        self.codec = Codec("fuzz-peer", 1)
        self.received: list[Message] = []
        self.grants: list[Grant] = []
        self.request_ids: dict[str, set[str]] = {name: set() for name in addresses}
        self.malformed = dict.fromkeys(addresses, 0)

    def send(self, name: str, frames: list[bytes]) -> None:
        """Send a multipart message; note whether the decoder refuses its first frame and
        which requests it starts (to abort them at the end)."""
        try:
            msg = decode(frames[0]).msg
        except ProtocolError:
            self.malformed[name] += 1
        else:
            if hasattr(msg, "prompt_token_ids"):         # Submit, AllocRequest
                self.request_ids[name].add(msg.req_id)
        self.dealers[name].send_multipart(frames)
        self.drain()

    def send_msg(self, name: str, msg: Message, frames: list[bytes] = ()) -> None:
        self.send(name, [self.codec.encode(msg), *frames])

    def drain(self, timeout_ms: int = 0) -> None:
        """Read what the instances sent to the sink (and their Error replies, discarded)."""
        for sock in self.dealers.values():
            while sock.poll(0):
                sock.recv_multipart()
        while self.sink_socket.poll(timeout_ms):
            parts = self.sink_socket.recv_multipart()
            msg = decode(parts[1]).msg
            self.received.append(msg)
            if isinstance(msg, Grant):
                self.grants.append(msg)
            timeout_ms = 0

    def wait_for(self, predicate, what: str, timeout_ms: int = 10_000):
        for _ in range(timeout_ms // 50):
            found = next((m for m in self.received if predicate(m)), None)
            if found is not None:
                return found
            self.drain(50)
        raise AssertionError(f"no {what} from the instances within {timeout_ms} ms")

    def close(self) -> None:
        self.ctx.destroy(linger=0)


def kv_lie(peer: FakePeer, lie: dict) -> list[bytes]:
    grant = peer.grants[lie["grant"] % len(peer.grants)] if peer.grants and lie["grant"] >= 0 \
        else None
    shape = {"right": KV_TAIL, "zero": [*KV_TAIL[:2], 0, *KV_TAIL[3:]],
             "negative": [*KV_TAIL[:2], -1, *KV_TAIL[3:]], "tail": [*KV_TAIL[:5], 33],
             "short": KV_TAIL[:3]}.get(lie["shape"], lie["shape"]) \
        if isinstance(lie["shape"], str) else lie["shape"]
    msg = KVBlocks(grant.grant_id if grant else "no-such-grant", grant.req_id if grant else "x",
                   lie["first"], lie["count"], lie["dtype"], shape)
    return [peer.codec.encode(msg), *lie["frames"]]


def scripted_transfers(peer: FakePeer, prompt: list[int]) -> None:
    """A fake prefill takes two grants: one transfer ends with a first token outside the
    vocabulary (refused: the transfer fails), one is honest (adopted, decoded, finished)."""
    outcomes = {}
    for req_id, first_token in (("fuzz-lie", 10**6), ("fuzz-honest", 65)):
        peer.send_msg("decode", AllocRequest(req_id, prompt, CI_GREEDY, 1, 3, peer.sink,
                                             peer.sink, 2.0))
        grant = peer.wait_for(lambda m, r=req_id: isinstance(m, Grant) and m.req_id == r,
                              f"grant for {req_id}")
        blocks = math.ceil(len(prompt) / KV_TAIL[3]) - grant.cached_blocks
        shape = [*KV_TAIL[:2], blocks, *KV_TAIL[3:]]
        peer.send_msg("decode", KVBlocks(grant.grant_id, req_id, grant.cached_blocks, blocks,
                                         "float32", shape), [bytes(4 * math.prod(shape))])
        peer.send_msg("decode", PrefillDone(grant.grant_id, req_id, first_token, -0.5, blocks,
                                            0))
        outcomes[req_id] = peer.wait_for(
            lambda m, r=req_id: isinstance(m, TransferResult) and m.req_id == r,
            f"transfer result for {req_id}")
    assert not outcomes["fuzz-lie"].ok and "first_token" in outcomes["fuzz-lie"].reason
    assert outcomes["fuzz-honest"].ok
    last = peer.wait_for(lambda m: isinstance(m, Tokens) and m.req_id == "fuzz-honest"
                         and m.finished, "the honest request's last tokens")
    assert last.finish_reason == "length"


@pytest.mark.timeout(120 + FRAMES_PER_INSTANCE // 10)
def test_instances_survive_hostile_frames(cluster_factory, reference):
    cluster: Cluster = cluster_factory(num_prefill=1, num_decode=1, common_args=POOL)
    views = {v["instance_id"]: v for v in cluster.cluster()["instances"]}
    names = {"prefill": "prefill-0", "decode": "decode-0"}
    before = {role: views[name] for role, name in names.items()}
    peer = FakePeer({role: before[role]["address"] for role in names})
    try:
        scripted_transfers(peer, list(range(40, 80)))

        @settings(max_examples=FRAMES_PER_INSTANCE * len(names), derandomize=True,
                  database=None,
                  deadline=None, phases=[Phase.generate], suppress_health_check=list(HealthCheck))
        @given(st.sampled_from(sorted(names)), st.one_of(
            ANY_FRAME.map(lambda f: [f]),
            live_messages(peer.sink).map(lambda m: [peer.codec.encode(m)]),
            mutated_frames(live_messages(peer.sink)).map(lambda f: [f]),
            KV_LIES.map(lambda lie: kv_lie(peer, lie))),
            st.lists(st.binary(max_size=32) | JUNK.map(msgpack.packb), max_size=2))
        def send_hostile(role, frames, extra):
            peer.send(role, [*frames, *extra])

        send_hostile()      # seeded: FRAMES_PER_INSTANCE per instance on average
        # Clean up as the router would: abort every request the stream started.
        for role, ids in peer.request_ids.items():
            for req_id in sorted(ids):
                peer.send_msg(role, Abort(req_id, "fuzz over"))

        def counted() -> dict | None:
            peer.drain()
            views = {v["instance_id"]: v for v in cluster.cluster()["instances"]}
            now = {role: views.get(name, {}) for role, name in names.items()}
            # (An instance the stream told to register again shows no load until its next
            # heartbeat.)
            done = all("transport" in now[r] and now[r]["transport"]["malformed"]
                       >= before[r]["transport"]["malformed"] + peer.malformed[r]
                       for r in names)
            return now if done else None

        after = cluster.wait_for(counted, 30, what="every malformed frame counted",
                                 check_alive=True)
    finally:
        peer.close()
    sent = sum(peer.malformed.values())
    print(f"\nfuzz: {FRAMES_PER_INSTANCE * len(names)} hostile messages sent, {sent} malformed "
          f"(prefill {peer.malformed['prefill']}, decode {peer.malformed['decode']})")
    for role in names:
        a, b = after[role], before[role]
        assert a["transport"]["malformed"] == b["transport"]["malformed"] + peer.malformed[role],\
            why(cluster, role, a["transport"], peer.malformed)
        assert a["handler_errors"] == b["handler_errors"], why(cluster, role, "handler raised")
    assert all(p.alive for p in (cluster.router, *cluster.processes))
    cases = workload(seed=7, n=12)
    assert_exact(cluster, cases, run_concurrently(cluster, cases), reference)
