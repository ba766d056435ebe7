from __future__ import annotations

import dataclasses
import math

import msgpack
import pytest

from fdpd.sampling_params import SamplingParams, SamplingParamsError


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert p.seed is None and p.max_tokens == 16 and p.min_tokens == 0
    assert p.stop == () and p.stop_token_ids == ()
    assert p.logprobs is None and p.skip_special_tokens and not p.include_stop_str_in_output
    assert not p.greedy and not p.has_penalties


@pytest.mark.parametrize("kwargs, field", [
    ({"n": 0}, "n"),
    ({"n": 2.0}, "n"),
    ({"n": 1.0}, "n"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": "0.7"}, "temperature"),
    ({"temperature": True}, "temperature"),
    ({"temperature": math.nan}, "temperature"),
    ({"temperature": math.inf}, "temperature"),
    ({"temperature": 10**400}, "temperature"),
    ({"temperature": None}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.01}, "top_p"),
    ({"top_p": math.nan}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"top_k": 2.0}, "top_k"),
    ({"top_k": False}, "top_k"),
    ({"min_p": -0.01}, "min_p"),
    ({"min_p": 1.5}, "min_p"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**63}, "seed"),
    ({"seed": True}, "seed"),
    ({"seed": "42"}, "seed"),
    ({"stop": 3}, "stop"),
    ({"stop": ["ok", 3]}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"stop_token_ids": "12"}, "stop_token_ids"),
    ({"stop_token_ids": [1, -2]}, "stop_token_ids"),
    ({"stop_token_ids": [1, True]}, "stop_token_ids"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 1.5}, "max_tokens"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"min_tokens": 17}, "min_tokens"),  # > default max_tokens 16
    ({"ignore_eos": 1}, "ignore_eos"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": -1.0}, "repetition_penalty"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"presence_penalty": -2.01}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"frequency_penalty": math.inf}, "frequency_penalty"),
    ({"logprobs": -1}, "logprobs"),
    ({"logprobs": 21}, "logprobs"),
    ({"prompt_logprobs": -1}, "prompt_logprobs"),
    ({"prompt_logprobs": 21}, "prompt_logprobs"),
    ({"n": 0}, "n"),
    ({"n": 17}, "n"),
    ({"logprobs": True}, "logprobs"),
    ({"skip_special_tokens": "yes"}, "skip_special_tokens"),
    ({"include_stop_str_in_output": None}, "include_stop_str_in_output"),
])
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(**kwargs)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")
    assert isinstance(info.value, ValueError)


def test_messages_say_the_limit():
    with pytest.raises(SamplingParamsError, match=r"must be <= 16, got 17"):
        SamplingParams(n=17)
    with pytest.raises(SamplingParamsError, match=r"in \[0, 20\], got 21"):
        SamplingParams(logprobs=21)
    with pytest.raises(SamplingParamsError, match=r"\(0, 1\]"):
        SamplingParams(top_p=0)
    with pytest.raises(SamplingParamsError, match=r"\[-2, 2\]"):
        SamplingParams(presence_penalty=3)
    with pytest.raises(SamplingParamsError, match=r"must be a number, got str"):
        SamplingParams(temperature="hot")


def test_boundary_values_accepted():
    p = SamplingParams(temperature=0, top_p=1, top_k=-1, min_p=1, seed=2**63 - 1,
                       max_tokens=None, min_tokens=1000, presence_penalty=-2,
                       frequency_penalty=2, repetition_penalty=0.01, logprobs=0)
    assert isinstance(p.temperature, float) and p.temperature == 0.0
    assert isinstance(p.top_p, float)
    assert SamplingParams(logprobs=1).logprobs == 1
    assert SamplingParams(logprobs=20, prompt_logprobs=20, n=16).logprobs == 20


def test_for_choice_derives_one_seeded_sample():
    p = SamplingParams(n=3, seed=2**63 - 1, logprobs=2)
    assert [c.seed for c in (p.for_choice(0), p.for_choice(1))] == [2**63 - 1, 0]
    assert p.for_choice(2).n == 1 and p.for_choice(2).logprobs == 2
    assert SamplingParams(n=2).for_choice(1).seed is None


def test_stop_normalised_to_tuples():
    assert SamplingParams(stop="\n").stop == ("\n",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams(stop_token_ids=[2, 3]).stop_token_ids == (2, 3)
    p = SamplingParams(stop=["x"], stop_token_ids=[7])
    hash(p)  # frozen and hashable: safe to share between requests


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        SamplingParams().temperature = 0.5  # type: ignore[misc]


def test_greedy_property():
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(temperature=0.8, top_k=1).greedy
    assert not SamplingParams(temperature=0.8, top_k=2).greedy
    assert SamplingParams(repetition_penalty=1.1).has_penalties
    assert SamplingParams(frequency_penalty=-0.5).has_penalties


def test_dict_round_trip_through_msgpack():
    p = SamplingParams(temperature=0.7, top_p=0.9, top_k=40, min_p=0.05, seed=123,
                       stop=["\n\n", "END"], stop_token_ids=[2, 32000], max_tokens=None,
                       min_tokens=3, ignore_eos=True, repetition_penalty=1.1,
                       presence_penalty=0.5, frequency_penalty=-0.25, logprobs=1,
                       skip_special_tokens=False, include_stop_str_in_output=True)
    d = p.to_dict()
    assert d["stop"] == ["\n\n", "END"] and d["stop_token_ids"] == [2, 32000]
    wire = msgpack.unpackb(msgpack.packb(d), raw=False)
    assert SamplingParams.from_dict(wire) == p
    assert SamplingParams.from_dict(SamplingParams().to_dict()) == SamplingParams()
    assert SamplingParams.from_dict({}) == SamplingParams()


def test_from_dict_rejects_unknown_keys_and_bad_input():
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams.from_dict({"temperature": 0.5, "best_of": 3})
    assert info.value.field == "best_of"
    with pytest.raises(SamplingParamsError, match="must be a mapping"):
        SamplingParams.from_dict([("temperature", 0.5)])  # type: ignore[arg-type]
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams.from_dict({"top_k": "5"})
    assert info.value.field == "top_k"


def test_check_against_context_window():
    p = SamplingParams(max_tokens=100)
    p.check_against(max_model_len=1000, prompt_len=900)
    with pytest.raises(SamplingParamsError) as info:
        p.check_against(max_model_len=1000, prompt_len=901)
    assert info.value.field == "max_tokens"
    assert "901" in str(info.value) and "1000" in str(info.value) and "<= 99" in str(info.value)
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(max_tokens=None).check_against(max_model_len=1000, prompt_len=1000)
    assert info.value.field == "prompt"
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams().check_against(max_model_len=1000, prompt_len=0)
    assert info.value.field == "prompt"
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(max_tokens=None, min_tokens=50).check_against(1000, 960)
    assert info.value.field == "min_tokens"


def test_resolved_max_tokens():
    assert SamplingParams(max_tokens=None).resolved_max_tokens(1000, 300) == 700
    assert SamplingParams(max_tokens=10).resolved_max_tokens(1000, 300) == 10
    with pytest.raises(SamplingParamsError):
        SamplingParams(max_tokens=None).resolved_max_tokens(1000, 1000)
