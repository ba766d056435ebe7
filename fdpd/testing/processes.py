"""One cluster process as the harness sees it: spawned in its own process group, logging to its
own file, signalled and reaped by pid/pgid only (never by name).

Each process is a session leader (``start_new_session=True``), so its pgid is its pid and one
``killpg`` reaches anything it may have spawned. A process is started again (``restart``) with
the same command line; its log file is appended to, with a header line per incarnation.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

READY = re.compile(r"^fdpd (?P<role>\w+) ready (?P<rest>.*)$", re.MULTILINE)


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (bind to 0, read it, close). Callers that race other
    programs for it retry on a bind failure."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def two_free_ports(host: str = "127.0.0.1") -> int:
    """A port P with P+1 free too (a router's HTTP and control ports)."""
    for _ in range(50):
        port = free_port(host)
        with socket.socket() as s:
            try:
                s.bind((host, port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two consecutive free ports")


@dataclass
class ClusterProcess:
    """A router or engine instance process. ``name`` is also the instance id it registers
    with, so a restarted instance replaces its old entry (same id, larger epoch)."""

    name: str
    role: str
    command: list[str]
    log_path: Path
    env: Mapping[str, str]
    proc: subprocess.Popen | None = None
    incarnation: int = 0
    paused: bool = False
    exit_codes: list[int | None] = field(default_factory=list)
    _log_offset: int = 0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self.alive:
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        self.incarnation += 1
        self.paused = False
        with open(self.log_path, "ab") as log:
            log.write(f"=== {self.name} start #{self.incarnation}: {' '.join(self.command)}\n"
                      .encode())
            self._log_offset = log.tell()
            self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env=dict(self.env),
                                         start_new_session=True)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ready_line(self) -> dict[str, str] | None:
        """The ``fdpd <role> ready k=v ...`` line of the current incarnation, parsed."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self._log_offset)
                text = log.read().decode(errors="replace")
        except FileNotFoundError:
            return None
        m = READY.search(text)
        if m is None:
            return None
        fields = dict(kv.split("=", 1) for kv in m.group("rest").split() if "=" in kv)
        return {"role": m.group("role"), **fields}

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the process group. A group that is gone already is fine."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        if sig == signal.SIGSTOP:
            self.paused = True
        elif sig == signal.SIGCONT:
            self.paused = False

    def wait(self, timeout: float) -> int | None:
        if self.proc is None:
            return None
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        return code

    def terminate(self) -> None:
        """SIGTERM the group once (a second SIGTERM could land after Python restored the default
        handler at interpreter exit and turn a clean exit into death by signal)."""
        if self.alive:
            self.signal(signal.SIGTERM)
            self.signal(signal.SIGCONT)          # a stopped process cannot act on SIGTERM

    def stop(self, timeout: float, terminate: bool = True) -> tuple[int | None, bool]:
        """SIGTERM the group (unless ``terminate`` is False: already done), wait, then SIGABRT
        and SIGKILL. Returns the exit code and whether it had to be killed."""
        if self.proc is None:
            return None, False
        killed = False
        if self.proc.poll() is None:
            if terminate:
                self.terminate()
            if self.wait(timeout) is None:
                # SIGABRT first: with PYTHONFAULTHANDLER set (child_env does) Python writes
                # every thread's stack to the log, which shows where shutdown hung.
                killed = True
                self.signal(signal.SIGABRT)
                if self.wait(3) is None:
                    self.signal(signal.SIGKILL)
                self.proc.wait(10)
        else:
            self.signal(signal.SIGKILL)          # the leader is gone; sweep its group
        code = self.proc.returncode
        self.exit_codes.append(code)
        return code, killed

    @property
    def stopped(self) -> bool:
        """Stopped by a signal right now (state ``T`` in /proc/PID/stat): SIGSTOP from a test,
        or a fault point's ``stop`` action (``fdpd.faults``), which ``paused`` does not see."""
        if not self.alive:
            return False
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except OSError:
            return False
        return stat.rpartition(")")[2].split()[0] == "T"

    def group_gone(self) -> bool:
        if self.proc is None:
            return True
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(0, os.SEEK_END)
                size = log.tell()
                log.seek(max(0, size - 200 * lines))
                text = log.read().decode(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


def deadline_loop(timeout: float, interval: float = 0.05):
    """Yield until ``timeout`` seconds passed, sleeping ``interval`` between iterations."""
    end = time.monotonic() + timeout
    while True:
        yield
        if time.monotonic() >= end:
            return
        time.sleep(interval)


def child_env(extra: Mapping[str, str] | None, package_root: str) -> dict[str, str]:
    """The environment of cluster processes: one torch thread each, unbuffered output, and this
    checkout of fdpd first on the path (so children run the code under test)."""
    env = dict(os.environ)
    env.update({"FDPD_TORCH_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"})
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    env.update(extra or {})
    return env
