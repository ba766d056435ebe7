"""Property-based fuzzing of the router's OpenAI API (issue 7, "Bad input").

Bodies come from the OpenAPI schema the app publishes (``app.openapi()``): its request-body
schemas of ``/v1/completions`` and ``/v1/chat/completions`` are walked into strategies for
well-typed values, and a table of the values this server accepts (:data:`VALID`, one entry per
published field, so a new field cannot be forgotten) gives valid bodies. Bodies are then
mutated (wrong types, 2**70, negatives, NaN/Infinity as JSON numbers, long strings, lone
surrogates, emoji, NUL, nested junk, missing and extra fields) or sent as raw bytes (truncated
JSON, random bytes, wrong content types, empty). Properties: never a 5xx; every 4xx is an
OpenAI error object; every valid body gets a 200 (plain and SSE) with a well-formed answer.

The core is ``router_fakes.ScriptedCore``, made to put each request on the wire first as
``RouterCore`` does (a ``Submit`` through the real codec): a request the HTTP layer accepts must
be one the cluster can be sent. Cases per property: ``FDPD_FUZZ_EXAMPLES`` or the CI count.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import strategies as st

from fdpd.model.tokenizer import ByteTokenizer
from fdpd.pd.protocol import Codec, Submit, decode
from fdpd.router.app import create_app
from fdpd.router.core import TokenDelta
from fdpd.sampling_params import SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # see test_model.py
from tests.unit.router_fakes import TINY_VOCAB, MarkupByteTokenizer, ScriptedCore
from tests.unit.test_fuzz_protocol import fuzz

PATHS = {"/v1/completions": "CompletionRequest",
         "/v1/chat/completions": "ChatCompletionRequest"}
MAX_MODEL_LEN = 512
# A ChatML template that renders tool calls, as Qwen2's does: it iterates ``tool_calls``.
TOOL_TEMPLATE = (
    "{%- for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "{%- if m.tool_calls is defined %}{%- for call in m.tool_calls %}\n<tool_call>"
    "{\"name\": \"{{ call.function.name }}\", \"arguments\": "
    "{{ call.function.arguments | tojson }}}</tool_call>{%- endfor %}{%- endif %}"
    "<|im_end|>\n{% endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


class WireCore(ScriptedCore):
    """``ScriptedCore`` that first sends each request as ``RouterCore._dispatch`` does: a
    ``Submit`` encoded and decoded by the real codec, its sampling parameters rebuilt as an
    instance rebuilds them. A request that cannot travel fails here as it would in the core."""

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[TokenDelta]:
        max_tokens = params.max_tokens or self.max_model_len - len(prompt_token_ids)
        submit = Submit(request_id, list(prompt_token_ids), params.to_dict(), params.seed or 0,
                        max_tokens, "tcp://127.0.0.1:1", 600.0, "decode-0", "tcp://127.0.0.1:2")
        SamplingParams.from_dict(decode(Codec("router", 1).encode(submit)).msg.params)
        async for delta in super().generate(request_id, prompt_token_ids, params):
            yield delta


CORES = {
    "bytes": lambda: WireCore(max_model_len=MAX_MODEL_LEN),
    "chat template, -inf logprobs": lambda: WireCore(
        max_model_len=MAX_MODEL_LEN, tokenizer=MarkupByteTokenizer(TINY_VOCAB),
        chat_template=TOOL_TEMPLATE, logprob=-math.inf),
    "no tokenizer": lambda: WireCore(max_model_len=MAX_MODEL_LEN, tokenizer=None),
}


@pytest.fixture(scope="module")
def clients() -> Iterator[dict[str, TestClient]]:
    made = {name: TestClient(create_app(core()), raise_server_exceptions=False)
            for name, core in CORES.items()}
    yield made
    for client in made.values():
        client.close()


SCHEMAS = create_app(WireCore()).openapi()["components"]["schemas"]


# ---------------------------------------------------------------------- values
# Any Unicode, lone surrogates included (JSON escapes them; UTF-8 cannot hold them), emoji, NUL.
ANY_TEXT = (st.text(max_size=24) | st.sampled_from(
    ["", "\x00", "\ud800", "a\udfffb", "😀" * 8, "<bos>", "<eos>", "x" * 100_000, " ",
     "{{ 7*7 }}", "{% raw %}"]))
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=20)   # valid Unicode
ANY_INT = st.integers() | st.sampled_from([2**70, -2**70, 2**63, 2**64, -1, 0, 2**31])
ANY_NUMBER = ANY_INT | st.floats() | st.sampled_from([math.nan, math.inf, -math.inf, 1e308])
JSON_VALUES = st.recursive(st.none() | st.booleans() | ANY_NUMBER | ANY_TEXT, lambda inner: (
    st.lists(inner, max_size=4) | st.dictionaries(ANY_TEXT, inner, max_size=4)), max_leaves=10)


def _ref(node: dict) -> dict:
    while "$ref" in node:
        node = SCHEMAS[node["$ref"].rsplit("/", 1)[1]]
    return node


def schema_values(node: dict) -> st.SearchStrategy:
    """Well-typed values of a published schema node (any values in range or not)."""
    node = _ref(node)
    if "anyOf" in node:
        return st.one_of(*(schema_values(n) for n in node["anyOf"]))
    if "const" in node:
        return st.just(node["const"])
    if "enum" in node:
        return st.sampled_from(node["enum"])
    kind = node.get("type")
    if kind == "string":
        return ANY_TEXT
    if kind == "integer":
        return ANY_INT
    if kind == "number":
        return ANY_NUMBER
    if kind == "boolean":
        return st.booleans()
    if kind == "array":
        return st.lists(schema_values(node.get("items", {})), max_size=4)
    if kind == "object" and "properties" in node:
        props = node["properties"]
        return st.fixed_dictionaries(
            {k: schema_values(props[k]) for k in node.get("required", [])},
            optional={k: schema_values(v) for k, v in props.items()
                      if k not in node.get("required", [])})
    if kind == "object":
        return st.dictionaries(ANY_TEXT, schema_values(node.get("additionalProperties", {})),
                               max_size=3)
    return JSON_VALUES                                   # no type: any JSON (``prompt``)


def field_values(node: dict) -> st.SearchStrategy:
    """What a client might send for one field: well-typed per the schema, or any JSON."""
    return schema_values(node) | JSON_VALUES


# The values this server accepts, per published field (checked against the schema below).
SMALL_MAX = st.integers(1, 16)
TOKEN_IDS = st.lists(st.integers(0, TINY_VOCAB - 1), min_size=1, max_size=40)
STOP = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=4)
COMMON = {
    "model": st.none() | st.just("tiny"), "n": st.integers(1, 2),
    "prompt_logprobs": st.none() | st.sampled_from([0, 1, 20]),
    "temperature": st.none() | st.floats(0, 2), "top_p": st.none() | st.floats(0.01, 1),
    "seed": st.none() | st.integers(0, 2**63 - 1), "stop": st.none() | STOP | st.lists(STOP),
    "presence_penalty": st.none() | st.floats(-2, 2),
    "frequency_penalty": st.none() | st.floats(-2, 2),
    "logit_bias": st.none() | st.just({}), "user": st.none() | TEXT,
    "stream": st.booleans(),
    "stream_options": st.none() | st.fixed_dictionaries({}, optional={
        "include_usage": st.booleans()}),
    "top_k": st.none() | st.integers(-1, 1000), "min_p": st.none() | st.floats(0, 1),
    "repetition_penalty": st.none() | st.floats(0.01, 2),
    "stop_token_ids": st.none() | st.lists(st.integers(0, 2**63 - 1), max_size=4),
    "ignore_eos": st.booleans(), "min_tokens": st.integers(0, 1),
    "skip_special_tokens": st.booleans(), "include_stop_str_in_output": st.booleans(),
    "return_token_ids": st.booleans(), "priority": st.integers(-2**63, 2**63 - 1),
}
MESSAGE = st.fixed_dictionaries({
    "role": st.sampled_from(["system", "developer", "user", "assistant", "tool"]),
    "content": st.none() | st.text(st.characters(exclude_categories=("Cs",)), max_size=20)
    | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}), max_size=2)},
    optional={"name": TEXT})
VALID = {
    "CompletionRequest": {
        **COMMON, "max_tokens": st.none() | SMALL_MAX,
        "logprobs": st.sampled_from([None, 0, 1, 20]), "echo": st.booleans(),
        "best_of": st.none(),
        "suffix": st.sampled_from([None, ""]),
        "prompt": (st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=40)
                   | TOKEN_IDS | st.lists(TOKEN_IDS, min_size=1, max_size=1)
                   | st.lists(st.text(st.characters(exclude_categories=("Cs",)), min_size=1,
                                    max_size=9), min_size=1, max_size=1))},
    "ChatCompletionRequest": {
        **COMMON, "max_tokens": st.none() | SMALL_MAX,
        "max_completion_tokens": st.none() | SMALL_MAX, "logprobs": st.booleans(),
        "top_logprobs": st.sampled_from([None, 0]), "echo": st.just(False),
        "messages": st.lists(MESSAGE, min_size=1, max_size=3)},
}


def valid_bodies(schema: str) -> st.SearchStrategy[dict]:
    node = SCHEMAS[schema]
    values = VALID[schema]
    required = node.get("required", [])
    return st.fixed_dictionaries({k: values[k] for k in required},
                                 optional={k: v for k, v in values.items() if k not in required})


@st.composite
def fuzzed_bodies(draw, schema: str) -> Any:
    """A valid body with 1-3 fields replaced, dropped or added; or any JSON at all."""
    if draw(st.integers(0, 9)) == 0:
        return draw(JSON_VALUES)
    body = draw(valid_bodies(schema))
    props = SCHEMAS[schema]["properties"]
    for _ in range(draw(st.integers(1, 3))):
        action = draw(st.sampled_from(["replace", "replace", "drop", "extra"]))
        if action == "replace":
            name = draw(st.sampled_from(sorted(props)))
            body[name] = draw(field_values(props[name]))
        elif action == "drop" and body:
            del body[draw(st.sampled_from(sorted(body)))]
        else:
            body[draw(ANY_TEXT | st.sampled_from(["tool_calls", "functions", "n_"]))] = draw(
                JSON_VALUES)
    if isinstance(body.get("messages"), list) and draw(st.booleans()):
        # Extras on a message go to the chat template (tool_calls, as in OpenAI's API).
        for message in body["messages"]:
            if isinstance(message, dict):
                message[draw(st.sampled_from(["tool_calls", "name", "weight", "content"]))] = \
                    draw(JSON_VALUES)
    return body


def to_json(body: Any, ascii_only: bool = True) -> bytes:
    """JSON as clients send it: NaN/Infinity as the bare tokens many encoders write; lone
    surrogates escaped (or, with ``ascii_only=False``, as invalid UTF-8 bytes)."""
    text = json.dumps(body, ensure_ascii=ascii_only)
    return text.encode("utf-8", "surrogatepass")


# ---------------------------------------------------------------------- checks
def assert_not_5xx_and_well_formed(r, body: Any = None) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:500], repr(body)[:1000])
    if r.status_code >= 400:
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert isinstance(error["message"], str) and error["message"], error
        assert isinstance(error["type"], str) and error["type"], error
        assert error["param"] is None or isinstance(error["param"], str), error
        assert error["code"] is None or isinstance(error["code"], (str, int)), error
    elif r.headers["content-type"].startswith("text/event-stream"):
        events = [e for e in r.text.split("\n\n") if e]
        assert events and events[-1] == "data: [DONE]", r.text[-300:]
        for event in events[:-1]:
            assert event.startswith("data: "), event
            chunk = json.loads(event[len("data: "):])
            assert "error" not in chunk, chunk
    else:
        answer = r.json()
        assert answer["object"] in ("text_completion", "chat.completion"), answer
        # n choices; a raw body (bytes) may have asked for any n up to 16.
        n = body.get("n", 1) if isinstance(body, dict) else None
        choices = len(answer["choices"])
        assert (choices == n if n is not None else 1 <= choices <= 16), answer
        assert answer["usage"]["total_tokens"] > 0, answer


CORE_NAMES = st.sampled_from(sorted(CORES))
JSON_TYPE = {"content-type": "application/json"}


def test_every_published_field_has_valid_values():
    for schema, values in VALID.items():
        assert set(values) == set(SCHEMAS[schema]["properties"]), schema


@fuzz(200)
@given(st.sampled_from(sorted(PATHS)).flatmap(
    lambda p: st.tuples(st.just(p), fuzzed_bodies(PATHS[p]))), CORE_NAMES, st.booleans())
def test_fuzzed_bodies_never_get_a_5xx(clients, path_body, core, ascii_only):
    path, body = path_body
    r = clients[core].post(path, content=to_json(body, ascii_only), headers=JSON_TYPE)
    assert_not_5xx_and_well_formed(r, body)


@fuzz(100)
@given(st.sampled_from(sorted(PATHS)).flatmap(
    lambda p: st.tuples(st.just(p), valid_bodies(PATHS[p]))),
    st.sampled_from(["bytes", "chat template, -inf logprobs"]))
def test_valid_bodies_get_200(clients, path_body, core):
    path, body = path_body
    r = clients[core].post(path, content=to_json(body), headers=JSON_TYPE)
    assert r.status_code == 200, (r.text[:500], body)
    assert_not_5xx_and_well_formed(r, body)


@st.composite
def raw_requests(draw) -> tuple[str, bytes, dict]:
    path = draw(st.sampled_from(sorted(PATHS)))
    valid = to_json(draw(valid_bodies(PATHS[path])))
    kind = draw(st.sampled_from(["truncated", "random", "content-type", "empty", "scalar",
                                 "utf-16", "deep"]))
    headers = dict(JSON_TYPE)
    if kind == "truncated":
        content = valid[:draw(st.integers(0, len(valid) - 1))]
    elif kind == "random":
        content = draw(st.binary(max_size=256))
    elif kind == "content-type":
        content = valid
        headers["content-type"] = draw(st.sampled_from(
            ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; b=x",
             "application/json; charset=utf-16", "application/xml", "", "*/*"]))
    elif kind == "empty":
        content = b""
    elif kind == "scalar":
        content = to_json(draw(st.none() | ANY_NUMBER | ANY_TEXT | st.lists(st.integers())))
    elif kind == "utf-16":
        content = valid.decode().encode("utf-16")
    else:
        depth = draw(st.integers(100, 50_000))
        content = b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}"
    return path, content, headers


@fuzz(150)
@given(raw_requests(), CORE_NAMES)
def test_raw_bodies_never_get_a_5xx(clients, request, core):
    path, content, headers = request
    r = clients[core].post(path, content=content, headers=headers)
    assert_not_5xx_and_well_formed(r, content[:200])


@fuzz(60)
@given(st.sampled_from(["/v1/models/", "/v1/requests/", "/v1/requests/recent?limit=",
                        "/v1/completions/", "/v1/"]),
       TEXT.map(lambda t: quote(t, safe="")) | ANY_INT.map(str)
       | st.sampled_from(["%ff%fe", "%ed%a0%80", "%00", "..%2f..", "a/b/c", "%", "x" * 5000]))
def test_other_paths_never_get_a_5xx(clients, prefix, tail):
    r = clients["bytes"].get(prefix + tail)
    assert r.status_code < 500, (r.status_code, r.text[:300])
    if r.status_code >= 400:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "\ud800"}, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a\udfff"}]},
     "messages"),
    ("/v1/completions", {"prompt": "hi", "stop": ["\ud800"]}, "stop"),
    ("/v1/completions", {"prompt": "hi", "top_k": 2**70}, "top_k"),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": [2**64]}, "stop_token_ids"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi",
                                            "tool_calls": 5}]}, "messages"),
])
def test_found_by_fuzzing(clients, path, body, param):
    """Each was a 500: lone surrogates reached UTF-8 encoders (tokenizer, msgpack); integers
    past 64 bits reached the msgpack encoder; a template iterated a number."""
    r = clients["chat template, -inf logprobs"].post(path, content=to_json(body),
                                                     headers=JSON_TYPE)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_unknown_model_with_a_lone_surrogate_is_a_404_object(clients):
    """Was a plain-text 500: the 404 message quotes the model, and JSON rendering as UTF-8
    failed on the surrogate."""
    r = clients["bytes"].post("/v1/completions", headers=JSON_TYPE,
                              content=to_json({"prompt": "hi", "model": "gpt\ud800"}))
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_prompt_ids_past_64_bits_without_a_tokenizer(clients):
    r = clients["no tokenizer"].post("/v1/completions", headers=JSON_TYPE,
                                     content=to_json({"prompt": [2**64]}))
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert clients["no tokenizer"].post("/v1/completions", headers=JSON_TYPE, content=to_json(
        {"prompt": [ByteTokenizer.EOS, 2**62]})).status_code == 200
