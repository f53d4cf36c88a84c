"""REPORT SUPPORTED OPERATION CODES (SPC-4 6.35, MAINTENANCE IN service action 0Ch).

The answer is built from the one table that decides what the target accepts, the allowed-bits table
of `firmware.scsi.cdb`: the CDB USAGE DATA of a command is its opcode followed by the bits this
target accepts in each byte (with the service action in its field for commands that have one), so
the report can never disagree with what `check_command` does.

Formats: all commands (REPORTING OPTIONS 0, 8-byte descriptors) and one command (1: opcode only, 2:
opcode and service action, 3: either), each with the optional 12-byte timeouts descriptor when RCTD
is set (no timeout is recommended: both values 0, "not specified").
"""

from __future__ import annotations

import struct

from firmware.scsi.cdb import ALLOWED_BITS, ReportSupportedOpcodes
from firmware.scsi.opcodes import MaintenanceIn, Opcode, PrInAction, PrOutAction, ServiceActionIn16
from firmware.scsi.sense import CommandError, invalid_field_in_cdb

# The byte holding the service action (bits 4-0) of each service-action command, and the actions served.
SERVICE_ACTIONS: dict[int, tuple[int, ...]] = {
    Opcode.SERVICE_ACTION_IN_16: (ServiceActionIn16.READ_CAPACITY_16,),
    Opcode.MAINTENANCE_IN: (MaintenanceIn.REPORT_SUPPORTED_OPERATION_CODES,),
    Opcode.PERSISTENT_RESERVE_IN: tuple(int(a) for a in PrInAction),
    Opcode.PERSISTENT_RESERVE_OUT: tuple(int(a) for a in PrOutAction if a is not PrOutAction.REGISTER_AND_MOVE),
}

SUPPORT_NOT_SUPPORTED = 0x1
SUPPORT_STANDARD = 0x3
_TIMEOUTS = struct.pack(">HxxII", 0x0A, 0, 0)  # descriptor length 0Ah, no timeouts given


def usage_data(opcode: int, service_action: int | None) -> bytes:
    mask = ALLOWED_BITS[opcode]
    data = bytearray((opcode, *mask[1:]))
    if service_action is not None:
        data[1] = (data[1] & 0xE0) | service_action
    return bytes(data)


def _commands(extra: tuple[tuple[int, int, bytes], ...]) -> list[tuple[int, int | None, bytes]]:
    """(opcode, service action or None, CDB usage data) of every command served."""
    out: list[tuple[int, int | None, bytes]] = []
    for opcode in sorted(ALLOWED_BITS):
        actions = SERVICE_ACTIONS.get(opcode)
        if actions is None:
            out.append((opcode, None, usage_data(opcode, None)))
        else:
            out.extend((opcode, sa, usage_data(opcode, sa)) for sa in actions)
    out.extend(extra)
    return sorted(out, key=lambda c: (c[0], c[1] or 0))


def report(cmd: ReportSupportedOpcodes, extra: tuple[tuple[int, int, bytes], ...] = ()) -> bytes:
    """The parameter data, untruncated. `extra`: (opcode, service action, usage data) of service
    actions a subclass of the target serves outside the CDB table (GET LBA STATUS)."""
    commands = _commands(extra)
    if cmd.options == 0:
        body = bytearray()
        for opcode, sa, usage in commands:
            flags = (0x02 if cmd.rctd else 0) | (0x01 if sa is not None else 0)
            body += struct.pack(">BxHxBH", opcode, sa or 0, flags, len(usage))
            if cmd.rctd:
                body += _TIMEOUTS
        return len(body).to_bytes(4, "big") + bytes(body)
    has_actions = any(c[0] == cmd.opcode and c[1] is not None for c in commands)
    if cmd.options == 1 and has_actions:
        raise CommandError(invalid_field_in_cdb(3))  # this opcode needs its service action (option 2)
    if cmd.options == 2 and not has_actions:
        raise CommandError(invalid_field_in_cdb(4))  # this opcode has no service actions
    if has_actions:
        match = [c for c in commands if c[0] == cmd.opcode and c[1] == cmd.service_action]
    else:
        match = [c for c in commands if c[0] == cmd.opcode]
    flags = 0x80 if cmd.rctd else 0
    if not match:
        return struct.pack(">BBH", 0, flags | SUPPORT_NOT_SUPPORTED, 0)
    usage = match[0][2]
    out = struct.pack(">BBH", 0, flags | SUPPORT_STANDARD, len(usage)) + usage
    return out + (_TIMEOUTS if cmd.rctd else b"")
