"""What users get back, and the front-end work that produces it from token ids: incremental
detokenization and stop strings. Used by the offline ``LLM`` and by the router alike; engines
never see text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from fdpd.model.tokenizer import IncrementalDetokenizer, Tokenizer
from fdpd.sampling_params import SamplingParams


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[float] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0


@dataclass
class TextStream:
    """Turns one request's token stream into text, and finds its stop strings.

    With stop strings, the last ``max(len(stop)) - 1`` characters are held back from ``delta``
    until it is clear they do not begin a stop string, so a streaming client never receives
    text that is later cut. Matched stop text is excluded unless ``include_stop_str_in_output``.
    """

    tokenizer: Tokenizer | None
    prompt_token_ids: Sequence[int]
    params: SamplingParams
    text: str = ""
    stop_reason: str | None = None
    _sent: int = 0
    _detok: IncrementalDetokenizer | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.tokenizer is not None:
            self._detok = IncrementalDetokenizer(self.tokenizer, list(self.prompt_token_ids),
                                                 self.params.skip_special_tokens)

    def add(self, token_ids: Sequence[int], finished: bool) -> str:
        """Feed new tokens; return the text that may be shown now. After a stop string is
        found, ``stop_reason`` is set and the caller must end the request."""
        if self._detok is None:
            return ""
        before = len(self.text)
        self.text += self._detok.add(list(token_ids))
        if finished:
            self.text += self._detok.flush()       # bytes held back for a character to finish
        stops = self.params.stop
        if stops and self.stop_reason is None:
            # A new match must end inside the new text; search only where it could start.
            lo = max(0, before - max(map(len, stops)) + 1)
            hit = min(((i, s) for s in stops if (i := self.text.find(s, lo)) >= 0),
                      default=None)
            if hit is not None:
                i, s = hit
                self.text = self.text[: i + len(s) if self.params.include_stop_str_in_output
                                      else i]
                self.stop_reason = s
                finished = True
        hold = 0 if finished or not stops else max(map(len, stops)) - 1
        end = max(self._sent, len(self.text) - hold)
        delta, self._sent = self.text[self._sent:end], end
        return delta
