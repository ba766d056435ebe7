"""What the router core hands the HTTP layer for one request: token deltas as the instances
sent them (``Tokens`` messages), and on the last one where the request ran (``Route``)."""

from __future__ import annotations

from dataclasses import dataclass

from fdpd.pd.protocol import Tokens


@dataclass(frozen=True)
class Route:
    """Where the attempt that served a request went, and when it left (router clock)."""

    mode: str                          # pd | mixed
    prefill: str | None
    decode: str
    attempts: int
    dispatched_at: float
    first_dispatched_at: float = 0.0
    resumes: tuple[dict, ...] = ()     # ResumeRecord.view() of each move (fdpd.router.resume)
    resumed_seconds: float = 0.0       # time between losing the stream and re-dispatching it


@dataclass
class TokenDelta:
    token_ids: list[int]
    logprobs: list[float] | None
    finished: bool
    finish_reason: str | None
    stop_reason: int | str | None
    num_prompt_tokens: int
    num_cached_tokens: int
    # On the last delta only: the instances' timeline (Tokens.timeline) and how the router
    # placed the request (see Route).
    timeline: dict | None = None
    route: Route | None = None
    # In wire form (fdpd.outputs.logprobs_to_wire), read by the relay that knows the tokens:
    # each new token's rank and top alternatives, and once, the prompt's logprobs.
    token_logprobs: list | None = None
    prompt_logprobs: list | None = None
    position: int = -1                 # Tokens.position: index of token_ids[0] in the output

    @classmethod
    def from_tokens(cls, msg: Tokens) -> TokenDelta:
        return cls(list(msg.token_ids), msg.logprobs, msg.finished, msg.finish_reason,
                   msg.stop_reason, msg.num_prompt_tokens, msg.num_cached_tokens, msg.timeline,
                   token_logprobs=msg.token_logprobs, prompt_logprobs=msg.prompt_logprobs,
                   position=msg.position)
