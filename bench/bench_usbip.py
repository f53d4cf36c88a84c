"""Benchmark the USB/IP path end to end, next to the raw speed of the same backing file.

Full stack: an in-process USB/IP client (host_tests/usbip_support.UsbipClient) over loopback TCP ->
gadget.usbip_server -> gadget.mass_storage -> gadget.bot -> firmware.scsi.ScsiTarget ->
firmware.volume.Volume on a file in a temporary directory, write cache off (every WRITE is
fdatasync'ed before its CSW). Measured in the same run on the same file:

    raw: 120 KiB pwrite+fdatasync sequential, 120 KiB pread sequential, 4 KiB random pwrite+fdatasync
    usbip: the same with WRITE(10)/READ(10) commands (120 KiB = Linux usb-storage's default maximum)

and printed as MB/s and IOPS with the USB/IP/raw ratio. Reads come from the page cache in both
columns (the file was just written), so the read ratio is the protocol's cost alone.

Both files are written once and synced before measuring, and the raw and USB/IP columns alternate
for --rounds rounds (best kept), so allocation and a noisy neighbour skew neither side.

Run: .venv/bin/python bench/bench_usbip.py [--size-mib 64] [--random-ops 2000] [--rounds 2] [--dir DIR]
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from firmware.logical_unit import LogicalUnit
from firmware.scsi import ScsiTarget
from firmware.volume import Volume
from gadget.descriptors import DeviceIdentity, Speed
from gadget.usbip_server import UsbipServer
from host_tests.usbip_support import UsbipClient

SEQ_CHUNK = 120 * 1024
RAND_CHUNK = 4096
BLOCK = 512


def make_target(volume: Volume) -> LogicalUnit:
    return ScsiTarget(volume, serial="BE4C0123456789", device_id=bytes.fromhex("3001122334455667"))


def timed(fn: Callable[[], int]) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = fn()
    return time.perf_counter() - t0, n


def raw_numbers(path: Path, size: int, offsets: list[int]) -> dict[str, float]:
    fd = os.open(path, os.O_RDWR)
    try:
        chunk = os.urandom(SEQ_CHUNK)
        small = os.urandom(RAND_CHUNK)
        n_seq = size // SEQ_CHUNK

        def seq_write() -> int:
            for i in range(n_seq):
                os.pwrite(fd, chunk, i * SEQ_CHUNK)
                os.fdatasync(fd)
            return n_seq * SEQ_CHUNK

        def seq_read() -> int:
            for i in range(n_seq):
                os.pread(fd, SEQ_CHUNK, i * SEQ_CHUNK)
            return n_seq * SEQ_CHUNK

        def rand_write() -> int:
            for off in offsets:
                os.pwrite(fd, small, off)
                os.fdatasync(fd)
            return len(offsets)

        tw, bw = timed(seq_write)
        tr, br = timed(seq_read)
        tq, nq = timed(rand_write)
    finally:
        os.close(fd)
    return {"seq_write": bw / tw / 1e6, "seq_read": br / tr / 1e6, "rand_write": nq / tq}


def usbip_numbers(client: UsbipClient, size: int, offsets: list[int]) -> dict[str, float]:
    chunk = os.urandom(SEQ_CHUNK)
    small = os.urandom(RAND_CHUNK)
    n_seq = size // SEQ_CHUNK
    per = SEQ_CHUNK // BLOCK

    def seq_write() -> int:
        for i in range(n_seq):
            if client.write10(i * per, chunk) != 0:
                raise RuntimeError("WRITE(10) failed")
        return n_seq * SEQ_CHUNK

    def seq_read() -> int:
        for i in range(n_seq):
            if client.read10(i * per, per) != chunk:
                raise RuntimeError("read-back mismatch: the stack did not return what it stored")
        return n_seq * SEQ_CHUNK

    def rand_write() -> int:
        for off in offsets:
            if client.write10(off // BLOCK, small) != 0:
                raise RuntimeError("WRITE(10) failed")
        return len(offsets)

    tw, bw = timed(seq_write)
    tr, br = timed(seq_read)
    tq, nq = timed(rand_write)
    if client.read10(offsets[-1] // BLOCK, RAND_CHUNK // BLOCK) != small:
        raise RuntimeError("read-back mismatch after the random writes")
    return {"seq_write": bw / tw / 1e6, "seq_read": br / tr / 1e6, "rand_write": nq / tq}


def prefill(path: Path, size: int) -> None:
    """Write every block once and sync, so neither column pays for block allocation."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        chunk = bytes(1 << 20)
        for off in range(0, size, len(chunk)):
            os.pwrite(fd, chunk[: min(len(chunk), size - off)], off)
        os.fsync(fd)
    finally:
        os.close(fd)


def best(a: dict[str, float], b: dict[str, float] | None) -> dict[str, float]:
    return a if b is None else {k: max(a[k], b[k]) for k in a}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=64, help="sequential span and file size (MiB)")
    ap.add_argument("--random-ops", type=int, default=2000, help="4 KiB random writes per column")
    ap.add_argument("--rounds", type=int, default=2, help="alternating raw/usbip rounds; the best is kept")
    ap.add_argument("--dir", default=None, help="directory for the backing file (default: a temp dir)")
    ap.add_argument("--speed", choices=[s.name.lower() for s in Speed], default="high")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    size = args.size_mib << 20
    rng = random.Random(1234)
    offsets = [rng.randrange(size // RAND_CHUNK) * RAND_CHUNK for _ in range(args.random_ops)]
    raw: dict[str, float] | None = None
    over: dict[str, float] | None = None

    with tempfile.TemporaryDirectory(prefix="bench-usbip-", dir=args.dir) as tmp:
        raw_path = Path(tmp) / "raw.img"
        vol_path = Path(tmp) / "volume.img"
        prefill(raw_path, size)
        prefill(vol_path, size)
        with Volume(vol_path, size=size, block_size=BLOCK, write_cache=False) as volume:
            target = make_target(volume)
            ident = DeviceIdentity(serial="BE4C0123456789")
            server = UsbipServer.for_logical_unit(target, ident, speed=Speed[args.speed.upper()])
            with server, UsbipClient("127.0.0.1", server.port) as client:
                if client.import_device("1-1").status != 0:
                    raise SystemExit("import refused")
                client.enumerate()
                client.scsi(bytes(6))  # TEST UNIT READY: clears a power-on unit attention
                for _ in range(args.rounds):  # alternate, so both columns see the same machine load
                    raw = best(raw_numbers(raw_path, size, offsets), raw)
                    over = best(usbip_numbers(client, size, offsets), over)
    assert raw is not None and over is not None

    print(f"bench_usbip: {args.size_mib} MiB pre-written file in {args.dir or tempfile.gettempdir()}, "
          f"write cache off, {args.speed} speed, LU=ScsiTarget, best of {args.rounds} rounds")  # fmt: skip
    print(f"{'workload':34} {'raw':>12} {'usbip':>12} {'usbip/raw':>10}")
    rows = [
        ("120 KiB seq write + fdatasync", "seq_write", "MB/s"),
        ("120 KiB seq read", "seq_read", "MB/s"),
        ("4 KiB random write + fdatasync", "rand_write", "IOPS"),
    ]
    for label, key, unit in rows:
        print(f"{label:34} {raw[key]:8.1f} {unit:<4}{over[key]:8.1f} {unit:<4}{over[key] / raw[key]:9.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
