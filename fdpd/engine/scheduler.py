"""Continuous batching: which requests run this step, and how many tokens each.

One step has a token budget. Running requests go first, oldest first (a decode costs one token,
an unfinished prompt continues with a chunk), then waiting requests are admitted while budget,
seats and blocks last. When a running request cannot grow, the lowest-priority (then newest)
unscheduled running request is preempted: its blocks go back through the ``PreemptionHandler``
and it waits at the front of the queue to be recomputed (or, with a KV store, restored).
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from fdpd.engine.block_manager import BlockManager, compute_block_hashes
from fdpd.engine.request import Request, RequestStatus


def kv_owner(req: Request) -> str:
    """Block owner id under which a finished prefill's KV waits to be shipped."""
    return f"kv:{req.request_id}"


class PreemptionHandler(Protocol):
    """Where a preempted request's KV goes. Called on the scheduler thread; must not block."""

    def preempt(self, request: Request, block_manager: BlockManager) -> None:
        """Release ``request``'s blocks (at once, or after an asynchronous write-back)."""


class RecomputePreemption:
    """Drop the KV; the request recomputes it (minus prefix-cache hits) when readmitted."""

    def preempt(self, request: Request, block_manager: BlockManager) -> None:
        block_manager.free(request.request_id)


class WaitingQueue:
    """FCFS (deque) or priority (heap on priority, arrival). Finished (aborted) requests are
    skipped lazily rather than removed, to keep every operation O(1) / O(log n)."""

    def __init__(self, policy: str):
        self.policy = policy
        self._fifo: deque[Request] = deque()
        self._heap: list[tuple[int, float, int, Request]] = []
        self._tie = itertools.count()
        self._live = 0

    def push(self, req: Request, front: bool = False) -> None:
        if self.policy == "priority":
            heapq.heappush(self._heap, (req.priority, req.arrival_time, next(self._tie), req))
        elif front:
            self._fifo.appendleft(req)
        else:
            self._fifo.append(req)
        self._live += 1

    def peek(self) -> Request | None:
        self._drop_finished()
        if self.policy == "priority":
            return self._heap[0][3] if self._heap else None
        return self._fifo[0] if self._fifo else None

    def pop(self) -> Request:
        self._drop_finished()
        self._live -= 1
        return heapq.heappop(self._heap)[3] if self.policy == "priority" else self._fifo.popleft()

    def discard(self, req: Request) -> None:
        """Account for ``req`` having been finished while queued (it is skipped later)."""
        self._live -= 1

    def _drop_finished(self) -> None:
        if self.policy == "priority":
            while self._heap and self._heap[0][3].is_finished:
                heapq.heappop(self._heap)
        else:
            while self._fifo and self._fifo[0].is_finished:
                self._fifo.popleft()

    def __len__(self) -> int:
        return self._live

    def __iter__(self) -> Iterator[Request]:
        items = (e[3] for e in self._heap) if self.policy == "priority" else iter(self._fifo)
        return (r for r in items if not r.is_finished)


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
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0

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
        if was_waiting:
            self.waiting.discard(req)
        else:
            self.running.remove(req)            # O(max_num_seqs), once per request
            if keep_kv_as is not None:
                self.bm.transfer(req.request_id, keep_kv_as)
            else:
                self.bm.free(req.request_id)
        self.requests.pop(req.request_id, None)

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
        return bool(self.running) or len(self.waiting) > 0

    # ---------------------------------------------------------------- one step
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        running: list[Request] = []
        queue = list(self.running)
        i = 0
        while i < len(queue) and budget > 0:
            req = queue[i]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.bm.grow(req.request_id, req.num_computed_tokens + num_new):
                victim = self._pick_victim(queue, i)
                queue.remove(victim)
                self._preempt(victim, out)
                if victim is req:
                    break
            if req.status is RequestStatus.RUNNING:
                running.append(req)
                out.scheduled.append((req, num_new))
                budget -= num_new
                i += 1
        running.extend(queue[i:])

        # Admitting new work in a step that had to preempt would only preempt again.
        while not out.preempted and budget > 0 and len(running) < self.max_num_seqs:
            req = self.waiting.peek()
            if req is None:
                break
            cached = self.bm.match_prefix(req.block_hashes, req.num_tokens)
            num_cached = len(cached) * self.bm.block_size
            num_new = min(req.num_tokens - num_cached, budget)
            if not self.bm.allocate(req.request_id, num_cached + num_new, cached):
                break                                  # head of line waits for blocks
            self.waiting.pop()
            req.status = RequestStatus.RUNNING
            req.num_computed_tokens = num_cached
            if req.num_preemptions == 0:
                req.num_cached_tokens = num_cached
            running.append(req)
            out.scheduled.append((req, num_new))
            budget -= num_new
        self.running = running
        return out

    def _pick_victim(self, queue: list[Request], current: int) -> Request:
        candidates = queue[current:]                 # requests not yet scheduled this step
        if self.policy == "priority":
            return max(candidates, key=lambda r: (r.priority, r.arrival_time))
        return candidates[-1]

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        self.preemption.preempt(req, self.bm)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.push(req, front=True)
        out.preempted.append(req)

    # ---------------------------------------------------------------- after the forward
    def advance(self, req: Request, num_new: int) -> None:
        """``num_new`` more tokens of ``req`` now have KV in its blocks."""
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
        if self.bm.enable_prefix_caching:
            compute_block_hashes(self.bm.hash_seed, req.all_token_ids, self.bm.block_size,
                                 req.block_hashes)

    def check_integrity(self) -> None:
        self.bm.check_integrity()
        owners = set(self.bm.owners())
        running = {r.request_id for r in self.running}
        if owners != running:
            raise RuntimeError(f"block owners {sorted(owners - running)} not running, running "
                               f"{sorted(running - owners)} without blocks")
