"""Process helpers for end-to-end tests: real `usbmirror local` / `usbmirror remote` processes.

Each unit runs as ``python -m firmware.cli ...`` (what a user starts), on a free loopback port, with
its own state directory and a log file. `Units` tracks every process it starts and kills the lot on
`close()`, so a failing test never leaves a unit behind. Failure messages carry the tail of every
unit's log (`Units.describe()`).

    with Units(tmp_path) as units:
        tls = units.pair("dr1", ["server1"])
        remote = units.start_remote("dr1", targets={"server1": tmp_path / "target.img"}, tls_dir=tls)
        local = units.start_local(volume=..., size="16M", source_id="server1", tls_dir=tls,
                                  remotes=[remote.address])
        local.wait_status(lambda st: st["remotes"][0]["state"] == "streaming", what="link up")
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
LOG_TAIL = 6000

Status = dict[str, Any]


class UnitError(AssertionError):
    """A unit did not start, answer or stop as expected; the message carries the logs."""


def _port_slice() -> range:
    """The ports this test process picks from: below the kernel's ephemeral range (the source ports of
    every outgoing connection come from there, so a port picked from it can be taken by a unit's own
    connection before the unit listens on it), one slice per pytest-xdist worker so that two workers
    never pick the same port."""
    low = 32768
    with contextlib.suppress(OSError, ValueError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    first = 10000 if low > 12000 else 1024
    workers = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1))
    worker = int((os.environ.get("PYTEST_XDIST_WORKER") or "gw0").removeprefix("gw") or 0) % workers
    width = (low - first) // workers
    return range(first + worker * width, first + (worker + 1) * width)


_PORTS = _port_slice()
_picked: set[int] = set()


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now, outside the ephemeral range and this worker's
    own (one not handed out before by this process, while others are left)."""
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.choice(_PORTS)
        if port in _picked and len(_picked) < len(_PORTS) // 2:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _picked.add(port)
        return port
    with socket.socket() as s:  # the slice is crowded: let the kernel choose
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def usbmirror(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run one short `usbmirror` command (status, verify, pair) and capture its output."""
    return subprocess.run([sys.executable, "-m", "firmware.cli", *args], cwd=REPO, text=True,
                          capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def first_difference(a: Path, b: Path, chunk: int = 1 << 20) -> int | None:
    """Byte offset of the first difference between two files (a length difference counts); None if equal."""
    with open(a, "rb") as fa, open(b, "rb") as fb:
        pos = 0
        while True:
            ca, cb = fa.read(chunk), fb.read(chunk)
            if ca != cb:
                for i, (x, y) in enumerate(zip(ca, cb, strict=False)):
                    if x != y:
                        return pos + i
                return pos + min(len(ca), len(cb))
            if not ca:
                return None
            pos += len(ca)


@dataclass
class UnitProcess:
    """One running (or stopped) unit process."""

    role: str                       # "local" or "remote"
    argv: list[str]
    state_dir: Path
    log_path: Path
    port: int                       # USB/IP port (local) or listen port (remote)
    proc: subprocess.Popen[bytes] | None = None
    history: list[int] = field(default_factory=list)   # exit codes of earlier runs

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self, tail: int = LOG_TAIL) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except FileNotFoundError:
            return "(no log)"

    def launch(self) -> None:
        """Start the process (again, with the same arguments; the log is appended to)."""
        if self.running():
            raise UnitError(f"{self.role} unit is already running (pid {self.pid})")
        if self.proc is not None and self.proc.returncode is not None:
            self.history.append(self.proc.returncode)
        with open(self.log_path, "ab") as log_fh:
            log_fh.write(f"==== start: {' '.join(self.argv)}\n".encode())
            log_fh.flush()
            self.proc = subprocess.Popen([sys.executable, "-m", "firmware.cli", *self.argv], cwd=REPO,
                                         stdout=log_fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def status_raw(self, *, text: bool = False) -> subprocess.CompletedProcess[str]:
        args = ["status", "--state-dir", str(self.state_dir)]
        return usbmirror(*args) if text else usbmirror(*args, "--json")

    def status(self) -> Status:
        """`usbmirror status --json` of this unit; UnitError when it does not answer."""
        r = self.status_raw()
        if r.returncode != 0:
            raise UnitError(f"usbmirror status failed rc={r.returncode}: {r.stderr.strip()}")
        out: Status = json.loads(r.stdout)
        return out

    def wait_status(self, pred: Callable[[Status], bool], *, timeout: float = 60.0, what: str = "a state",
                    interval: float = 0.3) -> Status:
        """Poll status until ``pred`` holds; returns that status. Fails with the log if the unit dies."""
        deadline = time.monotonic() + timeout
        last: Status | str = "no answer yet"
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise UnitError(f"{self.role} unit exited rc={self.proc.returncode} while waiting for {what}:\n"
                                f"{self.log()}")
            try:
                st = self.status()
                if pred(st):
                    return st
                last = st
            except (UnitError, KeyError, IndexError, TypeError, ValueError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() > deadline:
                shown = json.dumps(last, indent=1, default=str)[-3000:] if isinstance(last, dict) else last
                raise UnitError(f"timed out after {timeout:.0f}s waiting for {what} of the {self.role} unit; "
                                f"last status: {shown}\nlog:\n{self.log()}")
            time.sleep(interval)

    def wait_ready(self, timeout: float = 60.0) -> Status:
        """Until the control socket answers `status` (everything, USB/IP included, is up by then)."""
        return self.wait_status(lambda st: True, timeout=timeout, what="startup")

    def signal(self, sig: int) -> None:
        if self.running():
            assert self.proc is not None
            self.proc.send_signal(sig)

    def kill9(self) -> None:
        """SIGKILL, as a crash: nothing runs in the unit afterwards."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait (SIGKILL after ``timeout``); returns the exit code (-9 if it had to be killed)."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)

    def wait_exit(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return int(self.proc.wait(timeout))


class Units:
    """Starts units under one work directory and kills them all on close (context manager)."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.work.mkdir(parents=True, exist_ok=True)
        self.units: list[UnitProcess] = []

    def __enter__(self) -> Units:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        for u in self.units:
            if u.running():
                with contextlib.suppress(Exception):
                    u.stop(timeout=15)
            with contextlib.suppress(Exception):
                u.kill9()

    def describe(self) -> str:
        """The tail of every unit's log, for assertion messages."""
        parts = []
        for u in self.units:
            rc = None if u.proc is None else u.proc.poll()
            parts.append(f"---- {u.role} unit {u.address} state={u.state_dir} rc={rc}\n{u.log()}")
        return "\n".join(parts)

    # -- commands ---------------------------------------------------------------------------------
    def pair(self, remote: str, sources: Sequence[str], name: str = "tls") -> Path:
        """`usbmirror pair`: a CA plus certificates for ``remote`` and each source."""
        d = self.work / name
        r = usbmirror("pair", str(d), "--remote", remote, *[a for s in sources for a in ("--source", s)])
        if r.returncode != 0:
            raise UnitError(f"usbmirror pair failed rc={r.returncode}: {r.stderr}")
        return d

    def _new(self, role: str, argv: list[str], state_dir: Path, port: int) -> UnitProcess:
        log_path = self.work / f"{role}-{len(self.units)}.log"
        u = UnitProcess(role, argv, state_dir, log_path, port)
        self.units.append(u)
        return u

    def local_argv(self, *, volume: Path, size: str | None, state_dir: Path, port: int,
                   journal: Path | None = None, journal_size: str = "32M", source_id: str | None = None,
                   tls_dir: Path | None = None, remotes: Sequence[str] = (), extra: Sequence[str] = ()) -> list[str]:
        argv = ["local", "--volume", str(volume), "--usbip", f"127.0.0.1:{port}", "--state-dir", str(state_dir),
                "--journal", str(journal or state_dir.parent / f"{state_dir.name}.journal"),
                "--journal-size", journal_size]
        if size is not None:
            argv += ["--size", size]
        if source_id is not None:
            argv += ["--source-id", source_id]
        if tls_dir is not None:
            argv += ["--tls-dir", str(tls_dir)]
        for r in remotes:
            argv += ["--remote", r]
        return argv + list(extra)

    def start_local(self, *, volume: Path, size: str | None = "16M", state_dir: Path | None = None,
                    port: int | None = None, journal: Path | None = None, journal_size: str = "32M",
                    source_id: str | None = None, tls_dir: Path | None = None, remotes: Sequence[str] = (),
                    extra: Sequence[str] = (), wait: bool = True) -> UnitProcess:
        """Start `usbmirror local` serving ``volume`` over USB/IP; waits until status answers."""
        port = port or free_port()
        state_dir = state_dir or self.work / f"local-state-{port}"
        argv = self.local_argv(volume=volume, size=size, state_dir=state_dir, port=port, journal=journal,
                               journal_size=journal_size, source_id=source_id, tls_dir=tls_dir,
                               remotes=remotes, extra=extra)
        return self.start_argv("local", argv, state_dir, port, wait=wait)

    def start_remote(self, name: str, *, targets: dict[str, Path], tls_dir: Path, state_dir: Path | None = None,
                     port: int | None = None, extra: Sequence[str] = (), wait: bool = True) -> UnitProcess:
        """Start `usbmirror remote` listening on a free loopback port; waits until status answers."""
        port = port or free_port()
        state_dir = state_dir or self.work / f"remote-state-{port}"
        argv = ["remote", "--listen", f"127.0.0.1:{port}", "--name", name, "--tls-dir", str(tls_dir),
                "--state-dir", str(state_dir)]
        for sid, path in targets.items():
            argv += ["--target", f"{sid}={path}"]
        return self.start_argv("remote", argv + list(extra), state_dir, port, wait=wait)

    def start_argv(self, role: str, argv: list[str], state_dir: Path, port: int, *, wait: bool = True) -> UnitProcess:
        """Start a unit from a full argument list (e.g. one using --config)."""
        u = self._new(role, argv, state_dir, port)
        u.launch()
        if wait:
            u.wait_ready()
        return u


def streaming(index: int = 0) -> Callable[[Status], bool]:
    """Status predicate: the local unit's remote ``index`` is connected and streaming."""
    return lambda st: bool(st["remotes"][index]["state"] == "streaming")


def drained(st: Status) -> bool:
    """Status predicate: every remote has acknowledged everything durable in the journal."""
    durable = int(st["journal"]["durable_seq"])
    return bool(st["remotes"]) and all(int(r["acked_seq"]) >= durable for r in st["remotes"])



class KillAndRestart(threading.Thread):
    """A thread that waits until ``watch``'s status satisfies ``pred``, SIGKILLs ``victim`` and starts it
    again with the same arguments (same port, state dir and files). Check ``error`` after joining."""

    def __init__(self, watch: UnitProcess, victim: UnitProcess, pred: Callable[[Status], bool], *,
                 what: str = "the trigger", timeout: float = 240.0) -> None:
        super().__init__(name=f"kill-{victim.role}", daemon=True)
        self.watch, self.victim, self.pred, self.what, self.timeout = watch, victim, pred, what, timeout
        self.before: Status | None = None     # the watched unit's status that fired the trigger
        self.after: Status | None = None      # the victim's first status after the restart
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.before = self.watch.wait_status(self.pred, timeout=self.timeout, interval=0.1, what=self.what)
            self.victim.kill9()
            self.victim.launch()
            self.after = self.victim.wait_ready(120)
        except BaseException as exc:
            self.error = exc
