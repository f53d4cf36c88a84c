"""On-flash format of the write journal: superblock, checkpoint slots and records (sans-IO).

Everything here turns values into bytes and bytes into values; nothing touches a file, a clock or
a thread. `docs/JOURNAL.md` holds the same offset tables for people; keep both in step.

Layout of the journal device (file or partition), all integers little-endian:

    offset      size   what
    0           4096   superblock (primary)
    4096        4096   checkpoint slot 0
    8192        4096   checkpoint slot 1
    12288       4096   superblock (backup copy, identical)
    16384       ring   records, wrapping at the end of the ring

Superblock (`SUPERBLOCK`, 80 bytes used, rest of the 4 KiB zero):

    0   8  magic  b"USBMJRNL"
    8   2  version (1)
    10  2  record header length (64)
    12  4  host logical block size (512 or 4096)
    16  16 unit UUID (bytes)
    32  8  device size in bytes
    40  8  ring offset (16384)
    48  8  ring size in bytes (a multiple of 4096)
    56  4  record alignment (512)
    60  4  format epoch (random; records of an earlier format of the same device are ignored)
    64  8  creation time (ns since the epoch)
    72  4  max batch bytes (largest run written before one fdatasync; bounds the recovery look-ahead)
    76  4  CRC32C of bytes 0..76

Checkpoint slot (4096 bytes; the valid slot with the highest generation wins):

    0   4  magic  b"JCKP"
    4   2  version (1)
    6   2  number of consumers (<= MAX_CONSUMERS)
    8   8  generation (increments by one per checkpoint written)
    16  8  tail seq: first retained record (head seq + 1 when the ring is empty)
    24  8  tail position (logical byte position, see below)
    32  8  head seq: last record durable when the checkpoint was written
    40  8  head position (position just after that record)
    48  8  applied seq: records up to here are on the local volume and the volume was synced
    56  8  written at (ns since the epoch)
    64  4  format epoch (must equal the superblock's)
    68  4  incarnation: how many times the journal was opened (records carry it)
    72  .. consumers, each: 1 byte name length, name (UTF-8, <= 64 bytes), 8 bytes confirmed seq
    4092 4 CRC32C of bytes 0..4092

Record (`RECORD_HEADER`, 64 bytes, then the payload, then zero padding to the alignment):

    0   4  magic  b"UJR1"
    4   1  kind (RecordKind: 1 WRITE, 2 UNMAP, 3 FLUSH, 4 MARK; or WRAP_KIND for the wrap marker)
    5   1  flags (0)
    6   2  header length (64)
    8   4  format epoch
    12  4  incarnation
    16  8  seq
    24  8  durable before: the journal's durable seq when this record was written to flash
    32  8  LBA
    40  4  block count
    44  4  payload length in bytes
    48  8  timestamp (ns since the epoch)
    56  4  CRC32C of the payload
    60  4  CRC32C of bytes 0..60

Positions: a record's *position* is a monotonically increasing byte count since the journal was
formatted; its offset in the ring is `position % ring_size`. A record never straddles the ring end:
when it does not fit, a wrap marker (a bare header, kind WRAP_KIND, carrying the seq the next
record will have) is written at the current offset and the record starts at ring offset 0.
"""

from __future__ import annotations

import enum
import struct
import uuid
from dataclasses import dataclass
from typing import Protocol

import google_crc32c

SUPERBLOCK_MAGIC = b"USBMJRNL"
CHECKPOINT_MAGIC = b"JCKP"
RECORD_MAGIC = b"UJR1"
VERSION = 1

SUPERBLOCK_OFFSET = 0
CHECKPOINT_OFFSETS = (4096, 8192)
SUPERBLOCK_BACKUP_OFFSET = 12288
SLOT_SIZE = 4096
RING_OFFSET = 16384
RING_GRANULE = 4096  # ring size is a multiple of this
ALIGN = 512  # record alignment: a sector, the unit a power cut may tear
MIN_RING = 64 * 1024
DEFAULT_MAX_BATCH = 8 << 20
MAX_CONSUMERS = 32
MAX_CONSUMER_NAME = 64
WRAP_KIND = 0xFF

