"""``deploy/k8s`` renders and is valid, and its containers work: ``kubectl kustomize`` builds the
base, each overlay and the default; every object validates against the Kubernetes schema
(``kubernetes-validate``); the manifests agree with the CLI and with the compose file; then the
default's containers run as local processes (Service names and container ports mapped to free
loopback ports, downward-API fields to this pod's name and 127.0.0.1, the Secret supplied by the
test), every probe is run as the kubelet would, traffic through the router matches
``fdpd.LLM`` offline exactly, and a SIGTERMed decode drains and exits within its grace period.

No Kubernetes cluster is needed; ``kubectl`` (apt) renders. Skipped only when a binary or the
``kubernetes-validate`` package is missing (``.ci/run`` installs them).
"""

from __future__ import annotations

import re
import secrets
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml

import fdpd
from fdpd.cli import launch
from fdpd.testing import complete, free_port
from fdpd.testing.local_services import LocalServices, local_argv
from fdpd.testing.processes import child_env

pytestmark = pytest.mark.timeout(180)

ROOT = Path(fdpd.__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
KUSTOMIZATIONS = [".", "base", "overlays/cpu", "overlays/gpu"]
ENGINES = ("fdpd-prefill", "fdpd-decode")
GREEDY = {"temperature": 0, "ignore_eos": True, "return_token_ids": True}


def render(path: str) -> list[dict]:
    exe = shutil.which("kubectl")
    if exe is None:
        pytest.skip("kubectl is not installed (apt-get install -y kubectl; .ci/run does)")
    out = subprocess.run([exe, "kustomize", str(K8S / path)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, f"kubectl kustomize {path} failed:\n{out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def by_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def container(workload: dict) -> dict:
    (c,) = workload["spec"]["template"]["spec"]["containers"]
    return c


def env_of(objects: list[dict], workload: dict) -> dict[str, object]:
    """The container's environment as the kubelet builds it: envFrom ConfigMaps, then env
    (which wins); a ``valueFrom`` stays a dict."""
    configmaps = by_kind(objects, "ConfigMap")
    c = container(workload)
    env: dict[str, object] = {}
    for source in c.get("envFrom", []):
        env.update(configmaps[source["configMapRef"]["name"]]["data"])
    for var in c.get("env", []):
        env[var["name"]] = var["value"] if "value" in var else var["valueFrom"]
    return env


@pytest.fixture(scope="module")
def default() -> list[dict]:
    return render(".")


# ---------------------------------------------------------------------- the manifests
@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_renders_and_every_object_is_valid(path):
    kv = pytest.importorskip("kubernetes_validate",
                             reason="pip install kubernetes-validate (the test extra)")
    objects = render(path)
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == sorted(["ConfigMap"] * 2 + ["Deployment"] * 2 + ["StatefulSet"] * 2
                           + ["Service"] * 4 + ["PodDisruptionBudget"] * 3), kinds
    version = kv.utils.latest_version()
    for obj in objects:
        try:
            kv.validate(obj, version, strict=True)
        except kv.ValidationError as e:
            pytest.fail(f"{path}: {obj['kind']} {obj['metadata']['name']}: {e.message}")
    assert "Secret" not in kinds            # no default secret: the operator creates it


def test_manifests_agree_with_the_cli_and_the_compose_file(default):
    launch_envvars = {p.envvar for p in launch.params if getattr(p, "envvar", None)}
    compose = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())["services"]
    per_pod = {"FDPD_INSTANCE_ID", "FDPD_ADVERTISE_HOST"}
    workloads = {**by_kind(default, "Deployment"), **by_kind(default, "StatefulSet")}
    for name, twin in (("fdpd-router", "router"), ("fdpd-prefill", "prefill-1"),
                       ("fdpd-decode", "decode-1")):
        env = env_of(default, workloads[name])
        # A misspelt variable would be ignored silently: every one must be a launch option's,
        # and the same set compose gives the same role.
        assert set(env) <= launch_envvars, sorted(set(env) - launch_envvars)
        assert set(env) == set(compose[twin]["environment"]), name
        assert env["FDPD_INSTANCE_ID"] == {"fieldRef": {"fieldPath": "metadata.name"}}
        assert env["FDPD_ADVERTISE_HOST"] == {"fieldRef": {"fieldPath": "status.podIP"}}
        ref = env["FDPD_CLUSTER_SECRET"]["secretKeyRef"]
        assert ref["name"] == "fdpd-secrets" and not ref.get("optional"), ref
        assert all(isinstance(env[k], str) for k in set(env) - per_pod - {
            "FDPD_CLUSTER_SECRET", "FDPD_API_KEY"})
        c = container(workloads[name])
        assert c["command"][:3] == ["fdpd", "launch", "--role"], c["command"]
        # SIGTERM drains for up to FDPD_DRAIN_TIMEOUT: preStop + drain must fit the grace.
        spec = workloads[name]["spec"]["template"]["spec"]
        pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
        assert pre_stop[0] == "sleep"
        assert spec["terminationGracePeriodSeconds"] > (
            float(pre_stop[1]) + float(env["FDPD_DRAIN_TIMEOUT"])), name
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        note = workloads[name]["spec"]["template"]["metadata"]["annotations"]
        assert note["prometheus.io/scrape"] == "true"
        metrics_port = int(env.get("FDPD_METRICS_PORT", env["FDPD_PORT"]))
        assert int(note["prometheus.io/port"]) == metrics_port
        assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
    assert not env_of(default, workloads["fdpd-router"])["FDPD_API_KEY"]["secretKeyRef"].get(
        "optional")
    for name in ENGINES:
        c = container(workloads[name])
        env = env_of(default, workloads[name])
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports == {"zmq": int(env["FDPD_PORT"]), "metrics": int(env["FDPD_METRICS_PORT"])}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["httpGet"] == {"path": "/health", "port": "metrics"}, probe
        assert env["FDPD_ROUTER"] == "fdpd-router:8001"
        assert env["FDPD_KV_STORE"] == "redis://fdpd-redis:6379/0"
    budgets = by_kind(default, "PodDisruptionBudget")
    for name in (*ENGINES, "fdpd-router"):
        selector = budgets[name]["spec"]["selector"]["matchLabels"]
        assert selector == workloads[name]["spec"]["selector"]["matchLabels"]


def test_gpu_overlay_puts_engines_on_gpus():
    objects = render("overlays/gpu")
    workloads = {**by_kind(objects, "Deployment"), **by_kind(objects, "StatefulSet")}
    for name in ENGINES:
        c = container(workloads[name])
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert env_of(objects, workloads[name])["FDPD_DEVICE"] == "cuda"
        assert c["image"] == "fdpd:cuda"
    for name in ("fdpd-router", "fdpd-redis"):
        assert "nvidia.com/gpu" not in container(workloads[name])["resources"].get("limits", {})
    assert env_of(objects, workloads["fdpd-router"])["FDPD_DEVICE"] == "cpu"


# ---------------------------------------------------------------------- running it locally
class LocalPods(LocalServices):
    """One pod per workload as a local process: ``SERVICE:PORT`` becomes
    ``127.0.0.1:<free port>`` of the pod behind it, a container port named by an env value or a
    ``--port`` argument becomes that pod's free port, and the downward API gives the pod's name
    and 127.0.0.1."""

    def __init__(self, objects: list[dict], secret: dict[str, str], log_dir: Path):
        super().__init__(log_dir)
        self.objects = objects
        self.secret = secret
        self.workloads = {**by_kind(objects, "Deployment"), **by_kind(objects, "StatefulSet")}
        self.pod = {w: f"{w}-0" for w in self.workloads}
        self.ports: dict[tuple[str, int], int] = {}
        self.named: dict[tuple[str, str], int] = {}
        for w, obj in self.workloads.items():
            for p in container(obj).get("ports", []):
                self.ports[(w, p["containerPort"])] = free_port()
                self.named[(w, p["name"])] = p["containerPort"]
        self.service_port: dict[tuple[str, int], int] = {}
        for name, svc in by_kind(objects, "Service").items():
            (w,) = [w for w, obj in self.workloads.items() if svc["spec"]["selector"].items()
                    <= obj["spec"]["template"]["metadata"]["labels"].items()]
            for p in svc["spec"]["ports"]:
                self.service_port[(name, p["port"])] = self.local(w, p["targetPort"])
        hosts = "|".join(re.escape(n) for n, _ in self.service_port)
        self._host_port = re.compile(rf"\b({hosts}):(\d+)\b")

    def local(self, workload: str, port: int | str) -> int:
        if isinstance(port, str):
            port = self.named[(workload, port)]
        return self.ports[(workload, port)]

    def rewrite(self, workload: str, key: str, value: str) -> str:
        """``SERVICE:PORT`` in any value; a ``*_PORT`` variable naming a container port."""
        value = self._host_port.sub(
            lambda m: f"127.0.0.1:{self.service_port[(m.group(1), int(m.group(2)))]}", value)
        if key.endswith("_PORT"):
            return str(self.local(workload, int(value)))
        return value

    def argv(self, workload: str, words: list[str]) -> list[str]:
        return local_argv(words, lambda port: self.local(workload, port))

    def env(self, workload: str) -> dict[str, str]:
        env = {}
        for key, value in env_of(self.objects, self.workloads[workload]).items():
            if isinstance(value, str):
                env[key] = self.rewrite(workload, key, value)
            elif "fieldRef" in value:
                field = value["fieldRef"]["fieldPath"]
                env[key] = {"metadata.name": self.pod[workload], "status.podIP": "127.0.0.1"}[
                    field]
            else:
                env[key] = self.secret[value["secretKeyRef"]["key"]]
        if env.get("FDPD_HOST") == "0.0.0.0":
            env["FDPD_HOST"] = "127.0.0.1"                  # loopback only, in a test
        if "FDPD_TORCH_THREADS" in env:
            env["FDPD_TORCH_THREADS"] = "1"                 # 2 shared cores here
        return child_env(env, str(ROOT))

    def start(self, workload: str) -> None:
        c = container(self.workloads[workload])
        self.launch(workload, self.argv(workload, [*c["command"], *c.get("args", [])]),
                    self.env(workload))

    def probe(self, workload: str, kind: str) -> bool:
        """Run the container's ``kind`` probe once, as the kubelet would."""
        spec = container(self.workloads[workload])[kind]
        if "httpGet" in spec:
            port = self.local(workload, spec["httpGet"]["port"])
            try:
                r = httpx.get(f"http://127.0.0.1:{port}{spec['httpGet']['path']}", timeout=5)
            except httpx.HTTPError:
                return False
            return 200 <= r.status_code < 400
        if "tcpSocket" in spec:
            try:
                socket.create_connection(
                    ("127.0.0.1", self.local(workload, spec["tcpSocket"]["port"])), 2).close()
                return True
            except OSError:
                return False
        out = subprocess.run(self.argv(workload, spec["exec"]["command"]), capture_output=True,
                             timeout=30)
        return out.returncode == 0

    def wait_probe(self, workload: str, kind: str, timeout: float = 90) -> None:
        self.wait_until(workload, lambda: self.probe(workload, kind), timeout, kind)


def reference(items: list[tuple[list[int], int]]) -> list[list[int]]:
    from fdpd import LLM, SamplingParams

    outs = LLM("tiny", num_kv_blocks=1024).generate(
        [{"prompt_token_ids": p} for p, _ in items],
        [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for _, n in items])
    return [list(o.outputs[0].token_ids) for o in outs]


def test_rendered_containers_run_locally_serve_exactly_and_drain(default, tmp_path):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install -y redis-server)")
    secret = {"cluster-secret": secrets.token_hex(32), "api-key": secrets.token_hex(16)}
    pods = LocalPods(default, secret, tmp_path)
    try:
        pods.start("fdpd-redis")
        pods.wait_probe("fdpd-redis", "readinessProbe", 20)
        for name in ("fdpd-router", *ENGINES):
            pods.start(name)
        for name in ENGINES:
            pods.wait_probe(name, "startupProbe")
            pods.wait_probe(name, "readinessProbe", 10)
        pods.wait_probe("fdpd-router", "readinessProbe", 30)
        for name in ("fdpd-router", "fdpd-redis", *ENGINES):
            assert pods.probe(name, "livenessProbe"), name

        base = f"http://127.0.0.1:{pods.service_port[('fdpd-router', 8000)]}"
        auth = {"Authorization": f"Bearer {secret['api-key']}"}
        with httpx.Client(base_url=base, timeout=60, headers=auth) as client:
            views = client.get("/v1/cluster").json()["instances"]
            assert {v["instance_id"] for v in views} == {"fdpd-prefill-0", "fdpd-decode-0"}
            items = [([7 * i + j for j in range(20 + 9 * i)], 6 + i) for i in range(4)]
            got = [complete(client, "/v1/completions", {**GREEDY, "prompt": p, "max_tokens": n})
                   for p, n in items]
            assert all(o.ok for o in got), [(o.status, o.error) for o in got]
            assert [o.token_ids for o in got] == reference(items)
        assert httpx.post(f"{base}/v1/completions", json={"prompt": "x"}).status_code == 401

        # A rolling update: the kubelet runs preStop, then SIGTERM; the decode drains and
        # exits 0 well within the grace period.
        decode = pods.workloads["fdpd-decode"]["spec"]["template"]["spec"]
        pods.procs["fdpd-decode"].signal(signal.SIGTERM)
        code = pods.procs["fdpd-decode"].wait(decode["terminationGracePeriodSeconds"] - 5)
        assert code == 0, pods.logs()
    except BaseException:
        print(pods.logs())
        raise
    finally:
        pods.stop()
