"""The decode role: admit requests only through grants, receive their KV, decode, stream tokens.

AllocRequest -> the ledger grants blocks (or queues the request, then rejects it past its
deadline). KVBlocks frames are copied once into the granted blocks, which no request points at
yet (LOADING). PrefillDone commits: only once every expected block arrived does the grant become
a running request (a PrefillDone that overtook some of its KV waits for it, within the lease);
if the sender's count disagrees, the grant is released and the router is told, so no partial KV
is ever decoded from. Leases expire on their own. A duplicated message (AllocRequest,
PrefillDone, KV) never acts twice.
"""

from __future__ import annotations

import logging
import math
import time

from fdpd.engine.block_manager import compute_block_hashes
from fdpd.engine.engine import RequestError, StepOutput
from fdpd.faults import fault_point
from fdpd.pd import kv_transfer
from fdpd.pd.ledger import GrantRecord, ReservationLedger
from fdpd.pd.protocol import (
    Abort,
    AllocRequest,
    Error,
    Grant,
    GrantExpired,
    KVBlocks,
    PrefillDone,
    Reject,
    Tokens,
    TransferResult,
)
from fdpd.pd.service import InstanceService, RecentIds, Stream
from fdpd.pd.transport import Inbound

log = logging.getLogger(__name__)


