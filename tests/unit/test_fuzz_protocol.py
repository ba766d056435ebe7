"""Property-based fuzzing of the wire protocol and of the services behind it (issue 7).

``decode()`` is the door into every process: whatever the bytes, it returns a well-typed message
or raises ``ProtocolError`` (anything else would kill the transport's IO thread). Strategies:
random bytes, msgpack of random objects, deep nesting, and mutations of valid envelopes of every
message type (bit flips, truncation, type swaps, dropped and extra fields, non-str keys, ext
types, 64-bit extremes, NaN, big lists); valid messages of every type round-trip.

Past the decoder, a real decode and a real prefill service (tiny engines in this process, their
sends recorded) are told lies by a fake peer: prompts of junk, KV headers with lying shapes,
ranges and frame sizes for grants that do and do not exist, first tokens outside the
vocabulary, hostile timelines. No handler may raise, the engine keeps stepping, and once the
request is aborted every block is free and the ledger is empty.

Where validation lives: ``decode`` checks element types (token ids, block ids, shapes),
addresses and durations; ``Engine.make_request`` checks values against the model (vocabulary,
context, pool), and every handler builds its request through it before touching state. Every
message a service gets here went through the real codec, as from the transport.
Cases per property: ``FDPD_FUZZ_EXAMPLES`` when set (``scripts/fuzz``), else the CI count.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import time
from typing import Any

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fdpd.config import EngineConfig, InstanceConfig, PDConfig
from fdpd.engine.engine import Engine
from fdpd.pd.decode import DecodeService
from fdpd.pd.kv_transfer import DTYPE_NAMES, wire_shape
from fdpd.pd.prefill import PrefillService
from fdpd.pd.protocol import (
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    Abort,
    AllocRequest,
    Codec,
    Envelope,
    Error,
    Grant,
    GrantExpired,
    KVBlocks,
    Message,
    PrefillDone,
    ProtocolError,
    Reject,
    Submit,
    SubmitAck,
    Tokens,
    TransferResult,
    decode,
)
from fdpd.pd.transport import Inbound
from fdpd.sampling_params import SamplingParams

FUZZ_EXAMPLES = int(os.environ.get("FDPD_FUZZ_EXAMPLES") or 0)


def fuzz(ci_examples: int) -> settings:
    """One property's settings: ``ci_examples`` cases, or ``FDPD_FUZZ_EXAMPLES`` (the long
    run); no example database (nothing written into the repository), no per-case deadline (the
    machine is shared)."""
    return settings(max_examples=FUZZ_EXAMPLES or ci_examples, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


# ---------------------------------------------------------------------- values
# msgpack carries integers in [-2**63, 2**64): larger ones cannot be sent at all (packb raises).
INT64 = st.integers(-2**63, 2**64 - 1) | st.sampled_from([-2**63, 2**63 - 1, 2**64 - 1, -1, 0])
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)  # UTF-8 encodable
EXT = st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8))
SCALARS = (st.none() | st.booleans() | INT64 | st.floats() | TEXT | st.binary(max_size=12))
JUNK = st.recursive(SCALARS | EXT, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    TEXT | st.binary(max_size=4), inner, max_size=4), max_leaves=10)
ENDPOINTS = st.builds("tcp://{}:{}".format, st.sampled_from(
    ["127.0.0.1", "localhost", "[::1]", "decode-0.fdpd_svc.local"]), st.integers(1, 65535))
DURATIONS = st.floats(0, 1e12) | st.integers(0, 2**64 - 1)
NUMBERS = st.floats(allow_nan=False) | INT64

# Fields whose contents decode() checks beyond their type (protocol._CONTENTS), by name.
ADDRESS_FIELDS = {"address", "reply_to", "router_reply_to"}
DURATION_FIELDS = {"timeout_s", "ttl_s", "retry_after"}
INT_LIST_FIELDS = {("grant", "block_ids"), ("kv_blocks", "shape"), ("tokens", "token_ids"),
                   ("submit", "prompt_token_ids"), ("alloc_request", "prompt_token_ids")}
PLAIN = SCALARS.filter(lambda v: v == v)          # no NaN: it is never equal to itself
# One token's logprobs on the wire: [logprob, rank >= 1, k ids >= 0, k logprobs], k <= 20.
LOGPROB_ENTRY = st.integers(0, 20).flatmap(lambda k: st.tuples(
    NUMBERS, st.integers(1, 2**63 - 1), st.lists(st.integers(0, 2**63 - 1), min_size=k,
                                                 max_size=k),
    st.lists(NUMBERS, min_size=k, max_size=k)).map(list))
BY_ANNOTATION: dict[str, st.SearchStrategy] = {
    "str": TEXT, "int": INT64, "float": NUMBERS, "bool": st.booleans(), "None": st.none(),
    "bytes": st.binary(max_size=16), "list": st.lists(PLAIN, max_size=6),
    "dict": st.dictionaries(TEXT, PLAIN, max_size=4),
}


def field_values(cls: type[Message], f: dataclasses.Field) -> st.SearchStrategy:
    """Valid values of one field (no NaN: a NaN field is valid but never equal to itself)."""
    if f.name in ADDRESS_FIELDS:
        return ENDPOINTS
    if f.name == "decode_address":
        return ENDPOINTS | st.just("")
    if f.name in DURATION_FIELDS:
        return DURATIONS
    if (cls.TYPE, f.name) in INT_LIST_FIELDS:
        return st.lists(INT64, max_size=8)
    if f.name == "logprobs":
        return st.none() | st.lists(NUMBERS, max_size=8)
    if f.name == "token_logprobs":
        return st.none() | st.lists(LOGPROB_ENTRY, max_size=4)
    if f.name == "prompt_logprobs":
        return st.none() | st.lists(LOGPROB_ENTRY, max_size=4).map(lambda rest: [None, *rest])
    if f.name == "load":
        return st.dictionaries(TEXT.filter(lambda k: k != "address"), PLAIN,
                               max_size=4) | st.builds(lambda a: {"address": a}, ENDPOINTS)
    return st.one_of(*(BY_ANNOTATION[t] for t in f.type.split(" | ")))


def messages_of(cls: type[Message]) -> st.SearchStrategy[Message]:
    return st.builds(cls, **{f.name: field_values(cls, f) for f in dataclasses.fields(cls)})


MESSAGES = st.sampled_from(sorted(MESSAGE_TYPES.values(), key=lambda c: c.TYPE)).flatmap(
    messages_of)


# ---------------------------------------------------------------------- mutations
def _target(draw, env: dict) -> dict:
    return env["p"] if isinstance(env.get("p"), dict) and draw(st.booleans()) else env


def swap_value(draw, env: dict) -> None:
    target = _target(draw, env)
    if target:
        target[draw(st.sampled_from(sorted(target, key=repr)))] = draw(JUNK)


def drop_field(draw, env: dict) -> None:
    target = _target(draw, env)
    if target:
        del target[draw(st.sampled_from(sorted(target, key=repr)))]


def extra_field(draw, env: dict) -> None:
    # Non-str keys too: msgpack maps may have any key; the decoder allows str only.
    key = draw(TEXT | st.binary(max_size=4) | INT64 | st.booleans() | st.none() | st.floats())
    _target(draw, env)[key] = draw(JUNK)


def retype(draw, env: dict) -> None:
    env["t"] = draw(st.sampled_from(sorted(MESSAGE_TYPES)) | JUNK)


def extreme_value(draw, env: dict) -> None:
    target = _target(draw, env)
    if target:
        target[draw(st.sampled_from(sorted(target, key=repr)))] = draw(st.sampled_from(
            [2**64 - 1, -2**63, math.nan, math.inf, -math.inf, -0.0, True, b"", "", [], {}]))


def big_list(draw, env: dict) -> None:
    target = _target(draw, env)
    if target:
        size = draw(st.integers(1_000, 100_000))
        item = draw(INT64 | TEXT | st.just([1]))
        target[draw(st.sampled_from(sorted(target, key=repr)))] = [item] * size


def nest(draw, env: dict) -> None:
    target = _target(draw, env)
    if target:
        value: Any = draw(SCALARS)
        for _ in range(draw(st.integers(1, 500))):      # packb's own limit is 511 levels
            value = [value]
        target[draw(st.sampled_from(sorted(target, key=repr)))] = value


MUTATIONS = [swap_value, drop_field, extra_field, retype, extreme_value, big_list, nest]
# Raw msgpack the packer never writes: timestamps (ext -1) valid and not, deep nesting, a
# container header promising 4G items, an uint64 and an int64 at their limits, a reserved byte.
RAW_CHUNKS = [b"\xd6\xff\x00\x00\x00\x01", b"\xd4\xff\x00", b"\xc7\x03\xff\x00\x00\x00",
              b"\x91" * 5000 + b"\xc0", b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff",
              b"\xcf\xff\xff\xff\xff\xff\xff\xff\xff", b"\xd3\x80" + bytes(7), b"\xc1"]


@st.composite
def byte_mutation(draw, frame: bytes) -> bytes:
    kind = draw(st.sampled_from(["flip", "truncate", "splice"]))
    data = bytearray(frame)
    if kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
        return bytes(data)
    if kind == "truncate":
        return bytes(data[:draw(st.integers(0, len(data) - 1))])
    i = draw(st.integers(0, len(data)))
    j = draw(st.integers(i, min(len(data), i + 8)))
    chunk = draw(st.sampled_from(RAW_CHUNKS) | st.binary(min_size=1, max_size=16))
    return bytes(data[:i]) + chunk + bytes(data[j:])


def envelope(msg: Message, src: str = "fuzzer", epoch: int = 1, seq: int = 0) -> dict:
    return {"v": PROTOCOL_VERSION, "t": msg.TYPE, "src": src, "ep": epoch, "seq": seq,
            "p": msg.payload()}


@st.composite
def mutated_frames(draw, messages: st.SearchStrategy[Message] = MESSAGES) -> bytes:
    """A valid envelope of a random message, mutated as a dict, then (sometimes) as bytes."""
    env = envelope(draw(messages), draw(TEXT), draw(INT64), draw(INT64))
    for _ in range(draw(st.integers(1, 3))):
        draw(st.sampled_from(MUTATIONS))(draw, env)
    frame = msgpack.packb(env, use_bin_type=draw(st.booleans()))
    if draw(st.booleans()):
        frame = draw(byte_mutation(frame))
    return frame


ANY_FRAME = (st.binary(max_size=512) | JUNK.map(msgpack.packb) | mutated_frames()
             | st.integers(1, 200_000).map(lambda n: b"\x91" * n + b"\xc0"))


# ---------------------------------------------------------------------- the decoder
PY_TYPES = {"str": (str,), "int": (int,), "float": (float, int), "bool": (bool,),
            "bytes": (bytes,), "list": (list,), "dict": (dict,), "None": (type(None),)}


def assert_well_typed(env: Envelope) -> None:
    """What every handler may rely on after decode()."""
    msg = env.msg
    assert type(msg) is MESSAGE_TYPES[msg.TYPE]
    assert isinstance(env.src, str) and type(env.epoch) is int and type(env.seq) is int
    for f in dataclasses.fields(msg):
        value = getattr(msg, f.name)
        allowed = tuple(t for name in f.type.split(" | ") for t in PY_TYPES[name])
        assert isinstance(value, allowed), (msg.TYPE, f.name, value)
        assert bool in allowed or not isinstance(value, bool), (msg.TYPE, f.name, value)
        if (msg.TYPE, f.name) in INT_LIST_FIELDS:
            assert all(type(v) is int for v in value), (msg.TYPE, f.name, value)
        if f.name in ADDRESS_FIELDS:
            zmq_accepts(value)
        if f.name in DURATION_FIELDS:
            assert math.isfinite(value) and value >= 0, (msg.TYPE, f.name, value)


_ZMQ = zmq.Context.instance()


def zmq_accepts(address: str) -> None:
    """libzmq connects to it without raising (a refusal would kill the sender's IO thread)."""
    sock = _ZMQ.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(address)
    finally:
        sock.close(0)


def decode_or_protocol_error(frame: bytes) -> Envelope | None:
    try:
        env = decode(frame)
    except ProtocolError as e:
        assert len(str(e)) < 300, "error messages are sent back and logged: keep them short"
        return None
    assert_well_typed(env)
    return env


@fuzz(300)
@given(ANY_FRAME)
def test_decode_raises_only_protocol_error(frame):
    decode_or_protocol_error(frame)


@fuzz(300)
@given(mutated_frames())
def test_mutated_envelopes_decode_well_typed_or_not_at_all(frame):
    decode_or_protocol_error(frame)


@fuzz(200)
@given(MESSAGES, TEXT, INT64, INT64)
def test_every_message_type_round_trips(msg, src, epoch, seq):
    env = decode(Codec(src, epoch, _seq=iter([seq])).encode(msg))
    assert (env.src, env.epoch, env.seq, env.msg) == (src, epoch, seq, msg)
    assert_well_typed(env)


@pytest.mark.parametrize("payload, match", [
    ({"t": [1]}, "unknown message type"),                       # unhashable type tag
    ({"t": {"x": 1}}, "unknown message type"),
    ({"v": True}, "unsupported protocol version"),              # True == 1 in Python
    ({"ep": True}, "ep \\(int\\)"),
    ({"p": {"req_id": "r", b"x": 1, "y": 2}, "t": "abort"}, "unknown field"),   # str + bytes
    ({"p": {**Grant("r", "g", [1, "2"], 0, 1.0).payload()}}, "grant.block_ids"),
    ({"p": {**Grant("r", "g", [True], 0, 1.0).payload()}}, "grant.block_ids"),
    ({"p": {**Grant("r", "g", [1], 0, math.nan).payload()}}, "grant.ttl_s"),
    ({"p": KVBlocks("g", "r", 0, 1, "float32", [1, [2]]).payload(), "t": "kv_blocks"},
     "kv_blocks.shape"),
    ({"p": Tokens("r", ["x"]).payload(), "t": "tokens"}, "tokens.token_ids"),
    # make_request took [None] (its "first bad id" sentinel is None): the next step raised.
    ({"p": Submit("r", [None], {}, 0, 1, "tcp://h:1", 1.0).payload(), "t": "submit"},
     "submit.prompt_token_ids"),
    ({"p": AllocRequest("r", [1, None], {}, 0, 1, "tcp://h:1", "tcp://h:1", 1.0).payload(),
      "t": "alloc_request"}, "alloc_request.prompt_token_ids"),
    ({"p": Tokens("r", [1], ["x"]).payload(), "t": "tokens"}, "tokens.logprobs"),
    ({"p": AllocRequest("r", [1], {}, 0, 1, "garbage", "tcp://h:1", 1.0).payload(),
      "t": "alloc_request"}, "alloc_request.reply_to"),
    ({"p": AllocRequest("r", [1], {}, 0, 1, "tcp://h:1", "tcp://h:0", 1.0).payload(),
      "t": "alloc_request"}, "alloc_request.router_reply_to"),
    ({"p": AllocRequest("r", [1], {}, 0, 1, "tcp://h:1", "tcp://h:2", math.inf).payload(),
      "t": "alloc_request"}, "alloc_request.timeout_s"),
    ({"p": Submit("r", [1], {}, 0, 1, "tcp://h:1", -1.0).payload(), "t": "submit"},
     "submit.timeout_s"),
    ({"p": Submit("r", [1], {}, 0, 1, "tcp://h:1", 1.0, "d", "d:1").payload(), "t": "submit"},
     "submit.decode_address"),
    ({"p": {"load": {"address": "udp://h:1"}}, "t": "heartbeat"}, "heartbeat.load"),
    ({"v": "x" * 100_000}, r"version 'xxx.*\.\.\. \("),                 # shown, bounded
])
def test_found_by_fuzzing(payload, match):
    """Each of these raised something other than ProtocolError (an unhashable type tag, str
    and bytes keys together), or decoded into a message that hurt a service: a reply address
    libzmq refuses (an exception in the sender's IO thread, which then stops), a NaN or
    infinite duration (a deadline that never passes), a prompt of ``[None]`` (it passed
    ``make_request`` and failed the next engine step), an unbounded error message."""
    env = {**envelope(Grant("r", "g", [1], 0, 1.0)), **payload}
    with pytest.raises(ProtocolError, match=match):
        decode(msgpack.packb(env, use_bin_type=True))


def test_addresses_the_decoder_accepts_are_ones_libzmq_accepts():
    for address in ["tcp://127.0.0.1:1", "tcp://[::1]:65535", "tcp://decode-0.svc_x:80"]:
        msg = AllocRequest("r", [1], {}, 0, 1, address, address, 1.0)
        assert decode(Codec("x", 1).encode(msg)).msg == msg
        zmq_accepts(address)
    for address in ["garbage", "tcp://h:b", "tcp://*:5", "tcp://h:99999", "ipc:///tmp/x", ""]:
        with pytest.raises(ProtocolError):
            decode(Codec("x", 1).encode(AllocRequest("r", [1], {}, 0, 1, address,
                                                     "tcp://h:1", 1.0)))


# ---------------------------------------------------------------------- services
VOCAB = 384                     # the tiny model's
BLOCK = 16
PREFILL = "tcp://127.0.0.1:7001"         # never dialled: every send is recorded instead
ROUTER = "tcp://127.0.0.1:7002"
DECODE = "tcp://127.0.0.1:7003"


@dataclasses.dataclass
class Harness:
    """A service with its sends recorded, fed messages as the transport would deliver them."""

    svc: Any
    sent: list[tuple[str, Message, list]]

    def deliver(self, msg: Message, frames: list | None = None, src: str = "peer") -> bool:
        """As the transport does: decode the encoded message (one the decoder refuses is
        dropped there: False), then dispatch it."""
        try:
            env = decode(Codec(src, 1).encode(msg))
        except ProtocolError:
            return False
        self.svc._dispatch(Inbound(env, [zmq.Frame(f) for f in frames or []], 0.0))
        return True

    def replies(self, kind: type[Message]) -> list[Message]:
        return [m for _, m, _ in self.sent if isinstance(m, kind)]

    def run_engine(self, max_steps: int = 200) -> None:
        """Step as the service loop does until the engine is idle; a step must never raise."""
        for _ in range(max_steps):
            self.svc.tick()
            if not self.svc.engine.has_unfinished_requests():
                return
            self.svc.on_step(self.svc.engine.step())
        raise AssertionError("the engine did not go idle")

    def assert_clean(self) -> None:
        bm = self.svc.engine.block_manager
        for _ in range(200):            # shipped KV is freed once zmq released its frames
            if not getattr(self.svc, "sending", None):
                break
            self.svc.tick()
            time.sleep(0.005)
        assert self.svc.counters["handler_errors"] == 0, "a handler raised (see the log)"
        assert not self.svc.engine.has_unfinished_requests() and not self.svc.streams
        assert bm.num_free_blocks == bm.num_blocks, bm.owners()


def make_harness(service: type, role: str) -> Harness:
    engine = Engine(EngineConfig(model="tiny", block_size=BLOCK, num_kv_blocks=48,
                                 max_model_len=128, max_num_seqs=8))
    svc = service(engine, PDConfig(), InstanceConfig(role=role, metrics_port=-1))
    sent: list[tuple[str, Message, list]] = []
    # Record what a peer would receive (the bytes), not the frames: a frame that views a cache
    # block keeps that block held until zmq releases it, as on a real socket.
    svc.send = lambda address, msg, frames=(): sent.append(
        (address, msg, [bytes(getattr(f, "buffer", f)) for f in frames]))
    return Harness(svc, sent)


@pytest.fixture(scope="module")
def decode_side():
    h = make_harness(DecodeService, "decode")
    yield h
    h.svc.close()


@pytest.fixture(scope="module")
def prefill_side():
    h = make_harness(PrefillService, "prefill")
    yield h
    h.svc.close()


GOOD_PROMPTS = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=40)
# Shapes the decoder lets through (a list) that make_request must refuse.
BAD_PROMPTS = (st.lists(st.integers(0, VOCAB - 1), max_size=3).map(lambda p: [*p, VOCAB])
               | st.lists(JUNK, min_size=1, max_size=3) | st.just([]) | st.just([[1, 2]])
               | st.just([True]) | st.just([-1]) | st.just([2**64 - 1]) | st.just(["x"])
               | st.just([1] * 200))
