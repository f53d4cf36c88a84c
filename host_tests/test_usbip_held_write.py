"""Control requests and resets while a WRITE waits (for a slow journal, a `sync` remote that stopped
answering), over real loopback USB/IP: ep0 is answered at once, a reset abandons the command
without losing or repeating its write, and a re-enumeration raises UNIT ATTENTION 29h/00.

"At once" is asserted as "answered before a generous socket timeout, while the write is still
held": the point is that the answer does not wait for the WRITE, not how fast it is."""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from firmware.scsi import ScsiTarget, naa_locally_assigned
from gadget.descriptors import DeviceIdentity, Speed, device_descriptor
from gadget.usbip_protocol import ECONNRESET, SubmitReturn, UrbDirection
from gadget.usbip_server import UsbipServer
from host_tests.scsi_fakes import HeldWriteStore
from host_tests.usbip_support import CSW, UA_RESET, UsbipClient, pack_cbw

IDENT = DeviceIdentity(serial="0123456789ABCDEF", vendor_id=0x1209, product_id=0x0001)
ANSWERED = 5.0  # seconds a control request may take before the test calls it unanswered
SETTLE = 20.0  # bound on waiting for the executor to finish a released write
BLOCK = 512


@dataclass
class Rig:
    server: UsbipServer
    store: HeldWriteStore
    client: UsbipClient


@pytest.fixture
def rig() -> Iterator[Rig]:
    store = HeldWriteStore(block_size=BLOCK, num_blocks=2048)
    store.release.set()  # bring-up writes nothing, but do not hold anything until a test asks
    target = ScsiTarget(store, serial="0123456789ABCDEF", device_id=naa_locally_assigned(bytes(16)))
    with UsbipServer.for_logical_unit(target, IDENT, speed=Speed.HIGH) as srv:
        c = UsbipClient("127.0.0.1", srv.port, timeout=SETTLE)
        try:
            assert c.import_device("1-1").status == 0
            c.enumerate()
            assert c.until_ready() == [UA_RESET]
            yield Rig(srv, store, c)
        finally:
            store.release.set()
            c.close()


