"""A minimal iSCSI initiator for tests: builds request PDUs and drives a sans-IO `Connection`
(or bytes for a socket), and parses what the target sends back."""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field

from firmware.iscsi.connection import Connection, TargetConfig
from firmware.iscsi.pdu import Framer, Pdu, PduOpcode, build_text, parse_text
from firmware.logical_unit import Status
from firmware.scsi import ScsiTarget
from host_tests.scsi_fakes import MemoryBlockStore

TARGET = "iqn.2026-01.net.usbmirror:test"
INITIATOR = "iqn.2026-01.org.example:host1"


def login_pdu(keys: list[tuple[str, str]], *, csg: int, nsg: int, transit: bool = True, cmdsn: int = 1,
              itt: int = 0x1000, tsih: int = 0, cont: bool = False) -> Pdu:
    flags = (0x80 if transit else 0) | (0x40 if cont else 0) | (csg << 2) | (nsg if transit else 0)
    pdu = Pdu.new(PduOpcode.LOGIN_REQUEST, flags=flags, immediate=True)
    pdu.bhs[8:14] = b"\x80\x12\x34\x56\x78\x9a"
    pdu.bhs[14:16] = tsih.to_bytes(2, "big")
    pdu.set_u32(16, itt)
    pdu.set_u32(24, cmdsn)
    pdu.set_u32(28, 100)
    pdu.data = build_text(keys)
    return pdu


def scsi_pdu(cdb: bytes, *, itt: int, cmdsn: int, edtl: int = 0, read: bool = False, write: bool = False,
             data: bytes = b"", final: bool = True, lun: int = 0, immediate: bool = False) -> Pdu:
    flags = (0x80 if final else 0) | (0x40 if read else 0) | (0x20 if write else 0) | 0x01  # SIMPLE
    pdu = Pdu.new(PduOpcode.SCSI_COMMAND, flags=flags, immediate=immediate)
    pdu.bhs[8:10] = lun.to_bytes(2, "big")
    pdu.set_u32(16, itt)
    pdu.set_u32(20, edtl)
    pdu.set_u32(24, cmdsn)
    pdu.bhs[32:48] = cdb.ljust(16, b"\0")
    pdu.data = data
    return pdu


def data_out_pdu(*, itt: int, ttt: int, offset: int, data: bytes, final: bool = True, datasn: int = 0) -> Pdu:
    pdu = Pdu.new(PduOpcode.DATA_OUT, flags=0x80 if final else 0)
    pdu.set_u32(16, itt)
    pdu.set_u32(20, ttt)
    pdu.set_u32(36, datasn)
    pdu.set_u32(40, offset)
    pdu.data = data
    return pdu


def chap_response(chap_id: int, secret: str, challenge_hex: str) -> str:
    challenge = bytes.fromhex(challenge_hex[2:])
    return "0x" + hashlib.md5(bytes([chap_id]) + secret.encode() + challenge).hexdigest()


@dataclass
class Harness:
    """A Connection over an in-memory store, with the adapter's job done synchronously."""

    config: TargetConfig = field(default_factory=lambda: TargetConfig(target_name=TARGET, portal="127.0.0.1:3260"))
    store: MemoryBlockStore = field(default_factory=lambda: MemoryBlockStore(512, 2048))
    auto_run: bool = True
    header_digest: bool = False
    data_digest: bool = False

    def __post_init__(self) -> None:
        self.target = ScsiTarget(self.store, serial="TEST0001", device_id=b"0123456789abcdef")
        self.conn = Connection(self.config, self.target.plan, random=lambda n: bytes(range(1, n + 1)),
                               peer="test", strict=True)
        self.framer = Framer(max_data=1 << 24)
        self.pending: list[tuple[int, bytes, bytes]] = []

    def send(self, pdu: Pdu) -> list[Pdu]:
        digests = self.conn.phase.value == "full_feature"
        return self.send_raw(pdu.encode(header_digest=digests and self.header_digest,
                                        data_digest=digests and self.data_digest))

    def send_raw(self, raw: bytes) -> list[Pdu]:
        self.conn.receive(raw)
        out = self._collect()
        if self.auto_run:
            out += self.run_tasks()
        return out

    def run_tasks(self) -> list[Pdu]:
        out: list[Pdu] = []
        for task in self.conn.take_tasks():
            result = self.target.execute(task.cdb, task.data_out)
            sense = self.target.sense.to_fixed() if result.status == Status.CHECK_CONDITION else b""
            self.conn.task_done(task.task_id, int(result.status), result.data, sense)
            out += self._collect()
        return out

    def _collect(self) -> list[Pdu]:
        self.framer.feed(self.conn.take_output())
        out: list[Pdu] = []
        while True:
            item = self.framer.next()
            if item is None:
                return out
            assert isinstance(item, Pdu), "target sent a PDU with a bad data digest"
            out.append(item)
            if item.opcode == PduOpcode.LOGIN_RESPONSE and item.flags & 0x83 == 0x83:
                self.framer.header_digest = self.header_digest
                self.framer.data_digest = self.data_digest

    def login(self, extra: list[tuple[str, str]] | None = None) -> Pdu:
        keys = [("InitiatorName", INITIATOR), ("TargetName", TARGET), ("SessionType", "Normal"),
                ("HeaderDigest", "CRC32C" if self.header_digest else "None"),
                ("DataDigest", "CRC32C" if self.data_digest else "None")] + (extra or [])
        (rsp,) = self.send(login_pdu(keys, csg=1, nsg=3))
        assert rsp.opcode == PduOpcode.LOGIN_RESPONSE
        assert (rsp.bhs[36], rsp.bhs[37]) == (0, 0), parse_text(rsp.data)
        return rsp


