"""The router's own metrics: HTTP requests by endpoint and status, and per-request latency and
token counts as the client sees them (names follow vLLM's, with the ``fdpd:`` prefix).

The core's metrics (registry, instances) are rendered by the core and appended to these.
"""

from __future__ import annotations

from fdpd.metrics import Registry
from fdpd.router.timeline import RequestTimelines

# Paths reported under their own label; anything else counts as "other" (bounded cardinality:
# a scanner hitting random URLs must not grow the metric set).
KNOWN_ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/cluster",
                   "/v1/requests/recent", "/health", "/metrics")


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = Registry()
        r = self.registry
        self.http_requests = r.counter(
            "fdpd:http_requests_total", "HTTP requests answered, by endpoint and status code.",
            ("endpoint", "status"))
        self.requests_running = r.gauge(
            "fdpd:http_requests_in_progress",
            "Generation requests the router is serving right now.")
        self.ttft = r.histogram(
            "fdpd:time_to_first_token_seconds",
            "Seconds from the HTTP request's arrival to its first generated token.")
        self.itl = r.histogram(
            "fdpd:inter_token_latency_seconds", "Seconds between consecutive generated tokens.")
        self.e2e = r.histogram(
            "fdpd:e2e_request_latency_seconds",
            "Seconds from the HTTP request's arrival to its last token, finished requests.")
        self.prompt_tokens = r.counter(
            "fdpd:prompt_tokens_total", "Prompt tokens of finished requests.")
        self.cached_prompt_tokens = r.counter(
            "fdpd:prompt_tokens_cached_total",
            "Prompt tokens of finished requests served from a prefix cache or the KV store.")
        self.generation_tokens = r.counter(
            "fdpd:generation_tokens_total", "Tokens generated and relayed to clients.")
        self.request_success = r.counter(
            "fdpd:request_success_total", "Requests that finished, by finish reason.",
            ("finished_reason",))
        self.timelines = RequestTimelines(r)

    @staticmethod
    def endpoint_label(path: str) -> str:
        return path if path in KNOWN_ENDPOINTS else "other"

    def render(self) -> str:
        return self.registry.render()