SUPERBLOCK = struct.Struct("<8sHHI16sQQQIIQI")  # + CRC
SUPERBLOCK_CRC = struct.Struct("<I")
CHECKPOINT_HEAD = struct.Struct("<4sHHQQQQQQQII")
CONSUMER_ENTRY_TAIL = struct.Struct("<Q")
CRC = struct.Struct("<I")
RECORD_HEADER = struct.Struct("<4sBBHIIQQQIIQII")
HEADER_SIZE = RECORD_HEADER.size
HEADER_BODY = HEADER_SIZE - 4  # bytes covered by the header checksum
_HEADER_BODY = HEADER_BODY
_CKPT_CRC_AT = SLOT_SIZE - 4

assert SUPERBLOCK.size + 4 == 80
assert CHECKPOINT_HEAD.size == 72
assert HEADER_SIZE == 64


def crc32c(data: bytes | bytearray | memoryview) -> int:
    """CRC32C (Castagnoli) as used for every checksum in the journal."""
    return int(google_crc32c.value(bytes(data) if isinstance(data, memoryview) else data))


class RecordKind(enum.IntEnum):
    """What a journal record asks a mirror to do."""

    WRITE = 1  # payload = count blocks of data at lba
    UNMAP = 2  # blocks lba..lba+count read back as zeros; no payload
    FLUSH = 3  # consistency point: the host sent SYNCHRONIZE CACHE or a FUA write; no payload
    MARK = 4  # a named restore point (`usbmirror mark`): payload = the name (UTF-8), lba = count = 0


MAX_MARK_NAME = 200  # bytes of a mark's name


class JournalError(Exception):
    """The journal cannot do what was asked (bad geometry, wrong unit, closed, I/O failure)."""


class JournalFull(JournalError):
    """No room in the ring for this record until the tail advances."""


class RecordsGone(JournalError):
    """The records asked for were already released (behind the tail)."""


class JournalCorrupt(JournalError):
    """A checksum or structure check failed on data the journal must not lose.

    `position` is the record's logical position (ring offset = position % ring size, device
    offset = ring offset + 16384); `seq` the sequence number expected there.
    """

    def __init__(self, message: str, *, seq: int | None = None, position: int | None = None,
                 device_offset: int | None = None) -> None:
        super().__init__(message)
        self.seq = seq
        self.position = position
        self.device_offset = device_offset


class RecordLike(Protocol):
    """A record's fields as every layer reads them (the journal's, the link's, the history's)."""

    @property
    def seq(self) -> int: ...
    @property
    def kind(self) -> int: ...
    @property
    def lba(self) -> int: ...
    @property
    def count(self) -> int: ...
    @property
    def timestamp_ns(self) -> int: ...
    @property
    def payload(self) -> bytes: ...


