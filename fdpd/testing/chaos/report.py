"""The chaos report: the reliability table (RELIABILITY.md) written from the runs' results,
keeping the hand-written notes below :data:`NOTES_MARKER`."""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from fdpd.testing.chaos.runner import (
    CLIENT_MARGIN,
    GRANT_TTL,
    HEARTBEAT,
    LOGPROB_TOLERANCE,
    QUIESCENT_TIMEOUT,
    REQUEST_TIMEOUT,
    STORE_TIMEOUT,
    TRANSFER_TIMEOUT,
    RunResult,
)
from fdpd.testing.chaos.scenarios import FAULTS, TARGETS

NOTES_MARKER = "<!-- notes: kept when scripts/chaos rewrites this file -->"
COLUMNS = ("runs", "fault applied", "requests sent", "completed exact",
           "ended with a clean error", "streams resumed", "hung", "leaked blocks",
           "wrong outputs", "NaN", "survivors served", "rejoined with new epoch")


def summary_rows(results: Sequence[RunResult]) -> list[tuple[str, list]]:
    by_kind: dict[str, list[RunResult]] = defaultdict(list)
    order = {}
    for r in results:
        sc = r.scenario
        by_kind[sc.kind].append(r)
        order[sc.kind] = (TARGETS.index(sc.target), FAULTS.index(sc.fault), sc.moment)

    def row(rs: list[RunResult]) -> list:
        restarted = [r for r in rs if r.rejoined is not None]
        return [len(rs), sum(r.applied for r in rs), sum(r.sent for r in rs),
                sum(r.exact for r in rs), sum(r.clean_errors for r in rs),
                sum(len(r.resume_gaps) for r in rs), sum(r.hung for r in rs),
                sum(r.leaked_blocks for r in rs),
                sum(r.wrong for r in rs), sum(r.nan for r in rs),
                f"{sum(r.survivors_serve for r in rs)}/{len(rs)}",
                f"{sum(bool(r.rejoined) for r in restarted)}/{len(restarted)}"]

    rows = [(kind, row(by_kind[kind])) for kind in sorted(by_kind, key=order.get)]
    rows.append(("**total**", row(list(results))))
    return rows


