"""Per-request sampling parameters, in the shape of vLLM's ``SamplingParams``.

Users script against this class, so field names and defaults follow vLLM. Values are validated
once, in ``__post_init__``; every error is a :class:`SamplingParamsError` that names the field and
the limit. The object is frozen (it is shared by the scheduler, the sampler and the wire codec) and
round-trips through plain msgpack-able types with :meth:`SamplingParams.to_dict` /
:meth:`SamplingParams.from_dict`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

SEED_LIMIT = 2**63
PENALTY_LIMIT = 2.0
# The most independent samples one request may ask for (``n``).
MAX_N = 16
# The most alternatives per token ``logprobs`` / ``prompt_logprobs`` may ask for (vLLM's default
# ``max_logprobs``); fdpd.outputs.TokenLogprobs holds the wire to it too.
MAX_LOGPROBS = 20


class SamplingParamsError(ValueError):
    """A sampling parameter is invalid. The message names the field and the limit."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


def _real(name: str, value: Any) -> float:
    # bool is an int subclass; True as a temperature is a client bug, not 1.0.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise SamplingParamsError(name, f"must be a number, got {type(value).__name__} {value!r}")
    try:
        result = float(value)
    except OverflowError:
        result = math.inf
    if not math.isfinite(result):
        raise SamplingParamsError(name, f"must be finite, got {value!r}")
    return result


