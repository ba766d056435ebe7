"""The operator scripts: cluster-start / cluster-logs / replay-trace / cluster-stop on a real
local cluster, driven as a person would from a shell."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

import fdpd
from fdpd.testing.processes import two_free_ports

pytestmark = pytest.mark.timeout(240)

ROOT = Path(fdpd.__file__).resolve().parent.parent
SCRIPTS = ("cluster-start", "cluster-stop", "cluster-logs", "replay-trace", "fuzz", "chaos")


def run(script: str, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / "scripts" / script), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def child_of(parent: int) -> int:
    """The one child process of ``parent`` (from /proc)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                return int(entry)
    raise LookupError(f"no child of {parent}")




@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    out = run(script, "--help")
    assert out.returncode == 0 and out.stdout.startswith(f"Usage: scripts/{script}"), out


def test_start_logs_replay_stop(tmp_path):
    run_dir = tmp_path / "run"
    port = two_free_ports()
    try:
        started = run("cluster-start", "--port", str(port), "--run-dir", str(run_dir),
                      "-p", "1", "-d", "2", "--", "--num-kv-blocks", "256")
        assert started.returncode == 0, started.stdout + started.stderr
        assert f"http://127.0.0.1:{port}/v1" in started.stdout
        names = {"router", "prefill-0", "decode-0", "decode-1"}
        assert {p.stem for p in run_dir.glob("*.pid")} == names
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=30,
                       json={"prompt": "hi", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200, r.text

        logs = run("cluster-logs", "--run-dir", str(run_dir), "-n", "50")
        assert logs.returncode == 0
        for name in names - {"router"}:
            assert f"ready instance={name} " in logs.stdout, logs.stdout
        one = run("cluster-logs", "--run-dir", str(run_dir), "router")
        assert "fdpd router ready" in one.stdout or "router.log" in one.stdout

        trace = tmp_path / "trace.csv"
        trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                         "2023-11-16 18:15:46.6805900,74,10\n"
                         "2023-11-16 18:15:46.7951690,96,12\n"
                         "2023-11-16 18:15:46.8,50,8\n")
        replay = run("replay-trace", "--url", f"http://127.0.0.1:{port}", "-n", "3",
                     "--speedup", "2", str(trace), "--", "--warmup", "0")
        assert replay.returncode == 0, replay.stdout + replay.stderr
        assert re.search(r"completed / failed +\| +3 / 0 \|", replay.stdout), replay.stdout
        assert "where the time went" in replay.stdout and "kv_transfer" in replay.stdout

        # Each process runs under a supervisor: a SIGKILLed decode comes back (new epoch).
        cluster = f"http://127.0.0.1:{port}/v1/cluster"

        def decode0() -> dict:
            views = httpx.get(cluster, timeout=10).json()["instances"]
            return next(v for v in views if v["instance_id"] == "decode-0")

        epoch = decode0()["epoch"]
        supervisor = int((run_dir / "decode-0.pid").read_text())
        os.kill(child_of(supervisor), signal.SIGKILL)
        deadline = time.monotonic() + 90
        while not ((v := decode0())["healthy"] and v["epoch"] != epoch and "restarts" in v):
            assert time.monotonic() < deadline, v
            time.sleep(0.3)
        assert v["restarts"] == 1, v
        assert "exited unexpectedly (signal 9)" in (run_dir / "decode-0.log").read_text()

        pids = {p.stem: int(p.read_text()) for p in run_dir.glob("*.pid")}
        stopped = run("cluster-stop", "--run-dir", str(run_dir))
        assert stopped.returncode == 0, stopped.stderr
        assert all(f"{name}: stopped" in stopped.stdout for name in names), stopped.stdout
        assert not list(run_dir.glob("*.pid"))
        for pid in pids.values():
            with pytest.raises(ProcessLookupError):
                os.killpg(pid, 0)
        again = run("cluster-stop", "--run-dir", str(run_dir))
        assert again.returncode == 0 and "no pid files" in again.stdout
    finally:
        for pidfile in run_dir.glob("*.pid"):      # only what this test started
            try:
                os.killpg(int(pidfile.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
