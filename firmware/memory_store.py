"""A `firmware.storage.BlockStore` in RAM: sparse, with a model of what a power cut would keep.

`MemoryStore` holds only the blocks that were written (a multi-terabyte store costs nothing), so it
serves as a scratch disk, as the reference implementation the block-store conformance suite
(`host_tests/test_conformance_blockstore.py`) checks itself against, and as the base of the test
doubles for the SCSI target.

`visible` is what reads return; `durable` is what would survive a power cut (`crashed()` returns the
store as it comes back). A write reaches `durable` at once with the write cache off, with
`fua=True`, or at the next `flush()`, as the `BlockStore` durability contract asks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from firmware.storage import WriteProtected

__all__ = ["MemoryStore"]


@dataclass
class MemoryStore:
    """Implements `firmware.storage.BlockStore` in RAM."""

    block_size: int = 512
    num_blocks: int = 2048
    write_cache: bool = False
    read_only: bool = False
    visible: dict[int, bytes] = field(default_factory=dict)
    durable: dict[int, bytes] = field(default_factory=dict)
    dirty: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.num_blocks <= 0:
            raise ValueError(f"need a positive geometry, not {self.num_blocks} blocks of {self.block_size}")

    def _check(self, lba: int, count: int) -> None:
        if lba < 0 or count < 0 or lba + count > self.num_blocks:
            raise ValueError(f"blocks {lba}+{count} outside volume of {self.num_blocks}")

    def set_write_cache(self, enabled: bool) -> None:
        if not enabled:
            self._persist()
        self.write_cache = enabled

    def read(self, lba: int, count: int) -> bytes:
        self._check(lba, count)
        zero = bytes(self.block_size)
        return b"".join(self.visible.get(b, zero) for b in range(lba, lba + count))

    def write(self, lba: int, data: bytes, *, fua: bool = False) -> None:
        bs = self.block_size
        if len(data) % bs:
            raise ValueError("data is not a whole number of blocks")
        count = len(data) // bs
        self._check(lba, count)
        if self.read_only:
            raise WriteProtected("memory store is read-only")
        for i in range(count):
            self.visible[lba + i] = bytes(data[i * bs:(i + 1) * bs])
            self.dirty.add(lba + i)
        if fua or not self.write_cache:
            self._persist()

    def flush(self) -> None:
        self._persist()

    def unmap(self, lba: int, count: int) -> None:
        self._check(lba, count)
        if self.read_only:
            raise WriteProtected("memory store is read-only")
        for b in range(lba, lba + count) if count < len(self.visible) else list(self.visible):
            if lba <= b < lba + count:
                self.visible.pop(b, None)
                self.dirty.add(b)
        if not self.write_cache:
            self._persist()

    def crashed(self) -> MemoryStore:
        """The store as it comes back after a power cut now: only what was durable."""
        return MemoryStore(self.block_size, self.num_blocks, self.write_cache, self.read_only,
                           visible=dict(self.durable), durable=dict(self.durable))

    def _persist(self) -> None:
        for b in self.dirty:
            if b in self.visible:
                self.durable[b] = self.visible[b]
            else:
                self.durable.pop(b, None)
        self.dirty.clear()
