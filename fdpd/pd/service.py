"""What every engine instance (prefill, decode, mixed) does around its engine: the loop,
registration and heartbeats with the router, and message dispatch. Roles subclass this and
differ only in their handlers and in what happens after a step (DESIGN 2)."""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from fdpd.config import InstanceConfig, PDConfig
from fdpd.engine.engine import Engine, RequestError, StepOutput
from fdpd.engine.request import Request
from fdpd.pd.protocol import (
    Abort,
    Error,
    Heartbeat,
    Message,
    Migrate,
    Register,
    RegisterAck,
    Reject,
    Submit,
    Tokens,
    new_epoch,
)
from fdpd.outputs import logprobs_to_wire
from fdpd.pd.instance_metrics import InstanceMetrics, MetricsServer
from fdpd.pd.transport import Inbound, Transport
from fdpd.sampling_params import SamplingParams, SamplingParamsError

log = logging.getLogger(__name__)
# /health fails when the loop has not come round for this long (a step on a big model on CPU
# can take seconds; a loop stuck for this long is stuck).
LOOP_STALL_SECONDS = 60.0


@dataclass
class Stream:
    """A request whose tokens this instance sends to the router (decode and mixed roles)."""

    reply_to: str
    req: Request
    started_at: float                   # arrival here (decode: the grant request's arrival)
    last_token_at: float = 0.0          # previous token sent (0: none yet)
    first_token_at: float = 0.0
    paused_before_first: float = 0.0    # preempted/restoring before the first token
    upstream: dict | None = None        # the prefill's timeline (PrefillDone.timeline)
    kv_transfer: float | None = None