PARAMS = (st.dictionaries(TEXT, JUNK, max_size=3)
          | st.just({"temperature": math.nan}) | st.just({"max_tokens": 2**64 - 1}))


_EXAMPLES = itertools.count()


def unique(req_id: str) -> str:
    """A request id no earlier example used: services drop a repeated one as a duplicate."""
    return f"{req_id}#{next(_EXAMPLES)}"


@st.composite
def requests(draw, reply_to: str) -> dict:
    """The request fields of a Submit/AllocRequest: three in four valid (the lies that matter
    come after the grant), else any mix of junk."""
    if draw(st.integers(0, 3)):
        n = draw(st.integers(1, 4))
        return {"req_id": draw(TEXT), "prompt": draw(GOOD_PROMPTS), "seed": draw(INT64),
                "params": SamplingParams(max_tokens=n, temperature=0.0).to_dict(),
                "max_tokens": n, "reply_to": reply_to}
    return {"req_id": draw(TEXT), "prompt": draw(GOOD_PROMPTS | BAD_PROMPTS),
            "params": draw(PARAMS), "seed": draw(INT64),
            "max_tokens": draw(st.integers(1, 4) | INT64), "reply_to": reply_to}


# One step of a lying (or honest) prefill, resolved against the grant at run time.
KV_STEPS = st.fixed_dictionaries({
    "step": st.just("kv"), "grant": st.sampled_from(["granted", "unknown"]),
    "first": st.sampled_from(["honest", "other"]) | INT64,
    "count": st.sampled_from(["honest"]) | st.integers(-1, 8) | INT64,
    "dtype": st.sampled_from(["honest", "float16", "bfloat16", "int8", ""]),
    "shape": st.sampled_from(["honest", "zero", "wrong_tail", "negative", "short"]),
    "frames": st.sampled_from(["honest", "none", "two", "short", "long", "empty"])})
