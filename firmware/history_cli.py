"""The point-in-time commands of `usbmirror`: `mark` (on a local unit), `history` (on a remote).

`usbmirror mark NAME --state-dir DIR` asks the local unit running with DIR, over its control
socket, to put a named restore point into the journal; it returns once the mark is durable in the
local journal and prints its seq. Remotes receive it in journal order.

`usbmirror history --state-dir DIR --source ID [--json]` reads the history files a remote unit
keeps in DIR for one source (also while that remote is running) and lists the points, newest first.

`usbmirror restore --state-dir DIR --source ID (--mark NAME | --at TIME | --seq N) --to PATH`
writes the image of one point to a new file or a block device (never the live target), with a
progress bar, while the remote keeps applying.

`usbmirror expose --state-dir DIR --source ID (--mark|--at|--seq) (--usbip HOST:PORT | --iscsi HOST:PORT
[--iscsi-chap USER:SECRET])... [--writable]` serves the image of one point at once as a USB disk over
USB/IP and/or an iSCSI target (no copy first), read-only or
with a scratch overlay that is thrown away when it stops (SIGINT or SIGTERM).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import hashlib
import json
import os
import stat
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from firmware.config import DEFAULT_STATE_DIR, UsageError, parse_chap, parse_hostport
from firmware.control import ControlError, request
from firmware.history import HistoryError, HistoryReader, ImageView, history_dir, resolve, restore, summary
from firmware.history.format import Meta
from firmware.history.image_store import ImageStore
from firmware.history.view import RESTORE_CHUNK
from firmware.volume import parse_size


def cmd_mark(args: argparse.Namespace) -> int:
    try:
        ans = request(args.state_dir, {"cmd": "mark", "name": args.name}, timeout=60.0)
    except ControlError as exc:
        print(f"usbmirror mark: {exc}", file=sys.stderr)
        return 1
    if not ans.get("ok"):
        print(f"usbmirror mark: {ans.get('error')}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"name": args.name, "seq": ans["seq"]}))
    else:
        print(f"mark {args.name!r} placed at seq {ans['seq']} (durable in the local journal)")
    return 0


def _sources(state_dir: str) -> list[str]:
    try:
        return sorted(p.name[:-len(".history")] for p in Path(state_dir).iterdir() if p.name.endswith(".history"))
    except OSError:
        return []


def open_history(state_dir: str, source: str) -> HistoryReader:
    """The history of `source` in a remote unit's state dir; HistoryError names the sources there."""
    root = history_dir(state_dir, source)
    if not (root / "meta.json").exists():
        known = _sources(state_dir)
        raise HistoryError(f"no history for source {source!r} in {state_dir} (sources with history: "
                           f"{', '.join(known) if known else 'none'}; a remote keeps history when "
                           "--history-size is set)")
    return HistoryReader(root)


