"""The order of a scheduler's waiting queue: FCFS, priority, or shortest-first.

``shortest`` (a prefill instance's default): the fewest tokens left to compute first, less
``AGING_TOKENS_PER_S`` for each second since a request arrived. The aging credit grows at the
same rate for every request, so the order of two requests never depends on the clock: the key
is the tokens left plus that rate times the arrival time, with no clock read.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Iterator

from fdpd.engine.request import Request

# A second since arrival counts as this many tokens less to compute. A fresh 128-token prompt
# goes before a 2048-token one until the long one is ~19 s old. (1000 was too much: a
# 2048-token prefill takes ~4.5 s on one core here, so it out-aged any short prompt arriving
# more than ~1.5 s after it, and short prompts waited out the long one again.)
AGING_TOKENS_PER_S = 100.0


def shortest_first(r: Request) -> float:
    """The ``shortest`` key: tokens left to compute, less the aging credit (up to a constant
    shared by every request: ``AGING_TOKENS_PER_S`` x now)."""
    return r.num_tokens - r.num_computed_tokens + AGING_TOKENS_PER_S * r.arrival_time


class WaitingQueue:
    """FCFS (deque), priority (heap on priority, arrival) or shortest (a deque searched for the
    smallest ``shortest_first`` key: a prefill instance's queue is short). Finished (aborted)
    requests are skipped lazily rather than removed, to keep every FCFS and priority
    operation O(1) / O(log n)."""

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
        if self.policy == "shortest" and len(self._fifo) > 1:
            return min(self, key=shortest_first, default=None)
        return self._fifo[0] if self._fifo else None

    def pop(self, req: Request | None = None) -> Request:
        """Remove the head, or ``req`` (what ``peek`` returned, under ``shortest``)."""
        self._drop_finished()
        self._live -= 1
        if self.policy == "priority":
            return heapq.heappop(self._heap)[3]
        if req is not None and self._fifo[0] is not req:
            self._fifo.remove(req)
            return req
        return self._fifo.popleft()

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
