"""The SCSI block target as a host sees it: every command served, every error path, durability
(FUA, SYNCHRONIZE CACHE, the caching page telling the truth), big disks and 4096-byte blocks."""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable

import pytest

from firmware.logical_unit import CommandPlan, Direction, Status
from firmware.scsi import ScsiTarget, naa_locally_assigned
from firmware.scsi.sense import Sense
from firmware.storage import NotReady, ReadError, SpaceExhausted, WriteError, WriteProtected
from host_tests.scsi_fakes import FlakyError, MemoryBlockStore
from host_tests.scsi_support import (
    NAA3_ID,
    expect_check,
    expect_good,
    make_target,
    request_sense,
    run,
    rw10,
    rw16,
)

ILLEGAL = 0x05
INVALID_OPCODE = 0x20
LBA_RANGE = 0x21
INVALID_CDB = 0x24
INVALID_PARAM = 0x26
PARAM_LEN = 0x1A

READ10, WRITE10, READ16, WRITE16 = 0x28, 0x2A, 0x88, 0x8A
FUA = 0x08


def pattern(nblocks: int, seed: int, bs: int = 512) -> bytes:
    return bytes((seed + i * 7) & 0xFF for i in range(nblocks * bs))


# ---- basic commands and sense ---------------------------------------------------------------


def test_test_unit_ready_is_good_and_leaves_no_sense() -> None:
    t, _ = make_target()
    assert expect_good(t, bytes(6)) == b""
    assert t.plan(bytes(6)) == CommandPlan(Direction.NONE, 0)
    sense = request_sense(t)
    assert (sense.key, sense.asc, sense.ascq) == (0, 0, 0)


def test_request_sense_returns_then_clears_and_good_command_resets() -> None:
    t, _ = make_target()
    assert run(t, bytes([0xFF] + [0] * 5)).status == Status.CHECK_CONDITION
    raw = t.execute(bytes([0x03, 0, 0, 0, 252, 0])).data
    assert len(raw) == 18
    assert raw[0] == 0x70 and raw[2] == ILLEGAL and raw[7] == 10 and raw[12] == INVALID_OPCODE
    # cleared by REQUEST SENSE
    assert request_sense(t).key == 0
    # and a good command after an error also leaves NO SENSE
    run(t, bytes([0xFF] + [0] * 5))
    expect_good(t, bytes(6))
    assert request_sense(t).key == 0


def test_request_sense_with_windows_12_byte_cdb_and_short_allocation() -> None:
    t, _ = make_target()
    run(t, rw10(READ10, 4096, 1))  # out of range
    cdb12 = bytes([0x03, 0, 0, 0, 18, 0]) + bytes(6)  # MS-Windows: bCBWCBLength 12
    assert t.plan(cdb12) == CommandPlan(Direction.IN, 18)
    data = expect_good(t, cdb12)
    assert Sense.from_fixed(data).asc == LBA_RANGE
    run(t, bytes([0xFF] + [0] * 5))
    assert t.plan(bytes([0x03, 0, 0, 0, 8, 0])) == CommandPlan(Direction.IN, 8)
    assert expect_good(t, bytes([0x03, 0, 0, 0, 8, 0]))[:3] == bytes([0x70, 0, ILLEGAL])


def test_request_sense_descriptor_format_is_refused() -> None:
    t, _ = make_target()
    sense = expect_check(t, bytes([0x03, 0x01, 0, 0, 18, 0]), ILLEGAL, INVALID_CDB)
    assert sense.field_pointer is not None and sense.field_pointer.byte == 1 and sense.field_pointer.bit == 0


@pytest.mark.parametrize(
    "cdb",
    [
        bytes([0xA1]) + bytes(11),  # ATA PASS-THROUGH(12)
        bytes([0x85]) + bytes(15),  # ATA PASS-THROUGH(16)
        bytes([0x4D]) + bytes(9),  # LOG SENSE
        bytes([0x83]) + bytes(15),  # EXTENDED COPY
        bytes([0x04]) + bytes(5),  # FORMAT UNIT
        bytes([0xFF]) + bytes(15),
        bytes([0x48]) + bytes(9),  # SANITIZE
    ],
)
def test_unsupported_opcodes_are_invalid_command_operation_code(cdb: bytes) -> None:
    t, _ = make_target()
    assert t.plan(cdb) == CommandPlan(Direction.NONE, 0)
    expect_check(t, cdb, ILLEGAL, INVALID_OPCODE)


def test_empty_and_short_cdbs() -> None:
    t, _ = make_target()
    assert t.plan(b"") == CommandPlan(Direction.NONE, 0)
    assert t.execute(b"").status == Status.CHECK_CONDITION
    assert request_sense(t).asc == INVALID_OPCODE
    sense = expect_check(t, rw10(READ10, 0, 1)[:6], ILLEGAL, INVALID_CDB)
    assert sense.field_pointer is not None and sense.field_pointer.in_cdb and sense.field_pointer.byte == 6


# ---- INQUIRY --------------------------------------------------------------------------------


def test_standard_inquiry() -> None:
    t, _ = make_target(vendor="ACME", product="mirror", revision="1.2")
    assert t.plan(bytes([0x12, 0, 0, 0, 255, 0])) == CommandPlan(Direction.IN, 96)
    data = expect_good(t, bytes([0x12, 0, 0, 0, 255, 0]))
    assert data[0] == 0x00  # connected direct-access block device
    assert data[1] & 0x80 == 0  # RMB=0: fixed disk
    assert data[2] == 0x06  # SPC-4
    assert data[3] & 0x0F == 2
    assert data[4] == len(data) - 5
    assert data[8:16] == b"ACME    "
    assert data[16:32] == b"mirror          "
    assert data[32:36] == b"1.2 "
    assert struct.unpack(">3H", data[58:64]) == (0x00A0, 0x0460, 0x04C0)
    # Linux usb-storage asks for exactly 36 bytes
    assert expect_good(t, bytes([0x12, 0, 0, 0, 36, 0])) == data[:36]
    # allocation length 0: no data, not an error
    assert t.plan(bytes([0x12, 0, 0, 0, 0, 0])) == CommandPlan(Direction.NONE, 0)
    assert expect_good(t, bytes([0x12, 0, 0, 0, 0, 0])) == b""


