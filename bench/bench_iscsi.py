"""Benchmark `usbmirror local --iscsi` beside Debian's tgt on the same machine, in the same run.

Both targets serve a file of the same size in the same temporary directory: usbmirror its volume
(with its journal beside it, write cache off: every WRITE is durable when answered), tgt a
file-backed LUN (backing store rdwr). The initiator is libiscsi (`libiscsi7`, the library behind
`iscsi-test-cu`) driven through ctypes with its asynchronous API, so both targets see the same
initiator: `iscsi-perf` (libiscsi-bin) only reads and Debian's fio has no libiscsi engine.

Workloads, each for --seconds per target, rounds alternating between the targets (best kept):

    4 KiB random WRITE(16) at queue depth 1 and 16, and 128 KiB sequential WRITE(16) at queue depth 4,
    each plain and with FUA=1 (tgt's rdwr store caches plain writes in the page cache and syncs on
    FUA; usbmirror with its write cache off, the default, makes every write durable, FUA or not).
    Plain writes also go to a second usbmirror unit with `--write-cache on`, which answers them as tgt
    does (durable at the next SYNCHRONIZE CACHE or FUA write): the like-for-like comparison.

Printed: IOPS, MB/s and CPU time per command (the target process's user + system time, every thread)
for each target and the usbmirror/tgt ratio of IOPS. Nothing is asserted.

Run: .venv/bin/python bench/bench_iscsi.py [--size-mib 256] [--seconds 4] [--rounds 1] [--dir DIR]
     [--workload "4 KiB random QD16"] [--fua yes|no|both] [--write-cache off|on|both]
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import random
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLOCK = 512
INITIATOR = b"iqn.2026-01.net.usbmirror:bench-initiator"
_CB = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
POLLIN, POLLOUT = 1, 4


def _lib() -> ctypes.CDLL:
    name = ctypes.util.find_library("iscsi") or "libiscsi.so.7"
    lib = ctypes.CDLL(name)
    lib.iscsi_create_context.restype = ctypes.c_void_p
    lib.iscsi_create_context.argtypes = [ctypes.c_char_p]
    for fn in ("iscsi_set_targetname",):
        getattr(lib, fn).argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.iscsi_set_session_type.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.iscsi_set_header_digest.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.iscsi_full_connect_sync.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
    lib.iscsi_get_error.restype = ctypes.c_char_p
    lib.iscsi_get_error.argtypes = [ctypes.c_void_p]
    lib.iscsi_get_fd.argtypes = [ctypes.c_void_p]
    lib.iscsi_which_events.argtypes = [ctypes.c_void_p]
    lib.iscsi_service.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.iscsi_write16_task.restype = ctypes.c_void_p
    lib.iscsi_write16_task.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64, ctypes.c_char_p,
                                       ctypes.c_uint32, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                       ctypes.c_int, ctypes.c_int, _CB, ctypes.c_void_p]
    lib.scsi_free_scsi_task.argtypes = [ctypes.c_void_p]
    lib.iscsi_logout_sync.argtypes = [ctypes.c_void_p]
    lib.iscsi_destroy_context.argtypes = [ctypes.c_void_p]
    return lib


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of every thread of process `pid` so far (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Result:
    ops: int
    seconds: float
    nbytes: int
    cpu: float = 0.0  # CPU seconds the target process used meanwhile

    @property
    def cpu_us(self) -> float:
        """The target's CPU time per command, in microseconds."""
        return self.cpu / self.ops * 1e6 if self.ops else 0.0

    @property
    def iops(self) -> float:
        return self.ops / self.seconds

    @property
    def mbps(self) -> float:
        return self.nbytes / self.seconds / 1e6


