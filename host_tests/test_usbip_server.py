"""The USB/IP server over real loopback sockets: listing, importing, one importer at a time,
detach/re-attach, bad peers, pending URBs and unlink, and a disk written and read through
USB/IP -> BOT -> logical unit, with the PyPI `usbip` client as an independent peer."""

from __future__ import annotations

import logging
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from firmware.scsi import ScsiTarget, naa_locally_assigned
from firmware.volume import Volume
from gadget.descriptors import DeviceIdentity, Speed
from gadget.usbip_protocol import (
    ECONNRESET,
    ENODEV,
    USBIP_VERSION,
    ImportReply,
    OpStatus,
    SubmitCommand,
    SubmitReturn,
    UrbDirection,
)
from gadget.usbip_server import UsbipServer
from host_tests.usbip_support import CSW, UA_RESET, RamDisk, UsbipClient, pack_cbw

IDENT = DeviceIdentity(serial="0123456789ABCDEF", vendor_id=0x1209, product_id=0x0001)
TIMEOUT = 20.0


@pytest.fixture
def server(tmp_path: Path) -> Iterator[UsbipServer]:
    """The real stack: USB/IP -> BOT -> ScsiTarget -> Volume on a 2 MiB file, write cache off."""
    with Volume(tmp_path / "disk.img", size=2 << 20, block_size=512) as volume:
        target = ScsiTarget(volume, serial="0123456789ABCDEF", device_id=naa_locally_assigned(bytes(16)))
        with UsbipServer.for_logical_unit(target, IDENT, speed=Speed.HIGH) as srv:
            yield srv


def client(srv: UsbipServer) -> UsbipClient:
    return UsbipClient("127.0.0.1", srv.port, timeout=TIMEOUT)


def attached(srv: UsbipServer, *, scsi_target: bool = True) -> UsbipClient:
    """Import, enumerate and bring the disk up as a host does. The SCSI target reports the
    configuration as a reset: the first TEST UNIT READY gets UNIT ATTENTION 29h/00."""
    c = client(srv)
    reply = c.import_device("1-1")
    assert reply.status == 0, reply
    c.enumerate()
    assert c.until_ready() == ([UA_RESET] if scsi_target else [])
    return c


def wait_detached(srv: UsbipServer) -> None:
    """The server notices a closed connection asynchronously; wait (bounded) until it has."""
    done = threading.Event()
    for _ in range(int(TIMEOUT / 0.01)):
        if srv.attached is None:
            return
        done.wait(0.01)
    raise AssertionError("server still attached")


# -- operation phase -----------------------------------------------------------------------------------
def test_devlist_describes_the_disk(server: UsbipServer) -> None:
    with client(server) as c:
        reply = c.devlist()
    assert reply.status == 0 and len(reply.devices) == 1
    dev = reply.devices[0]
    assert (dev.info.busid, dev.info.busnum, dev.info.devnum, dev.info.speed) == ("1-1", 1, 2, 3)
    assert (dev.info.id_vendor, dev.info.id_product, dev.info.num_interfaces) == (0x1209, 0x0001, 1)
    assert [(i.interface_class, i.interface_subclass, i.interface_protocol) for i in dev.interfaces] == [(0x08, 0x06, 0x50)]


def test_import_then_second_importer_refused_while_devlist_works(server: UsbipServer) -> None:
    with attached(server) as first:
        with client(server) as second:
            assert second.import_device("1-1") == ImportReply(OpStatus.DEV_BUSY)
            assert second.closed_by_server()
        with client(server) as probe:
            assert len(probe.devlist().devices) == 1
        assert first.read_capacity()[1] == 512  # the first importer is undisturbed
    wait_detached(server)
    with attached(server) as again:  # detach, then re-attach works
        assert again.read_capacity()[1] == 512
    assert server.counters["refused"] == 1


def test_unknown_busid_is_refused(server: UsbipServer) -> None:
    with client(server) as c:
        assert c.import_device("9-9") == ImportReply(OpStatus.NODEV)
    assert server.attached is None


def test_accepted_sockets_have_nodelay(server: UsbipServer) -> None:
    with attached(server):
        socks = list(server._connections)
        assert socks and all(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for s in socks)


