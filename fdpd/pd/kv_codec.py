"""KV blocks <-> raw frames. A frame is the C-order bytes of a
``[layers, 2, num_blocks, block_size, kv_heads, head_dim]`` tensor; dtype and shape travel in
the ``KVBlocks`` header beside it."""

from __future__ import annotations

from collections.abc import Sequence

import torch

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
    shape = [int(s) for s in shape]
    if len(shape) != 6 or shape[0:2] != list(expect_tail[0:2]) \
            or shape[3:] != list(expect_tail[3:]):
        raise KVFrameError(f"KV shape {shape} does not fit this cache's blocks "
                           f"{list(expect_tail)}")
    expected = expect_dtype.itemsize
    for s in shape:
        expected *= s
    if len(buffer) != expected:
        raise KVFrameError(f"KV frame has {len(buffer)} bytes, header says {expected}")
    flat = torch.frombuffer(buffer, dtype=torch.uint8)
    return flat.view(expect_dtype).view(shape)
