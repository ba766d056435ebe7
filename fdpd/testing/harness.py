"""The integration harness: a real router and real engine processes on loopback.

::

    with Cluster(num_prefill=1, num_decode=1) as cluster:
        r = cluster.client().post("/v1/completions", json={...})
        cluster.kill(cluster.instances("decode")[0])
        cluster.wait_for(lambda: ..., timeout=5, what="the decode marked dead")

Every process is started with ``python -m fdpd launch --role ...`` (the operator's command) on
127.0.0.1 with free ports, one torch thread, its own process group and its own log file.
``start`` returns when the router answers ``/health`` and ``/v1/cluster`` lists every instance
healthy with a load report. On exit the harness (optionally) waits until every live instance
is idle and every decode's ledger is back to zero, then SIGTERMs every process group, SIGKILLs
what does not exit, and checks each is gone. Every failure it raises carries the tail of every
process's log.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import httpx

import fdpd
from fdpd.launch import launch_command
from fdpd.testing.processes import ClusterProcess, child_env, deadline_loop, free_port

T = TypeVar("T")
HOST = "127.0.0.1"
_LIVE: set[Cluster] = set()


class ClusterError(AssertionError):
    """A cluster did not start, did not reach a state in time, or failed a check at exit. The
    message ends with the log tails of every process."""


class Cluster:
    def __init__(self, num_prefill: int = 1, num_decode: int = 1, num_mixed: int = 0, *,
                 model: str = "tiny", common_args: Sequence[str] = (),
                 prefill_args: Sequence[str] = (), decode_args: Sequence[str] = (),
                 mixed_args: Sequence[str] = (), router_args: Sequence[str] = (),
                 instance_args: Mapping[str, Sequence[str]] | None = None,
                 log_dir: str | os.PathLike | None = None, heartbeat_interval: float = 0.2,
                 env: Mapping[str, str] | None = None, startup_timeout: float = 60.0,
                 check_quiescent: bool = True, quiescent_timeout: float = 15.0,
                 stop_timeout: float = 10.0, router_has_model: bool = True):
        self.model = model
        # False: the router gets no --model and takes the model of the first instance.
        self.router_has_model = router_has_model
        self.heartbeat_interval = heartbeat_interval
        self.check_quiescent = check_quiescent
        self.startup_timeout = startup_timeout
        self.quiescent_timeout = quiescent_timeout
        self.stop_timeout = stop_timeout
        self._own_log_dir = log_dir is None
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="fdpd-cluster-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        package_root = str(Path(fdpd.__file__).resolve().parent.parent)
        self._env = child_env(env, package_root)
        self._common = [str(a) for a in common_args]
        self._router_args = [str(a) for a in router_args]
        self._role_args = {"prefill": [str(a) for a in prefill_args],
                           "decode": [str(a) for a in decode_args],
                           "mixed": [str(a) for a in mixed_args]}
        # Per instance name ("decode-1": [...]), after the role's arguments.
        self._instance_args = {k: [str(a) for a in v] for k, v in (instance_args or {}).items()}
        self._counts = {"prefill": num_prefill, "decode": num_decode, "mixed": num_mixed}
        self.router: ClusterProcess | None = None
        self.processes: list[ClusterProcess] = []      # instances, in start order
        self.http_port = self.control_port = 0
        self._http: httpx.Client | None = None
        self._clients: list[httpx.Client] = []
        self.stop_report: dict[str, tuple[int | None, bool]] = {}

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> Cluster:
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(check=exc_type is None)

    def start(self) -> Cluster:
        _LIVE.add(self)
        try:
            for attempt in range(3):
                self._start_router()
                if self._wait_router_up():
                    break
                if attempt == 2:
                    raise self.error("the router did not start (ports taken three times?)")
            for role in ("prefill", "decode", "mixed"):
                for i in range(self._counts[role]):
                    proc = self._process(role, f"{role}-{i}")
                    self.processes.append(proc)
                    proc.start()
            self.wait_for(self._all_registered, self.startup_timeout,
                          what="every instance registered and healthy", check_alive=True)
            self.wait_for(lambda: self._http_ok("/health"), 10, what="/health 200",
                          check_alive=True)
        except BaseException:
            self._stop_all()
            raise
        return self

    def close(self, check: bool = True) -> None:
        """Check quiescence (when ``check`` and ``check_quiescent``), then stop everything.
        Stops the processes even when the check fails; raises ClusterError after. A second
        call does nothing."""
        if getattr(self, "_closed", False):
            return
        self._closed = True
        failure: str | None = None
        try:
            if check and self.check_quiescent:
                try:
                    self.assert_quiescent()
                except ClusterError as e:
                    failure = str(e)
        finally:
            logs = self.logs()
            stop_problems = self._stop_all()
        if stop_problems and check:
            failure = "\n".join([failure or "stopping the cluster failed:", *stop_problems])
        elif stop_problems:
            warnings.warn("stopping the cluster: " + "\n".join(stop_problems), RuntimeWarning,
                          stacklevel=2)
        if failure:
            raise ClusterError(f"{failure}\n{logs}")
        if check and self._own_log_dir:
            shutil.rmtree(self.log_dir, ignore_errors=True)

    def _start_router(self) -> None:
        self.http_port, self.control_port = free_port(), free_port()
        model = ["--model", self.model] if self.router_has_model else []
        args = ["--host", HOST, "--port", str(self.http_port), "--control-port",
                str(self.control_port), *model, "--heartbeat-interval",
                str(self.heartbeat_interval), *self._common, *self._router_args]
        self.router = ClusterProcess("router", "router", launch_command("router", args),
                                     self.log_dir / "router.log", self._env)
        self.router.start()

    def _wait_router_up(self) -> bool:
        for _ in deadline_loop(self.startup_timeout, 0.1):
            if not self.router.alive:
                return False
            if self.router.ready_line() is not None:
                return True
        raise self.error(f"the router did not print its ready line in {self.startup_timeout} s")

    def _process(self, role: str, name: str) -> ClusterProcess:
        args = ["--host", HOST, "--port", "0", "--router", f"{HOST}:{self.control_port}",
                "--model", self.model, "--heartbeat-interval", str(self.heartbeat_interval),
                "--torch-threads", "1", "--instance-id", name, *self._common,
                *self._role_args[role], *self._instance_args.get(name, ())]
        return ClusterProcess(name, role, launch_command(role, args),
                              self.log_dir / f"{name}.log", self._env)

    def _stop_all(self) -> list[str]:
        """SIGTERM every group, SIGABRT+SIGKILL stragglers, reap. Returns what went wrong: a
        process that ignored SIGTERM (its stacks are in its log) or exited non-zero on it, or
        a group still there after SIGKILL."""
        procs = [p for p in (*self.processes, self.router) if p is not None]
        running = {p.name for p in procs if p.alive}
        for p in procs:
            p.terminate()
        deadline = time.monotonic() + self.stop_timeout
        for p in procs:
            code, killed = p.stop(max(0.1, deadline - time.monotonic()), terminate=False)
            self.stop_report[p.name] = (code, killed)
        for c in [*self._clients, self._http]:
            if c is not None:
                c.close()
        self._clients.clear()
        self._http = None
        _LIVE.discard(self)
        problems = []
        for p in procs:
            code, killed = self.stop_report[p.name]
            if killed:
                problems.append(f"{p.name} ignored SIGTERM for {self.stop_timeout} s (its "
                                f"thread stacks follow in its log):\n{p.log_tail(60)}")
            elif p.name in running and code != 0:
                problems.append(f"{p.name} exited with {code} on SIGTERM")
            if not p.group_gone():
                problems.append(f"{p.name}: process group {p.pid} still alive after SIGKILL")
        return problems

    # ------------------------------------------------------------------ HTTP
    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.http_port}"

    def client(self, timeout: float = 60.0, **kwargs: Any) -> httpx.Client:
        """A new ``httpx.Client`` on the router; closed with the cluster."""
        client = httpx.Client(base_url=self.base_url, timeout=timeout, **kwargs)
        self._clients.append(client)
        return client

    def _http_get(self, path: str) -> httpx.Response:
        if self._http is None:
            self._http = httpx.Client(base_url=self.base_url, timeout=10.0)
        return self._http.get(path)

    def cluster(self) -> dict:
        """The router's ``/v1/cluster`` JSON."""
        r = self._http_get("/v1/cluster")
        r.raise_for_status()
        return r.json()

    def metrics(self) -> str:
        r = self._http_get("/metrics")
        r.raise_for_status()
        return r.text

    def view(self, instance: ClusterProcess | str, cluster: dict | None = None) -> dict | None:
        """The instance's entry in ``/v1/cluster`` (None if the router does not list it)."""
        name = instance if isinstance(instance, str) else instance.name
        views = (cluster or self.cluster())["instances"]
        return next((v for v in views if v["instance_id"] == name), None)

    # ------------------------------------------------------------------ instances
    def instances(self, role: str | None = None) -> list[ClusterProcess]:
        return [p for p in self.processes if role is None or p.role == role]

    def instance(self, name: str) -> ClusterProcess:
        return next(p for p in self.processes if p.name == name)

    def kill(self, instance: ClusterProcess, sig: int = signal.SIGKILL) -> None:
        """Signal the instance's process group; for SIGKILL/SIGTERM wait until it exited."""
        if sig == signal.SIGTERM:
            instance.terminate()
        else:
            instance.signal(sig)
        if (sig in (signal.SIGKILL, signal.SIGTERM)
                and instance.wait(self.stop_timeout) is None):
            raise self.error(f"{instance.name} did not exit after signal {sig}")

    def pause(self, instance: ClusterProcess) -> None:
        instance.signal(signal.SIGSTOP)

    def resume(self, instance: ClusterProcess) -> None:
        instance.signal(signal.SIGCONT)

    def restart(self, instance: ClusterProcess, timeout: float | None = None,
                env: Mapping[str, str] | None = None) -> dict:
        """Start ``instance`` again (killing it first if it still runs) with the same command
        line; return its ``/v1/cluster`` entry once it registered with a new epoch. ``env``
        replaces the extra environment of this and later incarnations (e.g. ``{}`` or
        ``{"FDPD_FAULT_POINTS": ...}``, see ``fdpd.faults``); None keeps it."""
        old = self.view(instance)
        old_epoch = old["epoch"] if old else None
        if instance.alive:
            self.kill(instance)
        if env is not None:
            instance.env = {**self._env, **env}
        instance.start()

        def registered() -> dict | None:
            v = self.view(instance)
            if v and _reporting(v) and v["epoch"] != old_epoch and instance.ready_line():
                return v
            return None

        return self.wait_for(registered, timeout or self.startup_timeout,
                             what=f"{instance.name} registered again with a new epoch")

    def restart_router(self, timeout: float | None = None) -> dict:
        """Start the router again (SIGKILLing it first if it still runs) on the same HTTP and
        control ports, so that running instances find it and register again; return
        ``/v1/cluster`` once every live, unstopped instance is registered and reporting."""
        if self.router.alive:
            self.router.signal(signal.SIGKILL)
            if self.router.wait(self.stop_timeout) is None:
                raise self.error("the router did not exit after SIGKILL")
        if self._http is not None:
            self._http.close()
            self._http = None
        self.router.start()
        if not self._wait_router_up():
            raise self.error("the restarted router exited (its ports taken by another "
                             "program?)")
        timeout = timeout or self.startup_timeout

        def rejoined() -> dict | None:
            if not self._http_ok("/v1/cluster"):
                return None
            cluster = self.cluster()
            views = {v["instance_id"]: v for v in cluster["instances"]}
            live = [p for p in self.processes if p.alive and not p.stopped]
            return cluster if all(p.name in views and _reporting(views[p.name])
                                  for p in live) else None

        return self.wait_for(rejoined, timeout, what="every instance registered with the "
                             "restarted router")

    def _http_ok(self, path: str) -> bool:
        try:
            return self._http_get(path).status_code == 200
        except httpx.TransportError:            # the router prints ready before it listens
            return False

    def _all_registered(self) -> bool:
        if not self._http_ok("/v1/cluster"):
            return False
        views = {v["instance_id"]: v for v in self.cluster()["instances"]}
        return all(p.name in views and _reporting(views[p.name]) for p in self.processes)

    # ------------------------------------------------------------------ waiting and checks
    def wait_for(self, predicate: Callable[[], T], timeout: float, *, interval: float = 0.05,
                 what: str = "condition", check_alive: bool = False) -> T:
        """Poll ``predicate`` until it returns something truthy (returned). Raises ClusterError
        with the logs on timeout, or at once if ``check_alive`` and a process exited."""
        for _ in deadline_loop(timeout, interval):
            if check_alive:
                dead = [p.name for p in (self.router, *self.processes)
                        if p is not None and p.proc is not None and not p.alive]
                if dead:
                    raise self.error(f"while waiting for {what}: {dead} exited")
            value = predicate()
            if value:
                return value
        raise self.error(f"timed out after {timeout} s waiting for {what}")

    def assert_quiescent(self, timeout: float | None = None) -> None:
        """Wait until a heartbeat sent after this call shows every live instance idle: nothing
        running or waiting, every block free, and on decodes no grant, reservation or queued
        allocation. Raises ClusterError naming what is left otherwise."""
        start = time.monotonic()
        live = [p for p in self.processes if p.alive and not p.paused and not p.stopped]
        problems: list[str] = []

        def idle() -> bool:
            problems.clear()
            cluster = self.cluster()
            waited = time.monotonic() - start
            for p in live:
                v = self.view(p, cluster)
                if v is None or not v["healthy"]:
                    problems.append(f"{p.name}: not healthy in /v1/cluster")
                    continue
                if v["seconds_since_heartbeat"] >= waited:
                    problems.append(f"{p.name}: no heartbeat since the check began")
                    continue
                problems.extend(f"{p.name}: {msg}" for msg in _busy(v))
            if cluster["router"]["inflight"]:
                problems.append(f"router: {cluster['router']['inflight']} requests in flight")
            return not problems

        try:
            self.wait_for(idle, timeout or self.quiescent_timeout, interval=0.1,
                          what="quiescence")
        except ClusterError:
            raise ClusterError("cluster not quiescent: " + "; ".join(problems)) from None

    def error(self, message: str) -> ClusterError:
        return ClusterError(f"{message}\n{self.logs()}")

    def logs(self, lines: int = 40) -> str:
        """The tail of every process's log, for failure messages."""
        parts = []
        for p in (self.router, *self.processes):
            if p is not None:
                state = "alive" if p.alive else f"exited {p.proc.returncode}" if p.proc else "-"
                parts.append(f"----- {p.name} (pid {p.pid}, {state}, {p.log_path}) -----\n"
                             f"{p.log_tail(lines)}")
        return "\n".join(parts)


