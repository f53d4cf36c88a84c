"""The mass-storage device behind USB/IP, without sockets: what a host sees on ep0 while it
enumerates, how bulk transfers reach the Bulk-Only Transport, and how pending bulk-IN transfers
complete or are cancelled."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gadget.descriptors import (
    DeviceIdentity,
    Speed,
    bos_descriptor,
    configuration_descriptor,
    device_descriptor,
    device_qualifier,
    string_descriptor,
)
from gadget.mass_storage import EPIPE, Completion, MassStorageDevice
from host_tests.usbip_support import CSW, RamDisk, pack_cbw

IDENT = DeviceIdentity(serial="00112233445566778899AABB")


class Host:
    """Drives a device the way a USB host controller would, numbering transfers."""

    def __init__(self, speed: Speed = Speed.HIGH, lu: RamDisk | None = None) -> None:
        self.lu = lu or RamDisk()
        self.dev = MassStorageDevice(self.lu, IDENT, speed)
        self.tag = 0

    def submit(self, ep: int, direction_in: bool, length: int, setup: bytes = b"", data: bytes = b"") -> list[Completion]:
        """Submit a transfer; a command it made ready is run at once, as an idle executor would."""
        self.tag += 1
        done = self.dev.submit(self.tag, ep, direction_in, length, setup, data)
        while (command := self.dev.take_command()) is not None:
            done += self.dev.complete(command, self.dev.run(command))
        return done

    def control(self, rtype: int, request: int, value: int = 0, index: int = 0, length: int = 0,
                data: bytes = b"") -> Completion:  # fmt: skip
        setup = struct.pack("<BBHHH", rtype, request, value, index, length if rtype & 0x80 else len(data))
        (done,) = self.submit(0, bool(rtype & 0x80), length if rtype & 0x80 else len(data), setup, data)
        assert done.tag == self.tag
        return done

    def configure(self) -> None:
        assert self.control(0x00, 0x09, 1).status == 0

    def cbw(self, cdb: bytes, length: int, data_in: bool, tag: int = 7) -> bytes:
        return pack_cbw(tag, cdb, length, data_in=data_in)


def ok(done: Completion) -> bytes:
    assert done.status == 0, done
    return done.data


@pytest.mark.parametrize("speed", list(Speed))
def test_enumeration_descriptors(speed: Speed) -> None:
    host = Host(speed)
    assert ok(host.control(0x80, 0x06, 0x0100, 0, 64)) == device_descriptor(IDENT, speed)
    assert ok(host.control(0x80, 0x06, 0x0100, 0, 8)) == device_descriptor(IDENT, speed)[:8]  # first probe
    config = configuration_descriptor(IDENT, speed)
    assert ok(host.control(0x80, 0x06, 0x0200, 0, 9)) == config[:9]
    assert ok(host.control(0x80, 0x06, 0x0200, 0, 0xFFFF)) == config
    assert host.control(0x80, 0x06, 0x0201, 0, 9).status == -EPIPE  # only configuration index 0
    for index in range(4):
        expected = string_descriptor(IDENT, index, 0x0409)
        assert ok(host.control(0x80, 0x06, 0x0300 | index, 0x0409, 255)) == expected
    assert host.control(0x80, 0x06, 0x0309, 0x0409, 255).status == -EPIPE
    qualifier = host.control(0x80, 0x06, 0x0600, 0, 10)
    other = host.control(0x80, 0x06, 0x0700, 0, 255)
    bos = host.control(0x80, 0x06, 0x0F00, 0, 255)
    if speed == Speed.SUPER:
        assert qualifier.status == other.status == -EPIPE  # USB 3.2 9.6.2
        assert ok(bos) == bos_descriptor()
    else:
        assert ok(qualifier) == device_qualifier(IDENT, speed)
        assert ok(other) == configuration_descriptor(IDENT, speed, other_speed=True)
        assert bos.status == -EPIPE  # bcdUSB 2.00 devices have no BOS
    assert host.dev.bot.max_packet == {Speed.FULL: 64, Speed.HIGH: 512, Speed.SUPER: 1024}[speed]


def test_configuration_interface_and_status_requests() -> None:
    host = Host()
    assert ok(host.control(0x80, 0x08, length=1)) == b"\x00"
    assert host.control(0x81, 0x0A, 0, 0, 1).status == -EPIPE  # no interface while unconfigured
    assert host.control(0x00, 0x09, 2).status == -EPIPE  # there is only configuration 1
    host.configure()
    assert ok(host.control(0x80, 0x08, length=1)) == b"\x01"
    assert ok(host.control(0x81, 0x0A, 0, 0, 1)) == b"\x00"
    assert host.control(0x01, 0x0B, 0, 0).status == 0  # SET_INTERFACE 0/0
    assert host.control(0x01, 0x0B, 1, 0).status == -EPIPE  # no alternate setting 1
    assert host.control(0x01, 0x0B, 0, 1).status == -EPIPE  # no interface 1
    assert ok(host.control(0x80, 0x00, length=2)) == b"\x00\x00"  # bus powered, no remote wakeup
    assert ok(host.control(0x81, 0x00, 0, 0, 2)) == b"\x00\x00"
    assert ok(host.control(0x82, 0x00, 0, 0x81, 2)) == b"\x00\x00"
    assert host.control(0x82, 0x00, 0, 0x82, 2).status == -EPIPE  # no such endpoint
    assert host.control(0x00, 0x05, 5).status == 0  # SET_ADDRESS is harmless


def test_device_status_reports_a_self_powered_identity() -> None:
    dev = MassStorageDevice(RamDisk(), DeviceIdentity(serial=IDENT.serial, self_powered=True))
    (done,) = dev.submit(1, 0, True, 2, struct.pack("<BBHHH", 0x80, 0x00, 0, 0, 2))
    assert (done.status, done.data) == (0, b"\x01\x00")  # GET_STATUS: self powered


def test_endpoint_halt_features_reach_the_bot() -> None:
    host = Host()
    host.configure()
    assert host.control(0x02, 0x03, 0, 0x81).status == 0  # SET_FEATURE(ENDPOINT_HALT)
    assert host.dev.bot.in_halted and ok(host.control(0x82, 0x00, 0, 0x81, 2)) == b"\x01\x00"
    (done,) = host.submit(1, True, 13)
    assert done.status == -EPIPE  # a halted endpoint stalls every transfer
    assert host.control(0x02, 0x01, 0, 0x81).status == 0  # CLEAR_FEATURE(ENDPOINT_HALT)
    assert not host.dev.bot.in_halted
    assert host.control(0x02, 0x03, 0, 0x01).status == 0
    assert host.dev.bot.out_halted
    (done,) = host.submit(1, False, 31, data=host.cbw(b"\x00" * 6, 0, False))
    assert done.status == -EPIPE
    assert host.control(0x02, 0x01, 0, 0x01).status == 0 and not host.dev.bot.out_halted


def test_class_requests() -> None:
    host = Host()
    host.configure()
    assert ok(host.control(0xA1, 0xFE, 0, 0, 1)) == b"\x00"  # Get Max LUN: one LUN
    assert host.control(0xA1, 0xFE, 0, 1, 1).status == -EPIPE  # wrong interface
    resets = host.dev.bot.status()["resets"]
    assert isinstance(resets, int)
    assert host.control(0x21, 0xFF, 0, 0).status == 0  # Bulk-Only Mass Storage Reset
    assert host.dev.bot.status()["resets"] == resets + 1
    assert host.control(0x21, 0xFF, 1, 0).status == -EPIPE  # wValue must be 0
    assert host.control(0x21, 0x42, 0, 0).status == -EPIPE  # unknown class request
    assert host.control(0xC0, 0x01, 0, 0, 4).status == -EPIPE  # vendor request
    assert host.control(0x80, 0x0C, 0, 0, 2).status == -EPIPE  # SYNCH_FRAME


def test_superspeed_link_requests_are_acknowledged_only_at_superspeed() -> None:
    host = Host(Speed.SUPER)
    assert host.control(0x00, 0x31, 40).status == 0  # SET_ISOCH_DELAY
    assert host.control(0x00, 0x30, 0, 0, 0, bytes(6)).status == 0  # SET_SEL
    assert host.control(0x00, 0x03, 48).status == 0  # SET_FEATURE(U1_ENABLE)
    assert Host(Speed.HIGH).control(0x00, 0x31, 40).status == -EPIPE


def test_bulk_transfers_need_a_configuration_and_an_endpoint() -> None:
    host = Host()
    (done,) = host.submit(1, True, 13)
    assert done.status == -EPIPE  # not configured yet
    host.configure()
    (done,) = host.submit(2, True, 13)
    assert done.status == -EPIPE  # endpoint 2 does not exist


def test_write_then_read_through_the_bot() -> None:
    host = Host()
    host.configure()
    payload = bytes(range(256)) * 4
    (done,) = host.submit(1, False, 31, data=host.cbw(struct.pack(">BBIBHB", 0x2A, 0, 3, 0, 2, 0), 1024, False))
    assert done == Completion(host.tag, 0, 31)
    (done,) = host.submit(1, False, 1024, data=payload)
    assert done.status == 0 and done.actual_length == 1024
    (csw,) = host.submit(1, True, 13)
    assert CSW.unpack(csw.data) == (b"USBS", 7, 0, 0)
    assert host.lu.data[3 * 512 : 5 * 512] == payload
    host.submit(1, False, 31, data=host.cbw(struct.pack(">BBIBHB", 0x28, 0, 3, 0, 2, 0), 1024, True, tag=8))
    (data,) = host.submit(1, True, 1024)
    assert ok(data) == payload
    (csw,) = host.submit(1, True, 13)
    assert CSW.unpack(csw.data) == (b"USBS", 8, 0, 0)


def test_pending_bulk_in_completes_when_data_is_ready_in_order() -> None:
    host = Host()
    host.configure()
    assert host.submit(1, True, 36) == []  # nothing to send yet: the transfer waits
    first = host.tag
    assert host.submit(1, True, 13) == []
    second = host.tag
    assert host.dev.pending == (first, second)
    done = host.submit(1, False, 31, data=host.cbw(bytes([0x12, 0, 0, 0, 36, 0]), 36, True))
    assert [d.tag for d in done] == [host.tag, first, second]  # CBW, then the data, then the CSW
    assert done[1].data[8:16] == b"USBMIRR " and CSW.unpack(done[2].data)[3] == 0
    assert len(host.dev.pending) == 0


def test_cancel_removes_only_pending_transfers() -> None:
    host = Host()
    host.configure()
    assert host.submit(1, True, 13) == []
    pending = host.tag
    assert host.dev.cancel(pending)
    assert not host.dev.cancel(pending)  # already gone
    assert not host.dev.cancel(12345)
    done = host.submit(1, False, 31, data=host.cbw(b"\x00" * 6, 0, False))
    assert [d.tag for d in done] == [host.tag]  # the cancelled transfer never completes
    (csw,) = host.submit(1, True, 13)
    assert CSW.unpack(csw.data)[3] == 0


def test_disconnect_mid_data_phase_leaves_a_clean_device() -> None:
    host = Host()
    host.configure()
    host.submit(1, False, 31, data=host.cbw(struct.pack(">BBIBHB", 0x2A, 0, 0, 0, 8, 0), 4096, False))
    host.submit(1, False, 512, data=b"\xee" * 512)  # the host vanishes after 512 of 4096 bytes
    host.submit(1, True, 13)
    host.dev.disconnect()
    assert host.dev.pending == () and host.dev.configuration == 0
    assert host.lu.executed == []  # a short DATA-OUT never runs the command
    host.configure()
    host.submit(1, False, 31, data=host.cbw(b"\x00" * 6, 0, False, tag=99))
    (csw,) = host.submit(1, True, 13)
    assert CSW.unpack(csw.data) == (b"USBS", 99, 0, 0)


def test_set_configuration_returns_the_bot_to_a_fresh_state() -> None:
    # vhci-hcd resets the port locally: after usb-storage resets a device stuck in a data phase,
    # the device only sees the SET_CONFIGURATION of the re-enumeration
    host = Host()
    host.configure()
    host.submit(1, False, 31, data=host.cbw(struct.pack(">BBIBHB", 0x2A, 0, 0, 0, 8, 0), 4096, False))
    host.submit(1, False, 512, data=b"\xee" * 512)
    host.configure()
    host.submit(1, False, 31, data=host.cbw(b"\x00" * 6, 0, False, tag=42))
    (csw,) = host.submit(1, True, 13)
    assert CSW.unpack(csw.data) == (b"USBS", 42, 0, 0)


@given(st.binary(min_size=8, max_size=8), st.integers(0, 300), st.booleans(), st.binary(max_size=16))
@settings(max_examples=300, deadline=None)
def test_any_control_request_completes_or_stalls(setup: bytes, length: int, configured: bool, data: bytes) -> None:
    host = Host()
    if configured:
        host.configure()
    done = host.submit(0, bool(setup[0] & 0x80), length, setup, data)
    assert done[0].status in (0, -EPIPE)
    assert len(done[0].data) <= length


_READ_CBW = pack_cbw(1, struct.pack(">BBIBHB", 0x28, 0, 0, 0, 2, 0), 1024, data_in=True)
_WRITE_CBW = pack_cbw(2, struct.pack(">BBIBHB", 0x2A, 0, 0, 0, 2, 0), 1024)
_actions = st.one_of(
    st.tuples(st.just("control"), st.binary(min_size=8, max_size=8), st.integers(0, 64)),
    st.tuples(st.just("in"), st.sampled_from([13, 512, 1024, 4096])),
    st.tuples(st.just("out"), st.sampled_from([_READ_CBW, _WRITE_CBW, b"\0" * 512, b"junk", b"\0" * 31])),
    st.tuples(st.just("clear"), st.sampled_from([0x81, 0x01])),
    st.tuples(st.just("reset")),
    st.tuples(st.just("cancel"), st.integers(0, 40)),
    st.tuples(st.just("disconnect")),
)


@given(st.lists(_actions, max_size=40))
@settings(max_examples=200, deadline=None)
def test_every_transfer_completes_once_or_is_cancelled(actions: list[tuple[object, ...]]) -> None:
    # what vhci-hcd relies on: one completion per URB, none for an unlinked one, never an exception
    host = Host()
    host.configure()
    outstanding: set[int] = set()
    finished: set[int] = set()
    for action in actions:
        kind = action[0]
        if kind == "control":
            setup, length = action[1], action[2]
            assert isinstance(setup, bytes) and isinstance(length, int)
            done = host.submit(0, bool(setup[0] & 0x80), length, setup)
        elif kind == "in":
            assert isinstance(action[1], int)
            done = host.submit(1, True, action[1])
        elif kind == "out":
            assert isinstance(action[1], bytes)
            done = host.submit(1, False, len(action[1]), data=action[1])
        elif kind == "clear":
            assert isinstance(action[1], int)
            done = host.submit(0, False, 0, struct.pack("<BBHHH", 0x02, 0x01, 0, action[1], 0))
        elif kind == "reset":
            done = host.submit(0, False, 0, struct.pack("<BBHHH", 0x21, 0xFF, 0, 0, 0))
        elif kind == "cancel":
            assert isinstance(action[1], int)
            if host.dev.cancel(action[1]):
                assert action[1] in outstanding
                outstanding.discard(action[1])
            continue
        else:
            host.dev.disconnect()
            outstanding.clear()  # the host is gone; its transfers with it
            host.configure()
            continue
        outstanding.add(host.tag)
        for completion in done:
            assert completion.tag in outstanding and completion.tag not in finished
            assert completion.status in (0, -EPIPE)
            outstanding.discard(completion.tag)
            finished.add(completion.tag)
        assert set(host.dev.pending) == outstanding
