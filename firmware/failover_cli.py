"""The role commands of `usbmirror`: `promote` and `failback` (on a remote unit), `resolve` (either).

`usbmirror promote --state-dir REMOTE_STATE --source ID (--usbip HOST:PORT | --iscsi HOST:PORT
[--iscsi-chap USER:SECRET] | --gadget [UDC]) [--mark NAME | --at TIME | --seq N] [--force]` asks the
remote unit running with REMOTE_STATE, over its control socket, to make its copy of source ID
primary and serve it read-write to a standby host over USB/IP, iSCSI or the board's USB gadget. It
prints what is at stake (how far behind the copy was) and where it is served; docs/FAILOVER.md has
the details.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from firmware.config import DEFAULT_STATE_DIR
from firmware.control import ask_unit


def cmd_promote(args: argparse.Namespace) -> int:
    req: dict[str, Any] = {"cmd": "promote", "source": args.source, "busid": args.usbip_busid, "force": args.force}
    buses = [b for b in ("usbip", "iscsi", "gadget") if getattr(args, b) is not None]
    if len(buses) != 1:
        print("usbmirror promote: give exactly one of --usbip HOST:PORT, --iscsi HOST:PORT or --gadget [UDC] "
              "(where the standby host finds the disk)", file=sys.stderr)
        return 2
    if args.iscsi_chap is not None and args.iscsi is None:
        print("usbmirror promote: --iscsi-chap needs --iscsi HOST:PORT", file=sys.stderr)
        return 2
    for k in ("usbip", "iscsi", "iscsi_chap", "gadget", "mark", "at", "seq"):
        if getattr(args, k) is not None:
            req[k] = getattr(args, k)
    ans = ask_unit("promote", args.state_dir, req, timeout=3600.0)
    if ans is None:
        return 1
    if args.json:
        print(json.dumps(ans, indent=2, sort_keys=True))
        return 0
    print(f"warning: {ans['warning']}", file=sys.stderr)
    if ans.get("iscsi"):
        where = (f"over iSCSI on {ans['iscsi']} target {ans['iscsi_target']}"
                 + (" (CHAP)" if ans.get("iscsi_chap") else ""))
    elif ans.get("gadget") is not None:
        where = f"through the USB gadget on UDC {ans.get('udc') or ans['gadget']}"
    else:
        where = f"over USB/IP on {ans['usbip']} busid {ans['busid']}"
    print(f"promoted source {ans['source']} at {ans['point']}: primary in generation {ans['generation']}, "
          f"served read-write {where}; this remote refuses the old local unit's writes from now on")
    return 0


def cmd_failback(args: argparse.Namespace) -> int:
    req = {"cmd": "failback", "source": args.source, "timeout": args.timeout}
    ans = ask_unit("failback", args.state_dir, req, timeout=args.timeout + 30.0)
    if ans is None:
        return 1
    if args.json:
        print(json.dumps(ans, indent=2, sort_keys=True))
        return 0 if ans.get("done") else 1
    if not ans.get("done"):
        print(f"usbmirror failback: source {ans['source']} is no longer served here; the local unit has not "
              f"taken it back within {args.timeout:.0f} s (it does when it next reaches this remote; see status)",
              file=sys.stderr)
        return 1
    print(f"failed back source {ans['source']}: the local unit is primary again and this remote is its replica")
    return 0


def cmd_resolve(args: argparse.Namespace) -> int:
    req = {"cmd": "resolve", "source": args.source, "keep": args.keep, "dry_run": args.dry_run}
    ans = ask_unit("resolve", args.state_dir, req, timeout=600.0)
    if ans is None:
        return 1
    if args.json:
        print(json.dumps(ans, indent=2, sort_keys=True))
    else:
        print(ans["message"] + (" (dry run: nothing changed)" if args.dry_run else ""))
    return 0


def register(sub: Any, commands: dict[str, Callable[[argparse.Namespace], int]]) -> None:
    pp = sub.add_parser("promote", help="on a remote unit, make its copy of a source primary and serve it",
                        description="Switchover: the running remote unit makes its copy of a source primary (a new "
                        "data generation, recorded before anything is served) and serves it read-write to a "
                        "standby host on one bus: USB/IP (--usbip), iSCSI (--iscsi, the same target as "
                        "`usbmirror local --iscsi`) or, on a board, the USB gadget (--gadget). Refused while the "
                        "source is connected and healthy. With --mark, --at or --seq the copy is first rolled back "
                        "to that point of its history. From then on the remote refuses the old local unit's "
                        "writes, also after a restart (it serves the copy again the same way when it starts); "
                        "`usbmirror failback` stops serving it and hands it back.")
    pp.add_argument("--state-dir", default=DEFAULT_STATE_DIR, metavar="DIR", help="the remote unit's state dir")
    pp.add_argument("--source", required=True, metavar="ID", help="the source (local unit) id")
    pp.add_argument("--usbip", metavar="HOST:PORT", help="serve the copy over USB/IP here "
                    "(no authentication: bind to 127.0.0.1 or a trusted network)")
    pp.add_argument("--usbip-busid", default="1-1", metavar="BUSID", help="the exported bus id (default 1-1)")
    pp.add_argument("--iscsi", metavar="HOST:PORT", help="serve the copy as an iSCSI target here (e.g. "
                    "0.0.0.0:3260); its name (IQN) and portal are printed and shown in status")
    pp.add_argument("--iscsi-chap", metavar="USER:SECRET", help="with --iscsi: require CHAP at login with this "
                    "user and secret (12 to 255 characters); the remote keeps it in its state dir (mode 0600) to "
                    "serve with it again after a restart")
    pp.add_argument("--gadget", nargs="?", const="", metavar="UDC", help="on a board: serve the copy as a USB "
                    "disk through configfs and FunctionFS (as `usbmirror local --gadget` does), bound to UDC or "
                    "the first one; needs root, libcomposite and FunctionFS")
    g = pp.add_mutually_exclusive_group()
    g.add_argument("--mark", metavar="NAME", help="roll back to the newest mark of that name first")
    g.add_argument("--at", metavar="TIME", help="roll back to every write the local unit acknowledged up to TIME "
                   "and none after (ISO 8601, UTC without a zone, or seconds since the epoch)")
    g.add_argument("--seq", type=int, metavar="N", help="roll back to the image just after record N")
    pp.add_argument("--force", action="store_true", help="also when a resync is incomplete: roll it back to the "
                    "image from before it and promote that; or when a power cut may have left torn writes the source has "
                    "not sent again: promote the target as it is")
    pp.add_argument("--json", action="store_true", help="machine-readable output")
    commands["promote"] = cmd_promote
    fp = sub.add_parser("failback", help="on a remote unit, hand a promoted source back to its local unit",
                        description="Planned failback: the remote stops serving its promoted copy to the standby "
                        "host, the old local unit (a replica) pulls the blocks that differ, becomes primary again "
                        "in a new data generation and serves its host, and replication to this remote resumes. "
                        "Waits until the local unit took over (or --timeout).")
    fp.add_argument("--state-dir", default=DEFAULT_STATE_DIR, metavar="DIR", help="the remote unit's state dir")
    fp.add_argument("--source", required=True, metavar="ID", help="the source (local unit) id")
    fp.add_argument("--timeout", type=float, default=600.0, metavar="S", help="seconds to wait for the local "
                    "unit (default 600)")
    fp.add_argument("--json", action="store_true", help="machine-readable output")
    commands["failback"] = cmd_failback
    sp = sub.add_parser("resolve", help="end a split brain: keep the local unit's or the remote's data",
                        description="After a split brain (both sides wrote since they last agreed), decide which "
                        "copy is kept. Run it with the state dir of the side whose writes are discarded: --keep "
                        "local on the remote unit (its copy is resynced from the local unit), --keep remote on the "
                        "local unit (it becomes the remote's replica until `usbmirror failback`). --dry-run says "
                        "what would be discarded and changes nothing.")
    sp.add_argument("--state-dir", default=DEFAULT_STATE_DIR, metavar="DIR", help="the unit's state dir")
    sp.add_argument("--source", required=True, metavar="ID", help="the source (local unit) id")
    sp.add_argument("--keep", required=True, choices=("local", "remote"), help="the copy whose data is kept")
    sp.add_argument("--dry-run", action="store_true", help="say what would be discarded; change nothing")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    commands["resolve"] = cmd_resolve
