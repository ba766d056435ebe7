"""What clients send, answered as vLLM answers it (issue 14, item 1), on a colocated cluster
(one mixed instance) and a PD cluster (one prefill, one decode): ``n`` with a seed, ``logprobs``
/ ``top_logprobs`` up to 20 (streamed too), ``echo`` with prompt logprobs and ``max_tokens: 0``,
``prompt_logprobs``, ``/tokenize`` / ``/detokenize``, ``--served-model-name``, and 400s for bad
values; through the ``openai`` SDK and raw HTTP.

Tokens and logprobs are checked against the dense reference (``fdpd.model.reference``: no KV
cache, no paging, no PD): greedy tokens exactly, logprobs within ``LOGPROB_TOL``. Seeded samples
are checked against the offline engine with the derived seeds (seed + i).
"""

from __future__ import annotations

import math

import httpx
import pytest
import torch

from fdpd import LLM, SamplingParams
from fdpd.model.reference import ReferenceModel
from fdpd.model.tiny import TINY_CONFIG, tiny_state_dict, tiny_tokenizer
from fdpd.router.serving import token_text
from fdpd.testing import Cluster
from fdpd.testing.client import iter_sse

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.timeout(120)

LOGPROB_TOL = 1e-4
TOKENIZER = tiny_tokenizer()
ALIAS = "tiny-alias"
GREEDY = {"temperature": 0, "ignore_eos": True, "return_token_ids": True}
PROMPT = "The quick brown fox jumps over"


@pytest.fixture(scope="module", params=["mixed", "pd"])
def cluster(request, tmp_path_factory):
    counts = (0, 0, 1) if request.param == "mixed" else (1, 1, 0)
    with Cluster(*counts, common_args=["--num-kv-blocks", "256"],
                 router_args=["--served-model-name", f"tiny,{ALIAS}"],
                 log_dir=tmp_path_factory.mktemp(f"parity-{request.param}")) as c:
        yield c


@pytest.fixture(scope="module")
def reference() -> ReferenceModel:
    return ReferenceModel(TINY_CONFIG, tiny_state_dict())


@pytest.fixture(scope="module")
def offline() -> LLM:
    return LLM("tiny", num_kv_blocks=256)


@pytest.fixture
def sdk(cluster):
    return openai.OpenAI(base_url=f"{cluster.base_url}/v1", api_key="unused", max_retries=0,
                         timeout=60)


def ref_logprobs(reference: ReferenceModel, ids: list[int]) -> torch.Tensor:
    """log_softmax rows of every position of ``ids``: row j scores the token at j + 1."""
    return torch.log_softmax(reference.logits(ids), dim=-1)


def greedy(reference: ReferenceModel, prompt: list[int], n: int) -> list[int]:
    return reference.greedy(prompt, n)[0]


def close(a: float | None, b: float) -> bool:
    return a is not None and math.isfinite(a) and abs(a - b) <= LOGPROB_TOL


def expected_top_map(row: torch.Tensor, chosen: int, k: int) -> dict[str, float]:
    """Completions' top_logprobs entry (vLLM): the chosen token, then the k best, k + 1 most."""
    ids = [chosen] + [t for t in row.topk(k).indices.tolist() if t != chosen] if k else [chosen]
    return {token_text(TOKENIZER, t): float(row[t]) for t in ids[:k + 1]}


def check_top_map(got: dict[str, float], row: torch.Tensor, chosen: int, k: int) -> None:
    want = expected_top_map(row, chosen, k)
    assert set(got) == set(want), (got, want)
    assert all(close(got[t], want[t]) for t in want), (got, want)


def check_completion_logprobs(lp: dict, ids: list[int], rows: torch.Tensor, k: int,
                              first_is_null: bool = False) -> None:
    """``lp`` (completions' logprobs object) for tokens ``ids`` scored by ``rows``."""
    assert lp["tokens"] == [token_text(TOKENIZER, t) for t in ids]
    offsets = [0]
    for text in lp["tokens"][:-1]:
        offsets.append(offsets[-1] + len(text))
    assert lp["text_offset"] == offsets
    for i, t in enumerate(ids):
        if i == 0 and first_is_null:
            assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
            continue
        assert close(lp["token_logprobs"][i], float(rows[i][t])), i
        check_top_map(lp["top_logprobs"][i], rows[i], t, k)


