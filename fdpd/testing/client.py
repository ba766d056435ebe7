"""Sending one OpenAI request to a router and collecting what came back, streamed or not.

``complete`` works for ``/v1/completions`` and ``/v1/chat/completions`` alike and returns a
:class:`Completion` with the generated token ids (needs ``return_token_ids: true``), the prompt
token ids the router used, the text, the finish reason, an error body if any, and client-side
timestamps of the first and last token (for ordering checks).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class Completion:
    status: int
    token_ids: list[int] = field(default_factory=list)
    prompt_token_ids: list[int] | None = None
    text: str = ""
    finish_reason: str | None = None
    error: dict | None = None            # the OpenAI error object (HTTP error or SSE event)
    events: list[dict] = field(default_factory=list)
    done: bool = False                   # streaming: the [DONE] sentinel arrived
    sent_at: float = 0.0
    first_token_at: float | None = None
    finished_at: float | None = None
    body: dict | None = None             # non-streaming: the whole response

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None and self.finish_reason is not None


def iter_sse(response: httpx.Response) -> Iterator[dict | str]:
    """The ``data:`` payloads of an SSE response: dicts, and the string ``[DONE]``."""
    for line in response.iter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        yield data if data == "[DONE]" else json.loads(data)


def _choice_text(choice: dict) -> str:
    if "text" in choice:
        return choice["text"] or ""
    part = choice.get("delta") or choice.get("message") or {}
    return part.get("content") or ""


def _absorb(out: Completion, obj: dict, now: float) -> None:
    if "error" in obj:
        out.error = obj["error"]
        return
    if obj.get("prompt_token_ids") is not None:          # chat: top level
        out.prompt_token_ids = obj["prompt_token_ids"]
    for choice in obj.get("choices") or []:
        if choice.get("prompt_token_ids") is not None:   # completions: in the choice
            out.prompt_token_ids = choice["prompt_token_ids"]
        ids = choice.get("token_ids") or []
        if ids and out.first_token_at is None:
            out.first_token_at = now
        out.token_ids.extend(ids)
        out.text += _choice_text(choice)
        if choice.get("finish_reason") is not None:
            out.finish_reason = choice["finish_reason"]
            out.finished_at = now


def complete(client: httpx.Client, path: str, body: dict[str, Any], *,
             on_event: Callable[[Completion], None] | None = None) -> Completion:
    """POST ``body`` to ``path``; stream if ``body["stream"]``. ``on_event`` is called after
    every SSE event (e.g. to act after the first few tokens)."""
    out = Completion(status=0, sent_at=time.monotonic())
    if not body.get("stream"):
        r = client.post(path, json=body)
        out.status = r.status_code
        payload = r.json()
        if r.status_code != 200:
            out.error = payload.get("error", payload)
            return out
        out.body = payload
        _absorb(out, payload, time.monotonic())
        return out
    with client.stream("POST", path, json=body) as r:
        out.status = r.status_code
        if r.status_code != 200:
            r.read()
            payload = r.json()
            out.error = payload.get("error", payload)
            return out
        for event in iter_sse(r):
            if event == "[DONE]":
                out.done = True
                continue
            out.events.append(event)
            _absorb(out, event, time.monotonic())
            if on_event is not None:
                on_event(out)
    return out
