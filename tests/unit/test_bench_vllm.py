"""``fdpd model synth`` and vLLM as a ``bench compare`` system, without vLLM: the model
directory both load, the ``vllm serve`` command line and environment, and the whole system run
against a stand-in ``vllm`` executable that serves the same model with ``fdpd up``."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from fdpd.bench.compare import parse_systems, ratio_table, ratios
from fdpd.bench.vllm_server import VLLMSettings
from fdpd.cli import main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "model"
    result = CliRunner().invoke(main, ["model", "synth", "--out", str(out), "--hidden", "32",
                                       "--layers", "1", "--heads", "2", "--kv-heads", "1",
                                       "--vocab", "600", "--max-positions", "512"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return out


def test_model_synth_writes_a_directory_fdpd_and_transformers_load(model_dir):
    from transformers import AutoTokenizer

    from fdpd.llm import LLM
    from fdpd.model.tokenizer import load_tokenizer
    from fdpd.sampling_params import SamplingParams

    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["vocab_size"] == 600 and cfg["architectures"] == ["LlamaForCausalLM"]
    ours = load_tokenizer(model_dir)
    theirs = AutoTokenizer.from_pretrained(str(model_dir))
    text = "prefill and decode share the machine"
    assert ours.vocab_size == len(theirs) == 600
    assert ours.encode(text) == theirs(text).input_ids
    assert ours.encode(text)[0] == ours.bos_token_id == theirs.bos_token_id == 1
    assert 2 in ours.eos_token_ids and theirs.eos_token_id == 2
    assert ours.decode(ours.encode(text)) == text
    llm = LLM(model=str(model_dir), num_kv_blocks=32)
    out = llm.generate([text], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4
    assert all(0 <= t < 600 for t in out[0].outputs[0].token_ids)


def test_model_synth_refuses_a_vocabulary_it_cannot_train(tmp_path):
    result = CliRunner().invoke(main, ["model", "synth", "--out", str(tmp_path / "m"),
                                       "--vocab", "100", "--hidden", "32", "--heads", "2"])
    assert result.exit_code != 0 and "vocab_size" in result.output


def test_vllm_command_line_and_environment():
    s = VLLMSettings(binary="/opt/v/bin/vllm", threads_bind="0-1", kvcache_gib=2.5,
                     args=("--max-num-batched-tokens", "512"), served_model_name="m")
    assert s.command("/models/x", 8123) == [
        "/opt/v/bin/vllm", "serve", "/models/x", "--host", "127.0.0.1", "--port", "8123",
        "--served-model-name", "m", "--dtype", "auto", "--seed", "0",
        "--disable-uvicorn-access-log", "--uvicorn-log-level", "warning",
        "--max-num-batched-tokens", "512"]
    env = s.environment({"PYTHONPATH": "/work/fdpd", "HOME": "/root"})
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1" and env["VLLM_CPU_KVCACHE_SPACE"] == "2.5"
    assert "PYTHONPATH" not in env and env["HOME"] == "/root"
    for bad in ({"threads_bind": "all; rm"}, {"threads_bind": ""}, {"kvcache_gib": 0}):
        with pytest.raises(ValueError):
            VLLMSettings(binary="vllm", **bad)


def test_systems_and_ratios():
    assert parse_systems("pd,mixed,vllm") == ["pd", "colocated", "vllm"]
    assert parse_systems("both") == ["pd", "colocated"]
    assert parse_systems("vllm, pd") == ["vllm", "pd"]
    with pytest.raises(Exception, match="unknown system 'sglang'"):
        parse_systems("pd,sglang")

    def result(goodput, ttft, cpu):
        return {"goodput": goodput, "output_throughput": 10.0,
                "ttft_ms": {"p50": ttft, "p99": 2 * ttft}, "tpot_ms": {"mean": 5, "p99": 9},
                "itl_ms": {"p99": 20}, "e2e_ms": {"p99": 100},
                "cpu_ms_per_request": {"router": cpu, "prefill": cpu, "client": 99}}

    report = {"pd": result(3.0, 100, 10), "colocated": result(0.0, 100, 10),
              "vllm": result(2.0, 50, 5)}
    r = report["ratios"] = ratios(report)
    assert r["goodput_pd_over_vllm"] == 1.5 and r["p50_ttft_pd_over_vllm"] == 2.0
    assert r["cpu_per_request_pd_over_vllm"] == 2.0          # the client's CPU is left out
    assert r["goodput_pd_over_colocated"] is None             # no division by zero
    table = ratio_table(report, {"pd": "PD", "colocated": "mixed", "vllm": "vLLM"})
    assert table.splitlines()[0] == "| PD / | mixed | vLLM |"
    assert "| goodput | - | 1.500 |" in table and "| p50_ttft | 1.000 | 2.000 |" in table


def test_compare_refuses_vllm_with_the_cost_model():
    result = CliRunner().invoke(main, ["bench", "compare", "--systems", "pd,vllm",
                                       "--vllm-bin", "/bin/true", "--engine-args",
                                       "--cost-model 20,2"])
    assert result.exit_code != 0 and "--cost-model" in result.output


FAKE_VLLM = '''#!{python}
# Stands in for `vllm serve MODEL --host H --port P ...`: records how it was started, then
# serves MODEL with a colocated fdpd cluster on that port (its processes are its children).
import json, os, sys
args = sys.argv[1:]
assert args[0] == "serve", args
json.dump({{"argv": args, "env": {{k: os.environ.get(k) for k in (
    "VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_KVCACHE_SPACE", "PYTHONPATH")}}}},
    open({record!r}, "w"))
env = dict(os.environ, PYTHONPATH={repo!r})
os.execve(sys.executable, [sys.executable, "-m", "fdpd", "up", "--num-prefill", "0",
          "--num-decode", "0", "--num-mixed", "1", "--port", args[args.index("--port") + 1],
          "--model", args[1], "--", "--num-kv-blocks", "64"], env)
'''


def test_compare_runs_a_vllm_executable_on_the_model_dir(model_dir, tmp_path):
    """The PD and mixed systems are the fdpd clusters test_bench_serve.py runs; here the vllm
    system alone: started as vLLM is (argv, environment, own process group), loaded, measured
    (CPU of its process tree), stopped."""
    record = tmp_path / "vllm-started.json"
    fake = tmp_path / "vllm"
    fake.write_text(FAKE_VLLM.format(python=sys.executable, record=str(record),
                                     repo=str(REPO)))
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    out = tmp_path / "compare.json"
    args = ["bench", "compare", "--model", str(model_dir), "--systems", "vllm",
            "--vllm-bin", str(fake), "--vllm-threads-bind", "0", "--vllm-kvcache-gib", "1",
            "--vllm-args", "--max-num-batched-tokens 256", "--vllm-startup-timeout", "120",
            "--engine-args", "--num-kv-blocks 64", "--dataset", "interference",
            "--num-prompts", "8", "--random-input-len", "16", "--random-output-len", "6",
            "--long-prompt-len", "120", "--long-output-len", "2", "--long-fraction", "0.25",
            "--vocab-size", "600", "--request-rate", "40", "--warmup", "0",
            "--slo", "ttft:60000,itl:60000", "--json", str(out), "--save-requests",
            "--log-dir", str(tmp_path / "logs"), "--no-progress"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    started = json.loads(record.read_text())
    assert started["argv"][:2] == ["serve", str(model_dir)]
    assert started["argv"][-2:] == ["--max-num-batched-tokens", "256"]
    # The checkpoint's dtype, as fdpd runs it (vLLM's CPU default would be bfloat16).
    assert started["argv"][started["argv"].index("--dtype") + 1] == "float32"
    assert started["env"] == {"VLLM_CPU_OMP_THREADS_BIND": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
                              "PYTHONPATH": None}
    r = json.loads(out.read_text())
    assert r["systems"] == ["vllm"] and "ratios" not in r
    assert r["vllm"]["completed"] == 8 and r["vllm"]["failed"] == 0
    assert len(r["vllm"]["requests"]) == 8 and r["vllm"]["short_requests"]["completed"] == 6
    # The stand-in's engine and router are children of the started program: counted.
    assert r["vllm"]["cpu_ms_per_request"]["vllm"] > 0
    assert "vLLM (cores 0)" in result.output
    # Every process of the stand-in is gone (its process group was stopped).
    assert not any(_cmdline(p).startswith(sys.executable) and str(model_dir) in _cmdline(p)
                   for p in os.listdir("/proc") if p.isdigit())
    table = CliRunner().invoke(main, ["bench", "slo-table", str(out), "--slo",
                                      "ttft:60000,itl:60000"])
    assert table.exit_code == 0, table.output + repr(table.exception)
    assert "| rate (req/s) | vLLM |" in table.output and "| 40 | 100.0% (" in table.output
    assert "vLLM: highest tested rate with >= 90% attainment: 40" in table.output


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""
