"""Request bodies of the OpenAI endpoints, and their translation into ``SamplingParams``.

Models are strict (a string where a number belongs is a 400, not a silent cast) and ignore
unknown fields, as vLLM does, so that clients sending newer OpenAI fields keep working. Value
checks (ranges, limits) live in ``SamplingParams``; here only shape and the features this server
does not offer (``n > 1``, ``echo``, top-n logprobs...) are rejected.
"""

from __future__ import annotations

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

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def check_model(self, served: str) -> None:
        if self.model is not None and self.model != served:
            raise APIError(404, f"The model `{self.model}` does not exist; this server serves "
                           f"`{served}` (GET /v1/models lists it)", param="model",
                           code="model_not_found")

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
            logprobs=logprobs, skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            **{k: v for k, v in optional.items() if v is not None})


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

    def check_unsupported(self) -> None:
        if self.echo:
            raise bad_request("echo is not supported", "echo")
        if self.best_of not in (None, 1):
            raise bad_request(f"best_of > 1 is not supported (got {self.best_of})", "best_of")
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

    def resolved_max_tokens(self) -> int | None:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    def logprobs_setting(self) -> int | None:
        if self.top_logprobs:
            raise bad_request(f"top_logprobs > 0 is not supported (got {self.top_logprobs}); "
                              "only the chosen token's logprob is returned", "top_logprobs")
        return 0 if self.logprobs else None

    def check_messages(self) -> None:
        if not self.messages:
            raise bad_request("messages is empty; send at least one message", "messages")


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
