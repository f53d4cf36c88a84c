"""Benchmark the board's gadget path: fio through usbmirror's FunctionFS device next to the kernel's f_mass_storage.

One QEMU guest (Debian's kernel, TCG) plays both the board and the server: dummy_hcd (``num=2``: two
UDC/host-controller pairs) connects the gadget side to the guest's own usb-storage driver. For each
speed (dummy_hcd loaded with and without ``is_super_speed=1``, reloaded between the two phases of the
same boot) two devices are attached side by side:

1. usbmirror on ``dummy_udc.0``: ``python3 -m firmware.gadget_main`` (the firmware's BOT core and SCSI
   target through configfs + FunctionFS; no journal, no remotes; write cache off, so every WRITE is
   followed by an fdatasync before its status);
2. the kernel's own ``f_mass_storage`` on ``dummy_udc.1`` (configfs function ``mass_storage.0``,
   ``lun.0/file``);

each serving a file of the same size in the guest's RAM file system (the initramfs root), so the disk
is not what limits either of them. fio runs on the attached /dev/sdX with O_DIRECT, psync, queue depth
1, a fixed runtime per job (after a 1 s unmeasured warm-up on each device): 64 KiB sequential write
and read, 4 KiB random write and read. Each job runs on one device right after the other
(alternating which goes first), so a burst of load on the shared machine hits both sides of a ratio
alike. For context the same jobs run once directly on a RAM file in the guest (buffered: the guest's
tmpfs takes no O_DIRECT). Everything is CPU-bound under TCG, so the absolute figures are far below a
board's; the ratio usbmirror/f_mass_storage is the figure to read.

Run: .venv/bin/python bench/bench_gadget_fio.py [--size-mib 64] [--seconds 3] [--speeds high,super]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hw.qemu.gadget_layer import run_gadget_guest  # noqa: E402

FIO_LINE = "@@FIO"
SPEEDS = ("high", "super")
FUNCTIONS = ("usbmirror", "fms")
JOBS = (  # key, label, fio arguments
    ("seqwrite", "64 KiB seq write", "--rw=write --bs=64k"),
    ("seqread", "64 KiB seq read", "--rw=read --bs=64k"),
    ("randwrite", "4 KiB rand write", "--rw=randwrite --bs=4k"),
    ("randread", "4 KiB rand read", "--rw=randread --bs=4k"),
)


@dataclass(frozen=True)
class Figure:
    mb_s: float
    iops: float
    lat_ms: float


def guest_script(size_mib: int, seconds: float, speeds: tuple[str, ...]) -> str:
    """The busybox script: raw RAM-file figures, then per speed both devices attached side by side
    (usbmirror on dummy_udc.0, f_mass_storage on dummy_udc.1) and each fio job run on one, then the
    other, so a burst of load on the shared machine hits both sides of a ratio alike."""
    def fio(key: str, args: str, tag: str, target: str, extra: str) -> str:
        return (f"fio --name={key} {args} --size={size_mib}M --time_based --runtime={seconds:g} "
                f"--ioengine=psync --iodepth=1 --eta=never --output-format=json {extra} --filename={target} "
                f"--output=/tmp/fio/{tag}.{key}.json || die fio_{tag}.{key}")

    raw = "\n".join(fio(key, args, "raw.file", "/tmp/raw.img", "") for key, _label, args in JOBS)
    pairs = []
    for n, (key, _label, args) in enumerate(JOBS):
        sides = [fio(key, args, "$1.usbmirror", "/dev/$DU", "--direct=1"),
                 fio(key, args, "$1.fms", "/dev/$DK", "--direct=1")]
        pairs.extend(sides if n % 2 == 0 else sides[::-1])  # alternate which side goes first
    paired = "\n    ".join(pairs)
    phases = "\n".join(f"run_speed {speed} {'is_super_speed=1' if speed == 'super' else ''}" for speed in speeds)
    return f"""
