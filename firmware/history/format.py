"""On-disk format of a target's history (sans-IO): record headers, the meta file, scanning.

Nothing here touches a file, a clock or a thread. `docs/HISTORY.md` holds the same tables for
people; keep both in step.

A history is an append-only sequence of records, addressed by a logical byte *position* that
grows from 0 since the history was created (the files holding it are cut into segments, see
`firmware.history.store`). All integers are little-endian.

Record header (`HEADER`, 48 bytes), then the payload:

    0   4  magic b"UHR1"
    4   1  kind: 1 = UNDO (before-image), 2 = POINT (restore point), 3 = RESYNC (resync window marker)
    5   1  flags: for POINT the point kind (1 = flush, 2 = mark); for RESYNC 1 = begin, 2 = end;
           for UNDO 1 = saved by a resync copy (REGION), else 0
    6   2  header length (48)
    8   8  seq: the journal record that overwrote the blocks (UNDO), the point's seq (POINT),
           P or Q of the resync (RESYNC)
    16  8  LBA (UNDO), else 0
    24  4  block count (UNDO), else 0
    28  4  payload length in bytes
    32  8  time: the local unit's timestamp of that journal record (ns since the epoch)
    40  4  CRC32C of the payload
    44  4  CRC32C of bytes 0..44

An UNDO payload is the content of blocks LBA..LBA+count just before the record `seq` changed
them (count * block size bytes). A POINT payload is the mark's name (UTF-8) or empty for a flush.
"""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import google_crc32c

MAGIC = b"UHR1"
HEADER = struct.Struct("<4sBBHQQIIQII")
HEADER_SIZE = HEADER.size
_BODY = HEADER_SIZE - 4
MAX_NAME = 200  # bytes of a mark's name
META_VERSION = 1

assert HEADER_SIZE == 48


class HistoryError(Exception):
    """The history cannot do what was asked (the message says why, for the user)."""


class HistoryCorrupt(HistoryError):
    """A record before the durable end fails its checks."""


class Kind(enum.IntEnum):
    UNDO = 1
    POINT = 2
    RESYNC = 3


class PointKind(enum.IntEnum):
    FLUSH = 1
    MARK = 2


REGION_FLAG = 1
RESYNC_BEGIN = 1
RESYNC_END = 2


def crc32c(data: bytes | bytearray | memoryview) -> int:
    return int(google_crc32c.value(data if isinstance(data, bytes) else bytes(data)))


class Header(NamedTuple):
    kind: Kind
    flags: int
    seq: int
    lba: int
    count: int  # type: ignore[assignment]  # shadows tuple.count: the field is what callers read
    payload_len: int
    time_ns: int
    payload_crc: int

    @property
    def length(self) -> int:
        return HEADER_SIZE + self.payload_len


class Encoded(NamedTuple):
    """One record ready to be written: its header (decoded and as bytes) and its payload, kept
    apart so that a batch is joined once and indexed without parsing it again."""

    header: Header
    head: bytes
    payload: bytes
    name: str = ""  # a POINT's name

    def __bytes__(self) -> bytes:
        return self.head + self.payload


_HEAD_BODY = struct.Struct(HEADER.format[:-1])  # the header without its own checksum
_CRC = struct.Struct("<I")


def encode_record(kind: Kind, *, seq: int, time_ns: int, payload: bytes = b"", lba: int = 0, count: int = 0,
                  flags: int = 0, name: str = "") -> Encoded:
    pcrc = int(google_crc32c.value(payload))
    body = _HEAD_BODY.pack(MAGIC, kind, flags, HEADER_SIZE, seq, lba, count, len(payload), time_ns, pcrc)
    return Encoded(Header(kind, flags, seq, lba, count, len(payload), time_ns, pcrc),
                   body + _CRC.pack(google_crc32c.value(body)), payload, name)


def encode(kind: Kind, *, seq: int, time_ns: int, payload: bytes = b"", lba: int = 0, count: int = 0,
           flags: int = 0) -> bytes:
    """One whole record (header and payload)."""
    return bytes(encode_record(kind, seq=seq, time_ns=time_ns, payload=payload, lba=lba, count=count, flags=flags))


