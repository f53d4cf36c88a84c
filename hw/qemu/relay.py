"""Relay one guest TCP connection (QEMU guestfwd ``cmd:``, on stdin/stdout) to a loopback port.

QEMU starts this program once per guest connection to the forwarded address, with the connection on
fds 0 and 1 (and 2: so nothing may ever be printed). It connects to 127.0.0.1:PORT only.

Both of its sockets are TCP: libslirp hands the guest connection over as a loopback TCP socket pair,
whose slirp end has Nagle on. So the relay disables Nagle on its own sockets and re-arms TCP_QUICKACK
after every read on each of them: otherwise slirp holds the tail of every multi-segment message until
a delayed ACK (40 ms) arrives, and a 4 KiB USB/IP write costs 45 ms instead of about 2 ms.
Usage: ``relay.py PORT``.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import sys

CHUNK = 1 << 18
QUICKACK = getattr(socket, "TCP_QUICKACK", None)


def _tune(sock: socket.socket) -> bool:
    """TCP_NODELAY + TCP_QUICKACK; False if sock is not a TCP socket (a pipe or a unix socket)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if QUICKACK is not None:
            sock.setsockopt(socket.IPPROTO_TCP, QUICKACK, 1)
    except OSError:
        return False
    return True


def _quickack(sock: socket.socket | None) -> None:
    if sock is not None and QUICKACK is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, QUICKACK, 1)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def relay(port: int, fd_in: int = 0, fd_out: int = 1) -> None:
    server = socket.create_connection(("127.0.0.1", port))
    _tune(server)
    guest_in: socket.socket | None = None
    guest_socks: list[socket.socket] = []
    for fd in dict.fromkeys((fd_in, fd_out)):
        try:
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        guest_socks.append(sock)
        if _tune(sock) and fd == fd_in:
            guest_in = sock
    sfd = server.fileno()
    guest_open = True
    try:
        while True:
            ready, _, _ = select.select([sfd, fd_in] if guest_open else [sfd], [], [])
            if fd_in in ready:
                data = os.read(fd_in, CHUNK)
                _quickack(guest_in)
                if not data:
                    guest_open = False
                    server.shutdown(socket.SHUT_WR)
                else:
                    server.sendall(data)
            if sfd in ready:
                data = server.recv(CHUNK)
                _quickack(server)
                if not data:
                    return
                _write_all(fd_out, data)
    finally:
        server.close()
        for sock in guest_socks:
            sock.close()


def main() -> int:
    try:
        relay(int(sys.argv[1]))
    except (OSError, ValueError, IndexError):
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
