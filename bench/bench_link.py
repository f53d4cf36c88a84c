"""Journey link benchmark: replication on loopback and through a shaped WAN link.

1. Loopback: sustained sequential writes into the real journal + LocalUnit at the journal's full
   durable rate (write cache off, 1 MiB writes), replicated over TLS to a remote unit on this machine.
   Prints the local write rate, the replication rate and lag samples (records, bytes, seconds): the lag
   must stay bounded while the writer runs, and drain to zero after.
2. Sync: one 4 KiB WRITE at a time with a `sync` remote on loopback (each waits for the remote's
   durable ACK): the time per WRITE (median, p90, p99) as a ratio of the same WRITE with no remote.
3. WAN: 100 Mbit/s with an 80 ms round trip, shaped two ways (there is no netem here): a userspace
   proxy (token bucket plus delay line; the rate counts TCP payload bytes), and, as root, kernel TBF
   on a veth into a network namespace holding the remote (the rate counts whole packets, so TCP/IP
   headers take ~4% of it) plus the proxy as a delay-only line. A raw TCP stream over the same path
   gives the link's own limit in this run. Prints the payload throughput of incompressible records
   as a ratio of the link rate (target >= 0.90) and of the raw stream, then of compressible records
   (lz4): faster than the link. The headline figure is the whole run from reconnect (TLS handshake
   and TCP slow start included); the 10-90% window is coarser (ACKs arrive per batch).

Run: `python bench/bench_link.py [--quick]`. Nothing is asserted; the figures are for people.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import random
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from firmware.journal import Journal
from firmware.local_unit import LocalUnit
from firmware.pairing import TlsFiles, pair
from firmware.replicator import RemoteSpec, Replicator, ReplicatorTuning
from firmware.volume import Volume

MiB = 1 << 20
BS = 4096
LINK_BPS = 100_000_000 / 8  # 100 Mbit/s in bytes/s
ONE_WAY_DELAY = 0.040


class ShapingProxy:
    """Userspace WAN emulation: per direction a token-bucket bottleneck (serialisation at `rate`
    bytes/s) with a bounded queue, then a fixed delay line. Backpressure: the reader stops reading
    while the bottleneck queue holds more than `queue_s` seconds of data, so TCP flow control works
    end to end as it would through a router."""

    def __init__(self, target: tuple[str, int], rate: float, delay: float, queue_s: float = 0.1) -> None:
        self.target, self.rate, self.delay, self.queue_s = target, rate, delay, queue_s
        self.ls = socket.create_server(("127.0.0.1", 0))
        self.ls.settimeout(0.2)
        self.port = self.ls.getsockname()[1]
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self._spawn(self._accept)

    def _spawn(self, fn: object, *args: object) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)  # type: ignore[arg-type]
        t.start()
        self.threads.append(t)

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                c, _ = self.ls.accept()
            except OSError:
                continue
            s = socket.create_connection(self.target)
            for sock in (c, s):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._direction(c, s, self.rate)
            self._direction(s, c, self.rate)

    def _direction(self, src: socket.socket, dst: socket.socket, rate: float) -> None:
        line: deque[tuple[float, bytes]] = deque()
        cond = threading.Condition()
        state = {"busy_until": 0.0, "eof": False}

        def reader() -> None:
            try:
                while not self.stop.is_set():
                    now = time.monotonic()
                    backlog = state["busy_until"] - now
                    if backlog > self.queue_s:
                        time.sleep(backlog - self.queue_s)
                        continue
                    r, _, _ = select.select([src], [], [], 0.2)
                    if not r:
                        continue
                    data = src.recv(16384)
                    if not data:
                        break
                    now = time.monotonic()
                    depart = max(now, state["busy_until"]) + len(data) / rate
                    state["busy_until"] = depart
                    with cond:
                        line.append((depart + self.delay, data))
                        cond.notify()
            except OSError:
                pass
            with cond:
                state["eof"] = True
                cond.notify()

        def writer() -> None:
            try:
                while not self.stop.is_set():
                    with cond:
                        while not line and not state["eof"] and not self.stop.is_set():
                            cond.wait(0.2)
                        if not line:
                            if state["eof"]:
                                break
                            continue
                        at, data = line[0]
                    wait = at - time.monotonic()
                    if wait > 0:
                        time.sleep(wait)
                    with cond:
                        line.popleft()
                    dst.sendall(data)
            except OSError:
                pass
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

        self._spawn(reader)
        self._spawn(writer)

    def close(self) -> None:
        self.stop.set()
        self.ls.close()


class TbfNamespace:
    """Kernel shaping: the remote's side of a veth pair lives in a network namespace; the host end
    has a TBF qdisc at the link rate (source -> remote), the delay comes from a delay-only proxy."""

    def __init__(self, rate_mbit: int) -> None:
        self.name = f"umb{random.randrange(1 << 20):05x}"
        self.host_if, self.ns_if = f"{self.name}h", f"{self.name}n"
        self.host_ip, self.ns_ip = "10.232.7.1", "10.232.7.2"
        cmds = [["ip", "netns", "add", self.name],
                ["ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if],
                ["ip", "link", "set", self.ns_if, "netns", self.name],
                ["ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_if],
                ["ip", "link", "set", self.host_if, "up"],
                ["ip", "netns", "exec", self.name, "ip", "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if],
                ["ip", "netns", "exec", self.name, "ip", "link", "set", self.ns_if, "up"],
                ["ip", "netns", "exec", self.name, "ip", "link", "set", "lo", "up"],
                ["tc", "qdisc", "add", "dev", self.host_if, "root", "tbf", "rate", f"{rate_mbit}mbit",
                 "burst", "64kb", "latency", "200ms"]]
        try:
            for c in cmds:
                subprocess.run(c, check=True, capture_output=True)
        except (subprocess.CalledProcessError, FileNotFoundError):
            self.close()
            raise

    def close(self) -> None:
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


_SINK = """
import socket, sys, time
ls = socket.create_server((sys.argv[1], 0))
print(ls.getsockname()[1], flush=True)
c, _ = ls.accept()
n, t0, t1 = 0, 0.0, 0.0
while True:
    d = c.recv(1 << 16)
    if not d:
        break
    if not t0:
        t0 = time.monotonic()
    n += len(d)
    t1 = time.monotonic()
