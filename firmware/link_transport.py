"""The journey link's socket half: one TCP (or TLS) connection and its `JourneyConnection`.

Both ends use it: the source's link thread (`firmware.replicator`) and the remote's connection
threads (`firmware.remote_unit`). It turns events into bytes on the socket and bytes from the socket
into events; the sessions in `firmware.replication` decide what those events mean. Only the thread
that owns a transport touches its socket (a TLS socket is never shared between threads); `shutdown()`
may be called from any thread to end it.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
from collections.abc import Iterable
from typing import Any

from firmware.link import protocol as jp

RECV_CHUNK = 1 << 20
RECV_BURST = 4 << 20


_READABLE = select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP


class PeerClosed(ConnectionResetError):
    """The peer closed the connection (between frames; a frame cut short is a ProtocolError)."""


class LinkTransport:
    def __init__(self, sock: socket.socket, role: jp.Role, *, timeout: float) -> None:
        self.sock = sock
        self.conn = jp.JourneyConnection(role)
        self.timeout = timeout
        # poll sets by the objects they wait on: a driver alternates between a few fixed sets (the
        # link alone, the link and its wakers), each made once
        self._polls: dict[tuple[tuple[int, int], ...], tuple[Any, dict[int, Any]]] = {}
        sock.settimeout(timeout)

    def send(self, ev: jp.Event) -> int:
        data = self.conn.send(ev)
        self.sock.sendall(data)
        return len(data)

    def try_send(self, ev: jp.Event) -> None:
        """Send if the socket still takes it (an ERROR on the way out)."""
        with contextlib.suppress(OSError, ValueError):
            self.sock.sendall(self.conn.send(ev))

    def wait(self, timeout: float, extra: Iterable[Any] = ()) -> tuple[bool, list[Any]]:
        """Wait up to `timeout` for input on the link or on `extra` (file objects): (link ready, ready extras)."""
        if isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
            return True, []
        # poll, not select: a remote unit with hundreds of sources has descriptors above FD_SETSIZE (1024).
        # A poll set is made once for each set of objects waited on (a driver's are fixed).
        objs = [self.sock, *extra]
        key = tuple((id(x), x.fileno()) for x in objs)
        entry = self._polls.get(key)
        if entry is None:
            poller = select.poll()
            for x in objs:
                poller.register(x, _READABLE)
            if len(self._polls) >= 8:  # objects come and go (a closed waker): keep a few
                self._polls.clear()
            entry = self._polls[key] = (poller, {fd: x for (_, fd), x in zip(key, objs, strict=True)})
        poller, by_fd = entry
        ready = [by_fd[fd] for fd, _ in poller.poll(max(0.0, timeout) * 1000.0)]
        return self.sock in ready, [x for x in ready if x is not self.sock]

    def read_events(self) -> list[jp.Event]:
        """One read (blocking up to the timeout), then whatever else is already there without blocking
        (a TLS read returns one 16 KiB record at a time; gathering them saves a select per record).
        Returns the complete events received. Raises PeerClosed at EOF, ProtocolError on bad input."""
        try:
            data = self.sock.recv(RECV_CHUNK)
        except ssl.SSLWantReadError:
            return []
        if not data:
            self.conn.receive_eof()  # a frame cut short is a protocol error, reported as such
            raise PeerClosed("peer closed the connection")
        parts = [data]
        total = len(data)
        self.sock.settimeout(0.0)
        try:
            while total < RECV_BURST:
                more = self.sock.recv(RECV_CHUNK)
                if not more:
                    break
                parts.append(more)
                total += len(more)
        except (ssl.SSLWantReadError, BlockingIOError):
            pass
        finally:
            self.sock.settimeout(self.timeout)
        self.conn.receive_data(b"".join(parts) if len(parts) > 1 else data)
        out: list[jp.Event] = []
        while True:
            ev = self.conn.next_event()
            if isinstance(ev, jp.NeedData):
                return out
            out.append(ev)

    def shutdown(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
