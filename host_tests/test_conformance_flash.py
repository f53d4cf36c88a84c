"""The `firmware.journal.flash.Flash` contract, run against every implementation.

What the journal ring relies on from the device it lives on: a fixed size, reads of what was last
written (a fresh device reads as zeros), bytes, bytearrays and memoryviews alike, an address outside
the device refused with `OSError` without changing anything (never a file that quietly grows, never a
short read passed on as data), `sync()` as the durability point that survives a power cut, and a
closed device that refuses further use with `OSError`.

Implementations: `FileFlash` on a pre-written file and on a raw block device (a loop device standing in
for the board's journal partition), and `SimulatedFlash`, the power-cut simulator the journal's own
tests run on. A new flash backend is added to `BACKENDS` and passes this suite before the journal uses it.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from firmware.journal.flash import FileFlash, Flash
from firmware.journal.sim import CrashMode, SimulatedFlash

SIZE = 256 << 10  # 256 KiB


class Backend:
    """One implementation under test: makes a device of SIZE bytes and brings it back after a power cut."""

    name = ""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp

    def make(self) -> Flash:
        raise NotImplementedError

    def after_power_cut(self, dev: Flash) -> Flash:
        """The device as it comes back after the power fails now: only what `sync()` made durable is
        promised (files are closed and reopened; the simulator drops everything not synced)."""
        raise NotImplementedError

    def medium_size(self) -> int:
        """The size of the medium underneath (a file's length): a refused write must not change it."""
        return SIZE

    def cleanup(self) -> None:
        """Release what `make` took."""


class File(Backend):
    name = "file"

    def make(self) -> Flash:
        return FileFlash.create(self.tmp / "journal.flash", SIZE)

    def after_power_cut(self, dev: Flash) -> Flash:
        dev.close()
        return FileFlash(self.tmp / "journal.flash")

    def medium_size(self) -> int:
        return os.stat(self.tmp / "journal.flash").st_size


class RawPartition(Backend):
    """`FileFlash` on a loop device over a zeroed file: a raw partition as on a board."""

    name = "partition"
    dev: Path | None = None

    def make(self) -> Flash:
        backing = self.tmp / "partition.img"
        with open(backing, "wb") as f:
            f.truncate(SIZE)
        losetup = shutil.which("losetup")
        r = subprocess.run([losetup, "-f", "--show", str(backing)], capture_output=True, text=True,
                           check=False) if losetup else None
        if r is None or r.returncode != 0:
            pytest.skip("no loop device here (losetup needs CAP_SYS_ADMIN): the raw-partition case runs where "
                        f"one is available ({r.stderr.strip() if r else 'losetup not installed'})")
        self.dev = Path(r.stdout.strip())
        flash = FileFlash(self.dev)
        assert flash.is_block_device
        return flash

    def after_power_cut(self, dev: Flash) -> Flash:
        dev.close()
        assert self.dev is not None
        return FileFlash(self.dev)

    def medium_size(self) -> int:
        if self.dev is None:
            return SIZE
        with FileFlash(self.dev) as f:
            return f.size

    def cleanup(self) -> None:
        if self.dev is not None:
            subprocess.run(["losetup", "-d", str(self.dev)], check=False, capture_output=True)


class Simulated(Backend):
    name = "simulated"

    def make(self) -> Flash:
        return SimulatedFlash(SIZE)

    def after_power_cut(self, dev: Flash) -> Flash:
        assert isinstance(dev, SimulatedFlash)
        return dev.rebooted(random.Random(7), CrashMode.DROP)


BACKENDS: list[type[Backend]] = [File, RawPartition, Simulated]


class Case:
    def __init__(self, backend: Backend, dev: Flash) -> None:
        self.backend = backend
        self.dev = dev


@pytest.fixture(params=BACKENDS, ids=lambda b: b.name)
def case(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Case]:
    backend: Backend = request.param(tmp_path)
    c = Case(backend, backend.make())
    try:
        yield c
    finally:
        c.dev.close()
        backend.cleanup()


def _pattern(n: int, tag: int) -> bytes:
    return bytes((tag + i * 7) & 0xFF for i in range(n))


def test_satisfies_the_protocol(case: Case) -> None:
    assert isinstance(case.dev, Flash)


def test_size_and_a_fresh_device_reads_as_zeros(case: Case) -> None:
    assert case.dev.size == SIZE
    assert case.dev.pread(4096, 0) == bytes(4096)
    assert case.dev.pread(4096, SIZE - 4096) == bytes(4096)


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
@pytest.mark.parametrize("offset", [0, 511, 4096, SIZE - 1000])
def test_reads_return_what_was_written(case: Case, kind: type, offset: int) -> None:
    data = _pattern(1000, offset & 0xFF)
    case.dev.pwrite(kind(data), offset)
    assert case.dev.pread(1000, offset) == data
    # the bytes around it are untouched
    if offset:
        assert case.dev.pread(1, offset - 1) == b"\0"
    if offset + 1000 < SIZE:
        assert case.dev.pread(1, offset + 1000) == b"\0"


def test_the_newest_write_wins(case: Case) -> None:
    case.dev.pwrite(b"a" * 600, 100)
    case.dev.pwrite(b"b" * 100, 300)
    assert case.dev.pread(600, 100) == b"a" * 200 + b"b" * 100 + b"a" * 300


@pytest.mark.parametrize("offset,length", [(SIZE - 10, 11), (SIZE, 1), (SIZE + 4096, 512), (-1, 1)])
def test_a_write_outside_the_device_is_refused_and_changes_nothing(case: Case, offset: int, length: int) -> None:
    before = case.dev.pread(4096, SIZE - 4096)
    with pytest.raises(OSError):
        case.dev.pwrite(b"x" * length, offset)
    assert case.dev.size == SIZE
    assert case.backend.medium_size() == SIZE
    assert case.dev.pread(4096, SIZE - 4096) == before


@pytest.mark.parametrize("offset,length", [(SIZE - 10, 11), (SIZE, 1), (-1, 1)])
def test_a_read_outside_the_device_is_refused(case: Case, offset: int, length: int) -> None:
    with pytest.raises(OSError):
        case.dev.pread(length, offset)


def test_synced_writes_survive_a_power_cut(case: Case) -> None:
    case.dev.pwrite(_pattern(8192, 3), 8192)
    case.dev.pwrite(_pattern(100, 9), SIZE - 100)
    case.dev.sync()
    case.dev = case.backend.after_power_cut(case.dev)
    assert case.dev.size == SIZE
    assert case.dev.pread(8192, 8192) == _pattern(8192, 3)
    assert case.dev.pread(100, SIZE - 100) == _pattern(100, 9)


def test_an_idle_sync_is_harmless(case: Case) -> None:
    case.dev.sync()
    case.dev.sync()
    assert case.dev.pread(512, 0) == bytes(512)


def test_a_closed_device_refuses_use(case: Case) -> None:
    case.dev.close()
    for op in (lambda: case.dev.pread(1, 0), lambda: case.dev.pwrite(b"x", 0), case.dev.sync):
        with pytest.raises(OSError):
            op()
    case.dev.close()  # closing twice is harmless


@pytest.mark.parametrize("iov_max", [1024, 2])
def test_file_flash_pwritev_writes_the_buffers_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        iov_max: int) -> None:
    # the journal writes a record's header, payload and padding as separate buffers in one call
    # (in groups of IOV_MAX buffers where there are more)
    import firmware.journal.flash as flash_mod

    monkeypatch.setattr(flash_mod, "_IOV_MAX", iov_max)
    dev = FileFlash.create(tmp_path / "journal.flash", SIZE)
    parts: list[bytes | bytearray | memoryview] = [_pattern(64, 1), bytearray(_pattern(4096, 2)),
                                                   memoryview(_pattern(448, 3)), _pattern(512, 4)]
    dev.pwritev(parts, 8192)
    assert dev.pread(64 + 4096 + 448 + 512, 8192) == b"".join(bytes(p) for p in parts)
    with pytest.raises(OSError):
        dev.pwritev([bytes(512), bytes(512)], SIZE - 512)
    assert dev.pread(512, SIZE - 512) == bytes(512)  # refused whole: nothing written
    dev.close()