print(n / max(1e-9, t1 - t0), flush=True)
"""


def raw_rate_through(host: str, netns: str | None, delay: float,
                     rate: float) -> float:
    """Bytes/s of a plain TCP bulk stream through the same path (proxy, and TBF if any)."""
    prefix = ["ip", "netns", "exec", netns] if netns else []
    sink = subprocess.Popen([*prefix, sys.executable, "-c", _SINK, host], stdout=subprocess.PIPE, text=True)
    assert sink.stdout is not None
    port = int(sink.stdout.readline())
    proxy = ShapingProxy((host, port), rate, delay)
    c = socket.create_connection(("127.0.0.1", proxy.port))
    blob = bytes(1 << 16)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 4.0:
        c.sendall(blob)
    c.close()
    out = float(sink.stdout.readline())
    sink.wait(timeout=30)
    proxy.close()
    return out


_REMOTE_MAIN = """
import sys, logging
sys.path.insert(0, sys.argv[1])
from firmware.remote_unit import RemoteUnit, RemoteUnitConfig
logging.basicConfig(level=logging.ERROR)
tmp = sys.argv[2]
ru = RemoteUnit(RemoteUnitConfig((sys.argv[3], 0), "r1", {"lmu": tmp + "/target.img"}, tmp + "/tls",
                                 tmp + "/rstate"))
