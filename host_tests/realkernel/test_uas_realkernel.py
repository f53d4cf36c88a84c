"""Debian's stock kernel binds Linux's `uas` driver to the usbmirror disk over USB/IP and queues commands.

The local unit runs with `--uas on`: its interface offers Bulk-Only as alternate setting 0 and USB
Attached SCSI as alternate setting 1. The guest attaches it; the `uas` driver (not usb-storage) must
claim it, select alternate setting 1 and keep several commands in flight (tags). On that disk the
guest partitions (GPT), makes ext4, writes files, checks them after dropping caches, runs e2fsck,
runs fio with libaio at queue depth 16 with crc32c verify, and discards a region (Linux enables
discard on a UAS disk without being told; the region reads as zeros in the image). A second test SIGKILLs the unit while
eight writers at once write numbered 4 KiB blocks (each printed once its write completed), starts
it again on the same volume, journal and port, and checks after re-attaching that every acknowledged
block is in the volume and that the disk the guest reads is the volume.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from host_tests.realkernel.conftest import LINUX_FS, RunningDevice, write_gpt
from host_tests.realkernel.test_usbip_realkernel import _check_fio_blocks
from host_tests.units import Status, UnitProcess, Units, free_port
from hw.qemu.build_guest import GuestImage
from hw.qemu.guest import MARKER, GuestResult, run_guest

pytestmark = [pytest.mark.realkernel, pytest.mark.slow]

MIB = 1 << 20
DISK_SIZE = 64 * MIB
BS = 512
EXT4 = ("ext4part", 1 * MIB // BS, 24 * MIB // BS, LINUX_FS)
FIO_OFFSET, FIO_SIZE = 32 * MIB, 8 * MIB  # raw region outside the partition and the backup GPT
DISCARD_OFFSET, DISCARD_SIZE = 48 * MIB, 4 * MIB  # written with random data by the host, then discarded

# the USB interface the disk sits on, and the driver bound to it
BOUND = """
iface=$(for i in /sys/bus/usb/devices/*:1.0; do [ "$(cat "$i/bInterfaceClass" 2>/dev/null)" = 08 ] && echo "$i"; done)
mark driver=$(basename "$(readlink "$iface/driver")") alternate=$(tr -d " " < "$iface/bAlternateSetting")
mark queue_depth=$(cat /sys/block/$d/device/queue_depth)
"""

FIO_QD = (f"--ioengine=libaio --iodepth=16 --direct=1 --verify=crc32c --verify_fatal=1 --eta=never "
          f"--filename=/dev/$d --offset={FIO_OFFSET} --size={FIO_SIZE}")


def _use_script() -> str:
    return f"""
set -u
step attach
usbip_attach 1-1 || die attach
d=$(wait_disk 20) || die no-disk-after-attach
{BOUND}
step gpt
{write_gpt([EXT4])}
step mkfs
mkfs.ext4 -q -F -L uas /dev/${{d}}1 || die mkfs_ext4
mkdir -p /mnt/u && mount -t ext4 /dev/${{d}}1 /mnt/u || die mount
step write_files
i=0
while [ $i -lt 30 ]; do
    dd if=/dev/urandom of=/mnt/u/f$i bs=4096 count=$((i * 5 + 1)) status=none || die write_$i
    i=$((i + 1))
done
dd if=/dev/urandom of=/mnt/u/big bs=65536 count=64 status=none || die write_big
(cd /mnt/u && md5sum f* big) > /tmp/md5
sync
echo 3 > /proc/sys/vm/drop_caches
(cd /mnt/u && md5sum -c -s /tmp/md5) || die verify_after_drop_caches
umount /mnt/u || die umount
step fsck
e2fsck -f -n /dev/${{d}}1 || die e2fsck
step fio
fio --name=rand4k --rw=randwrite --bs=4k {FIO_QD} --size={FIO_SIZE // 2} || die fio_rand4k
fio --name=seq64k --rw=write --bs=64k {FIO_QD.replace(f"--offset={FIO_OFFSET}", f"--offset={FIO_OFFSET + FIO_SIZE // 2}")} \\
    --size={FIO_SIZE // 2} || die fio_seq64k
step discard
mark discard_max=$(cat /sys/block/$d/queue/discard_max_bytes)
/sbin/blkdiscard -f -v -o {DISCARD_OFFSET} -l {DISCARD_SIZE} /dev/$d || die blkdiscard
step detach
usbip detach -p 0 || die detach
n=0; while [ -e /sys/block/$d ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
check_kernel_log
mark done=1
"""


def _fail(what: str, result: GuestResult, dev: RunningDevice | UnitProcess) -> str:
    return f"{what}\n{result.describe()}\n--- device log (tail) ---\n{dev.log()}"


def _uas_status(status: Status) -> dict[str, object]:
    usb = status["usb"]
    assert isinstance(usb, list) and usb, f"no USB transport in the status: {status}"
    device = usb[0]["device"]
    return device["uas"]  # type: ignore[no-any-return]


def test_linux_binds_uas_queues_commands_and_the_image_holds_what_it_wrote(
        guest_image: GuestImage, start_device: Callable[..., RunningDevice], tmp_path: Path) -> None:
    volume = tmp_path / "disk.img"
    with open(volume, "wb") as fh:
        fh.truncate(DISK_SIZE)
        fh.seek(DISCARD_OFFSET)
        fh.write(os.urandom(DISCARD_SIZE))
    dev = start_device(DISK_SIZE, image=volume, extra_args=["--uas", "on"])
    result = run_guest(_use_script(), usbip_port=dev.port, timeout=150, image=guest_image)
    m = result.markers
    assert "failed" not in m, _fail(f"guest step failed: {m.get('failed')} (at step {m.get('step')})", result, dev)
    assert result.rc == 0 and m.get("done") == "1", _fail("guest script did not finish", result, dev)
    assert m.get("driver") == "uas" and m.get("alternate") == "1", _fail(
        f"the guest bound {m.get('driver')} on alternate setting {m.get('alternate')}, not uas on 1", result, dev)
    assert int(m.get("queue_depth", "0")) > 1, _fail("the uas driver queues one command at a time", result, dev)
    errors = [line for line in result.output.splitlines() if line.startswith("KERNEL-ERROR: ")]
    assert m.get("kernel_errors") == "0" and not errors, _fail("kernel trouble:\n" + "\n".join(errors), result, dev)
    uas = _uas_status(dev.status())
    assert int(uas["commands"]) > 1000, f"few commands went over UAS: {uas}"  # type: ignore[call-overload]
    assert int(uas["most_running"]) > 1, f"UAS commands never ran at the same time: {uas}"  # type: ignore[call-overload]
    # Linux discards on a UAS disk out of the box (no provisioning_mode change, unlike usb-storage)
    assert int(m.get("discard_max", "0")) > 0, _fail("the kernel offers no discard on the UAS disk", result, dev)
    scsi = dev.status()["scsi"]
    assert scsi["unmap_commands"] >= 1, f"blkdiscard never reached the device as UNMAP: {scsi}"  # type: ignore[index]
    assert dev.stop() == 0, f"device did not exit cleanly on SIGTERM:\n{dev.log()}"
    image = dev.image.read_bytes()
    assert image[DISCARD_OFFSET:DISCARD_OFFSET + DISCARD_SIZE] == bytes(DISCARD_SIZE), \
        "the discarded region does not read as zeros in the image"
    _check_fio_blocks(image, FIO_OFFSET, FIO_SIZE // 2, 4096)
    _check_fio_blocks(image, FIO_OFFSET + FIO_SIZE // 2, FIO_SIZE // 2, 65536)
    part = tmp_path / "ext4.img"
    part.write_bytes(image[EXT4[1] * BS:(EXT4[1] + EXT4[2]) * BS])
    fsck = subprocess.run(["e2fsck", "-f", "-n", str(part)], capture_output=True, text=True, check=False)
    assert fsck.returncode == 0, f"host e2fsck -fn of the ext4 partition: rc={fsck.returncode}\n{fsck.stdout}"


BLOCK = 4096
WRITERS = 8                      # numbered-block writers at once: 8 commands in flight
ACK_BLOCKS = 1024                # blocks ACK_BASE.. ACK_BASE + ACK_BLOCKS - 1, block b by writer b % WRITERS
ACK_BASE = FIO_OFFSET // BLOCK
ACK_RE = re.compile(rf"^{MARKER} ack=(\d+)\s*$", re.M)
KILL_SCRIPT = f"""
set -u
cd /tmp
step attach
usbip_attach 1-1 || die attach
d=$(wait_disk 20) || die no_disk
{BOUND}
step write_until_killed
w=0
while [ $w -lt {WRITERS} ]; do
    (b=$w
     while [ $b -lt {ACK_BLOCKS} ]; do
         dd if=/blocks.bin of=/dev/$d bs={BLOCK} skip=$b seek=$(({ACK_BASE} + b)) count=1 oflag=direct \\
             conv=notrunc 2>/dev/null || exit 0
         mark ack=$b
         b=$((b + {WRITERS}))
     done) &
    w=$((w + 1))
done
wait
step reattach
reattach_after_restart $d 120
d=$(wait_disk 30) || {{ dmesg | tail -60; die no_disk_after_restart; }}
{BOUND.replace("mark driver=", "mark driver2=").replace("alternate=", "alternate2=").replace("queue_depth=", "qd2=")}
step read_back
dd if=/dev/$d bs=65536 skip={ACK_BASE * BLOCK // 65536} count={ACK_BLOCKS * BLOCK // 65536} iflag=direct \\
    2>/dev/null > /tmp/region.bin || die read_back
mark region_md5=$(md5sum < /tmp/region.bin | cut -d' ' -f1)
usbip detach -p 0 >/dev/null 2>&1 || die detach
mark done=1
"""


class _Killer(threading.Thread):
    """SIGKILLs the unit once the journal passed `threshold` records, then starts it again."""

    def __init__(self, unit: UnitProcess, threshold: int) -> None:
        super().__init__(name="uas-killer", daemon=True)
        self.unit, self.threshold = unit, threshold
        self.before: Status | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.before = self.unit.wait_status(lambda st: st["journal"]["head_seq"] >= self.threshold,
                                                timeout=120, interval=0.1, what="the guest's writes")
            self.unit.kill9()
            self.unit.launch()
            self.unit.wait_ready(60)
        except BaseException as exc:
            self.error = exc


def test_kill_9_under_queued_uas_writes_loses_nothing_acknowledged(guest_image: GuestImage, units: Units,
                                                                    tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    with open(image, "wb") as fh:
        fh.truncate(DISK_SIZE)
    port = free_port()
    state = tmp_path / "state"
    state.mkdir()
    argv = ["local", "--volume", str(image), "--size", f"{DISK_SIZE // MIB}M", "--usbip", f"127.0.0.1:{port}",
            "--state-dir", str(state), "--uas", "on"]
    unit = units.start_argv("local", argv, state, port)
    blocks = os.urandom(ACK_BLOCKS * BLOCK)
    killer = _Killer(unit, threshold=200)
    killer.start()
    result = run_guest(KILL_SCRIPT, usbip_port=port, timeout=150, image=guest_image,
                       extra_files={"/blocks.bin": blocks})
    killer.join(60)
    m = result.markers
    assert killer.error is None, _fail(f"killing/restarting the unit failed: {killer.error}", result, unit)
    assert "failed" not in m, _fail(f"guest step failed: {m.get('failed')} (at step {m.get('step')})", result, unit)
    assert result.rc == 0 and m.get("done") == "1", _fail("guest script did not finish", result, unit)
    assert (m.get("driver"), m.get("driver2")) == ("uas", "uas"), _fail("uas did not bind both times", result, unit)
    acked = sorted({int(n) for n in ACK_RE.findall(result.output)})
    assert acked and len(acked) < ACK_BLOCKS, _fail(f"{len(acked)} blocks acknowledged: no kill mid-run", result, unit)
    assert killer.before is not None and killer.before["usb"][0]["device"]["uas"]["most_running"] > 1, \
        f"the writes before the kill never ran at the same time: {killer.before}"
    assert unit.stop(20) == 0, f"the restarted unit did not stop cleanly:\n{unit.log()}"
    volume = image.read_bytes()
    lost = [b for b in acked if volume[(ACK_BASE + b) * BLOCK:(ACK_BASE + b + 1) * BLOCK]
            != blocks[b * BLOCK:(b + 1) * BLOCK]]
    assert not lost, _fail(f"acknowledged blocks lost by the kill: {lost[:20]} of {len(acked)}", result, unit)
    region = volume[ACK_BASE * BLOCK:(ACK_BASE + ACK_BLOCKS) * BLOCK]
    assert hashlib.md5(region).hexdigest() == m.get("region_md5"), _fail(
        "the restarted unit served the guest other data than its volume holds", result, unit)
