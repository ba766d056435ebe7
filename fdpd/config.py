"""Engine configuration: one frozen schema, validated once, passed down explicitly.

Every field carries its help text in ``metadata`` so that the CLI flags, ``FDPD_*`` environment
variables and YAML files are all generated from this one place.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# Names only: this module is imported by torch-free processes (the router).
DTYPES = ("float32", "bfloat16", "float16")
KERNELS = ("auto", "native", "onednn", "torch")   # fdpd.model.kernels
# Shorter cluster secrets are refused: a short (password-like) secret can be guessed offline
# from a single captured message and its MAC.
MIN_CLUSTER_SECRET_BYTES = 16


class ConfigError(ValueError):
    """A configuration value is invalid. The message names the field and the limit."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


def _opt(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class EngineConfig:
    """Arguments of one engine (the core shared by the prefill, decode and mixed roles)."""

    model: str = _opt("tiny", "Model: 'tiny' (built in) or a local Hugging Face directory. "
                      "A router given none serves the model of the first instance that "
                      "registers, and refuses instances of any other model.")
    device: str = _opt("cpu", "Torch device: cpu or cuda[:N].")
    dtype: str = _opt("auto", "Weight/activation dtype: auto (from config.json), float32, "
                      "bfloat16 or float16.")
    kernels: str = _opt("auto", "GEMM backend of the linear layers, weights packed once: auto "
                        "(native on CPU, or oneDNN for bf16 on CPUs with bf16 GEMM instructions; "
                        "else torch), native (fdpd's float32 GEMM), onednn, or torch (plain "
                        "F.linear).")
    seed: int = _opt(0, "Base seed for sampling requests that give no seed of their own.")
    block_size: int = _opt(16, "Tokens per KV-cache block.")
    num_kv_blocks: int | None = _opt(None, "KV-cache pool size in blocks (default: derived from "
                                     "--kv-cache-memory).")
    kv_cache_memory: int = _opt(256 * 2**20, "Bytes for the KV cache when --num-kv-blocks is "
                                "not given.")
    max_num_seqs: int = _opt(64, "Most requests in one batch.")
    max_num_batched_tokens: int = _opt(512, "Token budget of one engine step (prefill chunks "
                                       "plus decodes).")
    max_model_len: int | None = _opt(None, "Longest prompt+output in tokens (default: the "
                                     "model's max_position_embeddings).")
    enable_prefix_caching: bool = _opt(True, "Reuse KV blocks of identical prompt prefixes.")
    scheduling_policy: str = _opt("auto", "Queue order: fcfs, priority (lower value first), "
                                  "shortest (fewest tokens left first, aged by waiting time) "
                                  "or auto (shortest on a prefill instance, else fcfs).")
    kv_store: str | None = _opt(None, "KV store for preempted (and, with "
                                "--kv-store-write-finished, finished) requests' KV: "
                                "disk:PATH | redis://HOST:PORT/DB | "
                                "redis-cluster://HOST:PORT[,HOST:PORT...] | "
                                "mooncake://MASTER?...")
    kv_store_timeout: float = _opt(2.0, "Seconds any one KV-store call may take before it "
                                   "counts as a miss.")
    kv_store_write_finished: bool = _opt(False, "Also write finished requests' KV to the store "
                                         "(reuse by the next turn of a chat on any instance).")
    kv_store_checkpoint: bool = _opt(False, "Decode: write each running request's KV blocks "
                                     "to the store as they fill, so that a request whose "
                                     "decode dies resumes elsewhere by restoring its KV "
                                     "instead of recomputing it (every generated block is "
                                     "written once: store bandwidth).")
    cost_model: str | None = _opt(None, "Benchmark the control plane without model compute: "
                                  "'PREFILL_US_PER_TOKEN,DECODE_MS_PER_STEP[,DECODE_MS_PER_SEQ]' "
                                  "replaces each forward pass by a sleep of that cost (weights "
                                  "are not loaded; KV blocks, transfers and outputs stay real).")

    def resolved_policy(self, role: str) -> str:
        """The queue order an engine of ``role`` runs: ``auto`` is shortest-first on a prefill
        instance (a short prompt never waits out a long one's chunks) and FCFS elsewhere."""
        if self.scheduling_policy != "auto":
            return self.scheduling_policy
        return "shortest" if role == "prefill" else "fcfs"

    def __post_init__(self) -> None:
        self._check_positive("block_size", "max_num_seqs", "max_num_batched_tokens",
                             "kv_cache_memory")
        if self.block_size & (self.block_size - 1):
            raise ConfigError("block_size", f"must be a power of two, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ConfigError("num_kv_blocks", f"must be >= 1, got {self.num_kv_blocks}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ConfigError("max_model_len", f"must be >= 1, got {self.max_model_len}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ConfigError("dtype", f"must be auto or one of {sorted(DTYPES)}, got "
                              f"{self.dtype!r}")
        if self.kernels not in KERNELS:
            raise ConfigError("kernels", f"must be one of {list(KERNELS)}, got {self.kernels!r}")
        if self.scheduling_policy not in ("auto", "fcfs", "priority", "shortest"):
            raise ConfigError("scheduling_policy", f"must be auto, fcfs, priority or shortest, "
                              f"got {self.scheduling_policy!r}")
        if not isinstance(self.kv_store_timeout, (int, float)) or not self.kv_store_timeout > 0:
            raise ConfigError("kv_store_timeout", f"must be a positive number of seconds, got "
                              f"{self.kv_store_timeout!r}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError("device", f"must be cpu or cuda[:N], got {self.device!r}")
        if self.cost_model is not None:
            parse_cost_model(self.cost_model)

    def _check_positive(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(name, f"must be a positive integer, got {value!r}")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ConfigError(unknown[0], f"unknown engine argument; known: {sorted(known)}")
        return cls(**kwargs)

    def replace(self, **changes: Any) -> EngineConfig:
        return dataclasses.replace(self, **changes)


def parse_cost_model(text: str) -> tuple[float, float, float]:
    """``--cost-model`` as (prefill us per token, decode ms per step, decode ms per sequence)."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if not 2 <= len(values) <= 3 or any(not v >= 0 or v == float("inf") for v in values):
        raise ConfigError("cost_model", f"expected PREFILL_US_PER_TOKEN,DECODE_MS_PER_STEP"
                          f"[,DECODE_MS_PER_SEQ] (finite numbers >= 0), got {text!r}")
    return values[0], values[1], values[2] if len(values) == 3 else 0.0


@dataclass(frozen=True)
class PDConfig:
    """Disaggregation knobs shared by router, prefill and decode."""

    reserve_tokens: int = _opt(256, "Reserve horizon H: decode keeps room for every running "
                               "request to grow by min(remaining, H) tokens before granting.")
    grant_ttl: float = _opt(30.0, "Seconds a decode grant (lease) lives without its KV "
                            "transfer completing; then its blocks are freed.")
    transfer_timeout: float = _opt(30.0, "Seconds a prefill waits for a decode's grant or "
                                   "reject, and a decode queues a request it cannot grant yet.")
    request_timeout: float = _opt(600.0, "Seconds a request may take end to end.")
    stream_kv_chunks: bool = _opt(True, "Prefill: send each finished chunk's KV blocks while "
                                  "the next chunk computes (once the grant is held), so only "
                                  "the last chunk's blocks are left to move after the prompt.")
    heartbeat_interval: float = _opt(0.5, "Seconds between instance heartbeats to the router.")
    # Peer authentication (fdpd.pd.auth). The secret itself is no flag (a command line shows in
    # `ps`) and never printed: repr=False, and --help shows no default for it.
    cluster_secret: str | None = field(default=None, repr=False, metadata={
        "help": "Cluster secret (at least 16 bytes, the same on every process of a cluster): "
                "every message between fdpd processes carries an HMAC made with it, and "
                "messages without a valid one are dropped. Set it in the environment (not on "
                "the command line, where `ps` shows it) or use --cluster-secret-file. Unset: "
                "messages are not authenticated (keep such a cluster on loopback).",
        "secret": True})
    cluster_secret_file: str | None = _opt(None, "File holding the cluster secret (trailing "
                                           "newlines ignored), instead of FDPD_CLUSTER_SECRET.")
    drain_timeout: float = _opt(30.0, "Seconds a SIGTERMed instance spends draining (no new "
                                "work; decode/mixed move running requests to other instances "
                                "through the KV store, prefill finishes its queue) before it "
                                "stops anyway. A second SIGTERM stops at once.")
    # Overload bounds. 1024 held requests stay well above what the instances behind one
    # router can run (16 engines x the default 64 seqs), so in normal operation the engines'
    # own bounds act first, while the router's memory stays bounded (a held request costs
    # its body, prompt ids and token queue: tens of KiB for typical prompts).
    max_inflight_requests: int = _opt(1024, "Router: most generation requests it holds at "
                                      "once (arrival to the response's end, streaming "
                                      "included); past it a request gets 429 with Retry-After "
                                      "before its body is read.")
    max_request_body_bytes: int | None = _opt(None, "Router: largest HTTP request body; a "
                                              "larger one gets 413 without being read "
                                              "(default: 16 bytes per token of --max-model-len,"
                                              " at least 1 MiB).")
    request_body_timeout: float = _opt(30.0, "Router: seconds a client may take to send a "
                                       "request body; a slower one gets 408 and gives its "
                                       "admission seat back.")
    max_resumes: int = _opt(2, "Router: times a request whose stream broke mid-way (its "
                            "decode died, dropped its connection, stopped heartbeating or "
                            "restarted) is resumed on another instance from prompt + the "
                            "tokens already sent; past it the stream ends with an error. 0 = "
                            "never (graceful drains are always resumed).")
    max_queued_requests: int = _opt(256, "Most requests queued on an instance: prefill: not "
                                    "yet prefilled; mixed: waiting to start; decode: grant "
                                    "requests waiting for room. Past it a new one is refused "
                                    "(the router retries it elsewhere or answers 503 with "
                                    "Retry-After).")

    def __post_init__(self) -> None:
        if not isinstance(self.reserve_tokens, int) or self.reserve_tokens < 0:
            raise ConfigError("reserve_tokens", f"must be an integer >= 0, got "
                              f"{self.reserve_tokens!r}")
        for name in ("grant_ttl", "transfer_timeout", "request_timeout", "heartbeat_interval",
                     "drain_timeout", "request_body_timeout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(name, f"must be a positive number of seconds, got {value!r}")
        if (not isinstance(self.max_resumes, int) or isinstance(self.max_resumes, bool)
                or self.max_resumes < 0):
            raise ConfigError("max_resumes", f"must be an integer >= 0, got "
                              f"{self.max_resumes!r}")
        for name in ("max_inflight_requests", "max_request_body_bytes", "max_queued_requests"):
            value = getattr(self, name)
            if value is None and name == "max_request_body_bytes":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(name, f"must be a positive integer, got {value!r}")
        # Not a field: derived (the file read once), and kept out of repr and comparisons.
        object.__setattr__(self, "_cluster_key", self._read_cluster_key())

    @property
    def cluster_key(self) -> bytes | None:
        """The cluster secret's bytes (from ``cluster_secret`` or the file), None if unset."""
        return self._cluster_key

    def _read_cluster_key(self) -> bytes | None:
        # Messages name the field and the rule, never the secret (nor its length).
        key = self.cluster_secret
        if key is not None and not isinstance(key, (str, bytes)):
            raise ConfigError("cluster_secret", "must be a string")
        if self.cluster_secret_file is not None:
            if key is not None:
                raise ConfigError("cluster_secret_file", "the cluster secret is given twice: "
                                  "set FDPD_CLUSTER_SECRET or --cluster-secret-file, not both")
            try:
                with open(self.cluster_secret_file, "rb") as f:
                    key = f.read().rstrip(b"\r\n")
            except OSError as e:
                raise ConfigError("cluster_secret_file", f"cannot read "
                                  f"{self.cluster_secret_file}: {e.strerror}") from None
        if key is None:
            return None
        key = key.encode() if isinstance(key, str) else key
        if len(key) < MIN_CLUSTER_SECRET_BYTES:
            name = "cluster_secret_file" if self.cluster_secret_file else "cluster_secret"
            raise ConfigError(name, f"a cluster secret needs at least "
                              f"{MIN_CLUSTER_SECRET_BYTES} bytes (make one with "
                              f"`openssl rand -hex 32`)")
        return key


ROLES = ("router", "prefill", "decode", "mixed")


@dataclass(frozen=True)
class InstanceConfig:
    """Where an instance listens and whom it reports to."""

    role: str = _opt("mixed", "prefill, decode, mixed or router.")
    host: str = _opt("127.0.0.1", "Address to bind (loopback unless told otherwise).")
    port: int = _opt(0, "Port of the instance's ZMQ inbox (router: the HTTP port); 0 = any.")
    router: str | None = _opt(None, "The router's control address HOST:PORT (instances "
                              "register there).")
    instance_id: str | None = _opt(None, "Stable name of this instance (default: role@address).")
    advertise_host: str | None = _opt(None, "Host name or address peers use to reach this "
                                      "process (default: --host; when --host is a wildcard "
                                      "such as 0.0.0.0: this machine's host name).")
    advertise_address: str | None = _opt(None, "Engine instances: tcp://HOST:PORT peers dial "
                                         "instead of the bound address, e.g. a proxy in front "
                                         "of this instance (overrides --advertise-host).")
    metrics_port: int = _opt(0, "Engine instances: port of the instance's own Prometheus "
                             "/metrics and /health endpoint on --host; 0 = any free port "
                             "(printed in the ready line and shown in /v1/cluster), "
                             "-1 = off.")
    restart_count: int = _opt(0, "Set by a supervisor (`fdpd up`, scripts/cluster-start) "
                              "when it restarts this process after it exited unexpectedly: "
                              "the times it did so, shown in /v1/cluster as `restarts`.")

    def __post_init__(self) -> None:
        if not isinstance(self.restart_count, int) or self.restart_count < 0:
            raise ConfigError("restart_count", f"must be an integer >= 0, got "
                              f"{self.restart_count!r}")
        if self.role not in ROLES:
            raise ConfigError("role", f"must be one of {', '.join(ROLES)}, got {self.role!r}")
        if not isinstance(self.port, int) or not 0 <= self.port < 65536:
            raise ConfigError("port", f"must be 0..65535, got {self.port!r}")
        if self.router is not None and ":" not in self.router:
            raise ConfigError("router", f"expected HOST:PORT, got {self.router!r}")
        if not isinstance(self.metrics_port, int) or not -1 <= self.metrics_port < 65536:
            raise ConfigError("metrics_port", f"must be -1 (off), 0 (any) or a port, got "
                              f"{self.metrics_port!r}")
        if self.advertise_address is not None:
            _, sep, port = self.advertise_address.rpartition(":")
            if (not self.advertise_address.startswith("tcp://") or not sep
                    or len(self.advertise_address) <= len("tcp://") + len(port) + 1
                    or not port.isdigit() or not 0 < int(port) < 65536):
                raise ConfigError("advertise_address", f"expected tcp://HOST:PORT, got "
                                  f"{self.advertise_address!r}")

    def advertised(self, address: str) -> str:
        """``tcp://HOST:PORT`` as peers must dial it: ``advertise_address`` if set, else the
        bound port on the advertised host."""
        if self.advertise_address is not None:
            return self.advertise_address
        return advertised_address(address, self.advertise_host)


WILDCARD_HOSTS = ("0.0.0.0", "::", "*", "[::]")


def advertised_address(address: str, advertise_host: str | None) -> str:
    """Replace the host of a bound ``tcp://HOST:PORT`` by ``advertise_host``, or, when it was
    bound to a wildcard, by this machine's host name (a wildcard cannot be dialled)."""
    scheme, _, rest = address.partition("://")
    host, _, port = rest.rpartition(":")
    if advertise_host:
        host = advertise_host
    elif host in WILDCARD_HOSTS:
        import socket

        host = socket.gethostname()
    return f"{scheme}://{host}:{port}"