set -u
KVER=$(cat /etc/kernel-version)
G=/sys/kernel/config/usb_gadget/fms
mkdir -p /tmp/fio
disk_on() {{  # disk_on N: the SCSI disk behind dummy_hcd.N, waiting up to 60 s
    n=0
    while [ $n -lt 600 ]; do
        for b in /sys/block/sd*; do
            [ -e "$b" ] && readlink -f "$b" | grep -q "/dummy_hcd\\.$1/" && [ -b "/dev/${{b##*/}}" ] \\
                && {{ echo "${{b##*/}}"; return 0; }}
        done
        n=$((n + 1)); sleep 0.1
    done
    return 1
}}
load_speed() {{  # two UDC/HCD pairs: dummy_udc.0 for usbmirror, dummy_udc.1 for f_mass_storage
    if grep -q '^dummy_hcd ' /proc/modules; then
        rmmod dummy_hcd || die rmmod_dummy_hcd
        insmod "/lib/modules/$KVER/$(grep dummy_hcd /etc/gadget-modules.order)" num=2 "$@" || die insmod_dummy_hcd
    else
        load_gadget_stack num=2 "$@"
    fi
    [ -e /sys/class/udc/dummy_udc.1 ] || die no_second_udc
}}
start_usbmirror() {{
    dd if=/dev/zero of=/tmp/ffs.img bs=1M count={size_mib} 2>/dev/null || die ffs_image
    (cd /opt/usbmirror && exec python3 -m firmware.gadget_main --volume /tmp/ffs.img --udc dummy_udc.0 \\
        --speeds full,high,super) > /tmp/fw.log 2>&1 &
    FW=$!
}}
stop_usbmirror() {{
    kill -TERM $FW; wait $FW; mark fw_exit_$1=$?
    gone $DU || fwdie usbmirror_disk_stays
    rm -f /tmp/ffs.img
}}
start_fms() {{
    dd if=/dev/zero of=/tmp/fms.img bs=1M count={size_mib} 2>/dev/null || die fms_image
    mkdir $G $G/strings/0x409 $G/configs/c.1 $G/functions/mass_storage.0 || die fms_configfs
    echo 0x1209 > $G/idVendor; echo 0x0002 > $G/idProduct
    echo fms0001 > $G/strings/0x409/serialnumber
    echo kernel > $G/strings/0x409/manufacturer; echo f_mass_storage > $G/strings/0x409/product
    echo 100 > $G/configs/c.1/MaxPower
    echo 0 > $G/functions/mass_storage.0/lun.0/removable
    echo /tmp/fms.img > $G/functions/mass_storage.0/lun.0/file || die fms_lun_file
    ln -s $G/functions/mass_storage.0 $G/configs/c.1/ || die fms_link
    echo dummy_udc.1 > $G/UDC || die fms_bind
}}
stop_fms() {{
    echo "" > $G/UDC
    gone $DK || die fms_disk_stays
    rm $G/configs/c.1/mass_storage.0
    rmdir $G/configs/c.1 $G/functions/mass_storage.0 $G/strings/0x409 $G || die fms_teardown
    rm -f /tmp/fms.img
}}
run_speed() {{  # run_speed NAME [dummy_hcd parameters]
    speed=$1; shift
    step "$speed speed"
    load_speed "$@"
    set -- "$speed"
    start_usbmirror
    start_fms
    DU=$(disk_on 0) || fwdie no_disk_usbmirror
    DK=$(disk_on 1) || die no_disk_fms
    mark speed_$1_usbmirror=$(cat /sys/class/udc/dummy_udc.0/current_speed) \\
        speed_$1_fms=$(cat /sys/class/udc/dummy_udc.1/current_speed)
    for dev in $DU $DK; do  # warm-up, not measured: first-touch costs (TCG translation, allocations)
        fio --name=warmup --rw=randrw --bs=64k --size={size_mib}M --time_based --runtime=1 --direct=1 \\
            --ioengine=psync --eta=never --filename=/dev/$dev --output=/dev/null || die warmup_$dev
    done
    {paired}
    stop_usbmirror $1
    stop_fms
}}

step raw
dd if=/dev/zero of=/tmp/raw.img bs=1M count={size_mib} 2>/dev/null || die raw_image
{raw}
rm -f /tmp/raw.img
{phases}
check_kernel_log
python3 - <<'EOF' || die summary
import glob, json, os
for path in sorted(glob.glob("/tmp/fio/*.json")):
    tag = os.path.basename(path)[:-5]
    with open(path) as fh:
        text = fh.read()
    job = json.loads(text[text.index("{{"):])["jobs"][0]
    side = job["write"] if "write" in tag.rsplit(".", 1)[1] else job["read"]
    print("{FIO_LINE}", tag, side["bw_bytes"], side["iops"], side["lat_ns"]["mean"])
EOF
mark done=1
"""


def parse_figures(output: str) -> dict[str, Figure]:
    """``speed.function.job`` (and ``raw.file.job``) -> Figure, from the guest's @@FIO lines."""
    out: dict[str, Figure] = {}
    for line in output.splitlines():
        parts = line.split()
        if len(parts) == 5 and parts[0] == FIO_LINE:
            bw, iops, lat_ns = (float(p) for p in parts[2:])
            out[parts[1]] = Figure(bw / 1e6, iops, lat_ns / 1e6)
    return out


