"""Named fault points for chaos tests (in the spirit of FoundationDB's buggify).

Production code marks the moments a chaos test wants to break a process at, e.g.
``fault_point("prefill.kv_send")`` between KV frames. Unarmed (always, outside chaos tests) a
fault point is one module-global check and returns: no allocation, no lock. A process started
with ``FDPD_FAULT_POINTS="name[@N]=action[,...]"`` arms points; the N-th hit (default 1) of
``name`` runs ``action`` once:

- ``stop``: SIGSTOP this process (every thread). The test sees it stopped (state ``T`` in
  ``/proc/PID/stat``) at exactly that moment and decides: SIGKILL, or SIGCONT to go on;
- ``kill``: SIGKILL this process (no cleanup, as a crash or an OOM kill);
- ``sleep:SECONDS``: sleep in the calling thread (a stall of that one thread).

The specification is parsed when this module is first imported, i.e. when the process
starts; a malformed one (unknown point, bad hit number or action) raises
:class:`FaultSpecError` naming the entry, so a typo never silently runs a chaos test without
its fault. Hits are counted per point in each process, under a lock only when armed (the
KV-store points run on the offload worker thread).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass

log = logging.getLogger(__name__)

ENV = "FDPD_FAULT_POINTS"
# Every fault point placed in the code, and where (a spec naming another one is a typo).
POINTS = {
    "prefill.await_grant": "prefill: AllocRequest sent, the decode's grant not yet here",
    "prefill.kv_send": "prefill: after each KV frame is handed to the transport, before "
                       "PrefillDone",
    "decode.kv_received": "decode: PrefillDone arrived (all KV in), before the commit",
    "decode.step": "decode: once per engine step, before its tokens are streamed",
    "kvstore.write": "KV-store worker: a write-back, before each block's put",
    "kvstore.restore": "KV-store worker: a restore, before the store get",
}
ACTIONS = ("stop", "kill", "sleep")
FLUSH_SECONDS = 0.02
_ENTRY = re.compile(r"^(?P<point>[a-z_.]+)(?:@(?P<hit>\d+))?=(?P<action>[a-z]+)"
                    r"(?::(?P<arg>[^,]*))?$")


class FaultSpecError(ValueError):
    """A malformed ``FDPD_FAULT_POINTS`` value; the message names the bad entry."""


@dataclass(frozen=True)
class Fault:
    point: str
    hit: int                 # fires on this hit of the point (1 = the first)
    action: str              # stop | kill | sleep
    seconds: float = 0.0     # sleep only

    def spec(self) -> str:
        action = f"sleep:{self.seconds:g}" if self.action == "sleep" else self.action
        return f"{self.point}@{self.hit}={action}"


def parse(spec: str) -> list[Fault]:
    """``"name[@N]=action[,...]"`` -> faults. Raises FaultSpecError on any bad entry."""
    faults: list[Fault] = []
    for entry in (e.strip() for e in spec.split(",")):
        if not entry:
            continue
        m = _ENTRY.match(entry)
        if m is None:
            raise FaultSpecError(f"{ENV}: cannot parse {entry!r}; expected "
                                 "POINT[@N]=stop|kill|sleep:SECONDS")
        point, action, arg = m["point"], m["action"], m["arg"]
        if point not in POINTS:
            raise FaultSpecError(f"{ENV}: unknown fault point {point!r} in {entry!r}; known: "
                                 f"{', '.join(sorted(POINTS))}")
        hit = int(m["hit"]) if m["hit"] is not None else 1
        if hit < 1:
            raise FaultSpecError(f"{ENV}: hit number must be >= 1 in {entry!r}")
        if action not in ACTIONS:
            raise FaultSpecError(f"{ENV}: unknown action {action!r} in {entry!r}; expected "
                                 "stop, kill or sleep:SECONDS")
        seconds = 0.0
        if action == "sleep":
            try:
                seconds = float(arg) if arg is not None else -1.0
            except ValueError:
                seconds = -1.0
            if not 0 <= seconds < float("inf"):
                raise FaultSpecError(f"{ENV}: sleep needs a duration in seconds >= 0, as in "
                                     f"sleep:0.5; got {entry!r}")
        elif arg is not None:
            raise FaultSpecError(f"{ENV}: action {action!r} takes no argument in {entry!r}")
        if any(f.point == point and f.hit == hit for f in faults):
            raise FaultSpecError(f"{ENV}: {point}@{hit} is given twice")
        faults.append(Fault(point, hit, action, seconds))
    return faults


def format_spec(faults: list[Fault]) -> str:
    """The ``FDPD_FAULT_POINTS`` value that arms ``faults``."""
    return ",".join(f.spec() for f in faults)


class _Armed:
    def __init__(self, faults: list[Fault]):
        self.faults = {(f.point, f.hit): f for f in faults}
        self.points = {f.point for f in faults}
        self.hits: Counter[str] = Counter()
        self.lock = threading.Lock()

    def hit(self, name: str) -> None:
        if name not in self.points:
            return
        with self.lock:
            self.hits[name] += 1
            fault = self.faults.get((name, self.hits[name]))
        if fault is not None:
            fire(fault)


def fire(fault: Fault) -> None:
    # Say so first, on stderr (unbuffered: the line is out before a SIGKILL).
    print(f"fdpd fault point {fault.point} hit {fault.hit}: {fault.action}"
          f"{f' {fault.seconds:g} s' if fault.action == 'sleep' else ''}", file=sys.stderr,
          flush=True)
    if fault.action == "sleep":
        time.sleep(fault.seconds)
        return
    # The point is a moment *after* what precedes it: let the IO threads put on the wire the
    # messages handed to them just before (an AllocRequest, a KV frame) before stopping.
    time.sleep(FLUSH_SECONDS)
    os.kill(os.getpid(), signal.SIGSTOP if fault.action == "stop" else signal.SIGKILL)


def _from_env() -> _Armed | None:
    spec = os.environ.get(ENV, "")
    faults = parse(spec) if spec.strip() else []
    return _Armed(faults) if faults else None


_ARMED = _from_env()


def fault_point(name: str) -> None:
    """Mark a moment a chaos test may break this process at (see the module docstring)."""
    if _ARMED is not None:
        _ARMED.hit(name)


def armed() -> list[Fault]:
    """The faults this process was started with (empty outside chaos tests)."""
    return list(_ARMED.faults.values()) if _ARMED is not None else []
