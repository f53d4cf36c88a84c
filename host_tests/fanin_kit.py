"""Many sources into one remote unit: sources simulated in one process, each a full journey-protocol
source (its own TLS certificate, `Replicator`, link thread and volume), some of them real local units
(the ring journal and `LocalUnit` on files), the rest the link tests' in-memory journal and unit.

Used by `host_tests/test_fanin.py` (correctness at 256 sources) and `bench/bench_fanin.py` (aggregate
apply rate against the remote disk's raw rate, memory and threads per source).
"""

from __future__ import annotations

import random
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from firmware.journal import Journal
from firmware.local_unit import LocalUnit
from firmware.pairing import TlsFiles, pair
from firmware.replication.spec import RemoteSpec
from firmware.replicator import Replicator, ReplicatorTuning
from firmware.volume import Volume
from host_tests.linkkit import FakeJournal, FakeLocalUnit

BS = 4096
TUNING = ReplicatorTuning(heartbeat_interval_s=2.0, dead_after_s=60.0, backoff_initial_s=0.2, backoff_max_s=2.0,
                          connect_timeout_s=30.0, sync_timeout_s=60.0, drain_timeout_s=120.0)


def source_id(i: int) -> str:
    return f"src-{i:03d}"


def make_pairing(directory: Path, remote: str, n: int) -> Path:
    pair(directory, remote, [source_id(i) for i in range(n)])
    return directory


@dataclass
class Source:
    """One simulated source: a volume, a journal and a replicator to the remote."""

    sid: str
    volume_path: Path
    unit: Any
    journal: Any
    volume: Volume
    rep: Replicator
    real: bool
    written: int = 0

    def write_random(self, rng: random.Random, n: int, max_blocks: int = 4) -> int:
        """`n` host writes of 1..max_blocks blocks at random places, a flush after the last; bytes written."""
        total = 0
        for _ in range(n):
            count = rng.randint(1, max_blocks)
            lba = rng.randrange(0, self.volume.num_blocks - count)
            data = rng.randbytes(count * BS)
            self.unit.write(lba, data)
            total += len(data)
        self.unit.flush()
        self.written += total
        return total

    def close(self) -> None:
        self.rep.close()
        if self.real:
            self.unit.close()
            self.journal.close()
        self.volume.close()


def open_source(work: Path, tls_dir: Path, i: int, address: str, *, real: bool, size: int) -> Source:
    sid = source_id(i)
    d = work / sid
    d.mkdir(parents=True, exist_ok=True)
    vpath = d / "volume.img"
    volume = Volume(vpath, size=size, block_size=BS, write_cache=True)
    journal: Any
    unit: Any
    if real:
        journal = Journal.open(d / "journal", size=8 << 20, unit_uuid=uuid.uuid4(), block_size=BS)
        unit = LocalUnit(volume, journal, bitmap_path=str(d / "dirty.bitmap"), write_cache=True)
    else:
        journal = FakeJournal()
        unit = FakeLocalUnit(volume, journal)
    rep = Replicator(unit, journal, source_id=sid, remotes=[RemoteSpec(address, "async", "fanin")],
                     tls=TlsFiles.for_source(tls_dir, sid), tuning=TUNING)
    rep.start()
    return Source(sid, vpath, unit, journal, volume, rep, real)


def wait_streaming(sources: list[Source], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for s in sources:
        while s.rep.links[0].state.name != "STREAMING":
            if time.monotonic() > deadline:
                raise AssertionError(f"{s.sid} never streamed: {s.rep.status()}")
            time.sleep(0.02)


def wait_drained(sources: list[Source], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for s in sources:
        if not s.rep.wait_drained(max(0.1, deadline - time.monotonic())):
            raise AssertionError(f"{s.sid} did not drain: {s.rep.status()}")


def remote_resources(status: dict[str, Any]) -> dict[str, int]:
    res = status["resources"]
    return {"threads": int(res["threads"]), "rss_bytes": int(res["rss_bytes"]), "open_fds": int(res["open_fds"])}