def write_report(results: Sequence[RunResult], path: str | os.PathLike, *, command: str,
                 base_seed: int, date: str, machine: str, wall_seconds: float) -> None:
    failed = [r for r in results if not r.passed]
    lines = [
        "# Reliability: the chaos suite",
        "",
        "A real cluster (router, 2 prefill, 2 decode with a 64-block pool, a Redis KV store, "
        "tiny model) under 12-24 concurrent greedy requests (streamed and not, shared prefixes, "
        "some with logprobs). Each run SIGKILLs or SIGSTOPs (then SIGCONTs or SIGKILLs) one of "
        "a prefill, a decode, Redis or the router, at a fault point (`fdpd/faults.py`: "
        "awaiting a grant, between KV frames, KV received, mid-decode step, mid-write-back, "
        "mid-restore), after N streamed tokens, or at a random delay; what was killed is "
        "restarted (the router on its own ports, Redis on its port). Deadlines: grant lease "
        f"{GRANT_TTL:g} s, transfer {TRANSFER_TIMEOUT:g} s, request {REQUEST_TIMEOUT:g} s, "
        f"KV-store call {STORE_TIMEOUT:g} s, heartbeats every {HEARTBEAT:g} s.",
        "",
        "Checked after every run, once the cluster is quiescent:",
        "",
        f"- **hung**: a request that did not end by its deadline + {CLIENT_MARGIN:g} s (must "
        "be 0);",
        "- **completed exact**: a completed output equal, token for token, to the offline "
        "engine (`fdpd.LLM`) on the same prompt; **wrong outputs**: completed but not exact, "
        "or cut off with neither a finish reason nor an error (must be 0);",
        "- **ended with a clean error**: an HTTP error with an OpenAI error body, an SSE error "
        "event, or a connection error while the router itself was down; **must be 0 when "
        "the target was a prefill or a decode** (another instance of its role survives: the "
        "router retries, or resumes a broken stream from prompt + tokens already sent, "
        "`fdpd/router/resume.py`); **streams resumed**: streams the router moved to another "
        "instance mid-way (from the request timelines);",
        "- **leaked blocks**: blocks still held on a live instance once it should be idle, or "
        "a decode ledger not back to zero (grants, reservations, queued allocations) within "
        f"{QUIESCENT_TIMEOUT:g} s (must be 0);",
        f"- **NaN**: a request with logprobs that are not finite or differ from the offline "
        f"engine's by more than {LOGPROB_TOLERANCE:g} (must be 0);",
        "- **survivors served**: afterwards, fresh requests are exact and every prefill and "
        "decode took part; **rejoined**: every restarted process (router included) "
        "registered with a larger epoch (Redis: answers again).",
        "",
        f"Command: `{command}` (base seed {base_seed}; run *i* uses seed base + *i*; replay "
        "one run with `FDPD_CHAOS_SEED=<seed> scripts/chaos`). Date: "
        f"{date}. Machine: {machine}. Wall time: {wall_seconds / 60:.1f} min for "
        f"{len(results)} runs.",
        "",
        "| scenario | " + " | ".join(COLUMNS) + " |",
        "| --- | " + " | ".join("---:" for _ in COLUMNS) + " |",
    ]
    for kind, row in summary_rows(results):
        lines.append(f"| {kind} | " + " | ".join(str(v) for v in row) + " |")
    gaps = sorted(g for r in results for g in r.resume_gaps)
    detects = sorted(d for r in results for d in r.resume_detects)
    if gaps:
        lines += ["", f"Fault -> first resumed token, over the {len(gaps)} resumed streams "
                  f"the clients saw stall: p50 {_quantile(gaps, 0.5):.3f} s, p99 "
                  f"{_quantile(gaps, 0.99):.3f} s, max {gaps[-1]:.3f} s. Of that, the "
                  f"router noticing the loss (last token -> noticed, {len(detects)} moves): "
                  + (f"p50 {_quantile(detects, 0.5):.3f} s, p99 "
                     f"{_quantile(detects, 0.99):.3f} s " if detects else "none recorded ")
                  +
                  "(a SIGKILL is seen from the dropped connection; a SIGSTOP only at the "
                  "liveness timeout, max(2 s, 6 heartbeats)); the rest is the surviving "
                  "decode, its small pool already full, making room for the moved streams."]
    hidden = [r for r in results if r.errors_must_be_hidden]
    lines += ["", f"Runs where an instance of the broken role survived: {len(hidden)}; "
              f"client-visible errors in them: {sum(r.clean_errors for r in hidden)}."]
    lines += ["", f"Runs passed: {len(results) - len(failed)} of {len(results)}. A run whose "
              "moment never came (e.g. no write-back happened on that decode) still checks "
              "everything above; it is counted under *fault applied*. Meanwhile the decodes "
              f"preempted {sum(r.preemptions for r in results)} times, wrote back "
              f"{sum(r.blocks_written for r in results)} KV blocks to Redis and restored "
              f"{sum(r.blocks_restored for r in results)} (counters of restarted decodes "
              "start again from zero, so these are lower bounds).", ""]
    if failed:
        lines += ["Failed runs (replay with `FDPD_CHAOS_SEED`):", ""]
        for r in failed:
            lines.append(f"- seed {r.scenario.seed}: {r.scenario.describe()}: "
                         + "; ".join(p.splitlines()[0][:300] for p in r.problems))
        lines.append("")
    # Hand-written notes (the bugs the suite found) follow a marker and survive a re-run.
    path = Path(path)
    old = path.read_text() if path.exists() else ""
    notes = old[old.index(NOTES_MARKER):] if NOTES_MARKER in old else f"{NOTES_MARKER}\n"
    path.write_text("\n".join(lines) + "\n" + notes)


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]
