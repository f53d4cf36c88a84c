"""The guest half of ``make demo``: a real Linux host (Debian's kernel in QEMU) uses the usbmirror disk.

It attaches the device over USB/IP, partitions it (GPT), makes an ext4 file system, copies a tree of
files onto it, runs fio with verification on a file, drops the caches, checks every file, runs
``e2fsck -f`` and detaches. Lines starting with ``DEMO|`` are the human-readable summary.

API: ``run_demo_guest(usbip_port, busid="1-1") -> GuestResult`` and ``summary(result) -> str``.
By hand: ``python -m hw.qemu.demo_guest --usbip-port PORT`` against a running local unit.
"""

from __future__ import annotations

import argparse
import sys

from hw.qemu.guest import GuestResult, run_guest

DEMO_SCRIPT = r"""
say() { echo "DEMO| $*"; }
t0=$(cut -d' ' -f1 /proc/uptime)
since() { awk -v a="$t0" -v b="$(cut -d' ' -f1 /proc/uptime)" 'BEGIN { printf "%.1f", b - a }'; }
usbip attach -r 10.0.2.100 -b "$BUSID" || die attach
d=$(wait_disk 20) || die no-disk
vendor=$(sed 's/ *$//' /sys/block/$d/device/vendor)
model=$(sed 's/ *$//' /sys/block/$d/device/model)
size_mb=$(( $(cat /sys/block/$d/size) / 2048 ))
serial=$(sg_vpd -p 0x80 /dev/$d 2>/dev/null | sed -n 's/.*Unit serial number: *//p')
say "attached over USB/IP as /dev/$d: $vendor $model, ${size_mb} MiB, serial $serial ($(since) s)"
printf 'label: gpt\n,,L,\n' | sfdisk -q --wipe always /dev/$d || die sfdisk
n=0; while [ ! -b /dev/${d}1 ] && [ $n -lt 50 ]; do sleep 0.1; n=$((n + 1)); done
mkfs.ext4 -q -F -L usbmirror-demo /dev/${d}1 || die mkfs
mkdir -p /mnt/demo && mount /dev/${d}1 /mnt/demo || die mount
say "GPT + ext4 on /dev/${d}1, mounted ($(since) s)"
mkdir -p /mnt/demo/tree
cp -a /lib/modules /sbin /usr/bin /var/lib /mnt/demo/tree/ || die copy
files=$(find /mnt/demo/tree -type f | wc -l)
kib=$(du -sk /mnt/demo/tree | cut -f1)
(cd /mnt/demo/tree && find . -type f | sort | xargs md5sum) > /tmp/tree.md5
say "copied a tree of $files files (${kib} KiB) ($(since) s)"
fio --name=demo --filename=/mnt/demo/fio.dat --size=16M --rw=randwrite --bs=4k --direct=1 \
    --ioengine=psync --verify=crc32c --verify_fatal=1 --eta=never --output=/tmp/fio.txt || { cat /tmp/fio.txt; die fio; }
iops=$(sed -n 's/.*write: IOPS=\([^,]*\),.*/\1/p' /tmp/fio.txt)
say "fio: 16 MiB of 4 KiB random O_DIRECT writes at $iops IOPS, every block verified (crc32c) ($(since) s)"
sync
echo 3 > /proc/sys/vm/drop_caches
(cd /mnt/demo/tree && md5sum -c -s /tmp/tree.md5) || die verify
say "caches dropped, all $files files read back from the disk and match ($(since) s)"
df -h /mnt/demo | tail -1 | awk '{ print "DEMO| file system: " $3 " used of " $2 }'
umount /mnt/demo || die umount
e2fsck -f -n /dev/${d}1 > /tmp/fsck.txt 2>&1 || { cat /tmp/fsck.txt; die e2fsck; }
say "e2fsck -f: clean ($(tail -1 /tmp/fsck.txt | sed 's/^[^:]*: //'))"
usbip detach -p 0 || die detach
say "detached ($(since) s total)"
mark done=1
"""


def run_demo_guest(usbip_port: int, busid: str = "1-1", *, timeout: float = 300.0) -> GuestResult:
    """Run the demo workload in the guest against the USB/IP device on 127.0.0.1:usbip_port."""
    return run_guest(f"BUSID='{busid}'\n" + DEMO_SCRIPT, usbip_port=usbip_port, timeout=timeout)


def summary(result: GuestResult) -> str:
    """The DEMO| lines, or the tail of the console when the run failed."""
    lines = [line[len("DEMO| "):] for line in result.output.splitlines() if line.startswith("DEMO| ")]
    if result.rc != 0 or result.markers.get("done") != "1":
        return "\n".join(lines) + "\n" + result.describe(40)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="run the demo workload in the QEMU guest")
    parser.add_argument("--usbip-port", type=int, required=True)
    parser.add_argument("--busid", default="1-1")
    args = parser.parse_args(argv)
    result = run_demo_guest(args.usbip_port, args.busid)
    print(summary(result))
    return 0 if result.rc == 0 and result.markers.get("done") == "1" else 1


if __name__ == "__main__":
    sys.exit(main())
