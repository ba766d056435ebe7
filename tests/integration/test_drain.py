"""Graceful drain: SIGTERM on a decode (or mixed) instance stops new work, writes its running
requests' KV to the store, and the router resumes them on another instance: every client sees
one continuous, token-exact stream. SIGTERM on a prefill finishes its queue. Both exit 0."""

from __future__ import annotations

import random
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import zmq

from fdpd import LLM, SamplingParams
from fdpd.testing.expected import offline_greedy
from fdpd.pd.protocol import (
    AllocRequest,
    Codec,
    Grant,
    Heartbeat,
    Message,
    Register,
    RegisterAck,
    Submit,
)
from fdpd.pd.protocol import decode as decode_message
from fdpd.testing import complete, free_port
from fdpd.testing.processes import ClusterProcess, child_env, deadline_loop

pytestmark = pytest.mark.timeout(240)

NUM = 6
MAX_TOKENS = 800          # long enough (~2 s of decoding here) that SIGTERM lands mid-stream


def prompts(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(rng.randrange(20, 70))] for _ in range(NUM)]


@pytest.fixture(scope="module")
def expected() -> list[list[int]]:
    return offline_greedy(prompts(), MAX_TOKENS)


def stream(client, prompt):
    return complete(client, "/v1/completions", {
        "model": "tiny", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
        "ignore_eos": True, "return_token_ids": True, "stream": True,
        "stream_options": {"include_usage": True}})


def drain_busiest(cluster, role: str):
    """SIGTERM the instance of ``role`` with the most running requests, once it has some;
    returns (it, its running count before the drain, seconds the drain took)."""
    def busiest():
        views = [(cluster.view(p) or {}, p) for p in cluster.instances(role)]
        running, proc = max(((v.get("running") or 0, p) for v, p in views),
                            key=lambda x: x[0])
        return (proc, running) if running else None

    proc, running = cluster.wait_for(busiest, timeout=60, what=f"a {role} running requests")
    start = time.monotonic()
    cluster.kill(proc, signal.SIGTERM)              # returns once it exited
    return proc, running, time.monotonic() - start


@pytest.mark.parametrize("topology", ["pd+store", "pd", "mixed+store"])
def test_sigterm_moves_running_streams_to_another_instance_exactly(
        cluster_factory, expected, topology, request):
    store = (["--kv-store", request.getfixturevalue("redis_url")]
             if topology.endswith("+store") else [])
    if topology.startswith("mixed"):
        cluster = cluster_factory(num_prefill=0, num_decode=0, num_mixed=2, mixed_args=store)
        role = "mixed"
    else:
        cluster = cluster_factory(num_prefill=1, num_decode=2, prefill_args=store,
                                  decode_args=store)
        role = "decode"
    client = cluster.client()
    with ThreadPoolExecutor(NUM) as pool:
        futures = [pool.submit(stream, client, p) for p in prompts()]
        drained, running, seconds = drain_busiest(cluster, role)
        results = [f.result() for f in futures]

    assert drained.proc.returncode == 0, drained.log_tail()
    for out, want in zip(results, expected):
        assert out.ok, (out.status, out.error, cluster.logs())   # no error event, no gap
        assert out.token_ids == want
    router = cluster.cluster()["router"]
    assert router["migrations"] >= running >= 1, router
    assert router["retries"] == 0, router
    if store:
        # Whoever resumed the moved requests restored their KV from the store.
        served_by = [cluster.view(p) for p in cluster.instances()
                     if p is not drained and p.role in ("prefill", "mixed")]
        restored = sum(v["kv_store"]["blocks_restored"] for v in served_by if v)
        assert restored > 0, served_by
    print(f"{topology}: drained {drained.name} with {running} running in {seconds:.2f} s")


