"""An in-memory `BlockStore` for the SCSI target tests: the firmware's sparse `MemoryStore` (so a
>2 TiB disk costs nothing, with a model of what is durable) plus a log of calls and injectable
failures."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from firmware.memory_store import MemoryStore
from firmware.storage import StorageError


@dataclass
class MemoryBlockStore(MemoryStore):
    """`firmware.memory_store.MemoryStore` with a log of calls and injectable failures.

    `visible` is what reads return; `durable` is what would survive a power cut. A write reaches
    `durable` at once when the write cache is off, or with `fua=True`, or at the next `flush()`.
    """

    calls: list[tuple[object, ...]] = field(default_factory=list)
    fail: dict[str, BaseException] = field(default_factory=dict)  # method name -> exception to raise

    def _maybe_fail(self, name: str) -> None:
        exc = self.fail.get(name)
        if exc is not None:
            raise exc

    def set_write_cache(self, enabled: bool) -> None:
        self.calls.append(("set_write_cache", enabled))
        self._maybe_fail("set_write_cache")
        super().set_write_cache(enabled)

    def read(self, lba: int, count: int) -> bytes:
        self.calls.append(("read", lba, count))
        self._maybe_fail("read")
        return super().read(lba, count)

    def write(self, lba: int, data: bytes, *, fua: bool = False) -> None:
        self.calls.append(("write", lba, len(data) // self.block_size, fua))
        self._maybe_fail("write")
        super().write(lba, data, fua=fua)

    def flush(self) -> None:
        self.calls.append(("flush",))
        self._maybe_fail("flush")
        super().flush()

    def unmap(self, lba: int, count: int) -> None:
        self.calls.append(("unmap", lba, count))
        self._maybe_fail("unmap")
        super().unmap(lba, count)

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
