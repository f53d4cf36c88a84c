"""The point-in-time commands of `usbmirror`: `mark` (on a local unit), `history` (on a remote).

`usbmirror mark NAME --state-dir DIR` asks the local unit running with DIR, over its control
socket, to put a named restore point into the journal; it returns once the mark is durable in the
local journal and prints its seq. Remotes receive it in journal order.

`usbmirror history --state-dir DIR --source ID [--json]` reads the history files a remote unit
keeps in DIR for one source (also while that remote is running) and lists the points, newest first.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import time
from pathlib import Path
from typing import Any

from firmware.control import ControlError, request
from firmware.history import HistoryError, HistoryReader, history_dir, summary

DEFAULT_STATE_DIR = "/var/lib/usbmirror"
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_duration(text: str) -> float:
    """`90`, `90s`, `15m`, `24h`, `30d`, `2w` as seconds."""
    t = text.strip().lower()
    unit = _UNITS.get(t[-1:])
    num = t[:-1] if unit is not None else t
    try:
        v = float(num) * (unit or 1.0)
    except ValueError:
        raise ValueError(f"{text!r} is not a duration (like 90s, 15m, 24h, 30d)") from None
    if v <= 0:
        raise ValueError(f"{text!r}: a duration is more than zero")
    return v


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
