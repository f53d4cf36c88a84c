"""The unit's own Python per command, without the kernel's share: the whole path a USB/IP command
takes in a local unit (URB parsing in the receive buffer, BOT, SCSI, LocalUnit, journal append and
commit, volume write) run in this process against a fake socket that hands over prepared URBs and
swallows the replies, with the volume and the journal on tmpfs (/dev/shm).

`bench_unit_cpu.py` measures what a host sees, kernel included, and on a shared machine its figures
move by 30% and more between runs; this one isolates the part the unit's code decides, so a change
to the hot path shows here first. CPU per command is `time.process_time()` over --ops commands, best
of --rounds. Beside it, the same run's floor: the file system calls the command needs and nothing
else (journal pwrite + fdatasync and volume pwrite of the payload on the same tmpfs, or the volume
pread), and the ratio.

Run: .venv/bin/python bench/bench_hot_path.py [--ops 2000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import struct
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from firmware.journal import Journal
from firmware.local_unit import LocalUnit
from firmware.scsi.target import ScsiTarget
from firmware.volume import Volume
from gadget.descriptors import DeviceIdentity
from gadget.usbip_protocol import SubmitCommand, UrbDirection, UsbipConnection, UsbipRole
from gadget.usbip_server import UsbipServer, _UsbipSession

CBW = struct.Struct("<4sIIBBB16s")
SMALL, SEQ, BLOCK = 4096, 120 * 1024, 512
VOLUME = 64 << 20
TCP_SEGMENT = 64 << 10  # a large URB arrives in pieces of about this size


class FakeSocket:
    """recv_into hands over the prepared byte strings one by one (a long one in TCP_SEGMENT pieces);
    sendmsg and sendall take everything."""

    def __init__(self, chunks: list[bytes]) -> None:
        self._chunks = chunks
        self._i = 0
        self._at = 0

    def recv_into(self, view: memoryview) -> int:
        if self._i >= len(self._chunks):
            return 0
        chunk = self._chunks[self._i]
        n = min(len(chunk) - self._at, len(view), TCP_SEGMENT)
        view[:n] = chunk[self._at:self._at + n]
        self._at += n
        if self._at == len(chunk):
            self._i += 1
            self._at = 0
        return n

    def sendmsg(self, buffers: list[bytes]) -> int:
        return sum(len(b) for b in buffers)

    def sendall(self, data: bytes) -> None:
        pass


class Host:
    """Builds the URB stream of BOT commands as a host sends them."""

    def __init__(self, devid: int) -> None:
        self.devid = devid
        self._seq = 0
        self._tag = 0
        self._conn = UsbipConnection(UsbipRole.CLIENT)

    def _urb(self, direction: UrbDirection, length: int, data: bytes = b"") -> bytes:
        self._seq += 1
        if self._seq % 1000 == 0:  # the client side's record of URBs in flight: never answered here
            self._conn = UsbipConnection(UsbipRole.CLIENT)
        return self._conn.send(SubmitCommand(self._seq, self.devid, direction, 1, 0, length, bytes(8), data))

    def command(self, cdb: bytes, data_out: bytes = b"", data_in: int = 0) -> list[bytes]:
        self._tag += 1
        length = len(data_out) or data_in
        cbw = CBW.pack(b"USBC", self._tag, length, 0x80 if data_in else 0, 0, len(cdb), cdb.ljust(16, b"\0"))
        urbs = [self._urb(UrbDirection.OUT, len(cbw), cbw)]
        if data_out:
            urbs.append(self._urb(UrbDirection.OUT, len(data_out), data_out))
        elif data_in:
            urbs.append(self._urb(UrbDirection.IN, data_in))
        urbs.append(self._urb(UrbDirection.IN, 13))
        return urbs


def rw10(opcode: int, lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", opcode, 0, lba, 0, blocks, 0)


def workloads(ops: int) -> dict[str, Callable[[Host], list[bytes]]]:
    rng = random.Random(1)
    small, chunk = os.urandom(SMALL), os.urandom(SEQ)
    per = SEQ // BLOCK
    span = VOLUME // SEQ

    def rand_write(h: Host) -> list[bytes]:
        return [u for _ in range(ops) for u in h.command(rw10(0x2A, rng.randrange(VOLUME // SMALL) * 8, 8), small)]

    def seq_write(h: Host) -> list[bytes]:
        return [u for i in range(ops) for u in h.command(rw10(0x2A, (i % span) * per, per), chunk)]

    def seq_read(h: Host) -> list[bytes]:
        return [u for i in range(ops) for u in h.command(rw10(0x28, (i % span) * per, per), data_in=SEQ)]

    return {"4 KiB random write": rand_write, "120 KiB sequential write": seq_write,
            "120 KiB sequential read": seq_read}


def unit_cpu(work: Path, ops: int, rounds: int) -> dict[str, float]:
    """{workload: best CPU µs per command of the unit's code path}."""
    volume = Volume(str(work / "volume.img"), size=VOLUME)
    journal = Journal.open(str(work / "journal"), size=256 << 20, unit_uuid=uuid.UUID(int=1), block_size=BLOCK)
    unit = LocalUnit(volume, journal, bitmap_path=str(work / "dirty.bitmap"))
    target = ScsiTarget(unit, serial="0123456789AB", device_id=b"0123456789abcdef")
    server = UsbipServer.for_logical_unit(target, DeviceIdentity(serial="0123456789AB"))
    device = server._device
    device.configuration = 1  # type: ignore[attr-defined]  # as after SET_CONFIGURATION
    host = Host(server.exported.info.devid)

    def run(urbs: list[bytes]) -> float:
        session = _UsbipSession(server, FakeSocket(urbs), "bench")  # type: ignore[arg-type]
        session.device = device
        session.reader = threading.current_thread()
        conn = UsbipConnection(UsbipRole.SERVER, max_transfer=server.max_transfer)
        buf = bytearray(256 << 10)
        t0 = time.process_time()
        server._read_urbs(session, conn, buf, memoryview(buf))
        return time.process_time() - t0

    try:
        run(host.command(bytes(6)))  # TEST UNIT READY: clears the power-on unit attention
        return {name: min(run(make(host)) for _ in range(rounds)) / ops * 1e6
                for name, make in workloads(ops).items()}
    finally:
        server.stop()
        unit.close()
        journal.close()
        volume.close()


def floor_cpu(work: Path, ops: int, rounds: int) -> dict[str, float]:
    """{workload: best CPU µs per command of its file system calls alone, on the same tmpfs}."""
    jfd = os.open(work / "floor.journal", os.O_RDWR | os.O_CREAT, 0o600)
    vfd = os.open(work / "floor.volume", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(jfd, 64 << 20)
        os.ftruncate(vfd, VOLUME)
        rng = random.Random(2)
        out: dict[str, float] = {}
        for name, size in (("4 KiB random write", SMALL), ("120 KiB sequential write", SEQ)):
            record, payload = bytes(size + BLOCK), os.urandom(size)
            best = float("inf")
            for _ in range(rounds):
                t0 = time.process_time()
                for i in range(ops):
                    os.pwrite(jfd, record, (i * len(record)) % ((64 << 20) - len(record)))
                    os.fdatasync(jfd)
                    off = rng.randrange(VOLUME // size) * size if size == SMALL else (i * size) % (VOLUME - size)
                    os.pwrite(vfd, payload, off)
                best = min(best, time.process_time() - t0)
            out[name] = best / ops * 1e6
        best = float("inf")
        for _ in range(rounds):
            t0 = time.process_time()
            for i in range(ops):
                os.pread(vfd, SEQ, (i * SEQ) % (VOLUME - SEQ))
            best = min(best, time.process_time() - t0)
        out["120 KiB sequential read"] = best / ops * 1e6
        return out
    finally:
        os.close(jfd)
        os.close(vfd)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", type=int, default=2000, help="commands per workload and round")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of each workload (best kept)")
    args = ap.parse_args(argv)
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    work = Path(tempfile.mkdtemp(prefix="bench-hot-path-", dir=base))
    try:
        floor = floor_cpu(work, args.ops, args.rounds)
        cpu = unit_cpu(work, args.ops, args.rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"bench_hot_path: the unit's code path in one process, fake socket, files on {base or 'disk'}, "
          f"{args.ops} commands, best of {args.rounds}")
    print(f"{'workload':30} {'CPU/cmd':>10} {'file I/O floor':>15} {'vs floor':>9}")
    for name, us in cpu.items():
        print(f"{name:30} {us:7.1f} µs {floor[name]:12.1f} µs {us / floor[name]:9.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
