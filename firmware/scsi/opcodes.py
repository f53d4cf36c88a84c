"""SCSI operation codes and service actions the usbmirror block target knows (SPC-4, SBC-3).

Only names live here; which opcodes are accepted, and how their CDBs are laid out, is decided in
`firmware.scsi.cdb`.
"""

from __future__ import annotations

import enum


class Opcode(enum.IntEnum):
    """Operation codes (byte 0 of the CDB)."""

    TEST_UNIT_READY = 0x00
    REQUEST_SENSE = 0x03
    READ_6 = 0x08
    WRITE_6 = 0x0A
    INQUIRY = 0x12
    MODE_SELECT_6 = 0x15
    MODE_SENSE_6 = 0x1A
    START_STOP_UNIT = 0x1B
    PREVENT_ALLOW_MEDIUM_REMOVAL = 0x1E
    READ_FORMAT_CAPACITIES = 0x23  # MMC / UFI; Windows asks for it on USB disks
    READ_CAPACITY_10 = 0x25
    READ_10 = 0x28
    WRITE_10 = 0x2A
    VERIFY_10 = 0x2F
    SYNCHRONIZE_CACHE_10 = 0x35
    WRITE_SAME_10 = 0x41
    UNMAP = 0x42
    MODE_SELECT_10 = 0x55
    MODE_SENSE_10 = 0x5A
    WRITE_AND_VERIFY_10 = 0x2E
    PRE_FETCH_10 = 0x34
    READ_DEFECT_DATA_10 = 0x37
    RESERVE_6 = 0x16
    RELEASE_6 = 0x17
    RESERVE_10 = 0x56
    RELEASE_10 = 0x57
    PERSISTENT_RESERVE_IN = 0x5E
    PERSISTENT_RESERVE_OUT = 0x5F
    READ_16 = 0x88
    COMPARE_AND_WRITE = 0x89
    WRITE_16 = 0x8A
    WRITE_AND_VERIFY_16 = 0x8E
    VERIFY_16 = 0x8F
    PRE_FETCH_16 = 0x90
    SYNCHRONIZE_CACHE_16 = 0x91
    WRITE_SAME_16 = 0x93
    SERVICE_ACTION_IN_16 = 0x9E
    REPORT_LUNS = 0xA0
    MAINTENANCE_IN = 0xA3
    READ_12 = 0xA8
    WRITE_12 = 0xAA
    WRITE_AND_VERIFY_12 = 0xAE
    VERIFY_12 = 0xAF
    READ_DEFECT_DATA_12 = 0xB7


class ServiceActionIn16(enum.IntEnum):
    """Service actions of SERVICE ACTION IN(16) (SBC-3 table 5) that are served."""

    READ_CAPACITY_16 = 0x10
    GET_LBA_STATUS = 0x12


class MaintenanceIn(enum.IntEnum):
    """Service actions of MAINTENANCE IN (SPC-4 table 8) that are served."""

    REPORT_SUPPORTED_OPERATION_CODES = 0x0C


class PrInAction(enum.IntEnum):
    """PERSISTENT RESERVE IN service actions (SPC-4 6.15.1)."""

    READ_KEYS = 0x00
    READ_RESERVATION = 0x01
    REPORT_CAPABILITIES = 0x02
    READ_FULL_STATUS = 0x03


class PrOutAction(enum.IntEnum):
    """PERSISTENT RESERVE OUT service actions (SPC-4 6.16.2)."""

    REGISTER = 0x00
    RESERVE = 0x01
    RELEASE = 0x02
    CLEAR = 0x03
    PREEMPT = 0x04
    PREEMPT_AND_ABORT = 0x05
    REGISTER_AND_IGNORE_EXISTING_KEY = 0x06
    REGISTER_AND_MOVE = 0x07


_KNOWN = {int(op): op.name for op in Opcode}
#: `opcode_name()` of every byte value, indexed by it (the target looks its opcode up once per command)
OPCODE_NAMES: tuple[str, ...] = tuple(_KNOWN.get(op, f"0x{op:02X}") for op in range(256))


def opcode_name(opcode: int) -> str:
    """Name for counters and logs: the enum name, or `0xNN` for an opcode this target rejects."""
    return OPCODE_NAMES[opcode] if 0 <= opcode < 256 else f"0x{opcode:02X}"
