"""A real PD cluster (router, prefill and decode processes on loopback, ``fdpd.testing``):
exact outputs against the offline engine, the decode reservation ledger, grant leases, a decode
killed mid-stream, the openai SDK, and bad input over HTTP and ZMQ.

Every request is greedy with ``ignore_eos`` and ``return_token_ids``, so each output must equal
``LLM("tiny").generate`` for the prompt token ids the router reports it used.
"""

from __future__ import annotations

import math
import random
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import msgpack
import pytest
import torch
import zmq

from fdpd import LLM, SamplingParams
from fdpd.model.tiny import tiny_tokenizer
from fdpd.pd.protocol import Codec, KVBlocks, decode
from fdpd.router.chat import encode_chat_prompt, render_chat
from fdpd.testing import Cluster, ClusterProcess, Completion, complete

GREEDY = {"temperature": 0, "ignore_eos": True, "return_token_ids": True}
TOKENIZER = tiny_tokenizer()
BLOCK = 16
# Pools small enough to start fast, large enough for 64 concurrent requests.
POOL = ["--num-kv-blocks", "2048"]
WORDS = ("the", "cache", "holds", "blocks", "of", "keys", "and", "values", "for", "every",
         "token", "a", "model", "has", "seen", "so", "far", "while", "decode", "instances",
         "stream", "tokens", "back", "to", "clients")


# ---------------------------------------------------------------------- requests and references
@dataclass
class Case:
    path: str
    body: dict
    kind: str
    expected_prompt: list[int]


def _text(rng: random.Random, min_chars: int, max_chars: int) -> str:
    words: list[str] = []
    target = rng.randint(min_chars, max_chars)
    while len(" ".join(words)) < target:
        words.append(rng.choice(WORDS))
    return " ".join(words)[:target] or "x"


def workload(seed: int, n: int = 64) -> list[Case]:
    """Streaming and not, completions and chat, token ids and text, 1..~300 prompt tokens,
    some sharing long prefixes (so prefix caches on P and D take part)."""
    rng = random.Random(seed)
    shared_ids = [rng.randrange(256) for _ in range(200)]
    shared_text = _text(rng, 180, 180)
    system = _text(rng, 150, 150)
    cases = []
    for i in range(n):
        body = {**GREEDY, "max_tokens": rng.randint(8, 32), "stream": rng.random() < 0.5}
        kind = ("ids", "shared-ids", "text", "shared-text", "chat", "shared-chat")[i % 6]
        if kind == "ids":
            prompt = [rng.randrange(256) for _ in range(rng.randint(1, 300))]
            cases.append(Case("/v1/completions", {**body, "prompt": prompt}, kind, prompt))
        elif kind == "shared-ids":
            prompt = shared_ids + [rng.randrange(256) for _ in range(rng.randint(1, 90))]
            cases.append(Case("/v1/completions", {**body, "prompt": prompt}, kind, prompt))
        elif kind in ("text", "shared-text"):
            text = _text(rng, 1, 280) if kind == "text" else shared_text + _text(rng, 1, 60)
            cases.append(Case("/v1/completions", {**body, "prompt": text}, kind,
                              TOKENIZER.encode(text)))
        else:
            messages = [{"role": "user", "content": _text(rng, 1, 120)}]
            if kind == "shared-chat":
                messages.insert(0, {"role": "system", "content": system})
            prompt = encode_chat_prompt(render_chat(messages, TOKENIZER.chat_template,
                                                    TOKENIZER), TOKENIZER)
            cases.append(Case("/v1/chat/completions", {**body, "messages": messages}, kind,
                              prompt))
    return cases


@pytest.fixture(scope="module")
def reference() -> Callable[[list[tuple[list[int], int]]], list[list[int]]]:
    """``expected([(prompt_ids, max_tokens), ...])``: greedy token ids of the offline engine."""
    llm = LLM("tiny", num_kv_blocks=4096)
    cache: dict[tuple[tuple[int, ...], int], list[int]] = {}

    def expected(items: list[tuple[list[int], int]]) -> list[list[int]]:
        todo = list({(tuple(p), n) for p, n in items if (tuple(p), n) not in cache})
        if todo:
            # One torch thread, as in the cluster's processes: with two, on this two-core
            # machine the offline engine ran ~20x slower.
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                outs = llm.generate([{"prompt_token_ids": list(p)} for p, _ in todo],
                                    [SamplingParams(max_tokens=n, temperature=0,
                                                    ignore_eos=True) for _, n in todo])
            finally:
                torch.set_num_threads(threads)
            for key, out in zip(todo, outs):
                cache[key] = list(out.outputs[0].token_ids)
        return [cache[(tuple(p), n)] for p, n in items]

    return expected