def _iso(t: float | None) -> str:
    if t is None:
        return "-"
    return _dt.datetime.fromtimestamp(t, _dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _size(n: int) -> str:
    for unit, k in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= k:
            return f"{n / k:.1f} {unit}"
    return f"{n} B"


def history_report(state_dir: str, source: str, now_ns: int) -> dict[str, object]:
    with open_history(state_dir, source) as rd:
        m = rd.meta
        out = summary(rd.index, m.size_cap or None, m.age_s or None, now_ns)
    out["source"] = source
    return out


def cmd_history(args: argparse.Namespace) -> int:
    try:
        rep = history_report(args.state_dir, args.source, time.time_ns())
    except (HistoryError, OSError) as exc:
        print(f"usbmirror history: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(rep, indent=2))
        return 0
    cap = rep["size_cap_bytes"]
    size = rep["size_bytes"]
    assert isinstance(size, int)
    print(f"source {args.source}: history {_size(size)} of "
          f"{_size(cap) if isinstance(cap, int) else 'an unknown cap'}"
          + (f", age cap {rep['age_cap_s']:.0f} s" if rep["age_cap_s"] else ""))
    print(f"oldest restorable: seq {rep['oldest_seq']} at {_iso(rep['oldest_time'])}"  # type: ignore[arg-type]
          if rep["oldest_seq"] is not None else "oldest restorable: none (a resync is running)")
    if rep["warning"]:
        print(f"warning: {rep['warning']}")
    pts = rep["points"]
    assert isinstance(pts, list)
    print(f"{len(pts)} points, newest first:")
    print(f"{'seq':>12}  {'time':<24}  {'kind':<5}  name")
    for p in pts:
        print(f"{p['seq']:>12}  {_iso(p['time']):<24}  {p['kind']:<5}  {p.get('name', '')}")
    return 0


# -- restore ----------------------------------------------------------------------------------------

def _sysfs_block(st: os.stat_result) -> str | None:
    """/sys path of a block device (a partition's path lies under its disk's)."""
    try:
        return os.path.realpath(f"/sys/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}")
    except OSError:
        return None


def _same_storage(a: os.stat_result, b: os.stat_result) -> bool:
    """`a` and `b` are the same file, the same block device, or a disk and one of its partitions."""
    if stat.S_ISBLK(a.st_mode) and stat.S_ISBLK(b.st_mode):
        if a.st_rdev == b.st_rdev:
            return True
        pa, pb = _sysfs_block(a), _sysfs_block(b)
        return bool(pa and pb and (pa.startswith(pb + "/") or pb.startswith(pa + "/")))
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _mounted(st: os.stat_result) -> str | None:
    """Where the block device `st` (or a partition of it) is mounted, if it is."""
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    for ln in lines:
        parts = ln.split()
        if len(parts) < 2 or not parts[0].startswith("/dev/"):
            continue
        try:
            mst = os.stat(parts[0])
        except OSError:
            continue
        if stat.S_ISBLK(mst.st_mode) and _same_storage(mst, st):
            return parts[1]
    return None


def check_destination(state_dir: str, to: str) -> None:
    """Refuse a `--to` that is a live target of this remote (any source), or a mounted disk."""
    try:
        dst = os.stat(to)
    except FileNotFoundError:
        return  # a new file: restore creates it
    except OSError as exc:
        raise HistoryError(f"cannot use {to}: {exc.strerror}") from None
    for sid in _sources(state_dir):
        try:
            target = Meta.decode((history_dir(state_dir, sid) / "meta.json").read_bytes()).target
            tst = os.stat(target)
        except (HistoryError, OSError):
            continue
        if _same_storage(dst, tst):
            raise HistoryError(f"{to} is the live target of source {sid!r} ({target}): restore never "
                               "overwrites a target; give a new file or another disk")
    if stat.S_ISBLK(dst.st_mode):
        where = _mounted(dst)
        if where is not None:
            raise HistoryError(f"{to} is mounted on {where}: unmount it first")
    elif not stat.S_ISREG(dst.st_mode):
        raise HistoryError(f"{to} is neither a block device nor a new file")


@dataclass(frozen=True, slots=True)
class RestoreResult:
    source: str
    what: str
    seq: int
    to: str
    bytes: int
    seconds: float

    def line(self) -> str:
        rate = self.bytes / max(self.seconds, 1e-6)
        return (f"restored source {self.source} at {self.what} to {self.to}: {_size(self.bytes)} in "
                f"{self.seconds:.1f} s ({_size(int(rate))}/s)")


def run_restore(state_dir: str, source: str, to: str, *, mark: str | None = None, at: str | None = None,
                seq: int | None = None, progress: Callable[[int, int], None] | None = None,
                chunk_bytes: int = RESTORE_CHUNK) -> RestoreResult:
    """Write the image of one point of `source`'s history to `to`; HistoryError says what is wrong
    (and then nothing was changed, except a block device `to` partly written on a write error)."""
    check_destination(state_dir, to)
    t0 = time.monotonic()
    with open_history(state_dir, source) as rd:
        res = resolve(rd.index, mark=mark, at=at, seq=seq)
        with ImageView(rd, res.start_id) as view:
            n = restore(view, to, progress=progress, chunk_bytes=chunk_bytes)
    return RestoreResult(source, res.what, res.seq, to, n, time.monotonic() - t0)


class _Bar:
    """A `rich` progress bar on stderr (nothing when stderr is not a terminal)."""

    def __init__(self, label: str, enabled: bool) -> None:
        self.label = label
        self.enabled = enabled
        self._p: Any = None
        self._task: Any = None

    def __enter__(self) -> _Bar:
        if self.enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._p = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
                               TransferSpeedColumn(), TimeRemainingColumn(), console=Console(stderr=True),
                               transient=True)
            self._p.start()
        return self

    def __call__(self, done: int, total: int) -> None:
        if self._p is None:
            return
        if self._task is None:
            self._task = self._p.add_task(self.label, total=total)
        self._p.update(self._task, completed=done, total=total)

    def __exit__(self, *exc: object) -> None:
        if self._p is not None:
            self._p.stop()


def cmd_restore(args: argparse.Namespace) -> int:
    try:
        with _Bar(f"restore {args.source}", sys.stderr.isatty() and not args.json) as bar:
            r = run_restore(args.state_dir, args.source, args.to, mark=args.mark, at=args.at, seq=args.seq,
                            progress=bar)
    except (HistoryError, OSError) as exc:
        print(f"usbmirror restore: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"source": r.source, "point": r.what, "seq": r.seq, "to": r.to, "bytes": r.bytes,
                          "seconds": round(r.seconds, 3)}))
    else:
        print(r.line())
    return 0


