"""Chaos scenarios: what one run breaks, how and when (:class:`Scenario`), the random
scenario a seed names (:func:`random_scenario`) and the chosen ones of the CI suite
(:data:`CHOSEN`)."""

from __future__ import annotations

import random
from dataclasses import dataclass

from fdpd.faults import POINTS

TARGETS = ("prefill", "decode", "store", "router")
FAULTS = ("kill", "stop-cont", "stop-kill")
# The fault points at which each target can be broken. A store fault at a kvstore.* point
# stops the decode there, breaks Redis, then lets the decode go on into the broken store.
TARGET_POINTS = {"prefill": ("prefill.await_grant", "prefill.kv_send"),
                 "decode": ("decode.kv_received", "decode.step", "kvstore.write",
                            "kvstore.restore"),
                 "store": ("kvstore.write", "kvstore.restore"),
                 "router": ()}
DELAY = "delay"            # a random delay after the load starts
TOKENS = "tokens"          # once the clients received N streamed tokens (mid-decode)
MOMENT_NAMES = {DELAY: "random delay", TOKENS: "streamed tokens"}


@dataclass(frozen=True)
class Scenario:
    target: str                # prefill | decode | store | router
    fault: str                 # kill | stop-cont | stop-kill
    moment: str                # a fault point, DELAY or TOKENS
    hit: int = 1               # fault point: its N-th hit; TOKENS: N tokens streamed
    delay: float = 1.0         # DELAY: seconds after the load started
    pause: float = 2.5         # seconds the target stays stopped, or down before its restart
    instance: int = 0          # which prefill/decode is the target (or hosts the point)
    seed: int = 0              # draws the load (and, for random scenarios, all of the above)
    num_requests: int = 16

    def __post_init__(self) -> None:
        if self.target not in TARGETS or self.fault not in FAULTS:
            raise ValueError(f"target must be one of {TARGETS} and fault one of {FAULTS}: "
                             f"{self}")
        if self.moment not in (*TARGET_POINTS[self.target], DELAY, TOKENS):
            raise ValueError(f"{self.target} cannot be hit at {self.moment!r}; choose from "
                             f"{[*TARGET_POINTS[self.target], DELAY, TOKENS]}")

    @property
    def at_point(self) -> bool:
        return self.moment in POINTS

    @property
    def kind(self) -> str:
        return f"{self.fault} {self.target} @ {MOMENT_NAMES.get(self.moment, self.moment)}"

    def describe(self) -> str:
        when = {DELAY: f"{self.delay:g} s into the load", TOKENS: f"after {self.hit} tokens"
                }.get(self.moment, f"hit {self.hit} of {self.moment}")
        role = "decode" if self.target == "store" else self.target
        who = f"{role}-{self.instance}" if role in ("prefill", "decode") else self.target
        return (f"{self.fault} {who} {when}, pause {self.pause:g} s, {self.num_requests} "
                f"requests, seed {self.seed}")


def random_scenario(seed: int) -> Scenario:
    """Everything about a run, drawn from ``seed``."""
    rng = random.Random(seed)
    target, fault = rng.choice(TARGETS), rng.choice(FAULTS)
    moment = rng.choice([*TARGET_POINTS[target], DELAY, TOKENS])
    hit = {"decode.step": rng.randint(5, 120), TOKENS: rng.randint(20, 600)}.get(
        moment, rng.randint(1, 3))
    return Scenario(target, fault, moment, hit, delay=round(rng.uniform(0.1, 1.5), 2),
                    pause=round(rng.uniform(0.3, 4.0), 2), instance=rng.randrange(2),
                    seed=seed, num_requests=rng.randint(12, 24))


# Each target at each kind of moment once (the CI short mode).
CHOSEN = (
    Scenario("prefill", "kill", "prefill.await_grant", 2, pause=0.5, seed=101),
    Scenario("prefill", "stop-kill", "prefill.kv_send", 2, pause=1.0, seed=102),
    Scenario("decode", "kill", "decode.step", 40, pause=0.5, seed=103),
    Scenario("decode", "stop-cont", "decode.step", 40, pause=2.5, seed=104),
    Scenario("store", "kill", "kvstore.write", 1, pause=1.0, seed=105, num_requests=24),
    Scenario("store", "stop-cont", "kvstore.restore", 1, pause=1.0, seed=106,
             num_requests=24),
    Scenario("router", "kill", TOKENS, 150, pause=0.3, seed=107),
    # SIGKILLed from outside mid-stream, as an OOM killer or an operator would: its streams
    # resume on the other decode (fdpd.router.resume).
    Scenario("decode", "kill", TOKENS, 150, pause=0.5, seed=108),
)

