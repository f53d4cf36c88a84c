"""Point-in-time history end to end, with Debian's kernel as the host of the source and of the images.

A local unit (USB/IP, flash journal, write cache on so that the kernel sends SYNCHRONIZE CACHE: every
flush is a restore point) replicates to a remote unit that keeps history
(`--history-size`). In the QEMU guest:
1. the kernel attaches the local unit's disk, makes ext4 on it and writes files (their sha256 list is a
   file in the file system too), unmounts and detaches. The host runs `usbmirror mark` and copies the
   local volume: the disk at the mark;
2. a second boot deletes half the files and rewrites the others. Once the remote has applied it all,
   `usbmirror restore --mark` and `restore --at` (a time between the mark and the first write after
   it, ISO 8601) must give the copy byte for byte;
3. `usbmirror expose --usbip` of the mark is attached by a third boot while the host keeps writing
   garbage over the source's file system (replicated to the target underneath the exposure):
   `e2fsck -fn` passes and every marked file is there with its content;
4. `expose --writable` of the mark is attached by a fourth boot, which deletes and writes files and
   reads them back. After it stops the target has not changed and the image at the mark is still the
   copy: the writes are gone.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from host_tests.realkernel.conftest import run_checked_guest
from host_tests.units import REPO, Units, drained, first_difference, sha256_file, streaming, usbmirror
from host_tests.usbip_support import UsbipClient
from hw.qemu.build_guest import GuestImage
from hw.qemu.guest import GuestResult

pytestmark = [pytest.mark.realkernel, pytest.mark.slow]

MIB = 1 << 20
DISK_MIB = 48
BS = 512
MARK = "before-upgrade"
GARBAGE_MIB = 8            # the host overwrites this much of the source (superblock, inode tables) in a loop

ATTACH = """
set -u
usbip_attach 1-1 || die attach
d=$(wait_disk 30) || die no_disk
mark disk=$d
"""

DETACH = """
usbip detach -p 0 >/dev/null 2>&1 || die detach
n=0; while [ -e /sys/block/$d ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
[ -e /sys/block/$d ] && die disk_still_present
mark done=1
"""

BUILD = ATTACH + """
step build
mkfs.ext4 -q -F -L hist /dev/$d || die mkfs
mkdir -p /mnt/m && mount -t ext4 /dev/$d /mnt/m || die mount
mkdir -p /mnt/m/keep
i=0
while [ $i -lt 20 ]; do
    dd if=/dev/urandom of=/mnt/m/keep/f$i bs=1024 count=$((i * 53 + 3)) 2>/dev/null || die write_small
    i=$((i + 1))
done
dd if=/dev/urandom of=/mnt/m/keep/big bs=1048576 count=6 2>/dev/null || die write_big
(cd /mnt/m/keep && sha256sum * > /mnt/m/SUMS) || die hash
mark sums=$(sha256sum < /mnt/m/SUMS | cut -d' ' -f1) files=$(wc -l < /mnt/m/SUMS)
umount /mnt/m || die umount
e2fsck -f -n /dev/$d >/tmp/fsck.out 2>&1 || { cat /tmp/fsck.out; die e2fsck; }
""" + DETACH

CHANGE = ATTACH + """
step change
mkdir -p /mnt/m && mount -t ext4 /dev/$d /mnt/m || die mount
i=0
while [ $i -lt 10 ]; do rm /mnt/m/keep/f$i || die rm; i=$((i + 1)); done
while [ $i -lt 20 ]; do
    dd if=/dev/urandom of=/mnt/m/keep/f$i bs=1024 count=$((i * 31 + 7)) 2>/dev/null || die rewrite
    i=$((i + 1))
done
rm /mnt/m/keep/big || die rm_big
dd if=/dev/urandom of=/mnt/m/after.bin bs=1048576 count=3 2>/dev/null || die write_after
(cd /mnt/m/keep && sha256sum * > /mnt/m/SUMS) || die hash
umount /mnt/m || die umount
""" + DETACH


def check_marked(mount_opts: str) -> str:
    """Guest lines: fsck the attached image, mount it and check every file listed at the mark."""
    return f"""
e2fsck -f -n /dev/$d >/tmp/fsck.out 2>&1 || {{ cat /tmp/fsck.out; die e2fsck; }}
mark fsck=clean
mkdir -p /mnt/m && mount -t ext4 -o {mount_opts} /dev/$d /mnt/m || die mount
mark sums=$(sha256sum < /mnt/m/SUMS | cut -d' ' -f1)
(cd /mnt/m/keep && sha256sum -c -s /mnt/m/SUMS) || die marked_files_differ
[ -e /mnt/m/after.bin ] && die file_from_after_the_mark
"""


READ_ONLY = ATTACH + "step read_only\n" + check_marked("ro") + """
umount /mnt/m || die umount
check_kernel_log
""" + DETACH

WRITABLE = ATTACH + "step writable\n" + check_marked("rw") + """
rm /mnt/m/keep/f0 /mnt/m/keep/big || die rm
dd if=/dev/urandom of=/mnt/m/scratch.bin bs=1048576 count=2 2>/dev/null || die write_scratch
s1=$(sha256sum < /mnt/m/scratch.bin | cut -d' ' -f1)
umount /mnt/m || die umount
echo 3 > /proc/sys/vm/drop_caches
mount -t ext4 /dev/$d /mnt/m || die remount
[ "$(sha256sum < /mnt/m/scratch.bin | cut -d' ' -f1)" = "$s1" ] || die scratch_write_lost
[ -e /mnt/m/keep/f0 ] && die delete_lost
mark scratch_written=1
umount /mnt/m || die umount
e2fsck -f -n /dev/$d >/tmp/fsck2.out 2>&1 || { cat /tmp/fsck2.out; die e2fsck_after_writes; }
check_kernel_log
""" + DETACH


def guest(script: str, port: int, image: GuestImage, units: Units, what: str) -> GuestResult:
    return run_checked_guest(script, port, image, units, what, timeout=300)


class Expose:
    """`usbmirror expose ... --usbip 127.0.0.1:0` as a process; `port` is the one it printed."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "firmware.cli", "expose", *args, "--usbip", "127.0.0.1:0"],
                                     cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     stdin=subprocess.DEVNULL)
        assert self.proc.stdout is not None
        self.first = self.proc.stdout.readline()
        if "over USB/IP on 127.0.0.1:" not in self.first:
            self.proc.kill()
            _, err = self.proc.communicate(timeout=30)
            raise AssertionError(f"expose did not start: {self.first!r} {err}")
        self.port = int(self.first.split("127.0.0.1:")[1].split()[0])

    def stop(self) -> str:
        """SIGTERM; the command's output after its first line (the end line)."""
        os.kill(self.proc.pid, signal.SIGTERM)
        out, err = self.proc.communicate(timeout=60)
        assert self.proc.returncode == 0, f"expose rc={self.proc.returncode}: {err}"
        return out

    def __enter__(self) -> Expose:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class SourceWriter(threading.Thread):
    """Writes garbage over the start of the local unit's disk through its USB/IP port until stopped."""

    def __init__(self, port: int) -> None:
        super().__init__(name="source-writer", daemon=True)
        self.port, self.halt, self.written, self.error = port, threading.Event(), 0, ""

    def run(self) -> None:
        try:
            with UsbipClient("127.0.0.1", self.port) as c:
                assert c.import_device("1-1").status == 0
                c.enumerate()
                c.until_ready()
                chunk, lba = 128, 0
                while not self.halt.is_set():
                    data = os.urandom(chunk * BS)
                    assert c.write10(lba, data) == 0, f"WRITE(10) at {lba} failed"
                    self.written += len(data)
                    lba = (lba + chunk) % (GARBAGE_MIB * MIB // BS)
                    time.sleep(0.02)
        except BaseException as exc:  # reported by the test
            self.error = repr(exc)


def history_json(state: Path) -> dict[str, object]:
    r = usbmirror("history", "--state-dir", str(state), "--source", "server1", "--json")
    assert r.returncode == 0, r.stderr
    out: dict[str, object] = json.loads(r.stdout)
    return out


def restore(state: Path, to: Path, *point: str) -> None:
    r = usbmirror("restore", "--state-dir", str(state), "--source", "server1", *point, "--to", str(to), timeout=300)
    assert r.returncode == 0 and "restored source server1" in r.stdout, f"restore {point}: {r.stdout}{r.stderr}"


def test_history_restores_and_exposes_the_marked_file_system(units: Units, tmp_path: Path,
                                                            guest_image: GuestImage) -> None:
    tls = units.pair("dr1", ["server1"])
    volume, target = tmp_path / "local-volume.img", tmp_path / "remote-target.img"
    remote = units.start_remote("dr1", targets={"server1": target}, tls_dir=tls, extra=["--history-size", "512M"])
    rstate = remote.state_dir
    local = units.start_local(volume=volume, size=f"{DISK_MIB}M", journal_size="64M", source_id="server1",
                              tls_dir=tls, remotes=[remote.address], extra=["--write-cache", "on"])
    local.wait_status(streaming(), what="the link to the remote")

    built = guest(BUILD, local.port, guest_image, units, "building the file system")
    m = usbmirror("mark", MARK, "--state-dir", str(local.state_dir))
    assert m.returncode == 0, m.stderr
    at_mark = tmp_path / "at-mark.img"
    at_mark.write_bytes(volume.read_bytes())   # every acknowledged write is in the volume: the disk at the mark
    between = time.time()                      # after the mark, before any later write (the next boot)
    local.wait_status(drained, timeout=120, what="the remote to apply the mark")

    guest(CHANGE, local.port, guest_image, units, "changing the file system")
    local.wait_status(drained, timeout=120, what="the remote to apply the changes")
    assert first_difference(target, at_mark) is not None, "the changes never reached the target"

    hist = history_json(rstate)
    points = hist["points"]
    assert isinstance(points, list)
    (mk,) = [p for p in points if p["kind"] == "mark" and p.get("name") == MARK]
    assert any(p["kind"] == "flush" and p["seq"] > mk["seq"] for p in points), "no flush listed after the mark"
    assert mk["time"] <= between

    restore(rstate, tmp_path / "by-mark.img", "--mark", MARK)
    iso = dt.datetime.fromtimestamp(between, dt.UTC).isoformat()
    restore(rstate, tmp_path / "by-time.img", "--at", iso)
    for name in ("by-mark.img", "by-time.img"):
        diff = first_difference(tmp_path / name, at_mark)
        assert diff is None, f"{name} differs from the disk at the mark at byte {diff}"

    # read-only exposure while the source keeps writing over its file system
    with Expose("--state-dir", str(rstate), "--source", "server1", "--mark", MARK) as ex:
        assert "(read-only)" in ex.first
        writer = SourceWriter(local.port)
        writer.start()
        try:
            ro = guest(READ_ONLY, ex.port, guest_image, units, "checking the read-only exposure")
        finally:
            writer.halt.set()
            writer.join(60)
        end = ex.stop()
    assert writer.error == "" and writer.written > 0, f"source writer: {writer.error} ({writer.written} bytes)"
    assert ro.markers["sums"] == built.markers["sums"] and ro.markers["fsck"] == "clean"
    assert ro.markers["kernel_errors"] == "0", ro.describe()
    assert re.search(r"\b0 writes", end), end
    local.wait_status(drained, timeout=120, what="the remote to apply the source's writes")
    assert first_difference(target, volume) is None, "the target is not the source's newest image"

    # writable exposure: a test failover whose writes vanish
    target_before = sha256_file(target)
    with Expose("--state-dir", str(rstate), "--source", "server1", "--mark", MARK, "--writable",
                "--scratch-size", "64M") as ex:
        wr = guest(WRITABLE, ex.port, guest_image, units, "using the writable exposure")
        end = ex.stop()
    assert wr.markers["sums"] == built.markers["sums"] and wr.markers.get("scratch_written") == "1"
    assert wr.markers["kernel_errors"] == "0", wr.describe()
    assert "of scratch thrown away" in end and not re.search(r"\b0 writes", end), end
    assert sha256_file(target) == target_before, "a write through the writable exposure reached the target"
    restore(rstate, tmp_path / "after-expose.img", "--mark", MARK)
    diff = first_difference(tmp_path / "after-expose.img", at_mark)
    assert diff is None, f"the image at the mark changed after the writable exposure (byte {diff})"
    assert local.stop() == 0 and remote.stop() == 0, units.describe()
