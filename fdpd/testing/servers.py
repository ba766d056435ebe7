"""Third-party servers the tests and benchmarks start for themselves (Redis), on loopback, in
their own process group, stopped by pid."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time


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


def start_redis(port: int) -> subprocess.Popen:
    """A throwaway redis-server on 127.0.0.1:``port`` (no persistence)."""
    proc = subprocess.Popen(
        ["redis-server", "--save", "", "--appendonly", "no", "--port", str(port),
         "--bind", "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    try:
        wait_port(port, proc, 10)
    except RuntimeError:
        stop_server(proc)
        raise
    return proc
