"""Authenticated cluster messages (``fdpd.pd.auth``, ``fdpd.pd.transport``): the MAC covers
every frame and every frame boundary, replays are dropped exactly once each, the wire format
without a secret is the plain one, and real transports on loopback deliver or drop (and count)
by secret. Also the secret's configuration: where it may come from, its minimum length, and
that it is never printed."""

from __future__ import annotations

import itertools
import re
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import zmq
from click.testing import CliRunner
from fastapi.routing import APIRoute

from fdpd.cli import main
from fdpd.config import ConfigError, PDConfig
from fdpd.pd.auth import (
    MAC_FRAME_BYTES,
    MAX_EPOCH_SKEW_NS,
    REPLAY_WINDOW,
    MessageAuthenticator,
    ReplayGuard,
    ReplayWindow,
)
from fdpd.pd.protocol import Abort, Codec, Error, KVBlocks, decode, new_epoch
from fdpd.pd.transport import Transport
from fdpd.router.app import create_app
from fdpd.testing.asgi import serve_app

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # see test_model.py
from tests.unit.router_fakes import ScriptedCore

SECRET = b"correct horse battery staple 42!"
OTHER = b"another cluster's secret value!!"
KV = np.arange(2 * 3 * 16, dtype=np.float32).reshape(2, 3, 16)     # a non-byte buffer


def message() -> list:
    """An envelope and two KV frames, as ``Transport.send`` hands them over."""
    env = Codec("prefill-0", 7).encode(KVBlocks("g1", "r1", 0, 1, "float32", list(KV.shape)))
    return [env, memoryview(KV), zmq.Frame(KV[1].tobytes())]


def wire(frames: list) -> list[bytes]:
    """The bytes the receiver gets for each frame."""
    return [f.bytes if isinstance(f, zmq.Frame) else bytes(memoryview(f).cast("B"))
            for f in frames]


def flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x10]) + data[at + 1:]


# ---------------------------------------------------------------------- the MAC
def test_sign_verify_roundtrip_covers_kv_frames():
    auth = MessageAuthenticator(SECRET)
    frames = message()
    mac = auth.sign(frames)
    assert len(mac) == MAC_FRAME_BYTES == 33
    received = [*wire(frames), mac]
    assert auth.verify(received) is None
    # Also as zmq hands them over: read-only frames that alias the receive buffer.
    assert auth.verify([zmq.Frame(b) for b in received]) is None