def post(cluster: Cluster, path: str, body: dict) -> httpx.Response:
    return cluster.client().post(path, json=body)


def stream_events(cluster: Cluster, path: str, body: dict) -> list[dict]:
    with cluster.client().stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        events = list(iter_sse(r))
    assert events[-1] == "[DONE]"
    return events[:-1]


# ---------------------------------------------------------------------- completions
def test_completion_top_logprobs_sdk_and_stream(cluster, sdk, reference):
    prompt = TOKENIZER.encode(PROMPT)
    r = sdk.completions.create(model="tiny", prompt=prompt, max_tokens=6, logprobs=5,
                               extra_body=GREEDY)
    choice = r.choices[0]
    want = greedy(reference, prompt, 6)
    assert choice.token_ids == want
    rows = ref_logprobs(reference, prompt + want)[len(prompt) - 1:]
    check_completion_logprobs(choice.logprobs.model_dump(), want, rows, 5)

    # Streamed, at the limit of 20: the pieces put together are the same object.
    events = stream_events(cluster, "/v1/completions", {
        **GREEDY, "prompt": prompt, "max_tokens": 6, "logprobs": 20})
    joined: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                               "text_offset": []}
    ids = []
    for event in events:
        for c in event["choices"]:
            ids += c.get("token_ids") or []
            for key in joined:
                joined[key] += (c["logprobs"] or {}).get(key, [])
    assert ids == want
    check_completion_logprobs(joined, want, rows, 20)


def test_echo_with_max_tokens_zero_scores_the_prompt(cluster, sdk, reference):
    # What lm-evaluation-harness sends for loglikelihood tasks.
    prompt = TOKENIZER.encode(PROMPT)
    rows = ref_logprobs(reference, prompt)
    r = sdk.completions.create(model=ALIAS, prompt=PROMPT, max_tokens=0, echo=True,
                               logprobs=1, temperature=0)
    assert r.model == ALIAS
    choice = r.choices[0]
    assert choice.text == PROMPT
    lp = choice.logprobs.model_dump()
    check_completion_logprobs(lp, prompt, torch.cat([rows[:1], rows[:-1]]), 1,
                              first_is_null=True)
    assert r.usage.prompt_tokens == len(prompt)

    events = stream_events(cluster, "/v1/completions", {
        "prompt": PROMPT, "max_tokens": 0, "echo": True, "logprobs": 1, "temperature": 0})
    text = "".join(c["text"] for e in events for c in e["choices"])
    streamed = [c["logprobs"] for e in events for c in e["choices"] if c["logprobs"]]
    assert text == PROMPT and streamed[0]["token_logprobs"] == lp["token_logprobs"][:1] + [
        pytest.approx(v, abs=LOGPROB_TOL) for v in lp["token_logprobs"][1:]]
    assert events[-1]["choices"][0]["finish_reason"] is not None


def test_echo_with_output_and_prompt_logprobs_extension(cluster, reference):
    prompt = TOKENIZER.encode(PROMPT)
    r = post(cluster, "/v1/completions", {**GREEDY, "prompt": PROMPT, "max_tokens": 4,
                                          "echo": True, "logprobs": 2, "prompt_logprobs": 3})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    want = greedy(reference, prompt, 4)
    assert choice["token_ids"] == want
    assert choice["text"] == PROMPT + TOKENIZER.decode(want)
    rows = ref_logprobs(reference, prompt + want)
    shifted = torch.cat([rows[:1], rows[:-1]])      # row i scores token i
    check_completion_logprobs(choice["logprobs"], prompt + want, shifted, 2, first_is_null=True)
    # vLLM's prompt_logprobs: None, then {token id: {logprob, rank, decoded_token}} with the
    # prompt token first and the 3 best.
    plp = choice["prompt_logprobs"]
    assert len(plp) == len(prompt) and plp[0] is None
    for j in range(1, len(prompt)):
        row, token = rows[j - 1], prompt[j]
        best = row.topk(3).indices.tolist()
        assert set(plp[j]) == {str(t) for t in [token, *best]}
        entry = plp[j][str(token)]
        assert close(entry["logprob"], float(row[token]))
        assert entry["rank"] == int((row > row[token]).sum()) + 1
        assert entry["decoded_token"] == token_text(TOKENIZER, token)
        for rank, t in enumerate(best, 1):
            if t != token:
                assert plp[j][str(t)]["rank"] == rank and close(plp[j][str(t)]["logprob"],
                                                                 float(row[t]))