DONE_STEPS = st.fixed_dictionaries({
    "step": st.just("done"), "grant": st.sampled_from(["granted", "unknown", "other_req"]),
    "first_token": st.integers(0, VOCAB - 1) | INT64,
    "num_kv_blocks": st.sampled_from(["honest"]) | INT64,
    "num_cached_tokens": st.integers(0, 4) | INT64, "finished": st.booleans(),
    "first_logprob": st.none() | st.floats(), "timeline": st.none() | st.dictionaries(
        st.sampled_from(["kv_send", "grant_hold", "phases", "prefill_instance"]), JUNK | st.
        sampled_from([math.nan, math.inf, -1.0, 2**64 - 1, {"prefill": math.nan}]))})
OTHER_STEPS = st.fixed_dictionaries({"step": st.sampled_from(["abort", "tick", "realloc"])})
HONEST = [{"step": "kv", "grant": "granted", "first": "honest", "count": "honest",
           "dtype": "honest", "shape": "honest", "frames": "honest"},
          {"step": "done", "grant": "granted", "first_token": 65, "num_kv_blocks": "honest",
           "num_cached_tokens": 0, "finished": False, "first_logprob": -0.5, "timeline": None}]
CONVERSATIONS = st.lists(KV_STEPS | DONE_STEPS | OTHER_STEPS, max_size=6) | st.just(HONEST) | (
    st.tuples(st.just(HONEST), st.lists(KV_STEPS | DONE_STEPS, min_size=1, max_size=3))
    .map(lambda t: [*t[0][:1], *t[1], *t[0][1:]]))