def report(figures: dict[str, Figure], markers: dict[str, str], speeds: tuple[str, ...]) -> list[str]:
    """The printed table: per speed and job, usbmirror and f_mass_storage side by side, then the RAM file."""
    lines = [f"{'speed':<7}{'job':<18}{'usbmirror MB/s':>15}{'IOPS':>7}{'lat ms':>8}"
             f"   {'f_mass_storage MB/s':>20}{'IOPS':>7}{'lat ms':>8}   {'ratio':>6}"]
    for speed in speeds:
        for key, label, _args in JOBS:
            u, k = figures.get(f"{speed}.usbmirror.{key}"), figures.get(f"{speed}.fms.{key}")
            left = f"{u.mb_s:>15.2f}{u.iops:>7.0f}{u.lat_ms:>8.2f}" if u else f"{'missing':>30}"
            right = f"{k.mb_s:>20.2f}{k.iops:>7.0f}{k.lat_ms:>8.2f}" if k else f"{'missing':>35}"
            ratio = f"{u.mb_s / k.mb_s:>6.2f}" if u and k and k.mb_s > 0 else f"{'-':>6}"
            lines.append(f"{speed:<7}{label:<18}{left}   {right}   {ratio}")
    lines.append("")
    lines.append(f"{'RAM file in the guest (fio, buffered)':<40}{'MB/s':>10}{'IOPS':>9}{'lat ms':>8}")
    for key, label, _args in JOBS:
        r = figures.get(f"raw.file.{key}")
        lines.append(f"{label:<40}" + (f"{r.mb_s:>10.1f}{r.iops:>9.0f}{r.lat_ms:>8.3f}" if r else f"{'missing':>10}"))
    link = ", ".join(f"{s}: {markers.get(f'speed_{s}_usbmirror', '?')} / {markers.get(f'speed_{s}_fms', '?')}"
                     for s in speeds)
    lines.append(f"link speed seen by the UDC (usbmirror / f_mass_storage): {link}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--size-mib", type=int, default=64, help="size of each backing file (and fio span)")
    parser.add_argument("--seconds", type=float, default=3.0, help="runtime of each fio job")
    parser.add_argument("--speeds", default="high,super", help="comma-separated: high, super")
    args = parser.parse_args()
    speeds = tuple(s.strip() for s in args.speeds.split(",") if s.strip())
    if not speeds or any(s not in SPEEDS for s in speeds):
        parser.error(f"--speeds takes {', '.join(SPEEDS)}")
    jobs = len(JOBS) * (1 + len(FUNCTIONS) * len(speeds))
    t0 = time.monotonic()
    result = run_gadget_guest(guest_script(args.size_mib, args.seconds, speeds), memory=768,
                              timeout=120 + jobs * (args.seconds + 6))
    wall = time.monotonic() - t0
    if result.rc != 0 or result.markers.get("done") != "1":
        print(result.describe(80))
        return 1
    figures = parse_figures(result.output)
    print(f"fio in Debian's kernel (QEMU TCG) through dummy_hcd: usbmirror (FunctionFS, Python) next to the "
          f"kernel's f_mass_storage, same boot; O_DIRECT, psync, QD1, {args.seconds:g} s per job, "
          f"{args.size_mib} MiB RAM-backed files; guest run {wall:.0f} s")
    for line in report(figures, result.markers, speeds):
        print(line)
    print("ratio = usbmirror MB/s / f_mass_storage MB/s (same guest, same boot, same speed)")
    bad = [s for s in speeds for f in FUNCTIONS if result.markers.get(f"speed_{s}_{f}") != f"{s}-speed"]
    errors = result.markers.get("kernel_errors", "?")
    if errors != "0":
        print(f"kernel log showed trouble (kernel_errors={errors}):")
        print("\n".join(ln for ln in result.output.splitlines() if ln.startswith("KERNEL-ERROR:")))
    unclean = [s for s in speeds if result.markers.get(f"fw_exit_{s}") != "0"]
    if unclean:
        print(f"usbmirror did not stop cleanly at {unclean}:\n" + result.describe(40))
    if bad or unclean or len(figures) != jobs:
        print(f"incomplete run: wrong link speed in {bad}, {len(figures)} of {jobs} fio figures")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
