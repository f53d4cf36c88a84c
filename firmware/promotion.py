"""A promoted remote's copy of a source as a disk: the target, read-write, for a standby host.

`PromotedStore` is the `BlockStore` that `usbmirror promote` serves (over USB/IP, see
`firmware.failover_serve`). Every write first sets the regions it touches in the crash-safe bitmap
of blocks written since this copy and the old primary last agreed (`<state_dir>/roles/
<source>.<source>.bitmap`, durable before the data lands), then goes through the target store's
apply hooks (the point-in-time history saves the before-images, so restore points stay true), then
to the target. The writes are numbered on from the newest position the target and its history have
seen (`next_seq`): the promoted generation's own write stream.

`rollback_to_point` turns the target back into the image of an earlier point of its history, as
writes of that same stream (their before-images saved first), so the history stays one linear log
and an interrupted rollback can simply run again: every block it writes is read from the
before-images of the records after the point, which the rollback itself never changes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from firmware.crash_points import crash_point
from firmware.history import HistoryError, HistoryReader, ImageView, history_dir
from firmware.journal.bitmap import DirtyBitmap
from firmware.journal.format import RecordKind
from firmware.link import protocol as jp
from firmware.storage import StorageError, WriteError, WriteProtected, storage_error
from firmware.target_store import TargetStore

log = logging.getLogger(__name__)

ROLLBACK_RECORD_BLOCKS_BYTES = 1 << 20  # one rollback write covers at most this many bytes
ROLLBACK_BATCH = 32  # records per apply (their before-images are made durable together)


class PromotedStore:
    """`firmware.storage.BlockStore` over a promoted target (see the module docstring). Thread-safe."""

    def __init__(self, store: TargetStore, bitmap: DirtyBitmap, *, num_blocks: int, block_size: int,
                 next_seq: int) -> None:
        self._store = store
        self._bitmap = bitmap
        self._n = num_blocks
        self._bs = block_size
        self.next_seq = next_seq
        self._lock = threading.Lock()
        self._write_cache = False
        self._closed = False
        self.writes = 0
        self.bytes_written = 0
        self.reads = 0

    # -- BlockStore ----------------------------------------------------------------------------
    @property
    def block_size(self) -> int:
        return self._bs

    @property
    def num_blocks(self) -> int:
        return self._n

    @property
    def read_only(self) -> bool:
        return False

    @property
    def write_cache(self) -> bool:
        return self._write_cache

    def set_write_cache(self, enabled: bool) -> None:
        if self._write_cache and not enabled:
            self.flush()
        self._write_cache = enabled

    def _check(self, lba: int, count: int) -> None:
        if lba < 0 or count < 0 or lba + count > self._n:
            raise ValueError(f"blocks {lba}+{count} outside the volume of {self._n}")
        if self._closed:
            raise WriteProtected("the promoted copy is no longer served")

    def read(self, lba: int, count: int) -> bytes:
        self._check(lba, count)
        vol = self._store.volume
        if vol is None:
            raise WriteProtected("the promoted copy is no longer served")
        data = vol.read(lba, count)
        self.reads += 1
        return data

    def _apply(self, kind: RecordKind, lba: int, count: int, payload: bytes) -> None:
        rec = jp.Record(self.next_seq, kind, lba, count, time.time_ns(), payload)
        try:
            if count:
                self._bitmap.mark(lba, count)
            self._store.apply([rec])
        except OSError as exc:
            raise storage_error(exc, f"write at lba {lba}") from exc
        except HistoryError as exc:
            raise WriteError(f"write at lba {lba}: the history could not save the old blocks: {exc}") from None
        self.next_seq += 1

    def write(self, lba: int, data: bytes, *, fua: bool = False) -> None:
        if len(data) % self._bs:
            raise ValueError("data is not a whole number of blocks")
        count = len(data) // self._bs
        self._check(lba, count)
        if count == 0:
            if fua:
                self.flush()
            return
        with self._lock:
            self._apply(RecordKind.WRITE, lba, count, bytes(data))
            self.writes += 1
            self.bytes_written += len(data)
            if fua or not self._write_cache:
                self._store.sync()

    def unmap(self, lba: int, count: int) -> None:
        self._check(lba, count)
        if count == 0:
            return
        with self._lock:
            self._apply(RecordKind.UNMAP, lba, count, b"")
            if not self._write_cache:
                self._store.sync()

    def flush(self) -> None:
        """SYNCHRONIZE CACHE: the target is synced; the history lists the flush as a restore point."""
        if self._closed:
            return
        with self._lock:
            self._apply(RecordKind.FLUSH, 0, 0, b"")
            self._store.sync()

    # -- lifecycle -----------------------------------------------------------------------------
    def close(self) -> None:
        """Stop taking I/O (the target stays open: it belongs to the remote unit)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                try:
                    self._store.sync()
                except StorageError as exc:
                    log.warning("promoted copy: final sync failed error=%s", exc)

    def status(self) -> dict[str, int]:
        return {"writes": self.writes, "bytes_written": self.bytes_written, "reads": self.reads,
                "dirty_regions": self._bitmap.dirty_regions}


def _runs(extents: Sequence[tuple[int, int]], limit: int) -> list[tuple[int, int]]:
    """Merge (lba, count) extents into sorted runs of at most `limit` blocks."""
    blocks: list[tuple[int, int]] = sorted((a, a + n) for a, n in extents if n > 0)
    merged: list[tuple[int, int]] = []
    for a, b in blocks:
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    out: list[tuple[int, int]] = []
    for a, b in merged:
        while a < b:
            n = min(limit, b - a)
            out.append((a, n))
            a += n
    return out


def rollback_to_point(store: TargetStore, state_dir: str, source_id: str, target_path: str, *, seq: int,
                      next_seq: int, num_blocks: int,
                      mark: Callable[[int, int], object] | None = None) -> tuple[int, int]:
    """Make the target the image just after record `seq` of its history, as writes numbered from
    `next_seq` (their before-images saved by the history hook first). `mark(lba, count)` (the
    promoted copy's bitmap) is told of each run before it is written. Returns (blocks written, the
    next free seq). Runs again safely after an interruption. HistoryError when the history no
    longer reaches back to `seq`."""
    root = history_dir(state_dir, source_id)
    with HistoryReader(root) as rd:
        idx = rd.index
        oldest = idx.oldest_restorable()
        if oldest is None or seq < oldest:
            raise HistoryError(f"the history no longer holds seq {seq} (oldest restorable: {oldest})")
        start = idx.start_id_after_seq(seq)
        extents = [idx.extent(rid) for rid in range(start, idx.next_id) if idx.is_undo(rid)]
        bs = rd.meta.block_size
        limit = max(1, ROLLBACK_RECORD_BLOCKS_BYTES // bs)
        written = 0
        with ImageView(rd, start, target=target_path) as view:
            batch: list[jp.Record] = []
            now = time.time_ns()
            for lba, n in _runs(extents, limit):
                if lba >= num_blocks:
                    continue
                n = min(n, num_blocks - lba)
                if mark is not None:
                    mark(lba, n)
                batch.append(jp.Record(next_seq, RecordKind.WRITE, lba, n, now, view.read(lba, n)))
                next_seq += 1
                written += n
                if len(batch) >= ROLLBACK_BATCH:
                    store.apply(batch)
                    crash_point("promote.rolling_back")
                    batch = []
            if batch:
                store.apply(batch)
                crash_point("promote.rolling_back")
        store.sync()
    return written, next_seq
