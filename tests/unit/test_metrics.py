"""Metrics on prometheus_client: one ``CollectorRegistry`` per router app and per instance
(never the library's global default), the names and labels the dashboard and operators use,
and the router's cluster view as a custom collector."""

from __future__ import annotations

import prometheus_client
from prometheus_client.parser import text_string_to_metric_families

from fdpd.config import PDConfig
from fdpd.model.tiny import TINY_CONFIG
from fdpd.pd.instance_metrics import InstanceMetrics
from fdpd.pd.protocol import Register
from fdpd.router.core import RouterCore
from fdpd.router.http_metrics import RouterMetrics


def families(text: str) -> dict[str, list]:
    """name -> samples, as Prometheus parses the exposition."""
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def test_each_router_and_instance_has_its_own_registry():
    a, b = RouterMetrics(), RouterMetrics()
    a.http_requests.labels(endpoint="/v1/completions", status="200").inc()
    a.ttft.observe(0.05)
    assert 'fdpd:http_requests_total{endpoint="/v1/completions",status="200"} 1.0' in a.render()
    assert "fdpd:http_requests_total{" not in b.render()
    assert "fdpd:time_to_first_token_seconds_count 0.0" in b.render()
    InstanceMetrics(dict).ttft.observe(0.1)
    global_names = {f.name for f in prometheus_client.REGISTRY.collect()}
    assert not any(name.startswith("fdpd:") for name in global_names), global_names


def test_router_metric_names_and_labels():
    m = RouterMetrics()
    m.request_success.labels(finished_reason="length").inc()
    m.timelines.phase.labels(phase="prefill").observe(0.01)
    got = families(m.render())
    # Counters keep their ``_total`` sample names (prometheus_client strips the suffix from the
    # family name only); histograms expose _bucket/_sum/_count.
    assert {s.name for s in got["fdpd:request_success"]} >= {"fdpd:request_success_total"}
    assert [s.labels for s in got["fdpd:request_success"]
            if s.name.endswith("_total")] == [{"finished_reason": "length"}]
    phase = got["fdpd:request_phase_seconds"]
    assert {s.name for s in phase} >= {"fdpd:request_phase_seconds_bucket",
                                       "fdpd:request_phase_seconds_sum",
                                       "fdpd:request_phase_seconds_count"}
    assert {"phase": "prefill", "le": "0.01"} in [s.labels for s in phase]


def test_cluster_view_is_a_collector_read_at_scrape_time():
    core = RouterCore(model_name="tiny", tokenizer=None, chat_template=None, max_model_len=128,
                      pd=PDConfig())
    metrics = RouterMetrics(core.metrics_collector())
    assert "fdpd:instance_healthy{" not in metrics.render()
    reg = Register("decode-0", "decode", "tcp://127.0.0.1:1", "tiny", 16, 64, 128,
                   TINY_CONFIG.fingerprint("float32", 16), "float32", "tiny")
    assert core.registry.register(reg, epoch=1)[0]
    core.registry.heartbeat("decode-0", 1, {"running": 2, "ledger": {"grants_granted": 3}})
    core.stats.requests["pd"] += 4
    text = metrics.render()
    assert 'fdpd:instance_healthy{instance="decode-0",role="decode"} 1.0' in text
    assert 'fdpd:num_requests_running{instance="decode-0",role="decode"} 2.0' in text
    assert 'fdpd:grants_total{instance="decode-0",result="granted",role="decode"} 3.0' in text
    assert 'fdpd:router_requests_total{mode="pd"} 4.0' in text
    core.registry.mark_dead("decode-0")
    assert 'fdpd:instance_healthy{instance="decode-0",role="decode"} 0.0' in metrics.render()
    type_lines = [line for line in text.splitlines() if line.startswith("# TYPE")]
    assert len(type_lines) == len(set(type_lines))   # no family declared twice


def test_a_failing_cluster_view_leaves_the_routers_own_metrics():
    class Broken:
        registry = None                       # the collector reads registry.instances

    from fdpd.router.cluster_metrics import ClusterCollector

    metrics = RouterMetrics(ClusterCollector(Broken()))    # type: ignore[arg-type]
    text = metrics.render()
    assert "fdpd:http_requests_in_progress 0.0" in text and "fdpd:instance_healthy" not in text
