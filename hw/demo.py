"""`make demo`: a local unit and a remote unit on this machine, a real Linux kernel writing to the disk.

1. `usbmirror pair` makes a CA and certificates; a remote unit (`usbmirror remote`) and a local unit
   (`usbmirror local`, USB/IP on loopback, mirroring to the remote over TLS) start as processes.
2. Debian's stock kernel boots in QEMU, attaches the disk with `usbip attach`, partitions it, makes an
   ext4 file system, copies a tree of files, runs fio with verification, reads everything back after
   dropping its caches, checks the file system, then detaches (`hw/qemu/demo_guest.py`).
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

    from hw.qemu.demo_guest import run_demo_guest, summary

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
        res = run_demo_guest(uport, timeout=600)
        for line in summary(res).splitlines():
            con.print("  [dim]guest[/] " + line, highlight=False)
        if res.rc != 0 or res.markers.get("done") != "1":
            con.print("[red]the guest workload failed[/]")
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
    t.add_row("guest workload", f"GPT + ext4, a tree of files, fio 4 KiB random writes with verify, e2fsck "
              f"({guest_s:.0f} s)")
    j = st["journal"]
    t.add_row("journal", f"{j['durable_seq']} records, head seq {j['head_seq']}, tail seq {j['tail_seq']}")
    r0 = st["remotes"][0]
    t.add_row("remote", f"{r0['address']} {r0['state']} mode {r0['mode']} acked seq {r0['acked_seq']} "
              f"lag {r0['lag_bytes']} B")
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
