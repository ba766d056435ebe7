"""``POST /v1/chat/completions``: messages through the chat template, ``chat.completion``
objects (or ``chat.completion.chunk`` events) out.

``logprobs: true`` with ``top_logprobs: k`` shows each token's logprob and its k most likely
alternatives, best first (OpenAI's shape); vLLM's ``prompt_logprobs`` extension adds a top-level
``prompt_logprobs`` list (in a stream: on the chunk of the first token).
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
from fdpd.router.chat import ChatTemplateError, encode_chat_prompt, render_chat
from fdpd.router.choices import Choices
from fdpd.router.errors import bad_request
from fdpd.router.openai_api import ChatCompletionRequest
from fdpd.router.relay import Piece
from fdpd.router.serving import (
    Output,
    finite_logprob,
    output_logprobs,
    prompt_logprob_dicts,
    token_text,
)


class ChatFormat:
    def __init__(self, request_id: str, model: str, body: ChatCompletionRequest,
                 tokenizer: Tokenizer | None, prompt_token_ids: list[int]):
        self.id = request_id
        self.model = model
        self.created = int(time.time())
        self.tokenizer = tokenizer
        self.n = body.n
        self.return_token_ids = body.return_token_ids
        self.num_top_logprobs = body.top_logprobs or 0
        self.num_prompt_logprobs = body.prompt_logprobs
        self.prompt_token_ids = prompt_token_ids

    def _envelope(self, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        out = {"id": self.id, "object": kind, "created": self.created, "model": self.model,
               "choices": choices}
        if self.return_token_ids and kind == "chat.completion":
            out["prompt_token_ids"] = self.prompt_token_ids
        return out

    def _logprobs(self, token_ids: list[int],
                  entries: list[TokenLogprobs] | None) -> dict | None:
        if entries is None:
            return None
        content = []
        for tid, entry in zip(token_ids, entries):
            content.append({**self._token(tid, entry.logprob), "top_logprobs": [
                self._token(t, lp) for t, lp in zip(entry.top_ids[:self.num_top_logprobs],
                                                     entry.top_logprobs[:self.num_top_logprobs])]})
        return {"content": content}

    def _token(self, token_id: int, logprob: float) -> dict[str, Any]:
        text = token_text(self.tokenizer, token_id)
        return {"token": text, "logprob": finite_logprob(logprob),
                "bytes": list(text.encode("utf-8", errors="replace"))}

    def _prompt_logprobs(self, entries: list | None) -> list | None:
        if self.num_prompt_logprobs is None or entries is None:
            return None
        return prompt_logprob_dicts(self.prompt_token_ids, entries, self.num_prompt_logprobs,
                                    self.tokenizer)

    def stream_start(self) -> list[dict[str, Any]]:
        chunks = []
        for index in range(self.n):
            choice: dict[str, Any] = {"index": index,
                                      "delta": {"role": "assistant", "content": ""},
                                      "logprobs": None, "finish_reason": None}
            chunk = self._envelope("chat.completion.chunk", [choice])
            if self.return_token_ids:
                chunk["prompt_token_ids"] = self.prompt_token_ids
            chunks.append(chunk)
        return chunks

    def stream_chunk(self, index: int, piece: Piece) -> dict[str, Any] | None:
        if not (piece.text or piece.finished or self.return_token_ids
                or (piece.logprobs is not None and piece.token_ids)):
            return None
        delta = {"content": piece.text} if piece.text else {}
        entries = output_logprobs(piece.token_ids, piece.logprobs, piece.token_logprobs)
        choice: dict[str, Any] = {"index": index, "delta": delta,
                                  "logprobs": self._logprobs(piece.token_ids, entries),
                                  "finish_reason": piece.finish_reason,
                                  "stop_reason": piece.stop_reason}
        if self.return_token_ids:
            choice["token_ids"] = piece.token_ids
        chunk = self._envelope("chat.completion.chunk", [choice])
        # Top level, once per response (choice 0's; every choice shares the prompt).
        prompt_logprobs = self._prompt_logprobs(piece.prompt_logprobs) if index == 0 else None
        if prompt_logprobs is not None:
            chunk["prompt_logprobs"] = prompt_logprobs
        return chunk

    def usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]:
        return {**self._envelope("chat.completion.chunk", []), "usage": usage}

    def response(self, outputs: list[Output], usage: dict[str, Any]) -> dict[str, Any]:
        choices = []
        for index, output in enumerate(outputs):
            entries = output_logprobs(output.token_ids, output.logprobs, output.token_logprobs)
            choice: dict[str, Any] = {
                "index": index, "message": {"role": "assistant", "content": output.text},
                "logprobs": self._logprobs(output.token_ids, entries),
                "finish_reason": output.finish_reason, "stop_reason": output.stop_reason}
            if self.return_token_ids:
                choice["token_ids"] = output.token_ids
            choices.append(choice)
        out = {**self._envelope("chat.completion", choices), "usage": usage}
        prompt_logprobs = self._prompt_logprobs(outputs[0].prompt_logprobs)
        if prompt_logprobs is not None:
            out["prompt_logprobs"] = prompt_logprobs
        return out


def render_messages(messages: list, template: str | None, tokenizer: Tokenizer,
                    add_generation_prompt: bool = True) -> str:
    """The prompt text of a request's chat ``messages``, or a 400 naming ``messages``."""
    try:
        text = render_chat([m.for_template() for m in messages], template, tokenizer,
                           add_generation_prompt=add_generation_prompt)
    except ChatTemplateError as exc:
        raise bad_request(str(exc), "messages") from None
    except (TypeError, ValueError, LookupError, AttributeError, ArithmeticError) as exc:
        # A template computing on fields it does not check (``for call in m.tool_calls`` with
        # tool_calls a number): the messages do not fit this model's template, as vLLM says.
        raise bad_request(f"the model's chat template failed on these messages: "
                          f"{type(exc).__name__}: {exc}", "messages") from None
    serving.check_text(text, "messages")
    return text


async def create_chat_completion(request: Request, body: ChatCompletionRequest,
                                 ctx: Any) -> Response:
    """``ctx`` is the app's :class:`fdpd.router.app.AppContext` (core, metrics)."""
    arrival = time.monotonic()
    core = ctx.core
    model = body.check_model(ctx.served_model_names)
    body.check_messages()
    tokenizer = core.tokenizer
    if tokenizer is None:
        raise bad_request("this model has no tokenizer, so chat is unavailable; use "
                          "/v1/completions with token ids", "messages")
    logprobs = body.logprobs_setting()
    max_tokens = body.resolved_max_tokens()
    which = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    params = serving.sampling_params(body.sampling_params, max_tokens, logprobs,
                                     rename={"max_tokens": which, "logprobs": "top_logprobs"})
    text = render_messages(body.messages, core.chat_template, tokenizer)
    prompt_ids = encode_chat_prompt(text, tokenizer)
    serving.check_prompt_ids(prompt_ids, tokenizer, "messages")
    params = serving.fit_to_context(params, len(prompt_ids), core.max_model_len,
                                    prompt_param="messages", max_tokens_param=which)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    choices = Choices(core, ctx.metrics, request_id, prompt_ids, params, arrival)
    fmt = ChatFormat(request_id, model, body, tokenizer, prompt_ids)
    if body.stream:
        return await serving.streaming_response(request, choices, fmt, body.include_usage)
    return await serving.full_response(request, choices, fmt)
