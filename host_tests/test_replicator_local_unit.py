"""The replicator on the real journal and LocalUnit (firmware.journal, firmware.local_unit) over TLS:
writes reach the remote byte for byte, in async and sync mode, across a local restart, and after a
journal overflow while the remote was away."""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from firmware.journal import Journal
from firmware.local_unit import LocalUnit
from firmware.pairing import TlsFiles, pair
from firmware.remote_unit import RemoteUnit, RemoteUnitConfig
from firmware.replicator import RemoteSpec, Replicator
from firmware.volume import Volume
from host_tests.linkkit import wait_until
from host_tests.test_replicator_e2e import FAST

BS = 512
SIZE = 4 << 20
UNIT = uuid.UUID("12345678-1234-5678-1234-567812345678")


class RealRig:
    def __init__(self, tmp: Path, journal_size: int = 4 << 20) -> None:
        self.tmp = tmp
        self.tls = tmp / "tls"
        pair(self.tls, "r1", ["lmu"])
        self.target = tmp / "target.img"
        self.journal_size = journal_size
        self.stack = ExitStack()
        self.remote: RemoteUnit | None = None
        self.port = 0
        self.unit: LocalUnit | None = None
        self.rep: Replicator | None = None
        self.local_stack = ExitStack()

    def start_remote(self) -> None:
        cfg = RemoteUnitConfig(("127.0.0.1", self.port), "r1", {"lmu": str(self.target)}, str(self.tls),
                               str(self.tmp / "rstate"), heartbeat_timeout_s=5)
        self.remote = RemoteUnit(cfg)
        self.remote.start()
        self.port = self.remote.port

    def stop_remote(self) -> None:
        if self.remote:
            self.remote.stop()
            self.remote = None

    def start_local(self, mode: str = "async") -> None:
        s = self.local_stack
        vol = s.enter_context(Volume(self.tmp / "local.img", size=SIZE, block_size=BS))
        j = s.enter_context(Journal.open(self.tmp / "journal", size=self.journal_size, unit_uuid=UNIT,
                                         block_size=BS))
        self.unit = s.enter_context(LocalUnit(vol, j, bitmap_path=str(self.tmp / "dirty")))
        self.rep = s.enter_context(Replicator(self.unit, j, source_id="lmu",
                                              remotes=[RemoteSpec(("127.0.0.1", self.port), mode, "r1")],
                                              tls=TlsFiles.for_source(self.tls, "lmu"), tuning=FAST))

    def stop_local(self) -> None:
        self.local_stack.close()
        self.local_stack = ExitStack()
        self.unit = None
        self.rep = None

    def writes(self, n: int, rng: random.Random, big: bool = False) -> None:
        assert self.unit is not None
        for _ in range(n):
            count = rng.randint(32, 128) if big else rng.randint(1, 32)
            lba = rng.randrange(0, SIZE // BS - count)
            self.unit.write(lba, rng.randbytes(count * BS))
            if rng.random() < 0.1:
                self.unit.flush()

    def drain(self) -> None:
        rep, unit = self.rep, self.unit
        assert rep is not None and unit is not None
        wait_until(lambda: rep.links[0].acked_seq >= unit.journal.durable_seq, what="remote caught up")

    def same(self) -> bool:
        assert self.unit is not None
        local = self.unit.read(0, SIZE // BS)
        return self.target.read_bytes() == local

    def diff(self) -> object:
        """Which blocks differ (for the assertion message)."""
        assert self.unit is not None
        a = self.target.read_bytes()
        b = self.unit.read(0, SIZE // BS)
        blocks = [i for i in range(SIZE // BS) if a[i * BS:(i + 1) * BS] != b[i * BS:(i + 1) * BS]]
        return blocks[:5], len(blocks)

    def close(self) -> None:
        self.stop_local()
        self.stop_remote()


@pytest.fixture
def real(tmp_path: Path) -> Iterator[RealRig]:
    r = RealRig(tmp_path)
    yield r
    r.close()


def test_real_local_unit_async_then_restart(real: RealRig) -> None:
    rng = random.Random(40)
    real.start_remote()
    real.start_local()
    real.writes(100, rng)
    real.drain()
    assert real.same()
    st = real.rep.status()["remotes"][0]  # type: ignore[union-attr]
    assert st["state"] == "streaming" and st["lag_records"] == 0
    real.writes(30, rng, big=True)
    real.stop_local()  # batches may be in flight
    real.start_local()
    real.writes(30, rng)
    real.drain()
    assert real.same()
    assert real.rep.verify()["match"]  # type: ignore[union-attr]


def test_real_local_unit_sync_mode(real: RealRig) -> None:
    rng = random.Random(41)
    real.start_remote()
    real.start_local(mode="sync")
    rep = real.rep
    assert rep is not None
    wait_until(lambda: rep.links[0].state.name == "STREAMING", what="link up")
    for _ in range(20):
        real.writes(1, rng)
        assert real.remote.targets["lmu"].state.applied_seq >= real.unit.journal.durable_seq  # type: ignore
    assert real.same()


@pytest.mark.parametrize("host_writes_after", [True, False], ids=["host-writes-again", "host-idle"])
def test_real_journal_overflow_then_resync(tmp_path: Path, host_writes_after: bool) -> None:
    real = RealRig(tmp_path, journal_size=512 << 10)  # a small journal that fills quickly
    try:
        rng = random.Random(42)
        real.start_remote()
        real.start_local()
        real.writes(20, rng)
        real.drain()
        real.stop_remote()  # the remote goes away; the journal keeps its records, then fills up
        real.writes(80, rng, big=True)
        assert real.unit is not None and real.unit.overflow
        assert real.unit.dirty_snapshot().regions
        real.start_remote()
        unit = real.unit
        wait_until(lambda: not unit.overflow or unit.journal.used_bytes < unit.journal.capacity_bytes // 2,
                   what="journal drained")
        if host_writes_after:
            real.writes(5, rng)  # a write after the journal has room leaves overflow
        # with an idle host the local unit leaves overflow once the journal has room (asked by the
        # replicator's polling), so the final round runs anyway
        wait_until(lambda: not unit.dirty_snapshot().regions, what="dirty regions resynced and cleared")
        real.drain()
        remote = real.remote
        assert remote is not None
        wait_until(lambda: remote.status()["sources"][0]["consistent"] is True, what="the resync closed")
        assert real.same(), real.diff()
        assert real.rep.status()["remotes"][0]["resync"]["reason"] == "journal overflow"  # type: ignore
    finally:
        real.close()
