"""The offline API in vLLM's shape (``LLM(...).generate``) and the ``fdpd`` CLI around it:
result fields, prompt forms, every stop condition, and the errors a user can hit - each one must
name the offending field, and must leave the ``LLM`` able to serve the next request."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from fdpd import LLM, SamplingParams
from fdpd.cli import main
from fdpd.config import ConfigError
from fdpd.engine.engine import RequestError
from fdpd.model.tokenizer import ByteTokenizer
from tests.model_factory import make_checkpoint

GREEDY = SamplingParams(temperature=0, max_tokens=12)
# Prompts of the tiny model whose greedy continuation reaches <eos> within 32 tokens (found by
# running them; the weights are fixed, so this is stable). "def f():" stops after 7 tokens.
EOS_PROMPT = "def f():"


@pytest.fixture(scope="module")
def llm():
    return LLM("tiny")


def greedy_ids(llm: LLM, prompt, **params) -> list[int]:
    args = {"temperature": 0, "max_tokens": 12, **params}
    return llm.generate(prompt, SamplingParams(**args))[0].outputs[0].token_ids


def assert_idle(llm: LLM) -> None:
    llm.engine.check_integrity()
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert not llm.engine.has_unfinished_requests()


# ------------------------------------------------------------------------------- result shape
def test_result_fields_for_a_text_prompt(llm):
    [out] = llm.generate("Hello, my name is", GREEDY)
    tok = llm.get_tokenizer()
    assert out.prompt == "Hello, my name is"
    assert out.prompt_token_ids == tok.encode("Hello, my name is")
    assert out.prompt_token_ids[0] == ByteTokenizer.BOS
    assert out.finished
    comp = out.outputs[0]
    assert comp.index == 0
    assert len(comp.token_ids) == 12 and comp.finish_reason == "length"
    assert comp.stop_reason is None
    assert comp.text == tok.decode(comp.token_ids)
    assert comp.logprobs is None and comp.cumulative_logprob is None
    assert_idle(llm)


def test_token_id_prompts_equal_text_prompts(llm):
    text = "The capital of France is"
    ids = llm.get_tokenizer().encode(text)
    by_text = llm.generate(text, GREEDY)[0]
    by_ids = llm.generate(ids, GREEDY)[0]
    by_dict = llm.generate({"prompt_token_ids": ids}, GREEDY)[0]
    by_text_dict = llm.generate({"prompt": text}, GREEDY)[0]
    assert by_ids.prompt is None and by_ids.prompt_token_ids == ids
    assert by_text_dict.prompt == text
    tokens = by_text.outputs[0].token_ids
    for other in (by_ids, by_dict, by_text_dict):
        assert other.outputs[0].token_ids == tokens
        assert other.outputs[0].text == by_text.outputs[0].text


def test_single_prompt_versus_list(llm):
    assert len(llm.generate("hi", GREEDY)) == 1
    assert len(llm.generate([5, 6, 7], GREEDY)) == 1          # one prompt of token ids
    outs = llm.generate([[5, 6, 7], "hi", {"prompt_token_ids": [9]}], GREEDY)
    assert [o.prompt_token_ids for o in outs] == [[5, 6, 7], [ByteTokenizer.BOS, 104, 105], [9]]
    assert outs[1].outputs[0].token_ids == greedy_ids(llm, "hi")
    assert llm.generate([], GREEDY) == []


def test_per_prompt_sampling_params_and_logprobs(llm):
    params = [SamplingParams(temperature=0, max_tokens=3),
              SamplingParams(temperature=0, max_tokens=5, logprobs=1)]
    short, long_ = llm.generate(["ab", "ab"], params)
    assert len(short.outputs[0].token_ids) == 3 and short.outputs[0].logprobs is None
    comp = long_.outputs[0]
    assert comp.token_ids[:3] == short.outputs[0].token_ids
    assert len(comp.logprobs) == 5 and all(lp <= 0 and math.isfinite(lp) for lp in comp.logprobs)
    assert comp.cumulative_logprob == pytest.approx(sum(comp.logprobs))
    with pytest.raises(ValueError, match="sampling_params: 1 given for 2 prompts"):
        llm.generate(["a", "b"], [GREEDY])


def test_default_sampling_params_are_vllms(llm):
    [out] = llm.generate("hi")                         # SamplingParams(): max_tokens 16
    assert len(out.outputs[0].token_ids) <= 16


# ----------------------------------------------------------------------------- stop conditions
def test_max_tokens_finishes_with_length(llm):
    comp = llm.generate("abc", SamplingParams(temperature=0, max_tokens=5))[0].outputs[0]
    assert len(comp.token_ids) == 5
    assert (comp.finish_reason, comp.stop_reason) == ("length", None)


def _stop_string_case(llm) -> tuple[str, str, int]:
    """(full text of a 32-token greedy run of "Hello", a 2-char ASCII stop string found in its
    middle, where it first occurs)."""
    text = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=32))[0].outputs[0].text
    for i in range(3, len(text) - 1):
        stop = text[i:i + 2]
        if stop.isascii() and stop.isprintable() and text.find(stop) == i:
            return text, stop, i
    pytest.fail(f"no usable stop string in {text!r}")


def test_stop_string_truncates_text(llm):
    text, stop, at = _stop_string_case(llm)
    comp = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=32,
                                                stop=[stop]))[0].outputs[0]
    assert comp.text == text[:at]
    assert (comp.finish_reason, comp.stop_reason) == ("stop", stop)
    assert len(comp.token_ids) < 32                    # the engine stopped, not just the text
    assert_idle(llm)


def test_stop_string_included_on_request(llm):
    text, stop, at = _stop_string_case(llm)
    comp = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=32, stop=stop,
                                                include_stop_str_in_output=True))[0].outputs[0]
    assert comp.text == text[:at + len(stop)]
    assert (comp.finish_reason, comp.stop_reason) == ("stop", stop)


def test_stop_string_in_the_prompt_does_not_stop(llm):
    # Only generated text is searched: the prompt's own "hello" must not end the request.
    comp = llm.generate("hello hello", SamplingParams(temperature=0, max_tokens=8,
                                                      stop=["hello"]))[0].outputs[0]
    assert "hello" not in comp.text
    assert comp.finish_reason == "length" and len(comp.token_ids) == 8


def test_stop_token_ids(llm):
    full = greedy_ids(llm, "abc", max_tokens=12)
    k = next(i for i, t in enumerate(full) if i >= 3 and t not in full[:i])
    comp = llm.generate("abc", SamplingParams(temperature=0, max_tokens=12,
                                              stop_token_ids=[full[k]]))[0].outputs[0]
    assert comp.token_ids == full[:k + 1]              # the stop token is returned, as in vLLM
    assert (comp.finish_reason, comp.stop_reason) == ("stop", full[k])


def test_eos_stops_unless_ignored(llm):
    comp = llm.generate(EOS_PROMPT, SamplingParams(temperature=0, max_tokens=32))[0].outputs[0]
    assert comp.token_ids[-1] == ByteTokenizer.EOS and len(comp.token_ids) < 32
    assert (comp.finish_reason, comp.stop_reason) == ("stop", None)
    assert "<eos>" not in comp.text                    # special tokens are skipped in text
    n = len(comp.token_ids)
    ignored = llm.generate(EOS_PROMPT, SamplingParams(temperature=0, max_tokens=32,
                                                      ignore_eos=True))[0].outputs[0]
    assert ignored.finish_reason == "length" and len(ignored.token_ids) == 32
    assert ignored.token_ids[:n] == comp.token_ids     # ignore_eos masks nothing


def test_min_tokens_defers_eos_and_stop_tokens(llm):
    eos_at = len(greedy_ids(llm, EOS_PROMPT, max_tokens=32))
    comp = llm.generate(EOS_PROMPT, SamplingParams(temperature=0, max_tokens=32,
                                                   min_tokens=eos_at + 3))[0].outputs[0]
    assert len(comp.token_ids) >= eos_at + 3
    assert ByteTokenizer.EOS not in comp.token_ids[:eos_at + 3 - 1]
    assert comp.token_ids[:eos_at - 1] == greedy_ids(llm, EOS_PROMPT, max_tokens=eos_at - 1)
    # stop_token_ids are deferred too.
    full = greedy_ids(llm, "abc", max_tokens=12)
    comp = llm.generate("abc", SamplingParams(temperature=0, max_tokens=12, min_tokens=4,
                                              stop_token_ids=[full[0]]))[0].outputs[0]
    assert len(comp.token_ids) >= 4


# -------------------------------------------------------------------------------- bad requests
def test_bad_requests_name_the_field_and_leave_the_llm_usable():
    llm = LLM("tiny", max_model_len=64, block_size=4, num_kv_blocks=8)
    expected = greedy_ids(llm, [5, 6, 7], max_tokens=4)
    cases = [
        ([[]], GREEDY, "prompt: the prompt is empty"),
        ([[1] * 64], GREEDY, r"prompt: the prompt has 64 tokens; max_model_len is 64"),
        ([[1] * 60], SamplingParams(max_tokens=10), (r"max_tokens: prompt \(60 tokens\) \+ "
                                                    r"max_tokens \(10\) exceeds max_model_len")),
        ([[1, 384]], GREEDY, r"prompt: token id 384 is outside the vocabulary \[0, 384\)"),
        ([[1, -1]], GREEDY, r"prompt: token id -1 is outside the vocabulary"),
        ([[1, None]], GREEDY, r"prompt: token id None is outside the vocabulary"),
        ([[1] * 20], SamplingParams(max_tokens=20), ("max_tokens: prompt \\+ max_tokens needs "
                                                    "10 KV blocks but the pool has 8")),
        # One bad prompt in a batch rejects the batch before anything is admitted.
        ([[5, 6], [1, 2, 999]], GREEDY, "prompt: token id 999"),
    ]
    for prompts, params, message in cases:
        with pytest.raises(RequestError, match=message) as info:
            llm.generate(prompts, params)
        assert info.value.field in ("prompt", "max_tokens")
        assert_idle(llm)
        assert greedy_ids(llm, [5, 6, 7], max_tokens=4) == expected


def test_a_prompt_of_the_wrong_type_is_a_request_error(llm):
    with pytest.raises(RequestError, match="prompt: expected text, a list of token ids or a "
                       "list of prompts, got float"):
        llm.generate(3.5)


def test_a_prompt_element_of_the_wrong_type_is_a_request_error(llm):
    with pytest.raises(RequestError, match="prompt: expected text or a list of token ids"):
        llm.generate([1.5, 2])


def test_an_interrupted_generate_leaves_the_llm_usable():
    llm = LLM("tiny")
    expected = greedy_ids(llm, "hi", max_tokens=4)
    inner, calls = llm.engine.step, []

    def step():
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt          # Ctrl-C in a notebook, mid-batch
        return inner()

    llm.engine.step = step
    with pytest.raises(KeyboardInterrupt):
        llm.generate(["abc", "def"], SamplingParams(max_tokens=8))
    llm.engine.step = inner
    assert greedy_ids(llm, "hi", max_tokens=4) == expected
    assert_idle(llm)


@pytest.mark.parametrize("args, field", [
    ({"foo": 1}, "foo"),
    ({"block_size": 0}, "block_size"),
    ({"block_size": 3}, "block_size"),
    ({"dtype": "int8"}, "dtype"),
    ({"num_kv_blocks": 0}, "num_kv_blocks"),
    ({"max_num_seqs": 0}, "max_num_seqs"),
    ({"max_model_len": 10**6}, "max_model_len"),
])
def test_bad_engine_args_are_config_errors_naming_the_field(args, field):
    with pytest.raises(ConfigError) as info:
        LLM("tiny", **args)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")


def test_unknown_engine_arg_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"foo: unknown engine argument; known: .*block_size"):
        LLM(foo=1)


def test_unknown_model_name(tmp_path):
    with pytest.raises(ValueError, match="model 'no-such-model' is neither the built-in 'tiny' "
                       "nor a directory containing config.json"):
        LLM("no-such-model")
    with pytest.raises(ValueError, match="containing config.json"):
        LLM(str(tmp_path))                              # a directory, but not a model


# -------------------------------------------------------------------------- model directories
def test_model_without_tokenizer_takes_token_ids_only(tmp_path):
    llm = LLM(str(make_checkpoint(tmp_path, "llama")))
    assert llm.get_tokenizer() is None
    [out] = llm.generate([3, 4, 5], SamplingParams(temperature=0, max_tokens=4))
    assert len(out.outputs[0].token_ids) == 4
    assert out.outputs[0].text == ""                    # nothing to detokenize with
    with pytest.raises(RequestError, match="prompt: this model directory has no tokenizer; "
                       "pass token ids"):
        llm.generate("hello")
    with pytest.raises(RequestError, match="stop: stop strings need a tokenizer"):
        llm.generate([3, 4], SamplingParams(stop=["x"]))
    assert_idle(llm)


def test_model_with_a_bpe_tokenizer_takes_text(tmp_path):
    llm = LLM(str(make_checkpoint(tmp_path, "qwen2", tokenizer=True)))
    tok = llm.get_tokenizer()
    [out] = llm.generate("The quick brown fox", SamplingParams(temperature=0, max_tokens=8,
                                                               ignore_eos=True))
    assert out.prompt_token_ids == tok.encode("The quick brown fox")
    comp = out.outputs[0]
    assert len(comp.token_ids) == 8
    assert comp.text == tok.decode(comp.token_ids)


# ----------------------------------------------------------------------------------------- CLI
def test_cli_export_tiny_then_load_gives_the_same_tokens(tmp_path, llm):
    directory = tmp_path / "tiny"
    result = CliRunner().invoke(main, ["model", "export", "tiny", str(directory)])
    assert result.exit_code == 0, result.output
    assert (directory / "config.json").is_file()
    exported = LLM(str(directory))
    prompts = ["Hello", "abc", [7, 8, 9]]
    assert ([o.outputs[0].token_ids for o in exported.generate(prompts, GREEDY)]
            == [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)])
    assert exported.generate("Hello", GREEDY)[0].outputs[0].text == \
        llm.generate("Hello", GREEDY)[0].outputs[0].text


def test_cli_generate(llm):
    result = CliRunner().invoke(main, ["generate", "--prompt", "hi", "--max-tokens", "4"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("'hi' -> ")
    result = CliRunner().invoke(main, ["generate", "--prompt", "hi", "--prompt", "abc",
                                       "--max-tokens", "4", "--json"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.splitlines()]
    assert [r["prompt"] for r in lines] == ["hi", "abc"]
    assert lines[0]["token_ids"] == greedy_ids(llm, "hi", max_tokens=4)


def test_cli_generate_reports_bad_args_without_a_traceback():
    result = CliRunner().invoke(main, ["generate", "--prompt", "hi", "--block-size", "3"])
    assert result.exit_code != 0
    assert "block_size: must be a power of two, got 3" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_cli_bench_engine_quick():
    pytest.importorskip("transformers")
    result = CliRunner().invoke(main, ["bench", "engine", "--quick", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert report["config"]["num_prompts"] == 4
    names = [r["name"] for r in report["results"]]
    assert names == ["fdpd", "transformers"]
    assert all(r["output_tokens"] == 4 * 8 for r in report["results"])
    assert all(r["cpu_s"] > 0 for r in report["results"])
    assert report["greedy_agreement"] == {
        "transformers": {"agree": 4, "prompts": 4, "first_divergence": []}}
    assert set(report["ratios"]["transformers"]) == {"wall", "cpu"}


def test_cli_bench_engine_without_vllm_says_how_to_get_it(tmp_path):
    result = CliRunner().invoke(main, ["bench", "engine", "--quick", "--baseline", "vllm",
                                       "--vllm-python", str(tmp_path / "none" / "python")])
    assert result.exit_code != 0
    assert "scripts/setup-vllm" in result.output
