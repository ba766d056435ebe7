"""The wire protocol between router, prefill, decode and mixed instances.

A message is one ZMQ multipart: frame 0 is a msgpack envelope
``{"v": version, "t": type, "src": sender id, "ep": sender epoch, "seq": n, "p": payload}``,
frames 1.. are raw buffers (KV blocks) that travel beside it without being copied into msgpack.
One dataclass per message type; the registry below is explicit (no lookup by globals()).

Rules that the services rely on (DESIGN 3 and 6):
- every request message gets exactly one reply: ``Submit`` -> ``SubmitAck`` | ``Reject``;
  ``AllocRequest`` -> ``Grant`` | ``Reject``; ``PrefillDone`` -> ``TransferResult``;
  ``Register`` -> ``RegisterAck``;
- an envelope with an unknown version or type, a missing or mistyped field, or an extra field
  fails to decode with ``ProtocolError``: it is counted and answered with ``Error`` where the
  sender is known, and never crashes the process;
- a restarted process has a new, larger epoch; messages from an older epoch of a known peer are
  dropped by the transport.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack

PROTOCOL_VERSION = 1


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


@dataclass
class Message:
    TYPE: ClassVar[str] = ""

    def payload(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_payload(cls, payload: Any) -> Message:
        if not isinstance(payload, dict):
            raise ProtocolError(f"{cls.TYPE}: payload must be a map")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        extra = set(payload) - set(fields)
        if extra:
            raise ProtocolError(f"{cls.TYPE}: unknown field {sorted(extra)[0]!r}")
        for name, f in fields.items():
            if name not in payload:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise ProtocolError(f"{cls.TYPE}: missing field {name!r}")
                continue
            value = payload[name]
            allowed = _TYPES[f.type]
            if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
                raise ProtocolError(f"{cls.TYPE}.{name}: expected {f.type}, got "
                                    f"{type(value).__name__}")
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
    ``first_block``; one extra frame holding ``[layers, 2, num_blocks, block_size, heads, dim]``
    of ``dtype`` in C order."""
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
    """decode/mixed -> router: new tokens of one request (and its end, with usage)."""
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
                              GrantExpired, Tokens, Abort, Error)
}


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
    if raw.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported protocol version {raw.get('v')!r} "
                            f"(this is {PROTOCOL_VERSION})")
    cls = MESSAGE_TYPES.get(raw.get("t"))  # type: ignore[arg-type]
    if cls is None:
        raise ProtocolError(f"unknown message type {raw.get('t')!r}")
    src, epoch, seq = raw.get("src"), raw.get("ep"), raw.get("seq")
    if not isinstance(src, str) or not isinstance(epoch, int) or not isinstance(seq, int):
        raise ProtocolError("envelope needs src (str), ep (int) and seq (int)")
    return Envelope(src, epoch, seq, cls.from_payload(raw.get("p")))
