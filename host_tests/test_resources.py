"""A remote unit with hundreds of sources holds more than 1024 open files: the link's wait works on
descriptors above select()'s FD_SETSIZE, the unit raises its own soft limit on open files, and its
status reports threads, memory and descriptors."""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys

import pytest

from firmware.link import protocol as jp
from firmware.link_driver import Waker
from firmware.link_transport import LinkTransport
from firmware.resources import process_resources


def _high(sock: socket.socket, fd: int) -> socket.socket:
    os.dup2(sock.fileno(), fd)
    sock.close()
    return socket.socket(fileno=fd)


def test_the_link_waits_on_descriptors_above_1024() -> None:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < 1600:
        pytest.skip(f"this shell allows {soft} open files: descriptors above 1024 cannot be made here")
    a, b = socket.socketpair()
    a, b = _high(a, 1500), _high(b, 1501)
    waker = Waker()
    t = LinkTransport(a, jp.Role.SOURCE, timeout=5)
    try:
        assert t.wait(0.01, [waker]) == (False, [])
        waker.wake()
        assert t.wait(1.0, [waker]) == (False, [waker])
        b.send(b"x")
        ready, _ = t.wait(1.0, [])
        assert ready
    finally:
        a.close()
        b.close()


def test_the_unit_raises_its_soft_open_file_limit() -> None:
    code = (
        "import resource\n"
        "from firmware.resources import raise_fd_limit\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))\n"
        "print(*raise_fd_limit(1200), resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    soft, hard, now = int(out[0]), int(out[1]), int(out[2])
    assert soft == now == (1200 if hard < 0 or hard >= 1200 else hard)


def test_process_resources_counts_this_process() -> None:
    r = process_resources()
    assert r["threads"] is not None and r["threads"] >= 1
    assert r["rss_bytes"] is not None and r["rss_bytes"] > 1 << 20
    before = r["open_fds"]
    assert before is not None
    s = socket.socket()
    try:
        assert process_resources()["open_fds"] == before + 1
    finally:
        s.close()