def _reporting(view: dict) -> bool:
    """Healthy, and its load is known: a heartbeat arrived after the registration (until then
    /v1/cluster has no load fields for it)."""
    return view["healthy"] and "running" in view


def _busy(view: dict) -> Iterable[str]:
    for key in ("running", "waiting"):
        if view.get(key):
            yield f"{key}={view[key]}"
    ledger = view.get("ledger")
    if ledger is not None:
        for key in ("pending_grants", "reserved_blocks", "pending_reserved_blocks",
                    "waiting_allocs"):
            if ledger[key]:
                yield f"{key}={ledger[key]}"
        if ledger["free_blocks"] + ledger["used_blocks"] != ledger["total_blocks"]:
            yield f"free {ledger['free_blocks']} + used {ledger['used_blocks']} != total"
    free, total = view.get("free_blocks"), view.get("num_blocks")
    if free is not None and total is not None and free != total:
        yield f"free_blocks={free} of {total}"


@atexit.register
def _kill_leftovers() -> None:
    # Last resort when a test process exits without closing a cluster (e.g. an uncaught
    # KeyboardInterrupt in a script): never leave engine processes behind.
    for cluster in list(_LIVE):
        for p in (cluster.router, *cluster.processes):
            if p is not None and p.alive:
                p.signal(signal.SIGKILL)
                p.wait(5)
        _LIVE.discard(cluster)
