"""The router's own metrics: HTTP requests by endpoint and status, and per-request latency and
token counts as the client sees them (names follow vLLM's, with the ``fdpd:`` prefix).

One ``CollectorRegistry`` per app, never prometheus_client's process-global default (two
routers in one test process must not share counters). The core's cluster view (instances'
load reports, routing counters) joins it as a custom collector read at scrape time.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.registry import Collector

from fdpd.pd.instance_metrics import LATENCY_BUCKETS
from fdpd.router.timeline import RequestTimelines

# Paths reported under their own label; anything else counts as "other" (bounded cardinality:
# a scanner hitting random URLs must not grow the metric set).
KNOWN_ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/cluster",
                   "/v1/requests/recent", "/health", "/metrics")


class RouterMetrics:
    def __init__(self, cluster: Collector | None = None) -> None:
        r = self.registry = CollectorRegistry()
        self.http_requests = Counter(
            "fdpd:http_requests_total", "HTTP requests answered, by endpoint and status code.",
            ("endpoint", "status"), registry=r)
        self.requests_running = Gauge(
            "fdpd:http_requests_in_progress",
            "Generation requests the router is serving right now.", registry=r)
        self.ttft = Histogram(
            "fdpd:time_to_first_token_seconds",
            "Seconds from the HTTP request's arrival to its first generated token.",
            buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(
            "fdpd:inter_token_latency_seconds", "Seconds between consecutive generated tokens.",
            buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram(
            "fdpd:e2e_request_latency_seconds",
            "Seconds from the HTTP request's arrival to its last token, finished requests.",
            buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter(
            "fdpd:prompt_tokens_total", "Prompt tokens of finished requests.", registry=r)
        self.cached_prompt_tokens = Counter(
            "fdpd:prompt_tokens_cached_total",
            "Prompt tokens of finished requests served from a prefix cache or the KV store.",
            registry=r)
        self.generation_tokens = Counter(
            "fdpd:generation_tokens_total", "Tokens generated and relayed to clients.",
            registry=r)
        self.request_success = Counter(
            "fdpd:request_success_total", "Requests that finished, by finish reason.",
            ("finished_reason",), registry=r)
        self.timelines = RequestTimelines(r)
        if cluster is not None:
            r.register(cluster)

    @staticmethod
    def endpoint_label(path: str) -> str:
        return path if path in KNOWN_ENDPOINTS else "other"

    def render(self) -> str:
        return generate_latest(self.registry).decode()
