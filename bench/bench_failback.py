"""Failback: the bytes and the time a planned failback needs after writes on the promoted side.

Run: `.venv/bin/python bench/bench_failback.py [--size 1G] [--written 64M] [--dir DIR] [--json]`

One run, real `usbmirror local` and `usbmirror remote` processes on this machine:
  full   the local unit's volume (--size, filled with random data) reaches an empty remote target
         over the journey link (TLS): the first full copy, from the local unit's start until the
         remote holds everything (a full copy of the volume over the same link, the reference);
  file   a plain copy of the volume file (read, write, fsync) on the same disk, a second reference;
then the local unit is killed, `usbmirror promote --usbip` serves the remote's copy, a standby
client writes --written bytes through it (half as 64 KiB writes, half as 1 MiB writes, at random
4 KiB-aligned offsets), the old local unit comes back as a replica with its catch-up off
(`--catch-up-interval 0`, so the failback pulls every change itself: the worst case), and
`usbmirror failback` runs:
  failback  bytes moved (`last_resync.bytes_moved`, limit 1.1 x --written) beside the bytes
         compared (`last_resync.bytes_compared`: the bytes of the volume each side read and
         digested, only the regions either side wrote since the promotion in mode `bitmap`), the
         local unit's failback time (`last_resync.seconds`: compare the pieces of those regions,
         pull the ones that differ) and the wall time of the `failback` command, each beside the
         full copy as a ratio.
At the end the local volume must equal the remote's copy byte for byte (exit 1 otherwise).
Files go to a temporary directory on a real disk (/var/tmp); the figures vary from run to run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from firmware.volume import parse_size
from host_tests.units import Units, drained, first_difference, free_port, streaming, usbmirror
from host_tests.usbip_support import UsbipClient

MIB = 1 << 20
BS = 512


def fill_random(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        for _ in range(size // (4 * MIB)):
            f.write(os.urandom(4 * MIB))
        f.flush()
        os.fsync(f.fileno())


def file_copy_seconds(src: Path, dst: Path) -> float:
    t0 = time.monotonic()
    with open(src, "rb") as a, open(dst, "wb") as b:
        shutil.copyfileobj(a, b, 4 * MIB)
        b.flush()
        os.fsync(b.fileno())
    return time.monotonic() - t0


def standby_writes(port: int, size: int, total: int) -> int:
    """Writes `total` bytes through the promoted copy; returns the bytes acknowledged."""
    rng = random.Random(11)
    done = 0
    with UsbipClient("127.0.0.1", port, timeout=120) as c:
        assert c.import_device("1-1").device is not None
        c.enumerate()
        c.until_ready()
        while done < total:
            n = 64 * 1024 if done < total // 2 else MIB
            n = min(n, total - done)
            off = rng.randrange(0, (size - n) // 4096) * 4096
            if c.write10(off // BS, os.urandom(n)) != 0:
                raise RuntimeError(f"standby WRITE at {off} failed")
            done += n
    return done


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--written", default="64M")
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    size, written = parse_size(a.size), parse_size(a.written)
    with tempfile.TemporaryDirectory(prefix="usbmirror-bench-failback-", dir=a.dir) as tmp, Units(Path(tmp)) as units:
        work = Path(tmp)
        volume, target = work / "volume.img", work / "target.img"
        fill_random(volume, size)
        file_s = file_copy_seconds(volume, work / "copy.img")
        (work / "copy.img").unlink()
        tls = units.pair("dr1", ["server1"])
        remote = units.start_remote("dr1", targets={"server1": target}, tls_dir=tls)
        t0 = time.monotonic()
        local = units.start_local(volume=volume, size=None, source_id="server1", tls_dir=tls,
                                  remotes=[remote.address])
        local.wait_status(lambda s: streaming()(s) and drained(s), timeout=1800, interval=0.2,
                          what="the first full copy")
        full_s = time.monotonic() - t0
        local.kill9()
        remote.wait_status(lambda s: s["sources"][0]["state"] != "connected", what="the source to be gone")
        port = free_port()
        r = usbmirror("promote", "--state-dir", str(remote.state_dir), "--source", "server1", "--usbip",
                      f"127.0.0.1:{port}")
        if r.returncode != 0:
            print(r.stderr, file=sys.stderr)
            return 1
        acked = standby_writes(port, size, written)
        # the replica's catch-up is off (--catch-up-interval 0): the failback pulls everything itself
        again = units.start_local(volume=volume, size=None, source_id="server1", tls_dir=tls,
                                  remotes=[remote.address], state_dir=local.state_dir, port=local.port,
                                  extra=["--catch-up-interval", "0"])
        again.wait_status(lambda s: s["host_writes"] == "refused", what="the old primary to become a replica")
        t1 = time.monotonic()
        fb = usbmirror("failback", "--state-dir", str(remote.state_dir), "--source", "server1", "--timeout",
                       "1800", timeout=1900)
        st = again.wait_status(lambda s: s["host_writes"] == "accepted", timeout=120, what="the failback")
        wall_s = time.monotonic() - t1
        if fb.returncode != 0:
            print(fb.stderr, file=sys.stderr)
            return 1
        again.stop()
        remote.stop()
        diff = first_difference(volume, target)
        rs = st["last_resync"]
        moved, fb_s = int(rs["bytes_moved"]), float(rs["seconds"])
        print(f"volume {size / MIB:.0f} MiB, written on the promoted side {acked / MIB:.0f} MiB "
              f"(half 64 KiB, half 1 MiB writes at random 4 KiB offsets)")
        print(f"full copy over the link      {full_s:8.2f} s   (reference; a file copy on this disk: {file_s:.2f} s)")
        print(f"failback (local unit)        {fb_s:8.2f} s   {fb_s / full_s:6.3f} x the full copy")
        print(f"failback command, wall       {wall_s:8.2f} s   {wall_s / full_s:6.3f} x the full copy")
        compared = int(rs["bytes_compared"])
        print(f"bytes moved                  {moved / MIB:8.2f} MiB {moved / acked:6.3f} x the bytes written "
              f"(limit 1.1); {rs['regions_copied']} of {rs['regions_compared']} regions compared differed")
        print(f"bytes compared               {compared / MIB:8.2f} MiB {compared / size:6.3f} x the volume "
              f"(mode {rs['mode']}{': ' + rs['mode_reason'] if rs.get('mode_reason') else ''}; "
              f"{rs['regions_compared']} of {rs['regions_total']} regions, {rs['pieces_compared']} pieces)")
        print("local volume equals the remote copy" if diff is None else f"VOLUMES DIFFER at byte {diff}")
        if a.json:
            print(json.dumps({"bench": "failback", "size": size, "written": acked, "bytes_moved": moved,
                              "bytes_compared": compared, "mode": rs["mode"],
                              "moved_ratio": round(moved / acked, 4), "failback_s": fb_s, "failback_wall_s":
                              round(wall_s, 3), "full_copy_s": round(full_s, 3), "file_copy_s": round(file_s, 3),
                              "ratio_to_full": round(fb_s / full_s, 4), "equal": diff is None}))
        return 0 if diff is None and moved <= 1.1 * acked else 1


if __name__ == "__main__":
    sys.exit(main())