def sense_of(rsp: Pdu) -> bytes:
    (length,) = struct.unpack_from(">H", rsp.data, 0)
    return rsp.data[2 : 2 + length]


class LoginRefused(Exception):
    """The target answered the login with a non-zero status class (the (class, detail) pair)."""

    def __init__(self, status: tuple[int, int]) -> None:
        super().__init__(f"login refused: status {status[0]:#04x}/{status[1]:#04x}")
        self.status = status


class SocketInitiator:
    """A minimal initiator over a socket: log in (optionally with CHAP) to `target` at
    127.0.0.1:`port`, then READ(10) / WRITE(10) / any CDB one at a time (immediate data)."""

    def __init__(self, port: int, target: str, *, chap: tuple[str, str] | None = None,
                 host: str = "127.0.0.1") -> None:
        import socket

        self.sock = socket.create_connection((host, port), timeout=30)
        self.framer = Framer(max_data=1 << 24)
        self.cmdsn = 1
        base = [("InitiatorName", INITIATOR), ("TargetName", target), ("SessionType", "Normal")]
        ops = [("ImmediateData", "Yes"), ("InitialR2T", "No")]
        try:
            if chap is None:
                self._login(login_pdu([*base, *ops], csg=1, nsg=3))
                return
            rsp = self._login(login_pdu([*base, ("AuthMethod", "CHAP,None")], csg=0, nsg=1))
            rsp = self._login(login_pdu([("CHAP_A", "5")], csg=0, nsg=1, transit=False))
            keys = dict(parse_text(rsp.data))
            answer = chap_response(int(keys["CHAP_I"]), chap[1], keys["CHAP_C"])
            self._login(login_pdu([("CHAP_N", chap[0]), ("CHAP_R", answer)], csg=0, nsg=1))
            self._login(login_pdu(ops, csg=1, nsg=3))
        except BaseException:
            self.sock.close()
            raise

    def _login(self, pdu: Pdu) -> Pdu:
        self.sock.sendall(pdu.encode())
        rsp = self._recv()
        assert rsp.opcode == PduOpcode.LOGIN_RESPONSE
        if (rsp.bhs[36], rsp.bhs[37]) != (0, 0):
            raise LoginRefused((rsp.bhs[36], rsp.bhs[37]))
        return rsp

    def _recv(self) -> Pdu:
        while (item := self.framer.next()) is None:
            data = self.sock.recv(1 << 16)
            if not data:
                raise ConnectionResetError("the target closed the connection")
            self.framer.feed(data)
        assert isinstance(item, Pdu)
        return item

    def command(self, cdb: bytes, *, read: int = 0, data: bytes = b"") -> tuple[int, bytes, bytes]:
        """(SCSI status, data in, sense data)."""
        self.sock.sendall(scsi_pdu(cdb, itt=self.cmdsn, cmdsn=self.cmdsn, edtl=read or len(data), read=bool(read),
                                   write=bool(data), data=data).encode())
        self.cmdsn += 1
        got = b""
        while True:
            pdu = self._recv()
            if pdu.opcode == PduOpcode.DATA_IN:
                got += pdu.data
                if pdu.flags & 0x01:  # status in the last Data-In
                    return pdu.bhs[3], got, b""
            elif pdu.opcode == PduOpcode.SCSI_RESPONSE:
                return pdu.bhs[3], got, sense_of(pdu) if pdu.data else b""

    def read10(self, lba: int, blocks: int, block_size: int = 512) -> bytes:
        status, data, sense = self.command(bytes([0x28, 0]) + lba.to_bytes(4, "big") + b"\0"
                                           + blocks.to_bytes(2, "big") + b"\0", read=blocks * block_size)
        assert status == 0, sense.hex()
        return data

    def write10(self, lba: int, data: bytes, block_size: int = 512) -> tuple[int, bytes]:
        """(SCSI status, sense data)."""
        status, _, sense = self.command(bytes([0x2A, 0]) + lba.to_bytes(4, "big") + b"\0"
                                        + (len(data) // block_size).to_bytes(2, "big") + b"\0", data=data)
        return status, sense

    def read_capacity(self) -> tuple[int, int]:
        """(number of blocks, block size) from READ CAPACITY (10)."""
        status, data, _ = self.command(bytes([0x25]) + bytes(9), read=8)
        assert status == 0
        return int.from_bytes(data[0:4], "big") + 1, int.from_bytes(data[4:8], "big")

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> SocketInitiator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