def http_client(cluster: Cluster) -> httpx.Client:
    return cluster.client(timeout=60, limits=httpx.Limits(max_connections=128,
                                                          max_keepalive_connections=128))


def run_concurrently(cluster: Cluster, cases: list[Case]) -> list[Completion]:
    client = http_client(cluster)
    with ThreadPoolExecutor(len(cases)) as pool:
        return list(pool.map(lambda c: complete(client, c.path, c.body), cases))


def assert_exact(cluster: Cluster, cases: list[Case], results: list[Completion], reference):
    problems = []
    for i, (case, res) in enumerate(zip(cases, results)):
        if not res.ok:
            problems.append(f"#{i} {case.kind}: status {res.status}, error {res.error}")
        elif res.prompt_token_ids != case.expected_prompt:
            problems.append(f"#{i} {case.kind}: router used prompt ids "
                            f"{res.prompt_token_ids[:8]}... ({len(res.prompt_token_ids)}), "
                            f"expected {case.expected_prompt[:8]}... "
                            f"({len(case.expected_prompt)})")
    assert not problems, why(cluster, "\n".join(problems))
    want = reference([(r.prompt_token_ids, c.body["max_tokens"])
                      for c, r in zip(cases, results)])
    for i, (case, res, exp) in enumerate(zip(cases, results, want)):
        if res.token_ids != exp or res.finish_reason != "length":
            at = next((k for k, (a, b) in enumerate(zip(res.token_ids, exp)) if a != b),
                      min(len(res.token_ids), len(exp)))
            problems.append(f"#{i} {case.kind} stream={case.body['stream']} prompt "
                            f"{len(res.prompt_token_ids)} tokens: differs at output {at}: "
                            f"got {res.token_ids} want {exp} ({res.finish_reason})")
    assert not problems, (f"{len(problems)} of {len(cases)} outputs differ from the offline "
                          "engine:\n" + "\n".join(problems) + "\n" + cluster.logs())


def why(cluster: Cluster, *facts) -> str:
    """An assertion message: the facts, then every process's log tail."""
    return " ".join(str(f) for f in facts) + "\n" + cluster.logs()


def decode_views(cluster: Cluster) -> list[dict]:
    c = cluster.cluster()
    return [cluster.view(p, c) for p in cluster.instances("decode")]


def fresh_view(cluster: Cluster, instance: ClusterProcess, timeout: float = 5.0) -> dict:
    """The instance's /v1/cluster entry from a heartbeat sent after this call."""
    start = time.monotonic()

    def fresh() -> dict | None:
        v = cluster.view(instance)
        return v if v and v["seconds_since_heartbeat"] < time.monotonic() - start else None

    return cluster.wait_for(fresh, timeout, what=f"a fresh heartbeat from {instance.name}")


def assert_all_computed_prompts(cluster: Cluster, role: str) -> None:
    """Every ``role`` instance looked prompts up in its prefix cache (/metrics, as of its
    latest heartbeat), i.e. the router spread the work."""
    def queried() -> dict[str, float]:
        out = {}
        for line in cluster.metrics().splitlines():
            m = re.match(r'fdpd:prefix_cache_queries_total\{instance="([^"]+)".*\} (\S+)',
                         line)
            if m:
                out[m.group(1)] = float(m.group(2))
        return out

    cluster.wait_for(lambda: all(queried().get(p.name) for p in cluster.instances(role)), 3,
                     what=f"every {role} instance to have computed prompts")


# ---------------------------------------------------------------------- exactness
@pytest.fixture(scope="module")
def pd_cluster(tmp_path_factory):
    """One 1P+1D cluster shared by the tests that do not break it."""
    with Cluster(1, 1, common_args=POOL, log_dir=tmp_path_factory.mktemp("pd")) as cluster:
        yield cluster


@pytest.mark.timeout(60)
def test_exact_64_concurrent_1p1d(pd_cluster, reference):
    cases = workload(seed=1)
    results = run_concurrently(pd_cluster, cases)
    assert_exact(pd_cluster, cases, results, reference)
    (d,) = decode_views(pd_cluster)
    assert d["num_preemptions"] == 0, why(pd_cluster, d)


