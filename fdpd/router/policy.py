"""Choosing instances for a request: prefill by prefix affinity and load, decode by headroom.

Prefix affinity: the router remembers, for the chained hashes of recent prompts' leading blocks,
which prefill instance computed them. A prompt goes to the instance that holds its longest
cached prefix, unless the tokens queued there outweigh the tokens it would save. Decode goes to
the instance with the most headroom (free minus reserved blocks, from its last heartbeat, minus
what the router sent it since).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from fdpd.engine.block_manager import chain_hash
from fdpd.router.registry import Instance

ROUTING_SEED = b"fdpd-router-affinity"


class PrefixAffinity:
    """Bounded LRU map: block-chain hash -> instance id that computed it."""

    def __init__(self, block_size: int = 16, capacity: int = 200_000):
        self.block_size = block_size
        self.capacity = capacity
        self._owner: OrderedDict[bytes, str] = OrderedDict()

    def hashes(self, token_ids: Sequence[int]) -> list[bytes]:
        out, parent, bs = [], ROUTING_SEED, self.block_size
        for k in range(len(token_ids) // bs):
            parent = chain_hash(parent, token_ids[k * bs:(k + 1) * bs])
            out.append(parent)
        return out

    def matched_tokens(self, hashes: Sequence[bytes], instance_id: str) -> int:
        """Tokens of the deepest block ``instance_id`` computed last. A chained hash names its
        whole prefix, so that instance holds every block before it too; stopping at the first
        block recorded for someone else instead made a prefix every prompt shares (a system
        prompt, last recorded for whichever instance served the latest request) hide all
        deeper matches (Mooncake conversation trace, 4 P: hit ratio 0.134 against 0.268 for
        one LRU cache of the same capacity)."""
        n = 0
        for k, h in enumerate(hashes):
            if self._owner.get(h) == instance_id:
                n = k + 1
        return n * self.block_size

    def record(self, hashes: Sequence[bytes], instance_id: str) -> None:
        for h in hashes:
            self._owner[h] = instance_id
            self._owner.move_to_end(h)
        while len(self._owner) > self.capacity:
            self._owner.popitem(last=False)


def queued_tokens(inst: Instance) -> int:
    load = inst.load
    return int(load.get("waiting", 0)) * 64 + inst.outstanding_tokens


def choose_prefill(candidates: Sequence[Instance], hashes: Sequence[bytes],
                   affinity: PrefixAffinity) -> Instance | None:
    if not candidates:
        return None
    return max(candidates, key=lambda i: (affinity.matched_tokens(hashes, i.instance_id)
                                          - queued_tokens(i), -i.outstanding))


def decode_headroom(inst: Instance) -> int:
    ledger = inst.load.get("ledger") or {}
    headroom = ledger.get("headroom_blocks", inst.num_blocks)
    return headroom - inst.outstanding_tokens // max(1, inst.block_size)


def choose_decode(candidates: Sequence[Instance]) -> Instance | None:
    if not candidates:
        return None
    return max(candidates, key=lambda i: (decode_headroom(i), -i.outstanding))


def choose_mixed(candidates: Sequence[Instance], hashes: Sequence[bytes],
                 affinity: PrefixAffinity) -> Instance | None:
    if not candidates:
        return None
    return max(candidates, key=lambda i: (affinity.matched_tokens(hashes, i.instance_id)
                                          - queued_tokens(i) - int(i.load.get("running", 0)),
                                          -i.outstanding))
