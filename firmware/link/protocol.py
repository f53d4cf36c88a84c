"""The journey protocol, sans-IO: frames and the state machine of one link connection.

A local unit (the *source*) ships its journal to a remote unit over one TCP (TLS) connection. This
module turns events into bytes and bytes into events and checks that each side speaks in turn; it
opens no socket, reads no clock and starts no thread. `docs/JOURNEY.md` is the reference, with the
offset tables of every frame.

Frame (all integers big-endian)::

    offset size  field
    0      2     magic b"UJ"
    2      1     protocol version (1)
    3      1     frame type (FrameType)
    4      4     payload length L (bounded by the connection's max_payload)
    8      L     payload (per frame type)
    8+L    4     CRC32C (Castagnoli) of bytes 0 .. 8+L

What it does not do: apply records, read the volume, decide when to resync. Those belong to
`firmware.remote_unit` and `firmware.replicator`.
"""

from __future__ import annotations

import enum
import hashlib
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TypeAlias

import google_crc32c
import lz4.block

from firmware.journal.format import MAX_MARK_NAME
from firmware.journal.format import RecordKind as RecordKind  # one definition: the journal's
from firmware.journal.format import RecordLike as RecordLike

MAGIC = b"UJ"
VERSION = 1
DEFAULT_MAX_PAYLOAD = 32 << 20  # bytes; a batch or a region never exceeds this
MAX_ID_LEN = 64
MAX_MESSAGE_LEN = 1024
MAX_RECORDS_PER_BATCH = 1 << 16
MAX_DIGESTS_PER_FRAME = 1 << 14
DIGEST_SIZE = 16  # BLAKE2b-128 of one region
MAX_REGION_BLOCKS = 1 << 20

_HEADER = struct.Struct(">2sBBI")
_CRC = struct.Struct(">I")
_HELLO = struct.Struct(">HH16sQIQQIBB")
_HELLO_REPLY = struct.Struct(">16sQQIBB")
_BATCH = struct.Struct(">QIIB")
_RECORD = struct.Struct(">QBQIQI")
RECORD_HEADER_SIZE = _RECORD.size  # bytes each record adds to a BATCH body besides its payload
_U64 = struct.Struct(">Q")
_ERROR = struct.Struct(">HH")
_RESYNC_BEGIN = struct.Struct(">QIQ")
_DIGEST_REQ = struct.Struct(">QII")
_REGION_DATA = struct.Struct(">QIBI")
_GENERATIONS = struct.Struct(">BQB")  # flags, dirty bytes, number of generations
_GENERATION = struct.Struct(">QQQQ")  # id, counter, started_ns, fork_seq
_REGION_READ = struct.Struct(">QI")  # lba, block count
_DIRTY_REGIONS = struct.Struct(">BIQQIH")  # flags, region blocks, regions, first region, bitmap bytes, reason bytes
MAX_DIRTY_BITMAP_BYTES = 1 << 20  # one DIRTY_REGIONS frame covers at most 8 Mi regions
MAX_READ_BLOCKS = 1 << 16
MAX_GENERATIONS = 32


def region_digest(data: bytes) -> bytes:
    """What REGION_DIGESTS carries for one region: both ends compare with it."""
    return hashlib.blake2b(data, digest_size=DIGEST_SIZE).digest()


class FrameType(enum.IntEnum):
    HELLO = 1
    HELLO_REPLY = 2
    BATCH = 3
    ACK = 4
    HEARTBEAT = 5
    ERROR = 6
    RESYNC_BEGIN = 7
    DIGEST_REQUEST = 8
    REGION_DIGESTS = 9
    REGION_DATA = 10
    RESYNC_END = 11
    GENERATIONS = 12
    REGION_READ = 13
    DIRTY_REQUEST = 14
    DIRTY_REGIONS = 15


class ErrorCode(enum.IntEnum):
    """Codes carried by ERROR frames; a source retries on the transient ones."""

    BAD_FRAME = 1  # corrupt, truncated, oversized or out-of-turn frame
    VERSION = 2  # no common protocol version
    UNKNOWN_SOURCE = 3  # this remote has no target for the source id
    PERMISSION_DENIED = 4  # the certificate is not the source id's
    TARGET_FULL = 5  # ENOSPC on the target (transient: retry when freed)
    TARGET_IO = 6  # the target failed a read/write/sync (transient)
    VOLUME_MISMATCH = 7  # the target is smaller than the volume or has another block size
    SEQUENCE = 8  # a batch does not follow the remote's applied position
    BUSY = 9  # another connection already replicates this source
    INTERNAL = 10
    PRIMARY = 11  # this remote's copy was promoted: it is primary now and takes no writes from the source


