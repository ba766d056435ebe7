"""Overload: bounded queues and fast refusals, on a real 1 P + 1 D cluster (``fdpd.testing``).

Bounds under test: the router holds at most ``--max-inflight-requests`` generation requests
(429 with Retry-After past it, answered before any instance is involved) and refuses bodies
over ``--max-request-body-bytes`` (413, unread); a prefill/mixed instance refuses a Submit when
``--max-queued-requests`` requests already wait in its scheduler (prefill: are not yet
prefilled), and the router then answers 503 with Retry-After. Every response of a burst far
past those bounds must be either the exact tokens of the offline engine (200) or such a
refusal, as an HTTP status (never an SSE error event); afterwards the cluster serves normally
and ends quiescent.

The decode's bound on queued grant requests is tested in ``tests/unit/test_ledger.py``.
"""

from __future__ import annotations

import statistics
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from fdpd import LLM, SamplingParams
from fdpd.config import EngineConfig, InstanceConfig, PDConfig
from fdpd.engine.engine import Engine
from fdpd.pd.mixed import MixedService
from fdpd.pd.prefill import PrefillService
from fdpd.pd.protocol import Envelope, Reject, Submit
from fdpd.pd.transport import Inbound
from fdpd.router.app import create_app
from fdpd.router.admission import Admission
from fdpd.router.core import RouterError
from fdpd.testing import Cluster, Completion, complete
from tests.unit.router_fakes import ScriptedCore

GREEDY = {"temperature": 0, "ignore_eos": True, "return_token_ids": True}
MAX_INFLIGHT = 4
BODY_LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def cluster():
    # Heartbeats every 0.5 s: the router marks an instance dead after 3 s without one, well
    # past the time a test keeps the prefill stopped on this busy 2-core machine.
    with Cluster(1, 1, heartbeat_interval=0.5, common_args=["--num-kv-blocks", "512"],
                 router_args=["--max-inflight-requests", MAX_INFLIGHT,
                              "--max-request-body-bytes", BODY_LIMIT],
                 prefill_args=["--max-queued-requests", "1"],
                 decode_args=["--max-queued-requests", "2"]) as c:
        yield c


@pytest.fixture(scope="module")
def reference():
    """``expected(prompt_ids, max_tokens)``: greedy token ids of the offline engine."""
    llm = LLM("tiny", num_kv_blocks=1024)
    cache: dict[tuple[tuple[int, ...], int], list[int]] = {}

    def expected(prompt: list[int], max_tokens: int) -> list[int]:
        key = (tuple(prompt), max_tokens)
        if key not in cache:
            torch.set_num_threads(1)
            out = llm.generate([{"prompt_token_ids": list(prompt)}],
                               SamplingParams(max_tokens=max_tokens, temperature=0,
                                              ignore_eos=True))
            cache[key] = list(out[0].outputs[0].token_ids)
        return cache[key]

    return expected


def request(i: int, max_tokens: int = 32) -> tuple[str, dict]:
    """Completions and chat, streamed and not, in turn; distinct prompts."""
    body = {**GREEDY, "max_tokens": max_tokens, "stream": i % 2 == 0}
    if i % 4 < 2:
        return "/v1/completions", {**body, "prompt": [(7 * i + k) % 250 + 3 for k in range(40)]}
    return "/v1/chat/completions", {**body, "messages": [{"role": "user",
                                                          "content": f"request {i}: hello"}]}


class Sender:
    """Sends requests from many threads; keeps each response's headers (an httpx event hook
    runs in the sending thread) and when it came back."""

    def __init__(self, cluster: Cluster, threads: int):
        self._local = threading.local()
        self.client = cluster.client(
            timeout=60, limits=httpx.Limits(max_connections=threads,
                                            max_keepalive_connections=threads),
            event_hooks={"response": [self._keep_headers]})
        self.pool = ThreadPoolExecutor(threads)

    def _keep_headers(self, response: httpx.Response) -> None:
        self._local.headers = response.headers

    def send(self, path: str, body: dict, start: threading.Barrier | None = None
             ) -> Future[tuple[Completion, httpx.Headers, float]]:
        def run():
            if start is not None:
                start.wait()
            out = complete(self.client, path, body)
            return out, self._local.headers, time.monotonic()
        return self.pool.submit(run)

    def close(self) -> None:
        self.pool.shutdown()


def check_exact(out: Completion, path: str, body: dict, expected) -> None:
    assert out.ok, (out.status, out.error)
    if path == "/v1/completions":
        assert out.prompt_token_ids == body["prompt"]
    assert out.token_ids == expected(out.prompt_token_ids, body["max_tokens"])
    assert out.finish_reason == "length"


