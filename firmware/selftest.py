"""`usbmirror selftest`: the installation test a technician runs on a board after `make flash`.

Checks, each reported PASS / WARN / FAIL / SKIP with the measured figures:

- the USB device controller (UDC) and the gadget's binding to it (configfs);
- the running unit (control socket) and whether a host has enumerated the disk; the SCSI commands,
  transfer sizes and flush habits the host has shown so far, merged into a small host profile
  (`<state-dir>/host-profile.json`) that survives restarts of the unit;
- the journal device: present, writable, free space, and its measured fdatasync rate (4 KiB
  overwrites of a pre-written probe file next to the journal, the journal's own write pattern);
- every remote: TCP reach, TLS 1.3 handshake with this unit's certificate (mutual), round-trip time
  (journey heartbeats), a throughput probe (the remote reading and hashing its target) and whether the
  remote could open the target for writing (a read-only *verify* connection: nothing is written).

`run_selftest(cfg) -> SelftestReport` is the API; `render()` draws the rich table, `to_json()` the
machine-readable form. The self-test never writes to the volume, the journal or a remote target.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import ssl
import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from firmware.atomic import write_atomically

HOST_PROFILE = "host-profile.json"
MIN_SYNC_RATE = 50.0  # fdatasync/s below which a journal device makes every host write slow


class Verdict(StrEnum):
    PASS = "PASS"
    WARN = "WARN"
    FAIL = "FAIL"
    SKIP = "SKIP"


@dataclass(frozen=True)
class CheckResult:
    name: str
    verdict: Verdict
    detail: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RemoteTarget:
    """A remote unit to probe: `host:port` and, if known, its name (checked against its certificate)."""

    host: str
    port: int
    name: str | None = None

    @property
    def label(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class SelftestConfig:
    """What to check. `gadget=None` means the unit does not serve through the gadget stack."""

    state_dir: Path = Path("/var/lib/usbmirror")
    gadget: str | None = None  # UDC name; "" = the first one
    gadget_name: str = "usbmirror"
    journal: Path | None = None  # default <state_dir>/journal
    journal_size: int = 0  # bytes the journal needs when it does not exist yet
    remotes: tuple[RemoteTarget, ...] = ()
    source_id: str | None = None
    tls_dir: Path | None = None
    volume_size: int = 0  # for the remote's verify hello; taken from the running unit when 0
    block_size: int = 512
    configfs_root: Path = Path("/sys/kernel/config")
    udc_class: Path = Path("/sys/class/udc")
    timeout: float = 5.0
    sync_probe_count: int = 200
    heartbeat_count: int = 5


@dataclass
class SelftestReport:
    checks: list[CheckResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.verdict is not Verdict.FAIL for c in self.checks)

    def add(self, name: str, verdict: Verdict, detail: str, **data: Any) -> CheckResult:
        result = CheckResult(name, verdict, detail, data)
        self.checks.append(result)
        return result

    def by_name(self, name: str) -> CheckResult:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(name)

    def to_json(self) -> str:
        return json.dumps({"ok": self.ok, "checks": [
            {**asdict(c), "verdict": c.verdict.value} for c in self.checks]}, indent=2, default=str)

    def render(self) -> str:
        from rich.console import Console
        from rich.table import Table

        table = Table(title="usbmirror selftest", show_lines=False)
        table.add_column("check")
        table.add_column("result")
        table.add_column("detail", overflow="fold")
        colours = {Verdict.PASS: "green", Verdict.WARN: "yellow", Verdict.FAIL: "bold red", Verdict.SKIP: "dim"}
        for c in self.checks:
            table.add_row(c.name, f"[{colours[c.verdict]}]{c.verdict.value}[/]", c.detail)
        console = Console(width=120, record=True, force_terminal=False, color_system=None)
        with console.capture() as cap:
            console.print(table)
            console.print("overall: " + ("PASS" if self.ok else "FAIL"))
        return cap.get()


# -- USB -----------------------------------------------------------------------------------------
def check_usb(cfg: SelftestConfig, report: SelftestReport) -> str | None:
    """UDC present and the gadget bound to it. Returns the UDC in use (or None)."""
    from gadget.configfs import list_udcs, udc_speed, udc_state

    if cfg.gadget is None:
        report.add("udc", Verdict.SKIP, "the unit is not configured to serve through the gadget stack (gadget)")
        return None
    udcs = list_udcs(cfg.udc_class)
    if not udcs:
        report.add("udc", Verdict.FAIL, f"no USB device controller in {cfg.udc_class}: check the board "
                   "profile's overlay (dtoverlay=dwc2 / dr_mode=peripheral) and that dwc2/dwc3 is loaded")
        return None
    if cfg.gadget and cfg.gadget not in udcs:
        report.add("udc", Verdict.FAIL, f"UDC {cfg.gadget} not found; the kernel has {', '.join(udcs)}")
        return None
    udc = cfg.gadget or udcs[0]
    report.add("udc", Verdict.PASS, f"{udc} ({', '.join(udcs)} available)", udc=udc, available=udcs)
    gdir = cfg.configfs_root / "usb_gadget" / cfg.gadget_name
    try:
        bound = (gdir / "UDC").read_text().strip()
    except OSError:
        bound = None
    state, speed = udc_state(udc, cfg.udc_class), udc_speed(udc, cfg.udc_class)
    if bound is None:
        report.add("gadget binding", Verdict.FAIL, f"no gadget at {gdir}: the unit is not serving over USB "
                   "(is it running with gadget set?)")
    elif bound != udc:
        report.add("gadget binding", Verdict.FAIL,
                   f"gadget {cfg.gadget_name} is {'unbound' if not bound else 'bound to ' + bound}, not {udc}")
    else:
        report.add("gadget binding", Verdict.PASS, f"{cfg.gadget_name} bound to {udc}; UDC state {state}, "
                   f"speed {speed}", state=state, speed=speed)
    return udc


# -- running unit and host profile ---------------------------------------------------------------
def _status(cfg: SelftestConfig) -> dict[str, Any] | None:
    from firmware.control import ControlError, request

    try:
        answer = request(cfg.state_dir, {"cmd": "status"}, timeout=cfg.timeout)
    except ControlError:
        return None
    return answer if answer.get("ok") else None


def _merge_profile(old: dict[str, Any], scsi: dict[str, Any], now: float) -> dict[str, Any]:
    """Counters only grow within a run of the unit; across restarts they start again, so the profile
    keeps the maximum seen per key (a habit, not an exact count)."""
    prof: dict[str, Any] = {"first_seen": old.get("first_seen", now), "last_seen": now}
    for key in ("commands", "transfer_sizes"):
        merged = dict(old.get(key, {}))
        for k, v in (scsi.get(key) or {}).items():
            if isinstance(v, int):
                merged[str(k)] = max(int(merged.get(str(k), 0)), v)
        prof[key] = dict(sorted(merged.items()))
    for key in ("flushes", "fua_writes", "unmap_commands", "blocks_read", "blocks_written"):
        prof[key] = max(int(old.get(key, 0)), int(scsi.get(key, 0) or 0))
    return prof


def check_unit_and_host(cfg: SelftestConfig, report: SelftestReport) -> dict[str, Any] | None:
    st = _status(cfg)
    if st is None:
        report.add("unit running", Verdict.FAIL, f"no unit answers on {cfg.state_dir}/control.sock "
                   "(systemctl status usbmirror-local)")
        return None
    report.add("unit running", Verdict.PASS, f"pid {st.get('pid')}, up {float(st.get('uptime_s', 0)):.0f} s, "
               f"transports: {', '.join(st.get('transports', []) or ['none'])}")
    scsi = st.get("scsi") or {}
    usb = [u for u in st.get("usb") or [] if isinstance(u, dict)]
    commands = scsi.get("commands") or {}
    enumerated = any(u.get("udc_state") == "configured" or u.get("enabled") for u in usb) or bool(commands)
    if enumerated:
        report.add("host enumerated", Verdict.PASS, "a host has configured the device"
                   + (f" ({sum(int(v) for v in commands.values())} SCSI commands so far)" if commands else ""))
    else:
        report.add("host enumerated", Verdict.WARN, "no host has enumerated the disk yet: plug the cable into the "
                   "server (data-capable cable, the board's device port)")
    path = cfg.state_dir / HOST_PROFILE
    try:
        old = json.loads(path.read_text())
        if not isinstance(old, dict):
            old = {}
    except (OSError, ValueError):
        old = {}
    prof = _merge_profile(old, scsi, time.time())
    with contextlib.suppress(OSError):
        write_atomically(path, (json.dumps(prof, indent=1, sort_keys=True) + "\n").encode(), 0o644)
    if not prof["commands"]:
        report.add("host profile", Verdict.WARN, "the host has sent no SCSI commands yet", profile=prof)
    else:
        top = sorted(prof["commands"].items(), key=lambda kv: -int(kv[1]))[:6]
        sizes = ", ".join(f"{k}:{v}" for k, v in list(prof["transfer_sizes"].items())[:6]) or "none"
        habit = ("flushes" if prof["flushes"] else "never flushes") + (
            f", {prof['fua_writes']} FUA writes" if prof["fua_writes"] else ", no FUA")
        report.add("host profile", Verdict.PASS,
                   f"commands {', '.join(f'{k}x{v}' for k, v in top)}; transfer sizes {sizes}; host {habit} "
                   f"({prof['flushes']} SYNCHRONIZE CACHE)", profile=prof)
    return st


# -- journal device ------------------------------------------------------------------------------
def measure_sync_rate(directory: Path, count: int, block: int = 4096) -> float:
    """fdatasync/s for `count` 4 KiB overwrites of a pre-written probe file in `directory`."""
    probe = directory / ".usbmirror-selftest-probe"
    fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, b"\0" * (block * 64))
        os.fsync(fd)
        buf = os.urandom(block)
        start = time.perf_counter()
        for i in range(count):
            os.pwrite(fd, buf, (i % 64) * block)
            os.fdatasync(fd)
        elapsed = time.perf_counter() - start
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            probe.unlink()
    return count / elapsed if elapsed > 0 else float("inf")


def check_journal(cfg: SelftestConfig, report: SelftestReport) -> None:
    journal = cfg.journal or cfg.state_dir / "journal"
    if journal.exists() and journal.is_block_device():
        report.add("journal device", Verdict.PASS, f"{journal} is a block device (partition); sync rate not "
                   "measured on a partition in use")
        return
    directory = journal.parent
    if not directory.is_dir():
        report.add("journal device", Verdict.FAIL, f"{directory} does not exist (mount the journal file system)")
        return
    try:
        vfs = os.statvfs(directory)
    except OSError as exc:
        report.add("journal device", Verdict.FAIL, f"{directory}: {exc.strerror}")
        return
    free = vfs.f_bavail * vfs.f_frsize
    size = journal.stat().st_size if journal.exists() else 0
    if vfs.f_flag & os.ST_RDONLY:
        report.add("journal device", Verdict.FAIL, f"{directory} is on a read-only file system: the unit cannot "
                   "journal writes (remount read-write; a card that turned read-only is worn out)")
        return
    try:
        rate = measure_sync_rate(directory, cfg.sync_probe_count)
    except OSError as exc:
        reason = "read-only" if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM) else exc.strerror
        report.add("journal device", Verdict.FAIL, f"cannot write to {directory}: {reason}")
        return
    need = max(0, cfg.journal_size - size)
    data = {"path": str(journal), "free_bytes": free, "journal_bytes": size, "fdatasync_per_s": round(rate, 1)}
    if need > free:
        report.add("journal device", Verdict.FAIL, f"{directory} has {free >> 20} MiB free, the journal needs "
                   f"{need >> 20} MiB more", **data)
    elif rate < MIN_SYNC_RATE:
        report.add("journal device", Verdict.WARN, f"only {rate:.0f} fdatasync/s on {directory}: every host "
                   "write waits for one; use an SSD or a better card", **data)
    else:
        report.add("journal device", Verdict.PASS, f"{journal} writable, {free >> 20} MiB free, "
                   f"{rate:.0f} fdatasync/s (4 KiB)", **data)


# -- remotes -------------------------------------------------------------------------------------
def _client_context(cfg: SelftestConfig) -> ssl.SSLContext:
    """The replication link's own client context (CA, this source's certificate and key)."""
    from firmware.pairing import TlsFiles, client_context

    if cfg.tls_dir is None or not cfg.source_id:
        raise ValueError("remotes need source-id and tls-dir (make the files with `usbmirror pair`)")
    return client_context(TlsFiles.for_source(cfg.tls_dir, cfg.source_id))


class _Link:
    """A blocking journey client for probes: send an event, wait for the next event."""

    def __init__(self, sock: ssl.SSLSocket) -> None:
        from firmware.link import protocol as jp

        self.jp = jp
        self.sock = sock
        self.conn = jp.JourneyConnection(role=jp.Role.SOURCE)

    def send(self, event: Any) -> None:
        self.sock.sendall(self.conn.send(event))

    def receive(self) -> Any:
        while True:
            ev = self.conn.next_event()
            if ev is not self.jp.NEED_DATA:
                return ev
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("the remote closed the connection")
            self.conn.receive_data(data)


def _tls_failure(exc: ssl.SSLError) -> str:
    text = str(exc)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"the remote's certificate is not signed by our CA (wrong certificate / other pairing): {exc.verify_message}"
    if any(k in text.upper() for k in ("UNKNOWN_CA", "BAD_CERTIFICATE", "CERTIFICATE_UNKNOWN",
                                       "CERTIFICATE_REQUIRED", "ACCESS_DENIED")):
        return f"the remote refused our certificate (wrong certificate / other pairing): {exc.reason}"
    return f"TLS handshake failed: {text}"


@contextlib.contextmanager
def _connect(remote: RemoteTarget, ctx: ssl.SSLContext, timeout: float) -> Iterator[tuple[ssl.SSLSocket, float]]:
    raw = socket.create_connection((remote.host, remote.port), timeout=timeout)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    start = time.perf_counter()
    try:
        tls = ctx.wrap_socket(raw, server_hostname=remote.host)
    except BaseException:
        raw.close()
        raise
    with tls:
        yield tls, time.perf_counter() - start


def check_remote(cfg: SelftestConfig, remote: RemoteTarget, report: SelftestReport,
                 status: dict[str, Any] | None) -> None:
    label = f"remote {remote.label}"
    try:
        ctx = _client_context(cfg)
    except Exception as exc:  # PairingError, OSError / SSLError reading the files, ValueError
        report.add(f"{label} TLS", Verdict.FAIL, f"cannot load this unit's TLS files: {exc}")
        return
    try:
        with _connect(remote, ctx, cfg.timeout) as (tls, handshake):
            _probe_remote(cfg, remote, tls, handshake, report, status)
    except ssl.SSLError as exc:
        report.add(f"{label} TLS", Verdict.FAIL, _tls_failure(exc))
    except (ConnectionError, TimeoutError, socket.gaierror, OSError) as exc:
        if any(c.name == f"{label} TLS" for c in report.checks):
            report.add(f"{label} link", Verdict.FAIL, f"connection lost during the probe: {exc}")
        else:
            report.add(f"{label} reach", Verdict.FAIL, f"unreachable: {exc.strerror or exc}" if isinstance(
                exc, OSError) else f"unreachable: {exc}")


def _probe_remote(cfg: SelftestConfig, remote: RemoteTarget, tls: ssl.SSLSocket, handshake: float,
                  report: SelftestReport, status: dict[str, Any] | None) -> None:
    from firmware.link import protocol as jp
    from firmware.pairing import peer_identity

    label = f"remote {remote.label}"
    ident = peer_identity(tls)
    if remote.name and ident != ("remote", remote.name):
        report.add(f"{label} TLS", Verdict.FAIL, f"the certificate names {ident}, not remote {remote.name!r}")
        return
    report.add(f"{label} TLS", Verdict.PASS, f"TLS 1.3 mutual authentication in {handshake * 1000:.0f} ms "
               f"({tls.version()}, peer {':'.join(ident) if ident else '?'})", handshake_ms=round(handshake * 1000, 1))
    vol = (status or {}).get("volume") or {}
    size = int(vol.get("size_bytes") or cfg.volume_size or 0)
    block = int(vol.get("block_size") or cfg.block_size)
    if not size:
        report.add(f"{label} target", Verdict.SKIP, "volume size unknown (start the unit or give size): the remote "
                   "cannot open a target without it")
        return
    unit_uuid = (status or {}).get("unit_uuid")
    vol_uuid = uuid.UUID(unit_uuid).bytes if unit_uuid else bytes(16)
    link = _Link(tls)
    assert cfg.source_id is not None
    link.send(jp.Hello(source_id=cfg.source_id, volume_uuid=vol_uuid, volume_size=size, block_size=block,
                       generation=0, resume_seq=0, features=jp.Feature.NONE, purpose=jp.Purpose.VERIFY))
    reply = link.receive()
    if isinstance(reply, jp.Error):
        report.add(f"{label} target", Verdict.FAIL, f"the remote refused: {reply.code.name}: {reply.message}")
        return
    if not isinstance(reply, jp.HelloReply):
        report.add(f"{label} target", Verdict.FAIL, f"unexpected answer {type(reply).__name__}")
        return
    flags = [f.name for f in jp.ReplyFlag if f and f in reply.flags]
    report.add(f"{label} target", Verdict.PASS, f"remote {reply.remote_name} opened the target for writing; applied "
               f"seq {reply.applied_seq}" + (f"; flags {', '.join(str(f) for f in flags)}" if flags else ""),
               applied_seq=reply.applied_seq)
    rtts: list[float] = []
    for token in range(1, cfg.heartbeat_count + 1):
        t0 = time.perf_counter()
        link.send(jp.Heartbeat(token))
        ev = link.receive()
        if not isinstance(ev, jp.Heartbeat) or ev.token != token:
            report.add(f"{label} rtt", Verdict.FAIL, f"heartbeat {token} not echoed: {ev!r}")
            return
        rtts.append(time.perf_counter() - t0)
    rtt = statistics.median(rtts)
    report.add(f"{label} rtt", Verdict.PASS if rtt < 0.5 else Verdict.WARN,
               f"median {rtt * 1000:.1f} ms over {len(rtts)} heartbeats (max {max(rtts) * 1000:.1f} ms)",
               rtt_ms=round(rtt * 1000, 2))
    _throughput(link, label, size, block, report)


def _throughput(link: _Link, label: str, size: int, block: int, report: SelftestReport) -> None:
    """The remote reads and hashes up to 16 MiB of its target in 1 MiB regions, the work an apply or
    a verify does per byte, timed end to end through the link."""
    jp = link.jp
    region_blocks = max(1, (1 << 20) // block)
    count = max(1, min(16, size // (region_blocks * block)))
    t0 = time.perf_counter()
    link.send(jp.DigestRequest(first_region=0, count=count, region_blocks=region_blocks))
    ev = link.receive()
    elapsed = time.perf_counter() - t0
    if not isinstance(ev, jp.RegionDigests):
        report.add(f"{label} throughput", Verdict.FAIL, f"probe answered with {type(ev).__name__}")
        return
    nbytes = len(ev.digests) * region_blocks * block
    rate = nbytes / elapsed if elapsed > 0 else float("inf")
    report.add(f"{label} throughput", Verdict.PASS,
               f"remote read+hashed {nbytes >> 20} MiB of its target in {elapsed * 1000:.0f} ms "
               f"({rate / (1 << 20):.0f} MiB/s)", bytes=nbytes, mib_per_s=round(rate / (1 << 20), 1))


# -- entry ---------------------------------------------------------------------------------------
def run_selftest(cfg: SelftestConfig, *, progress: Callable[[str], None] | None = None) -> SelftestReport:
    report = SelftestReport()
    step = progress or (lambda _msg: None)
    step("USB")
    check_usb(cfg, report)
    step("unit")
    status = check_unit_and_host(cfg, report)
    step("journal")
    check_journal(cfg, report)
    for remote in cfg.remotes:
        step(f"remote {remote.label}")
        check_remote(cfg, remote, report, status)
    return report


def config_from_options(o: dict[str, Any], remotes: list[Any]) -> SelftestConfig:
    """The typed config from `usbmirror selftest`'s merged options (the `local` keys: gadget, journal,
    journal_size, state_dir, source_id, tls_dir, size, block_size) and its parsed remotes (objects with
    `address=(host, port)` and `name`)."""
    size = o.get("size")
    volume = o.get("volume")
    if not size and volume:
        with contextlib.suppress(OSError):
            p = Path(volume)
            if p.is_file():
                size = p.stat().st_size
    return SelftestConfig(
        state_dir=Path(o.get("state_dir") or "/var/lib/usbmirror"),
        gadget=o.get("gadget"),
        journal=Path(o["journal"]) if o.get("journal") else None,
        journal_size=int(o.get("journal_size") or 0),
        remotes=tuple(RemoteTarget(r.address[0], int(r.address[1]), getattr(r, "name", None)) for r in remotes),
        source_id=o.get("source_id"),
        tls_dir=Path(o["tls_dir"]) if o.get("tls_dir") else None,
        volume_size=int(size or 0),
        block_size=int(o.get("block_size") or 512),
    )


def run_selftest_cli(o: dict[str, Any], remotes: list[Any], *, as_json: bool = False) -> int:
    """`usbmirror selftest`: print the table (or JSON); exit status 0 only when nothing failed."""
    import sys

    report = run_selftest(config_from_options(o, remotes))
    sys.stdout.write(report.to_json() + "\n" if as_json else report.render())
    return 0 if report.ok else 1