TRANSIENT_ERRORS = frozenset({ErrorCode.TARGET_FULL, ErrorCode.TARGET_IO, ErrorCode.BUSY, ErrorCode.INTERNAL})


class Feature(enum.IntFlag):
    NONE = 0
    LZ4 = 1
    GENERATIONS = 2  # the source speaks GENERATIONS frames (docs/FAILOVER.md)
    DIRTY_MAP = 4  # a failback's FETCH: the remote sends the regions it wrote (DIRTY_REQUEST / DIRTY_REGIONS)


_KNOWN_FEATURES = int(Feature.LZ4 | Feature.GENERATIONS | Feature.DIRTY_MAP)
_REPLY_FEATURES = int(Feature.LZ4 | Feature.DIRTY_MAP)  # what a HELLO_REPLY may accept


class Purpose(enum.IntEnum):
    REPLICATE = 1  # the one connection per source that applies records
    VERIFY = 2  # read-only: region digests for `usbmirror verify`
    FETCH = 3  # failback: a replica pulls blocks from a promoted remote that hands the source back


class ReplyFlag(enum.IntFlag):
    NONE = 0
    RESYNC_IN_PROGRESS = 1  # the target is mid-resync: only a completed resync makes it consistent
    NEW_TARGET = 2  # no state for this volume yet: the target's content is unknown