class InstanceService:
    role: ClassVar[str] = ""

    def __init__(self, engine: Engine, pd: PDConfig, inst: InstanceConfig):
        self.engine = engine
        self.pd = pd
        self.inst = inst
        self.epoch = new_epoch()
        # (peer address, connected?) from the IO thread's socket monitors, handled by the loop.
        self._connection_events: deque[tuple[str, bool]] = deque()
        self.transport = Transport("unbound", self.epoch, f"tcp://{inst.host}:{inst.port}",
                                   secret=pd.cluster_key,
                                   on_connection=lambda a, up: self._connection_events.append(
                                       (a, up)))
        self._address = inst.advertised(self.transport.address)
        self.instance_id = inst.instance_id or f"{self.role}@{self._address[6:]}"
        self.transport.codec.src = self.instance_id
        self.router_address = f"tcp://{inst.router}" if inst.router else None
        self.registered = False
        self._refusal = ""                      # the last refusal logged (said once)
        self.counters: dict[str, int] = {"unexpected_messages": 0, "handler_errors": 0,
                                         "rejected": 0, "migrated": 0}
        self.draining = False
        self.submits = RecentIds()      # Submits taken (prefill, mixed): duplicates are dropped
        self.counters["duplicates"] = 0
        self.drain_deadline = 0.0
        self._migrating: set[str] = set()       # streams stopped here, Migrate not sent yet
        self.handlers: dict[type[Message], Callable[[Inbound], None]] = {
            RegisterAck: self._on_register_ack,
            Error: self._on_error,
            Abort: self.on_abort,
        }
        self._next_heartbeat = 0.0
        self.store_latencies = (LatencyWindow(), LatencyWindow())     # write, restore
        self.streams: dict[str, Stream] = {}
        self.last_load: dict = {}               # swapped (never mutated) once per heartbeat
        self.metrics = InstanceMetrics(lambda: self.last_load)
        self.loop_at = time.monotonic()
        self.metrics_server: MetricsServer | None = None
        self.metrics_url: str | None = None
        if inst.metrics_port >= 0:
            self.metrics_server = MetricsServer(
                inst.host, inst.metrics_port,
                self.metrics.render, self.health)
            self.metrics_url = self.metrics_server.url(inst.advertise_host)

    @property
    def address(self) -> str:
        """The inbox address peers dial: ``--advertise-address`` (a proxy in front of this
        instance), else the bound port on the advertised host."""
        return self._address

    # ------------------------------------------------------------------ the loop
    def serve(self, stop: threading.Event, drain: threading.Event | None = None) -> None:
        """Run until ``stop``; once ``drain`` is set, drain first (bounded by the drain
        timeout), then return."""
        log.info("%s serving at %s (epoch %d)", self.instance_id, self.address, self.epoch)
        try:
            while not stop.is_set():
                if drain is not None and drain.is_set() and not self.draining:
                    self.start_drain(self.pd.drain_timeout)
                self.run_once()
                if self.draining and self.drain_step():
                    break
        finally:
            self.close()

    # ------------------------------------------------------------------ graceful drain
    def start_drain(self, timeout: float) -> None:
        """Take no new work from now on; ``drain_step`` moves or finishes what is here. The
        next heartbeat (sent at once) tells the router to stop routing here."""
        self.draining = True
        self.drain_deadline = time.monotonic() + timeout
        self._next_heartbeat = 0.0
        log.info("%s draining (at most %.0f s): %d streams", self.instance_id, timeout,
                 len(self.streams))

    def drain_step(self) -> bool:
        """One loop iteration's drain work; True once nothing is left here (or the drain
        timeout passed)."""
        late = time.monotonic() >= self.drain_deadline
        self.migrate_streams(late)
        return late or (not self.streams and self.role_drained())

    def role_drained(self) -> bool:
        """Role work that must end before the process may stop (grants, prefill jobs)."""
        return True

    def migrate_streams(self, late: bool) -> None:
        """Hand every request streaming from here back to the router to resume elsewhere.

        With a KV store, a running request is preempted first: the preemption handler writes
        its full blocks to the store (pinned until acknowledged), so whichever instance
        resumes it restores that KV instead of recomputing it. The request is then dropped
        here, and once every write-back is acknowledged (or the drain timeout passed) the
        router gets one ``Migrate`` per request, after all the request's tokens (same
        channel, so they arrive first)."""
        sched = self.engine.scheduler
        for req_id in self.streams.keys() - self._migrating:
            if sched.preemption.restores and self.streams[req_id].req in sched.running:
                sched.preempt(req_id)
            self.engine.abort_request(req_id)
            self._migrating.add(req_id)
        if not self._migrating or (sched.preemption.pending() and not late):
            return
        for req_id in sorted(self._migrating):
            s = self.streams.pop(req_id, None)
            if s is None:
                continue                        # aborted meanwhile: nothing to resume
            self.send(s.reply_to, Migrate(req_id, s.req.num_output_tokens,
                                          f"{self.instance_id} is draining"))
            self.counters["migrated"] += 1
        self._migrating.clear()

    def forget_stream(self, req_id: str) -> None:
        """The router ended ``req_id`` (Abort): stop streaming it, and never migrate it."""
        self.streams.pop(req_id, None)
        self._migrating.discard(req_id)

    def run_once(self) -> None:
        now = time.monotonic()
        self.loop_at = now
        if self.router_address and now >= self._next_heartbeat:
            self._heartbeat()
            self._next_heartbeat = now + self.pd.heartbeat_interval
        busy = self.engine.has_unfinished_requests()
        # Idle: sleep in the socket queue until a message comes (bounded, for timers). Take
        # at most what was queued when we looked, so a steady inflow cannot starve the step.
        budget = self.transport.backlog() + 1
        inbound = self.transport.recv(None if busy else 0.01)
        while inbound is not None:
            self._dispatch(inbound)
            budget -= 1
            inbound = self.transport.recv() if budget > 0 else None
        while self._connection_events:
            self.on_peer_connection(*self._connection_events.popleft())
        self.tick()
        if self.engine.has_unfinished_requests():
            self.on_step(self.engine.step())

    def close(self) -> None:
        if self.metrics_server is not None:
            self.metrics_server.close()
        self.transport.close()
        self.engine.close()

    def health(self) -> tuple[bool, dict]:
        """For ``/health`` (any thread): registered with the router, and the loop turning."""
        stalled = time.monotonic() - self.loop_at
        ok = self.registered and stalled < LOOP_STALL_SECONDS
        return ok, {"status": "ok" if ok else "unavailable", "instance_id": self.instance_id,
                    "role": self.role, "epoch": self.epoch, "registered": self.registered,
                    "seconds_since_loop": round(stalled, 3)}

    def tick(self) -> None:
        """Role timers (leases, deadlines). Called once per loop iteration."""

    def on_peer_connection(self, address: str, connected: bool) -> None:
        """The TCP connection to a peer this process sends to came up or dropped (a killed
        process's kernel closes its sockets at once, long before heartbeats are missed)."""

    def on_step(self, outputs: list[StepOutput]) -> None:
        """What the role does with one engine step's results."""

    def on_abort(self, inbound: Inbound) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ dispatch
    def _dispatch(self, inbound: Inbound) -> None:
        handler = self.handlers.get(type(inbound.msg))
        if handler is None:
            self.counters["unexpected_messages"] += 1
            log.warning("%s: unexpected %s from %s", self.instance_id, inbound.msg.TYPE,
                        inbound.envelope.src)
            return
        try:
            handler(inbound)
        except Exception:
            # A handler bug must not take the instance down; it is logged and counted, and
            # the request it concerned fails through its deadline or the router's retry.
            self.counters["handler_errors"] += 1
            log.exception("%s: handling %s failed", self.instance_id, inbound.msg.TYPE,
                          extra={"request_id": getattr(inbound.msg, "req_id", None)})

    def send(self, address: str, msg: Message, frames=()) -> None:
        self.transport.send(address, msg, frames)

    # ------------------------------------------------------------------ helpers for roles
    def build_request(self, submit: Submit | object, *, prefill_only: bool = False) -> Request:
        """A validated engine request from a Submit/AllocRequest (raises RequestError)."""
        try:
            params = SamplingParams.from_dict(submit.params)
        except (SamplingParamsError, TypeError, ValueError) as e:
            raise RequestError(getattr(e, "field", "params"), str(e)) from None
        req = self.engine.make_request(submit.req_id, submit.prompt_token_ids, params,
                                       seed=submit.seed, max_tokens=submit.max_tokens,
                                       num_output_tokens=submit.num_output_tokens)
        req.prefill_only = prefill_only
        return req

    def refuses_submit(self, msg: Submit, queued: int, queued_what: str) -> bool:
        """The checks a Submit passes before anything is built for it (prefill, mixed): a
        duplicate is dropped (its first copy got the one reply); a draining instance, or one
        whose queue already holds ``queued`` >= --max-queued-requests, refuses it (retryable:
        the router tries another instance or answers 503) instead of letting the wait, and
        the memory, grow with a burst."""
        if not self.submits.add(msg.req_id):
            self.counters["duplicates"] += 1
            return True
        if self.draining:
            self.reject(msg.reply_to, msg.req_id, f"{self.role} is draining")
            return True
        if queued >= self.pd.max_queued_requests:
            self.reject(msg.reply_to, msg.req_id, f"{self.role} queue is full ({queued} "
                        f"{queued_what}, --max-queued-requests)", retry_after=1.0)
            return True
        return False

    def reject(self, address: str, req_id: str, reason: str, retry_after: float = 0.0,
               retryable: bool = True) -> None:
        self.counters["rejected"] += 1
        log.info("rejected %s: %s", req_id, reason, extra={"request_id": req_id})
        self.send(address, Reject(req_id, reason, retry_after, origin=self.instance_id,
                                  retryable=retryable))

    def tokens_message(self, out: StepOutput, position: int,
                       timeline: dict | None = None) -> Tokens:
        return Tokens(out.request_id, out.new_token_ids, out.new_logprobs, out.finished,
                      out.finish_reason, out.stop_reason, out.num_prompt_tokens,
                      out.num_cached_tokens, timeline,
                      logprobs_to_wire(out.new_token_logprobs),
                      logprobs_to_wire(out.prompt_logprobs), position)

    # ------------------------------------------------------------------ streaming tokens
    def stream_outputs(self, outputs: list[StepOutput]) -> None:
        """Send each streamed request's new tokens to the router; time them (one clock read
        per step); at the end, attach the request's timeline."""
        now = 0.0
        for out in outputs:
            s = self.streams.get(out.request_id)
            if s is None:
                continue
            now = now or time.monotonic()
            if s.last_token_at:
                gap = (now - s.last_token_at) / max(1, len(out.new_token_ids))
                self.metrics.itl.observe(gap)
            else:
                s.first_token_at = now
                s.paused_before_first = s.req.paused_seconds()
                self.metrics.ttft.observe(now - s.started_at)
            s.last_token_at = now
            timeline = None
            if out.finished:
                del self.streams[out.request_id]
                timeline = self.finish_timeline(s, now)
                log.debug("finished %s (%s)", out.request_id, out.finish_reason,
                          extra={"request_id": out.request_id})
                self.metrics.e2e.observe(now - s.started_at)
            position = s.req.num_output_tokens - len(out.new_token_ids)
            self.send(s.reply_to, self.tokens_message(out, position, timeline))

    def finish_timeline(self, s: Stream, now: float) -> dict:
        """The timeline of a request that finished here (role specific); observes the phases
        measured here in this instance's histogram."""
        raise NotImplementedError

    def pause_phases(self, req: Request) -> dict:
        """Preemption and restore phases, only for a request that had any."""
        if not req.pauses:
            return {}
        return {"preempted": req.paused_seconds("preempted"),
                "restore": req.paused_seconds("restore")}

    # ------------------------------------------------------------------ membership
    def _heartbeat(self) -> None:
        load = self.load()
        self.last_load = load
        if not self.registered:
            cfg = self.engine.config
            self.send(self.router_address, Register(
                self.instance_id, self.role, self.address, cfg.model,
                cfg.block_size, self.engine.block_manager.num_blocks,
                self.engine.max_model_len, self.engine.fingerprint, self.engine.kv_kind,
                cfg.model if cfg.model == "tiny" else str(Path(cfg.model).resolve())))
        else:
            self.send(self.router_address, Heartbeat(load))

    def _on_register_ack(self, inbound: Inbound) -> None:
        msg: RegisterAck = inbound.msg
        if not msg.ok:
            if self.registered:
                log.info("%s: router asks to register again (%s)", self.instance_id,
                         msg.message)
            elif msg.message != self._refusal:
                # Registering is retried every heartbeat: say each refusal once.
                log.error("%s: router refused registration: %s", self.instance_id,
                          msg.message)
            self._refusal = msg.message
        else:
            self._refusal = ""
        self.registered = msg.ok
        self._next_heartbeat = 0.0 if not msg.ok else self._next_heartbeat

    def _on_error(self, inbound: Inbound) -> None:
        msg: Error = inbound.msg
        log.warning("%s: error from %s: %s %s", self.instance_id, inbound.envelope.src,
                    msg.code, msg.message)

    def _store_stats(self) -> dict | None:
        offload = getattr(self.engine.scheduler.preemption, "offload", None)
        if offload is None:
            return None
        s = offload.stats
        writes, restores = s.take_latencies()
        self.store_latencies[0].add(writes)
        self.store_latencies[1].add(restores)
        for seconds in writes:
            self.metrics.store_write.observe(seconds)
        for seconds in restores:
            self.metrics.store_restore.observe(seconds)
        return {"blocks_written": s.blocks_written, "blocks_skipped": s.blocks_skipped,
                "bytes_written": s.bytes_written, "blocks_restored": s.blocks_restored,
                "bytes_restored": s.bytes_restored, "lookups": s.lookups,
                "lookup_hit_blocks": s.lookup_hit_blocks,
                "lookup_miss_blocks": s.lookup_blocks - s.lookup_hit_blocks,
                "errors": s.store_errors,
                "corrupt_objects": s.corrupt_objects, "dropped_writes": s.dropped_writes,
                "write_seconds": self.store_latencies[0].summary(),
                "restore_seconds": self.store_latencies[1].summary()}

    def load(self) -> dict:
        bm, sched = self.engine.block_manager, self.engine.scheduler
        stats = bm.stats()
        return {
            "address": self.address,
            "draining": self.draining,
            "running": len(sched.running),
            "waiting": len(sched.waiting),
            "free_blocks": bm.num_free_blocks,
            "total_blocks": bm.num_blocks,
            "kv_usage": bm.usage,
            "num_preemptions": sched.num_preemptions,
            "num_restores": sched.num_restores,
            "num_restored_tokens": sched.num_restored_tokens,
            "num_computed_prompt_tokens": sched.num_computed_prompt_tokens,
            "num_recomputed_tokens": sched.num_recomputed_tokens,
            "kv_store": self._store_stats(),
            "prefix_queried_tokens": stats.queried_tokens,
            "prefix_hit_tokens": stats.hit_tokens,
            "metrics_address": self.metrics_url,
            "restarts": self.inst.restart_count,
            "transport": self.transport.stats.view(),
            **self.counters,
        }


