"""The router's bound on what it holds: admission seats and the request body size."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Admission:
    """The router's bound on what it holds (``--max-inflight-requests``,
    ``--max-request-body-bytes``). The HTTP layer takes a seat for each generation request
    before reading its body and gives it back when the response has ended (streams included);
    with no seat free it answers 429 at once, without touching any instance. Under a burst
    the router so keeps its memory and CPU for the requests it took, instead of queueing
    the rest without bound. Used on the event loop only: no lock."""

    limit: int
    max_body_bytes: int
    body_timeout: float = 30.0           # seconds to receive a whole body (seat holders too)
    held: int = 0
    peak: int = 0                        # most seats held at once since start
    refused: int = 0

    def enter(self) -> bool:
        if self.held >= self.limit:
            self.refused += 1
            return False
        self.held += 1
        self.peak = max(self.peak, self.held)
        return True

    def leave(self) -> None:
        self.held -= 1

    def view(self) -> dict:
        return {"held": self.held, "peak": self.peak, "limit": self.limit,
                "refused": self.refused, "max_body_bytes": self.max_body_bytes}


# A request body never needs more than this per token of context: a token id in a JSON list
# takes at most 8 bytes with its separator; text averages ~4 bytes a token, and \u-escaped
# non-ASCII text up to ~12.
BODY_BYTES_PER_TOKEN = 16
MIN_BODY_BYTES = 1 << 20
