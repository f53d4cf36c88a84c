"""Fan-in: many sources into one `usbmirror remote` process.

For each number of sources N, N sources in this process (one TLS certificate, replicator and link each;
the link tests' in-memory journal) connect to one remote unit process, then all write at once: random
writes of 4 to 16 KiB and a flush each. Printed per N: the remote's aggregate apply rate (payload bytes from the
first write until every source is acknowledged) beside the raw rate of the same disk measured in the same
run (64 KiB pwrite + fdatasync per 1 MiB, in the directory that holds the targets) as a ratio, and the
remote's threads, resident memory and open files per source (from its own status) — flat means the
cost of a source does not grow with the number of sources.

The sources share this machine's CPU with the remote, so the aggregate rate is a floor for the remote.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from firmware.resources import FDS_PER_SOURCE, raise_fd_limit
from host_tests.fanin_kit import (
    Source,
    make_pairing,
    open_source,
    remote_resources,
    source_id,
    wait_drained,
    wait_streaming,
)
from host_tests.units import Units

MIB = 1 << 20


def raw_rate(directory: Path, total: int) -> float:
    """Bytes per second of 64 KiB pwrites with an fdatasync every MiB, into a new file."""
    path = directory / "raw.bin"
    block = os.urandom(64 << 10)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        t0 = time.perf_counter()
        off = 0
        while off < total:
            os.pwrite(fd, block, off)
            off += len(block)
            if off % MIB == 0:
                os.fdatasync(fd)
        os.fdatasync(fd)
        return total / (time.perf_counter() - t0)
    finally:
        os.close(fd)
        path.unlink()


def run(n: int, writes: int, work: Path) -> None:
    rng = random.Random(n)
    tls = make_pairing(work / "tls", "fanin", n)
    sources: list[Source] = []
    with Units(work) as units:
        tdir = work / "targets"
        tdir.mkdir()
        targets = {source_id(i): tdir / f"{source_id(i)}.img" for i in range(n)}
        remote = units.start_remote("fanin", targets=targets, tls_dir=tls)
        try:
            idle = remote_resources(remote.status())
            for i in range(n):
                sources.append(open_source(work / "sources", tls, i, remote.address, real=False, size=16 * MIB))
            wait_streaming(sources, 600)
            busy = remote_resources(remote.status())
            t0 = time.perf_counter()
            total = sum(s.write_random(rng, writes, max_blocks=4) for s in sources)
            wait_drained(sources, 900)
            elapsed = time.perf_counter() - t0
        finally:
            for s in sources:
                s.close()
        remote.stop()
        raw = raw_rate(tdir, max(64 * MIB, min(total, 256 * MIB)))
    rate = total / elapsed
    per = {k: (busy[k] - idle[k]) / n for k in busy}
    print(f"fan-in {n:4d} sources: applied {total / MIB:7.1f} MiB in {elapsed:6.2f} s = {rate / MIB:6.1f} MiB/s; "
          f"raw disk {raw / MIB:6.1f} MiB/s; ratio {rate / raw:.2f}; per source: {per['threads']:.2f} threads, "
          f"{per['rss_bytes'] / 1024:.0f} KiB resident, {per['open_fds']:.2f} open files", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sources", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--writes", type=int, default=32, help="writes of 4-16 KiB per source (default 32)")
    args = ap.parse_args()
    raise_fd_limit(64 + FDS_PER_SOURCE * max(args.sources))
    for n in args.sources:
        with tempfile.TemporaryDirectory(prefix="bench-fanin-") as tmp:
            run(n, args.writes, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