def test_default_vendor_and_product() -> None:
    t, _ = make_target()
    data = expect_good(t, bytes([0x12, 0, 0, 0, 36, 0]))
    assert data[8:16] == b"USBMIRR " and data[16:32] == b"usbmirror disk  "


def test_inquiry_field_errors() -> None:
    t, _ = make_target()
    s = expect_check(t, bytes([0x12, 0, 0x80, 0, 36, 0]), ILLEGAL, INVALID_CDB)  # page without EVPD
    assert s.field_pointer is not None and s.field_pointer.byte == 2
    s = expect_check(t, bytes([0x12, 0x02, 0, 0, 36, 0]), ILLEGAL, INVALID_CDB)  # CMDDT
    assert s.field_pointer is not None and (s.field_pointer.byte, s.field_pointer.bit) == (1, 1)
    s = expect_check(t, bytes([0x12, 1, 0x99, 0, 255, 0]), ILLEGAL, INVALID_CDB)  # unknown VPD page
    assert s.field_pointer is not None and s.field_pointer.byte == 2
    assert t.plan(bytes([0x12, 1, 0x99, 0, 255, 0])) == CommandPlan(Direction.NONE, 0)
    s = expect_check(t, bytes([0x12, 0, 0, 0, 36, 0x04]), ILLEGAL, INVALID_CDB)  # NACA
    assert s.field_pointer is not None and (s.field_pointer.byte, s.field_pointer.bit) == (5, 2)


def vpd(t: ScsiTarget, page: int) -> bytes:
    data = expect_good(t, bytes([0x12, 1, page, 0x01, 0x00, 0]))
    assert data[1] == page and struct.unpack(">H", data[2:4])[0] == len(data) - 4
    return data


def test_vpd_supported_pages_and_serial() -> None:
    t, _ = make_target(serial="SER-42")
    assert vpd(t, 0x00)[4:] == bytes([0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2])
    assert vpd(t, 0x80)[4:] == b"SER-42"
    for page in vpd(t, 0x00)[4:]:
        vpd(t, page)


def designators(data: bytes) -> list[tuple[int, int, bytes]]:
    out, at = [], 4
    while at < len(data):
        code_set, dtype, length = data[at] & 0x0F, data[at + 1] & 0x0F, data[at + 3]
        assert data[at + 1] & 0x30 == 0  # association: the logical unit
        out.append((code_set, dtype, data[at + 4 : at + 4 + length]))
        at += 4 + length
    assert at == len(data)
    return out


def test_vpd_device_identification_naa_and_t10() -> None:
    t, _ = make_target(serial="SER-42", device_id=NAA3_ID)
    got = designators(vpd(t, 0x83))
    assert (1, 3, NAA3_ID) in got  # binary NAA
    assert (2, 1, b"USBMIRR SER-42") in got  # ASCII T10 vendor id


@pytest.mark.parametrize("device_id", [bytes(range(1, 9)), bytes(range(0x10, 0x20))])
def test_vpd_device_identification_eui64(device_id: bytes) -> None:
    t, _ = make_target(device_id=device_id)
    assert (1, 2, device_id) in designators(vpd(t, 0x83))


def test_naa_locally_assigned_from_uuid() -> None:
    naa = naa_locally_assigned(bytes(range(16)))
    assert len(naa) == 8 and naa[0] >> 4 == 3
    t, _ = make_target(device_id=naa)
    assert (1, 3, naa) in designators(vpd(t, 0x83))


def test_vpd_block_limits() -> None:
    t, _ = make_target(max_transfer_blocks=256, max_unmap_blocks=1000, max_unmap_descriptors=7, max_write_same_blocks=99)
    data = vpd(t, 0xB0)
    assert len(data) == 64
    assert data[4] & 1 == 1  # WSNZ
    assert struct.unpack(">H", data[6:8])[0] == 8  # 4 KiB granularity on 512-byte blocks
    assert struct.unpack(">I", data[8:12])[0] == 256
    assert struct.unpack(">II", data[20:28]) == (1000, 7)
    assert struct.unpack(">Q", data[36:44])[0] == 99


def test_vpd_block_device_characteristics_and_provisioning() -> None:
    t, _ = make_target()
    b1 = vpd(t, 0xB1)
    assert struct.unpack(">H", b1[4:6])[0] == 1  # non-rotating
    b2 = vpd(t, 0xB2)
    assert b2[5] & 0x80 and b2[5] & 0x40 and b2[5] & 0x20  # LBPU LBPWS LBPWS10
    assert (b2[5] >> 2) & 0x07 == 1  # LBPRZ: unmapped blocks read zeros
    assert b2[6] & 0x07 == 2  # thin provisioned


def test_identity_is_validated() -> None:
    store = MemoryBlockStore()
    with pytest.raises(ValueError):
        ScsiTarget(store, serial="x", device_id=b"short")
    with pytest.raises(ValueError):
        ScsiTarget(store, serial="x", device_id=NAA3_ID, vendor="TOO LONG VENDOR")
    with pytest.raises(ValueError):
        ScsiTarget(store, serial="é", device_id=NAA3_ID)
    with pytest.raises(ValueError):
        ScsiTarget(store, serial="x", device_id=NAA3_ID, max_transfer_blocks=0)


# ---- capacity -------------------------------------------------------------------------------


