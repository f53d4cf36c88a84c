"""A `BlockStore` over an image view: a point of a source's history served as a disk, at once.

Read-only, the store answers every read from the view (the history where it holds an older block,
else the target) and refuses writes with DATA PROTECT, WRITE PROTECTED. Writable (a test
failover), writes go to a scratch overlay: a scratch file, unlinked as soon as it is created so it
vanishes with the process however that ends, holding the blocks written, with its own cap (a
write past it is DATA PROTECT, SPACE ALLOCATION FAILED). The target and the history are never
written either way.
"""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path
from types import TracebackType

from firmware.history.format import HistoryError
from firmware.history.view import ImageView
from firmware.storage import ReadError, SpaceExhausted, WriteError, WriteProtected

_ZERO = -1  # overlay slot of an unmapped block: reads as zeros


class ImageStore:
    """`firmware.storage.BlockStore` for `view`; `scratch_dir` and `scratch_cap` make it writable."""

    def __init__(self, view: ImageView, *, scratch_dir: str | os.PathLike[str] | None = None,
                 scratch_cap: int = 0) -> None:
        self.view = view
        self._bs = view.block_size
        self._n = view.num_blocks
        self.read_only = scratch_dir is None
        self.scratch_cap = scratch_cap
        self._slots: dict[int, int] = {}  # lba -> slot in the scratch file (or _ZERO)
        self._used = 0  # slots of the scratch file handed out
        self._free: list[int] = []  # slots of blocks unmapped since, to be used again
        self._lock = threading.Lock()
        self._fd = -1
        self.reads = 0
        self.writes = 0
        if scratch_dir is not None:
            if scratch_cap < self._bs:
                raise HistoryError(f"the scratch cap ({scratch_cap} bytes) holds no block of {self._bs} bytes")
            try:
                self._fd, name = tempfile.mkstemp(prefix=".expose-scratch-", dir=Path(scratch_dir))
                os.unlink(name)
            except OSError as exc:
                raise HistoryError(f"cannot create a scratch file in {scratch_dir}: {exc.strerror}") from None

    # -- BlockStore ----------------------------------------------------------------------------
    @property
    def block_size(self) -> int:
        return self._bs

    @property
    def num_blocks(self) -> int:
        return self._n

    @property
    def write_cache(self) -> bool:
        return False

    def set_write_cache(self, enabled: bool) -> None:
        if enabled:
            raise WriteProtected("the exposed image has no write cache")

    @property
    def scratch_used(self) -> int:
        """Bytes of the scratch cap in use."""
        return (self._used - len(self._free)) * self._bs

    def read(self, lba: int, count: int) -> bytes:
        bs = self._bs
        try:
            data = bytearray(self.view.read(lba, count))
            if self._slots:
                with self._lock:
                    for i in range(count):
                        slot = self._slots.get(lba + i)
                        if slot is None:
                            continue
                        blk = bytes(bs) if slot == _ZERO else os.pread(self._fd, bs, slot * bs)
                        data[i * bs:(i + 1) * bs] = blk
        except (HistoryError, OSError) as exc:
            raise ReadError(f"reading blocks {lba}+{count} of the image: {exc}") from None
        self.reads += 1
        return bytes(data)

    def _need(self, lba: int, count: int) -> int:
        new = sum(1 for i in range(count) if self._slots.get(lba + i, _ZERO) == _ZERO) - len(self._free)
        if new > 0 and (self._used + new) * self._bs > self.scratch_cap:
            raise SpaceExhausted(f"the scratch overlay is full ({self.scratch_cap} bytes)")
        return new

    def write(self, lba: int, data: bytes, *, fua: bool = False) -> None:
        if self.read_only:
            raise WriteProtected("the exposed image is read-only (expose --writable for a scratch overlay)")
        bs = self._bs
        count = len(data) // bs
        with self._lock:
            self._need(lba, count)
            try:
                for i in range(count):
                    slot = self._slots.get(lba + i, _ZERO)
                    if slot == _ZERO:
                        if self._free:
                            slot = self._free.pop()
                        else:
                            slot = self._used
                            self._used += 1
                        self._slots[lba + i] = slot
                    os.pwrite(self._fd, data[i * bs:(i + 1) * bs], slot * bs)
            except OSError as exc:
                raise WriteError(f"the scratch overlay: {exc.strerror}") from None
        self.writes += 1

    def flush(self) -> None:
        """Nothing to make durable: the overlay is thrown away when the exposure ends."""

    def unmap(self, lba: int, count: int) -> None:
        if self.read_only:
            raise WriteProtected("the exposed image is read-only")
        with self._lock:
            for i in range(count):
                old = self._slots.get(lba + i, _ZERO)
                if old != _ZERO:
                    self._free.append(old)
                self._slots[lba + i] = _ZERO

    # -- lifecycle -----------------------------------------------------------------------------
    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._slots.clear()

    def __enter__(self) -> ImageStore:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
