"""The chaos suite: SIGKILL and SIGSTOP/SIGCONT of a prefill, a decode, the KV store (Redis) or
the router, at chosen moments (fault points, ``fdpd.faults``) and at random ones, under a load
of concurrent greedy requests; invariants checked after every scenario.

A :class:`Scenario` is (target, fault, moment). Random scenarios derive from a seed, which also
draws the load, so ``FDPD_CHAOS_SEED=<seed> python -m fdpd.testing.chaos`` replays a failure.
:class:`ChaosRunner` keeps one cluster across scenarios (router, 2 prefill, 2 decode with a
small pool and a Redis KV store so preemption, write-back and restore really happen; short
leases and deadlines). Per scenario it arms the target's fault point (restarting the process
with ``FDPD_FAULT_POINTS``), sends the load, applies the fault when the moment comes, restarts
what was killed (the router on its own ports, Redis on its port), waits for quiescence, and
checks: every request ended by its deadline (else *hung*); every completed output equals the
offline engine's, token for token, with finite logprobs equal to its own (else *wrong*/*NaN*);
every other request ended with a clean error (an OpenAI error body, an SSE error event, or a
connection error while the router itself was down); every live instance is idle with all of
its blocks free and its ledger at zero (else *leaked*); every instance serves a fresh request
exactly; a restarted process came back with a larger epoch.

``python -m fdpd.testing.chaos --runs 50 --out RELIABILITY.md`` (``scripts/chaos``) runs
random scenarios and writes the table; ``tests/integration/test_chaos.py`` runs the chosen
ones (:data:`CHOSEN`) and two random seeds in CI.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from fdpd.faults import ENV as FAULT_ENV
from fdpd.faults import POINTS, Fault, format_spec
from fdpd.testing.client import Completion, complete
from fdpd.testing.harness import Cluster, ClusterError
from fdpd.testing.processes import ClusterProcess, free_port
from fdpd.testing.servers import start_redis, stop_server

TARGETS = ("prefill", "decode", "store", "router")
FAULTS = ("kill", "stop-cont", "stop-kill")
# The fault points at which each target can be broken. A store fault at a kvstore.* point
# stops the decode there, breaks Redis, then lets the decode go on into the broken store.
TARGET_POINTS = {"prefill": ("prefill.await_grant", "prefill.kv_send"),
                 "decode": ("decode.kv_received", "decode.step", "kvstore.write",
                            "kvstore.restore"),
                 "store": ("kvstore.write", "kvstore.restore"),
                 "router": ()}
DELAY = "delay"            # a random delay after the load starts
TOKENS = "tokens"          # once the clients received N streamed tokens (mid-decode)
MOMENT_NAMES = {DELAY: "random delay", TOKENS: "streamed tokens"}

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


# ---------------------------------------------------------------------- scenarios
@dataclass(frozen=True)
class Scenario:
    target: str                # prefill | decode | store | router
    fault: str                 # kill | stop-cont | stop-kill
    moment: str                # a fault point, DELAY or TOKENS
    hit: int = 1               # fault point: its N-th hit; TOKENS: N tokens streamed
    delay: float = 1.0         # DELAY: seconds after the load started
    pause: float = 2.5         # seconds the target stays stopped, or down before its restart
    instance: int = 0          # which prefill/decode is the target (or hosts the point)
    seed: int = 0              # draws the load (and, for random scenarios, all of the above)
    num_requests: int = 16

    def __post_init__(self) -> None:
        if self.target not in TARGETS or self.fault not in FAULTS:
            raise ValueError(f"target must be one of {TARGETS} and fault one of {FAULTS}: "
                             f"{self}")
        if self.moment not in (*TARGET_POINTS[self.target], DELAY, TOKENS):
            raise ValueError(f"{self.target} cannot be hit at {self.moment!r}; choose from "
                             f"{[*TARGET_POINTS[self.target], DELAY, TOKENS]}")

    @property
    def at_point(self) -> bool:
        return self.moment in POINTS

    @property
    def kind(self) -> str:
        return f"{self.fault} {self.target} @ {MOMENT_NAMES.get(self.moment, self.moment)}"

    def describe(self) -> str:
        when = {DELAY: f"{self.delay:g} s into the load", TOKENS: f"after {self.hit} tokens"
                }.get(self.moment, f"hit {self.hit} of {self.moment}")
        role = "decode" if self.target == "store" else self.target
        who = f"{role}-{self.instance}" if role in ("prefill", "decode") else self.target
        return (f"{self.fault} {who} {when}, pause {self.pause:g} s, {self.num_requests} "
                f"requests, seed {self.seed}")


def random_scenario(seed: int) -> Scenario:
    """Everything about a run, drawn from ``seed``."""
    rng = random.Random(seed)
    target, fault = rng.choice(TARGETS), rng.choice(FAULTS)
    moment = rng.choice([*TARGET_POINTS[target], DELAY, TOKENS])
    hit = {"decode.step": rng.randint(5, 120), TOKENS: rng.randint(20, 600)}.get(
        moment, rng.randint(1, 3))
    return Scenario(target, fault, moment, hit, delay=round(rng.uniform(0.1, 1.5), 2),
                    pause=round(rng.uniform(0.3, 4.0), 2), instance=rng.randrange(2),
                    seed=seed, num_requests=rng.randint(12, 24))


# Each target at each kind of moment once (the CI short mode).
CHOSEN = (
    Scenario("prefill", "kill", "prefill.await_grant", 2, pause=0.5, seed=101),
    Scenario("prefill", "stop-kill", "prefill.kv_send", 2, pause=1.0, seed=102),
    Scenario("decode", "kill", "decode.step", 40, pause=0.5, seed=103),
    Scenario("decode", "stop-cont", "decode.step", 40, pause=2.5, seed=104),
    Scenario("store", "kill", "kvstore.write", 1, pause=1.0, seed=105, num_requests=24),
    Scenario("store", "stop-cont", "kvstore.restore", 1, pause=1.0, seed=106,
             num_requests=24),
    Scenario("router", "kill", TOKENS, 150, pause=0.3, seed=107),
)


# ---------------------------------------------------------------------- load and reference
@dataclass
class LoadRequest:
    body: dict

    @property
    def prompt(self) -> list[int]:
        return self.body["prompt"]

    @property
    def max_tokens(self) -> int:
        return self.body["max_tokens"]

    @property
    def logprobs(self) -> bool:
        return "logprobs" in self.body


def make_load(seed: int, n: int, *, min_tokens: int = 48, max_tokens: int = 224
              ) -> list[LoadRequest]:
    """Greedy completions on token-id prompts, streamed or not, some sharing a prefix, some
    asking for logprobs; long enough to decode across the fault."""
    rng = random.Random(seed)
    shared = [rng.randrange(256) for _ in range(rng.choice((32, 48, 64)))]
    load = []
    for _ in range(n):
        prompt = ((shared if rng.random() < 0.5 else [])
                  + [rng.randrange(256) for _ in range(rng.randint(8, 120))])
        body = {"model": "tiny", "prompt": prompt, "temperature": 0, "ignore_eos": True,
                "return_token_ids": True, "max_tokens": rng.randint(min_tokens, max_tokens),
                "stream": rng.random() < 0.5}
        if rng.random() < 0.3:
            body["logprobs"] = 0
        load.append(LoadRequest(body))
    return load


class Reference:
    """The offline engine's greedy tokens and logprobs, cached by (prompt, max_tokens)."""

    def __init__(self):
        from fdpd import LLM

        self.llm = LLM("tiny", num_kv_blocks=4096)
        self.cache: dict[tuple, tuple[list[int], list[float]]] = {}

    def expected(self, items: Sequence[LoadRequest]) -> list[tuple[list[int], list[float]]]:
        import torch

        from fdpd import SamplingParams

        keys = [(tuple(r.prompt), r.max_tokens) for r in items]
        todo = sorted({k for k in keys if k not in self.cache})
        if todo:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)       # as the cluster's processes (2 cores here)
            try:
                outs = self.llm.generate(
                    [{"prompt_token_ids": list(p)} for p, _ in todo],
                    [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, logprobs=0)
                     for _, n in todo])
            finally:
                torch.set_num_threads(threads)
            for key, out in zip(todo, outs):
                self.cache[key] = (list(out.outputs[0].token_ids),
                                   list(out.outputs[0].logprobs or []))
        return [self.cache[k] for k in keys]