# -- expose -----------------------------------------------------------------------------------------

DEFAULT_SCRATCH = 1 << 30


@dataclass
class Exposure:
    """An image of one point served over USB/IP and/or iSCSI (see `exposed`)."""

    source: str
    what: str
    seq: int
    address: tuple[str, int] | None  # USB/IP
    busid: str
    store: ImageStore
    server: Any
    iscsi_address: tuple[str, int] | None = None
    iscsi_target: str = ""
    iscsi_chap: bool = False

    def line(self) -> str:
        mode = (f"writable, scratch overlay of {_size(self.store.scratch_cap)} thrown away at the end"
                if not self.store.read_only else "read-only")
        where = []
        if self.address is not None:
            where.append(f"over USB/IP on {self.address[0]}:{self.address[1]} busid {self.busid}")
        if self.iscsi_address is not None:
            where.append(f"over iSCSI on {self.iscsi_address[0]}:{self.iscsi_address[1]} target {self.iscsi_target}"
                         + (" (CHAP)" if self.iscsi_chap else ""))
        return f"exposing source {self.source} at {self.what} {' and '.join(where)} ({mode})"

    def end_line(self) -> str:
        extra = "" if self.store.read_only else f", {_size(self.store.scratch_used)} of scratch thrown away"
        return (f"exposure of source {self.source} at {self.what} ended: {self.store.reads} reads, "
                f"{self.store.writes} writes{extra}; the target and the history are unchanged")


