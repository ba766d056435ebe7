"""Sockets, owned by one IO thread per process (DESIGN 6).

Each process has an inbox (a ROUTER bound to its address) and one DEALER per peer it sends to.
Only the IO thread touches them. Other threads send through a thread-local inproc PUSH into the
IO thread (zero-copy: the frames are handed over, not copied) and receive from a queue, so the
engine loop never blocks on a socket.

Buffer lifetime: frames passed to ``send`` are sent with ``copy=False``; pyzmq keeps a
reference to each buffer until libzmq has sent it, so a caller must not *modify* a buffer after
handing it over (``kv_transfer.StagingPool`` recycles buffers only after their send
completed, as reported by the frame's tracker). Received
extra frames alias zmq's receive buffers; consumers copy them once into their destination.

With a cluster ``secret`` every message carries a MAC frame (``fdpd.pd.auth``): ``send``
computes it in the calling thread, over the same buffers it hands over (no copy), so the IO
thread's time goes to the wire; ``_deliver`` verifies it before decoding anything and drops
(counts, never answers) what fails, then drops replayed seq numbers.
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import zmq
from zmq.utils.monitor import parse_monitor_message

from fdpd.pd.auth import MessageAuthenticator, ReplayGuard
from fdpd.pd.protocol import Codec, Envelope, Error, Message, ProtocolError, decode

log = logging.getLogger(__name__)


@dataclass
class Inbound:
    envelope: Envelope
    frames: list[zmq.Frame]
    # When the IO thread took it off the socket (monotonic): the time a message waited for a
    # busy engine loop is then measurable (request timelines).
    received_at: float = 0.0

    @property
    def msg(self) -> Message:
        return self.envelope.msg


@dataclass
class TransportStats:
    received: int = 0
    sent: int = 0
    malformed: int = 0
    stale_epoch: int = 0
    send_failed: int = 0
    # With a cluster secret: no or a wrong MAC (by_reason: no_mac, bad_mac); a seq seen
    # before or below the replay window (replayed, too_old); an epoch too far ahead.
    unauthenticated: int = 0
    replayed: int = 0
    future_epoch: int = 0
    inbox_paused: int = 0          # times the inbox stopped being read (loop too far behind)
    by_reason: collections.Counter = field(default_factory=collections.Counter)

    def view(self) -> dict[str, int]:
        """The counters, as load reports and ``/v1/cluster`` show them."""
        return {"received": self.received, "sent": self.sent, "malformed": self.malformed,
                "stale_epoch": self.stale_epoch, "send_failed": self.send_failed,
                "unauthenticated": self.unauthenticated, "replayed": self.replayed,
                "future_epoch": self.future_epoch, "inbox_paused": self.inbox_paused}


# Inbound messages the engine loop may be behind by before the IO thread stops reading the
# inbox (it resumes at half). A message here is small (control) or one KV frame (MiBs): the
# KV that can be in flight is bounded by the grants the decode gave, not by this.
MAX_INBOUND = 20000


class Transport:
    def __init__(self, identity: str, epoch: int, bind: str = "tcp://127.0.0.1:0", *,
                 on_message: Callable[[Inbound], None] | None = None, hwm: int = 10000,
                 secret: bytes | None = None,
                 on_connection: Callable[[str, bool], None] | None = None):
        self.identity = identity
        self.epoch = epoch
        self.codec = Codec(identity, epoch)
        self.stats = TransportStats()
        self._auth = MessageAuthenticator(secret) if secret is not None else None
        self._replays = ReplayGuard() if secret is not None else None
        self._bind = bind
        self._hwm = hwm
        self._on_message = on_message
        # Called on the IO thread with (peer address, connected?) each time the TCP connection
        # of a peer this process sends to comes up or drops (a ZMQ socket monitor per peer):
        # a killed process's kernel closes its sockets at once, long before its heartbeats
        # are missed.
        self._on_connection = on_connection
        self._monitors: dict[zmq.Socket, str] = {}        # monitor -> address (IO thread)
        self._monitor_of: dict[zmq.Socket, zmq.Socket] = {}   # dealer -> its monitor
        # queue.Queue, not SimpleQueue: on CPython 3.11 SimpleQueue.get(timeout) waits forever
        # when a signal handler (SIGTERM) runs during the wait and outlasts the timeout, so an
        # idle instance ignored SIGTERM about one time in five.
        self._inbound: queue.Queue[Inbound] = queue.Queue()
        self._ctx = zmq.Context()
        self._ctl = f"inproc://fdpd-transport-{id(self)}"
        self._local = threading.local()
        self._peer_epochs: dict[str, int] = {}
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.address = ""
        self._thread = threading.Thread(target=self._run, name=f"io-{identity}", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("transport IO thread did not start")
        if self._error is not None:
            raise self._error
        if self._auth is None and not _is_loopback(self.address):
            log.warning("the ZMQ inbox at %s is not loopback and there is no cluster secret: "
                        "anyone who can reach it can inject requests and KV (set "
                        "FDPD_CLUSTER_SECRET or --cluster-secret-file on every process)",
                        self.address)

    @property
    def authenticated(self) -> bool:
        """Whether messages are signed and only authenticated ones are accepted."""
        return self._auth is not None

    # ----------------------------------------------------------------- any thread
    def send(self, address: str, msg: Message, frames: Sequence = ()) -> None:
        """Queue ``msg`` (plus raw ``frames``) for ``address``. Never blocks on the network."""
        parts = [self.codec.encode(msg), *frames]
        if self._auth is not None:
            parts.append(self._auth.sign(parts))
        self._push().send_multipart([address.encode(), *parts], copy=False)

    def _push(self) -> zmq.Socket:
        """This thread's inproc PUSH into the IO thread."""
        push = getattr(self._local, "push", None)
        if push is None:
            push = self._ctx.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 0)
            push.connect(self._ctl)
            self._local.push = push
        return push

    def drop_peer(self, address: str) -> None:
        """Close the connection to ``address``, discarding what is still queued for it (a peer
        that is gone for good): libzmq then releases those messages' zero-copy frames, so
        their trackers complete and the memory they view can be reused."""
        self._push().send_multipart([b"", address.encode()])

    def backlog(self) -> int:
        """Inbound messages waiting for the engine loop."""
        return self._inbound.qsize()

    def recv(self, timeout: float | None = None) -> Inbound | None:
        try:
            return self._inbound.get(timeout=timeout) if timeout else self._inbound.get_nowait()
        except queue.Empty:
            return None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._ctx.destroy(linger=0)

    # ----------------------------------------------------------------- IO thread
    def _run(self) -> None:
        try:
            inbox = self._ctx.socket(zmq.ROUTER)
            inbox.setsockopt(zmq.LINGER, 0)
            inbox.setsockopt(zmq.RCVHWM, self._hwm)
            inbox.setsockopt(zmq.ROUTER_HANDOVER, 1)
            inbox.bind(self._bind)
            self.address = inbox.getsockopt_string(zmq.LAST_ENDPOINT)
            ctl = self._ctx.socket(zmq.PULL)
            ctl.setsockopt(zmq.LINGER, 0)
            ctl.bind(self._ctl)
        except BaseException as e:  # surfaced to the constructor
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        poller = zmq.Poller()
        poller.register(inbox, zmq.POLLIN)
        poller.register(ctl, zmq.POLLIN)
        dealers: dict[str, zmq.Socket] = {}
        paused = False
        try:
            while not self._stop.is_set():
                if self._on_message is None:
                    # Back-pressure: while the engine loop is behind by MAX_INBOUND messages,
                    # stop reading the inbox. Senders' messages then wait in ZMQ's bounded
                    # queues (HWM) and TCP instead of growing this process's memory.
                    backlog = self._inbound.qsize()
                    if not paused and backlog >= MAX_INBOUND:
                        poller.unregister(inbox)
                        paused = True
                        self.stats.inbox_paused += 1
                    elif paused and backlog <= MAX_INBOUND // 2:
                        poller.register(inbox, zmq.POLLIN)
                        paused = False
                for sock, _ in poller.poll(10 if paused else 100):
                    # Drain a bounded batch per socket so no source starves the others.
                    for _ in range(256):
                        try:
                            parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        if sock is ctl:
                            self._forward(parts, dealers, poller)
                        elif sock in self._monitors:
                            self._connection_event(sock, parts)
                        elif sock is inbox:
                            self._deliver(parts[1:], lambda reply, ident=parts[0]:
                                          inbox.send_multipart([ident, *reply], zmq.NOBLOCK))
                        else:
                            self._deliver(parts, lambda reply, s=sock:
                                          s.send_multipart(reply, zmq.NOBLOCK))
        finally:
            # What the loop handed over before close() still goes out (a drain's last Migrate
            # or Reject), given a second to leave; nothing new is read.
            try:
                while True:
                    self._forward(ctl.recv_multipart(zmq.NOBLOCK, copy=False), dealers, poller)
            except zmq.ZMQError:
                pass
            for m in self._monitors:
                m.close(0)
            for s in dealers.values():
                s.close(linger=1000)
            inbox.close(0)
            ctl.close(0)

    def _forward(self, parts: list[zmq.Frame], dealers: dict[str, zmq.Socket],
                 poller: zmq.Poller) -> None:
        if not parts[0].bytes:                      # drop_peer
            sock = dealers.pop(parts[1].bytes.decode(), None)
            if sock is not None:
                self._unmonitor(sock, poller)
                poller.unregister(sock)
                sock.close(0)
            return
        address = parts[0].bytes.decode()
        sock = dealers.get(address)
        if sock is None:
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, self._hwm)
            try:
                sock.connect(address)
            except zmq.ZMQError as e:
                # Addresses come from peers' messages (decode() accepts only tcp://HOST:PORT);
                # should one still be unusable, that send fails, not the IO thread.
                sock.close(0)
                self.stats.send_failed += 1
                log.warning("cannot connect to %r: %s; message dropped", address[:80], e)
                return
            dealers[address] = sock
            poller.register(sock, zmq.POLLIN)     # errors about our messages come back here
            if self._on_connection is not None:
                monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
                self._monitors[monitor] = address
                self._monitor_of[sock] = monitor
                poller.register(monitor, zmq.POLLIN)
        try:
            sock.send_multipart(parts[1:], zmq.NOBLOCK, copy=False)
            self.stats.sent += 1
        except zmq.Again:
            self.stats.send_failed += 1
            log.warning("send queue to %s is full; message dropped", address)

    def _connection_event(self, monitor: zmq.Socket, parts: list[zmq.Frame]) -> None:
        try:
            event = parse_monitor_message([p.bytes for p in parts])["event"]
        except Exception:               # a malformed event is not worth the IO thread
            return
        if event in (zmq.EVENT_CONNECTED, zmq.EVENT_DISCONNECTED):
            self._on_connection(self._monitors[monitor], event == zmq.EVENT_CONNECTED)

    def _unmonitor(self, dealer: zmq.Socket, poller: zmq.Poller) -> None:
        monitor = self._monitor_of.pop(dealer, None)
        if monitor is not None:
            del self._monitors[monitor]
            poller.unregister(monitor)
            dealer.disable_monitor()
            monitor.close(0)

    def _deliver(self, parts: list[zmq.Frame], reply: Callable[[list[bytes]], None]) -> None:
        if self._auth is not None:
            why = self._auth.verify(parts)
            if why is not None:
                # Not answered: a reply would confirm to a prober what it reached.
                self.stats.unauthenticated += 1
                self._dropped(why, self.stats.unauthenticated)
                return
            parts = parts[:-1]
        try:
            env = decode(parts[0].buffer)
        except ProtocolError as e:
            self.stats.malformed += 1
            self.stats.by_reason["malformed"] += 1
            log.warning("dropped malformed message: %s", e)
            try:
                reply(self._signed(self.codec.encode(Error("malformed", str(e)))))
            except zmq.ZMQError:
                pass
            return
        known = self._peer_epochs.get(env.src)
        if known is not None and env.epoch < known:
            self.stats.stale_epoch += 1
            log.info("dropped %s from a previous epoch of %s", env.msg.TYPE, env.src)
            return
        if self._replays is not None:
            why = self._replays.check(env.src, env.epoch, env.seq)
            if why is not None:
                if why == "future_epoch":
                    self.stats.future_epoch += 1
                    n = self.stats.future_epoch
                else:
                    self.stats.replayed += 1
                    n = self.stats.replayed
                self._dropped(why, n, f" ({env.msg.TYPE} from {env.src})")
                return
        self._peer_epochs[env.src] = env.epoch
        self.stats.received += 1
        inbound = Inbound(env, parts[1:], time.monotonic())
        if self._on_message is not None:
            self._on_message(inbound)
        else:
            self._inbound.put(inbound)

    def _signed(self, envelope: bytes) -> list[bytes]:
        return [envelope] if self._auth is None else [envelope, self._auth.sign([envelope])]

    def _dropped(self, why: str, count: int, detail: str = "") -> None:
        self.stats.by_reason[why] += 1
        # Logged at 1, 2, 4, 8, ... of a kind: a flood must not flood the log too.
        if (count & (count - 1)) == 0:
            log.warning("dropped a message: %s%s (%d dropped so far of this kind)", why,
                        detail, count)


def _is_loopback(address: str) -> bool:
    """Whether a bound ``tcp://HOST:PORT`` is reachable from this machine only (other
    transports, inproc and ipc, are local anyway)."""
    scheme, _, rest = address.partition("://")
    if scheme != "tcp":
        return True
    host = rest.rpartition(":")[0].strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
