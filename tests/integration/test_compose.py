"""``deploy/docker-compose.yml`` is valid, and its services work: ``docker-compose config``
resolves it (with ``deploy/.env``), then every service's command runs as a local process with
service host names mapped to 127.0.0.1 and every exposed port to a free one (Redis is a real
``redis-server``). Traffic through the router matches ``fdpd.LLM`` offline exactly; every
service's health check passes; a decode killed and started again rejoins with a new epoch and
serves.

No Docker engine is needed: ``docker-compose config`` only parses and interpolates (the test
is skipped only when the binary is missing; ``.ci/run`` installs it).
"""

from __future__ import annotations

import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
import yaml

import fdpd
from fdpd import LLM, SamplingParams
from fdpd.cli import launch
from fdpd.testing import ClusterProcess, complete, free_port
from fdpd.testing.local_services import LocalServices, local_argv
from fdpd.testing.processes import child_env, deadline_loop

pytestmark = pytest.mark.timeout(180)

ROOT = Path(fdpd.__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
FDPD_SERVICES = ("router", "prefill-1", "prefill-2", "decode-1", "decode-2")
GREEDY = {"temperature": 0, "ignore_eos": True, "return_token_ids": True}


def compose_config(**variables: str) -> subprocess.CompletedProcess:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed (apt-get install -y docker-compose; "
                    ".ci/run does)")
    # Only .env configures it (and ``variables``): no variable of this shell may override a
    # default.
    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
    return subprocess.run([exe, "-f", str(COMPOSE), "config"], capture_output=True, text=True,
                          timeout=120, env={**env, **variables}, cwd=DEPLOY)


@pytest.fixture(scope="module")
def config() -> dict:
    # The cluster secret is required (no default): the operator supplies it, as here.
    out = compose_config(FDPD_CLUSTER_SECRET=secrets.token_hex(32))
    assert out.returncode == 0, f"docker-compose config failed:\n{out.stderr}"
    return yaml.safe_load(out.stdout)


def test_compose_refuses_to_start_without_a_cluster_secret():
    out = compose_config()
    assert out.returncode != 0
    assert "set FDPD_CLUSTER_SECRET" in out.stderr, out.stderr
    assert "FDPD_CLUSTER_SECRET" not in dotenv()       # .env ships no value either


def dotenv() -> dict[str, str]:
    pairs = (line.split("=", 1) for line in (DEPLOY / ".env").read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#"))
    return {k.strip(): v.strip() for k, v in pairs}


# ---------------------------------------------------------------------- the file itself
def test_compose_file_is_complete(config):
    services = config["services"]
    assert set(FDPD_SERVICES) | {"redis"} <= set(services)
    launch_envvars = {p.envvar for p in launch.params if getattr(p, "envvar", None)}
    roles = {}
    for name in FDPD_SERVICES:
        svc = services[name]
        cmd = svc["command"]
        assert cmd[:4] == ["fdpd", "launch", "--role", cmd[3]], cmd
        roles[name] = cmd[3]
        assert svc["restart"] == "unless-stopped"
        assert svc["healthcheck"]["test"][:3] == ["CMD", "fdpd", "health"]
        assert any(v.endswith(":/models:ro") for v in svc["volumes"]), svc["volumes"]
        env = svc["environment"]
        # A misspelt variable would be ignored silently: every one must be a launch option's.
        unknown = set(env) - launch_envvars
        assert not unknown, f"{name}: {sorted(unknown)} are no `fdpd launch` option"
        assert env["FDPD_INSTANCE_ID"] == name and env["FDPD_ADVERTISE_HOST"] == name
        assert len(env["FDPD_CLUSTER_SECRET"]) == 64          # the one supplied, in every service
    assert roles == {"router": "router", "prefill-1": "prefill", "prefill-2": "prefill",
                     "decode-1": "decode", "decode-2": "decode"}
    for name in ("prefill-1", "decode-1"):
        env = services[name]["environment"]
        assert env["FDPD_KV_STORE"] == "redis://redis:6379/0"
        assert env["FDPD_ROUTER"] == "router:8001"
    assert services["redis"]["healthcheck"]["test"][:2] == ["CMD", "redis-cli"]


def test_env_file_documents_every_knob():
    """Every ${VAR} of the compose file has a documented default in .env, and every .env
    entry is used; .env's values equal the compose file's built-in defaults."""
    text = COMPOSE.read_text()
    used = dict(re.findall(r"\$\{(\w+):?-([^}]*)\}", text))
    env = dotenv()
    assert set(used) == set(env), (sorted(set(used) - set(env)), sorted(set(env) - set(used)))
    for key, default in used.items():
        assert env[key] == default, f"{key}: .env says {env[key]!r}, compose {default!r}"


# ---------------------------------------------------------------------- running it locally
class LocalCompose(LocalServices):
    """The compose services as local processes: ``NAME:PORT`` (and ``localhost:PORT`` inside
    a service) become ``127.0.0.1:<free port>``; volumes become their host directories."""

    def __init__(self, config: dict, log_dir: Path):
        super().__init__(log_dir)
        self.services = {n: s for n, s in config["services"].items() if not s.get("profiles")}
        self.ports = {(name, int(p)): free_port() for name, svc in self.services.items()
                      for p in svc.get("expose", [])}
        hosts = "|".join(re.escape(h) for h in [*self.services, "localhost", "127.0.0.1"])
        self._host_port = re.compile(rf"\b({hosts}):(\d+)\b")

    def port(self, service: str, port: int) -> int:
        return self.ports[(service, port)]

    def rewrite(self, service: str, value: str) -> str:
        def local(m: re.Match) -> str:
            host = service if m.group(1) in ("localhost", "127.0.0.1") else m.group(1)
            return f"127.0.0.1:{self.port(host, int(m.group(2)))}"

        value = self._host_port.sub(local, str(value))
        for volume in self.services[service].get("volumes", []):
            source, target = volume.split(":")[:2]
            if value.startswith(target + "/"):
                value = source + value[len(target):]
        return value

    def argv(self, service: str, words: list[str]) -> list[str]:
        return local_argv([self.rewrite(service, w) for w in words],
                          lambda port: self.port(service, port))

    def env(self, service: str) -> dict[str, str]:
        env = {k: self.rewrite(service, v)
               for k, v in (self.services[service].get("environment") or {}).items()}
        for key in ("FDPD_PORT", "FDPD_CONTROL_PORT", "FDPD_METRICS_PORT"):
            if key in env:
                env[key] = str(self.port(service, int(env[key])))
        if env.get("FDPD_HOST") == "0.0.0.0":
            env["FDPD_HOST"] = "127.0.0.1"                  # loopback only, in a test
        if env.get("FDPD_ADVERTISE_HOST") in self.services:
            env["FDPD_ADVERTISE_HOST"] = "127.0.0.1"
        return child_env(env, str(ROOT))

    def start(self, service: str) -> ClusterProcess:
        return self.launch(service, self.argv(service, self.services[service]["command"]),
                           self.env(service))

    def healthy(self, service: str) -> bool:
        """Run the service's own health check (as compose would, in its container)."""
        test = self.services[service]["healthcheck"]["test"]
        assert test[0] == "CMD", test
        out = subprocess.run(self.argv(service, test[1:]), capture_output=True, text=True,
                             timeout=30, env=self.env(service))
        return out.returncode == 0

    def wait_healthy(self, service: str, timeout: float = 60) -> None:
        self.wait_until(service, lambda: self.healthy(service), timeout, "health check")


@pytest.fixture
def local(config, tmp_path):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install -y redis-server)")
    cluster = LocalCompose(config, tmp_path)
    try:
        yield cluster
    finally:
        cluster.stop()


def reference(items: list[tuple[list[int], int]]) -> list[list[int]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        outs = LLM("tiny", num_kv_blocks=1024).generate(
            [{"prompt_token_ids": p} for p, _ in items],
            [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for _, n in items])
    finally:
        torch.set_num_threads(threads)
    return [list(o.outputs[0].token_ids) for o in outs]


def traffic(client: httpx.Client, seed: int, n: int = 8) -> list[tuple[list[int], int, list]]:
    rng = random.Random(seed)
    shared = [rng.randrange(256) for _ in range(40)]
    bodies = []
    for i in range(n):
        prompt = (shared if i % 2 else []) + [rng.randrange(256) for _ in range(rng.randint(
            5, 60))]
        bodies.append({**GREEDY, "prompt": prompt, "max_tokens": rng.randint(4, 24),
                       "stream": i % 3 == 0})
    with ThreadPoolExecutor(n) as pool:
        outs = list(pool.map(lambda b: complete(client, "/v1/completions", b), bodies))
    for out in outs:
        assert out.ok, (out.status, out.error)
    return [(b["prompt"], b["max_tokens"], o.token_ids) for b, o in zip(bodies, outs)]


def assert_exact(results) -> None:
    want = reference([(p, n) for p, n, _ in results])
    for (prompt, _, got), exp in zip(results, want):
        assert got == exp, f"prompt {prompt[:6]}...: got {got}, want {exp}"


def test_compose_services_run_locally_and_a_decode_rejoins(local, config):
    local.start("redis")
    local.wait_healthy("redis", 20)
    for name in FDPD_SERVICES:
        local.start(name)
    for name in (*FDPD_SERVICES[1:], "router"):
        local.wait_healthy(name, 90)
    router = f"http://127.0.0.1:{local.port('router', 8000)}"
    client = httpx.Client(base_url=router, timeout=60)

    def view(name: str) -> dict | None:
        views = client.get("/v1/cluster").json()["instances"]
        return next((v for v in views if v["instance_id"] == name), None)

    try:
        assert {v["instance_id"] for v in client.get("/v1/cluster").json()["instances"]} == \
            set(FDPD_SERVICES[1:])
        assert_exact(traffic(client, seed=1))
        # The cluster's health command agrees (the operator's check through the router).
        probe = [sys.executable, "-m", "fdpd", "health", "--router", router, "--instance"]
        assert subprocess.run([*probe, "decode-1"], capture_output=True).returncode == 0

        # A decode dies; restart policy brings it back: same id, new epoch, serving.
        victim = local.procs["decode-1"]
        epoch = view("decode-1")["epoch"]
        victim.signal(signal.SIGKILL)
        assert victim.wait(10) is not None
        for _ in deadline_loop(15, 0.2):
            if not view("decode-1")["healthy"]:
                break
        else:
            raise AssertionError("the killed decode was not marked dead")
        assert not local.healthy("decode-1")
        assert subprocess.run([*probe, "decode-1"], capture_output=True).returncode == 1
        assert_exact(traffic(client, seed=2, n=4))           # the other decode serves

        local.start("decode-1")
        local.wait_healthy("decode-1", 60)
        for _ in deadline_loop(10, 0.1):                # its first load report
            again = view("decode-1")
            if "ledger" in again:
                break
        assert again["healthy"] and again["epoch"] > epoch, again
        before = again["ledger"]["grants_committed"]
        for seed in range(3, 8):
            assert_exact(traffic(client, seed=seed))
            if view("decode-1")["ledger"]["grants_committed"] > before:
                break
        else:
            raise AssertionError(f"the restarted decode got no traffic:\n{local.logs()}")
    except BaseException:
        print(local.logs())
        raise
    finally:
        client.close()


def test_health_probe_does_not_import_torch():
    """``fdpd health`` must not import torch (a probe runs every few seconds)."""
    code = ("import sys; from fdpd.cli import main; "
            "sys.argv=['fdpd','health','--url','http://127.0.0.1:1/health'];\n"
            "try:\n    main()\nexcept SystemExit as e:\n    "
            "assert e.code == 1, e.code\nassert 'torch' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=child_env({}, str(ROOT)), timeout=60)
    assert out.returncode == 0, out.stderr
