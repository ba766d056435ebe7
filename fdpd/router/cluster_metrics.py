"""The router's ``/metrics`` share that is not about HTTP: the cluster view (every instance's
load report from its last heartbeat) and the router's own counters (routing, retries,
migrations and resumes, instance deaths, admission)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fdpd.metrics import Registry as MetricRegistry
from fdpd.pd.load_metrics import render_loads

if TYPE_CHECKING:
    from fdpd.router.core import RouterCore


def render_cluster_metrics(core: RouterCore) -> str:
    """The cluster view as Prometheus text: every instance's load report from its last
    heartbeat (labelled by instance and role, see ``fdpd.pd.load_metrics``) and the
    router's own counters."""
    reg = MetricRegistry()
    labels = ("instance", "role")
    healthy = reg.gauge("fdpd:instance_healthy", "1 while the instance heartbeats.", labels)
    loads = []
    for inst in core.registry.instances.values():
        who = {"instance": inst.instance_id, "role": inst.role}
        healthy.set(int(inst.healthy), **who)
        loads.append((who, inst.load))
    # The router's own transport counters, beside the instances' (same series).
    loads.append(({"instance": "router", "role": "router"},
                  {"transport": core.transport_view()}))
    render_loads(reg, loads, labels, summaries=True)
    routed = reg.counter("fdpd:router_requests_total", "Requests dispatched, by mode.",
                         ("mode",))
    for mode, n in core.stats.requests.items():
        routed.inc(n, mode=mode)
    reg.counter("fdpd:router_retries_total", "Requests retried on another pair.").inc(
        core.stats.retries)
    reg.counter("fdpd:router_migrations_total", "Requests resumed on another instance "
                "after theirs drained.").inc(core.stats.migrations)
    resumes = reg.counter("fdpd:request_resumes_total", "Streams resumed on another "
                          "instance from prompt + the tokens already sent, by why the "
                          "last one lost them (drained, disconnected, instance_died, "
                          "restarted, grant_expired, ...).", ("reason",))
    for reason, n in core.stats.resumes.items():
        resumes.inc(n, reason=reason)
    reg.counter("fdpd:router_instance_deaths_total", "Instances marked dead.").inc(
        core.stats.instance_deaths)
    reg.gauge("fdpd:router_requests_inflight", "Requests the router is waiting on.").set(
        len(core.inflight))
    reg.gauge("fdpd:router_requests_held", "Generation requests holding an admission seat "
              "(--max-inflight-requests).").set(core.admission.held)
    reg.counter("fdpd:router_requests_refused_total", "Generation requests answered 429: "
                "no admission seat free.").inc(core.admission.refused)
    return reg.render()
