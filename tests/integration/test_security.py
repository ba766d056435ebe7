"""A cluster with a secret (``FDPD_CLUSTER_SECRET``): it serves exactly what the offline engine
computes, and an intruder who can reach its ports but lacks the secret changes nothing.

The intruder is a plain ZMQ DEALER sending well-formed ``fdpd.pd.protocol`` messages, without a
MAC or with one made with another secret. To the decode's inbox: an AllocRequest for a new
request (it would take blocks), KV and PrefillDone for a made-up grant, an Abort for a request in
flight (it would end it), each also under the prefill's name with a far-future epoch (it would
shut the real prefill out as stale). To the router's control port: a Register of a new decode and
Tokens ending the request in flight. Afterwards the decode's ledger shows only the real
request's grant, no instance was added, the in-flight request completed exactly, nothing was
answered, and each process counted exactly the messages it got as ``unauthenticated``. A
message signed with the right secret and sent twice is delivered once and counted once as
``replayed``; one with an epoch two days ahead is refused (``future_epoch``).
"""

from __future__ import annotations

import re
import secrets
import time
from concurrent.futures import Future, ThreadPoolExecutor

import httpx
import pytest

from fdpd import LLM, SamplingParams
from fdpd.pd.auth import MAX_EPOCH_SKEW_NS, MessageAuthenticator
from fdpd.pd.protocol import (
    Abort,
    AllocRequest,
    Codec,
    KVBlocks,
    PrefillDone,
    Register,
    Tokens,
    new_epoch,
)
from fdpd.testing import Cluster, Completion, complete

pytestmark = pytest.mark.timeout(120)

SECRET = secrets.token_hex(16)
GREEDY = {"temperature": 0, "ignore_eos": True, "return_token_ids": True}
BLOCK = 16
TINY_KV_SHAPE = [4, 2, 1, BLOCK, 2, 32]          # one block of the tiny model's KV
LEDGER_COUNTERS = ("grants_granted", "grants_rejected", "grants_expired", "grants_stale_kv",
                   "grants_committed")
DECODE_COUNTERS = ("kv_dropped", "transfer_failures", "handler_errors", "unexpected_messages")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with Cluster(1, 1, common_args=["--num-kv-blocks", "512"],
                 env={"FDPD_CLUSTER_SECRET": SECRET},
                 log_dir=tmp_path_factory.mktemp("secure")) as c:
        yield c


