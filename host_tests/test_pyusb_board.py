"""A real board over a real cable, through libusb (pyusb): the device a server sees.

Attach a flashed board running `usbmirror local --gadget` to this machine's USB port and run
`pytest host_tests/test_pyusb_board.py -m board`. Without a board (or without libusb / USB in this
machine's kernel, as on the CI VMs) every test is skipped and says why. The tests only read: they
never write to the disk. Set USBMIRROR_BOARD_VIDPID=vvvv:pppp for a board flashed with other ids.
"""

from __future__ import annotations

import contextlib
import os
import struct
import time
from collections.abc import Iterator
from typing import Any

import pytest

pytestmark = pytest.mark.board

VID, PID = (int(x, 16) for x in os.environ.get("USBMIRROR_BOARD_VIDPID", "1209:0001").split(":"))
CBW_SIG, CSW_SIG = 0x43425355, 0x53425355


def _find_libusb(name: str) -> str | None:
    """ctypes' search needs ldconfig or a compiler; minimal systems (a board image, the QEMU guest)
    have neither, so fall back to where Debian puts libusb."""
    import ctypes.util
    import glob

    found = ctypes.util.find_library(name)
    if found:
        return found
    for path in [*sorted(glob.glob("/usr/lib/*/libusb-1.0.so.0")), "/usr/lib/libusb-1.0.so.0"]:
        if os.path.exists(path):
            return path
    return None


def _find_board() -> Any:
    try:
        import usb.backend.libusb1
        import usb.core
    except ImportError as exc:
        pytest.skip(f"pyusb not installed: {exc}")
    backend = usb.backend.libusb1.get_backend(find_library=_find_libusb)
    if backend is None:
        pytest.skip("libusb-1.0 not available (apt-get install libusb-1.0-0): cannot talk to a board")
    try:
        dev = usb.core.find(idVendor=VID, idProduct=PID, backend=backend)
    except usb.core.NoBackendError as exc:
        pytest.skip(f"no libusb backend: {exc}")
    except usb.core.USBError as exc:
        pytest.skip(f"USB not usable on this machine ({exc}); the CI VMs have no USB in their kernel")
    if dev is None:
        pytest.skip(f"no usbmirror board attached (looked for {VID:04x}:{PID:04x}); attach a flashed board "
                    "running `usbmirror local --gadget` to run these tests")
    return dev


@pytest.fixture(scope="module")
def board() -> Iterator[Any]:
    import usb.util

    dev = _find_board()
    intf = _storage_interface(dev)
    if dev.is_kernel_driver_active(intf.bInterfaceNumber):
        dev.detach_kernel_driver(intf.bInterfaceNumber)  # usb-storage would fight over the pipes
    usb.util.claim_interface(dev, intf.bInterfaceNumber)
    try:
        yield dev
    finally:
        usb.util.release_interface(dev, intf.bInterfaceNumber)
        with contextlib.suppress(Exception):  # the board may have gone away meanwhile
            dev.attach_kernel_driver(intf.bInterfaceNumber)
        usb.util.dispose_resources(dev)


def _storage_interface(dev: Any) -> Any:
    for intf in dev.get_active_configuration():
        if (intf.bInterfaceClass, intf.bInterfaceSubClass, intf.bInterfaceProtocol) == (8, 6, 0x50):
            return intf
    raise AssertionError("no mass-storage (08/06/50) interface in the active configuration")


def _endpoints(dev: Any) -> tuple[Any, Any]:
    import usb.util

    intf = _storage_interface(dev)
    ep_in = usb.util.find_descriptor(intf, custom_match=lambda e: usb.util.endpoint_direction(
        e.bEndpointAddress) == usb.util.ENDPOINT_IN)
    ep_out = usb.util.find_descriptor(intf, custom_match=lambda e: usb.util.endpoint_direction(
        e.bEndpointAddress) == usb.util.ENDPOINT_OUT)
    return ep_in, ep_out


def _command(dev: Any, tag: int, cdb: bytes, length: int) -> tuple[bytes, int, int]:
    ep_in, ep_out = _endpoints(dev)
    cbw = struct.pack("<IIIBBB", CBW_SIG, tag, length, 0x80 if length else 0, 0, len(cdb)) + cdb.ljust(16, b"\0")
    ep_out.write(cbw, timeout=5000)
    data = bytes(ep_in.read(length, timeout=5000)) if length else b""
    csw = bytes(ep_in.read(13, timeout=5000))
    sig, csw_tag, residue, status = struct.unpack("<IIIB", csw)
    assert sig == CSW_SIG and csw_tag == tag
    return data, residue, status


def test_device_and_interface_descriptors(board: Any) -> None:
    assert (board.idVendor, board.idProduct) == (VID, PID)
    import usb.util

    serial = usb.util.get_string(board, board.iSerialNumber)
    assert serial and len(serial) >= 12 and all(c in "0123456789ABCDEF" for c in serial)  # BOT 4.1.1
    intf = _storage_interface(board)
    assert intf.bNumEndpoints == 2
    ep_in, _ = _endpoints(board)
    assert ep_in.wMaxPacketSize in (64, 512, 1024)