class LatencyWindow:
    """All-time count and sum (monotonic, as a Prometheus summary needs) plus quantiles over
    the most recent ``size`` observations (bounded memory)."""

    def __init__(self, size: int = 4096):
        self.count = 0
        self.total = 0.0
        self.recent: deque[float] = deque(maxlen=size)

    def add(self, values: list[float]) -> None:
        self.count += len(values)
        self.total += sum(values)
        self.recent.extend(values)

    def summary(self) -> dict:
        if not self.recent:
            return {"count": self.count, "sum": self.total}
        ordered = sorted(self.recent)
        pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
        return {"count": self.count, "sum": self.total, "p50": pick(0.5), "p99": pick(0.99)}


class RecentIds:
    """The last ``capacity`` ids a handler took, to recognise a message that arrives twice (a
    network or proxy duplicate, possibly late) after the state its first copy created is gone
    (a request shipped, a grant committed). Bounded memory, O(1) per id."""

    def __init__(self, capacity: int = 16384):
        self.capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()

    def add(self, key: str) -> bool:
        """Remember ``key``. False if it was remembered already: a duplicate."""
        if key in self._ids:
            return False
        self._ids[key] = None
        if len(self._ids) > self.capacity:
            self._ids.popitem(last=False)
        return True

    def __contains__(self, key: str) -> bool:
        return key in self._ids

    def __len__(self) -> int:
        return len(self._ids)