@pytest.mark.timeout(60)
def test_exact_64_concurrent_2p2d(cluster_factory, reference):
    cluster = cluster_factory(num_prefill=2, num_decode=2, common_args=POOL)
    cases = workload(seed=2)
    results = run_concurrently(cluster, cases)
    assert_exact(cluster, cases, results, reference)
    committed = {p.name: fresh_view(cluster, p)["ledger"]["grants_committed"]
                 for p in cluster.instances("decode")}
    assert all(n > 0 for n in committed.values()), why(cluster, "a decode got no traffic",
                                                       committed)
    assert_all_computed_prompts(cluster, "prefill")


@pytest.mark.timeout(60)
def test_exact_colocated_2_mixed(cluster_factory, reference):
    cluster = cluster_factory(num_prefill=0, num_decode=0, num_mixed=2, common_args=POOL)
    cases = workload(seed=3, n=32)
    results = run_concurrently(cluster, cases)
    assert_exact(cluster, cases, results, reference)
    assert 'fdpd:router_requests_total{mode="mixed"} 32' in cluster.metrics()
    assert_all_computed_prompts(cluster, "mixed")


# ---------------------------------------------------------------------- the reservation ledger
@pytest.mark.timeout(60)
def test_reservation_defers_instead_of_preempting(cluster_factory, reference):
    """B cannot fit the decode's headroom while A runs: it waits in the ledger (not admitted and
    then preempted), and runs once A finished."""
    horizon = 64
    cluster = cluster_factory(num_prefill=1, num_decode=1, heartbeat_interval=0.1,
                              prefill_args=["--num-kv-blocks", "512"],
                              decode_args=["--num-kv-blocks", "128", "--reserve-tokens",
                                           str(horizon)])
    rng = random.Random(7)
    prompt_a = [rng.randrange(256) for _ in range(100)]
    prompt_b = [rng.randrange(256) for _ in range(1900)]
    body_a = {**GREEDY, "prompt": prompt_a, "max_tokens": 1200, "stream": True}
    body_b = {**GREEDY, "prompt": prompt_b, "max_tokens": 100, "stream": True}
    # What the ledger will ask for B (nothing of B's prompt is cached on the decode).
    need_b = math.ceil((len(prompt_b) + 1 + min(body_b["max_tokens"] - 1, horizon)) / BLOCK)
    a_streaming = threading.Event()
    client = http_client(cluster)
    (decode_proc,) = cluster.instances("decode")
    with ThreadPoolExecutor(2) as pool:
        fut_a = pool.submit(complete, client, "/v1/completions", body_a,
                            on_event=lambda r: a_streaming.set() if r.token_ids else None)
        assert a_streaming.wait(20), why(cluster, "A produced no token")
        fut_b = pool.submit(complete, client, "/v1/completions", body_b)

        def b_waiting() -> dict | None:
            v = cluster.view(decode_proc)
            return v if v["ledger"]["waiting_allocs"] == 1 else None

        snap = cluster.wait_for(b_waiting, 15, interval=0.02, what="B queued in the ledger")
        ledger = snap["ledger"]
        assert not fut_a.done(), "A finished before B was seen waiting: make A longer"
        assert snap["running"] == 1, snap
        assert ledger["headroom_blocks"] == (ledger["free_blocks"] - ledger["reserved_blocks"]
                                             - ledger["pending_reserved_blocks"]), ledger
        assert ledger["headroom_blocks"] < need_b, (need_b, ledger)
        assert ledger["free_blocks"] + ledger["used_blocks"] == ledger["total_blocks"], ledger
        res_a, res_b = fut_a.result(30), fut_b.result(30)
    assert res_a.ok and res_b.ok, why(cluster, res_a.error, res_b.error)
    # B is granted only once A's blocks are free: its first token follows A's last (by ~10 ms
    # on the wire; the slack is for the two client threads being scheduled late, and is small
    # next to A's ~3 s of decoding).
    assert res_b.first_token_at > res_a.finished_at - 0.05, why(
        cluster, f"B's first token came {res_a.finished_at - res_b.first_token_at:.3f} s "
        "before A ended")
    final = fresh_view(cluster, decode_proc)
    assert final["num_preemptions"] == 0, why(cluster, final)
    assert final["ledger"]["grants_deferred"] >= 1, final["ledger"]
    want_a, want_b = reference([(prompt_a, 1200), (prompt_b, 100)])
    assert res_a.token_ids == want_a, why(cluster, "A differs", res_a.token_ids, want_a)
    assert res_b.token_ids == want_b, why(cluster, "B differs", res_b.token_ids, want_b)


