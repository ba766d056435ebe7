"""pytest fixture ``cluster_factory``: make clusters that are stopped after the test.

Enable with ``pytest_plugins = ["fdpd.testing.pytest_plugin"]`` in a top-level conftest.py.
``cluster_factory(**kwargs)`` takes :class:`fdpd.testing.Cluster`'s arguments and returns a
started cluster logging under the test's ``tmp_path``. At teardown every cluster is checked for
quiescence (unless the test already failed, so the first error stays the one reported) and
stopped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fdpd.testing.harness import Cluster, ClusterError

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
