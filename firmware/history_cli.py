"""The point-in-time commands of `usbmirror`: `mark` (on a local unit), `history` (on a remote).

`usbmirror mark NAME --state-dir DIR` asks the local unit running with DIR, over its control
socket, to put a named restore point into the journal; it returns once the mark is durable in the
local journal and prints its seq. Remotes receive it in journal order.

`usbmirror history --state-dir DIR --source ID [--json]` reads the history files a remote unit
keeps in DIR for one source (also while that remote is running) and lists the points, newest first.

`usbmirror restore --state-dir DIR --source ID (--mark NAME | --at TIME | --seq N) --to PATH`
writes the image of one point to a new file or a block device (never the live target), with a
progress bar, while the remote keeps applying.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import stat
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from firmware.config import DEFAULT_STATE_DIR
from firmware.control import ControlError, request
from firmware.history import HistoryError, HistoryReader, ImageView, history_dir, resolve, restore, summary
from firmware.history.format import Meta
from firmware.history.view import RESTORE_CHUNK


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
