"""iSCSI PDUs (RFC 7143 section 11): the 48-byte Basic Header Segment, AHS, digests and framing.

Sans-IO. `Framer` cuts a byte stream into `Pdu`s (checking the CRC32C header and data digests when
they are negotiated, and refusing a data segment longer than the receiver declared); `Pdu.encode()`
builds one. Every field is kept as raw BHS bytes plus accessors, so a PDU can be echoed in a Reject
exactly as it arrived.

What it does not do: decide what a PDU means (that is `firmware.iscsi.connection`).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

import google_crc32c

BHS_LENGTH = 48
DIGEST_LENGTH = 4
RESERVED_TAG = 0xFFFFFFFF
# A data segment length is 24 bits; nobody may declare more than this (RFC 7143 13.12: 2**24-1).
MAX_DATA_SEGMENT = (1 << 24) - 1


class PduOpcode(enum.IntEnum):
    """RFC 7143 11.2.1.2."""

    NOP_OUT = 0x00
    SCSI_COMMAND = 0x01
    TASK_MGMT_REQUEST = 0x02
    LOGIN_REQUEST = 0x03
    TEXT_REQUEST = 0x04
    DATA_OUT = 0x05
    LOGOUT_REQUEST = 0x06
    SNACK_REQUEST = 0x10
    NOP_IN = 0x20
    SCSI_RESPONSE = 0x21
    TASK_MGMT_RESPONSE = 0x22
    LOGIN_RESPONSE = 0x23
    TEXT_RESPONSE = 0x24
    DATA_IN = 0x25
    LOGOUT_RESPONSE = 0x26
    R2T = 0x31
    ASYNC_MESSAGE = 0x32
    REJECT = 0x3F


class RejectReason(enum.IntEnum):
    """RFC 7143 11.17.1."""

    DATA_DIGEST_ERROR = 0x02
    SNACK_REJECT = 0x03
    PROTOCOL_ERROR = 0x04
    COMMAND_NOT_SUPPORTED = 0x05
    IMMEDIATE_COMMAND_REJECT = 0x06
    TASK_IN_PROGRESS = 0x07
    INVALID_DATA_ACK = 0x08
    INVALID_PDU_FIELD = 0x09
    LONG_OPERATION_REJECT = 0x0A
    WAITING_FOR_LOGOUT = 0x0C


class PduError(Exception):
    """The stream cannot be framed any further (bad header digest, oversized or malformed PDU).

    `header` is the BHS of the offending PDU when it was read (for a Reject), else empty.
    """

    def __init__(self, message: str, reason: RejectReason = RejectReason.PROTOCOL_ERROR, header: bytes = b"") -> None:
        super().__init__(message)
        self.reason = reason
        self.header = header


def crc32c(data: bytes | bytearray | memoryview) -> int:
    return int(google_crc32c.value(bytes(data)))


def digest(data: bytes | bytearray | memoryview) -> bytes:
    """The 4-byte header or data digest of `data` (RFC 7143 11.1 / RFC 3385: the CRC32C sent least
    significant byte first)."""
    return struct.pack("<I", crc32c(data))


def pad4(n: int) -> int:
    return (4 - n % 4) % 4


@dataclass(slots=True)
class Pdu:
    """One PDU: the 48-byte BHS (mutable), AHS bytes and the data segment (without padding)."""

    bhs: bytearray
    ahs: bytes = b""
    data: bytes = b""

    @classmethod
    def new(cls, opcode: PduOpcode, *, flags: int = 0, immediate: bool = False) -> Pdu:
        bhs = bytearray(BHS_LENGTH)
        bhs[0] = int(opcode) | (0x40 if immediate else 0)
        bhs[1] = flags
        return cls(bhs)

    # -- fields common to every PDU -----------------------------------------------------------
    @property
    def opcode(self) -> int:
        return self.bhs[0] & 0x3F

    @property
    def immediate(self) -> bool:
        return bool(self.bhs[0] & 0x40)

    @property
    def flags(self) -> int:
        return self.bhs[1]

    @property
    def final(self) -> bool:
        return bool(self.bhs[1] & 0x80)

    @property
    def lun(self) -> bytes:
        return bytes(self.bhs[8:16])

    @property
    def itt(self) -> int:
        return self.u32(16)

    def u32(self, offset: int) -> int:
        value: int = struct.unpack_from(">I", self.bhs, offset)[0]
        return value

    def set_u32(self, offset: int, value: int) -> None:
        struct.pack_into(">I", self.bhs, offset, value & 0xFFFFFFFF)

    def set_lun(self, lun: bytes) -> None:
        self.bhs[8:16] = lun[:8].ljust(8, b"\0")

    def encode(self, *, header_digest: bool = False, data_digest: bool = False) -> bytes:
        """The PDU as sent: BHS (with the AHS and data lengths filled in), AHS, header digest,
        data, padding, data digest."""
        if len(self.ahs) % 4 or len(self.ahs) > 255 * 4:
            raise ValueError(f"AHS of {len(self.ahs)} bytes")
        if len(self.data) > MAX_DATA_SEGMENT:
            raise ValueError(f"data segment of {len(self.data)} bytes")
        self.bhs[4] = len(self.ahs) // 4
        self.bhs[5:8] = len(self.data).to_bytes(3, "big")
        header = bytes(self.bhs) + self.ahs
        parts = [header]
        if header_digest:
            parts.append(digest(header))
        if self.data:
            padded = self.data + bytes(pad4(len(self.data)))
            parts.append(padded)
            if data_digest:
                parts.append(digest(padded))
        return b"".join(parts)


@dataclass(frozen=True, slots=True)
class DataDigestError:
    """A PDU whose header was sound but whose data digest did not match: the caller rejects it."""

    pdu: Pdu


class Framer:
    """Cuts a byte stream into PDUs.

    `max_data` is the largest data segment this side accepts (its MaxRecvDataSegmentLength, or the
    8192 bytes of the login phase); a bigger one is a protocol error. Digests are switched on by
    setting `header_digest` / `data_digest` (from the first PDU after a successful login).
    """

    def __init__(self, *, max_data: int = 8192) -> None:
        self.max_data = max_data
        self.header_digest = False
        self.data_digest = False
        self._buf = bytearray()
        self._at = 0  # start of the first PDU not yet returned; the bytes before it are dropped on feed

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._at:
            # drop what was consumed once per feed, not once per PDU (one move of the unread rest)
            del self._buf[: self._at]
            self._at = 0
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._at

    def next(self) -> Pdu | DataDigestError | None:
        """The next complete PDU, None when more bytes are needed; raises PduError when the stream
        can no longer be trusted (the connection must be dropped)."""
        buf = self._buf
        at = self._at
        have = len(buf) - at
        if have < BHS_LENGTH:
            return None
        ahs_len = buf[at + 4] * 4
        dsl = (buf[at + 5] << 16) | (buf[at + 6] << 8) | buf[at + 7]
        header_len = BHS_LENGTH + ahs_len
        hd = DIGEST_LENGTH if self.header_digest else 0
        if have < header_len + hd:
            if dsl > self.max_data:  # refuse before waiting for megabytes that will be thrown away
                raise PduError(f"data segment of {dsl} bytes exceeds {self.max_data}",
                               header=bytes(buf[at : at + BHS_LENGTH]))
            return None
        if hd:
            header = buf[at : at + header_len]
            if buf[at + header_len : at + header_len + hd] != digest(header):
                raise PduError("header digest mismatch", header=bytes(header[:BHS_LENGTH]))
        if dsl > self.max_data:
            raise PduError(f"data segment of {dsl} bytes exceeds {self.max_data}",
                           header=bytes(buf[at : at + BHS_LENGTH]))
        padded = dsl + (-dsl & 3)
        dd = DIGEST_LENGTH if self.data_digest and dsl else 0
        total = header_len + hd + padded + dd
        if have < total:
            return None
        start = at + header_len + hd
        data = bytes(buf[start : start + dsl]) if dsl else b""
        digest_ok = True
        if dd:
            digest_ok = buf[start + padded : start + padded + dd] == digest(memoryview(buf)[start : start + padded])
        self._at = at + total
        pdu = Pdu(buf[at : at + BHS_LENGTH], bytes(buf[at + BHS_LENGTH : at + header_len]) if ahs_len else b"", data)
        return pdu if digest_ok else DataDigestError(pdu)


# -- text key=value data (RFC 7143 6.1) ------------------------------------------------------------


class TextError(ValueError):
    pass


def parse_text(data: bytes) -> list[tuple[str, str]]:
    """`key=value\\0...` pairs in order. Keys are case-sensitive; a pair without `=` is an error."""
    pairs: list[tuple[str, str]] = []
    for raw in data.split(b"\0"):
        if not raw:
            continue
        key, sep, value = raw.partition(b"=")
        if not sep or not key:
            raise TextError(f"malformed text pair {raw[:64]!r}")
        try:
            pairs.append((key.decode("utf-8"), value.decode("utf-8")))
        except UnicodeDecodeError as exc:
            raise TextError(f"text pair is not UTF-8: {raw[:64]!r}") from exc
    return pairs


def build_text(pairs: list[tuple[str, str]]) -> bytes:
    return b"".join(f"{k}={v}".encode() + b"\0" for k, v in pairs)
