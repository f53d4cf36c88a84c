"""Runs a shell script inside Debian's stock kernel booted in QEMU (TCG), the real USB host of the tests.

The guest reaches exactly one address, ``10.0.2.100:3240``, which QEMU user networking
(``restrict=on``) hands to ``hw/qemu/relay.py``, connected to ``127.0.0.1:<usbip_port>`` on this
machine. The script runs as root under busybox ``sh`` with the USB/IP, usb-storage, sd/sg, ext4 and
vfat drivers loaded and ``usb-storage delay_use=0``. Helper functions available to the script:

* ``mark KEY=VALUE ...`` -- print a marker line; the runner returns them in ``GuestResult.markers``;
* ``step NAME`` -- mark ``step=NAME`` (the last step reached) and print ``=== NAME at <uptime> s``;
* ``usbip_attach BUSID`` -- ``usbip attach -r 10.0.2.100 -b BUSID``;
* ``wait_disk [SECONDS]`` -- wait until a SCSI disk appears, then print its name (``sda``);
* ``die MESSAGE`` -- print a failure marker and exit 1;
* ``check_kernel_log`` -- print kernel log lines that show trouble with a disk (I/O errors, SCSI
  errors, USB resets, file-system errors) as ``KERNEL-ERROR:`` lines and mark ``kernel_errors=N``.

busybox ``sh`` runs its own applets first: call util-linux tools that busybox also has (blkdiscard,
blockdev, ...) by full path (``/sbin/blkdiscard``).

Use :func:`run_guest`; ``python -m hw.qemu.guest SCRIPT`` runs a script file by hand.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from hw.qemu.build_guest import USBIP_ADDR, GuestBuilder, GuestImage, script_layer, source_layer

RELAY = Path(__file__).with_name("relay.py")
MARKER = "@@USBMIRROR"
EXIT_RE = re.compile(r"^@@USBMIRROR-EXIT rc=(\d+)\s*$", re.M)

KERNEL_TROUBLE = ("i/o error|reset (low|full|high|super)[a-z+ -]*usb device|failed result|timing out"
                  "|sense key|offline|rejecting i/o|ext4-fs error|fat-fs .*error|critical (medium|target)"
                  "|device descriptor read|unable to enumerate")
GUEST_FUNCTIONS = f"""\
mark() {{ echo "{MARKER} $*"; }}
die() {{ echo "{MARKER} failed=$*"; exit 1; }}
step() {{ mark step=$1; echo "=== $1 at $(cut -d' ' -f1 /proc/uptime) s"; }}
usbip_attach() {{ usbip attach -r {USBIP_ADDR} -b "$1"; }}
check_kernel_log() {{
    dmesg | grep -iE "{KERNEL_TROUBLE}" > /tmp/kernel-errors
    sed 's/^/KERNEL-ERROR: /' /tmp/kernel-errors
    mark kernel_errors=$(wc -l < /tmp/kernel-errors)
}}
reattach_after_restart() {{
    # detach the disk $1 of a unit that was killed, wait until the kernel drops it, then attach the
    # restarted unit, retrying for $2 half-seconds while it starts again
    usbip detach -p 0 >/dev/null 2>&1 || true
    n=0; while [ -e /sys/block/$1 ] && [ $n -lt 300 ]; do sleep 0.1; n=$((n + 1)); done
    [ -e /sys/block/$1 ] && die old_disk_still_present
    n=0
    until usbip attach -r {USBIP_ADDR} -b 1-1 >/dev/null 2>&1; do
        n=$((n + 1)); [ $n -gt $2 ] && die reattach_after_restart
        sleep 0.5
    done
}}
wait_disk() {{
    # a disk re-attached under its old name can be left without its /dev node (devtmpfs drops the
    # node of the old disk, same device number, after the new one made it): made again from sysfs
    limit=$(( ${{1:-20}} * 10 )); n=0
    while [ $n -lt $limit ]; do
        for d in /sys/block/sd*; do
            [ -e "$d" ] || continue
            [ -b "/dev/${{d##*/}}" ] && {{ echo "${{d##*/}}"; return 0; }}
            [ $n -ge 20 ] && [ -r "$d/dev" ] && mknod "/dev/${{d##*/}}" b $(tr ':' ' ' < "$d/dev") 2>/dev/null \
                && echo "wait_disk: /dev/${{d##*/}} was missing, made from $d/dev" >&2
        done
        n=$((n + 1)); sleep 0.1
    done
    return 1
}}
"""


class GuestError(RuntimeError):
    """QEMU is missing or could not be started."""


@dataclass(frozen=True)
class GuestResult:
    rc: int | None          # the script's exit status; None if the guest never reported one
    output: str             # everything the guest printed on its console
    markers: dict[str, str] = field(default_factory=dict)
    timed_out: bool = False
    wall: float = 0.0       # seconds from QEMU start to exit

    def describe(self, tail: int = 120) -> str:
        """A failure message: status plus the last lines of the guest console."""
        lines = self.output.splitlines()[-tail:]
        state = "timed out" if self.timed_out else f"rc={self.rc}"
        return f"guest {state} after {self.wall:.1f}s; console (last {len(lines)} lines):\n" + "\n".join(lines)


def qemu_binary() -> str:
    found = shutil.which("qemu-system-x86_64")
    if found is None:
        raise GuestError("qemu-system-x86_64 not found: apt-get install -y qemu-system-x86")
    return found


def parse_markers(output: str) -> dict[str, str]:
    markers: dict[str, str] = {}
    for line in output.splitlines():
        if not line.startswith(MARKER + " "):
            continue
        for token in line[len(MARKER) + 1:].split(" "):
            key, sep, value = token.partition("=")
            if sep:
                markers[key] = value
            elif key:
                markers[key] = ""
    return markers


def qemu_command(image: GuestImage, initrd: Path, usbip_port: int | None, *, memory: int = 512) -> list[str]:
    netdev = "user,id=n0,restrict=on"
    if usbip_port is not None:
        relay = f"{sys.executable} -I -S {RELAY} {int(usbip_port)}"
        if "," in relay:
            raise GuestError(f"relay command must not contain commas: {relay}")
        netdev += f",guestfwd=tcp:{USBIP_ADDR}:3240-cmd:{relay}"
    return [
        qemu_binary(), "-accel", "tcg", "-cpu", "max", "-machine", "pc", "-m", str(memory),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-serial", "stdio",
        "-kernel", str(image.vmlinux), "-initrd", str(initrd),
        "-append", "console=ttyS0 panic=-1 rdinit=/init quiet",
        "-netdev", netdev, "-device", "virtio-net-pci,netdev=n0,romfile=",
    ]


def run_guest(script: str, *, usbip_port: int | None, python_layer: bool = False, timeout: float,
              extra_files: dict[str, bytes] | None = None, memory: int = 512,
              image: GuestImage | None = None) -> GuestResult:
    """Boot the guest, run ``script`` (busybox sh) in it, and return its status and console output.

    ``extra_files`` maps absolute guest paths to contents. ``python_layer`` adds Debian's Python 3.11,
    the gadget-side kernel modules and the project's sources under /opt/usbmirror (on PYTHONPATH).
    QEMU is killed after ``timeout`` seconds (``GuestResult.timed_out``).
    """
    image = image or GuestBuilder().build(python=python_layer)
    with tempfile.TemporaryDirectory(prefix="usbmirror-guest-") as tmp:
        initrd = Path(tmp) / "initrd.cpio"
        with open(initrd, "wb") as out:
            layers = [image.base_initrd]
            if python_layer:
                if image.python_initrd is None:
                    raise GuestError("python layer requested but not built")
                layers.append(image.python_initrd)
            for layer in layers:
                with open(layer, "rb") as src:
                    shutil.copyfileobj(src, out, 1 << 20)
            if python_layer:
                out.write(source_layer())
            out.write(script_layer(GUEST_FUNCTIONS + script, extra_files))
        cmd = qemu_command(image, initrd, usbip_port, memory=memory)
        return _run(cmd, timeout)


def _run(cmd: list[str], timeout: float) -> GuestResult:
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    chunks: list[bytes] = []

    def reader() -> None:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        _kill_group(proc)
        thread.join(5)
    output = b"".join(chunks).decode(errors="replace").replace("\r\n", "\n").replace("\r", "")
    keep = os.environ.get("USBMIRROR_GUEST_LOG")  # a directory: every guest's console is kept there
    if keep:
        with contextlib.suppress(OSError):
            os.makedirs(keep, exist_ok=True)
            name = f"guest-{time.strftime('%H%M%S')}-{proc.pid}.log"
            with open(os.path.join(keep, name), "w") as fh:
                fh.write(output)
    match = EXIT_RE.search(output)
    return GuestResult(rc=int(match.group(1)) if match else None, output=output,
                       markers=parse_markers(output), timed_out=timed_out, wall=time.monotonic() - start)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """Stop QEMU and the relays it started (they share its process group)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="run a shell script in the QEMU guest")
    parser.add_argument("script", help="script file (busybox sh); '-' for stdin")
    parser.add_argument("--usbip-port", type=int, help="loopback port of a USB/IP server to reach")
    parser.add_argument("--python", action="store_true", help="add the Python + gadget layer")
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args(argv)
    text = sys.stdin.read() if args.script == "-" else Path(args.script).read_text()
    result = run_guest(text, usbip_port=args.usbip_port, python_layer=args.python, timeout=args.timeout)
    sys.stdout.write(result.output)
    print(f"\n[guest rc={result.rc} timed_out={result.timed_out} wall={result.wall:.1f}s]", file=sys.stderr)
    return 0 if result.rc == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
