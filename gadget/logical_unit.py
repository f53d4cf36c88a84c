"""The contract between the USB transports (`gadget/`) and the SCSI target (`firmware/scsi`).

The Bulk-Only Transport needs two things from a logical unit for each CBW:

1. `plan(cdb)`: what the *device* intends to do with the data phase (direction and byte count:
   the "Dn / Di / Do" of BOT 1.0 section 6.7), decided from the CDB alone and before any data moves,
   so the transport can classify the thirteen host/device cases.
2. `execute(cdb, data_out)`: run the command and report status (and data for a DATA-IN command).

The logical unit keeps its own sense data (for REQUEST SENSE) and never raises for bad input: a CDB
it cannot accept yields a plan with `Direction.NONE` and an `execute()` that returns CHECK CONDITION.

What this protocol does *not* do: it never touches an endpoint, never stalls, never computes a
residue. Those are the transport's job (`gadget/bot.py`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol


class Direction(enum.IntEnum):
    """Direction of the data phase, from the device's point of view of the host (USB naming)."""

    NONE = 0
    IN = 1  # device to host (READ, INQUIRY, ...)
    OUT = 2  # host to device (WRITE, MODE SELECT, UNMAP, ...)


class Status(enum.IntEnum):
    """SCSI status byte values (SAM-5 table 33) that this target returns."""

    GOOD = 0x00
    CHECK_CONDITION = 0x02


@dataclass(frozen=True, slots=True)
class CommandPlan:
    """What the device intends to transfer for one CDB."""

    direction: Direction
    length: int  # bytes the device intends to transfer (0 when direction is NONE)


@dataclass(frozen=True, slots=True)
class CommandResult:
    """Outcome of executing one CDB.

    `data` is the DATA-IN payload (at most `plan.length` bytes; shorter means the device ends the
    data phase early and the transport pads/stalls as BOT section 6.7 requires). For DATA-OUT and
    no-data commands `data` is empty. On CHECK CONDITION the sense data is kept by the unit and
    returned by the next REQUEST SENSE.
    """

    status: Status
    data: bytes = b""


class LogicalUnit(Protocol):
    """One SCSI logical unit as a USB transport sees it. Implemented by `firmware.scsi.ScsiTarget`."""

    def plan(self, cdb: bytes) -> CommandPlan:
        """Decode `cdb` far enough to know the data phase.

        `cdb` is the CBWCB field cut to bCBWCBLength (1..16 bytes). It may be longer than the
        opcode's own CDB size (Windows sends REQUEST SENSE with bCBWCBLength 12); extra bytes are
        ignored. Must not change state.
        """
        ...

    def execute(self, cdb: bytes, data_out: bytes = b"") -> CommandResult:
        """Run the command. For DATA-OUT commands `data_out` holds exactly `plan(cdb).length`
        bytes (the transport never calls execute with a short DATA-OUT buffer: a host that sends
        less is a phase error and the command is not run). May block (e.g. until a write is durable).
        """
        ...
