"""The integration harness itself: it cleans up after a failing body, and a cluster that cannot
start fails fast with the failing process's log in the message."""

from __future__ import annotations

import pytest

from fdpd.testing import Cluster, ClusterError


@pytest.mark.timeout(60)
def test_processes_are_stopped_when_the_body_raises(tmp_path):
    with pytest.raises(RuntimeError, match="boom"), \
            Cluster(0, 0, 1, common_args=["--num-kv-blocks", "64"], log_dir=tmp_path) as c:
        procs = [c.router, *c.processes]
        assert all(p.alive for p in procs)
        c.pause(c.instances("mixed")[0])          # a stopped process must be stopped too
        raise RuntimeError("boom")
    assert all(not p.alive and p.group_gone() for p in procs), c.stop_report
    assert all(not killed for _, killed in c.stop_report.values()), c.stop_report


@pytest.mark.timeout(60)
def test_a_cluster_that_cannot_start_fails_fast_with_the_log(tmp_path):
    with pytest.raises(ClusterError) as info:
        Cluster(0, 0, 1, mixed_args=["--block-size", "3"], log_dir=tmp_path,
                startup_timeout=30).start()
    message = str(info.value)
    assert "mixed-0" in message and "exited" in message
    assert "block" in message                         # the instance's own error, from its log