def test_n_with_a_seed_repeats_choice_by_choice(cluster, sdk, offline):
    prompt = TOKENIZER.encode(PROMPT * 3)                  # 94 tokens: 5 full blocks
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 8, "n": 3, "seed": 1234,
            "temperature": 1.0, "extra_body": {"ignore_eos": True, "return_token_ids": True}}
    first, again = sdk.completions.create(**body), sdk.completions.create(**body)
    got = [c.token_ids for c in sorted(first.choices, key=lambda c: c.index)]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert got == [c.token_ids for c in sorted(again.choices, key=lambda c: c.index)]
    want = offline.generate(prompt, SamplingParams(n=3, seed=1234, max_tokens=8,
                                                   temperature=1.0, ignore_eos=True))[0]
    assert got == [c.token_ids for c in want.outputs]
    assert len({tuple(ids) for ids in got}) > 1
    assert first.usage.completion_tokens == 24 and first.usage.prompt_tokens == len(prompt)
    # The prompt was computed once: choices 1 and 2 found its full blocks cached.
    recent = cluster.client().get("/v1/requests/recent", params={"limit": 6}).json()["data"]
    cached = {e["request_id"][-2:]: e["cached_tokens"] for e in recent
              if e["request_id"].startswith(first.id)}
    assert cached["-1"] >= 80 and cached["-2"] >= 80, cached

    # Streamed: every choice's pieces, by index, are the same tokens.
    events = stream_events(cluster, "/v1/completions", {
        "prompt": prompt, "max_tokens": 8, "n": 3, "seed": 1234, "temperature": 1.0,
        "ignore_eos": True, "return_token_ids": True})
    streamed: dict[int, list[int]] = {0: [], 1: [], 2: []}
    for event in events:
        for c in event["choices"]:
            streamed[c["index"]] += c.get("token_ids") or []
    assert [streamed[i] for i in range(3)] == got


# ---------------------------------------------------------------------- chat
def test_chat_logprobs_and_top_logprobs(cluster, sdk, reference):
    messages = [{"role": "user", "content": "Name a colour."}]
    r = sdk.chat.completions.create(model="tiny", messages=messages, max_tokens=5,
                                    logprobs=True, top_logprobs=4, extra_body=GREEDY)
    prompt = r.prompt_token_ids
    want = greedy(reference, prompt, 5)
    choice = r.choices[0]
    assert choice.token_ids == want
    rows = ref_logprobs(reference, prompt + want)[len(prompt) - 1:]
    content = choice.logprobs.content
    assert [c.token for c in content] == [token_text(TOKENIZER, t) for t in want]
    for i, (entry, t) in enumerate(zip(content, want)):
        assert close(entry.logprob, float(rows[i][t]))
        best = rows[i].topk(4)
        assert [c.token for c in entry.top_logprobs] == [token_text(TOKENIZER, b)
                                                         for b in best.indices.tolist()]
        assert all(close(c.logprob, v) for c, v in zip(entry.top_logprobs,
                                                        best.values.tolist()))

    stream = sdk.chat.completions.create(model="tiny", messages=messages, max_tokens=5,
                                         logprobs=True, top_logprobs=4, stream=True,
                                         extra_body=GREEDY)
    streamed = [c for chunk in stream for ch in chunk.choices
                if ch.logprobs for c in ch.logprobs.content]
    assert [(c.token, [t.token for t in c.top_logprobs]) for c in streamed] == [
        (c.token, [t.token for t in c.top_logprobs]) for c in content]
    assert all(close(a.logprob, b.logprob) for a, b in zip(streamed, content))


