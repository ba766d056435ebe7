"""One contract for every KV store backend (disk always; Redis, a 3-master Redis Cluster and
Mooncake against real servers started here), plus the object codec and each backend's own
hazards.

Redis needs the ``redis-server`` binary (CI: ``apt-get install -y redis-server``); Mooncake
needs the ``mooncake-transfer-engine-non-cuda`` wheel and ``libibverbs1``. Missing ones skip
with the reason; servers run in their own process group and are killed by pid.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

from fdpd.kvstore import KVObjectError, StoreUnavailable, decode_block, encode_block, open_store
from fdpd.kvstore.base import DeadlineCaller
from fdpd.kvstore.codec import HEADER_SIZE
from fdpd.kvstore.disk import DiskStore
from fdpd.testing.processes import free_port
from fdpd.testing.servers import start_redis, stop_server, wait_port

FP = hashlib.sha256(b"model fingerprint").digest()
SHAPE = (2, 2, 4, 2, 8)           # layers, 2, block_size, kv_heads, head_dim: 1 KiB of float32


def key(name: object) -> bytes:
    return hashlib.sha256(repr(name).encode()).digest()


def block(seed: int, shape=SHAPE, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


def blob(seed: int, shape=SHAPE, dtype=torch.float32, k: bytes | None = None) -> bytes:
    return encode_block(FP, block(seed, shape, dtype), key=k)


# ---------------------------------------------------------------------------- servers
def need_redis() -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server binary not found (apt-get install -y redis-server)")
    pytest.importorskip("redis", reason="redis-py not installed (pip install redis hiredis)")


@pytest.fixture(scope="module")
def redis_url():
    need_redis()
    port = free_port()
    proc = start_redis(port)
    yield f"redis://127.0.0.1:{port}/0"
    stop_server(proc)


def mooncake_master_binary() -> Path:
    try:
        import mooncake
        import mooncake.store  # fails without libibverbs1
    except (ImportError, OSError) as e:
        pytest.skip(f"Mooncake wheel unusable here ({e}); pip install "
                    "mooncake-transfer-engine-non-cuda and apt-get install -y libibverbs1")
    binary = Path(mooncake.__file__).parent / "mooncake_master"
    if not binary.exists():
        pytest.skip(f"the Mooncake wheel ships no mooncake_master at {binary}")
    return binary


def start_mooncake_master(binary: Path, log: Path,
                          port: int | None = None) -> tuple[subprocess.Popen, int]:
    port, metrics = port or free_port(), free_port()
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [str(binary), f"--rpc_port={port}", "--rpc_address=127.0.0.1",
             f"--metrics_port={metrics}", "--metrics_host=127.0.0.1"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_port(port, proc, 15)
    except RuntimeError as e:
        stop_server(proc)
        pytest.skip(f"mooncake_master did not start: {e}; log: {log.read_text()[-500:]}")
    return proc, port


def mooncake_url(port: int) -> str:
    return (f"mooncake://127.0.0.1:{port}?metadata=P2PHANDSHAKE&protocol=tcp"
            "&segment_mb=64&buffer_mb=32")


@pytest.fixture(scope="module")
def mooncake_master(tmp_path_factory):
    binary = mooncake_master_binary()
    proc, port = start_mooncake_master(binary, tmp_path_factory.mktemp("mc") / "master.log")
    shared: list = []
    yield mooncake_url(port), shared
    for store in shared:
        store.close()
    stop_server(proc)


@pytest.fixture(params=["disk", "redis", "redis-cluster", "mooncake"])
def make_store(request, tmp_path):
    """A factory of stores of one backend, isolated per test (own directory or key prefix),
    closed at teardown. ``fresh=False`` may hand out a store shared by the module where opening
    one is slow (a Mooncake client's close takes 1-2 s)."""
    made = []
    prefix = f"t{os.getpid()}:{request.node.name}:"
    if request.param == "disk":
        def make(fresh):
            return DiskStore(tmp_path / "kv", capacity_bytes=64 << 20, timeout=2.0)
    elif request.param in ("redis", "redis-cluster"):
        url = (request.getfixturevalue("redis_url") if request.param == "redis"
               else request.getfixturevalue("redis_cluster").url)

        def make(fresh):
            return open_store(url, timeout=2.0, key_prefix=prefix.encode())
    else:
        url, shared = request.getfixturevalue("mooncake_master")

        def make(fresh):
            if fresh:
                return open_store(url, timeout=5.0, key_prefix=prefix)
            if not shared:
                shared.append(open_store(url, timeout=5.0))
            shared[0].key_prefix = prefix
            return shared[0]

    def tracked(fresh=False):
        store = make(fresh)
        if request.param != "mooncake" or fresh:
            made.append(store)
        return store

    yield tracked
    for store in made:
        store.close()


@pytest.fixture
def store(make_store):
    return make_store()


# ---------------------------------------------------------------------------- the contract
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_of_encoded_blocks(store, dtype):
    original = block(1, dtype=dtype)
    store.put(key(dtype), encode_block(FP, original, key=key(dtype)))
    got = decode_block(store.get(key(dtype)), FP, dtype, SHAPE, key=key(dtype))
    assert got.dtype == dtype and torch.equal(got, original)


def test_missing_key_is_none(store):
    store.put(key("a"), blob(1))
    assert store.get(key("missing")) is None
    assert store.get_many([key("missing"), key("a"), key("other")]) == [None, blob(1), None]
    assert store.get_many([]) == []


def test_contains_prefix_counts_only_the_leading_run(store):
    k = [key(i) for i in range(4)]
    for i in (0, 1, 3):
        store.put(k[i], blob(i))
    assert store.contains_prefix(k) == 2
    assert store.contains_prefix(k[:2]) == 2
    assert store.contains_prefix(k[2:]) == 0
    assert store.contains_prefix([k[3]]) == 1
    assert store.contains_prefix([]) == 0
    store.put(k[2], blob(2))
    assert store.contains_prefix(k) == 4


def test_overwrite_keeps_a_whole_object(store):
    store.put(key("k"), blob(1))
    store.get(key("k"))
    store.put(key("k"), blob(2))
    assert store.get(key("k")) == (blob(2) if store.replaces_on_put else blob(1))
    store.delete(key("k"))                      # the way to replace on every backend
    store.put(key("k"), blob(3))
    assert store.get(key("k")) == blob(3)


def test_delete(store):
    store.put(key("k"), blob(1))
    store.put(key("keep"), blob(2))
    store.get(key("k"))               # Mooncake holds a read lease: delete must still work
    store.delete(key("k"))
    store.delete(key("never stored"))
    assert store.get(key("k")) is None
    assert store.contains_prefix([key("k")]) == 0
    assert store.get(key("keep")) == blob(2)


def test_stats_move(store):
    before = store.stats()
    data = blob(1)
    store.put(key("s"), data)
    store.get(key("s"))
    store.get(key("absent"))
    after = store.stats()
    assert after.puts - before.puts == 1
    assert after.bytes_written - before.bytes_written == len(data)
    assert (after.gets - before.gets, after.hits - before.hits,
            after.misses - before.misses) == (2, 1, 1)
    assert after.bytes_read - before.bytes_read == len(data)
    assert after.errors == before.errors


def test_large_object(store):
    shape = (8, 2, 16, 16, 256)       # 4 MiB of float32
    original = block(7, shape=shape)
    data = encode_block(FP, original)
    assert len(data) == HEADER_SIZE + (4 << 20)
    store.put(key("big"), data)
    assert torch.equal(decode_block(store.get(key("big")), FP, torch.float32, shape), original)


def test_concurrent_readers_see_whole_objects_while_a_writer_writes(make_store):
    writer = make_store()
    # Readers use their own client where the backend has clients (one directory, one owner).
    reader_store = writer if isinstance(writer, DiskStore) else make_store(fresh=True)
    hot = key("hot")
    versions = [blob(v, k=hot) for v in range(3)]
    tensors = [block(v) for v in range(3)]
    writer.put(hot, versions[0])
    stop = threading.Event()
    written = [0]                               # cold keys below this index are complete
    bad: list[object] = []
    reads = [0]

    def check(data, k, allow_missing):
        if data is None:
            if not allow_missing:
                bad.append("the hot object went missing")
            return
        try:
            t = decode_block(data, FP, torch.float32, SHAPE, key=k)
        except KVObjectError as e:              # a torn or mixed object
            bad.append(e)
            return
        if not any(torch.equal(t, v) for v in tensors):
            bad.append("a tensor that was never written")
        reads[0] += 1

    def reader():
        while not stop.is_set():
            check(reader_store.get(hot), hot, allow_missing=False)
            n = written[0]
            cold = [key(("cold", i)) for i in (n - 1, n, n + 1)]
            for k, data in zip(cold, reader_store.get_many(cold)):
                check(data, k, allow_missing=True)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for i in range(60):
        writer.put(hot, versions[i % 3])
        writer.put(key(("cold", i)), blob(i % 3, k=key(("cold", i))))
        written[0] = i + 1
    stop.set()
    for t in threads:
        t.join(timeout=10)
    assert not bad, bad[:3]
    assert reads[0] > 0
    assert reader_store.contains_prefix([key(("cold", i)) for i in range(60)]) == 60


def test_corrupt_object_in_store_is_a_codec_error(store):
    data = bytearray(blob(3, k=key("c")))
    data[-1] ^= 0x01
    store.put(key("c"), bytes(data))
    with pytest.raises(KVObjectError) as e:
        decode_block(store.get(key("c")), FP, torch.float32, SHAPE, key=key("c"))
    assert e.value.reason == "checksum"


def test_bad_keys_and_closed_store(make_store):
    store = make_store(fresh=True)
    with pytest.raises(ValueError):
        store.put(b"", blob(1))
    with pytest.raises(ValueError):
        store.get("not bytes")  # type: ignore[arg-type]
    store.close()
    store.close()                    # idempotent
    with pytest.raises(StoreUnavailable):
        store.get(key("x"))


# ---------------------------------------------------------------------------- the codec
def _with(data: bytes, offset: int, new: bytes) -> bytes:
    return data[:offset] + new + data[offset + len(new):]


GOOD = blob(5, k=key("g"))
CORRUPTIONS = {
    "empty": (b"", "truncated"),
    "header cut": (GOOD[:HEADER_SIZE - 1], "truncated"),
    "payload cut": (GOOD[:-4], "truncated"),
    "trailing bytes": (GOOD + b"\0", "length"),
    "magic": (_with(GOOD, 0, b"XXXX"), "magic"),
    "version": (_with(GOOD, 4, (2).to_bytes(2, "little")), "version"),
    "fingerprint": (encode_block(hashlib.sha256(b"other").digest(), block(5)), "fingerprint"),
    "dtype": (blob(5, dtype=torch.float16), "dtype"),
    "shape": (blob(5, shape=(2, 2, 4, 2, 4)), "shape"),
    "key": (blob(5, k=key("other")), "key"),
    "length field": (_with(GOOD, 92, (12).to_bytes(8, "little")), "length"),
    "payload bit flip": (_with(GOOD, HEADER_SIZE + 10, bytes([GOOD[HEADER_SIZE + 10] ^ 4])),
                         "checksum"),
    "checksum field": (_with(GOOD, 100, b"\0\0\0\0"), "checksum"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_codec_rejects_every_corruption(case):
    data, reason = CORRUPTIONS[case]
    with pytest.raises(KVObjectError) as e:
        decode_block(data, FP, torch.float32, SHAPE, key=key("g"))
    assert e.value.reason == reason
    assert isinstance(e.value, ValueError)


def test_codec_views_without_copy_unless_asked():
    data = bytearray(GOOD)
    view = decode_block(data, FP, torch.float32, SHAPE)
    owned = decode_block(data, FP, torch.float32, SHAPE, copy=True)
    assert torch.equal(view, block(5)) and torch.equal(owned, block(5))
    data[HEADER_SIZE:HEADER_SIZE + 4] = bytes(4)   # the view aliases the blob
    assert view.flatten()[0].item() == 0.0 and owned.flatten()[0].item() != 0.0


def test_codec_encodes_non_contiguous_blocks_and_rejects_bad_input():
    kv = block(9, shape=(2, 2, 4, 8, 2)).transpose(3, 4)   # a strided view, like a cache slice
    assert torch.equal(decode_block(encode_block(FP, kv), FP, torch.float32, kv.shape), kv)
    with pytest.raises(ValueError):
        encode_block(FP, torch.zeros(2, 2))
    with pytest.raises(ValueError):
        encode_block(b"short", block(1))
    with pytest.raises(ValueError):
        encode_block(FP, torch.zeros(SHAPE, dtype=torch.int64))


# ---------------------------------------------------------------------------- disk
def test_disk_evicts_in_exact_lru_order(tmp_path):
    size = len(blob(0))
    store = DiskStore(tmp_path, capacity_bytes=3 * size)
    for i in range(3):
        store.put(key(i), blob(i))
    assert store.get(key(0)) == blob(0)         # 0 is now the most recent; 1 the oldest
    store.put(key(3), blob(3))
    assert [store.contains_prefix([key(i)]) for i in range(4)] == [1, 0, 1, 1]
    store.contains_prefix([key(2)])             # a query does not refresh recency
    store.put(key(4), blob(4))
    assert [store.contains_prefix([key(i)]) for i in range(5)] == [1, 0, 0, 1, 1]
    stats = store.stats()
    assert (stats.evictions, stats.objects, stats.bytes_stored) == (2, 3, 3 * size)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file() and p.name != ".lock") \
        == sorted(key(i).hex() for i in (0, 3, 4))
    store.put(key("huge"), os.urandom(4 * size))  # can never fit: dropped, counted
    assert store.get(key("huge")) is None and store.stats().errors == 1
    store.close()


def test_disk_survives_restart_with_its_lru_order(tmp_path):
    size = len(blob(0))
    store = DiskStore(tmp_path, capacity_bytes=3 * size)
    for i in range(3):
        store.put(key(i), blob(i))
    store.get(key(0))
    store.close()
    reopened = DiskStore(tmp_path, capacity_bytes=3 * size)
    assert reopened.stats().objects == 3
    assert reopened.get(key(2)) == blob(2)      # order now 1, 0, 2
    reopened.put(key(3), blob(3))
    assert [reopened.contains_prefix([key(i)]) for i in range(4)] == [1, 0, 1, 1]
    reopened.close()
    smaller = DiskStore(tmp_path, capacity_bytes=size)   # a lower cap evicts at start
    assert [smaller.contains_prefix([key(i)]) for i in range(4)] == [0, 0, 0, 1]
    smaller.close()


def test_disk_truncated_file_is_a_codec_error(tmp_path):
    store = DiskStore(tmp_path, capacity_bytes=1 << 20)
    store.put(key("t"), blob(1))
    path = tmp_path / key("t").hex()[:2] / key("t").hex()
    path.write_bytes(path.read_bytes()[:HEADER_SIZE + 100])   # a torn write
    with pytest.raises(KVObjectError) as e:
        decode_block(store.get(key("t")), FP, torch.float32, SHAPE)
    assert e.value.reason == "truncated"
    path.unlink()                                # removed behind the store's back: a miss
    assert store.get(key("t")) is None and store.stats().objects == 0
    store.close()


def test_disk_ignores_and_cleans_a_crashed_writers_temp_file(tmp_path):
    store = DiskStore(tmp_path, capacity_bytes=1 << 20)
    store.put(key("ok"), blob(1))
    store.close()
    name = key("crash").hex()
    tmp = tmp_path / name[:2] / f"{name}.999.0.tmp"
    tmp.parent.mkdir(exist_ok=True)
    tmp.write_bytes(blob(2)[:50])
    (tmp_path / "README").write_text("not ours")
    store = DiskStore(tmp_path, capacity_bytes=1 << 20)
    assert not tmp.exists()
    assert store.get(key("crash")) is None and store.get(key("ok")) == blob(1)
    assert store.stats().objects == 1 and (tmp_path / "README").exists()
    store.close()


def test_disk_directory_has_one_owner(tmp_path):
    store = DiskStore(tmp_path, capacity_bytes=1 << 20)
    with pytest.raises(RuntimeError, match="in use by another process"):
        DiskStore(tmp_path, capacity_bytes=1 << 20)
    store.close()
    DiskStore(tmp_path, capacity_bytes=1 << 20).close()


def test_open_store_urls(tmp_path):
    store = open_store(f"disk:{tmp_path}/a?capacity_mb=2")
    assert isinstance(store, DiskStore) and store.capacity_bytes == 2 << 20
    store.close()
    with pytest.raises(ValueError, match=r"disk:PATH.*redis://.*mooncake://"):
        open_store("s3://bucket")
    with pytest.raises(ValueError, match="capacity_mb"):
        open_store(f"disk:{tmp_path}/b?size=1")
    with pytest.raises(ValueError, match="MASTER_HOST"):
        open_store("mooncake://nohostport")
    for bad in ("redis-cluster://", "redis-cluster://host", "redis-cluster://h:1/0",
                "redis-cluster://h:1,h:notaport", "redis-cluster://h:1?x=1"):
        with pytest.raises(ValueError, match=r"redis-cluster://HOST:PORT\[,HOST:PORT"):
            open_store(bad)


# ---------------------------------------------------------------------------- redis
def test_redis_dead_server_fails_fast_then_recovers(tmp_path):
    need_redis()
    port = free_port()
    proc = start_redis(port)
    url = f"redis://127.0.0.1:{port}/0"
    store = open_store(url, timeout=1.0, ttl_seconds=60)
    store.put(key("r"), blob(1))
    import redis
    assert 0 < redis.Redis.from_url(url).ttl(b"fdpd:kv:" + key("r")) <= 60
    stop_server(proc)
    for call in (lambda: store.get(key("r")), lambda: store.put(key("r"), blob(1)),
                 lambda: store.contains_prefix([key("r")]), lambda: store.get_many([key("r")])):
        start = time.monotonic()
        with pytest.raises(StoreUnavailable):
            call()
        assert time.monotonic() - start < 1.5
    assert store.stats().errors == 4
    proc = start_redis(port)                    # a fresh, empty server on the same port
    try:
        fresh = open_store(url, timeout=1.0)
        assert fresh.get(key("r")) is None
        fresh.put(key("r"), blob(2))
        assert store.get(key("r")) == blob(2)   # the old client reconnects by itself too
        fresh.close()
    finally:
        store.close()
        stop_server(proc)


# ---------------------------------------------------------------------------- mooncake
def test_mooncake_dead_master_fails_within_the_deadline_then_recovers(tmp_path):
    binary = mooncake_master_binary()
    log = tmp_path / "master.log"
    proc, port = start_mooncake_master(binary, log)
    store = open_store(mooncake_url(port), timeout=0.5)
    try:
        store.put(key("m"), blob(1))
        stop_server(proc)
        start = time.monotonic()
        with pytest.raises(StoreUnavailable):
            store.contains_prefix([key("m"), key("n")])   # the library takes ~4.5 s here
        with pytest.raises(StoreUnavailable):
            store.put(key("n"), blob(2))                # the stuck call still holds the client
        assert time.monotonic() - start < 1.5
        assert store.stats().errors == 2
        # A fresh master on the same port: the client reconnects by itself (and its close
        # can unmount instead of retrying for ~15 s at exit).
        proc, _ = start_mooncake_master(binary, log, port)
        deadline = time.monotonic() + 20
        while True:
            try:
                store.put(key("n"), blob(2))
                break
            except StoreUnavailable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        assert store.get(key("n")) == blob(2)
    finally:
        store.close()
        stop_server(proc)


def test_deadline_caller_bounds_a_stuck_call():
    caller = DeadlineCaller("test")
    release = threading.Event()
    assert caller.call(lambda: 42, 1.0) == 42
    with pytest.raises(ZeroDivisionError):
        caller.call(lambda: 1 / 0, 1.0)
    start = time.monotonic()
    with pytest.raises(StoreUnavailable, match="no answer"):
        caller.call(lambda: release.wait(5), 0.1)
    with pytest.raises(StoreUnavailable, match="still stuck"):
        caller.call(lambda: 1, 1.0)
    assert time.monotonic() - start < 1.0
    release.set()
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        try:
            assert caller.call(lambda: 7, 1.0) == 7
            break
        except StoreUnavailable:
            time.sleep(0.01)
    else:
        pytest.fail("the caller did not recover after the stuck call returned")
    caller.close()
    with pytest.raises(StoreUnavailable, match="closed"):
        caller.call(lambda: 1, 1.0)
