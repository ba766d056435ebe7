"""``POST /v1/chat/completions``: messages through the chat template, ``chat.completion``
objects (or ``chat.completion.chunk`` events) out."""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from fdpd.model.tokenizer import Tokenizer
from fdpd.router import serving
from fdpd.router.chat import ChatTemplateError, encode_chat_prompt, render_chat
from fdpd.router.errors import bad_request
from fdpd.router.openai_api import ChatCompletionRequest
from fdpd.router.relay import Piece, Relay
from fdpd.router.serving import Output, finite_logprob, token_text


class ChatFormat:
    def __init__(self, request_id: str, model: str, body: ChatCompletionRequest,
                 tokenizer: Tokenizer | None, prompt_token_ids: list[int]):
        self.id = request_id
        self.model = model
        self.created = int(time.time())
        self.tokenizer = tokenizer
        self.return_token_ids = body.return_token_ids
        self.prompt_token_ids = prompt_token_ids

    def _envelope(self, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        out = {"id": self.id, "object": kind, "created": self.created, "model": self.model,
               "choices": choices}
        if self.return_token_ids and kind == "chat.completion":
            out["prompt_token_ids"] = self.prompt_token_ids
        return out

    def _logprobs(self, token_ids: list[int], logprobs: list[float] | None) -> dict | None:
        if logprobs is None:
            return None
        content = []
        for tid, lp in zip(token_ids, logprobs):
            text = token_text(self.tokenizer, tid)
            content.append({"token": text, "logprob": finite_logprob(lp),
                            "bytes": list(text.encode()), "top_logprobs": []})
        return {"content": content}

    def stream_start(self) -> list[dict[str, Any]]:
        choice: dict[str, Any] = {"index": 0, "delta": {"role": "assistant", "content": ""},
                                  "logprobs": None, "finish_reason": None}
        chunk = self._envelope("chat.completion.chunk", [choice])
        if self.return_token_ids:
            chunk["prompt_token_ids"] = self.prompt_token_ids
        return [chunk]

    def stream_chunk(self, piece: Piece) -> dict[str, Any] | None:
        if not (piece.text or piece.finished or self.return_token_ids
                or (piece.logprobs is not None and piece.token_ids)):
            return None
        delta = {"content": piece.text} if piece.text else {}
        choice: dict[str, Any] = {"index": 0, "delta": delta,
                                  "logprobs": self._logprobs(piece.token_ids, piece.logprobs),
                                  "finish_reason": piece.finish_reason,
                                  "stop_reason": piece.stop_reason}
        if self.return_token_ids:
            choice["token_ids"] = piece.token_ids
        return self._envelope("chat.completion.chunk", [choice])

    def usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]:
        return {**self._envelope("chat.completion.chunk", []), "usage": usage}

    def response(self, output: Output, usage: dict[str, Any]) -> dict[str, Any]:
        choice: dict[str, Any] = {
            "index": 0, "message": {"role": "assistant", "content": output.text},
            "logprobs": self._logprobs(output.token_ids, output.logprobs),
            "finish_reason": output.finish_reason, "stop_reason": output.stop_reason}
        if self.return_token_ids:
            choice["token_ids"] = output.token_ids
        return {**self._envelope("chat.completion", [choice]), "usage": usage}


async def create_chat_completion(request: Request, body: ChatCompletionRequest,
                                 ctx: Any) -> Response:
    """``ctx`` is the app's :class:`fdpd.router.app.AppContext` (core, metrics)."""
    arrival = time.monotonic()
    core = ctx.core
    body.check_model(core.model_name)
    body.check_messages()
    tokenizer = core.tokenizer
    if tokenizer is None:
        raise bad_request("this model has no tokenizer, so chat is unavailable; use "
                          "/v1/completions with token ids", "messages")
    logprobs = body.logprobs_setting()
    max_tokens = body.resolved_max_tokens()
    which = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    params = serving.sampling_params(body.sampling_params, max_tokens, logprobs,
                                     rename={"max_tokens": which})
    try:
        text = render_chat([m.for_template() for m in body.messages], core.chat_template,
                           tokenizer)
    except ChatTemplateError as exc:
        raise bad_request(str(exc), "messages") from None
    except (TypeError, ValueError, LookupError, AttributeError, ArithmeticError) as exc:
        # A template computing on fields it does not check (``for call in m.tool_calls`` with
        # tool_calls a number): the messages do not fit this model's template, as vLLM says.
        raise bad_request(f"the model's chat template failed on these messages: "
                          f"{type(exc).__name__}: {exc}", "messages") from None
    serving.check_text(text, "messages")
    prompt_ids = encode_chat_prompt(text, tokenizer)
    serving.check_prompt_ids(prompt_ids, tokenizer, "messages")
    params = serving.fit_to_context(params, len(prompt_ids), core.max_model_len,
                                    prompt_param="messages", max_tokens_param=which)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    relay = Relay(core, ctx.metrics, request_id, prompt_ids, params, arrival)
    fmt = ChatFormat(request_id, core.model_name, body, tokenizer, prompt_ids)
    if body.stream:
        return await serving.streaming_response(request, relay, fmt, body.include_usage)
    return await serving.full_response(request, relay, fmt)
