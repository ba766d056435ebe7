"""Continuous batching: which requests run this step, and how many tokens each.

One step has a token budget. Running requests go first, oldest first (a decode costs one token,
an unfinished prompt continues with a chunk), then waiting requests are admitted while budget,
seats and blocks last. Under the ``shortest`` policy (a prefill instance's default,
``fdpd.engine.queue_order``) the order is the fewest tokens left to compute first, aged by the
time since arrival, running and waiting requests alike: a short prompt that arrives while a
long one is mid-prefill runs in the next step instead of after the long one's remaining chunks
(and alone: no partial chunk of the long one joins a step that gives a first token), and the
long one still goes first once it has waited long enough.

When a running request cannot grow, the lowest-priority (then newest)
unscheduled running request is preempted: its blocks go back through the ``PreemptionHandler``
and it waits at the front of the queue to be recomputed (or, with a KV store, restored).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fdpd.engine.block_manager import BlockManager, compute_block_hashes
from fdpd.engine.preemption import PreemptionHandler, RecomputePreemption
from fdpd.engine.queue_order import WaitingQueue, shortest_first
from fdpd.engine.request import Request, RequestStatus


def _stamp_first_schedule(scheduled: list[tuple[Request, int]]) -> None:
    """Record when each request first ran (one clock read per step, only if needed)."""
    now = 0.0
    for req, _ in scheduled:
        if not req.scheduled_at:
            now = now or time.monotonic()
            req.scheduled_at = now


def _gives_first_token(out: SchedulerOutput) -> bool:
    """Whether a prompt chunk scheduled so far completes its prompt this step (its token is
    sampled at the end of the step; decodes, one token each, do not count). Under
    ``shortest`` nothing then joins the step that would only run a partial chunk: a step
    lasts as long as its biggest chunk, and a 384-token chunk of a long prompt beside a short
    one would hold the short prompt's first token back by as much again."""
    return any(n > 1 and r.num_computed_tokens + n >= r.num_tokens for r, n in out.scheduled)


def kv_owner(req: Request) -> str:
    """Block owner id under which a finished prefill's KV waits to be shipped."""
    return f"kv:{req.request_id}"


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Request, int]] = field(default_factory=list)  # (request, new tokens)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


