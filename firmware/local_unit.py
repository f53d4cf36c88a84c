"""The local unit's block store: every host write goes to the flash journal first, then to the volume.

`LocalUnit` implements `firmware.storage.BlockStore` for the SCSI target over a `Volume` (the full
local mirror) and a `Journal`:

- WRITE / UNMAP: a record is appended to the journal; once it is durable on flash it is written to the
  volume (page cache, no sync: the journal is the durability point). A READ returns the volume's data
  with any record not yet written there laid over it, so it always sees the newest data.
- Write cache off (default): `write()` returns once the record is durable. Write cache on: it returns
  at once; the record becomes durable no later than the next `flush()` or FUA write, which return only
  then. Concurrent callers share one fdatasync (group commit). SYNCHRONIZE CACHE and FUA append a
  FLUSH record: a consistency point for the remote units.
- Sync gates (`add_sync_gate`): for remotes in `sync` mode, each gate is called with the seq once it is
  durable locally and before the host is answered; it blocks until the remotes have it.
- The journal may forget a record only when the volume holds it durably (the volume is fdatasync'd,
  then `Journal.set_applied`) and every consumer confirmed it.
- Nearly full journal: acknowledgements are delayed (`ThrottlePolicy`, bounded). Full: the unit writes
  straight to the volume (write-through) and marks dirty regions in a bitmap on flash (durable before
  the ack); `overflow` is reported until the journal has room again. The replicator resyncs dirty
  regions with `dirty_snapshot()` / `clear_dirty()`.
- Volume full (a sparse image on a full file system): the WRITE that meets ENOSPC fails with DATA
  PROTECT / SPACE ALLOCATION FAILED WRITE PROTECT (27h/07); its record and any after it stay in the
  journal and in RAM, unapplied (reads still see them), and every later write or unmap is refused with
  the same sense after one more try at applying them. When space returns that try succeeds, the
  records are applied once, in order, and writes go on. A flush meanwhile only makes the journal
  durable (the journal is the durability point).
- Start-up: records the volume may not have (after `applied_seq` of the journal's checkpoint) are
  re-applied before the first command is served.

What it does not do: shipping records to remotes and resyncing dirty regions belong to
`firmware.replicator`; the control socket and configuration to `firmware.local_main`/`firmware.cli`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Protocol

from firmware.journal import Journal, JournalCorrupt, JournalError, JournalFull, RecordKind
from firmware.journal.bitmap import DirtyBitmap, DirtySnapshot
from firmware.journal.flash import Flash
from firmware.journal.format import MAX_MARK_NAME
from firmware.storage import SpaceExhausted, StorageError, WriteError, WriteProtected

log = logging.getLogger(__name__)

__all__ = ["DirtySnapshot", "LocalUnit", "MirrorVolume", "ThrottlePolicy"]

_REPLAY_CHUNK = 8 << 20


class MirrorVolume(Protocol):
    """What the local unit needs of its volume (`firmware.volume.Volume` has it all)."""

    @property
    def block_size(self) -> int: ...

    @property
    def num_blocks(self) -> int: ...

    def set_write_cache(self, enabled: bool) -> None: ...

    def read(self, lba: int, count: int) -> bytes: ...

    def write_nosync(self, lba: int, data: bytes) -> None: ...

    def unmap(self, lba: int, count: int) -> None: ...

    def flush(self) -> None: ...


@dataclass(frozen=True, slots=True)
class ThrottlePolicy:
    """Slow acknowledgements down as the journal fills: no delay below `start_fill`, then a delay
    rising linearly to `max_delay_s` at a full journal. `resume_fill`: after an overflow, journaling
    resumes once the fill is at or below it."""

    start_fill: float = 0.8
    max_delay_s: float = 0.02
    resume_fill: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 < self.start_fill <= 1.0 or not 0.0 <= self.resume_fill < 1.0 or self.max_delay_s < 0:
            raise ValueError("throttle: need 0 < start_fill <= 1, 0 <= resume_fill < 1, max_delay_s >= 0")

    def delay(self, fill: float) -> float:
        if fill < self.start_fill or self.max_delay_s == 0:
            return 0.0
        if self.start_fill >= 1.0:
            return self.max_delay_s
        return self.max_delay_s * min(1.0, (fill - self.start_fill) / (1.0 - self.start_fill))


@dataclass(slots=True)
class _UnappliedRecord:
    """A record in the journal whose data is not yet applied to the local volume."""

    seq: int
    kind: RecordKind
    lba: int
    count: int
    payload: bytes


class LocalUnit:
    """BlockStore of the local unit: journal first, then the local volume. Thread-safe."""

    def __init__(
        self,
        volume: MirrorVolume,
        journal: Journal,
        *,
        write_cache: bool = False,
        throttle: ThrottlePolicy | None = None,
        bitmap_path: str | None = None,
        bitmap_flash: Flash | None = None,
        region_blocks: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], int] = time.time_ns,
        sleep: Callable[[float], None] = time.sleep,
        volume_sync_bytes: int | None = None,
        group_bytes: int = 4 << 20,
        background_flush: bool = True,
    ) -> None:
        if volume.block_size != journal.block_size:
            raise ValueError(f"volume has {volume.block_size}-byte blocks, journal {journal.block_size}")
        self._volume = volume
        self._journal = journal
        self._bs = volume.block_size
        self._nblocks = volume.num_blocks
        self._write_cache = write_cache
        self.throttle = throttle if throttle is not None else ThrottlePolicy()
        self._clock = clock
        self._wall = wall_clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._vsync_lock = threading.Lock()
        self._pending: list[_UnappliedRecord] = []
        self._pending_bytes = 0
        self._applied_unsynced = journal.applied_seq
        self._unsynced_bytes = 0
        self._volume_sync_bytes = volume_sync_bytes or max(1 << 20, journal.capacity_bytes // 2)
        self._group_bytes = group_bytes
        # a write larger than this many blocks is split into consecutive records (fixed per journal)
        self._max_blocks = max(1, journal.max_record_bytes // self._bs)
        self._gates: list[Callable[[int], None]] = []
        self._overflow = False
        self._overflow_since: float | None = None
        self._overflow_events = 0
        self._last_flush_seq = -1
        self._throttled_acks = 0
        self._throttle_delay_total = 0.0
        self._last_delay = 0.0
        self._closed = False
        self._failed: BaseException | None = None
        self._space_exhausted: SpaceExhausted | None = None  # the volume's file system is full
        self._space_events = 0
        self._space_since: float | None = None
        self._write_refusal: str | None = None  # a replica (docs/FAILOVER.md): why host writes are refused
        self._refusal_listeners: list[Callable[[], None]] = []
        # the unit orders the volume's durability itself (fdatasync before the journal forgets)
        volume.set_write_cache(True)
        if region_blocks is None:
            region_blocks = max(1, (1 << 20) // self._bs)  # 1 MiB regions
        if bitmap_flash is not None:
            self._bitmap = DirtyBitmap(bitmap_flash, num_blocks=self._nblocks, region_blocks=region_blocks,
                                       unit_uuid=journal.unit_uuid)
        else:
            if bitmap_path is None:
                if journal.path is None:
                    raise ValueError("bitmap_path is needed when the journal has no path")
                bitmap_path = str(journal.path) + ".dirty"
            self._bitmap = DirtyBitmap.open(Path(bitmap_path), num_blocks=self._nblocks,
                                            region_blocks=region_blocks, unit_uuid=journal.unit_uuid)
        self.replayed_records = 0
        # (first bitmap stamp, lo, hi) per run of dirty writes: every record up to lo was journaled
        # before those writes, every record after hi after them (lo == hi, the journal's head, for a
        # run written here). Bits found at start-up carry stamp 0 and are placed only between the
        # journal's tail and its head.
        self._dirty_epochs: list[tuple[int, int, int]] = []
        try:
            if journal.recovery.corruption is not None:
                # opened with salvage: records from the damaged one on are gone, so the remotes can
                # no longer be brought up to date from the journal; the whole disk needs a resync
                log.error("journal was salvaged (%s): marking the whole volume dirty for a resync",
                          journal.recovery.corruption)
                self._bitmap.mark(0, self._nblocks)
            self._replay()
            if self._bitmap.dirty_regions:
                self._dirty_epochs.append((0, journal.tail_seq - 1, journal.head_seq))
        except BaseException:
            self._bitmap.close()
            raise
        # The volume is synced (so the journal may forget records) by a background thread, off the
        # acknowledgement path; tests pass background_flush=False to keep every step deterministic.
        self._flush_wanted = threading.Event()
        self._stopping = False
        self._flusher: threading.Thread | None = None
        if background_flush:
            self._flusher = threading.Thread(target=self._flusher_loop, name="volume-flusher", daemon=True)
            self._flusher.start()

    # -- start-up ---------------------------------------------------------------------------------
    def _replay(self) -> None:
        """Re-apply every durable record the volume may not hold (after the applied seq)."""
        j = self._journal
        applied = j.applied_seq
        while True:
            recs = j.read_records(applied, _REPLAY_CHUNK)
            if not recs:
                break
            for r in recs:
                try:
                    self._apply(_UnappliedRecord(r.seq, r.kind, r.lba, r.count, r.payload))
                except SpaceExhausted as exc:
                    raise SpaceExhausted(f"cannot replay journal record seq={r.seq} onto the volume ({exc}): "
                                         "free space on the volume's file system and start again") from exc
                applied = r.seq
                self.replayed_records += 1
        if self.replayed_records:
            self._volume.flush()
            log.info("replayed journal records onto the volume records=%d up_to_seq=%d",
                     self.replayed_records, applied)
        j.set_applied(applied)
        self._applied_unsynced = applied
        j.checkpoint()

    # -- BlockStore -------------------------------------------------------------------------------
    @property
    def block_size(self) -> int:
        return self._bs

    @property
    def num_blocks(self) -> int:
        return self._nblocks

    @property
    def read_only(self) -> bool:
        """A local unit takes writes (the BlockStore contract's `read_only`), except as a replica of
        a promoted remote (`refuse_writes`)."""
        return self._write_refusal is not None

    @property
    def write_refusal(self) -> str | None:
        """Why host writes are refused (this unit is a replica), or None."""
        return self._write_refusal

    def refuse_writes(self, reason: str | None) -> None:
        """From now on every write and unmap gets WriteProtected (DATA PROTECT, WRITE PROTECTED)
        saying `reason`; None takes writes again. The listeners hear of a change between refusing
        and taking writes (the SCSI target then reports the new WP bit)."""
        changed = (reason is None) != (self._write_refusal is None)
        self._write_refusal = reason
        if reason is not None:
            log.warning("host writes refused reason=%s", reason)
        if changed:
            for listener in self._refusal_listeners:
                listener()

    def add_write_refusal_listener(self, listener: Callable[[], None]) -> None:
        """Call `listener()` (on the caller's thread of `refuse_writes`) whenever the unit starts or
        stops refusing host writes."""
        self._refusal_listeners.append(listener)

    @property
    def write_cache(self) -> bool:
        return self._write_cache

    @property
    def journal(self) -> Journal:
        return self._journal

    def set_write_cache(self, enabled: bool) -> None:
        if self._write_cache and not enabled:
            self.flush()
        self._write_cache = enabled
        log.info("write cache %s", "on" if enabled else "off")

    def _check(self, lba: int, count: int, *, writing: bool = True) -> None:
        if lba < 0 or count < 0 or lba + count > self._nblocks:
            raise ValueError(f"blocks {lba}+{count} outside volume of {self._nblocks}")
        if self._closed:
            raise StorageError("local unit is closed")
        if writing and self._failed is not None:
            raise WriteError(f"local unit failed earlier: {self._failed}")
        if writing and self._write_refusal is not None:
            raise WriteProtected(self._write_refusal)

    def read(self, lba: int, count: int) -> bytes:
        self._check(lba, count, writing=False)  # after a write failure, what was acknowledged is readable
        with self._lock:
            data = self._volume.read(lba, count)
            if not self._pending:
                return data
            end = lba + count
            out: bytearray | None = None
            bs = self._bs
            for p in self._pending:
                a, b = max(lba, p.lba), min(end, p.lba + p.count)
                if a >= b or p.kind is RecordKind.FLUSH:
                    continue
                if out is None:
                    out = bytearray(data)
                if p.kind is RecordKind.WRITE:
                    out[(a - lba) * bs:(b - lba) * bs] = p.payload[(a - p.lba) * bs:(b - p.lba) * bs]
                else:
                    out[(a - lba) * bs:(b - lba) * bs] = bytes((b - a) * bs)
            return data if out is None else bytes(out)

    def write(self, lba: int, data: bytes, *, fua: bool = False) -> None:
        if len(data) % self._bs:
            raise ValueError("data is not a whole number of blocks")
        count = len(data) // self._bs
        self._check(lba, count)
        if count == 0:
            if fua:
                self.flush()
            return
        self._submit(RecordKind.WRITE, lba, count, bytes(data), fua=fua)

    def unmap(self, lba: int, count: int) -> None:
        self._check(lba, count)
        if count == 0:
            return
        self._submit(RecordKind.UNMAP, lba, count, b"", fua=False)

    def install(self, lba: int, data: bytes) -> None:
        """Failback: blocks pulled from a promoted remote, written straight to the volume (not
        journaled: they are the source's data already, and the remote holds them). Only a replica
        (`refuse_writes`) installs; every journal record is first applied, so none is replayed over
        the installed blocks after a restart. Durable after `install_done()`."""
        if self._write_refusal is None:
            raise StorageError("only a replica installs blocks from a promoted remote")
        if len(data) % self._bs:
            raise ValueError("data is not a whole number of blocks")
        self._check(lba, len(data) // self._bs, writing=False)
        with self._lock:
            self._reclaim_locked()
            self._guard(lambda: self._volume.write_nosync(lba, data))

    def install_done(self) -> None:
        """The installed blocks are durable on the volume, and so is the journal's applied position
        (a checkpoint): a restart must not replay older records over them."""
        with self._lock:
            self._guard(self._volume.flush)
            self._guard(self._journal.checkpoint)

    def flush(self) -> None:
        """SYNCHRONIZE CACHE: a consistency point; returns once everything before it is durable
        (and, with sync gates, on the sync remotes)."""
        if self._closed:
            raise StorageError("local unit is closed")
        waiting = 0
        with self._lock:
            if self._space_exhausted is not None:
                try:
                    self._retry_space_locked()
                except SpaceExhausted:
                    waiting = self._journal.head_seq
        if waiting:
            # the volume is full, but every record is durable in the journal where it waits: that is
            # what a flush promises (and the sync remotes get the records from the journal)
            self._guard(self._journal.sync)
            for gate in list(self._gates):
                gate(waiting)
            return
        with self._lock:
            if self._overflow:
                self._guard(self._volume.flush)
                return
            j = self._journal
            if self._last_flush_seq == j.head_seq and j.head_seq > 0:
                seq = j.head_seq
            else:
                try:
                    seq = self._append_locked(RecordKind.FLUSH, 0, 0, b"")
                except JournalFull:
                    # no room even for the marker: everything is applied and synced by now
                    self._enter_overflow_locked()
                    return
                self._last_flush_seq = seq
        self._commit(seq, gates=True, journal_is_enough=True)

    def mark(self, name: str) -> int:
        """Put a named restore point into the journal at the current position; returns its seq once
        it is durable in the local journal (remotes get it in order, whenever they are reachable)."""
        raw = name.encode()
        if not raw or len(raw) > MAX_MARK_NAME or any(c < 0x20 for c in raw):
            raise ValueError(f"a mark's name is 1..{MAX_MARK_NAME} bytes of printable UTF-8, got {name!r}")
        if self._closed:
            raise StorageError("local unit is closed")
        with self._lock:
            if self._overflow and self._journal_has_room_locked():
                self._leave_overflow_locked()
            if self._overflow:
                raise StorageError("the journal is full (remotes are behind and will be resynced): a mark "
                                   "cannot be placed until the journal has room again")
            try:
                seq = self._append_with_reclaim_locked(RecordKind.MARK, 0, 0, raw)
            except JournalFull:
                raise StorageError("the journal has no room for the mark") from None
        self._commit(seq, gates=False, journal_is_enough=True)
        log.info("mark placed name=%s seq=%d", name, seq)
        return seq

    # -- group commit by the caller (the iSCSI server: several commands, one wait) -----------------
    def submit_write(self, lba: int, data: bytes, *, fua: bool = False) -> int:
        """`write()` without the wait: the record is in the journal (reads see it) and the returned
        ticket is passed to `complete()`, which returns when `write()` would have. Nothing may be
        acknowledged to the host before `complete()` returned. Tickets of several submits combine
        into one `complete()`: the highest positive one if any (a journal sync covers every record
        appended before it, the sync gates are passed for that seq), else the lowest."""
        if len(data) % self._bs:
            raise ValueError("data is not a whole number of blocks")
        count = len(data) // self._bs
        self._check(lba, count)
        if count == 0:
            if fua:
                self.flush()
            return 0
        return self._append_write(RecordKind.WRITE, lba, count, bytes(data), fua=fua)

    def submit_unmap(self, lba: int, count: int) -> int:
        """`unmap()` without the wait, as `submit_write()`."""
        self._check(lba, count)
        if count == 0:
            return 0
        return self._append_write(RecordKind.UNMAP, lba, count, b"", fua=False)

    def complete(self, ticket: int) -> None:
        """Wait until the submits behind `ticket` are as durable as `write()` promises (one shared
        journal sync, the sync gates), then the acknowledgement throttle."""
        # the journal's fill is read once, for the volume sync and the throttle both
        if ticket > 0:
            fill = self._commit(ticket, gates=True)
        elif ticket < 0:
            fill = self._commit(-ticket, gates=False)
        else:
            fill = self._fill()
        self._throttle_ack(fill)

    # -- the write path ---------------------------------------------------------------------------
    def _submit(self, kind: RecordKind, lba: int, count: int, payload: bytes, *, fua: bool) -> None:
        self.complete(self._append_write(kind, lba, count, payload, fua=fua))

    def _append_write(self, kind: RecordKind, lba: int, count: int, payload: bytes, *, fua: bool) -> int:
        """Journal the write (or write it through in overflow); the ticket `complete()` waits for:
        > 0 durable with the sync gates before the ack, < 0 durable soon (memory), 0 nothing."""
        max_blocks = self._max_blocks
        commit = 0
        with self._lock:
            if self._space_exhausted is not None:
                self._retry_space_locked()  # raises SpaceExhausted while the volume is still full
            if self._overflow and self._journal_has_room_locked():
                self._leave_overflow_locked()
            if not self._overflow:
                seq = 0
                try:
                    # a write larger than one record is split; the pieces are consecutive records
                    at = 0
                    while at < count:
                        n = min(max_blocks, count - at) if kind is RecordKind.WRITE else count - at
                        piece = payload if n == count else payload[at * self._bs:(at + n) * self._bs]
                        seq = self._append_with_reclaim_locked(kind, lba + at, n, piece)
                        at += n
                    if fua:
                        seq = self._append_with_reclaim_locked(RecordKind.FLUSH, 0, 0, b"")
                        self._last_flush_seq = seq
                except JournalFull:
                    self._enter_overflow_locked()
                    seq = 0
                if seq:
                    if fua or not self._write_cache:
                        commit = seq
                    elif self._pending_bytes >= self._group_bytes:
                        commit = -seq  # durable soon for memory's sake, no ack semantics attached
                    else:
                        commit = 0
            if self._overflow:
                self._direct_locked(kind, lba, count, payload)
        return commit

    def _append_locked(self, kind: RecordKind, lba: int, count: int, payload: bytes) -> int:
        try:
            seq = self._journal.append(kind, lba, count, payload, self._wall())
        except JournalFull:
            raise
        except JournalError as exc:
            self._failed = exc
            raise WriteError(f"journal unusable: {exc}") from exc
        self._pending.append(_UnappliedRecord(seq, kind, lba, count, payload))
        self._pending_bytes += len(payload) + 64
        return seq

    def _append_with_reclaim_locked(self, kind: RecordKind, lba: int, count: int, payload: bytes) -> int:
        try:
            return self._append_locked(kind, lba, count, payload)
        except JournalFull:
            self._reclaim_locked()
            return self._append_locked(kind, lba, count, payload)

    def _reclaim_locked(self) -> None:
        """Make every record durable and applied, sync the volume and let the journal release what
        only the local volume was holding."""
        durable = self._guard(self._journal.sync)
        self._apply_durable_locked(durable)
        self._guard(self._volume.flush)
        self._unsynced_bytes = 0
        self._journal.set_applied(self._applied_unsynced)

    def _commit(self, seq: int, *, gates: bool, journal_is_enough: bool = False) -> float:
        """Make `seq` durable (group commit), write it to the volume, pass the sync gates; returns
        the journal's fill after it. `journal_is_enough` (a flush): a full volume does not fail it,
        the records wait in the journal."""
        durable = self._guard(self._journal.sync)
        with self._lock:
            try:
                self._apply_durable_locked(durable)
            except SpaceExhausted:
                if not journal_is_enough:
                    raise
        if gates and self._gates:
            for gate in list(self._gates):
                gate(seq)
        fill = self._fill()
        self._maybe_sync_volume(fill)
        return fill

    def _guard(self, fn: Callable[[], int | None]) -> int:
        try:
            return fn() or 0
        except JournalCorrupt:
            raise
        except (JournalError, OSError) as exc:
            self._failed = exc
            raise WriteError(f"journal or volume write failed: {exc}") from exc

    def _retry_space_locked(self) -> None:
        """Apply the records that wait for space on the volume; raises SpaceExhausted while it is full."""
        self._space_exhausted = None
        durable = self._guard(self._journal.sync)
        self._apply_durable_locked(durable)  # sets _space_exhausted again and raises if still full
        log.warning("volume has space again: writes resumed after %.1f s", self._clock() - (self._space_since or 0.0))
        self._space_since = None

    def _apply(self, p: _UnappliedRecord) -> None:
        if p.kind is RecordKind.WRITE:
            self._volume.write_nosync(p.lba, p.payload)
        elif p.kind is RecordKind.UNMAP:
            self._volume.unmap(p.lba, p.count)

    def _apply_durable_locked(self, durable: int) -> None:
        if self._space_exhausted is not None:
            # the volume is full: nothing after the record that met it is applied before it
            raise SpaceExhausted(f"volume full, {len(self._pending)} records wait: {self._space_exhausted}")
        n = 0
        for p in self._pending:
            if p.seq > durable:
                break
            try:
                self._apply(p)
            except SpaceExhausted as exc:
                # not a failure of the unit: the record stays pending (and in the journal) until
                # space returns; the host hears 27h/07
                del self._pending[:n]
                self._space_exhausted = exc
                if self._space_since is None:
                    self._space_since = self._clock()
                    self._space_events += 1
                    log.warning("volume full: writes refused until space returns seq=%d pending_records=%d "
                                "reason=%s", p.seq, len(self._pending), exc)
                raise
            except (OSError, StorageError) as exc:
                self._failed = exc
                del self._pending[:n]
                if isinstance(exc, StorageError):
                    raise
                raise WriteError(f"volume write failed seq={p.seq}: {exc}") from exc
            self._applied_unsynced = p.seq
            self._unsynced_bytes += len(p.payload) + 64
            self._pending_bytes -= len(p.payload) + 64
            n += 1
        if n:
            del self._pending[:n]

    def _maybe_sync_volume(self, fill: float) -> None:
        """Sync the volume (on the flusher) once enough is applied to it, or when the journal is
        filling (`fill`: the journal's fill now) and anything is."""
        if self._unsynced_bytes < self._volume_sync_bytes and not (
                self._unsynced_bytes and fill >= self.throttle.start_fill):
            return
        if self._flusher is not None:
            self._flush_wanted.set()
            return
        if not self._vsync_lock.acquire(blocking=False):
            return  # another thread is doing it
        self._sync_volume_holding_vsync()

    def _flusher_loop(self) -> None:
        while True:
            self._flush_wanted.wait()
            if self._stopping:
                return
            self._flush_wanted.clear()
            self._vsync_lock.acquire()
            try:
                self._sync_volume_holding_vsync()
            except Exception as exc:
                log.error("volume sync failed: %s", exc)
                self._failed = exc

    def _sync_volume_holding_vsync(self) -> None:
        """fdatasync the volume, then let the journal release what it held only for the volume."""
        try:
            with self._lock:
                target = self._applied_unsynced
                self._unsynced_bytes = 0
            self._guard(self._volume.flush)
            self._journal.set_applied(target)
            self._guard(self._journal.maybe_checkpoint)
        finally:
            self._vsync_lock.release()

    def _fill(self) -> float:
        return self._journal.used_bytes / self._journal.capacity_bytes

    def _throttle_ack(self, fill: float) -> None:
        # In overflow the journal takes no records, so slowing the host down would not help it.
        throttle = self.throttle
        d = 0.0 if self._overflow or fill < throttle.start_fill else throttle.delay(fill)
        self._last_delay = d
        if d > 0:
            self._throttled_acks += 1
            self._throttle_delay_total += d
            self._sleep(d)

    # -- overflow ---------------------------------------------------------------------------------
    def _journal_has_room_locked(self) -> bool:
        return self._fill() <= self.throttle.resume_fill

    def _enter_overflow_locked(self) -> None:
        """Stop journaling: first put every record on the volume durably and persist that in a
        checkpoint, so no later replay can overwrite what is written straight to the volume."""
        self._reclaim_locked()
        self._guard(self._journal.checkpoint)
        self._overflow = True
        self._overflow_since = self._clock()
        self._overflow_events += 1
        log.warning("journal full: tracking dirty regions instead used_bytes=%d capacity_bytes=%d "
                    "consumers=%s", self._journal.used_bytes, self._journal.capacity_bytes,
                    self._journal.consumers())

    def _leave_overflow_locked(self) -> None:
        self._overflow = False
        self._overflow_since = None
        log.warning("journal has room again: journaling resumed dirty_regions=%d",
                    self._bitmap.dirty_regions)

    def _direct_locked(self, kind: RecordKind, lba: int, count: int, payload: bytes) -> None:
        """Overflow write: the dirty bit is durable first, then the data, write-through."""
        try:
            self._note_dirty_epoch_locked()
            self._bitmap.mark(lba, count)
            if kind is RecordKind.WRITE:
                self._volume.write_nosync(lba, payload)
            else:
                self._volume.unmap(lba, count)
            self._volume.flush()
        except SpaceExhausted:
            raise  # the region is marked dirty; the host hears 27h/07 and may write again later
        except (OSError, StorageError) as exc:
            self._failed = exc
            raise WriteError(f"overflow write failed: {exc}") from exc

    # -- resync API for the replicator ------------------------------------------------------------
    @property
    def overflow(self) -> bool:
        self._maybe_leave_overflow()
        return self._overflow

    def _maybe_leave_overflow(self) -> None:
        """Leave overflow as soon as the journal has room, not only on the next host write: with an
        idle host the replicator (which polls `overflow`) would otherwise wait for the final resync
        round forever. Never blocks: a thread already inside the write path decides there."""
        if self._overflow and self._lock.acquire(blocking=False):
            try:
                if self._overflow and self._journal_has_room_locked():
                    self._leave_overflow_locked()
            finally:
                self._lock.release()

    @property
    def region_blocks(self) -> int:
        return self._bitmap.region_blocks

    def dirty_snapshot(self) -> DirtySnapshot:
        """Regions written while the journal was full (or marked by `mark_dirty`), with a token."""
        return self._bitmap.snapshot()

    def clear_dirty(self, snapshot: DirtySnapshot) -> int:
        """Forget the snapshot's regions, except those dirtied again since; durable on return."""
        n = self._bitmap.clear(snapshot)
        with self._lock:  # marks happen under the lock: none runs between the count and the reset
            if not self._bitmap.dirty_regions:
                self._dirty_epochs.clear()
        log.info("dirty regions cleared count=%d remaining=%d", n, self._bitmap.dirty_regions)
        return n

    def mark_dirty(self, lba: int, count: int) -> None:
        """Mark blocks as needing a resync (e.g. a remote that lost records), durably."""
        with self._lock:
            self._note_dirty_epoch_locked()
            self._bitmap.mark(lba, count)

    def _note_dirty_epoch_locked(self) -> None:
        head = self._journal.head_seq
        if not self._dirty_epochs or self._dirty_epochs[-1][1:] != (head, head):
            self._dirty_epochs.append((self._bitmap.snapshot().token + 1, head, head))

    def dirty_runs(self) -> tuple[int, tuple[tuple[int, int, int], ...]]:
        """(the dirty bitmap's stamp now, its runs of dirty writes as (first stamp, lo, hi)): every
        record up to lo was journaled before that run's writes (an overflow, or a `mark_dirty`), every
        record after hi after them; the runs are () when no region is dirty. See
        `firmware.replication.source.records_before_dirty` for what the replicator makes of them."""
        if not self._dirty_epochs:
            return 0, ()
        with self._lock:
            if not self._bitmap.dirty_regions:
                return 0, ()
            return self._bitmap.snapshot().token, tuple(self._dirty_epochs)

    def add_sync_gate(self, gate: Callable[[int], None]) -> None:
        """`gate(seq)` is called after a record is durable locally and before the host is answered
        (write cache off: every write; on: every flush/FUA). It blocks until the sync remotes hold
        `seq`, or raises StorageError (the host then sees the error). Not called in overflow."""
        self._gates.append(gate)

    def remove_sync_gate(self, gate: Callable[[int], None]) -> None:
        if gate in self._gates:
            self._gates.remove(gate)

    # -- status -----------------------------------------------------------------------------------
    def status(self) -> dict[str, object]:
        self._maybe_leave_overflow()
        j = self._journal
        js = j.status()
        consumers = j.consumers()
        age: float | None = None
        if consumers:
            oldest = min(consumers.values()) + 1
            ts = j.timestamp_of(oldest) if oldest <= j.head_seq else None
            if ts is not None:
                age = max(0.0, (self._wall() - ts) / 1e9)
        js.update({
            "overflow": self._overflow,
            "overflow_events": self._overflow_events,
            "overflow_for_s": (self._clock() - self._overflow_since) if self._overflow_since is not None
            else None,
            "dirty_regions": self._bitmap.dirty_regions,
            "region_blocks": self._bitmap.region_blocks,
            "oldest_unconfirmed_age_s": age,
            "write_cache": "on" if self._write_cache else "off",
            "throttle": {
                "active": self._last_delay > 0,
                "delay_s": self._last_delay,
                "start_fill": self.throttle.start_fill,
                "max_delay_s": self.throttle.max_delay_s,
                "throttled_acks": self._throttled_acks,
                "total_delay_s": self._throttle_delay_total,
            },
            "fill": self._fill(),
            "pending_records": len(self._pending),
            "replayed_records": self.replayed_records,
            "recovery": {
                "torn_tail": j.recovery.torn_tail,
                "records_scanned": j.recovery.records,
                "stop_reason": j.recovery.stop_reason,
                "created": j.recovery.created,
            },
        })
        return {"journal": js, "volume_full": self._space_exhausted is not None,
                "volume_full_events": self._space_events,
                "records_waiting_for_space": len(self._pending) if self._space_exhausted is not None else 0}

    # -- lifecycle --------------------------------------------------------------------------------
    def close(self) -> None:
        """Make everything durable on the journal and the volume and checkpoint; the volume and the
        journal themselves are closed by their owners."""
        if self._closed:
            return
        if self._flusher is not None:
            self._stopping = True
            self._flush_wanted.set()
            self._flusher.join()
        try:
            if self._failed is None and not self._journal_failed():
                with self._lock:
                    try:
                        self._reclaim_locked()
                    except SpaceExhausted as exc:
                        log.warning("volume full at shut-down: records_waiting=%d stay in the journal and are "
                                    "applied at the next start (%s)", len(self._pending), exc)
                self._journal.checkpoint()
        finally:
            self._closed = True
            self._bitmap.close()

    def _journal_failed(self) -> bool:
        try:
            self._journal.sync()
        except JournalError:
            return True
        return False

    def __enter__(self) -> LocalUnit:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
