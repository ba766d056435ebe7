"""`fdpd up` keeps a local cluster serving through a dead process: a SIGKILLed prefill, then a
SIGKILLed decode, are restarted (same name, new epoch, `restarts` in /v1/cluster) and come
back healthy within 30 s, while requests sent all along keep succeeding token-exactly (the
router resumes the streams the dead decode held). SIGTERM still stops everything, exit 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

import fdpd
from fdpd import LLM, SamplingParams
from fdpd.testing import complete
from fdpd.testing.processes import deadline_loop, two_free_ports

pytestmark = pytest.mark.timeout(240)

ROOT = Path(fdpd.__file__).resolve().parent.parent
PROMPT = [7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73]
MAX_TOKENS = 60
BACK_WITHIN = 60


def child_pid(parent: int, name: str) -> int:
    """The pid of ``fdpd up``'s child named ``name`` (by its --instance-id), from /proc."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and b"--instance-id" in cmdline and \
                cmdline[cmdline.index(b"--instance-id") + 1] == name.encode():
            return int(entry)
    raise LookupError(f"no child {name} of {parent}")




def instances(client: httpx.Client) -> dict[str, dict]:
    try:
        r = client.get("/v1/cluster")
    except httpx.HTTPError:
        return {}
    return {i["instance_id"]: i for i in r.json()["instances"]} if r.status_code == 200 else {}


def test_up_restarts_a_killed_prefill_and_decode_while_serving(tmp_path):
    want = LLM("tiny", num_kv_blocks=256).generate(
        [PROMPT], SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    )[0].outputs[0].token_ids
    port = two_free_ports()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    up = subprocess.Popen(
        [sys.executable, "-m", "fdpd", "up", "--num-prefill", "2", "--num-decode", "2",
         "--port", str(port), "--log-dir", str(tmp_path), "--", "--num-kv-blocks", "512",
         "--heartbeat-interval", "0.2"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    failures: list = []
    served = [0]
    done = threading.Event()

    def traffic() -> None:
        while not done.is_set():
            out = complete(client, "/v1/completions", {
                "model": "tiny", "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0,
                "ignore_eos": True, "return_token_ids": True, "stream": True})
            if not out.ok or out.token_ids != want:
                failures.append((out.status, out.error, len(out.token_ids)))
            served[0] += 1

    try:
        for _ in deadline_loop(90, 0.2):
            view = instances(client)
            if len(view) == 4 and all(i["healthy"] for i in view.values()):
                break
        else:
            raise AssertionError("the cluster did not come up")
        workers = [threading.Thread(target=traffic) for _ in range(3)]
        for w in workers:
            w.start()
        for name in ("prefill-0", "decode-0"):
            epoch = instances(client)[name]["epoch"]
            before = served[0]
            os.kill(child_pid(up.pid, name), signal.SIGKILL)
            killed_at = time.monotonic()
            # 30 s on an idle 2-core machine is ample (a start is ~5 s); the bound is wider
            # because a shared, overloaded one took up to ~35 s to import torch and start.
            for _ in deadline_loop(BACK_WITHIN, 0.2):
                view = instances(client).get(name) or {}
                if view.get("healthy") and view["epoch"] != epoch and view.get("restarts"):
                    break
            else:
                raise AssertionError(f"{name} did not come back within {BACK_WITHIN} s: {view}")
            print(f"{name} back in {time.monotonic() - killed_at:.1f} s, "
                  f"restarts={view['restarts']}")
            assert view["restarts"] == 1, view
            for _ in deadline_loop(30, 0.1):
                if served[0] > before + 3:
                    break
        done.set()
        for w in workers:
            w.join(60)
        assert not failures, failures
        assert served[0] >= 6
        assert up.poll() is None, "fdpd up stopped"
    finally:
        done.set()
        if up.poll() is None:
            up.send_signal(signal.SIGTERM)
        try:
            code = up.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            raise
        log = up.stdout.read().decode(errors="replace")
    assert code == 0, log
    assert "prefill-0" in log and "exited unexpectedly (signal 9)" in log, log
