"""The chaos runner: one cluster with a Redis KV store kept across scenarios
(:class:`ChaosRunner`): it sends the load (``load``), applies the fault and checks the run
(``result.RunResult``)."""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from fdpd.faults import ENV as FAULT_ENV
from fdpd.faults import Fault, format_spec
from fdpd.testing.chaos.load import LoadRequest, Reference, make_load, response_logprobs
from fdpd.testing.chaos.result import RunResult
from fdpd.testing.chaos.scenarios import TOKENS, Scenario
from fdpd.testing.client import Completion, complete
from fdpd.testing.harness import Cluster, ClusterError
from fdpd.testing.processes import ClusterProcess, free_port
from fdpd.testing.servers import start_redis, stop_server

# Deadlines short enough that a run ends in seconds: a lease outlasts a healthy transfer, a
# request outlasts three attempts at it; the router declares an instance dead after
# max(2 s, 6 heartbeats).
GRANT_TTL, TRANSFER_TIMEOUT, REQUEST_TIMEOUT = 3.0, 5.0, 15.0
HEARTBEAT = 0.2
CLIENT_MARGIN = 5.0        # a request not ended by REQUEST_TIMEOUT + this is hung
QUIESCENT_TIMEOUT = 15.0   # > lease + transfer timeout: leftovers must be gone by then
STORE_TIMEOUT = 0.5
DECODE_BLOCKS = 64         # ~4 requests at full length: growth forces preemptions
LOGPROB_TOLERANCE = 1e-3


# ---------------------------------------------------------------------- the KV store
class RedisServer:
    """The cluster's KV store: a redis-server on a fixed port, killed, stopped and restarted
    by pid (its own process group)."""

    def __init__(self):
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        self.proc = start_redis(self.port)

    def signal(self, sig: int) -> None:
        if self.alive:
            os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        if self.proc is not None:
            stop_server(self.proc)

    def restart(self) -> bool:
        self.kill()
        self.start()
        return self.alive


class _Stopwatch:
    def __init__(self, phases: dict[str, float]):
        self.phases = phases
        self.last = time.monotonic()

    def __call__(self, phase: str) -> None:
        now = time.monotonic()
        self.phases[phase] = now - self.last
        self.last = now


@dataclass
class Outcome:
    request: LoadRequest
    result: Completion | None = None
    error: BaseException | None = None
    ended_at: float | None = None
    streamed: int = 0              # tokens received so far (TOKENS moments)
    event_times: list[float] = field(default_factory=list)     # when each event came