def test_read_capacity_10_and_16() -> None:
    t, _ = make_target(num_blocks=2048)
    assert expect_good(t, bytes([0x25]) + bytes(9)) == struct.pack(">II", 2047, 512)
    rc16 = bytes([0x9E, 0x10]) + bytes(8) + struct.pack(">I", 32) + bytes(2)
    data = expect_good(t, rc16)
    assert len(data) == 32
    assert struct.unpack(">QI", data[:12]) == (2047, 512)
    assert data[14] & 0x80 and data[14] & 0x40  # LBPME LBPRZ
    short = rc16[:10] + struct.pack(">I", 12) + bytes(2)
    assert expect_good(t, short) == data[:12]


def test_read_capacity_errors() -> None:
    t, _ = make_target()
    expect_check(t, bytes([0x25, 0, 0, 0, 0, 1]) + bytes(4), ILLEGAL, INVALID_CDB)  # obsolete LBA set
    s = expect_check(t, bytes([0x9E, 0x12]) + bytes(14), ILLEGAL, INVALID_CDB)  # GET LBA STATUS not served
    assert s.field_pointer is not None and s.field_pointer.byte == 1


def test_read_format_capacities() -> None:
    t, _ = make_target(num_blocks=2048)
    data = expect_good(t, bytes([0x23]) + bytes(6) + struct.pack(">H", 252) + b"\0")
    assert data == bytes(3) + bytes([8]) + struct.pack(">I", 2048) + bytes([2]) + (512).to_bytes(3, "big")


def test_report_luns() -> None:
    t, _ = make_target()
    cdb = bytes([0xA0, 0, 0, 0, 0, 0]) + struct.pack(">I", 64) + bytes(2)
    assert expect_good(t, cdb) == struct.pack(">I", 8) + bytes(4) + bytes(8)
    well_known_only = bytes([0xA0, 0, 1, 0, 0, 0]) + struct.pack(">I", 64) + bytes(2)
    assert expect_good(t, well_known_only) == bytes(8)
    expect_check(t, bytes([0xA0, 0, 0x10, 0, 0, 0]) + struct.pack(">I", 64) + bytes(2), ILLEGAL, INVALID_CDB)


# ---- READ / WRITE ---------------------------------------------------------------------------


@pytest.mark.parametrize(("read_op", "write_op", "build"), [(READ10, WRITE10, rw10), (READ16, WRITE16, rw16)])
def test_write_then_read_back(read_op: int, write_op: int, build: Callable[[int, int, int], bytes]) -> None:
    t, store = make_target()
    data = pattern(8, 3)
    assert t.plan(build(write_op, 100, 8)) == CommandPlan(Direction.OUT, 4096)
    assert t.plan(build(read_op, 100, 8)) == CommandPlan(Direction.IN, 4096)
    expect_good(t, build(write_op, 100, 8), data)
    assert expect_good(t, build(read_op, 100, 8)) == data
    assert expect_good(t, build(read_op, 104, 2)) == data[2048:3072]
    assert store.calls_named("write") == [("write", 100, 8, False)]


def test_read_write_6() -> None:
    t, _ = make_target()
    data = pattern(2, 9)
    expect_good(t, bytes([0x0A, 0, 0, 5, 2, 0]), data)
    assert expect_good(t, bytes([0x08, 0, 0, 5, 2, 0])) == data
    assert t.plan(bytes([0x08, 0, 0, 0, 0, 0])) == CommandPlan(Direction.IN, 256 * 512)  # 0 means 256


def test_zero_length_transfers_are_not_errors() -> None:
    t, store = make_target()
    assert t.plan(rw10(READ10, 5, 0)) == CommandPlan(Direction.NONE, 0)
    assert expect_good(t, rw10(READ10, 5, 0)) == b""
    expect_good(t, rw10(WRITE10, 5, 0, FUA))
    assert store.calls_named("write") == []


def test_fua_write_is_durable_at_once_with_write_cache_on() -> None:
    t, store = make_target(write_cache=True)
    expect_good(t, rw10(WRITE10, 10, 1), pattern(1, 1))
    assert 10 not in store.durable  # cached: not durable yet
    expect_good(t, rw16(WRITE16, 11, 1, FUA), pattern(1, 2))
    assert store.calls_named("write")[-1] == ("write", 11, 1, True)
    assert store.durable[11] == pattern(1, 2)
    assert store.durable[10] == pattern(1, 1)  # FUA is a barrier for what came before
    assert t.status()["fua_writes"] == 1


@pytest.mark.parametrize(
    "cdb",
    [
        rw10(READ10, 2048, 1),  # first LBA past the end
        rw10(READ10, 2047, 2),  # runs past the end
        rw10(WRITE10, 2040, 9),
        rw16(READ16, 1 << 63, 1),
        rw16(READ16, (1 << 64) - 1, 1),
        rw16(WRITE16, 0xFFFFFFFF, 0),
        rw10(0x2F, 2048, 0),  # VERIFY(10)
        rw10(0x35, 2000, 100),  # SYNCHRONIZE CACHE(10)
        rw16(0x93, 2048, 1),  # WRITE SAME(16)
        bytes([0x08, 0x1F, 0xFF, 0xFF, 1, 0]),  # READ(6)
    ],
)
def test_lba_out_of_range(cdb: bytes) -> None:
    t, store = make_target(num_blocks=2048)
    assert t.plan(cdb) == CommandPlan(Direction.NONE, 0)
    expect_check(t, cdb, ILLEGAL, LBA_RANGE)
    assert store.calls == []


def test_last_block_is_addressable() -> None:
    t, _ = make_target(num_blocks=2048)
    expect_good(t, rw10(WRITE10, 2047, 1), pattern(1, 5))
    assert expect_good(t, rw10(READ10, 2047, 1)) == pattern(1, 5)


