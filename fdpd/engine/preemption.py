"""What happens to KV that leaves the running set: the seam between the scheduler and a KV
store (DESIGN 7).

The scheduler calls a ``PreemptionHandler`` on its own thread; every method must return at once
(any I/O happens elsewhere, see ``fdpd.kvstore.offload``). The default drops KV, so a preempted
request recomputes it (minus prefix-cache hits); a store-backed handler writes it back first and
can restore it on readmission.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from fdpd.engine.block_manager import BlockManager
from fdpd.engine.request import Request

if TYPE_CHECKING:
    from fdpd.engine.scheduler import Scheduler


class PreemptionHandler(Protocol):
    restores: bool      # True if lookup/load can bring KV back from a store

    def preempt(self, request: Request, block_manager: BlockManager) -> None:
        """Take ``request``'s blocks: free them now, or pin them for a write-back and free
        them when it is acknowledged."""

    def retire(self, request: Request, block_manager: BlockManager) -> None:
        """Take a finished request's blocks (free, or write back first: output caching)."""

    def releasing_blocks(self) -> int:
        """Blocks pinned by write-backs in flight: free soon, without preempting anyone."""

    def lookup(self, req_id: str, start: int, keys: Sequence[bytes]) -> bool:
        """Ask (asynchronously) how many leading ``keys`` the store holds; the answer comes
        through ``collect`` as ``scheduler.lookup_done``. False if it could not be asked."""

    def load(self, req_id: str, block_ids: Sequence[int], keys: Sequence[bytes]) -> bool:
        """Fill ``block_ids`` from the store (asynchronously); the answer comes through
        ``collect`` as ``scheduler.load_done``. False if it could not be started."""

    def collect(self, scheduler: Scheduler, timeout: float = 0.0) -> None:
        """Deliver finished work to the scheduler; wait up to ``timeout`` for the first."""

    def pending(self) -> int:
        """Jobs in flight."""


class RecomputePreemption:
    """Drop the KV; the request recomputes it (minus prefix-cache hits) when readmitted."""

    restores = False

    def preempt(self, request: Request, block_manager: BlockManager) -> None:
        block_manager.free(request.request_id)

    def retire(self, request: Request, block_manager: BlockManager) -> None:
        block_manager.free(request.request_id)

    def releasing_blocks(self) -> int:
        return 0

    def lookup(self, req_id: str, start: int, keys: Sequence[bytes]) -> bool:
        return False

    def load(self, req_id: str, block_ids: Sequence[int], keys: Sequence[bytes]) -> bool:
        return False

    def collect(self, scheduler: Scheduler, timeout: float = 0.0) -> None:
        return None

    def pending(self) -> int:
        return 0
