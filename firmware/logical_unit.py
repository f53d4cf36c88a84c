"""The contract between a SCSI transport and the logical unit behind it, and the types both need.

A transport (the USB Bulk-Only Transport in `gadget/bot.py`; any other that carries CDBs) needs two
things from a logical unit for each command:

1. `plan(cdb)`: what the *device* intends to do with the data phase (direction and byte count:
   the "Dn / Di / Do" of BOT 1.0 section 6.7), decided from the CDB alone and before any data moves,
   so the transport can check the host's expectation against it. The transport never decodes a CDB
   itself: this plan is all it knows about the command.
2. `execute(cdb, data_out)`: run the command and report status (and data for a DATA-IN command).

and has one thing to tell it: `reset_event()`, the bus it sits on was reset or the host
re-enumerated it (SAM-5 "power on, reset or I_T nexus loss"), so the next command gets a unit
attention.

The logical unit keeps its own sense data (for REQUEST SENSE) and never raises for bad input: a CDB
it cannot accept yields a plan with `Direction.NONE` and an `execute()` that returns CHECK CONDITION.

What this contract does *not* do: it never touches an endpoint, never stalls, never computes a
residue. Those are the transport's job.

This module is deliberately on its own: it imports nothing from the SCSI target (`firmware.scsi`)
or the USB side (`gadget`), so each of them depends on it and neither on the other. A logical unit
satisfies `LogicalUnit` structurally (no base class).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

__all__ = ["CommandPlan", "CommandResult", "Direction", "LogicalUnit", "Status"]


class Direction(enum.IntEnum):
    """Direction of the data phase, from the host's point of view (USB naming)."""

    NONE = 0
    IN = 1  # device to host (READ, INQUIRY, ...)
    OUT = 2  # host to device (WRITE, MODE SELECT, UNMAP, ...)


class Status(enum.IntEnum):
    """SCSI status byte values (SAM-5 5.3, status codes) that a logical unit returns."""

    GOOD = 0x00
    CHECK_CONDITION = 0x02
    RESERVATION_CONFLICT = 0x18  # another I_T nexus holds a reservation (no sense data)


@dataclass(frozen=True, slots=True)
class CommandPlan:
    """What the device intends to transfer for one CDB."""

    direction: Direction
    length: int  # bytes the device intends to transfer (0 when direction is NONE)


@dataclass(frozen=True, slots=True)
class CommandResult:
    """Outcome of executing one CDB.

    `data` is the DATA-IN payload (at most `plan.length` bytes; shorter means the device ends the
    data phase early and the transport pads/stalls as its protocol requires). For DATA-OUT and
    no-data commands `data` is empty. On CHECK CONDITION the sense data is kept by the unit and
    returned by the next REQUEST SENSE.
    """

    status: Status
    data: bytes = b""


class LogicalUnit(Protocol):
    """One SCSI logical unit as a transport sees it. `firmware.scsi.ScsiTarget` is one.

    Threads: a transport calls `plan()` from the thread that receives commands and `execute()` from
    its command executor, one command at a time and never concurrently with another `execute()`;
    `reset_event()` is called in order with `execute()` (between two commands, never during one).
    """

    def plan(self, cdb: bytes) -> CommandPlan:
        """Decode `cdb` far enough to know the data phase.

        `cdb` is the CDB as the transport received it (1..16 bytes). It may be longer than the
        opcode's own CDB size (Windows sends REQUEST SENSE with bCBWCBLength 12); extra bytes are
        ignored. Must not change what a later `execute()` of any CDB does.
        """
        ...

    def execute(self, cdb: bytes, data_out: bytes = b"") -> CommandResult:
        """Run the command. For DATA-OUT commands `data_out` holds exactly `plan(cdb).length`
        bytes (a transport never calls execute with a short DATA-OUT buffer: a host that sends
        less is a transport error and the command is not run). May block (e.g. until a write is
        durable): a transport calls it off its control path."""
        ...

    def reset_event(self) -> None:
        """The host reset or re-enumerated the device (power on, USB reset, a new configuration):
        the next command other than INQUIRY, REPORT LUNS or REQUEST SENSE gets UNIT ATTENTION,
        POWER ON, RESET, OR BUS DEVICE RESET OCCURRED (29h/00)."""
        ...