def response_logprobs(res: Completion) -> list[float]:
    chunks = [res.body] if res.body is not None else res.events
    out: list[float] = []
    for chunk in chunks:
        for choice in chunk.get("choices") or []:
            out.extend((choice.get("logprobs") or {}).get("token_logprobs") or [])
    return out


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


# ---------------------------------------------------------------------- one run's results
@dataclass
class RunResult:
    scenario: Scenario
    applied: bool = False          # the moment came and the fault was applied
    sent: int = 0
    exact: int = 0                 # completed, token-exact
    clean_errors: int = 0          # ended with an error the client can act on
    hung: int = 0                  # not ended by its deadline + margin
    wrong: int = 0                 # completed but not exact, or cut off with no error
    leaked_blocks: int = 0         # blocks still held once the cluster should be idle
    nan: int = 0                   # requests with a non-finite or diverging logprob
    survivors_serve: bool = False
    rejoined: bool | None = None   # None: nothing was restarted
    # What the decodes did meanwhile (write-back and restore must really happen).
    preemptions: int = 0
    blocks_written: int = 0
    blocks_restored: int = 0
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)    # where the run's time went
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return (not self.hung and not self.wrong and not self.leaked_blocks and not self.nan
                and self.survivors_serve and self.rejoined is not False and not self.problems)

    def line(self) -> str:
        return (f"{'PASS' if self.passed else 'FAIL'} {self.scenario.kind} "
                f"[seed {self.scenario.seed}] applied={self.applied} sent={self.sent} "
                f"exact={self.exact} clean_errors={self.clean_errors} hung={self.hung} "
                f"wrong={self.wrong} leaked={self.leaked_blocks} nan={self.nan} "
                f"serve={self.survivors_serve} rejoined={self.rejoined} "
                f"preempted={self.preemptions} written={self.blocks_written} "
                f"restored={self.blocks_restored} "
                f"{self.seconds:.1f}s ("
                + ", ".join(f"{k} {v:.1f}" for k, v in self.phases.items()) + ")"
                + "".join(f"\n    {p}" for p in self.problems))


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


