"""Authenticated cluster messages: a MAC over every frame, and replay protection (DESIGN 6).

With a cluster secret (``--cluster-secret-file`` or ``FDPD_CLUSTER_SECRET``, the same on every
process), the *sending* thread appends one frame to every message: a tag byte and the
HMAC-SHA256 of the envelope frame and of every extra (KV) frame, each prefixed by its length, so
that neither a frame's bytes nor the boundaries between frames can change without the key (a
captured header cannot travel with forged KV). The receiver's IO thread checks it before it
decodes anything; a message without a valid MAC is dropped and counted, and never answered (an
``Error`` reply would tell a prober what it reached). Without a secret nothing is appended and
nothing is checked: the wire format is the unauthenticated one.

Replays. The envelope's ``(src, epoch, seq)`` is covered by the MAC, and every process numbers
its messages from one counter, so a receiver keeps per sender incarnation ``(src, epoch)`` an
anti-replay window over ``seq`` like IPsec's (RFC 4303 3.4.3): a seq is accepted once, and only
if it is within ``REPLAY_WINDOW`` of the highest seen. The window is there because several
threads of a sender draw from its counter and hand their messages to its IO thread through
separate queues, so messages may arrive slightly out of order. Older epochs of a sender are
dropped by the transport already (a restart has a new, larger epoch).

Epochs are ``time.time_ns()`` at start, and a receiver drops messages from a sender's epochs
older than the newest it accepted, so a forged far-future epoch would shut the real sender out
for good. With authentication only key holders can send an epoch at all; what remains is a
sender whose clock ran ahead: once corrected, its next incarnation is stale until real time
passes the epoch recorded (or the receivers restart). Refusing epochs more than
``MAX_EPOCH_SKEW_NS`` (one day) ahead of the local clock (``future_epoch``) bounds that to a
day, assuming the cluster's clocks agree within a day (any NTP-synced fleet); a receiver whose
own clock is more than a day behind refuses its peers, visibly (counted and logged).

Not covered: confidentiality (prompts, tokens and KV travel in clear: keep cluster traffic on a
private network or a tunnel); binding a message to its recipient (a message captured on its way
to one instance can be replayed once to another instance of the same cluster, which has not
seen its seq); and windows do not survive a receiver restart (messages captured from senders'
current incarnations can be replayed once to the restarted receiver).
"""

from __future__ import annotations

import hashlib
import hmac
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any

import zmq

from fdpd.config import MIN_CLUSTER_SECRET_BYTES

MAC_TAG = b"\x01"                 # MAC frame format 1: HMAC-SHA256, length-prefixed frames
MAC_FRAME_BYTES = 1 + hashlib.sha256().digest_size
REPLAY_WINDOW = 4096
MAX_EPOCH_SKEW_NS = 24 * 3600 * 10**9
_KEY_LABEL = b"fdpd cluster message authentication v1"


def _view(frame: Any) -> memoryview:
    """The bytes a frame puts on the wire, without copying them."""
    return frame.buffer if isinstance(frame, zmq.Frame) else memoryview(frame)


class MessageAuthenticator:
    """Signs and verifies whole multipart messages with a key derived from the cluster secret.
    Thread-safe: every call works on its own copy of the keyed HMAC state."""

    def __init__(self, secret: bytes):
        if len(secret) < MIN_CLUSTER_SECRET_BYTES:
            raise ValueError(f"a cluster secret needs at least {MIN_CLUSTER_SECRET_BYTES} "
                             f"bytes")
        # A key of its own for this purpose, so the secret may later key other things too.
        key = hmac.new(secret, _KEY_LABEL, hashlib.sha256).digest()
        self._keyed = hmac.new(key, digestmod=hashlib.sha256)

    def _mac(self, frames: Sequence[Any]) -> bytes:
        h = self._keyed.copy()
        h.update(struct.pack("<I", len(frames)))
        for frame in frames:
            view = _view(frame)
            h.update(struct.pack("<Q", view.nbytes))
            h.update(view)             # hashlib releases the GIL for big buffers
        return h.digest()

    def sign(self, frames: Sequence[Any]) -> bytes:
        """The MAC frame to send after ``frames`` (envelope first, then any KV frames)."""
        return MAC_TAG + self._mac(frames)

    def verify(self, parts: Sequence[Any]) -> str | None:
        """None if the last of ``parts`` is a valid MAC frame over the others, else why not:
        ``no_mac`` (no MAC frame: a sender without a secret) or ``bad_mac``."""
        if len(parts) < 2:
            return "no_mac"
        mac = _view(parts[-1])
        if mac.nbytes != MAC_FRAME_BYTES or mac[:1] != MAC_TAG:
            return "no_mac"
        if not hmac.compare_digest(mac[1:], self._mac(parts[:-1])):
            return "bad_mac"
        return None


class ReplayWindow:
    """The seq numbers of one sender incarnation seen so far: the highest, and a bitmap of
    the ``size`` below it (bit i: ``top - i`` was seen)."""

    __slots__ = ("size", "top", "_bits", "_mask")

    def __init__(self, size: int = REPLAY_WINDOW):
        self.size = size
        self.top = -1
        self._bits = 0
        self._mask = (1 << size) - 1

    def accept(self, seq: int) -> str | None:
        """Record ``seq``; None if it is new, else ``replayed`` or ``too_old`` (below the
        window, so whether it was seen is no longer known)."""
        if seq > self.top:
            shift = seq - self.top
            self._bits = ((self._bits << shift) | 1) & self._mask if shift < self.size else 1
            self.top = seq
            return None
        offset = self.top - seq
        if offset >= self.size:
            return "too_old"
        bit = 1 << offset
        if self._bits & bit:
            return "replayed"
        self._bits |= bit
        return None


class ReplayGuard:
    """Anti-replay state of one receiver: one window per sender, for its newest epoch.
    Only the receiving IO thread uses it."""

    def __init__(self, window: int = REPLAY_WINDOW, max_epoch_skew_ns: int = MAX_EPOCH_SKEW_NS,
                 clock: Callable[[], int] = time.time_ns):
        self.window = window
        self.max_epoch_skew_ns = max_epoch_skew_ns
        self._clock = clock
        self._senders: dict[str, tuple[int, ReplayWindow]] = {}

    def check(self, src: str, epoch: int, seq: int) -> str | None:
        """None to accept the message (and remember its seq), else the reason to drop it:
        ``future_epoch``, ``stale_epoch``, ``replayed`` or ``too_old``."""
        if epoch > self._clock() + self.max_epoch_skew_ns:
            return "future_epoch"
        known = self._senders.get(src)
        if known is None or epoch > known[0]:
            known = (epoch, ReplayWindow(self.window))      # a new incarnation
            self._senders[src] = known
        elif epoch < known[0]:
            return "stale_epoch"
        return known[1].accept(seq)
