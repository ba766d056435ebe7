"""The router's control side: registry, routing, one request's life across P and D, retries.

Runs inside the HTTP server's asyncio loop. The transport's IO thread owns the ZMQ sockets and
hands every inbound message to the loop with ``call_soon_threadsafe``; everything else here is
single-threaded on the loop, so no locks.

A request is retried on another (P, D) pair when it fails before its first token reached the
client: a Reject, an expired grant, a failed transfer, or a lost instance. After that, a lost
or drained decode's streams are resumed elsewhere from prompt + the tokens sent
(``fdpd.router.resume``). However a request ends, any instance that may still hold state for
it gets an ``Abort``; the instances' handlers are idempotent.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fdpd.config import PDConfig, advertised_address
from fdpd.model.config import ModelConfig
from fdpd.model.tokenizer import Tokenizer
from fdpd.pd.protocol import (
    Abort,
    Error,
    GrantExpired,
    Heartbeat,
    Migrate,
    Register,
    RegisterAck,
    Reject,
    Submit,
    SubmitAck,
    Tokens,
    new_epoch,
)
from fdpd.pd.transport import Inbound, Transport
from fdpd.router import policy
from fdpd.router.cluster_metrics import ClusterCollector
from fdpd.router.cluster_model import ClusterModel, FrontendModel, given_model
from fdpd.router.delta import Route, TokenDelta
from fdpd.router.admission import BODY_BYTES_PER_TOKEN, MIN_BODY_BYTES, Admission
from fdpd.router.liveness import ConnectionWatch
from fdpd.router.registry import Instance, Registry
from fdpd.router.resume import Resumes
from fdpd.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class RouterError(Exception):
    """The request failed before producing a token; maps to an HTTP status."""

    def __init__(self, status: int, code: str, message: str, retry_after: float = 0.0):
        super().__init__(message)
        self.status, self.code, self.message, self.retry_after = status, code, message, retry_after


class StreamBroken(Exception):
    """The request failed after tokens were already produced."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


@dataclass
class Failure:
    reason: str
    origin: str = ""
    retry_after: float = 0.0
    final: bool = False        # no retry: the client aborted, or the request is invalid
    status: int = 503
    # What happened, as fdpd:request_resumes_total{reason} counts a stream resumed after it:
    # instance_died | disconnected | restarted | grant_expired | rejected | error |
    # unacknowledged | drained
    kind: str = "error"


@dataclass
class Inflight:
    req_id: str
    queue: asyncio.Queue
    prefill: Instance | None
    decode: Instance | None            # the decode, or the mixed instance
    prompt_tokens: int
    streamed: bool = False
    decoding: bool = False             # tokens came from the decode (the prefill's job is done)
    acked: bool = False
    dispatched_at: float = field(default_factory=time.monotonic)


@dataclass
class RouterStats:
    requests: Counter = field(default_factory=Counter)     # by mode: pd / mixed
    retries: int = 0
    migrations: int = 0                  # requests resumed elsewhere after a drain
    resumes: Counter = field(default_factory=Counter)      # streams resumed, by reason
    failures: Counter = field(default_factory=Counter)     # by reason kind
    instance_deaths: int = 0


