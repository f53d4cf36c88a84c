"""USB/IP wire protocol (version 1.1.1, 0x0111), sans-IO, for both the exporting and the importing side.

This module turns bytes into frozen-dataclass events and events into bytes. It never touches a
socket: `gadget/usbip_server.py` feeds it what it receives and sends what it returns; the tests
and `bench/bench_usbip.py` use the same class as a client.

Layouts follow the kernel's Documentation/usb/usbip_protocol.rst; every field is big-endian.

Operation phase (8-byte `op_common` header: version u16, code u16, status u32)::

    OP_REQ_DEVLIST 0x8005  header only
    OP_REP_DEVLIST 0x0005  header, ndev u32, then per device: usbip_usb_device (312 bytes) and
                           bNumInterfaces x (class, subclass, protocol, pad)
    OP_REQ_IMPORT  0x8003  header, busid[32]
    OP_REP_IMPORT  0x0003  header, then usbip_usb_device only when status == 0

    usbip_usb_device: 0x000 path[256] 0x100 busid[32] 0x120 busnum u32 0x124 devnum u32
        0x128 speed u32 0x12C idVendor u16 0x12E idProduct u16 0x130 bcdDevice u16
        0x132 bDeviceClass 0x133 bDeviceSubClass 0x134 bDeviceProtocol
        0x135 bConfigurationValue 0x136 bNumConfigurations 0x137 bNumInterfaces

URB phase (after a successful import; 48-byte header = 20-byte basic header + 28 bytes)::

    basic: 0x00 command 0x04 seqnum 0x08 devid 0x0C direction (0 out, 1 in) 0x10 ep
    CMD_SUBMIT 1: 0x14 transfer_flags 0x18 transfer_buffer_length 0x1C start_frame
                  0x20 number_of_packets 0x24 interval 0x28 setup[8]; OUT data follows
    RET_SUBMIT 3: 0x14 status (negative errno) 0x18 actual_length 0x1C start_frame
                  0x20 number_of_packets 0x24 error_count 0x28 padding[8]; IN data follows
    CMD_UNLINK 2: 0x14 unlink_seqnum, padding[24]
    RET_UNLINK 4: 0x14 status (-ECONNRESET when the URB was unlinked, 0 when it had completed)

What this module does not do: isochronous transfers (a mass-storage device has no isochronous
endpoint, so a SUBMIT announcing ISO packets is a `UsbipProtocolError`), deciding which device a
busid names, or checking devids (the server does both).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Final

USBIP_VERSION: Final = 0x0111

#: Largest transfer buffer accepted by default. Linux usb-storage asks for at most 1 MiB per
#: command (2048 sectors at SuperSpeed, 240 at high speed); SG_IO can ask for more, but a length
#: beyond this is treated as a hostile header rather than allocated.
DEFAULT_MAX_TRANSFER: Final = 4 << 20
MAX_DEVICES: Final = 64  # devices in one OP_REP_DEVLIST we are willing to parse
MAX_INTERFACES: Final = 32  # USB allows at most 32 interfaces per configuration
MAX_IN_FLIGHT: Final = 1 << 16  # URBs a client may have submitted and not seen returned

ECONNRESET: Final = 104
EPIPE: Final = 32
ENODEV: Final = 19


class OpCode(enum.IntEnum):
    """`op_common.code` of the operation phase."""

    REQ_DEVLIST = 0x8005
    REP_DEVLIST = 0x0005
    REQ_IMPORT = 0x8003
    REP_IMPORT = 0x0003


class UrbCommand(enum.IntEnum):
    """`usbip_header_basic.command` of the URB phase."""

    CMD_SUBMIT = 1
    CMD_UNLINK = 2
    RET_SUBMIT = 3
    RET_UNLINK = 4


class UrbDirection(enum.IntEnum):
    OUT = 0
    IN = 1


class OpStatus(enum.IntEnum):
    """`op_common.status` values (tools/usb/usbip/libsrc/usbip_common.h); `usbip attach` prints
    a message for each."""

    OK = 0
    NA = 1  # request failed
    DEV_BUSY = 2  # device busy (exported to another client)
    DEV_ERR = 3
    NODEV = 4  # no such busid
    ERROR = 5


class WireSpeed(enum.IntEnum):
    """`enum usb_device_speed` of the kernel, as carried in usbip_usb_device.speed."""

    UNKNOWN = 0
    LOW = 1
    FULL = 2
    HIGH = 3
    WIRELESS = 4
    SUPER = 5
    SUPER_PLUS = 6


class UsbipRole(enum.IntEnum):
    """Which end of the connection this object plays."""

    SERVER = 0  # exports the device: receives requests/commands, sends replies/returns
    CLIENT = 1  # imports it (vhci-hcd, `usbip attach`, the tests' client)


class UsbipProtocolError(Exception):
    """The peer sent something this protocol cannot accept; the connection must be closed."""


class NeedData:
    """Type of the `NEED_DATA` sentinel (so `isinstance` narrows `next_event()` results)."""

    def __repr__(self) -> str:
        return "NEED_DATA"


#: Returned by `next_event()` when more bytes are needed.
NEED_DATA: Final = NeedData()


# -- records ---------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class InterfaceTriple:
    interface_class: int
    interface_subclass: int
    interface_protocol: int


@dataclass(frozen=True, slots=True)
class UsbDeviceInfo:
    """struct usbip_usb_device: how an exported device is described in DEVLIST and IMPORT replies."""

    path: str
    busid: str
    busnum: int
    devnum: int
    speed: int  # WireSpeed value
    id_vendor: int
    id_product: int
    bcd_device: int
    device_class: int
    device_subclass: int
    device_protocol: int
    configuration_value: int
    num_configurations: int
    num_interfaces: int

    @property
    def devid(self) -> int:
        """The devid an importer puts in every URB header: (busnum << 16) | devnum."""
        return (self.busnum << 16) | self.devnum


@dataclass(frozen=True, slots=True)
class ExportedDevice:
    """One DEVLIST entry: the device and its interface triples (len == info.num_interfaces)."""

    info: UsbDeviceInfo
    interfaces: tuple[InterfaceTriple, ...]


# -- events (one per message type) -----------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class DevlistRequest:
    pass


@dataclass(frozen=True, slots=True)
class DevlistReply:
    devices: tuple[ExportedDevice, ...]
    status: int = 0


@dataclass(frozen=True, slots=True)
class ImportRequest:
    busid: str


@dataclass(frozen=True, slots=True)
class ImportReply:
    """status == 0 carries `device`; any other status carries none."""

    status: int
    device: UsbDeviceInfo | None = None


@dataclass(frozen=True, slots=True)
class SubmitCommand:
    seqnum: int
    devid: int
    direction: UrbDirection
    ep: int
    transfer_flags: int
    transfer_buffer_length: int
    setup: bytes = bytes(8)
    data: bytes = b""  # OUT payload (len == transfer_buffer_length); empty for IN
    interval: int = 0
    start_frame: int = 0
    number_of_packets: int = 0  # 0 or 0xFFFFFFFF ("not ISO") are accepted on input


@dataclass(frozen=True, slots=True)
class SubmitReturn:
    """The server sends devid, direction and ep as 0 (usbip_protocol.rst); the client knows the
    direction of each seqnum it submitted, which says whether `data` follows the header."""

    seqnum: int
    status: int  # 0 or a negative errno (-EPIPE for a stall)
    actual_length: int
    data: bytes = b""  # IN payload (len == actual_length); empty for OUT
    devid: int = 0
    direction: UrbDirection = UrbDirection.OUT
    ep: int = 0
    start_frame: int = 0
    number_of_packets: int = 0
    error_count: int = 0


@dataclass(frozen=True, slots=True)
class UnlinkCommand:
    seqnum: int
    devid: int
    unlink_seqnum: int
    direction: UrbDirection = UrbDirection.OUT
    ep: int = 0


@dataclass(frozen=True, slots=True)
class UnlinkReturn:
    seqnum: int
    status: int  # -ECONNRESET: unlinked before completion; 0: it had already completed
    devid: int = 0
    direction: UrbDirection = UrbDirection.OUT
    ep: int = 0


Event = (
    DevlistRequest | DevlistReply | ImportRequest | ImportReply | SubmitCommand | SubmitReturn | UnlinkCommand | UnlinkReturn
)

# -- wire structs ----------------------------------------------------------------------------------
_OP_HEADER: Final = struct.Struct(">HHI")
_U32: Final = struct.Struct(">I")
_DEVICE: Final = struct.Struct(">256s32sIIIHHHBBBBBB")
_IFACE: Final = struct.Struct(">BBBx")
_BASIC: Final = struct.Struct(">IIIII")
_SUBMIT: Final = struct.Struct(">IIIIIIIiii8s")  # basic + flags, len, start, npkts, interval, setup
_RET_SUBMIT: Final = struct.Struct(">IIIIIiiiii8x")  # basic + status, actual, start, npkts, errors
_UNLINK: Final = struct.Struct(">IIIIII24x")  # basic + unlink_seqnum
_RET_UNLINK: Final = struct.Struct(">IIIIIi24x")  # basic + status
URB_HEADER_SIZE: Final = 48
OP_HEADER_SIZE: Final = _OP_HEADER.size
DEVICE_INFO_SIZE: Final = _DEVICE.size
assert _SUBMIT.size == _RET_SUBMIT.size == _UNLINK.size == _RET_UNLINK.size == URB_HEADER_SIZE
assert _DEVICE.size == 312

_NOT_ISO: Final = (0, 0xFFFFFFFF)  # number_of_packets a non-ISO URB may carry (vhci sends 0)


def _encode_str(text: str, size: int, what: str) -> bytes:
    raw = text.encode("ascii")
    if len(raw) >= size or b"\0" in raw:
        raise ValueError(f"{what} must be ASCII, without NUL, shorter than {size} bytes: {text!r}")
    return raw.ljust(size, b"\0")


def _decode_str(raw: bytes, what: str) -> str:
    end = raw.find(b"\0")
    if end < 0:
        raise UsbipProtocolError(f"{what} is not NUL-terminated")
    try:
        return raw[:end].decode("ascii")
    except UnicodeDecodeError:
        raise UsbipProtocolError(f"{what} is not ASCII") from None


def _u32(value: int, what: str) -> int:
    if not 0 <= value <= 0xFFFFFFFF:
        raise ValueError(f"{what} out of range: {value}")
    return value


def _pack_device(info: UsbDeviceInfo) -> bytes:
    return _DEVICE.pack(
        _encode_str(info.path, 256, "path"),
        _encode_str(info.busid, 32, "busid"),
        info.busnum,
        info.devnum,
        info.speed,
        info.id_vendor,
        info.id_product,
        info.bcd_device,
        info.device_class,
        info.device_subclass,
        info.device_protocol,
        info.configuration_value,
        info.num_configurations,
        info.num_interfaces,
    )


def _unpack_device(buf: bytes | bytearray | memoryview, offset: int) -> UsbDeviceInfo:
    (path, busid, busnum, devnum, speed, vid, pid, bcd, dcls, dsub, dproto, cfg, ncfg, nif) = _DEVICE.unpack_from(
        buf, offset
    )
    if nif > MAX_INTERFACES:
        raise UsbipProtocolError(f"device claims {nif} interfaces (at most {MAX_INTERFACES})")
    return UsbDeviceInfo(
        _decode_str(path, "path"), _decode_str(busid, "busid"), busnum, devnum, speed,
        vid, pid, bcd, dcls, dsub, dproto, cfg, ncfg, nif,
    )  # fmt: skip


def encode(event: Event) -> bytes:
    """The wire bytes of one message. Raises ValueError for a message that cannot be encoded."""
    if isinstance(event, SubmitReturn):  # the hot path first
        if event.data and len(event.data) != event.actual_length:
            raise ValueError("IN data length must equal actual_length")
        head = _RET_SUBMIT.pack(
            UrbCommand.RET_SUBMIT, event.seqnum, event.devid, event.direction, event.ep,
            event.status, event.actual_length, event.start_frame, _signed(event.number_of_packets),
            event.error_count,
        )  # fmt: skip
        return head + event.data if event.data else head
    if isinstance(event, SubmitCommand):
        if event.direction == UrbDirection.OUT and len(event.data) != event.transfer_buffer_length:
            raise ValueError("OUT data length must equal transfer_buffer_length")
        if event.direction == UrbDirection.IN and event.data:
            raise ValueError("a CMD_SUBMIT for an IN URB carries no data")
        if len(event.setup) != 8:
            raise ValueError("setup must be 8 bytes")
        head = _SUBMIT.pack(
            UrbCommand.CMD_SUBMIT, event.seqnum, event.devid, event.direction, event.ep,
            event.transfer_flags, event.transfer_buffer_length, event.start_frame,
            _signed(event.number_of_packets), event.interval, event.setup,
        )  # fmt: skip
        return head + event.data if event.data else head
    if isinstance(event, UnlinkCommand):
        return _UNLINK.pack(
            UrbCommand.CMD_UNLINK, event.seqnum, event.devid, event.direction, event.ep,
            event.unlink_seqnum,
        )  # fmt: skip
    if isinstance(event, UnlinkReturn):
        return _RET_UNLINK.pack(UrbCommand.RET_UNLINK, event.seqnum, event.devid, event.direction, event.ep, event.status)
    if isinstance(event, DevlistRequest):
        return _OP_HEADER.pack(USBIP_VERSION, OpCode.REQ_DEVLIST, 0)
    if isinstance(event, ImportRequest):
        return _OP_HEADER.pack(USBIP_VERSION, OpCode.REQ_IMPORT, 0) + _encode_str(event.busid, 32, "busid")
    if isinstance(event, ImportReply):
        head = _OP_HEADER.pack(USBIP_VERSION, OpCode.REP_IMPORT, _u32(event.status, "status"))
        if (event.status == 0) != (event.device is not None):
            raise ValueError("an import reply carries a device exactly when its status is 0")
        return head + _pack_device(event.device) if event.device is not None else head
    if isinstance(event, DevlistReply):
        parts = [
            _OP_HEADER.pack(USBIP_VERSION, OpCode.REP_DEVLIST, _u32(event.status, "status")),
            _U32.pack(len(event.devices)),
        ]
        for dev in event.devices:
            if len(dev.interfaces) != dev.info.num_interfaces:
                raise ValueError("a devlist entry needs one interface triple per interface")
            parts.append(_pack_device(dev.info))
            parts.extend(_IFACE.pack(i.interface_class, i.interface_subclass, i.interface_protocol) for i in dev.interfaces)
        return b"".join(parts)
    raise TypeError(f"not a USB/IP message: {event!r}")


def ret_submit_header(seqnum: int, status: int, actual_length: int) -> bytes:
    """The 48-byte header of the RET_SUBMIT a server sends (devid, direction, ep and the ISO fields
    zero, as `encode(SubmitReturn(seqnum, status, actual_length))` makes it). The server's hot path
    sends it and the IN data as two buffers of one `sendmsg`, so the payload is never copied to
    join them."""
    return _RET_SUBMIT.pack(UrbCommand.RET_SUBMIT, seqnum, 0, 0, 0, status, actual_length, 0, 0, 0)


#: `ret_submit_header` for a server's hot path, without the Python call around the pack:
#: `pack_ret_submit(UrbCommand.RET_SUBMIT, seqnum, 0, 0, 0, status, actual_length, 0, 0, 0)`.
pack_ret_submit: Final = _RET_SUBMIT.pack

_DIRECTIONS: Final = (UrbDirection.OUT, UrbDirection.IN)
_unpack_submit = _SUBMIT.unpack_from


SubmitFields = tuple[int, int, int, int, int, bytes]  # seqnum, devid, direction, ep, length, setup


def parse_submit(buf: bytearray | bytes | memoryview, at: int, max_transfer: int) -> SubmitFields | None:
    """A server's hot path: the CMD_SUBMIT header at `buf[at:at + 48]` (the caller checked that
    48 bytes are there) as (seqnum, devid, direction, ep, transfer_buffer_length, setup), with
    direction 0 (OUT, the data follows the header) or 1 (IN); None when the header there is not a
    CMD_SUBMIT (hand those bytes to a `UsbipConnection`). One unpack, no event object: the server
    reads the OUT data from its own receive buffer. A CMD_SUBMIT this protocol refuses raises
    `UsbipProtocolError`, the same checks as `UsbipConnection.next_event()`."""
    if buf[at + 3] != UrbCommand.CMD_SUBMIT or buf[at] | buf[at + 1] | buf[at + 2]:
        return None
    (_c, seqnum, devid, direction, ep, _flags, length, _start, npkts, _interval, setup) = _unpack_submit(buf, at)
    if direction > 1:
        raise UsbipProtocolError(f"direction {direction} is neither 0 (out) nor 1 (in)")
    if ep > 15:
        raise UsbipProtocolError(f"endpoint number {ep} is above 15")
    if npkts and npkts != -1:  # 0 or 0xFFFFFFFF (unpacked signed): not isochronous
        raise UsbipProtocolError(f"isochronous URB ({npkts & 0xFFFFFFFF} packets) is not supported")
    if not 0 <= length <= max_transfer:
        raise UsbipProtocolError(f"transfer length {length} outside 0..{max_transfer}")
    return seqnum, devid, direction, ep, length, setup


def _consume_urb(buf: bytearray, total: int) -> bytes:
    """Remove one URB (header and `total - URB_HEADER_SIZE` data bytes) from the front of `buf`
    and return its data. Copied once through a view: `bytes(buf[a:b])` would copy a megabyte twice."""
    data = b""
    if total > URB_HEADER_SIZE:
        with memoryview(buf) as view:
            data = bytes(view[URB_HEADER_SIZE:total])
    del buf[:total]
    return data


def _signed(n: int) -> int:
    """number_of_packets is an int on the wire; accept 0xFFFFFFFF as -1."""
    return n - (1 << 32) if n >= 1 << 31 else n


class _Phase(enum.IntEnum):
    OP = 0  # op_common requests/replies
    URB = 1  # after a successful import
    CLOSED = 2  # after a UsbipProtocolError


class UsbipConnection:
    """One USB/IP connection as seen from one end (`role`).

    Feed received bytes to `receive_data()`, then call `next_event()` until it returns
    `NEED_DATA`. Turn outgoing events into bytes with `send()`. The switch from the operation
    phase to the URB phase happens when the import succeeds: for a server when it *sends* an
    ImportReply with status 0, for a client when it *receives* one.

    After a `UsbipProtocolError` the connection is closed: every later call raises it again.
    """

    def __init__(self, role: UsbipRole, *, max_transfer: int = DEFAULT_MAX_TRANSFER) -> None:
        self.role = role
        self.max_transfer = max_transfer
        self._buf = bytearray()
        self._phase = _Phase.OP
        self._error: UsbipProtocolError | None = None
        self._awaiting_import_reply = False  # server: an import was asked and is not answered
        # client: direction of every submitted and not yet returned URB, and unlink -> target
        self._in_flight: dict[int, UrbDirection] = {}
        self._unlinks: dict[int, int] = {}

    @property
    def imported(self) -> bool:
        """True once the import succeeded (URB phase)."""
        return self._phase == _Phase.URB

    @property
    def closed(self) -> bool:
        return self._phase == _Phase.CLOSED

    @property
    def buffered(self) -> int:
        """Bytes received and not yet consumed by an event."""
        return len(self._buf)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self._error is not None:
            raise self._error
        self._buf += data

    def next_event(self) -> Event | NeedData:
        if self._error is not None:
            raise self._error
        try:
            if self._phase == _Phase.URB:
                return self._next_urb()
            if self.role == UsbipRole.SERVER and self._awaiting_import_reply:
                return NEED_DATA  # the phase of what follows depends on our answer
            return self._next_op()
        except UsbipProtocolError as exc:
            self._fail(exc)
            raise
        except struct.error as exc:  # cannot happen with the length checks; never escape as such
            err = UsbipProtocolError(f"malformed message: {exc}")
            self._fail(err)
            raise err from exc

    def send(self, event: Event) -> bytes:
        """Bytes for `event`; updates the phase for an import reply."""
        if self._error is not None:
            raise self._error
        data = encode(event)
        if self.role == UsbipRole.SERVER:
            if isinstance(event, ImportReply):
                self._awaiting_import_reply = False
                if event.status == 0:
                    self._phase = _Phase.URB
        elif isinstance(event, SubmitCommand):
            if len(self._in_flight) >= MAX_IN_FLIGHT:
                raise ValueError(f"more than {MAX_IN_FLIGHT} URBs in flight")
            self._in_flight[event.seqnum] = event.direction
        elif isinstance(event, UnlinkCommand):
            self._unlinks[event.seqnum] = event.unlink_seqnum
        return data

    def _fail(self, exc: UsbipProtocolError) -> None:
        self._error = exc
        self._phase = _Phase.CLOSED
        self._buf.clear()

    # -- operation phase ---------------------------------------------------------------------
    def _next_op(self) -> Event | NeedData:
        buf = self._buf
        if len(buf) < OP_HEADER_SIZE:
            return NEED_DATA
        version, code, status = _OP_HEADER.unpack_from(buf, 0)
        if version != USBIP_VERSION:
            raise UsbipProtocolError(f"USB/IP version 0x{version:04x} is not 0x{USBIP_VERSION:04x}")
        if self.role == UsbipRole.SERVER:
            if code == OpCode.REQ_DEVLIST:
                del buf[:OP_HEADER_SIZE]
                return DevlistRequest()
            if code == OpCode.REQ_IMPORT:
                if len(buf) < OP_HEADER_SIZE + 32:
                    return NEED_DATA
                busid = _decode_str(bytes(buf[8:40]), "busid")
                del buf[:40]
                self._awaiting_import_reply = True
                return ImportRequest(busid)
            raise UsbipProtocolError(f"unknown operation code 0x{code:04x}")
        if code == OpCode.REP_IMPORT:
            if status != 0:
                del buf[:OP_HEADER_SIZE]
                return ImportReply(status)
            if len(buf) < OP_HEADER_SIZE + DEVICE_INFO_SIZE:
                return NEED_DATA
            info = _unpack_device(buf, OP_HEADER_SIZE)
            del buf[: OP_HEADER_SIZE + DEVICE_INFO_SIZE]
            self._phase = _Phase.URB
            return ImportReply(0, info)
        if code == OpCode.REP_DEVLIST:
            return self._next_devlist(status)
        raise UsbipProtocolError(f"unknown operation reply code 0x{code:04x}")

    def _next_devlist(self, status: int) -> Event | NeedData:
        buf = self._buf
        pos = OP_HEADER_SIZE
        if len(buf) < pos + 4:
            return NEED_DATA
        (ndev,) = _U32.unpack_from(buf, pos)
        if ndev > MAX_DEVICES:
            raise UsbipProtocolError(f"devlist claims {ndev} devices (at most {MAX_DEVICES})")
        pos += 4
        devices = []
        for _ in range(ndev):
            if len(buf) < pos + DEVICE_INFO_SIZE:
                return NEED_DATA
            info = _unpack_device(buf, pos)
            pos += DEVICE_INFO_SIZE
            end = pos + 4 * info.num_interfaces
            if len(buf) < end:
                return NEED_DATA
            triples = tuple(InterfaceTriple(*_IFACE.unpack_from(buf, p)) for p in range(pos, end, 4))
            pos = end
            devices.append(ExportedDevice(info, triples))
        del buf[:pos]
        return DevlistReply(tuple(devices), status)

    # -- URB phase ---------------------------------------------------------------------------
    def _next_urb(self) -> Event | NeedData:
        buf = self._buf
        if len(buf) < URB_HEADER_SIZE:
            return NEED_DATA
        server = self.role == UsbipRole.SERVER
        if server and parse_submit(buf, 0, self.max_transfer) is not None:
            (_c, seqnum, devid, direction, ep, flags, length, start, npkts, interval, setup) = _SUBMIT.unpack_from(buf)
            total = URB_HEADER_SIZE if direction else URB_HEADER_SIZE + length
            if len(buf) < total:
                return NEED_DATA
            data = _consume_urb(buf, total)
            return SubmitCommand(seqnum, devid, _DIRECTIONS[direction], ep, flags, length, setup, data, interval,
                                 start, npkts & 0xFFFFFFFF)
        command, seqnum, devid, direction, ep = _BASIC.unpack_from(buf, 0)
        expected = (UrbCommand.CMD_SUBMIT, UrbCommand.CMD_UNLINK) if server else (UrbCommand.RET_SUBMIT,
                                                                                   UrbCommand.RET_UNLINK)
        if command not in expected:
            raise UsbipProtocolError(f"unknown USB/IP command {command}")
        if direction > 1:
            raise UsbipProtocolError(f"direction {direction} is neither 0 (out) nor 1 (in)")
        if ep > 15:
            raise UsbipProtocolError(f"endpoint number {ep} is above 15")
        udir = UrbDirection(direction)
        if server:
            if command == UrbCommand.CMD_UNLINK:
                (_c, _s, _d, _dir, _ep, unlink_seqnum) = _UNLINK.unpack_from(buf, 0)
                del buf[:URB_HEADER_SIZE]
                return UnlinkCommand(seqnum, devid, unlink_seqnum, udir, ep)
            raise UsbipProtocolError(f"unknown USB/IP command {command}")
        if command == UrbCommand.RET_SUBMIT:
            (_c, _s, _d, _dir, _ep, status, actual, start, npkts, errors) = _RET_SUBMIT.unpack_from(buf, 0)
            if npkts & 0xFFFFFFFF not in _NOT_ISO:
                raise UsbipProtocolError(f"isochronous URB ({npkts} packets) is not supported")
            sent_dir = self._in_flight.get(seqnum)
            if sent_dir is None:
                raise UsbipProtocolError(f"RET_SUBMIT for seqnum {seqnum}, which is not in flight")
            self._check_length(actual)
            # The header of a RET_SUBMIT does not say whether data follows (the server sends
            # direction 0); the direction of the URB we submitted does.
            data_len = actual if sent_dir == UrbDirection.IN else 0
            total = URB_HEADER_SIZE + data_len
            if len(buf) < total:
                return NEED_DATA
            data = _consume_urb(buf, total)
            del self._in_flight[seqnum]
            return SubmitReturn(seqnum, status, actual, data, devid, udir, ep, start, npkts & 0xFFFFFFFF, errors)
        if command == UrbCommand.RET_UNLINK:
            (_c, _s, _d, _dir, _ep, status) = _RET_UNLINK.unpack_from(buf, 0)
            target = self._unlinks.pop(seqnum, None)
            if target is None:
                raise UsbipProtocolError(f"RET_UNLINK for seqnum {seqnum}, which is not an unlink we sent")
            if status == -ECONNRESET:  # unlinked before completion: no RET_SUBMIT will follow
                self._in_flight.pop(target, None)
            del buf[:URB_HEADER_SIZE]
            return UnlinkReturn(seqnum, status, devid, udir, ep)
        raise UsbipProtocolError(f"unknown USB/IP command {command}")

    def _check_length(self, length: int) -> None:
        if not 0 <= length <= self.max_transfer:
            raise UsbipProtocolError(f"transfer length {length} outside 0..{self.max_transfer}")
