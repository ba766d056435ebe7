"""`fdpd up`'s supervisor: a local cluster that outlives one of its processes.

Like a compose file's ``restart: unless-stopped``: a child that exits while the cluster is
not stopping is started again with the same command line, so the same name (``decode-0``) and
a new epoch (the router treats it as a new incarnation, see ``fdpd.router.registry``). The
rest of the cluster keeps serving meanwhile; the router resumes the streams the dead one held
(``fdpd.router.resume``).

- Back-off: 1 s before the first restart in the window, then 2, 4, ... up to ``backoff_cap``.
- A child that exits with code 2 (a bad flag or configuration value) is not restarted.
- At most ``max_restarts`` restarts of one child within ``window`` seconds; past that it is
  left stopped and logged (a crash loop that restarting does not fix). When that child is the
  router, nothing can serve: the whole cluster stops with exit code 1.
- Each restart is logged with the exit code (or signal) and passed to the child in
  ``FDPD_RESTART_COUNT``, which the instance reports in ``/v1/cluster`` as ``restarts``.
- Stopping (Ctrl-C, SIGTERM) SIGTERMs every child by pid (instances drain), waits, then
  SIGKILLs what is left; nothing is restarted from then on.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO

log = logging.getLogger(__name__)

BACKOFF_CAP = 30.0
# What `fdpd launch` exits with on a bad flag or config value: restarting cannot fix it.
USAGE_ERROR = 2


@dataclass(frozen=True)
class ChildSpec:
    name: str                  # router | prefill-0 | decode-1 ...
    role: str
    argv: list[str]


@dataclass
class Child:
    spec: ChildSpec
    proc: subprocess.Popen | None = None
    restarts: int = 0                        # since the cluster started
    recent: deque = field(default_factory=deque)     # restart times within the window
    restart_at: float | None = None          # when the pending restart is due
    given_up: bool = False


class Supervisor:
    def __init__(self, specs: Sequence[ChildSpec], *, max_restarts: int = 5,
                 window: float = 60.0, backoff_cap: float = BACKOFF_CAP,
                 log_dir: str | None = None):
        if max_restarts < 0 or window <= 0:
            raise ValueError("max_restarts must be >= 0 and window > 0")
        self.children = [Child(s) for s in specs]
        self.max_restarts = max_restarts
        self.window = window
        self.backoff_cap = backoff_cap
        self.log_dir = log_dir
        self._logs: dict[str, IO[bytes]] = {}

    def start_all(self) -> None:
        for child in self.children:
            self._start(child)

    def run(self, stop: threading.Event, interval: float = 0.2) -> int:
        """Supervise until ``stop`` is set (0) or the router cannot be kept up (1)."""
        while not stop.is_set():
            if not self.tick(time.monotonic()):
                return 1
            stop.wait(interval)
        return 0

    def tick(self, now: float) -> bool:
        """Notice exits, schedule and perform restarts. False when the router was given up."""
        for child in self.children:
            if child.given_up:
                continue
            if child.restart_at is not None:
                if now >= child.restart_at:
                    child.restart_at = None
                    self._start(child)
                continue
            code = child.proc.poll() if child.proc is not None else None
            if code is None:
                continue
            self._exited(child, code, now)
            if child.given_up and child.spec.role == "router":
                log.error("the router cannot be kept running; stopping the cluster")
                return False
        return True

    def _exited(self, child: Child, code: int, now: float) -> None:
        while child.recent and now - child.recent[0] > self.window:
            child.recent.popleft()
        how = f"signal {-code}" if code < 0 else f"code {code}"
        if code == USAGE_ERROR:
            child.given_up = True
            log.error("%s exited with code %d, a usage or configuration error (its log says "
                      "which): not restarted", child.spec.name, code)
            return
        if len(child.recent) >= self.max_restarts:
            child.given_up = True
            log.error("%s exited (%s); restarted %d times in the last %.0f s already "
                      "(--max-restarts %d): leaving it stopped", child.spec.name, how,
                      len(child.recent), self.window, self.max_restarts)
            return
        delay = min(self.backoff_cap, 2.0 ** len(child.recent))
        child.recent.append(now + delay)
        child.restarts += 1
        child.restart_at = now + delay
        log.warning("%s (pid %d) exited unexpectedly (%s); restarting it in %.0f s "
                    "(restart %d; %d of %d in %.0f s)", child.spec.name, child.proc.pid, how,
                    delay, child.restarts, len(child.recent), self.max_restarts, self.window)

    def _start(self, child: Child) -> None:
        env = {**os.environ, "FDPD_RESTART_COUNT": str(child.restarts)}
        out = self._log(child.spec.name)
        child.proc = subprocess.Popen(child.spec.argv, stdout=out, env=env,
                                      stderr=subprocess.STDOUT if out else None)
        if child.restarts:
            log.info("%s restarted (pid %d, restart %d)", child.spec.name, child.proc.pid,
                     child.restarts)

    def _log(self, name: str) -> IO[bytes] | None:
        if not self.log_dir:
            return None
        if name not in self._logs:
            os.makedirs(self.log_dir, exist_ok=True)
            index = next(i for i, c in enumerate(self.children) if c.spec.name == name)
            role = self.children[index].spec.role
            self._logs[name] = open(os.path.join(self.log_dir, f"{index:02d}-{role}.log"), "ab")
        return self._logs[name]

    def stop_all(self, timeout: float = 10.0) -> None:
        """SIGTERM each running child by pid, wait up to ``timeout``, then SIGKILL the rest."""
        for child in self.children:
            child.restart_at = None
            child.given_up = True                    # nothing restarts from here on
        terminate([c.proc for c in self.children if c.proc is not None], timeout)
        for f in self._logs.values():
            f.close()


def terminate(children: Sequence[subprocess.Popen], timeout: float = 10.0) -> None:
    """SIGTERM each child by pid, wait up to ``timeout``, then SIGKILL the rest."""
    for c in children:
        if c.poll() is None:
            try:
                c.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + timeout
    for c in children:
        try:
            c.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            c.kill()
            c.wait()


# ---------------------------------------------------------------------- one process
def supervise_one(argv: Sequence[str], name: str, max_restarts: int, window: float) -> int:
    """Run ``argv`` and restart it when it exits (``scripts/cluster-start``: one supervisor
    per process, in the process's own process group). A signal (SIGTERM, SIGINT) stops the
    restarting only: it is meant for the group (``scripts/cluster-stop`` signals the group),
    so the child got it too and drains on its own; a second one here would stop it at once.
    Exits with the child's last exit code (1 when it was given up on)."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    sup = Supervisor([ChildSpec(name, name.split("-")[0], list(argv))],
                     max_restarts=max_restarts, window=window)
    child = sup.children[0]
    sup.start_all()
    while not stop.is_set():
        sup.tick(time.monotonic())
        if child.given_up:
            return 1
        stop.wait(0.2)
    if child.proc is not None:
        return child.proc.wait()
    return 0


def main(args: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m fdpd.supervisor",
        description="Run one fdpd process and restart it when it exits unexpectedly "
        "(back-off 1, 2, 4 ... s up to 30 s), as scripts/cluster-start does for each.")
    parser.add_argument("--name", required=True, help="the process's name in the logs")
    parser.add_argument("--max-restarts", type=int, default=5,
                        help="restarts within --restart-window before giving up")
    parser.add_argument("--restart-window", type=float, default=60.0)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ...")
    ns = parser.parse_args(args)
    command = ns.command[1:] if ns.command[:1] == ["--"] else ns.command
    if not command or ns.max_restarts < 0 or not ns.restart_window > 0:
        parser.error("give -- COMMAND, --max-restarts >= 0 and --restart-window > 0")
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)-7s {ns.name} "
                        "supervisor: %(message)s")
    return supervise_one(command, ns.name, ns.max_restarts, ns.restart_window)


if __name__ == "__main__":
    raise SystemExit(main())
