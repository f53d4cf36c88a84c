"""Relay one guest TCP connection (QEMU guestfwd ``cmd:``, on stdin/stdout) to a loopback port.

QEMU starts this program once per guest connection to the forwarded address, with the connection on
fds 0 and 1 (and 2: so nothing may ever be printed). It connects to 127.0.0.1:PORT only, disables
Nagle and re-arms TCP_QUICKACK after every read, so a USB/IP round trip is not held back by delayed
ACKs. Usage: ``relay.py PORT``.
"""

from __future__ import annotations

import os
import select
import socket
import sys

CHUNK = 1 << 18


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def relay(port: int, fd_in: int = 0, fd_out: int = 1) -> None:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    quickack = getattr(socket, "TCP_QUICKACK", None)
    for fd in {fd_in, fd_out}:
        try:  # the guest side may be a TCP socket too, depending on the QEMU version
            with socket.socket(fileno=os.dup(fd)) as side:
                side.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
    sfd = sock.fileno()
    guest_open = True
    try:
        while True:
            watch = [sfd, fd_in] if guest_open else [sfd]
            ready, _, _ = select.select(watch, [], [])
            if fd_in in ready:
                data = os.read(fd_in, CHUNK)
                if not data:
                    guest_open = False
                    sock.shutdown(socket.SHUT_WR)
                else:
                    sock.sendall(data)
            if sfd in ready:
                data = sock.recv(CHUNK)
                if quickack is not None:
                    sock.setsockopt(socket.IPPROTO_TCP, quickack, 1)
                if not data:
                    return
                _write_all(fd_out, data)
    finally:
        sock.close()


def main() -> int:
    try:
        relay(int(sys.argv[1]))
    except (OSError, ValueError, IndexError):
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
