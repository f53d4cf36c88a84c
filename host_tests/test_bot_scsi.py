"""The Bulk-Only Transport over the real SCSI target (firmware/scsi) and an in-memory store: the
command sequence a host runs when it attaches a disk, then writes and reads, and what it sees
when a command fails (CSW status, residue, stall) -- no USB stack, no kernel."""

from __future__ import annotations

import struct

from firmware.scsi import ScsiTarget
from gadget.bot import BulkOnlyTransport, Cbw, Csw, CswStatus
from host_tests.scsi_fakes import MemoryBlockStore
from host_tests.test_bot import host_command

NAA3_ID = bytes.fromhex("3123456789abcdef")
BLOCK = 512
BLOCKS = 2048


def attached() -> tuple[BulkOnlyTransport, MemoryBlockStore]:
    store = MemoryBlockStore(block_size=BLOCK, num_blocks=BLOCKS)
    target = ScsiTarget(store, serial="UM0001", device_id=NAA3_ID)
    return BulkOnlyTransport(target), store


def request_sense(bot: BulkOnlyTransport, tag: int, cb_length: int = 6) -> tuple[int, int, int]:
    cdb = bytes([0x03, 0, 0, 0, 18, 0]).ljust(cb_length, b"\0")
    outcome = host_command(bot, Cbw.for_command(tag, cdb, 18, data_in=True))
    assert outcome.csw.status == CswStatus.PASSED
    sense = outcome.data
    return sense[2] & 0x0F, sense[12], sense[13]


def ready(bot: BulkOnlyTransport) -> None:
    """TEST UNIT READY until it passes, clearing unit attentions with REQUEST SENSE (as Linux does)."""
    for tag in range(100, 104):
        outcome = host_command(bot, Cbw.for_command(tag, bytes(6)))
        if outcome.csw.status == CswStatus.PASSED:
            return
        request_sense(bot, tag + 50)
    raise AssertionError("unit never became ready")


def test_attach_sequence_like_linux() -> None:
    bot, _store = attached()
    assert bot.get_max_lun() == 0
    inquiry = host_command(bot, Cbw.for_command(1, bytes([0x12, 0, 0, 0, 36, 0]), 36, data_in=True))
    assert inquiry.csw == Csw(1, 0, CswStatus.PASSED)
    assert len(inquiry.data) == 36 and inquiry.data[0] & 0x1F == 0x00  # direct-access block device
    ready(bot)
    capacity = host_command(bot, Cbw.for_command(2, bytes([0x25]) + bytes(9), 8, data_in=True))
    assert capacity.csw == Csw(2, 0, CswStatus.PASSED)
    assert struct.unpack(">II", capacity.data) == (BLOCKS - 1, BLOCK)
    # MODE SENSE(6) with a 192-byte allocation: the target has less, so case 5 (short + stall)
    # or case 6 if it plans the full allocation; either way the CSW is consistent with the data.
    mode = host_command(bot, Cbw.for_command(3, bytes([0x1A, 0, 0x3F, 0, 192, 0]), 192, data_in=True))
    assert mode.csw.status == CswStatus.PASSED
    assert mode.csw.residue == 192 - len(mode.data)
    assert mode.stalled_in == (1 if len(mode.data) < 192 else 0)
    assert mode.data[0] + 1 == len(mode.data)  # MODE DATA LENGTH excludes itself


def test_write_then_read_back_through_bot() -> None:
    store = MemoryBlockStore(block_size=BLOCK, num_blocks=BLOCKS)
    target = ScsiTarget(store, serial="UM0001", device_id=NAA3_ID)
    bot = BulkOnlyTransport(target)
    ready(bot)
    data = bytes((i * 31) & 0xFF for i in range(8 * BLOCK))
    write = struct.pack(">BBIBHB", 0x2A, 0, 100, 0, 8, 0)
    outcome = host_command(bot, Cbw.for_command(10, write, len(data)), data, out_pieces=[BLOCK] * 8)
    assert outcome.csw == Csw(10, 0, CswStatus.PASSED)
    read = struct.pack(">BBIBHB", 0x28, 0, 100, 0, 8, 0)
    outcome = host_command(bot, Cbw.for_command(11, read, len(data), data_in=True), in_request=BLOCK)
    assert outcome.csw == Csw(11, 0, CswStatus.PASSED)
    assert outcome.data == data
    sync = host_command(bot, Cbw.for_command(12, bytes([0x35]) + bytes(9)))
    assert sync.csw == Csw(12, 0, CswStatus.PASSED)
    commands = target.status()["commands"]  # opcodes are counted by the SCSI target, not the transport
    assert isinstance(commands, dict) and commands["WRITE_10"] == 1
    assert store.visible[100] == data[:BLOCK] and store.visible[107] == data[-BLOCK:]


def test_read_past_the_end_fails_with_residue_and_sense() -> None:
    bot, _store = attached()
    ready(bot)
    read = struct.pack(">BBIBHB", 0x28, 0, BLOCKS - 1, 0, 2, 0)
    outcome = host_command(bot, Cbw.for_command(20, read, 2 * BLOCK, data_in=True))
    assert outcome.csw == Csw(20, 2 * BLOCK, CswStatus.FAILED)
    assert outcome.stalled_in == 1 and outcome.data == b""
    assert request_sense(bot, 21) == (0x05, 0x21, 0x00)  # ILLEGAL REQUEST, LBA OUT OF RANGE


def test_unknown_opcode_and_windows_12_byte_request_sense() -> None:
    bot, _store = attached()
    ready(bot)
    outcome = host_command(bot, Cbw.for_command(30, bytes([0xFF]) + bytes(5)))
    assert outcome.csw == Csw(30, 0, CswStatus.FAILED)
    # MS-Windows sends REQUEST SENSE with bCBWCBLength 12
    assert request_sense(bot, 31, cb_length=12) == (0x05, 0x20, 0x00)  # INVALID COMMAND OPERATION CODE


def test_host_write_shorter_than_cdb_is_phase_error_and_not_written() -> None:
    bot, store = attached()
    ready(bot)
    write = struct.pack(">BBIBHB", 0x2A, 0, 5, 0, 4, 0)  # 4 blocks
    outcome = host_command(bot, Cbw.for_command(40, write, 2 * BLOCK), bytes([0xAA]) * (2 * BLOCK))
    assert outcome.csw.status == CswStatus.PHASE_ERROR  # case 13
    assert not any(call[0] == "write" for call in store.calls)