class Session:
    """One logged-in libiscsi session that keeps `depth` WRITE(16)s in flight."""

    def __init__(self, lib: ctypes.CDLL, portal: str, iqn: str, lun: int) -> None:
        self.lib = lib
        self.ctx = lib.iscsi_create_context(INITIATOR)
        lib.iscsi_set_targetname(self.ctx, iqn.encode())
        lib.iscsi_set_session_type(self.ctx, 2)  # ISCSI_SESSION_NORMAL
        lib.iscsi_set_header_digest(self.ctx, 0)  # NONE: both targets, same framing cost
        if lib.iscsi_full_connect_sync(self.ctx, portal.encode(), lun) != 0:
            raise RuntimeError(f"login to {iqn} at {portal} failed: {lib.iscsi_get_error(self.ctx).decode()}")
        self.lun = lun
        self.in_flight = 0
        self.done = 0
        self.errors = 0
        self._cb = _CB(self._complete)

    def _complete(self, ctx: int, status: int, task: int, private: int) -> None:
        self.in_flight -= 1
        self.done += 1
        if status != 0:
            self.errors += 1
        self.lib.scsi_free_scsi_task(task)

    def run(self, *, chunk: int, depth: int, sequential: bool, fua: bool, lbas: int, seconds: float,
            pid: int) -> Result:
        data = os.urandom(chunk)
        cpu0 = cpu_seconds(pid)
        blocks = chunk // BLOCK
        rng = random.Random(7)
        nxt = 0
        self.done = self.errors = 0
        fd = self.lib.iscsi_get_fd(self.ctx)
        t0 = time.perf_counter()
        deadline = t0 + seconds
        issued = 0
        while True:
            now = time.perf_counter()
            while self.in_flight < depth and now < deadline:
                if sequential:
                    lba, nxt = nxt, (nxt + blocks) % (lbas - blocks)
                else:
                    lba = rng.randrange(lbas // blocks) * blocks
                task = self.lib.iscsi_write16_task(self.ctx, self.lun, lba, data, chunk, BLOCK, 0, 0, int(fua), 0, 0,
                                                   self._cb, None)
                if not task:
                    raise RuntimeError(self.lib.iscsi_get_error(self.ctx).decode())
                self.in_flight += 1
                issued += 1
            if self.in_flight == 0:
                break
            events = self.lib.iscsi_which_events(self.ctx)
            poller = select.poll()
            poller.register(fd, events)
            for _, revents in poller.poll(1000):
                if self.lib.iscsi_service(self.ctx, revents) < 0:
                    raise RuntimeError(self.lib.iscsi_get_error(self.ctx).decode())
        elapsed = time.perf_counter() - t0
        cpu = cpu_seconds(pid) - cpu0
        if self.errors:
            raise RuntimeError(f"{self.errors} of {self.done} writes failed")
        return Result(self.done, elapsed, self.done * chunk, cpu)

    def close(self) -> None:
        self.lib.iscsi_logout_sync(self.ctx)
        self.lib.iscsi_destroy_context(self.ctx)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_usbmirror(work: Path, size_mib: int, write_cache: bool = False) -> tuple[subprocess.Popen[bytes], str, str]:
    port = free_port()
    work = work / ("wc-on" if write_cache else "wc-off")
    work.mkdir()
    state = work / "state"
    argv = [sys.executable, "-m", "firmware.cli", "local", "--volume", str(work / "usbmirror.img"),
            "--size", f"{size_mib}M", "--iscsi", f"127.0.0.1:{port}", "--state-dir", str(state),
            "--journal", str(work / "journal"), "--journal-size", "256M",
            "--write-cache", "on" if write_cache else "off"]
    log = open(work / "usbmirror.log", "wb")  # noqa: SIM115 (kept open for the child's lifetime)
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    for _ in range(300):
        r = subprocess.run([sys.executable, "-m", "firmware.cli", "status", "--state-dir", str(state), "--json"],
                           cwd=ROOT, capture_output=True, text=True)
        if r.returncode == 0:
            st = json.loads(r.stdout)
            if st.get("iscsi"):
                return proc, f"127.0.0.1:{port}", str(st["iscsi"]["target"])
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"usbmirror local did not start: {(work / 'usbmirror.log').read_text()[-2000:]}")