class ProtocolError(Exception):
    """The peer sent something this protocol does not allow; the connection is closed."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.BAD_FRAME) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class Record:
    """A journal record as it crosses the link (same fields as `firmware.journal.JournalRecord`)."""

    seq: int
    kind: RecordKind
    lba: int
    count: int
    timestamp_ns: int
    payload: bytes = b""


# -- events -------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Hello:
    source_id: str
    volume_uuid: bytes  # 16 bytes
    volume_size: int  # bytes
    block_size: int
    generation: int  # bumps when the source's journal restarts from scratch
    resume_seq: int  # the source's last acknowledged position for this remote (advisory)
    features: Feature = Feature.LZ4
    purpose: Purpose = Purpose.REPLICATE
    min_version: int = VERSION
    max_version: int = VERSION


@dataclass(frozen=True, slots=True)
class HelloReply:
    remote_name: str
    volume_uuid: bytes  # the volume the target holds (zeros for a new target)
    applied_seq: int  # durable applied position: the source resumes after it
    generation: int
    features: Feature
    flags: ReplyFlag = ReplyFlag.NONE


@dataclass(frozen=True, slots=True)
class Batch:
    prev_seq: int  # the records follow this position (the previous batch's last seq)
    records: tuple[Record, ...]


@dataclass(frozen=True, slots=True)
class Ack:
    seq: int  # cumulative: every record up to seq is applied and durable


@dataclass(frozen=True, slots=True)
class Heartbeat:
    token: int  # echoed by the remote


@dataclass(frozen=True, slots=True)
class Error:
    code: ErrorCode
    message: str


@dataclass(frozen=True, slots=True)
class ResyncBegin:
    position: int  # P: journal position recorded before copying
    region_blocks: int
    total_regions: int


@dataclass(frozen=True, slots=True)
class DigestRequest:
    first_region: int
    count: int
    region_blocks: int


@dataclass(frozen=True, slots=True)
class RegionDigests:
    first_region: int
    region_blocks: int
    digests: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class RegionData:
    lba: int
    data: bytes


@dataclass(frozen=True, slots=True)
class ResyncEnd:
    position: int  # Q: journal position when the copy finished


class GenerationsFlag(enum.IntFlag):
    NONE = 0
    PRIMARY = 1  # the sender's copy is primary for the source
    DIRTY = 2  # the sender wrote since the two sides last agreed
    HANDOVER = 4  # a promoted remote stopped serving and hands the source back (`usbmirror failback`)


@dataclass(frozen=True, slots=True)
class RegionRead:
    """Failback (a FETCH connection): ask the promoted remote for blocks; it answers REGION_DATA."""

    lba: int
    count: int


@dataclass(frozen=True, slots=True)
class DirtyRequest:
    """Failback (a FETCH connection that negotiated Feature.DIRTY_MAP): ask the promoted remote for
    the regions written on its copy since the two sides last agreed; it answers DIRTY_REGIONS."""


class DirtyFlag(enum.IntFlag):
    NONE = 0
    TRUSTED = 1  # the bitmap holds every region written since the two sides last agreed
    LAST = 2  # the last frame of the answer


@dataclass(frozen=True, slots=True)
class DirtyRegions:
    """One part of the answer to DIRTY_REQUEST: bit i of byte k of `bits` is region first_region + 8k + i
    (regions of `region_blocks` blocks, `total_regions` in the volume). Without TRUSTED the remote's
    record of its writes is lost or damaged and `reason` says why (the source then compares every
    region)."""

    flags: DirtyFlag
    region_blocks: int
    total_regions: int
    first_region: int
    bits: bytes
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Generations:
    """A side's data generations for the source, oldest first, each (id, counter, started_ns,
    fork_seq); sent by the source after HELLO when it offers Feature.GENERATIONS, and by a promoted
    remote before the ERROR PRIMARY that refuses the source."""

    generations: tuple[tuple[int, int, int, int], ...]
    flags: GenerationsFlag = GenerationsFlag.NONE
    dirty_bytes: int = 0


Event: TypeAlias = (
    Hello | HelloReply | Batch | Ack | Heartbeat | Error | ResyncBegin | DigestRequest | RegionDigests
    | RegionData | ResyncEnd | Generations | RegionRead | DirtyRequest | DirtyRegions
)


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()
NeedData = _NeedData  # the type of NEED_DATA


class Role(enum.IntEnum):
    SOURCE = 1
    REMOTE = 2


class ConnState(enum.IntEnum):
    AWAIT_HELLO = 1  # remote: before the source's HELLO; source: before sending it
    AWAIT_REPLY = 2  # HELLO sent/received, no reply yet
    OPEN = 3
    CLOSED = 4


_EVENT_TYPE: dict[type, FrameType] = {
    Hello: FrameType.HELLO,
    HelloReply: FrameType.HELLO_REPLY,
    Batch: FrameType.BATCH,
    Ack: FrameType.ACK,
    Heartbeat: FrameType.HEARTBEAT,
    Error: FrameType.ERROR,
    ResyncBegin: FrameType.RESYNC_BEGIN,
    DigestRequest: FrameType.DIGEST_REQUEST,
    RegionDigests: FrameType.REGION_DIGESTS,
    RegionData: FrameType.REGION_DATA,
    ResyncEnd: FrameType.RESYNC_END,
    Generations: FrameType.GENERATIONS,
    RegionRead: FrameType.REGION_READ,
    DirtyRequest: FrameType.DIRTY_REQUEST,
    DirtyRegions: FrameType.DIRTY_REGIONS,
}

_SOURCE_SENDS = frozenset(
    {FrameType.HELLO, FrameType.BATCH, FrameType.HEARTBEAT, FrameType.ERROR, FrameType.RESYNC_BEGIN,
     FrameType.DIGEST_REQUEST, FrameType.REGION_DATA, FrameType.RESYNC_END, FrameType.REGION_READ,
     FrameType.DIRTY_REQUEST}
)
_REMOTE_SENDS = frozenset(
    {FrameType.HELLO_REPLY, FrameType.ACK, FrameType.HEARTBEAT, FrameType.ERROR, FrameType.REGION_DIGESTS,
     FrameType.REGION_DATA, FrameType.DIRTY_REGIONS}  # REGION_DATA / DIRTY_REGIONS: a failback's answers
)

# Everything that changes the connection state lives in this table:
# (state, sender role, frame type) -> next state. Anything absent is a ProtocolError.
_TRANSITIONS: dict[tuple[ConnState, Role, FrameType], ConnState] = {
    (ConnState.AWAIT_HELLO, Role.SOURCE, FrameType.HELLO): ConnState.AWAIT_REPLY,
    (ConnState.AWAIT_HELLO, Role.SOURCE, FrameType.ERROR): ConnState.CLOSED,
    (ConnState.AWAIT_HELLO, Role.REMOTE, FrameType.ERROR): ConnState.CLOSED,
    (ConnState.AWAIT_REPLY, Role.REMOTE, FrameType.HELLO_REPLY): ConnState.OPEN,
    (ConnState.AWAIT_REPLY, Role.REMOTE, FrameType.ERROR): ConnState.CLOSED,
    (ConnState.AWAIT_REPLY, Role.SOURCE, FrameType.ERROR): ConnState.CLOSED,
    # GENERATIONS: the source's right after its HELLO (the remote may have answered already), a
    # promoted remote's just before the ERROR that refuses the source
    (ConnState.AWAIT_REPLY, Role.SOURCE, FrameType.GENERATIONS): ConnState.AWAIT_REPLY,
    (ConnState.OPEN, Role.SOURCE, FrameType.GENERATIONS): ConnState.OPEN,
    (ConnState.AWAIT_REPLY, Role.REMOTE, FrameType.GENERATIONS): ConnState.AWAIT_REPLY,
}
for _ft in _SOURCE_SENDS - {FrameType.HELLO, FrameType.ERROR}:
    _TRANSITIONS[(ConnState.OPEN, Role.SOURCE, _ft)] = ConnState.OPEN
for _ft in _REMOTE_SENDS - {FrameType.HELLO_REPLY, FrameType.ERROR}:
    _TRANSITIONS[(ConnState.OPEN, Role.REMOTE, _ft)] = ConnState.OPEN
_TRANSITIONS[(ConnState.OPEN, Role.SOURCE, FrameType.ERROR)] = ConnState.CLOSED
_TRANSITIONS[(ConnState.OPEN, Role.REMOTE, FrameType.ERROR)] = ConnState.CLOSED


def _crc(data: bytes | memoryview) -> int:
    return int(google_crc32c.value(bytes(data)))


def _compress(raw: bytes) -> bytes | None:
    """lz4 block compression, kept only when it saves at least 1/16 of the bytes."""
    if len(raw) < 512:
        return None
    # a cheap probe on a sample avoids spending CPU on data that will not shrink
    if len(raw) > 64 << 10:
        probe = raw[: 16 << 10]
        if len(lz4.block.compress(probe, store_size=False)) > len(probe) * 15 // 16:
            return None
    out: bytes = lz4.block.compress(raw, store_size=False)
    if len(out) > len(raw) * 15 // 16:
        return None
    return out


def _decompress(body: bytes, raw_len: int) -> bytes:
    try:
        out: bytes = lz4.block.decompress(body, uncompressed_size=raw_len)
    except Exception as exc:  # lz4 raises LZ4BlockError, a plain Exception subclass
        raise ProtocolError(f"lz4 body does not decompress: {exc}") from None
    if len(out) != raw_len:
        raise ProtocolError(f"lz4 body gives {len(out)} bytes, header says {raw_len}")
    return out


def encode_records(records: Iterable[RecordLike]) -> bytes:
    parts: list[bytes] = []
    for r in records:
        payload = bytes(r.payload)
        parts.append(_RECORD.pack(r.seq, int(r.kind), r.lba, r.count, r.timestamp_ns, len(payload)))
        parts.append(payload)
    return b"".join(parts)


def decode_records(raw: bytes, n: int, prev_seq: int) -> tuple[Record, ...]:
    out: list[Record] = []
    off = 0
    last = prev_seq
    mv = memoryview(raw)
    for _ in range(n):
        if off + _RECORD.size > len(raw):
            raise ProtocolError("batch body truncated inside a record header")
        seq, kind, lba, count, ts, plen = _RECORD.unpack_from(raw, off)
        off += _RECORD.size
        if off + plen > len(raw):
            raise ProtocolError(f"record seq={seq} payload runs past the batch body")
        if seq <= last:
            raise ProtocolError(f"record seq={seq} does not follow seq={last}")
        try:
            rkind = RecordKind(kind)
        except ValueError:
            raise ProtocolError(f"record seq={seq} has unknown kind {kind}") from None
        if rkind is RecordKind.WRITE and (count == 0 or plen % count):
            raise ProtocolError(f"write record seq={seq}: {plen} bytes for {count} blocks")
        if rkind is RecordKind.MARK:
            if count or lba or not 0 < plen <= MAX_MARK_NAME:
                raise ProtocolError(f"MARK record seq={seq}: blocks {lba}+{count}, name of {plen} bytes")
        elif rkind is not RecordKind.WRITE and plen:
            raise ProtocolError(f"{rkind.name} record seq={seq} carries a payload")
        out.append(Record(seq, rkind, lba, count, ts, bytes(mv[off : off + plen])))
        off += plen
        last = seq
    if off != len(raw):
        raise ProtocolError(f"batch body has {len(raw) - off} bytes after its {n} records")
    return tuple(out)


def _text(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(f"{what} is not UTF-8") from None


def _need(payload: bytes, size: int, what: str, exact: bool = True) -> None:
    if (len(payload) != size) if exact else (len(payload) < size):
        raise ProtocolError(f"{what} payload has {len(payload)} bytes, expected {size}")


@dataclass
class JourneyConnection:
    """One end of a journey link. Feed received bytes with `receive_data()`, pull events with
    `next_event()` until it returns NEED_DATA; turn events into bytes with `send()`.

    Invalid input raises ProtocolError (with an ErrorCode for the ERROR frame to send back) and
    leaves the connection CLOSED; every length is checked against `max_payload` before any buffering
    beyond one header.
    """

    role: Role
    max_payload: int = DEFAULT_MAX_PAYLOAD
    offer_features: Feature = Feature.LZ4
    state: ConnState = ConnState.AWAIT_HELLO
    features: Feature = Feature.NONE  # negotiated: what both ends accept
    bytes_in: int = 0
    bytes_out: int = 0
    _buf: bytearray = field(default_factory=bytearray)

    @property
    def peer(self) -> Role:
        return Role.REMOTE if self.role is Role.SOURCE else Role.SOURCE

    # -- state ---------------------------------------------------------------------------------
    def _advance(self, sender: Role, ftype: FrameType) -> None:
        nxt = _TRANSITIONS.get((self.state, sender, ftype))
        if nxt is None:
            closed = self.state is ConnState.CLOSED
            self.state = ConnState.CLOSED
            raise ProtocolError(
                f"{ftype.name} from {sender.name.lower()} not allowed in state "
                f"{'CLOSED' if closed else 'connection'}",
            )
        self.state = nxt

    # -- sending -------------------------------------------------------------------------------
    def send(self, event: Event) -> bytes:
        ftype = _EVENT_TYPE[type(event)]
        if ftype is FrameType.HELLO and isinstance(event, Hello):
            self.offer_features = event.features
        payload = self._encode(event)
        if len(payload) > self.max_payload:
            raise ValueError(f"{ftype.name} payload of {len(payload)} bytes exceeds {self.max_payload}")
        before = self.state
        if ftype is FrameType.ERROR:
            self.state = ConnState.CLOSED  # an ERROR may always be sent, even after a protocol error
        else:
            try:
                self._advance(self.role, ftype)
            except ProtocolError as exc:
                self.state = before
                raise ValueError(f"cannot send: {exc}") from None
        if isinstance(event, HelloReply):
            self.features = event.features
        header = _HEADER.pack(MAGIC, VERSION, ftype, len(payload))
        crc = google_crc32c.extend(google_crc32c.value(header), payload)
        out = b"".join((header, payload, _CRC.pack(crc)))
        self.bytes_out += len(out)
        return out

    def _encode(self, ev: Event) -> bytes:
        if isinstance(ev, Batch):
            raw = encode_records(ev.records)
            flags = 0
            body = raw
            if Feature.LZ4 in self.features:
                packed = _compress(raw)
                if packed is not None:
                    body, flags = packed, 1
            return _BATCH.pack(ev.prev_seq, len(ev.records), len(raw), flags) + body
        if isinstance(ev, Ack):
            return _U64.pack(ev.seq)
        if isinstance(ev, Heartbeat):
            return _U64.pack(ev.token)
        if isinstance(ev, Hello):
            sid = ev.source_id.encode()
            if not 0 < len(sid) <= MAX_ID_LEN or len(ev.volume_uuid) != 16:
                raise ValueError("source id must be 1..64 bytes and the volume uuid 16 bytes")
            return _HELLO.pack(
                ev.min_version, ev.max_version, ev.volume_uuid, ev.volume_size, ev.block_size,
                ev.generation, ev.resume_seq, int(ev.features), int(ev.purpose), len(sid),
            ) + sid
        if isinstance(ev, HelloReply):
            name = ev.remote_name.encode()
            if len(name) > MAX_ID_LEN or len(ev.volume_uuid) != 16:
                raise ValueError("remote name must be at most 64 bytes and the volume uuid 16 bytes")
            return _HELLO_REPLY.pack(
                ev.volume_uuid, ev.applied_seq, ev.generation, int(ev.features), int(ev.flags), len(name)
            ) + name
        if isinstance(ev, Error):
            msg = ev.message.encode()[:MAX_MESSAGE_LEN]
            return _ERROR.pack(int(ev.code), len(msg)) + msg
        if isinstance(ev, ResyncBegin):
            return _RESYNC_BEGIN.pack(ev.position, ev.region_blocks, ev.total_regions)
        if isinstance(ev, DigestRequest):
            return _DIGEST_REQ.pack(ev.first_region, ev.count, ev.region_blocks)
        if isinstance(ev, RegionDigests):
            if any(len(d) != DIGEST_SIZE for d in ev.digests):
                raise ValueError("digest of the wrong size")
            return _DIGEST_REQ.pack(ev.first_region, len(ev.digests), ev.region_blocks) + b"".join(ev.digests)
        if isinstance(ev, RegionData):
            raw = bytes(ev.data)
            flags = 0
            body = raw
            if Feature.LZ4 in self.features:
                packed = _compress(raw)
                if packed is not None:
                    body, flags = packed, 1
            return _REGION_DATA.pack(ev.lba, 0, flags, len(raw)) + body
        if isinstance(ev, ResyncEnd):
            return _U64.pack(ev.position)
        if isinstance(ev, RegionRead):
            return _REGION_READ.pack(ev.lba, ev.count)
        if isinstance(ev, DirtyRequest):
            return b""
        if isinstance(ev, DirtyRegions):
            reason = ev.reason.encode()[:MAX_MESSAGE_LEN]
            if len(ev.bits) > MAX_DIRTY_BITMAP_BYTES or ev.first_region % 8 or not 0 < ev.region_blocks <= MAX_REGION_BLOCKS:
                raise ValueError("DIRTY_REGIONS: bitmap too long, first region not a multiple of 8 or bad region size")
            return _DIRTY_REGIONS.pack(int(ev.flags), ev.region_blocks, ev.total_regions, ev.first_region,
                                       len(ev.bits), len(reason)) + bytes(ev.bits) + reason
        if isinstance(ev, Generations):
            if len(ev.generations) > MAX_GENERATIONS:
                raise ValueError(f"at most {MAX_GENERATIONS} generations")
            return _GENERATIONS.pack(int(ev.flags), ev.dirty_bytes, len(ev.generations)) + b"".join(
                _GENERATION.pack(*g) for g in ev.generations)
        raise TypeError(f"not a journey event: {ev!r}")

    # -- receiving -----------------------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        if self.state is ConnState.CLOSED and data:
            raise ProtocolError("data received on a closed connection")
        self._buf += data
        self.bytes_in += len(data)

    def receive_eof(self) -> None:
        """The peer closed the stream. A frame cut short is a ProtocolError (truncated)."""
        pending = len(self._buf)
        self.state = ConnState.CLOSED
        self._buf.clear()
        if pending:
            raise ProtocolError(f"connection closed inside a frame ({pending} bytes of it received)")

    def next_event(self) -> Event | _NeedData:
        buf = self._buf
        if len(buf) < _HEADER.size:
            if buf and bytes(buf[: min(2, len(buf))]) != MAGIC[: min(2, len(buf))]:
                self._fail("bad frame magic")
            return NEED_DATA
        magic, version, ftype_raw, length = _HEADER.unpack_from(buf, 0)
        if magic != MAGIC:
            self._fail("bad frame magic")
        if version != VERSION:
            self._fail(f"protocol version {version} not supported (this end speaks {VERSION})",
                       ErrorCode.VERSION)
        if length > self.max_payload:
            self._fail(f"frame of {length} bytes exceeds the limit of {self.max_payload}")
        try:
            ftype = FrameType(ftype_raw)
        except ValueError:
            self._fail(f"unknown frame type {ftype_raw}")
        total = _HEADER.size + length + _CRC.size
        if len(buf) < total:
            return NEED_DATA
        frame = bytes(buf[:total])
        del buf[:total]
        (crc,) = _CRC.unpack_from(frame, total - _CRC.size)
        if _crc(memoryview(frame)[: total - _CRC.size]) != crc:
            self._fail(f"CRC32C mismatch on a {ftype.name} frame")
        try:
            self._advance(self.peer, ftype)
            event = self._decode(ftype, frame[_HEADER.size : total - _CRC.size])
        except ProtocolError:
            self.state = ConnState.CLOSED
            raise
        return event

    def _fail(self, message: str, code: ErrorCode = ErrorCode.BAD_FRAME) -> None:
        self.state = ConnState.CLOSED
        self._buf.clear()
        raise ProtocolError(message, code)

    def _decode(self, ftype: FrameType, p: bytes) -> Event:
        if ftype is FrameType.BATCH:
            _need(p, _BATCH.size, "BATCH", exact=False)
            prev, n, raw_len, flags = _BATCH.unpack_from(p, 0)
            if n > MAX_RECORDS_PER_BATCH or raw_len > self.max_payload or flags & ~1:
                raise ProtocolError(f"BATCH header out of bounds: {n} records, {raw_len} bytes, "
                                    f"flags {flags}")
            body = p[_BATCH.size :]
            if flags & 1:
                if Feature.LZ4 not in self.features:
                    raise ProtocolError("lz4 batch on a connection that did not negotiate lz4")
                body = _decompress(body, raw_len)
            elif len(body) != raw_len:
                raise ProtocolError(f"BATCH body has {len(body)} bytes, header says {raw_len}")
            return Batch(prev, decode_records(body, n, prev))
        if ftype is FrameType.ACK:
            _need(p, _U64.size, "ACK")
            return Ack(_U64.unpack(p)[0])
        if ftype is FrameType.HEARTBEAT:
            _need(p, _U64.size, "HEARTBEAT")
            return Heartbeat(_U64.unpack(p)[0])
        if ftype is FrameType.HELLO:
            _need(p, _HELLO.size, "HELLO", exact=False)
            vmin, vmax, uuid, vsize, bs, gen, resume, feats, purpose, idlen = _HELLO.unpack_from(p, 0)
            _need(p, _HELLO.size + idlen, "HELLO")
            if not vmin <= VERSION <= vmax:
                raise ProtocolError(f"source speaks versions {vmin}..{vmax}, this end {VERSION}",
                                    ErrorCode.VERSION)
            if idlen == 0 or idlen > MAX_ID_LEN:
                raise ProtocolError("HELLO source id must be 1..64 bytes")
            if bs not in (512, 4096) or vsize % bs:
                raise ProtocolError(f"HELLO volume of {vsize} bytes with block size {bs}")
            try:
                purp = Purpose(purpose)
            except ValueError:
                raise ProtocolError(f"HELLO purpose {purpose} unknown") from None
            sid = _text(p[_HELLO.size :], "source id")
            feat = Feature(feats & _KNOWN_FEATURES)
            return Hello(sid, uuid, vsize, bs, gen, resume, feat, purp, vmin, vmax)
        if ftype is FrameType.HELLO_REPLY:
            _need(p, _HELLO_REPLY.size, "HELLO_REPLY", exact=False)
            uuid, applied, gen, feats, flags, nlen = _HELLO_REPLY.unpack_from(p, 0)
            _need(p, _HELLO_REPLY.size + nlen, "HELLO_REPLY")
            if nlen > MAX_ID_LEN:
                raise ProtocolError("HELLO_REPLY name too long")
            accepted = Feature(feats & _REPLY_FEATURES) & self.offer_features
            self.features = accepted
            return HelloReply(_text(p[_HELLO_REPLY.size :], "remote name"), uuid, applied, gen, accepted,
                              ReplyFlag(flags & 3))
        if ftype is FrameType.ERROR:
            _need(p, _ERROR.size, "ERROR", exact=False)
            code, mlen = _ERROR.unpack_from(p, 0)
            _need(p, _ERROR.size + mlen, "ERROR")
            try:
                ecode = ErrorCode(code)
            except ValueError:
                ecode = ErrorCode.INTERNAL
            return Error(ecode, p[_ERROR.size :].decode("utf-8", "replace"))
        if ftype is FrameType.RESYNC_BEGIN:
            _need(p, _RESYNC_BEGIN.size, "RESYNC_BEGIN")
            pos, rb, total = _RESYNC_BEGIN.unpack(p)
            if not 0 < rb <= MAX_REGION_BLOCKS:
                raise ProtocolError(f"RESYNC_BEGIN region of {rb} blocks")
            return ResyncBegin(pos, rb, total)
        if ftype is FrameType.DIGEST_REQUEST:
            _need(p, _DIGEST_REQ.size, "DIGEST_REQUEST")
            first, n, rb = _DIGEST_REQ.unpack(p)
            if not 0 < rb <= MAX_REGION_BLOCKS or n > MAX_DIGESTS_PER_FRAME:
                raise ProtocolError(f"DIGEST_REQUEST of {n} regions of {rb} blocks")
            return DigestRequest(first, n, rb)
        if ftype is FrameType.REGION_DIGESTS:
            _need(p, _DIGEST_REQ.size, "REGION_DIGESTS", exact=False)
            first, n, rb = _DIGEST_REQ.unpack_from(p, 0)
            if n > MAX_DIGESTS_PER_FRAME:
                raise ProtocolError(f"REGION_DIGESTS with {n} digests")
            _need(p, _DIGEST_REQ.size + n * DIGEST_SIZE, "REGION_DIGESTS")
            base = _DIGEST_REQ.size
            digests = tuple(p[base + i * DIGEST_SIZE : base + (i + 1) * DIGEST_SIZE] for i in range(n))
            return RegionDigests(first, rb, digests)
        if ftype is FrameType.REGION_DATA:
            _need(p, _REGION_DATA.size, "REGION_DATA", exact=False)
            lba, _reserved, flags, raw_len = _REGION_DATA.unpack_from(p, 0)
            if raw_len > self.max_payload or flags & ~1:
                raise ProtocolError(f"REGION_DATA of {raw_len} bytes, flags {flags}")
            body = p[_REGION_DATA.size :]
            if flags & 1:
                if Feature.LZ4 not in self.features:
                    raise ProtocolError("lz4 region on a connection that did not negotiate lz4")
                body = _decompress(body, raw_len)
            elif len(body) != raw_len:
                raise ProtocolError(f"REGION_DATA body has {len(body)} bytes, header says {raw_len}")
            return RegionData(lba, body)
        if ftype is FrameType.RESYNC_END:
            _need(p, _U64.size, "RESYNC_END")
            return ResyncEnd(_U64.unpack(p)[0])
        if ftype is FrameType.REGION_READ:
            _need(p, _REGION_READ.size, "REGION_READ")
            lba, count = _REGION_READ.unpack(p)
            if not 0 < count <= MAX_READ_BLOCKS:
                raise ProtocolError(f"REGION_READ of {count} blocks (1..{MAX_READ_BLOCKS})")
            return RegionRead(lba, count)
        if ftype is FrameType.DIRTY_REQUEST:
            _need(p, 0, "DIRTY_REQUEST")
            if Feature.DIRTY_MAP not in self.features:
                raise ProtocolError("DIRTY_REQUEST on a connection that did not negotiate it")
            return DirtyRequest()
        if ftype is FrameType.DIRTY_REGIONS:
            _need(p, _DIRTY_REGIONS.size, "DIRTY_REGIONS", exact=False)
            flags, rb, total, first, nbits, nreason = _DIRTY_REGIONS.unpack_from(p, 0)
            _need(p, _DIRTY_REGIONS.size + nbits + nreason, "DIRTY_REGIONS")
            if flags & ~3 or not 0 < rb <= MAX_REGION_BLOCKS or nbits > MAX_DIRTY_BITMAP_BYTES or first % 8 \
                    or first + 8 * nbits > total + 7 or nreason > MAX_MESSAGE_LEN:
                raise ProtocolError(f"DIRTY_REGIONS out of bounds: flags {flags}, {rb}-block regions, {total} "
                                    f"regions, bits for {first}+{8 * nbits}")
            base = _DIRTY_REGIONS.size
            return DirtyRegions(DirtyFlag(flags), rb, total, first, p[base : base + nbits],
                                _text(p[base + nbits :], "DIRTY_REGIONS reason"))
        if ftype is FrameType.GENERATIONS:
            _need(p, _GENERATIONS.size, "GENERATIONS", exact=False)
            flags, dirty, n = _GENERATIONS.unpack_from(p, 0)
            if n > MAX_GENERATIONS or flags & ~7:
                raise ProtocolError(f"GENERATIONS with {n} generations, flags {flags}")
            _need(p, _GENERATIONS.size + n * _GENERATION.size, "GENERATIONS")
            gens = tuple(_GENERATION.unpack_from(p, _GENERATIONS.size + i * _GENERATION.size) for i in range(n))
            for gid, counter, _started, _fork in gens:
                if gid == 0 or counter == 0:
                    raise ProtocolError("GENERATIONS holds a generation with id or counter 0")
            if any(gens[i + 1][1] <= gens[i][1] for i in range(len(gens) - 1)):
                raise ProtocolError("GENERATIONS counters do not increase")
            return Generations(gens, GenerationsFlag(flags), dirty)
        raise ProtocolError(f"unhandled frame type {ftype.name}")  # pragma: no cover


def batch_records(records: Sequence[RecordLike]) -> tuple[Record, ...]:
    """Convert journal records (any object with the JournalRecord fields) to link records."""
    return tuple(
        r if isinstance(r, Record) else Record(r.seq, RecordKind(int(r.kind)), r.lba, r.count, r.timestamp_ns,
                                               bytes(r.payload))
        for r in records
    )
