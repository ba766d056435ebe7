"""What users get back, and the front-end work that produces it from token ids: incremental
detokenization and stop strings. Used by the offline ``LLM`` and by the router alike; engines
never see text.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from fdpd.model.tokenizer import IncrementalDetokenizer, Tokenizer
from fdpd.sampling_params import MAX_LOGPROBS, SamplingParams


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """The logprob of ``token_id`` where it was chosen (or stood, in a prompt), its rank among
    every token of the vocabulary (1 = most likely; ties share the better rank), and the
    ``k`` most likely tokens there, best first. Between processes it travels as the plain list
    ``[logprob, rank, ids, values]`` (:meth:`to_wire`), which msgpack carries as it is."""

    token_id: int
    logprob: float
    rank: int
    top_ids: tuple[int, ...]
    top_logprobs: tuple[float, ...]

    def to_wire(self) -> list:
        return [self.logprob, self.rank, list(self.top_ids), list(self.top_logprobs)]

    @classmethod
    def from_wire(cls, token_id: int, value: object) -> TokenLogprobs:
        """Read back :meth:`to_wire`'s list; ``ValueError`` for anything else."""
        if not (isinstance(value, (list, tuple)) and len(value) == 4):
            raise ValueError(f"token logprobs: expected [logprob, rank, ids, values], got "
                             f"{value!r:.80}")
        logprob, rank, ids, values = value
        if (not _is_number(logprob) or not _is_int(rank) or rank < 1
                or not isinstance(ids, (list, tuple)) or not isinstance(values, (list, tuple))
                or len(ids) != len(values) or len(ids) > MAX_LOGPROBS
                or not all(_is_int(t) and t >= 0 for t in ids)
                or not all(_is_number(v) for v in values)):
            raise ValueError(f"token logprobs: malformed entry {value!r:.80}")
        return cls(token_id, float(logprob), rank, tuple(ids), tuple(float(v) for v in values))


def logprobs_to_wire(entries: Sequence[TokenLogprobs | None] | None) -> list | None:
    """A list of entries (None where a token has none: a prompt's first) as msgpack types."""
    if entries is None:
        return None
    return [None if e is None else e.to_wire() for e in entries]


def logprobs_from_wire(token_ids: Sequence[int], values: list | None
                       ) -> list[TokenLogprobs | None] | None:
    """:func:`logprobs_to_wire`'s list back, entry i about ``token_ids[i]``; ``ValueError``
    if it is malformed or its length differs."""
    if values is None:
        return None
    if len(values) != len(token_ids):
        raise ValueError(f"token logprobs: {len(values)} entries for {len(token_ids)} tokens")
    return [None if v is None else TokenLogprobs.from_wire(t, v)
            for t, v in zip(token_ids, values)]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    # -inf is a real logprob (a masked token); NaN never is.
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and not math.isnan(value))


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[float] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # With SamplingParams.logprobs = k: per token, its rank and k best alternatives
    # (TokenLogprobs); ``logprobs`` keeps the chosen tokens' values.
    token_logprobs: list | None = None

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
    # With SamplingParams.prompt_logprobs: None for the first prompt token, then a
    # TokenLogprobs per prompt token (vLLM's prompt_logprobs).
    prompt_logprobs: list | None = None


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