# ---------------------------------------------------------------------- the report
NOTES_MARKER = "<!-- notes: kept when scripts/chaos rewrites this file -->"
COLUMNS = ("runs", "fault applied", "requests sent", "completed exact",
           "ended with a clean error", "hung", "leaked blocks", "wrong outputs", "NaN",
           "survivors served", "rejoined with new epoch")


def summary_rows(results: Sequence[RunResult]) -> list[tuple[str, list]]:
    by_kind: dict[str, list[RunResult]] = defaultdict(list)
    order = {}
    for r in results:
        sc = r.scenario
        by_kind[sc.kind].append(r)
        order[sc.kind] = (TARGETS.index(sc.target), FAULTS.index(sc.fault), sc.moment)

    def row(rs: list[RunResult]) -> list:
        restarted = [r for r in rs if r.rejoined is not None]
        return [len(rs), sum(r.applied for r in rs), sum(r.sent for r in rs),
                sum(r.exact for r in rs), sum(r.clean_errors for r in rs),
                sum(r.hung for r in rs), sum(r.leaked_blocks for r in rs),
                sum(r.wrong for r in rs), sum(r.nan for r in rs),
                f"{sum(r.survivors_serve for r in rs)}/{len(rs)}",
                f"{sum(bool(r.rejoined) for r in restarted)}/{len(restarted)}"]

    rows = [(kind, row(by_kind[kind])) for kind in sorted(by_kind, key=order.get)]
    rows.append(("**total**", row(list(results))))
    return rows


