"""Property tests for CDB decoding, sense data and the target as a whole: decode(encode(x)) == x
for every command, and random CDB bytes never raise and always end GOOD or CHECK CONDITION with
valid sense (never the HARDWARE ERROR that marks a bug)."""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from firmware.logical_unit import Direction, Status
from firmware.scsi import pages
from firmware.scsi.cdb import (
    CDB_SIZE,
    Command,
    Inquiry,
    Limits,
    ModeSelect,
    ModeSense,
    PreventAllowMediumRemoval,
    ReadCapacity10,
    ReadCapacity16,
    ReadFormatCapacities,
    ReadWrite,
    ReportLuns,
    RequestSense,
    StartStopUnit,
    SynchronizeCache,
    TestUnitReady,
    Unmap,
    Verify,
    WriteSame,
    check_command,
)
from firmware.scsi.opcodes import Opcode
from firmware.scsi.sense import CommandError, FieldPointer, Sense, SenseKey
from host_tests.scsi_support import make_target

BIG = Limits(block_size=512, num_blocks=1 << 63, max_transfer_blocks=0xFFFFFFFF, max_write_same_blocks=0xFFFFFFFF)

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
lba64 = st.integers(0, (1 << 62) - 1)


def rw_strategy() -> st.SearchStrategy[Command]:
    rw6 = st.builds(
        ReadWrite, st.sampled_from([Opcode.READ_6, Opcode.WRITE_6]), st.integers(0, (1 << 21) - 1), st.integers(1, 256)
    )
    rw10 = st.builds(
        ReadWrite,
        st.sampled_from([Opcode.READ_10, Opcode.WRITE_10]),
        u32,
        u16,
        fua=st.booleans(),
        dpo=st.booleans(),
    )
    rw16 = st.builds(
        ReadWrite,
        st.sampled_from([Opcode.READ_16, Opcode.WRITE_16]),
        lba64,
        u32,
        fua=st.booleans(),
        dpo=st.booleans(),
    )
    return rw6 | rw10 | rw16


def ten_or_sixteen(cls: type, op10: Opcode, op16: Opcode, **extra: st.SearchStrategy[object]) -> st.SearchStrategy[Command]:
    return st.builds(cls, st.just(op10), u32, u16, **extra) | st.builds(cls, st.just(op16), lba64, u32, **extra)


commands: st.SearchStrategy[Command] = st.one_of(
    st.just(TestUnitReady()),
    st.builds(RequestSense, u8),
    rw_strategy(),
    ten_or_sixteen(Verify, Opcode.VERIFY_10, Opcode.VERIFY_16, bytchk=st.sampled_from([0, 1, 3]), dpo=st.booleans()),
    ten_or_sixteen(SynchronizeCache, Opcode.SYNCHRONIZE_CACHE_10, Opcode.SYNCHRONIZE_CACHE_16, immed=st.booleans()),
    st.builds(WriteSame, st.just(Opcode.WRITE_SAME_10), u32, st.integers(1, 0xFFFF), unmap=st.booleans())
    | st.builds(
        WriteSame, st.just(Opcode.WRITE_SAME_16), lba64, st.integers(1, 0xFFFFFFFF), unmap=st.booleans(), ndob=st.booleans()
    ),
    st.builds(Unmap, u16),
    st.builds(Inquiry, st.just(False), st.just(0), u16) | st.builds(Inquiry, st.just(True), u8, u16),
    st.builds(ModeSense, st.just(Opcode.MODE_SENSE_6), st.integers(0, 2), st.integers(0, 63), u8, u8, dbd=st.booleans())
    | st.builds(
        ModeSense,
        st.just(Opcode.MODE_SENSE_10),
        st.integers(0, 2),
        st.integers(0, 63),
        u8,
        u16,
        dbd=st.booleans(),
        llbaa=st.booleans(),
    ),
    st.builds(ModeSelect, st.just(Opcode.MODE_SELECT_6), u8, pf=st.booleans())
    | st.builds(ModeSelect, st.just(Opcode.MODE_SELECT_10), u16, pf=st.booleans()),
    st.builds(
        StartStopUnit,
        st.booleans(),
        loej=st.booleans(),
        no_flush=st.booleans(),
        power_condition=st.sampled_from([0, 1, 2, 3, 7, 0xA, 0xB]),
        immed=st.booleans(),
    ),
    st.builds(PreventAllowMediumRemoval, st.integers(0, 3)),
    st.builds(ReadFormatCapacities, u16),
    st.just(ReadCapacity10()),
    st.builds(ReadCapacity16, u32),
    st.builds(ReportLuns, st.integers(0, 2), u32),
)


@given(commands)
@settings(max_examples=600)
def test_decode_encode_round_trip(cmd: Command) -> None:
    cdb = cmd.encode()
    assert len(cdb) == CDB_SIZE[cdb[0]]
    assert check_command(cdb, BIG) == cmd
    # a longer command block (Windows pads CDBs) decodes the same
    assert check_command(cdb + b"\xa5" * (16 - len(cdb)), BIG) == cmd


@given(commands, st.data())
@settings(max_examples=300)
def test_any_single_forbidden_bit_is_pointed_at(cmd: Command, data: st.DataObject) -> None:
    cdb = bytearray(cmd.encode())
    from firmware.scsi.cdb import _ALLOWED  # the table under test

    mask = _ALLOWED[cdb[0]]
    candidates = [(i, b) for i in range(1, len(cdb)) for b in range(8) if not mask[i] >> b & 1]
    if not candidates:
        return
    index, bit = data.draw(st.sampled_from(candidates))
    cdb[index] |= 1 << bit
    try:
        check_command(bytes(cdb), BIG)
    except CommandError as exc:
        fp = exc.sense.field_pointer
        assert exc.sense.asc == 0x24
        assert fp is not None and fp.in_cdb and fp.byte == index and fp.bit == bit
    else:
        raise AssertionError(f"forbidden bit {index}.{bit} accepted in {bytes(cdb).hex()}")