class Scheduler:
    def __init__(self, block_manager: BlockManager, *, max_num_seqs: int,
                 max_num_batched_tokens: int, max_model_len: int, policy: str = "fcfs",
                 preemption: PreemptionHandler | None = None):
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.policy = policy
        self.preemption = preemption or RecomputePreemption()
        self.waiting = WaitingQueue(policy)
        self.running: list[Request] = []
        # Admitted requests whose blocks are being filled from the KV store: never scheduled
        # until the load is done (their blocks are LOADING).
        self.loading: dict[str, Request] = {}
        # Store lookups for queued requests: None while in flight, else (start, present).
        self._lookups: dict[str, tuple[int, int] | None] = {}
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self.num_restores = 0                 # store loads that restored at least one block
        self.num_restored_tokens = 0
        self.num_computed_prompt_tokens = 0   # prompt tokens run through the model
        self.num_recomputed_tokens = 0        # tokens computed again after a preemption

    # ---------------------------------------------------------------- admission and exit
    def add(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request_id {req.request_id!r} is already in the engine")
        self._hash(req)
        self.requests[req.request_id] = req
        self.waiting.push(req)

    def finish(self, req: Request, status: RequestStatus, keep_kv_as: str | None = None) -> None:
        """Move ``req`` to a terminal state and release its blocks, or, with ``keep_kv_as``,
        hand them to that owner (who must free them). Idempotent."""
        if req.is_finished:
            return
        was_waiting = req.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
        req.status = status
        self.requests.pop(req.request_id, None)
        self._lookups.pop(req.request_id, None)
        if req.request_id in self.loading:
            return                              # load_done frees its blocks
        if was_waiting:
            self.waiting.discard(req)
            return
        self.running.remove(req)                # O(max_num_seqs), once per request
        if keep_kv_as is not None:
            self.bm.transfer(req.request_id, keep_kv_as)
        elif status in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH):
            self.preemption.retire(req, self.bm)
        else:
            self.bm.free(req.request_id)

    def adopt(self, req: Request, owner: str) -> None:
        """Start running ``req`` whose KV for every token but the last is already in the
        blocks held by ``owner`` (a committed decode grant)."""
        if req.request_id in self.requests:
            raise ValueError(f"request_id {req.request_id!r} is already in the engine")
        self.bm.transfer(owner, req.request_id)
        self._hash(req)
        req.status = RequestStatus.RUNNING
        req.num_computed_tokens = req.num_tokens - 1
        self.bm.commit(req.request_id, req.block_hashes, req.num_computed_tokens)
        self.requests[req.request_id] = req
        self.running.append(req)

    def has_work(self) -> bool:
        """Requests to run, or KV-store work whose results the loop must collect (a finished
        write-back frees its pinned blocks only when collected)."""
        return (bool(self.running) or bool(self.loading) or len(self.waiting) > 0
                or self.preemption.pending() > 0)

    # ---------------------------------------------------------------- one step
    def schedule(self) -> SchedulerOutput:
        self.preemption.collect(self)
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        running: list[Request] = []
        queue = list(self.running)
        order = shortest_first if self.policy == "shortest" else None
        if order is not None:
            queue.sort(key=order)
        i = 0
        while i < len(queue) and budget > 0:
            req = queue[i]
            if order is not None and not out.preempted:
                # Waiting requests that come before this one in the order are admitted first.
                budget = self._admit_waiting(budget, running, out, len(queue) - i,
                                             before=order(req), order=order)
                if budget <= 0:
                    break
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            if order is not None and num_new < req.num_tokens - req.num_computed_tokens \
                    and _gives_first_token(out):
                running.append(req)      # a partial chunk would delay that token: next step
                i += 1
                continue
            stalled = False
            while not self.bm.grow(req.request_id, req.num_computed_tokens + num_new):
                short = (self.bm.blocks_for(req.num_computed_tokens + num_new)
                         - len(self.bm.owned(req.request_id)) - self.bm.num_free_blocks)
                if self.preemption.releasing_blocks() >= short:
                    stalled = True             # write-backs will free enough: just wait
                    break
                victim = self._pick_victim(queue, i)
                queue.remove(victim)
                self._preempt(victim, out)
                if victim is req:
                    break
            if stalled:
                running.append(req)
                i += 1
            elif req.status is RequestStatus.RUNNING:
                running.append(req)
                out.scheduled.append((req, num_new))
                budget -= num_new
                i += 1
        running.extend(queue[i:])
        self._admit_waiting(budget, running, out, 0, order=order)
        self.running = running
        _stamp_first_schedule(out.scheduled)
        return out

    def _admit_waiting(self, budget: int, running: list[Request], out: SchedulerOutput,
                       unscheduled: int, before: float | None = None,
                       order: Callable[[Request], float] | None = None) -> int:
        """Admit waiting requests while budget, seats (``unscheduled`` running requests not
        yet in ``running`` hold one each) and blocks last, and, with ``before``, while the
        head comes before that key in ``order``. Returns the budget left."""
        # Admitting new work in a step that had to preempt would only preempt again.
        while (not out.preempted and budget > 0
               and len(running) + unscheduled + len(self.loading) < self.max_num_seqs):
            req = self.waiting.peek()
            if req is None or (before is not None and order(req) >= before):
                break
            if order is not None and req.num_tokens > budget and _gives_first_token(out):
                break                  # it would run a partial chunk: see _gives_first_token
            admitted = self._admit(req, budget)
            if admitted is None:
                break                                  # head of line waits
            self.waiting.pop(req)
            if admitted:
                running.append(req)
                out.scheduled.append((req, admitted))
                budget -= admitted
        return budget

    def _admit(self, req: Request, budget: int) -> int | None:
        """Give ``req`` its blocks. Returns the tokens to run now (0: it is loading from the
        store), or None if it must wait (blocks, or a store lookup in flight)."""
        bs = self.bm.block_size
        # Prompt logprobs need every prompt row computed: no cache hit may skip one.
        skip_cache = req.needs_prompt_logits
        cached = ([] if skip_cache
                  else self.bm.match_prefix(req.block_hashes, req.num_tokens, record=False))
        load = 0
        if self.preemption.restores and not skip_cache:
            limit = min((req.num_tokens - 1) // bs, len(req.block_hashes))
            answer = self._lookups.get(req.request_id)
            if answer is not None and answer[0] > len(cached):
                del self._lookups[req.request_id]     # the local cache shrank since: ask again
            if req.request_id not in self._lookups and limit > len(cached):
                keys = req.block_hashes[len(cached):limit]
                if self.preemption.lookup(req.request_id, len(cached), keys):
                    self._lookups[req.request_id] = None
            answer = self._lookups.get(req.request_id, (0, 0))
            if answer is None:
                return None
            start, present = answer
            if start <= len(cached) < start + present:
                load = start + present - len(cached)
        num_cached = (len(cached) + load) * bs
        num_new = 0 if load else min(req.num_tokens - num_cached, budget)
        if not self.bm.allocate(req.request_id, num_cached + num_new, cached):
            return None
        self._lookups.pop(req.request_id, None)
        self.bm.record_query(req.num_tokens, len(cached))
        req.status = RequestStatus.RUNNING
        req.num_computed_tokens = len(cached) * bs
        if req.preempted_at:
            now = time.monotonic()
            req.pauses.append(("preempted", now - req.preempted_at))
            req.preempted_at = 0.0
        if load:
            blocks = self.bm.owned(req.request_id)[len(cached):]
            keys = req.block_hashes[len(cached):len(cached) + load]
            if self.preemption.load(req.request_id, blocks, keys):
                self.loading[req.request_id] = req
                req.restore_started_at = time.monotonic()
                return 0
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)   # recompute
            if not self.bm.grow(req.request_id, req.num_computed_tokens + num_new):
                self.bm.free(req.request_id)
                req.status = RequestStatus.WAITING
                return None
        if req.num_preemptions == 0:
            req.num_cached_tokens = req.num_computed_tokens
        return num_new

    def preempt(self, req_id: str) -> bool:
        """Preempt a running request now (operators, drains, benchmarks)."""
        req = self.requests.get(req_id)
        if req is None or req not in self.running:
            return False
        self.running.remove(req)
        self._preempt(req, SchedulerOutput())
        return True

    def lookup_done(self, req_id: str, start: int, present: int) -> None:
        if req_id in self._lookups:
            self._lookups[req_id] = (start, present)

    def load_done(self, req_id: str, loaded: int) -> None:
        """``loaded`` leading blocks of a loading request arrived intact; the rest of its
        tokens are recomputed."""
        req = self.loading.pop(req_id, None)
        if req is None:
            return
        if req.is_finished:                     # aborted while loading
            self.bm.free(req_id)
            return
        if req.restore_started_at:
            req.pauses.append(("restore", time.monotonic() - req.restore_started_at))
            req.restore_started_at = 0.0
        if loaded:
            self.num_restores += 1
        req.num_computed_tokens += loaded * self.bm.block_size
        self.num_restored_tokens += loaded * self.bm.block_size
        self.bm.commit(req_id, req.block_hashes, req.num_computed_tokens)
        if req.num_preemptions == 0:
            req.num_cached_tokens = req.num_computed_tokens
        self.running.append(req)

    def _pick_victim(self, queue: list[Request], current: int) -> Request:
        candidates = queue[current:]                 # requests not yet scheduled this step
        if self.policy == "priority":
            return max(candidates, key=lambda r: (r.priority, r.arrival_time))
        return candidates[-1]

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        self.preemption.preempt(req, self.bm)
        req.num_tokens_before_preemption = max(req.num_tokens_before_preemption,
                                               req.num_computed_tokens)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.preempted_at = time.monotonic()
        self.num_preemptions += 1
        self.waiting.push(req, front=True)
        out.preempted.append(req)

    # ---------------------------------------------------------------- after the forward
    def advance(self, req: Request, num_new: int) -> None:
        """``num_new`` more tokens of ``req`` now have KV in its blocks."""
        prompt_left = max(0, req.num_prompt_tokens - req.num_computed_tokens)
        self.num_computed_prompt_tokens += min(num_new, prompt_left)
        redo = req.num_tokens_before_preemption - req.num_computed_tokens
        self.num_recomputed_tokens += min(num_new, max(0, redo))
        req.num_computed_tokens += num_new
        self.bm.commit(req.request_id, req.block_hashes, req.num_computed_tokens)

    def append_token(self, req: Request, token_id: int, logprob: float | None) -> bool:
        """Record a sampled token; finish the request if it should stop. Returns finished."""
        req.append_output(token_id, logprob)
        self._hash(req)
        params = req.sampling_params
        status = None
        if not params.ignore_eos and token_id in req.eos_token_ids:
            status, req.stop_reason = RequestStatus.FINISHED_STOPPED, None
        elif token_id in params.stop_token_ids:
            status, req.stop_reason = RequestStatus.FINISHED_STOPPED, token_id
        elif req.num_output_tokens >= req.max_tokens or req.num_tokens >= self.max_model_len:
            status = RequestStatus.FINISHED_LENGTH
        if status is None:
            if not req.prefill_only:
                return False
            self.finish(req, RequestStatus.FINISHED_PREFILLED, keep_kv_as=kv_owner(req))
            return True
        self.finish(req, status)
        return True

    def _hash(self, req: Request) -> None:
        # Hashes also name blocks in the KV store, so they are kept even without prefix caching.
        compute_block_hashes(self.bm.hash_seed, req.all_token_ids, self.bm.block_size,
                             req.block_hashes)

    def check_integrity(self, other_owners: set[str] | frozenset[str] = frozenset()) -> None:
        """Raise unless every block owner is a running or loading request, a pending
        write-back, or one of ``other_owners`` (grants, prefill KV awaiting shipment)."""
        self.bm.check_integrity()
        owners = set(self.bm.owners())
        live = {r.request_id for r in self.running} | set(self.loading)
        # wb: a preempted request's write-back; ck: a running one's checkpoint write (both
        # pin blocks until the store acknowledges, see fdpd.kvstore.offload).
        stray = {o for o in owners - live - set(other_owners)
                 if not o.startswith(("wb:", "ck:"))}
        if stray or live - owners:
            raise RuntimeError(f"block owners {sorted(stray)} belong to nothing; requests "
                               f"{sorted(live - owners)} hold no blocks")
