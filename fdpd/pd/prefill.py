"""The prefill role: compute the prompt's KV, sample the first token, ship both to decode.

Per request: Submit (from the router) -> AllocRequest to the chosen decode, and the prompt is
computed at once, without waiting for the grant. When both the grant and the first token are
there, the token goes to the router (``_stream_first_token``: the client's first token does
not wait for the transfer), and the KV of the blocks decode does not already hold goes out as
zero-copy frames straight from the cache, then ``PrefillDone``; P's blocks are released (they
stay in P's prefix cache) once libzmq has sent those frames (``Shipment``). Every wait has a
deadline; a refusal from decode goes back to the router. A duplicated Submit or Grant acts
once; a Submit that an Abort overtook starts nothing.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from fdpd.engine.engine import RequestError, StepOutput
from fdpd.engine.request import Request
from fdpd.engine.scheduler import kv_owner
from fdpd.faults import fault_point
from fdpd.outputs import logprobs_to_wire
from fdpd.pd import kv_transfer
from fdpd.pd.protocol import (
    Abort,
    AllocRequest,
    Grant,
    GrantExpired,
    PrefillDone,
    Reject,
    Submit,
    SubmitAck,
    Tokens,
    TransferResult,
)
from fdpd.pd.service import InstanceService, RecentIds
from fdpd.pd.transport import Inbound

log = logging.getLogger(__name__)


@dataclass
class PrefillJob:
    req: Request
    router: str
    decode_id: str
    decode_address: str
    deadline: float
    grant: Grant | None = None
    result: StepOutput | None = None       # the step that sampled the first token
    computed_at: float = 0.0               # when the first token was sampled
    granted_at: float = 0.0                # when the grant arrived
    # Grant-relative index of the first block not yet sent: blocks of finished chunks travel
    # while the next chunk computes (``_stream_chunks``), so the last chunk ships only its own.
    next_block: int = 0
    streamed_blocks: int = 0               # of them, sent before the last chunk was computed


@dataclass
class Shipment:
    """A shipped request's KV blocks, held while zero-copy frames view them."""
    owner: str                             # the block manager owner holding them
    trackers: list                         # one zmq tracker per frame
    address: str                           # the decode they went to
    deadline: float                        # past it, the decode is presumed gone