def test_get_max_lun_and_reset(board: Any) -> None:
    intf = _storage_interface(board).bInterfaceNumber
    assert bytes(board.ctrl_transfer(0xA1, 0xFE, 0, intf, 1)) == b"\x00"
    board.ctrl_transfer(0x21, 0xFF, 0, intf, None)  # Bulk-Only Mass Storage Reset
    ep_in, ep_out = _endpoints(board)
    board.clear_halt(ep_in.bEndpointAddress)
    board.clear_halt(ep_out.bEndpointAddress)


def test_inquiry_test_unit_ready_and_capacity(board: Any) -> None:
    data, residue, status = _command(board, 1, bytes([0x12, 0, 0, 0, 36, 0]), 36)
    assert status == 0 and residue == 0 and data[8:16].rstrip() == b"USBMIRR"
    _, _, status = _command(board, 2, bytes(6), 0)
    if status == 1:  # the first command after a (re)configuration reports the reset, once
        sense, _, status = _command(board, 5, bytes([0x03, 0, 0, 0, 18, 0]), 18)
        assert status == 0 and (sense[2] & 0x0F, sense[12], sense[13]) == (0x6, 0x29, 0x00)
        _, _, status = _command(board, 6, bytes(6), 0)
    assert status == 0
    data, _, status = _command(board, 3, bytes([0x25]) + bytes(9), 8)
    last_lba, block = struct.unpack(">II", data)
    assert status == 0 and block in (512, 4096) and last_lba > 0
    data, _, status = _command(board, 4, bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0]), block)
    assert status == 0 and len(data) == block  # reading LBA 0 works


def _reset_recovery(dev: Any) -> None:
    """BOT 5.3.4: Bulk-Only Mass Storage Reset, then CLEAR_FEATURE(HALT) on both bulk endpoints."""
    intf = _storage_interface(dev).bInterfaceNumber
    dev.ctrl_transfer(0x21, 0xFF, 0, intf, None)
    ep_in, ep_out = _endpoints(dev)
    dev.clear_halt(ep_in.bEndpointAddress)
    dev.clear_halt(ep_out.bEndpointAddress)


def _is_stall(exc: Any) -> bool:
    import errno

    return getattr(exc, "errno", None) == errno.EPIPE or "pipe" in str(exc).lower()


def test_host_wants_more_than_the_device_has(board: Any) -> None:
    """BOT 6.7.2 case 5 (Hi > Di): the data ends short, the IN endpoint stalls, the CSW reports the
    residue; the host clears the halt and reads it."""
    import usb.core

    ep_in, ep_out = _endpoints(board)
    cbw = struct.pack("<IIIBBB", CBW_SIG, 77, 64, 0x80, 0, 6) + bytes([0x12, 0, 0, 0, 36, 0]).ljust(16, b"\0")
    ep_out.write(cbw, timeout=5000)
    data = bytes(ep_in.read(64, timeout=5000))
    assert len(data) == 36
    try:
        csw = bytes(ep_in.read(13, timeout=5000))
    except usb.core.USBError as exc:
        assert _is_stall(exc), exc
        board.clear_halt(ep_in.bEndpointAddress)
        csw = bytes(ep_in.read(13, timeout=5000))
    sig, tag, residue, status = struct.unpack("<IIIB", csw)
    assert (sig, tag, residue, status) == (CSW_SIG, 77, 28, 0)


def test_invalid_cbw_stalls_until_reset_recovery(board: Any) -> None:
    """BOT 6.6.1: after an invalid CBW both endpoints stay stalled, even across CLEAR_FEATURE(HALT),
    until a reset recovery; then the device works again."""
    import usb.core

    ep_in, ep_out = _endpoints(board)
    ep_out.write(b"USBX" + bytes(27), timeout=5000)  # wrong signature
    with pytest.raises(usb.core.USBError) as first:
        ep_in.read(13, timeout=5000)
    assert _is_stall(first.value), first.value
    board.clear_halt(ep_in.bEndpointAddress)
    time.sleep(0.3)
    with pytest.raises(usb.core.USBError) as again:
        ep_in.read(13, timeout=5000)
    assert _is_stall(again.value), f"IN must stay stalled until reset recovery: {again.value}"
    _reset_recovery(board)
    data, residue, status = _command(board, 78, bytes([0x12, 0, 0, 0, 36, 0]), 36)
    assert status == 0 and residue == 0 and data[8:16].rstrip() == b"USBMIRR"


def test_unsupported_control_requests_stall(board: Any) -> None:
    import usb.core

    intf = _storage_interface(board).bInterfaceNumber
    for rtype, req, value, length in ((0xA1, 0xFE, 1, 1), (0xA1, 0x42, 0, 4), (0x21, 0xFF, 0, 2)):
        with pytest.raises(usb.core.USBError) as err:
            board.ctrl_transfer(rtype, req, value, intf, length if rtype & 0x80 else bytes(length))
        assert _is_stall(err.value), (rtype, req, err.value)
    assert bytes(board.ctrl_transfer(0xA1, 0xFE, 0, intf, 1)) == b"\x00"  # ep0 still fine
