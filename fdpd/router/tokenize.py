"""``POST /tokenize`` and ``POST /detokenize`` in vLLM's shapes.

``/tokenize`` takes a completion prompt (``prompt``, ``add_special_tokens`` default true) or chat
``messages`` (``add_generation_prompt`` default true, ``add_special_tokens`` default false) and
answers ``{count, max_model_len, tokens[, token_strs]}``. For chat, the default gives the exact
ids ``/v1/chat/completions`` feeds the model (template, then one BOS). ``/detokenize`` takes
``{tokens}`` and answers ``{prompt}``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from fdpd.model.tokenizer import Tokenizer
from fdpd.router import serving
from fdpd.router.chat import encode_chat_prompt
from fdpd.router.chat_completions import render_messages
from fdpd.router.errors import bad_request
from fdpd.router.openai_api import ChatMessage, resolve_model


class TokenizeRequest(BaseModel):
    """One body for both of vLLM's shapes: exactly one of ``prompt`` and ``messages``."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None
    tokens: list[int]


def tokenize(body: TokenizeRequest, ctx: Any) -> dict[str, Any]:
    core = ctx.core
    resolve_model(body.model, ctx.served_model_names)
    tokenizer = _tokenizer(core)
    if (body.prompt is None) == (body.messages is None):
        raise bad_request("send exactly one of prompt (text) and messages (chat)", "prompt")
    if body.prompt is not None:
        serving.check_text(body.prompt, "prompt")
        add_special = True if body.add_special_tokens is None else body.add_special_tokens
        ids = tokenizer.encode(body.prompt, add_special_tokens=add_special)
    else:
        ids = _chat_ids(body, core, tokenizer)
    out: dict[str, Any] = {"count": len(ids), "max_model_len": core.max_model_len,
                           "tokens": ids}
    if body.return_token_strs:
        out["token_strs"] = [serving.token_text(tokenizer, t) for t in ids]
    return out


def _chat_ids(body: TokenizeRequest, core: Any, tokenizer: Tokenizer) -> list[int]:
    text = render_messages(body.messages or [], core.chat_template, tokenizer,
                           body.add_generation_prompt)
    if body.add_special_tokens:
        return tokenizer.encode(text)
    return encode_chat_prompt(text, tokenizer)


def detokenize(body: DetokenizeRequest, ctx: Any) -> dict[str, Any]:
    core = ctx.core
    resolve_model(body.model, ctx.served_model_names)
    tokenizer = _tokenizer(core)
    bad = next((t for t in body.tokens if not 0 <= t < tokenizer.vocab_size), None)
    if bad is not None:
        raise bad_request(f"token id {bad} is outside the vocabulary "
                          f"[0, {tokenizer.vocab_size})", "tokens")
    return {"prompt": tokenizer.decode(body.tokens)}


def _tokenizer(core: Any) -> Tokenizer:
    if core.tokenizer is None:
        raise bad_request("this model has no tokenizer, so there is nothing to tokenize with",
                          "model")
    return core.tokenizer