@dataclass(frozen=True, slots=True)
class JournalRecord:
    """One host operation as kept in the journal and shipped to remote units."""

    seq: int
    kind: RecordKind
    lba: int
    count: int
    timestamp_ns: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class Superblock:
    block_size: int
    unit_uuid: uuid.UUID
    device_size: int
    ring_size: int
    epoch: int
    created_ns: int
    max_batch: int = DEFAULT_MAX_BATCH
    ring_offset: int = RING_OFFSET
    align: int = ALIGN
    version: int = VERSION

    def encode(self) -> bytes:
        body = SUPERBLOCK.pack(SUPERBLOCK_MAGIC, self.version, HEADER_SIZE, self.block_size,
                               self.unit_uuid.bytes, self.device_size, self.ring_offset, self.ring_size,
                               self.align, self.epoch, self.created_ns, self.max_batch)
        return (body + SUPERBLOCK_CRC.pack(crc32c(body))).ljust(SLOT_SIZE, b"\0")

    @classmethod
    def decode(cls, data: bytes) -> Superblock:
        """Parse a superblock or raise JournalCorrupt saying what is wrong."""
        if len(data) < SUPERBLOCK.size + 4:
            raise JournalCorrupt("superblock: short read")
        body = data[: SUPERBLOCK.size]
        (magic, version, hlen, bs, ub, dev, ring_off, ring_size, align, epoch, created,
         max_batch) = SUPERBLOCK.unpack(body)
        if magic != SUPERBLOCK_MAGIC:
            raise JournalCorrupt("superblock: no journal magic (not a usbmirror journal)")
        (crc,) = SUPERBLOCK_CRC.unpack_from(data, SUPERBLOCK.size)
        if crc != crc32c(body):
            raise JournalCorrupt("superblock: checksum mismatch")
        if version != VERSION or hlen != HEADER_SIZE:
            raise JournalCorrupt(f"superblock: unsupported version {version} (header length {hlen})")
        if (ring_off != RING_OFFSET or align != ALIGN or ring_size % RING_GRANULE or ring_size < MIN_RING
                or ring_off + ring_size > dev or bs not in (512, 4096) or max_batch < ALIGN):
            raise JournalCorrupt("superblock: inconsistent geometry")
        return cls(block_size=bs, unit_uuid=uuid.UUID(bytes=ub), device_size=dev, ring_size=ring_size,
                   epoch=epoch, created_ns=created, max_batch=max_batch, ring_offset=ring_off,
                   align=align, version=version)


@dataclass(frozen=True, slots=True)
class Checkpoint:
    generation: int
    tail_seq: int
    tail_pos: int
    head_seq: int
    head_pos: int
    applied_seq: int
    written_ns: int
    epoch: int
    incarnation: int
    consumers: tuple[tuple[str, int], ...] = ()

    def encode(self) -> bytes:
        if len(self.consumers) > MAX_CONSUMERS:
            raise JournalError(f"at most {MAX_CONSUMERS} consumers")
        buf = bytearray(SLOT_SIZE)
        CHECKPOINT_HEAD.pack_into(buf, 0, CHECKPOINT_MAGIC, VERSION, len(self.consumers), self.generation,
                                  self.tail_seq, self.tail_pos, self.head_seq, self.head_pos,
                                  self.applied_seq, self.written_ns, self.epoch, self.incarnation)
        at = CHECKPOINT_HEAD.size
        for name, seq in self.consumers:
            raw = name.encode()
            buf[at] = len(raw)
            buf[at + 1: at + 1 + len(raw)] = raw
            CONSUMER_ENTRY_TAIL.pack_into(buf, at + 1 + len(raw), seq)
            at += 1 + len(raw) + 8
        CRC.pack_into(buf, _CKPT_CRC_AT, crc32c(bytes(buf[:_CKPT_CRC_AT])))
        return bytes(buf)

    @classmethod
    def decode(cls, data: bytes) -> Checkpoint:
        """Parse a checkpoint slot or raise JournalCorrupt."""
        if len(data) != SLOT_SIZE:
            raise JournalCorrupt("checkpoint: short read")
        (magic, version, n, gen, tail_seq, tail_pos, head_seq, head_pos, applied, written, epoch,
         inc) = CHECKPOINT_HEAD.unpack_from(data, 0)
        if magic != CHECKPOINT_MAGIC:
            raise JournalCorrupt("checkpoint: no magic")
        (crc,) = CRC.unpack_from(data, _CKPT_CRC_AT)
        if crc != crc32c(data[:_CKPT_CRC_AT]):
            raise JournalCorrupt("checkpoint: checksum mismatch")
        if version != VERSION or n > MAX_CONSUMERS or tail_seq < 1 or head_seq + 1 < tail_seq:
            raise JournalCorrupt("checkpoint: inconsistent fields")
        consumers = []
        at = CHECKPOINT_HEAD.size
        for _ in range(n):
            ln = data[at]
            if ln > MAX_CONSUMER_NAME or at + 1 + ln + 8 > _CKPT_CRC_AT:
                raise JournalCorrupt("checkpoint: bad consumer entry")
            name = data[at + 1: at + 1 + ln].decode(errors="replace")
            (seq,) = CONSUMER_ENTRY_TAIL.unpack_from(data, at + 1 + ln)
            consumers.append((name, seq))
            at += 1 + ln + 8
        return cls(generation=gen, tail_seq=tail_seq, tail_pos=tail_pos, head_seq=head_seq,
                   head_pos=head_pos, applied_seq=applied, written_ns=written, epoch=epoch,
                   incarnation=inc, consumers=tuple(consumers))


