"""MODE SENSE and MODE SELECT: the caching page tells the truth about the store's write cache,
MODE SELECT round trips the way Linux sd and sdparm do it, and invalid parameter lists change
nothing."""

from __future__ import annotations

import struct

import pytest

from firmware.logical_unit import CommandPlan, Direction
from firmware.storage import WriteError
from host_tests.scsi_support import expect_check, expect_good, make_target

ILLEGAL = 0x05
INVALID_CDB = 0x24
INVALID_PARAM = 0x26
PARAM_LEN = 0x1A


def sense6(page: int, *, pc: int = 0, dbd: bool = False, subpage: int = 0, alloc: int = 255) -> bytes:
    return bytes([0x1A, 0x08 if dbd else 0, (pc << 6) | page, subpage, alloc, 0])


def sense10(page: int, *, pc: int = 0, dbd: bool = False, llbaa: bool = False, alloc: int = 1024) -> bytes:
    flags = (0x08 if dbd else 0) | (0x10 if llbaa else 0)
    return bytes([0x5A, flags, (pc << 6) | page, 0, 0, 0, 0]) + struct.pack(">H", alloc) + b"\0"


def select6(length: int, *, sp: bool = False) -> bytes:
    return bytes([0x15, 0x10 | (1 if sp else 0), 0, 0, length, 0])


def select10(length: int) -> bytes:
    return bytes([0x55, 0x10, 0, 0, 0, 0, 0]) + struct.pack(">H", length) + b"\0"


def pages_of(data: bytes, header_len: int) -> dict[int, bytes]:
    bdl = data[3] if header_len == 4 else struct.unpack(">H", data[6:8])[0]
    at, out = header_len + bdl, {}
    while at < len(data):
        code, length = data[at] & 0x3F, data[at + 1]
        out[code] = data[at : at + 2 + length]
        at += 2 + length
    assert at == len(data)
    return out


def test_mode_sense_6_caching_page_tells_the_truth() -> None:
    t, store = make_target(write_cache=False)
    data = expect_good(t, sense6(0x08))
    assert data[0] == len(data) - 1
    assert data[1] == 0  # medium type
    assert data[2] == 0x10  # DPOFUA, not write protected
    assert data[3] == 8  # short block descriptor
    assert struct.unpack(">I", data[4:8])[0] == 2048 and int.from_bytes(data[9:12], "big") == 512
    page = pages_of(data, 4)[0x08]
    assert len(page) == 20 and page[1] == 0x12
    assert page[2] & 0x04 == 0  # WCE=0
    store.write_cache = True  # the store changed its mind (e.g. configuration): MODE SENSE follows
    assert pages_of(expect_good(t, sense6(0x08)), 4)[0x08][2] & 0x04


def test_mode_sense_all_pages_in_order_and_within_linux_192_bytes() -> None:
    t, _ = make_target(write_cache=True)
    data = expect_good(t, sense6(0x3F, alloc=192))  # what Linux sd sends for USB disks
    assert len(data) <= 192
    pages = pages_of(data, 4)
    assert list(pages) == [0x08, 0x0A, 0x1C]
    assert pages[0x08][2] & 0x04
    assert pages[0x0A][2] & 0x04 == 0  # D_SENSE=0: fixed-format sense
    assert pages[0x1C][2] & 0x08  # DEXCPT
    assert expect_good(t, sense6(0x3F, subpage=0xFF)) == data  # all pages and subpages


def test_mode_sense_dbd_and_allocation_truncation() -> None:
    t, _ = make_target()
    full = expect_good(t, sense6(0x08, dbd=True))
    assert full[3] == 0 and len(full) == 4 + 20
    assert t.plan(sense6(0x08, dbd=True, alloc=4)) == CommandPlan(Direction.IN, 4)
    short = expect_good(t, sense6(0x08, dbd=True, alloc=4))
    assert short == full[:4] and short[0] == 23  # mode data length is of the full data


