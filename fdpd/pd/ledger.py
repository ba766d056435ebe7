"""The decode-side reservation ledger (DESIGN 4): grants, leases and growth reservations.

A decode instance admits work only through grants, and never grants blocks that its running
requests will need soon. With reserve horizon ``H`` tokens:

- a running (or preempted, waiting) request *i* reserves the blocks it still needs to grow by
  ``min(remaining_i, H)`` tokens: ``r_i = max(0, blocks_for(n_i + min(rem_i, H)) - held_i)``;
- a pending grant *g* reserves the same for the request it will become:
  ``p_g = blocks_for(prompt + 1 + min(max_tokens - 1, H)) - granted_g``;
- a new request needs ``need = blocks_for(prompt + 1 + min(max_tokens - 1, H))`` minus the
  cached prefix blocks it reuses (plus those of them that must be revived from the free queue);
- it is granted iff ``free - sum(r_i) - sum(p_g) >= need``. Otherwise it waits in FIFO order (a
  bounded time) and is then rejected; at most ``max_pending_allocs`` wait (``QueueFull`` past
  that, at once: a burst is refused, not queued without bound).

A grant owns ``blocks_for(prompt + 1)`` blocks in the BlockManager under the owner id
``grant:<id>``: those blocks are LOADING (no request points at them, so the scheduler cannot
read them) until ``commit`` hands them to the request. A grant is a lease: past its deadline it
is expired, its blocks freed, and late KV for it is dropped (the grant id is unknown).
"""

from __future__ import annotations

import enum
import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from fdpd.engine.block_manager import BlockManager
from fdpd.engine.scheduler import Scheduler
from fdpd.pd.protocol import AllocRequest


class GrantState(enum.Enum):
    PENDING = "pending"        # blocks granted, no KV yet
    LOADING = "loading"        # KV frames arriving
    COMMITTED = "committed"
    EXPIRED = "expired"
    RELEASED = "released"


@dataclass
class GrantRecord:
    grant_id: str
    req_id: str
    prefill_id: str
    reply_to: str
    prompt_len: int
    max_tokens: int
    block_ids: list[int]
    cached_blocks: int
    num_kv_blocks: int                                   # blocks holding prompt KV
    expires_at: float
    msg: AllocRequest | None = None
    state: GrantState = GrantState.PENDING
    received: set[int] = field(default_factory=set)     # grant-relative block indices
    created_at: float = field(default_factory=time.monotonic)
    requested_at: float = 0.0          # ledger clock: the AllocRequest arrived
    granted_at: float = 0.0            # ledger clock: granted (after waiting, if it had to)
    # PrefillDone (and its arrival time) that came before all of its KV, reordered on the way:
    # held until the last block is in, or the lease ends.
    early_done: tuple | None = None

    @property
    def owner(self) -> str:
        return f"grant:{self.grant_id}"

    @property
    def kv_complete(self) -> bool:
        """Every expected block arrived (a block sent twice counts once)."""
        return len(self.received) == self.num_expected

    @property
    def num_expected(self) -> int:
        """Blocks P must send: the prompt's blocks past the ones D already had cached. (The
        grant holds one more block when the first generated token starts a new block.)"""
        return self.num_kv_blocks - self.cached_blocks


@dataclass
class PendingAlloc:
    msg: AllocRequest
    src: str
    block_hashes: list[bytes]
    deadline: float
    enqueued_at: float


class QueueFull(ValueError):
    """``max_pending_allocs`` requests already wait for room: refuse this one now."""


class LedgerError(RuntimeError):
    """The ledger's books do not balance. Always a bug."""