@dataclass(frozen=True, slots=True)
class RecordHeader:
    kind: int
    epoch: int
    incarnation: int
    seq: int
    durable_before: int
    lba: int
    count: int
    payload_len: int
    timestamp_ns: int
    payload_crc: int

    @property
    def record_len(self) -> int:
        return record_length(self.payload_len)


def record_length(payload_len: int) -> int:
    """Bytes a record with this payload occupies in the ring (header + payload, aligned)."""
    n = HEADER_SIZE + payload_len
    return (n + ALIGN - 1) // ALIGN * ALIGN


def new_record_buffer(payload: bytes | bytearray | memoryview) -> bytearray:
    """A buffer holding room for the header, the payload and padding: the caller seals it later
    with `seal_header` once the fields known only at write time (durable before) are set."""
    n = len(payload)
    buf = bytearray(record_length(n))
    buf[HEADER_SIZE: HEADER_SIZE + n] = payload
    return buf


def seal_header(buf: bytearray, *, kind: int, epoch: int, incarnation: int, seq: int, durable_before: int,
                lba: int, count: int, payload_len: int, timestamp_ns: int, payload_crc: int) -> None:
    """Write a record header into the first 64 bytes of `buf`, header checksum included."""
    RECORD_HEADER.pack_into(buf, 0, RECORD_MAGIC, kind, 0, HEADER_SIZE, epoch, incarnation, seq,
                            durable_before, lba, count, payload_len, timestamp_ns, payload_crc, 0)
    with memoryview(buf) as view:  # one copy of the header body for the checksum, not two
        CRC.pack_into(buf, _HEADER_BODY, google_crc32c.value(bytes(view[:_HEADER_BODY])))


def encode_record(*, kind: int, epoch: int, incarnation: int, seq: int, durable_before: int, lba: int,
                  count: int, timestamp_ns: int, payload: bytes) -> bytes:
    """A whole record as it lies in the ring (used by tests and tools)."""
    buf = new_record_buffer(payload)
    seal_header(buf, kind=kind, epoch=epoch, incarnation=incarnation, seq=seq, durable_before=durable_before,
                lba=lba, count=count, payload_len=len(payload), timestamp_ns=timestamp_ns,
                payload_crc=crc32c(payload))
    return bytes(buf)


def decode_header(data: bytes | bytearray | memoryview, at: int = 0) -> RecordHeader | None:
    """The record header at `data[at:]`, or None when there is no intact header there (wrong magic,
    checksum mismatch, impossible fields). Never raises for any input of >= 64 bytes."""
    if len(data) - at < HEADER_SIZE:
        return None
    (magic, kind, flags, hlen, epoch, inc, seq, dbefore, lba, count, plen, ts, pcrc,
     hcrc) = RECORD_HEADER.unpack_from(data, at)
    if magic != RECORD_MAGIC or hlen != HEADER_SIZE or flags != 0:
        return None
    if hcrc != google_crc32c.value(bytes(data[at: at + _HEADER_BODY])):
        return None
    if kind not in (1, 2, 3, 4, WRAP_KIND):
        return None
    return RecordHeader(kind=kind, epoch=epoch, incarnation=inc, seq=seq, durable_before=dbefore, lba=lba,
                        count=count, payload_len=plen, timestamp_ns=ts, payload_crc=pcrc)
