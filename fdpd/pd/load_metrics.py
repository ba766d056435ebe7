"""An instance's load report (``InstanceService.load()``, the heartbeat payload) as Prometheus
metrics. One table, used twice: by the instance's own ``/metrics`` (one instance, no labels)
and by the router's ``/metrics`` (the cluster view: every instance, labelled ``instance`` and
``role``). Names follow vLLM's, with the ``fdpd:`` prefix.

A series is written only when the load report has its value, so a prefill shows no grant
series and an instance without a KV store no ``kv_store`` series.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from fdpd.metrics import Registry

Path = tuple[str, ...]
# (name, help, load path(s): the sum of the values found)
GAUGES: list[tuple[str, str, tuple[Path, ...]]] = [
    ("fdpd:num_requests_running", "Requests in the running batch.", (("running",),)),
    ("fdpd:num_requests_waiting", "Requests queued (new, or preempted and waiting).",
     (("waiting",),)),
    ("fdpd:kv_cache_usage_perc", "Share of KV blocks in use (1 = full).", (("kv_usage",),)),
    ("fdpd:free_blocks", "KV blocks free (including cached, evictable ones).",
     (("free_blocks",),)),
    ("fdpd:reserved_blocks", "Decode blocks reserved for running requests' growth.",
     (("ledger", "reserved_blocks"),)),
    ("fdpd:pending_grants", "Decode grants awaiting their KV.", (("ledger", "pending_grants"),)),
    ("fdpd:pending_grant_blocks", "Blocks held by pending grants.",
     (("ledger", "pending_grant_blocks"),)),
    ("fdpd:num_allocs_waiting", "Grant requests queued on a decode (no headroom yet).",
     (("ledger", "waiting_allocs"),)),
    ("fdpd:headroom_blocks", "Decode blocks free beyond reservations (what a grant may take).",
     (("ledger", "headroom_blocks"),)),
]
COUNTERS: list[tuple[str, str, tuple[Path, ...]]] = [
    ("fdpd:num_preemptions_total", "Preemptions.", (("num_preemptions",),)),
    ("fdpd:num_restores_total", "Preempted or cached requests whose KV was restored from "
     "the KV store (at least one block).", (("num_restores",),)),
    ("fdpd:restored_tokens_total", "Tokens whose KV was restored from the KV store.",
     (("num_restored_tokens",),)),
    ("fdpd:recomputed_tokens_total", "Tokens computed again after a preemption.",
     (("num_recomputed_tokens",),)),
    ("fdpd:computed_prompt_tokens_total", "Prompt tokens run through the model.",
     (("num_computed_prompt_tokens",),)),
    ("fdpd:prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache.",
     (("prefix_queried_tokens",),)),
    ("fdpd:prefix_cache_hits_total", "Prompt tokens found in the prefix cache.",
     (("prefix_hit_tokens",),)),
    ("fdpd:kv_transfer_failures_total", "KV transfers that failed (refused or incomplete).",
     (("transfer_failures",),)),
    ("fdpd:kv_store_lookups_total", "KV-store prefix lookups.", (("kv_store", "lookups"),)),
    ("fdpd:kv_store_hits_total", "Blocks a KV-store lookup found.",
     (("kv_store", "lookup_hit_blocks"),)),
    ("fdpd:kv_store_misses_total", "Blocks a KV-store lookup asked for and did not find "
     "(absent, or the store failed).", (("kv_store", "lookup_miss_blocks"),)),
    ("fdpd:transport_unauthenticated_total", "Messages dropped for a missing or wrong MAC "
     "(with a cluster secret; never answered).", (("transport", "unauthenticated"),)),
    ("fdpd:transport_replayed_total", "Authenticated messages dropped as replays (a seq "
     "seen before, or older than the replay window).", (("transport", "replayed"),)),
]
# (name, help, label, {label value: load path(s)})
LABELLED: list[tuple[str, str, str, dict[str, tuple[Path, ...]]]] = [
    ("fdpd:kv_transfer_bytes_total", "KV bytes moved between prefill and decode.",
     "direction", {"sent": (("kv_bytes_sent",),), "received": (("kv_bytes_received",),)}),
    ("fdpd:kv_transfer_blocks_total", "KV blocks moved between prefill and decode.",
     "direction", {"sent": (("kv_blocks_sent",),), "received": (("kv_blocks_received",),)}),
    ("fdpd:grants_total", "Decode grant requests by result: granted, deferred (had to wait "
     "for headroom), rejected (refused, or waited too long), expired (lease ran out).",
     "result", {"granted": (("ledger", "grants_granted"),),
                "deferred": (("ledger", "grants_deferred"),),
                "rejected": (("ledger", "grants_rejected"), ("alloc_refused",)),
                "expired": (("ledger", "grants_expired"),)}),
    ("fdpd:kv_store_bytes_total", "Bytes written to / restored from the KV store.", "op",
     {"write": (("kv_store", "bytes_written"),), "restore": (("kv_store", "bytes_restored"),)}),
    ("fdpd:kv_store_blocks_total", "KV-store blocks written, skipped (already stored) and "
     "restored.", "op", {"write": (("kv_store", "blocks_written"),),
                         "skip": (("kv_store", "blocks_skipped"),),
                         "restore": (("kv_store", "blocks_restored"),)}),
    ("fdpd:kv_store_errors_total", "KV-store failures: call errors or timeouts, corrupt "
     "objects rejected, write-backs dropped (queue full).", "kind",
     {"error": (("kv_store", "errors"),), "corrupt": (("kv_store", "corrupt_objects"),),
      "dropped": (("kv_store", "dropped_writes"),)}),
]
SUMMARIES = [
    ("fdpd:kv_store_write_seconds", "Seconds per KV-store write-back (one preempted "
     "request's blocks).", ("kv_store", "write_seconds")),
    ("fdpd:kv_store_restore_seconds", "Seconds per KV-store restore.",
     ("kv_store", "restore_seconds")),
]


def _value(load: dict, paths: tuple[Path, ...]) -> float | None:
    total, found = 0.0, False
    for path in paths:
        node: Any = load
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, (int, float)) and not isinstance(node, bool):
            total += node
            found = True
    return total if found else None


def render_loads(reg: Registry, loads: Iterable[tuple[dict[str, str], dict]],
                 labelnames: Sequence[str] = (), summaries: bool = False) -> None:
    """Add the metrics of every ``(labels, load)`` to ``reg``. ``summaries``: also the KV-store
    latency summaries from the load's quantiles (the router; an instance exports histograms)."""
    loads = list(loads)
    for table, make in ((GAUGES, reg.gauge), (COUNTERS, reg.counter)):
        for name, help_text, paths in table:
            metric = None
            for labels, load in loads:
                value = _value(load, paths)
                if value is not None:
                    metric = metric or make(name, help_text, labelnames)
                    _set(metric, value, labels)
    for name, help_text, label, by_value in LABELLED:
        metric = None
        for labels, load in loads:
            for label_value, paths in by_value.items():
                value = _value(load, paths)
                if value is not None:
                    metric = metric or reg.counter(name, help_text, (*labelnames, label))
                    _set(metric, value, {**labels, label: label_value})
    if summaries:
        for name, help_text, path in SUMMARIES:
            metric = None
            for labels, load in loads:
                s = (load.get(path[0]) or {}).get(path[1])
                if isinstance(s, dict) and isinstance(s.get("count"), int):
                    metric = metric or reg.summary(name, help_text, labelnames)
                    quantiles = {q: s[k] for q, k in ((0.5, "p50"), (0.99, "p99")) if k in s}
                    metric.set(s["count"], s.get("sum", 0.0), quantiles, **labels)


def _set(metric, value: float, labels: dict[str, str]) -> None:
    if hasattr(metric, "set"):
        metric.set(value, **labels)
    else:
        metric.inc(value, **labels)
