"""pytest fixtures ``cluster_factory`` (clusters that are stopped after the test),
``redis_url`` (a real Redis server for a test module) and ``redis_cluster`` (a real 3-master
Redis Cluster for a test module).

Enable with ``pytest_plugins = ["fdpd.testing.pytest_plugin"]`` in a top-level conftest.py.
``cluster_factory(**kwargs)`` takes :class:`fdpd.testing.Cluster`'s arguments and returns a
started cluster logging under the test's ``tmp_path``. At teardown every cluster is checked for
quiescence (unless the test already failed, so the first error stays the one reported) and
stopped. ``redis_url`` starts ``redis-server`` on a free loopback port for the module (skips the
module's tests when the binary is missing) and stops it by pid afterwards; ``redis_cluster``
does the same for a :class:`~fdpd.testing.servers.LocalRedisCluster` (its ``url`` is a
``redis-cluster://`` store URL; ``kill_shard(i)`` takes a primary down).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fdpd.testing.harness import Cluster, ClusterError
from fdpd.testing.processes import free_port
from fdpd.testing.servers import LocalRedisCluster, start_redis, stop_server

_REPORTS = pytest.StashKey[dict]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    item.stash.setdefault(_REPORTS, {})[report.when] = report
    return report


def _failed(item: pytest.Item) -> bool:
    reports = item.stash.get(_REPORTS, {})
    return any(r.failed for r in reports.values())


@pytest.fixture
def cluster_factory(request: pytest.FixtureRequest, tmp_path: Path
                    ) -> Iterator[Callable[..., Cluster]]:
    made: list[Cluster] = []

    def make(**kwargs) -> Cluster:
        kwargs.setdefault("log_dir", tmp_path / f"cluster{len(made)}")
        cluster = Cluster(**kwargs)
        made.append(cluster)
        return cluster.start()

    yield make
    check = not _failed(request.node)
    errors: list[ClusterError] = []
    for cluster in reversed(made):
        try:
            cluster.close(check=check)
        except ClusterError as e:
            errors.append(e)
    if errors:
        raise errors[0]


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server binary not found (apt-get install -y redis-server)")
    port = free_port()
    proc = start_redis(port)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop_server(proc)


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedisCluster]:
    for binary in ("redis-server", "redis-cli"):
        if shutil.which(binary) is None:
            pytest.skip(f"{binary} binary not found (apt-get install -y redis-server)")
    cluster = LocalRedisCluster(tmp_path_factory.mktemp("redis-cluster")).start()
    try:
        yield cluster
    finally:
        cluster.stop()
