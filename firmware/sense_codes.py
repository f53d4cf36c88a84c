"""SCSI sense keys and additional sense codes (ASC/ASCQ), the one definition of their numbers.

A neutral module below both users: the SCSI layer (`firmware.scsi.sense`, which builds sense data
from them) and the block-storage contract (`firmware.storage`, whose errors name the sense the host
hears). It imports nothing of the project.
"""

from __future__ import annotations

import enum

__all__ = ["Asc", "SenseKey"]


class SenseKey(enum.IntEnum):
    """SPC-4 table 51."""

    NO_SENSE = 0x0
    RECOVERED_ERROR = 0x1
    NOT_READY = 0x2
    MEDIUM_ERROR = 0x3
    HARDWARE_ERROR = 0x4
    ILLEGAL_REQUEST = 0x5
    UNIT_ATTENTION = 0x6
    DATA_PROTECT = 0x7
    BLANK_CHECK = 0x8
    VENDOR_SPECIFIC = 0x9
    COPY_ABORTED = 0xA
    ABORTED_COMMAND = 0xB
    VOLUME_OVERFLOW = 0xD
    MISCOMPARE = 0xE


class Asc(enum.IntEnum):
    """Additional sense code and qualifier as one number, `asc << 8 | ascq` (SPC-4 table D.1)."""

    NO_ADDITIONAL_SENSE_INFORMATION = 0x0000
    LOGICAL_UNIT_NOT_READY_CAUSE_NOT_REPORTABLE = 0x0400
    WRITE_ERROR = 0x0C00
    UNRECOVERED_READ_ERROR = 0x1100
    PARAMETER_LIST_LENGTH_ERROR = 0x1A00
    MISCOMPARE_DURING_VERIFY_OPERATION = 0x1D00
    INVALID_COMMAND_OPERATION_CODE = 0x2000
    LOGICAL_BLOCK_ADDRESS_OUT_OF_RANGE = 0x2100
    INVALID_FIELD_IN_CDB = 0x2400
    INVALID_FIELD_IN_PARAMETER_LIST = 0x2600
    INVALID_RELEASE_OF_PERSISTENT_RESERVATION = 0x2604
    WRITE_PROTECTED = 0x2700
    SPACE_ALLOCATION_FAILED_WRITE_PROTECT = 0x2707
    POWER_ON_RESET_OR_BUS_DEVICE_RESET_OCCURRED = 0x2900
    MODE_PARAMETERS_CHANGED = 0x2A01
    CAPACITY_DATA_HAS_CHANGED = 0x2A09
    SAVING_PARAMETERS_NOT_SUPPORTED = 0x3900
    INTERNAL_TARGET_FAILURE = 0x4400
    DATA_PHASE_ERROR = 0x4B00

    @property
    def asc(self) -> int:
        return self.value >> 8

    @property
    def ascq(self) -> int:
        return self.value & 0xFF
