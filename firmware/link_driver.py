"""The link driver: the one loop that runs a session's connection, on either end of the journey link.

`LinkDriver.pump` waits for input on the connection's `LinkTransport` or a `Waker`, hands the events
to the session's driver (`Channel.on_events`) and tells it when it was woken (`Channel.on_wake`).
The source (`firmware.replicator`) and the target (`firmware.remote_unit`) are channels around it;
a relay is one target channel and one source channel, each pumped by its own driver.

A `Waker` is how another thread hands work to a driver blocked in `poll()`: one byte on a
non-blocking socketpair, sent only when no wake-up is already pending (the journal's committing
thread or the remote's flusher call `wake()`; the driver clears it, then looks at what changed).
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Sequence
from typing import Protocol

from firmware.link import protocol as jp
from firmware.link_transport import LinkTransport


class Waker:
    """A wake-up any thread may send to the driver thread; `clear()` before looking at the state."""

    def __init__(self) -> None:
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)
        self._pending = False

    def fileno(self) -> int:
        return self._r.fileno()

    def wake(self) -> None:
        """Never blocks (safe under another object's lock)."""
        if self._pending:
            return
        self._pending = True
        with contextlib.suppress(OSError):  # a full buffer is a wake-up already pending
            self._w.send(b"x")

    def clear(self) -> None:
        with contextlib.suppress(OSError):
            while self._r.recv(4096):
                pass
        self._pending = False  # after the drain: a wake() from now on sends a new byte

    def close(self) -> None:
        self._r.close()
        self._w.close()


class Channel(Protocol):
    """What a session's driver gives the link driver."""

    def on_events(self, events: Sequence[jp.Event]) -> None: ...
    def on_wake(self, waker: Waker) -> None: ...


class LinkDriver:
    """Runs one connection: a transport, the channel that drives its session, and its wakers."""

    def __init__(self, transport: LinkTransport, channel: Channel, wakers: Sequence[Waker] = ()) -> None:
        self.transport = transport
        self.channel = channel
        self.wakers = list(wakers)

    def pump(self, timeout: float) -> bool:
        """Wait up to `timeout` for input or a wake-up and hand it to the channel.
        Returns False when nothing at all happened in that time."""
        link_ready, woken = self.transport.wait(timeout, self.wakers)
        for w in woken:
            w.clear()
            self.channel.on_wake(w)
        if link_ready:
            self.channel.on_events(self.transport.read_events())
        return link_ready or bool(woken)
