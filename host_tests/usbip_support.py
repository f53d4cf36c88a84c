"""A small raw USB/IP client (for the USB/IP tests and bench/bench_usbip.py) and a RAM logical unit.

`UsbipClient` speaks the wire protocol through `gadget.usbip_protocol` in the client role over a
blocking socket, with helpers for control transfers and Bulk-Only commands (CBW, data, CSW).
`RamDisk` is a minimal `LogicalUnit` (TEST UNIT READY, INQUIRY, READ CAPACITY(10), READ(10),
WRITE(10), REQUEST SENSE) used where the SCSI target is not what is being tested.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from types import TracebackType

from firmware.logical_unit import CommandPlan, CommandResult, Direction, Status
from gadget.usbip_protocol import (
    EPIPE,
    DevlistReply,
    DevlistRequest,
    Event,
    ImportReply,
    ImportRequest,
    NeedData,
    SubmitCommand,
    SubmitReturn,
    UnlinkCommand,
    UnlinkReturn,
    UrbDirection,
    UsbipConnection,
    UsbipProtocolError,
    UsbipRole,
)

CBW = struct.Struct("<4sIIBBB16s")
CSW = struct.Struct("<4sIIB")


def pack_cbw(tag: int, cdb: bytes, length: int = 0, *, data_in: bool = False, lun: int = 0) -> bytes:
    """A well-formed CBW as a host sends it (BOT 5.1), packed here independently of gadget.bot."""
    return CBW.pack(b"USBC", tag, length, 0x80 if data_in else 0, lun, len(cdb), cdb.ljust(16, b"\0"))


class ClientError(Exception):
    pass


@dataclass(frozen=True)
class ScsiOutcome:
    data: bytes
    csw_status: int
    residue: int
    tag: int


class UsbipClient:
    """One importer connection (or a DEVLIST probe) to a USB/IP server."""

    def __init__(self, host: str, port: int, *, timeout: float = 20.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.conn = UsbipConnection(UsbipRole.CLIENT)
        self.devid = 0
        self._seq = 0
        self._tag = 0
        self._done: dict[int, Event] = {}
        self._buf = bytearray(1 << 20)

    def __enter__(self) -> UsbipClient:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    # -- plumbing ------------------------------------------------------------------------------
    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _read_event(self) -> Event:
        while True:
            ev = self.conn.next_event()
            if not isinstance(ev, NeedData):
                return ev
            n = self.sock.recv_into(self._buf)
            if n == 0:
                raise ClientError("server closed the connection")
            self.conn.receive_data(memoryview(self._buf)[:n])

    def closed_by_server(self) -> bool:
        """True when the server has closed the connection (reads EOF or a reset)."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def next_seqnum(self) -> int:
        self._seq += 1
        return self._seq

    # -- operations ------------------------------------------------------------------------------
    def devlist(self) -> DevlistReply:
        self.sock.sendall(self.conn.send(DevlistRequest()))
        ev = self._read_event()
        assert isinstance(ev, DevlistReply), ev
        return ev

    def import_device(self, busid: str = "1-1") -> ImportReply:
        self.sock.sendall(self.conn.send(ImportRequest(busid)))
        ev = self._read_event()
        assert isinstance(ev, ImportReply), ev
        if ev.device is not None:
            self.devid = ev.device.devid
        return ev

    def submit(
        self, ep: int, direction: UrbDirection, length: int, data: bytes = b"", setup: bytes = bytes(8),
        *, devid: int | None = None,
    ) -> int:  # fmt: skip
        seq = self.next_seqnum()
        cmd = SubmitCommand(seq, self.devid if devid is None else devid, direction, ep, 0, length, setup, data)
        self.sock.sendall(self.conn.send(cmd))
        return seq

    def wait(self, seqnum: int) -> Event:
        while seqnum not in self._done:
            ev = self._read_event()
            assert isinstance(ev, SubmitReturn | UnlinkReturn), ev
            self._done[ev.seqnum] = ev
        return self._done.pop(seqnum)

    def pending_returns(self) -> dict[int, Event]:
        return dict(self._done)

    def transfer(self, ep: int, direction: UrbDirection, length: int, data: bytes = b"",
                 setup: bytes = bytes(8)) -> SubmitReturn:  # fmt: skip
        ev = self.wait(self.submit(ep, direction, length, data, setup))
        assert isinstance(ev, SubmitReturn)
        return ev

    def unlink(self, target: int) -> UnlinkReturn:
        seq = self.next_seqnum()
        self.sock.sendall(self.conn.send(UnlinkCommand(seq, self.devid, target)))
        ev = self.wait(seq)
        assert isinstance(ev, UnlinkReturn)
        return ev

    def control(self, request_type: int, request: int, value: int, index: int, length: int,
                data: bytes = b"") -> SubmitReturn:  # fmt: skip
        setup = struct.pack("<BBHHH", request_type, request, value, index, length if request_type & 0x80 else len(data))
        direction = UrbDirection.IN if request_type & 0x80 else UrbDirection.OUT
        return self.transfer(0, direction, length if direction == UrbDirection.IN else len(data), data, setup)

    def get_descriptor(self, dtype: int, index: int = 0, length: int = 255, langid: int = 0) -> SubmitReturn:
        return self.control(0x80, 0x06, (dtype << 8) | index, langid, length)

    def enumerate(self) -> bytes:
        """What a host does before using the disk: device and configuration descriptors, then
        SET_CONFIGURATION(1). Returns the configuration descriptor."""
        dev = self.get_descriptor(1, length=18)
        if dev.status or len(dev.data) != 18:
            raise ClientError(f"device descriptor: {dev}")
        head = self.get_descriptor(2, length=9)
        total = int.from_bytes(head.data[2:4], "little")
        cfg = self.get_descriptor(2, length=total)
        if self.control(0x00, 0x09, 1, 0, 0).status:
            raise ClientError("SET_CONFIGURATION failed")
        return cfg.data

    def clear_halt(self, endpoint: int) -> SubmitReturn:
        return self.control(0x02, 0x01, 0, endpoint, 0)

    # -- Bulk-Only commands ------------------------------------------------------------------------
    def bulk_out(self, data: bytes) -> SubmitReturn:
        return self.transfer(1, UrbDirection.OUT, len(data), data)

    def bulk_in(self, length: int) -> SubmitReturn:
        return self.transfer(1, UrbDirection.IN, length)

    def scsi(self, cdb: bytes, *, data_out: bytes = b"", data_in: int = 0, lun: int = 0) -> ScsiOutcome:
        """One BOT command: CBW, data phase (clearing a stall the way a host does), CSW."""
        self._tag += 1
        length = len(data_out) or data_in
        ret = self.bulk_out(pack_cbw(self._tag, cdb, length, data_in=bool(data_in), lun=lun))
        if ret.status:
            raise ClientError(f"CBW transfer failed status={ret.status}")
        data = b""
        if data_out:
            ret = self.bulk_out(data_out)
            if ret.status == -EPIPE:
                self.clear_halt(0x01)
        elif data_in:
            ret = self.bulk_in(data_in)
            if ret.status == -EPIPE:
                self.clear_halt(0x81)
            data = ret.data
        ret = self.bulk_in(13)
        if ret.status == -EPIPE:  # BOT 6.7.2: clear and retry the CSW once
            self.clear_halt(0x81)
            ret = self.bulk_in(13)
        if ret.status or len(ret.data) != 13:
            raise ClientError(f"no CSW: status={ret.status} length={len(ret.data)}")
        sig, tag, residue, status = CSW.unpack(ret.data)
        if sig != b"USBS" or tag != self._tag:
            raise ClientError(f"bad CSW {ret.data.hex()}")
        return ScsiOutcome(data, status, residue, tag)

    def request_sense(self) -> tuple[int, int, int]:
        """REQUEST SENSE: (sense key, ASC, ASCQ) of fixed-format sense data."""
        out = self.scsi(bytes([0x03, 0, 0, 0, 18, 0]), data_in=18)
        if out.csw_status or len(out.data) < 14:
            raise ClientError(f"REQUEST SENSE failed csw_status={out.csw_status} length={len(out.data)}")
        return out.data[2] & 0x0F, out.data[12], out.data[13]

    def until_ready(self, attempts: int = 4) -> list[tuple[int, int, int]]:
        """TEST UNIT READY until it passes, fetching the sense of each failure with REQUEST SENSE,
        as Linux does after attaching a disk. Returns the (key, ASC, ASCQ) of each failure."""
        seen: list[tuple[int, int, int]] = []
        for _ in range(attempts):
            if self.scsi(bytes(6)).csw_status == 0:
                return seen
            seen.append(self.request_sense())
        raise ClientError(f"unit never became ready: {seen}")

    def write10(self, lba: int, data: bytes, block_size: int = 512) -> int:
        cdb = struct.pack(">BBIBHB", 0x2A, 0, lba, 0, len(data) // block_size, 0)
        return self.scsi(cdb, data_out=data).csw_status

    def read10(self, lba: int, blocks: int, block_size: int = 512) -> bytes:
        out = self.scsi(struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0), data_in=blocks * block_size)
        if out.csw_status:
            raise ClientError(f"READ(10) failed csw_status={out.csw_status}")
        return out.data

    def read_capacity(self) -> tuple[int, int]:
        out = self.scsi(bytes([0x25]) + bytes(9), data_in=8)
        last, block = struct.unpack(">II", out.data)
        return last + 1, block


