"""The router's view of the cluster: who is registered, alive, and how loaded.

An instance is identified by its ``instance_id``; a restart shows up as the same id with a larger
epoch and replaces the old entry. An instance is healthy while its heartbeats arrive within
``timeout`` seconds; one that misses them is marked dead (not forgotten, so /v1/cluster shows it)
and gets no new requests until it registers again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from fdpd.pd.protocol import Register


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
            "metrics_address", "draining", "migrated", "restarts") if k in load})
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


class Registry:
    def __init__(self, timeout: float):
        self.timeout = timeout
        self.instances: dict[str, Instance] = {}

    def register(self, msg: Register, epoch: int) -> tuple[bool, str]:
        peers = [i for i in self.instances.values()
                 if i.healthy and i.instance_id != msg.instance_id]
        if peers and peers[0].fingerprint != msg.fingerprint:
            return False, (f"model fingerprint differs from the cluster's ({peers[0].model}, "
                           f"block size {peers[0].block_size}): every instance must serve "
                           "the same model, dtype and block size")
        old = self.instances.get(msg.instance_id)
        if old is not None and epoch < old.epoch:
            return False, "stale epoch: a newer incarnation of this instance is registered"
        self.instances[msg.instance_id] = Instance(
            msg.instance_id, msg.role, msg.address, epoch, msg.model, msg.block_size,
            msg.num_blocks, msg.max_model_len, msg.fingerprint, time.monotonic())
        return True, ""

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
