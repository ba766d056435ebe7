"""The model is the cluster's (``fdpd.router.cluster_model``), without processes: the router's
check of a registering instance's fingerprint, and a router without ``--model`` taking the model
of the first instance (its 503s before, its /v1/models and /v1/cluster after)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from fdpd.config import PDConfig
from fdpd.model.loader import read_model_config
from fdpd.model.tiny import TINY_CONFIG
from fdpd.pd.protocol import Register
from fdpd.router.app import create_app
from fdpd.router.cluster_model import NO_MODEL_YET
from fdpd.router.core import RouterCore
from fdpd.router.registry import MAX_REFUSALS

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # see test_model.py
from tests.model_factory import make_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"), "llama", tokenizer=True)


def register(name: str, model: str, path: str, fingerprint: bytes, dtype: str = "float32",
             block_size: int = 16) -> Register:
    return Register(name, "mixed", "tcp://127.0.0.1:1", model, block_size, 64, 128,
                    fingerprint, dtype, path)


def tiny(name: str = "mixed-0", **kw) -> Register:
    return register(name, "tiny", "tiny", TINY_CONFIG.fingerprint("float32", 16), **kw)


def other(checkpoint: Path, name: str = "mixed-1") -> Register:
    fp = read_model_config(checkpoint).fingerprint("float32", 16)
    return register(name, "./" + checkpoint.name, str(checkpoint), fp)


def router(model: str | None = "tiny") -> RouterCore:
    return RouterCore(model_name=model, tokenizer=None, chat_template=None, max_model_len=None
                      if model is None else 128, pd=PDConfig())


def test_a_router_refuses_another_model_naming_both(checkpoint, caplog):
    core = router("tiny")
    ok, why = core.registry.register(other(checkpoint), epoch=1)
    assert not ok
    assert "model mismatch" in why and f"'./{checkpoint.name}'" in why and "'tiny'" in why
    assert "--model tiny" in why                        # and what to do about it
    for _ in range(3):                                   # it retries every heartbeat
        assert core.registry.register(other(checkpoint), epoch=1) == (False, why)
    refused = core.cluster()["refused"]
    assert [(r["instance_id"], r["reason"], r["attempts"]) for r in refused] == [
        ("mixed-1", why, 4)]
    assert [r.getMessage() for r in caplog.records if "refused" in r.getMessage()] == [
        f"refused instance mixed-1 (mixed at tcp://127.0.0.1:1): {why}"]    # logged once
    assert core.registry.instances == {}
    # The same model in another dtype or block size is the router's model (its tokenizer
    # fits); the instance's own fingerprint is what is checked.
    bf16 = register("mixed-2", "tiny", "tiny", TINY_CONFIG.fingerprint("bfloat16", 32),
                    dtype="bfloat16", block_size=32)
    assert core.registry.register(bf16, epoch=1) == (True, "")
    lying = register("mixed-3", "tiny", "tiny", TINY_CONFIG.fingerprint("float32", 16),
                     dtype="bfloat16")
    assert "model mismatch" in core.registry.register(lying, epoch=1)[1]
    assert "did not report its KV dtype" in core.registry.register(
        tiny("mixed-4", dtype=""), epoch=1)[1]


def test_a_refused_instance_leaves_the_list_when_it_registers(checkpoint):
    core = router("tiny")
    assert not core.registry.register(other(checkpoint, "mixed-0"), epoch=1)[0]
    assert core.registry.register(tiny("mixed-0"), epoch=2) == (True, "")
    view = core.cluster()
    assert view["refused"] == [] and [i["instance_id"] for i in view["instances"]] == [
        "mixed-0"]
    assert view["router"]["model"]["name"] == "tiny"


def test_refusals_are_bounded_and_forgotten_when_the_instance_stops_trying(checkpoint):
    core = router("tiny")
    for i in range(MAX_REFUSALS + 6):
        core.registry.register(other(checkpoint, f"mixed-{i}"), epoch=1)
    refused = core.registry.refused
    assert len(refused) == MAX_REFUSALS and "mixed-0" not in refused and "mixed-69" in refused
    for r in list(refused.values())[:-1]:
        r.last_seen -= core.registry.timeout + 1
    core.registry.expire()
    assert list(refused) == ["mixed-69"]


def test_a_router_without_model_takes_the_first_instances(checkpoint):
    core = router(None)
    with TestClient(create_app(core)) as client:
        for r in (client.get("/v1/models"),
                  client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}),
                  client.post("/v1/chat/completions",
                              json={"messages": [{"role": "user", "content": "hi"}]})):
            assert r.status_code == 503, r.text
            assert r.json()["error"]["message"] == NO_MODEL_YET
            assert r.json()["error"]["code"] == "model_not_ready"
        assert client.get("/v1/cluster").json()["router"]["model"]["name"] is None
        assert core.registry.register(other(checkpoint, "prefill-0"), epoch=1) == (True, "")
        models = client.get("/v1/models").json()["data"]
        assert [(m["id"], m["max_model_len"]) for m in models] == [
            (f"./{checkpoint.name}", 128)]
        model = client.get("/v1/cluster").json()["router"]["model"]
        assert model["adopted_from"] == "prefill-0" and model["vocab_size"] == 512
    assert core.tokenizer is not None and core.tokenizer.encode("The quick brown fox")
    # From now on the cluster's model is that one.
    why = core.registry.register(tiny("decode-0"), epoch=1)[1]
    assert "model mismatch" in why and "'tiny'" in why and checkpoint.name in why


def test_a_router_that_cannot_read_the_model_says_to_give_it_one(tmp_path):
    core = router(None)
    missing = register("mixed-0", "/models/llama", str(tmp_path / "absent"), b"\0" * 32)
    ok, why = core.registry.register(missing, epoch=1)
    assert not ok and "started without --model" in why and "absent" in why
    assert "start the router with --model" in why
    assert core.cluster_model.current is None           # the next instance may still do
    assert core.registry.register(tiny(), epoch=1) == (True, "")
    assert core.model_name == "tiny"
