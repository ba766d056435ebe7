"""The wire protocol between router, prefill, decode and mixed instances.

A message is one ZMQ multipart: frame 0 is a msgpack envelope
``{"v": version, "t": type, "src": sender id, "ep": sender epoch, "seq": n, "p": payload}``,
frames 1.. are raw buffers (KV blocks) that travel beside it without being copied into msgpack.
One dataclass per message type; the registry below is explicit (no lookup by globals()).

Rules that the services rely on (DESIGN 3 and 6):
- every request message gets exactly one reply: ``Submit`` -> ``SubmitAck`` | ``Reject``;
  ``AllocRequest`` -> ``Grant`` | ``Reject``; ``PrefillDone`` -> ``TransferResult``;
  ``Register`` -> ``RegisterAck``;
- an envelope with an unknown version or type, a missing or mistyped field, an extra field,
  or a field whose contents break ``_CONTENTS`` (element types, addresses, durations) fails to
  decode with ``ProtocolError`` (and with nothing else, whatever the bytes): it is counted and
  answered with ``Error`` where the sender is known, and never crashes the process;
- a restarted process has a new, larger epoch; messages from an older epoch of a known peer are
  dropped by the transport.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack

from fdpd.outputs import TokenLogprobs

# 2: KVBlocks may carry one frame per block (block-major caches send blocks zero-copy); a
# version-1 peer would refuse those frames on every transfer, so it is refused at the envelope.
PROTOCOL_VERSION = 2


class ProtocolError(ValueError):
    """A frame that is not a valid message of this protocol version."""


def new_epoch() -> int:
    """Epochs order incarnations of one instance: a restart always gets a larger one."""
    return time.time_ns()


# Allowed Python types per annotation (msgpack gives list for arrays, bytes for bin).
_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,), "int": (int,), "float": (float, int), "bool": (bool,), "bytes": (bytes,),
    "list": (list,), "dict": (dict,), "str | None": (str, type(None)),
    "int | None": (int, type(None)), "float | None": (float, int, type(None)),
    "list | None": (list, type(None)), "dict | None": (dict, type(None)),
    "int | str | None": (int, str, type(None)),
}


@dataclass(frozen=True)
class _FieldSpec:
    name: str
    annotation: str
    allowed: tuple[type, ...]
    required: bool
    contents: tuple | None          # (_CONTENTS check, what it expects) or None


# Per message class, its fields as encode/decode need them: computed once, because
# dataclasses.fields() on every message cost ~3% of the router's CPU (BENCHMARKS.md).
_SPECS: dict[type, tuple[_FieldSpec, ...]] = {}


def _spec(cls: type) -> tuple[_FieldSpec, ...]:
    spec = _SPECS.get(cls)
    if spec is None:
        spec = _SPECS[cls] = tuple(
            _FieldSpec(f.name, f.type, _TYPES[f.type],
                       f.default is dataclasses.MISSING
                       and f.default_factory is dataclasses.MISSING,
                       _CONTENTS.get((cls.TYPE, f.name)))
            for f in dataclasses.fields(cls))
    return spec


@dataclass
class Message:
    TYPE: ClassVar[str] = ""

    def payload(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in _spec(type(self))}

    @classmethod
    def from_payload(cls, payload: Any) -> Message:
        if not isinstance(payload, dict):
            raise ProtocolError(f"{cls.TYPE}: payload must be a map")
        spec = _spec(cls)
        extra = set(payload) - {f.name for f in spec}
        if extra:
            # Keys may be str and bytes mixed (msgpack maps): order them by their repr.
            raise ProtocolError(f"{cls.TYPE}: unknown field {_shown(min(extra, key=repr))}")
        for f in spec:
            if f.name not in payload:
                if f.required:
                    raise ProtocolError(f"{cls.TYPE}: missing field {f.name!r}")
                continue
            value = payload[f.name]
            allowed = f.allowed
            if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
                raise ProtocolError(f"{cls.TYPE}.{f.name}: expected {f.annotation}, got "
                                    f"{type(value).__name__}")
            if f.contents is not None and not f.contents[0](value):
                raise ProtocolError(f"{cls.TYPE}.{f.name}: expected {f.contents[1]}")
        return cls(**payload)


# ---------------------------------------------------------------------- membership
@dataclass
class Register(Message):
    """instance -> router, at start and whenever the router does not know it."""
    TYPE: ClassVar[str] = "register"
    instance_id: str
    role: str                  # prefill | decode | mixed
    address: str               # where the instance's inbox listens
    model: str
    block_size: int
    num_blocks: int
    max_model_len: int
    fingerprint: bytes = b""
    # What the router needs to check (and, without --model, take) the instance's model:
    # ``fingerprint`` was computed with this KV dtype (ModelConfig.fingerprint), and the model
    # directory as an absolute path ('tiny' for the built-in one).
    kv_dtype: str = ""
    model_path: str = ""


@dataclass
class RegisterAck(Message):
    TYPE: ClassVar[str] = "register_ack"
    ok: bool
    message: str = ""


@dataclass
class Heartbeat(Message):
    """instance -> router, periodically: load and cache statistics (see InstanceLoad)."""
    TYPE: ClassVar[str] = "heartbeat"
    load: dict


# ---------------------------------------------------------------------- one request
@dataclass
class Submit(Message):
    """router -> prefill (with the chosen decode) or -> mixed (decode_address empty)."""
    TYPE: ClassVar[str] = "submit"
    req_id: str
    prompt_token_ids: list
    params: dict               # SamplingParams.to_dict()
    seed: int                  # fixed by the router, so P and D sample alike (DESIGN 3.7)
    max_tokens: int            # resolved against max_model_len
    reply_to: str              # router inbox: where tokens and failures go
    timeout_s: float           # the request's remaining deadline
    decode_id: str = ""
    decode_address: str = ""
    # A resumed request (its decode drained, see Migrate): the last ``num_output_tokens`` of
    # ``prompt_token_ids`` are tokens it already generated. They are context for the KV like
    # the prompt, but outputs for sampling (penalties, min_tokens, seeded positions), and
    # ``max_tokens`` counts only the tokens still to generate.
    num_output_tokens: int = 0


@dataclass
class SubmitAck(Message):
    TYPE: ClassVar[str] = "submit_ack"
    req_id: str


@dataclass
class Reject(Message):
    """A refusal, always for one request; the router may retry elsewhere after retry_after."""
    TYPE: ClassVar[str] = "reject"
    req_id: str
    reason: str
    retry_after: float = 0.0
    origin: str = ""           # the instance that refused (a decode's Reject travels via P)
    retryable: bool = True     # False: the request itself is invalid; no instance will serve it


@dataclass
class AllocRequest(Message):
    """prefill -> decode: ask for blocks for a prompt (P computes meanwhile). D derives the
    prompt's block hashes itself from the tokens and its own model fingerprint, so a peer can
    never poison its prefix cache with foreign hashes."""
    TYPE: ClassVar[str] = "alloc_request"
    req_id: str
    prompt_token_ids: list
    params: dict
    seed: int
    max_tokens: int
    reply_to: str              # the prefill instance's inbox
    router_reply_to: str       # where D sends the tokens
    timeout_s: float           # how long P will wait for the reply
    num_output_tokens: int = 0     # as in Submit: a resumed request's generated tail

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


@dataclass
class Grant(Message):
    """decode -> prefill: blocks reserved for one request, a lease until ``ttl_s`` passes."""
    TYPE: ClassVar[str] = "grant"
    req_id: str
    grant_id: str
    block_ids: list
    cached_blocks: int         # leading blocks D already holds: P sends only the rest
    ttl_s: float


@dataclass
class KVBlocks(Message):
    """prefill -> decode: the KV of ``num_blocks`` granted blocks starting at grant index
    ``first_block``, of ``dtype``; ``shape`` is ``[layers, 2, num_blocks, block_size, heads,
    dim]``. The KV follows as ``num_blocks`` extra frames, one block's ``[layers, 2,
    block_size, heads, dim]`` each, or as one frame of the whole shape, C order either way
    (see ``fdpd.pd.kv_transfer``)."""
    TYPE: ClassVar[str] = "kv_blocks"
    grant_id: str
    req_id: str
    first_block: int
    num_blocks: int
    dtype: str
    shape: list


@dataclass
class PrefillDone(Message):
    """prefill -> decode: all KV was sent; here is the first token."""
    TYPE: ClassVar[str] = "prefill_done"
    grant_id: str
    req_id: str
    first_token: int
    first_logprob: float | None
    num_kv_blocks: int         # blocks sent in total (D commits only if it got them all)
    num_cached_tokens: int     # prompt tokens P or D served from cache (for usage)
    finished: bool = False     # the first token already ended the request
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # The prefill's phase durations (its own clock; see Tokens.timeline). Optional: a sender
    # without it is still understood.
    timeline: dict | None = None
    # As Tokens.token_logprobs / Tokens.prompt_logprobs, for the first token and the prompt
    # (P computes them; D passes them on to the router with the first token).
    token_logprobs: list | None = None
    prompt_logprobs: list | None = None


@dataclass
class TransferResult(Message):
    TYPE: ClassVar[str] = "transfer_result"
    grant_id: str
    req_id: str
    ok: bool
    reason: str = ""


@dataclass
class GrantExpired(Message):
    """decode -> prefill and router: the lease ran out; its blocks are free again."""
    TYPE: ClassVar[str] = "grant_expired"
    grant_id: str
    req_id: str


@dataclass
class Tokens(Message):
    """decode/mixed -> router: new tokens of one request (and its end, with usage); prefill ->
    router: the first token, ahead of its KV (the decode sends it again: see ``position``)."""
    TYPE: ClassVar[str] = "tokens"
    req_id: str
    token_ids: list
    logprobs: list | None = None
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    # On the last message of a request: where its time went, as durations measured on each
    # process's own monotonic clock (clocks of different hosts are never compared):
    # {"phases": {name: seconds}, "prefill_instance": id, "decode_instance": id}.
    timeline: dict | None = None
    # With sampling logprobs: per token, [logprob, rank, top ids, top logprobs]
    # (fdpd.engine.logprobs.TokenLogprobs.to_wire). With prompt_logprobs, once, on the first
    # message: nil for the first prompt token, then one such list per prompt token.
    token_logprobs: list | None = None
    prompt_logprobs: list | None = None
    # Index of token_ids[0] in the request's output (a resumed request's earlier tokens
    # count), so the router drops a token it already has; -1: not given, append.
    position: int = -1


@dataclass
class Migrate(Message):
    """decode/mixed -> router: this instance is draining and has stopped ``req_id`` after
    ``num_output_tokens`` tokens (all already sent in Tokens on this same channel, so they
    arrived first). Its KV was written to the KV store where one is configured. The router
    resumes the request on another instance, so the client's stream goes on."""
    TYPE: ClassVar[str] = "migrate"
    req_id: str
    num_output_tokens: int
    reason: str = ""


