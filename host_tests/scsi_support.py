"""Helpers shared by the SCSI target tests: build a target over the in-memory store, run a CDB the
way the BOT transport would (plan first, then execute with exactly the planned DATA-OUT), and
fetch sense data."""

from __future__ import annotations

import struct

from firmware.logical_unit import CommandResult, Direction, Status
from firmware.scsi import ScsiTarget
from firmware.scsi.sense import Sense
from host_tests.scsi_fakes import MemoryBlockStore

NAA3_ID = bytes.fromhex("3123456789abcdef")


def make_target(
    *, block_size: int = 512, num_blocks: int = 2048, write_cache: bool = False, read_only: bool = False, **kw: object
) -> tuple[ScsiTarget, MemoryBlockStore]:
    store = MemoryBlockStore(block_size=block_size, num_blocks=num_blocks, write_cache=write_cache, read_only=read_only)
    kw.setdefault("serial", "UM0001")
    kw.setdefault("device_id", NAA3_ID)
    return ScsiTarget(store, **kw), store  # type: ignore[arg-type]


def run(target: ScsiTarget, cdb: bytes, data_out: bytes = b"") -> CommandResult:
    """Plan, then execute; checks the invariants a transport relies on."""
    plan = target.plan(cdb)
    if plan.direction == Direction.OUT:
        assert len(data_out) == plan.length, f"test gave {len(data_out)} bytes, target planned {plan.length}"
    else:
        assert data_out == b"", f"target planned {plan} but the test has data-out"
    result = target.execute(cdb, data_out)
    assert result.status in (Status.GOOD, Status.CHECK_CONDITION)
    if result.status == Status.GOOD and plan.direction == Direction.IN:
        assert len(result.data) == plan.length
    if plan.direction != Direction.IN:
        assert result.data == b""
    return result


def request_sense(target: ScsiTarget) -> Sense:
    result = target.execute(bytes([0x03, 0, 0, 0, 18, 0]))
    assert result.status == Status.GOOD
    assert len(result.data) == 18
    return Sense.from_fixed(result.data)


def expect_check(target: ScsiTarget, cdb: bytes, key: int, asc: int, ascq: int = 0, data_out: bytes = b"") -> Sense:
    result = run(target, cdb, data_out)
    assert result.status == Status.CHECK_CONDITION, f"expected CHECK CONDITION for {cdb.hex()}"
    sense = request_sense(target)
    assert (sense.key, sense.asc, sense.ascq) == (key, asc, ascq), sense.label
    return sense


def expect_good(target: ScsiTarget, cdb: bytes, data_out: bytes = b"") -> bytes:
    result = run(target, cdb, data_out)
    if result.status != Status.GOOD:
        raise AssertionError(f"{cdb.hex()} failed: {request_sense(target).label}")
    return result.data


def rw10(opcode: int, lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBIBHB", opcode, flags, lba, 0, blocks, 0)


def rw16(opcode: int, lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBQIBB", opcode, flags, lba, blocks, 0, 0)
