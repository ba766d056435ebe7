"""The engines ``fdpd bench engine`` runs side by side: fdpd, ``transformers`` and vLLM.

Each ``prepare_*`` loads its engine, warms it up and returns a :class:`Runner`: a callable that
generates the whole batch once (greedy, EOS ignored, each prompt its own output length) and
reports wall and CPU seconds with the tokens. CPU seconds count every process the engine uses
(vLLM runs its engine core and model worker as child processes): on a machine shared with other
work, wall time also measures the neighbours, CPU time mostly the engine.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Run:
    wall_s: float
    cpu_s: float
    tokens: list[list[int]]


Runner = Callable[[list[list[int]], list[int]], Run]


def _timed(generate: Callable[[], list[list[int]]]) -> Run:
    cpu0, wall0 = time.process_time(), time.perf_counter()
    tokens = generate()
    return Run(time.perf_counter() - wall0, time.process_time() - cpu0, tokens)


def prepare_fdpd(model: str, dtype: str, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, kernels: str = "auto") -> Runner:
    """fdpd's offline engine, continuous batching with room for the whole batch (this measures
    throughput, not preemption)."""
    from fdpd.llm import LLM
    from fdpd.sampling_params import SamplingParams

    block_size = 16
    llm = LLM(model, dtype=dtype, max_num_seqs=max_num_seqs,
              max_num_batched_tokens=max_num_batched_tokens, block_size=block_size,
              max_model_len=max_model_len, kernels=kernels,
              num_kv_blocks=-(-max_model_len // block_size) * max_num_seqs + 1)
    llm.generate([[5, 6, 7, 8, 9, 10, 11, 12]],
                 SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))

    def run(prompts: list[list[int]], lens: list[int]) -> Run:
        params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lens]
        # A repeat must not find the previous repeat's prompts in the prefix cache.
        llm.engine.block_manager.reset_prefix_cache()
        return _timed(lambda: [o.outputs[0].token_ids for o in llm.generate(prompts, params)])

    return run


def prepare_transformers(model: str, dtype: str, batch_size: int) -> Runner:
    """The same weights in ``transformers``, batched the way people batch it: left padding plus
    an attention mask, ``batch_size`` prompts per ``generate`` call, its default dynamic KV
    cache. A static batch runs until its longest output is done; each prompt keeps its own
    length. Its generation config has no EOS (``min_new_tokens`` would mask the EOS logit and
    change greedy choices)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)).eval()
    hf.generation_config.eos_token_id = None
    pad = 0

    def generate(batch: list[list[int]], new_tokens: int) -> list[list[int]]:
        width = max(map(len, batch))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=mask, do_sample=False,
                              max_new_tokens=new_tokens, pad_token_id=pad)
        return out[:, width:].tolist()

    generate([[5, 6, 7, 8, 9, 10, 11, 12]], 2)

    def run(prompts: list[list[int]], lens: list[int]) -> Run:
        def all_batches() -> list[list[int]]:
            tokens: list[list[int]] = []
            for i in range(0, len(prompts), batch_size):
                part = lens[i:i + batch_size]
                out = generate(prompts[i:i + batch_size], max(part))
                tokens += [row[:n] for row, n in zip(out, part)]
            return tokens
        return _timed(all_batches)

    return run


def default_vllm_python() -> str:
    """``FDPD_VLLM_PYTHON``, else the interpreter of ``scripts/setup-vllm``'s venv."""
    env = os.environ.get("FDPD_VLLM_PYTHON")
    if env:
        return env
    return str(Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python")


class VLLMProcess:
    """``fdpd/bench/vllm_worker.py`` under vLLM's interpreter, kept alive between runs so that
    its (long) start-up and compilation are paid once and its runs interleave with fdpd's."""

    def __init__(self, python: str, spec: dict, log_path: str | None = None,
                 start_timeout: float = 900.0):
        from fdpd.bench.vllm_worker import REPLY_PREFIX

        if not Path(python).exists():
            raise FileNotFoundError(f"no vLLM interpreter at {python}: run scripts/setup-vllm "
                                    f"(or set FDPD_VLLM_PYTHON / --vllm-python)")
        self._prefix = REPLY_PREFIX
        worker = Path(__file__).with_name("vllm_worker.py")
        # vLLM logs to stdout and stderr: both go to log_path (or nowhere).
        self._log = open(log_path or os.devnull, "a")
        self.proc = subprocess.Popen(
            [python, str(worker), json.dumps(spec)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self._log, text=True, bufsize=1,
            start_new_session=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        self._read(start_timeout)

    def _read(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(self._prefix):
                return json.loads(line[len(self._prefix):])
            self._log.write(line)
            if time.monotonic() > deadline:
                break
        self.close()
        raise RuntimeError(f"vLLM worker ended or timed out (exit code {self.proc.poll()}); "
                           f"rerun with --vllm-log FILE to see its output")

    def run(self, prompts: list[list[int]], lens: list[int]) -> Run:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"prompts": prompts, "output_lens": lens}) + "\n")
        self.proc.stdin.flush()
        reply = self._read(3600.0)
        return Run(reply["wall_s"], reply["cpu_s"], reply["tokens"])

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(json.dumps({"quit": True}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                pass
        if self.proc.poll() is None:
            # Its engine core and worker are in its session: end the whole group by its pid.
            os.killpg(self.proc.pid, 9)
            self.proc.wait()
        self._log.close()


def prepare_vllm(model: str, dtype: str, threads: int, max_num_seqs: int,
                 max_num_batched_tokens: int, max_model_len: int, python: str,
                 log_path: str | None = None) -> tuple[Runner, Callable[[], None]]:
    """vLLM's offline ``LLM.generate`` in its own venv; returns the runner and its closer."""
    spec = {"model": model, "dtype": dtype, "threads": threads, "max_num_seqs": max_num_seqs,
            "max_num_batched_tokens": max_num_batched_tokens, "max_model_len": max_model_len}
    proc = VLLMProcess(python, spec, log_path)
    return proc.run, proc.close
