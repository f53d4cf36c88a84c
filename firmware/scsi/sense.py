"""Sense data for the usbmirror block target: fixed-format sense built from the sense keys and
ASC/ASCQ codes of `firmware.sense_codes` (re-exported here).

The target keeps one `Sense` per logical unit: set by every CHECK CONDITION, returned and cleared
by REQUEST SENSE, reset to NO SENSE by every good command. Only fixed-format sense (response code
0x70, SPC-4 4.5.3) is produced; descriptor format is not supported, so REQUEST SENSE with DESC=1
is rejected (SPC-4 6.39).

Fixed-format sense data, 18 bytes (SPC-4 table 48):

    offset  size  field
    0       1     VALID (bit 7) | RESPONSE CODE 0x70
    1       1     obsolete
    2       1     FILEMARK | EOM | ILI | reserved | SENSE KEY (bits 3-0)
    3       4     INFORMATION (valid when VALID=1)
    7       1     ADDITIONAL SENSE LENGTH = 10
    8       4     COMMAND-SPECIFIC INFORMATION
    12      1     ADDITIONAL SENSE CODE
    13      1     ADDITIONAL SENSE CODE QUALIFIER
    14      1     FIELD REPLACEABLE UNIT CODE
    15      3     SKSV (bit 7) | SENSE-KEY SPECIFIC (field pointer for ILLEGAL REQUEST)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from firmware.sense_codes import Asc, SenseKey

__all__ = [
    "FIXED_SENSE_LENGTH", "NO_SENSE", "RESPONSE_CODE_FIXED_CURRENT", "Asc", "CommandError", "FieldPointer", "Sense",
    "SenseKey", "illegal_request", "invalid_field_in_cdb", "invalid_field_in_parameter_list",
]  # fmt: skip

FIXED_SENSE_LENGTH = 18
RESPONSE_CODE_FIXED_CURRENT = 0x70

_FIXED = struct.Struct(">BBBIBIBBBBH")
assert _FIXED.size == FIXED_SENSE_LENGTH


@dataclass(frozen=True, slots=True)
class FieldPointer:
    """Sense-key-specific field pointer (SPC-4 4.5.2.4.2): which CDB or parameter-list byte
    (and bit, when known) the target rejected."""

    in_cdb: bool  # C/D: True = byte of the CDB, False = byte of the parameter list
    byte: int  # 0..65535
    bit: int | None = None  # 0..7, None when the whole byte is at fault

    def encode(self) -> tuple[int, int]:
        """(byte 15, bytes 16-17) of fixed-format sense, with SKSV set."""
        b15 = 0x80 | (0x40 if self.in_cdb else 0)
        if self.bit is not None:
            b15 |= 0x08 | (self.bit & 0x07)
        return b15, self.byte & 0xFFFF


@dataclass(frozen=True, slots=True)
class Sense:
    """One sense record: key, ASC, ASCQ and the optional INFORMATION / field pointer."""

    key: int
    asc: int
    ascq: int
    information: int | None = None  # e.g. offset of the first miscompared byte
    field_pointer: FieldPointer | None = None

    @classmethod
    def of(
        cls,
        key: SenseKey,
        code: Asc,
        *,
        information: int | None = None,
        field_pointer: FieldPointer | None = None,
    ) -> Sense:
        return cls(int(key), code.asc, code.ascq, information, field_pointer)

    @property
    def label(self) -> str:
        """Stable text for counters and logs, e.g. `ILLEGAL_REQUEST/0x24/0x00`."""
        try:
            key = SenseKey(self.key).name
        except ValueError:
            key = f"0x{self.key:X}"
        return f"{key}/0x{self.asc:02X}/0x{self.ascq:02X}"

    def to_fixed(self) -> bytes:
        """Fixed-format sense data, 18 bytes."""
        b0 = RESPONSE_CODE_FIXED_CURRENT
        info = 0
        if self.information is not None:
            b0 |= 0x80
            info = self.information & 0xFFFFFFFF
        b15, b16 = self.field_pointer.encode() if self.field_pointer is not None else (0, 0)
        return _FIXED.pack(b0, 0, self.key & 0x0F, info, FIXED_SENSE_LENGTH - 8, 0, self.asc, self.ascq, 0, b15, b16)

    @classmethod
    def from_fixed(cls, data: bytes) -> Sense:
        """Parse fixed-format sense (used by tests and tools). Raises ValueError if not 0x70/0x71."""
        if len(data) < FIXED_SENSE_LENGTH:
            raise ValueError(f"fixed sense needs {FIXED_SENSE_LENGTH} bytes, got {len(data)}")
        b0, _, b2, info, _, _, asc, ascq, _, b15, b16 = _FIXED.unpack_from(data)
        if b0 & 0x7F not in (0x70, 0x71):
            raise ValueError(f"not fixed-format sense: response code 0x{b0 & 0x7F:02X}")
        fp = None
        if b15 & 0x80:
            fp = FieldPointer(bool(b15 & 0x40), b16, (b15 & 0x07) if b15 & 0x08 else None)
        return cls(b2 & 0x0F, asc, ascq, info if b0 & 0x80 else None, fp)


NO_SENSE = Sense.of(SenseKey.NO_SENSE, Asc.NO_ADDITIONAL_SENSE_INFORMATION)


def invalid_field_in_cdb(byte: int, bit: int | None = None) -> Sense:
    return Sense.of(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB, field_pointer=FieldPointer(True, byte, bit))


def invalid_field_in_parameter_list(byte: int, bit: int | None = None) -> Sense:
    return Sense.of(
        SenseKey.ILLEGAL_REQUEST,
        Asc.INVALID_FIELD_IN_PARAMETER_LIST,
        field_pointer=FieldPointer(False, byte, bit),
    )


def illegal_request(code: Asc) -> Sense:
    return Sense.of(SenseKey.ILLEGAL_REQUEST, code)


class CommandError(Exception):
    """Raised inside the target to end a command with CHECK CONDITION and this sense."""

    def __init__(self, sense: Sense) -> None:
        super().__init__(sense.label)
        self.sense = sense