def test_transfer_length_over_maximum_is_invalid_field() -> None:
    t, _ = make_target(max_transfer_blocks=16)
    expect_good(t, rw10(READ10, 0, 16))
    s = expect_check(t, rw10(READ10, 0, 17), ILLEGAL, INVALID_CDB)
    assert s.field_pointer is not None and s.field_pointer.byte == 7
    s = expect_check(t, rw16(WRITE16, 0, 17), ILLEGAL, INVALID_CDB)
    assert s.field_pointer is not None and s.field_pointer.byte == 10
    assert t.plan(rw16(WRITE16, 0, 17)) == CommandPlan(Direction.NONE, 0)


@pytest.mark.parametrize(
    ("cdb", "byte", "bit"),
    [
        (rw10(READ10, 0, 1, 0x20), 1, 5),  # RDPROTECT: no protection information
        (rw10(WRITE10, 0, 1, 0x04), 1, 2),  # reserved bit in WRITE(10)
        (rw10(READ10, 0, 1, 0x01), 1, 0),  # obsolete RELADR
        (rw10(READ10, 0, 1)[:6] + b"\x20" + rw10(READ10, 0, 1)[7:], 6, 5),  # reserved bits of byte 6
        (rw10(READ10, 0, 1)[:9] + b"\x04", 9, 2),  # NACA
        (rw10(READ10, 0, 1)[:9] + b"\x01", 9, 0),  # LINK
        (rw16(READ16, 0, 1)[:14] + b"\x40\x00", 14, 6),  # DLD1
    ],
)
def test_reserved_bits_are_invalid_field_with_pointer(cdb: bytes, byte: int, bit: int) -> None:
    t, _ = make_target()
    s = expect_check(t, cdb, ILLEGAL, INVALID_CDB)
    assert s.field_pointer is not None
    assert (s.field_pointer.in_cdb, s.field_pointer.byte, s.field_pointer.bit) == (True, byte, bit)
    raw = s.to_fixed()
    assert raw[15] & 0x80 and raw[15] & 0x40  # SKSV, C/D=CDB


def test_vendor_bits_of_control_byte_and_extra_cdb_bytes_are_accepted() -> None:
    t, _ = make_target()
    expect_good(t, rw10(READ10, 0, 1)[:9] + b"\xc0")
    expect_good(t, rw10(READ10, 0, 1) + b"\xff" * 6)  # CB longer than the CDB: tail ignored


# ---- VERIFY ---------------------------------------------------------------------------------


def test_verify_without_byte_check_reads_the_range() -> None:
    t, store = make_target()
    assert t.plan(rw10(0x2F, 10, 4)) == CommandPlan(Direction.NONE, 0)
    expect_good(t, rw10(0x2F, 10, 4))
    expect_good(t, rw16(0x8F, 10, 4))
    assert store.calls_named("read") == [("read", 10, 4), ("read", 10, 4)]
    store.fail["read"] = ReadError("bad sector")
    expect_check(t, rw10(0x2F, 10, 4), 0x03, 0x11)


def test_verify_with_byte_check_compares() -> None:
    t, _ = make_target()
    data = pattern(4, 11)
    expect_good(t, rw10(WRITE10, 20, 4), data)
    assert t.plan(rw10(0x2F, 20, 4, 0x02)) == CommandPlan(Direction.OUT, 2048)
    expect_good(t, rw10(0x2F, 20, 4, 0x02), data)
    expect_good(t, rw16(0x8F, 20, 4, 0x02), data)
    bad = bytearray(data)
    bad[1000] ^= 1
    s = expect_check(t, rw10(0x2F, 20, 4, 0x02), 0x0E, 0x1D, 0, bytes(bad))
    assert s.information == 1000


def test_verify_bytchk_3_compares_one_block_against_each() -> None:
    t, _ = make_target()
    block = pattern(1, 4)
    expect_good(t, rw10(WRITE10, 30, 3), block * 3)
    assert t.plan(rw10(0x2F, 30, 3, 0x06)) == CommandPlan(Direction.OUT, 512)
    expect_good(t, rw10(0x2F, 30, 3, 0x06), block)
    expect_check(t, rw10(0x2F, 30, 4, 0x06), 0x0E, 0x1D, 0, block)
    expect_check(t, rw10(0x2F, 30, 3, 0x04), ILLEGAL, INVALID_CDB)  # BYTCHK=10b is reserved


# ---- SYNCHRONIZE CACHE, START STOP, PREVENT ALLOW -------------------------------------------


@pytest.mark.parametrize(
    "cdb",
    [rw10(0x35, 0, 0), rw16(0x91, 0, 0), rw10(0x35, 0, 0, 0x02), rw16(0x91, 100, 10, 0x02), rw10(0x35, 2047, 1)],
)
def test_synchronize_cache_is_a_real_barrier(cdb: bytes) -> None:
    t, store = make_target(write_cache=True)
    expect_good(t, rw10(WRITE10, 7, 1), pattern(1, 7))
    assert 7 not in store.durable
    expect_good(t, cdb)  # with or without IMMED: returns only after the flush
    assert store.durable[7] == pattern(1, 7)
    assert store.calls_named("flush") == [("flush",)]
    assert t.status()["flushes"] == 1


def test_synchronize_cache_failure_is_reported() -> None:
    t, store = make_target(write_cache=True)
    store.fail["flush"] = WriteError("device gone")
    expect_check(t, rw10(0x35, 0, 0), 0x03, 0x0C)


