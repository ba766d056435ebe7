"""The first token early: the prefill streams the token it sampled to the router as soon as it
holds the decode's grant, ahead of the KV transfer and the decode's first step. The stream
stays one exact sequence (the decode's copy of that token is dropped by the router), and a
decode that dies after that token ends the request cleanly."""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch

from fdpd import LLM, SamplingParams
from fdpd.router.core import StreamBroken, TokenDelta, keep_new_tokens
from fdpd.testing import Cluster, complete

GREEDY = {"temperature": 0, "ignore_eos": True, "return_token_ids": True}


def reference(prompt: list[int], max_tokens: int) -> list[int]:
    torch.set_num_threads(1)
    out = LLM("tiny", num_kv_blocks=256).generate(
        [{"prompt_token_ids": prompt}],
        SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
    return list(out[0].outputs[0].token_ids)


def delta(ids: list[int], position: int, finished: bool = False) -> TokenDelta:
    return TokenDelta(list(ids), [0.0] * len(ids), finished, None, None, 5, 0,
                      position=position)


def test_the_router_keeps_one_copy_of_each_token():
    first = delta([7], 0)
    assert keep_new_tokens(first, 0) and first.token_ids == [7]
    again = delta([7], 0)                       # the decode's copy, after the prefill's
    assert not keep_new_tokens(again, 1)
    both = delta([7, 8], 0)                     # a copy merged with the next token
    assert keep_new_tokens(both, 1) and both.token_ids == [8] and both.logprobs == [0.0]
    end = delta([7], 0, finished=True)          # an end is delivered even with no new token
    assert keep_new_tokens(end, 1) and end.token_ids == []
    legacy = delta([9], -1)
    assert keep_new_tokens(legacy, 4) and legacy.token_ids == [9]
    resumed = delta([5], 12)                    # positions count a resumed request's tail
    assert keep_new_tokens(resumed, 12)
    with pytest.raises(StreamBroken, match="never arrived"):
        keep_new_tokens(delta([9], 3), 1)       # a lost token is never skipped over


@pytest.mark.timeout(90)
def test_first_token_arrives_while_the_decode_holds_the_kv_then_the_request_ends_cleanly():
    """The decode stops itself (SIGSTOP) the moment PrefillDone arrives, before it commits
    the KV: the first token must reach the client anyway, and be the right one. The decode is
    then killed: the request ends with an error event after exactly that one token (never a
    repeat); the prefill holds nothing; a restarted decode serves the next request exactly."""
    rng = random.Random(3)
    prompt = [rng.randrange(256) for _ in range(80)]
    expected = reference(prompt, 8)
    with Cluster(1, 1, common_args=["--num-kv-blocks", "256"], heartbeat_interval=0.1,
                 router_args=["--heartbeat-interval", "0.5"],
                 env={"FDPD_FAULT_POINTS": "decode.kv_received=stop"}) as cluster:
        (decode,) = cluster.instances("decode")
        (prefill,) = cluster.instances("prefill")
        got_first = threading.Event()

        def on_event(c):
            if c.token_ids:
                got_first.set()

        client = cluster.client(timeout=60)
        result: dict = {}
        t = threading.Thread(target=lambda: result.update(c=complete(
            client, "/v1/completions", {**GREEDY, "prompt": prompt, "max_tokens": 8,
                                        "stream": True}, on_event=on_event)))
        t.start()
        cluster.wait_for(lambda: decode.stopped, 30, what="the decode stopped at PrefillDone")
        assert got_first.wait(10), "the first token did not arrive while the decode held it"
        time.sleep(0.3)                       # nothing else can come while the decode is stopped
        cluster.kill(decode)
        t.join(30)
        res = result["c"]
        assert res.token_ids == expected[:1], (res.token_ids, expected)
        assert res.error is not None and res.finish_reason is None, res
        counters = cluster.view(prefill)
        assert counters["first_tokens_early"] == 1, counters
        cluster.restart(decode, env={"FDPD_FAULT_POINTS": ""})
        again = complete(client, "/v1/completions", {**GREEDY, "prompt": prompt,
                                                     "max_tokens": 8, "stream": True})
        assert again.ok and again.token_ids == expected, (again.error, cluster.logs())
        cluster.assert_quiescent()