@contextlib.contextmanager
def exposed(state_dir: str, source: str, usbip: tuple[str, int] | None, *, mark: str | None = None,
            at: str | None = None, seq: int | None = None, writable: bool = False,
            scratch_cap: int = DEFAULT_SCRATCH, busid: str = "1-1",
            iscsi: tuple[str, int] | None = None, iscsi_chap: tuple[str, str] | None = None) -> Iterator[Exposure]:
    """Serve the image of one point of `source`'s history over USB/IP and/or iSCSI until the block
    ends (over iSCSI one command at a time: the image store is not shared between threads). The
    view pins its point (trimming stops short of it) and follows the remote's applies, so the image
    stays fixed while replication goes on; with `writable`, writes go to a scratch overlay in
    `state_dir` (unlinked at once) and vanish at the end. `iscsi_chap`: (user, secret) an iSCSI
    initiator must prove at login."""
    from firmware.scsi import ScsiTarget, naa_locally_assigned
    from firmware.scsi.shared import SharedUnit
    from gadget.descriptors import DeviceIdentity
    from gadget.usbip_server import UsbipServer

    if usbip is None and iscsi is None:
        raise HistoryError("nothing to serve on: give --usbip, --iscsi or both")

    with contextlib.ExitStack() as stack:
        rd = stack.enter_context(open_history(state_dir, source))
        res = resolve(rd.index, mark=mark, at=at, seq=seq)
        view = stack.enter_context(ImageView(rd, res.start_id))
        store = stack.enter_context(ImageStore(view, scratch_dir=state_dir if writable else None,
                                               scratch_cap=scratch_cap))
        m = rd.meta
        digest = hashlib.sha256(f"{m.volume_uuid}:{m.generation}:{res.seq}:{os.getpid()}".encode()).digest()
        serial = digest[:6].hex().upper()
        shared = SharedUnit()  # one set of reservations for the image, whichever bus

        def new_lu() -> ScsiTarget:
            return ScsiTarget(store, product="usbmirror image", serial=serial,
                              device_id=naa_locally_assigned(digest[:8]), read_only=not writable, shared=shared)

        server: Any = None
        usbip_address: tuple[str, int] | None = None
        if usbip is not None:
            try:
                server = stack.enter_context(
                    UsbipServer.for_logical_unit(new_lu(), DeviceIdentity(serial=serial, product="usbmirror image"),
                                                 host=usbip[0], port=usbip[1], busid=busid))
            except OSError as exc:
                raise HistoryError(f"cannot listen on {usbip[0]}:{usbip[1]}: {exc.strerror}") from None
            usbip_address = (usbip[0], server.port)
        iscsi_address: tuple[str, int] | None = None
        iqn = ""
        if iscsi is not None:
            from firmware.iscsi.connection import TargetConfig
            from firmware.iscsi.server import IQN_PREFIX, IscsiServer

            iqn = f"{IQN_PREFIX}:image-{serial.lower()}"
            config = TargetConfig(target_name=iqn, portal="", alias=f"usbmirror image {serial}", chap=iscsi_chap)
            try:
                isrv = stack.enter_context(IscsiServer(config, new_lu, host=iscsi[0], port=iscsi[1],
                                                       reservations=shared.reservations))
            except OSError as exc:
                raise HistoryError(f"cannot listen on {iscsi[0]}:{iscsi[1]}: {exc.strerror}") from None
            iscsi_address = (iscsi[0], isrv.port)
            server = server if server is not None else isrv
        yield Exposure(source, res.what, res.seq, usbip_address, busid, store, server, iscsi_address, iqn,
                       iscsi_chap is not None)


def cmd_expose(args: argparse.Namespace) -> int:
    from firmware.stop_signals import install_stop_signals

    try:
        addr = parse_hostport(args.usbip) if args.usbip else None
        iscsi_addr = parse_hostport(args.iscsi) if args.iscsi else None
        cap = parse_size(args.scratch_size)
        chap = parse_chap(args.iscsi_chap, "--iscsi-chap") if args.iscsi_chap is not None else None
    except (ValueError, UsageError) as exc:
        print(f"usbmirror expose: {exc}", file=sys.stderr)
        return 2
    if addr is None and iscsi_addr is None:
        print("usbmirror expose: give --usbip HOST:PORT, --iscsi HOST:PORT or both", file=sys.stderr)
        return 2
    if chap is not None and iscsi_addr is None:
        print("usbmirror expose: --iscsi-chap needs --iscsi HOST:PORT", file=sys.stderr)
        return 2
    stop = install_stop_signals()
    try:
        with exposed(args.state_dir, args.source, addr, mark=args.mark, at=args.at, seq=args.seq,
                     writable=args.writable, scratch_cap=cap, busid=args.usbip_busid, iscsi=iscsi_addr,
                     iscsi_chap=chap) as ex:
            print(ex.line(), flush=True)
            stop.wait()
            end = ex.end_line()
    except (HistoryError, OSError) as exc:
        print(f"usbmirror expose: {exc}", file=sys.stderr)
        return 1
    print(end, flush=True)
    return 0


def _add_point_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--mark", metavar="NAME", help="the image at the newest mark of that name")
    g.add_argument("--at", metavar="TIME", help="every write the local unit acknowledged up to TIME and none "
                   "after (ISO 8601, UTC without a zone, or seconds since the epoch)")
    g.add_argument("--seq", type=int, metavar="N", help="the image just after journal record N")


