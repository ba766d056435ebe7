"""An instance's load report (``InstanceService.load()``, the heartbeat payload) as Prometheus
metric families, built at scrape time by a ``prometheus_client`` custom collector from the last
report (never kept as live metric objects). One table, used twice: by the instance's own
``/metrics`` (one instance, no labels) and by the router's ``/metrics`` (the cluster view: every
instance, labelled ``instance`` and ``role``). Names follow vLLM's, with the ``fdpd:`` prefix.

A series is written only when the load report has its value, so a prefill shows no grant
series and an instance without a KV store no ``kv_store`` series.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

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


def load_families(loads: Iterable[tuple[dict[str, str], dict]], labelnames: Sequence[str] = (),
                  summaries: bool = False) -> list[Metric]:
    """The metric families of every ``(labels, load)`` (``labels`` keyed by ``labelnames``),
    for a custom collector's ``collect()``. ``summaries``: also the KV-store latency summaries
    from the load's quantiles (the router; an instance exports histograms)."""
    loads = list(loads)
    out: list[Metric] = []
    for table, family in ((GAUGES, GaugeMetricFamily), (COUNTERS, CounterMetricFamily)):
        for name, help_text, paths in table:
            metric = family(name, help_text, labels=labelnames)
            for labels, load in loads:
                value = _value(load, paths)
                if value is not None:
                    metric.add_metric([labels[n] for n in labelnames], value)
            out.append(metric)
    for name, help_text, label, by_value in LABELLED:
        metric = CounterMetricFamily(name, help_text, labels=(*labelnames, label))
        for labels, load in loads:
            for label_value, paths in by_value.items():
                value = _value(load, paths)
                if value is not None:
                    metric.add_metric([*(labels[n] for n in labelnames), label_value], value)
        out.append(metric)
    if summaries:
        out.extend(_summaries(loads, labelnames))
    # An absent value writes no series; a family with none is left out altogether.
    return [m for m in out if m.samples]


def _summaries(loads: list[tuple[dict[str, str], dict]], labelnames: Sequence[str]) -> list[Metric]:
    # SummaryMetricFamily has no quantiles; the load report carries p50/p99, so the samples are
    # written by hand in the summary's exposition shape.
    out = []
    for name, help_text, path in SUMMARIES:
        metric = Metric(name, help_text, "summary")
        for labels, load in loads:
            s = (load.get(path[0]) or {}).get(path[1])
            if not (isinstance(s, dict) and isinstance(s.get("count"), int)):
                continue
            base = {n: labels[n] for n in labelnames}
            for q, key in ((0.5, "p50"), (0.99, "p99")):
                if isinstance(s.get(key), (int, float)):
                    metric.add_sample(name, {**base, "quantile": str(q)}, s[key])
            metric.add_sample(f"{name}_count", base, s["count"])
            metric.add_sample(f"{name}_sum", base, s.get("sum", 0.0))
        out.append(metric)
    return out
