"""Fan-in at scale: 256 sources into one `usbmirror remote` process (TLS, one certificate per source),
4 of them real local units (the ring journal and `LocalUnit` on files), the rest in-memory sources
speaking the same journey protocol from this process.

Each source writes random blocks and a flush, first 16 sources, then all 256. At the end every target
on the remote equals its source's volume byte for byte, and the remote's own status (`resources`)
shows what the extra 240 sources cost it: at most two threads each (a connection and its flusher) and a
bounded amount of memory each, so the cost per source stays flat.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from firmware.resources import FDS_PER_SOURCE, raise_fd_limit
from host_tests.fanin_kit import (
    BS,
    Source,
    make_pairing,
    open_source,
    remote_resources,
    source_id,
    wait_drained,
    wait_streaming,
)
from host_tests.units import Units, first_difference

pytestmark = pytest.mark.slow

SOURCES = int(os.environ.get("FANIN_SOURCES", "256"))
FIRST = 16
REAL = 4
VOLUME = 1 << 20
MAX_RSS_PER_SOURCE = 4 << 20  # far above what a connection, a target and its history should take


def test_256_sources_into_one_remote(tmp_path: Path) -> None:
    soft, hard = raise_fd_limit(64 + FDS_PER_SOURCE * SOURCES)  # the sources here, like the remote itself
    assert soft >= 64 + 6 * SOURCES, f"open file limit {soft} (hard {hard}) is too low for {SOURCES} sources"
    rng = random.Random(256)
    tls = make_pairing(tmp_path / "tls", "fanin", SOURCES)
    sources: list[Source] = []
    with Units(tmp_path) as units:
        targets = {source_id(i): tmp_path / "targets" / f"{source_id(i)}.img" for i in range(SOURCES)}
        (tmp_path / "targets").mkdir()
        remote = units.start_remote("fanin", targets=targets, tls_dir=tls, extra=["--history-size", "4M"])
        try:
            idle = remote_resources(remote.status())
            for i in range(FIRST):
                sources.append(open_source(tmp_path / "sources", tls, i, remote.address, real=i < REAL, size=VOLUME))
            wait_streaming(sources, 120)
            for s in sources:
                s.write_random(rng, 8)
            wait_drained(sources, 120)
            at_first = remote_resources(remote.status())
            for i in range(FIRST, SOURCES):
                sources.append(open_source(tmp_path / "sources", tls, i, remote.address, real=False, size=VOLUME))
            wait_streaming(sources, 300)
            for s in sources:
                s.write_random(rng, 8)
            wait_drained(sources, 300)
            at_all = remote_resources(remote.status())
            st = remote.status()
            assert len(st["sources"]) == SOURCES
            assert all(src["state"] == "connected" and src["consistent"] for src in st["sources"]), st["sources"][:3]
        finally:
            for s in sources:
                s.close()
        assert remote.stop() == 0, units.describe()
    for s in sources:
        target = targets[s.sid]
        assert target.stat().st_size == VOLUME
        diff = first_difference(s.volume_path, target)
        assert diff is None, f"{s.sid} ({'real' if s.real else 'simulated'}) differs at byte {diff}"
    added = SOURCES - FIRST
    threads = at_all["threads"] - at_first["threads"]
    rss = at_all["rss_bytes"] - at_first["rss_bytes"]
    print(f"remote idle {idle}; {FIRST} sources {at_first}; {SOURCES} sources {at_all}; per added source: "
          f"{threads / added:.2f} threads, {rss / added / 1024:.0f} KiB, "
          f"{(at_all['open_fds'] - at_first['open_fds']) / added:.2f} fds; {BS}-byte blocks")
    assert threads <= 2 * added
    assert rss <= MAX_RSS_PER_SOURCE * added