@dataclass
class Abort(Message):
    """router -> instances: stop a request (client gone, stop string hit, deadline)."""
    TYPE: ClassVar[str] = "abort"
    req_id: str
    reason: str = ""


@dataclass
class Error(Message):
    """A failure, for one request (req_id set) or for a message that could not be handled."""
    TYPE: ClassVar[str] = "error"
    code: str
    message: str
    req_id: str = ""


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls for cls in (Register, RegisterAck, Heartbeat, Submit, SubmitAck, Reject,
                              AllocRequest, Grant, KVBlocks, PrefillDone, TransferResult,
                              GrantExpired, Tokens, Migrate, Abort, Error)
}


# ---------------------------------------------------------------------- field contents
# Beyond a field's type, what every handler would otherwise have to re-check: the elements of
# lists that services compute with (token ids, block ids, KV shapes, logprobs; whether a token
# id is in the vocabulary is the engine's check), addresses that services send to
# (libzmq refuses a malformed endpoint with an exception in the sender's IO thread), and
# durations that become deadlines (a NaN deadline never passes, so its state would never end).
_ENDPOINT = re.compile(r"tcp://(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):([0-9]{1,5})")


def _shown(value: Any) -> str:
    """A sender's value in an error message (logged, and sent back in ``Error``): bounded."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


def _is_endpoint(value: Any) -> bool:
    m = _ENDPOINT.fullmatch(value) if isinstance(value, str) else None
    return m is not None and 0 < int(m.group(1)) < 65536


def _all_ints(values: list) -> bool:
    return all(type(v) is int for v in values)      # not bool: True is no block id


def _all_numbers(values: list | None) -> bool:
    return values is None or all(type(v) in (int, float) for v in values)


def _logprob_entries(values: list | None, first_may_be_nil: bool = False) -> bool:
    if values is None:
        return True
    for i, value in enumerate(values):
        if value is None and i == 0 and first_may_be_nil:
            continue
        try:
            TokenLogprobs.from_wire(0, value)
        except ValueError:
            return False
    return True


def _is_duration(value: float) -> bool:
    return math.isfinite(value) and value >= 0


_ADDRESS = (_is_endpoint, "a tcp://HOST:PORT address")
_DURATION = (_is_duration, "finite seconds >= 0")
_CONTENTS: dict[tuple[str, str], tuple[Any, str]] = {
    ("register", "address"): _ADDRESS,
    ("heartbeat", "load"): (lambda load: "address" not in load or _is_endpoint(load["address"]),
                            "a map whose address is tcp://HOST:PORT"),
    ("submit", "prompt_token_ids"): (_all_ints, "a list of integers"),
    ("submit", "reply_to"): _ADDRESS,
    ("submit", "decode_address"): (lambda a: a == "" or _is_endpoint(a),
                                   "'' or a tcp://HOST:PORT address"),
    ("submit", "timeout_s"): _DURATION,
    ("reject", "retry_after"): _DURATION,
    ("alloc_request", "prompt_token_ids"): (_all_ints, "a list of integers"),
    ("alloc_request", "reply_to"): _ADDRESS,
    ("alloc_request", "router_reply_to"): _ADDRESS,
    ("alloc_request", "timeout_s"): _DURATION,
    ("grant", "block_ids"): (_all_ints, "a list of integers"),
    ("grant", "ttl_s"): _DURATION,
    ("kv_blocks", "shape"): (_all_ints, "a list of integers"),
    ("tokens", "token_ids"): (_all_ints, "a list of integers"),
    ("tokens", "logprobs"): (_all_numbers, "a list of numbers or nil"),
}
for _type in ("tokens", "prefill_done"):
    _CONTENTS[(_type, "token_logprobs")] = (
        _logprob_entries, "a list of [logprob, rank, ids, logprobs] or nil")
    _CONTENTS[(_type, "prompt_logprobs")] = (
        lambda v: _logprob_entries(v, first_may_be_nil=True),
        "nil, or nil then a list of [logprob, rank, ids, logprobs] per prompt token")


# ---------------------------------------------------------------------- the envelope
@dataclass(frozen=True)
class Envelope:
    src: str
    epoch: int
    seq: int
    msg: Message


@dataclass
class Codec:
    """Encodes messages for one sender. Not thread-safe: one per sending thread."""

    src: str
    epoch: int
    _seq: Any = field(default_factory=itertools.count)

    def encode(self, msg: Message) -> bytes:
        return msgpack.packb({"v": PROTOCOL_VERSION, "t": msg.TYPE, "src": self.src,
                              "ep": self.epoch, "seq": next(self._seq), "p": msg.payload()},
                             use_bin_type=True)


def decode(frame: bytes | memoryview) -> Envelope:
    """Parse an envelope. Raises ProtocolError on anything malformed; never anything else."""
    try:
        raw = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(f"undecodable envelope: {type(e).__name__}") from None
    if not isinstance(raw, dict):
        raise ProtocolError("envelope must be a map")
    version = raw.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:     # True == 1 in Python
        raise ProtocolError(f"unsupported protocol version {_shown(version)} "
                            f"(this is {PROTOCOL_VERSION})")
    kind = raw.get("t")
    cls = MESSAGE_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {_shown(kind)}")
    src, epoch, seq = raw.get("src"), raw.get("ep"), raw.get("seq")
    if not isinstance(src, str) or type(epoch) is not int or type(seq) is not int:
        raise ProtocolError("envelope needs src (str), ep (int) and seq (int)")
    return Envelope(src, epoch, seq, cls.from_payload(raw.get("p")))
