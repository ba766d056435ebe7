"""``POST /v1/completions``: prompt text or token ids in, ``text_completion`` objects out."""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from fdpd.model.tokenizer import Tokenizer
from fdpd.router import serving
from fdpd.router.errors import bad_request
from fdpd.router.openai_api import CompletionRequest
from fdpd.router.relay import Piece, Relay
from fdpd.router.serving import Output, finite_logprob, token_text


class CompletionFormat:
    def __init__(self, request_id: str, model: str, body: CompletionRequest,
                 tokenizer: Tokenizer | None, prompt_token_ids: list[int]):
        self.id = request_id
        self.model = model
        self.created = int(time.time())
        self.tokenizer = tokenizer
        self.return_token_ids = body.return_token_ids
        self.top_logprobs = body.logprobs is not None and body.logprobs >= 1
        self.prompt_token_ids = prompt_token_ids
        self._text_offset = 0
        self._sent_prompt_ids = False

    def _envelope(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": "text_completion", "created": self.created,
                "model": self.model, "choices": choices}

    def _logprobs(self, token_ids: list[int], logprobs: list[float] | None) -> dict | None:
        if logprobs is None:
            return None
        tokens = [token_text(self.tokenizer, t) for t in token_ids]
        offsets = []
        for tok in tokens:
            offsets.append(self._text_offset)
            self._text_offset += len(tok)
        values = [finite_logprob(lp) for lp in logprobs]
        return {"tokens": tokens, "token_logprobs": values,
                "top_logprobs": ([{t: lp} for t, lp in zip(tokens, values)]
                                 if self.top_logprobs else None),
                "text_offset": offsets}

    def _choice(self, text: str, token_ids: list[int], logprobs: list[float] | None,
                finish_reason: str | None, stop_reason: int | str | None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "text": text,
                                  "logprobs": self._logprobs(token_ids, logprobs),
                                  "finish_reason": finish_reason, "stop_reason": stop_reason}
        if self.return_token_ids:
            if not self._sent_prompt_ids:
                choice["prompt_token_ids"] = self.prompt_token_ids
                self._sent_prompt_ids = True
            choice["token_ids"] = token_ids
        return choice

    def stream_start(self) -> list[dict[str, Any]]:
        return []

    def stream_chunk(self, piece: Piece) -> dict[str, Any] | None:
        if not (piece.text or piece.finished or self.return_token_ids
                or (piece.logprobs is not None and piece.token_ids)):
            return None
        return self._envelope([self._choice(piece.text, piece.token_ids, piece.logprobs,
                                            piece.finish_reason, piece.stop_reason)])

    def usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]:
        return {**self._envelope([]), "usage": usage}

    def response(self, output: Output, usage: dict[str, Any]) -> dict[str, Any]:
        choice = self._choice(output.text, output.token_ids, output.logprobs,
                              output.finish_reason, output.stop_reason)
        return {**self._envelope([choice]), "usage": usage}


async def create_completion(request: Request, body: CompletionRequest, ctx: Any) -> Response:
    """``ctx`` is the app's :class:`fdpd.router.app.AppContext` (core, metrics)."""
    arrival = time.monotonic()
    core = ctx.core
    body.check_model(core.model_name)
    body.check_unsupported()
    prompt = body.prompt_input()
    tokenizer = core.tokenizer
    if isinstance(prompt, str):
        if tokenizer is None:
            raise bad_request("this model has no tokenizer; send the prompt as a list of token "
                              "ids", "prompt")
        serving.check_text(prompt, "prompt")
        prompt_ids = tokenizer.encode(prompt)
    else:
        prompt_ids = prompt
    serving.check_prompt_ids(prompt_ids, tokenizer)
    params = serving.sampling_params(body.sampling_params, body.max_tokens, body.logprobs)
    serving.check_text_needs(params, tokenizer)
    params = serving.fit_to_context(params, len(prompt_ids), core.max_model_len)
    request_id = f"cmpl-{uuid.uuid4().hex}"
    relay = Relay(core, ctx.metrics, request_id, prompt_ids, params, arrival)
    fmt = CompletionFormat(request_id, core.model_name, body, tokenizer, prompt_ids)
    if body.stream:
        return await serving.streaming_response(request, relay, fmt, body.include_usage)
    return await serving.full_response(request, relay, fmt)
