"""Top-k and prompt logprobs (``fdpd.engine.logprobs``) and ``n`` samples, through the offline
``LLM`` on the tiny model, exact against the dense reference (``fdpd.model.reference``).

The batch mixes what could misplace a logits row: prompts chunked by a small step budget,
a prompt asking for prompt logprobs beside ones that do not, a duplicate prompt whose prefix is
cached (its prompt logprobs must still come, computed, not skipped), a one-token prompt, and a
pool small enough to preempt (prompt logprobs are then not appended twice).
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from fdpd import LLM, SamplingParams
from fdpd.engine.engine import RequestError
from fdpd.model.reference import ReferenceModel
from fdpd.model.tiny import TINY_CONFIG, tiny_state_dict
from fdpd.outputs import TokenLogprobs, logprobs_from_wire, logprobs_to_wire
from fdpd.pd.protocol import ProtocolError, Tokens

LOGPROB_TOL = 1e-4           # as tests/unit/test_engine_exactness.py measured for float32
VOCAB = TINY_CONFIG.vocab_size


@pytest.fixture(scope="module")
def reference() -> ReferenceModel:
    return ReferenceModel(TINY_CONFIG, tiny_state_dict())


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM("tiny", block_size=8, num_kv_blocks=40, max_num_batched_tokens=24,
               max_num_seqs=8)


def prompts() -> list[list[int]]:
    rng = random.Random(5)
    shared = [rng.randrange(256) for _ in range(40)]
    return [shared + [1, 2, 3], [rng.randrange(VOCAB) for _ in range(57)], [7],
            shared + [1, 2, 3], [rng.randrange(256) for _ in range(9)]]


def check_entry(entry: TokenLogprobs, ref_logp: torch.Tensor, k: int) -> None:
    """``entry`` against the reference's log_softmax row for the same position."""
    assert math.isfinite(entry.logprob)
    assert abs(entry.logprob - float(ref_logp[entry.token_id])) <= LOGPROB_TOL
    assert entry.rank == int((ref_logp > ref_logp[entry.token_id]).sum()) + 1 or (
        # A near tie may rank one place apart between two float32 computations.
        abs(float(ref_logp.sort(descending=True).values[entry.rank - 1])
            - entry.logprob) <= LOGPROB_TOL)
    assert len(entry.top_ids) == len(entry.top_logprobs) == k
    ref_values = ref_logp.topk(k).values.tolist() if k else []
    for tid, value, ref_value in zip(entry.top_ids, entry.top_logprobs, ref_values):
        assert abs(value - ref_value) <= LOGPROB_TOL          # the k best values, in order
        assert abs(float(ref_logp[tid]) - value) <= LOGPROB_TOL   # and the ids they belong to
    assert list(entry.top_logprobs) == sorted(entry.top_logprobs, reverse=True)


def test_top_and_prompt_logprobs_match_the_reference(llm, reference):
    ps = prompts()
    params = [SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=5,
                             prompt_logprobs=3),
              SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=20),
              SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=0,
                             prompt_logprobs=0),
              SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=2,
                             prompt_logprobs=20),
              SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)]
    llm.generate(ps[:1], params[:1])               # the shared prefix is cached from here on
    outs = llm.generate(ps, params)
    llm.engine.check_integrity()
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks
    for prompt, p, out in zip(ps, params, outs):
        completion = out.outputs[0]
        ref_tokens, _ = reference.greedy(prompt, p.max_tokens)
        assert completion.token_ids == ref_tokens
        ref_logp = torch.log_softmax(reference.logits(prompt + ref_tokens), dim=-1)
        if p.logprobs is None:
            assert completion.token_logprobs is None and out.prompt_logprobs is None
            continue
        assert len(completion.token_logprobs) == len(ref_tokens)
        for i, entry in enumerate(completion.token_logprobs):
            assert entry.token_id == ref_tokens[i]
            assert entry.logprob == pytest.approx(completion.logprobs[i], abs=1e-6)
            check_entry(entry, ref_logp[len(prompt) - 1 + i], p.logprobs)
        if p.prompt_logprobs is None:
            assert out.prompt_logprobs is None
            continue
        assert len(out.prompt_logprobs) == len(prompt) and out.prompt_logprobs[0] is None
        for j in range(1, len(prompt)):
            entry = out.prompt_logprobs[j]
            assert entry.token_id == prompt[j]
            check_entry(entry, ref_logp[j - 1], p.prompt_logprobs)