def test_start_stop_unit() -> None:
    t, store = make_target(write_cache=True)
    expect_good(t, bytes([0x1B, 0, 0, 0, 0x01, 0]))  # start
    assert store.calls_named("flush") == []
    expect_good(t, bytes([0x1B, 0, 0, 0, 0x00, 0]))  # stop: flushes
    assert len(store.calls_named("flush")) == 1
    expect_good(t, bytes([0x1B, 0, 0, 0, 0x04, 0]))  # stop with NO_FLUSH
    assert len(store.calls_named("flush")) == 1
    expect_good(t, bytes([0x1B, 1, 0, 0, 0x30, 0]))  # STANDBY, IMMED: flushes
    assert len(store.calls_named("flush")) == 2
    expect_good(t, bytes([0x1B, 0, 0, 0, 0x02, 0]))  # eject request on a fixed disk: stop, flush
    expect_good(t, bytes(6))  # still ready afterwards
    expect_check(t, bytes([0x1B, 0, 0, 0, 0x40, 0]), ILLEGAL, INVALID_CDB)  # reserved power condition
    expect_check(t, bytes([0x1B, 0, 1, 0, 0, 0]), ILLEGAL, INVALID_CDB)  # reserved byte 2


def test_prevent_allow_medium_removal() -> None:
    t, _ = make_target()
    expect_good(t, bytes([0x1E, 0, 0, 0, 1, 0]))
    expect_good(t, bytes([0x1E, 0, 0, 0, 0, 0]))
    expect_check(t, bytes([0x1E, 0, 0, 0, 0x04, 0]), ILLEGAL, INVALID_CDB)


# ---- UNMAP and WRITE SAME -------------------------------------------------------------------


def unmap_list(*ranges: tuple[int, int], reserved: bytes = bytes(4)) -> bytes:
    descs = b"".join(struct.pack(">QI", lba, n) + reserved for lba, n in ranges)
    return struct.pack(">HH", 6 + len(descs), len(descs)) + bytes(4) + descs


def unmap_cdb(length: int, anchor: bool = False) -> bytes:
    return bytes([0x42, 1 if anchor else 0, 0, 0, 0, 0, 0]) + struct.pack(">H", length) + b"\0"


def test_unmap_discards_and_reads_zeros() -> None:
    t, store = make_target()
    expect_good(t, rw10(WRITE10, 0, 16), pattern(16, 1))
    params = unmap_list((2, 3), (10, 1), (12, 0))
    assert t.plan(unmap_cdb(len(params))) == CommandPlan(Direction.OUT, len(params))
    expect_good(t, unmap_cdb(len(params)), params)
    assert store.calls_named("unmap") == [("unmap", 2, 3), ("unmap", 10, 1)]  # zero-length skipped
    got = expect_good(t, rw10(READ10, 0, 16))
    assert got[2 * 512 : 5 * 512] == bytes(1536) and got[10 * 512 : 11 * 512] == bytes(512)
    assert got[:1024] == pattern(16, 1)[:1024]
    assert t.status()["unmapped_blocks"] == 4


def test_unmap_empty_parameter_list_is_not_an_error() -> None:
    t, store = make_target()
    assert t.plan(unmap_cdb(0)) == CommandPlan(Direction.NONE, 0)
    expect_good(t, unmap_cdb(0))
    assert store.calls_named("unmap") == []


@pytest.mark.parametrize(
    ("params", "asc"),
    [
        (bytes(4), PARAM_LEN),  # shorter than the header
        (struct.pack(">HH", 22, 32) + bytes(4) + struct.pack(">QI", 0, 1) + bytes(4), PARAM_LEN),  # bd length > list
        (unmap_list((0, 1), reserved=b"\0\0\0\1"), INVALID_PARAM),  # reserved bytes in a descriptor
        (struct.pack(">HH", 22, 16) + b"\0\0\0\1" + struct.pack(">QI", 0, 1) + bytes(4), INVALID_PARAM),
        (unmap_list((0, 1), (2040, 9)), LBA_RANGE),  # second descriptor out of range
        (unmap_list((2048, 1)), LBA_RANGE),
        (unmap_list(*[(i, 1) for i in range(9)]), INVALID_PARAM),  # more descriptors than advertised
        (unmap_list((0, 60), (100, 50)), INVALID_PARAM),  # more blocks than advertised
    ],
)
def test_unmap_parameter_list_errors_change_nothing(params: bytes, asc: int) -> None:
    t, store = make_target(max_unmap_descriptors=8, max_unmap_blocks=100)
    expect_good(t, rw10(WRITE10, 0, 4), pattern(4, 1))
    expect_check(t, unmap_cdb(len(params)), ILLEGAL, asc, 0, params)
    assert store.calls_named("unmap") == []


def test_unmap_trailing_partial_descriptor_is_ignored() -> None:
    t, store = make_target()
    params = unmap_list((1, 1)) + bytes(8)
    params = struct.pack(">HH", len(params) - 2, 24) + params[4:]
    expect_good(t, unmap_cdb(len(params)), params)
    assert store.calls_named("unmap") == [("unmap", 1, 1)]


def test_unmap_anchor_is_refused() -> None:
    t, _ = make_target()
    expect_check(t, unmap_cdb(24, anchor=True), ILLEGAL, INVALID_CDB)


def test_write_same_16_with_unmap_and_zero_block_unmaps() -> None:
    t, store = make_target()
    expect_good(t, rw10(WRITE10, 0, 8), pattern(8, 2))
    assert t.plan(rw16(0x93, 1, 4, 0x08)) == CommandPlan(Direction.OUT, 512)
    expect_good(t, rw16(0x93, 1, 4, 0x08), bytes(512))
    assert store.calls_named("unmap") == [("unmap", 1, 4)]
    assert expect_good(t, rw10(READ10, 1, 4)) == bytes(2048)


def test_write_same_with_unmap_and_data_writes_the_data() -> None:
    t, store = make_target()
    block = pattern(1, 3)
    expect_good(t, rw16(0x93, 1, 3, 0x08), block)
    assert store.calls_named("unmap") == []
    assert expect_good(t, rw10(READ10, 1, 3)) == block * 3