# ---------------------------------------------------------------------- leases
# A lease runs from the grant, which P asks for before it computes: it must outlast a healthy
# prefill (~1.5 s for the 4000-token prompt below in 16-token chunks), and the router's
# liveness timeout (6 x 0.75 s) must outlast it, so that the lease is what fires.
GRANT_TTL = 3.0
LEASE_PROMPT_TOKENS = 4000


def _lease_cluster(cluster_factory, num_prefill: int) -> Cluster:
    return cluster_factory(num_prefill=num_prefill, num_decode=1, heartbeat_interval=0.1,
                           common_args=POOL,
                           prefill_args=["--max-num-batched-tokens", "16"],
                           decode_args=["--grant-ttl", str(GRANT_TTL)],
                           router_args=["--heartbeat-interval", "0.75"])


def _freeze_prefill_holding_grant(cluster: Cluster, pool: ThreadPoolExecutor, client, body
                                  ) -> tuple[Future, ClusterProcess, float]:
    """Send ``body``; SIGSTOP the prefill computing it while the decode holds its grant."""
    (decode_proc,) = cluster.instances("decode")
    committed = cluster.view(decode_proc)["ledger"]["grants_committed"]
    fut = pool.submit(complete, client, "/v1/completions", body)

    def computing() -> ClusterProcess | None:
        c = cluster.cluster()
        for p in cluster.instances("prefill"):
            v = cluster.view(p, c)
            if p.alive and v and (v.get("running") or v["free_blocks"] < v["num_blocks"]):
                return p
        return None

    prefill = cluster.wait_for(computing, 10, interval=0.01, what="a prefill computing")
    cluster.pause(prefill)
    paused_at = time.monotonic()
    v = fresh_view(cluster, decode_proc)
    assert v["ledger"]["grants_committed"] == committed, why(cluster, "the transfer beat the "
                                                             "SIGSTOP: make the prefill slower")
    assert v["pending_grants"] == 1, why(cluster, v)
    assert metric(cluster, "fdpd:pending_grants", instance=decode_proc.name) == 1
    return fut, prefill, paused_at


def _wait_lease_expired(cluster: Cluster, paused_at: float) -> dict:
    (decode_proc,) = cluster.instances("decode")
    v = cluster.wait_for(lambda: (x := cluster.view(decode_proc))["ledger"]["grants_expired"]
                         and x, GRANT_TTL + 2.0, interval=0.02, what="the grant to expire")
    assert time.monotonic() - paused_at < GRANT_TTL + 1.0, why(cluster, "lease expired late")
    assert metric(cluster, "fdpd:grants_total", instance=decode_proc.name,
                  result="expired") >= 1
    return v


def metric(cluster: Cluster, name: str, **labels: str) -> float | None:
    """One series of the router's /metrics (the cluster view), by name and labels."""
    for line in cluster.metrics().splitlines():
        series, _, value = line.rpartition(" ")
        if series.split("{")[0] == name and all(f'{k}="{v}"' in series
                                                 for k, v in labels.items()):
            return float(value)
    return None


@pytest.mark.timeout(60)
@pytest.mark.parametrize("then", ["kill", "resume"])
def test_expired_lease_is_retried_on_another_prefill(cluster_factory, reference, then):
    """The frozen prefill is then killed, or woken up: late, with the expired grant's messages
    queued (its replies about the first attempt must not disturb the retry)."""
    cluster = _lease_cluster(cluster_factory, num_prefill=2)
    prompt = [random.Random(11).randrange(256) for _ in range(LEASE_PROMPT_TOKENS)]
    body = {**GREEDY, "prompt": prompt, "max_tokens": 16}
    with ThreadPoolExecutor(1) as pool:
        fut, frozen, paused_at = _freeze_prefill_holding_grant(cluster, pool,
                                                               http_client(cluster), body)
        _wait_lease_expired(cluster, paused_at)
        if then == "kill":
            cluster.kill(frozen)
        else:
            cluster.resume(frozen)
        res = fut.result(30)
    assert res.ok, why(cluster, res.status, res.error)
    assert res.token_ids == reference([(prompt, 16)])[0], why(cluster, res.token_ids)
    assert cluster.cluster()["router"]["retries"] >= 1


