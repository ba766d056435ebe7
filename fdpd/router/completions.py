"""``POST /v1/completions``: prompt text or token ids in, ``text_completion`` objects out.

``logprobs: k`` shows, per token, its text, logprob, ``text_offset`` and a ``top_logprobs``
map of the chosen token then the k most likely ones (vLLM's and OpenAI's legacy shape: up to
k + 1 entries). ``echo`` puts the prompt before the output, with the prompt's logprobs (the first
token's are null); with ``max_tokens: 0`` the prompt is all there is. vLLM's ``prompt_logprobs``
extension adds a ``prompt_logprobs`` list to each choice.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from fdpd.model.tokenizer import Tokenizer
from fdpd.outputs import TokenLogprobs
from fdpd.router import serving
from fdpd.router.choices import Choices
from fdpd.router.errors import bad_request
from fdpd.router.openai_api import CompletionRequest
from fdpd.router.relay import Piece
from fdpd.router.serving import (
    Output,
    finite_logprob,
    output_logprobs,
    prompt_logprob_dicts,
    token_text,
)


class CompletionFormat:
    def __init__(self, request_id: str, model: str, body: CompletionRequest,
                 tokenizer: Tokenizer | None, prompt_token_ids: list[int], prompt_text: str):
        self.id = request_id
        self.model = model
        self.created = int(time.time())
        self.tokenizer = tokenizer
        self.return_token_ids = body.return_token_ids
        self.num_logprobs = body.logprobs
        self.num_prompt_logprobs = body.prompt_logprobs
        self.echo, self.echo_only = body.echo, body.echo_only
        self.prompt_token_ids = prompt_token_ids
        self.prompt_text = prompt_text
        self._text_offset: dict[int, int] = {}
        self._sent_prompt_ids: set[int] = set()
        self._started: set[int] = set()

    def _envelope(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": "text_completion", "created": self.created,
                "model": self.model, "choices": choices}

    def _logprobs(self, index: int, token_ids: list[int],
                  entries: list[TokenLogprobs | None] | None) -> dict | None:
        if self.num_logprobs is None or entries is None:
            return None
        tokens, values, tops, offsets = [], [], [], []
        for tid, entry in zip(token_ids, entries):
            text = token_text(self.tokenizer, tid)
            offsets.append(self._text_offset.get(index, 0))
            self._text_offset[index] = offsets[-1] + len(text)
            tokens.append(text)
            values.append(None if entry is None else finite_logprob(entry.logprob))
            tops.append(None if entry is None else self._top(tid, entry))
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops,
                "text_offset": offsets}

    def _top(self, token_id: int, entry: TokenLogprobs) -> dict[str, float]:
        # The chosen token first, then the k best (vLLM: one map of up to k + 1 entries).
        k = self.num_logprobs or 0
        pairs = [(token_id, entry.logprob)]
        pairs += [(t, lp) for t, lp in zip(entry.top_ids[:k], entry.top_logprobs[:k])
                  if t != token_id]
        return {token_text(self.tokenizer, t): finite_logprob(lp) for t, lp in pairs[:k + 1]}

    def _choice(self, index: int, text: str, token_ids: list[int],
                entries: list[TokenLogprobs | None] | None, finish_reason: str | None,
                stop_reason: int | str | None,
                prompt_entries: list[TokenLogprobs | None] | None) -> dict[str, Any]:
        """One choice's piece; the choice's first piece carries the echo and prompt parts."""
        first = index not in self._started
        self._started.add(index)
        if self.echo_only:
            text, token_ids, entries = "", [], []
        shown_ids = token_ids
        if self.echo and first:
            text = self.prompt_text + text
            shown_ids = self.prompt_token_ids + token_ids
            prompt_part = prompt_entries or [None] * len(self.prompt_token_ids)
            entries = None if entries is None and not self.echo_only else (
                prompt_part + list(entries or []))
        choice: dict[str, Any] = {"index": index, "text": text,
                                  "logprobs": self._logprobs(index, shown_ids, entries),
                                  "finish_reason": finish_reason, "stop_reason": stop_reason}
        if self.num_prompt_logprobs is not None and first and prompt_entries is not None:
            choice["prompt_logprobs"] = prompt_logprob_dicts(
                self.prompt_token_ids, prompt_entries, self.num_prompt_logprobs,
                self.tokenizer)
        if self.return_token_ids:
            if index not in self._sent_prompt_ids:
                choice["prompt_token_ids"] = self.prompt_token_ids
                self._sent_prompt_ids.add(index)
            choice["token_ids"] = token_ids
        return choice

    def stream_start(self) -> list[dict[str, Any]]:
        return []

    def stream_chunk(self, index: int, piece: Piece) -> dict[str, Any] | None:
        if not (piece.text or piece.finished or self.return_token_ids or self.echo
                or (piece.logprobs is not None and piece.token_ids)):
            return None
        if self.echo_only and index in self._started and not piece.finished:
            return None
        entries = output_logprobs(piece.token_ids, piece.logprobs, piece.token_logprobs)
        return self._envelope([self._choice(index, piece.text, piece.token_ids, entries,
                                            piece.finish_reason, piece.stop_reason,
                                            piece.prompt_logprobs)])

    def usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]:
        return {**self._envelope([]), "usage": usage}

    def response(self, outputs: list[Output], usage: dict[str, Any]) -> dict[str, Any]:
        choices = [self._choice(i, o.text, o.token_ids,
                                output_logprobs(o.token_ids, o.logprobs, o.token_logprobs),
                                o.finish_reason, o.stop_reason, o.prompt_logprobs)
                   for i, o in enumerate(outputs)]
        return {**self._envelope(choices), "usage": usage}


async def create_completion(request: Request, body: CompletionRequest, ctx: Any) -> Response:
    """``ctx`` is the app's :class:`fdpd.router.app.AppContext` (core, metrics)."""
    arrival = time.monotonic()
    core = ctx.core
    model = body.check_model(ctx.served_model_names)
    body.check_unsupported()
    prompt = body.prompt_input()
    tokenizer = core.tokenizer
    if isinstance(prompt, str):
        if tokenizer is None:
            raise bad_request("this model has no tokenizer; send the prompt as a list of token "
                              "ids", "prompt")
        serving.check_text(prompt, "prompt")
        prompt_ids = tokenizer.encode(prompt)
        prompt_text = prompt
    else:
        prompt_ids = prompt
        prompt_text = ""
    serving.check_prompt_ids(prompt_ids, tokenizer)
    if not isinstance(prompt, str) and body.echo and tokenizer is not None:
        prompt_text = tokenizer.decode(prompt_ids, skip_special_tokens=body.skip_special_tokens)
    params = serving.sampling_params(body.sampling_params, body.engine_max_tokens(),
                                     body.logprobs)
    serving.check_text_needs(params, tokenizer)
    params = serving.fit_to_context(params, len(prompt_ids), core.max_model_len)
    request_id = f"cmpl-{uuid.uuid4().hex}"
    choices = Choices(core, ctx.metrics, request_id, prompt_ids, params, arrival)
    fmt = CompletionFormat(request_id, model, body, tokenizer, prompt_ids, prompt_text)
    if body.stream:
        return await serving.streaming_response(request, choices, fmt, body.include_usage)
    return await serving.full_response(request, choices, fmt)
