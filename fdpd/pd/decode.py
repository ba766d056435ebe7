"""The decode role: admit requests only through grants, receive their KV, decode, stream tokens.

AllocRequest -> the ledger grants blocks (or queues the request, then rejects it past its
deadline). KVBlocks frames are copied once into the granted blocks, which no request points at
yet (LOADING). PrefillDone commits: only if every expected block arrived does the grant become a
running request; otherwise the grant is released and the router is told, so no partial KV is
ever decoded from. Leases expire on their own.
"""

from __future__ import annotations

import logging

from fdpd.engine.block_manager import compute_block_hashes
from fdpd.engine.engine import RequestError, StepOutput
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
    Tokens,
    TransferResult,
)
from fdpd.pd.service import InstanceService
from fdpd.pd.transport import Inbound

log = logging.getLogger(__name__)


class DecodeService(InstanceService):
    role = "decode"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ledger = ReservationLedger(self.engine.scheduler, horizon=self.pd.reserve_tokens,
                                        grant_ttl=self.pd.grant_ttl)
        self.handlers.update({AllocRequest: self.on_alloc, KVBlocks: self.on_kv,
                              PrefillDone: self.on_prefill_done})
        self.routes: dict[str, str] = {}           # running req_id -> router inbox
        self.peers: dict[str, str] = {}            # prefill instance id -> its inbox
        self.counters.update({"kv_bytes_received": 0, "kv_blocks_received": 0,
                              "kv_dropped": 0, "transfer_failures": 0})

    # ------------------------------------------------------------------ admission
    def on_alloc(self, inbound: Inbound) -> None:
        msg: AllocRequest = inbound.msg
        self.peers[inbound.envelope.src] = msg.reply_to
        try:
            # Validate the request as this engine will run it, before promising anything.
            self.build_request(msg)
        except (RequestError, ValueError) as e:
            self.reject(msg.reply_to, msg.req_id, str(e), retryable=False)
            return
        try:
            hashes = compute_block_hashes(self.engine.block_manager.hash_seed,
                                          msg.prompt_token_ids, self.engine.config.block_size)
            grant = self.ledger.offer(msg, inbound.envelope.src, hashes)
        except (RequestError, ValueError) as e:
            self.reject(msg.reply_to, msg.req_id, str(e), retry_after=1.0)
            return
        if grant is not None:
            self._send_grant(grant)

    def _send_grant(self, g: GrantRecord) -> None:
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
                        g.block_ids)
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
        try:
            nbytes = kv_transfer.receive_kv_blocks(self.engine.runner.kv_cache, msg,
                                                   inbound.frames, blocks)
        except kv_transfer.KVFrameError as e:
            self._fail_transfer(self.ledger.grants[msg.grant_id], str(e))
            return
        self.counters["kv_bytes_received"] += nbytes
        self.counters["kv_blocks_received"] += len(blocks)

    def on_prefill_done(self, inbound: Inbound) -> None:
        msg: PrefillDone = inbound.msg
        g = self.ledger.grants.get(msg.grant_id)
        if g is None or g.req_id != msg.req_id:
            self.counters["kv_dropped"] += 1
            address = self.peers.get(inbound.envelope.src)
            if address:
                self.send(address, TransferResult(msg.grant_id, msg.req_id, False,
                                                  "unknown or expired grant"))
            return
        router = g.msg.router_reply_to
        if msg.finished:
            # The first token already ended the request: no decoding needed here.
            self.ledger.release(g.grant_id)
            self.send(router, Tokens(msg.req_id, [msg.first_token],
                                     None if msg.first_logprob is None else [msg.first_logprob],
                                     True, msg.finish_reason, msg.stop_reason,
                                     g.prompt_len, msg.num_cached_tokens))
            self.send(g.reply_to, TransferResult(g.grant_id, g.req_id, True))
            return
        try:
            req = self.build_request(g.msg)
            self.ledger.commit(g.grant_id, msg.num_kv_blocks)
        except (RequestError, ValueError, KeyError) as e:
            self._fail_transfer(g, str(e))
            return
        req.append_output(msg.first_token, msg.first_logprob
                          if req.sampling_params.logprobs is not None else None)
        req.num_cached_tokens = msg.num_cached_tokens
        self.engine.scheduler.adopt(req, g.owner)
        self.routes[req.request_id] = router
        self.send(g.reply_to, TransferResult(g.grant_id, g.req_id, True))
        logprobs = req.output_logprobs[:1] or None
        self.send(router, Tokens(req.request_id, [msg.first_token], logprobs, False, None, None,
                                 req.num_prompt_tokens, req.num_cached_tokens))

    def _fail_transfer(self, g: GrantRecord, reason: str) -> None:
        log.warning("transfer for %s failed: %s", g.req_id, reason)
        self.counters["transfer_failures"] += 1
        self.ledger.release(g.grant_id)
        self.send(g.reply_to, TransferResult(g.grant_id, g.req_id, False, reason))
        self.send(g.msg.router_reply_to, Error("transfer_failed", reason, g.req_id))

    # ------------------------------------------------------------------ decoding
    def on_step(self, outputs: list[StepOutput]) -> None:
        for out in outputs:
            route = self.routes.get(out.request_id)
            if route is None:
                continue
            self.send(route, self.tokens_message(out))
            if out.finished:
                del self.routes[out.request_id]

    def on_abort(self, inbound: Inbound) -> None:
        msg: Abort = inbound.msg
        self.engine.abort_request(msg.req_id)
        self.routes.pop(msg.req_id, None)
        g = self.ledger.grant_for(msg.req_id)
        if g is not None:
            self.ledger.release(g.grant_id)
        self.ledger.cancel_waiting(msg.req_id)

    def load(self) -> dict:
        return {**super().load(), "ledger": self.ledger.snapshot()}
