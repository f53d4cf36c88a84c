"""The `firmware.storage.BlockStore` contract, run against every implementation.

What the SCSI target (and so the host) relies on from a block store: its geometry, that a fresh store
reads as zeros, that reads return the newest data written, that an address outside the store or data
that is not whole blocks is refused with `ValueError` and changes nothing, that UNMAP reads back as
zeros, that `flush()` and `write(fua=True)` are durability points that survive a power cut, and that a
read-only store refuses writes with `WriteProtected` (DATA PROTECT) while still serving reads.

Implementations: `Volume` on a file and on a block device (a loop device standing in for a partition,
larger than the volume), the firmware's `MemoryStore`, the `LocalUnit` (journal first, then the
volume), a remote's promoted copy (`PromotedStore`) and the test doubles that stand in for a store.
A new backend is added to `BACKENDS` and passes this suite before it is used. mypy checks that each
one satisfies the Protocol (`make lint` type-checks the conformance suites), the test
`test_satisfies_the_protocol` checks it at run time.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from firmware.journal import Journal
from firmware.journal.bitmap import DirtyBitmap
from firmware.journal.format import RING_OFFSET
from firmware.journal.sim import CrashMode, PowerRail, SimulatedFlash, SimulatedVolume
from firmware.local_unit import LocalUnit
from firmware.memory_store import MemoryStore
from firmware.promotion import PromotedStore
from firmware.storage import BlockStore, WriteProtected
from firmware.target_store import TargetStore
from firmware.volume import Volume
from host_tests.scsi_fakes import HeldWriteStore, MemoryBlockStore

NBLOCKS = 64
UNIT = uuid.UUID("0f0e0d0c-0b0a-4908-8706-050403020100")


class Backend:
    """One implementation under test: makes a store, brings it back after a power cut, and (when
    the implementation has one) opens it read-only."""

    name = ""
    has_read_only = False

    def __init__(self, tmp: Path, block_size: int, write_cache: bool) -> None:
        self.tmp = tmp
        self.bs = block_size
        self.write_cache = write_cache

    def make(self) -> BlockStore:
        raise NotImplementedError

    def after_power_cut(self, store: BlockStore) -> BlockStore:
        """The store as it comes back after the power fails now (for files: closed and reopened,
        the kernel keeps the page cache; for simulated media: only what was made durable)."""
        raise NotImplementedError

    def reopen_read_only(self, store: BlockStore) -> BlockStore:
        raise NotImplementedError

    def close(self, store: BlockStore) -> None:
        """Release what `make` took."""


class FileVolume(Backend):
    name = "file"
    has_read_only = True

    def path(self) -> Path:
        return self.tmp / "volume.img"

    def make(self) -> BlockStore:
        self.vol = Volume(self.path(), size=NBLOCKS * self.bs, block_size=self.bs, write_cache=self.write_cache)
        return self.vol

    def after_power_cut(self, store: BlockStore) -> BlockStore:
        self.vol.close()
        self.vol = Volume(self.path(), block_size=self.bs, write_cache=self.write_cache)
        return self.vol

    def reopen_read_only(self, store: BlockStore) -> BlockStore:
        self.vol.close()
        self.vol = Volume(self.path(), block_size=self.bs, write_cache=self.write_cache, read_only=True)
        return self.vol

    def close(self, store: BlockStore) -> None:
        self.vol.close()


class BlockDeviceVolume(FileVolume):
    """A `Volume` on a loop device twice its size: a partition that holds the volume in its first blocks."""

    name = "blockdev"
    dev: Path | None = None

    def path(self) -> Path:
        if self.dev is None:
            backing = self.tmp / "disk.img"
            with open(backing, "wb") as f:
                f.truncate(2 * NBLOCKS * self.bs)
            losetup = shutil.which("losetup")
            r = subprocess.run([losetup or "losetup", "-f", "--show", str(backing)], capture_output=True, text=True,
                               check=False) if losetup else None
            if r is None or r.returncode != 0:
                pytest.skip("no loop device here (losetup needs CAP_SYS_ADMIN): the block-device case runs "
                            f"where one is available ({r.stderr.strip() if r else 'losetup not installed'})")
            self.dev = Path(r.stdout.strip())
        return self.dev

    def make(self) -> BlockStore:
        self.vol = Volume(self.path(), size=NBLOCKS * self.bs, block_size=self.bs, write_cache=self.write_cache)
        assert self.vol.is_block_device
        return self.vol

    def after_power_cut(self, store: BlockStore) -> BlockStore:
        self.vol.close()
        self.vol = Volume(self.path(), size=NBLOCKS * self.bs, block_size=self.bs, write_cache=self.write_cache)
        return self.vol

    def reopen_read_only(self, store: BlockStore) -> BlockStore:
        self.vol.close()
        self.vol = Volume(self.path(), size=NBLOCKS * self.bs, block_size=self.bs, write_cache=self.write_cache,
                          read_only=True)
        return self.vol

    def close(self, store: BlockStore) -> None:
        super().close(store)
        if self.dev is not None:
            subprocess.run(["losetup", "-d", str(self.dev)], check=False, capture_output=True)


class Memory(Backend):
    name = "memory"
    has_read_only = True

    def make(self) -> BlockStore:
        self.mem = MemoryStore(block_size=self.bs, num_blocks=NBLOCKS, write_cache=self.write_cache)
        return self.mem

    def after_power_cut(self, store: BlockStore) -> BlockStore:
        self.mem = self.mem.crashed()
        return self.mem

    def reopen_read_only(self, store: BlockStore) -> BlockStore:
        self.mem = MemoryStore(self.bs, NBLOCKS, self.write_cache, read_only=True, visible=dict(self.mem.durable),
                               durable=dict(self.mem.durable))
        return self.mem


class Fake(Memory):
    """The SCSI tests' double (a MemoryStore with a call log and injectable failures)."""

    name = "scsi-fake"

    def make(self) -> BlockStore:
        self.mem = MemoryBlockStore(block_size=self.bs, num_blocks=NBLOCKS, write_cache=self.write_cache)
        return self.mem


