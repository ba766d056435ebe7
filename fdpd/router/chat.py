"""Chat messages -> prompt text: the model's Jinja chat template, or a built-in one.

The template comes from ``tokenizer_config.json`` (``chat_template``) or ``chat_template.jinja``
and is rendered like Hugging Face ``apply_chat_template`` does: a sandboxed Jinja environment with
``trim_blocks``/``lstrip_blocks``, ``messages``, ``add_generation_prompt``, ``bos_token`` and
``eos_token``, and ``raise_exception`` for templates that validate the conversation. Models with
no template (the built-in ``tiny``) get plain role markers (:data:`ROLE_MARKERS`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from fdpd.model.tokenizer import Tokenizer

ROLE_MARKERS = {"system": "<|system|>", "developer": "<|system|>", "user": "<|user|>",
                "assistant": "<|assistant|>", "tool": "<|tool|>"}


class ChatTemplateError(ValueError):
    """The conversation cannot be rendered by the template (the client's messages are wrong for
    this model, e.g. roles that do not alternate): a 400, not a 500."""


def render_builtin(messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> str:
    parts = [f"{ROLE_MARKERS[m['role']]}\n{m.get('content') or ''}\n" for m in messages]
    if add_generation_prompt:
        parts.append(f"{ROLE_MARKERS['assistant']}\n")
    return "".join(parts)


def render_chat(messages: Sequence[dict[str, Any]], template: str | None,
                tokenizer: Tokenizer | None, add_generation_prompt: bool = True) -> str:
    """Prompt text for ``messages`` (dicts with string ``content``)."""
    if template is None:
        return render_builtin(messages, add_generation_prompt)
    import jinja2

    compiled = _compile(template)
    try:
        return compiled.render(messages=list(messages),
                               add_generation_prompt=add_generation_prompt,
                               bos_token=_special_text(tokenizer, "bos"),
                               eos_token=_special_text(tokenizer, "eos"))
    except ChatTemplateError:
        raise
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"the model's chat template failed on these messages: "
                                f"{exc}") from exc


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=8)
def _compile(template: str) -> Any:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def _special_text(tokenizer: Tokenizer | None, which: str) -> str:
    if tokenizer is None:
        return ""
    token = (tokenizer.bos_token_id if which == "bos"
             else (tokenizer.eos_token_ids[0] if tokenizer.eos_token_ids else None))
    if token is None:
        return ""
    return tokenizer.decode([token], skip_special_tokens=False)


def encode_chat_prompt(text: str, tokenizer: Tokenizer) -> list[int]:
    """Token ids of a rendered chat prompt. Templates usually write BOS themselves and
    ``encode`` adds one too; a doubled BOS shifts every position, so drop the extra one."""
    ids = tokenizer.encode(text)
    bos = tokenizer.bos_token_id
    if bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
        ids = ids[1:]
    return ids
