"""The router's view of the cluster: who is registered, alive, and how loaded.

An instance is identified by its ``instance_id``; a restart shows up as the same id with a larger
epoch and replaces the old entry. An instance is healthy while its heartbeats arrive within
``timeout`` seconds; one that misses them is marked dead (not forgotten, so /v1/cluster shows it)
and gets no new requests until it registers again. An instance refused at registration (another
model than the router's, see ``fdpd.router.cluster_model``) is kept in ``refused`` for
/v1/cluster while it keeps trying, until it registers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fdpd.pd.protocol import Register

log = logging.getLogger(__name__)
MAX_REFUSALS = 64              # refused instances kept for /v1/cluster (oldest dropped first)


@dataclass
class Instance:
    instance_id: str
    role: str
    address: str
    epoch: int
    model: str
    block_size: int
    num_blocks: int
    max_model_len: int
    fingerprint: bytes
    last_seen: float
    load: dict = field(default_factory=dict)
    healthy: bool = True
    # Requests the router sent here that the instance has not reported on yet (herding guard).
    outstanding: int = 0
    outstanding_tokens: int = 0

    def view(self) -> dict:
        out = {"instance_id": self.instance_id, "role": self.role, "address": self.address,
               "epoch": self.epoch, "healthy": self.healthy,
               "seconds_since_heartbeat": round(time.monotonic() - self.last_seen, 3),
               "num_blocks": self.num_blocks, "block_size": self.block_size,
               "outstanding": self.outstanding}
        load = self.load
        out.update({k: load.get(k) for k in (
            "running", "waiting", "free_blocks", "kv_usage", "num_preemptions",
            "num_restored_tokens", "num_recomputed_tokens", "num_computed_prompt_tokens",
            "prefix_queried_tokens", "prefix_hit_tokens", "kv_store", "num_restores",
            "metrics_address", "draining", "migrated", "first_tokens_early",
            "kv_blocks_streamed", "restarts") if k in load})
        # Fault counters: malformed/stale messages, handler bugs, dropped KV.
        out.update({k: load[k] for k in ("transport", "unexpected_messages", "handler_errors",
                                         "kv_dropped", "transfer_failures") if k in load})
        ledger = load.get("ledger")
        if ledger:
            out.update({"reserved_blocks": ledger["reserved_blocks"],
                        "pending_grants": ledger["pending_grants"],
                        "pending_grant_blocks": ledger["pending_grant_blocks"],
                        "pending_reserved_blocks": ledger["pending_reserved_blocks"],
                        "waiting_allocs": ledger["waiting_allocs"],
                        "headroom_blocks": ledger["headroom_blocks"],
                        "ledger": ledger})
        return out


@dataclass
class Refusal:
    """An instance the router would not take, kept for /v1/cluster until it registers."""

    instance_id: str
    role: str
    address: str
    model: str
    reason: str
    epoch: int
    attempts: int = 1
    last_seen: float = field(default_factory=time.monotonic)

    def view(self) -> dict:
        return {"instance_id": self.instance_id, "role": self.role, "address": self.address,
                "model": self.model, "reason": self.reason, "epoch": self.epoch,
                "attempts": self.attempts,
                "seconds_since_attempt": round(time.monotonic() - self.last_seen, 3)}


class Registry:
    """``admit_model(register) -> why not`` ('' to admit) is the router's model check
    (``fdpd.router.cluster_model.ClusterModel.admit``); without one any model is taken."""

    def __init__(self, timeout: float, admit_model: Callable[[Register], str] | None = None):
        self.timeout = timeout
        self.instances: dict[str, Instance] = {}
        self.refused: dict[str, Refusal] = {}
        self._admit_model = admit_model

    def register(self, msg: Register, epoch: int) -> tuple[bool, str]:
        why = self._admit_model(msg) if self._admit_model is not None else ""
        peers = [i for i in self.instances.values()
                 if i.healthy and i.instance_id != msg.instance_id]
        if not why and peers and peers[0].fingerprint != msg.fingerprint:
            why = (f"model fingerprint differs from the cluster's ({peers[0].model}, "
                   f"block size {peers[0].block_size}): every instance must serve "
                   "the same model, dtype and block size")
        if why:
            self._refuse(msg, epoch, why)
            return False, why
        old = self.instances.get(msg.instance_id)
        if old is not None and epoch < old.epoch:
            return False, "stale epoch: a newer incarnation of this instance is registered"
        self.instances[msg.instance_id] = Instance(
            msg.instance_id, msg.role, msg.address, epoch, msg.model, msg.block_size,
            msg.num_blocks, msg.max_model_len, msg.fingerprint, time.monotonic())
        self.refused.pop(msg.instance_id, None)
        return True, ""

    def _refuse(self, msg: Register, epoch: int, why: str) -> None:
        # An unregistered instance retries every heartbeat: log a refusal once, count the rest.
        old = self.refused.get(msg.instance_id)
        if old is not None and old.reason == why and old.epoch == epoch:
            old.attempts += 1
            old.last_seen = time.monotonic()
            return
        log.warning("refused instance %s (%s at %s): %s", msg.instance_id, msg.role,
                    msg.address, why)
        self.refused.pop(msg.instance_id, None)
        while len(self.refused) >= MAX_REFUSALS:       # bounded, whoever sends Registers
            del self.refused[next(iter(self.refused))]
        self.refused[msg.instance_id] = Refusal(msg.instance_id, msg.role, msg.address,
                                                msg.model, why, epoch)

    def heartbeat(self, instance_id: str, epoch: int, load: dict) -> bool:
        """Record a heartbeat; False if this incarnation is not registered (re-register)."""
        inst = self.instances.get(instance_id)
        if inst is None or inst.epoch != epoch or not inst.healthy:
            return False
        inst.last_seen = time.monotonic()
        inst.load = load
        inst.outstanding = 0                   # the load report now includes them
        inst.outstanding_tokens = 0
        return True

    def expire(self) -> list[Instance]:
        """Mark instances whose heartbeats stopped; return the newly dead ones."""
        now = time.monotonic()
        dead = [i for i in self.instances.values()
                if i.healthy and now - i.last_seen > self.timeout]
        # A refused instance retries every heartbeat; one that stopped trying is gone.
        for gone in [k for k, r in self.refused.items() if now - r.last_seen > self.timeout]:
            del self.refused[gone]
        for inst in dead:
            inst.healthy = False
        return dead

    def mark_dead(self, instance_id: str) -> None:
        inst = self.instances.get(instance_id)
        if inst is not None:
            inst.healthy = False

    def healthy(self, role: str) -> list[Instance]:
        return [i for i in self.instances.values() if i.healthy and i.role == role]

    def routable(self, role: str) -> list[Instance]:
        """Healthy instances that take new requests (not draining)."""
        return [i for i in self.instances.values()
                if i.healthy and i.role == role and not i.load.get("draining")]

    def get(self, instance_id: str) -> Instance | None:
        return self.instances.get(instance_id)
