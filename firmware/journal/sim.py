"""Power-cut simulation for tests: flash and volumes that lose or tear writes that were never synced.

Like SQLite's crash-test VFS and Jepsen's LazyFS, a `SimulatedFlash` keeps two images: what is on
the medium for sure (`durable`) and what a reader sees now (`current` = durable + writes since the
last sync). A `PowerRail` shared by several devices (journal, volume, dirty bitmap) counts their
operations; at a chosen operation it "cuts the power": that operation and every later one raise
`PowerCut`. `crash(rng, mode)` then returns the image the device holds after the cut, where each
write since the last sync was dropped, kept, or torn at sector granularity:

- `drop`:   nothing after the last sync survives;
- `keep`:   everything written survives (a cut just after the writes reached the medium);
- `tear`:   each 512-byte sector written since the last sync independently survives or not,
            in any order (the worst a drive with a volatile cache may do);
- `prefix`: writes survive in the order they were issued, up to a random sector (a drive that
            writes in order).

`SimulatedVolume` is a block volume on such a flash, for driving `LocalUnit` through power cuts.
Nothing here is used by the firmware at run time.
"""

from __future__ import annotations

import enum
import errno
import random
import threading
from dataclasses import dataclass, field

SECTOR = 512


class PowerCut(Exception):
    """The simulated power failed during this operation; nothing more reaches the device."""


class CrashMode(enum.Enum):
    DROP = "drop"
    KEEP = "keep"
    TEAR = "tear"
    PREFIX = "prefix"


@dataclass
class PowerRail:
    """Counts device operations (pwrite and sync) and cuts the power at operation `cut_at`
    (1-based; None: never). Shared by every device that loses power together."""

    cut_at: int | None = None
    ops: int = 0
    cut: bool = False
    devices: list[SimulatedFlash] = field(default_factory=list)

    def tick(self) -> None:
        if self.cut:
            raise PowerCut("power is off")
        self.ops += 1
        if self.cut_at is not None and self.ops >= self.cut_at:
            self.cut = True
            raise PowerCut(f"power cut at operation {self.ops}")

    def cut_now(self) -> None:
        self.cut = True


class SimulatedFlash:
    """An in-memory device with a volatile write cache that a `PowerRail` can switch off."""

    parallel_syncs = 4  # syncs may overlap (each covers the writes made before it started)

    def __init__(self, size: int, *, rail: PowerRail | None = None, image: bytes | None = None) -> None:
        if image is not None and len(image) != size:
            raise ValueError("image size differs from device size")
        self._size = size
        self.durable = bytearray(image if image is not None else bytes(size))
        self.current = bytearray(self.durable)
        self.unsynced: list[tuple[int, bytes]] = []
        self.rail = rail if rail is not None else PowerRail()
        self.rail.devices.append(self)
        self.syncs = 0
        self.writes = 0
        self.closed = False
        self._mutex = threading.Lock()  # syncs may run in several threads beside a pwrite
        self._synced_writes = 0  # writes ever made durable (the position of unsynced[0])

    @property
    def size(self) -> int:
        return self._size

    def _check_open(self) -> None:
        if self.closed:
            raise OSError(errno.EBADF, "simulated flash is closed")

    def pread(self, length: int, offset: int) -> bytes:
        if self.rail.cut:
            raise PowerCut("power is off")
        self._check_open()
        if offset < 0 or offset + length > self._size:
            raise OSError(5, f"read beyond device: {offset}+{length} > {self._size}")
        return bytes(self.current[offset: offset + length])

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        self._check_open()
        self.rail.tick()
        b = bytes(data)
        if offset < 0 or offset + len(b) > self._size:
            raise OSError(28, f"write beyond device: {offset}+{len(b)} > {self._size}")
        with self._mutex:
            self.current[offset: offset + len(b)] = b
            self.unsynced.append((offset, b))
            self.writes += 1

    def sync(self) -> None:
        self.sync_end(self.sync_begin())

    # A sync as two steps, for tests that hold one in flight: it covers the writes made before
    # `sync_begin()`, not those made while it is in flight (as fdatasync does).
    def sync_begin(self) -> int:
        """Start a sync; returns what `sync_end()` needs (the writes it covers)."""
        self._check_open()
        self.rail.tick()
        with self._mutex:
            return len(self.unsynced) + self._synced_writes

    def sync_end(self, covers: int) -> None:
        """Finish a sync started by `sync_begin()`: the writes it covers are on the medium."""
        if self.rail.cut:
            raise PowerCut("power is off")
        with self._mutex:
            n = covers - self._synced_writes
            if n > 0:
                for off, b in self.unsynced[:n]:
                    self.durable[off: off + len(b)] = b
                del self.unsynced[:n]
                self._synced_writes = covers
            self.syncs += 1

    def close(self) -> None:
        self.closed = True

    def rebooted(self, rng: random.Random, mode: CrashMode = CrashMode.TEAR, *,
                 rail: PowerRail | None = None) -> SimulatedFlash:
        """A new device holding `crash(rng, mode)`: this one as it comes back after the power cut."""
        return SimulatedFlash(self._size, rail=rail, image=self.crash(rng, mode))

    def crash(self, rng: random.Random, mode: CrashMode = CrashMode.TEAR) -> bytes:
        """The device image after the power cut (the object itself stays as it was)."""
        img = bytearray(self.durable)
        if mode is CrashMode.DROP:
            return bytes(img)
        if mode is CrashMode.KEEP:
            return bytes(self.current)
        pieces: list[tuple[int, bytes]] = []
        for off, b in self.unsynced:
            # split at sector boundaries of the device: the unit a cut may tear
            at = off
            while at < off + len(b):
                end = min((at // SECTOR + 1) * SECTOR, off + len(b))
                pieces.append((at, b[at - off: end - off]))
                at = end
        if mode is CrashMode.PREFIX:
            pieces = pieces[: rng.randint(0, len(pieces))]
        else:
            pieces = [p for p in pieces if rng.random() < 0.5]
        for at, piece in pieces:
            img[at: at + len(piece)] = piece
        return bytes(img)

    def flip_bit(self, offset: int, bit: int = 0) -> None:
        """Corrupt one bit on the medium (both images), as a failing flash cell would."""
        self.durable[offset] ^= 1 << bit
        self.current[offset] ^= 1 << bit


class SimulatedVolume:
    """A block volume on a `SimulatedFlash` with the subset of `firmware.volume.Volume` that
    `LocalUnit` uses: writes reach the medium only at `flush()`."""

    def __init__(self, flash: SimulatedFlash, *, block_size: int = 512) -> None:
        if flash.size % block_size:
            raise ValueError("device size is not a whole number of blocks")
        self.flash = flash
        self._block_size = block_size
        self._num_blocks = flash.size // block_size
        self._write_cache = True

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def write_cache(self) -> bool:
        return self._write_cache

    def set_write_cache(self, enabled: bool) -> None:
        self._write_cache = enabled

    def read(self, lba: int, count: int) -> bytes:
        return self.flash.pread(count * self._block_size, lba * self._block_size)

    def write_nosync(self, lba: int, data: bytes) -> None:
        self.flash.pwrite(data, lba * self._block_size)

    def write(self, lba: int, data: bytes, *, fua: bool = False) -> None:
        self.write_nosync(lba, data)
        if fua or not self._write_cache:
            self.flush()

    def unmap(self, lba: int, count: int) -> None:
        self.flash.pwrite(bytes(count * self._block_size), lba * self._block_size)
        if not self._write_cache:
            self.flush()

    def flush(self) -> None:
        self.flash.sync()

    def close(self) -> None:
        self.flash.close()
