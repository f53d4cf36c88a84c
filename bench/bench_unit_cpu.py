"""Unit CPU per command and durable rates, measured the way a host drives the unit.

A real `usbmirror local` process (write cache off, journal on) serves a sparse image over USB/IP on
loopback; this process is the host: it imports the device with host_tests.usbip_support.UsbipClient
and issues 4 KiB random writes, 120 KiB sequential writes and 120 KiB sequential reads. For each
workload it reads the unit process's own CPU time (utime + stime from /proc/PID/stat) before and
after, and prints CPU per command beside its target, and the durable rate beside raw
pwrite+fdatasync on the same disk in the same run (as a ratio).

Scaling: the same workloads on a 64 MiB and a 64 GiB sparse volume (CPU per command should stay
within 20%).

With one async remote (a `usbmirror remote` process on loopback, paired with `usbmirror pair`):
CPU per command as a ratio of the unit alone (target <= 1.3) and the rate as a ratio of alone
(target >= 0.8).

Journal fill: a unit whose journal is held by a remote that never connects (a `--remote` on a port
nothing listens on keeps every record in the journal) is filled to about 70% with 120 KiB writes,
then runs the same workloads (the 120 KiB writes limited to what keeps the fill below the
throttle's 80%, a few hundred over all rounds); its CPU per command is printed beside the unit with
an empty journal (which the volume sync keeps releasing), as a ratio (target within 20%).

Beside each CPU figure: the syscall floor of the same command, measured in the same run. This process
plays the unit's part with nothing but the system calls a command cannot avoid (the three URB round
trips over loopback TCP against a client process, the journal pwrite + fdatasync on a pre-written
file, the volume pwrite on a sparse one, or the volume pread for a read), and its own CPU per command
is the floor; "vs floor" is the unit's figure over it. What lies above the floor is the unit's own
work (Python, threads, copies); a target below the floor cannot be met on this machine's kernel.

CPU time is the sum of the unit's threads' scheduler run times (/proc/PID/task/*/schedstat, in
nanoseconds) when no thread ended during the workload, else utime + stime, which comes in clock
ticks (10 ms on most kernels: a resolution of 10 ms / --ops, 10 µs at the default 1000). Each
unit runs the three workloads --rounds times and the floor is measured --rounds times; the lowest
CPU and the highest rate of each are kept, so a busy neighbour on a shared machine inflates the
figures less.

`--profile DIR`: every unit process this benchmark starts runs under cProfile, one profiler per
thread (bench/profile_site/sitecustomize.py, put on the units' PYTHONPATH), and writes
DIR/unit-PID.pstats when it stops (`python -m pstats DIR/unit-PID.pstats`; the largest file is the
local unit). The profiler slows the unit down several times: the figures of such a run are for
finding where the time goes, not for comparing.

Run: .venv/bin/python bench/bench_unit_cpu.py [--ops 1000] [--rounds 3] [--dir DIR] [--profile DIR]
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from host_tests.units import Units, streaming
from host_tests.usbip_support import UsbipClient

SEQ = 120 * 1024
SMALL = 4096
BLOCK = 512
TICK = os.sysconf("SC_CLK_TCK")
TARGET_US = {"rand_write": 130.0, "seq_write": 200.0, "seq_read": 100.0}


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/PID/stat (fields 14 and 15)."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def thread_ns(pid: int) -> dict[str, int]:
    """{thread id: nanoseconds on a CPU} from /proc/PID/task/*/schedstat (exact, where the kernel
    keeps scheduler statistics; empty where it does not)."""
    out: dict[str, int] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out[task.name] = int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return {}
    return out


class CpuClock:
    """CPU time of a unit process between `start()` and `stop()`: the exact sum of its threads'
    scheduler run times when every thread lived through the interval (a thread that ended would take
    its time with it), else utime + stime, which keeps ended threads but counts in clock ticks."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._ticks = 0.0
        self._threads: dict[str, int] = {}

    def start(self) -> None:
        self._threads = thread_ns(self.pid)
        self._ticks = cpu_seconds(self.pid)

    def stop(self) -> float:
        ticks = cpu_seconds(self.pid) - self._ticks
        after = thread_ns(self.pid)
        if self._threads and set(self._threads) <= set(after):  # a thread started meanwhile counts whole
            return (sum(after.values()) - sum(self._threads.values())) / 1e9
        return ticks


def raw_rates(path: Path, ops: int, span: int) -> dict[str, float]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, span)
        rng = random.Random(7)
        small, chunk = os.urandom(SMALL), os.urandom(SEQ)
        t0 = time.perf_counter()
        for _ in range(ops):
            os.pwrite(fd, small, rng.randrange(span // SMALL) * SMALL)
            os.fdatasync(fd)
        t1 = time.perf_counter()
        for i in range(ops):
            os.pwrite(fd, chunk, (i * SEQ) % (span - SEQ))
            os.fdatasync(fd)
        t2 = time.perf_counter()
    finally:
        os.close(fd)
    return {"rand_write": ops / (t1 - t0), "seq_write": ops / (t2 - t1)}


URB = 48  # USB/IP header
CBW_LEN, CSW_LEN = 31, 13


def syscall_floor(work: Path, ops: int, span: int) -> dict[str, float]:
    """{workload: CPU µs per command of the unavoidable system calls} (module docstring)."""
    jfd = os.open(work / "floor.journal", os.O_RDWR | os.O_CREAT, 0o600)
    vfd = os.open(work / "floor.volume", os.O_RDWR | os.O_CREAT, 0o600)
    listener = socket.create_server(("127.0.0.1", 0))
    out: dict[str, float] = {}
    try:
        os.pwrite(jfd, bytes(64 << 20), 0)  # pre-written, as the unit's journal file is
        os.fsync(jfd)
        os.ftruncate(vfd, span)
        # per workload: (request sizes the host sends, reply sizes the unit sends) for one command
        shapes = {"rand_write": ((URB + CBW_LEN, URB + SMALL, URB), (URB, URB, URB + CSW_LEN)),
                  "seq_write": ((URB + CBW_LEN, URB + SEQ, URB), (URB, URB, URB + CSW_LEN)),
                  "seq_read": ((URB + CBW_LEN, URB, URB), (URB, URB + SEQ, URB + CSW_LEN))}
        pid = os.fork()
        if pid == 0:  # the host: sends each request, waits for its reply
            code = 0
            try:
                with socket.create_connection(listener.getsockname()) as c:
                    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    buf = memoryview(bytearray(SEQ + 2 * URB))
                    for requests, replies in shapes.values():
                        for _ in range(ops):
                            for req, rep in zip(requests, replies, strict=True):
                                c.sendall(bytes(req))
                                got = 0
                                while got < rep:
                                    n = c.recv_into(buf[got:rep])
                                    if n == 0:
                                        raise ConnectionError("unit side closed")
                                    got += n
            except BaseException:
                code = 1
            os._exit(code)
        sock, _ = listener.accept()
        with sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            buf = memoryview(bytearray(SEQ + 2 * URB))
            rng = random.Random(5)
            for name, (requests, replies) in shapes.items():
                size = SMALL if name == "rand_write" else SEQ
                record = bytes(size + BLOCK)  # header + payload, aligned, as a journal record
                payloads = [bytes(n) for n in replies]
                jpos = 0
                t0 = resource.getrusage(resource.RUSAGE_SELF)
                for i in range(ops):
                    for step, (req, _rep) in enumerate(zip(requests, replies, strict=True)):
                        got = 0
                        while got < req:
                            got += sock.recv_into(buf[got:req])
                        if step == 2:  # the CSW request came: do the command's I/O, then answer
                            if name == "seq_read":
                                os.pread(vfd, size, (i * size) % (span - size))
                            else:
                                os.pwrite(jfd, record, jpos)
                                os.fdatasync(jfd)
                                jpos = (jpos + len(record)) % ((64 << 20) - len(record))
                                off = (rng.randrange(span // size) * size if name == "rand_write"
                                       else (i * size) % (span - size))
                                os.pwrite(vfd, record[:size], off)
                        sock.sendall(payloads[step])
                t1 = resource.getrusage(resource.RUSAGE_SELF)
                out[name] = ((t1.ru_utime - t0.ru_utime) + (t1.ru_stime - t0.ru_stime)) / ops * 1e6
        _, status = os.waitpid(pid, 0)
        if status != 0:
            raise RuntimeError("the floor's host process failed")
    finally:
        listener.close()
        os.close(jfd)
        os.close(vfd)
    return out


def drive(client: UsbipClient, pid: int, ops: int, span: int, *,
          seq_write_ops: int | None = None) -> dict[str, tuple[float, float]]:
    """{workload: (unit CPU µs per command, commands per second)}; `seq_write_ops` (default `ops`)
    sequential writes."""
    rng = random.Random(11)
    small, chunk = os.urandom(SMALL), os.urandom(SEQ)
    per = SEQ // BLOCK
    seq_writes = ops if seq_write_ops is None else seq_write_ops
    seq_span = min(span, ops * SEQ) // SEQ
    read_span = min(seq_span, seq_writes)  # the reads check what this round's writes left
    out: dict[str, tuple[float, float]] = {}

    clock = CpuClock(pid)

    def run(name: str, one: object, n: int = ops) -> None:
        assert callable(one)
        clock.start()
        t0 = time.perf_counter()
        for i in range(n):
            one(i)
        t1 = time.perf_counter()
        out[name] = (clock.stop() / n * 1e6, n / (t1 - t0))

    def rand_write(i: int) -> None:
        if client.write10(rng.randrange(span // SMALL) * (SMALL // BLOCK), small) != 0:
            raise RuntimeError("WRITE(10) failed")

    def seq_write(i: int) -> None:
        if client.write10((i % seq_span) * per, chunk) != 0:
            raise RuntimeError("WRITE(10) failed")

    def seq_read(i: int) -> None:
        if client.read10((i % read_span) * per, per) != chunk:
            raise RuntimeError("read-back mismatch: the unit did not return what it stored")

    run("rand_write", rand_write)
    run("seq_write", seq_write, seq_writes)
    run("seq_read", seq_read)
    return out


JOURNAL_SIZE = 256 << 20
RECORD_120K = SEQ + BLOCK  # a 120 KiB write's record: 64-byte header and payload, 512-aligned
RECORD_4K = SMALL + BLOCK


def full_journal_unit(work: Path, ops: int, span: int, rounds: int) -> tuple[dict[str, tuple[float, float]], float]:
    """The workloads on a unit whose journal is ~70% full and held (module docstring); returns them
    and the fill they ran at."""
    with Units(work) as units:
        tls = units.pair("dr1", ["server1"])
        with socket.socket() as probe:  # a port nothing listens on: the remote never connects
            probe.bind(("127.0.0.1", 0))
            dead = f"127.0.0.1:{probe.getsockname()[1]}"
        u = units.start_local(volume=work / "volume.img", size="64M", journal_size="256M", source_id="server1",
                              tls_dir=tls, remotes=[dead])
        with UsbipClient("127.0.0.1", u.port) as client:
            if client.import_device("1-1").status != 0:
                raise SystemExit("import refused")
            client.enumerate()
            client.scsi(bytes(6))
            chunk = os.urandom(SEQ)
            per = SEQ // BLOCK
            for i in range(int(0.70 * JOURNAL_SIZE) // RECORD_120K):
                if client.write10((i % (span // SEQ)) * per, chunk) != 0:
                    raise RuntimeError("WRITE(10) failed while filling the journal")
            fill = float(u.status()["journal"]["fill"])
            runs = []
            for left in range(rounds, 0, -1):  # the room below the throttle, shared by the rounds
                room = int((0.78 - float(u.status()["journal"]["fill"])) * JOURNAL_SIZE) - ops * RECORD_4K
                runs.append(drive(client, u.pid, ops, span,
                                  seq_write_ops=max(1, min(ops, room // RECORD_120K // left))))
            return best(runs), fill


def one_unit(work: Path, size: str, ops: int, span: int, *, remote: bool = False,
             rounds: int = 1) -> dict[str, tuple[float, float]]:
    with Units(work) as units:
        if remote:
            tls = units.pair("dr1", ["server1"])
            r = units.start_remote("dr1", targets={"server1": work / "target.img"}, tls_dir=tls)
            u = units.start_local(volume=work / "volume.img", size=size, journal_size="256M", source_id="server1",
                                  tls_dir=tls, remotes=[r.address])
            u.wait_status(streaming(), timeout=120, what="the remote streaming")
        else:
            u = units.start_local(volume=work / "volume.img", size=size, journal_size="256M")
        with UsbipClient("127.0.0.1", u.port) as client:
            if client.import_device("1-1").status != 0:
                raise SystemExit("import refused")
            client.enumerate()
            client.scsi(bytes(6))  # TEST UNIT READY: clears the power-on unit attention
            return best([drive(client, u.pid, ops, span) for _ in range(rounds)])


def best(runs: list[dict[str, tuple[float, float]]]) -> dict[str, tuple[float, float]]:
    """Per workload: the lowest CPU per command and the highest rate of several runs."""
    return {k: (min(r[k][0] for r in runs), max(r[k][1] for r in runs)) for k in runs[0]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", type=int, default=1000, help="commands per workload")
    ap.add_argument("--rounds", type=int, default=3, help="runs of each workload and of the floor (best kept)")
    ap.add_argument("--dir", default=None, help="directory for the images and journal (default: a temp dir)")
    ap.add_argument("--profile", metavar="DIR", default=None,
                    help="run the units under cProfile and write DIR/unit-PID.pstats (module docstring)")
    args = ap.parse_args(argv)
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
        os.environ["USBMIRROR_BENCH_PROFILE"] = os.path.abspath(args.profile)
        site = str(Path(__file__).resolve().parent / "profile_site")
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (site, os.environ.get("PYTHONPATH")) if p)
    span = 64 << 20
    with tempfile.TemporaryDirectory(prefix="bench-unit-", dir=args.dir) as tmp:
        raw = raw_rates(Path(tmp) / "raw.img", args.ops, span)
        rounds = max(1, args.rounds)
        floors = [syscall_floor(Path(tmp), args.ops, span) for _ in range(rounds)]
        floor = {k: min(f[k] for f in floors) for k in floors[0]}
        small = one_unit(Path(tmp) / "u64m", "64M", args.ops, span, rounds=rounds)
        big = one_unit(Path(tmp) / "u64g", "64G", args.ops, span, rounds=rounds)
        rem = one_unit(Path(tmp) / "urem", "64M", args.ops, span, remote=True, rounds=rounds)
        full, fill = full_journal_unit(Path(tmp) / "ufull", args.ops, span, rounds)
    print(f"bench_unit_cpu: `usbmirror local` over USB/IP, write cache off, journal on, {args.ops} commands "
          f"per workload, best of {rounds} rounds, in {args.dir or tempfile.gettempdir()}")
    print(f"{'workload (64 MiB volume)':30} {'unit CPU/cmd':>13} {'target':>8} {'floor':>9} {'vs floor':>9} "
          f"{'rate/raw':>9} {'target':>7}")
    labels = {"rand_write": "4 KiB random write", "seq_write": "120 KiB sequential write",
              "seq_read": "120 KiB sequential read"}
    for key, label in labels.items():
        cpu, rate = small[key]
        ratio = f"{rate / raw[key]:9.2f}" if key in raw else f"{'-':>9}"
        tgt = f"{'>=0.50':>7}" if key in raw else f"{'':>7}"
        print(f"{label:30} {cpu:10.0f} µs {'<=' + format(TARGET_US[key], '.0f'):>8} {floor[key]:6.0f} µs "
              f"{cpu / floor[key]:9.2f} {ratio} {tgt}")
    print(f"{'with one async remote':30} {'CPU/cmd':>13} {'vs alone':>9} {'target':>7} {'rate/alone':>11} {'target':>7}")
    for key, label in labels.items():
        a, b = small[key], rem[key]
        print(f"{label:30} {b[0]:10.0f} µs {b[0] / a[0]:9.2f} {'<=1.30':>7} {b[1] / a[1]:11.2f} {'>=0.80':>7}")
    print(f"{'scaling 64 MiB -> 64 GiB':30} {'CPU/cmd 64G/64M':>16} {'target':>8}")
    for key, label in labels.items():
        us_small, us_big = small[key][0], big[key][0]
        print(f"{label:30} {us_big / us_small:16.2f} {'<=1.20':>8}   ({us_small:.0f} -> {us_big:.0f} µs)")
    print(f"{'scaling empty -> ' + format(fill, '.0%') + ' journal':30} {'CPU/cmd full/empty':>16} {'target':>8}")
    for key, label in labels.items():
        us_small, us_full = small[key][0], full[key][0]
        print(f"{label:30} {us_full / us_small:16.2f} {'<=1.20':>8}   ({us_small:.0f} -> {us_full:.0f} µs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
