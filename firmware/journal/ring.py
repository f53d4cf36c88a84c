"""The write journal: a ring of records on flash with head and tail, group commit, consumers and
crash recovery.

Lifecycle: `Journal.open()` creates (and pre-writes) the device when it is missing, otherwise reads
the superblock, picks the newest valid checkpoint and scans forward to the last complete record
(`recovery` holds the report). `append()` only builds the record in RAM; `sync()` writes every queued
record with as few pwrites as possible and one fdatasync per batch (group commit: concurrent callers
share it). Records are released (the tail advances) only when every registered consumer confirmed
them and the local volume applied them (`set_applied`, see `firmware.local_unit`). Ring space that
held released records is overwritten only after a checkpoint naming the new tail is durable, so a
recovery never starts from a tail that no longer exists.

What it does not do: it never talks to a volume or a network. Applying records to the local disk is
`firmware.local_unit`'s job; shipping them to remote units is `firmware.replicator`'s.

On-flash format: `firmware.journal.format` and docs/JOURNAL.md.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import threading
import time
import uuid
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import google_crc32c

from firmware.journal.flash import FileFlash, Flash
from firmware.journal.format import (
    ALIGN,
    CHECKPOINT_OFFSETS,
    DEFAULT_MAX_BATCH,
    HEADER_BODY,
    HEADER_SIZE,
    MAX_CONSUMER_NAME,
    MAX_CONSUMERS,
    MAX_MARK_NAME,
    MIN_RING,
    RECORD_HEADER,
    RECORD_MAGIC,
    RING_GRANULE,
    RING_OFFSET,
    SLOT_SIZE,
    SUPERBLOCK_BACKUP_OFFSET,
    SUPERBLOCK_OFFSET,
    WRAP_KIND,
    Checkpoint,
    JournalCorrupt,
    JournalError,
    JournalFull,
    JournalRecord,
    RecordHeader,
    RecordKind,
    RecordsGone,
    Superblock,
    crc32c,
    decode_header,
    record_length,
    seal_header,
)

log = logging.getLogger(__name__)

_crc32c_value = google_crc32c.value

_SCAN_CHUNK = 8 << 20
# the scan's fast path compares plain ints: a WRITE carries its blocks, UNMAP and FLUSH nothing
_WRITE = int(RecordKind.WRITE)
_BARE_KINDS = (int(RecordKind.UNMAP), int(RecordKind.FLUSH))
# the most flash syncs one journal keeps in flight at once, whatever the flash offers
_MAX_SYNCS_IN_FLIGHT = 4


@dataclass
class RecoveryReport:
    """What `Journal.open` found on flash."""

    created: bool = False
    checkpoint_slot: int = -1
    checkpoint_generation: int = 0
    tail_seq: int = 1
    head_seq: int = 0
    records: int = 0
    bytes_scanned: int = 0
    torn_tail: bool = False
    stop_reason: str = ""
    stop_position: int | None = None
    corruption: JournalCorrupt | None = None  # only when opened with salvage=True
    notes: list[str] = field(default_factory=list)


#: The zero padding after a payload up to the next ALIGN boundary (sliced, never written whole).
_ZEROS = bytes(ALIGN)


@dataclass(slots=True)
class _QueuedRecord:
    """A record appended to the ring but not yet written to flash (the write-behind queue): its
    header (sealed when the batch is written), the payload by reference (not copied into a record
    buffer) and its length in the ring, padding included."""

    pos: int
    head: bytearray
    payload: bytes | bytearray | memoryview
    rlen: int
    kind: int
    seq: int
    lba: int
    count: int
    payload_len: int
    timestamp_ns: int
    payload_crc: int


class Journal:
    """The journal ring on one flash device. Thread-safe; a context manager."""

    def __init__(self, flash: Flash, sb: Superblock, ckpt: Checkpoint, slot: int, *,
                 track_applied: bool = True) -> None:
        # Use Journal.open(); this constructor only sets fields.
        self._flash = flash
        # a flash that writes several buffers at once (FileFlash.pwritev), else None: joined
        self._pwritev: Callable[[list[bytes | bytearray | memoryview], int], None] | None = getattr(
            flash, "pwritev", None)
        self._sb = sb
        self._ring = sb.ring_size
        self._epoch = sb.epoch
        self._max_record_bytes = min(sb.max_batch, sb.ring_size // 4) - HEADER_SIZE - ALIGN
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        # threads in self._cond.wait() (changed under the lock): the write path notifies only when
        # someone waits (threading.Condition.notify_all costs several Python calls even for nobody)
        self._waiters = 0
        self._closed = False
        self._failed: BaseException | None = None
        self._writer_busy = False  # a thread writes records (or a checkpoint) to flash
        # flash syncs that may be in flight at once (the flash says how many it can keep apart, each
        # with its own error report: FileFlash syncs on a pool of descriptors)
        self._parallel_syncs = max(1, min(int(getattr(flash, "parallel_syncs", 1)), _MAX_SYNCS_IN_FLIGHT))
        self._syncing = 0  # flash syncs in flight
        self._sync_covers = 0  # the highest seq a flash sync started so far covers (written before it)
        self._flushes = 0  # flash syncs that made records durable: status "flushes"
        self._durable_listeners: list[Callable[[], None]] = []
        self._track_applied = track_applied
        self._incarnation = ckpt.incarnation
        self._ckpt_gen = ckpt.generation
        self._ckpt_slot = slot
        self._ckpt_tail_pos = ckpt.tail_pos
        self._ckpt_state: tuple[object, ...] = ()
        self._bytes_since_ckpt = 0
        self._tail_seq = ckpt.tail_seq
        self._tail_pos = ckpt.tail_pos
        self._head_seq = ckpt.tail_seq - 1
        self._head_pos = ckpt.tail_pos
        self._durable_seq = self._head_seq
        self._durable_pos = self._head_pos
        # records written to flash (pwrite done, in order) but maybe not yet durable
        self._written_seq = self._head_seq
        self._written_pos = self._head_pos
        self._applied_seq = ckpt.applied_seq
        self._consumers: dict[str, int] = dict(ckpt.consumers)
        self._queue: list[_QueuedRecord] = []
        # index of retained records: position, length and timestamp of seq idx_seq0 + i - idx_start
        self._idx_seq0 = ckpt.tail_seq
        self._idx_start = 0
        self._idx_pos: array[int] = array("q")
        self._idx_len: array[int] = array("q")
        self._idx_ts: array[int] = array("q")
        self.recovery = RecoveryReport()
        self.path: Path | None = None

    # -- opening ----------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike[str] | None, *, size: int | None, unit_uuid: uuid.UUID,
             block_size: int, flash: Flash | None = None, salvage: bool = False,
             track_applied: bool = True, max_batch: int = DEFAULT_MAX_BATCH) -> Journal:
        """Open the journal at `path` (a file or a partition), creating and pre-writing a file of
        `size` bytes when it is missing. `flash` replaces the device (tests: a SimulatedFlash; a
        blank one, all zeros, is formatted).

        Raises JournalError when the device belongs to another unit or has another block size, and
        JournalCorrupt when a record that was durable is damaged (unless `salvage`: then the journal
        is cut before it and `recovery.corruption` says what was lost).
        """
        created = False
        if flash is None:
            if path is None:
                raise JournalError("no journal path")
            p = Path(path)
            if p.exists():
                flash = FileFlash(p)
            else:
                if size is None:
                    raise JournalError(f"{p} does not exist and no size was given to create it")
                flash = FileFlash.create(p, size)
                created = True
        try:
            if created or cls._is_blank(flash):
                cls.format(flash, unit_uuid=unit_uuid, block_size=block_size, max_batch=max_batch)
                created = True
            j = cls._recover(flash, unit_uuid=unit_uuid, block_size=block_size, salvage=salvage,
                             track_applied=track_applied)
        except BaseException:
            flash.close()
            raise
        j.recovery.created = created
        j.path = Path(path) if path is not None else None
        return j

    @staticmethod
    def _is_blank(flash: Flash) -> bool:
        """Both superblock copies are all zeros: a new device, or a format interrupted by a power
        cut before either copy reached the medium (checkpoint slots may hold pieces of the first
        checkpoint; without a superblock they mean nothing). Anything else is someone's data."""
        if flash.size < RING_OFFSET:
            return False
        zero = bytes(SLOT_SIZE)
        if flash.pread(SLOT_SIZE, SUPERBLOCK_OFFSET) != zero:
            return False
        if flash.pread(SLOT_SIZE, SUPERBLOCK_BACKUP_OFFSET) != zero:
            return False
        if any(flash.pread(SLOT_SIZE, off) != zero for off in CHECKPOINT_OFFSETS):
            log.warning("journal device has no superblock but checkpoint data: taking it for an "
                        "interrupted format and formatting it again")
        return True

    @staticmethod
    def format(flash: Flash, *, unit_uuid: uuid.UUID, block_size: int,
               max_batch: int = DEFAULT_MAX_BATCH) -> Superblock:
        """Write a fresh superblock (twice) and an empty checkpoint; all previous records become
        invisible (new format epoch)."""
        ring = (flash.size - RING_OFFSET) // RING_GRANULE * RING_GRANULE
        if ring < MIN_RING:
            raise JournalError(f"journal device of {flash.size} bytes is too small (need at least "
                               f"{RING_OFFSET + MIN_RING})")
        if block_size not in (512, 4096):
            raise JournalError(f"block size must be 512 or 4096, not {block_size}")
        sb = Superblock(block_size=block_size, unit_uuid=unit_uuid, device_size=flash.size, ring_size=ring,
                        epoch=secrets.randbits(32), created_ns=time.time_ns(),
                        max_batch=max(ALIGN, min(max_batch, ring // 4)))
        ck = Checkpoint(generation=1, tail_seq=1, tail_pos=0, head_seq=0, head_pos=0, applied_seq=0,
                        written_ns=time.time_ns(), epoch=sb.epoch, incarnation=0)
        raw = sb.encode()
        flash.pwrite(ck.encode(), CHECKPOINT_OFFSETS[1])
        flash.pwrite(bytes(SLOT_SIZE), CHECKPOINT_OFFSETS[0])
        flash.pwrite(raw, SUPERBLOCK_BACKUP_OFFSET)
        flash.sync()
        flash.pwrite(raw, SUPERBLOCK_OFFSET)
        flash.sync()
        log.info("formatted journal ring_size=%d epoch=%08x unit=%s", ring, sb.epoch, unit_uuid)
        return sb

    @classmethod
    def _recover(cls, flash: Flash, *, unit_uuid: uuid.UUID, block_size: int, salvage: bool,
                 track_applied: bool) -> Journal:
        notes: list[str] = []
        try:
            sb = Superblock.decode(flash.pread(SLOT_SIZE, SUPERBLOCK_OFFSET))
        except JournalCorrupt as exc:
            sb = Superblock.decode(flash.pread(SLOT_SIZE, SUPERBLOCK_BACKUP_OFFSET))
            notes.append(f"primary superblock unusable ({exc}); used the backup copy")
            log.warning("journal primary superblock unusable, using backup: %s", exc)
        if sb.unit_uuid != unit_uuid:
            raise JournalError(f"journal belongs to unit {sb.unit_uuid}, not {unit_uuid}")
        if sb.block_size != block_size:
            raise JournalError(f"journal was made for {sb.block_size}-byte blocks, not {block_size}")
        if sb.device_size > flash.size:
            raise JournalError(f"journal device shrank: {flash.size} bytes, superblock says {sb.device_size}")
        best: tuple[Checkpoint, int] | None = None
        for slot, off in enumerate(CHECKPOINT_OFFSETS):
            raw = flash.pread(SLOT_SIZE, off)
            if raw == bytes(SLOT_SIZE):
                continue  # never written (a new journal uses one slot)
            try:
                ck = Checkpoint.decode(raw)
            except JournalCorrupt as exc:
                notes.append(f"checkpoint slot {slot}: {exc}")
                continue
            if ck.epoch != sb.epoch:
                notes.append(f"checkpoint slot {slot}: from an earlier format")
                continue
            if best is None or ck.generation > best[0].generation:
                best = (ck, slot)
        if best is None:
            raise JournalCorrupt("no valid checkpoint in either slot: " + "; ".join(notes))
        ck, slot = best
        j = cls(flash, sb, ck, slot, track_applied=track_applied)
        j.recovery.notes = notes
        j.recovery.checkpoint_slot = slot
        j.recovery.checkpoint_generation = ck.generation
        j._scan(ck, salvage=salvage)
        # a new incarnation: records written from now on can be told from stale ones of earlier runs
        j._incarnation = ck.incarnation + 1
        j._write_checkpoint(j._checkpoint_state())
        log.info("journal open tail_seq=%d head_seq=%d records=%d torn_tail=%s checkpoint_gen=%d",
                 j._tail_seq, j._head_seq, j.recovery.records, j.recovery.torn_tail, ck.generation)
        return j

    def _ring_read(self, pos: int, length: int) -> bytes:
        off = pos % self._ring
        if off + length <= self._ring:
            return self._flash.pread(length, RING_OFFSET + off)
        first = self._ring - off
        return self._flash.pread(first, RING_OFFSET + off) + self._flash.pread(length - first, RING_OFFSET)

    def _valid_header(self, h: RecordHeader | None, expected: int, min_inc: int, max_inc: int,
                      off: int) -> str:
        """'' when `h` is the header expected at this point of the scan, else why not."""
        if h is None:
            return "no intact record header"
        if h.epoch != self._epoch:
            return "record from an earlier format"
        if h.seq != expected:
            return f"seq {h.seq} where {expected} was expected"
        if not min_inc <= h.incarnation <= max_inc:
            return f"record of incarnation {h.incarnation} outside {min_inc}..{max_inc}"
        if h.durable_before >= h.seq:
            return "durable-before not below seq"
        if h.kind == WRAP_KIND:
            return ""
        if h.kind == RecordKind.WRITE:
            if h.payload_len != h.count * self._sb.block_size or h.count == 0:
                return "payload length does not match block count"
        elif h.kind == RecordKind.MARK:
            if h.count or h.lba or h.payload_len > MAX_MARK_NAME:
                return "mark record with blocks or an overlong name"
        elif h.payload_len != 0:
            return "payload on a record kind that has none"
        if off + h.record_len > self._ring:
            return "record runs past the ring end"
        return ""

    def _scan(self, ck: Checkpoint, *, salvage: bool) -> None:
        rep = self.recovery
        ring = self._ring
        pos = ck.tail_pos
        expected = ck.tail_seq
        min_inc = 0
        max_inc = ck.incarnation
        buf = b""
        buf_pos = 0  # position of buf[0]
        reason = ""
        bs = self._sb.block_size
        unpack_header = RECORD_HEADER.unpack_from
        crc_value = google_crc32c.value
        idx_pos, idx_len, idx_ts = self._idx_pos, self._idx_len, self._idx_ts
        while True:
            if pos - ck.tail_pos >= ring:
                reason = "a whole ring of records"
                break
            off = pos % ring
            need = HEADER_SIZE
            if not (buf_pos <= pos and pos + need <= buf_pos + len(buf)):
                buf_pos = pos
                buf = self._flash.pread(min(_SCAN_CHUNK, ring - off), RING_OFFSET + off)
            at = pos - buf_pos
            # fast path for the common case (an intact WRITE/UNMAP/FLUSH record where expected);
            # anything else goes through decode_header/_valid_header, which say what is wrong
            (magic, kind, flags, hlen, epoch, inc, seq, dbefore, _lba, count, plen, ts, pcrc,
             hcrc) = unpack_header(buf, at)
            if (magic == RECORD_MAGIC and seq == expected and epoch == self._epoch and flags == 0
                    and hlen == HEADER_SIZE and min_inc <= inc <= max_inc and dbefore < seq
                    and (plen == count * bs and count > 0 if kind == _WRITE else (plen == 0 and kind in _BARE_KINDS))
                    and hcrc == crc_value(buf[at: at + HEADER_BODY])):
                rlen = (HEADER_SIZE + plen + ALIGN - 1) // ALIGN * ALIGN
                if off + rlen <= ring and pos - ck.tail_pos + rlen <= ring:
                    if pos + rlen > buf_pos + len(buf):
                        buf_pos = pos
                        buf = self._flash.pread(max(min(_SCAN_CHUNK, ring - off), rlen), RING_OFFSET + off)
                        at = 0
                    if plen and crc_value(buf[at + HEADER_SIZE: at + HEADER_SIZE + plen]) != pcrc:
                        reason = "payload checksum mismatch"
                        break
                    idx_pos.append(pos)
                    idx_len.append(rlen)
                    idx_ts.append(ts)
                    min_inc = inc
                    expected += 1
                    pos += rlen
                    rep.records += 1
                    continue
            h = decode_header(buf, at)
            reason = self._valid_header(h, expected, min_inc, max_inc, off)
            if reason:
                break
            assert h is not None
            if h.kind == WRAP_KIND:
                if off == 0 or pos + (ring - off) - ck.tail_pos > ring:
                    reason = "misplaced wrap marker"
                    break
                pos += ring - off
                min_inc = h.incarnation
                continue
            rlen = h.record_len
            if pos - ck.tail_pos + rlen > ring:
                reason = "record would overlap the tail"
                break
            if pos + rlen > buf_pos + len(buf):
                buf_pos = pos
                buf = self._flash.pread(max(min(_SCAN_CHUNK, ring - off), rlen), RING_OFFSET + off)
                at = 0
            if h.payload_len and crc32c(buf[at + HEADER_SIZE: at + HEADER_SIZE + h.payload_len]) != h.payload_crc:
                reason = "payload checksum mismatch"
                break
            self._idx_pos.append(pos)
            self._idx_len.append(rlen)
            self._idx_ts.append(h.timestamp_ns)
            min_inc = h.incarnation
            expected += 1
            pos += rlen
            rep.records += 1
        rep.bytes_scanned = pos - ck.tail_pos
        rep.stop_reason = reason
        rep.stop_position = pos
        if expected <= ck.head_seq or (reason != "a whole ring of records"
                                       and self._durable_evidence(pos, expected, min_inc, max_inc, ck)):
            exc = JournalCorrupt(
                f"journal record seq={expected} at position {pos} (device offset "
                f"{RING_OFFSET + pos % ring}) is damaged ({reason}) although it was durable; "
                "refusing to serve data that may be wrong",
                seq=expected, position=pos, device_offset=RING_OFFSET + pos % ring)
            if not salvage:
                raise exc
            log.error("journal salvage: cutting the journal at seq=%d position=%d: %s", expected, pos, reason)
            rep.corruption = exc
        else:
            rep.torn_tail = reason == "payload checksum mismatch" or (
                reason == "no intact record header" and self._looks_written(pos))
        self._head_seq = self._durable_seq = self._written_seq = self._sync_covers = expected - 1
        self._head_pos = self._durable_pos = self._written_pos = pos
        rep.tail_seq = self._tail_seq
        rep.head_seq = self._head_seq
        self._applied_seq = min(max(self._applied_seq, self._tail_seq - 1), self._head_seq)
        for name, seq in list(self._consumers.items()):
            self._consumers[name] = min(max(seq, self._tail_seq - 1), self._head_seq)

    def _looks_written(self, pos: int) -> bool:
        """True when the bytes at `pos` carry a record magic (a torn write), not stale zeros."""
        return self._ring_read(pos, 4) == b"UJR1"

    def _durable_evidence(self, pos: int, expected: int, min_inc: int, max_inc: int, ck: Checkpoint) -> bool:
        """Look past a damaged record for one written after it was durable (its `durable before` is
        >= the damaged seq): then the damage is corruption of acknowledged data, not a torn tail.
        Batches are at most `max_batch` bytes and a batch is written only while less than `max_batch`
        bytes wait for a flash sync, so the first batch written after the damaged record was durable
        starts within that window."""
        window = min(self._sb.max_batch * 3 + ALIGN, self._ring - (pos - ck.tail_pos))
        if window <= ALIGN:
            return False
        data = self._ring_read(pos, window)
        for at in range(ALIGN, window - HEADER_SIZE + 1, ALIGN):
            h = decode_header(data, at)
            if (h is not None and h.epoch == self._epoch and h.seq > expected
                    and h.durable_before >= expected and min_inc <= h.incarnation <= max_inc):
                return True
        return False

    # -- properties -------------------------------------------------------------------------------
    @property
    def unit_uuid(self) -> uuid.UUID:
        return self._sb.unit_uuid

    @property
    def block_size(self) -> int:
        return self._sb.block_size

    @property
    def superblock(self) -> Superblock:
        return self._sb

    @property
    def generation(self) -> int:
        """Bumps when the journal restarts from scratch (a new format epoch starts seqs again)."""
        return int(self._sb.epoch)

    @property
    def capacity_bytes(self) -> int:
        return self._ring

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return self._head_pos - self._tail_pos

    @property
    def free_bytes(self) -> int:
        with self._lock:
            return self._ring - (self._head_pos - self._tail_pos)

    @property
    def head_seq(self) -> int:
        """Seq of the last record appended (durable or not)."""
        return self._head_seq

    @property
    def durable_seq(self) -> int:
        """Seq of the last record durable on flash."""
        return self._durable_seq

    @property
    def tail_seq(self) -> int:
        """Seq of the oldest retained record (head_seq + 1 when the journal is empty)."""
        return self._tail_seq

    @property
    def applied_seq(self) -> int:
        return self._applied_seq

    @property
    def max_record_bytes(self) -> int:
        """Largest payload one record may carry."""
        return self._max_record_bytes

    def fits(self, payload_len: int) -> bool:
        """Whether a record with this payload would fit now (wrap waste counted)."""
        rlen = record_length(payload_len)
        with self._lock:
            off = self._head_pos % self._ring
            waste = self._ring - off if off + rlen > self._ring else 0
            return self._head_pos - self._tail_pos + waste + rlen <= self._ring

    # -- appending and group commit ---------------------------------------------------------------
    def _check_usable(self) -> None:
        if self._closed:
            raise JournalError("journal is closed")
        if self._failed is not None:
            raise JournalError(f"journal failed earlier: {self._failed}")

    def append(self, kind: RecordKind, lba: int, count: int, payload: bytes, now_ns: int) -> int:
        """Queue a record in RAM and return its seq; it is durable after the next `sync()`.
        Raises JournalFull when the ring has no room until the tail advances."""
        if type(kind) is not RecordKind:  # an int from a caller: checked and converted once
            kind = RecordKind(kind)
        plen = len(payload)
        if kind is RecordKind.WRITE:
            if count <= 0 or plen != count * self._sb.block_size:
                raise ValueError(f"WRITE of {count} blocks needs {count * self._sb.block_size} payload bytes, "
                                 f"got {plen}")
        elif kind is RecordKind.MARK:
            if count or lba or not 0 < plen <= MAX_MARK_NAME:
                raise ValueError(f"a MARK record names 1..{MAX_MARK_NAME} bytes and no blocks")
        elif plen:
            raise ValueError(f"{kind.name} records carry no payload")
        if lba < 0 or count < 0:
            raise ValueError("negative lba or count")
        if plen > self._max_record_bytes:
            raise ValueError(f"record payload of {plen} bytes exceeds {self._max_record_bytes}")
        if type(payload) is not bytes:  # the record keeps it until written: no buffer the caller reuses
            payload = bytes(payload)
        pcrc = _crc32c_value(payload) if plen else 0  # format.crc32c of the bytes, without the wrapper
        rlen = record_length(plen)
        with self._lock:
            self._check_usable()
            pos = self._head_pos
            off = pos % self._ring
            waste = self._ring - off if off + rlen > self._ring else 0
            if self._head_pos - self._tail_pos + waste + rlen > self._ring:
                raise JournalFull(f"journal full: {self._head_pos - self._tail_pos} of {self._ring} bytes "
                                  f"used, record needs {rlen + waste}")
            seq = self._head_seq + 1
            if waste:
                self._queue.append(_QueuedRecord(pos, bytearray(HEADER_SIZE), b"", HEADER_SIZE, WRAP_KIND, seq,
                                                 0, 0, 0, now_ns, 0))
                pos += waste
            self._queue.append(_QueuedRecord(pos, bytearray(HEADER_SIZE), payload, rlen, int(kind), seq, lba,
                                             count, plen, now_ns, pcrc))
            self._idx_pos.append(pos)
            self._idx_len.append(rlen)
            self._idx_ts.append(now_ns)
            self._head_seq = seq
            self._head_pos = pos + rlen
            return seq

    def _acquire_writer(self) -> None:
        """Under the lock: wait until no other thread writes to flash, then claim it."""
        while self._writer_busy:
            self._wait_locked()
        self._writer_busy = True

    def _wait_locked(self, timeout: float | None = None) -> None:
        self._waiters += 1
        try:
            self._cond.wait(timeout)
        finally:
            self._waiters -= 1

    def _release_writer(self) -> None:
        self._writer_busy = False
        if self._waiters:
            self._cond.notify_all()

    def sync(self) -> int:
        """Make every record appended so far durable and return the durable seq. Concurrent callers
        share the flash syncs (group commit): records are written in order by one thread at a time
        (the writer claim), and a flash sync makes durable exactly the records whose writes had
        completed when it started. While one sync is in flight the next batch is written and its own
        sync may start (up to the flash's `parallel_syncs`); the durable seq only grows, to what a
        completed sync covers, and a failed sync fails the journal, so no later one counts."""
        with self._lock:
            target = self._head_seq
            while self._durable_seq < target:
                self._check_usable()
                if self._written_seq < target:
                    # our records still need writing: one writer at a time, and only while less than
                    # a batch waits for a sync (a recovery looks for evidence within a bounded window)
                    if not self._writer_busy and self._written_pos - self._durable_pos < self._sb.max_batch:
                        self._writer_busy = True
                        try:
                            self._write_batch_locked()
                        finally:
                            self._release_writer()
                        continue
                    if self._writer_busy or self._sync_covers >= self._written_seq \
                            or self._syncing >= self._parallel_syncs:
                        self._wait_locked()
                        continue
                elif self._sync_covers >= target or self._syncing >= self._parallel_syncs:
                    # a flash sync that started after our records were written is in flight (it
                    # covers them), or as many as the flash keeps apart: wait for one to end
                    self._wait_locked()
                    continue
                self._flash_sync_locked()
            return self._durable_seq

    def _write_batch_locked(self) -> None:
        """Called with the lock held and the writer claimed; releases the lock around I/O. Writes the
        next batch of queued records (no flash sync: `_flash_sync_locked` makes them durable)."""
        budget = self._sb.max_batch
        n = 0
        size = 0
        while n < len(self._queue):
            p = self._queue[n]
            plen = p.rlen
            # a wrap marker always travels with the record after it
            if n and size + plen > budget and self._queue[n - 1].kind != WRAP_KIND:
                break
            size += plen
            n += 1
        batch = self._queue[:n]
        del self._queue[:n]
        last = batch[-1]
        end_pos = last.pos + last.rlen
        ckpt_state = self._checkpoint_state() if end_pos > self._ckpt_tail_pos + self._ring else None
        durable_before = self._durable_seq
        self._lock.release()
        try:
            if ckpt_state is not None:
                self._write_checkpoint(ckpt_state)
            # Each run of consecutive records is one write of header, payload and padding buffers
            # (pwritev where the flash has it: the payloads are not copied into record buffers).
            runs: list[tuple[int, list[bytes | bytearray | memoryview]]] = []
            run_end = -1
            for p in batch:
                seal_header(p.head, kind=p.kind, epoch=self._epoch, incarnation=self._incarnation, seq=p.seq,
                            durable_before=durable_before, lba=p.lba, count=p.count,
                            payload_len=p.payload_len, timestamp_ns=p.timestamp_ns, payload_crc=p.payload_crc)
                off = p.pos % self._ring
                if off == run_end:
                    bufs = runs[-1][1]
                else:
                    bufs = []
                    runs.append((off, bufs))
                bufs.append(p.head)
                if p.payload_len:
                    bufs.append(p.payload)
                pad = p.rlen - HEADER_SIZE - p.payload_len
                if pad:
                    bufs.append(_ZEROS[:pad])
                run_end = off + p.rlen
            pwritev = self._pwritev
            for off, bufs in runs:
                if pwritev is not None:
                    pwritev(bufs, RING_OFFSET + off)
                else:
                    self._flash.pwrite(bufs[0] if len(bufs) == 1 else b"".join(bufs), RING_OFFSET + off)
        except BaseException as exc:
            self._lock.acquire()
            self._failed = exc
            log.error("journal write failed seq=%d: %s", last.seq, exc)
            if isinstance(exc, OSError):
                raise JournalError(f"journal write failed: {exc}") from exc
            raise
        self._lock.acquire()
        self._written_seq = last.seq if last.kind != WRAP_KIND else last.seq - 1
        self._written_pos = end_pos
        self._bytes_since_ckpt += size

    def _flash_sync_locked(self) -> None:
        """Called with the lock held: one flash sync (the lock released around it) that makes durable
        the records written before it started. A failure (this sync's or one that overlapped it)
        leaves the journal unusable and is raised."""
        covers_seq, covers_pos = self._written_seq, self._written_pos
        self._syncing += 1
        self._sync_covers = max(self._sync_covers, covers_seq)
        self._lock.release()
        try:
            self._flash.sync()
        except BaseException as exc:
            self._lock.acquire()
            self._syncing -= 1
            if self._failed is None:
                self._failed = exc
            log.error("journal sync failed seq=%d: %s", covers_seq, exc)
            self._cond.notify_all()
            if isinstance(exc, OSError):
                raise JournalError(f"journal write failed: {exc}") from exc
            raise
        self._lock.acquire()
        self._syncing -= 1
        if self._failed is not None:
            # another write or sync failed meanwhile: nothing is durable any more than it was
            self._cond.notify_all()
            raise JournalError(f"journal failed earlier: {self._failed}")
        if covers_seq > self._durable_seq:
            self._flushes += 1
            self._durable_seq = covers_seq
            self._durable_pos = covers_pos
            for listener in self._durable_listeners:
                listener()
        if self._waiters:
            self._cond.notify_all()
        if self._bytes_since_ckpt >= self._ring // 8 and not self._writer_busy:
            # persist confirmations and the tail now and then, even if nobody asks (the writer claim
            # keeps it apart from batch writes)
            st = self._checkpoint_state()
            if st[:2] + st[4:] == self._ckpt_state:
                self._bytes_since_ckpt = 0
                return
            self._writer_busy = True
            try:
                self._write_checkpoint_unlocked(st)
            finally:
                self._release_writer()

    # -- checkpoints ------------------------------------------------------------------------------
    def _checkpoint_state(self) -> tuple[object, ...]:
        self._advance_tail_locked()
        return (self._tail_seq, self._tail_pos, self._durable_seq, self._durable_pos, self._applied_seq,
                tuple(sorted(self._consumers.items())), self._incarnation)

    def _write_checkpoint(self, state: tuple[object, ...]) -> None:
        """Write the slot not holding the newest checkpoint, then fdatasync. The caller holds the
        writer claim (or is the opening thread), not the lock."""
        tail_seq, tail_pos, head_seq, head_pos, applied, consumers, inc = state
        assert isinstance(tail_seq, int) and isinstance(tail_pos, int) and isinstance(head_seq, int)
        assert isinstance(head_pos, int) and isinstance(applied, int) and isinstance(inc, int)
        assert isinstance(consumers, tuple)
        gen = self._ckpt_gen + 1
        slot = 1 - self._ckpt_slot
        ck = Checkpoint(generation=gen, tail_seq=tail_seq, tail_pos=tail_pos, head_seq=head_seq,
                        head_pos=head_pos, applied_seq=applied, written_ns=time.time_ns(), epoch=self._epoch,
                        incarnation=inc, consumers=consumers)
        self._flash.pwrite(ck.encode(), CHECKPOINT_OFFSETS[slot])
        self._flash.sync()
        self._ckpt_gen = gen
        self._ckpt_slot = slot
        self._ckpt_tail_pos = tail_pos
        self._ckpt_state = state[:2] + state[4:]
        self._bytes_since_ckpt = 0

    def _write_checkpoint_unlocked(self, state: tuple[object, ...]) -> None:
        """Called with the lock held and the writer claimed: write the checkpoint with the lock released
        around the I/O. A failure leaves the journal unusable."""
        self._lock.release()
        try:
            self._write_checkpoint(state)
        except BaseException as exc:
            self._lock.acquire()
            self._failed = exc
            raise
        self._lock.acquire()

    def checkpoint(self) -> None:
        """Persist the tail, the applied seq and every consumer's confirmation now."""
        with self._lock:
            self._check_usable()
            self._acquire_writer()
            try:
                self._write_checkpoint_unlocked(self._checkpoint_state())
            finally:
                self._release_writer()

    def maybe_checkpoint(self, every_bytes: int | None = None) -> bool:
        """Checkpoint if the tail, applied seq or confirmations changed and at least `every_bytes`
        (default: an eighth of the ring) were written since the last one. Returns whether it did."""
        every = self._ring // 8 if every_bytes is None else every_bytes
        with self._lock:
            st = self._checkpoint_state()
            changed = (st[:2] + st[4:]) != self._ckpt_state
            due = changed and self._bytes_since_ckpt >= every
        if due:
            self.checkpoint()
        return due

    def _advance_tail_locked(self) -> None:
        limit = self._durable_seq
        if self._track_applied:
            limit = min(limit, self._applied_seq)
        for seq in self._consumers.values():
            limit = min(limit, seq)
        new_tail = limit + 1
        if new_tail <= self._tail_seq:
            return
        drop = new_tail - self._tail_seq
        self._idx_start += drop
        if new_tail <= self._head_seq:
            self._tail_pos = self._idx_pos[self._idx_start]
        else:
            self._tail_pos = self._head_pos
        self._tail_seq = new_tail
        if self._idx_start > 4096 and self._idx_start * 2 > len(self._idx_pos):
            del self._idx_pos[: self._idx_start]
            del self._idx_len[: self._idx_start]
            del self._idx_ts[: self._idx_start]
            self._idx_seq0 += self._idx_start
            self._idx_start = 0
        self._cond.notify_all()

    # -- local volume and consumers ---------------------------------------------------------------
    def set_applied(self, seq: int) -> None:
        """Records up to `seq` are on the local volume and the volume was synced: they may be
        released once every consumer confirmed them."""
        with self._lock:
            seq = min(seq, self._durable_seq)
            if seq > self._applied_seq:
                self._applied_seq = seq
                self._advance_tail_locked()

    def register_consumer(self, name: str, start_seq: int | None = None) -> int:
        """Register a consumer (a remote unit) and return the seq it has confirmed: its saved value
        when it is known, else `start_seq`, else the current head (it needs only what comes next;
        copying the disk as it is now is the replicator's initial sync). Persisted at once."""
        raw = name.encode()
        if not raw or len(raw) > MAX_CONSUMER_NAME:
            raise ValueError(f"consumer name must be 1..{MAX_CONSUMER_NAME} bytes of UTF-8")
        with self._lock:
            self._check_usable()
            if name in self._consumers:
                return self._consumers[name]
            if len(self._consumers) >= MAX_CONSUMERS:
                raise JournalError(f"at most {MAX_CONSUMERS} consumers")
            start = self._head_seq if start_seq is None else start_seq
            if not self._tail_seq - 1 <= start <= self._head_seq:
                raise RecordsGone(f"cannot start consumer {name!r} at seq {start}: journal holds "
                                  f"{self._tail_seq}..{self._head_seq}")
            self._consumers[name] = start
        self.checkpoint()
        log.info("journal consumer registered name=%s confirmed_seq=%d", name, start)
        return start

    def unregister_consumer(self, name: str) -> None:
        with self._lock:
            if self._consumers.pop(name, None) is None:
                return
            self._advance_tail_locked()
        self.checkpoint()
        log.info("journal consumer unregistered name=%s", name)

    def confirm(self, name: str, seq: int) -> None:
        """Consumer `name` holds every record up to `seq` durably; never moves backwards."""
        with self._lock:
            if name not in self._consumers:
                raise KeyError(f"unknown journal consumer {name!r}")
            if seq > self._durable_seq:
                raise ValueError(f"consumer {name!r} confirms seq {seq} beyond durable seq {self._durable_seq}")
            if seq > self._consumers[name]:
                self._consumers[name] = seq
                self._advance_tail_locked()

    def consumers(self) -> dict[str, int]:
        with self._lock:
            return dict(self._consumers)

    def timestamp_of(self, seq: int) -> int | None:
        """The timestamp of a retained record, or None when it is not in the journal."""
        with self._lock:
            if not self._tail_seq <= seq <= self._head_seq:
                return None
            return self._idx_ts[self._idx_start + seq - self._tail_seq]

    # -- reading ----------------------------------------------------------------------------------
    def read_records(self, after_seq: int, max_bytes: int) -> list[JournalRecord]:
        """Durable records with seq > after_seq, in order, taking at most `max_bytes` of journal
        space (header, payload, padding; at least one record when any is available). Every checksum is verified:
        raises JournalCorrupt rather than return damaged data, RecordsGone when `after_seq` is
        behind the tail."""
        with self._lock:
            self._check_open()
            if after_seq < self._tail_seq - 1:
                raise RecordsGone(f"records after {after_seq} were released (tail is {self._tail_seq})")
            first = after_seq + 1
            if first > self._durable_seq:
                return []
            i = self._idx_start + first - self._tail_seq
            spans: list[tuple[int, int, int]] = []  # (pos, length, first seq)
            total = 0
            seq = first
            while seq <= self._durable_seq:
                pos, ln = self._idx_pos[i], self._idx_len[i]
                if spans and total + ln > max_bytes:
                    break
                total += ln
                if spans and spans[-1][0] + spans[-1][1] == pos and (pos % self._ring) != 0:
                    spans[-1] = (spans[-1][0], spans[-1][1] + ln, spans[-1][2])
                else:
                    spans.append((pos, ln, seq))
                i += 1
                seq += 1
        out: list[JournalRecord] = []
        for pos, ln, s0 in spans:
            data = self._ring_read(pos, ln)
            out.extend(self._parse_span(data, pos, s0))
        return out

    def _parse_span(self, data: bytes, pos: int, seq: int) -> Iterator[JournalRecord]:
        at = 0
        while at < len(data):
            h = decode_header(data, at)
            reason = self._valid_header(h, seq, 0, self._incarnation, (pos + at) % self._ring)
            if not reason and h is not None and h.kind == WRAP_KIND:
                reason = "wrap marker inside a span"
            if reason or h is None:
                with self._lock:
                    gone = seq < self._tail_seq
                if gone:
                    raise RecordsGone(f"record {seq} was released while being read")
                raise JournalCorrupt(f"journal record seq={seq} at position {pos + at} is damaged: {reason}",
                                     seq=seq, position=pos + at,
                                     device_offset=RING_OFFSET + (pos + at) % self._ring)
            payload = data[at + HEADER_SIZE: at + HEADER_SIZE + h.payload_len]
            if h.payload_len and crc32c(payload) != h.payload_crc:
                raise JournalCorrupt(f"journal record seq={seq} at position {pos + at}: payload checksum "
                                     "mismatch", seq=seq, position=pos + at,
                                     device_offset=RING_OFFSET + (pos + at) % self._ring)
            yield JournalRecord(seq=seq, kind=RecordKind(h.kind), lba=h.lba, count=h.count,
                                timestamp_ns=h.timestamp_ns, payload=payload)
            at += h.record_len
            seq += 1

    def _check_open(self) -> None:
        if self._closed:
            raise JournalError("journal is closed")

    def add_durable_listener(self, listener: Callable[[], None]) -> None:
        """Call `listener()` each time records become durable, and at close, from the thread that made
        them so, under the journal's lock: it must not block or call the journal (a `Waker.wake`)."""
        with self._lock:
            self._durable_listeners.append(listener)

    def remove_durable_listener(self, listener: Callable[[], None]) -> None:
        with self._lock:
            if listener in self._durable_listeners:
                self._durable_listeners.remove(listener)

    def wait_for_records(self, after_seq: int, timeout: float) -> bool:
        """Block until a durable record with seq > after_seq exists (True) or `timeout` seconds
        pass or the journal closes (False)."""
        with self._cond:
            self._waiters += 1
            try:
                return self._cond.wait_for(lambda: self._durable_seq > after_seq or self._closed, timeout) \
                    and self._durable_seq > after_seq
            finally:
                self._waiters -= 1

    def status(self) -> dict[str, object]:
        with self._lock:
            return {
                "capacity_bytes": self._ring,
                "used_bytes": self._head_pos - self._tail_pos,
                "head_seq": self._head_seq,
                "durable_seq": self._durable_seq,
                "tail_seq": self._tail_seq,
                "applied_seq": self._applied_seq,
                "consumers": dict(self._consumers),
                "checkpoint_generation": self._ckpt_gen,
                "flushes": self._flushes,
            }

    # -- lifecycle --------------------------------------------------------------------------------
    def close(self) -> None:
        """Make queued records durable, write a final checkpoint and close the device."""
        if self._closed:
            return
        try:
            if self._failed is None:
                with contextlib.suppress(JournalError):
                    self.sync()
                    self.checkpoint()
        finally:
            with self._lock:
                self._closed = True
                self._cond.notify_all()
                for listener in self._durable_listeners:
                    listener()
            self._flash.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