@given(
    st.builds(
        Sense,
        st.integers(0, 15),
        u8,
        u8,
        st.none() | u32,
        st.none() | st.builds(FieldPointer, st.booleans(), u16, st.none() | st.integers(0, 7)),
    )
)
def test_fixed_sense_round_trip(sense: Sense) -> None:
    raw = sense.to_fixed()
    assert len(raw) == 18 and raw[7] == 10
    assert Sense.from_fixed(raw) == sense


known_opcodes = st.sampled_from(sorted(CDB_SIZE))
random_cdb = st.one_of(
    st.binary(max_size=20),
    st.tuples(known_opcodes, st.binary(min_size=0, max_size=17)).map(lambda t: bytes([t[0]]) + t[1]),
    commands.map(lambda c: c.encode()),
    st.tuples(commands, st.integers(0, 15), u8).map(
        lambda t: bytes(b ^ (t[2] if i == t[1] else 0) for i, b in enumerate(t[0].encode()))
    ),
)


@given(random_cdb, st.binary(max_size=64), st.sampled_from([512, 4096]), st.booleans())
@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow], deadline=None)
def test_random_cdbs_never_raise_and_end_with_valid_sense(
    cdb: bytes, payload: bytes, block_size: int, write_cache: bool
) -> None:
    t, _ = make_target(
        block_size=block_size,
        num_blocks=(1 << 33) + 17,
        write_cache=write_cache,
        max_transfer_blocks=16,
        max_write_same_blocks=64,
        max_unmap_blocks=1 << 20,
    )
    plan = t.plan(cdb)
    assert plan.length >= 0 and (plan.length == 0) == (plan.direction == Direction.NONE)
    data_out = b""
    if plan.direction == Direction.OUT:
        data_out = (payload * (plan.length // max(1, len(payload)) + 1))[: plan.length] if payload else bytes(plan.length)
    result = t.execute(cdb, data_out)
    assert result.status in (Status.GOOD, Status.CHECK_CONDITION)
    if result.status == Status.GOOD:
        if plan.direction == Direction.IN:
            assert len(result.data) == plan.length
        else:
            assert result.data == b""
    raw = t.execute(bytes([0x03, 0, 0, 0, 18, 0]))
    assert raw.status == Status.GOOD
    sense = Sense.from_fixed(raw.data)
    if result.status == Status.GOOD:
        if cdb[0] != Opcode.REQUEST_SENSE:
            assert sense.key == SenseKey.NO_SENSE
    else:
        # HARDWARE ERROR here would mean an exception inside the target: a bug
        assert sense.key in (SenseKey.ILLEGAL_REQUEST, SenseKey.MISCOMPARE), sense.label
        if sense.key == SenseKey.ILLEGAL_REQUEST:
            assert sense.asc in (0x1A, 0x20, 0x21, 0x24, 0x26, 0x39), sense.label
    # every store call was in range (the fake asserts it) and counters add up
    assert sum(t.status()["commands"].values()) == 2  # type: ignore[attr-defined]


@given(
    st.builds(
        dict,
        wce=st.booleans(),
        rcd=st.booleans(),
        segments=u8,
        prefetch=u16,
    )
)
def test_caching_page_parse_build_round_trip(v: dict[str, int]) -> None:
    value = {
        "header": {"ps": False, "spf": False, "page_code": 8},
        "page_length": 0x12,
        "flags": {
            "ic": False,
            "abpf": False,
            "cap": False,
            "disc": False,
            "size": False,
            "wce": v["wce"],
            "mf": False,
            "rcd": v["rcd"],
        },
        "retention_priorities": 0,
        "disable_prefetch_transfer_length": v["prefetch"],
        "minimum_prefetch": 0,
        "maximum_prefetch": 0,
        "maximum_prefetch_ceiling": 0,
        "flags12": {"fsw": False, "lbcss": False, "dra": False, "vs": 0, "nv_dis": False},
        "number_of_cache_segments": v["segments"],
        "cache_segment_size": 0,
    }
    raw = pages.CACHING_PAGE.build(value)
    assert len(raw) == 20
    assert pages.CACHING_PAGE.build(pages.CACHING_PAGE.parse(raw)) == raw


@given(
    st.builds(
        pages.InquiryIdentity,
        st.text("ABCZ 09", max_size=8),
        st.text("abc xyz", max_size=16),
        st.text("0123.", max_size=4),
        st.text("A1-", min_size=1, max_size=40),
        st.binary(min_size=8, max_size=8) | st.binary(min_size=16, max_size=16),
    )
)
def test_identification_pages_parse_back(ident: pages.InquiryIdentity) -> None:
    std = pages.STANDARD_INQUIRY.parse(pages.standard_inquiry(ident))
    assert (std.vendor, std.product, std.revision) == (
        ident.vendor.rstrip(),
        ident.product.rstrip(),
        ident.revision.rstrip(),
    )
    page = pages.VPD_PAGE.parse(pages.vpd_page(0x83, ident, pages.BlockLimits(1, 1, 1, 1, 1)))
    descs = pages.DESIGNATION_DESCRIPTORS.parse(page.payload)
    assert descs[0].designator == ident.device_id
    assert descs[1].designator == ident.vendor.encode().ljust(8) + ident.serial.encode()


def test_report_luns_parses_back() -> None:
    parsed = pages.REPORT_LUNS_DATA.parse(pages.report_luns(0))
    assert parsed.lun_list_length == 8 and parsed.luns == [bytes(8)]
    assert struct.unpack(">I", pages.report_luns(1)[:4])[0] == 0