def test_write_same_without_unmap_writes_in_chunks() -> None:
    t, store = make_target(max_transfer_blocks=4, max_write_same_blocks=100)
    block = pattern(1, 6)
    expect_good(t, rw10(0x41, 10, 10), block)  # WRITE SAME(10)
    assert [c[2] for c in store.calls_named("write")] == [4, 4, 2]
    assert expect_good(t, rw10(READ10, 10, 4)) == block * 4
    assert expect_good(t, rw10(READ10, 18, 2)) == block * 2


def test_write_same_ndob() -> None:
    t, store = make_target()
    expect_good(t, rw10(WRITE10, 0, 4), pattern(4, 2))
    assert t.plan(rw16(0x93, 0, 2, 0x01)) == CommandPlan(Direction.NONE, 0)
    expect_good(t, rw16(0x93, 0, 2, 0x01))  # NDOB, no UNMAP: write zeros
    expect_good(t, rw16(0x93, 2, 2, 0x09))  # NDOB + UNMAP: unmap
    assert store.calls_named("unmap") == [("unmap", 2, 2)]
    assert expect_good(t, rw10(READ10, 0, 4)) == bytes(2048)


def test_write_same_errors() -> None:
    t, _ = make_target(max_write_same_blocks=16)
    s = expect_check(t, rw16(0x93, 0, 0, 0x08), ILLEGAL, INVALID_CDB, 0)  # WSNZ: 0 blocks refused
    assert s.field_pointer is not None and s.field_pointer.byte == 10
    expect_check(t, rw16(0x93, 0, 17, 0x08), ILLEGAL, INVALID_CDB)
    expect_check(t, rw16(0x93, 0, 1, 0x10), ILLEGAL, INVALID_CDB)  # ANCHOR
    expect_check(t, rw10(0x41, 0, 1, 0x01), ILLEGAL, INVALID_CDB)  # no NDOB in WRITE SAME(10)
    expect_check(t, rw10(0x41, 0, 1, 0x02), ILLEGAL, INVALID_CDB)  # LBDATA (obsolete)


# ---- errors from the store ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "sense"),
    [
        (ReadError("x"), (0x03, 0x11, 0x00)),
        (WriteError("x"), (0x03, 0x0C, 0x00)),
        (SpaceExhausted("x"), (0x07, 0x27, 0x07)),
        (WriteProtected("x"), (0x07, 0x27, 0x00)),
        (NotReady("x"), (0x02, 0x04, 0x00)),
        (FlakyError("x"), (0x02, 0x04, 0x01)),
    ],
)
def test_storage_errors_map_to_their_sense(exc: Exception, sense: tuple[int, int, int]) -> None:
    t, store = make_target()
    for name in ("read", "write", "unmap", "flush"):
        store.fail[name] = exc
    expect_check(t, rw10(READ10, 0, 1), *sense)
    expect_check(t, rw10(WRITE10, 0, 1), *sense, data_out=bytes(512))
    expect_check(t, rw10(0x35, 0, 0), *sense)
    params = unmap_list((0, 1))
    expect_check(t, unmap_cdb(len(params)), *sense, data_out=params)
    assert t.status()["errors"] == {Sense(*sense).label: 4}


def test_unexpected_store_exception_is_hardware_error_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    t, store = make_target()
    store.fail["read"] = ZeroDivisionError("bug in the store")
    with caplog.at_level(logging.ERROR, logger="firmware.scsi.target"):
        expect_check(t, rw10(READ10, 0, 1), 0x04, 0x44)
    assert "internal failure" in caplog.text and "ZeroDivisionError" in caplog.text
    del store.fail["read"]
    expect_good(t, rw10(READ10, 0, 1))  # and the unit keeps working


def test_short_read_from_store_is_hardware_error() -> None:
    t, store = make_target()
    store.read = lambda lba, count: b"\0" * 10  # type: ignore[method-assign]
    expect_check(t, rw10(READ10, 0, 1), 0x04, 0x44)


def test_read_only_unit_refuses_writes_before_the_store() -> None:
    t, store = make_target(read_only=True)
    expect_check(t, rw10(WRITE10, 0, 1), 0x07, 0x27, 0, bytes(512))
    expect_check(t, rw16(0x93, 0, 1, 0x08), 0x07, 0x27, 0, bytes(512))
    params = unmap_list((0, 1))
    expect_check(t, unmap_cdb(len(params)), 0x07, 0x27, 0, params)
    assert store.calls_named("write") == [] and store.calls_named("unmap") == []
    expect_good(t, rw10(READ10, 0, 1))
    ms = expect_good(t, bytes([0x1A, 0x08, 0x08, 0, 255, 0]))
    assert ms[2] & 0x80  # WP


def test_data_out_as_bytearray_or_memoryview() -> None:
    t, _ = make_target()
    block = pattern(1, 9)
    assert t.execute(rw10(WRITE10, 3, 1), bytearray(block)).status == Status.GOOD
    assert t.execute(rw16(0x93, 4, 2), memoryview(block)).status == Status.GOOD  # WRITE SAME
    assert t.execute(rw10(0x2F, 3, 3, 0x06), memoryview(block)).status == Status.GOOD  # VERIFY BYTCHK=11b
    assert expect_good(t, rw10(READ10, 3, 3)) == block * 3


def test_data_out_length_mismatch_is_data_phase_error() -> None:
    t, store = make_target()
    assert t.execute(rw10(WRITE10, 0, 2), bytes(512)).status == Status.CHECK_CONDITION
    s = request_sense(t)
    assert (s.key, s.asc) == (0x0B, 0x4B)
    assert store.calls_named("write") == []


# ---- big disks and 4096-byte blocks ---------------------------------------------------------