# ---------------------------------------------------------------------- the runner
class ChaosRunner:
    def __init__(self, log_dir: str | os.PathLike | None = None, *, verbose: bool = True):
        self._own_log_dir = log_dir is None
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="fdpd-chaos-"))
        self.verbose = verbose
        self.redis = RedisServer()
        self.cluster: Cluster | None = None
        self.reference: Reference | None = None
        self._clusters = 0

    def __enter__(self) -> ChaosRunner:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        self.redis.start()
        self._start_cluster()
        self.reference = Reference()

    def _start_cluster(self) -> None:
        self._clusters += 1
        deadlines = ["--grant-ttl", GRANT_TTL, "--transfer-timeout", TRANSFER_TIMEOUT,
                     "--request-timeout", REQUEST_TIMEOUT]
        self.cluster = Cluster(
            2, 2, common_args=deadlines, heartbeat_interval=HEARTBEAT,
            prefill_args=["--num-kv-blocks", "512"],
            decode_args=["--num-kv-blocks", DECODE_BLOCKS, "--reserve-tokens", "16",
                         "--kv-store", self.redis.url, "--kv-store-timeout", STORE_TIMEOUT],
            log_dir=self.log_dir / f"cluster{self._clusters}", check_quiescent=False,
            env={FAULT_ENV: ""})
        self.cluster.start()

    def close(self) -> None:
        try:
            if self.cluster is not None:
                self.cluster.close(check=False)
        finally:
            self.redis.kill()
        if self._own_log_dir:
            shutil.rmtree(self.log_dir, ignore_errors=True)

    def say(self, text: str) -> None:
        if self.verbose:
            print(text, flush=True)

    # ------------------------------------------------------------------ one scenario
    def run(self, sc: Scenario) -> RunResult:
        res = RunResult(sc)
        t0 = time.monotonic()
        self.say(f"chaos: {sc.describe()} (replay: FDPD_CHAOS_SEED={sc.seed})")
        try:
            self._run(sc, res)
        except (ClusterError, httpx.HTTPError, OSError, RuntimeError) as e:
            res.problems.append(f"{type(e).__name__}: {e}"[:4000])
            self._recover()
        res.seconds = time.monotonic() - t0
        self.say(res.line())
        return res

    def _host(self, sc: Scenario) -> ClusterProcess | None:
        """The engine process the fault is about (or that hosts its fault point)."""
        role = {"prefill": "prefill", "decode": "decode", "store": "decode"}.get(sc.target)
        return self.cluster.instances(role)[sc.instance] if role else None

    def _run(self, sc: Scenario, res: RunResult) -> None:
        cluster = self.cluster
        host = self._host(sc)
        clean_env = {FAULT_ENV: ""}
        mark = _Stopwatch(res.phases)
        if sc.at_point:
            action = "kill" if sc.fault == "kill" and sc.target != "store" else "stop"
            cluster.restart(host, env={FAULT_ENV: format_spec([Fault(sc.moment, sc.hit,
                                                                      action)])})
        mark("arm")
        counters = self._counters()
        load = make_load(sc.seed, sc.num_requests)
        res.sent = len(load)
        with httpx.Client(base_url=cluster.base_url, timeout=REQUEST_TIMEOUT + CLIENT_MARGIN,
                          limits=httpx.Limits(max_connections=64)) as client:
            outcomes, threads = self._send(client, load)
            started = time.monotonic()
            res.applied = self._await_moment(sc, host, outcomes, started)
            mark("moment")
            fault_at = time.monotonic()
            if res.applied:
                res.rejoined = self._apply(sc, host)
                mark("fault")
            elif sc.at_point:
                cluster.restart(host, env=clean_env)      # disarm: it must not fire later
            end = started + REQUEST_TIMEOUT + CLIENT_MARGIN
            for t in threads:
                t.join(max(0.0, end - time.monotonic()))
            mark("load")
        if sc.at_point and res.applied and host.alive:
            host.env = {**host.env, **clean_env}          # spent: later restarts are clean
        self._classify(sc, res, outcomes, started)
        if res.applied and sc.target != "router":
            res.resume_gaps, res.resume_detects = self._resume_gaps(outcomes, fault_at)
        mark("exact")
        self._check_quiescent(res)
        mark("quiesce")
        for name, (epoch, *after) in self._counters().items():
            then = counters.get(name)
            delta = [a - b for a, b in zip(after, then[1:])] if then and then[0] == epoch \
                else after                       # restarted: its counters began at zero
            res.preemptions += delta[0]
            res.blocks_written += delta[1]
            res.blocks_restored += delta[2]
            if delta[3]:
                res.problems.append(f"{name}: {delta[3]} handler errors (bugs) logged")
        res.survivors_serve = self._check_serving(res)
        mark("serve")

    def _counters(self) -> dict[str, tuple[int, ...]]:
        """Per instance: (epoch, preemptions, KV blocks written back, blocks restored,
        handler errors), from its latest heartbeat."""
        out = {}
        for v in self.cluster.cluster()["instances"]:
            if "num_preemptions" in v:
                store = v.get("kv_store") or {}
                out[v["instance_id"]] = (v["epoch"], v["num_preemptions"] or 0,
                                         store.get("blocks_written", 0),
                                         store.get("blocks_restored", 0),
                                         v.get("handler_errors") or 0)
        return out

    def _send(self, client: httpx.Client, load: list[LoadRequest]
              ) -> tuple[list[Outcome], list[threading.Thread]]:
        outcomes = [Outcome(r) for r in load]

        def one(o: Outcome) -> None:
            def progress(c: Completion) -> None:
                o.streamed = len(c.token_ids)
                o.event_times.append(time.monotonic())
            try:
                o.result = complete(client, "/v1/completions", o.request.body,
                                    on_event=progress)
            except (httpx.HTTPError, ValueError) as e:   # ValueError: a truncated JSON body
                o.error = e
            o.ended_at = time.monotonic()

        threads = [threading.Thread(target=one, args=(o,), daemon=True) for o in outcomes]
        for t in threads:
            t.start()
        return outcomes, threads

    def _await_moment(self, sc: Scenario, host: ClusterProcess | None,
                      outcomes: list[Outcome], started: float) -> bool:
        """Poll until the moment came (True) or the load ended without it (False)."""
        while True:
            if sc.at_point:
                if not host.alive or host.stopped:
                    return True
            elif sc.moment == TOKENS:
                if sum(o.streamed for o in outcomes) >= sc.hit:
                    return True
            elif time.monotonic() >= started + sc.delay:
                return True
            if all(o.ended_at is not None for o in outcomes):
                return False
            time.sleep(0.002)

    def _apply(self, sc: Scenario, host: ClusterProcess | None) -> bool | None:
        """Break the target now, wait ``pause``, then SIGCONT it or restart it. Returns
        whether a restarted process came back with a larger epoch (None: none restarted)."""
        cluster = self.cluster
        self_inflicted = sc.at_point and sc.target != "store"
        if sc.target == "router":
            before = cluster.cluster()["router"]["epoch"]
        elif sc.target != "store":
            before = (cluster.view(host) or {}).get("epoch", 0)
        if not self_inflicted:
            sig = signal.SIGKILL if sc.fault == "kill" else signal.SIGSTOP
            if sc.target == "store":
                self.redis.signal(sig)
                if sc.at_point:
                    cluster.resume(host)       # the decode goes on into the broken store
            elif sc.target == "router":
                cluster.router.signal(sig)
            else:
                cluster.kill(host, sig)
        self.say(f"  applied {sc.fault} to {sc.target}")
        time.sleep(sc.pause)
        if sc.fault == "stop-cont":
            if sc.target == "store":
                self.redis.signal(signal.SIGCONT)
            elif sc.target == "router":
                cluster.router.signal(signal.SIGCONT)
            else:
                cluster.resume(host)
            return None
        if sc.target == "store":
            return self.redis.restart()
        if sc.target == "router":
            after = cluster.restart_router()["router"]["epoch"]
        else:
            after = cluster.restart(host, env={FAULT_ENV: ""})["epoch"]
        return after > before

    # ------------------------------------------------------------------ checks
    def _classify(self, sc: Scenario, res: RunResult, outcomes: list[Outcome],
                  started: float) -> None:
        done = []
        for i, o in enumerate(outcomes):
            r = o.result
            if o.ended_at is None or o.ended_at - started > REQUEST_TIMEOUT + CLIENT_MARGIN:
                res.hung += 1
                res.problems.append(f"request {i} hung ({o.request.max_tokens} tokens, "
                                    f"stream={o.request.body['stream']})")
            elif o.error is not None:
                if sc.target == "router" and res.applied:
                    res.clean_errors += 1      # the router itself went away
                else:
                    res.wrong += 1
                    res.problems.append(f"request {i}: connection error while the router "
                                        f"was up: {type(o.error).__name__}: {o.error}")
            elif r.ok:
                done.append((i, o))
            elif r.error is not None and isinstance(r.error, dict) and r.error.get("message"):
                res.clean_errors += 1
            else:
                res.wrong += 1
                res.problems.append(f"request {i}: status {r.status}, no finish reason and "
                                    f"no error (cut off after {len(r.token_ids)} tokens)")
        want = self.reference.expected([o.request for _, o in done])
        for (i, o), (tokens, logprobs) in zip(done, want):
            r = o.result
            if r.token_ids != tokens or r.finish_reason != "length":
                res.wrong += 1
                at = next((k for k, (a, b) in enumerate(zip(r.token_ids, tokens)) if a != b),
                          min(len(r.token_ids), len(tokens)))
                res.problems.append(f"request {i} (stream={o.request.body['stream']}): "
                                    f"differs from the offline engine at token {at} of "
                                    f"{len(tokens)} ({r.finish_reason})")
                continue
            res.exact += 1
            if o.request.logprobs:
                got = response_logprobs(r)
                bad = (len(got) != len(logprobs)
                       or any(not math.isfinite(g) or g <= -9999.0
                              or abs(g - e) > LOGPROB_TOLERANCE for g, e in zip(got, logprobs)))
                if bad:
                    res.nan += 1
                    res.problems.append(f"request {i}: logprobs not finite or not the "
                                        f"offline engine's: {got[:4]}... vs {logprobs[:4]}...")

    def _resume_gaps(self, outcomes: list[Outcome], fault_at: float
                     ) -> tuple[list[float], list[float]]:
        """For each stream the router resumed elsewhere (its request timeline's ``resumes``):
        fault -> the first token after it (client clock), and the router's last token ->
        loss noticed (``detect_seconds``)."""
        recent = self.cluster.client().get("/v1/requests/recent",
                                           params={"limit": 1000}).json()["data"]
        resumed = {t["request_id"]: t["resumes"] for t in recent if t.get("resumes")}
        gaps, detects = [], []
        for o in outcomes:
            r = o.result
            moves = resumed.get(r.events[0].get("id")) if r is not None and r.events else None
            if not moves:
                continue
            detects += [m["detect_seconds"] for m in moves if m.get("detect_seconds") is not None]
            after = [t for t in o.event_times if t > fault_at]
            if after and any(t <= fault_at for t in o.event_times):
                gaps.append(after[0] - fault_at)
        return gaps, detects

    def _check_quiescent(self, res: RunResult) -> None:
        """Every live instance idle: nothing running or queued, every block free, no grant or
        reservation left on decodes (the harness's own check)."""
        cluster = self.cluster
        try:
            cluster.assert_quiescent(QUIESCENT_TIMEOUT)
        except ClusterError as e:
            res.problems.append(str(e).splitlines()[0])
            view = cluster.cluster()
            for p in cluster.processes:
                v = cluster.view(p, view)
                if p.alive and v and v.get("free_blocks") is not None:
                    res.leaked_blocks += v["num_blocks"] - v["free_blocks"]

    def _check_serving(self, res: RunResult) -> bool:
        """Every instance serves again: a few fresh requests, all exact, until each prefill
        and decode has taken part (from their counters in /v1/cluster)."""
        cluster = self.cluster

        def served() -> dict[str, int]:
            view = cluster.cluster()
            out = {}
            for p in cluster.processes:
                v = cluster.view(p, view) or {}
                out[p.name] = ((v.get("ledger") or {}).get("grants_committed", 0)
                               if p.role == "decode" else v.get("prefix_queried_tokens") or 0)
            return out

        before = served()
        with httpx.Client(base_url=cluster.base_url, timeout=REQUEST_TIMEOUT + CLIENT_MARGIN,
                          limits=httpx.Limits(max_connections=16)) as client:
            for attempt in range(4):
                load = make_load(res.scenario.seed * 7919 + attempt, 6, min_tokens=4,
                                 max_tokens=12)
                outcomes, threads = self._send(client, load)
                for t in threads:
                    t.join(REQUEST_TIMEOUT + CLIENT_MARGIN)
                want = self.reference.expected(load)
                for o, (tokens, _) in zip(outcomes, want):
                    if o.result is None or not o.result.ok or o.result.token_ids != tokens:
                        got = (o.error or (o.result.error if o.result else None)
                               or (o.result.token_ids if o.result else None))
                        res.problems.append(f"a fresh request after the fault failed: {got}")
                        return False
                try:
                    cluster.wait_for(lambda: all(v > before[k] for k, v in served().items()),
                                     2 * HEARTBEAT + 1.0, what="every instance serving")
                    return True
                except ClusterError:
                    continue
        idle = [k for k, v in served().items() if v <= before[k]]
        res.problems.append(f"instances that served no fresh request: {idle}")
        return False

    # ------------------------------------------------------------------ recovery
    def _recover(self) -> None:
        """After a failed run: bring back whatever is stopped or down, or start over."""
        cluster = self.cluster
        try:
            if not self.redis.alive:
                self.redis.restart()
            self.redis.signal(signal.SIGCONT)
            for p in cluster.processes:
                if p.alive:
                    cluster.resume(p)
            if not cluster.router.alive:
                cluster.restart_router()
            cluster.router.signal(signal.SIGCONT)
            for p in cluster.processes:
                if not p.alive or p.env.get(FAULT_ENV):
                    cluster.restart(p, env={FAULT_ENV: ""})
            cluster.assert_quiescent(QUIESCENT_TIMEOUT)
        except (ClusterError, httpx.HTTPError, OSError, RuntimeError) as e:
            self.say(f"  recovery failed ({type(e).__name__}); starting a fresh cluster")
            cluster.close(check=False)
            self._start_cluster()