def kv_message(h: Harness, grant: Grant | None, step: dict) -> tuple[KVBlocks, list[bytes]]:
    cache = h.svc.engine.runner.kv_cache
    g = h.svc.ledger.grants.get(grant.grant_id) if grant else None
    honest_first = g.cached_blocks if g else 0
    honest_count = (g.num_kv_blocks - g.cached_blocks) if g else 1
    first = {"honest": honest_first, "other": honest_first + 1}.get(step["first"], step["first"])
    count = honest_count if step["count"] == "honest" else step["count"]
    n = max(1, honest_count)
    tail = wire_shape(cache, 0)              # [layers, 2, n, block_size, kv_heads, head_dim]
    shape = {"honest": [*tail[:2], n, *tail[3:]], "zero": [*tail[:2], 0, *tail[3:]],
             "wrong_tail": [*tail[:2], n, tail[3] + 1, *tail[4:]],
             "negative": [*tail[:2], -n, *tail[3:]], "short": tail[:3]}[step["shape"]]
    dtype = DTYPE_NAMES[cache.dtype] if step["dtype"] == "honest" else step["dtype"]
    size = cache.element_size() * math.prod(abs(s) for s in shape)
    frames = {"honest": [bytes(size)], "none": [], "two": [bytes(size), bytes(size)],
              "short": [bytes(max(0, size - 1))], "long": [bytes(size + 4)],
              "empty": [b""]}[step["frames"]]
    grant_id = grant.grant_id if grant and step["grant"] == "granted" else "no-such-grant"
    return KVBlocks(grant_id, grant.req_id if grant else "r", first, count, dtype, shape), frames