def test_disk_larger_than_2_tib() -> None:
    blocks = (5 << 40) // 512  # 5 TiB: more than 2**32 blocks
    t, _ = make_target(num_blocks=blocks)
    assert expect_good(t, bytes([0x25]) + bytes(9)) == struct.pack(">II", 0xFFFFFFFF, 512)
    rc16 = expect_good(t, bytes([0x9E, 0x10]) + bytes(8) + struct.pack(">I", 32) + bytes(2))
    assert struct.unpack(">Q", rc16[:8])[0] == blocks - 1
    high = (1 << 32) + 12345
    expect_good(t, rw16(WRITE16, high, 2), pattern(2, 8))
    assert expect_good(t, rw16(READ16, high, 2)) == pattern(2, 8)
    expect_good(t, rw16(READ16, blocks - 1, 1))
    expect_check(t, rw16(READ16, blocks, 1), ILLEGAL, LBA_RANGE)
    params = unmap_list((high, 2))
    expect_good(t, unmap_cdb(len(params)), params)
    assert expect_good(t, rw16(READ16, high, 2)) == bytes(1024)
    # short block descriptor saturates, long one (LLBAA) carries the real count
    ms6 = expect_good(t, bytes([0x1A, 0, 0x08, 0, 255, 0]))
    assert ms6[3] == 8 and struct.unpack(">I", ms6[4:8])[0] == 0xFFFFFFFF
    ms10 = expect_good(t, bytes([0x5A, 0x10, 0x08, 0, 0, 0, 0, 1, 0, 0]))
    assert ms10[4] & 1 and struct.unpack(">H", ms10[6:8])[0] == 16
    assert struct.unpack(">Q", ms10[8:16])[0] == blocks
    rfc = expect_good(t, bytes([0x23]) + bytes(6) + struct.pack(">H", 12) + b"\0")
    assert struct.unpack(">I", rfc[4:8])[0] == 0xFFFFFFFF


def test_exactly_2_pow_32_blocks_reports_ffffffff() -> None:
    t, _ = make_target(num_blocks=1 << 32)
    assert expect_good(t, bytes([0x25]) + bytes(9))[:4] == b"\xff\xff\xff\xff"
    t, _ = make_target(num_blocks=(1 << 32) - 1)
    assert expect_good(t, bytes([0x25]) + bytes(9))[:4] == struct.pack(">I", (1 << 32) - 2)


def test_4096_byte_blocks() -> None:
    t, _ = make_target(block_size=4096, num_blocks=1000)
    assert expect_good(t, bytes([0x25]) + bytes(9)) == struct.pack(">II", 999, 4096)
    assert t.plan(rw10(READ10, 0, 2)) == CommandPlan(Direction.IN, 8192)
    data = pattern(2, 3, 4096)
    expect_good(t, rw10(WRITE10, 998, 2), data)
    assert expect_good(t, rw10(READ10, 998, 2)) == data
    b0 = vpd(t, 0xB0)
    assert struct.unpack(">H", b0[6:8])[0] == 1
    assert struct.unpack(">I", b0[8:12])[0] == 256  # 1 MiB default
    ms = expect_good(t, bytes([0x1A, 0, 0x08, 0, 255, 0]))
    assert int.from_bytes(ms[9:12], "big") == 4096
    expect_good(t, rw10(0x41, 0, 2, 0x08), bytes(4096))


# ---- unit attention and status --------------------------------------------------------------


def test_unit_attention_after_reset_event() -> None:
    t, _ = make_target()
    expect_good(t, bytes(6))  # no unit attention at power-on: Linux probing is undisturbed
    t.reset_event()
    expect_good(t, bytes([0x12, 0, 0, 0, 36, 0]))  # INQUIRY is served, UA stays pending
    expect_check(t, bytes(6), 0x06, 0x29)
    expect_good(t, bytes(6))  # reported once
    t.reset_event()
    s = request_sense(t)  # REQUEST SENSE returns and clears it
    assert (s.key, s.asc) == (0x06, 0x29)
    expect_good(t, bytes(6))


def test_repeated_resets_report_one_unit_attention_and_replace_older_ones() -> None:
    t, store = make_target()
    store.num_blocks = 4096
    t.capacity_changed()
    t.reset_event()
    t.reset_event()
    expect_check(t, bytes(6), 0x06, 0x29)  # the reset supersedes the capacity change
    expect_good(t, bytes(6))


def test_capacity_change_reports_2a_09_and_the_new_capacity() -> None:
    t, store = make_target(num_blocks=2048)
    expect_good(t, bytes(6))
    store.num_blocks = 4096
    t.capacity_changed()
    t.capacity_changed()  # no change since: nothing more queued
    expect_good(t, bytes([0x12, 0, 0, 0, 36, 0]))  # INQUIRY is served, the UA stays pending
    expect_check(t, rw10(READ10, 3000, 1), 0x06, 0x2A, 0x09)  # REQUEST SENSE returns that one
    last, block = struct.unpack(">II", expect_good(t, bytes([0x25]) + bytes(9)))
    assert (last + 1, block) == (4096, 512)
    expect_good(t, rw10(READ10, 3000, 1))  # the new blocks are addressable
    store.num_blocks = 1024  # shrinking too
    t.capacity_changed()
    t.reset_event()  # a reset replaces the queued capacity UA (the host re-reads all after it)
    expect_check(t, bytes(6), 0x06, 0x29)
    expect_check(t, rw10(READ10, 1500, 1), ILLEGAL, 0x21)  # past the new end


def test_write_protect_change_reports_2a_01_and_the_wp_bit() -> None:
    t, store = make_target()
    expect_good(t, rw10(WRITE10, 0, 1), pattern(1, 1))
    store.read_only = True  # the store started refusing writes (a local unit became a replica)
    t.write_protect_changed()
    t.write_protect_changed()  # no change since: nothing more queued
    expect_check(t, bytes(6), 0x06, 0x2A, 0x01)
    header = expect_good(t, bytes([0x1A, 0, 0x3F, 0, 192, 0]))  # MODE SENSE(6): WP set
    assert header[2] & 0x80
    expect_check(t, rw10(WRITE10, 0, 1), 0x07, 0x27, 0x00, data_out=pattern(1, 2))
    store.read_only = False
    t.write_protect_changed()
    expect_check(t, bytes(6), 0x06, 0x2A, 0x01)
    assert not expect_good(t, bytes([0x1A, 0, 0x3F, 0, 192, 0]))[2] & 0x80
    expect_good(t, rw10(WRITE10, 0, 1), pattern(1, 2))


