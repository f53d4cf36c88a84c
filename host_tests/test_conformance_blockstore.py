"""The block-store contract (`firmware.storage.BlockStore`), run against every implementation.

The SCSI target executes against a `BlockStore`; every backend must pass this suite before it is
used: an image file, a block device (a loop device standing in for a partition or disk), the
in-memory store the SCSI tests use, and the local unit itself (journal first, then its volume).
What is checked is what the host relies on: geometry, fresh blocks read as zeros, a read returns
the newest data written, unmapped blocks read as zeros and leave their neighbours alone, the write
cache switch, and that data written with the cache off, with FUA or
before a flush is there after the store is closed and opened again.
"""

from __future__ import annotations

import random
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from firmware.journal import Journal
from firmware.local_unit import LocalUnit
from firmware.storage import BlockStore
from firmware.volume import Volume
from host_tests.scsi_fakes import MemoryBlockStore

SIZE = 4 << 20  # 4 MiB: 8192 blocks of 512 bytes, 1024 of 4096
UNIT_UUID = uuid.UUID("6c1f4a36-0000-4000-8000-00000000b10c")
PROTOCOL_MEMBERS = sorted(n for n in vars(BlockStore) if not n.startswith("_"))


@dataclass
class Backend:
    """One implementation under test: `open()` gives a store over the same medium each time (the
    previous one closed first); what a closed store made durable is there for the next one."""

    name: str
    open: Callable[[], BlockStore]
    close: Callable[[BlockStore], None]


def _volume_backend(path: Path, block_size: int, name: str) -> Backend:
    def open_() -> BlockStore:
        return Volume(path, size=SIZE, block_size=block_size)

    return Backend(name, open_, lambda s: s.close())  # type: ignore[attr-defined]


def _local_unit_backend(tmp: Path, block_size: int) -> Backend:
    parts: dict[int, tuple[Volume, Journal]] = {}

    def open_() -> BlockStore:
        vol = Volume(tmp / "lu-volume.img", size=SIZE, block_size=block_size)
        journal = Journal.open(tmp / "lu-journal", size=2 << 20, unit_uuid=UNIT_UUID, block_size=block_size)
        unit = LocalUnit(vol, journal, bitmap_path=str(tmp / "lu-dirty.bitmap"))
        parts[id(unit)] = (vol, journal)
        return unit

    def close(store: BlockStore) -> None:
        vol, journal = parts.pop(id(store))
        store.close()  # type: ignore[attr-defined]
        journal.close()
        vol.close()

    return Backend(f"local-unit-{block_size}", open_, close)


@pytest.fixture(scope="module")
def loop_device(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path | None]:
    backing = tmp_path_factory.mktemp("loop") / "backing.img"
    with open(backing, "wb") as f:
        f.truncate(SIZE)
    r = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True)
    if r.returncode != 0:
        yield None
        return
    dev = Path(r.stdout.strip())
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", str(dev)], check=False)


BACKENDS = ["file-512", "file-4096", "blockdev-512", "memory-512", "local-unit-512", "local-unit-4096"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path, loop_device: Path | None) -> Backend:
    name: str = request.param
    kind, bs = name.rsplit("-", 1)
    block_size = int(bs)
    if kind == "file":
        return _volume_backend(tmp_path / "volume.img", block_size, name)
    if kind == "blockdev":
        if loop_device is None:
            pytest.skip("no loop device here (losetup failed); the file backend covers the same code path")
        subprocess.run(["dd", "if=/dev/zero", f"of={loop_device}", "bs=1M", f"count={SIZE >> 20}",
                        "oflag=direct", "status=none"], check=True)
        return _volume_backend(loop_device, block_size, name)
    if kind == "memory":
        # closing models a power cut: the next store holds what the last one made durable
        image: dict[int, bytes] = {}

        def open_memory() -> BlockStore:
            return MemoryBlockStore(block_size=block_size, num_blocks=SIZE // block_size, visible=dict(image))

        def close_memory(s: BlockStore) -> None:
            image.clear()
            image.update(s.durable)  # type: ignore[attr-defined]

        return Backend(name, open_memory, close_memory)
    return _local_unit_backend(tmp_path, block_size)


@pytest.fixture
def store(backend: Backend) -> Iterator[BlockStore]:
    s = backend.open()
    yield s
    backend.close(s)


def _pattern(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def test_the_store_has_every_member_of_the_contract(store: BlockStore) -> None:
    missing = [m for m in PROTOCOL_MEMBERS if not hasattr(store, m)]
    assert not missing, f"{type(store).__name__} lacks {missing}"
    assert store.block_size in (512, 4096)
    assert store.num_blocks * store.block_size == SIZE
    assert isinstance(store.write_cache, bool) and store.read_only is False


def test_fresh_blocks_read_as_zeros(store: BlockStore) -> None:
    bs = store.block_size
    assert store.read(0, 8) == bytes(8 * bs)
    assert store.read(store.num_blocks - 3, 3) == bytes(3 * bs)


def test_a_read_returns_the_newest_data_written(store: BlockStore) -> None:
    bs, n = store.block_size, store.num_blocks
    a, b, c = _pattern(1, 16 * bs), _pattern(2, 4 * bs), _pattern(3, bs)
    store.write(100, a)
    store.write(106, b)  # overlaps the middle of a
    store.write(n - 1, c)  # the last block
    assert store.read(100, 16) == a[: 6 * bs] + b + a[10 * bs:]
    assert store.read(n - 1, 1) == c
    assert store.read(99, 1) == bytes(bs) and store.read(116, 1) == bytes(bs)


def test_unmapped_blocks_read_as_zeros_and_neighbours_stay(store: BlockStore) -> None:
    bs = store.block_size
    data = _pattern(4, 32 * bs)
    store.write(200, data)
    store.unmap(208, 8)
    assert store.read(208, 8) == bytes(8 * bs)
    assert store.read(200, 8) == data[: 8 * bs] and store.read(216, 16) == data[16 * bs:]


def test_the_write_cache_switch_is_reported(store: BlockStore) -> None:
    store.set_write_cache(True)
    assert store.write_cache is True
    data = _pattern(5, 2 * store.block_size)
    store.write(10, data)
    store.set_write_cache(False)  # turning it off flushes first
    assert store.write_cache is False
    assert store.read(10, 2) == data


def test_writes_outlive_the_store_with_the_cache_off_with_fua_and_before_a_flush(backend: Backend) -> None:
    store = backend.open()
    try:
        bs = store.block_size
        plain, fua, flushed = _pattern(6, 4 * bs), _pattern(7, 4 * bs), _pattern(8, 4 * bs)
        store.write(300, plain)
        store.set_write_cache(True)
        store.write(310, fua, fua=True)
        store.write(320, flushed)
        store.unmap(302, 1)
        store.flush()
    finally:
        backend.close(store)
    again = backend.open()
    try:
        assert again.read(300, 4) == plain[: 2 * bs] + bytes(bs) + plain[3 * bs:]
        assert again.read(310, 4) == fua and again.read(320, 4) == flushed
    finally:
        backend.close(again)