def test_prompt_logprobs_survive_preemption(reference):
    # Three prompts admitted together in a pool that cannot hold them to the end: some are
    # preempted and recomputed; their prompt logprobs are still one entry per token.
    llm = LLM("tiny", block_size=8, num_kv_blocks=14, max_num_batched_tokens=96)
    ps = [[(i * 13 + j) % 256 for j in range(30)] for i in range(3)]
    outs = llm.generate(ps, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True,
                                           prompt_logprobs=1))
    assert llm.engine.scheduler.num_preemptions > 0
    for prompt, out in zip(ps, outs):
        ref_logp = torch.log_softmax(reference.logits(prompt), dim=-1)
        assert len(out.prompt_logprobs) == len(prompt)
        for j in range(1, len(prompt)):
            check_entry(out.prompt_logprobs[j], ref_logp[j - 1], 1)


def test_n_samples_are_seeded_choice_by_choice(llm):
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    params = SamplingParams(n=3, seed=11, max_tokens=8, temperature=1.0, ignore_eos=True,
                            logprobs=1)
    first, again = llm.generate(prompt, params)[0], llm.generate(prompt, params)[0]
    assert [c.index for c in first.outputs] == [0, 1, 2] and first.finished
    assert [c.token_ids for c in first.outputs] == [c.token_ids for c in again.outputs]
    assert len({tuple(c.token_ids) for c in first.outputs}) > 1
    for i, choice in enumerate(first.outputs):      # choice i is the request seeded 11 + i
        alone = llm.generate(prompt, SamplingParams(seed=11 + i, max_tokens=8,
                                                    temperature=1.0, ignore_eos=True))[0]
        assert alone.outputs[0].token_ids == choice.token_ids


def test_no_alternatives_asked(llm, reference):
    # k = 0 alone in its batch: the chosen tokens' entries, with empty top lists.
    prompt = [5, 6, 7, 8]
    out = llm.generate(prompt, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True,
                                              logprobs=0, prompt_logprobs=0))[0]
    tokens = out.outputs[0].token_ids
    ref_logp = torch.log_softmax(reference.logits(prompt + tokens), dim=-1)
    for i, entry in enumerate(out.outputs[0].token_logprobs):
        check_entry(entry, ref_logp[len(prompt) - 1 + i], 0)
    for j in range(1, len(prompt)):
        check_entry(out.prompt_logprobs[j], ref_logp[j - 1], 0)


def test_engine_refuses_what_it_cannot_do(llm):
    with pytest.raises(RequestError, match="one sample"):
        llm.engine.make_request("x", [1, 2], SamplingParams(n=2))


def test_wire_round_trip_and_malformed_entries_refused():
    entries = [None, TokenLogprobs(5, -1.5, 3, (1, 2), (-0.5, -1.0)),
               TokenLogprobs(6, -math.inf, 384, (), ())]
    wire = logprobs_to_wire(entries)
    assert logprobs_from_wire([4, 5, 6], wire) == entries
    with pytest.raises(ValueError, match="2 entries for 3 tokens"):
        logprobs_from_wire([4, 5, 6], wire[1:])
    payload = Tokens("r", [5], [-1.5], token_logprobs=[wire[1]]).payload()
    assert Tokens.from_payload(payload).token_logprobs == [wire[1]]
    for bad in ([[math.nan, 1, [], []]], [[-1.0, 0, [], []]], [[-1.0, 1, [1], []]],
                [[-1.0, 1, list(range(21)), [-1.0] * 21]], [None], [[-1.0, 1, [-3], [0.0]]]):
        with pytest.raises(ProtocolError, match="token_logprobs"):
            Tokens.from_payload({**payload, "token_logprobs": bad})
    with pytest.raises(ProtocolError, match="prompt_logprobs"):
        Tokens.from_payload({**payload, "prompt_logprobs": [None, None]})
