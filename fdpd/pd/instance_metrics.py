"""An engine instance's own Prometheus endpoint: ``/metrics`` and ``/health`` on
``--metrics-port`` (stdlib ``http.server`` in one daemon thread; bound to ``--host``, loopback
by default).

Threads: the engine loop updates the histograms (thread-safe) and, once per heartbeat, swaps in
a new load report; the HTTP thread only renders. It never reads engine state directly, so a
scrape can neither race the scheduler nor slow a step.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4 as CONTENT_TYPE
from prometheus_client.registry import Collector

from fdpd.pd.load_metrics import load_families

log = logging.getLogger(__name__)

# Phases run from microseconds (a decode queued for one step) to minutes (a long decode).
PHASE_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# Seconds: from sub-millisecond inter-token gaps on a GPU to minute-long CPU requests.
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                   5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0)
TRANSFER_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                    0.5, 1.0, 2.5, 5.0, 10.0)


class InstanceMetrics:
    """Latency histograms measured on this instance (its own clock), and the last load report
    (``load``, swapped in whole once per heartbeat) as gauges and counters. One
    ``CollectorRegistry`` per instance: never the library's process-global default, so
    several instances (or tests) in one process do not collide."""

    def __init__(self, load: Callable[[], dict] = dict) -> None:
        r = self.registry = CollectorRegistry()
        r.register(LoadCollector(load))
        self.ttft = Histogram(
            "fdpd:time_to_first_token_seconds",
            "Seconds from a request's arrival at this instance to its first token here "
            "(prefill: sampled; mixed: produced). The client's view is on the router.",
            buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(
            "fdpd:inter_token_latency_seconds",
            "Seconds between consecutive tokens of a request sent by this instance.",
            buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram(
            "fdpd:e2e_request_latency_seconds",
            "Seconds from a request's arrival at this instance until it is done here "
            "(prefill: KV shipped; decode: from the grant request to the last token).",
            buckets=LATENCY_BUCKETS, registry=r)
        self.kv_transfer = Histogram(
            "fdpd:kv_transfer_seconds",
            "KV transfer per request. Prefill: gather and hand-off of the frames; decode: from "
            "the prefill's first send to PrefillDone arriving (one-way, estimated as the "
            "prefill's send time plus half the round trip).", buckets=TRANSFER_BUCKETS, registry=r)
        self.grant_wait = Histogram(
            "fdpd:grant_wait_seconds",
            "Decode: seconds from a grant request's arrival until it was granted (0 when "
            "there was headroom at once).", buckets=PHASE_BUCKETS, registry=r)
        self.phase = Histogram(
            "fdpd:request_phase_seconds",
            "Seconds a request spent in each phase on this instance (router: every phase of "
            "the request).", ("phase",), buckets=PHASE_BUCKETS, registry=r)
        self.store_write = Histogram(
            "fdpd:kv_store_write_seconds",
            "Seconds per KV-store write-back (one preempted request's blocks).",
            buckets=TRANSFER_BUCKETS, registry=r)
        self.store_restore = Histogram(
            "fdpd:kv_store_restore_seconds", "Seconds per KV-store restore.",
            buckets=TRANSFER_BUCKETS, registry=r)

    def observe_phases(self, phases: dict[str, float]) -> None:
        for phase, seconds in phases.items():
            self.phase.labels(phase=phase).observe(seconds)

    def render(self) -> str:
        return generate_latest(self.registry).decode()


class LoadCollector(Collector):
    """The instance's last load report, read at scrape time (``load`` returns the dict the
    engine thread swapped in; it is never mutated after, so the HTTP thread reads it safely)."""

    def __init__(self, load: Callable[[], dict]):
        self._load = load

    def collect(self) -> Iterable[Metric]:
        return load_families([({}, self._load())])


class MetricsServer:
    """``GET /metrics`` -> ``render()``; ``GET /health`` -> ``health()`` as JSON, 200 if its
    first element is true, else 503."""

    def __init__(self, host: str, port: int, render: Callable[[], str],
                 health: Callable[[], tuple[bool, dict]]):
        server_cls = _V6Server if ":" in host else ThreadingHTTPServer
        self.server = server_cls((host, port), _handler(render, health))
        self.server.daemon_threads = True
        bound_host, self.port = self.server.server_address[:2]
        self.host = host
        self._thread = threading.Thread(target=self.server.serve_forever, name="metrics-http",
                                        daemon=True)
        self._thread.start()

    def url(self, advertise_host: str | None = None) -> str:
        host = advertise_host or self.host
        if host in ("0.0.0.0", "::", ""):
            host = socket.gethostname()
        return f"http://{host}:{self.port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)


class _V6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


def _handler(render: Callable[[], str], health: Callable[[], tuple[bool, dict]]):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            try:
                if path == "/metrics":
                    self._answer(200, render().encode(), CONTENT_TYPE)
                elif path == "/health":
                    ok, info = health()
                    self._answer(200 if ok else 503, json.dumps(info).encode(),
                                 "application/json")
                else:
                    self._answer(404, b"not found: try /metrics or /health\n", "text/plain")
            except Exception:
                log.exception("metrics endpoint %s failed", path)
                self._answer(500, b"internal error\n", "text/plain")

        def _answer(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args) -> None:
            pass                        # scrapes every few seconds would flood the log

    return Handler
