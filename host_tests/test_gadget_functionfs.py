"""gadget.functionfs without a kernel: the FunctionFS v2 descriptor and strings blobs, ep0 event
parsing, the class requests' answers and the sizing of bulk OUT reads (which must never swallow the
next CBW). The whole path through a real kernel is host_tests/realkernel/test_gadget_realkernel.py."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from firmware.logical_unit import CommandPlan, CommandResult, Direction, Status
from gadget.bot import CBW_LENGTH, BulkOnlyTransport, Cbw
from gadget.descriptors import Speed
from gadget.functionfs import (
    ControlReply,
    FfsEvent,
    SetupRequest,
    _OutPhaseTracker,
    answer_setup,
    function_descriptors,
    function_strings,
    parse_events,
)


class NullUnit:
    def plan(self, cdb: bytes) -> CommandPlan:
        return CommandPlan(Direction.NONE, 0)

    def execute(self, cdb: bytes, data_out: bytes = b"") -> CommandResult:
        return CommandResult(Status.GOOD)

    def reset_event(self) -> None:
        pass


def split(blob: bytes, count: int, off: int) -> tuple[list[bytes], int]:
    out = []
    for _ in range(count):
        n = blob[off]
        out.append(blob[off:off + n])
        off += n
    return out, off


def test_descriptor_blob_has_all_three_speeds_with_superspeed_companions() -> None:
    blob = function_descriptors()
    magic, length, flags, fs, hs, ss = struct.unpack_from("<6I", blob)
    assert magic == 3 and length == len(blob)  # FUNCTIONFS_DESCRIPTORS_MAGIC_V2
    assert flags == 0b111 and (fs, hs, ss) == (3, 3, 5)  # HAS_FS_DESC | HAS_HS_DESC | HAS_SS_DESC
    off = 24
    for speed, count, max_packet in ((Speed.FULL, fs, 64), (Speed.HIGH, hs, 512), (Speed.SUPER, ss, 1024)):
        descs, off = split(blob, count, off)
        iface = descs[0]
        assert iface[1] == 4 and iface[4] == 2  # interface with two endpoints
        assert iface[5:8] == bytes([0x08, 0x06, 0x50])  # mass storage, SCSI transparent, Bulk-Only
        assert iface[8] == 1  # iInterface = the function's first string
        eps = [d for d in descs if d[1] == 5]
        assert [d[2] for d in eps] == [0x81, 0x01]  # IN first: ep1 is IN, ep2 is OUT
        assert all(d[3] == 2 and struct.unpack_from("<H", d, 4)[0] == max_packet for d in eps)
        if speed is Speed.SUPER:
            assert [d[1] for d in descs] == [4, 5, 0x30, 5, 0x30]  # each endpoint then its companion
    assert off == len(blob)


def test_descriptor_blob_for_a_subset_of_speeds() -> None:
    blob = function_descriptors((Speed.FULL, Speed.HIGH))
    _, length, flags, fs, hs = struct.unpack_from("<5I", blob)
    assert flags == 0b011 and (fs, hs) == (3, 3) and length == len(blob)


def test_strings_blob() -> None:
    blob = function_strings("usbmirror disk")
    magic, length, str_count, lang_count, lang = struct.unpack_from("<4IH", blob)
    assert (magic, length, str_count, lang_count, lang) == (2, len(blob), 1, 1, 0x0409)
    assert blob[18:] == b"usbmirror disk\0"


def event(kind: int, setup: bytes = bytes(8)) -> bytes:
    return setup + bytes([kind, 0, 0, 0])


def test_parse_events_reads_setup_packets_and_skips_unknown_types() -> None:
    raw = (event(FfsEvent.BIND) + event(FfsEvent.ENABLE)
           + event(FfsEvent.SETUP, struct.pack("<BBHHH", 0xA1, 0xFE, 0, 0, 1))
           + event(99) + event(FfsEvent.SUSPEND))
    got = list(parse_events(raw))
    assert [k for k, _ in got] == [FfsEvent.BIND, FfsEvent.ENABLE, FfsEvent.SETUP, FfsEvent.SUSPEND]
    assert got[2][1] == SetupRequest(0xA1, 0xFE, 0, 0, 1)
    assert list(parse_events(raw[:7])) == []  # a torn event is not an event


def test_class_requests() -> None:
    bot = BulkOnlyTransport(NullUnit(), max_lun=0)
    lun = answer_setup(bot, SetupRequest(0xA1, 0xFE, 0, 0, 1))
    assert lun.reply is ControlReply.DATA and lun.data == b"\x00"
    bot.set_halt(0x81)
    reset = answer_setup(bot, SetupRequest(0x21, 0xFF, 0, 0, 0))
    assert reset.reply is ControlReply.ACK and not bot.in_halted
    # BOT 3.1/3.2: wrong wValue/wLength, unknown requests and standard requests are stalled
    for req in (SetupRequest(0x21, 0xFF, 1, 0, 0), SetupRequest(0x21, 0xFF, 0, 0, 2),
                SetupRequest(0xA1, 0xFE, 0, 0, 0), SetupRequest(0xA1, 0x01, 0, 0, 4),
                SetupRequest(0x80, 0x06, 0x0100, 0, 18)):
        assert answer_setup(bot, req).reply is ControlReply.STALL, req


def cbw(length: int, data_in: bool) -> bytes:
    flags = 0x80 if data_in else 0x00
    return struct.pack("<IIIBBB", 0x43425355, 7, length, flags, 0, 10) + bytes(16)


def test_out_reads_are_sized_by_the_data_phase() -> None:
    t = _OutPhaseTracker()
    assert t.next_read_size(512) == 512  # a CBW: one packet
    t.feed(cbw(4096, data_in=False), 512)
    assert t.next_read_size(512) == 4096  # exactly the data phase, never more
    t.feed(bytes(4096), 4096)
    assert t.next_read_size(512) == 512
    t.feed(cbw(200 * 1024, data_in=False), 512)
    assert t.next_read_size(1024) == 64 * 1024  # chunked
    t.feed(bytes(100), 64 * 1024)  # short packet: the host ended the phase early
    assert t.next_read_size(1024) == 1024
    t.feed(cbw(100, data_in=False), 1024)
    assert t.next_read_size(512) == 512  # rounded up to a packet (dwc3 needs aligned OUT buffers)
    t.reset()
    assert t.next_read_size(64) == 64
    t.feed(cbw(4096, data_in=True), 512)  # DATA-IN: the next OUT transfer is a CBW
    assert t.next_read_size(512) == 512


@given(length=st.integers(0, 1 << 24), data_in=st.booleans(), mp=st.sampled_from([64, 512, 1024]))
def test_out_read_never_exceeds_the_phase_rounded_to_a_packet(length: int, data_in: bool, mp: int) -> None:
    t = _OutPhaseTracker()
    raw = Cbw.for_command(1, b"\x28" + bytes(9), length, data_in=data_in).build()
    assert len(raw) == CBW_LENGTH
    t.feed(raw, mp)
    left = 0 if data_in else length
    while left > 0:
        size = t.next_read_size(mp)
        assert size % mp == 0 and size - left < mp
        got = min(size, left)
        t.feed(bytes(got), size)
        left -= got
    assert t.next_read_size(mp) == mp


def test_garbage_is_not_taken_for_a_cbw() -> None:
    t = _OutPhaseTracker()
    t.feed(b"USBD" + bytes(27), 512)
    assert t.next_read_size(512) == 512


@pytest.mark.parametrize("speed", list(Speed))
def test_every_speed_builds(speed: Speed) -> None:
    assert function_descriptors((speed,))
