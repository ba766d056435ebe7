"""A deployment's services (compose services, Kubernetes pods) run as local processes, so the
tests run the very commands a deployment file gives: one :class:`ClusterProcess` per service,
stopped by pid, with the deployment's ports mapped to free loopback ports by the subclass."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from fdpd.testing.processes import ClusterProcess, deadline_loop


def local_argv(words: list[str], local_port: Callable[[int], int]) -> list[str]:
    """A container's command as a local one: ``fdpd`` is this interpreter's package, a
    ``--port``/``-p`` value (redis-server's, redis-cli's) the mapped port, and a redis-server
    listens on loopback only."""
    words = list(words)
    for i, w in enumerate(words[:-1]):
        if w in ("--port", "-p"):
            words[i + 1] = str(local_port(int(words[i + 1])))
    if words[0] == "fdpd":
        return [sys.executable, "-m", "fdpd", *words[1:]]
    if words[0] == "redis-server":
        return [*words, "--bind", "127.0.0.1"]
    return words


class LocalServices:
    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.procs: dict[str, ClusterProcess] = {}

    def launch(self, name: str, argv: list[str], env: Mapping[str, str]) -> ClusterProcess:
        """Start ``name`` (again, with the same command, if it ran before)."""
        proc = self.procs.get(name)
        if proc is None:
            proc = ClusterProcess(name, name, argv, self.log_dir / f"{name}.log", dict(env))
            self.procs[name] = proc
        proc.start()
        return proc

    def wait_until(self, name: str, check: Callable[[], bool], timeout: float,
                   what: str) -> None:
        """Poll ``check`` until true while ``name`` stays alive; fail with the logs."""
        for _ in deadline_loop(timeout, 0.2):
            assert self.procs[name].alive, f"{name} exited:\n{self.logs()}"
            if check():
                return
        raise AssertionError(f"{name}: {what} failing after {timeout} s:\n{self.logs()}")

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.terminate()
        for proc in self.procs.values():
            proc.stop(10, terminate=False)

    def logs(self) -> str:
        return "\n".join(f"----- {n} -----\n{p.log_tail(30)}" for n, p in self.procs.items())
