"""Moving KV blocks between two engines' caches: no copy on a CPU sender, one on the receiver.

The KV cache is block-major (``[num_blocks, layers, 2, block_size, kv_heads, head_dim]``, see
``fdpd.engine.runner``), so one block's KV across all layers is one contiguous piece of memory.

Wire format of a ``KVBlocks`` message: ``shape`` is ``[layers, 2, n, block_size, kv_heads,
head_dim]`` (the n blocks' KV as one logical tensor) and the KV travels either as **n frames**,
frame j holding block j's ``[layers, 2, block_size, kv_heads, head_dim]`` in C order, or as
**one frame** holding the whole tensor in C order. (For n = 1 the two are the same bytes.)

- A CPU sender sends n frames, each a zero-copy view of a cache block, tracked: the caller must
  keep those blocks from being reused (written) until every tracker says libzmq released the
  frame (``send_kv_blocks`` returns the trackers; the prefill holds the request's blocks until
  then). No gather, no staging copy.
- A GPU sender gathers the blocks on the device and copies them once into a host staging buffer
  from a ``StagingPool`` (recycled only after its send completed): one frame.
- The receiver copies each frame into its granted blocks: the one copy (frames alias zmq's
  receive buffers, which are freed when the message is).

Messages are cut at ``MAX_MESSAGE_BYTES`` so the receiver copies message k into its cache while
message k+1 is on the wire.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
import zmq

from fdpd.faults import fault_point
from fdpd.pd.protocol import KVBlocks, Message

MAX_MESSAGE_BYTES = 8 * 2**20

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


def block_layout(kv_cache: torch.Tensor) -> tuple[int, ...]:
    """``(layers, 2, block_size, kv_heads, head_dim)``: one block of this block-major cache."""
    return tuple(kv_cache.shape[1:])


def wire_shape(kv_cache: torch.Tensor, num_blocks: int) -> list[int]:
    """The ``KVBlocks.shape`` of ``num_blocks`` blocks of this cache."""
    layers, two, *tail = block_layout(kv_cache)
    return [layers, two, num_blocks, *tail]


def send_kv_blocks(send: Callable[[Message, list], None], kv_cache: torch.Tensor,
                   grant_id: str, req_id: str, block_ids: Sequence[int], first_index: int,
                   pool: StagingPool, max_message_bytes: int = MAX_MESSAGE_BYTES,
                   trackers: list[zmq.MessageTracker] | None = None,
                   copy: bool = False) -> int:
    """Send the KV of ``block_ids`` (grant-relative indices from ``first_index``) in messages
    of at most ``max_message_bytes``. Returns the bytes sent. The tracker of every frame that
    views ``kv_cache`` directly is appended to ``trackers`` as the frame is made (so a caller
    has them even if a later send raises): those blocks must not be written until all are
    done. ``copy``: each CPU block is copied into a frame of its own instead (one memcpy, no
    tracker): for blocks whose owner goes on computing and may be preempted or aborted,
    and so freed and reused, before the send completes (chunks streamed during a prefill)."""
    trackers = [] if trackers is None else trackers
    per_block = kv_cache[0].numel() * kv_cache.element_size()
    step = max(1, max_message_bytes // per_block)
    dtype = DTYPE_NAMES[kv_cache.dtype]
    on_cpu = kv_cache.device.type == "cpu"
    sent = 0
    for i in range(0, len(block_ids), step):
        chunk = block_ids[i:i + step]
        if on_cpu and copy:
            frames = [bytes(to_frame(kv_cache[b])) for b in chunk]
        elif on_cpu:
            frames = []
            for b in chunk:
                frame = zmq.Frame(to_frame(kv_cache[b]), copy=False, track=True)
                trackers.append(frame.tracker)
                frames.append(frame)
        else:
            index = torch.tensor(chunk, dtype=torch.long, device=kv_cache.device)
            # A fresh staging buffer per message: copy=True needs nothing more on a GPU.
            staged = pool.take(tuple(wire_shape(kv_cache, len(chunk))), kv_cache.dtype)
            # Gather on the device, lay out as the wire's [layers, 2, n, ...], then D2H once.
            staged.copy_(kv_cache.index_select(0, index).permute(1, 2, 0, 3, 4, 5))
            frames = [pool.frame(staged)]
        send(KVBlocks(grant_id, req_id, first_index + i, len(chunk), dtype,
                      wire_shape(kv_cache, len(chunk))), frames)
        sent += len(chunk) * per_block
        fault_point("prefill.kv_send")
    return sent


def _buffer(frame) -> memoryview:
    return frame.buffer if hasattr(frame, "buffer") else memoryview(frame)


def receive_kv_blocks(kv_cache: torch.Tensor, msg: KVBlocks, frames: Sequence,
                      block_ids: Sequence[int]) -> int:
    """Copy one KVBlocks message's frames into ``block_ids`` of ``kv_cache`` (the one copy).
    Raises KVFrameError, writing nothing, if the frames do not fit exactly."""
    n = len(block_ids)
    layers, two, *tail = block_layout(kv_cache)
    logical = [layers, two, 0, *tail]
    with warnings.catch_warnings():          # zmq's receive buffers are read-only; we only read
        warnings.simplefilter("ignore", UserWarning)
        if len(frames) == 1:
            data = from_frame(_buffer(frames[0]), msg.dtype, msg.shape, kv_cache.dtype, logical)
            if data.shape[2] != n:
                raise KVFrameError(f"{data.shape[2]} blocks of KV for {n} granted")
            index = torch.tensor(list(block_ids), dtype=torch.long, device=kv_cache.device)
            # [layers, 2, n, ...] -> [n, layers, 2, ...]: a strided read, one copy.
            kv_cache.index_copy_(0, index, data.permute(2, 0, 1, 3, 4, 5).to(kv_cache.device))
            return data.numel() * data.element_size()
        if len(frames) != n or msg.shape[2:3] != [n]:
            raise KVFrameError(f"{len(frames)} KV frames for {n} granted blocks "
                               f"(header shape {list(msg.shape)[:6]})")
        one = [layers, two, 1, *tail]
        if list(msg.shape) != [layers, two, n, *tail]:
            raise KVFrameError(f"KV shape {list(msg.shape)[:6]} does not fit this cache's "
                               f"blocks {logical}")
        blocks = [from_frame(_buffer(f), msg.dtype, one, kv_cache.dtype, logical)
                  for f in frames]                  # every frame checked before any write
    for b, data in zip(block_ids, blocks):
        kv_cache[b].copy_(data.view(block_layout(kv_cache)))
    return n * blocks[0].numel() * blocks[0].element_size()