class ReservationLedger:
    def __init__(self, scheduler: Scheduler, *, horizon: int, grant_ttl: float,
                 max_pending_allocs: int = 256, clock: Callable[[], float] = time.monotonic):
        self.scheduler = scheduler
        self.bm: BlockManager = scheduler.bm
        self.horizon = horizon
        self.grant_ttl = grant_ttl
        self.max_pending_allocs = max_pending_allocs
        self.clock = clock
        self.grants: dict[str, GrantRecord] = {}
        self.by_req: dict[str, str] = {}                   # req_id -> grant_id
        self.waiting_allocs: deque[PendingAlloc] = deque()
        self._ids = itertools.count()
        self.counters = {"granted": 0, "deferred": 0, "rejected": 0, "expired": 0,
                         "committed": 0, "released": 0, "stale_kv": 0,
                         "refused_queue_full": 0}

    # ------------------------------------------------------------------ arithmetic
    def _horizon_blocks(self, num_tokens: int, remaining: int) -> int:
        return self.bm.blocks_for(num_tokens + min(max(remaining, 0), self.horizon))

    def reserved_blocks(self) -> int:
        """Growth headroom of every request this instance already serves."""
        total = 0
        for req in self.scheduler.requests.values():
            held = len(self.bm.owned(req.request_id))
            remaining = req.max_tokens - req.num_output_tokens
            total += max(0, self._horizon_blocks(req.num_tokens, remaining) - held)
        return total

    def pending_blocks(self) -> int:
        """Growth headroom promised to pending grants (their blocks are already held)."""
        return sum(max(0, self._horizon_blocks(g.prompt_len + 1, g.max_tokens - 1)
                       - len(g.block_ids)) for g in self._live())

    def needed_blocks(self, prompt_len: int, max_tokens: int, cached: list[int]) -> int:
        revived = sum(1 for b in cached if self.bm.ref_counts[b] == 0)
        return (self._horizon_blocks(prompt_len + 1, max_tokens - 1) - len(cached) + revived)

    def headroom(self) -> int:
        return self.bm.num_free_blocks - self.reserved_blocks() - self.pending_blocks()

    def _live(self):
        return (g for g in self.grants.values()
                if g.state in (GrantState.PENDING, GrantState.LOADING))

    def num_seats_taken(self) -> int:
        return len(self.scheduler.requests) + sum(1 for _ in self._live())

    # ------------------------------------------------------------------ admission
    def offer(self, msg: AllocRequest, src: str, block_hashes: list[bytes]
              ) -> GrantRecord | None:
        """Try to grant ``msg`` now; if it cannot be granted now, queue it (FIFO) and return
        None. Raises ValueError when it can never be granted on this instance, QueueFull (a
        ValueError) when it cannot be granted now and the waiting queue is full."""
        total = self.bm.blocks_for(msg.prompt_len + msg.max_tokens)
        if total > self.bm.num_blocks:
            raise ValueError(f"needs {total} blocks, the decode pool has {self.bm.num_blocks}")
        if msg.req_id in self.by_req:
            raise ValueError(f"request {msg.req_id} already holds a grant")
        now = self.clock()
        if not self.waiting_allocs:
            grant = self._try_grant(msg, src, block_hashes, now)
            if grant is not None:
                return grant
        if len(self.waiting_allocs) >= self.max_pending_allocs:
            self.counters["refused_queue_full"] += 1
            raise QueueFull(f"decode queue is full ({len(self.waiting_allocs)} requests wait "
                            "for room, --max-queued-requests)")
        self.waiting_allocs.append(PendingAlloc(msg, src, block_hashes, now + msg.timeout_s,
                                                now))
        self.counters["deferred"] += 1
        return None

    def retry_waiting(self) -> tuple[list[GrantRecord], list[PendingAlloc]]:
        """Grant queued requests in order while headroom lasts; return (granted, timed out)."""
        granted, timed_out = [], []
        now = self.clock()
        while self.waiting_allocs:
            head = self.waiting_allocs[0]
            if now >= head.deadline:
                timed_out.append(self.waiting_allocs.popleft())
                self.counters["rejected"] += 1
                continue
            grant = self._try_grant(head.msg, head.src, head.block_hashes, now)
            if grant is None:
                break
            self.waiting_allocs.popleft()
            grant.requested_at = head.enqueued_at
            granted.append(grant)
        return granted, timed_out

    def refuse_waiting(self) -> list[PendingAlloc]:
        """Take every queued request out (a draining decode refuses them all)."""
        refused, self.waiting_allocs = list(self.waiting_allocs), deque()
        self.counters["rejected"] += len(refused)
        return refused

    def cancel_waiting(self, req_id: str) -> bool:
        for p in self.waiting_allocs:
            if p.msg.req_id == req_id:
                self.waiting_allocs.remove(p)           # rare (aborts), queue is bounded
                return True
        return False

    def _try_grant(self, msg: AllocRequest, src: str, block_hashes: list[bytes],
                   now: float) -> GrantRecord | None:
        if self.num_seats_taken() >= self.scheduler.max_num_seqs:
            return None
        cached = self.bm.match_prefix(block_hashes, msg.prompt_len, record=False)
        if self.headroom() < self.needed_blocks(msg.prompt_len, msg.max_tokens, cached):
            return None
        grant_id = f"{next(self._ids)}"
        grant = GrantRecord(grant_id, msg.req_id, src, msg.reply_to, msg.prompt_len,
                            msg.max_tokens, [], len(cached),
                            self.bm.blocks_for(msg.prompt_len), now + self.grant_ttl, msg)
        if not self.bm.allocate(grant.owner, msg.prompt_len + 1, cached):
            raise LedgerError("headroom said yes but the pool said no")
        grant.block_ids = list(self.bm.owned(grant.owner))
        grant.requested_at = grant.granted_at = now
        self.bm.record_query(msg.prompt_len, len(cached))
        self.grants[grant_id] = grant
        self.by_req[msg.req_id] = grant_id
        self.counters["granted"] += 1
        return grant

    # ------------------------------------------------------------------ transfer
    def receive(self, grant_id: str, first: int, count: int) -> list[int] | None:
        """KV for grant-relative blocks ``first..first+count-1`` arrived: the block ids to
        write it into, or None if the grant is unknown/expired or the range is invalid (the
        KV is dropped and counted, never written). Renews the grant's lease."""
        g = self.grants.get(grant_id)
        if (g is None or g.state not in (GrantState.PENDING, GrantState.LOADING)
                or first < g.cached_blocks or count < 1 or first + count > g.num_kv_blocks):
            self.counters["stale_kv"] += 1
            return None
        g.state = GrantState.LOADING
        g.received.update(range(first, first + count))
        # KV arriving is the prefill's proof of progress: the lease runs from the last of it.
        # With chunks streamed during compute, a long prompt keeps its grant while it computes,
        # and a prefill that stops (killed, frozen) still loses it one TTL after its last chunk.
        g.expires_at = max(g.expires_at, self.clock() + self.grant_ttl)
        return g.block_ids[first:first + count]

    def commit(self, grant_id: str, num_blocks_sent: int) -> GrantRecord:
        """All KV arrived: the grant's blocks now belong to the request (caller adopts it)."""
        g = self.grants.get(grant_id)
        if g is None or g.state not in (GrantState.PENDING, GrantState.LOADING):
            raise KeyError(f"grant {grant_id} is not live")
        if num_blocks_sent != g.num_expected or len(g.received) != g.num_expected:
            raise ValueError(f"grant {grant_id}: got {len(g.received)} of {g.num_expected} "
                             f"blocks (sender says {num_blocks_sent})")
        g.state = GrantState.COMMITTED
        self._forget(g)
        self.counters["committed"] += 1
        return g

    def release(self, grant_id: str, expired: bool = False) -> GrantRecord | None:
        """Free a live grant's blocks (abort, failed transfer, or lease expiry)."""
        g = self.grants.get(grant_id)
        if g is None or g.state not in (GrantState.PENDING, GrantState.LOADING):
            return None
        self.bm.free(g.owner)
        g.state = GrantState.EXPIRED if expired else GrantState.RELEASED
        self._forget(g)
        self.counters["expired" if expired else "released"] += 1
        return g

    def expire(self) -> list[GrantRecord]:
        now = self.clock()
        late = [g.grant_id for g in self._live() if now >= g.expires_at]
        return [g for gid in late if (g := self.release(gid, expired=True)) is not None]

    def grant_for(self, req_id: str) -> GrantRecord | None:
        gid = self.by_req.get(req_id)
        return self.grants.get(gid) if gid is not None else None

    def _forget(self, g: GrantRecord) -> None:
        del self.grants[g.grant_id]
        self.by_req.pop(g.req_id, None)

    # ------------------------------------------------------------------ invariants
    def check(self) -> None:
        """Raise unless every used block belongs to a live grant, a running or loading
        request, or a KV-store write-back in flight."""
        self.scheduler.check_integrity(other_owners={g.owner for g in self._live()})
        held = {o for o in self.bm.owners() if o.startswith("grant:")}
        live = {g.owner for g in self._live()}
        if held != live:
            raise LedgerError(f"grant owners {sorted(held)} != live grants {sorted(live)}")

    def is_quiescent(self) -> bool:
        return not self.grants and not self.waiting_allocs and self.reserved_blocks() == 0

    def snapshot(self) -> dict:
        return {
            "total_blocks": self.bm.num_blocks,
            "free_blocks": self.bm.num_free_blocks,
            "used_blocks": self.bm.num_used_blocks,
            "reserved_blocks": self.reserved_blocks(),
            "pending_grants": sum(1 for _ in self._live()),
            "pending_grant_blocks": sum(len(g.block_ids) for g in self._live()),
            "pending_reserved_blocks": self.pending_blocks(),
            "waiting_allocs": len(self.waiting_allocs),
            "headroom_blocks": self.headroom(),
            "reserve_horizon": self.horizon,
            **{f"grants_{k}": v for k, v in self.counters.items()},
        }
