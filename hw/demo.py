"""`make demo`: a local unit and a remote unit on this machine, a real Linux kernel writing to the disk.

1. `usbmirror pair` makes a CA and certificates; a remote unit (`usbmirror remote`) and a local unit
   (`usbmirror local`, USB/IP on loopback, mirroring to the remote over TLS) start as processes.
2. Debian's stock kernel boots in QEMU, attaches the disk with `usbip attach`, partitions it, makes an
   ext4 file system, writes files and runs fio with verification, then detaches.
3. The demo waits until the remote has applied everything, asks `usbmirror verify`, stops both units
   and compares the local volume with the remote target byte for byte.

Everything lives under `.cache/demo/` and listens on 127.0.0.1 only.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / ".cache" / "demo"
SIZE = "256M"

GUEST_SCRIPT = r"""
set -e
mark phase=attach
usbip_attach 1-1 || die "usbip attach failed"
dev=$(wait_disk 30) || die "no disk appeared"
mark disk=$dev
echo "== the host sees:"; sg_inq /dev/$dev | sed -n '1,12p'
sg_readcap -l /dev/$dev | sed -n '1,4p'
echo "== partition (GPT) and format ext4"
printf 'label: gpt\n,,L\n' | sfdisk -q /dev/$dev
sleep 0.5
[ -b /dev/${dev}1 ] || mdev -s
mkfs.ext4 -q -F -L mirrored /dev/${dev}1
mkdir -p /mnt/m && mount /dev/${dev}1 /mnt/m
echo "== writing a workload: files, a tree and fio with verification"
dd if=/dev/urandom of=/mnt/m/random.bin bs=1M count=24 2>/dev/null
cp -a /bin /mnt/m/tree-bin 2>/dev/null || true
cp -a /lib/modules /mnt/m/tree-modules 2>/dev/null || true
fio --name=demo --filename=/mnt/m/fio.dat --size=4M --bs=4k --rw=randwrite --direct=1 \
    --verify=crc32c --do_verify=1 --ioengine=psync --minimal >/tmp/fio.out || die "fio verify failed"
mark fio_write_iops=$(cut -d';' -f49 /tmp/fio.out)
sync
(cd /mnt/m && sha256sum random.bin > /tmp/sums && cat /tmp/sums)
mark files=$(find /mnt/m -type f | wc -l)
mark used_kib=$(df -k /mnt/m | awk 'NR==2{print $3}')
echo 3 > /proc/sys/vm/drop_caches
(cd /mnt/m && sha256sum -c /tmp/sums) || die "read-back mismatch"
umount /mnt/m
e2fsck -f -n /dev/${dev}1 >/tmp/fsck.out 2>&1 || { cat /tmp/fsck.out; die "e2fsck found errors"; }
mark fsck=clean
usbip detach -p 0 >/dev/null 2>&1 || true
mark phase=done
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def usbmirror(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "firmware.cli", *args], cwd=REPO, text=True,
                          capture_output=True, **kw)


def status(state_dir: Path) -> dict[str, Any]:
    r = usbmirror("status", "--state-dir", str(state_dir), "--json", timeout=30)
    if r.returncode != 0:
        raise RuntimeError(r.stderr.strip())
    out: dict[str, Any] = json.loads(r.stdout)
    return out


