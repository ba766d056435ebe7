"""The router's cluster view on ``/metrics``: a ``prometheus_client`` custom collector.

At every scrape it reads what the core knows (each instance's last heartbeat load report,
labelled ``instance`` and ``role``, see ``fdpd.pd.load_metrics``; health; the router's routing
counters) and builds metric families from it: nothing is copied into live metric objects, so
an instance that leaves takes its series with it.

Thread rule: ``collect()`` reads core state that only the router's event loop mutates, so it
must run on that loop (the app's ``/metrics`` handler is ``async`` for this reason).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fdpd.pd.load_metrics import load_families

if TYPE_CHECKING:
    from fdpd.router.core import RouterCore

log = logging.getLogger(__name__)
LABELS = ("instance", "role")


class ClusterCollector(Collector):
    def __init__(self, core: RouterCore):
        self.core = core

    def collect(self) -> Iterator[Metric]:
        try:
            families = self._families()
        except Exception:           # a scrape must still show the router's own metrics
            log.exception("building the cluster metrics failed; serving the router's only")
            return iter(())
        return iter(families)

    def _families(self) -> list[Metric]:
        core = self.core
        healthy = GaugeMetricFamily("fdpd:instance_healthy", "1 while the instance heartbeats.",
                                    labels=LABELS)
        loads = []
        for inst in core.registry.instances.values():
            healthy.add_metric([inst.instance_id, inst.role], int(inst.healthy))
            loads.append(({"instance": inst.instance_id, "role": inst.role}, inst.load))
        # The router's own transport counters, beside the instances' (same series).
        loads.append(({"instance": "router", "role": "router"},
                      {"transport": core.transport.stats.view() if core.transport else {}}))
        out: list[Metric] = [healthy, *load_families(loads, LABELS, summaries=True)]
        routed = CounterMetricFamily("fdpd:router_requests_total", "Requests dispatched, by "
                                     "mode.", labels=("mode",))
        for mode, n in sorted(core.stats.requests.items()):
            routed.add_metric([mode], n)
        stats, admission = core.stats, core.admission
        resumes = CounterMetricFamily(
            "fdpd:request_resumes_total", "Streams resumed on another instance from prompt + "
            "the tokens already sent, by why the last one lost them (drained, disconnected, "
            "instance_died, restarted, grant_expired, ...).", labels=("reason",))
        for reason, n in sorted(stats.resumes.items()):
            resumes.add_metric([reason], n)
        out += [
            routed,
            resumes,
            CounterMetricFamily("fdpd:router_retries_total", "Requests retried on another "
                                "pair.", value=stats.retries),
            CounterMetricFamily("fdpd:router_migrations_total", "Requests resumed on another "
                                "instance after theirs drained.", value=stats.migrations),
            CounterMetricFamily("fdpd:router_instance_deaths_total", "Instances marked dead.",
                                value=stats.instance_deaths),
            GaugeMetricFamily("fdpd:router_requests_inflight", "Requests the router is waiting "
                              "on.", value=len(core.inflight)),
            GaugeMetricFamily("fdpd:router_requests_held", "Generation requests holding an "
                              "admission seat (--max-inflight-requests).", value=admission.held),
            CounterMetricFamily("fdpd:router_requests_refused_total", "Generation requests "
                                "answered 429: no admission seat free.",
                                value=admission.refused),
        ]
        return out
