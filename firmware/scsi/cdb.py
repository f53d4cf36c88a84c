"""Command descriptor blocks: decoding, encoding and the one place every CDB is checked.

`check_command(cdb, limits)` is the only gate between a CBW's CDB and the target: it checks the
CDB length for the opcode, every reserved or unsupported bit (one table of allowed bits per
opcode, so the field pointer in the sense data is exact), the fields whose values this target
does not support, the transfer length against the advertised maximum, and the LBA range. It
returns a frozen dataclass for the command, or raises `CommandError` with the sense to report.

Decoding uses precompiled `struct.Struct` (this is the per-I/O path). Every command class has an
`encode()` so tests and tools can build CDBs and check `decode(encode(x)) == x`.

What this module does not do: it never touches the store, never decides the data phase of
commands whose length depends on the pages served (that is `firmware.scsi.target`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from firmware.scsi.opcodes import MaintenanceIn, Opcode, PrInAction, PrOutAction, ServiceActionIn16
from firmware.scsi.sense import (
    Asc,
    CommandError,
    Sense,
    SenseKey,
    illegal_request,
    invalid_field_in_cdb,
)

_C = 0xC0  # control byte: the vendor-specific bits may be set; NACA and LINK are not supported

# Allowed bits per CDB byte (index 0, the opcode, is not checked). A set bit outside the mask is a
# reserved, obsolete or unsupported field: INVALID FIELD IN CDB with a pointer to it.
_ALLOWED: dict[int, tuple[int, ...]] = {
    Opcode.TEST_UNIT_READY: (0, 0, 0, 0, 0, _C),
    Opcode.REQUEST_SENSE: (0, 0x01, 0, 0, 0xFF, _C),  # DESC (rejected below: fixed format only)
    Opcode.READ_6: (0, 0x1F, 0xFF, 0xFF, 0xFF, _C),
    Opcode.WRITE_6: (0, 0x1F, 0xFF, 0xFF, 0xFF, _C),
    Opcode.INQUIRY: (0, 0x01, 0xFF, 0xFF, 0xFF, _C),  # EVPD; CMDDT (obsolete) rejected
    Opcode.MODE_SELECT_6: (0, 0x11, 0, 0, 0xFF, _C),  # PF, SP
    Opcode.MODE_SENSE_6: (0, 0x08, 0xFF, 0xFF, 0xFF, _C),  # DBD
    Opcode.START_STOP_UNIT: (0, 0x01, 0, 0x0F, 0xF7, _C),
    Opcode.PREVENT_ALLOW_MEDIUM_REMOVAL: (0, 0, 0, 0, 0x03, _C),
    Opcode.READ_FORMAT_CAPACITIES: (0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, _C),
    Opcode.READ_CAPACITY_10: (0, 0, 0, 0, 0, 0, 0, 0, 0, _C),  # obsolete LBA / PMI must be 0
    Opcode.READ_10: (0, 0x1C, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, _C),  # DPO FUA RARC
    Opcode.WRITE_10: (0, 0x18, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, _C),  # DPO FUA
    Opcode.VERIFY_10: (0, 0x16, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, _C),  # DPO BYTCHK
    Opcode.SYNCHRONIZE_CACHE_10: (0, 0x06, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, _C),  # SYNC_NV IMMED
    Opcode.WRITE_SAME_10: (0, 0x08, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, _C),  # UNMAP
    Opcode.UNMAP: (0, 0, 0, 0, 0, 0, 0x1F, 0xFF, 0xFF, _C),  # ANCHOR rejected
    Opcode.MODE_SELECT_10: (0, 0x11, 0, 0, 0, 0, 0, 0xFF, 0xFF, _C),
    Opcode.MODE_SENSE_10: (0, 0x18, 0xFF, 0xFF, 0, 0, 0, 0xFF, 0xFF, _C),  # LLBAA DBD
    Opcode.READ_16: (0, 0x1C, *(0xFF,) * 12, 0x3F, _C),
    Opcode.WRITE_16: (0, 0x18, *(0xFF,) * 12, 0x3F, _C),
    Opcode.VERIFY_16: (0, 0x16, *(0xFF,) * 12, 0x3F, _C),
    Opcode.SYNCHRONIZE_CACHE_16: (0, 0x06, *(0xFF,) * 12, 0x3F, _C),
    Opcode.WRITE_SAME_16: (0, 0x09, *(0xFF,) * 12, 0x3F, _C),  # UNMAP NDOB
    Opcode.SERVICE_ACTION_IN_16: (0, 0x1F, *(0,) * 8, 0xFF, 0xFF, 0xFF, 0xFF, 0, _C),
    Opcode.REPORT_LUNS: (0, 0, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, _C),
    Opcode.READ_12: (0, 0x1C, *(0xFF,) * 8, 0x1F, _C),  # DPO FUA RARC
    Opcode.WRITE_12: (0, 0x18, *(0xFF,) * 8, 0x1F, _C),  # DPO FUA
    Opcode.VERIFY_12: (0, 0x16, *(0xFF,) * 8, 0x1F, _C),  # DPO BYTCHK
    Opcode.WRITE_AND_VERIFY_10: (0, 0x16, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, _C),  # DPO BYTCHK
    Opcode.WRITE_AND_VERIFY_12: (0, 0x16, *(0xFF,) * 8, 0x1F, _C),
    Opcode.WRITE_AND_VERIFY_16: (0, 0x16, *(0xFF,) * 12, 0x3F, _C),
    Opcode.PRE_FETCH_10: (0, 0x02, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, _C),  # IMMED
    Opcode.PRE_FETCH_16: (0, 0x02, *(0xFF,) * 12, 0x3F, _C),
    Opcode.COMPARE_AND_WRITE: (0, 0x18, *(0xFF,) * 8, 0, 0, 0, 0xFF, 0x1F, _C),  # DPO FUA
    Opcode.PERSISTENT_RESERVE_IN: (0, 0x1F, 0, 0, 0, 0, 0, 0xFF, 0xFF, _C),
    Opcode.PERSISTENT_RESERVE_OUT: (0, 0x1F, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, _C),  # SA; SCOPE TYPE
    Opcode.MAINTENANCE_IN: (0, 0x1F, 0x87, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, _C),  # RCTD OPTIONS
    # SPC-2 reservations of the whole unit: third-party and extent reservations are not supported
    Opcode.RESERVE_6: (0, 0, 0, 0, 0, _C),
    Opcode.RELEASE_6: (0, 0, 0, 0, 0, _C),
    Opcode.RESERVE_10: (0, 0, 0, 0, 0, 0, 0, 0, 0, _C),
    Opcode.RELEASE_10: (0, 0, 0, 0, 0, 0, 0, 0, 0, _C),
}

CDB_SIZE: dict[int, int] = {op: len(mask) for op, mask in _ALLOWED.items()}
ALLOWED_BITS = _ALLOWED  # what REPORT SUPPORTED OPERATION CODES reports as CDB usage data


def _forbidden_bits(mask: tuple[int, ...]) -> int:
    return int.from_bytes(bytes((~m) & 0xFF for m in mask[1:]), "big")


_FORBIDDEN: dict[int, tuple[int, int]] = {op: (len(m), _forbidden_bits(m)) for op, m in _ALLOWED.items()}

_RW6 = struct.Struct(">BBHBB")  # opcode, lba(20-16), lba(15-0), length, control
_CDB10 = struct.Struct(">BBIBHB")  # opcode, flags, lba, group, length, control
_CDB16 = struct.Struct(">BBQIBB")  # opcode, flags, lba, length, group, control
_ALLOC6 = struct.Struct(">BBBBBB")
_MODE10 = struct.Struct(">BBBB3xHB")  # opcode, flags, pc|page, subpage, -, alloc, control
_MSEL10 = struct.Struct(">BB5xHB")
_SAI16 = struct.Struct(">BB8xIBB")
_RLUNS = struct.Struct(">BxB3xIxB")
_RFC = struct.Struct(">B6xHB")
_CDB12 = struct.Struct(">BBIIBB")  # opcode, flags, lba, length, group, control


def _pack_lba_cdb(opcode: int, flags: int, lba: int, blocks: int) -> bytes:
    """A 10-, 12- or 16-byte CDB of the common LBA + length layout; the size is the opcode's group
    code (SPC-4 4.2.5.1: groups 1 and 2 are 10 bytes, 5 is 12, 4 is 16)."""
    group = opcode >> 5
    if group in (1, 2):
        return _CDB10.pack(opcode, flags, lba, 0, blocks, 0)
    if group == 5:
        return _CDB12.pack(opcode, flags, lba, blocks, 0, 0)
    return _CDB16.pack(opcode, flags, lba, blocks, 0, 0)
_CAW = struct.Struct(">BBQ3xBBB")  # opcode, flags, lba, -, blocks, group, control
_PRIN = struct.Struct(">BB5xHB")  # opcode, service action, -, allocation length, control
_PROUT = struct.Struct(">BBB2xIB")  # opcode, service action, scope|type, -, parameter list length, control
_MAINT_IN = struct.Struct(">BBBBHIxB")  # opcode, sa, rctd|options, opcode, sa, allocation length, -, control

POWER_CONDITIONS = frozenset({0x0, 0x1, 0x2, 0x3, 0x7, 0xA, 0xB})  # SBC-3 table 74


@dataclass(frozen=True, slots=True)
class Limits:
    """What the target advertises and checks against (READ CAPACITY, Block Limits VPD)."""

    block_size: int
    num_blocks: int
    max_transfer_blocks: int
    max_write_same_blocks: int
    max_compare_blocks: int = 0  # COMPARE AND WRITE (Block Limits VPD); 0: not served

    def check_range(self, lba: int, blocks: int) -> None:
        # SBC-3 4.5: an LBA past the last one, or a transfer running past it.
        if lba >= self.num_blocks or lba + blocks > self.num_blocks:
            raise CommandError(Sense.of(SenseKey.ILLEGAL_REQUEST, Asc.LOGICAL_BLOCK_ADDRESS_OUT_OF_RANGE))


# ---- decoded commands -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TestUnitReady:
    __test__ = False  # not a pytest class

    def encode(self) -> bytes:
        return bytes(6)


@dataclass(frozen=True, slots=True)
class RequestSense:
    alloc: int

    def encode(self) -> bytes:
        return _ALLOC6.pack(Opcode.REQUEST_SENSE, 0, 0, 0, self.alloc, 0)


@dataclass(frozen=True, slots=True)
class ReadWrite:
    """READ / WRITE (6), (10), (16)."""

    opcode: Opcode
    lba: int
    blocks: int
    fua: bool = False
    dpo: bool = False

    @property
    def is_write(self) -> bool:
        return self.opcode in _WRITES

    def encode(self) -> bytes:
        flags = (0x10 if self.dpo else 0) | (0x08 if self.fua else 0)
        if self.opcode in (Opcode.READ_6, Opcode.WRITE_6):
            return _RW6.pack(self.opcode, self.lba >> 16, self.lba & 0xFFFF, self.blocks & 0xFF, 0)
        return _pack_lba_cdb(self.opcode, flags, self.lba, self.blocks)


_WRITES = frozenset({Opcode.WRITE_6, Opcode.WRITE_10, Opcode.WRITE_12, Opcode.WRITE_16})


@dataclass(frozen=True, slots=True)
class Verify:
    """VERIFY (10), (16). bytchk 0: check readability; 1: compare `blocks` blocks of data-out;
    3: compare every block against one block of data-out (SBC-3 table 67)."""

    opcode: Opcode
    lba: int
    blocks: int
    bytchk: int = 0
    dpo: bool = False

    def encode(self) -> bytes:
        flags = (0x10 if self.dpo else 0) | (self.bytchk << 1)
        return _pack_lba_cdb(self.opcode, flags, self.lba, self.blocks)


@dataclass(frozen=True, slots=True)
class WriteAndVerify:
    """WRITE AND VERIFY (10), (12), (16) (SBC-3 5.40-5.42): write `blocks` blocks, then read them back
    from the medium; bytchk 1 also compares what was read with the data-out."""

    opcode: Opcode
    lba: int
    blocks: int
    bytchk: int = 0
    dpo: bool = False

    def encode(self) -> bytes:
        flags = (0x10 if self.dpo else 0) | (self.bytchk << 1)
        return _pack_lba_cdb(self.opcode, flags, self.lba, self.blocks)


@dataclass(frozen=True, slots=True)
class PreFetch:
    """PRE-FETCH (10), (16) (SBC-3 5.10, 5.11). blocks 0 means "to the last LBA"."""

    opcode: Opcode
    lba: int
    blocks: int = 0
    immed: bool = False

    def encode(self) -> bytes:
        flags = 0x02 if self.immed else 0
        return _pack_lba_cdb(self.opcode, flags, self.lba, self.blocks)


@dataclass(frozen=True, slots=True)
class CompareAndWrite:
    """COMPARE AND WRITE (SBC-3 5.2): the data-out is `blocks` blocks to compare, then `blocks` blocks
    to write if they all matched."""

    lba: int
    blocks: int
    fua: bool = False
    dpo: bool = False

    def encode(self) -> bytes:
        flags = (0x10 if self.dpo else 0) | (0x08 if self.fua else 0)
        return _CAW.pack(Opcode.COMPARE_AND_WRITE, flags, self.lba, self.blocks, 0, 0)


@dataclass(frozen=True, slots=True)
class PersistentReserveIn:
    action: PrInAction
    alloc: int

    def encode(self) -> bytes:
        return _PRIN.pack(Opcode.PERSISTENT_RESERVE_IN, self.action, self.alloc, 0)


@dataclass(frozen=True, slots=True)
class PersistentReserveOut:
    action: PrOutAction
    scope: int
    pr_type: int
    param_len: int

    def encode(self) -> bytes:
        return _PROUT.pack(Opcode.PERSISTENT_RESERVE_OUT, self.action, (self.scope << 4) | self.pr_type,
                           self.param_len, 0)


@dataclass(frozen=True, slots=True)
class ReportSupportedOpcodes:
    """REPORT SUPPORTED OPERATION CODES (SPC-4 6.35). options 0: all commands; 1: one opcode without
    service action; 2: one opcode and service action; 3: one opcode, with or without service action."""

    options: int
    opcode: int
    service_action: int
    alloc: int
    rctd: bool = False

    def encode(self) -> bytes:
        return _MAINT_IN.pack(Opcode.MAINTENANCE_IN, MaintenanceIn.REPORT_SUPPORTED_OPERATION_CODES,
                              (0x80 if self.rctd else 0) | self.options, self.opcode, self.service_action,
                              self.alloc, 0)


@dataclass(frozen=True, slots=True)
class ReserveRelease:
    """RESERVE / RELEASE (6), (10) (SPC-2 7.21-7.24): the whole unit, for the sending I_T nexus."""

    opcode: Opcode

    @property
    def reserve(self) -> bool:
        return self.opcode in (Opcode.RESERVE_6, Opcode.RESERVE_10)

    def encode(self) -> bytes:
        return bytes([self.opcode]) + bytes(CDB_SIZE[self.opcode] - 1)


@dataclass(frozen=True, slots=True)
class SynchronizeCache:
    """SYNCHRONIZE CACHE (10), (16). blocks 0 means "to the last LBA"."""

    opcode: Opcode
    lba: int = 0
    blocks: int = 0
    immed: bool = False

    def encode(self) -> bytes:
        flags = 0x02 if self.immed else 0
        return _pack_lba_cdb(self.opcode, flags, self.lba, self.blocks)


@dataclass(frozen=True, slots=True)
class WriteSame:
    """WRITE SAME (10), (16); `ndob` (no data-out buffer: zeros) only exists in (16)."""

    opcode: Opcode
    lba: int
    blocks: int
    unmap: bool = False
    ndob: bool = False

    def encode(self) -> bytes:
        flags = (0x08 if self.unmap else 0) | (0x01 if self.ndob else 0)
        return _pack_lba_cdb(self.opcode, flags, self.lba, self.blocks)


@dataclass(frozen=True, slots=True)
class Unmap:
    param_len: int

    def encode(self) -> bytes:
        return _CDB10.pack(Opcode.UNMAP, 0, 0, 0, self.param_len, 0)


@dataclass(frozen=True, slots=True)
class Inquiry:
    evpd: bool
    page: int
    alloc: int

    def encode(self) -> bytes:
        return struct.pack(">BBBHB", Opcode.INQUIRY, int(self.evpd), self.page, self.alloc, 0)


@dataclass(frozen=True, slots=True)
class ModeSense:
    """MODE SENSE (6), (10). pc: 0 current, 1 changeable, 2 default (3 saved is rejected)."""

    opcode: Opcode
    pc: int
    page: int
    subpage: int
    alloc: int
    dbd: bool = False
    llbaa: bool = False  # (10) only

    @property
    def long_header(self) -> bool:
        return self.opcode == Opcode.MODE_SENSE_10

    def encode(self) -> bytes:
        flags = (0x08 if self.dbd else 0) | (0x10 if self.llbaa else 0)
        b2 = (self.pc << 6) | self.page
        if self.opcode == Opcode.MODE_SENSE_6:
            return _ALLOC6.pack(self.opcode, flags, b2, self.subpage, self.alloc, 0)
        return _MODE10.pack(self.opcode, flags, b2, self.subpage, self.alloc, 0)


@dataclass(frozen=True, slots=True)
class ModeSelect:
    """MODE SELECT (6), (10). SP (save pages) is rejected: nothing is saved across power loss."""

    opcode: Opcode
    param_len: int
    pf: bool = True

    @property
    def long_header(self) -> bool:
        return self.opcode == Opcode.MODE_SELECT_10

    def encode(self) -> bytes:
        flags = 0x10 if self.pf else 0
        if self.opcode == Opcode.MODE_SELECT_6:
            return _ALLOC6.pack(self.opcode, flags, 0, 0, self.param_len, 0)
        return _MSEL10.pack(self.opcode, flags, self.param_len, 0)


@dataclass(frozen=True, slots=True)
class StartStopUnit:
    start: bool
    loej: bool = False
    no_flush: bool = False
    power_condition: int = 0
    immed: bool = False

    @property
    def stops(self) -> bool:
        """Whether the command takes the unit out of the active state (flush first)."""
        if self.power_condition == 0:
            return not self.start
        return self.power_condition in (0x3, 0xB)  # STANDBY, FORCE_STANDBY_0

    def encode(self) -> bytes:
        b4 = (
            (self.power_condition << 4)
            | (0x04 if self.no_flush else 0)
            | (0x02 if self.loej else 0)
            | (0x01 if self.start else 0)
        )
        return _ALLOC6.pack(Opcode.START_STOP_UNIT, int(self.immed), 0, 0, b4, 0)


@dataclass(frozen=True, slots=True)
class PreventAllowMediumRemoval:
    prevent: int

    def encode(self) -> bytes:
        return _ALLOC6.pack(Opcode.PREVENT_ALLOW_MEDIUM_REMOVAL, 0, 0, 0, self.prevent, 0)


@dataclass(frozen=True, slots=True)
class ReadFormatCapacities:
    alloc: int

    def encode(self) -> bytes:
        return _RFC.pack(Opcode.READ_FORMAT_CAPACITIES, self.alloc, 0)


@dataclass(frozen=True, slots=True)
class ReadCapacity10:
    def encode(self) -> bytes:
        return bytes([Opcode.READ_CAPACITY_10]) + bytes(9)


@dataclass(frozen=True, slots=True)
class ReadCapacity16:
    alloc: int

    def encode(self) -> bytes:
        return _SAI16.pack(Opcode.SERVICE_ACTION_IN_16, ServiceActionIn16.READ_CAPACITY_16, self.alloc, 0, 0)


@dataclass(frozen=True, slots=True)
class ReportLuns:
    select_report: int
    alloc: int

    def encode(self) -> bytes:
        return _RLUNS.pack(Opcode.REPORT_LUNS, self.select_report, self.alloc, 0)


Command = (
    TestUnitReady
    | RequestSense
    | ReadWrite
    | Verify
    | SynchronizeCache
    | WriteSame
    | Unmap
    | Inquiry
    | ModeSense
    | ModeSelect
    | StartStopUnit
    | PreventAllowMediumRemoval
    | ReadFormatCapacities
    | ReadCapacity10
    | ReadCapacity16
    | ReportLuns
    | WriteAndVerify
    | PreFetch
    | CompareAndWrite
    | PersistentReserveIn
    | PersistentReserveOut
    | ReportSupportedOpcodes
    | ReserveRelease
)


# ---- the gate ---------------------------------------------------------------------------------


def _check_bits(cdb: bytes) -> int:
    """Check CDB length and reserved bits; return the opcode."""
    if not cdb:
        raise CommandError(illegal_request(Asc.INVALID_COMMAND_OPERATION_CODE))
    opcode = cdb[0]
    entry = _FORBIDDEN.get(opcode)
    if entry is None:
        raise CommandError(illegal_request(Asc.INVALID_COMMAND_OPERATION_CODE))
    size, forbidden = entry
    if len(cdb) < size:
        # A CBW whose bCBWCBLength is shorter than the opcode's CDB: point at the first byte missing.
        raise CommandError(invalid_field_in_cdb(len(cdb)))
    # Longer is fine and the tail is ignored (Windows sends REQUEST SENSE with bCBWCBLength 12).
    bad = int.from_bytes(cdb[1:size], "big") & forbidden
    if bad:
        for index in range(1, size):
            mask = _ALLOWED[opcode][index]
            extra = cdb[index] & ~mask & 0xFF
            if extra:
                raise CommandError(invalid_field_in_cdb(index, extra.bit_length() - 1))
    return opcode


def _lba_length(op: Opcode, cdb: bytes) -> tuple[int, int, int, int]:
    """(flags, lba, blocks, offset of the length field) of a 10-, 12- or 16-byte block CDB."""
    size = CDB_SIZE[op]
    if size == 10:
        _, flags, lba, _, blocks, _ = _CDB10.unpack_from(cdb)
        return flags, lba, blocks, 7
    if size == 12:
        _, flags, lba, blocks, _, _ = _CDB12.unpack_from(cdb)
        return flags, lba, blocks, 6
    _, flags, lba, blocks, _, _ = _CDB16.unpack_from(cdb)
    return flags, lba, blocks, 10


PROUT_PARAMETER_LIST_LENGTH = 24  # SPC-4 6.16.3, without SPEC_I_PT


#: Opcode(value) of every opcode, without the enum's Python-level call (once per command)
_OPCODE_OF: dict[int, Opcode] = {int(op): op for op in Opcode}


def _decode(opcode: int, cdb: bytes, limits: Limits) -> Command:
    op = _OPCODE_OF.get(opcode)
    if op is None:  # not an opcode at all (the caller checked it is one): the enum says so
        op = Opcode(opcode)
    if op in (Opcode.READ_12, Opcode.WRITE_12):
        flags, lba, blocks, length_at = _lba_length(op, cdb)
        if blocks > limits.max_transfer_blocks:
            raise CommandError(invalid_field_in_cdb(length_at))
        limits.check_range(lba, blocks)
        return ReadWrite(op, lba, blocks, fua=bool(flags & 0x08), dpo=bool(flags & 0x10))
    if op in (Opcode.READ_10, Opcode.WRITE_10, Opcode.READ_16, Opcode.WRITE_16):
        if op in (Opcode.READ_10, Opcode.WRITE_10):
            _, flags, lba, _, blocks, _ = _CDB10.unpack_from(cdb)
            length_at = 7
        else:
            _, flags, lba, blocks, _, _ = _CDB16.unpack_from(cdb)
            length_at = 10
        if blocks > limits.max_transfer_blocks:
            raise CommandError(invalid_field_in_cdb(length_at))
        limits.check_range(lba, blocks)
        return ReadWrite(op, lba, blocks, fua=bool(flags & 0x08), dpo=bool(flags & 0x10))
    if op in (Opcode.READ_6, Opcode.WRITE_6):
        _, hi, lo, raw, _ = _RW6.unpack_from(cdb)
        lba = (hi << 16) | lo
        blocks = raw or 256  # SBC-3 5.15: TRANSFER LENGTH 0 means 256 blocks
        if blocks > limits.max_transfer_blocks:
            raise CommandError(invalid_field_in_cdb(4))
        limits.check_range(lba, blocks)
        return ReadWrite(op, lba, blocks)
    if op in (Opcode.VERIFY_10, Opcode.VERIFY_12, Opcode.VERIFY_16):
        flags, lba, blocks, length_at = _lba_length(op, cdb)
        bytchk = (flags >> 1) & 0x03
        if bytchk == 2:  # reserved value
            raise CommandError(invalid_field_in_cdb(1, 2))
        if blocks > limits.max_transfer_blocks:
            raise CommandError(invalid_field_in_cdb(length_at))
        limits.check_range(lba, blocks)
        return Verify(op, lba, blocks, bytchk, dpo=bool(flags & 0x10))
    if op in (Opcode.SYNCHRONIZE_CACHE_10, Opcode.SYNCHRONIZE_CACHE_16):
        if op == Opcode.SYNCHRONIZE_CACHE_10:
            _, flags, lba, _, blocks, _ = _CDB10.unpack_from(cdb)
        else:
            _, flags, lba, blocks, _, _ = _CDB16.unpack_from(cdb)
        limits.check_range(lba, blocks)
        return SynchronizeCache(op, lba, blocks, immed=bool(flags & 0x02))
    if op in (Opcode.WRITE_SAME_10, Opcode.WRITE_SAME_16):
        if op == Opcode.WRITE_SAME_10:
            _, flags, lba, _, blocks, _ = _CDB10.unpack_from(cdb)
            length_at = 7
        else:
            _, flags, lba, blocks, _, _ = _CDB16.unpack_from(cdb)
            length_at = 10
        # Block Limits VPD advertises WSNZ=1: zero blocks ("to the end of the medium") is refused.
        if blocks == 0 or blocks > limits.max_write_same_blocks:
            raise CommandError(invalid_field_in_cdb(length_at))
        limits.check_range(lba, blocks)
        return WriteSame(op, lba, blocks, unmap=bool(flags & 0x08), ndob=bool(flags & 0x01))
    if op in (Opcode.WRITE_AND_VERIFY_10, Opcode.WRITE_AND_VERIFY_12, Opcode.WRITE_AND_VERIFY_16):
        flags, lba, blocks, length_at = _lba_length(op, cdb)
        bytchk = (flags >> 1) & 0x03
        if bytchk > 1:  # 10b reserved; 11b (one block for every LBA) is not supported
            raise CommandError(invalid_field_in_cdb(1, 2 if bytchk & 2 else 1))
        if blocks > limits.max_transfer_blocks:
            raise CommandError(invalid_field_in_cdb(length_at))
        limits.check_range(lba, blocks)
        return WriteAndVerify(op, lba, blocks, bytchk, dpo=bool(flags & 0x10))
    if op in (Opcode.PRE_FETCH_10, Opcode.PRE_FETCH_16):
        flags, lba, blocks, _ = _lba_length(op, cdb)
        limits.check_range(lba, blocks)
        return PreFetch(op, lba, blocks, immed=bool(flags & 0x02))
    if op == Opcode.COMPARE_AND_WRITE:
        _, flags, lba, blocks, _, _ = _CAW.unpack_from(cdb)
        if blocks > limits.max_compare_blocks or 2 * blocks > limits.max_transfer_blocks:
            raise CommandError(invalid_field_in_cdb(13))
        limits.check_range(lba, blocks)
        return CompareAndWrite(lba, blocks, fua=bool(flags & 0x08), dpo=bool(flags & 0x10))
    if op == Opcode.PERSISTENT_RESERVE_IN:
        _, sa, alloc, _ = _PRIN.unpack_from(cdb)
        if sa not in PrInAction._value2member_map_:
            raise CommandError(invalid_field_in_cdb(1, 4))
        return PersistentReserveIn(PrInAction(sa), alloc)
    if op == Opcode.PERSISTENT_RESERVE_OUT:
        _, sa, scope_type, param_len, _ = _PROUT.unpack_from(cdb)
        if sa not in PrOutAction._value2member_map_ or sa == PrOutAction.REGISTER_AND_MOVE:
            raise CommandError(invalid_field_in_cdb(1, 4))  # REGISTER AND MOVE is not offered
        if param_len > PROUT_PARAMETER_LIST_LENGTH:
            # every action offered takes the 24-byte list (SPEC_I_PT and ALL_TG_PT are refused):
            # refused here, before a transport would hold a data-out phase of up to 4 GiB for it
            raise CommandError(illegal_request(Asc.PARAMETER_LIST_LENGTH_ERROR))
        return PersistentReserveOut(PrOutAction(sa), scope_type >> 4, scope_type & 0x0F, param_len)
    if op == Opcode.MAINTENANCE_IN:
        _, sa, b2, req_op, req_sa, alloc, _ = _MAINT_IN.unpack_from(cdb)
        if sa != MaintenanceIn.REPORT_SUPPORTED_OPERATION_CODES:
            raise CommandError(invalid_field_in_cdb(1, 4))
        options = b2 & 0x07
        if options > 3:
            raise CommandError(invalid_field_in_cdb(2, 2))
        return ReportSupportedOpcodes(options, req_op, req_sa, alloc, rctd=bool(b2 & 0x80))
    if op in (Opcode.RESERVE_6, Opcode.RELEASE_6, Opcode.RESERVE_10, Opcode.RELEASE_10):
        return ReserveRelease(op)
    if op == Opcode.TEST_UNIT_READY:
        return TestUnitReady()
    if op == Opcode.REQUEST_SENSE:
        if cdb[1] & 0x01:  # DESC: descriptor-format sense is not supported (SPC-4 6.39)
            raise CommandError(invalid_field_in_cdb(1, 0))
        return RequestSense(cdb[4])
    if op == Opcode.INQUIRY:
        evpd = bool(cdb[1] & 0x01)
        if not evpd and cdb[2] != 0:  # SPC-4 6.6.1: PAGE CODE must be 0 when EVPD is 0
            raise CommandError(invalid_field_in_cdb(2))
        return Inquiry(evpd, cdb[2], int.from_bytes(cdb[3:5], "big"))
    if op in (Opcode.MODE_SENSE_6, Opcode.MODE_SENSE_10):
        if op == Opcode.MODE_SENSE_6:
            _, flags, b2, subpage, alloc, _ = _ALLOC6.unpack_from(cdb)
        else:
            _, flags, b2, subpage, alloc, _ = _MODE10.unpack_from(cdb)
        pc = b2 >> 6
        if pc == 3:
            raise CommandError(illegal_request(Asc.SAVING_PARAMETERS_NOT_SUPPORTED))
        return ModeSense(op, pc, b2 & 0x3F, subpage, alloc, dbd=bool(flags & 0x08), llbaa=bool(flags & 0x10))
    if op in (Opcode.MODE_SELECT_6, Opcode.MODE_SELECT_10):
        flags = cdb[1]
        if flags & 0x01:  # SP: there are no saved pages (SPC-4 6.11)
            raise CommandError(invalid_field_in_cdb(1, 0))
        length = cdb[4] if op == Opcode.MODE_SELECT_6 else _MSEL10.unpack_from(cdb)[2]
        return ModeSelect(op, length, pf=bool(flags & 0x10))
    if op == Opcode.UNMAP:
        return Unmap(_CDB10.unpack_from(cdb)[4])
    if op == Opcode.START_STOP_UNIT:
        pcond = cdb[4] >> 4
        if pcond not in POWER_CONDITIONS:
            raise CommandError(invalid_field_in_cdb(4, 7))
        b4 = cdb[4]
        return StartStopUnit(
            start=bool(b4 & 0x01),
            loej=bool(b4 & 0x02),
            no_flush=bool(b4 & 0x04),
            power_condition=pcond,
            immed=bool(cdb[1] & 0x01),
        )
    if op == Opcode.PREVENT_ALLOW_MEDIUM_REMOVAL:
        return PreventAllowMediumRemoval(cdb[4] & 0x03)
    if op == Opcode.READ_FORMAT_CAPACITIES:
        return ReadFormatCapacities(_RFC.unpack_from(cdb)[1])
    if op == Opcode.READ_CAPACITY_10:
        return ReadCapacity10()
    if op == Opcode.SERVICE_ACTION_IN_16:
        _, sa, alloc, _, _ = _SAI16.unpack_from(cdb)
        if sa != ServiceActionIn16.READ_CAPACITY_16:
            raise CommandError(invalid_field_in_cdb(1, 4))
        return ReadCapacity16(alloc)
    if op == Opcode.REPORT_LUNS:
        _, select, alloc, _ = _RLUNS.unpack_from(cdb)
        if select not in (0x00, 0x01, 0x02):  # well-known LU addressing (0x10-0x12) not served
            raise CommandError(invalid_field_in_cdb(2))
        return ReportLuns(select, alloc)
    raise AssertionError(f"opcode {op.name} has an allowed-bits entry but no decoder")


def check_command(cdb: bytes, limits: Limits) -> Command:
    """Validate `cdb` completely and decode it. Raises `CommandError` with the sense to report."""
    opcode = _check_bits(cdb)
    return _decode(opcode, cdb, limits)