ru.start()
print(ru.port, flush=True)
sys.stdin.read()
ru.stop()
"""


class RemoteProcess:
    """The remote unit in its own process (on a real installation it is another board)."""

    def __init__(self, tmp: Path, host: str = "127.0.0.1", netns: str | None = None) -> None:
        prefix = ["ip", "netns", "exec", netns] if netns else []
        self.host = host
        self.proc = subprocess.Popen([*prefix, sys.executable, "-c", _REMOTE_MAIN,
                                      str(Path(__file__).resolve().parent.parent), str(tmp), host],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Site:
    """A local unit (real journal + LocalUnit) in this process and a remote unit in another."""

    def __init__(self, tmp: Path, vol_size: int, journal_size: int, host: str = "127.0.0.1",
                 netns: str | None = None) -> None:
        self.tmp = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        pair(tmp / "tls", "r1", ["lmu"])
        self.remote = RemoteProcess(tmp, host, netns)
        self.vol = Volume(tmp / "local.img", size=vol_size, block_size=BS)
        self.journal = Journal.open(tmp / "journal", size=journal_size, unit_uuid=uuid.uuid4(), block_size=BS)
        self.unit = LocalUnit(self.vol, self.journal, bitmap_path=str(tmp / "dirty"))
        self.rep: Replicator | None = None

    def start_rep(self, port: int, tuning: ReplicatorTuning | None = None, mode: str = "async") -> Replicator:
        self.rep = Replicator(self.unit, self.journal, source_id="lmu",
                              remotes=[RemoteSpec(("127.0.0.1", port), mode, "r1")],
                              tls=TlsFiles.for_source(self.tmp / "tls", "lmu"), tuning=tuning)
        self.rep.start()
        return self.rep

    def stop_rep(self) -> None:
        if self.rep:
            self.rep.close()
            self.rep = None

    def wait_streaming(self, timeout: float = 120) -> None:
        assert self.rep is not None
        deadline = time.monotonic() + timeout
        while self.rep.links[0].state.name != "STREAMING":
            if time.monotonic() > deadline:
                raise RuntimeError(f"link not up: {self.rep.status()}")
            time.sleep(0.05)

    def wait_drained(self, timeout: float = 600) -> None:
        assert self.rep is not None
        if not self.rep.wait_drained(timeout):
            raise RuntimeError(f"not drained: {self.rep.status()}")

    def close(self) -> None:
        self.stop_rep()
        self.unit.close()
        self.journal.close()
        self.vol.close()
        self.remote.stop()


def incompressible(n: int, rng: random.Random) -> bytes:
    return rng.randbytes(n)


def compressible(n: int, rng: random.Random) -> bytes:
    """Log-like text: lz4 shrinks it about 4-6x."""
    words = [b"GET", b"POST", b"/api/v1/items", b"200", b"404", b"user=", b"session=", b"latency_ms=", b"OK"]
    out = bytearray()
    while len(out) < n:
        out += b"2026-11-25T10:%02d:%02d " % (rng.randrange(60), rng.randrange(60))
        out += b" ".join(rng.choice(words) for _ in range(6)) + b" %d\n" % rng.randrange(100000)
    return bytes(out[:n])


def loopback(tmp: Path, seconds: float, tuning: ReplicatorTuning | None = None) -> None:
    print("\n== loopback: sustained sequential writes, replication over TLS on 127.0.0.1 ==")
    site = Site(tmp, vol_size=1024 * MiB, journal_size=256 * MiB)
    try:
        rng = random.Random(1)
        chunk = incompressible(MiB, rng)
        # the journal's own durable rate in this run, before any remote is registered
        t0 = time.monotonic()
        alone = 0
        while time.monotonic() - t0 < min(3.0, seconds):
            site.unit.write((alone // BS) % (site.unit.num_blocks - MiB // BS), chunk)
            alone += len(chunk)
        rate_alone = alone / (time.monotonic() - t0)
        print(f"local durable write rate, no remote: {rate_alone / 1e6:8.1f} MB/s")
        site.start_rep(site.remote.port, tuning)
        site.wait_streaming()
        rep = site.rep
        assert rep is not None
        samples: list[tuple[float, int, int, float]] = []
        stop = threading.Event()

        def sampler() -> None:
            while not stop.is_set():
                st = rep.status()["remotes"][0]
                samples.append((time.monotonic(), st["lag_records"], st["lag_bytes"], st["lag_seconds"]))
                time.sleep(0.25)

        th = threading.Thread(target=sampler, daemon=True)
        th.start()
        acked0 = rep.links[0].bytes_acked
        t0 = time.monotonic()
        written = 0
        lba = 0
        nblocks = site.unit.num_blocks
        while time.monotonic() - t0 < seconds:
            site.unit.write(lba, chunk)
            written += len(chunk)
            lba = (lba + MiB // BS) % (nblocks - MiB // BS)
        t_write = time.monotonic() - t0
        site.wait_drained()
        t_all = time.monotonic() - t0
        stop.set()
        th.join()
        shipped = rep.links[0].bytes_acked - acked0
        lag_r = [s[1] for s in samples]
        lag_b = [s[2] for s in samples]
        lag_s = [s[3] for s in samples]
        print(f"local durable write rate : {written / t_write / 1e6:8.1f} MB/s ({written / MiB:.0f} MiB in "
              f"{t_write:.1f} s, write cache off, 1 MiB writes)")
        print(f"replicated (acked) rate  : {shipped / t_all / 1e6:8.1f} MB/s over {t_all:.1f} s "
              f"(ratio to the local rate {shipped / t_all / (written / t_write):.2f}, to the rate with no "
              f"remote {shipped / t_all / rate_alone:.2f})")
        print(f"drain after the writer stopped: {t_all - t_write:.2f} s")
        print(f"lag while writing        : records max {max(lag_r)} avg {sum(lag_r) / len(lag_r):.1f}; "
              f"bytes max {max(lag_b) / MiB:.1f} MiB avg {sum(lag_b) / len(lag_b) / MiB:.1f} MiB; "
              f"seconds max {max(lag_s):.2f}")
        fill = site.journal.used_bytes / site.journal.capacity_bytes
        js: dict[str, Any] = dict(site.unit.status().get("journal") or {})  # type: ignore[call-overload]
        print(f"journal: fill at the end {fill:.0%}, overflow events {js.get('overflow_events', 0)}, "
              f"throttled acks {js.get('throttle', {}).get('throttled_acks', 0)} (the journal bounds the lag)")
    finally:
        site.close()


def sync_latency(tmp: Path, writes: int) -> None:
    """One 4 KiB WRITE at a time (write cache off) with a `sync` remote on loopback: each returns once
    the remote has it durable, so the time per WRITE is the whole path of one WRITE, thread hand-offs
    included. The raw limit is the same WRITE with no remote (the local journal's durable append)."""
    print("\n== sync remote on loopback: one 4 KiB WRITE at a time, the remote's durable ACK each ==")
    site = Site(tmp, vol_size=64 * MiB, journal_size=64 * MiB)
    try:
        rng = random.Random(2)
        block = incompressible(BS, rng)
        nblocks = site.unit.num_blocks

        def timed(n: int) -> list[float]:
            out = []
            for _ in range(n):
                lba = rng.randrange(nblocks)
                t0 = time.perf_counter()
                site.unit.write(lba, block)
                out.append(time.perf_counter() - t0)
            return sorted(out)

        timed(max(1, writes // 10))  # warm up
        alone = timed(writes)
        site.start_rep(site.remote.port, mode="sync")
        site.wait_streaming()
        timed(max(1, writes // 10))
        synced = timed(writes)

        def pct(xs: list[float], q: float) -> float:
            return xs[min(len(xs) - 1, int(q * len(xs)))]

        for name, q in (("median", 0.5), ("p90", 0.9), ("p99", 0.99)):
            a, b = pct(alone, q), pct(synced, q)
            print(f"{name:6} per WRITE: {b * 1e3:7.3f} ms with the sync remote, {a * 1e3:7.3f} ms with no remote "
                  f"(ratio {b / a:.2f}) over {writes} writes")
    finally:
        site.close()


def wan(tmp: Path, megabytes: int, shaper: str) -> None:
    ns: TbfNamespace | None = None
    if shaper == "tbf":
        try:
            ns = TbfNamespace(int(LINK_BPS * 8 / 1e6))
        except (subprocess.CalledProcessError, FileNotFoundError) as exc:
            print(f"TBF in a network namespace is not available here ({exc}); using the userspace shaper")
    host = ns.ns_ip if ns else "127.0.0.1"
    netns = ns.name if ns else None
    rate = 1e12 if ns else LINK_BPS  # with TBF the proxy only delays
    how = "kernel TBF on a veth into a network namespace + userspace delay line" if ns else \
        "userspace token bucket + delay line"
    print(f"\n== WAN: {LINK_BPS * 8 / 1e6:.0f} Mbit/s, {ONE_WAY_DELAY * 2000:.0f} ms RTT ({how}) ==")
    try:
        raw = raw_rate_through(host, netns, ONE_WAY_DELAY, rate)
        print(f"raw TCP stream through the same path: {raw * 8 / 1e6:6.1f} Mbit/s "
              f"({raw / LINK_BPS:.3f} of the nominal link rate)")
        _wan_runs(tmp, megabytes, raw, host, netns, rate)
    finally:
        if ns is not None:
            ns.close()


def _wan_runs(tmp: Path, megabytes: int, raw: float, host: str, netns: str | None, rate: float) -> None:
    site = Site(tmp, vol_size=(megabytes * 2 + 64) * MiB, journal_size=(megabytes * 2 + 64) * MiB, host=host,
                netns=netns)
    proxy = ShapingProxy((host, site.remote.port), rate, ONE_WAY_DELAY)
    try:
        tuning = ReplicatorTuning()
        site.start_rep(proxy.port, tuning)
        site.wait_streaming()  # initial sync of the (empty) volume: digests only
        rng = random.Random(2)
        for label, gen, base in (("incompressible", incompressible, 0), ("compressible (lz4)", compressible,
                                                                          megabytes * MiB)):
            site.stop_rep()
            # the backlog builds while the link is down, then is shipped at the link's pace
            for i in range(megabytes):
                site.unit.write((base + i * MiB) // BS, gen(MiB, rng))
            rep = site.start_rep(proxy.port, tuning)
            link = rep.links[0]
            target = site.journal.durable_seq
            total = megabytes * MiB
            marks: list[tuple[float, int]] = []
            t0 = time.monotonic()
            while link.acked_seq < target:
                marks.append((time.monotonic(), link.bytes_acked))
                time.sleep(0.05)
            t_all = time.monotonic() - t0
            marks.append((time.monotonic(), link.bytes_acked))
            lo = next(m for m in marks if m[1] >= 0.1 * total)
            hi = next(m for m in marks if m[1] >= 0.9 * total)
            steady = (hi[1] - lo[1]) / max(1e-9, hi[0] - lo[0])
            whole = total / t_all
            print(f"{label:20s}: {total / MiB:.0f} MiB of payload in {t_all:.2f} s from reconnect = "
                  f"{whole * 8 / 1e6:6.1f} Mbit/s = {whole / LINK_BPS:.2f} x link rate ({whole / raw:.2f} x the "
                  f"raw stream); 10-90% window {steady / LINK_BPS:.2f} x link rate")
    finally:
        site.stop_rep()
        proxy.close()
        site.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="shorter runs")
    ap.add_argument("--seconds", type=float, default=None, help="loopback writer duration")
    ap.add_argument("--wan-mib", type=int, default=None, help="MiB shipped per WAN run")
    ap.add_argument("--only", choices=["loopback", "sync", "wan"], default=None)
    ap.add_argument("--shaper", choices=["userspace", "tbf", "both"], default="both",
                    help="WAN rate limit: userspace token bucket, kernel TBF in a netns (root), or both")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    seconds = args.seconds or (4.0 if args.quick else 10.0)
    mib = args.wan_mib or (40 if args.quick else 100)
    if args.only in (None, "loopback"):
        with tempfile.TemporaryDirectory(prefix="bench_link_", dir="/var/tmp") as d:
            loopback(Path(d) / "loop", seconds)
    if args.only in (None, "sync"):
        with tempfile.TemporaryDirectory(prefix="bench_link_", dir="/var/tmp") as d:
            sync_latency(Path(d) / "sync", 200 if args.quick else 1000)
    if args.only in (None, "wan"):
        shapers = ["userspace", "tbf"] if args.shaper == "both" else [args.shaper]
        for sh in shapers:
            with tempfile.TemporaryDirectory(prefix="bench_link_", dir="/var/tmp") as d:
                wan(Path(d) / "wan", mib, sh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
