"""Shared pytest configuration: the integration harness's fixtures (``cluster_factory``) and one
torch thread for engines running inside the test process (2 threads on this 2-core machine,
next to cluster processes, ran the offline engine ~20x slower)."""

import pytest
import zmq

pytest_plugins = ["fdpd.testing.pytest_plugin"]


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def intruder():
    """``intruder(address)``: a plain DEALER connected to ``address``, what a process outside
    the cluster has (closed after the test)."""
    ctx = zmq.Context()
    socks: list[zmq.Socket] = []

    def connect(address: str) -> zmq.Socket:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(address)
        socks.append(sock)
        return sock

    yield connect
    for s in socks:
        s.close(0)
    ctx.term()
