"""COMPARE AND WRITE, READ/WRITE/VERIFY(12), WRITE AND VERIFY(10/12/16), PRE-FETCH(10/16) and REPORT
SUPPORTED OPERATION CODES over the ScsiTarget: good CDBs, bad CDBs and the sense of each."""

from __future__ import annotations

import struct
import threading

import pytest

from firmware.logical_unit import CommandPlan, Direction
from firmware.scsi.cdb import ALLOWED_BITS
from firmware.scsi.shared import SharedUnit
from firmware.scsi.target import ScsiTarget
from host_tests.scsi_fakes import MemoryBlockStore
from host_tests.scsi_support import NAA3_ID, expect_check, expect_good, make_target, rw10, rw16

BS = 512
ILLEGAL, MISCOMPARE, DATA_PROTECT = 0x05, 0x0E, 0x07
INVALID_CDB, LBA_RANGE, MISCOMPARE_ASC, WRITE_PROTECTED = 0x24, 0x21, 0x1D, 0x27


def rw12(opcode: int, lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBIIBB", opcode, flags, lba, blocks, 0, 0)


def caw(lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBQ3xBBB", 0x89, flags, lba, blocks, 0, 0)


def pattern(seed: int, blocks: int) -> bytes:
    return bytes((seed + i) & 0xFF for i in range(blocks * BS))


# ---- READ / WRITE / VERIFY (12) ---------------------------------------------------------------------


def test_read_write_12_round_trip_and_fua() -> None:
    t, store = make_target()
    data = pattern(3, 4)
    assert t.plan(rw12(0xAA, 10, 4)) == CommandPlan(Direction.OUT, 4 * BS)
    expect_good(t, rw12(0xAA, 10, 4, flags=0x08), data)  # FUA
    assert store.read(10, 4) == data
    assert t.status()["fua_writes"] == 1
    assert expect_good(t, rw12(0xA8, 10, 4, flags=0x10)) == data  # DPO
    assert expect_good(t, rw12(0xA8, 0, 0)) == b""  # zero blocks: nothing, no error


@pytest.mark.parametrize("opcode", [0xA8, 0xAA, 0xAF])
def test_12_byte_commands_bad_cdbs(opcode: int) -> None:
    t, _ = make_target(num_blocks=2048)
    expect_check(t, rw12(opcode, 2048, 1), ILLEGAL, LBA_RANGE)
    expect_check(t, rw12(opcode, 2047, 2), ILLEGAL, LBA_RANGE)
    sense = expect_check(t, rw12(opcode, 0, 2049), ILLEGAL, INVALID_CDB)  # beyond the 1 MiB maximum transfer
    assert sense.field_pointer is not None and sense.field_pointer.byte == 6
    sense = expect_check(t, rw12(opcode, 0, 1, flags=0x20), ILLEGAL, INVALID_CDB)  # RDPROTECT/WRPROTECT/VRPROTECT
    assert sense.field_pointer is not None and (sense.field_pointer.byte, sense.field_pointer.bit) == (1, 5)
    expect_check(t, rw12(opcode, 0, 1)[:11], ILLEGAL, INVALID_CDB)  # CDB cut short


def test_write_12_on_a_read_only_unit_is_write_protected() -> None:
    t, _ = make_target(read_only=True)
    expect_check(t, rw12(0xAA, 0, 1), DATA_PROTECT, WRITE_PROTECTED, data_out=bytes(BS))


def test_verify_12_compares_and_reports_the_offset() -> None:
    t, store = make_target()
    data = pattern(9, 2)
    store.write(4, data)
    expect_good(t, rw12(0xAF, 4, 2, flags=0x02), data)  # BYTCHK=1
    expect_good(t, rw12(0xAF, 4, 2))  # BYTCHK=0: readable
    bad = bytearray(data)
    bad[700] ^= 1
    sense = expect_check(t, rw12(0xAF, 4, 2, flags=0x02), MISCOMPARE, MISCOMPARE_ASC, data_out=bytes(bad))
    assert sense.information == 700


@pytest.mark.parametrize("first", [0, 1, 4095, 4096, 9000, 64 * BS - 1])
def test_verify_names_the_first_differing_byte_of_a_large_transfer(first: int) -> None:
    t, store = make_target()
    data = pattern(5, 64)
    store.write(0, data)
    bad = bytearray(data)
    for at in (first, first + 1, 64 * BS - 1):  # later differences do not count
        bad[min(at, 64 * BS - 1)] ^= 0x01
    cdb = rw16(0x8F, 0, 64, flags=0x02)  # VERIFY(16), BYTCHK=1
    sense = expect_check(t, cdb, MISCOMPARE, MISCOMPARE_ASC, data_out=bytes(bad))
    assert sense.information == first
    sense = expect_check(t, caw(0, 64), MISCOMPARE, MISCOMPARE_ASC, data_out=bytes(bad) + pattern(6, 64))
    assert sense.information == first
    assert store.read(0, 64) == data


# ---- WRITE AND VERIFY ------------------------------------------------------------------------------

WV = {0x2E: rw10, 0xAE: rw12, 0x8E: rw16}


@pytest.mark.parametrize("opcode", list(WV))
def test_write_and_verify_writes_then_reads_back(opcode: int) -> None:
    t, store = make_target()
    data = pattern(opcode, 3)
    for bytchk in (0, 1):
        expect_good(t, WV[opcode](opcode, 100, 3, flags=bytchk << 1), data)
        assert store.read(100, 3) == data
        data = pattern(opcode + 1, 3)
    assert t.status()["blocks_written"] == 6
    assert expect_good(t, WV[opcode](opcode, 0, 0)) == b""


class _BitRotStore(MemoryBlockStore):
    """Reads back one bit different from what was written: the medium did not keep the data."""

    def read(self, lba: int, blocks: int) -> bytes:
        data = bytearray(super().read(lba, blocks))
        data[5] ^= 0x80
        return bytes(data)


def test_write_and_verify_reports_a_medium_that_does_not_keep_the_data() -> None:
    store = _BitRotStore(block_size=BS, num_blocks=64)
    t = ScsiTarget(store, serial="UM0001", device_id=NAA3_ID)
    sense = expect_check(t, rw10(0x2E, 0, 1, flags=0x02), MISCOMPARE, MISCOMPARE_ASC, data_out=bytes(BS))
    assert sense.information == 5
    expect_good(t, rw10(0x2E, 0, 1), bytes(BS))  # BYTCHK=0: the blocks are read, not compared


@pytest.mark.parametrize("opcode", list(WV))
def test_write_and_verify_bad_cdbs(opcode: int) -> None:
    t, _ = make_target(num_blocks=2048)
    build = WV[opcode]
    expect_check(t, build(opcode, 2048, 1), ILLEGAL, LBA_RANGE)
    expect_check(t, build(opcode, 2040, 9), ILLEGAL, LBA_RANGE)
    for bytchk in (2, 3):  # reserved / one block for every LBA: not served
        sense = expect_check(t, build(opcode, 0, 1, flags=bytchk << 1), ILLEGAL, INVALID_CDB)
        assert sense.field_pointer is not None and sense.field_pointer.byte == 1
    for flags in (0x20, 0x40, 0x80, 0x01):  # WRPROTECT, obsolete bit 0
        expect_check(t, build(opcode, 0, 1, flags=flags), ILLEGAL, INVALID_CDB)
    expect_check(t, build(opcode, 0, 2049), ILLEGAL, INVALID_CDB)
    ro, _ = make_target(read_only=True)
    expect_check(ro, build(opcode, 0, 1), DATA_PROTECT, WRITE_PROTECTED, data_out=bytes(BS))


# ---- PRE-FETCH ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("build", [lambda lba, n, f=0: rw10(0x34, lba, n, f), lambda lba, n, f=0: rw16(0x90, lba, n, f)])
def test_pre_fetch(build: object) -> None:
    assert callable(build)
    t, _ = make_target(num_blocks=2048)
    assert t.plan(build(0, 16)) == CommandPlan(Direction.NONE, 0)
    expect_good(t, build(0, 16))
    expect_good(t, build(100, 0))  # to the last LBA
    expect_good(t, build(0, 16, 0x02))  # IMMED
    expect_check(t, build(2048, 1), ILLEGAL, LBA_RANGE)
    expect_check(t, build(2000, 49), ILLEGAL, LBA_RANGE)
    expect_check(t, build(0, 1, 0x04), ILLEGAL, INVALID_CDB)


# ---- COMPARE AND WRITE ---------------------------------------------------------------------------------


def test_compare_and_write_writes_when_everything_matches() -> None:
    t, store = make_target()
    old, new = pattern(1, 2), pattern(2, 2)
    store.write(50, old)
    assert t.plan(caw(50, 2)) == CommandPlan(Direction.OUT, 4 * BS)
    expect_good(t, caw(50, 2, flags=0x08), old + new)  # FUA
    assert store.read(50, 2) == new
    assert t.status()["fua_writes"] == 1
    expect_good(t, caw(50, 0))  # zero blocks: nothing compared, nothing written, no error


def test_compare_and_write_miscompare_writes_nothing_and_names_the_offset() -> None:
    t, store = make_target()
    old = pattern(1, 2)
    store.write(50, old)
    wrong = bytearray(old)
    wrong[BS + 17] ^= 0xFF
    sense = expect_check(t, caw(50, 2), MISCOMPARE, MISCOMPARE_ASC, data_out=bytes(wrong) + pattern(2, 2))
    assert sense.information == BS + 17
    assert store.read(50, 2) == old


def test_compare_and_write_limits_and_bad_cdbs() -> None:
    t, _ = make_target(num_blocks=2048)
    vpd = expect_good(t, bytes([0x12, 0x01, 0xB0, 0, 64, 0]))
    assert vpd[5] == 255  # MAXIMUM COMPARE AND WRITE LENGTH
    expect_good(t, caw(0, 255), bytes(2 * 255 * BS))
    small, _ = make_target(max_transfer_blocks=64)
    vpd = expect_good(small, bytes([0x12, 0x01, 0xB0, 0, 64, 0]))
    assert vpd[5] == 32  # both halves must fit in one transfer
    sense = expect_check(small, caw(0, 33), ILLEGAL, INVALID_CDB)
    assert sense.field_pointer is not None and sense.field_pointer.byte == 13
    expect_check(t, caw(2048, 1), ILLEGAL, LBA_RANGE)
    expect_check(t, caw(2047, 2), ILLEGAL, LBA_RANGE)
    expect_check(t, caw(0, 1, flags=0x20), ILLEGAL, INVALID_CDB)  # WRPROTECT
    expect_check(t, caw(0, 1)[:15], ILLEGAL, INVALID_CDB)
    bad = bytearray(caw(0, 1))
    bad[11] = 1  # reserved
    expect_check(t, bytes(bad), ILLEGAL, INVALID_CDB)
    ro, _ = make_target(read_only=True)
    expect_check(ro, caw(0, 1), DATA_PROTECT, WRITE_PROTECTED, data_out=bytes(2 * BS))


class _HeldWriteStore(MemoryBlockStore):
    """The first write after `hold` is set waits for `release`; every call is logged in order."""

    def __init__(self) -> None:
        super().__init__(block_size=BS, num_blocks=64)
        self.hold = False
        self.entered = threading.Event()
        self.release = threading.Event()
        self.order: list[str] = []

    def write(self, lba: int, data: bytes, *, fua: bool = False) -> None:
        self.order.append(f"write {lba} start")
        if self.hold:
            self.hold = False
            self.entered.set()
            assert self.release.wait(30)
        super().write(lba, data, fua=fua)
        self.order.append(f"write {lba} end")

    def read(self, lba: int, blocks: int) -> bytes:
        self.order.append(f"read {lba}")
        return super().read(lba, blocks)


def test_compare_and_write_waits_for_writes_in_flight_on_other_targets_of_the_unit() -> None:
    store = _HeldWriteStore()
    shared = SharedUnit()
    writer, comparer = (ScsiTarget(store, serial="UM0001", device_id=NAA3_ID, shared=shared) for _ in range(2))
    store.hold = True
    new = pattern(7, 1)
    w = threading.Thread(target=lambda: writer.execute(rw10(0x2A, 5, 1), new))
    w.start()
    assert store.entered.wait(30)
    results = []
    # the CAW expects what the write in flight is writing: it must compare after that write lands
    c = threading.Thread(target=lambda: results.append(comparer.execute(caw(5, 1), new + pattern(8, 1))))
    c.start()
    c.join(0.2)  # give it the chance to run too early (no assertion on time: only on order)
    store.release.set()
    w.join(30)
    c.join(30)
    assert results and results[0].status == 0, comparer.sense.label
    assert store.order.index("write 5 end") < store.order.index("read 5")
    assert store.read(5, 1) == pattern(8, 1)


# ---- REPORT SUPPORTED OPERATION CODES --------------------------------------------------------------------


def rsoc(options: int = 0, opcode: int = 0, sa: int = 0, alloc: int = 8192, rctd: bool = False) -> bytes:
    return struct.pack(">BBBBHIxB", 0xA3, 0x0C, (0x80 if rctd else 0) | options, opcode, sa, alloc, 0)


def _descriptors(data: bytes) -> list[tuple[int, int, int, int]]:
    length = int.from_bytes(data[:4], "big")
    assert length == len(data) - 4
    out, at = [], 4
    while at < len(data):
        opcode, sa, flags, cdb_len = struct.unpack_from(">BxHxBH", data, at)
        out.append((opcode, sa, flags, cdb_len))
        at += 8 + (12 if flags & 0x02 else 0)
    return out


def test_all_commands_lists_every_opcode_the_target_accepts() -> None:
    t, _ = make_target()
    descs = _descriptors(expect_good(t, rsoc()))
    listed = {d[0] for d in descs}
    assert listed == set(ALLOWED_BITS)
    for opcode, sa, flags, cdb_len in descs:
        assert cdb_len == len(ALLOWED_BITS[opcode])
        assert bool(flags & 0x01) == (opcode in (0x9E, 0xA3, 0x5E, 0x5F)), hex(opcode)
        if not flags & 0x01:
            assert sa == 0
    assert (0x5E, 3) in {(d[0], d[1]) for d in descs}  # READ FULL STATUS
    assert (0x5F, 7) not in {(d[0], d[1]) for d in descs}  # REGISTER AND MOVE is not served
    timed = expect_good(t, rsoc(rctd=True))
    for at in range(4, len(timed), 20):
        assert timed[at + 5] & 0x02 and timed[at + 8 : at + 10] == b"\x00\x0a"
    assert len(expect_good(t, rsoc(alloc=10))) == 10


def test_one_command_usage_data_is_what_check_command_accepts() -> None:
    t, _ = make_target()
    one = expect_good(t, rsoc(options=1, opcode=0x2A))
    assert one[1] & 0x07 == 3  # supported as the standard says
    size = int.from_bytes(one[2:4], "big")
    assert one[4 : 4 + size] == bytes((0x2A, *ALLOWED_BITS[0x2A][1:]))
    assert one[5] & 0x18 == 0x18  # DPO and FUA
    sa = expect_good(t, rsoc(options=2, opcode=0x5E, sa=1))
    assert sa[1] & 0x07 == 3 and sa[5] == 0x01  # the service action in its field
    either = expect_good(t, rsoc(options=3, opcode=0x12))
    assert either[1] & 0x07 == 3
    unknown = expect_good(t, rsoc(options=1, opcode=0x83))
    assert unknown[1] & 0x07 == 1 and unknown[2:4] == b"\x00\x00"
    timed = expect_good(t, rsoc(options=1, opcode=0x28, rctd=True))
    assert timed[1] & 0x80 and timed[-12:-10] == b"\x00\x0a"


def test_report_supported_operation_codes_bad_cdbs() -> None:
    t, _ = make_target()
    expect_check(t, rsoc(options=1, opcode=0x5E), ILLEGAL, INVALID_CDB)  # it has service actions
    expect_check(t, rsoc(options=2, opcode=0x28), ILLEGAL, INVALID_CDB)  # it has none
    for options in (4, 7):
        sense = expect_check(t, rsoc(options=options), ILLEGAL, INVALID_CDB)
        assert sense.field_pointer is not None and sense.field_pointer.byte == 2
    sense = expect_check(t, bytes([0xA3, 0x0D]) + bytes(10), ILLEGAL, INVALID_CDB)  # another MAINTENANCE IN
    assert sense.field_pointer is not None and sense.field_pointer.byte == 1
    expect_check(t, rsoc()[:11], ILLEGAL, INVALID_CDB)


def test_get_lba_status_is_reported_by_the_iscsi_target() -> None:
    from firmware.scsi.lba_status import LbaStatusTarget

    t = LbaStatusTarget(MemoryBlockStore(block_size=BS, num_blocks=64), serial="UM0001", device_id=NAA3_ID)
    pairs = {(d[0], d[1]) for d in _descriptors(expect_good(t, rsoc()))}
    assert (0x9E, 0x10) in pairs and (0x9E, 0x12) in pairs
    plain, _ = make_target()
    assert (0x9E, 0x12) not in {(d[0], d[1]) for d in _descriptors(expect_good(plain, rsoc()))}