class HeldFake(Memory):
    """The double whose writes wait for a release (released at once here)."""

    name = "held-fake"

    def make(self) -> BlockStore:
        held = HeldWriteStore(block_size=self.bs, num_blocks=NBLOCKS, write_cache=self.write_cache)
        held.release.set()
        self.mem = held
        return self.mem


@dataclass
class _Media:
    rail: PowerRail = field(default_factory=PowerRail)
    jflash: SimulatedFlash | None = None
    vflash: SimulatedFlash | None = None
    bflash: SimulatedFlash | None = None


class Local(Backend):
    """The local unit: a journal on simulated flash, then a simulated volume; the power cut drops
    everything that was not synced."""

    name = "local-unit"

    def _unit(self, media: _Media) -> LocalUnit:
        assert media.jflash is not None and media.vflash is not None and media.bflash is not None
        journal = Journal.open(None, size=None, unit_uuid=UNIT, block_size=self.bs, flash=media.jflash)
        volume = SimulatedVolume(media.vflash, block_size=self.bs)
        self.media = media
        self.unit = LocalUnit(volume, journal, bitmap_flash=media.bflash, region_blocks=8,
                              write_cache=self.write_cache, background_flush=False, sleep=lambda s: None)
        return self.unit

    def make(self) -> BlockStore:
        rail = PowerRail()
        media = _Media(rail, SimulatedFlash(RING_OFFSET + 16 * NBLOCKS * self.bs, rail=rail),
                       SimulatedFlash(NBLOCKS * self.bs, rail=rail), SimulatedFlash(8192, rail=rail))
        return self._unit(media)

    def after_power_cut(self, store: BlockStore) -> BlockStore:
        old = self.media
        old.rail.cut_now()
        rng = random.Random(1)
        new = _Media()
        assert old.jflash is not None and old.vflash is not None and old.bflash is not None
        new.jflash = old.jflash.rebooted(rng, CrashMode.DROP, rail=new.rail)
        new.vflash = old.vflash.rebooted(rng, CrashMode.DROP, rail=new.rail)
        new.bflash = old.bflash.rebooted(rng, CrashMode.DROP, rail=new.rail)
        return self._unit(new)

    def close(self, store: BlockStore) -> None:
        if not self.media.rail.cut:
            self.unit.close()


class LocalOnFiles(Backend):
    """The local unit as `usbmirror local` runs it: a journal file and an image file, with the
    background volume flusher; the power cut is a clean close and reopen."""

    name = "local-unit-files"

    def _open(self) -> LocalUnit:
        self.vol = Volume(self.tmp / "lu-volume.img", size=NBLOCKS * self.bs, block_size=self.bs)
        self.journal = Journal.open(self.tmp / "lu-journal", size=1 << 20, unit_uuid=UNIT, block_size=self.bs)
        self.unit = LocalUnit(self.vol, self.journal, bitmap_path=str(self.tmp / "lu-dirty.bitmap"),
                              write_cache=self.write_cache)
        return self.unit

    def make(self) -> BlockStore:
        return self._open()

    def after_power_cut(self, store: BlockStore) -> BlockStore:
        self.close(store)
        return self._open()

    def close(self, store: BlockStore) -> None:
        self.unit.close()
        self.journal.close()
        self.vol.close()