@pytest.mark.timeout(60)
def test_expired_lease_with_one_prefill_fails_cleanly(cluster_factory):
    cluster = _lease_cluster(cluster_factory, num_prefill=1)
    (decode_proc,) = cluster.instances("decode")
    prompt = [random.Random(12).randrange(256) for _ in range(LEASE_PROMPT_TOKENS)]
    with ThreadPoolExecutor(1) as pool:
        fut, frozen, paused_at = _freeze_prefill_holding_grant(
            cluster, pool, http_client(cluster), {**GREEDY, "prompt": prompt, "max_tokens": 16})
        _wait_lease_expired(cluster, paused_at)
        # The lease freed the blocks although the prefill never came back.
        cluster.wait_for(lambda: (v := cluster.view(decode_proc))["pending_grants"] == 0
                         and v["free_blocks"] == v["num_blocks"], 2,
                         what="the expired grant's blocks freed")
        cluster.kill(frozen)
        res = fut.result(15)
    assert res.status in (503, 504), why(cluster, res.status, res.error)
    assert res.error and res.error.get("message"), res.error
    assert time.monotonic() - paused_at < 10


# ---------------------------------------------------------------------- decode killed mid-stream
@pytest.mark.timeout(60)
def test_decode_killed_mid_stream_then_restarted(cluster_factory, reference):
    # --max-resumes 0: the stream is not resumed elsewhere (tests/integration/
    # test_resume_on_failure.py shows that), so it ends with the clean error of a broken stream.
    cluster = cluster_factory(num_prefill=1, num_decode=2, common_args=POOL,
                              router_args=["--max-resumes", "0"])
    client = http_client(cluster)
    body = {**GREEDY, "prompt": "a long story: ", "max_tokens": 3000, "stream": True}
    killed: dict[str, object] = {}

    def kill_after_a_few_tokens(res: Completion) -> None:
        if len(res.token_ids) >= 5 and not killed:
            def serving() -> ClusterProcess | None:
                c = cluster.cluster()
                return next((p for p in cluster.instances("decode")
                             if (cluster.view(p, c) or {}).get("running")), None)

            victim = cluster.wait_for(serving, 5, what="the decode serving the stream")
            killed.update(proc=victim, epoch=cluster.view(victim)["epoch"],
                          at=time.monotonic())
            cluster.kill(victim)

    res = complete(client, "/v1/completions", body, on_event=kill_after_a_few_tokens)
    assert killed, "the stream ended before the decode could be killed"
    victim: ClusterProcess = killed["proc"]
    assert res.error is not None and res.finish_reason is None, why(cluster, res.error,
                                                                    res.finish_reason)
    assert res.done, "the SSE stream did not end with [DONE] after the error event"
    assert time.monotonic() - killed["at"] < 10, "the broken stream took too long to end"
    assert len(res.token_ids) < body["max_tokens"]
    view = cluster.wait_for(lambda: (v := cluster.view(victim)) and not v["healthy"] and v,
                            10, what=f"{victim.name} marked unhealthy")
    assert view["epoch"] == killed["epoch"]
    # The cluster keeps serving on the surviving decode.
    cases = workload(seed=4, n=6)
    assert_exact(cluster, cases, run_concurrently(cluster, cases), reference)

    again = cluster.restart(victim)
    assert again["epoch"] != killed["epoch"] and again["healthy"]
    before = again["ledger"]["grants_committed"]

    def restarted_served() -> bool:
        cases = workload(seed=5, n=8)
        assert_exact(cluster, cases, run_concurrently(cluster, cases), reference)
        return fresh_view(cluster, victim)["ledger"]["grants_committed"] > before

    cluster.wait_for(restarted_served, 30, interval=0.0, what="the restarted decode serving")


# ---------------------------------------------------------------------- ecosystem
@pytest.mark.timeout(60)
def test_openai_sdk(pd_cluster, reference):
    openai = pytest.importorskip("openai")
    sdk = openai.OpenAI(base_url=f"{pd_cluster.base_url}/v1", api_key="unused",
                        max_retries=0, timeout=30)
    extra = {"ignore_eos": True, "return_token_ids": True}
    assert [m.id for m in sdk.models.list().data] == ["tiny"]

    r = sdk.completions.create(model="tiny", prompt="Hello, my name is", max_tokens=12,
                               temperature=0, extra_body=extra)
    choice = r.choices[0]
    assert choice.finish_reason == "length" and r.usage.completion_tokens == 12
    want = reference([(TOKENIZER.encode("Hello, my name is"), 12)])[0]
    assert choice.token_ids == want and choice.text == TOKENIZER.decode(want)

    stream = sdk.completions.create(model="tiny", prompt="Hello, my name is", max_tokens=12,
                                    temperature=0, stream=True, extra_body=extra,
                                    stream_options={"include_usage": True})
    ids, text, usage = [], "", None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            ids += c.token_ids or []
            text += c.text
    assert ids == want and text == choice.text and usage.completion_tokens == 12

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    r = sdk.chat.completions.create(model="tiny", messages=messages, max_tokens=10,
                                    temperature=0, extra_body=extra)
    prompt = r.prompt_token_ids
    want = reference([(prompt, 10)])[0]
    assert r.choices[0].token_ids == want and r.choices[0].finish_reason == "length"
    assert r.choices[0].message.role == "assistant"

    stream = sdk.chat.completions.create(model="tiny", messages=messages, max_tokens=10,
                                         temperature=0, stream=True, extra_body=extra)
    ids, content = [], ""
    for chunk in stream:
        for c in chunk.choices:
            ids += getattr(c, "token_ids", None) or []
            content += c.delta.content or ""
    assert ids == want and content == r.choices[0].message.content


