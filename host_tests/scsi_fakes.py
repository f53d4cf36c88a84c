"""An in-memory `BlockStore` for the SCSI target tests: sparse (so a >2 TiB disk costs nothing),
with a model of what is durable, a log of calls, and injectable failures."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from firmware.storage import StorageError


@dataclass
class MemoryBlockStore:
    """Implements `firmware.storage.BlockStore`.

    `visible` is what reads return; `durable` is what would survive a power cut. A write reaches
    `durable` at once when the write cache is off, or with `fua=True`, or at the next `flush()`.
    """

    block_size: int = 512
    num_blocks: int = 2048
    write_cache: bool = False
    read_only: bool = False
    visible: dict[int, bytes] = field(default_factory=dict)
    durable: dict[int, bytes] = field(default_factory=dict)
    dirty: set[int] = field(default_factory=set)
    calls: list[tuple[object, ...]] = field(default_factory=list)
    fail: dict[str, BaseException] = field(default_factory=dict)  # method name -> exception to raise

    def _maybe_fail(self, name: str) -> None:
        exc = self.fail.get(name)
        if exc is not None:
            raise exc

    def set_write_cache(self, enabled: bool) -> None:
        self.calls.append(("set_write_cache", enabled))
        self._maybe_fail("set_write_cache")
        if not enabled:
            self._persist()
        self.write_cache = enabled

    def read(self, lba: int, count: int) -> bytes:
        self.calls.append(("read", lba, count))
        self._maybe_fail("read")
        assert lba >= 0 and lba + count <= self.num_blocks, "target passed an unchecked range"
        zero = bytes(self.block_size)
        return b"".join(self.visible.get(b, zero) for b in range(lba, lba + count))

    def write(self, lba: int, data: bytes, *, fua: bool = False) -> None:
        self.calls.append(("write", lba, len(data) // self.block_size, fua))
        self._maybe_fail("write")
        assert len(data) % self.block_size == 0
        count = len(data) // self.block_size
        assert lba >= 0 and lba + count <= self.num_blocks, "target passed an unchecked range"
        bs = self.block_size
        for i in range(count):
            self.visible[lba + i] = data[i * bs : (i + 1) * bs]
            self.dirty.add(lba + i)
        if fua or not self.write_cache:
            self._persist()

    def flush(self) -> None:
        self.calls.append(("flush",))
        self._maybe_fail("flush")
        self._persist()

    def unmap(self, lba: int, count: int) -> None:
        self.calls.append(("unmap", lba, count))
        self._maybe_fail("unmap")
        assert lba >= 0 and count > 0 and lba + count <= self.num_blocks, "target passed an unchecked range"
        for b in list(self.visible):
            if lba <= b < lba + count:
                del self.visible[b]
                self.dirty.add(b)
        if not self.write_cache:
            self._persist()

    def _persist(self) -> None:
        for b in self.dirty:
            if b in self.visible:
                self.durable[b] = self.visible[b]
            else:
                self.durable.pop(b, None)
        self.dirty.clear()

    def calls_named(self, name: str) -> list[tuple[object, ...]]:
        return [c for c in self.calls if c[0] == name]


class FlakyError(StorageError):
    """A store failure with its own sense: NOT READY, 0x04/0x01 (becoming ready)."""

    sense_key, asc, ascq = 0x02, 0x04, 0x01


@dataclass
class HeldWriteStore(MemoryBlockStore):
    """A `MemoryBlockStore` whose writes wait until the test sets `release`: a journal that is slow
    to become durable, or a `sync` remote that stopped answering. `entered` is set once a write is
    waiting; `writes` counts the writes that landed."""

    release: threading.Event = field(default_factory=threading.Event)
    entered: threading.Event = field(default_factory=threading.Event)
    writes: int = 0
    timeout: float = 60.0  # a test that forgets to release fails instead of hanging

    def write(self, lba: int, data: bytes, *, fua: bool = False) -> None:
        self.entered.set()
        if not self.release.wait(self.timeout):
            raise AssertionError("held write never released")
        super().write(lba, data, fua=fua)
        self.writes += 1
