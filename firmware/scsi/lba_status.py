"""GET LBA STATUS (SBC-3 5.7, SERVICE ACTION IN(16) service action 0x12) on top of `ScsiTarget`.

The target advertises logical block provisioning (LBPME), and hosts that see it may ask which blocks are
mapped. The store does not say which blocks are deallocated, so the answer is one descriptor from the
starting LBA to the end of the medium (at most 2**32-1 blocks) with provisioning status 0, "mapped or
unknown" (SBC-3 table 60): true for every block, never claiming a block reads as zeros when it may not.

`LbaStatusTarget` is a `ScsiTarget` that answers this command and hands every other CDB to the base class.
"""

from __future__ import annotations

import struct

from firmware.logical_unit import CommandPlan, CommandResult, Direction, Status
from firmware.scsi.opcodes import Opcode
from firmware.scsi.reservations import ReservationConflict
from firmware.scsi.sense import NO_SENSE, Asc, Sense, SenseKey, invalid_field_in_cdb
from firmware.scsi.target import ScsiTarget

GET_LBA_STATUS = 0x12
_RESPONSE_LENGTH = 8 + 16  # header + one descriptor
_CDB_LENGTH = 16


def is_get_lba_status(cdb: bytes) -> bool:
    return len(cdb) >= _CDB_LENGTH and cdb[0] == Opcode.SERVICE_ACTION_IN_16 and cdb[1] & 0x1F == GET_LBA_STATUS


def get_lba_status(cdb: bytes, num_blocks: int) -> bytes | Sense:
    """The parameter data (cut to the allocation length) or the sense of a refused CDB."""
    if cdb[1] & 0xE0:
        return invalid_field_in_cdb(1)
    if cdb[15] & 0xFC:  # CONTROL: NACA and vendor bits are not supported
        return invalid_field_in_cdb(15)
    lba = int.from_bytes(cdb[2:10], "big")
    alloc = int.from_bytes(cdb[10:14], "big")
    if lba >= num_blocks:
        return Sense.of(SenseKey.ILLEGAL_REQUEST, Asc.LOGICAL_BLOCK_ADDRESS_OUT_OF_RANGE)
    blocks = min(num_blocks - lba, 0xFFFFFFFF)
    data = struct.pack(">I4xQIB3x", _RESPONSE_LENGTH - 4, lba, blocks, 0)
    return data[:alloc]


class LbaStatusTarget(ScsiTarget):
    """`ScsiTarget` plus GET LBA STATUS."""

    # CDB usage data: the bits `get_lba_status` accepts (bytes 2-14 are not checked; CONTROL bits 1-0)
    extra_service_actions = (
        (Opcode.SERVICE_ACTION_IN_16, GET_LBA_STATUS, bytes((0x9E, GET_LBA_STATUS, *(0xFF,) * 13, 0x03))),
    )

    def plan(self, cdb: bytes) -> CommandPlan:
        if not is_get_lba_status(cdb):
            return super().plan(cdb)
        answer = get_lba_status(cdb, self.num_blocks)
        if isinstance(answer, Sense) or not answer:
            return CommandPlan(Direction.NONE, 0)
        return CommandPlan(Direction.IN, len(answer))

    def execute(
        self, cdb: bytes, data_out: bytes | bytearray | memoryview = b"", nexus: str = ""
    ) -> CommandResult:
        if not is_get_lba_status(cdb) or self.unit_attentions:
            return super().execute(cdb, data_out, nexus)
        self._commands["GET_LBA_STATUS"] += 1
        reservations = self.shared.reservations
        if reservations.active:
            try:
                reservations.check(nexus, Opcode.READ_16)  # it reads the unit's state like a READ
            except ReservationConflict:
                self._errors["RESERVATION_CONFLICT"] += 1
                return CommandResult(Status.RESERVATION_CONFLICT)
        answer = get_lba_status(cdb, self.num_blocks)
        if isinstance(answer, Sense):
            return self._fail("GET_LBA_STATUS", answer)
        self._sense = NO_SENSE
        return CommandResult(Status.GOOD, answer)
