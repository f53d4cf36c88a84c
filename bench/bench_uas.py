"""Benchmark UAS with queued commands against Bulk-Only, in Debian's kernel over USB/IP, in one guest boot.

One local unit runs with `--uas on` (write cache off: every WRITE durable in the journal before its
status). The QEMU guest (TCG) attaches it: Linux's `uas` driver binds alternate setting 1 and fio
runs with libaio at queue depth 1 and --iodepth (default 16). Then the guest detaches, tells
usb-storage to ignore UAS for this device (`quirks=VID:PID:u`, what a user does for a UAS device
that misbehaves) and attaches again: usb-storage binds Bulk-Only (alternate setting 0, one command
at a time) on the same unit, same volume, same boot, and the same jobs run.

    4 KiB random write (--seconds each), 64 KiB sequential write (--seconds each)

Printed per job: MB/s and IOPS of each, and the ratio UAS / Bulk-Only. The driver bound in each
phase is checked (uas, then usb-storage) and printed. Afterwards the unit's own status says how
many UAS commands ran at once at most, and how many journal flushes the writes of the whole run
needed (group commit: Bulk-Only needs one per WRITE, so every record beyond the flush count shared
a flush, in the UAS phase).

Run: .venv/bin/python bench/bench_uas.py [--seconds 6] [--iodepth 16] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from host_tests.units import Units, free_port  # noqa: E402
from hw.qemu.guest import run_guest  # noqa: E402

DISK_MIB = 256
VID_PID = "1209:0001"  # the unit's default --vendor-id / --product-id


@dataclass(frozen=True)
class Figure:
    mb_s: float
    iops: float


def _jobs(phase: str, seconds: float, depths: tuple[int, ...]) -> str:
    common = ("--direct=1 --ioengine=libaio --eta=never --filename=/dev/$d --output-format=json "
              f"--time_based --runtime={seconds:g}")
    lines = []
    for qd in depths:
        for name, args in (("rand4k", f"--rw=randwrite --bs=4k --size={DISK_MIB // 2}M"),
                           ("seq64k", f"--rw=write --bs=64k --size={DISK_MIB // 2}M --offset={DISK_MIB // 2}M")):
            tag = f"{phase}-{name}-qd{qd}"
            lines.append(f"fio --name={tag} {args} --iodepth={qd} {common} --output=/tmp/{tag}.json || die {tag}\n"
                         f"echo '@@JSON-BEGIN {tag}'; cat /tmp/{tag}.json; echo '@@JSON-END'")
    return "\n".join(lines)


def guest_script(seconds: float, iodepth: int) -> str:
    driver = """iface=$(for i in /sys/bus/usb/devices/*:1.0; do
    [ "$(cat "$i/bInterfaceClass" 2>/dev/null)" = 08 ] && echo "$i"; done)
mark driver_@P@=$(basename "$(readlink "$iface/driver")")"""
    detach = """usbip detach -p 0 || die detach
n=0; while [ -e /sys/block/$d ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done"""
    return f"""
usbip_attach 1-1 || die attach
d=$(wait_disk 20) || die no-disk
{driver.replace("@P@", "uas")}
{_jobs("uas", seconds, (1, iodepth))}
{detach}
echo {VID_PID}:u > /sys/module/usb_storage/parameters/quirks || die quirks
usbip_attach 1-1 || die attach_bot
d=$(wait_disk 20) || die no-disk-bot
n=0; while [ ! -e /sys/bus/usb/devices/1-1:1.0/driver ] && [ $n -lt 50 ]; do sleep 0.1; n=$((n + 1)); done
{driver.replace("@P@", "bot")}
{_jobs("bot", seconds, (1, iodepth))}
{detach}
check_kernel_log
mark done=1
"""


def parse(output: str) -> dict[str, Figure]:
    out: dict[str, Figure] = {}
    for name, body in re.findall(r"@@JSON-BEGIN (\S+)\n(.*?)\n@@JSON-END", output, re.S):
        job = json.loads(body[body.index("{"):])["jobs"][0]["write"]
        out[name] = Figure(job["bw_bytes"] / 1e6, job["iops"])
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=6.0, help="duration of each fio job")
    parser.add_argument("--iodepth", type=int, default=16, help="the queue depth compared with depth 1")
    parser.add_argument("--dir", type=Path, default=None, help="where the image and state go (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-uas-", dir=args.dir) as tmp_name:
        tmp = Path(tmp_name)
        image = tmp / "disk.img"
        with open(image, "wb") as fh:
            fh.truncate(DISK_MIB << 20)
        state = tmp / "state"
        state.mkdir()
        port = free_port()
        with Units(tmp) as units:
            unit = units.start_argv("local", ["local", "--volume", str(image), "--size", f"{DISK_MIB}M",
                                              "--usbip", f"127.0.0.1:{port}", "--state-dir", str(state),
                                              "--uas", "on"], state, port)
            result = run_guest(guest_script(args.seconds, args.iodepth), usbip_port=port,
                               timeout=120 + 8 * args.seconds * 2, image=None)
            status = unit.status()
    m = result.markers
    figures = parse(result.output)
    if m.get("done") != "1" or len(figures) != 8:
        print(f"incomplete run ({len(figures)} of 8 fio figures):\n" + result.describe(60))
        return 1
    device = status["usb"][0]["device"]
    print("fio in Debian's kernel (QEMU TCG) over USB/IP, one guest boot, one local unit (--uas on, write cache "
          "off, journal on)")
    print(f"drivers bound: {m.get('driver_uas')} (alternate setting 1), then {m.get('driver_bot')} "
          "(alternate setting 0, usb-storage quirk u)")
    print(f"{'job':<16} {'UAS MB/s':>9} {'IOPS':>8}   {'BOT MB/s':>9} {'IOPS':>8}   UAS/BOT")
    for name in ("rand4k", "seq64k"):
        for qd in (1, args.iodepth):
            uas, bot = figures[f"uas-{name}-qd{qd}"], figures[f"bot-{name}-qd{qd}"]
            print(f"{name} qd{qd:<8} {uas.mb_s:9.2f} {uas.iops:8.0f}   {bot.mb_s:9.2f} {bot.iops:8.0f}   "
                  f"{uas.mb_s / bot.mb_s:6.2f}")
    best = figures[f"uas-rand4k-qd{args.iodepth}"].iops / figures["bot-rand4k-qd1"].iops
    print(f"4 KiB random write, UAS at qd{args.iodepth} / Bulk-Only at qd1: {best:.2f}")
    uas = device["uas"]
    journal = status["journal"]
    records, flushes = int(journal["head_seq"]), int(journal["flushes"])
    # Bulk-Only runs one WRITE at a time (one flush each): every record beyond the flush count
    # shared a flush with another WRITE, in the UAS phase
    print(f"UAS commands {uas['commands']}, most running at once {uas['most_running']}; journal records "
          f"{records}, flushes {flushes}: {records - flushes} writes shared a flush (group commit)")
    if m.get("driver_uas") != "uas" or m.get("driver_bot") != "usb-storage":
        print("the wrong driver bound in a phase: the ratios above do not compare UAS with Bulk-Only")
        return 1
    if m.get("kernel_errors") != "0":
        print("kernel log showed trouble:\n" + "\n".join(
            ln for ln in result.output.splitlines() if ln.startswith("KERNEL-ERROR:")))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