# -- URB phase -------------------------------------------------------------------------------------
def test_write_then_read_through_cbw_data_csw(server: UsbipServer) -> None:
    with attached(server) as c:
        blocks, block_size = c.read_capacity()
        assert blocks >= 256 and block_size == 512
        payload = bytes((i * 7 + 3) & 0xFF for i in range(120 * 1024))  # usb-storage's default maximum
        assert c.write10(10, payload) == 0
        assert c.read10(10, len(payload) // 512) == payload
        tail = b"\x5a" * 512
        assert c.write10(blocks - 1, tail) == 0
        assert c.read10(blocks - 1, 1) == tail
        out = c.scsi(struct.pack(">BBIBHB", 0x28, 0, blocks, 0, 1, 0), data_in=512)  # past the end
        assert out.csw_status == 1
        assert c.read10(10, 1) == payload[:512]  # and the device carries on


def test_wrong_devid_gets_an_error_not_a_crash(server: UsbipServer) -> None:
    with attached(server) as c:
        ret = c.wait(c.submit(0, UrbDirection.IN, 18, setup=bytes.fromhex("8006000100001200"), devid=0x00050007))
        assert isinstance(ret, SubmitReturn) and ret.status == -ENODEV
        assert c.get_descriptor(1, length=18).status == 0


@pytest.mark.parametrize(
    "garbage",
    [
        struct.pack(">IIIIIIIiii8s", 0x77, 1, 0x10002, 0, 0, 0, 0, 0, 0, 0, bytes(8)),  # unknown command
        struct.pack(">IIIIIIIiii8s", 1, 1, 0x10002, 0, 1, 0, 0x7FFFFFF0, 0, 0, 0, bytes(8)),  # 2 GiB OUT
        b"\xff" * 48,
    ],
    ids=["unknown-command", "huge-length", "garbage"],
)
def test_bad_urb_header_closes_with_a_log_line_then_fresh_import_works(
    server: UsbipServer, garbage: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="gadget.usbip_server")
    with attached(server) as c:
        c.send_raw(garbage)
        assert c.closed_by_server()
    wait_detached(server)
    assert any("protocol error" in r.getMessage() for r in caplog.records)
    with attached(server) as c:
        assert c.read_capacity()[1] == 512


def test_garbage_before_import_closes_the_connection(server: UsbipServer) -> None:
    with client(server) as c:
        c.send_raw(b"GET / HTTP/1.0\r\n\r\n")
        assert c.closed_by_server()
    with client(server) as c:
        c.send_raw(struct.pack(">HHI", 0x0100, 0x8005, 0))  # wrong version
        assert c.closed_by_server()
    with attached(server) as c:
        assert c.read_capacity()[1] == 512


def test_client_vanishing_mid_data_phase_leaves_the_device_usable(server: UsbipServer) -> None:
    c = attached(server)
    cdb = struct.pack(">BBIBHB", 0x2A, 0, 0, 0, 64, 0)
    c.bulk_out(pack_cbw(1, cdb, 64 * 512))
    c.bulk_out(b"\x11" * 4096)  # 4 KiB of the 32 KiB promised...
    seq = c.submit(1, UrbDirection.OUT, 8192, b"\x22" * 8192)
    c.sock.sendall(b"\x33" * 100)  # ...and the middle of another header, then gone
    c.wait(seq)
    c.sock.close()
    wait_detached(server)
    with attached(server) as fresh:
        assert fresh.read10(0, 64) == bytes(64 * 512)  # the half-sent WRITE never ran
        assert fresh.write10(0, b"\x44" * 1024) == 0
        assert fresh.read10(0, 2) == b"\x44" * 1024


def test_unlink_of_pending_urb_and_of_completed_urb(server: UsbipServer) -> None:
    with attached(server) as c:
        pending = c.submit(1, UrbDirection.IN, 13)  # no command yet: the device has nothing to send
        ret = c.unlink(pending)
        assert ret.status == -ECONNRESET
        done = c.control(0x80, 0x00, 0, 0, 2)  # the next URB is answered, and nothing for `pending`
        assert done.status == 0 and c.pending_returns() == {}
        assert server.status()["device"]["pending_in"] == 0
        completed = c.control(0x80, 0x08, 0, 0, 1)
        assert c.unlink(completed.seqnum).status == 0
        assert c.read_capacity()[1] == 512  # the BOT was not disturbed by the cancelled transfer


def test_pending_bulk_in_is_answered_when_the_command_arrives(server: UsbipServer) -> None:
    with attached(server) as c:
        data_seq = c.submit(1, UrbDirection.IN, 36)
        csw_seq = c.submit(1, UrbDirection.IN, 13)
        cdb = bytes([0x12, 0, 0, 0, 36, 0])
        cbw_seq = c.submit(1, UrbDirection.OUT, 31, pack_cbw(5, cdb, 36, data_in=True))
        cbw, data, csw = c.wait(cbw_seq), c.wait(data_seq), c.wait(csw_seq)
        assert isinstance(cbw, SubmitReturn) and cbw.status == 0 and cbw.actual_length == 31
        assert isinstance(data, SubmitReturn) and data.actual_length == 36 and data.data[0] == 0x00
        assert isinstance(csw, SubmitReturn) and CSW.unpack(csw.data) == (b"USBS", 5, 0, 0)


def test_stop_disconnects_an_attached_client() -> None:
    srv = UsbipServer.for_logical_unit(RamDisk(), IDENT).start()
    c = attached(srv, scsi_target=False)
    srv.stop()
    assert c.closed_by_server()
    c.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", srv.port), timeout=2).close()


def test_factory_gives_each_importer_a_fresh_device() -> None:
    from gadget.mass_storage import MassStorageDevice

    made: list[MassStorageDevice] = []

    def factory() -> MassStorageDevice:
        made.append(MassStorageDevice(RamDisk(), IDENT, Speed.FULL))
        return made[-1]

    with UsbipServer(factory, busid="2-1") as srv:
        with client(srv) as c:
            assert c.import_device("2-1").status == 0
            assert c.devid == (1 << 16) | 2
            c.enumerate()
        wait_detached(srv)
        with client(srv) as c:
            assert c.import_device("2-1").status == 0
    assert len(made) == 3  # one for the description, one per import


# -- the PyPI usbip client as an independent peer --------------------------------------------------------
def test_pypi_usbip_client_lists_and_uses_the_disk(server: UsbipServer) -> None:
    import usbip
    from usbip.classes.host.msc import MSCDriver

    transport = usbip.USBIP("127.0.0.1", server.port)
    (entry,) = usbip.host.list_devices(transport)
    assert (entry["busid"], entry["idVendor"], entry["idProduct"]) == ("1-1", 0x1209, 0x0001)
    assert entry["interfaces"] == [(0x08, 0x06, 0x50)]
    handle = usbip.open(0x1209, 0x0001, busid="1-1", transport=transport)  # GET_DESCRIPTOR + SET_CONFIGURATION
    try:
        assert handle.device_descriptor.idVendor == 0x1209
        msc = MSCDriver(handle)  # reads the configuration descriptor for the endpoints
        assert (msc.ep_in, msc.ep_out) == (0x81, 0x01)
        assert msc.max_lun() == 0
        assert msc.inquiry()[0] == 0x00  # direct-access block device
        # the configuration was a reset: TEST UNIT READY fails once with the unit attention
        assert msc.command_in([0x00] * 6, 0)[1] == 1
        sense, status = msc.command_in([0x03, 0, 0, 0, 18, 0], 18)
        assert status == 0 and (sense[2] & 0x0F, sense[12], sense[13]) == UA_RESET
        assert msc.command_in([0x00] * 6, 0)[1] == 0
        blocks, block_size = msc.read_capacity()
        assert block_size == 512 and blocks >= 256
        data = bytes(range(256)) * 16
        assert msc.write_blocks(40, data, block_size) == 8
        assert msc.read_blocks(40, 8, block_size) == data
    finally:
        handle.close()
    wait_detached(server)


def test_raw_op_header_with_trailing_status_is_accepted(server: UsbipServer) -> None:
    # usbip_protocol.rst: the status of a request is unused; a client may leave junk there
    with client(server) as c:
        c.send_raw(struct.pack(">HHI", USBIP_VERSION, 0x8005, 0xDEADBEEF))
        reply = c.sock.recv(8)
        assert struct.unpack(">HHI", reply) == (USBIP_VERSION, 0x0005, 0)


def test_urbs_split_into_single_bytes_are_reassembled(server: UsbipServer) -> None:
    with attached(server) as c:
        seq = c.next_seqnum()

        wire = c.conn.send(SubmitCommand(seq, c.devid, UrbDirection.IN, 0, 0, 18, bytes.fromhex("8006000100001200")))
        for i in range(len(wire)):
            c.send_raw(wire[i : i + 1])
        ret = c.wait(seq)
        assert isinstance(ret, SubmitReturn) and ret.status == 0 and ret.data[:2] == b"\x12\x01"


def test_connection_idle_before_import_is_closed(server: UsbipServer, monkeypatch: pytest.MonkeyPatch) -> None:
    import gadget.usbip_server as usbip_server

    monkeypatch.setattr(usbip_server, "OP_PHASE_TIMEOUT", 0.2)
    with client(server) as idle:
        assert idle.closed_by_server()  # the server gave up on a peer that never asked anything
    with attached(server) as c:
        assert c.read_capacity()[1] == 512


def test_commands_sent_ahead_in_one_buffer_are_each_answered(server: UsbipServer) -> None:
    """A host may queue URBs before the earlier ones return: two whole commands (a 300 KiB WRITE,
    whose data URB is larger than the server's receive buffer, then a READ of it), a CMD_UNLINK
    between them and a control request, all in one send. Each URB gets its own answer, in order,
    and the data lands."""
    from gadget.usbip_protocol import UnlinkCommand
    from gadget.usbip_server import RECV_BUFFER

    with attached(server) as c:
        payload = bytes(range(256)) * (300 * 1024 // 256)
        assert len(payload) > RECV_BUFFER
        blocks = len(payload) // 512
        write = struct.pack(">BBIBHB", 0x2A, 0, 8, 0, blocks, 0)
        read = struct.pack(">BBIBHB", 0x28, 0, 8, 0, blocks, 0)
        urbs: list[tuple[UrbDirection, int, bytes]] = [
            (UrbDirection.OUT, 31, pack_cbw(1, write, len(payload))),
            (UrbDirection.OUT, len(payload), payload),
            (UrbDirection.IN, 13, b""),
            (UrbDirection.OUT, 31, pack_cbw(2, read, len(payload), data_in=True)),
            (UrbDirection.IN, len(payload), b""),
            (UrbDirection.IN, 13, b""),
        ]
        wire = b""
        seqs = []
        for direction, length, data in urbs:
            seq = c.next_seqnum()
            seqs.append(seq)
            wire += c.conn.send(SubmitCommand(seq, c.devid, direction, 1, 0, length, bytes(8), data))
            if len(seqs) == 3:  # an unlink of a URB that already completed, between the commands
                unlink = c.next_seqnum()
                wire += c.conn.send(UnlinkCommand(unlink, c.devid, seqs[0]))
        control = c.next_seqnum()
        wire += c.conn.send(SubmitCommand(control, c.devid, UrbDirection.IN, 0, 0, 2, bytes.fromhex("8000000000000200")))
        c.send_raw(wire)
        got = [c.wait(s) for s in seqs]
        assert all(isinstance(r, SubmitReturn) and r.status == 0 for r in got)
        assert got[1].actual_length == len(payload)  # type: ignore[union-attr]
        assert CSW.unpack(got[2].data) == (b"USBS", 1, 0, 0)  # type: ignore[union-attr]
        assert got[4].data == payload  # type: ignore[union-attr]
        assert CSW.unpack(got[5].data) == (b"USBS", 2, 0, 0)  # type: ignore[union-attr]
        assert c.wait(unlink).status == 0  # completed before the unlink came: 0, not -ECONNRESET
        ret = c.wait(control)
        assert isinstance(ret, SubmitReturn) and ret.status == 0 and len(ret.data) == 2