def test_unit_attentions_queue_and_each_is_reported_once() -> None:
    t, store = make_target()
    t.reset_event()
    store.num_blocks = 3000
    t.capacity_changed()
    assert [(u.asc, u.ascq) for u in t.unit_attentions] == [(0x29, 0x00), (0x2A, 0x09)]
    s = request_sense(t)  # no CHECK CONDITION pending: REQUEST SENSE takes the oldest
    assert (s.key, s.asc, s.ascq) == (0x06, 0x29, 0x00)
    expect_check(t, bytes(6), 0x06, 0x2A, 0x09)
    expect_good(t, bytes(6))
    assert t.unit_attentions == ()


def test_status_counters() -> None:
    t, _ = make_target(write_cache=True)
    expect_good(t, rw10(WRITE10, 0, 8, FUA), pattern(8, 1))
    expect_good(t, rw10(WRITE10, 8, 1), pattern(1, 1))
    expect_good(t, rw10(READ10, 0, 3))
    expect_good(t, rw10(0x35, 0, 0))
    run(t, bytes([0xA1]) + bytes(11))
    params = unmap_list((0, 2))
    expect_good(t, unmap_cdb(len(params)), params)
    st = t.status()
    assert st["commands"] == {
        "WRITE_10": 2,
        "READ_10": 1,
        "SYNCHRONIZE_CACHE_10": 1,
        "0xA1": 1,
        "UNMAP": 1,
    }
    assert st["transfer_sizes"] == {4096: 1, 512: 1, 2048: 1}
    assert st["fua_writes"] == 1 and st["flushes"] == 1
    assert st["unmap_commands"] == 1 and st["unmapped_blocks"] == 2
    assert st["blocks_written"] == 9 and st["blocks_read"] == 3
    assert st["errors"] == {"ILLEGAL_REQUEST/0x20/0x00": 1}


def test_plan_does_not_change_state() -> None:
    t, store = make_target()
    run(t, bytes([0xFF]) + bytes(5))
    for cdb in (rw10(WRITE10, 0, 1), bytes([0x03, 0, 0, 0, 18, 0]), rw10(0x35, 0, 0), bytes([0x12, 0, 0, 0, 36, 0])):
        t.plan(cdb)
    assert store.calls == []
    assert request_sense(t).asc == INVALID_OPCODE


def test_execute_runs_its_own_cdb_not_the_one_planned_last() -> None:
    # plan() keeps its decoding for execute(); an execute() of another CDB must not use it.
    t, store = make_target()
    data = pattern(2, 5)
    expect_good(t, rw10(WRITE10, 40, 2), data)
    t.plan(rw10(READ10, 0, 2))
    assert t.execute(rw10(READ10, 40, 2)).data == data
    t.plan(rw10(WRITE10, 0, 1))
    assert t.execute(rw10(READ10, 41, 1)).data == data[512:]
    assert store.calls_named("write") == [("write", 40, 2, False)]


def test_truncated_allocation_lengths() -> None:
    t, _ = make_target(serial="SER-42")
    full = vpd(t, 0x80)
    assert t.plan(bytes([0x12, 1, 0x80, 0, 5, 0])) == CommandPlan(Direction.IN, 5)
    assert expect_good(t, bytes([0x12, 1, 0x80, 0, 5, 0])) == full[:5]
    rc16_zero = bytes([0x9E, 0x10]) + bytes(12) + bytes(2)
    assert t.plan(rc16_zero) == CommandPlan(Direction.NONE, 0)
    assert expect_good(t, rc16_zero) == b""
    luns = bytes([0xA0, 0, 0, 0, 0, 0]) + struct.pack(">I", 4) + bytes(2)
    assert expect_good(t, luns) == struct.pack(">I", 8)
    assert expect_good(t, bytes([0x03, 0, 0, 0, 0, 0])) == b""


def test_store_failures_in_flushing_and_write_same_paths() -> None:
    t, store = make_target(write_cache=True)
    store.fail["flush"] = WriteError("x")
    expect_check(t, bytes([0x1B, 0, 0, 0, 0, 0]), 0x03, 0x0C)  # stop flushes, and says it failed
    store.fail["write"] = SpaceExhausted("x")
    expect_check(t, rw16(0x93, 0, 4), 0x07, 0x27, 0x07, pattern(1, 1))
    store.fail["unmap"] = NotReady("x")
    expect_check(t, rw16(0x93, 0, 4, 0x09), 0x02, 0x04)


class _BrokenCacheStore(MemoryBlockStore):
    @property
    def write_cache(self) -> bool:
        raise RuntimeError("property bug")

    @write_cache.setter
    def write_cache(self, value: bool) -> None:
        pass


def test_plan_and_execute_survive_a_store_property_that_raises() -> None:
    store = _BrokenCacheStore()
    with pytest.raises(RuntimeError):
        ScsiTarget(store, serial="x", device_id=NAA3_ID)  # bad configuration fails loudly at start
    t, healthy = make_target()
    t._store = store  # the store breaks later
    assert t.plan(bytes([0x1A, 0, 0x08, 0, 255, 0])) == CommandPlan(Direction.NONE, 0)
    expect_check(t, bytes([0x1A, 0, 0x08, 0, 255, 0]), 0x04, 0x44)
    t._store = healthy
    expect_good(t, bytes([0x1A, 0, 0x08, 0, 255, 0]))