def write_report(results: Sequence[RunResult], path: str | os.PathLike, *, command: str,
                 base_seed: int, date: str, machine: str, wall_seconds: float) -> None:
    failed = [r for r in results if not r.passed]
    lines = [
        "# Reliability: the chaos suite",
        "",
        "A real cluster (router, 2 prefill, 2 decode with a 64-block pool, a Redis KV store, "
        "tiny model) under 12-24 concurrent greedy requests (streamed and not, shared prefixes, "
        "some with logprobs). Each run SIGKILLs or SIGSTOPs (then SIGCONTs or SIGKILLs) one of "
        "a prefill, a decode, Redis or the router, at a fault point (`fdpd/faults.py`: "
        "awaiting a grant, between KV frames, KV received, mid-decode step, mid-write-back, "
        "mid-restore), after N streamed tokens, or at a random delay; what was killed is "
        "restarted (the router on its own ports, Redis on its port). Deadlines: grant lease "
        f"{GRANT_TTL:g} s, transfer {TRANSFER_TIMEOUT:g} s, request {REQUEST_TIMEOUT:g} s, "
        f"KV-store call {STORE_TIMEOUT:g} s, heartbeats every {HEARTBEAT:g} s.",
        "",
        "Checked after every run, once the cluster is quiescent:",
        "",
        f"- **hung**: a request that did not end by its deadline + {CLIENT_MARGIN:g} s (must "
        "be 0);",
        "- **completed exact**: a completed output equal, token for token, to the offline "
        "engine (`fdpd.LLM`) on the same prompt; **wrong outputs**: completed but not exact, "
        "or cut off with neither a finish reason nor an error (must be 0);",
        "- **ended with a clean error**: an HTTP error with an OpenAI error body, an SSE error "
        "event, or a connection error while the router itself was down;",
        "- **leaked blocks**: blocks still held on a live instance once it should be idle, or "
        "a decode ledger not back to zero (grants, reservations, queued allocations) within "
        f"{QUIESCENT_TIMEOUT:g} s (must be 0);",
        f"- **NaN**: a request with logprobs that are not finite or differ from the offline "
        f"engine's by more than {LOGPROB_TOLERANCE:g} (must be 0);",
        "- **survivors served**: afterwards, fresh requests are exact and every prefill and "
        "decode took part; **rejoined**: every restarted process (router included) "
        "registered with a larger epoch (Redis: answers again).",
        "",
        f"Command: `{command}` (base seed {base_seed}; run *i* uses seed base + *i*; replay "
        "one run with `FDPD_CHAOS_SEED=<seed> scripts/chaos`). Date: "
        f"{date}. Machine: {machine}. Wall time: {wall_seconds / 60:.1f} min for "
        f"{len(results)} runs.",
        "",
        "| scenario | " + " | ".join(COLUMNS) + " |",
        "| --- | " + " | ".join("---:" for _ in COLUMNS) + " |",
    ]
    for kind, row in summary_rows(results):
        lines.append(f"| {kind} | " + " | ".join(str(v) for v in row) + " |")
    lines += ["", f"Runs passed: {len(results) - len(failed)} of {len(results)}. A run whose "
              "moment never came (e.g. no write-back happened on that decode) still checks "
              "everything above; it is counted under *fault applied*. Meanwhile the decodes "
              f"preempted {sum(r.preemptions for r in results)} times, wrote back "
              f"{sum(r.blocks_written for r in results)} KV blocks to Redis and restored "
              f"{sum(r.blocks_restored for r in results)} (counters of restarted decodes "
              "start again from zero, so these are lower bounds).", ""]
    if failed:
        lines += ["Failed runs (replay with `FDPD_CHAOS_SEED`):", ""]
        for r in failed:
            lines.append(f"- seed {r.scenario.seed}: {r.scenario.describe()}: "
                         + "; ".join(p.splitlines()[0][:300] for p in r.problems))
        lines.append("")
    # Hand-written notes (the bugs the suite found) follow a marker and survive a re-run.
    path = Path(path)
    old = path.read_text() if path.exists() else ""
    notes = old[old.index(NOTES_MARKER):] if NOTES_MARKER in old else f"{NOTES_MARKER}\n"
    path.write_text("\n".join(lines) + "\n" + notes)


# ---------------------------------------------------------------------- command line
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fdpd.testing.chaos", description="Run random seeded chaos scenarios "
        "against a local cluster and write the reliability table.")
    parser.add_argument("--runs", type=int, default=50, help="random scenarios to run")
    parser.add_argument("--seed", type=int, default=None,
                        help="base seed (default: from the clock); run i uses seed+i")
    parser.add_argument("--chosen", action="store_true",
                        help="also run the chosen scenarios of the CI suite first")
    parser.add_argument("--out", default=None, help="write the markdown report here")
    parser.add_argument("--log-dir", default=None, help="keep the cluster logs here")
    parser.add_argument("--date", default=time.strftime("%Y-%m-%d"))
    parser.add_argument("--machine", default=f"{os.cpu_count()}-core CPU")
    args = parser.parse_args(argv)
    replay = os.environ.get("FDPD_CHAOS_SEED")
    if replay:
        scenarios = [random_scenario(int(replay))]
        base = int(replay)
    else:
        base = args.seed if args.seed is not None else int(time.time()) % 1_000_000
        scenarios = [*(CHOSEN if args.chosen else ()),
                     *(random_scenario(base + i) for i in range(args.runs))]
    print(f"chaos: {len(scenarios)} scenarios, base seed {base}", flush=True)
    t0 = time.monotonic()
    results: list[RunResult] = []
    with ChaosRunner(args.log_dir) as runner:
        for i, sc in enumerate(scenarios):
            print(f"[{i + 1}/{len(scenarios)}] ", end="", flush=True)
            results.append(runner.run(sc))
    wall = time.monotonic() - t0
    for kind, row in summary_rows(results):
        print(f"{kind:48s} " + " ".join(f"{v!s:>6}" for v in row))
    if args.out:
        command = f"scripts/chaos --runs {args.runs} --seed {base}" + (
            " --chosen" if args.chosen else "")
        write_report(results, args.out, command=command, base_seed=base, date=args.date,
                     machine=args.machine, wall_seconds=wall)
        print(f"chaos: wrote {args.out}")
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
