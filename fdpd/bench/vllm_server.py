"""vLLM as a benchmarked system: ``vllm serve`` started from its own environment on the same
model directory and the same share of the machine as the fdpd clusters it is compared with.

vLLM lives in a separate virtual environment (``scripts/setup-vllm`` makes ``.venv-vllm``; it
pins its own torch), so it is started as a program, never imported. Its CPU backend is sized by
environment variables: ``VLLM_CPU_OMP_THREADS_BIND`` (the cores its OpenMP threads are pinned
to: ``0-1`` = two threads on cores 0 and 1) and ``VLLM_CPU_KVCACHE_SPACE`` (KV cache, GiB).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from fdpd.testing.processes import free_port

REPO_VENV_BINARY = Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "vllm"


def default_vllm_binary() -> str | None:
    """``FDPD_VLLM_BIN``, else the repository's ``.venv-vllm/bin/vllm``, else ``vllm`` on
    PATH (None when there is none)."""
    env = os.environ.get("FDPD_VLLM_BIN")
    if env:
        return env
    if REPO_VENV_BINARY.is_file():
        return str(REPO_VENV_BINARY)
    return shutil.which("vllm")


@dataclass(frozen=True)
class VLLMSettings:
    """How to start ``vllm serve`` for a comparison (``bench compare --vllm-*``)."""

    binary: str
    threads_bind: str = "0-1"           # VLLM_CPU_OMP_THREADS_BIND
    kvcache_gib: float = 4.0            # VLLM_CPU_KVCACHE_SPACE
    args: tuple[str, ...] = ()          # extra `vllm serve` flags
    startup_timeout: float = 600.0
    host: str = "127.0.0.1"
    served_model_name: str = "model"
    dtype: str = "auto"

    def __post_init__(self):
        if self.kvcache_gib <= 0:
            raise ValueError(f"--vllm-kvcache-gib: must be > 0, got {self.kvcache_gib}")
        if not self.threads_bind or any(c not in "0123456789-,|" for c in self.threads_bind):
            raise ValueError(f"--vllm-threads-bind: a CPU list such as 0-1 or 0,2, got "
                             f"{self.threads_bind!r}")

    def command(self, model: str, port: int) -> list[str]:
        return [self.binary, "serve", model, "--host", self.host, "--port", str(port),
                "--served-model-name", self.served_model_name, "--dtype", self.dtype,
                "--seed", "0", "--disable-uvicorn-access-log", "--uvicorn-log-level",
                "warning", *self.args]

    def environment(self, base: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        # fdpd's own variables (PYTHONPATH of the fdpd venv) must not leak into vLLM's Python.
        env.pop("PYTHONPATH", None)
        env.update({"VLLM_CPU_OMP_THREADS_BIND": self.threads_bind,
                    "VLLM_CPU_KVCACHE_SPACE": f"{self.kvcache_gib:g}",
                    "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1",
                    "TOKENIZERS_PARALLELISM": "false"})
        return env


@dataclass
class VLLMServer:
    """One ``vllm serve`` process group: started in its own session, stopped by its pgid."""

    settings: VLLMSettings
    model: str
    log_path: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.settings.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.settings.command(self.model, self.port),
                                         stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT,
                                         env=self.settings.environment(),
                                         start_new_session=True)
        deadline = time.monotonic() + self.settings.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode} while "
                                   f"starting; its log: {self.log_path}\n{self._log_tail()}")
            if self._serving():
                return
            time.sleep(1.0)
        self.close()
        raise RuntimeError(f"vllm serve was not ready (/health, /v1/models) within "
                           f"{self.settings.startup_timeout:g} s; its log: {self.log_path}")

    def _serving(self) -> bool:
        """/health answers 200 (the engine is up) and /v1/models lists the model."""
        try:
            with urllib.request.urlopen(self.base_url + "/health", timeout=2) as r:
                if r.status != 200:
                    return False
            with urllib.request.urlopen(self.base_url + "/v1/models", timeout=2) as r:
                return bool(json.load(r).get("data"))
        except (OSError, ValueError):
            return False

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def close(self, grace: float = 20.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # The engine core may outlive the API server for a moment; the group goes with it.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
