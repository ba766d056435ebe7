"""The router's HTTP/OpenAI layer (``fdpd.router.app``) against fake cores: request parsing and
errors, response shapes (plain and SSE), stop strings, aborts, metrics, API keys, and the real
``openai`` SDK against the app served by uvicorn."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from fdpd.router.app import create_app
from fdpd.router.core import RouterError
from fdpd.sampling_params import SamplingParams
from fdpd.testing.asgi import serve_app

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # see test_model.py
from tests.unit.router_fakes import EngineCore, MarkupByteTokenizer, ScriptedCore

SCRIPT_TEXT = "Hello world. The end."
BUILTIN_CHAT = "<|system|>\nBe brief.\n<|user|>\nhi\n<|assistant|>\n"


@pytest.fixture
def core() -> ScriptedCore:
    return ScriptedCore()


@pytest.fixture
def client(core: ScriptedCore) -> Iterator[TestClient]:
    with TestClient(create_app(core)) as c:
        yield c


def sse_events(text: str) -> list[dict]:
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events), events
    assert events[-1] == "data: [DONE]"
    return [json.loads(e[len("data: "):]) for e in events[:-1]]


def assert_error(response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


# ------------------------------------------------------------------------------ completions
def test_completion_plain(client, core):
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 50})
    body = r.json()
    assert r.status_code == 200
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert body["model"] == "tiny" and isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert choice["text"] == SCRIPT_TEXT and choice["finish_reason"] == "stop"
    assert choice["index"] == 0 and choice["logprobs"] is None and "token_ids" not in choice
    n_out = len(SCRIPT_TEXT) + 1                        # + EOS
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": n_out,
                             "total_tokens": 3 + n_out,
                             "prompt_tokens_details": {"cached_tokens": 3}}
    assert core.calls[0].request_id == body["id"]
    assert core.calls[0].prompt_token_ids == [256, ord("h"), ord("i")]
    assert core.aborts == []                            # finished normally: nothing to abort


@pytest.mark.parametrize("prompt", [[5, 6, 7], [[5, 6, 7]]])
def test_completion_token_id_prompt_and_return_token_ids(client, core, prompt):
    r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 4,
                                             "return_token_ids": True})
    choice = r.json()["choices"][0]
    assert core.calls[0].prompt_token_ids == [5, 6, 7]
    assert choice["prompt_token_ids"] == [5, 6, 7]
    assert choice["token_ids"] == list(b"Hell") and choice["text"] == "Hell"
    assert choice["finish_reason"] == "length"


def test_completion_one_element_text_list(client, core):
    assert client.post("/v1/completions", json={"prompt": ["ab"]}).status_code == 200
    assert core.calls[0].prompt_token_ids == [256, 97, 98]


def test_default_max_tokens_is_16_and_null_means_context_room(client, core):
    client.post("/v1/completions", json={"prompt": "hi"})
    client.post("/v1/completions", json={"prompt": "hi", "max_tokens": None})
    assert core.calls[0].params.max_tokens == 16
    assert core.calls[1].params.max_tokens == core.max_model_len - 3


def test_sampling_fields_pass_through(client, core):
    client.post("/v1/completions", json={
        "prompt": "hi", "max_tokens": 5, "temperature": 0.5, "top_p": 0.9, "top_k": 7,
        "min_p": 0.1, "seed": 1234, "stop": "zz", "stop_token_ids": [9], "presence_penalty": 0.5,
        "frequency_penalty": -0.5, "repetition_penalty": 1.2, "ignore_eos": True,
        "min_tokens": 2, "user": "u", "priority": 3})
    p = core.calls[0].params
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.seed) == (0.5, 0.9, 7, 0.1, 1234)
    assert p.stop == ("zz",) and p.stop_token_ids == (9,) and p.ignore_eos
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.5, -0.5, 1.2)
    assert p.min_tokens == 2 and p.max_tokens == 5
    client.post("/v1/completions", json={"prompt": "hi"})
    assert core.calls[1].params.seed is None            # the core assigns one


@pytest.mark.parametrize("chunk", [1, 4])
def test_completion_stream_with_usage(client, core, chunk):
    core.chunk = chunk
    r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 50, "stream": True,
                                             "stream_options": {"include_usage": True},
                                             "return_token_ids": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    *chunks, usage = events
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == len(SCRIPT_TEXT) + 1
    assert all(c["object"] == "text_completion" and c["id"] == usage["id"] for c in events)
    assert "".join(c["choices"][0]["text"] for c in chunks) == SCRIPT_TEXT
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "stop"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    ids = [t for c in chunks for t in c["choices"][0]["token_ids"]]
    assert ids == [*SCRIPT_TEXT.encode(), 257]
    assert chunks[0]["choices"][0]["prompt_token_ids"] == [256, 104, 105]


def test_stream_without_usage_has_no_usage_chunk(client):
    events = sse_events(client.post("/v1/completions", json={"prompt": "hi",
                                                             "stream": True}).text)
    assert all("usage" not in e and e["choices"] for e in events)


def test_completion_logprobs(client, core):
    r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "logprobs": 1})
    lp = r.json()["choices"][0]["logprobs"]
    assert lp["tokens"] == ["H", "e", "l"] and lp["token_logprobs"] == [-0.5] * 3
    assert lp["text_offset"] == [0, 1, 2] and lp["top_logprobs"][0] == {"H": -0.5}
    core.logprob = float("-inf")                # JSON has no -inf: clamped, never a 500
    r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1, "logprobs": 0})
    lp = r.json()["choices"][0]["logprobs"]
    # vLLM's shape: logprobs 0 still maps the chosen token in top_logprobs.
    assert lp["token_logprobs"] == [-9999.0] and lp["top_logprobs"] == [{"H": -9999.0}]


# ------------------------------------------------------------------------------ stop strings
@pytest.mark.parametrize("chunk", [1, 3, 8, 50])
def test_stop_string_is_held_back_and_aborts(client, core, chunk):
    core.chunk = chunk
    r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 50, "stream": True,
                                             "stop": ["world", "xyz"]})
    chunks = sse_events(r.text)
    texts = [c["choices"][0]["text"] for c in chunks]
    assert "".join(texts) == "Hello "
    assert not any(set(t) & set("wrd") for t in texts)     # nothing of the stop string leaked
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"][0]["stop_reason"] == "world"
    # With chunk 50 the stop string arrives in the core's final delta: nothing left to abort.
    assert core.aborts == ([] if chunk == 50 else [(core.calls[0].request_id, "stop")])
    assert core.closed == [core.calls[0].request_id]


def test_stop_string_non_stream_and_include_in_output(client, core):
    r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 50, "stop": "world",
                                             "include_stop_str_in_output": True})
    choice = r.json()["choices"][0]
    assert choice["text"] == "Hello world" and choice["finish_reason"] == "stop"
    assert choice["stop_reason"] == "world"
    assert [reason for _, reason in core.aborts] == ["stop"]


# ------------------------------------------------------------------------------ chat
def test_chat_plain_uses_builtin_template(client, core):
    r = client.post("/v1/chat/completions", json={
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "max_tokens": 50, "return_token_ids": True})
    body = r.json()
    assert r.status_code == 200 and body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    (choice,) = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": SCRIPT_TEXT}
    assert choice["finish_reason"] == "stop"
    expected = core.tokenizer.encode(BUILTIN_CHAT)
    assert core.calls[0].prompt_token_ids == expected == body["prompt_token_ids"]
    assert body["usage"]["prompt_tokens"] == len(expected)
    assert choice["token_ids"][-1] == 257


def test_chat_stream_role_first_and_usage(client, core):
    r = client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 5,
        "stream": True, "stream_options": {"include_usage": True}})
    *chunks, usage = sse_events(r.text)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "Hello"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 5
    assert core.calls[0].params.max_tokens == 5


def test_chat_max_tokens_defaults_to_context_room(client, core):
    client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    prompt_len = len(core.calls[0].prompt_token_ids)
    assert core.calls[0].params.max_tokens == core.max_model_len - prompt_len


def test_chat_logprobs(client):
    r = client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "logprobs": True,
        "top_logprobs": 0})
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content] == ["H", "e"]
    assert content[0] == {"token": "H", "logprob": -0.5, "bytes": [72], "top_logprobs": []}


def test_chat_jinja_template(core):
    core.chat_template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'tool' %}"
        "{{ raise_exception('no tools here') }}{% endif %}"
        "[{{ m['role'] }}]{{ m['content'] }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}")
    core.tokenizer = MarkupByteTokenizer(384)
    with TestClient(create_app(core)) as c:
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                 "max_tokens": 2})
        assert r.status_code == 200
        # One BOS although both the template and encode() add one.
        assert core.calls[0].prompt_token_ids == [256, *b"[user]hi", 257, *b"[assistant]"]
        r = c.post("/v1/chat/completions", json={
            "messages": [{"role": "tool", "content": "x"}]})
        assert "no tools here" in assert_error(r, 400, "messages")["message"]


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("path, body, status, param", [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", {}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "5"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 5.5}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"prompt": "hi", "stop": [1]}, 400, "stop"),
    ("/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": 1}}, 400,
     "stream_options.include_usage"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 126}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x" * 200}, 400, "prompt"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": [[]]}, 400, "prompt"),
    ("/v1/completions", {"prompt": None}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, -2]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, True]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, 10**6]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, "a"]}, 400, "prompt"),
    ("/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [[1], [2]]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, 404, "model"),
    ("/v1/completions", {"prompt": "hi", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "hi", "n": 17}, 400, "n"),
    ("/v1/completions", {"prompt": "hi", "n": 2, "best_of": 3}, 400, "best_of"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "prompt_logprobs": 21}, 400, "prompt_logprobs"),
    ("/v1/completions", {"prompt": "hi", "best_of": 3}, 400, "best_of"),
    ("/v1/completions", {"prompt": "hi", "echo": "yes"}, 400, "echo"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "logprobs": -1}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "hi", "seed": -1}, 400, "seed"),
    ("/v1/completions", {"prompt": "hi", "min_tokens": 20, "max_tokens": 5}, 400,
     "min_tokens"),
    ("/v1/completions", {"prompt": "hi", "stop": [""]}, 400, "stop"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"5": 1.0}}, 400, "logit_bias"),
    ("/v1/completions", b'{"prompt": "hi", "temperature": NaN}', 400, "temperature"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {}, 400, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400,
     "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "max_completion_tokens": 1000}, 400, "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 200}]}, 400,
     "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "top_logprobs": 21, "logprobs": True}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "top_logprobs": 2}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "echo": True}, 400, "echo"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "model": "nope"}, 404, "model"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 0}, 400,
     "n"),
])
def test_bad_requests_are_4xx_openai_errors(client, core, path, body, status, param):
    if isinstance(body, bytes):
        r = client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = client.post(path, json=body)
    error = assert_error(r, status, param)
    assert error["type"] == "invalid_request_error"
    if status == 404:
        assert error["code"] == "model_not_found"
    assert core.calls == []                     # nothing reached the cluster


def test_unknown_route_and_method_are_openai_errors(client):
    assert_error(client.get("/v1/nothing"), 404)
    assert_error(client.get("/v1/completions"), 405)


def test_model_without_tokenizer(core):
    core.tokenizer = None
    with TestClient(create_app(core)) as c:
        assert_error(c.post("/v1/completions", json={"prompt": "hi"}), 400, "prompt")
        assert_error(c.post("/v1/completions", json={"prompt": [1, 2], "stop": "x"}), 400,
                     "stop")
        assert_error(c.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}]}), 400, "messages")
        r = c.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 3,
                                            "return_token_ids": True, "logprobs": 0})
        choice = r.json()["choices"][0]
        assert choice["text"] == "" and choice["token_ids"] == list(b"Hel")
        assert choice["logprobs"]["tokens"] == ["token_id:72", "token_id:101", "token_id:108"]


# ------------------------------------------------------------------------------ core failures
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("status, code, retry_after", [
    (503, "no_instances", 2.5), (429, "queue_full", 0.0), (504, "timeout", 0.0)])
def test_router_error_maps_to_status(client, core, stream, status, code, retry_after):
    core.error = RouterError(status, code, f"{code} happened", retry_after=retry_after)
    r = client.post("/v1/completions", json={"prompt": "hi", "stream": stream})
    error = assert_error(r, status)
    assert error["code"] == code and error["message"] == f"{code} happened"
    if status in (429, 503):
        assert r.headers["retry-after"] == ("3" if retry_after else "1")
    else:
        assert "retry-after" not in r.headers


def test_stream_broken_mid_stream_sends_error_event(client, core):
    core.break_after = 3
    r = client.post("/v1/completions", json={"prompt": "hi", "stream": True})
    events = sse_events(r.text)
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == "Hel"
    assert events[-1] == {"error": {"message": "generation failed: decode instance died",
                                    "type": "server_error", "param": None, "code": 502}}
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user",
                                                                 "content": "hi"}]})
    assert assert_error(r, 502)["type"] == "server_error"


def test_unexpected_core_exception_is_a_generic_500(core, caplog):
    async def boom(*args, **kwargs):
        raise RuntimeError("secret internals")
        yield  # pragma: no cover

    core.generate = boom
    with TestClient(create_app(core)) as c:
        for stream in (False, True):
            r = c.post("/v1/completions", json={"prompt": "hi", "stream": stream})
            error = assert_error(r, 500)
            assert "secret" not in error["message"] and error["type"] == "server_error"
    assert "secret internals" in caplog.text


# ------------------------------------------------------------------------------ other routes
def test_models_health_cluster(client, core):
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert [(m["id"], m["max_model_len"]) for m in models["data"]] == [("tiny", 128)]
    assert client.get("/v1/models/tiny").json()["id"] == "tiny"
    assert_error(client.get("/v1/models/other"), 404)
    assert client.get("/v1/cluster").json() == core.cluster()
    r = client.get("/health")
    assert (r.status_code, r.json()) == (200, {"status": "ok"})
    core.health = (False, "no decode instance")
    r = client.get("/health")
    assert r.status_code == 503 and r.json()["reason"] == "no decode instance"


def test_metrics(client):
    client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4})
    client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 0})
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for name in ("fdpd:time_to_first_token_seconds_bucket", "fdpd:inter_token_latency_seconds",
                 "fdpd:e2e_request_latency_seconds_count", "fdpd:fake_core_up 1"):
        assert name in text
    assert 'fdpd:http_requests_total{endpoint="/v1/completions",status="200"} 1.0' in text
    assert 'fdpd:http_requests_total{endpoint="/v1/completions",status="400"} 1.0' in text
    assert "fdpd:prompt_tokens_total 3.0" in text
    assert "fdpd:generation_tokens_total 4.0" in text
    assert 'fdpd:request_success_total{finished_reason="length"} 1.0' in text
    type_lines = [line for line in text.splitlines() if line.startswith("# TYPE")]
    assert len(type_lines) == len(set(type_lines))   # no metric declared twice


def test_api_key(core):
    with TestClient(create_app(core, api_key="sekrit")) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekrit"}):
            error = assert_error(c.get("/v1/models", headers=headers), 401)
            assert error["code"] == "invalid_api_key"
            assert_error(c.post("/v1/completions", json={"prompt": "hi"}, headers=headers), 401)
        ok = {"Authorization": "Bearer sekrit"}
        assert c.get("/v1/models", headers=ok).status_code == 200
        assert c.post("/v1/completions", json={"prompt": "hi"}, headers=ok).status_code == 200
        assert c.get("/health").status_code == 200
        assert c.get("/metrics").status_code == 200
    assert len(core.calls) == 1


# ------------------------------------------------------------------------------ disconnects
def _scope(path: str) -> dict:
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1", "method": "POST", "scheme": "http", "path": path,
            "raw_path": path.encode(), "root_path": "", "query_string": b"",
            "headers": [(b"content-type", b"application/json")],
            "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000)}


async def _disconnect_midway(app, path: str, body: dict, ready) -> list[dict]:
    """Run one request over raw ASGI; the client disconnects once ``ready(sent)`` is true."""
    gone = asyncio.Event()
    requested = False
    sent: list[dict] = []

    async def receive() -> dict:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": json.dumps(body).encode(),
                    "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    task = asyncio.create_task(app(_scope(path), receive, send))
    deadline = time.monotonic() + 5
    while not ready(sent):
        assert time.monotonic() < deadline and not task.done()
        await asyncio.sleep(0.005)
    gone.set()
    await asyncio.wait_for(task, 5)
    return sent


@pytest.mark.parametrize("stream, hang_after", [(False, 3), (True, 0), (True, 3)])
def test_client_disconnect_aborts(core, stream, hang_after):
    core.hang_after = hang_after
    app = create_app(core)
    path = "/v1/chat/completions" if stream and hang_after else "/v1/completions"
    body = ({"messages": [{"role": "user", "content": "hi"}], "stream": True}
            if path == "/v1/chat/completions" else {"prompt": "hi", "stream": stream})

    def ready(sent: list[dict]) -> bool:
        if stream and hang_after:    # role chunk + 3 content chunks reached the client
            return sum(m["type"] == "http.response.body" and m["body"] != b""
                       for m in sent) >= 4
        return bool(core.calls) and len(core.closed) == 0 and _settled()

    started = time.monotonic()

    def _settled() -> bool:
        return time.monotonic() - started > 0.05

    asyncio.run(_disconnect_midway(app, path, body, ready))
    rid = core.calls[0].request_id
    assert core.aborts == [(rid, "client disconnected")]
    assert core.closed == [rid]


# ------------------------------------------------------------------------------ real engine + SDK
serve = serve_app


@pytest.fixture(scope="module")
def engine_reference():
    from fdpd.llm import LLM

    llm = LLM("tiny")
    core = EngineCore(llm.engine)

    def reference(prompt_ids: list[int], max_tokens: int) -> str:
        params = SamplingParams(temperature=0, max_tokens=max_tokens)
        return llm.generate({"prompt_token_ids": prompt_ids}, params)[0].outputs[0].text

    return core, reference


def test_openai_sdk_against_uvicorn(engine_reference):
    import openai

    core, reference = engine_reference
    tok = core.tokenizer
    with serve(create_app(core, api_key="k")) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", timeout=30, max_retries=0)
        assert [m.id for m in client.models.list()] == ["tiny"]

        want = reference(tok.encode("Hello"), 12)
        out = client.completions.create(model="tiny", prompt="Hello", max_tokens=12,
                                        temperature=0)
        assert out.choices[0].text == want and out.choices[0].finish_reason == "length"
        assert out.usage.completion_tokens == 12 and out.usage.prompt_tokens == 6
        stream = client.completions.create(model="tiny", prompt="Hello", max_tokens=12,
                                           temperature=0, stream=True,
                                           stream_options={"include_usage": True})
        chunks = list(stream)
        assert "".join(c.choices[0].text for c in chunks if c.choices) == want
        assert chunks[-1].usage.completion_tokens == 12

        messages = [{"role": "user", "content": "hi"}]
        want = reference(tok.encode("<|user|>\nhi\n<|assistant|>\n"), 10)
        chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10,
                                              temperature=0)
        assert chat.choices[0].message.content == want
        assert chat.choices[0].message.role == "assistant"
        stream = client.chat.completions.create(model="tiny", messages=messages,
                                                max_tokens=10, temperature=0, stream=True)
        chunks = list(stream)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
        assert chunks[-1].choices[0].finish_reason == "length"

        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="gpt-4", prompt="x")
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="tiny", prompt="x", max_tokens=0)
        bad_key = openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad_key.models.list()


@pytest.mark.parametrize("stream", [False, True])
def test_disconnect_over_real_http_aborts(stream):
    import httpx

    core = ScriptedCore(hang_after=2)
    with serve(create_app(core)) as url:
        if stream:
            with httpx.Client(timeout=10) as http, http.stream(
                    "POST", f"{url}/v1/completions", json={"prompt": "hi", "stream": True}) as r:
                assert r.status_code == 200
                next(r.iter_raw())
        else:
            # The client gives up waiting: its connection closes with the request running.
            with httpx.Client(timeout=0.3) as http, pytest.raises(httpx.ReadTimeout):
                http.post(f"{url}/v1/completions", json={"prompt": "hi"})
        deadline = time.monotonic() + 5
        while not core.aborts and time.monotonic() < deadline:
            time.sleep(0.01)
    assert core.aborts == [(core.calls[0].request_id, "client disconnected")]
