"""One chaos run's results and what makes it pass."""

from __future__ import annotations

from dataclasses import dataclass, field

from fdpd.testing.chaos.scenarios import Scenario

# Targets of which another instance of the same role keeps running in the chaos cluster (2
# prefills, 2 decodes): the router resumes or retries what the broken one held there, so a
# fault on one of them must cost the clients nothing (``fdpd.router.resume``).
SURVIVED_ROLES = ("prefill", "decode")


@dataclass
class RunResult:
    scenario: Scenario
    applied: bool = False          # the moment came and the fault was applied
    sent: int = 0
    exact: int = 0                 # completed, token-exact
    clean_errors: int = 0          # ended with an error the client can act on
    hung: int = 0                  # not ended by its deadline + margin
    wrong: int = 0                 # completed but not exact, or cut off with no error
    leaked_blocks: int = 0         # blocks still held once the cluster should be idle
    nan: int = 0                   # requests with a non-finite or diverging logprob
    survivors_serve: bool = False
    rejoined: bool | None = None   # None: nothing was restarted
    # What the decodes did meanwhile (write-back and restore must really happen).
    preemptions: int = 0
    blocks_written: int = 0
    blocks_restored: int = 0
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)    # where the run's time went
    problems: list[str] = field(default_factory=list)
    # Seconds from the fault to the first token of each stream the router resumed.
    resume_gaps: list[float] = field(default_factory=list)
    # Seconds from a resumed stream's last token to the router noticing the loss.
    resume_detects: list[float] = field(default_factory=list)

    @property
    def errors_must_be_hidden(self) -> bool:
        """An instance of the broken one's role survived: no client may see an error."""
        return self.applied and self.scenario.target in SURVIVED_ROLES

    @property
    def passed(self) -> bool:
        return (not self.hung and not self.wrong and not self.leaked_blocks and not self.nan
                and self.survivors_serve and self.rejoined is not False and not self.problems
                and not (self.errors_must_be_hidden and self.clean_errors))

    def line(self) -> str:
        return (f"{'PASS' if self.passed else 'FAIL'} {self.scenario.kind} "
                f"[seed {self.scenario.seed}] applied={self.applied} sent={self.sent} "
                f"exact={self.exact} clean_errors={self.clean_errors} hung={self.hung} "
                f"wrong={self.wrong} leaked={self.leaked_blocks} nan={self.nan} "
                f"serve={self.survivors_serve} rejoined={self.rejoined} "
                f"preempted={self.preemptions} written={self.blocks_written} "
                f"restored={self.blocks_restored} resumed={len(self.resume_gaps)} "
                f"{self.seconds:.1f}s ("
                + ", ".join(f"{k} {v:.1f}" for k, v in self.phases.items()) + ")"
                + "".join(f"\n    {p}" for p in self.problems))
