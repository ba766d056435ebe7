"""The supervisor of `fdpd up` and scripts/cluster-start (``fdpd.supervisor``) on real child
processes: restarts with back-off and the restart count in the child's environment, the
--max-restarts bound, no restart of a configuration error, the router's loss stopping all."""

from __future__ import annotations

import sys
import time

from fdpd.supervisor import ChildSpec, Supervisor


def child(code: int, out=None) -> list[str]:
    """A process that records FDPD_RESTART_COUNT (if ``out``) and exits with ``code``."""
    record = (f"open({str(out)!r}, 'a').write(os.environ['FDPD_RESTART_COUNT'] + ' ');"
              if out else "")
    return [sys.executable, "-c", f"import os, sys; {record} sys.exit({code})"]


def run_until(sup: Supervisor, done, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not sup.tick(time.monotonic()):
            return False
        if done():
            return True
        time.sleep(0.02)
    raise AssertionError("timed out")


def test_a_crashing_child_is_restarted_with_backoff_then_given_up(tmp_path, caplog):
    out = tmp_path / "counts"
    sup = Supervisor([ChildSpec("decode-0", "decode", child(1, out))], max_restarts=3,
                     window=60, backoff_cap=0.05)
    sup.start_all()
    decode = sup.children[0]
    assert run_until(sup, lambda: decode.given_up)
    assert decode.restarts == 3
    assert out.read_text().split() == ["0", "1", "2", "3"]       # each start knew its count
    assert "decode-0" in caplog.text and "exited unexpectedly (code 1)" in caplog.text
    assert "leaving it stopped" in caplog.text
    sup.stop_all()


def test_backoff_doubles_up_to_the_cap():
    sup = Supervisor([ChildSpec("prefill-0", "prefill", child(1))], max_restarts=10,
                     window=600, backoff_cap=4.0)
    sup.start_all()
    p = sup.children[0]
    p.proc.wait()
    delays = []
    for _ in range(5):
        now = time.monotonic()
        sup.tick(now)                      # notices the exit, schedules the restart
        delays.append(round(p.restart_at - now, 3))
        sup.tick(p.restart_at)             # restarts it
        p.proc.wait()
    assert delays == [1.0, 2.0, 4.0, 4.0, 4.0]
    sup.stop_all()


def test_a_configuration_error_is_not_restarted(caplog):
    sup = Supervisor([ChildSpec("decode-0", "decode", child(2))], backoff_cap=0.05)
    sup.start_all()
    assert run_until(sup, lambda: sup.children[0].given_up)
    assert sup.children[0].restarts == 0
    assert "configuration error" in caplog.text
    sup.stop_all()


def test_the_cluster_stops_when_the_router_cannot_be_kept_up():
    sup = Supervisor([ChildSpec("router", "router", child(1)),
                      ChildSpec("decode-0", "decode", [sys.executable, "-c",
                                                       "import time; time.sleep(60)"])],
                     max_restarts=1, window=60, backoff_cap=0.05)
    sup.start_all()
    assert run_until(sup, lambda: False) is False
    decode = sup.children[1].proc
    assert decode.poll() is None                  # the rest kept running until then
    sup.stop_all(timeout=5)
    assert decode.poll() is not None