def test_chat_n_and_prompt_logprobs(cluster, reference):
    r = post(cluster, "/v1/chat/completions", {
        **GREEDY, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "n": 2,
        "prompt_logprobs": 1})
    assert r.status_code == 200, r.text
    body = r.json()
    prompt = body["prompt_token_ids"]
    want = greedy(reference, prompt, 3)
    assert [c["token_ids"] for c in body["choices"]] == [want, want]   # greedy: alike
    assert body["usage"]["completion_tokens"] == 6
    rows = ref_logprobs(reference, prompt)
    plp = body["prompt_logprobs"]
    assert plp[0] is None and len(plp) == len(prompt)
    assert all(close(plp[j][str(prompt[j])]["logprob"], float(rows[j - 1][prompt[j]]))
               for j in range(1, len(prompt)))


# ---------------------------------------------------------------------- tokenizer, names
def test_tokenize_and_detokenize(cluster):
    r = post(cluster, "/tokenize", {"model": ALIAS, "prompt": PROMPT, "return_token_strs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    ids = TOKENIZER.encode(PROMPT)
    assert body["tokens"] == ids and body["count"] == len(ids)
    assert body["max_model_len"] > 0 and body["token_strs"][1] == "T"
    no_bos = post(cluster, "/tokenize", {"prompt": PROMPT, "add_special_tokens": False})
    assert no_bos.json()["tokens"] == ids[1:]
    messages = [{"role": "user", "content": "hi"}]
    chat = post(cluster, "/tokenize", {"messages": messages}).json()
    served = post(cluster, "/v1/chat/completions", {**GREEDY, "messages": messages,
                                                    "max_tokens": 1}).json()
    assert chat["tokens"] == served["prompt_token_ids"]
    back = post(cluster, "/detokenize", {"model": "tiny", "tokens": ids[1:]})
    assert back.status_code == 200 and back.json() == {"prompt": PROMPT}
    assert post(cluster, "/detokenize", {"tokens": [384]}).status_code == 400
    assert post(cluster, "/tokenize", {"prompt": "x", "model": "other"}).status_code == 404


def test_served_model_names(cluster, sdk):
    assert [m.id for m in sdk.models.list().data] == ["tiny", ALIAS]
    assert sdk.models.retrieve(ALIAS).id == ALIAS
    r = sdk.completions.create(model=ALIAS, prompt="a", max_tokens=1)
    assert r.model == ALIAS
    with pytest.raises(openai.NotFoundError):
        sdk.completions.create(model="gpt-4", prompt="a", max_tokens=1)


# ---------------------------------------------------------------------- bad values
@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "a", "n": 0}, "n"),
    ("/v1/completions", {"prompt": "a", "n": 17}, "n"),
    ("/v1/completions", {"prompt": "a", "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"prompt": "a", "prompt_logprobs": 21}, "prompt_logprobs"),
    ("/v1/completions", {"prompt": "a", "best_of": 2}, "best_of"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "echo": True},
     "echo"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}],
                              "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "n": 0}, "n"),
])
def test_bad_values_get_openai_400s(cluster, sdk, path, body, param):
    r = post(cluster, path, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert error["type"] == "invalid_request_error" and error["message"]
    create = sdk.completions.create if "prompt" in body else sdk.chat.completions.create
    known = {"prompt", "messages", "n", "logprobs", "max_tokens", "best_of", "top_logprobs"}
    with pytest.raises(openai.BadRequestError) as info:
        create(model="tiny", **{k: v for k, v in body.items() if k in known},
               extra_body={k: v for k, v in body.items() if k not in known})
    assert info.value.status_code == 400 and param in str(info.value)