class DecodeService(InstanceService):
    role = "decode"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ledger = ReservationLedger(self.engine.scheduler, horizon=self.pd.reserve_tokens,
                                        grant_ttl=self.pd.grant_ttl,
                                        max_pending_allocs=self.pd.max_queued_requests)
        self.handlers.update({AllocRequest: self.on_alloc, KVBlocks: self.on_kv,
                              PrefillDone: self.on_prefill_done})
        self.peers: dict[str, str] = {}            # prefill instance id -> its inbox
        # Duplicates (a message delivered twice, maybe late) must not act twice: every
        # AllocRequest taken (a second grant would leak, its Abort would end the request) and
        # every transfer completed.
        self.allocs, self.transfers_done = RecentIds(), RecentIds()
        self.counters.update({"kv_bytes_received": 0, "kv_blocks_received": 0,
                              "kv_dropped": 0, "transfer_failures": 0, "alloc_refused": 0,
                              "duplicates": 0})

    # ------------------------------------------------------------------ admission
    def on_alloc(self, inbound: Inbound) -> None:
        msg: AllocRequest = inbound.msg
        self.peers[inbound.envelope.src] = msg.reply_to
        if not self.allocs.add(msg.req_id):
            self.counters["duplicates"] += 1        # its first copy got the one reply
            return
        if self.draining:
            self.reject(msg.reply_to, msg.req_id, "decode is draining")
            return
        try:
            # Validate the request as this engine will run it, before promising anything.
            self.build_request(msg)
        except (RequestError, ValueError) as e:
            self.counters["alloc_refused"] += 1
            self.reject(msg.reply_to, msg.req_id, str(e), retryable=False)
            return
        try:
            hashes = compute_block_hashes(self.engine.block_manager.hash_seed,
                                          msg.prompt_token_ids, self.engine.config.block_size)
            grant = self.ledger.offer(msg, inbound.envelope.src, hashes)
        except (RequestError, ValueError) as e:
            self.counters["alloc_refused"] += 1
            self.reject(msg.reply_to, msg.req_id, str(e), retry_after=1.0)
            return
        if grant is not None:
            self._send_grant(grant)

    def _send_grant(self, g: GrantRecord) -> None:
        self.metrics.grant_wait.observe(max(0.0, g.granted_at - g.requested_at))
        log.debug("grant %s for %s: %d blocks (%d cached)", g.grant_id, g.req_id,
                  len(g.block_ids), g.cached_blocks, extra={"request_id": g.req_id})
        self.send(g.reply_to, Grant(g.req_id, g.grant_id, g.block_ids, g.cached_blocks,
                                    self.ledger.grant_ttl))

    def tick(self) -> None:
        granted, timed_out = self.ledger.retry_waiting()
        for g in granted:
            self._send_grant(g)
        for p in timed_out:
            self.reject(p.msg.reply_to, p.msg.req_id, "decode has no room for this request "
                        "(its running requests' reservations come first)", retry_after=1.0)
        for g in self.ledger.expire():
            log.warning("grant %s for %s expired; blocks %s freed", g.grant_id, g.req_id,
                        g.block_ids, extra={"request_id": g.req_id})
            expired = GrantExpired(g.grant_id, g.req_id)
            self.send(g.reply_to, expired)
            self.send(g.msg.router_reply_to, expired)

    # ------------------------------------------------------------------ transfer
    def on_kv(self, inbound: Inbound) -> None:
        msg: KVBlocks = inbound.msg
        blocks = self.ledger.receive(msg.grant_id, msg.first_block, msg.num_blocks)
        if blocks is None:
            self.counters["kv_dropped"] += 1       # stale/unknown grant: never written
            return
        g = self.ledger.grants[msg.grant_id]
        try:
            nbytes = kv_transfer.receive_kv_blocks(self.engine.runner.kv_cache, msg,
                                                   inbound.frames, blocks)
        except kv_transfer.KVFrameError as e:
            self._fail_transfer(g, str(e))
            return
        self.counters["kv_bytes_received"] += nbytes
        self.counters["kv_blocks_received"] += len(blocks)
        if g.early_done is not None and g.kv_complete:
            self._complete_transfer(g, *g.early_done)

    def on_prefill_done(self, inbound: Inbound) -> None:
        msg: PrefillDone = inbound.msg
        arrived = inbound.received_at or time.monotonic()
        g = self.ledger.grants.get(msg.grant_id)
        if g is None or g.req_id != msg.req_id:
            if f"{msg.grant_id}/{msg.req_id}" in self.transfers_done:
                self.counters["duplicates"] += 1    # answered already
                return
            self.counters["kv_dropped"] += 1
            address = self.peers.get(inbound.envelope.src)
            if address:
                self.send(address, TransferResult(msg.grant_id, msg.req_id, False,
                                                  "unknown or expired grant"))
            return
        if g.early_done is not None:
            self.counters["duplicates"] += 1
            return
        if not msg.finished and msg.num_kv_blocks == g.num_expected and not g.kv_complete:
            # Some KV is still on its way (reordered behind PrefillDone): commit when the last
            # block is in; the lease bounds the wait.
            g.early_done = (msg, arrived)
            return
        self._complete_transfer(g, msg, arrived)

    def _complete_transfer(self, g: GrantRecord, msg: PrefillDone, arrived: float) -> None:
        """PrefillDone for live grant ``g``, with all its KV in (or the transfer fails): start
        decoding, or end a request the first token finished."""
        self.transfers_done.add(f"{g.grant_id}/{g.req_id}")
        vocab = self.engine.model_config.vocab_size
        if not 0 <= msg.first_token < vocab or not 0 <= msg.num_cached_tokens <= g.prompt_len:
            # Checked here, not by the engine: a token outside the vocabulary would fail a later
            # step (the embedding lookup) for every running request, and kill the loop.
            self._fail_transfer(g, f"PrefillDone out of range: first_token {msg.first_token} "
                                f"(vocabulary [0, {vocab})), num_cached_tokens "
                                f"{msg.num_cached_tokens} (prompt {g.prompt_len})")
            return
        fault_point("decode.kv_received")
        router = g.msg.router_reply_to
        upstream = msg.timeline if isinstance(msg.timeline, dict) else {}
        kv_transfer = self._transfer_seconds(g, upstream, arrived)
        if msg.finished:
            # The first token already ended the request: no decoding needed here.
            self.ledger.release(g.grant_id)
            timeline = self._timeline(upstream, kv_transfer, {})
            self.send(router, Tokens(msg.req_id, [msg.first_token],
                                     None if msg.first_logprob is None else [msg.first_logprob],
                                     True, msg.finish_reason, msg.stop_reason,
                                     g.prompt_len - g.msg.num_output_tokens,
                                     msg.num_cached_tokens, timeline, msg.token_logprobs,
                                     msg.prompt_logprobs,
                                     position=g.msg.num_output_tokens))
            self.send(g.reply_to, TransferResult(g.grant_id, g.req_id, True))
            return
        try:
            req = self.build_request(g.msg)
            req.prompt_logprobs = None            # the prefill computed (and sent) them
            self.ledger.commit(g.grant_id, msg.num_kv_blocks)
        except (RequestError, ValueError, KeyError) as e:
            self._fail_transfer(g, str(e))
            return
        req.append_output(msg.first_token, msg.first_logprob
                          if req.sampling_params.logprobs is not None else None)
        req.num_cached_tokens = msg.num_cached_tokens
        req.arrival_time = arrived            # decode_queue: from PrefillDone off the socket
        self.engine.scheduler.adopt(req, g.owner)
        # The first token (P's) goes out now: the next one's gap counts from here.
        self.streams[req.request_id] = Stream(router, req, g.requested_at, time.monotonic(),
                                              upstream=upstream, kv_transfer=kv_transfer)
        self.send(g.reply_to, TransferResult(g.grant_id, g.req_id, True))
        log.debug("adopted %s: KV of %d blocks in, decoding", req.request_id,
                  msg.num_kv_blocks, extra={"request_id": req.request_id})
        logprobs = req.output_logprobs[:1] or None
        # The prefill has usually streamed this token already (first token early); sent again
        # with its position, so the router drops whichever copy comes second and a lost early
        # copy costs nothing.
        self.send(router, Tokens(req.request_id, [msg.first_token], logprobs, False, None, None,
                                 req.num_prompt_tokens, req.num_cached_tokens, None,
                                 msg.token_logprobs, msg.prompt_logprobs,
                                 position=req.num_output_tokens - 1))

    def _transfer_seconds(self, g: GrantRecord, upstream: dict, arrived: float) -> float:
        """One-way KV transfer time without comparing clocks: the prefill's send time plus
        half of what remains of our round trip (grant sent -> PrefillDone off our socket)
        once the prefill's share of it (grant off its socket -> PrefillDone sent) is taken
        away: the two messages' times in flight, assumed alike."""
        kv_send, hold = upstream.get("kv_send"), upstream.get("grant_hold")
        if not _is_seconds(kv_send) or not _is_seconds(hold):
            return 0.0
        seconds = kv_send + max(0.0, arrived - g.created_at - hold) / 2
        self.metrics.kv_transfer.observe(seconds)
        return seconds

    def _fail_transfer(self, g: GrantRecord, reason: str) -> None:
        log.warning("transfer for %s failed: %s", g.req_id, reason,
                    extra={"request_id": g.req_id})
        self.counters["transfer_failures"] += 1
        self.ledger.release(g.grant_id)
        self.send(g.reply_to, TransferResult(g.grant_id, g.req_id, False, reason))
        self.send(g.msg.router_reply_to, Error("transfer_failed", reason, g.req_id))

    # ------------------------------------------------------------------ decoding
    def on_step(self, outputs: list[StepOutput]) -> None:
        fault_point("decode.step")
        self.stream_outputs(outputs)
        if self.engine.config.kv_store_checkpoint:
            checkpoint = getattr(self.engine.scheduler.preemption, "checkpoint", None)
            if checkpoint is not None:
                checkpoint(self.engine.scheduler.running, self.engine.block_manager)

    def finish_timeline(self, s: Stream, now: float) -> dict:
        req = s.req
        scheduled = req.scheduled_at or now
        own = {"decode_queue": max(0.0, scheduled - req.arrival_time),
               "decode": max(0.0, now - scheduled - req.paused_seconds()),
               **self.pause_phases(req)}
        self.metrics.observe_phases(own)
        return self._timeline(s.upstream, s.kv_transfer or 0.0, own, req.num_preemptions)

    def _timeline(self, upstream: dict | None, kv_transfer: float, own: dict,
                  num_preemptions: int = 0) -> dict:
        """The request's whole timeline for the router: the prefill's phases, the transfer,
        ours (preemptions on both sides add up). ``kv_send`` is the measured part of
        ``kv_transfer``: the router may shorten the estimated rest, never that."""
        self.metrics.phase.labels(phase="kv_transfer").observe(kv_transfer)
        phases = {**_phases(upstream), "kv_transfer": kv_transfer}
        for name, seconds in own.items():
            phases[name] = phases.get(name, 0.0) + seconds
        kv_send = (upstream or {}).get("kv_send")
        prefill = (upstream or {}).get("prefill_instance")     # the peer's word: a name or None
        return {"phases": phases, "decode_instance": self.instance_id,
                "prefill_instance": prefill if isinstance(prefill, str) else None,
                "kv_send": min(kv_send, kv_transfer) if _is_seconds(kv_send)
                else 0.0, "num_preemptions": num_preemptions}

    def on_abort(self, inbound: Inbound) -> None:
        msg: Abort = inbound.msg
        self.allocs.add(msg.req_id)         # an AllocRequest it overtook must get no grant
        self.engine.abort_request(msg.req_id)
        self.forget_stream(msg.req_id)
        g = self.ledger.grant_for(msg.req_id)
        if g is not None:
            self.ledger.release(g.grant_id)
        self.ledger.cancel_waiting(msg.req_id)

    def load(self) -> dict:
        return {**super().load(), "ledger": self.ledger.snapshot()}

    # ------------------------------------------------------------------ graceful drain
    def start_drain(self, timeout: float) -> None:
        """No new grants: queued AllocRequests are refused now (the router retries them on
        another decode); grants already given may still complete and are then migrated like
        every running request."""
        super().start_drain(timeout)
        for p in self.ledger.refuse_waiting():
            self.reject(p.msg.reply_to, p.msg.req_id, "decode is draining")

    def role_drained(self) -> bool:
        return not self.ledger.grants

    def drain_step(self) -> bool:
        done = super().drain_step()
        if done:
            # Out of time with transfers still open: end their leases now. The prefill drops
            # the job; the router retries the request elsewhere, blaming this decode (a
            # GrantExpired would blame the prefill, which did nothing wrong).
            for gid in list(self.ledger.grants):
                g = self.ledger.release(gid, expired=True)
                if g is not None:
                    self.send(g.reply_to, GrantExpired(g.grant_id, g.req_id))
                    self.send(g.msg.router_reply_to, Reject(
                        g.req_id, "decode drained before the KV transfer finished",
                        origin=self.instance_id))
        return done


def _phases(upstream: dict | None) -> dict:
    phases = (upstream or {}).get("phases")
    if not isinstance(phases, dict):
        return {}
    return {k: float(v) for k, v in phases.items()
            if isinstance(k, str) and _is_seconds(v)}


def _is_seconds(value: object) -> bool:
    """A duration from the prefill's timeline that may enter our histograms and the router's
    timeline (which a NaN or an infinity would poison for good)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value >= 0)