#: (sense key, ASC, ASCQ) of UNIT ATTENTION, POWER ON, RESET, OR BUS DEVICE RESET OCCURRED
UA_RESET = (0x6, 0x29, 0x00)

__all__ = [
    "CBW",
    "CSW",
    "UA_RESET",
    "ClientError",
    "RamDisk",
    "ScsiOutcome",
    "UsbipClient",
    "UsbipProtocolError",
    "pack_cbw",
]


class RamDisk:
    """A tiny LogicalUnit on a bytearray: enough SCSI for transport tests."""

    def __init__(self, blocks: int = 2048, block_size: int = 512) -> None:
        self.block_size = block_size
        self.blocks = blocks
        self.data = bytearray(blocks * block_size)
        self.executed: list[int] = []
        self.resets = 0  # reset_event() calls (it raises no unit attention: not what is tested here)

    def _rw(self, cdb: bytes) -> tuple[int, int]:
        lba, count = struct.unpack_from(">IxH", cdb, 2)
        return lba, count

    def plan(self, cdb: bytes) -> CommandPlan:
        op = cdb[0]
        if op in (0x28, 0x2A) and len(cdb) >= 10:
            lba, count = self._rw(cdb)
            if lba + count > self.blocks:
                return CommandPlan(Direction.NONE, 0)
            return CommandPlan(Direction.IN if op == 0x28 else Direction.OUT, count * self.block_size)
        if op == 0x12:
            return CommandPlan(Direction.IN, min(36, cdb[4]))
        if op == 0x25:
            return CommandPlan(Direction.IN, 8)
        if op == 0x03:
            return CommandPlan(Direction.IN, min(18, cdb[4]))
        return CommandPlan(Direction.NONE, 0)

    def reset_event(self) -> None:
        self.resets += 1

    def execute(self, cdb: bytes, data_out: bytes = b"") -> CommandResult:
        op = cdb[0]
        self.executed.append(op)
        bs = self.block_size
        if op == 0x00:
            return CommandResult(Status.GOOD)
        if op in (0x28, 0x2A) and len(cdb) >= 10:
            lba, count = self._rw(cdb)
            if lba + count > self.blocks:
                return CommandResult(Status.CHECK_CONDITION)
            if op == 0x28:
                return CommandResult(Status.GOOD, bytes(self.data[lba * bs : (lba + count) * bs]))
            self.data[lba * bs : lba * bs + len(data_out)] = data_out
            return CommandResult(Status.GOOD)
        if op == 0x12:
            inq = bytes([0, 0x80, 6, 2, 31, 0, 0, 0]) + b"USBMIRR ".ljust(8) + b"ramdisk".ljust(16) + b"0001"
            return CommandResult(Status.GOOD, inq[: cdb[4]])
        if op == 0x25:
            return CommandResult(Status.GOOD, struct.pack(">II", self.blocks - 1, bs))
        if op == 0x03:
            return CommandResult(Status.GOOD, bytes([0x70, 0, 0, 0, 0, 0, 0, 10]) + bytes(10))
        return CommandResult(Status.CHECK_CONDITION)