def undo_record(seq: int, time_ns: int, lba: int, data: bytes, block_size: int, *, region: bool = False) -> Encoded:
    if not data or len(data) % block_size:
        raise ValueError(f"a before-image is whole blocks, got {len(data)} bytes")
    return encode_record(Kind.UNDO, seq=seq, time_ns=time_ns, payload=data, lba=lba, count=len(data) // block_size,
                         flags=REGION_FLAG if region else 0)


def point_record(seq: int, time_ns: int, kind: PointKind, name: str = "") -> Encoded:
    raw = name.encode()
    if len(raw) > MAX_NAME:
        raise ValueError(f"a mark's name is at most {MAX_NAME} bytes")
    if kind is PointKind.FLUSH and raw:
        raise ValueError("a flush point has no name")
    return encode_record(Kind.POINT, seq=seq, time_ns=time_ns, payload=raw, flags=int(kind),
                         name=raw.decode(errors="replace"))


def encode_undo(seq: int, time_ns: int, lba: int, data: bytes, block_size: int, *, region: bool = False) -> bytes:
    return bytes(undo_record(seq, time_ns, lba, data, block_size, region=region))


def encode_point(seq: int, time_ns: int, kind: PointKind, name: str = "") -> bytes:
    return bytes(point_record(seq, time_ns, kind, name))


def decode_header(data: bytes | bytearray | memoryview, at: int = 0) -> Header | None:
    """The header at `data[at:]`, or None when there is no intact one there. Never raises."""
    if len(data) - at < HEADER_SIZE:
        return None
    magic, kind, flags, hlen, seq, lba, count, plen, t, pcrc, hcrc = HEADER.unpack_from(data, at)
    if magic != MAGIC or hlen != HEADER_SIZE or kind not in (1, 2, 3):
        return None
    if hcrc != crc32c(bytes(data[at:at + _BODY])):
        return None
    k = Kind(kind)
    if k is Kind.UNDO and (count == 0 or plen == 0 or plen % count):
        return None
    if k is Kind.POINT and (flags not in (1, 2) or plen > MAX_NAME):
        return None
    if k is Kind.RESYNC and (flags not in (1, 2) or plen):
        return None
    return Header(k, flags, seq, lba, count, plen, t, pcrc)


@dataclass
class Meta:
    """`meta.json` of a history: what the records do not say, rewritten atomically.

    `tail_pos` is the position of the oldest record kept; `base_seq` / `base_time_ns` the oldest
    image that can be restored (the image after record `base_seq`); `head_pos` is not stored (the
    scan finds it)."""

    block_size: int
    num_blocks: int
    volume_uuid: str
    generation: int
    target: str
    tail_pos: int = 0
    base_seq: int = 0
    base_time_ns: int = 0
    created_ns: int = 0
    size_cap: int = 0  # the retention the writer runs with (readers report it); 0 = not known
    age_s: float = 0.0
    version: int = META_VERSION

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Meta:
        try:
            obj: Any = json.loads(raw)
            if not isinstance(obj, dict) or obj.get("version") != META_VERSION:
                raise HistoryCorrupt(f"history meta: unsupported version {obj.get('version')!r}"
                                     if isinstance(obj, dict) else "history meta: not an object")
            fields = {k: obj[k] for k in cls.__dataclass_fields__ if k in obj}
            return cls(**fields)
        except (ValueError, TypeError) as exc:
            raise HistoryCorrupt(f"history meta: {exc}") from None


@dataclass(frozen=True, slots=True)
class Scanned:
    pos: int
    header: Header
    name: str  # a POINT's name ("" for flushes and other kinds)


def scan(data: bytes | bytearray | memoryview, pos: int, *, verify: bool) -> tuple[list[Scanned], int]:
    """Parse consecutive records of `data` (starting at logical position `pos`).

    Returns the records and the number of bytes they occupy; stops at the first torn or damaged
    record (or the end of `data`). With `verify`, payload checksums are checked too (else only the
    headers, and payload lengths against the data present)."""
    out: list[Scanned] = []
    at = 0
    mv = memoryview(data)
    while True:
        h = decode_header(mv, at)
        if h is None or at + h.length > len(mv):
            break
        payload = mv[at + HEADER_SIZE: at + h.length]
        if (verify or h.kind is Kind.POINT) and crc32c(payload) != h.payload_crc:
            break
        name = bytes(payload).decode(errors="replace") if h.kind is Kind.POINT else ""
        out.append(Scanned(pos + at, h, name))
        at += h.length
    return out, at
