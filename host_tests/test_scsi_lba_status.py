"""GET LBA STATUS: one "mapped or unknown" descriptor to the end of the medium, LBA range checked."""

from __future__ import annotations

import struct

from firmware.logical_unit import Direction, Status
from firmware.scsi.lba_status import LbaStatusTarget
from host_tests.scsi_fakes import MemoryBlockStore


def _cdb(lba: int, alloc: int) -> bytes:
    return struct.pack(">BBQIBB", 0x9E, 0x12, lba, alloc, 0, 0)


def _target() -> LbaStatusTarget:
    return LbaStatusTarget(MemoryBlockStore(512, 2048), serial="TEST0001", device_id=b"0123456789abcdef")


def test_get_lba_status_describes_the_rest_of_the_medium() -> None:
    t = _target()
    cdb = _cdb(100, 24)
    assert t.plan(cdb).direction is Direction.IN and t.plan(cdb).length == 24
    r = t.execute(cdb)
    assert r.status == Status.GOOD
    length, lba, blocks, status = struct.unpack(">I4xQIB3x", r.data)
    assert (length, lba, blocks, status) == (20, 100, 2048 - 100, 0)
    assert t.execute(_cdb(0, 8)).data[:4] == (20).to_bytes(4, "big")  # cut to the allocation length


def test_get_lba_status_beyond_the_end_is_lba_out_of_range() -> None:
    t = _target()
    assert t.plan(_cdb(2048, 24)).direction is Direction.NONE
    assert t.execute(_cdb(2048, 24)).status == Status.CHECK_CONDITION
    assert (t.sense.key, t.sense.asc) == (0x05, 0x21)


def test_other_commands_go_to_the_scsi_target() -> None:
    t = _target()
    assert t.execute(bytes([0x25]) + bytes(9)).status == Status.GOOD  # READ CAPACITY(10)
    assert t.status()["commands"]["READ_CAPACITY_10"] == 1