def check_refusal(out: Completion, headers: httpx.Headers) -> None:
    """A 429/503 as an HTTP status, with Retry-After in whole seconds and an OpenAI error."""
    assert out.status in (429, 503), (out.status, out.error)
    assert headers.get("retry-after", "").isdigit() and int(headers["retry-after"]) >= 1
    assert set(out.error) == {"message", "type", "param", "code"} and out.error["message"]
    assert not out.token_ids and not out.events
    if out.status == 429:
        assert out.error["code"] == "rate_limit_exceeded"
        assert out.error["type"] == "rate_limit_error"
        assert "--max-inflight-requests" in out.error["message"]
    else:
        assert out.error["type"] == "server_error"


def router_view(cluster: Cluster) -> dict:
    return cluster.cluster()["router"]


def timeline_ids(cluster: Cluster) -> set[str]:
    r = cluster.client().get("/v1/requests/recent", params={"limit": 1000})
    return {e["request_id"] for e in r.json()["data"]}


def test_burst_gets_exact_tokens_or_refusals_then_recovers(cluster, reference):
    before = router_view(cluster)["admission"]
    seen = timeline_ids(cluster)
    sender = Sender(cluster, 40)
    start = threading.Barrier(40)
    cases = [request(i) for i in range(40)]
    try:
        futures = [sender.send(path, body, start) for path, body in cases]
        results = [f.result(timeout=120) for f in futures]
        # Past the burst, everything succeeds again.
        cluster.wait_for(lambda: router_view(cluster)["admission"]["held"] == 0, 30,
                         what="every admission seat given back")
        after = [sender.send(*request(100 + i)).result(timeout=60) for i in range(6)]
    finally:
        sender.close()
    latency: dict[int, list[float]] = {200: [], 429: [], 503: []}
    for (path, body), (out, headers, done) in zip(cases, results):
        assert out.status in latency, (out.status, out.error)
        if out.status == 200:
            check_exact(out, path, body, reference)
        else:
            check_refusal(out, headers)
        latency[out.status].append(done - out.sent_at)
    for i, (out, _, _) in enumerate(after):
        check_exact(out, *request(100 + i), reference)
    assert latency[429] and latency[200]
    kinds = {(path, body["stream"]) for (path, body), (out, _, _) in zip(cases, results)
             if out.status == 429}
    assert len(kinds) == 4, kinds          # completions and chat, streamed and not
    # A 429 waits for nothing but the router: it comes back well before a completion does.
    assert statistics.median(latency[429]) < statistics.median(latency[200])
    view = router_view(cluster)["admission"]
    assert view["refused"] - before["refused"] == len(latency[429])
    assert view["peak"] == MAX_INFLIGHT and view["held"] == 0
    # A refused request never reached the core: only served and 503'd ones have a timeline.
    assert len(timeline_ids(cluster) - seen) == len(latency[200]) + len(latency[503]) + 6
    cluster.assert_quiescent()


def test_full_prefill_queue_answers_503_and_429s_do_not_wait_for_instances(cluster,
                                                                          reference):
    """With the prefill stopped, the router's seats fill with dispatched requests and every
    other request gets its 429 meanwhile. Resumed, the prefill finds more Submits than its
    queue bound (1) and refuses the rest: 503 with Retry-After, after the router found no
    other prefill to try."""
    prefill = cluster.instances("prefill")[0]
    sender = Sender(cluster, 8)
    cases = [request(200 + i) for i in range(8)]
    refused_before = router_view(cluster)["admission"]["refused"]
    cluster.pause(prefill)
    try:
        futures = [sender.send(path, body) for path, body in cases]
        cluster.wait_for(lambda: router_view(cluster)["inflight"] == MAX_INFLIGHT
                         and router_view(cluster)["admission"]["refused"]
                         == refused_before + len(cases) - MAX_INFLIGHT, 10,
                         what="every seat held by a dispatched request, the rest refused")
        # The router counted its refusals; their answers reach the client a moment later.
        # The prefill is stopped, so nothing else can complete meanwhile.
        cluster.wait_for(lambda: sum(f.done() for f in futures) >= len(cases) - MAX_INFLIGHT,
                         10, what="the refused requests answered")
        early = [f for f in futures if f.done()]
        assert len(early) == len(cases) - MAX_INFLIGHT
        assert all(f.result()[0].status == 429 for f in early)
    finally:
        cluster.resume(prefill)
        results = [f.result(timeout=60) for f in futures]
        sender.close()
    statuses = [out.status for out, _, _ in results]
    assert statuses.count(429) == len(cases) - MAX_INFLIGHT
    assert 503 in statuses and 200 in statuses, statuses
    for (path, body), (out, headers, _) in zip(cases, results):
        if out.status == 200:
            check_exact(out, path, body, reference)
        else:
            check_refusal(out, headers)
            if out.status == 503:
                assert "prefill queue is full" in out.error["message"]
    cluster.assert_quiescent()


