"""Shared pytest configuration: the integration harness's fixtures (``cluster_factory``) and one
torch thread for engines running inside the test process (2 threads on this 2-core machine,
next to cluster processes, ran the offline engine ~20x slower)."""

import pytest
import zmq

pytest_plugins = ["fdpd.testing.pytest_plugin", "tests.skip_policy", "pytester"]


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


@pytest.fixture
def entry_points(monkeypatch):
    """The process entry points ``fdpd launch`` / ``fdpd up`` call, replaced by recorders:
    what each was called with lands in the returned dict under "instance", "router" or
    "cluster"."""
    from fdpd import launch as launcher

    calls: dict[str, dict] = {}

    def run_instance(engine, pd, inst, torch_threads=1, log_tag=None):
        calls["instance"] = {"engine": engine, "pd": pd, "inst": inst,
                             "torch_threads": torch_threads}

    def run_router(model, pd, host, port, control_port, api_key, max_model_len=None,
                   advertise_host=None, served_model_names=()):
        calls["router"] = {"model": model, "pd": pd, "port": port,
                           "control_port": control_port, "api_key": api_key,
                           "served_model_names": served_model_names}

    def run_cluster(**kwargs):
        calls["cluster"] = kwargs
        return 0

    monkeypatch.setattr(launcher, "run_instance", run_instance)
    monkeypatch.setattr(launcher, "run_router", run_router)
    monkeypatch.setattr(launcher, "run_cluster", run_cluster)

    return calls
