"""A request inside an engine: counters and a block table, plus a state machine.

There is no separate "prefill phase": a request is ``num_computed_tokens`` catching up with
``num_tokens`` (prompt + generated so far). A step that brings it level samples a new token.
The prompt is an immutable tuple: nothing (preemption, a KV-store write-back) may mutate it.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from fdpd.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    # Terminal states sort after every live one, so `is_finished` is one comparison.
    FINISHED_STOPPED = 10
    FINISHED_LENGTH = 11
    FINISHED_ABORTED = 12
    FINISHED_ERROR = 13
    # Prefill role: the first token is sampled and the KV waits (held) to be shipped to decode.
    FINISHED_PREFILLED = 14

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
    RequestStatus.FINISHED_PREFILLED: "prefilled",
}


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling_params: SamplingParams
    max_tokens: int                      # resolved against max_model_len at admission
    seed: int                            # the sampling seed (request's own, or assigned)
    eos_token_ids: tuple[int, ...] = ()
    priority: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    # Prefill role: stop after the first token and keep the KV for the decode instance.
    prefill_only: bool = False

    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    num_computed_tokens: int = 0
    # Prompt tokens served from a cache (prefix cache or KV store) at the latest admission.
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    # Tokens whose KV existed before the latest preemption: computing them again is recompute.
    num_tokens_before_preemption: int = 0
    stop_reason: int | str | None = None
    # Chained hashes of the full blocks of `all_token_ids`, extended as tokens become known.
    block_hashes: list[bytes] = field(default_factory=list)
    # Phase timing on this process's monotonic clock (only durations ever leave the process):
    # the first step that ran it, and each ("preempted" | "restore", seconds) it spent off the
    # running set, in order (preempted: until readmitted; restore: loading its KV from a store).
    scheduled_at: float = 0.0
    preempted_at: float = 0.0
    restore_started_at: float = 0.0
    pauses: list[tuple[str, float]] = field(default_factory=list)
    # Asked for prompt_logprobs: the prompt's entries so far (None for the first token, then a
    # fdpd.outputs.TokenLogprobs each), handed out with this engine's first sample.
    prompt_logprobs: list | None = None
    prompt_logprobs_sent: bool = False
    _all_token_ids: list[int] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self.prompt_token_ids = tuple(self.prompt_token_ids)
        self._all_token_ids = list(self.prompt_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt then output. Read-only by convention: append through ``append_output``."""
        return self._all_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self._all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def needs_prompt_logits(self) -> bool:
        """Prompt logprobs still to compute: every prompt row must run through the model (no
        prefix-cache or store hit may skip one) and hand back its logits."""
        return (self.prompt_logprobs is not None
                and len(self.prompt_logprobs) < self.num_prompt_tokens)

    def append_output(self, token_id: int, logprob: float | None = None) -> None:
        self.output_token_ids.append(token_id)
        self._all_token_ids.append(token_id)
        if logprob is not None:
            self.output_logprobs.append(logprob)

    def paused_seconds(self, kind: str | None = None) -> float:
        """Seconds spent preempted and restoring (or only ``kind``) so far."""
        return sum(s for k, s in self.pauses if kind is None or k == kind)

    def snapshot_token_ids(self) -> tuple[int, ...]:
        """An immutable copy of every token, for work that outlives this step (write-back)."""
        return tuple(self._all_token_ids)
