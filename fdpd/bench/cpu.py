"""CPU seconds spent by the processes of a benchmarked system, read from Linux ``/proc``: a cost
per request that does not depend on what else the machine is running."""

from __future__ import annotations

import os
import resource
from pathlib import Path


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU time of a process so far (Linux /proc; None elsewhere or if gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError, TypeError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_tree(pid: int) -> list[int]:
    """``pid`` and its live descendants (vLLM's API server spawns its engine core)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())
        except OSError:
            continue
    return out


def own_cpu() -> float:
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


class CPUMeter:
    """CPU seconds each role's processes (with their children) and this client spend between
    construction and ``per_request_ms``."""

    def __init__(self, procs: list[tuple[str, int | None]]):
        self.procs = procs
        self.start = {pid: cpu_seconds(pid) for _, root in procs if root is not None
                      for pid in process_tree(root)}
        self.client = own_cpu()

    def per_request_ms(self, requests: int) -> dict[str, float]:
        out: dict[str, float] = {}
        for role, root in self.procs:
            if root is None:
                continue
            for pid in process_tree(root):
                after = cpu_seconds(pid)
                if after is not None:
                    # A child born during the run counts from zero.
                    out[role] = out.get(role, 0.0) + after - (self.start.get(pid) or 0.0)
        out["client"] = own_cpu() - self.client
        n = max(1, requests)
        return {role: 1e3 * sec / n for role, sec in out.items()}
