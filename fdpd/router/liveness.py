"""Noticing a dead instance within a second, not at the heartbeat timeout.

The router holds a ZMQ connection to every registered instance (it sends them Submits and
Aborts); the transport reports each time one drops or comes back (a socket monitor, see
``fdpd.pd.transport``). A process that dies, SIGKILLed or crashed, has its sockets closed by
its kernel at once, and every reconnect is then refused. So a connection that stays down for
``grace`` seconds is a lost instance: the router resumes its streams elsewhere right away.

A connection that drops and comes back within ``grace`` (a blip, or a restart on the same
port, which its new epoch at Register reports anyway) is nothing. A process that is alive but
frozen (SIGSTOP, a stuck host) keeps its connections: the heartbeat timeout still catches it.
A live instance wrongly taken for dead costs little: its requests resume elsewhere, it is sent
their Aborts, and its next heartbeat is answered "register again".

Used on the event loop only: no lock.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

# ZMQ retries a refused connection every 100 ms: three refusals in a row is a dead peer.
RECONNECT_GRACE = 0.3


class ConnectionWatch:
    def __init__(self, loop: asyncio.AbstractEventLoop, on_lost: Callable[[str], None],
                 grace: float = RECONNECT_GRACE):
        self._loop = loop
        self._on_lost = on_lost
        self.grace = grace
        self._down: dict[str, asyncio.TimerHandle] = {}     # address -> its pending verdict
        self.drops = 0

    def connection(self, address: str, connected: bool) -> None:
        """A connection to ``address`` came up (``connected``) or dropped."""
        if connected:
            pending = self._down.pop(address, None)
            if pending is not None:
                pending.cancel()
        elif address not in self._down:
            self.drops += 1
            self._down[address] = self._loop.call_later(self.grace, self._lost, address)

    def _lost(self, address: str) -> None:
        self._down.pop(address, None)
        self._on_lost(address)

    def close(self) -> None:
        for handle in self._down.values():
            handle.cancel()
        self._down.clear()
