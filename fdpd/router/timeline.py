"""Per-request timelines at the router: where each request's time went.

Each process times its own phases on its own monotonic clock and ships durations, never
timestamps (hosts' clocks are not comparable): the prefill puts its phases in ``PrefillDone``,
the decode adds its own and the transfer's and sends them all on the request's last ``Tokens``;
the router adds its queue time. At the end of every request (finished, aborted or failed) the
router:

- observes each phase in ``fdpd:request_phase_seconds{phase=...}``,
- logs one structured line on the ``fdpd.requests`` logger (with ``request_id``),
- keeps the entry in a bounded ring buffer, served by ``GET /v1/requests/recent`` and
  ``GET /v1/requests/{id}/timeline``.

Phases (seconds; a phase that did not happen is absent):

==============  ================================================================================
router_queue    HTTP arrival -> the serving attempt's Submit (tokenizing, failed attempts)
prefill_queue   the Submit reached P (or mixed) -> the first step that ran the request
prefill         computing the prompt, until its first token was sampled
grant_wait      first token sampled -> P starts sending the KV (waiting for D's grant, then
                for P's loop to come round)
kv_transfer     P's gather and send of the KV, plus PrefillDone's time in flight to D
                (estimated as half of D's round trip less P's share, as no clocks are
                compared; shortened by the router if the phases would exceed e2e)
decode_queue    PrefillDone reached D -> the first decode step
decode          decoding, minus time preempted and restoring
preempted       off the running set after preemptions, waiting to be readmitted
restore         loading preempted KV back from the KV store
resumed         a resumed request (its stream moved to another instance after a drain or a
                lost instance, ``fdpd.router.resume``): from the last token before each move
                to the re-dispatch; its ``router_queue`` then ends at the first dispatch, and
                the entry's ``resumes`` lists each move (reason, instance, tokens so far,
                detect_seconds: last token -> loss noticed, stall_seconds: last token -> first
                resumed token)
==============  ================================================================================

``unaccounted_seconds`` is the end-to-end time no phase covers: messages in flight between
processes and the router's own relaying. The phases of one request never overlap, so they sum
to at most ``e2e_seconds``.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict

from prometheus_client import CollectorRegistry, Histogram

from fdpd.pd.instance_metrics import PHASE_BUCKETS

PHASES = ("router_queue", "prefill_queue", "prefill", "grant_wait", "kv_transfer",
          "decode_queue", "decode", "preempted", "restore")
# The router's own, only for a request that moved to another instance (fdpd.router.resume);
# never reported by an instance.
RESUMED = "resumed"
request_log = logging.getLogger("fdpd.requests")


class RequestTimelines:
    def __init__(self, registry: CollectorRegistry, capacity: int = 1000):
        self.capacity = capacity
        self.phase = Histogram(
            "fdpd:request_phase_seconds",
            "Seconds requests spent in each phase: " + ", ".join((*PHASES, RESUMED)) + ".",
            ("phase",), buckets=PHASE_BUCKETS, registry=registry)
        self._recent: OrderedDict[str, dict] = OrderedDict()
        self._lock = threading.Lock()

    def record(self, entry: dict) -> None:
        for phase, seconds in entry["phases"].items():
            self.phase.labels(phase=phase).observe(seconds)
        with self._lock:
            self._recent[entry["request_id"]] = entry
            self._recent.move_to_end(entry["request_id"])
            while len(self._recent) > self.capacity:
                self._recent.popitem(last=False)
        request_log.info("request %s %s", entry["request_id"], entry["status"],
                         extra={"request_id": entry["request_id"],
                                "fields": {k: v for k, v in entry.items()
                                           if k != "request_id"}})

    def recent(self, limit: int = 100) -> list[dict]:
        """Newest first."""
        with self._lock:
            items = list(self._recent.values())
        return items[::-1][:max(0, limit)]

    def get(self, request_id: str) -> dict | None:
        with self._lock:
            return self._recent.get(request_id)


def upstream_phases(timeline: dict | None) -> dict[str, float]:
    """The phases an instance reported, keeping only known names and sane values."""
    phases = (timeline or {}).get("phases")
    if not isinstance(phases, dict):
        return {}
    return {k: max(0.0, float(v)) for k, v in phases.items()
            if k in PHASES and isinstance(v, (int, float)) and not isinstance(v, bool)}
