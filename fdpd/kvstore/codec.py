"""The stored object format: one KV block across all layers, with a header that makes a wrong
object impossible to use.

Layout (little-endian), ``HEADER_SIZE`` = 112 bytes, then the payload::

    magic      4s   b"FDKV"
    version    u16  FORMAT_VERSION; any other version is rejected, never guessed at
    dtype      u8   DTYPE_CODES
    checksum   u8   CHECKSUM_CRC32 (the only kind so far; a byte so a faster one can be added)
    model      32s  model fingerprint (model config, dtype, block size)
    key        32s  the object's own key (block prefix hash), or zeros when not given
    shape      5u32 [layers, 2, block_size, kv_heads, head_dim]
    length     u64  payload bytes
    crc        u32  zlib.crc32 of the payload
    reserved   8x

The key is in the header as well as in the store's key so that a store that hands back the
object of another key (a renamed file, a prefix collision, a bug) is caught, not trusted.

Checksum choice, measured here on 512 KiB (one core, noisy): zlib.crc32 2.1-4.3 GB/s,
adler32 ~3 GB/s, sha1 ~1.9 GB/s, blake2b ~0.5 GB/s; the third-party xxh3 (~28 GB/s) and crc32c
(~13 GB/s) are faster but add a dependency. crc32 costs ~0.15-0.25 ms per 512 KiB block, well
under the store's own transfer time (Redis GET ~2.8 GB/s), so the stdlib wins for now.
"""

from __future__ import annotations

import struct
import warnings
import zlib
from collections.abc import Sequence

import torch

MAGIC = b"FDKV"
FORMAT_VERSION = 1
CHECKSUM_CRC32 = 1
FINGERPRINT_SIZE = 32
KEY_SIZE = 32

_HEADER = struct.Struct("<4sHBB32s32s5IQI8x")
HEADER_SIZE = _HEADER.size  # 112: a multiple of 16, so the payload view stays aligned
_NO_KEY = bytes(KEY_SIZE)

# Codes are part of the format: never renumber, only append.
DTYPE_CODES: dict[torch.dtype, int] = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}
for _name, _code in (("float8_e4m3fn", 4), ("float8_e5m2", 5)):
    if hasattr(torch, _name):
        DTYPE_CODES[getattr(torch, _name)] = _code
_DTYPES_BY_CODE = {code: dtype for dtype, code in DTYPE_CODES.items()}


