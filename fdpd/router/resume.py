"""Resuming a request whose stream broke, on another instance (DESIGN 3.9).

The router holds a request's prompt and every token it has sent the client. When the instance
streaming it goes away (drained: a ``Migrate``; or lost: the process died, its connection
dropped, it stopped heartbeating, it came back as a new incarnation, its grant expired), the
request is dispatched again with context = prompt + those tokens and ``num_output_tokens`` =
their count. Sampling is keyed by (seed, position), so the new instance continues the very
stream the old one would have produced; the new prefill restores the context's KV from the
store where it was written (a drain writes it; ``--kv-store-write-finished`` on prefills
writes prompts), and recomputes the rest. The client sees one stream: no error event, no
repeated token, ``usage`` counting each token once.

Bounds: a drain may move a request ``MAX_MIGRATIONS`` times (drains are orderly and rare); a
loss at most ``--max-resumes`` times; both within the request's deadline. Past them the stream
ends with the error it always had.

``Resumes`` is one request's record of this. It lives on the router's event loop (no lock).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

# A request follows at most this many drains (each moves it to another instance).
MAX_MIGRATIONS = 8


@dataclass
class ResumeRecord:
    """One move of a request to another instance (router clock, monotonic seconds)."""

    reason: str               # drained | instance_died | disconnected | restarted | ...
    instance: str             # the instance that lost (or handed back) the request
    after_tokens: int         # tokens the client had when it moved
    last_token_at: float      # the last token the client got before the move
    noticed_at: float         # when the router learnt of the loss
    redispatched_at: float = 0.0
    first_token_at: float = 0.0        # the resumed stream's first token (0: none yet)

    def view(self) -> dict:
        def span(a: float, b: float) -> float | None:
            return round(b - a, 6) if a and b else None

        return {"reason": self.reason, "instance": self.instance,
                "after_tokens": self.after_tokens,
                "detect_seconds": span(self.last_token_at, self.noticed_at),
                "stall_seconds": span(self.last_token_at, self.first_token_at)}


class Resumes:
    """One request's moves: counts them against their bounds and times them."""

    def __init__(self, max_resumes: int, counter: Counter):
        self.max_resumes = max_resumes
        self.records: list[ResumeRecord] = []
        self._counter = counter          # the router's, by reason (fdpd:request_resumes_total)
        self._losses = self._migrations = 0
        self._last_token_at = 0.0

    def on_tokens(self, now: float) -> None:
        if self.records and not self.records[-1].first_token_at:
            self.records[-1].first_token_at = now
        self._last_token_at = now

    def drained(self, instance: str, num_tokens: int, reported_tokens: int) -> str | None:
        """Record a drain's hand-back; the reason it cannot be resumed, or None."""
        if reported_tokens != num_tokens:
            return (f"cannot resume: the instance stopped after {reported_tokens} tokens, "
                    f"the router has {num_tokens}")
        self._migrations += 1
        if self._migrations > MAX_MIGRATIONS:
            return "request migrated too many times"
        self._record("drained", instance, num_tokens)
        return None

    def lost(self, reason: str, instance: str, num_tokens: int,
             deadline: float) -> str | None:
        """Record a loss mid-stream; the reason it cannot be resumed, or None."""
        if self._losses >= self.max_resumes:
            return (f"resumed {self._losses} time{'s' if self._losses != 1 else ''} already "
                    f"(--max-resumes)")
        if time.monotonic() >= deadline:
            return "request deadline passed"
        self._losses += 1
        self._record(reason, instance, num_tokens)
        return None

    def redispatched(self) -> None:
        if self.records and not self.records[-1].redispatched_at:
            self.records[-1].redispatched_at = time.monotonic()

    def stalled_seconds(self) -> float:
        """Router-side time between losing a stream and dispatching it again, summed: the
        ``resumed`` phase of the request's timeline (each resumed attempt's own phases are
        its instances')."""
        return sum(max(0.0, r.redispatched_at - r.last_token_at) for r in self.records
                   if r.redispatched_at and r.last_token_at)

    def _record(self, reason: str, instance: str, num_tokens: int) -> None:
        now = time.monotonic()
        self.records.append(ResumeRecord(reason, instance, num_tokens,
                                         self._last_token_at or now, now))
        self._counter[reason] += 1
