"""The chaos load: concurrent greedy requests drawn from a seed, and the offline engine's
answers they are checked against."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from fdpd.testing.client import Completion


@dataclass
class LoadRequest:
    body: dict

    @property
    def prompt(self) -> list[int]:
        return self.body["prompt"]

    @property
    def max_tokens(self) -> int:
        return self.body["max_tokens"]

    @property
    def logprobs(self) -> bool:
        return "logprobs" in self.body


def make_load(seed: int, n: int, *, min_tokens: int = 48, max_tokens: int = 224
              ) -> list[LoadRequest]:
    """Greedy completions on token-id prompts, streamed or not, some sharing a prefix, some
    asking for logprobs; long enough to decode across the fault."""
    rng = random.Random(seed)
    shared = [rng.randrange(256) for _ in range(rng.choice((32, 48, 64)))]
    load = []
    for _ in range(n):
        prompt = ((shared if rng.random() < 0.5 else [])
                  + [rng.randrange(256) for _ in range(rng.randint(8, 120))])
        body = {"model": "tiny", "prompt": prompt, "temperature": 0, "ignore_eos": True,
                "return_token_ids": True, "max_tokens": rng.randint(min_tokens, max_tokens),
                "stream": rng.random() < 0.5}
        if rng.random() < 0.3:
            body["logprobs"] = 0
        load.append(LoadRequest(body))
    return load


class Reference:
    """The offline engine's greedy tokens and logprobs, cached by (prompt, max_tokens)."""

    def __init__(self):
        from fdpd import LLM

        self.llm = LLM("tiny", num_kv_blocks=4096)
        self.cache: dict[tuple, tuple[list[int], list[float]]] = {}

    def expected(self, items: Sequence[LoadRequest]) -> list[tuple[list[int], list[float]]]:
        import torch

        from fdpd import SamplingParams

        keys = [(tuple(r.prompt), r.max_tokens) for r in items]
        todo = sorted({k for k in keys if k not in self.cache})
        if todo:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)       # as the cluster's processes (2 cores here)
            try:
                outs = self.llm.generate(
                    [{"prompt_token_ids": list(p)} for p, _ in todo],
                    [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, logprobs=0)
                     for _, n in todo])
            finally:
                torch.set_num_threads(threads)
            for key, out in zip(todo, outs):
                self.cache[key] = (list(out.outputs[0].token_ids),
                                   list(out.outputs[0].logprobs or []))
        return [self.cache[k] for k in keys]


def response_logprobs(res: Completion) -> list[float]:
    chunks = [res.body] if res.body is not None else res.events
    out: list[float] = []
    for chunk in chunks:
        for choice in chunk.get("choices") or []:
            out.extend((choice.get("logprobs") or {}).get("token_logprobs") or [])
    return out