def vm_hwm_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def test_oversized_bodies_get_413_unread(cluster):
    client = cluster.client()
    hwm = vm_hwm_kib(cluster.router.pid)
    big = b'{"prompt": "' + b"x" * (16 << 20) + b'"}'
    r = client.post("/v1/completions", content=big,
                    headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large"
    assert str(BODY_LIMIT) in r.json()["error"]["message"]
    # Refused on its Content-Length, never read whole: the router's peak memory did not grow
    # by anything like the body's 16 MiB.
    assert vm_hwm_kib(cluster.router.pid) - hwm < 8 << 10

    def chunks():                      # no Content-Length: refused once it outgrows the limit
        for _ in range(64):
            yield b" " * 4096
    r = client.post("/v1/chat/completions", content=chunks(),
                    headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    # A body just under the limit is read and validated as usual, on the same connection.
    body = b'{"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 2' + b" " * (
        BODY_LIMIT - 100) + b"}"
    r = client.post("/v1/completions", content=body,
                    headers={"content-type": "application/json"})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


ENDPOINTS = [("/v1/completions", {"prompt": "hi"}),
             ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path, body", ENDPOINTS)
def test_refusals_are_http_statuses_on_both_endpoints(path, body, stream):
    """In-process (a scripted core): what the router answers when every instance refused, and
    when no seat is free, on both endpoints, streamed or not: an HTTP status with Retry-After
    and an OpenAI error, never a 200 with an error event; a 429 never reaches the core."""
    core = ScriptedCore(error=RouterError(
        503, "unavailable", "request failed after 3 attempts: rejected by prefill-0: prefill "
        "queue is full", retry_after=1.0))
    core.admission = Admission(limit=1, max_body_bytes=BODY_LIMIT)
    with TestClient(create_app(core)) as client:
        r = client.post(path, json={**body, "stream": stream})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.headers["content-type"] == "application/json"
        assert r.json()["error"]["code"] == "unavailable" and len(core.calls) == 1
        assert core.admission.held == 0
        core.admission.held = 1                  # every seat taken
        r = client.post(path, json={**body, "stream": stream})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
        assert len(core.calls) == 1 and core.admission.refused == 1


@pytest.mark.parametrize("service_cls", [PrefillService, MixedService])
def test_instance_refuses_submits_past_its_queue_bound(service_cls):
    """In-process: the admission point itself, exact counts (no cluster, no timing)."""
    torch.set_num_threads(1)
    service = service_cls(Engine(EngineConfig(num_kv_blocks=64)),
                          PDConfig(max_queued_requests=2),
                          InstanceConfig(role=service_cls.role, metrics_port=-1))
    sent: list = []
    service.send = lambda address, msg, frames=(): sent.append(msg)

    def submit(i: int) -> None:
        msg = Submit(f"r{i}", [5, 6, 7, i], SamplingParams(max_tokens=2).to_dict(), 0, 2,
                     "tcp://router", 30.0, decode_id="decode-0",
                     decode_address="tcp://decode" if service_cls is PrefillService else "")
        service.on_submit(Inbound(Envelope("router", 1, i, msg), []))

    try:
        for i in range(4):
            submit(i)
        rejects = [m for m in sent if isinstance(m, Reject)]
        assert [m.req_id for m in rejects] == ["r2", "r3"]
        assert all(m.retryable and m.retry_after > 0 and "queue is full (2 requests"
                   in m.reason for m in rejects)
        assert len(service.engine.scheduler.waiting) == 2
        service.on_step(service.engine.step())    # both scheduled: the queue has room again
        sent.clear()
        submit(4)
        assert not any(isinstance(m, Reject) for m in sent)
    finally:
        service.close()


def test_a_body_that_trickles_gets_408_and_its_seat_back():
    """In-process: a client that sends part of a body and then nothing would hold its
    admission seat for as long as it liked; past --request-body-timeout it gets 408."""
    import asyncio

    core = ScriptedCore()
    core.admission = Admission(limit=1, max_body_bytes=BODY_LIMIT, body_timeout=0.3)
    app = create_app(core)
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path":
             b"/v1/completions", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000)}
    parts = [{"type": "http.request", "body": b'{"prompt": "hi", ', "more_body": True}]
    sent: list[dict] = []

    async def receive():
        if parts:
            return parts.pop(0)
        await asyncio.sleep(30)                  # the rest of the body never comes

    async def send(message):
        sent.append(message)

    async def run():
        start = time.monotonic()
        await asyncio.wait_for(app(scope, receive, send), 10)
        return time.monotonic() - start

    took = asyncio.run(run())
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 408
    body = b"".join(m.get("body", b"") for m in sent[1:])
    assert b"request_timeout" in body and took < 5
    assert core.admission.held == 0 and not core.calls
    with TestClient(app) as client:              # the seat is free again
        assert client.post("/v1/completions", json={"prompt": "hi"}).status_code == 200
