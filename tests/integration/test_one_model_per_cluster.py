"""The model is the cluster's, with real processes: a router on ``tiny`` refuses an instance
serving a synthetic checkpoint (typed reply, its log, the router's log, /v1/cluster), and a
router started without ``--model`` serves the instances' model, tokenizer and chat template
loaded from the directory they report, token for token as the offline engine."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from fdpd import LLM, SamplingParams
from fdpd.launch import launch_command
from fdpd.model.loader import load_model_metadata
from fdpd.router.chat import encode_chat_prompt, render_chat
from fdpd.testing import Cluster, complete
from fdpd.testing.processes import ClusterProcess, child_env

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # see tests/unit/test_model.py
from tests.model_factory import make_checkpoint

pytestmark = pytest.mark.timeout(120)
GREEDY = {"temperature": 0, "ignore_eos": True, "return_token_ids": True}
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = make_checkpoint(tmp_path_factory.mktemp("ckpt"), "llama", tokenizer=True)
    (path / "chat_template.jinja").write_text(TEMPLATE)
    return path


def extra_instance(cluster: Cluster, name: str, model: Path) -> ClusterProcess:
    """One more instance, on another model than the cluster's (not waited for: it must not
    register)."""
    args = ["--host", "127.0.0.1", "--port", "0", "--router",
            f"127.0.0.1:{cluster.control_port}", "--model", str(model),
            "--heartbeat-interval", "0.2", "--instance-id", name]
    package_root = str(Path(__file__).resolve().parents[2])
    return ClusterProcess(name, "mixed", launch_command("mixed", args),
                          cluster.log_dir / f"{name}.log", child_env(None, package_root))


def test_a_router_on_tiny_refuses_an_instance_of_another_model(checkpoint, tmp_path):
    with Cluster(0, 0, 1, log_dir=tmp_path) as cluster:
        proc = extra_instance(cluster, "mixed-other", checkpoint)
        proc.start()
        try:
            def refused() -> dict | None:
                entries = {r["instance_id"]: r for r in cluster.cluster()["refused"]}
                entry = entries.get("mixed-other")
                return entry if entry and entry["attempts"] >= 3 else None

            entry = cluster.wait_for(refused, 60, what="the other model refused 3 times")
            why = entry["reason"]
            assert "model mismatch" in why and "'tiny'" in why and str(checkpoint) in why, why
            assert entry["model"] == str(checkpoint) and entry["role"] == "mixed"
            view = cluster.cluster()
            assert [i["instance_id"] for i in view["instances"]] == ["mixed-0"]
            assert view["router"]["model"]["name"] == "tiny"
            # Each side says it once, however often the instance retries.
            router_log = (tmp_path / "router.log").read_text()
            assert router_log.count("refused instance mixed-other") == 1, router_log
            own_log = proc.log_path.read_text()
            assert own_log.count("router refused registration: model mismatch") == 1, own_log
            # The cluster keeps serving on its own model.
            r = complete(cluster.client(), "/v1/completions",
                         {**GREEDY, "prompt": [5, 6, 7], "max_tokens": 4})
            assert r.ok and len(r.token_ids) == 4
        finally:
            proc.stop(10)


def test_a_router_without_model_serves_the_instances_model(checkpoint, tmp_path):
    torch.set_num_threads(1)
    _, tokenizer = load_model_metadata(str(checkpoint))
    messages = [{"role": "user", "content": "The quick brown fox"}]
    chat_ids = encode_chat_prompt(render_chat(messages, TEMPLATE, tokenizer), tokenizer)
    text = "Prefill and decode run on different machines"
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    ref = LLM(str(checkpoint), num_kv_blocks=256).generate(
        [{"prompt_token_ids": tokenizer.encode(text)}, {"prompt_token_ids": chat_ids}],
        [params, params])
    expected_text, expected_chat = (list(o.outputs[0].token_ids) for o in ref)

    with Cluster(1, 1, model=str(checkpoint), router_has_model=False,
                 log_dir=tmp_path) as cluster:
        client = cluster.client()
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [str(checkpoint)]
        model = cluster.cluster()["router"]["model"]
        assert model["adopted_from"] in ("prefill-0", "decode-0") and model["vocab_size"] == 512
        r = complete(client, "/v1/completions", {**GREEDY, "prompt": text, "max_tokens": 12})
        assert r.ok, r.error
        assert (r.prompt_token_ids, r.token_ids) == (tokenizer.encode(text), expected_text)
        r = complete(client, "/v1/chat/completions",
                     {**GREEDY, "messages": messages, "max_tokens": 12, "stream": True})
        assert r.ok, r.error
        assert (r.prompt_token_ids, r.token_ids) == (chat_ids, expected_chat)
