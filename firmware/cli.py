"""The `usbmirror` command: serve a local unit, run a remote unit, pair units, report status.

The options and the config file are defined in `firmware.config`, the status text in
`firmware.status_text`; the units are brought up by `firmware.local_main` and `firmware.remote_main`.
Nothing below this module imports it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from firmware import __version__, failover_cli, history_cli
from firmware.config import (
    DEFAULT_STATE_DIR,
    LOCAL_OPTS,
    REMOTE_OPTS,
    SELFTEST_OPTS,
    UsageError,
    add_opts,
    load_config,
    local_options,
    merge_options,
    remote_entries,
    remote_options,
)
from firmware.control import ask_unit
from firmware.local_main import run_local
from firmware.remote_main import run_remote
from firmware.selftest import run_selftest_cli
from firmware.status_text import render_status
from firmware.stop_signals import install_stop_signals

log = logging.getLogger("usbmirror")

# ---------------------------------------------------------------------------------------------
# parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="usbmirror",
        description="Mirror a server's disk to remote units. A local unit is a USB disk to the server and "
        "journals every write on flash; remote units apply the journal to their drives.",
        epilog="Run `usbmirror COMMAND --help` for each command's options. Docs: README.md, docs/.",
    )
    p.add_argument("--version", action="version", version=f"usbmirror {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    lp = sub.add_parser(
        "local", help="run a local unit: serve the disk to the host and mirror it",
        description="Serve a disk to the host (over USB/IP and/or the USB gadget stack), journal every "
        "write on flash and ship the journal to remote units. Stops cleanly on SIGINT/SIGTERM.",
    )
    lp.add_argument("--config", metavar="FILE", help="TOML file; every option is also a key, remotes are "
                    "[[remote]] tables with address, mode, name")
    add_opts(lp, LOCAL_OPTS)

    rp = sub.add_parser(
        "remote", help="run a remote unit: accept source units and apply their journals",
        description="Accept TLS connections from source units and apply each source's journal, in order, "
        "to its own target. An unknown source is refused.",
    )
    rp.add_argument("--config", metavar="FILE", help="TOML file; every option is also a key; targets may "
                    "be a [targets] table of ID = PATH")
    add_opts(rp, REMOTE_OPTS)

    sp = sub.add_parser("status", help="show a running unit's state",
                        description="Ask the unit running with --state-dir for its state.")
    sp.add_argument("--state-dir", default=DEFAULT_STATE_DIR, metavar="DIR",
                    help=f"the unit's state dir (default {DEFAULT_STATE_DIR})")
    sp.add_argument("--json", action="store_true", help="machine-readable output")

    pp = sub.add_parser("pair", help="create a private CA and certificates for remotes and their sources",
                        description="Write a CA and one certificate and key per unit into DIR. Copy DIR "
                        "(or the files each unit needs) to the units and give it as --tls-dir.")
    pp.add_argument("dir", metavar="DIR")
    pp.add_argument("--remote", action="append", metavar="NAME",
                    help="name of a remote unit; repeat for several (a cascade: each relay uses its own)")
    pp.add_argument("--source", action="append", metavar="ID",
                    help="a source unit id; repeat for several")
    pp.add_argument("--revoke", metavar="NAME", help="add unit NAME's certificate to DIR/crl.pem (copy it to "
                    "every unit: checked at each handshake, no restart needed); NAME or remote:NAME / source:NAME")
    pp.add_argument("--renew", metavar="NAME", help="issue unit NAME a fresh key and certificate (copy both to it)")

    vp = sub.add_parser("verify", help="compare the local disk with every remote copy",
                        description="Compare local and remote by region checksums. Exit 0 only when every "
                        "remote matches; every difference is listed.")
    vp.add_argument("--state-dir", default=DEFAULT_STATE_DIR, metavar="DIR")
    vp.add_argument("--json", action="store_true", help="machine-readable output")

    bp = sub.add_parser("rollback", help="on a remote unit, restore a source's consistent image after an "
                        "incomplete resync",
                        description="While a resync is incomplete a remote keeps an undo log of the blocks it "
                        "overwrote. This restores the image from before the resync (a crash-consistent copy "
                        "from an earlier instant), e.g. to switch over while the source is gone for good. The "
                        "source then resyncs again when it reconnects.")
    bp.add_argument("--state-dir", default=DEFAULT_STATE_DIR, metavar="DIR", help="the remote unit's state dir")
    bp.add_argument("--source", required=True, metavar="ID", help="the source whose image to restore")

    tp = sub.add_parser("selftest", help="installation test of a unit",
                        description="Check the UDC and gadget binding, what the host has done so far, the "
                        "journal device and every remote; print a PASS/FAIL table.")
    tp.add_argument("--config", metavar="FILE")
    tp.add_argument("--json", action="store_true", help="machine-readable output")
    add_opts(tp, SELFTEST_OPTS)
    history_cli.register(sub, COMMANDS)
    failover_cli.register(sub, COMMANDS)
    return p


# ---------------------------------------------------------------------------------------------
# commands


def cmd_status(args: argparse.Namespace) -> int:
    ans = ask_unit("status", args.state_dir, {"cmd": "status"})
    if ans is None:
        return 1
    if args.json:
        print(json.dumps(ans, indent=2, sort_keys=True, default=str))
    else:
        print(render_status(ans))
    return 0


def cmd_pair(args: argparse.Namespace) -> int:
    from firmware import pairing

    if args.revoke or args.renew:
        if args.remote or args.source or (args.revoke and args.renew):
            raise UsageError("--revoke and --renew each stand alone (no --remote/--source)")
        try:
            written = [pairing.revoke(Path(args.dir), args.revoke)] if args.revoke \
                else pairing.renew(Path(args.dir), args.renew)
        except pairing.PairingError as exc:
            raise UsageError(str(exc)) from None
        for p in written:
            print(p)
        return 0
    if not args.remote or not args.source:
        raise UsageError("--remote and at least one --source are required (or --revoke / --renew NAME)")
    try:
        written = pairing.pair(Path(args.dir), list(args.remote), list(args.source))
    except pairing.PairingError as exc:
        raise UsageError(str(exc)) from None
    for p in written or []:
        print(p)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    ans = ask_unit("verify", args.state_dir, {"cmd": "verify"}, timeout=3600)
    if ans is None:
        return 2
    if args.json:
        print(json.dumps(ans, indent=2, sort_keys=True, default=str))
    else:
        for r in ans.get("remotes", []):
            diffs = r.get("differences", [])
            state = "MATCH" if r.get("match") else f"DIFFER ({len(diffs)} regions)"
            print(f"{r.get('address')}: {state}" + (f"  error: {r['error']}" if r.get("error") else ""))
            for d in diffs[:100]:
                print(f"    lba {d.get('lba')} +{d.get('count')}")
    return 0 if ans.get("remotes") and all(r.get("match") for r in ans["remotes"]) else 1


def cmd_rollback(args: argparse.Namespace) -> int:
    ans = ask_unit("rollback", args.state_dir, {"cmd": "rollback", "source": args.source}, timeout=3600)
    if ans is None:
        return 2
    if ans.get("rolled_back"):
        print(f"{args.source}: restored the consistent image from before the incomplete resync")
        return 0
    print(f"{args.source}: nothing to roll back (no incomplete resync with an undo log)")
    return 1


def cmd_local(args: argparse.Namespace) -> int:
    opts = local_options(merge_options(args, LOCAL_OPTS, load_config(args.config)))
    stop = install_stop_signals()
    return run_local(opts, stop)


def cmd_remote(args: argparse.Namespace) -> int:
    opts = remote_options(merge_options(args, REMOTE_OPTS, load_config(args.config), extra=("targets", "forwards")))
    stop = install_stop_signals()
    return run_remote(opts, stop)


def cmd_selftest(args: argparse.Namespace) -> int:
    o = merge_options(args, SELFTEST_OPTS, load_config(args.config))
    return run_selftest_cli(o, remote_entries(o), as_json=args.json)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "local": cmd_local,
    "remote": cmd_remote,
    "status": cmd_status,
    "pair": cmd_pair,
    "verify": cmd_verify,
    "rollback": cmd_rollback,
    "selftest": cmd_selftest,
}


def setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose < 0 else logging.INFO if verbose < 2 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    setup_logging(args.verbose)
    try:
        return COMMANDS[args.command](args)
    except UsageError as exc:
        print(f"usbmirror {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # one clear line for people; the traceback with -vv
        log.debug("failure", exc_info=True)
        print(f"usbmirror {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
