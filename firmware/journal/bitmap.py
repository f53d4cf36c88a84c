"""Dirty-region bitmap on flash: which parts of the volume changed while the journal was full.

When the journal has no room (remote units are behind), the local unit stops journaling, writes
straight to its volume and sets one bit per region of `region_blocks` blocks that changed. The bit
is durable before the host hears "done", so nothing acknowledged is forgotten: the replicator later
copies every dirty region to the remotes (resync) and clears the bits it copied.

File layout (a file of its own beside the journal, pre-written like it; docs/JOURNAL.md):

    offset  size  what
    0       8     magic b"USBMDIRT"
    8       2     version (1)
    10      2     reserved (0)
    12      4     region size in blocks
    16      8     volume size in blocks
    24      16    unit UUID
    40      4     CRC32C of bytes 0..40
    4096    n     bitmap, bit i of byte k = region 8k+i; n = ceil(regions / 8) rounded up to 4 KiB

Setting bits is a one-byte-range pwrite plus fdatasync; a torn write of a sector can only lose
bits that were being set in that write, and that write was not acknowledged. The bitmap carries no
checksum (it changes one byte at a time); a damaged header makes the whole volume dirty.

Clearing is snapshot-based: `snapshot()` returns the dirty regions with a token; `clear(snapshot)`
clears only regions not dirtied again after the snapshot was taken, so a write racing with a resync
is never lost.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

from firmware.journal.flash import FileFlash, Flash
from firmware.journal.format import crc32c

log = logging.getLogger(__name__)

BITMAP_MAGIC = b"USBMDIRT"
BITMAP_HEADER = struct.Struct("<8sHHIQ16s")
BITMAP_OFFSET = 4096


@dataclass(frozen=True, slots=True)
class DirtySnapshot:
    """Dirty regions at one instant: `regions` as (lba, count) runs, merged where adjacent."""

    token: int
    regions: tuple[tuple[int, int], ...]
    region_indices: tuple[int, ...]

    @property
    def blocks(self) -> int:
        return sum(c for _, c in self.regions)


class DirtyBitmap:
    """One bit per region of the volume, persisted on a flash device. Thread-safe."""

    def __init__(self, flash: Flash, *, num_blocks: int, region_blocks: int, unit_uuid: uuid.UUID) -> None:
        if region_blocks <= 0:
            raise ValueError("region_blocks must be positive")
        self._flash = flash
        self.num_blocks = num_blocks
        self.region_blocks = region_blocks
        self.num_regions = (num_blocks + region_blocks - 1) // region_blocks
        self._nbytes = (self.num_regions + 7) // 8
        need = BITMAP_OFFSET + (self._nbytes + 4095) // 4096 * 4096
        if flash.size < need:
            raise ValueError(f"bitmap device of {flash.size} bytes is smaller than the {need} needed")
        self._lock = threading.Lock()
        self._stamp = 0
        self._stamps: dict[int, int] = {}
        header = BITMAP_HEADER.pack(BITMAP_MAGIC, 1, 0, region_blocks, num_blocks, unit_uuid.bytes)
        header += struct.pack("<I", crc32c(header))
        raw = flash.pread(len(header), 0)
        self.damaged = False  # the header did not match: every region was marked dirty
        if raw == header:
            self._bits = bytearray(flash.pread(self._nbytes, BITMAP_OFFSET))
            # regions beyond the volume must never appear dirty
            if self.num_regions % 8:
                self._bits[-1] &= (1 << (self.num_regions % 8)) - 1
        else:
            if raw != bytes(len(raw)):
                log.error("dirty bitmap header does not match this volume (damaged or other geometry): "
                          "marking the whole volume dirty")
                self.damaged = True
                self._bits = bytearray(b"\xff" * self._nbytes)
                if self.num_regions % 8:
                    self._bits[-1] = (1 << (self.num_regions % 8)) - 1
            else:
                self._bits = bytearray(self._nbytes)
            flash.pwrite(bytes(self._bits), BITMAP_OFFSET)
            flash.sync()
            flash.pwrite(header, 0)
            flash.sync()
        for i in self._iter_set():
            self._stamps[i] = 0
        self.persisted_writes = 0

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, num_blocks: int, region_blocks: int,
             unit_uuid: uuid.UUID) -> DirtyBitmap:
        """Open the bitmap file, creating and pre-writing it when missing."""
        p = Path(path)
        nbytes = ((num_blocks + region_blocks - 1) // region_blocks + 7) // 8
        size = BITMAP_OFFSET + (nbytes + 4095) // 4096 * 4096
        flash = FileFlash(p) if p.exists() else FileFlash.create(p, size)
        if flash.size < size:
            flash.close()
            raise ValueError(f"{p} is {flash.size} bytes, the bitmap needs {size}")
        try:
            return cls(flash, num_blocks=num_blocks, region_blocks=region_blocks, unit_uuid=unit_uuid)
        except BaseException:
            flash.close()
            raise

    def _iter_set(self) -> list[int]:
        out = []
        for k, byte in enumerate(self._bits):
            if byte:
                for b in range(8):
                    if byte >> b & 1:
                        out.append(k * 8 + b)
        return out

    @property
    def dirty_regions(self) -> int:
        with self._lock:
            return len(self._stamps)

    def is_dirty(self, region: int) -> bool:
        with self._lock:
            return region in self._stamps

    def mark(self, lba: int, count: int) -> bool:
        """Mark the regions covering blocks lba..lba+count dirty, durably. Returns True when a bit
        was newly set (and written + synced)."""
        if count <= 0:
            return False
        first = lba // self.region_blocks
        last = (lba + count - 1) // self.region_blocks
        with self._lock:
            self._stamp += 1
            new = False
            for r in range(first, last + 1):
                if r not in self._stamps:
                    new = True
                    self._bits[r >> 3] |= 1 << (r & 7)
                self._stamps[r] = self._stamp
            if new:
                a, b = first >> 3, (last >> 3) + 1
                self._flash.pwrite(bytes(self._bits[a:b]), BITMAP_OFFSET + a)
                self._flash.sync()
                self.persisted_writes += 1
            return new

    def snapshot(self) -> DirtySnapshot:
        with self._lock:
            idx = tuple(sorted(self._stamps))
            token = self._stamp
        runs: list[tuple[int, int]] = []
        for r in idx:
            lba = r * self.region_blocks
            cnt = min(self.region_blocks, self.num_blocks - lba)
            if runs and runs[-1][0] + runs[-1][1] == lba:
                runs[-1] = (runs[-1][0], runs[-1][1] + cnt)
            else:
                runs.append((lba, cnt))
        return DirtySnapshot(token=token, regions=tuple(runs), region_indices=idx)

    def clear(self, snap: DirtySnapshot) -> int:
        """Clear the snapshot's regions that were not dirtied after it; durable on return.
        Returns how many regions were cleared."""
        with self._lock:
            cleared = [r for r in snap.region_indices if self._stamps.get(r, snap.token + 1) <= snap.token]
            if not cleared:
                return 0
            for r in cleared:
                del self._stamps[r]
                self._bits[r >> 3] &= ~(1 << (r & 7)) & 0xFF
            a, b = cleared[0] >> 3, (cleared[-1] >> 3) + 1
            self._flash.pwrite(bytes(self._bits[a:b]), BITMAP_OFFSET + a)
            self._flash.sync()
            return len(cleared)

    def close(self) -> None:
        self._flash.close()
