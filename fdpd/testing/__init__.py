"""Integration testing for fdpd: real router and engine processes on loopback.

- :class:`Cluster` (``fdpd.testing.harness``) starts, inspects, breaks and stops a cluster;
- :func:`complete` (``fdpd.testing.client``) sends one OpenAI request and collects the result;
- the ``cluster_factory`` pytest fixture (``fdpd.testing.pytest_plugin``) makes clusters that
  are checked and stopped after the test.
"""

from __future__ import annotations

from fdpd.testing.client import Completion, complete, iter_sse
from fdpd.testing.harness import Cluster, ClusterError
from fdpd.testing.processes import ClusterProcess, free_port

__all__ = ["Cluster", "ClusterError", "ClusterProcess", "Completion", "complete", "free_port",
           "iter_sse"]