def done_message(h: Harness, grant: Grant | None, step: dict) -> PrefillDone:
    g = h.svc.ledger.grants.get(grant.grant_id) if grant else None
    honest = (g.num_kv_blocks - g.cached_blocks) if g else 0
    grant_id = grant.grant_id if grant and step["grant"] != "unknown" else "no-such-grant"
    req_id = grant.req_id if grant and step["grant"] != "other_req" else "another-request"
    num_kv = honest if step["num_kv_blocks"] == "honest" else step["num_kv_blocks"]
    return PrefillDone(grant_id, req_id, step["first_token"], step["first_logprob"], num_kv,
                       step["num_cached_tokens"], step["finished"],
                       "stop" if step["finished"] else None, None, step["timeline"])


@fuzz(120)
@given(requests(PREFILL), CONVERSATIONS, DURATIONS)
def test_decode_survives_a_lying_prefill(decode_side, request, steps, timeout):
    h = decode_side
    h.sent.clear()
    r = request
    alloc = AllocRequest(unique(r["req_id"]), r["prompt"], r["params"], r["seed"], r["max_tokens"],
                         PREFILL, ROUTER, min(timeout, 5.0))
    if not h.deliver(alloc):
        event("refused by decode()")
        assert not h.sent
        return
    answers = [m for m in h.replies(Grant) + h.replies(Reject) if m.req_id == alloc.req_id]
    assert len(answers) == 1, f"an AllocRequest gets exactly one answer, got {answers}"
    grant = answers[0] if isinstance(answers[0], Grant) else None
    event("granted" if grant else "rejected")
    if isinstance(answers[0], Reject) and not answers[0].retryable:
        assert h.svc.ledger.grant_for(alloc.req_id) is None      # refused before any state
    for step in steps:
        if step["step"] == "kv":
            msg, frames = kv_message(h, grant, step)
            h.deliver(msg, frames)
        elif step["step"] == "done":
            h.deliver(done_message(h, grant, step))
        elif step["step"] == "abort":
            h.deliver(Abort(alloc.req_id, "fuzz"))
        elif step["step"] == "realloc":
            h.deliver(alloc)                      # a duplicate AllocRequest for the same id
        else:
            h.svc.tick()
        h.svc.ledger.check()
    h.run_engine()
    results = h.replies(TransferResult)
    event(f"transfer {'committed' if any(r.ok for r in results) else 'failed or never done'}")
    for tokens in h.replies(Tokens):
        assert all(0 <= t < VOCAB for t in tokens.token_ids), tokens     # the router decodes
        assert all(not isinstance(v, float) or math.isfinite(v)
                   for v in _flatten(tokens.timeline)), tokens.timeline
    h.deliver(Abort(alloc.req_id, "the router ends it"))
    h.svc.ledger.check()
    assert h.svc.ledger.is_quiescent(), h.svc.ledger.snapshot()
    h.assert_clean()