class RouterCore:
    def __init__(self, *, model_name: str | None, tokenizer: Tokenizer | None,
                 chat_template: str | None, max_model_len: int | None, pd: PDConfig,
                 control_address: str = "tcp://127.0.0.1:0", max_attempts: int = 3,
                 advertise_host: str | None = None, model_config: ModelConfig | None = None):
        """``model_name`` None: serve the model of the first instance that registers
        (``max_model_len``: the --max-model-len to apply to it, or None)."""
        self.cluster_model = ClusterModel(None if model_name is None else given_model(
            model_name, model_config, max_model_len or 0, tokenizer, chat_template),
            max_model_len, self._adopted)
        self.pd = pd
        self.max_attempts = max_attempts
        self.control_address = control_address
        self.advertise_host = advertise_host
        self.registry = Registry(max(2.0, 6 * pd.heartbeat_interval), self.cluster_model.admit)
        self.affinity = policy.PrefixAffinity()
        self.inflight: dict[str, Inflight] = {}           # by the attempt's wire id
        self._current: dict[str, str] = {}                # request id -> its current wire id
        self.stats = RouterStats()
        self.admission = Admission(pd.max_inflight_requests, pd.max_request_body_bytes or max(
            MIN_BODY_BYTES, BODY_BYTES_PER_TOKEN * (max_model_len or 0)),
            pd.request_body_timeout)
        self.epoch = new_epoch()
        self._seeds = random.Random()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._monitor: asyncio.Task | None = None
        self.transport: Transport | None = None
        self.connections: ConnectionWatch | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.connections = ConnectionWatch(self._loop, self._connection_lost)
        self.transport = Transport("router", self.epoch, self.control_address,
                                   on_message=self._from_io_thread, secret=self.pd.cluster_key,
                                   on_connection=self._connection_from_io_thread)
        # Instances send tokens here: the bound port on a host name they can dial.
        self.control_address = advertised_address(self.transport.address, self.advertise_host)
        self._monitor = asyncio.create_task(self._watch_instances())
        log.info("router control channel at %s", self.control_address)

    async def stop(self) -> None:
        if self._monitor:
            self._monitor.cancel()
        if self.connections:
            self.connections.close()
        if self.transport:
            self.transport.close()

    # The model's surfaces: before a router without --model has one, they raise a 503.
    @property
    def model_name(self) -> str:
        return self.cluster_model.serving.name

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self.cluster_model.serving.tokenizer

    @property
    def chat_template(self) -> str | None:
        return self.cluster_model.serving.chat_template

    @property
    def max_model_len(self) -> int:
        lens = [i.max_model_len for i in self.registry.instances.values() if i.healthy]
        return min([self.cluster_model.serving.max_model_len, *lens])

    def _adopted(self, model: FrontendModel) -> None:
        if not self.pd.max_request_body_bytes:      # sized by the context length, see above
            self.admission.max_body_bytes = max(MIN_BODY_BYTES,
                                                BODY_BYTES_PER_TOKEN * model.max_model_len)

    # ------------------------------------------------------------------ one request
    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[TokenDelta]:
        seed = params.seed if params.seed is not None else self._seeds.getrandbits(63)
        max_tokens = (params.max_tokens if params.max_tokens is not None
                      else self.max_model_len - len(prompt_token_ids))
        deadline = time.monotonic() + self.pd.request_timeout
        hashes = self.affinity.hashes(prompt_token_ids)
        attempts = self._attempts(request_id, prompt_token_ids, params, seed, max_tokens,
                                  deadline, hashes)
        try:
            async for delta in attempts:
                yield delta
        finally:
            await attempts.aclose()             # runs its cleanup (Aborts) now, not at GC
            self._current.pop(request_id, None)

    async def _attempts(self, request_id, prompt_token_ids, params, seed, max_tokens, deadline,
                        hashes) -> AsyncIterator[TokenDelta]:
        excluded: set[str] = set()
        last: Failure | None = None
        # Every token the client got. When the instance streaming the request drains
        # (Migrate) or is lost, the request goes on elsewhere from prompt + these tokens, so
        # the client sees one continuous stream (``fdpd.router.resume``).
        generated: list[int] = []
        resumes = Resumes(self.pd.max_resumes, self.stats.resumes)
        usage: tuple[int, int] | None = None       # (prompt, cached) of the first attempt
        attempt = dispatches = 0
        first_dispatch = 0.0
        flight: Inflight | None = None
        decoded = False         # some decode streamed (not only a prefill's early first token)
        while attempt < self.max_attempts:
            if attempt and not generated:
                self.stats.retries += 1
            if flight is not None and len(generated) >= max_tokens:
                # Lost after its last token but before its end: nothing is left to generate.
                yield TokenDelta([], None, True, "length", None, *(usage or (0, 0)),
                                 route=self._route(flight, dispatches, first_dispatch, resumes))
                return
            # Each attempt has its own id on the wire, so that late messages about an earlier
            # attempt (a woken prefill's Reject, its Abort to the decode) cannot touch this one.
            wire_id = f"{request_id}/retry{dispatches}" if dispatches else request_id
            dispatches += 1
            context = list(prompt_token_ids) + generated if generated else prompt_token_ids
            flight = self._dispatch(wire_id, context, params, seed,
                                    max_tokens - len(generated), deadline,
                                    self.affinity.hashes(context) if generated else hashes,
                                    excluded, num_output_tokens=len(generated))
            if flight is None:
                if last is None:
                    if generated:
                        raise StreamBroken("no instance left to resume the request on")
                    raise RouterError(503, "no_instances", "no healthy instance can serve "
                                      "this request right now", retry_after=1.0)
                break
            self._current[request_id] = wire_id
            first_dispatch = first_dispatch or flight.dispatched_at
            resumes.redispatched()
            attempt += 1
            finished = False
            try:
                while True:
                    event = await self._next_event(flight, deadline, bool(generated))
                    if isinstance(event, (Migrate, Failure)):
                        resumed = self._resume(event, flight, resumes, generated, deadline)
                        if resumed:
                            attempt -= 1          # a drain or a loss is not a failed attempt
                        elif isinstance(event, Failure):
                            self._raise_final(event, generated)
                        last = resumed or event
                        if last.origin:
                            excluded.add(last.origin)
                        break
                    if not keep_new_tokens(event, len(generated)):
                        continue
                    flight.streamed = True
                    resumes.on_tokens(time.monotonic())
                    if usage is None:
                        usage = (event.num_prompt_tokens, event.num_cached_tokens)
                    elif generated:
                        # A resumed attempt reports its context as cached: usage stays the
                        # first attempt's.
                        event.num_prompt_tokens, event.num_cached_tokens = usage
                    generated.extend(event.token_ids)
                    if event.finished:
                        event.route = self._route(flight, dispatches, first_dispatch, resumes)
                    # Before the yield: the caller closes this generator at the yield of the
                    # last delta, and a finished request needs no Abort.
                    finished = event.finished
                    yield event
                    if finished:
                        return
            finally:
                decoded = decoded or flight.decoding
                self._end(flight, abort=not finished)
            if not self._can_route(excluded) and not (generated and self._forgive(excluded)):
                break                 # nobody left to try: answer now, not after a back-off
            if last is not None and last.retry_after and time.monotonic() < deadline:
                await asyncio.sleep(min(last.retry_after, max(0.0, deadline - time.monotonic())))
        self.stats.failures[_kind(last.reason)] += 1
        if generated and decoded:
            raise StreamBroken(f"could not resume the request: {last.reason}")
        # Only an early first token was produced: the request failed in its transfer, as
        # before the token went out early, and gets the same status (a stream: an error event).
        raise RouterError(503, "unavailable", f"request failed after {attempt} "
                          f"attempt{'s' if attempt != 1 else ''}: {last.reason}",
                          retry_after=max(1.0, last.retry_after))

    async def _next_event(self, flight: Inflight, deadline: float,
                          resumed: bool) -> TokenDelta | Failure | Migrate:
        remaining = deadline - time.monotonic()
        try:
            if remaining > 0 and not flight.queue.empty():
                # Tokens often arrive in bursts; on Python < 3.12 each wait_for costs a task
                # and a timer (measured: ~3% of the router's CPU).
                return flight.queue.get_nowait()
            return await asyncio.wait_for(flight.queue.get(), max(remaining, 0))
        except asyncio.TimeoutError:
            if flight.streamed or resumed:
                raise StreamBroken("request deadline passed") from None
            raise RouterError(504, "timeout", "the request did not complete within "
                              f"{self.pd.request_timeout:.0f} s") from None

    def _resume(self, event: Migrate | Failure, flight: Inflight, resumes: Resumes,
                generated: list[int], deadline: float) -> Failure | None:
        """Whether the request goes on elsewhere after ``event`` ended this attempt: the
        Failure the next attempt starts from, or None (a Failure before any token of this
        attempt: an ordinary retry). Raises StreamBroken when it cannot be resumed."""
        origin = flight.decode.instance_id
        if isinstance(event, Migrate):
            why = resumes.drained(origin, len(generated), event.num_output_tokens)
            if why:
                raise StreamBroken(why)
            self.stats.migrations += 1
            log.info("resuming %s elsewhere after %d tokens (%s)", flight.req_id,
                     len(generated), event.reason, extra={"request_id": flight.req_id})
            return Failure(event.reason, origin, kind="drained")
        if not flight.streamed or event.final:
            return None
        why = resumes.lost(event.kind, event.origin or origin, len(generated), deadline)
        if why:
            raise StreamBroken(f"request failed mid-stream: {event.reason}; not resumed: "
                               f"{why}")
        log.warning("resuming %s elsewhere after %d tokens: %s", flight.req_id,
                    len(generated), event.reason, extra={"request_id": flight.req_id})
        return event

    @staticmethod
    def _raise_final(event: Failure, generated: list[int]) -> None:
        if event.final and generated:
            raise StreamBroken(f"resumed request refused: {event.reason}")
        if event.final:
            code = "invalid_request" if event.status == 400 else "aborted"
            raise RouterError(event.status, code, event.reason)

    @staticmethod
    def _route(flight: Inflight, dispatches: int, first_dispatch: float,
               resumes: Resumes) -> Route:
        return Route("pd" if flight.prefill else "mixed",
                     flight.prefill.instance_id if flight.prefill else None,
                     flight.decode.instance_id, dispatches, flight.dispatched_at,
                     first_dispatch, tuple(r.view() for r in resumes.records),
                     resumes.stalled_seconds())

    def _forgive(self, excluded: set[str]) -> bool:
        """A stream that broke mid-way is worth its deadline: when every instance has been
        tried, the live ones that only refused it (full, slow to answer: the survivors of a
        lost instance take its whole load at once) are tried again. Whether any is left."""
        live = {i.instance_id for i in self.registry.instances.values() if i.healthy}
        excluded.difference_update(live)
        return self._can_route(excluded)

    def _can_route(self, excluded: set[str]) -> bool:
        """Whether some (prefill, decode) pair or mixed instance outside ``excluded`` is
        routable."""
        reg = self.registry

        def left(role: str) -> bool:
            return any(i.instance_id not in excluded for i in reg.routable(role))

        return (left("prefill") and left("decode")) or left("mixed")

    def _dispatch(self, request_id, prompt, params, seed, max_tokens, deadline, hashes,
                  excluded, num_output_tokens: int = 0) -> Inflight | None:
        reg = self.registry
        prefills = [i for i in reg.routable("prefill") if i.instance_id not in excluded]
        decodes = [i for i in reg.routable("decode") if i.instance_id not in excluded]
        p = policy.choose_prefill(prefills, hashes, self.affinity)
        d = policy.choose_decode(decodes)
        if p is not None and d is not None:
            mode, first, second = "pd", p, d
        else:
            mixed = [i for i in reg.routable("mixed") if i.instance_id not in excluded]
            m = policy.choose_mixed(mixed, hashes, self.affinity)
            if m is None:
                return None
            mode, first, second = "mixed", None, m
        target = first or second
        self.affinity.record(hashes, target.instance_id)
        flight = Inflight(request_id, asyncio.Queue(), first, second, len(prompt))
        self.inflight[request_id] = flight
        for inst in (first, second):
            if inst is not None:
                inst.outstanding += 1
                inst.outstanding_tokens += len(prompt)
        self.stats.requests[mode] += 1
        log.debug("dispatch %s: %s", request_id, f"{first.instance_id} -> {second.instance_id}"
                  if first else second.instance_id, extra={"request_id": request_id})
        self._send(target.address, Submit(
            request_id, list(prompt), params.to_dict(), seed, max_tokens,
            self.control_address, max(0.0, deadline - time.monotonic()),
            decode_id=second.instance_id if first else "",
            decode_address=second.address if first else "",
            num_output_tokens=num_output_tokens))
        return flight

    def _end(self, flight: Inflight, abort: bool) -> None:
        if self.inflight.get(flight.req_id) is flight:
            del self.inflight[flight.req_id]
        if abort:
            for inst in (flight.prefill, flight.decode):
                if inst is not None:
                    self._send(inst.address, Abort(flight.req_id, "router ended the request"))

    async def abort(self, request_id: str, reason: str) -> None:
        """End a request for good (client gone, stop string): no retry, and every instance
        that may hold state for it is told at once."""
        flight = self.inflight.get(self._current.get(request_id, request_id))
        if flight is None:
            return
        flight.queue.put_nowait(Failure(f"aborted: {reason}", final=True, status=499))
        for inst in (flight.prefill, flight.decode):
            if inst is not None:
                self._send(inst.address, Abort(flight.req_id, reason))

    def _send(self, address: str, msg) -> None:
        if self.transport is not None:
            self.transport.send(address, msg)

    # ------------------------------------------------------------------ inbound
    def _from_io_thread(self, inbound: Inbound) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._handle, inbound)

    def _connection_from_io_thread(self, address: str, connected: bool) -> None:
        loop, watch = self._loop, self.connections
        if loop is not None and watch is not None and not loop.is_closed():
            loop.call_soon_threadsafe(watch.connection, address, connected)

    def _connection_lost(self, address: str) -> None:
        for inst in list(self.registry.instances.values()):
            if inst.address == address and inst.healthy:
                inst.healthy = False
                self.stats.instance_deaths += 1
                log.warning("instance %s (%s): connection lost and refused for %.1f s; marked "
                            "dead", inst.instance_id, inst.role, self.connections.grace)
                self._instance_lost(inst, f"instance {inst.instance_id} is unreachable "
                                    "(connection lost)", "disconnected")

    def _handle(self, inbound: Inbound) -> None:
        msg, env = inbound.msg, inbound.envelope
        if isinstance(msg, Tokens):
            flight = self.inflight.get(msg.req_id)
            if flight is not None:
                flight.decoding = flight.decoding or env.src == flight.decode.instance_id
                flight.queue.put_nowait(TokenDelta.from_tokens(msg))
        elif isinstance(msg, Heartbeat):
            if not self.registry.heartbeat(env.src, env.epoch, msg.load):
                # Unknown to this router (it restarted) or marked dead: register again.
                address = msg.load.get("address")
                if isinstance(address, str) and address:
                    self._send(address, RegisterAck(False, "unknown instance: register again"))
        elif isinstance(msg, Register):
            old = self.registry.get(msg.instance_id)
            ok, why = self.registry.register(msg, env.epoch)
            if ok:                      # a refusal is logged by the registry, once
                log.info("register %s (%s at %s, epoch %d): ok", msg.instance_id, msg.role,
                         msg.address, env.epoch)
            self._send(msg.address, RegisterAck(ok, why))
            if ok and old is not None and old.healthy and old.epoch != env.epoch:
                # A new incarnation: what the old one held is gone, even when it came back
                # before the liveness timeout noticed (else its streams waited for their
                # deadline; found by the chaos suite).
                self._instance_lost(old, f"instance {old.instance_id} restarted", "restarted")
        elif isinstance(msg, Migrate):
            flight = self.inflight.get(msg.req_id)
            # Only the instance streaming the request can hand it back.
            if flight is not None and flight.decode.instance_id == env.src:
                flight.queue.put_nowait(msg)
        elif isinstance(msg, SubmitAck):
            flight = self.inflight.get(msg.req_id)
            if flight is not None:
                flight.acked = True
        elif isinstance(msg, Reject):
            self._fail(msg.req_id, Failure(f"rejected by {msg.origin or env.src}: {msg.reason}",
                                           msg.origin or env.src, msg.retry_after,
                                           final=not msg.retryable,
                                           status=503 if msg.retryable else 400,
                                           kind="rejected"))
        elif isinstance(msg, GrantExpired):
            # The lease ran out because the prefill did not deliver the KV in time; the decode
            # has freed the blocks and is fine, so the retry avoids the prefill, not the decode.
            flight = self.inflight.get(msg.req_id)
            blame = flight.prefill.instance_id if flight and flight.prefill else env.src
            self._fail(msg.req_id, Failure("decode grant expired before the KV transfer "
                                           "finished", blame, kind="grant_expired"))
        elif isinstance(msg, Error):
            if msg.req_id:
                self._fail(msg.req_id, Failure(f"{msg.code}: {msg.message}", env.src))
            else:
                log.warning("error from %s: %s %s", env.src, msg.code, msg.message)

    def _fail(self, req_id: str, failure: Failure) -> None:
        flight = self.inflight.get(req_id)
        if flight is not None:
            flight.queue.put_nowait(failure)

    async def _watch_instances(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(self.pd.heartbeat_interval)
            now = time.monotonic()
            stalled, last = now - last - self.pd.heartbeat_interval, now
            if stalled > self.pd.heartbeat_interval:
                # This loop itself did not run (the router was stopped or starved): heartbeats
                # sent meanwhile still wait behind this timer, so the gap is nobody's silence
                # and does not count towards the liveness timeout. Without this, a router
                # paused past that timeout declared every instance dead on waking and failed
                # their healthy streams (found by the chaos suite).
                for inst in self.registry.instances.values():
                    inst.last_seen += stalled
            else:                       # (after a stall, answers may wait behind this timer)
                self._fail_unacknowledged(now)
            for inst in self.registry.expire():
                self.stats.instance_deaths += 1
                log.warning("instance %s (%s) stopped heartbeating; marked dead",
                            inst.instance_id, inst.role)
                self._instance_lost(inst, f"instance {inst.instance_id} stopped heartbeating",
                                    "instance_died")

    def _instance_lost(self, inst: Instance, reason: str, kind: str) -> None:
        """Fail every attempt ``inst`` holds state for (a prefill until the decode streams:
        its early first token does not mean the KV reached the decode)."""
        for flight in list(self.inflight.values()):
            if flight.decode is inst or (flight.prefill is inst and not flight.decoding):
                flight.queue.put_nowait(Failure(reason, inst.instance_id, kind=kind))

    def _fail_unacknowledged(self, now: float) -> None:
        """A Submit is answered at once (SubmitAck or Reject). No answer and no token within
        the transfer timeout: the Submit or its answer was lost, and the attempt fails (the
        retry avoids that instance) instead of waiting for the request's deadline."""
        for flight in list(self.inflight.values()):
            if (flight.acked or flight.streamed
                    or now - flight.dispatched_at < self.pd.transfer_timeout):
                continue
            flight.acked = True                 # fail it once
            target = flight.prefill or flight.decode
            flight.queue.put_nowait(Failure(f"{target.instance_id} did not acknowledge the "
                                            f"request in {self.pd.transfer_timeout:g} s",
                                            target.instance_id, kind="unacknowledged"))

    # ------------------------------------------------------------------ surfaces
    def healthy(self) -> tuple[bool, str]:
        reg = self.registry
        if reg.healthy("mixed") or (reg.healthy("prefill") and reg.healthy("decode")):
            return True, ""
        roles = sorted({i.role for i in reg.instances.values() if i.healthy})
        return False, f"no usable instances (healthy roles: {roles or 'none'})"

    def cluster(self) -> dict:
        return {"router": {"epoch": self.epoch, "control_address": self.control_address,
                           "inflight": len(self.inflight), "retries": self.stats.retries,
                           "migrations": self.stats.migrations,
                           "resumes": dict(self.stats.resumes),
                           "connection_drops": self.connections.drops if self.connections
                           else 0,
                           "admission": self.admission.view(),
                           "authenticated": self.pd.cluster_key is not None,
                           "transport": self._transport_view(),
                           "model": self.cluster_model.view()},
                "instances": [i.view() for i in self.registry.instances.values()],
                "refused": [r.view() for r in self.registry.refused.values()]}

    def _transport_view(self) -> dict[str, int]:
        return self.transport.stats.view() if self.transport else {}

    def metrics_collector(self) -> ClusterCollector:
        """The cluster view on the router's ``/metrics`` (``fdpd.router.cluster_metrics``)."""
        return ClusterCollector(self)


def keep_new_tokens(event: TokenDelta, have: int) -> bool:
    """The first token reaches the router twice, early from the prefill and again from the
    decode, in either order: trim from ``event`` the tokens the client already has (``have``
    of them). False when nothing is left to deliver. Raises StreamBroken on a gap (a lost
    message): a stream with a token missing is never delivered."""
    if event.position < 0:
        return True
    skip = have - event.position
    if skip < 0:
        raise StreamBroken(f"tokens {have}..{event.position - 1} of the output never arrived")
    if skip:
        del event.token_ids[:skip]
        if event.logprobs:
            del event.logprobs[:skip]
        if event.token_logprobs:
            del event.token_logprobs[:skip]
    return bool(event.token_ids) or event.finished


def _kind(reason: str) -> str:
    return reason.split(":", 1)[0].split(" by ", 1)[0].strip()[:40]
