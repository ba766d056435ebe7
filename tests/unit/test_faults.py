"""Fault points (``fdpd.faults``): the FDPD_FAULT_POINTS parser, and each action on a child
process started with it (stop: the process is in state T until SIGCONT; kill: it dies by
SIGKILL at exactly that hit; sleep: only the calling thread waits)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import fdpd
from fdpd.faults import ENV, Fault, FaultSpecError, format_spec, parse

ROOT = str(Path(fdpd.__file__).resolve().parent.parent)

# Hits decode.step five times, printing the hit number before each.
CHILD = """
import sys, time
from fdpd.faults import fault_point
for i in range(1, 6):
    print(f"hit {i}", flush=True)
    t0 = time.monotonic()
    fault_point("decode.step")
    print(f"after {i} {time.monotonic() - t0:.3f}", flush=True)
"""


def test_parse_defaults_hits_and_actions():
    assert parse("decode.step=stop") == [Fault("decode.step", 1, "stop")]
    assert parse(" prefill.kv_send@3=kill , kvstore.write@2=sleep:0.25,") == [
        Fault("prefill.kv_send", 3, "kill"), Fault("kvstore.write", 2, "sleep", 0.25)]
    assert parse("") == [] and parse(" , ") == []
    # Two hits of one point may carry different actions.
    faults = parse("decode.step@1=sleep:0,decode.step@4=stop")
    assert [f.hit for f in faults] == [1, 4]
    assert format_spec(faults) == "decode.step@1=sleep:0,decode.step@4=stop"
    assert parse(format_spec(faults)) == faults


@pytest.mark.parametrize("spec, message", [
    ("decode.stpe=stop", "unknown fault point 'decode.stpe'"),
    ("decode.step@0=stop", "hit number must be >= 1"),
    ("decode.step@x=stop", "cannot parse 'decode.step@x=stop'"),
    ("decode.step", "cannot parse"),
    ("decode.step=pause", "unknown action 'pause'"),
    ("decode.step=sleep", "sleep needs a duration"),
    ("decode.step=sleep:-1", "sleep needs a duration"),
    ("decode.step=sleep:soon", "sleep needs a duration"),
    ("decode.step=sleep:inf", "sleep needs a duration"),
    ("decode.step=kill:now", "takes no argument"),
    ("decode.step@2=stop,decode.step@2=kill", "decode.step@2 is given twice"),
])
def test_parse_errors_name_the_entry(spec, message):
    with pytest.raises(FaultSpecError, match=ENV) as info:
        parse(spec)
    assert message in str(info.value)


def child(spec: str | None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": ROOT, "PYTHONUNBUFFERED": "1"}
    env.pop(ENV, None)
    if spec is not None:
        env[ENV] = spec
    return subprocess.Popen([sys.executable, "-c", CHILD], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]


def finish(proc: subprocess.Popen) -> tuple[int, list[str], str]:
    try:
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    return proc.returncode, out.splitlines(), err


@pytest.mark.timeout(60)
def test_unarmed_points_do_nothing():
    code, lines, _ = finish(child(None))
    assert code == 0 and [ln.split()[:2] for ln in lines[1::2]] == [
        ["after", str(i)] for i in range(1, 6)]


@pytest.mark.timeout(60)
def test_stop_holds_the_process_at_the_nth_hit_until_sigcont():
    proc = child("decode.step@3=stop")
    try:
        deadline = time.monotonic() + 20
        while state(proc.pid) != "T":
            assert proc.poll() is None and time.monotonic() < deadline, "never stopped"
            time.sleep(0.01)
        time.sleep(0.2)                                  # it stays stopped
        assert state(proc.pid) == "T"
        os.kill(proc.pid, signal.SIGCONT)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    code, lines, err = finish(proc)
    assert code == 0, err
    assert [ln.split()[:2] for ln in lines] == [
        w.split() for i in range(1, 6) for w in (f"hit {i}", f"after {i}")]
    assert "fdpd fault point decode.step hit 3: stop" in err


@pytest.mark.timeout(60)
def test_kill_dies_at_the_nth_hit():
    code, lines, err = finish(child("decode.step@2=kill"))
    assert code == -signal.SIGKILL
    assert lines[0] == "hit 1" and lines[1].startswith("after 1") and lines[2:] == ["hit 2"]
    assert "fdpd fault point decode.step hit 2: kill" in err


@pytest.mark.timeout(60)
def test_sleep_delays_only_the_nth_hit():
    code, lines, err = finish(child("decode.step@2=sleep:0.5"))
    assert code == 0, err
    waited = {int(ln.split()[1]): float(ln.split()[2]) for ln in lines if ln.startswith("after")}
    assert sorted(waited) == [1, 2, 3, 4, 5]
    assert waited[2] >= 0.5
    assert all(waited[i] < 0.5 for i in (1, 3, 4, 5)), waited


@pytest.mark.timeout(60)
def test_a_bad_spec_stops_the_process_at_import():
    env = {**os.environ, "PYTHONPATH": ROOT, ENV: "decode.step=explode"}
    out = subprocess.run([sys.executable, "-c", "import fdpd.faults"], env=env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "unknown action 'explode'" in out.stderr