def test_sigterm_on_a_prefill_finishes_its_queue(cluster_factory):
    cluster = cluster_factory(num_prefill=2, num_decode=1)
    client = cluster.client()
    rng = random.Random(3)
    work = [[rng.randrange(256) for _ in range(rng.randrange(1000, 2000))] for _ in range(16)]
    llm = LLM("tiny", num_kv_blocks=2048)
    want = [o.outputs[0].token_ids for o in llm.generate(
        work, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))]

    def one(prompt):
        return complete(client, "/v1/completions", {
            "model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True})

    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(one, p) for p in work]
        target = cluster.wait_for(
            lambda: next((p for p in cluster.instances("prefill")
                          if (cluster.view(p) or {}).get("waiting")), None),
            timeout=60, what="a prefill with queued requests")
        sigterm_at = time.time()
        cluster.kill(target, signal.SIGTERM)
        results = [f.result() for f in futures]
    assert target.proc.returncode == 0, target.log_tail()
    assert [r.token_ids for r in results] == want, [(r.status, r.error) for r in results]
    # The drained prefill finished work it had queued: requests it prefilled ended after the
    # SIGTERM (wall clock, from the router's request timelines).
    recent = cluster.client().get("/v1/requests/recent", params={"limit": 100}).json()["data"]
    finished_after = [t for t in recent if t["prefill_instance"] == target.name
                      and t["arrival_time"] + t["e2e_seconds"] > sigterm_at]
    assert finished_after, recent


def test_a_prefill_whose_decode_died_frees_the_kv_on_the_wire_and_drains_at_once(tmp_path):
    """The decode a prefill ships KV to dies with the frames still queued (it stopped reading):
    the dropped connection tells the prefill at once that this KV will never arrive, so a
    SIGTERMed prefill, waiting for it, stops within seconds, not at the grant TTL (60 s here),
    and its blocks are free. The test plays the router and the decode with its own sockets."""
    ctx = zmq.Context()
    router, decode = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
    for sock in (router, decode):
        sock.setsockopt(zmq.LINGER, 0)
    # The fake decode reads one message (the AllocRequest) and then nothing: with a tiny
    # receive buffer and queue, the prefill's 8 MiB of KV stay queued on its side.
    decode.setsockopt(zmq.RCVHWM, 1)
    decode.setsockopt(zmq.RCVBUF, 4096)
    router_port, decode_port, inbox_port = free_port(), free_port(), free_port()
    router.bind(f"tcp://127.0.0.1:{router_port}")
    decode.bind(f"tcp://127.0.0.1:{decode_port}")
    command = [sys.executable, "-m", "fdpd", "launch", "--role", "prefill", "--model", "tiny",
               "--port", str(inbox_port), "--router", f"127.0.0.1:{router_port}",
               "--instance-id", "prefill-0", "--heartbeat-interval", "0.1",
               "--grant-ttl", "60", "--transfer-timeout", "60", "--num-kv-blocks", "512",
               "--max-model-len", "4096", "--metrics-port", "-1"]
    proc = ClusterProcess("prefill-0", "prefill", command, tmp_path / "prefill-0.log",
                          child_env(None, str(Path(__file__).resolve().parents[2])))
    codec = Codec("router", 1)
    loads: list[dict] = []

    def from_router(timeout: float) -> Message | None:
        if not router.poll(int(timeout * 1000)):
            return None
        ident, frame, *_ = router.recv_multipart()
        msg = decode_message(frame).msg
        if isinstance(msg, Register):
            router.send_multipart([ident, codec.encode(RegisterAck(True))])
        elif isinstance(msg, Heartbeat):
            loads.append(msg.load)
        return msg

    def wait_load(predicate, what: str, timeout: float = 60.0) -> dict:
        for _ in deadline_loop(timeout):
            from_router(0.1)
            if loads and predicate(loads[-1]):
                return loads[-1]
        raise AssertionError(f"no heartbeat with {what}; last: {loads[-1:]}\n"
                             f"{proc.log_tail()}")

    proc.start()
    try:
        total = wait_load(lambda load: True, "a load report")["total_blocks"]
        inbox = ctx.socket(zmq.DEALER)
        inbox.setsockopt(zmq.LINGER, 0)
        inbox.connect(f"tcp://127.0.0.1:{inbox_port}")
        prompt = [random.Random(5).randrange(256) for _ in range(4096 - 8)]
        params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True).to_dict()
        inbox.send(codec.encode(Submit("dead-decode", prompt, params, 1, 8,
                                       f"tcp://127.0.0.1:{router_port}", 60.0, "decode-0",
                                       f"tcp://127.0.0.1:{decode_port}")))
        assert decode.poll(30_000), proc.log_tail()
        ident, frame, *_ = decode.recv_multipart()
        ask = decode_message(frame).msg
        assert isinstance(ask, AllocRequest) and ask.req_id == "dead-decode"
        blocks = -(-len(prompt) // 16)
        decode.send_multipart([ident, Codec("decode-0", 1).encode(
            Grant("dead-decode", "g-1", list(range(blocks)), 0, 60.0))])
        # Shipped, and the blocks still held: the frames are queued for a peer not reading.
        held = wait_load(lambda load: load["kv_blocks_sent"] >= blocks, "all KV handed over")
        time.sleep(1.0)
        from_router(0.3)
        assert loads[-1]["free_blocks"] < total, loads[-1]
        assert held["kv_sends_abandoned"] == 0
        proc.signal(signal.SIGTERM)
        time.sleep(1.0)
        assert proc.alive, "the prefill stopped while its KV was still on the wire"
        decode.close(0)                     # the decode dies: its kernel resets the connection
        closed_at = time.monotonic()
        assert proc.wait(15) == 0, proc.log_tail()
        seconds = time.monotonic() - closed_at
        assert seconds < 10, f"drained {seconds:.1f} s after its decode died"
        assert "not sent (connection lost)" in proc.log_tail(), proc.log_tail()
        print(f"prefill drained {seconds:.2f} s after its decode's connection dropped")
    finally:
        proc.stop(10)
        ctx.destroy(linger=0)
