"""Benchmark a real Linux host using the usbmirror disk: fio in the QEMU guest, next to raw file speed.

The device is the local unit started as a user would (``python -m firmware.cli local --volume IMG
--usbip 127.0.0.1:PORT``, write cache off: every WRITE is durable before its status). Debian's kernel
in QEMU (TCG) attaches it over USB/IP and runs fio with O_DIRECT, queue depth 1:

    seqwrite 64 KiB, seqread 64 KiB (over --size-mib), randwrite 4 KiB and randread 4 KiB (--seconds each)

In the same run the host measures the raw speed of a file in the same directory with Python:
64 KiB pwrite+fdatasync sequential, 64 KiB O_DIRECT pread sequential, 4 KiB random pwrite+fdatasync and
4 KiB random O_DIRECT pread. Printed as MB/s, IOPS, mean latency and the guest/raw ratio. The guest
runs under TCG emulation, so the ratio is a floor for what a real host would see.

Run: .venv/bin/python bench/bench_guest_fio.py [--size-mib 64] [--seconds 8] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hw.qemu.guest import run_guest  # noqa: E402

SEQ = 64 * 1024
RAND = 4096


@dataclass(frozen=True)
class Figure:
    mb_s: float
    iops: float
    lat_ms: float


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raw_figures(path: Path, size: int, seconds: float) -> dict[str, Figure]:
    """Python pwrite+fdatasync / O_DIRECT pread on a file of `size` bytes."""
    out: dict[str, Figure] = {}
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, size)
        chunk = os.urandom(SEQ)
        t0 = time.perf_counter()
        for off in range(0, size, SEQ):
            os.pwrite(fd, chunk, off)
            os.fdatasync(fd)
        dt = time.perf_counter() - t0
        out["seqwrite"] = Figure(size / dt / 1e6, size / SEQ / dt, dt / (size / SEQ) * 1e3)
    finally:
        os.close(fd)
    dfd = os.open(path, os.O_RDWR | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, SEQ)
        t0 = time.perf_counter()
        for off in range(0, size, SEQ):
            os.preadv(dfd, [buf], off)
        dt = time.perf_counter() - t0
        out["seqread"] = Figure(size / dt / 1e6, size / SEQ / dt, dt / (size / SEQ) * 1e3)
        blocks = size // RAND
        small = os.urandom(RAND)
        wfd = os.open(path, os.O_RDWR)
        try:
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                os.pwrite(wfd, small, random.randrange(blocks) * RAND)
                os.fdatasync(wfd)
                n += 1
            dt = time.perf_counter() - t0
            out["randwrite"] = Figure(n * RAND / dt / 1e6, n / dt, dt / n * 1e3)
        finally:
            os.close(wfd)
        rbuf = mmap.mmap(-1, RAND)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            os.preadv(dfd, [rbuf], random.randrange(blocks) * RAND)
            n += 1
        dt = time.perf_counter() - t0
        out["randread"] = Figure(n * RAND / dt / 1e6, n / dt, dt / n * 1e3)
    finally:
        os.close(dfd)
    return out


def guest_script(size_mib: int, seconds: float) -> str:
    common = "--direct=1 --ioengine=psync --iodepth=1 --eta=never --filename=/dev/$d --output-format=json"
    jobs = [
        ("seqwrite", f"--rw=write --bs=64k --size={size_mib}M"),
        ("seqread", f"--rw=read --bs=64k --size={size_mib}M"),
        ("randwrite", f"--rw=randwrite --bs=4k --size={size_mib}M --time_based --runtime={seconds:g}"),
        ("randread", f"--rw=randread --bs=4k --size={size_mib}M --time_based --runtime={seconds:g}"),
    ]
    runs = "\n".join(
        f"fio --name={name} {args} {common} --output=/tmp/{name}.json || die fio_{name}\n"
        f"echo '@@JSON-BEGIN {name}'; cat /tmp/{name}.json; echo '@@JSON-END'"
        for name, args in jobs)
    return f"""
usbip attach -r 10.0.2.100 -b 1-1 || die attach
d=$(wait_disk 20) || die no-disk
{runs}
usbip detach -p 0
mark done=1
"""


def parse_guest(output: str) -> dict[str, Figure]:
    out: dict[str, Figure] = {}
    for name, body in re.findall(r"@@JSON-BEGIN (\w+)\n(.*?)\n@@JSON-END", output, re.S):
        start = body.index("{")
        job = json.loads(body[start:])["jobs"][0]
        side = job["write"] if "write" in name else job["read"]
        out[name] = Figure(side["bw_bytes"] / 1e6, side["iops"], side["clat_ns"]["mean"] / 1e6)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--size-mib", type=int, default=64, help="sequential test size (and disk span)")
    parser.add_argument("--seconds", type=float, default=8.0, help="duration of each random test")
    parser.add_argument("--dir", type=Path, default=None, help="where the image files go (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-guest-") as tmp_name:
        tmp = Path(tmp_name)
        image, state = tmp / "disk.img", tmp / "state"
        state.mkdir()
        disk_mib = args.size_mib + 16
        with open(image, "wb") as fh:
            fh.truncate(disk_mib << 20)
        port = free_port()
        with open(tmp / "device.log", "wb") as log:
            dev = subprocess.Popen(
                [sys.executable, "-m", "firmware.cli", "local", "--volume", str(image), "--size",
                 f"{disk_mib}M", "--usbip", f"127.0.0.1:{port}", "--state-dir", str(state)],
                cwd=REPO, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            while True:
                with socket.socket() as s:
                    if s.connect_ex(("127.0.0.1", port)) == 0:
                        break
                if dev.poll() is not None or time.monotonic() > deadline:
                    print("device did not start:\n" + (tmp / "device.log").read_text()[-3000:])
                    return 1
                time.sleep(0.1)
            t0 = time.monotonic()
            result = run_guest(guest_script(args.size_mib, args.seconds), usbip_port=port,
                               timeout=120 + 4 * args.seconds + args.size_mib)
            guest_wall = time.monotonic() - t0
        finally:
            dev.send_signal(signal.SIGTERM)
            try:
                dev.wait(20)
            except subprocess.TimeoutExpired:
                dev.kill()
                dev.wait()
        if result.rc != 0 or result.markers.get("done") != "1":
            print(result.describe(60))
            return 1
        guest = parse_guest(result.output)
        raw = raw_figures(tmp / "raw.bin", args.size_mib << 20, args.seconds)
    print(f"fio in Debian's kernel (QEMU TCG) over USB/IP to the local unit, O_DIRECT, QD1; "
          f"guest run {guest_wall:.0f} s")
    print(f"{'test':<22}{'guest MB/s':>11}{'IOPS':>9}{'lat ms':>8}   {'raw MB/s':>9}{'IOPS':>9}{'lat ms':>8}"
          f"   {'ratio':>6}")
    labels = {"seqwrite": "64 KiB seq write", "seqread": "64 KiB seq read",
              "randwrite": "4 KiB rand write", "randread": "4 KiB rand read"}
    for key, label in labels.items():
        g, r = guest.get(key), raw[key]
        if g is None:
            print(f"{label:<22}{'missing':>11}")
            continue
        print(f"{label:<22}{g.mb_s:>11.2f}{g.iops:>9.0f}{g.lat_ms:>8.2f}   {r.mb_s:>9.1f}{r.iops:>9.0f}"
              f"{r.lat_ms:>8.3f}   {g.mb_s / r.mb_s:>6.3f}")
    print("raw: Python pwrite+fdatasync / O_DIRECT pread on a file in the same directory; ratio = guest/raw")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