def _integer(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise SamplingParamsError(name, f"must be an integer, got {type(value).__name__} "
                                  f"{value!r}")
    return int(value)


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise SamplingParamsError(name, f"must be true or false, got {type(value).__name__} "
                                  f"{value!r}")
    return value


def _stop_strings(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    items = (value,) if isinstance(value, str) else value
    if not isinstance(items, Sequence):
        raise SamplingParamsError("stop", f"must be a string or a list of strings, got "
                                  f"{type(value).__name__}")
    for item in items:
        if not isinstance(item, str):
            raise SamplingParamsError("stop", f"every stop sequence must be a string, got "
                                      f"{type(item).__name__} {item!r}")
        if not item:
            raise SamplingParamsError("stop", "stop sequences must be non-empty strings")
    return tuple(items)


def _stop_token_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise SamplingParamsError("stop_token_ids", f"must be a list of token ids, got "
                                  f"{type(value).__name__}")
    ids = tuple(_integer("stop_token_ids", item) for item in value)
    negative = [i for i in ids if i < 0]
    if negative:
        raise SamplingParamsError("stop_token_ids", f"token ids must be >= 0, got {negative[0]}")
    return ids


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the output tokens of one request (vLLM-compatible field names).

    ``top_k`` 0 or -1 disables top-k; ``max_tokens`` None means "up to the context limit"
    (see :meth:`resolved_max_tokens`); ``logprobs`` None is off, k in [0, 20] returns the logprob
    of the chosen token and of the k most likely ones; ``prompt_logprobs`` likewise for every
    prompt token (the first has none). ``n`` samples of one prompt are ``n`` requests to an
    engine, which runs one each: ``LLM.generate`` and the router fan them out, choice i seeded
    ``seed + i`` (:meth:`for_choice`). ``stop`` is normalised to a tuple of strings and
    ``stop_token_ids`` to a tuple of ints.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | Sequence[str] | None = None
    stop_token_ids: Sequence[int] | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        normalised = {
            "n": self._check_n(),
            "temperature": self._check_temperature(),
            "top_p": self._check_top_p(),
            "top_k": self._check_top_k(),
            "min_p": self._check_min_p(),
            "seed": self._check_seed(),
            "stop": _stop_strings(self.stop),
            "stop_token_ids": _stop_token_ids(self.stop_token_ids),
            "ignore_eos": _flag("ignore_eos", self.ignore_eos),
            "repetition_penalty": self._check_repetition_penalty(),
            "presence_penalty": self._check_penalty("presence_penalty"),
            "frequency_penalty": self._check_penalty("frequency_penalty"),
            "logprobs": self._check_logprobs("logprobs"),
            "prompt_logprobs": self._check_logprobs("prompt_logprobs"),
            "skip_special_tokens": _flag("skip_special_tokens", self.skip_special_tokens),
            "include_stop_str_in_output": _flag("include_stop_str_in_output",
                                                self.include_stop_str_in_output),
        }
        max_tokens, min_tokens = self._check_lengths()
        normalised["max_tokens"] = max_tokens
        normalised["min_tokens"] = min_tokens
        # Frozen: store the normalised (plain int/float/tuple) values once, here.
        for name, value in normalised.items():
            object.__setattr__(self, name, value)

    def _check_n(self) -> int:
        n = _integer("n", self.n)
        if n < 1:
            raise SamplingParamsError("n", f"must be >= 1, got {n}")
        if n > MAX_N:
            raise SamplingParamsError("n", f"must be <= {MAX_N}, got {n}")
        return n

    def _check_temperature(self) -> float:
        temperature = _real("temperature", self.temperature)
        if temperature < 0:
            raise SamplingParamsError("temperature", f"must be >= 0 (0 = greedy), got "
                                      f"{temperature}")
        return temperature

    def _check_top_p(self) -> float:
        top_p = _real("top_p", self.top_p)
        if not 0 < top_p <= 1:
            raise SamplingParamsError("top_p", f"must be in (0, 1], got {top_p}")
        return top_p

    def _check_top_k(self) -> int:
        top_k = _integer("top_k", self.top_k)
        if top_k < -1:
            raise SamplingParamsError("top_k", f"must be -1 or 0 (disabled) or >= 1, got {top_k}")
        return top_k

    def _check_min_p(self) -> float:
        min_p = _real("min_p", self.min_p)
        if not 0 <= min_p <= 1:
            raise SamplingParamsError("min_p", f"must be in [0, 1], got {min_p}")
        return min_p

    def _check_seed(self) -> int | None:
        if self.seed is None:
            return None
        seed = _integer("seed", self.seed)
        if not 0 <= seed < SEED_LIMIT:
            raise SamplingParamsError("seed", f"must be in [0, 2**63), got {seed}")
        return seed

    def _check_lengths(self) -> tuple[int | None, int]:
        max_tokens = None
        if self.max_tokens is not None:
            max_tokens = _integer("max_tokens", self.max_tokens)
            if max_tokens < 1:
                raise SamplingParamsError("max_tokens", f"must be >= 1 (or None for the context "
                                          f"limit), got {max_tokens}")
        min_tokens = _integer("min_tokens", self.min_tokens)
        if min_tokens < 0:
            raise SamplingParamsError("min_tokens", f"must be >= 0, got {min_tokens}")
        if max_tokens is not None and min_tokens > max_tokens:
            raise SamplingParamsError("min_tokens", f"must be <= max_tokens ({max_tokens}), got "
                                      f"{min_tokens}")
        return max_tokens, min_tokens

    def _check_repetition_penalty(self) -> float:
        penalty = _real("repetition_penalty", self.repetition_penalty)
        if penalty <= 0:
            raise SamplingParamsError("repetition_penalty", f"must be > 0 (1 = off), got "
                                      f"{penalty}")
        return penalty

    def _check_penalty(self, name: str) -> float:
        penalty = _real(name, getattr(self, name))
        if not -PENALTY_LIMIT <= penalty <= PENALTY_LIMIT:
            raise SamplingParamsError(name, f"must be in [-2, 2], got {penalty}")
        return penalty

    def _check_logprobs(self, name: str) -> int | None:
        value = getattr(self, name)
        if value is None:
            return None
        logprobs = _integer(name, value)
        if not 0 <= logprobs <= MAX_LOGPROBS:
            raise SamplingParamsError(name, f"must be None or in [0, {MAX_LOGPROBS}], got "
                                      f"{logprobs}")
        return logprobs

    def for_choice(self, index: int) -> SamplingParams:
        """The params of sample ``index`` of ``n``: one sample, seeded ``seed + index`` (as vLLM
        seeds its child requests) so a seeded request repeats choice by choice."""
        seed = None if self.seed is None else (self.seed + index) % SEED_LIMIT
        return dataclasses.replace(self, n=1, seed=seed)

    @property
    def greedy(self) -> bool:
        """True when the sampler takes the argmax (temperature 0, or top_k 1)."""
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        """True when any of the repetition/presence/frequency penalties changes the logits."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)

    def check_against(self, max_model_len: int, prompt_len: int) -> None:
        """Raise :class:`SamplingParamsError` when this request cannot fit the context window."""
        if prompt_len < 1:
            raise SamplingParamsError("prompt", f"must contain at least one token, got "
                                      f"{prompt_len}")
        if prompt_len >= max_model_len:
            raise SamplingParamsError("prompt", f"{prompt_len} prompt tokens leave no room to "
                                      f"generate within max_model_len={max_model_len}; shorten "
                                      "the prompt")
        room = max_model_len - prompt_len
        if self.max_tokens is not None and self.max_tokens > room:
            raise SamplingParamsError("max_tokens", f"prompt_len ({prompt_len}) + max_tokens "
                                      f"({self.max_tokens}) exceeds max_model_len "
                                      f"({max_model_len}); use max_tokens <= {room}")
        if self.min_tokens > room:
            raise SamplingParamsError("min_tokens", f"prompt_len ({prompt_len}) + min_tokens "
                                      f"({self.min_tokens}) exceeds max_model_len "
                                      f"({max_model_len}); use min_tokens <= {room}")

    def resolved_max_tokens(self, max_model_len: int, prompt_len: int) -> int:
        """``max_tokens``, or the room left in the context when it is None; checks the fit."""
        self.check_against(max_model_len, prompt_len)
        if self.max_tokens is None:
            return max_model_len - prompt_len
        return self.max_tokens

    def to_dict(self) -> dict[str, Any]:
        """Plain msgpack-able dict (tuples become lists) that :meth:`from_dict` reads back."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SamplingParams:
        """Build from a dict such as :meth:`to_dict` gives; unknown keys are an error."""
        if not isinstance(data, Mapping):
            raise SamplingParamsError("sampling_params", f"must be a mapping, got "
                                      f"{type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        for key in data:
            if key not in known:
                raise SamplingParamsError(str(key), f"unknown sampling parameter; known: "
                                          f"{sorted(known)}")
        return cls(**data)
