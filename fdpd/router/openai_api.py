"""Request bodies of the OpenAI endpoints, and their translation into ``SamplingParams``.

Models are strict (a string where a number belongs is a 400, not a silent cast) and ignore
unknown fields, as vLLM does, so that clients sending newer OpenAI fields keep working. Value
checks (ranges, limits) live in ``SamplingParams``; here only shape, combinations of fields
(``echo`` with ``max_tokens: 0``, ``top_logprobs`` without ``logprobs``) and the features this
server does not offer (``best_of`` other than ``n``, ``suffix``, ``echo`` on chat) are checked.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from fdpd.router.errors import APIError, bad_request
from fdpd.sampling_params import SamplingParams


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class _GenerationRequest(_Body):
    """Fields shared by completions and chat completions (OpenAI's, then vLLM's extensions)."""

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM extensions.
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    return_token_ids: bool = False
    priority: int = 0
    prompt_logprobs: int | None = None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def check_model(self, served: Sequence[str]) -> str:
        """The served name this request is for (the first one when it names none)."""
        return resolve_model(self.model, served)

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """Raises ``SamplingParamsError`` (naming the field) for out-of-range values."""
        if self.logit_bias:
            raise bad_request("logit_bias is not supported", "logit_bias")
        optional: dict[str, Any] = {
            "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
            "min_p": self.min_p, "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty}
        return SamplingParams(
            n=self.n, seed=self.seed, stop=self.stop, stop_token_ids=self.stop_token_ids,
            max_tokens=max_tokens, min_tokens=self.min_tokens, ignore_eos=self.ignore_eos,
            logprobs=logprobs, prompt_logprobs=self.resolved_prompt_logprobs(),
            skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            **{k: v for k, v in optional.items() if v is not None})

    def resolved_prompt_logprobs(self) -> int | None:
        return self.prompt_logprobs


class CompletionRequest(_GenerationRequest):
    # Shape checked by ``prompt_input`` to give one clear message instead of a union's four.
    prompt: Any
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def prompt_input(self) -> str | list[int]:
        """The single prompt: text or token ids. Batches and malformed prompts are a 400."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list))
                                                       for p in prompt):
            if len(prompt) > 1:
                raise bad_request(f"batched prompts are not supported (got {len(prompt)}); "
                                  "send one request per prompt", "prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            if not prompt:
                raise bad_request("prompt is empty", "prompt")
            return prompt
        if isinstance(prompt, list) and all(_is_token_id(t) for t in prompt):
            if not prompt:
                raise bad_request("prompt is empty", "prompt")
            return list(prompt)
        raise bad_request("prompt must be a string, a list of token ids (non-negative "
                          "integers), or a one-element list of either", "prompt")

    @property
    def echo_only(self) -> bool:
        """``echo`` with ``max_tokens: 0``: the prompt (and its logprobs) and nothing else, what
        evaluation harnesses send to score a text. One token is still generated (as in vLLM)
        and dropped."""
        return self.echo and self.max_tokens == 0

    def engine_max_tokens(self) -> int | None:
        if self.max_tokens == 0 and not self.echo:
            raise bad_request("max_tokens: must be >= 1 (0 only with echo: true, to score the "
                              "prompt)", "max_tokens")
        return 1 if self.echo_only else self.max_tokens

    def resolved_prompt_logprobs(self) -> int | None:
        # As vLLM: echo with logprobs shows the prompt's logprobs, so it computes them.
        if self.echo and self.logprobs is not None:
            return max(self.logprobs, self.prompt_logprobs or 0)
        return self.prompt_logprobs

    def check_unsupported(self) -> None:
        if self.best_of is not None and self.best_of != self.n:
            raise bad_request(f"best_of is not supported (got {self.best_of}); only "
                              f"best_of = n ({self.n}), which returns every sample, or leave "
                              "it out", "best_of")
        if self.suffix:
            raise bad_request("suffix is not supported", "suffix")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    # Not strict about extras: assistant messages may carry tool_calls etc. for the template.
    model_config = ConfigDict(strict=True, extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates expect it: a dict with string content."""
        out = self.model_dump(exclude_none=True)
        out["content"] = self.text()
        return out


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    echo: bool = False

    def resolved_max_tokens(self) -> int | None:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    def logprobs_setting(self) -> int | None:
        """The engine's ``logprobs``: None (off) or how many alternatives (top_logprobs)."""
        if self.top_logprobs and not self.logprobs:
            raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
        if not self.logprobs:
            return None
        return 0 if self.top_logprobs is None else self.top_logprobs

    def check_messages(self) -> None:
        if self.echo:
            raise bad_request("echo is not supported on chat completions; use "
                              "/v1/completions with echo: true (or prompt_logprobs here)",
                              "echo")
        if not self.messages:
            raise bad_request("messages is empty; send at least one message", "messages")


def resolve_model(model: str | None, served: Sequence[str]) -> str:
    """A 404 for a name this router does not serve; else the name (the first one for None)."""
    if model is None:
        return served[0]
    if model not in served:
        names = ", ".join(f"`{n}`" for n in served)
        raise APIError(404, f"The model `{model}` does not exist; this server serves {names} "
                       "(GET /v1/models lists them)", param="model", code="model_not_found")
    return model


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