@pytest.mark.parametrize("frame", [0, 1, 2])
def test_any_flipped_bit_is_rejected(frame):
    auth = MessageAuthenticator(SECRET)
    received = [*wire(message()), auth.sign(message())]
    for at in (0, len(received[frame]) // 2, len(received[frame]) - 1):
        tampered = list(received)
        tampered[frame] = flip(received[frame], at)
        assert auth.verify(tampered) == "bad_mac", (frame, at)


def test_tampered_mac_frame_boundaries_and_frame_count_are_rejected():
    auth = MessageAuthenticator(SECRET)
    env, kv1, kv2 = wire(message())
    mac = auth.sign(message())
    assert auth.verify([env, kv1, kv2, flip(mac, 20)]) == "bad_mac"
    assert auth.verify([env, kv1, kv2, flip(mac, 0)]) == "no_mac"         # not a MAC frame
    # The same bytes cut at other places: lengths are part of what is signed.
    assert auth.verify([env, kv1 + kv2[:4], kv2[4:], mac]) == "bad_mac"
    assert auth.verify([env, kv1 + kv2, mac]) == "bad_mac"
    # A captured header with other KV, or without its KV.
    assert auth.verify([env, bytes(len(kv1)), kv2, mac]) == "bad_mac"
    assert auth.verify([env, mac]) == "bad_mac"
    assert auth.verify([env, kv1, kv2, kv2, mac]) == "bad_mac"


def test_wrong_secret_and_missing_mac_are_rejected():
    frames = message()
    mine, theirs = MessageAuthenticator(SECRET), MessageAuthenticator(OTHER)
    assert mine.verify([*wire(frames), theirs.sign(frames)]) == "bad_mac"
    assert mine.verify(wire(frames)) == "no_mac"                 # a sender without a secret
    assert mine.verify(wire(frames)[:1]) == "no_mac"
    with pytest.raises(ValueError, match="16 bytes"):
        MessageAuthenticator(b"short")


# ---------------------------------------------------------------------- replays
def test_replay_window_accepts_each_seq_once_within_the_window():
    w = ReplayWindow(64)
    assert [w.accept(s) for s in (0, 1, 2)] == [None, None, None]
    assert w.accept(1) == "replayed"
    assert w.accept(10) is None
    assert [w.accept(s) for s in (7, 3, 9)] == [None, None, None]     # late, but new
    assert [w.accept(s) for s in (7, 3, 9, 10)] == ["replayed"] * 4
    assert w.accept(73) is None                       # 10 .. 73: the window is [10, 73]
    assert w.accept(9) == "too_old"
    assert w.accept(10) == "replayed"
    assert w.accept(11) is None
    assert w.accept(10**18) is None                   # a jump far beyond: no huge bitmap
    assert w.accept(10**18 - 64) == "too_old"
    assert w.accept(10**18 - 63) is None


def test_replay_window_default_size_tolerates_reordering_of_a_window():
    w = ReplayWindow()
    assert w.accept(REPLAY_WINDOW + 100) is None
    assert w.accept(101) is None                      # REPLAY_WINDOW - 1 behind the top
    assert w.accept(100) == "too_old"


def test_replay_guard_keeps_one_window_per_sender_incarnation():
    now = 10**18
    guard = ReplayGuard(window=16, clock=lambda: now)
    assert guard.check("p", 5, 0) is None
    assert guard.check("d", 5, 0) is None             # another sender: its own window
    assert guard.check("p", 5, 0) == "replayed"
    assert guard.check("p", 6, 0) is None             # a restart: a new window
    assert guard.check("p", 6, 0) == "replayed"
    assert guard.check("p", 5, 1) == "stale_epoch"
    # Epochs are time_ns(): one more than a day ahead of this clock is refused, without
    # touching the sender's window (so it cannot shut out the real sender).
    assert guard.check("p", now + MAX_EPOCH_SKEW_NS + 1, 0) == "future_epoch"
    assert guard.check("p", 6, 1) is None
    assert guard.check("p", now + MAX_EPOCH_SKEW_NS, 0) is None


# ---------------------------------------------------------------------- real transports
def wait_until(predicate, timeout: float = 5.0, what: str = "condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def transports():
    made: list[Transport] = []

    def make(name: str, secret: bytes | None = None) -> Transport:
        t = Transport(name, new_epoch(), secret=secret)
        t.codec.src = name
        made.append(t)
        return t

    yield make
    for t in made:
        t.close()


def send_kv(sender: Transport, address: str) -> None:
    msg = KVBlocks("g1", "r1", 0, 2, "float32", list(KV.shape))
    sender.send(address, msg, [memoryview(KV)])


def test_same_secret_delivers_kv_frames_intact(transports):
    p, d = transports("prefill", SECRET), transports("decode", SECRET)
    assert p.authenticated and d.authenticated
    for _ in range(3):
        send_kv(p, d.address)
    for _ in range(3):
        got = d.recv(5)
        assert got is not None and got.envelope.src == "prefill"
        assert len(got.frames) == 1                    # the MAC frame is not passed on
        assert np.array_equal(np.frombuffer(got.frames[0].buffer, np.float32).reshape(KV.shape),
                              KV)
    assert (d.stats.received, d.stats.unauthenticated, d.stats.replayed) == (3, 0, 0)


@pytest.mark.parametrize("sender_secret", [None, OTHER], ids=["no-secret", "other-secret"])
def test_unauthenticated_senders_are_dropped_counted_and_never_answered(transports,
                                                                       sender_secret):
    d = transports("decode", SECRET)
    intruder = transports("intruder", sender_secret)
    for _ in range(3):
        send_kv(intruder, d.address)
    intruder.send(d.address, Abort("r1"))
    wait_until(lambda: d.stats.unauthenticated == 4, what="4 drops counted")
    reason = "no_mac" if sender_secret is None else "bad_mac"
    assert d.stats.by_reason == {reason: 4}
    assert (d.stats.received, d.stats.replayed, d.stats.malformed) == (0, 0, 0)
    assert d.recv(0.2) is None
    # Nothing came back to the intruder (a reply would be sent before the count).
    assert intruder.recv(0.2) is None and intruder.stats.received == 0
    assert intruder.stats.unauthenticated == 0


def test_without_a_secret_the_wire_format_is_unchanged(transports, intruder):
    """No MAC frame: the receiver gets exactly the envelope and the KV frame, and a peer
    without a secret is understood as before (malformed input still gets an Error)."""
    ctx = zmq.Context()
    inbox = ctx.socket(zmq.ROUTER)
    inbox.setsockopt(zmq.LINGER, 0)
    port = inbox.bind_to_random_port("tcp://127.0.0.1")
    try:
        for secret, extra in ((None, 0), (SECRET, 1)):
            t = transports(f"sender-{extra}", secret)
            send_kv(t, f"tcp://127.0.0.1:{port}")
            assert inbox.poll(5000)
            _, env, kv, *rest = inbox.recv_multipart()
            assert len(rest) == extra
            assert decode(env).msg == KVBlocks("g1", "r1", 0, 2, "float32", list(KV.shape))
            assert kv == KV.tobytes()
            if extra:
                assert MessageAuthenticator(SECRET).verify([env, kv, *rest]) is None
    finally:
        inbox.close(0)
        ctx.term()
    plain = transports("decode")
    sock = intruder(plain.address)
    sock.send(b"\xc1 not msgpack")
    assert sock.poll(5000) and isinstance(decode(sock.recv()).msg, Error)


def test_replays_are_dropped_once_each_and_counted(transports, intruder):
    d = transports("decode", SECRET)
    auth = MessageAuthenticator(SECRET)
    codec = Codec("prefill", new_epoch())
    sock = intruder(d.address)

    def signed(msg, seq: int | None = None) -> list[bytes]:
        if seq is not None:
            codec._seq = itertools.count(seq)
        env = codec.encode(msg)
        return [env, auth.sign([env])]

    first = signed(Abort("a"))
    sock.send_multipart(first)
    assert d.recv(5).msg == Abort("a")
    sock.send_multipart(first)                               # the identical frames again
    wait_until(lambda: d.stats.replayed == 1, what="the replay counted")
    ahead = signed(Abort("b"), seq=REPLAY_WINDOW + 10)
    late = signed(Abort("c"), seq=20)                        # new, within the window
    old = signed(Abort("d"), seq=5)                          # new, but below the window
    for frames in (ahead, late, old, ahead, late):
        sock.send_multipart(frames)
    assert d.recv(5).msg == Abort("b") and d.recv(5).msg == Abort("c")
    wait_until(lambda: d.stats.replayed == 4, what="3 more replays counted")
    assert d.recv(0.2) is None
    assert d.stats.by_reason == {"replayed": 3, "too_old": 1}
    assert (d.stats.received, d.stats.unauthenticated) == (3, 0)
    # An authenticated peer's malformed message is still answered, and the answer is signed.
    bad = b"\xc1 not msgpack"
    sock.send_multipart([bad, auth.sign([bad])])
    assert sock.poll(5000)
    env, mac = sock.recv_multipart()
    assert isinstance(decode(env).msg, Error) and auth.verify([env, mac]) is None


def test_future_epoch_is_refused_and_does_not_shut_out_the_sender(transports, intruder):
    d = transports("decode", SECRET)
    p = transports("prefill", SECRET)
    auth = MessageAuthenticator(SECRET)
    env = Codec("prefill", time.time_ns() + 2 * MAX_EPOCH_SKEW_NS).encode(Abort("x"))
    intruder(d.address).send_multipart([env, auth.sign([env])])
    wait_until(lambda: d.stats.future_epoch == 1, what="the future epoch counted")
    p.send(d.address, Abort("y"))
    got = d.recv(5)
    assert got is not None and got.msg == Abort("y") and d.stats.stale_epoch == 0


# ---------------------------------------------------------------------- configuration
def test_secret_config_rules_and_no_leaks(tmp_path):
    value = "s3cr3t-" + "x" * 20
    cfg = PDConfig(cluster_secret=value)
    assert cfg.cluster_key == value.encode() and value not in repr(cfg)
    path = tmp_path / "secret"
    path.write_text(value + "\n")
    from_file = PDConfig(cluster_secret_file=str(path))
    assert from_file.cluster_key == value.encode()           # trailing newline ignored
    assert PDConfig().cluster_key is None
    with pytest.raises(ConfigError, match="not both"):
        PDConfig(cluster_secret=value, cluster_secret_file=str(path))
    with pytest.raises(ConfigError, match="cannot read"):
        PDConfig(cluster_secret_file=str(tmp_path / "missing"))
    short = "tooshort-123"
    for kwargs in ({"cluster_secret": short}, {"cluster_secret_file": str(path)}):
        path.write_text(short)
        with pytest.raises(ConfigError, match="at least 16 bytes") as e:
            PDConfig(**kwargs)
        assert short not in str(e.value)


def run(args: list[str], **env: str):
    # None removes a variable the test process may have.
    clean = {"FDPD_CLUSTER_SECRET": None, "FDPD_CLUSTER_SECRET_FILE": None, "FDPD_CONFIG": None}
    return CliRunner().invoke(main, args, env={**clean, **env})


ROUTER = ["launch", "--role", "router"]
DECODE = ["launch", "--role", "decode", "--router", "127.0.0.1:8001"]


def test_cli_takes_the_secret_from_env_or_file_only(entry_points, tmp_path):
    recorded = entry_points
    value = "an-env-secret-of-enough-bytes"
    r = run(DECODE, FDPD_CLUSTER_SECRET=value)
    assert r.exit_code == 0 and recorded.pop("instance")["pd"].cluster_key == value.encode()
    path = tmp_path / "secret"
    path.write_text(value)
    r = run([*ROUTER, "--cluster-secret-file", str(path)])
    assert r.exit_code == 0 and recorded.pop("router")["pd"].cluster_key == value.encode()
    # On the command line (visible in `ps`) or in a --config file: refused, never echoed.
    r = run([*DECODE, "--cluster-secret", value])
    assert r.exit_code == 2 and "not accepted on the command line" in r.output
    assert "FDPD_CLUSTER_SECRET" in r.output and value not in r.output
    cfg = tmp_path / "fdpd.yaml"
    cfg.write_text(f"cluster-secret: {value}\n")
    r = run([*DECODE, "--config", str(cfg)])
    assert r.exit_code == 2 and "not accepted in a --config file" in r.output
    assert value not in r.output
    # Too short: the error names where it came from, not the value.
    r = run(DECODE, FDPD_CLUSTER_SECRET="short-secret")
    assert r.exit_code == 2 and "FDPD_CLUSTER_SECRET" in r.output
    assert "short-secret" not in r.output and "instance" not in recorded
    # --help shows the variable, never its value.
    r = run(["launch", "--help"], FDPD_CLUSTER_SECRET=value)
    assert r.exit_code == 0 and "FDPD_CLUSTER_SECRET" in r.output and value not in r.output


def test_up_forwards_the_secret_file_and_checks_it_first(entry_points, tmp_path,
                                                          monkeypatch):
    recorded = entry_points
    monkeypatch.chdir(tmp_path)
    (tmp_path / "secret").write_text("x" * 32)
    r = run(["up", "--cluster-secret-file", "secret"])
    assert r.exit_code == 0, r.output
    common = recorded["cluster"]["common"]
    i = common.index("--cluster-secret-file")
    assert common[i + 1] == str(tmp_path / "secret")          # absolute: children may cd
    (tmp_path / "short").write_text("x" * 15)
    recorded.clear()
    r = run(["up", "--cluster-secret-file", "short"])
    assert r.exit_code == 2 and "at least 16 bytes" in r.output and not recorded


# ---------------------------------------------------------------------- the HTTP API key
def test_api_key_guards_every_v1_route_streaming_included():
    app = create_app(ScriptedCore(), api_key="k-123")
    routes = sorted((method, r.path) for r in app.routes if isinstance(r, APIRoute)
                    and r.path.startswith("/v1") for method in r.methods)
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/cluster",
            "/v1/requests/recent"} <= {path for _, path in routes}
    body = {"prompt": "hi", "max_tokens": 4, "stream": True,
            "messages": [{"role": "user", "content": "hi"}]}
    with serve_app(app) as url, httpx.Client(base_url=url, timeout=10) as http:
        for method, path in routes:
            concrete = re.sub(r"\{[^}]+\}", "x", path)
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "k-123"}):
                r = http.request(method, concrete, headers=headers,
                                 json=body if method == "POST" else None)
                assert r.status_code == 401, (method, concrete, headers)
                assert r.json()["error"]["code"] == "invalid_api_key"
                assert r.headers["www-authenticate"] == "Bearer"
        ok = {"Authorization": "Bearer k-123"}
        with http.stream("POST", "/v1/completions", json=body, headers=ok) as r:
            assert r.status_code == 200
            lines = [line for line in r.iter_lines() if line.startswith("data:")]
        assert lines[-1] == "data: [DONE]" and len(lines) > 2
        assert http.get("/v1/models", headers=ok).status_code == 200
        assert http.get("/health").status_code == 200            # probes stay open
        assert http.get("/metrics").status_code == 200


def test_api_key_from_the_environment(entry_points):
    r = run(ROUTER, FDPD_API_KEY="k-from-env")
    assert r.exit_code == 0, r.output
    assert entry_points["router"]["api_key"] == "k-from-env"
