"""Pieces of the observability surface without processes: the router's timeline endpoints and
log line (fake core), the load-report-to-metrics table, the Summary type, log formats, the
transfer estimate's bound, and the scheduler's phase stamps."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, generate_latest

from fdpd.engine.block_manager import BlockManager
from fdpd.engine.request import Request
from fdpd.engine.scheduler import Scheduler
from fdpd.logs import JsonFormatter, TextFormatter, configure_logging
from fdpd.pd.instance_metrics import InstanceMetrics
from fdpd.pd.load_metrics import load_families
from fdpd.router.app import create_app
from fdpd.router.core import Route, RouterError, TokenDelta
from fdpd.router.relay import _bound_transfer_estimate
from fdpd.sampling_params import SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # see test_model.py
from tests.unit.router_fakes import ScriptedCore

PD_TIMELINE = {"phases": {"prefill_queue": 0.001, "prefill": 0.004, "grant_wait": 0.0,
                          "kv_transfer": 0.002, "decode_queue": 0.0005, "decode": 0.003,
                          "bogus": 9.0},
               "kv_send": 0.001, "prefill_instance": "prefill-0", "decode_instance": "decode-0",
               "num_preemptions": 0}


class TimedCore(ScriptedCore):
    """Attaches an instance timeline and a route to the last delta, as RouterCore does."""

    async def generate(self, request_id, prompt_token_ids, params) -> AsyncIterator[TokenDelta]:
        dispatched = time.monotonic()
        async for delta in super().generate(request_id, prompt_token_ids, params):
            if delta.finished:
                delta.timeline = PD_TIMELINE
                delta.route = Route("pd", "prefill-0", "decode-0", 1, dispatched)
            yield delta


@pytest.fixture
def client():
    with TestClient(create_app(TimedCore())) as c:
        yield c


def test_timeline_endpoints_and_log_line(client, caplog):
    with caplog.at_level(logging.INFO, logger="fdpd.requests"):
        r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4})
    rid = r.json()["id"]
    entry = client.get(f"/v1/requests/{rid}/timeline").json()
    assert entry["status"] == "finished" and entry["finish_reason"] == "length"
    assert entry["mode"] == "pd" and entry["prefill_instance"] == "prefill-0"
    assert entry["output_tokens"] == 4 and entry["attempts"] == 1
    phases = entry["phases"]
    assert "bogus" not in phases and phases["router_queue"] >= 0
    assert set(phases) == {"router_queue", "prefill_queue", "prefill", "grant_wait",
                           "kv_transfer", "decode_queue", "decode"}
    # The fake core answers in microseconds: the instance phases (10 ms) overshoot e2e, so
    # the transfer estimate is cut down to its measured part (kv_send), never below.
    assert phases["kv_transfer"] == pytest.approx(0.001)
    record = next(r for r in caplog.records if getattr(r, "request_id", None) == rid)
    assert record.fields["phases"] == phases
    assert client.get("/v1/requests/recent", params={"limit": 1}).json()["data"] == [entry]
    text = client.get("/metrics").text
    assert 'fdpd:request_phase_seconds_count{phase="decode"} 1' in text
    assert 'fdpd:request_phase_seconds_count{phase="router_queue"} 1' in text


def test_stopped_and_failed_requests_have_timelines_too(client):
    r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4, "stream": True,
                                             "stop": ["ll"]})
    assert r.status_code == 200
    entry = client.get("/v1/requests/recent", params={"limit": 1}).json()["data"][0]
    assert entry["status"] == "finished" and entry["finish_reason"] == "stop"
    core = TimedCore(error=RouterError(503, "no_instances", "no healthy instance"))
    with TestClient(create_app(core)) as c:
        assert c.post("/v1/completions", json={"prompt": "hi"}).status_code == 503
        entry = c.get("/v1/requests/recent").json()["data"][0]
    assert entry["status"] == "error" and entry["reason"] == "no healthy instance"
    assert entry["phases"] == {} and entry["output_tokens"] == 0


def test_ring_buffer_is_bounded(client):
    timelines = client.app.state.ctx.metrics.timelines
    timelines.capacity = 3
    ids = [client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1}).json()["id"]
           for _ in range(5)]
    recent = client.get("/v1/requests/recent", params={"limit": 3}).json()["data"]
    assert [e["request_id"] for e in recent] == ids[::-1][:3]
    missing = client.get(f"/v1/requests/{ids[0]}/timeline")
    assert missing.status_code == 404 and "last 3 requests" in missing.json()["error"]["message"]
    assert client.get("/v1/requests/recent", params={"limit": 4}).status_code == 400


def test_transfer_estimate_bound():
    phases = {"prefill": 0.5, "kv_transfer": 0.3, "decode": 0.4}
    _bound_transfer_estimate(phases, {"kv_send": 0.05}, e2e=1.0)
    assert phases["kv_transfer"] == pytest.approx(0.1)
    phases = {"prefill": 0.9, "kv_transfer": 0.3}
    _bound_transfer_estimate(phases, {"kv_send": 0.05}, e2e=0.5)
    assert phases["kv_transfer"] == 0.05            # never below what was measured
    phases = {"prefill": 0.1, "kv_transfer": 0.3}
    _bound_transfer_estimate(phases, {}, e2e=1.0)
    assert phases["kv_transfer"] == 0.3


def test_load_report_as_metrics():
    prefill = {"running": 1, "waiting": 2, "kv_usage": 0.5, "kv_bytes_sent": 100,
               "num_preemptions": 0, "kv_store": None}
    decode = {"running": 3, "kv_bytes_received": 100, "alloc_refused": 2,
              "ledger": {"grants_granted": 5, "grants_deferred": 1, "grants_rejected": 1,
                         "grants_expired": 0, "pending_grants": 1, "reserved_blocks": 4},
              "kv_store": {"lookup_hit_blocks": 3, "lookup_miss_blocks": 1, "errors": 0,
                           "bytes_written": 10, "write_seconds": {"count": 2, "sum": 0.5,
                                                                  "p50": 0.2, "p99": 0.3}}}
    reg = CollectorRegistry()
    reg.register(_Families(load_families([({"instance": "p", "role": "prefill"}, prefill),
                                          ({"instance": "d", "role": "decode"}, decode)],
                                         ("instance", "role"), summaries=True)))
    text = generate_latest(reg).decode()
    assert 'fdpd:num_requests_running{instance="p",role="prefill"} 1.0' in text
    # prometheus_client writes a series' labels in name order.
    assert 'fdpd:kv_transfer_bytes_total{direction="sent",instance="p",role="prefill"} 100.0' \
        in text
    assert 'fdpd:kv_transfer_bytes_total{direction="received",instance="d",role="decode"} ' \
        '100.0' in text
    assert 'fdpd:grants_total{instance="d",result="rejected",role="decode"} 3.0' in text
    assert 'fdpd:kv_store_misses_total{instance="d",role="decode"} 1.0' in text
    assert 'fdpd:kv_store_write_seconds{instance="d",quantile="0.99",role="decode"} 0.3' in text
    assert 'fdpd:kv_store_write_seconds_count{instance="d",role="decode"} 2.0' in text
    assert "grants_total{instance=\"p\"" not in text       # a prefill has no ledger
    assert "# TYPE fdpd:kv_store_write_seconds summary" in text
    # An instance's own endpoint: the same table, no labels.
    own = InstanceMetrics(lambda: decode)
    assert 'fdpd:grants_total{result="granted"} 5.0' in own.render()
    assert "fdpd:kv_store_write_seconds_bucket" in own.render()      # its own histogram


class _Families:
    def __init__(self, families):
        self.families = families

    def collect(self):
        return self.families


def test_log_formats():
    record = logging.LogRecord("fdpd.x", logging.WARNING, __file__, 1, "grant %s expired",
                               ("g1",), None)
    record.tag, record.request_id, record.fields = "decode-1", "cmpl-1", {"blocks": [1, 2]}
    obj = json.loads(JsonFormatter().format(record))
    assert obj["level"] == "warning" and obj["process"] == "decode-1"
    assert obj["msg"] == "grant g1 expired" and obj["request_id"] == "cmpl-1"
    assert obj["blocks"] == [1, 2] and obj["time"].endswith("Z")
    text = TextFormatter().format(record)
    assert " WARNING decode-1 fdpd.x: grant g1 expired [request_id=cmpl-1] " in text
    assert text.endswith('{"blocks":[1,2]}')
    with pytest.raises(ValueError, match="log format"):
        configure_logging("info", "xml")


def test_scheduler_stamps_first_schedule_and_pauses():
    sched = Scheduler(BlockManager(4, 4), max_num_seqs=4, max_num_batched_tokens=64,
                      max_model_len=64)
    req = Request("a", tuple(range(6)), SamplingParams(max_tokens=8), max_tokens=8, seed=0)
    sched.add(req)
    assert req.scheduled_at == 0.0
    out = sched.schedule()
    assert [r for r, _ in out.scheduled] == [req] and req.scheduled_at > 0
    first = req.scheduled_at
    assert sched.preempt("a")
    assert req.preempted_at > 0 and req.pauses == []
    time.sleep(0.01)
    sched.schedule()
    assert req.scheduled_at == first                 # the first schedule stays
    assert [k for k, _ in req.pauses] == ["preempted"] and req.pauses[0][1] >= 0.01
    assert req.paused_seconds() == req.paused_seconds("preempted") >= 0.01
    assert req.preempted_at == 0.0
