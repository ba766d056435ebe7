"""A request resumed from prompt + the tokens it already generated (how the router moves a
request off a draining instance) continues exactly as if it had never stopped: greedy, seeded
random sampling with penalties, and min_tokens/stop rules all see the old tokens as outputs."""

from __future__ import annotations

import pytest
import torch

from fdpd.config import EngineConfig
from fdpd.engine.engine import Engine, RequestError
from fdpd.sampling_params import SamplingParams

PROMPT = [5, 17, 99, 3, 42, 7, 250, 11, 64, 8, 19, 23, 200, 31, 2, 77, 90, 13, 45]


@pytest.fixture(scope="module")
def engine() -> Engine:
    torch.set_num_threads(1)
    return Engine(EngineConfig(model="tiny", num_kv_blocks=256))


def run(engine: Engine, prompt: list[int], params: SamplingParams, *, seed: int,
        max_tokens: int, num_output_tokens: int = 0) -> tuple[list[int], int]:
    req = engine.make_request("r", prompt, params, seed=seed, max_tokens=max_tokens,
                              num_output_tokens=num_output_tokens)
    engine.scheduler.add(req)
    while engine.has_unfinished_requests():
        engine.step()
    engine.check_integrity()
    return list(req.output_token_ids), req.num_prompt_tokens


PARAMS = {
    "greedy": SamplingParams(temperature=0, ignore_eos=True),
    "seeded with penalties": SamplingParams(temperature=0.9, top_p=0.9, top_k=50,
                                            repetition_penalty=1.3, presence_penalty=0.5,
                                            frequency_penalty=0.4, ignore_eos=True),
}


@pytest.mark.parametrize("name", PARAMS)
@pytest.mark.parametrize("cut", [1, 16, 37])
def test_resumed_request_continues_exactly(engine, name, cut):
    params = PARAMS[name]
    whole, _ = run(engine, PROMPT, params, seed=1234, max_tokens=60)
    assert len(whole) == 60
    resumed, num_prompt = run(engine, PROMPT + whole[:cut], params, seed=1234,
                              max_tokens=60 - cut, num_output_tokens=cut)
    assert resumed == whole                      # the old tokens are outputs again, then on
    assert num_prompt == len(PROMPT)             # usage counts the real prompt


def test_min_tokens_and_stop_tokens_count_the_tokens_before_the_resume(engine):
    free, _ = run(engine, PROMPT, PARAMS["greedy"], seed=1, max_tokens=40)
    stop = free[3]
    params = SamplingParams(temperature=0, min_tokens=12, stop_token_ids=[stop])
    whole, _ = run(engine, PROMPT, params, seed=1, max_tokens=40)
    assert len(whole) > 4                        # min_tokens held the stop token back
    for cut in (2, 6, 11):
        resumed, _ = run(engine, PROMPT + whole[:cut], params, seed=1, max_tokens=40 - cut,
                         num_output_tokens=cut)
        assert resumed == whole, cut


@pytest.mark.parametrize("bad", [-1, len(PROMPT), "3", True])
def test_invalid_resume_counts_are_refused(engine, bad):
    with pytest.raises(RequestError, match="num_output_tokens"):
        engine.make_request("r", PROMPT, SamplingParams(), seed=1, max_tokens=4,
                            num_output_tokens=bad)


def test_resume_needs_an_explicit_max_tokens(engine):
    with pytest.raises(RequestError, match="num_output_tokens"):
        engine.make_request("r", PROMPT, SamplingParams(), num_output_tokens=3)