def test_mode_sense_10_short_and_long_block_descriptors() -> None:
    t, _ = make_target()
    data = expect_good(t, sense10(0x08))
    assert struct.unpack(">H", data[0:2])[0] == len(data) - 2
    assert data[3] == 0x10 and data[4] & 1 == 0 and struct.unpack(">H", data[6:8])[0] == 8
    long = expect_good(t, sense10(0x08, llbaa=True))
    assert long[4] & 1 == 1 and struct.unpack(">H", long[6:8])[0] == 16
    assert struct.unpack(">Q", long[8:16])[0] == 2048 and struct.unpack(">I", long[20:24])[0] == 512
    assert pages_of(long, 8)[0x08] == pages_of(data, 8)[0x08]


def test_mode_sense_page_control() -> None:
    t, store = make_target(write_cache=True)
    changeable = pages_of(expect_good(t, sense6(0x3F, pc=1)), 4)
    assert changeable[0x08][2:] == bytes([0x04]) + bytes(17)  # only WCE may change
    assert changeable[0x0A][2:] == bytes(10) and changeable[0x1C][2:] == bytes(10)
    store.write_cache = False
    default = pages_of(expect_good(t, sense6(0x08, pc=2)), 4)[0x08]
    assert default[2] & 0x04  # default is what the store had when the unit started
    expect_check(t, sense6(0x08, pc=3), ILLEGAL, 0x39)  # saved values: SAVING PARAMETERS NOT SUPPORTED


@pytest.mark.parametrize(
    "cdb",
    [
        sense6(0x01),  # read-write error recovery: not served
        sense6(0x08, subpage=1),
        sense6(0x3F, subpage=2),
        bytes([0x1A, 0x10, 0x08, 0, 255, 0]),  # LLBAA does not exist in MODE SENSE(6)
        sense10(0x08)[:4] + b"\x01" + sense10(0x08)[5:],  # reserved byte 4
    ],
)
def test_mode_sense_invalid_fields(cdb: bytes) -> None:
    t, _ = make_target()
    assert t.plan(cdb) == CommandPlan(Direction.NONE, 0)
    expect_check(t, cdb, ILLEGAL, INVALID_CDB)


# ---- MODE SELECT ----------------------------------------------------------------------------


def linux_cache_type_select(t_data: bytes, wce: bool) -> bytes:
    """What Linux sd_store_cache_type sends: the caching page from MODE SENSE (DBD), PS cleared,
    WCE changed, behind a fresh header with mode data length 0 and device-specific 0."""
    page = bytearray(pages_of(t_data, 4)[0x08])
    page[0] &= 0x7F
    page[2] = (page[2] & ~0x05) | (0x04 if wce else 0)
    return bytes([0, 0, 0, 0]) + bytes(page)


def test_mode_select_6_round_trip_switches_the_write_cache() -> None:
    t, store = make_target(write_cache=False)
    params = linux_cache_type_select(expect_good(t, sense6(0x08, dbd=True)), wce=True)
    assert t.plan(select6(len(params))) == CommandPlan(Direction.OUT, len(params))
    expect_good(t, select6(len(params)), params)
    assert store.calls_named("set_write_cache") == [("set_write_cache", True)]
    assert store.write_cache
    assert pages_of(expect_good(t, sense6(0x08)), 4)[0x08][2] & 0x04
    params = linux_cache_type_select(expect_good(t, sense6(0x08, dbd=True)), wce=False)
    expect_good(t, select6(len(params)), params)
    assert not store.write_cache


def test_mode_select_10_with_block_descriptor_and_all_pages() -> None:
    t, store = make_target(write_cache=False)
    data = bytearray(expect_good(t, sense10(0x3F, llbaa=True)))
    data[0:2] = b"\0\0"  # mode data length is reserved in MODE SELECT
    at = 8 + 16
    assert data[at] == 0x08
    data[at + 2] |= 0x04
    expect_good(t, select10(len(data)), bytes(data))
    assert store.write_cache


def test_mode_select_same_values_is_accepted_without_calling_the_store() -> None:
    t, store = make_target(write_cache=True)
    data = bytearray(expect_good(t, sense6(0x3F)))
    data[0] = 0
    expect_good(t, select6(len(data)), bytes(data))  # control and IE pages unchanged: fine
    assert store.calls_named("set_write_cache") == []


def test_mode_select_empty_list_is_not_an_error() -> None:
    t, store = make_target()
    assert t.plan(select6(0)) == CommandPlan(Direction.NONE, 0)
    expect_good(t, select6(0))
    assert store.calls == []


