"""The fault-injecting store wrapper used by the offload hazard tests."""

from __future__ import annotations

import hashlib
import threading
import time

import pytest
import torch

from fdpd.kvstore import KVObjectError, StoreUnavailable, decode_block, encode_block
from fdpd.kvstore.disk import DiskStore
from fdpd.testing.faulty_store import FaultyStore

FP = hashlib.sha256(b"fp").digest()
SHAPE = (2, 2, 4, 2, 8)
BLOB = encode_block(FP, torch.ones(SHAPE))
K = [hashlib.sha256(bytes([i])).digest() for i in range(3)]


@pytest.fixture
def faulty(tmp_path):
    inner = DiskStore(tmp_path, capacity_bytes=1 << 20)
    store = FaultyStore(inner, max_block=0.5)
    yield store
    store.close()


def test_passes_through_and_counts_calls(faulty):
    faulty.put(K[0], BLOB)
    assert faulty.get(K[0]) == BLOB
    assert faulty.get_many([K[0], K[1]]) == [BLOB, None]
    assert faulty.contains_prefix(K) == 1
    faulty.delete(K[0])
    assert faulty.calls == {"put": 1, "get": 1, "get_many": 1, "contains_prefix": 1,
                            "delete": 1}
    assert faulty.stats().puts == 1


def test_down_fails_every_call(faulty):
    faulty.put(K[0], BLOB)
    faulty.down = True
    for call in (lambda: faulty.get(K[0]), lambda: faulty.put(K[1], BLOB),
                 lambda: faulty.contains_prefix(K), lambda: faulty.get_many(K),
                 lambda: faulty.delete(K[0])):
        with pytest.raises(StoreUnavailable):
            call()
    faulty.down = False
    assert faulty.get(K[0]) == BLOB


def test_slow_sleeps_or_times_out(tmp_path):
    strict = FaultyStore(DiskStore(tmp_path, capacity_bytes=1 << 20), timeout=0.05)
    strict.slow_seconds = 0.02
    start = time.monotonic()
    assert strict.get(K[0]) is None
    assert time.monotonic() - start >= 0.02
    strict.slow_seconds = 5.0
    start = time.monotonic()
    with pytest.raises(StoreUnavailable):
        strict.get(K[0])
    assert time.monotonic() - start < 1.0
    strict.close()


def test_block_writes_holds_a_put_until_released(faulty):
    gate = threading.Event()
    faulty.block_writes = gate
    done = threading.Event()
    worker = threading.Thread(target=lambda: (faulty.put(K[0], BLOB), done.set()))
    worker.start()
    assert faulty.wait_for_blocked_put(2.0)
    assert faulty.blocked_puts == 1 and not done.is_set()
    assert faulty.contains_prefix([K[0]]) == 0          # nothing written while held
    gate.set()
    worker.join(2.0)
    assert done.is_set() and faulty.blocked_puts == 0
    assert faulty.get(K[0]) == BLOB


def test_block_writes_never_hangs_past_max_block(faulty):
    faulty.block_writes = threading.Event()              # never set
    start = time.monotonic()
    with pytest.raises(StoreUnavailable, match="max_block"):
        faulty.put(K[0], BLOB)
    assert 0.5 <= time.monotonic() - start < 2.0
    assert faulty.contains_prefix([K[0]]) == 0


def test_corrupt_reads_are_caught_by_the_codec(faulty):
    faulty.put(K[0], BLOB)
    faulty.corrupt_reads = True
    with pytest.raises(KVObjectError) as e:
        decode_block(faulty.get(K[0]), FP, torch.float32, SHAPE)
    assert e.value.reason == "checksum"
    faulty.corrupt_offset = 0
    with pytest.raises(KVObjectError, match="magic"):
        decode_block(faulty.get_many([K[0]])[0], FP, torch.float32, SHAPE)
    faulty.corrupt_reads = False
    assert torch.equal(decode_block(faulty.get(K[0]), FP, torch.float32, SHAPE),
                       torch.ones(SHAPE))


def test_lie_contains_claims_everything(faulty):
    faulty.lie_contains = True
    assert faulty.contains_prefix(K) == 3
    assert faulty.get(K[0]) is None                      # the caller must survive the lie