class PrefillService(InstanceService):
    role = "prefill"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.handlers.update({Submit: self.on_submit, Grant: self.on_grant,
                              Reject: self.on_reject, GrantExpired: self.on_grant_expired,
                              TransferResult: self.on_transfer_result})
        self.jobs: dict[str, PrefillJob] = {}
        self.staging = kv_transfer.StagingPool()
        # Shipped requests whose frames may still be on the wire.
        self.sending: list[Shipment] = []
        self.lost_peers: set[str] = set()       # decodes whose connection dropped (not back)
        self.peers: dict[str, str] = {}           # decode instance id -> inbox address
        # Duplicates (a message delivered twice, maybe late) must not act twice: every request
        # whose KV went out under its grant (Submits: ``self.submits``, see the base class).
        self.shipped = RecentIds()
        self.counters.update({"kv_bytes_sent": 0, "kv_blocks_sent": 0, "transfers": 0,
                              "transfer_failures": 0, "grant_timeouts": 0, "grant_waits_lost": 0,
                              "kv_sends_abandoned": 0, "first_tokens_early": 0,
                              "kv_blocks_streamed": 0})

    def on_submit(self, inbound: Inbound) -> None:
        msg: Submit = inbound.msg
        # Every request the scheduler holds here is queued work: one leaves it once its prompt
        # is computed, and "running" only means its chunks are next in line.
        if self.refuses_submit(msg, len(self.engine.scheduler.requests),
                               "requests not yet prefilled"):
            return
        if not msg.decode_address:
            self.reject(msg.reply_to, msg.req_id, "a prefill instance needs a decode instance")
            return
        try:
            req = self.build_request(msg, prefill_only=True)
            req.arrival_time = inbound.received_at or req.arrival_time   # off the socket
            self.engine.scheduler.add(req)
        except (RequestError, ValueError) as e:
            self.reject(msg.reply_to, msg.req_id, str(e), retryable=False)
            return
        timeout = min(msg.timeout_s, self.pd.transfer_timeout)
        self.jobs[msg.req_id] = PrefillJob(req, msg.reply_to, msg.decode_id, msg.decode_address,
                                           time.monotonic() + timeout)
        self.peers[msg.decode_id] = msg.decode_address
        log.debug("submit %s: %d prompt tokens, decode %s", msg.req_id,
                  len(msg.prompt_token_ids), msg.decode_id, extra={"request_id": msg.req_id})
        self.send(msg.reply_to, SubmitAck(msg.req_id))
        self.send(msg.decode_address, AllocRequest(
            msg.req_id, msg.prompt_token_ids, msg.params, msg.seed, msg.max_tokens,
            self.address, msg.reply_to, timeout, msg.num_output_tokens))
        fault_point("prefill.await_grant")

    def on_grant(self, inbound: Inbound) -> None:
        msg: Grant = inbound.msg
        job = self.jobs.get(msg.req_id)
        if job is None or job.grant is not None:
            # Late (we gave up): give the blocks back at once. A duplicate of the grant we
            # took needs nothing, and must not be given back once shipped: that Abort would
            # end the request the decode now runs.
            address = self.peers.get(inbound.envelope.src)
            if job is None and msg.req_id not in self.shipped and address:
                self.send(address, Abort(msg.req_id, "prefill no longer has this request"))
            else:
                self.counters["duplicates"] += 1
            return
        num_kv = self.engine.block_manager.blocks_for(job.req.num_tokens)
        if not 0 <= msg.cached_blocks <= min(num_kv, len(msg.block_ids)):
            # A grant that cannot be for this prompt: nothing sensible can be shipped to it.
            self._give_up(job, "malformed grant", f"decode sent a malformed grant "
                          f"(cached_blocks {msg.cached_blocks})", job.decode_id)
            return
        job.grant = msg
        job.granted_at = inbound.received_at or time.monotonic()
        job.next_block = msg.cached_blocks
        if job.result is not None:
            self._ship(job)

    def on_step(self, outputs: list[StepOutput]) -> None:
        for out in outputs:
            job = self.jobs.get(out.request_id)
            if job is None:
                continue
            job.result = out
            job.computed_at = time.monotonic()
            self.metrics.ttft.observe(job.computed_at - job.req.arrival_time)
            if job.grant is not None:
                self._ship(job)
        if self.pd.stream_kv_chunks:
            self._stream_chunks()

    def _stream_chunks(self) -> None:
        """Send the blocks that the chunks computed so far have filled, for every request
        still computing that holds its grant: the transfer overlaps the next chunks'
        compute. The decode keeps them LOADING until PrefillDone confirms the whole set."""
        bm = self.engine.block_manager
        for job in self.jobs.values():
            req = job.req
            if job.grant is None or job.result is not None or req.is_finished:
                continue
            # Full blocks only (a partial one is still being written), and never past the
            # prompt's last KV block, the one _ship would send.
            full = min(req.num_computed_tokens // bm.block_size,
                       bm.blocks_for(req.num_tokens - 1))
            if full <= job.next_block:
                continue
            blocks = bm.owned(req.request_id)[job.next_block:full]
            if len(blocks) != full - job.next_block:
                continue            # preempted here meanwhile: its blocks come back later
            self._send_kv(job, blocks, None, job.next_block, copy=True)
            job.streamed_blocks += len(blocks)
            job.next_block = full
            self.counters["kv_blocks_streamed"] += len(blocks)

    def _ship(self, job: PrefillJob) -> None:
        """Send the KV decode lacks, then PrefillDone; release our copy."""
        del self.jobs[job.req.request_id]
        self.shipped.add(job.req.request_id)
        grant, out, req = job.grant, job.result, job.req
        token = out.new_token_ids[0]
        logprob = out.new_logprobs[0] if out.new_logprobs else None
        kv_blocks_sent = 0
        ship_start = time.monotonic()
        if out.finish_reason == "prefilled":
            self._stream_first_token(job, token, logprob)
            owner = kv_owner(req)
            # Every token but the sampled one has KV (a resumed request: its old outputs too).
            num_kv = self.engine.block_manager.blocks_for(req.num_tokens - 1)
            first = max(grant.cached_blocks, job.next_block)
            blocks = self.engine.block_manager.owned(owner)[first:num_kv]
            trackers: list = []
            try:
                kv_blocks_sent = job.next_block - grant.cached_blocks
                kv_blocks_sent += self._send_kv(job, blocks, trackers, first)
            finally:
                # The frames are views of these blocks: they stay held (nobody can reuse and
                # overwrite them) until libzmq has sent every frame, or gave up on the peer.
                self.sending.append(Shipment(owner, trackers, job.decode_address,
                                             time.monotonic() + self.pd.grant_ttl))
                self._release_sent()
        self.send(job.decode_address, PrefillDone(
            grant.grant_id, req.request_id, token, logprob, kv_blocks_sent,
            req.num_cached_tokens, finished=out.finish_reason != "prefilled",
            finish_reason=None if out.finish_reason == "prefilled" else out.finish_reason,
            stop_reason=out.stop_reason, timeline=self._timeline(job, ship_start),
            token_logprobs=logprobs_to_wire(out.new_token_logprobs),
            prompt_logprobs=logprobs_to_wire(out.prompt_logprobs)))
        self.counters["transfers"] += 1
        log.debug("shipped %s: %d KV blocks to %s", req.request_id, kv_blocks_sent,
                  job.decode_id, extra={"request_id": req.request_id})

    def _stream_first_token(self, job: PrefillJob, token: int, logprob: float | None) -> None:
        """The first token to the router now, ahead of the KV, the grant's commit and the
        decode's next step (time to first token). Only once the grant is held: before it, the
        decode may still refuse, and the router retries a request transparently only while
        the client has no token. The decode sends the token again with the same position;
        the router keeps one copy. Not for a request that asked for logprobs: its first
        token's alternatives and the prompt's logprobs travel with the decode's copy, which
        the router would then drop as a duplicate."""
        req = job.req
        params = req.sampling_params
        if params.logprobs is not None or params.prompt_logprobs is not None:
            return
        self.send(job.router, Tokens(req.request_id, [token], None if logprob is None
                                     or req.sampling_params.logprobs is None else [logprob],
                                     False, None, None, req.num_prompt_tokens,
                                     req.num_cached_tokens,
                                     position=req.num_output_tokens - 1))
        self.counters["first_tokens_early"] += 1

    def _timeline(self, job: PrefillJob, ship_start: float) -> dict:
        """This instance's phases of ``job`` (durations: D and the router have other clocks).
        ``grant_hold`` (grant off our socket -> PrefillDone sent) lets D subtract our share
        from its round trip (grant sent -> PrefillDone off its socket) and so estimate the
        one-way time of PrefillDone. ``grant_wait`` runs until we start sending: waiting for
        the grant, then for our loop to come round to it."""
        now = time.monotonic()
        req = job.req
        scheduled = req.scheduled_at or job.computed_at
        phases = {"prefill_queue": max(0.0, scheduled - req.arrival_time),
                  "prefill": max(0.0, job.computed_at - scheduled - req.paused_seconds()),
                  "grant_wait": max(0.0, ship_start - job.computed_at)}
        phases.update(self.pause_phases(req))
        kv_send = now - ship_start
        self.metrics.kv_transfer.observe(kv_send)
        self.metrics.e2e.observe(now - req.arrival_time)
        self.metrics.observe_phases(phases)
        # kv_send covers only what was left after the last chunk: the exposed transfer.
        return {"phases": phases, "kv_send": kv_send, "grant_hold": now - job.granted_at,
                "prefill_instance": self.instance_id,
                "kv_streamed_blocks": job.streamed_blocks}

    def _send_kv(self, job: PrefillJob, blocks: list[int], trackers: list | None,
                 first_index: int, copy: bool = False) -> int:
        sent = kv_transfer.send_kv_blocks(
            lambda msg, frames: self.send(job.decode_address, msg, frames),
            self.engine.runner.kv_cache, job.grant.grant_id, job.req.request_id, blocks,
            first_index, self.staging, trackers=trackers, copy=copy)
        self.counters["kv_bytes_sent"] += sent
        self.counters["kv_blocks_sent"] += len(blocks)
        return len(blocks)

    def _release_sent(self) -> None:
        """Free the KV of shipped requests whose frames libzmq has released. A shipment still
        unsent after the grant's lifetime, or to a decode whose connection dropped, is for a
        decode that is gone (its grant has expired or died with it): its connection is dropped,
        which releases the frames, and the blocks are freed on a later tick."""
        still = []
        now = time.monotonic()
        for s in self.sending:
            if all(t.done for t in s.trackers):
                self.engine.block_manager.free(s.owner)
                continue
            if now >= s.deadline or (s.address in self.lost_peers and s.deadline < float("inf")):
                log.warning("KV for %s not sent (%s); dropping the connection to %s", s.owner,
                            "connection lost" if s.address in self.lost_peers
                            else f"not within {self.pd.grant_ttl:.0f} s", s.address)
                self.transport.drop_peer(s.address)
                self.counters["kv_sends_abandoned"] += 1
                s.deadline = float("inf")
            still.append(s)
        self.sending = still

    def on_reject(self, inbound: Inbound) -> None:
        msg: Reject = inbound.msg
        job = self.jobs.pop(msg.req_id, None)
        if job is None:
            return
        self._drop(job)
        self.send(job.router, Reject(msg.req_id, msg.reason, msg.retry_after,
                                     origin=msg.origin or inbound.envelope.src,
                                     retryable=msg.retryable))

    def on_grant_expired(self, inbound: Inbound) -> None:
        msg: GrantExpired = inbound.msg
        job = self.jobs.pop(msg.req_id, None)
        if job is not None:
            self._drop(job)
            self.send(job.router, Reject(msg.req_id, "decode grant expired before the KV "
                                         "transfer finished", 0.0, origin=job.decode_id))

    def on_transfer_result(self, inbound: Inbound) -> None:
        msg: TransferResult = inbound.msg
        if not msg.ok:
            self.counters["transfer_failures"] += 1
            log.warning("transfer of %s refused by decode: %s", msg.req_id, msg.reason,
                        extra={"request_id": msg.req_id})

    def on_abort(self, inbound: Inbound) -> None:
        msg: Abort = inbound.msg
        self.submits.add(msg.req_id)        # a Submit it overtook must not start the request
        job = self.jobs.pop(msg.req_id, None)
        if job is None:
            return
        self._drop(job)
        self.send(job.decode_address, Abort(msg.req_id, msg.reason))

    def on_peer_connection(self, address: str, connected: bool) -> None:
        """A decode's connection dropped: the KV queued for it and the grants asked of it are
        lost with it, so shipments to it are released now and jobs waiting for its grant go
        back to the router at once (not at the grant and transfer timeouts)."""
        if connected:
            self.lost_peers.discard(address)
            return
        self.lost_peers.add(address)
        if self.sending:
            self._release_sent()
        for job in [j for j in self.jobs.values()
                    if j.grant is None and j.decode_address == address]:
            self.counters["grant_waits_lost"] += 1
            self._give_up(job, "decode connection lost", "decode connection lost",
                          job.decode_id)

    def tick(self) -> None:
        if self.sending:
            self._release_sent()
        now = time.monotonic()
        late = [j for j in self.jobs.values() if j.grant is None and now >= j.deadline]
        for job in late:
            self.counters["grant_timeouts"] += 1
            self._give_up(job, "grant wait timed out", "decode did not answer in time",
                          job.decode_id)

    def _give_up(self, job: PrefillJob, why: str, why_router: str, origin: str) -> None:
        """End a job here: the decode gives back any grant, the router retries elsewhere
        (blaming ``origin``)."""
        del self.jobs[job.req.request_id]
        self._drop(job)
        self.send(job.decode_address, Abort(job.req.request_id, why))
        self.send(job.router, Reject(job.req.request_id, why_router, 0.0, origin=origin))

    def _drop(self, job: PrefillJob) -> None:
        """Forget a job's engine state: abort it if it still runs, free its held KV."""
        self.engine.abort_request(job.req.request_id)
        owner = kv_owner(job.req)
        if owner in self.engine.block_manager.owners():
            self.engine.block_manager.free(owner)

    def load(self) -> dict:
        return {**super().load(), "jobs": len(self.jobs)}

    # ------------------------------------------------------------------ graceful drain
    def role_drained(self) -> bool:
        self._release_sent()
        return not self.jobs and not self.sending    # KV still on the wire would be lost

    def drain_step(self) -> bool:
        """Jobs already here finish (compute, grant, ship) until the drain timeout; then the
        rest go back to the router, which retries them elsewhere (no token was streamed)."""
        done = super().drain_step()
        if done:
            for job in list(self.jobs.values()):
                self._give_up(job, "prefill drained", "prefill is draining", self.instance_id)
        return done