class KVObjectError(ValueError):
    """A stored object that must not be used: truncated, from another format version, model,
    dtype or block layout, or corrupted. Callers treat it as a cache miss (and may delete the
    object); ``reason`` is a short machine-readable word for metrics."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"bad KV object ({reason}): {detail}")
        self.reason = reason


def _check_id(what: str, value: bytes | None, size: int) -> bytes:
    if value is None:
        return bytes(size)
    if not isinstance(value, (bytes, bytearray)) or len(value) != size:
        raise ValueError(f"{what} must be {size} bytes, got {type(value).__name__} "
                         f"of length {len(value) if hasattr(value, '__len__') else '?'}")
    return bytes(value)


def encode_block(fingerprint: bytes, block: torch.Tensor, *, key: bytes | None = None) -> bytes:
    """One block ``[layers, 2, block_size, kv_heads, head_dim]`` as header + raw bytes.

    ``block`` may live on any device and need not be contiguous; it is copied once into the
    returned ``bytes`` (after a ``.contiguous().cpu()`` that is free for a contiguous CPU
    tensor). The caller may reuse or free ``block`` as soon as this returns.
    """
    fingerprint = _check_id("fingerprint", fingerprint, FINGERPRINT_SIZE)
    key_field = _check_id("key", key, KEY_SIZE)
    if block.dim() != 5:
        raise ValueError(f"a KV block must have 5 dims [layers, 2, block_size, kv_heads, "
                         f"head_dim], got shape {tuple(block.shape)}")
    if block.dtype not in DTYPE_CODES:
        raise ValueError(f"dtype {block.dtype} has no KV object code; supported: "
                         f"{', '.join(str(d) for d in DTYPE_CODES)}")
    flat = block.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
    payload = memoryview(flat.numpy())
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, DTYPE_CODES[block.dtype], CHECKSUM_CRC32,
                          fingerprint, key_field, *block.shape, payload.nbytes,
                          zlib.crc32(payload))
    return b"".join((header, payload))


def decode_block(blob: bytes | bytearray | memoryview, fingerprint: bytes, dtype: torch.dtype,
                 shape: Sequence[int], *, key: bytes | None = None,
                 copy: bool = False) -> torch.Tensor:
    """The block in ``blob``, or :class:`KVObjectError`; never a tensor that fails a check.

    Every header field is compared with what the caller expects (``key`` only when given), the
    payload length with the shape, and the payload with its checksum.

    Buffer lifetime: with ``copy=False`` (the default, zero-copy) the tensor is a *read-only
    view of ``blob``*: it keeps ``blob`` alive, must not be written to, and is meant to be
    ``copy_()``-ed into the KV cache at once (that copy is the only one on the restore path).
    Pass ``copy=True`` for a tensor that owns its memory (one extra copy).
    """
    fingerprint = _check_id("fingerprint", fingerprint, FINGERPRINT_SIZE)
    view = memoryview(blob).cast("B")
    if view.nbytes < HEADER_SIZE:
        raise KVObjectError("truncated", f"{view.nbytes} bytes, shorter than the "
                                         f"{HEADER_SIZE}-byte header")
    (magic, version, dtype_code, checksum_kind, model, obj_key, *dims, length,
     crc) = _HEADER.unpack_from(view)
    if magic != MAGIC:
        raise KVObjectError("magic", f"starts with {bytes(magic)!r}, not {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise KVObjectError("version", f"format version {version}, this build reads "
                                       f"{FORMAT_VERSION}")
    if model != fingerprint:
        raise KVObjectError("fingerprint", "written by another model, dtype or block layout "
                                           f"(fingerprint {model.hex()[:12]}...)")
    if DTYPE_CODES.get(dtype) != dtype_code:
        got = _DTYPES_BY_CODE.get(dtype_code, f"code {dtype_code}")
        raise KVObjectError("dtype", f"object holds {got}, expected {dtype}")
    if tuple(dims) != tuple(shape):
        raise KVObjectError("shape", f"object shape {tuple(dims)}, expected {tuple(shape)}")
    if key is not None and obj_key != _check_id("key", key, KEY_SIZE):
        raise KVObjectError("key", "object was written under another key "
                                   f"({obj_key.hex()[:12]}... != {key.hex()[:12]}...)")
    expected = dtype.itemsize
    for d in shape:
        expected *= d
    if length != expected:
        raise KVObjectError("length", f"header says {length} payload bytes, shape needs "
                                      f"{expected}")
    got_len = view.nbytes - HEADER_SIZE
    if got_len < length:
        raise KVObjectError("truncated", f"{got_len} of {length} payload bytes")
    if got_len > length:
        raise KVObjectError("length", f"{got_len - length} bytes after the payload")
    if checksum_kind != CHECKSUM_CRC32:
        raise KVObjectError("checksum", f"unknown checksum kind {checksum_kind}")
    payload = view[HEADER_SIZE:]
    if zlib.crc32(payload) != crc:
        raise KVObjectError("checksum", "payload checksum mismatch (corrupted object)")
    if length == 0:
        return torch.empty(tuple(shape), dtype=dtype)
    with warnings.catch_warnings():
        # frombuffer warns that a read-only buffer (bytes) gives a writable tensor; the
        # docstring's lifetime rule (never write to it) is the answer.
        warnings.simplefilter("ignore", UserWarning)
        tensor = torch.frombuffer(payload, dtype=torch.uint8)
    tensor = tensor.view(dtype).view(tuple(shape))
    return tensor.clone() if copy else tensor
