"""``n`` choices in the HTTP layer (``fdpd.router.choices``) against fake cores: how the choices
are derived and started, how their pieces interleave, and that a failing or abandoned choice
ends every other one (each gets an abort, no generator is left open)."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from fdpd.router.app import create_app

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # see test_model.py
from tests.unit.router_fakes import EngineCore, ScriptedCore
from tests.unit.test_router_app import _disconnect_midway, assert_error, sse_events


@pytest.fixture
def core() -> ScriptedCore:
    return ScriptedCore()


@pytest.fixture
def client(core: ScriptedCore) -> Iterator[TestClient]:
    with TestClient(create_app(core, served_model_names=["tiny", "alias"])) as c:
        yield c


def test_each_choice_is_one_seeded_request(client, core):
    r = client.post("/v1/completions", json={"prompt": "hi", "n": 3, "seed": 5,
                                             "max_tokens": 4, "prompt_logprobs": 1})
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert [c["text"] for c in body["choices"]] == ["Hell"] * 3
    assert [call.params.seed for call in core.calls] == [5, 6, 7]
    assert all(call.params.n == 1 for call in core.calls)
    # Only choice 0 computes the prompt's logprobs (they bypass the prefix cache).
    assert [call.params.prompt_logprobs for call in core.calls] == [1, None, None]
    assert len({call.request_id for call in core.calls}) == 3
    assert body["usage"]["completion_tokens"] == 12
    assert body["usage"]["prompt_tokens"] == 3                       # counted once


def test_other_choices_start_after_the_first_token(client, core):
    core.chunk = 2
    events = sse_events(client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "n": 2, "max_tokens": 4,
        "stream": True}).text)
    roles = [e["choices"][0]["index"] for e in events if "role" in e["choices"][0]["delta"]]
    assert roles == [0, 1]
    content = [(e["choices"][0]["index"], e["choices"][0]["delta"].get("content"))
               for e in events if e["choices"] and e["choices"][0]["delta"].get("content")]
    assert content[0] == (0, "He")
    assert sorted(content) == [(0, "He"), (0, "ll"), (1, "He"), (1, "ll")]
    finishes = [e["choices"][0]["index"] for e in events
                if e["choices"] and e["choices"][0]["finish_reason"]]
    assert sorted(finishes) == [0, 1]


def test_a_failed_first_choice_starts_no_other(client, core):
    from fdpd.router.core import RouterError

    core.error = RouterError(503, "no_instances", "nothing to run on", retry_after=2)
    r = client.post("/v1/completions", json={"prompt": "hi", "n": 4})
    assert_error(r, 503)
    assert len(core.calls) == 1


def test_a_broken_choice_ends_every_choice(client, core):
    core.break_after = 3
    core.delay = 0.001
    r = client.post("/v1/completions", json={"prompt": "hi", "n": 3, "max_tokens": 10})
    assert_error(r, 502)
    ids = {call.request_id for call in core.calls}
    assert set(core.closed) == ids                           # no generator left open
    assert {rid for rid, _ in core.aborts} == ids


@pytest.mark.parametrize("stream", [False, True])
def test_client_disconnect_aborts_every_choice(core, stream):
    core.hang_after = 2
    app = create_app(core)

    def ready(sent: list[dict]) -> bool:      # both choices started and hanging
        return len(core.calls) == 2 and time.monotonic() - started > 0.05

    started = time.monotonic()
    asyncio.run(_disconnect_midway(app, "/v1/completions",
                                   {"prompt": "hi", "n": 2, "stream": stream}, ready))
    ids = sorted(call.request_id for call in core.calls)
    assert sorted(core.aborts) == [(rid, "client disconnected") for rid in ids]
    assert sorted(core.closed) == ids


def test_served_names_and_the_model_a_response_names(client):
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["tiny", "alias"]
    assert client.post("/v1/completions", json={"prompt": "a", "model": "alias",
                                                "max_tokens": 1}).json()["model"] == "alias"
    assert client.post("/v1/completions", json={"prompt": "a",
                                                "max_tokens": 1}).json()["model"] == "tiny"
    assert_error(client.post("/v1/completions", json={"prompt": "a", "model": "x"}), 404,
                 "model")
    assert client.get("/v1/models/alias").json()["root"] == "tiny"


def test_echo_of_token_id_prompt_with_the_real_engine():
    core = EngineCore()
    with TestClient(create_app(core)) as client:
        prompt = [256, *b"abc"]
        r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 0,
                                                 "echo": True, "logprobs": 0})
        choice = r.json()["choices"][0]
        assert choice["text"] == "abc"               # decoded as the prompt is shown
        lp = choice["logprobs"]
        assert lp["tokens"] == ["<bos>", "a", "b", "c"]
        assert lp["token_logprobs"][0] is None and all(
            v is not None and v <= 0 for v in lp["token_logprobs"][1:])
        assert lp["text_offset"] == [0, 5, 6, 7]
        assert list(lp["top_logprobs"][1]) == ["a"]            # k = 0: the token alone


def test_served_model_name_flag_env_and_config_file(entry_points, tmp_path):
    from click.testing import CliRunner

    from fdpd.cli import main

    router = ["launch", "--role", "router"]
    runner = CliRunner()
    r = runner.invoke(main, [*router, "--served-model-name", "tiny, alias,tiny"])
    assert r.exit_code == 0, r.output
    assert entry_points["router"]["served_model_names"] == ("tiny", "alias")
    config = tmp_path / "fdpd.yaml"
    config.write_text("served-model-name: a,b\n")
    assert runner.invoke(main, [*router, "--config", str(config)]).exit_code == 0
    assert entry_points["router"]["served_model_names"] == ("a", "b")
    r = runner.invoke(main, router, env={"FDPD_SERVED_MODEL_NAME": "env-name"})
    assert entry_points["router"]["served_model_names"] == ("env-name",)
    r = runner.invoke(main, [*router, "--served-model-name", "a,,b"])
    assert r.exit_code == 2 and "empty name" in r.output
