"""A fault-injecting ZMQ relay for tests: drops, duplicates, delays and reorders messages on
their way into one instance's inbox.

An instance advertises the relay's address (``--advertise-address``), so its peers and the
router dial the relay, which forwards to the instance's real inbox. The relay is a ROUTER bound
on loopback; for every source connection it opens one DEALER to the backend, so whatever the
backend answers on that connection (``Error`` for a malformed message) goes back to that source.
One thread owns every socket.

Each message's envelope is decoded (``fdpd.pd.protocol.decode``) to read its type. When the
``FaultPlan`` applies to that type, the message's fate is drawn from a ``random.Random`` seeded
by (seed, relay name, type), always the same number of draws per message, so a seed fixes
the sequence of decisions for each type (the n-th PrefillDone is always dropped); which request
that n-th message belongs to depends on arrival order. Everything the relay does is counted per
(action, type) and kept in a bounded event log, so a test can check the faults happened and a
failure names the seed to replay.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import random
import threading
import time
from dataclasses import dataclass

import zmq

from fdpd.pd.protocol import MESSAGE_TYPES, ProtocolError, decode

log = logging.getLogger(__name__)

ACTIONS = ("forwarded", "dropped", "duplicated", "delayed", "reordered", "overflowed")


@dataclass(frozen=True)
class FaultPlan:
    """Per-message fault probabilities. The actions are drawn independently, in this order: a
    dropped message is gone; a duplicated one is also sent again after a delay from
    ``delay_ms``; a delayed one waits a delay from ``delay_ms``; a reordered one is held until
    the next message from the same source has gone, or ``reorder_timeout_ms``. ``types``
    restricts the faults to those message types (None: every type, KV frames included)."""

    drop: float = 0.0
    duplicate: float = 0.0
    delay: float = 0.0
    reorder: float = 0.0
    delay_ms: tuple[float, float] = (1.0, 50.0)
    reorder_timeout_ms: float = 50.0
    types: frozenset[str] | None = None

    def __post_init__(self) -> None:
        for name in ("drop", "duplicate", "delay", "reorder"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"FaultPlan.{name}: a probability in [0, 1], got {p!r}")
        low, high = self.delay_ms
        if not 0.0 <= low <= high:
            raise ValueError(f"FaultPlan.delay_ms: need 0 <= low <= high, got {self.delay_ms}")
        if not self.reorder_timeout_ms >= 0:
            raise ValueError("FaultPlan.reorder_timeout_ms: must be >= 0")
        if self.types is not None:
            unknown = set(self.types) - set(MESSAGE_TYPES)
            if unknown:
                raise ValueError(f"FaultPlan.types: unknown message types {sorted(unknown)}; "
                                 f"known: {sorted(MESSAGE_TYPES)}")
            object.__setattr__(self, "types", frozenset(self.types))

    def applies_to(self, msg_type: str | None) -> bool:
        return msg_type is not None and (self.types is None or msg_type in self.types)


NO_FAULTS = FaultPlan()


@dataclass(frozen=True)
class RelayEvent:
    """One thing the relay did (the event log): ``n`` counts messages in arrival order."""

    n: int
    action: str
    msg_type: str
    src: str
    req_id: str


class FaultRelay:
    """``with FaultRelay("tcp://127.0.0.1:PORT", plan, seed=7) as relay: ... relay.address``.

    ``set_plan`` changes the faults (and reseeds) while running; messages already delayed or
    held are still released on time. ``close`` releases nothing still held: it is dropped."""

    def __init__(self, backend: str, plan: FaultPlan = NO_FAULTS, *, seed: int = 0,
                 name: str = "relay", bind: str = "tcp://127.0.0.1:0", hwm: int = 100_000,
                 max_events: int = 100_000):
        self.backend = backend
        self.name = name
        self._hwm = hwm
        self._lock = threading.Lock()
        self._plan, self._seed = plan, seed
        self._rngs: dict[str, random.Random] = {}
        self._counts: collections.Counter[tuple[str, str]] = collections.Counter()
        self._events: collections.deque[RelayEvent] = collections.deque(maxlen=max_events)
        self._arrivals = itertools.count()
        self.received = 0                 # messages taken in since the start
        self._ctx = zmq.Context()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._bind = bind
        self.address = ""
        self._thread = threading.Thread(target=self._run, name=f"relay-{name}", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError(f"relay {name}: IO thread did not start")
        if self._error is not None:
            self._ctx.term()
            raise self._error

    # ------------------------------------------------------------------ any thread
    @property
    def plan(self) -> FaultPlan:
        return self._plan

    @property
    def seed(self) -> int:
        return self._seed

    def set_plan(self, plan: FaultPlan, seed: int | None = None) -> None:
        with self._lock:
            self._plan = plan
            if seed is not None:
                self._seed = seed
            self._rngs.clear()

    def counts(self) -> collections.Counter[tuple[str, str]]:
        """(action, message type) -> how many, since the start or the last ``reset_counts``."""
        with self._lock:
            return collections.Counter(self._counts)

    def total(self, action: str, msg_type: str | None = None) -> int:
        return sum(n for (a, t), n in self.counts().items()
                   if a == action and (msg_type is None or t == msg_type))

    def events(self) -> list[RelayEvent]:
        with self._lock:
            return list(self._events)

    def reset_counts(self) -> None:
        with self._lock:
            self._counts.clear()
            self._events.clear()

    def report(self) -> str:
        """One line per action: the seed, and what was done to which types."""
        counts = self.counts()
        lines = [f"relay {self.name} -> {self.backend} (seed {self._seed}, {self._plan})"]
        for action in ACTIONS:
            per_type = {t: n for (a, t), n in sorted(counts.items()) if a == action}
            if per_type:
                lines.append(f"  {action}: {per_type}")
        return "\n".join(lines)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._ctx.destroy(linger=0)

    def __enter__(self) -> FaultRelay:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ the IO thread
    # Only the IO thread touches the sockets and the schedule: ``_dealers`` (source connection
    # -> its DEALER to the backend), ``_timers`` (a heap of delayed and duplicated messages:
    # due, order, source, frames) and ``_held`` (per source, the message being reordered).
    def _run(self) -> None:
        front = self._socket(zmq.ROUTER)
        try:
            front.bind(self._bind)
            self.address = front.getsockopt_string(zmq.LAST_ENDPOINT)
        except BaseException as e:          # surfaced to the constructor
            front.close(0)
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        self._poller = zmq.Poller()
        self._poller.register(front, zmq.POLLIN)
        self._dealers: dict[bytes, zmq.Socket] = {}
        self._sources: dict[zmq.Socket, bytes] = {}
        self._timers: list[tuple[float, int, bytes, list[bytes]]] = []
        self._held: dict[bytes, tuple[float, list[bytes]]] = {}
        self._order = itertools.count()
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                dues = [due for due, _ in self._held.values()]
                if self._timers:
                    dues.append(self._timers[0][0])
                wait_ms = int((min(dues, default=now + 0.05) - now) * 1000) + 1
                for sock, _ in self._poller.poll(max(0, min(50, wait_ms))):
                    for _ in range(256):
                        try:
                            parts = sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        if sock is front:
                            self._on_message(parts[0], parts[1:])
                        else:               # the backend answered on a source's connection
                            self._push(front, [self._sources[sock], *parts])
                now = time.monotonic()
                while self._timers and self._timers[0][0] <= now:
                    _, _, source, parts = heapq.heappop(self._timers)
                    self._forward(source, parts)
                for source in [s for s, (due, _) in self._held.items() if due <= now]:
                    self._forward(source, self._held.pop(source)[1])
        except Exception:
            log.exception("relay %s stopped forwarding", self.name)
        finally:
            front.close(0)
            for sock in self._dealers.values():
                sock.close(0)

    def _on_message(self, source: bytes, parts: list[bytes]) -> None:
        n = next(self._arrivals)
        self.received = n + 1
        try:
            env = decode(parts[0])
            msg_type, src, req_id = env.msg.TYPE, env.src, getattr(env.msg, "req_id", "")
        except (ProtocolError, IndexError):
            msg_type, src, req_id = None, "?", ""
        with self._lock:
            plan = self._plan
            draws: list[float] = []
            if plan.applies_to(msg_type):
                rng = self._rngs.get(msg_type)
                if rng is None:
                    rng = random.Random(f"{self._seed}/{self.name}/{msg_type}")
                    self._rngs[msg_type] = rng
                # Always six draws per message, so one type's sequence of decisions does not
                # depend on the outcomes before it.
                draws = [rng.random() for _ in range(4)]
                draws += [rng.uniform(*plan.delay_ms) / 1000 for _ in range(2)]
        actions = []
        now = time.monotonic()
        if draws and draws[0] < plan.drop:
            actions.append("dropped")
        else:
            if draws and draws[1] < plan.duplicate:
                heapq.heappush(self._timers, (now + draws[5], next(self._order), source, parts))
                actions.append("duplicated")
            if draws and draws[2] < plan.delay:
                heapq.heappush(self._timers, (now + draws[4], next(self._order), source, parts))
                actions.append("delayed")
            elif draws and draws[3] < plan.reorder and source not in self._held:
                self._held[source] = (now + plan.reorder_timeout_ms / 1000, parts)
                actions.append("reordered")
            else:
                self._forward(source, parts)
                actions.append("forwarded")
        with self._lock:
            for action in actions:
                self._counts[(action, msg_type or "?")] += 1
                if action != "forwarded":
                    self._events.append(RelayEvent(n, action, msg_type or "?", src, req_id))

    def _forward(self, source: bytes, parts: list[bytes]) -> None:
        """Send to the backend on ``source``'s connection; a message held back from that
        source goes right after it (so the two arrive swapped)."""
        sock = self._dealers.get(source)
        if sock is None:
            sock = self._dealers[source] = self._socket(zmq.DEALER)
            sock.connect(self.backend)
            self._sources[sock] = source
            self._poller.register(sock, zmq.POLLIN)
        self._push(sock, parts)
        if source in self._held:
            self._push(sock, self._held.pop(source)[1])

    def _push(self, sock: zmq.Socket, parts: list[bytes]) -> None:
        try:
            sock.send_multipart(parts, zmq.NOBLOCK)
        except zmq.Again:
            with self._lock:
                self._counts[("overflowed", "?")] += 1
            log.warning("relay %s: a send queue is full; message lost", self.name)

    def _socket(self, kind: int) -> zmq.Socket:
        sock = self._ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, self._hwm)
        sock.setsockopt(zmq.RCVHWM, self._hwm)
        return sock