@pytest.fixture(scope="module")
def reference():
    llm = LLM("tiny", num_kv_blocks=512)

    def expected(prompt: list[int], max_tokens: int) -> list[int]:
        out = llm.generate({"prompt_token_ids": prompt},
                           SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
        return list(out[0].outputs[0].token_ids)

    return expected


def fresh_view(cluster: Cluster, name: str, since: float, predicate=lambda v: True,
               what: str = "") -> dict:
    """The instance's /v1/cluster entry from a heartbeat sent after ``since`` (monotonic)
    that satisfies ``predicate``."""
    def fresh() -> dict | None:
        v = cluster.view(name)
        ok = v and v["seconds_since_heartbeat"] < time.monotonic() - since and predicate(v)
        return v if ok else None

    return cluster.wait_for(fresh, 10, what=what or f"a fresh heartbeat from {name}")


def prompt(seed: int, n: int) -> list[int]:
    return [(seed * 31 + i * 7) % 256 for i in range(n)]


def test_cluster_with_a_secret_serves_exactly(cluster, reference):
    client = cluster.client()
    cases = [(prompt(i, 5 + 37 * i), 8 + 3 * i, i % 2 == 0) for i in range(6)]
    with ThreadPoolExecutor(len(cases)) as pool:
        results = list(pool.map(lambda c: complete(client, "/v1/completions", {
            **GREEDY, "prompt": c[0], "max_tokens": c[1], "stream": c[2]}), cases))
    for (ids, n, _), res in zip(cases, results):
        assert res.ok and res.finish_reason == "length", (res.status, res.error)
        assert res.token_ids == reference(ids, n)
    view = cluster.cluster()
    assert view["router"]["authenticated"] is True
    # Real traffic is never dropped: every process signs, and every process verifies.
    for transport in [view["router"]["transport"],
                      *(fresh_view(cluster, p.name, time.monotonic())["transport"]
                        for p in cluster.instances())]:
        assert transport["unauthenticated"] == transport["replayed"] == 0, transport


def test_forged_messages_without_the_secret_change_nothing(cluster, reference, intruder):
    (decode,) = cluster.instances("decode")
    before = fresh_view(cluster, decode.name, time.monotonic())
    router_before = cluster.cluster()["router"]["transport"]["unauthenticated"]
    instances = {v["instance_id"] for v in cluster.cluster()["instances"]}

    # A long request, so that the forged Abort arrives while it runs.
    ids, max_tokens = prompt(99, 40), 400
    request_id: Future[str] = Future()

    def first_event(out: Completion) -> None:
        if not request_id.done():
            request_id.set_result(out.events[0]["id"])

    with ThreadPoolExecutor(1) as pool:
        stream = pool.submit(complete, cluster.client(), "/v1/completions", {
            **GREEDY, "prompt": ids, "max_tokens": max_tokens, "stream": True},
            on_event=first_event)
        victim = request_id.result(timeout=60)

        unsigned = Codec("intruder", new_epoch())
        # Signed with another secret, and claiming to be the prefill's next incarnation
        # (accepted, every real message of the prefill would be dropped as stale).
        forged = Codec("prefill-0", time.time_ns() + 10**12)
        wrong = MessageAuthenticator(b"not the cluster's secret, sorry")
        to_decode = [
            (AllocRequest(req_id="forged-1", prompt_token_ids=prompt(7, 40),
                          params=SamplingParams(max_tokens=8).to_dict(), seed=0, max_tokens=8,
                          reply_to="tcp://127.0.0.1:1", router_reply_to="tcp://127.0.0.1:1",
                          timeout_s=5.0), []),
            (KVBlocks("forged-grant", "forged-1", 0, 1, "float32", TINY_KV_SHAPE),
             [bytes(4 * 2 * BLOCK * 2 * 32 * 4)]),
            (PrefillDone("forged-grant", "forged-1", 7, None, 1, 0), []),
            (Abort(victim, "forged"), []),
        ]
        sock = intruder(before["address"])
        for msg, frames in to_decode:
            sock.send_multipart([unsigned.encode(msg), *frames])
            env = forged.encode(msg)
            sock.send_multipart([env, *frames, wrong.sign([env, *frames])])
        router_sock = intruder(f"tcp://127.0.0.1:{cluster.control_port}")
        router_sock.send(unsigned.encode(Register("decode-evil", "decode", "tcp://127.0.0.1:1",
                                                  "tiny", BLOCK, 512, 4096)))
        env = forged.encode(Tokens(victim, [1, 2, 3], finished=True, finish_reason="stop"))
        router_sock.send_multipart([env, wrong.sign([env])])

        # The decode counted all 8, and a heartbeat sent after that still has the request
        # running: it survived the forged Abort.
        sent = len(to_decode) * 2
        dropped = fresh_view(
            cluster, decode.name, time.monotonic(),
            lambda v: v["transport"]["unauthenticated"] >= before["transport"][
                "unauthenticated"] + sent, what="the forged messages counted")
        assert dropped["running"] == 1, dropped
        cluster.wait_for(lambda: cluster.cluster()["router"]["transport"]["unauthenticated"]
                         >= router_before + 2, 10, what="the router's drops counted")
        result = stream.result(timeout=90)

    assert result.ok and result.finish_reason == "length", (result.status, result.error)
    assert result.token_ids == reference(ids, max_tokens)
    after = fresh_view(cluster, decode.name, time.monotonic())
    assert after["transport"]["unauthenticated"] == \
        before["transport"]["unauthenticated"] + sent
    assert after["transport"]["replayed"] == before["transport"]["replayed"]
    # Only the real request got a grant; nothing forged was granted, written or committed.
    for key in LEDGER_COUNTERS:
        grew = 1 if key in ("grants_granted", "grants_committed") else 0
        assert after["ledger"][key] == before["ledger"][key] + grew, key
    for key in DECODE_COUNTERS:
        assert after[key] == before[key], key
    view = cluster.cluster()
    assert {v["instance_id"] for v in view["instances"]} == instances
    assert view["router"]["transport"]["unauthenticated"] == router_before + 2
    # Nothing was answered, and the prefill was not shut out by the forged epoch.
    assert not sock.poll(0) and not router_sock.poll(0)
    res = complete(cluster.client(), "/v1/completions",
                   {**GREEDY, "prompt": prompt(5, 30), "max_tokens": 12})
    assert res.ok and res.token_ids == reference(prompt(5, 30), 12)
    # The router's /metrics shows the same counts (instances' and its own).
    text = httpx.get(f"{cluster.base_url}/metrics", timeout=10).text
    for who, count in ((decode.name, after["transport"]["unauthenticated"]),
                       ("router", view["router"]["transport"]["unauthenticated"])):
        m = re.search(rf'^fdpd:transport_unauthenticated_total\{{instance="{who}",'
                      rf'role="\w+"\}} (\S+)$', text, re.MULTILINE)
        assert m and float(m.group(1)) == count, (who, m and m.group(0))


def test_replayed_and_future_messages_are_dropped_and_counted(cluster, intruder):
    (decode,) = cluster.instances("decode")
    view = fresh_view(cluster, decode.name, time.monotonic())
    before = view["transport"]
    auth = MessageAuthenticator(SECRET.encode())
    env = Codec("replayer", new_epoch()).encode(Abort("no-such-request", "test"))
    captured = [env, auth.sign([env])]
    sock = intruder(view["address"])
    sock.send_multipart(captured)

    def counted(key: str, n: int):
        return lambda v: v["transport"][key] >= before[key] + n

    fresh_view(cluster, decode.name, time.monotonic(), counted("received", 1),
               what="the signed message received")
    sock.send_multipart(captured)                    # the identical frames again
    future = Codec("replayer-2", time.time_ns() + 2 * MAX_EPOCH_SKEW_NS).encode(Abort("x"))
    sock.send_multipart([future, auth.sign([future])])
    after = fresh_view(cluster, decode.name, time.monotonic(), lambda v: counted(
        "replayed", 1)(v) and counted("future_epoch", 1)(v), what="the replay counted")
    t = after["transport"]
    assert (t["received"], t["replayed"], t["future_epoch"], t["unauthenticated"]) == (
        before["received"] + 1, before["replayed"] + 1, before["future_epoch"] + 1,
        before["unauthenticated"]), t
    assert not sock.poll(0)
