"""Moving KV blocks between two engines' caches: one gather on the sender, one copy on the
receiver, nothing in between.

A frame is the C-order bytes of a ``[layers, 2, num_blocks, block_size, kv_heads, head_dim]``
tensor; dtype and shape travel in the ``KVBlocks`` header beside it. The sender gathers each
chunk of (non-contiguous) blocks into a staging buffer from a ``StagingPool`` and hands the
frame to the transport zero-copy with a tracker; the buffer goes back to the pool only when the
tracker says libzmq released it, so it is never overwritten while it may still be read. (Reusing
warm buffers matters: gathering into freshly mapped memory page-faults at ~2-3 GB/s here, slower
than the wire.) Chunks are cut at ``MAX_FRAME_BYTES`` so the receiver copies chunk k while chunk
k+1 is on the wire.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
import zmq

from fdpd.faults import fault_point
from fdpd.pd.protocol import KVBlocks, Message

MAX_FRAME_BYTES = 8 * 2**20

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class KVFrameError(ValueError):
    """A KV frame that does not match what the receiver's cache can hold."""


def to_frame(blocks: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor (the view keeps the tensor alive)."""
    if blocks.device.type != "cpu":
        blocks = blocks.cpu()
    return memoryview(blocks.contiguous().view(torch.uint8).numpy()).cast("B")


def from_frame(buffer: memoryview | bytes, dtype: str, shape: Sequence[int],
               expect_dtype: torch.dtype, expect_tail: Sequence[int]) -> torch.Tensor:
    """View a received frame as KV blocks (no copy; the caller copies it into its cache once).
    Checks dtype, shape and size against the receiver's own cache layout."""
    if DTYPE_NAMES.get(expect_dtype) != dtype:
        raise KVFrameError(f"KV dtype {dtype!r} does not match this cache "
                           f"({DTYPE_NAMES.get(expect_dtype)})")
    shape = list(shape)
    # Everything about the header is the sender's word: a bad one is a KVFrameError, never
    # another exception (the caller fails the transfer on KVFrameError only).
    if len(shape) != 6 or any(type(s) is not int for s in shape) or shape[2] < 1 \
            or shape[0:2] != list(expect_tail[0:2]) or shape[3:] != list(expect_tail[3:]):
        raise KVFrameError(f"KV shape {shape} does not fit this cache's blocks "
                           f"{list(expect_tail)}")
    expected = expect_dtype.itemsize
    for s in shape:
        expected *= s
    if len(buffer) != expected:
        raise KVFrameError(f"KV frame has {len(buffer)} bytes, header says {expected}")
    flat = torch.frombuffer(buffer, dtype=torch.uint8)
    return flat.view(expect_dtype).view(shape)


class StagingPool:
    """Host buffers for outgoing KV, recycled only after zmq finished sending them."""

    def __init__(self, max_idle_bytes: int = 256 * 2**20):
        self._idle: dict[tuple, list[torch.Tensor]] = {}
        self._busy: list[tuple[zmq.MessageTracker, torch.Tensor]] = []
        self._idle_bytes = 0
        self.max_idle_bytes = max_idle_bytes
        self.allocated = 0

    def take(self, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        self.reclaim()
        free = self._idle.get((shape, dtype))
        if free:
            buf = free.pop()
            self._idle_bytes -= buf.numel() * buf.element_size()
            return buf
        self.allocated += 1
        return torch.empty(shape, dtype=dtype)

    def frame(self, buf: torch.Tensor) -> zmq.Frame:
        """A zero-copy tracked frame over ``buf``; ``buf`` is busy until the send completes."""
        frame = zmq.Frame(to_frame(buf), copy=False, track=True)
        self._busy.append((frame.tracker, buf))
        return frame

    def reclaim(self) -> None:
        still = []
        for tracker, buf in self._busy:
            if not tracker.done:
                still.append((tracker, buf))
                continue
            size = buf.numel() * buf.element_size()
            if self._idle_bytes + size <= self.max_idle_bytes:
                self._idle.setdefault((tuple(buf.shape), buf.dtype), []).append(buf)
                self._idle_bytes += size
        self._busy = still

    @property
    def num_busy(self) -> int:
        return len(self._busy)


def send_kv_blocks(send: Callable[[Message, list], None], kv_cache: torch.Tensor,
                   grant_id: str, req_id: str, block_ids: Sequence[int], first_index: int,
                   pool: StagingPool, max_frame_bytes: int = MAX_FRAME_BYTES) -> int:
    """Send the KV of ``block_ids`` (grant-relative indices from ``first_index``) in chunks.
    Returns the number of bytes sent."""
    per_block = kv_cache[:, :, 0].numel() * kv_cache.element_size()
    step = max(1, max_frame_bytes // per_block)
    sent = 0
    for i in range(0, len(block_ids), step):
        chunk = block_ids[i:i + step]
        index = torch.tensor(chunk, dtype=torch.long, device=kv_cache.device)
        shape = (*kv_cache.shape[:2], len(chunk), *kv_cache.shape[3:])
        staged = pool.take(shape, kv_cache.dtype)
        if kv_cache.device.type == "cpu":
            torch.index_select(kv_cache, 2, index, out=staged)     # the one gather
        else:
            staged.copy_(kv_cache.index_select(2, index))          # gather on GPU, then D2H
        send(KVBlocks(grant_id, req_id, first_index + i, len(chunk),
                      DTYPE_NAMES[staged.dtype], list(staged.shape)), [pool.frame(staged)])
        sent += staged.numel() * staged.element_size()
        fault_point("prefill.kv_send")
    return sent


def receive_kv_blocks(kv_cache: torch.Tensor, msg: KVBlocks, frames: Sequence,
                      block_ids: Sequence[int]) -> int:
    """Copy one KVBlocks message's frame into ``block_ids`` of ``kv_cache`` (the one copy).
    Raises KVFrameError, writing nothing, if the frame does not fit exactly."""
    if len(frames) != 1:
        raise KVFrameError(f"expected 1 KV frame, got {len(frames)}")
    buffer = frames[0].buffer if hasattr(frames[0], "buffer") else memoryview(frames[0])
    with warnings.catch_warnings():          # zmq's receive buffers are read-only; we only read
        warnings.simplefilter("ignore", UserWarning)
        data = from_frame(buffer, msg.dtype, msg.shape, kv_cache.dtype, kv_cache.shape)
    if data.shape[2] != len(block_ids):
        raise KVFrameError(f"{data.shape[2]} blocks of KV for {len(block_ids)} granted")
    index = torch.tensor(list(block_ids), dtype=torch.long, device=kv_cache.device)
    kv_cache.index_copy_(2, index, data.to(kv_cache.device))
    return data.numel() * data.element_size()