class Promoted(Backend):
    """A remote's promoted copy (`usbmirror promote`): the target file behind its store, each write
    marking the per-peer bitmap first; the power cut is a clean close and reopen."""

    name = "promoted-copy"

    def _open(self) -> BlockStore:
        self.tstore = TargetStore("s1", str(self.tmp / "target.img"), str(self.tmp))
        self.tstore.open(NBLOCKS * self.bs, self.bs)
        self.bitmap = DirtyBitmap.open(self.tmp / "s1.bitmap", num_blocks=NBLOCKS, region_blocks=8, unit_uuid=UNIT)
        self.store = PromotedStore(self.tstore, self.bitmap, num_blocks=NBLOCKS, block_size=self.bs, next_seq=1)
        self.store.set_write_cache(self.write_cache)
        return self.store

    def make(self) -> BlockStore:
        return self._open()

    def after_power_cut(self, store: BlockStore) -> BlockStore:
        self.close(store)
        return self._open()

    def close(self, store: BlockStore) -> None:
        self.store.close()
        self.bitmap.close()
        self.tstore.close()


BACKENDS: list[type[Backend]] = [FileVolume, BlockDeviceVolume, Memory, Local, LocalOnFiles, Fake, HeldFake,
                                 Promoted]


@dataclass
class Case:
    backend: Backend
    store: BlockStore


@pytest.fixture(params=BACKENDS, ids=lambda b: b.name)
def backend_cls(request: pytest.FixtureRequest) -> type[Backend]:
    cls: type[Backend] = request.param
    return cls


@pytest.fixture(params=[512, 4096], ids=lambda bs: f"bs{bs}")
def block_size(request: pytest.FixtureRequest) -> int:
    bs: int = request.param
    return bs


@pytest.fixture(params=[False, True], ids=["wc-off", "wc-on"])
def case(request: pytest.FixtureRequest, backend_cls: type[Backend], block_size: int,
         tmp_path: Path) -> Iterator[Case]:
    backend = backend_cls(tmp_path, block_size, bool(request.param))
    c = Case(backend, backend.make())
    try:
        yield c
    finally:
        backend.close(c.store)