def _flatten(value: Any) -> list:
    if isinstance(value, dict):
        return [x for v in value.values() for x in _flatten(v)]
    return [value]


PREFILL_STEPS = st.lists(st.sampled_from(["grant", "reject", "expired", "result", "abort",
                                          "step"]), max_size=5)
GRANTS = st.fixed_dictionaries({"block_ids": st.lists(INT64, max_size=4),
                                "cached_blocks": st.just(0) | st.integers(-3, 4) | INT64,
                                "ttl_s": DURATIONS, "grant_id": TEXT})


@fuzz(80)
@given(requests(ROUTER), PREFILL_STEPS, GRANTS, st.sampled_from([False, False, False, True]))
def test_prefill_survives_a_lying_decode(prefill_side, request, steps, grant, to_mixed):
    h = prefill_side
    h.sent.clear()
    r = request
    submit = Submit(unique(r["req_id"]), r["prompt"], r["params"], r["seed"], r["max_tokens"],
                    ROUTER, 5.0, "decode-0", "" if to_mixed else DECODE)
    if not h.deliver(submit):
        event("refused by decode()")
        assert not h.sent
        return
    answers = [m for m in h.replies(SubmitAck) + h.replies(Reject) if m.req_id == submit.req_id]
    assert len(answers) == 1, f"a Submit gets exactly one answer, got {answers}"
    event(type(answers[0]).__name__)
    h.run_engine()
    for step in steps:
        if step == "grant":
            h.deliver(Grant(submit.req_id, grant["grant_id"], grant["block_ids"],
                            grant["cached_blocks"], grant["ttl_s"]), src="decode-0")
        elif step == "reject":
            h.deliver(Reject(submit.req_id, "no room", 0.5, "decode-0"), src="decode-0")
        elif step == "expired":
            h.deliver(GrantExpired(grant["grant_id"], submit.req_id), src="decode-0")
        elif step == "result":
            h.deliver(TransferResult(grant["grant_id"], submit.req_id, False, "x"))
        elif step == "abort":
            h.deliver(Abort(submit.req_id, "fuzz"), src="router")
        else:
            h.run_engine()
    event(f"shipped: {len(h.replies(PrefillDone))} PrefillDone, {len(h.replies(KVBlocks))} KV")
    for msg in h.replies(KVBlocks):
        assert msg.grant_id == grant["grant_id"] and msg.req_id == submit.req_id
    h.deliver(Abort(submit.req_id, "the router ends it"), src="router")
    h.run_engine()
    assert not h.svc.jobs
    h.assert_clean()