def wait_for(pred: Any, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if pred():
                return
        except (RuntimeError, ValueError, KeyError):
            pass
        time.sleep(0.3)
    raise RuntimeError(f"timed out waiting for {what}")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main() -> int:
    from rich.console import Console
    from rich.table import Table

    from hw.qemu.guest import run_guest

    con = Console()
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    con.rule("[bold]usbmirror demo")
    con.print("building/loading the guest image (first run downloads Debian's kernel and tools) ...")
    from hw.qemu.build_guest import GuestBuilder

    GuestBuilder().build()
    usbmirror("pair", str(WORK / "tls"), "--remote", "dr1", "--source", "server1", check=True)
    rport, uport = free_port(), free_port()
    logs = {n: open(WORK / f"{n}.log", "w") for n in ("remote", "local")}  # noqa: SIM115
    procs: dict[str, subprocess.Popen[str]] = {}
    try:
        procs["remote"] = subprocess.Popen(
            [sys.executable, "-m", "firmware.cli", "remote", "--listen", f"127.0.0.1:{rport}", "--name", "dr1",
             "--tls-dir", str(WORK / "tls"), "--target", f"server1={WORK / 'remote-target.img'}",
             "--state-dir", str(WORK / "remote-state")],
            cwd=REPO, stdout=logs["remote"], stderr=subprocess.STDOUT, text=True)
        procs["local"] = subprocess.Popen(
            [sys.executable, "-m", "firmware.cli", "local", "--volume", str(WORK / "local-volume.img"),
             "--size", SIZE, "--journal", str(WORK / "journal"), "--journal-size", "128M",
             "--usbip", f"127.0.0.1:{uport}", "--state-dir", str(WORK / "local-state"),
             "--source-id", "server1", "--tls-dir", str(WORK / "tls"), "--remote", f"127.0.0.1:{rport}"],
            cwd=REPO, stdout=logs["local"], stderr=subprocess.STDOUT, text=True)
        wait_for(lambda: status(WORK / "local-state")["remotes"][0]["state"] == "streaming", 60,
                 "the local unit to connect to the remote")
        con.print(f"local unit: USB/IP on 127.0.0.1:{uport}, mirroring to the remote unit on 127.0.0.1:{rport} (TLS)")
        con.rule("guest (Debian's kernel in QEMU) using the disk")
        t0 = time.monotonic()
        res = run_guest(GUEST_SCRIPT, usbip_port=uport, timeout=600)
        for line in res.output.splitlines():
            if not line.startswith("@@") and line.strip():
                con.print("  [dim]guest[/] " + line, highlight=False)
        if res.rc != 0:
            con.print(f"[red]guest workload failed[/]\n{res.describe()}")
            return 1
        guest_s = time.monotonic() - t0
        con.rule("replication")
        st = status(WORK / "local-state")
        head = st["journal"]["durable_seq"]
        wait_for(lambda: status(WORK / "local-state")["remotes"][0]["acked_seq"] >= head, 300,
                 "the remote to apply every record")
        st = status(WORK / "local-state")
        rv = usbmirror("verify", "--state-dir", str(WORK / "local-state"), timeout=600)
        con.print(rv.stdout.strip())
    finally:
        for p in procs.values():
            p.terminate()
        for p in procs.values():
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        for f in logs.values():
            f.close()
    local_sum = sha256(WORK / "local-volume.img")
    remote_sum = sha256(WORK / "remote-target.img")
    t = Table(title="usbmirror demo result")
    t.add_column("what")
    t.add_column("value")
    t.add_row("guest workload", f"{res.markers.get('files', '?')} files, {res.markers.get('used_kib', '?')} KiB used, "
              f"fio 4 KiB random write + verify {res.markers.get('fio_write_iops', '?')} IOPS, "
              f"e2fsck {res.markers.get('fsck', '?')} ({guest_s:.0f} s)")
    j = st["journal"]
    t.add_row("journal", f"{j['durable_seq']} records, head seq {j['head_seq']}, tail seq {j['tail_seq']}")
    r0 = st["remotes"][0]
    t.add_row("remote", f"{r0['address']} {r0['state']} mode {r0['mode']} acked seq {r0['acked_seq']} lag {r0['lag_bytes']} B")
    t.add_row("usbmirror verify", "MATCH" if rv.returncode == 0 else f"DIFFER (exit {rv.returncode})")
    t.add_row("local volume sha256", local_sum[:32] + "...")
    t.add_row("remote target sha256", remote_sum[:32] + "...")
    same = local_sum == remote_sum and rv.returncode == 0
    t.add_row("remote copy", "[green]identical to the local volume[/]" if same else "[red]DIFFERENT[/]")
    con.print(t)
    con.print(f"logs: {WORK}/local.log, {WORK}/remote.log")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
