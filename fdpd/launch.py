"""Process entry points: one engine instance, the router, and a whole local cluster (``up``).

Every process ends cleanly on SIGTERM/SIGINT. An engine instance drains on SIGTERM (no new
work; running requests move to other instances, see ``InstanceService.start_drain``; at most
``--drain-timeout`` seconds) and stops at once on SIGINT or a second SIGTERM; the router stops
uvicorn; ``up`` supervises its children (``fdpd.supervisor``: restarts one that exits) and on a
signal terminates them by pid, waits, then kills what is left.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import sys
import threading
from collections.abc import Sequence

from fdpd.config import EngineConfig, InstanceConfig, PDConfig

log = logging.getLogger(__name__)


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handler(signum, frame):
        log.info("signal %d: shutting down", signum)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


def _drain_on_sigterm() -> tuple[threading.Event, threading.Event]:
    """Engine instances: the first SIGTERM starts a graceful drain (``drain``); a second
    SIGTERM, or SIGINT, stops at once (``stop``)."""
    stop, drain = threading.Event(), threading.Event()

    def handler(signum, frame):
        if signum == signal.SIGTERM and not drain.is_set():
            log.info("SIGTERM: draining (send it again to stop at once)")
            drain.set()
        else:
            log.info("signal %d: shutting down", signum)
            stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop, drain


def _arm_fault_points() -> None:
    """Parse FDPD_FAULT_POINTS (chaos tests, ``fdpd.faults``) before anything runs: a bad
    value stops the start with its message, not a traceback from a later import."""
    try:
        import fdpd.faults  # noqa: F401
    except ValueError as e:
        raise SystemExit(f"fdpd: {e}") from None


def run_instance(engine_config: EngineConfig, pd: PDConfig, inst: InstanceConfig,
                 torch_threads: int = 1, log_tag=None) -> None:
    _arm_fault_points()
    import torch

    from fdpd.engine.engine import Engine
    from fdpd.pd.decode import DecodeService
    from fdpd.pd.mixed import MixedService
    from fdpd.pd.prefill import PrefillService

    torch.set_num_threads(torch_threads)
    services = {"prefill": PrefillService, "decode": DecodeService, "mixed": MixedService}
    stop, drain = _drain_on_sigterm()
    policy = engine_config.resolved_policy(inst.role)
    log.info("queue order: %s", policy)
    engine = Engine(dataclasses.replace(engine_config, scheduling_policy=policy))
    service = services[inst.role](engine, pd, inst)
    if log_tag is not None:
        log_tag.tag = service.instance_id
    # The readiness line the harness and operators wait for.
    metrics = f" metrics={service.metrics_url}" if service.metrics_url else ""
    print(f"fdpd {inst.role} ready instance={service.instance_id} address={service.address}"
          f"{metrics}", flush=True)
    service.serve(stop, drain)


def run_router(model: str | None, pd: PDConfig, host: str, port: int,
               control_port: int | None, api_key: str | None, max_model_len: int | None = None,
               advertise_host: str | None = None,
               served_model_names: Sequence[str] = ()) -> None:
    """``model`` None: serve the model of the first instance that registers
    (``fdpd.router.cluster_model``)."""
    import asyncio

    import uvicorn

    from fdpd.router.app import create_app
    from fdpd.router.cluster_model import load_frontend_model
    from fdpd.router.core import RouterCore

    control = f"tcp://{host}:{control_port if control_port is not None else port + 1}"
    if model is None:
        core = RouterCore(model_name=None, tokenizer=None, chat_template=None,
                          max_model_len=max_model_len, pd=pd, control_address=control,
                          advertise_host=advertise_host)
    else:
        front = load_frontend_model(model, max_model_len)
        core = RouterCore(model_name=front.name, tokenizer=front.tokenizer,
                          chat_template=front.chat_template, max_model_len=front.max_model_len,
                          pd=pd, control_address=control, advertise_host=advertise_host,
                          model_config=front.config)
    app = create_app(core, api_key=api_key, served_model_names=served_model_names)
    # uvicorn re-raises the signal that stopped it once it has shut down; with the default
    # handler that kills the process before ``core.stop()`` runs (exit -15, not 0).
    _stop_on_signals()

    async def main() -> None:
        await core.start()
        # log_config=None: uvicorn's records go through our handler (tag, text/json).
        config = uvicorn.Config(app, host=host, port=port, log_level="warning",
                                lifespan="off", timeout_graceful_shutdown=2, log_config=None)
        server = uvicorn.Server(config)
        print(f"fdpd router ready http=http://{host}:{port} control={core.control_address}",
              flush=True)
        try:
            await server.serve()
        finally:
            await core.stop()

    try:
        import uvloop               # the C event loop: cheaper tasks and callbacks per request
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())


# ---------------------------------------------------------------------- fdpd up
def launch_command(role: str, args: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "fdpd", "launch", "--role", role, *args]


def run_cluster(*, num_prefill: int, num_decode: int, num_mixed: int, port: int, host: str,
                common: Sequence[str], prefill_args: Sequence[str] = (),
                decode_args: Sequence[str] = (), log_dir: str | None = None,
                max_restarts: int = 5, restart_window: float = 60.0) -> int:
    """Start router + instances as child processes and supervise them until a signal
    (``fdpd.supervisor``: a child that exits is restarted with back-off, up to
    ``max_restarts`` times in ``restart_window`` seconds). Instances are named
    ``<role>-<i>`` (their log lines start with it) and listen on free ports (inbox and
    metrics: each one's ready line and /v1/cluster show them)."""
    from fdpd.supervisor import ChildSpec, Supervisor

    control = port + 1
    router_addr = f"{host}:{control}"

    def instance(role: str, i: int, extra: Sequence[str]) -> ChildSpec:
        return ChildSpec(f"{role}-{i}", role, launch_command(role, [
            "--host", host, "--port", "0", "--metrics-port", "0", "--router", router_addr,
            "--instance-id", f"{role}-{i}", *common, *extra]))

    specs = [ChildSpec("router", "router", launch_command("router", [
        "--host", host, "--port", str(port), "--control-port", str(control),
        "--instance-id", "router", *common]))]
    specs += [instance("prefill", i, prefill_args) for i in range(num_prefill)]
    specs += [instance("decode", i, decode_args) for i in range(num_decode)]
    specs += [instance("mixed", i, ()) for i in range(num_mixed)]
    stop = _stop_on_signals()
    supervisor = Supervisor(specs, max_restarts=max_restarts, window=restart_window,
                            log_dir=log_dir)
    try:
        supervisor.start_all()
        print(f"fdpd cluster: router + {num_prefill} prefill + {num_decode} decode + "
              f"{num_mixed} mixed; OpenAI API at http://{host}:{port}/v1 "
              f"(Ctrl-C to stop)", flush=True)
        return supervisor.run(stop)
    finally:
        supervisor.stop_all()