def test_prefill_done_outside_the_vocabulary_fails_the_transfer(decode_side):
    """Found by fuzzing: an adopted first token outside the vocabulary made the next engine
    step raise (embedding lookup), which ends the decode's loop for every request."""
    h = decode_side
    h.sent.clear()
    h.deliver(AllocRequest("vocab", list(range(1, 20)), SamplingParams(
        max_tokens=3, temperature=0.0).to_dict(), 1, 3, PREFILL, ROUTER, 5.0))
    (grant,) = h.replies(Grant)
    msg, frames = kv_message(h, grant, HONEST[0])
    h.deliver(msg, frames)
    h.deliver(done_message(h, grant, {**HONEST[1], "first_token": VOCAB}))
    (result,) = h.replies(TransferResult)
    assert not result.ok and "first_token 384" in result.reason
    (error,) = h.replies(Error)
    assert error.req_id == "vocab" and error.code == "transfer_failed"
    h.run_engine()
    assert h.svc.ledger.is_quiescent()
    h.assert_clean()


def test_kv_header_with_an_empty_shape_fails_the_transfer(decode_side):
    """Found by fuzzing: a KVBlocks header claiming 0 blocks with an empty frame raised
    ValueError (torch.frombuffer) after the ledger had marked the range received, so a later
    PrefillDone committed blocks that were never written."""
    h = decode_side
    h.sent.clear()
    h.deliver(AllocRequest("zero", list(range(1, 40)), SamplingParams(
        max_tokens=2, temperature=0.0).to_dict(), 1, 2, PREFILL, ROUTER, 5.0))
    (grant,) = h.replies(Grant)
    msg, _ = kv_message(h, grant, {**HONEST[0], "shape": "zero"})
    h.deliver(msg, [b""])
    (result,) = h.replies(TransferResult)
    assert not result.ok and "does not fit" in result.reason
    h.deliver(done_message(h, grant, HONEST[1]))
    assert [m.ok for m in h.replies(TransferResult)] == [False, False]    # nothing committed
    assert not h.replies(Tokens)
    h.assert_clean()