def register(sub: Any, commands: dict[str, Any]) -> None:
    """Add the commands to the `usbmirror` subparsers and the dispatch table."""
    mp = sub.add_parser("mark", help="put a named restore point into a local unit's journal",
                        description="Put a named bookmark into the journal at the current position. It is "
                        "durable in the local journal when this returns (also while remotes are unreachable) "
                        "and reaches every remote in order; `usbmirror restore --mark NAME` on a remote gives "
                        "the disk as it was then.")
    mp.add_argument("name", metavar="NAME", help="the mark's name (1..200 bytes)")
    mp.add_argument("--state-dir", default=DEFAULT_STATE_DIR, metavar="DIR", help="the local unit's state dir")
    mp.add_argument("--json", action="store_true", help="machine-readable output")
    commands["mark"] = cmd_mark
    hp = sub.add_parser("history", help="list the restore points a remote unit holds for a source",
                        description="List the points of one source's history on a remote unit, newest first "
                        "(seq, time, kind flush|mark, name), the oldest time that can still be restored and the "
                        "history's size against its cap. Reads the files directly; the remote may be running.")
    hp.add_argument("--state-dir", default=DEFAULT_STATE_DIR, metavar="DIR", help="the remote unit's state dir")
    hp.add_argument("--source", required=True, metavar="ID", help="the source (local unit) id")
    hp.add_argument("--json", action="store_true", help="machine-readable output")
    commands["history"] = cmd_history
    rp = sub.add_parser("restore", help="write a source's disk as it was at a point of its history",
                        description="On a remote unit, write the image of one point of a source's history "
                        "(--mark, --at or --seq) to a new file or a block device. The remote may keep applying "
                        "meanwhile: the image written is the one of that point. The live target is never "
                        "overwritten, nor a mounted disk; on a failure (a full disk) a new file is removed.")
    rp.add_argument("--state-dir", default=DEFAULT_STATE_DIR, metavar="DIR", help="the remote unit's state dir")
    rp.add_argument("--source", required=True, metavar="ID", help="the source (local unit) id")
    _add_point_args(rp)
    rp.add_argument("--to", required=True, metavar="PATH", help="a new file, or a block device at least as large")
    rp.add_argument("--json", action="store_true", help="machine-readable summary")
    commands["restore"] = cmd_restore
    ep = sub.add_parser("expose", help="serve a source's disk as it was at a point, at once, over USB/IP or iSCSI",
                        description="On a remote unit, serve the image of one point of a source's history "
                        "(--mark, --at or --seq) as a USB disk over USB/IP and/or as an iSCSI target for a "
                        "second host, without copying "
                        "anything first: reads come from the history where it holds an older block, else from "
                        "the target. The image stays fixed while replication goes on. --writable is a test "
                        "failover: writes go to a scratch overlay with its own cap and are thrown away when "
                        "expose stops (SIGINT or SIGTERM); the target and the history are never written.")
    ep.add_argument("--state-dir", default=DEFAULT_STATE_DIR, metavar="DIR", help="the remote unit's state dir")
    ep.add_argument("--source", required=True, metavar="ID", help="the source (local unit) id")
    _add_point_args(ep)
    ep.add_argument("--usbip", metavar="HOST:PORT", help="where to serve USB/IP "
                    "(no authentication: bind to 127.0.0.1 or a trusted network)")
    ep.add_argument("--iscsi", metavar="HOST:PORT", help="where to serve the image as an iSCSI target (without "
                    "--iscsi-chap bind to 127.0.0.1 or a trusted network); its name is printed")
    ep.add_argument("--iscsi-chap", metavar="USER:SECRET", help="with --iscsi: require CHAP at login with this "
                    "user and secret (12 to 255 characters)")
    ep.add_argument("--usbip-busid", default="1-1", metavar="BUSID", help="the exported bus id (default 1-1)")
    ep.add_argument("--writable", action="store_true", help="accept writes into a scratch overlay, thrown away "
                    "at the end")
    ep.add_argument("--scratch-size", default="1G", metavar="SIZE", help="cap of the scratch overlay (default 1G); "
                    "a write past it fails with DATA PROTECT, SPACE ALLOCATION FAILED")
    commands["expose"] = cmd_expose