# ---------------------------------------------------------------------- bad input
BAD_REQUESTS = [
    ("malformed JSON", "/v1/completions", b'{"prompt": "hi", ', 400),
    ("wrong type", "/v1/completions", {"prompt": "hi", "max_tokens": "ten"}, 400),
    ("max_tokens 0", "/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400),
    ("prompt over context", "/v1/completions", {"prompt": [65] * 5000, "max_tokens": 4}, 400),
    ("unknown model", "/v1/completions", {"model": "gpt-9", "prompt": "hi"}, 404),
    ("empty messages", "/v1/chat/completions", {"messages": []}, 400),
    ("n=0", "/v1/completions", {"prompt": "hi", "n": 0}, 400),
    ("n=17 chat", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "hi"}], "n": 17}, 400),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("stream", [False, True])
def test_bad_http_input(pd_cluster, reference, stream):
    client = http_client(pd_cluster)
    for name, path, body, status in BAD_REQUESTS:
        if isinstance(body, bytes):
            r = client.post(path, content=body, headers={"content-type": "application/json"})
        else:
            r = client.post(path, json={**body, "stream": stream})
        assert r.status_code == status, (name, r.status_code, r.text)
        err = r.json().get("error")
        assert isinstance(err, dict) and err.get("message") and err.get("type"), (name, r.text)
    res = complete(client, "/v1/completions",
                   {**GREEDY, "prompt": "still fine", "max_tokens": 8, "stream": stream})
    assert res.ok and res.token_ids == reference([(TOKENIZER.encode("still fine"), 8)])[0]


@pytest.mark.timeout(60)
def test_malformed_zmq_messages_are_counted_and_harmless(pd_cluster, reference):
    (decode_proc,) = pd_cluster.instances("decode")
    before = fresh_view(pd_cluster, decode_proc)
    assert "transport" in before, "/v1/cluster does not expose the transport counters"
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(before["address"])
        sock.send(b"\xc1 not msgpack at all")
        sock.send(msgpack.packb({"v": 1, "t": "no_such_type", "src": "intruder", "ep": 1,
                                 "seq": 0, "p": {}}))
        sock.send(msgpack.packb({"v": 99, "t": "abort", "src": "intruder", "ep": 1, "seq": 1,
                                 "p": {"req_id": "x"}}))
        kv = KVBlocks("no-such-grant", "req-x", 0, 1, "float32", [4, 2, 1, BLOCK, 2, 32])
        sock.send_multipart([Codec("intruder", 1).encode(kv), bytes(4 * 2 * BLOCK * 2 * 32 * 4)])
        replies = []
        while len(replies) < 3 and sock.poll(5000):
            replies.append(decode(sock.recv()).msg)
    finally:
        sock.close()
        ctx.term()
    assert [type(m).__name__ for m in replies] == ["Error"] * 3, replies

    def counted() -> dict | None:
        v = pd_cluster.view(decode_proc)
        grew = (v["transport"]["malformed"] >= before["transport"]["malformed"] + 3
                and v["ledger"]["grants_stale_kv"] >= before["ledger"]["grants_stale_kv"] + 1)
        return v if grew else None

    after = pd_cluster.wait_for(counted, 5, what="the malformed messages counted")
    assert after["healthy"] and after["handler_errors"] == before["handler_errors"], \
        why(pd_cluster, after)
    assert after["kv_dropped"] == before["kv_dropped"] + 1
    cases = workload(seed=6, n=12)
    assert_exact(pd_cluster, cases, run_concurrently(pd_cluster, cases), reference)