def _caching_select(t_wce: bool = False) -> bytearray:
    t, _ = make_target(write_cache=t_wce)
    return bytearray(linux_cache_type_select(expect_good(t, sense6(0x08, dbd=True)), wce=True))


@pytest.mark.parametrize(
    ("mutate", "asc", "byte"),
    [
        (lambda p: p.__setitem__(0, 5), INVALID_PARAM, 0),  # mode data length must be 0
        (lambda p: p.__setitem__(1, 1), INVALID_PARAM, 1),  # medium type
        (lambda p: p.__setitem__(2, 0x01), INVALID_PARAM, 2),  # reserved device-specific bit
        (lambda p: p.__setitem__(3, 4), INVALID_PARAM, 3),  # block descriptor length 4
        (lambda p: p.__setitem__(4, 0x88), INVALID_PARAM, 4),  # PS set
        (lambda p: p.__setitem__(4, 0x48), INVALID_PARAM, 4),  # SPF set
        (lambda p: p.__setitem__(4, 0x01), INVALID_PARAM, 4),  # page not served
        (lambda p: p.__setitem__(5, 0x10), INVALID_PARAM, 5),  # wrong page length
        (lambda p: p.__setitem__(6, p[6] | 0x01), INVALID_PARAM, 6),  # RCD is not changeable
        (lambda p: p.__setitem__(17, 1), INVALID_PARAM, 17),  # number of cache segments
        (lambda p: p.__delitem__(slice(20, None)), PARAM_LEN, None),  # page cut short
        (lambda p: p.__delitem__(slice(2, None)), PARAM_LEN, None),  # header cut short
        (lambda p: p.extend(b"\x0a"), PARAM_LEN, None),  # a dangling byte
    ],
)
def test_mode_select_invalid_lists_change_nothing(mutate: object, asc: int, byte: int | None) -> None:
    params = _caching_select()
    mutate(params)  # type: ignore[operator]
    t, store = make_target(write_cache=False)
    s = expect_check(t, select6(len(params)), ILLEGAL, asc, 0, bytes(params))
    if byte is not None:
        assert s.field_pointer is not None and not s.field_pointer.in_cdb and s.field_pointer.byte == byte
    assert store.calls_named("set_write_cache") == [] and not store.write_cache


def test_mode_select_is_all_or_nothing() -> None:
    t, store = make_target(write_cache=False)
    data = bytearray(expect_good(t, sense6(0x3F, dbd=True)))
    data[0] = 0
    data[4 + 2] |= 0x04  # WCE on in the caching page (valid)
    data[4 + 20 + 2] |= 0x04  # D_SENSE in the control page (not changeable)
    s = expect_check(t, select6(len(data)), ILLEGAL, INVALID_PARAM, 0, bytes(data))
    assert s.field_pointer is not None and s.field_pointer.byte == 26 and s.field_pointer.bit == 2
    assert not store.write_cache and store.calls_named("set_write_cache") == []


@pytest.mark.parametrize(
    ("blocks", "length", "ok"),
    [(2048, 512, True), (0, 512, True), (2047, 512, False), (2048, 4096, False)],
)
def test_mode_select_block_descriptor_cannot_change_geometry(blocks: int, length: int, ok: bool) -> None:
    t, _ = make_target()
    params = bytes([0, 0, 0, 8]) + struct.pack(">I", blocks) + b"\0" + length.to_bytes(3, "big")
    if ok:
        expect_good(t, select6(len(params)), params)
    else:
        expect_check(t, select6(len(params)), ILLEGAL, INVALID_PARAM, 0, params)


def test_mode_select_save_pages_is_refused() -> None:
    t, _ = make_target()
    s = expect_check(t, select6(24, sp=True), ILLEGAL, INVALID_CDB)
    assert s.field_pointer is not None and (s.field_pointer.byte, s.field_pointer.bit) == (1, 0)


def test_mode_select_store_failure_is_reported() -> None:
    t, store = make_target(write_cache=True)
    store.fail["set_write_cache"] = WriteError("flush failed")
    params = linux_cache_type_select(expect_good(t, sense6(0x08, dbd=True)), wce=False)
    expect_check(t, select6(len(params)), 0x03, 0x0C, 0, params)
