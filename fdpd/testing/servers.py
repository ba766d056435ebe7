"""Third-party servers the tests and benchmarks start for themselves (Redis, a Redis Cluster),
on loopback, in their own process group, stopped by pid."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from fdpd.testing.processes import free_port


def wait_port(port: int, proc: subprocess.Popen, deadline_s: float) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"server did not listen on {port} within {deadline_s} s")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)   # own session: pgid == pid
    proc.wait(timeout=10)


def start_redis(port: int, *options: str) -> subprocess.Popen:
    """A throwaway redis-server on 127.0.0.1:``port`` (no persistence), listening when this
    returns; ``options`` are more redis-server flags."""
    proc = subprocess.Popen(
        ["redis-server", "--save", "", "--appendonly", "no", "--port", str(port),
         "--bind", "127.0.0.1", *options], stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_port(port, proc, 10)
    except RuntimeError:
        stop_server(proc)
        raise
    return proc


def _redis_cli(port: int, *args: str, timeout: float = 30) -> str:
    out = subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args],
                         capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"redis-cli {' '.join(args)} failed: {out.stdout}{out.stderr}")
    return out.stdout


@dataclass
class LocalRedisCluster:
    """A throwaway Redis Cluster of ``masters`` primaries (no replicas) on loopback.

    Every node runs with ``cluster-require-full-coverage no`` (a dead shard leaves the others
    serving, as fdpd's store expects of a production cluster) and a short node timeout, and its
    cluster bus on a port of its own (the default, port + 10000, may not exist).
    """

    directory: Path
    masters: int = 3
    ports: list[int] = field(default_factory=list)
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def url(self) -> str:
        return "redis-cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def start(self) -> LocalRedisCluster:
        self.directory.mkdir(parents=True, exist_ok=True)
        try:
            for i in range(self.masters):
                port, bus = free_port(), free_port()
                self.ports.append(port)
                self.procs.append(self._start_node(i, port, bus))
            _redis_cli(self.ports[0], "--cluster", "create",
                       *(f"127.0.0.1:{p}" for p in self.ports),
                       "--cluster-replicas", "0", "--cluster-yes")
            self.wait_state_ok(30)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_node(self, i: int, port: int, bus: int) -> subprocess.Popen:
        node_dir = self.directory / f"node{i}"
        node_dir.mkdir(exist_ok=True)
        return start_redis(port, "--dir", str(node_dir), "--cluster-enabled", "yes",
                           "--cluster-port", str(bus), "--cluster-config-file", "nodes.conf",
                           "--cluster-node-timeout", "2000",
                           "--cluster-require-full-coverage", "no")

    def wait_state_ok(self, deadline_s: float) -> None:
        """Every live node reports ``cluster_state:ok`` (slots assigned, gossip settled)."""
        deadline = time.monotonic() + deadline_s
        live = [p for p, proc in zip(self.ports, self.procs) if proc.poll() is None]
        while True:
            states = [_redis_cli(p, "cluster", "info") for p in live]
            if all("cluster_state:ok" in s for s in states):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"Redis Cluster not ok within {deadline_s} s: {states}")
            time.sleep(0.1)

    def kill_shard(self, i: int) -> None:
        """SIGKILL primary ``i`` (its slots have no replica: their keys are gone)."""
        stop_server(self.procs[i])

    def stop(self) -> None:
        for proc in self.procs:
            stop_server(proc)
