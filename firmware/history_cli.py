"""The point-in-time commands of `usbmirror`: `mark` (on a local unit).

`usbmirror mark NAME --state-dir DIR` asks the local unit running with DIR, over its control
socket, to put a named restore point into the journal; it returns once the mark is durable in the
local journal and prints its seq. Remotes receive it in journal order.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from firmware.control import ControlError, request

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