class Tgt:
    IQN = "iqn.2026-01.net.usbmirror:tgt-bench"

    def __init__(self, work: Path, size_mib: int) -> None:
        lun = work / "tgt.img"
        with open(lun, "wb") as f:
            f.truncate(size_mib << 20)
        self.port, self.ctl = free_port(), 100 + free_port() % 8000
        self.proc = subprocess.Popen(["tgtd", "-f", "--control-port", str(self.ctl), "--iscsi",
                                      f"portal=127.0.0.1:{self.port}"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for args in (["--op", "new", "--mode", "target", "--tid", "1", "-T", self.IQN],
                     ["--op", "new", "--mode", "logicalunit", "--tid", "1", "--lun", "1", "-b", str(lun)],
                     ["--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL"]):
            for _ in range(50):
                r = subprocess.run(["tgtadm", "-C", str(self.ctl), "--lld", "iscsi", *args], capture_output=True,
                                   text=True)
                if r.returncode == 0:
                    break
                time.sleep(0.1)
            else:
                self.close()
                raise RuntimeError(f"tgt could not be configured: {r.stderr.strip()}")

    def close(self) -> None:
        # tgtd ignores SIGTERM while it serves targets and refuses to shut down while a target exists:
        # the target is removed (forced, its session with it), then tgtd told to shut down
        for args in (["--op", "delete", "--force", "--mode", "target", "--tid", "1"],
                     ["--op", "delete", "--mode", "system"]):
            subprocess.run(["tgtadm", "-C", str(self.ctl), "--lld", "iscsi", *args], capture_output=True)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)


WORKLOADS = [  # name, chunk, depth, sequential
    ("4 KiB random QD1", 4096, 1, False),
    ("4 KiB random QD16", 4096, 16, False),
    ("128 KiB sequential QD4", 128 * 1024, 4, True),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--dir", default=None, help="where the two files live (default: a temporary directory)")
    ap.add_argument("--workload", action="append", default=None, choices=[w[0] for w in WORKLOADS],
                    help="run only this workload (repeat for several; default: all)")
    ap.add_argument("--fua", choices=("both", "yes", "no"), default="both", help="plain writes, FUA or both")
    ap.add_argument("--write-cache", choices=("both", "off", "on"), default="both",
                    help="usbmirror's write cache for plain writes: off (durable when answered), on (as tgt: "
                    "durable at the next SYNCHRONIZE CACHE or FUA write) or both (two units); FUA rows use off")
    a = ap.parse_args()
    workloads = [w for w in WORKLOADS if a.workload is None or w[0] in a.workload]
    fuas = {"both": (False, True), "yes": (True,), "no": (False,)}[a.fua]
    if shutil.which("tgtd") is None:
        print("bench_iscsi: tgtd missing (`make setup` installs Debian's tgt)")
        return 1
    lib = _lib()
    lbas = (a.size_mib << 20) // BLOCK
    with tempfile.TemporaryDirectory(dir=a.dir, prefix="bench-iscsi-") as tmp:
        work = Path(tmp)
        wc_on = a.write_cache in ("on", "both") and False in fuas
        wc_off = a.write_cache in ("off", "both") or True in fuas
        units: dict[str, tuple[subprocess.Popen[bytes], str, str]] = {}
        tgt = None
        try:
            if wc_off:
                units["usbmirror"] = start_usbmirror(work, a.size_mib)
            if wc_on:
                units["usbmirror wc"] = start_usbmirror(work, a.size_mib, write_cache=True)
            tgt = Tgt(work, a.size_mib)
            sessions = [(who, Session(lib, portal, iqn, 0), proc.pid) for who, (proc, portal, iqn) in units.items()]
            sessions.append(("tgt", Session(lib, f"127.0.0.1:{tgt.port}", Tgt.IQN, 1), tgt.proc.pid))
            best: dict[tuple[str, bool, str], Result] = {}
            for _ in range(a.rounds):
                for name, chunk, depth, seq in workloads:
                    for fua in fuas:
                        for who, sess, pid in sessions:
                            if (who == "usbmirror wc" and fua) or (who == "usbmirror" and not fua and
                                                                  a.write_cache == "on"):
                                continue
                            r = sess.run(chunk=chunk, depth=depth, sequential=seq, fua=fua, lbas=lbas,
                                         seconds=a.seconds, pid=pid)
                            key = (name, fua, who)
                            if key not in best or r.iops > best[key].iops:
                                best[key] = r
            for _, sess, _ in sessions:
                sess.close()
        finally:
            if tgt is not None:
                tgt.close()
            for unit, _, _ in units.values():
                unit.terminate()
                try:
                    unit.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    unit.kill()
                    unit.wait()
    print(f"iSCSI writes over loopback, {a.size_mib} MiB files in one directory, libiscsi initiator, "
          f"{a.seconds:.0f} s per figure, best of {a.rounds}")
    print("(CPU: the target process's user + system time per command, all its threads, in the best round)")
    print("(write cache: usbmirror's; 'on' answers plain writes as tgt does, durable at the next SYNCHRONIZE "
          "CACHE or FUA write)")
    print(f"{'workload':<26} {'FUA':<4} {'cache':<6} {'usbmirror':>30} {'tgt':>30} {'ratio':>7}")
    for name, _, _, _ in workloads:
        for fua in fuas:
            t = best[(name, fua, "tgt")]
            for who, cache in (("usbmirror", "off"), ("usbmirror wc", "on")):
                o = best.get((name, fua, who))
                if o is None:
                    continue
                print(f"{name:<26} {'yes' if fua else 'no':<4} {cache:<6} {o.iops:>8.0f} IOPS {o.mbps:>6.1f} MB/s "
                      f"{o.cpu_us:>4.0f} us {t.iops:>8.0f} IOPS {t.mbps:>6.1f} MB/s {t.cpu_us:>4.0f} us "
                      f"{o.iops / t.iops:>7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
