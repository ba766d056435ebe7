"""What a cluster must answer: the offline engine's greedy tokens for the same prompts (one
colocated engine, the exactness baseline of every PD, drain and resume test)."""

from __future__ import annotations


def offline_greedy(prompts: list[list[int]], max_tokens: int, model: str = "tiny",
                   **engine_args) -> list[list[int]]:
    """Greedy tokens (EOS ignored) of ``prompts`` from one offline engine, 1 torch thread."""
    import torch

    from fdpd import LLM, SamplingParams

    torch.set_num_threads(1)
    llm = LLM(model, **{"num_kv_blocks": 2048, **engine_args})
    outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0,
                                                ignore_eos=True))
    return [o.outputs[0].token_ids for o in outs]
