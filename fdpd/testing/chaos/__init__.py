"""The chaos suite: SIGKILL and SIGSTOP/SIGCONT of a prefill, a decode, the KV store (Redis) or
the router, at chosen moments (fault points, ``fdpd.faults``) and at random ones, under a load
of concurrent greedy requests; invariants checked after every scenario.

A :class:`Scenario` is (target, fault, moment). Random scenarios derive from a seed, which also
draws the load, so ``FDPD_CHAOS_SEED=<seed> python -m fdpd.testing.chaos`` replays a failure.
:class:`ChaosRunner` keeps one cluster across scenarios (router, 2 prefill, 2 decode with a
small pool and a Redis KV store so preemption, write-back and restore really happen; short
leases and deadlines). Per scenario it arms the target's fault point (restarting the process
with ``FDPD_FAULT_POINTS``), sends the load, applies the fault when the moment comes, restarts
what was killed (the router on its own ports, Redis on its port), waits for quiescence, and
checks: every request ended by its deadline (else *hung*); every completed output equals the
offline engine's, token for token, with finite logprobs equal to its own (else *wrong*/*NaN*);
every other request ended with a clean error (an OpenAI error body, an SSE error event, or a
connection error while the router itself was down); every live instance is idle with all of
its blocks free and its ledger at zero (else *leaked*); every instance serves a fresh request
exactly; a restarted process came back with a larger epoch.

``python -m fdpd.testing.chaos --runs 50 --out RELIABILITY.md`` (``scripts/chaos``) runs
random scenarios and writes the table; ``tests/integration/test_chaos.py`` runs the chosen
ones (:data:`CHOSEN`) and two random seeds in CI.

The package: :mod:`~fdpd.testing.chaos.scenarios` (what a run does),
:mod:`~fdpd.testing.chaos.runner` (the cluster, the load, the fault and the checks),
:mod:`~fdpd.testing.chaos.report` (the RELIABILITY.md table) and ``__main__`` (the command
line).
"""

from __future__ import annotations

from fdpd.testing.chaos.report import NOTES_MARKER, summary_rows, write_report
from fdpd.testing.chaos.runner import ChaosRunner, RunResult
from fdpd.testing.chaos.scenarios import CHOSEN, FAULTS, TARGETS, Scenario, random_scenario

__all__ = ["CHOSEN", "FAULTS", "NOTES_MARKER", "TARGETS", "ChaosRunner", "RunResult", "Scenario",
           "random_scenario", "summary_rows", "write_report"]