def blocks(tag: int, n: int, bs: int) -> bytes:
    """`n` blocks, each different and different from `tag`'s other blocks."""
    return b"".join(bytes([tag & 0xFF, i & 0xFF]) * (bs // 2) for i in range(n))


def test_satisfies_the_protocol(case: Case) -> None:
    assert isinstance(case.store, BlockStore)


def test_geometry(case: Case) -> None:
    s = case.store
    assert s.block_size == case.backend.bs
    assert s.num_blocks == NBLOCKS
    assert s.write_cache is case.backend.write_cache
    assert s.read_only is False


def test_a_fresh_store_reads_as_zeros(case: Case) -> None:
    assert case.store.read(0, NBLOCKS) == bytes(NBLOCKS * case.backend.bs)


def test_reads_return_the_newest_data_written(case: Case) -> None:
    s, bs = case.store, case.backend.bs
    s.write(0, blocks(1, 3, bs))
    s.write(NBLOCKS - 2, blocks(2, 2, bs))  # the last blocks
    s.write(1, blocks(3, 1, bs))  # overwrites the middle of the first write
    assert s.read(0, 3) == blocks(1, 1, bs) + blocks(3, 1, bs) + blocks(1, 3, bs)[2 * bs:]
    assert s.read(NBLOCKS - 2, 2) == blocks(2, 2, bs)
    assert s.read(3, NBLOCKS - 5) == bytes((NBLOCKS - 5) * bs)  # nothing else changed
    assert s.read(2, 0) == b""


@pytest.mark.parametrize(("lba", "count"), [(NBLOCKS, 1), (NBLOCKS - 1, 2), (-1, 1), (0, NBLOCKS + 1), (0, -1)])
def test_out_of_range_is_refused_with_value_error_and_changes_nothing(case: Case, lba: int, count: int) -> None:
    s, bs = case.store, case.backend.bs
    s.write(NBLOCKS - 1, blocks(9, 1, bs))
    with pytest.raises(ValueError):
        s.read(lba, count)
    if count > 0:
        with pytest.raises(ValueError):
            s.write(lba, blocks(5, count, bs))
    with pytest.raises(ValueError):
        s.unmap(lba, count)
    assert s.read(0, NBLOCKS) == bytes((NBLOCKS - 1) * bs) + blocks(9, 1, bs)


def test_data_that_is_not_whole_blocks_is_refused(case: Case) -> None:
    s, bs = case.store, case.backend.bs
    with pytest.raises(ValueError):
        s.write(0, bytes(bs + 1))
    assert s.read(0, 2) == bytes(2 * bs)


def test_unmapped_blocks_read_as_zeros(case: Case) -> None:
    s, bs = case.store, case.backend.bs
    s.write(4, blocks(7, 6, bs))
    s.unmap(5, 3)
    assert s.read(4, 6) == blocks(7, 1, bs) + bytes(3 * bs) + blocks(7, 6, bs)[4 * bs:]
    s.flush()
    assert s.read(5, 3) == bytes(3 * bs)


def test_write_cache_switches_and_keeps_the_data(case: Case) -> None:
    s, bs = case.store, case.backend.bs
    s.set_write_cache(True)
    assert s.write_cache is True
    s.write(0, blocks(1, 2, bs))
    s.set_write_cache(False)  # flushes first
    assert s.write_cache is False
    assert s.read(0, 2) == blocks(1, 2, bs)
    s = case.backend.after_power_cut(s)
    assert s.read(0, 2) == blocks(1, 2, bs)


def test_acknowledged_writes_survive_a_power_cut(case: Case) -> None:
    """Write cache off: every write and unmap that returned is durable."""
    s, bs = case.store, case.backend.bs
    s.set_write_cache(False)
    s.write(0, blocks(1, 2, bs))
    s.unmap(1, 1)
    case.store = s = case.backend.after_power_cut(s)
    assert s.read(0, 2) == blocks(1, 1, bs) + bytes(bs)
    assert s.block_size == bs and s.num_blocks == NBLOCKS


def test_flush_makes_every_earlier_write_durable(case: Case) -> None:
    s, bs = case.store, case.backend.bs
    s.set_write_cache(True)
    s.write(0, blocks(1, 2, bs))
    s.unmap(1, 1)
    s.write(20, blocks(3, 3, bs))
    s.flush()
    case.store = s = case.backend.after_power_cut(s)
    assert s.read(0, 2) == blocks(1, 1, bs) + bytes(bs)
    assert s.read(20, 3) == blocks(3, 3, bs)


def test_fua_write_makes_itself_and_every_earlier_write_durable(case: Case) -> None:
    s, bs = case.store, case.backend.bs
    s.set_write_cache(True)
    s.write(0, blocks(1, 2, bs))
    s.write(10, blocks(2, 4, bs), fua=True)
    case.store = s = case.backend.after_power_cut(s)
    assert s.read(0, 2) == blocks(1, 2, bs)
    assert s.read(10, 4) == blocks(2, 4, bs)


def test_an_idle_flush_is_harmless(case: Case) -> None:
    s, bs = case.store, case.backend.bs
    s.flush()
    s.write(3, blocks(6, 1, bs))
    s.flush()
    s.flush()
    assert s.read(3, 1) == blocks(6, 1, bs)


@pytest.mark.parametrize("ro_backend", [b for b in BACKENDS if b.has_read_only], ids=lambda b: b.name)
def test_read_only_store_refuses_writes_with_write_protected(ro_backend: type[Backend], block_size: int,
                                                            tmp_path: Path) -> None:
    """(A backend without a read-only mode is always writable: `test_geometry` checks read_only is False.)"""
    backend = ro_backend(tmp_path, block_size, False)
    s, bs = backend.make(), block_size
    s.write(2, blocks(4, 2, bs))
    s.flush()
    ro = backend.reopen_read_only(s)
    try:
        _check_read_only(ro, bs)
    finally:
        backend.close(ro)


def _check_read_only(ro: BlockStore, bs: int) -> None:
    assert ro.read_only is True
    with pytest.raises(WriteProtected):
        ro.write(0, blocks(5, 1, bs))
    with pytest.raises(WriteProtected):
        ro.unmap(2, 1)
    ro.flush()
    assert ro.read(0, 4) == bytes(2 * bs) + blocks(4, 2, bs)