def start_held_write(rig: Rig, lba: int, data: bytes, tag: int = 0x51) -> int:
    """CBW and data of a WRITE(10) the store holds; returns the seqnum of the pending CSW request."""
    rig.store.release.clear()
    rig.store.entered.clear()
    c = rig.client
    cdb = struct.pack(">BBIBHB", 0x2A, 0, lba, 0, len(data) // BLOCK, 0)
    assert c.bulk_out(pack_cbw(tag, cdb, len(data))).status == 0
    assert c.bulk_out(data).status == 0  # the data URB completes; the command now runs
    csw = c.submit(1, UrbDirection.IN, 13)
    assert rig.store.entered.wait(SETTLE), "the WRITE never reached the store"
    c.sock.settimeout(ANSWERED)  # from here a reply that waits for the write fails the test
    return csw


def settle(rig: Rig, completed_after_reset: int) -> None:
    """Release the write and wait (bounded) until the executor has finished it."""
    rig.client.sock.settimeout(SETTLE)
    rig.store.release.set()
    done = threading.Event()
    for _ in range(int(SETTLE / 0.01)):
        bot = rig.server.status()["device"]["bot"]
        if bot["completed_after_reset"] == completed_after_reset and bot["stage"] != "EXECUTING":
            return
        done.wait(0.01)
    raise AssertionError("the held command never finished")


def test_ep0_answers_while_a_write_waits_then_the_csw_follows(rig: Rig) -> None:
    c = rig.client
    data = bytes(range(256)) * 16
    csw_seq = start_held_write(rig, 100, data)
    assert c.get_descriptor(1, length=18).data == device_descriptor(IDENT, Speed.HIGH)
    assert c.get_descriptor(2, length=9).status == 0
    assert c.control(0xA1, 0xFE, 0, 0, 1).data == b"\x00"  # GET_MAX_LUN
    assert c.control(0x82, 0x00, 0, 0x81, 2).data == b"\x00\x00"  # GET_STATUS(bulk IN): not halted
    assert rig.store.writes == 0 and not rig.store.release.is_set()  # all of it while the write waited
    c.sock.settimeout(SETTLE)
    rig.store.release.set()
    csw = c.wait(csw_seq)
    assert isinstance(csw, SubmitReturn) and CSW.unpack(csw.data) == (b"USBS", 0x51, 0, 0)
    assert rig.store.writes == 1 and c.read10(100, len(data) // BLOCK) == data


def test_class_reset_during_a_write_lands_it_once_and_sends_no_csw(rig: Rig) -> None:
    c = rig.client
    data = b"\xa5" * 4096
    csw_seq = start_held_write(rig, 200, data)
    assert c.control(0x21, 0xFF, 0, 0, 0).status == 0  # Bulk-Only Mass Storage Reset, answered now
    assert c.clear_halt(0x81).status == 0 and c.clear_halt(0x01).status == 0  # reset recovery
    assert rig.store.writes == 0
    settle(rig, completed_after_reset=1)
    assert rig.store.writes == 1  # the write in flight landed, exactly once
    # its CSW was never sent: the host's CSW request is still pending, and unlinking it says so
    assert c.unlink(csw_seq).status == -ECONNRESET
    assert c.pending_returns() == {}
    assert c.read10(200, 8) == data
    assert rig.store.writes == 1
    assert c.until_ready() == []  # the class reset is not a unit attention (as f_mass_storage)


def test_re_enumeration_during_a_write_raises_unit_attention_after_it(rig: Rig) -> None:
    c = rig.client
    data = b"\x3c" * 2048
    csw_seq = start_held_write(rig, 300, data)
    # what vhci-hcd lets through of a port reset: the host configures the device again
    assert c.control(0x00, 0x09, 1, 0, 0).status == 0
    assert c.get_descriptor(1, length=18).status == 0
    settle(rig, completed_after_reset=1)
    assert c.unlink(csw_seq).status == -ECONNRESET  # no CSW for the abandoned command
    assert rig.store.writes == 1
    assert c.until_ready() == [UA_RESET]  # the next command hears of the reset, once
    assert c.read10(300, 4) == data and rig.store.writes == 1


def test_commands_after_a_reset_wait_behind_the_abandoned_write(rig: Rig) -> None:
    c = rig.client
    first = b"\x01" * 1024
    abandoned = start_held_write(rig, 400, first)
    assert c.unlink(abandoned).status == -ECONNRESET  # the host gave up on it (its timeout)...
    assert c.control(0x21, 0xFF, 0, 0, 0).status == 0  # ...and resets
    # the host retries: a second WRITE to the same blocks, accepted while the first still waits
    second = b"\x02" * 1024
    cdb = struct.pack(">BBIBHB", 0x2A, 0, 400, 0, 2, 0)
    assert c.bulk_out(pack_cbw(0x52, cdb, len(second))).status == 0
    assert c.bulk_out(second).status == 0
    csw_seq = c.submit(1, UrbDirection.IN, 13)
    assert c.control(0xA1, 0xFE, 0, 0, 1).data == b"\x00"  # ep0 still free with two queued
    c.sock.settimeout(SETTLE)
    rig.store.release.set()
    csw = c.wait(csw_seq)  # the retry's own CSW, after both writes ran in order
    assert isinstance(csw, SubmitReturn) and CSW.unpack(csw.data) == (b"USBS", 0x52, 0, 0)
    assert rig.store.writes == 2 and c.read10(400, 2) == second


def test_the_thread_busy_with_a_long_write_hands_over_reading_and_then_ends(rig: Rig) -> None:
    """A command runs on the connection's thread; one that waits makes another thread read the
    connection. However many waits, one thread reads it afterwards and commands go on as before."""
    c = rig.client
    peer = c.sock.getsockname()
    name = f"usbip-{peer[0]}:{peer[1]}"

    def readers() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == name and t.is_alive()]

    for n, byte in enumerate((b"\x11", b"\x22", b"\x33"), start=1):
        data = byte * 4096
        csw_seq = start_held_write(rig, 500 + 8 * n, data, tag=0x60 + n)
        assert c.get_descriptor(1, length=18).status == 0  # read by another thread: answered now
        c.sock.settimeout(SETTLE)
        rig.store.release.set()
        csw = c.wait(csw_seq)
        assert isinstance(csw, SubmitReturn) and CSW.unpack(csw.data) == (b"USBS", 0x60 + n, 0, 0)
        assert rig.store.writes == n
        for _ in range(int(SETTLE / 0.01)):  # the thread that ran the write ends once it is done
            if len(readers()) == 1:
                break
            threading.Event().wait(0.01)
        assert len(readers()) == 1
    assert c.read10(508, 24) == b"\x11" * 4096 + b"\x22" * 4096 + b"\x33" * 4096
    assert c.write10(600, b"\x44" * 512) == 0 and c.read10(600, 1) == b"\x44" * 512
