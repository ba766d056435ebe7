"""Offline inference in vLLM's shape: ``LLM(model="tiny").generate(prompts, params)``."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, Union

from fdpd.config import EngineConfig
from fdpd.engine.engine import Engine, RequestError
from fdpd.engine.request import Request, RequestStatus
from fdpd.outputs import CompletionOutput, RequestOutput, TextStream
from fdpd.sampling_params import SamplingParams

# A prompt is text, a list of token ids, or {"prompt_token_ids": [...]} / {"prompt": "..."}.
PromptType = Union[str, Sequence[int], dict]  # noqa: UP007 (a runtime alias)


class LLM:
    def __init__(self, model: str = "tiny", **engine_args: Any):
        self.config = EngineConfig.from_kwargs(model=model, **engine_args)
        self.engine = Engine(self.config)
        self.tokenizer = self.engine.loaded.tokenizer
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.tokenizer

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 priority: Sequence[int] | None = None) -> list[RequestOutput]:
        prompts = _as_prompt_list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = ([sampling_params] * len(prompts) if isinstance(sampling_params, SamplingParams)
                  else list(sampling_params))
        if len(params) != len(prompts):
            raise ValueError(f"sampling_params: {len(params)} given for {len(prompts)} prompts")
        if priority is not None and len(priority) != len(prompts):
            raise ValueError(f"priority: {len(priority)} given for {len(prompts)} prompts")

        # Validate everything before admitting anything, so a bad prompt in a batch leaves no
        # half-run batch behind.
        # n samples of a prompt are n engine requests (choice i seeded seed + i), gathered
        # into one RequestOutput.
        pending: list[tuple[Request, RequestOutput]] = []
        outputs: list[RequestOutput] = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            text, ids = self._tokenize(prompt)
            if p.stop and self.tokenizer is None:
                raise RequestError("stop", "stop strings need a tokenizer; this model has none")
            result = RequestOutput(f"offline-{next(self._ids)}", text, list(ids), [])
            for choice in range(p.n):
                req = self.engine.make_request(f"{result.request_id}/{choice}", ids,
                                               p.for_choice(choice),
                                               priority[i] if priority else 0)
                result.outputs.append(CompletionOutput(choice, "", [], None, None))
                pending.append((req, result))
            outputs.append(result)
        results: dict[str, tuple[RequestOutput, CompletionOutput]] = {}
        streams: dict[str, TextStream] = {}
        for req, result in pending:
            self.engine.scheduler.add(req)
            index = int(req.request_id.rsplit("/", 1)[1])
            results[req.request_id] = (result, result.outputs[index])
            streams[req.request_id] = TextStream(self.tokenizer, req.prompt_token_ids,
                                                 req.sampling_params)
        try:
            self._run(results, streams)
        except BaseException:
            # Ctrl-C or an engine error: leave no request of this call behind in the engine.
            for req, _ in pending:
                self.engine.abort_request(req.request_id)
            raise
        for result in outputs:
            result.finished = all(c.finish_reason is not None for c in result.outputs)
        return outputs

    def _run(self, results: dict[str, tuple[RequestOutput, CompletionOutput]],
             streams: dict[str, TextStream]) -> None:
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                result, completion = results[out.request_id]
                completion.token_ids.extend(out.new_token_ids)
                if out.new_logprobs is not None:
                    completion.logprobs = (completion.logprobs or []) + out.new_logprobs
                    completion.cumulative_logprob = sum(completion.logprobs)
                if out.new_token_logprobs is not None:
                    completion.token_logprobs = ((completion.token_logprobs or [])
                                                 + out.new_token_logprobs)
                if out.prompt_logprobs is not None and result.prompt_logprobs is None:
                    result.prompt_logprobs = out.prompt_logprobs
                stream = streams[out.request_id]
                stream.add(out.new_token_ids, out.finished)
                finished, reason, stop = out.finished, out.finish_reason, out.stop_reason
                if stream.stop_reason is not None and not finished:
                    self.engine.abort_request(out.request_id, RequestStatus.FINISHED_STOPPED)
                    finished, reason, stop = True, "stop", stream.stop_reason
                elif stream.stop_reason is not None:
                    reason, stop = "stop", stream.stop_reason
                completion.text = stream.text
                result.num_cached_tokens = out.num_cached_tokens
                if finished:
                    completion.finish_reason, completion.stop_reason = reason, stop

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return None, list(prompt["prompt_token_ids"])
            prompt = prompt.get("prompt")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("prompt", "this model directory has no tokenizer; pass token "
                                   "ids instead of text")
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, Sequence):
            return None, list(prompt)
        raise RequestError("prompt", f"expected text or a list of token ids, got "
                           f"{type(prompt).__name__}")


def _as_prompt_list(prompts: PromptType | Sequence[PromptType]) -> list[PromptType]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if not isinstance(prompts, Sequence):
        raise RequestError("prompt", f"expected text, a list of token ids or a list of prompts, "
                           f"got {type(prompts).__name__}")
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
        return [prompts]                       # one prompt given as token ids
    return prompts
