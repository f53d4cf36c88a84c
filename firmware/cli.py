"""The `usbmirror` command: serve a local unit, run a remote unit, pair units, report status.

Every option of `local`, `remote` and `selftest` is also a key of the TOML file given with
`--config` (spelled with dashes or underscores); the command line wins over the file.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from firmware import __version__, history_cli
from firmware.replication.spec import RemoteSpec

log = logging.getLogger("usbmirror")

DEFAULT_STATE_DIR = "/var/lib/usbmirror"


class UsageError(Exception):
    """Bad options or config: printed as one line, exit status 2."""


# ---------------------------------------------------------------------------------------------
# options shared by the command line and the config file


@dataclass(frozen=True)
class Opt:
    flag: str
    help: str
    default: Any = None
    kind: Callable[[str], Any] = str
    multiple: bool = False
    choices: Sequence[str] | None = None
    metavar: str | None = None
    nargs: str | None = None
    const: Any = None

    @property
    def key(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


def _add_opts(p: argparse.ArgumentParser, opts: Sequence[Opt]) -> None:
    for o in opts:
        kw: dict[str, Any] = {"help": o.help, "default": None, "dest": o.key}
        if o.multiple:
            kw["action"] = "append"
        if o.choices:
            kw["choices"] = o.choices
        if o.metavar:
            kw["metavar"] = o.metavar
        if o.nargs:
            kw["nargs"] = o.nargs
            kw["const"] = o.const
        p.add_argument(o.flag, **kw)


def _load_config(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise UsageError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config file {path} is not valid TOML: {exc}") from None
    return {k.replace("-", "_"): v for k, v in raw.items()}


def _merge(ns: argparse.Namespace, opts: Sequence[Opt], cfg: dict[str, Any], *, extra: Sequence[str] = ()) -> dict[str, Any]:
    """CLI value, else config value, else default. Unknown config keys are an error."""
    known = {o.key for o in opts} | {"config", *extra}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise UsageError(f"unknown config key(s): {', '.join(unknown)}")
    out: dict[str, Any] = {}
    for o in opts:
        v = getattr(ns, o.key, None)
        if v is None:
            v = cfg.get(o.key)
            if v is not None and o.multiple and not isinstance(v, list):
                v = [v]
            if v is not None and not o.multiple and not isinstance(v, (bool, int, float)):
                v = str(v)
        if v is None:
            v = o.default
        if v is not None and o.kind is not str and isinstance(v, str):
            try:
                v = o.kind(v)
            except ValueError as exc:
                raise UsageError(f"{o.flag}: {exc}") from None
        if v is not None and o.multiple:
            v = [o.kind(x) if isinstance(x, str) and o.kind is not str else x for x in v]
        if o.choices and v is not None and not o.multiple and str(v) not in o.choices:
            raise UsageError(f"{o.flag} must be one of {', '.join(o.choices)}, not {v!r}")
        out[o.key] = v
    for k in extra:
        if k in cfg:
            out[k] = cfg[k]
    return out


def _size(text: str) -> int:
    from firmware.volume import parse_size

    return parse_size(text)


def _hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


LOCAL_OPTS = [
    Opt("--volume", "the local disk served to the host: an image file (created sparse) or a block device",
        metavar="PATH"),
    Opt("--size", "size of the disk, e.g. 64M, 32G, 3T (needed to create an image file)", kind=_size,
        metavar="SIZE"),
    Opt("--block-size", "logical block size the host sees: 512 (default) or 4096", default=512, kind=int,
        metavar="BYTES"),
    Opt("--journal", "the flash journal: a file (created and pre-written) or a partition; default "
        "<state-dir>/journal", metavar="PATH"),
    Opt("--journal-size", "journal size when it is created (default 256M)", default="256M", kind=_size,
        metavar="SIZE"),
    Opt("--write-cache", "off (default): a WRITE completes once durable in the journal; on: WRITEs may "
        "complete from RAM and become durable at the next SYNCHRONIZE CACHE or FUA write",
        default="off", choices=("on", "off")),
    Opt("--throttle-start", "journal fill (0..1) at which acknowledgements start to slow down",
        default=0.8, kind=float, metavar="FRACTION"),
    Opt("--throttle-max-delay-ms", "longest delay added to one acknowledgement when the journal is "
        "nearly full", default=20.0, kind=float, metavar="MS"),
    Opt("--throttle-resume", "after an overflow, journaling resumes once the fill is at or below this",
        default=0.5, kind=float, metavar="FRACTION"),
    Opt("--journal-salvage", "start even if the journal holds a damaged record: cut it there, report what "
        "was lost and resync every remote in full (default off: refuse to start and name the record)",
        default="off", choices=("on", "off")),
    Opt("--usbip", "serve the disk over USB/IP on this address (e.g. 127.0.0.1:3240)", metavar="HOST:PORT"),
    Opt("--usbip-busid", "bus id the USB/IP server exports", default="1-1", metavar="BUSID"),
    Opt("--iscsi", "serve the disk as an iSCSI target on this address (e.g. 0.0.0.0:3260)", metavar="HOST:PORT"),
    Opt("--iscsi-chap", "require CHAP at iSCSI login with this user and secret (12 to 255 characters; "
        "prefer the TOML key iscsi_chap, a command line is visible to other users)", metavar="USER:SECRET"),
    Opt("--iscsi-initiator", "iSCSI initiator name allowed to log in; repeat for several (default: any)",
        multiple=True, metavar="IQN"),
    Opt("--iscsi-with-usb", "on: serve over iSCSI and USB at once (only for hosts that coordinate access "
        "themselves, e.g. a cluster file system or persistent reservations); default off: refused",
        default="off", choices=("on", "off")),
    Opt("--gadget", "serve through the kernel's USB gadget stack on this UDC (the first one when given "
        "no name)", nargs="?", const="", metavar="UDC"),
    Opt("--vendor-id", "USB vendor id (hex)", default="0x1209", metavar="HEX"),
    Opt("--product-id", "USB product id (hex)", default="0x0001", metavar="HEX"),
    Opt("--acm-console", "with --gadget, add a read-only status console on a USB serial port",
        default="off", choices=("on", "off")),
    Opt("--source-id", "this unit's name towards remote units (must match its certificate)",
        metavar="ID"),
    Opt("--remote", "mirror to a remote unit; repeat for several. Append ,mode=sync to acknowledge the "
        "host only once that remote has the write", multiple=True, metavar="HOST:PORT[,mode=async|sync]"),
    Opt("--tls-dir", "directory made by `usbmirror pair` holding the CA and this unit's certificate",
        metavar="DIR"),
    Opt("--bandwidth-limit", "cap on replication bandwidth per remote, e.g. 10M (bytes/s); a remote's own "
        "bandwidth_limit overrides it", kind=_size, metavar="RATE"),
    Opt("--sync-timeout", "a sync remote unreachable this long stops holding host writes (status shows it "
        "degraded) rather than hanging the host; keep it well under the host's SCSI command timeout (30 s on "
        "Linux)", default=15.0, kind=float, metavar="SECONDS"),
    Opt("--progress", "draw resync progress bars on the terminal: auto (when stderr is a terminal), on, off",
        default="auto", choices=("auto", "on", "off")),
    Opt("--state-dir", f"holds the unit's identity, control socket and state (default {DEFAULT_STATE_DIR})",
        default=DEFAULT_STATE_DIR, metavar="DIR"),
    Opt("--metrics", "serve Prometheus metrics at http://HOST:PORT/metrics (docs/OPERATIONS.md)",
        metavar="HOST:PORT"),
]

REMOTE_OPTS = [
    Opt("--listen", "address to accept source units on (default 0.0.0.0:7373)", default="0.0.0.0:7373",
        metavar="HOST:PORT"),
    Opt("--name", "this remote unit's name (must match its certificate)", metavar="NAME"),
    Opt("--target", "where a source's data goes: a file, partition, disk or md device; repeat per "
        "source", multiple=True, metavar="ID=PATH"),
    Opt("--tls-dir", "directory made by `usbmirror pair` holding the CA and this unit's certificate",
        metavar="DIR"),
    Opt("--state-dir", f"holds state and the control socket (default {DEFAULT_STATE_DIR})",
        default=DEFAULT_STATE_DIR, metavar="DIR"),
    Opt("--metrics", "serve Prometheus metrics at http://HOST:PORT/metrics (docs/OPERATIONS.md)",
        metavar="HOST:PORT"),
    Opt("--history-size", "point-in-time history kept per source (default 1G), see "
        "docs/HISTORY.md", default="1G", kind=_size, metavar="SIZE"),
    Opt("--history-age", "drop history older than this (default 24h)", default="24h",
        kind=history_cli.parse_duration, metavar="DURATION"),
]

SELFTEST_OPTS = LOCAL_OPTS  # the self-test reads the local unit's own options and config file


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
    _add_opts(lp, LOCAL_OPTS)

    rp = sub.add_parser(
        "remote", help="run a remote unit: accept source units and apply their journals",
        description="Accept TLS connections from source units and apply each source's journal, in order, "
        "to its own target. An unknown source is refused.",
    )
    rp.add_argument("--config", metavar="FILE", help="TOML file; every option is also a key; targets may "
                    "be a [targets] table of ID = PATH")
    _add_opts(rp, REMOTE_OPTS)

    sp = sub.add_parser("status", help="show a running unit's state",
                        description="Ask the unit running with --state-dir for its state.")
    sp.add_argument("--state-dir", default=DEFAULT_STATE_DIR, metavar="DIR",
                    help=f"the unit's state dir (default {DEFAULT_STATE_DIR})")
    sp.add_argument("--json", action="store_true", help="machine-readable output")

    pp = sub.add_parser("pair", help="create a private CA and certificates for a remote and its sources",
                        description="Write a CA and one certificate and key per unit into DIR. Copy DIR "
                        "(or the files each unit needs) to the units and give it as --tls-dir.")
    pp.add_argument("dir", metavar="DIR")
    pp.add_argument("--remote", metavar="NAME", help="name of the remote unit")
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
    _add_opts(tp, SELFTEST_OPTS)
    history_cli.register(sub, COMMANDS)
    return p


# ---------------------------------------------------------------------------------------------
# commands


RemoteEntry = RemoteSpec  # the one remote spec (firmware.replication.spec)


def parse_remote(spec: str | dict[str, Any]) -> RemoteEntry:
    """`HOST:PORT[,mode=async|sync][,name=N]` or a `[[remote]]` table."""
    if isinstance(spec, dict):
        d = {k.replace("-", "_"): v for k, v in spec.items()}
        if "address" not in d:
            raise UsageError("a [[remote]] table needs an address")
        addr = str(d.pop("address"))
        mode = str(d.pop("mode", "async"))
        name = d.pop("name", None)
        extra = d
    else:
        parts = spec.split(",")
        addr, mode, name, extra = parts[0], "async", None, {}
        for part in parts[1:]:
            k, sep, v = part.partition("=")
            if not sep:
                raise UsageError(f"--remote {spec}: expected key=value after the address, got {part!r}")
            if k == "mode":
                mode = v
            elif k == "name":
                name = v
            else:
                extra[k] = v
    unknown = sorted(set(extra) - {"bandwidth_limit"})
    if unknown:
        raise UsageError(f"remote {addr}: unknown setting(s) {', '.join(unknown)} (known: mode, name, bandwidth_limit)")
    if "bandwidth_limit" in extra:
        try:
            extra["bandwidth_limit"] = _size(str(extra["bandwidth_limit"]))
        except ValueError as exc:
            raise UsageError(f"remote {addr}: bandwidth_limit: {exc}") from None
    if mode not in ("async", "sync"):
        raise UsageError(f"remote {addr}: mode must be async or sync, not {mode!r}")
    try:
        hp = _hostport(addr)
    except ValueError as exc:
        raise UsageError(f"remote: {exc}") from None
    return RemoteSpec(hp, mode, str(name) if name else None,
                      extra.get("bandwidth_limit"), extra)


def remote_entries(o: dict[str, Any]) -> list[RemoteEntry]:
    """The merged `remote` option (command line, else the config's `remote` string, list or
    `[[remote]]` tables) as entries."""
    return [parse_remote(r) for r in o["remote"] or []]


def _ask_unit(command: str, state_dir: str, req: dict[str, Any], *, timeout: float = 10.0) -> dict[str, Any] | None:
    """Send `req` to the unit's control socket; print one line and return None when that fails."""
    from firmware.control import ControlError, request

    try:
        ans = request(state_dir, req, timeout=timeout)
    except ControlError as exc:
        print(f"usbmirror {command}: {exc}", file=sys.stderr)
        return None
    if not ans.get("ok"):
        print(f"usbmirror {command}: {ans.get('error')}", file=sys.stderr)
        return None
    ans.pop("ok", None)
    return ans


def cmd_status(args: argparse.Namespace) -> int:
    ans = _ask_unit("status", args.state_dir, {"cmd": "status"})
    if ans is None:
        return 1
    if args.json:
        print(json.dumps(ans, indent=2, sort_keys=True, default=str))
    else:
        print(render_status(ans))
    return 0


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def render_status(st: dict[str, Any]) -> str:
    who = st.get("unit_uuid") or st.get("name") or "?"
    lines = [f"{st.get('role', 'unit')} unit {who}  (pid {st.get('pid', '?')}, "
             f"up {st.get('uptime_s', 0):.0f} s)"]
    vol = st.get("volume")
    if isinstance(vol, dict):
        lines.append(f"  volume   {vol.get('path')}  {_human(vol.get('size_bytes', 0))}  "
                     f"{vol.get('block_size')}-byte blocks")
    j = st.get("journal")
    if isinstance(j, dict):
        cap, used = j.get("capacity_bytes", 0) or 0, j.get("used_bytes", 0) or 0
        pct = 100.0 * used / cap if cap else 0.0
        lines.append(f"  journal  {_human(used)} of {_human(cap)} used ({pct:.1f}%)  head seq "
                     f"{j.get('head_seq')}  tail seq {j.get('tail_seq')}  durable seq {j.get('durable_seq')}")
        age = j.get("oldest_unconfirmed_age_s")
        lines.append(f"           write cache {j.get('write_cache', st.get('write_cache', '?'))}  "
                     f"oldest unconfirmed record {(f'{age:.1f} s') if age is not None else 'none'}  "
                     f"overflow {'YES' if j.get('overflow') else 'no'}"
                     + (f" ({j.get('dirty_regions')} dirty regions)" if j.get("overflow") else ""))
    for tr in st.get("transports", []) or []:
        lines.append(f"  {'iscsi' if tr.startswith('iscsi') else 'usb':<8} {tr}")
    isc = st.get("iscsi")
    if isinstance(isc, dict):
        lines.append(f"           {isc.get('target')}  chap {'on' if isc.get('chap') else 'off'}  "
                     f"{len(isc.get('sessions') or [])} sessions  logins {isc.get('logins')}  "
                     f"refused {isc.get('logins_refused')}")
        for sess in isc.get("sessions") or []:
            lines.append(f"           session {sess.get('initiator')} from {sess.get('peer')}  "
                         f"{sess.get('phase')}  in flight {sess.get('in_flight')}")
    for r in st.get("remotes", []) or []:
        lines.append(f"  remote   {r.get('address')}  {r.get('state')}  mode {r.get('mode')}  acked seq "
                     f"{r.get('acked_seq')}  lag {_human(r.get('lag_bytes') or 0)}"
                     + ("  DEGRADED (host writes acknowledged without it)" if r.get("degraded") else "")
                     + (f"  last error: {r['last_error']}" if r.get("last_error") else ""))
    for s in st.get("sources", []) or []:
        lines.append(f"  source   {s.get('source_id')}  {s.get('state')}  applied seq {s.get('applied_seq')}"
                     f"  target {s.get('target')}" + (f"  last error: {s['last_error']}" if s.get("last_error") else ""))
    if st.get("cert_expires"):
        lines.append(f"  tls      certificate valid until {st['cert_expires']}")
    for w in st.get("warnings", []) or []:
        lines.append(f"  WARNING  {w}")
    return "\n".join(lines)


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
    written = pairing.pair(Path(args.dir), args.remote, list(args.source))
    for p in written or []:
        print(p)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    ans = _ask_unit("verify", args.state_dir, {"cmd": "verify"}, timeout=3600)
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
    ans = _ask_unit("rollback", args.state_dir, {"cmd": "rollback", "source": args.source}, timeout=3600)
    if ans is None:
        return 2
    if ans.get("rolled_back"):
        print(f"{args.source}: restored the consistent image from before the incomplete resync")
        return 0
    print(f"{args.source}: nothing to roll back (no incomplete resync with an undo log)")
    return 1


def _install_stop_signals() -> threading.Event:
    """SIGINT/SIGTERM set the returned event.

    The event is set from a watcher thread woken through `signal.set_wakeup_fd`, never from the
    Python signal handler itself: a handler runs in the main thread, possibly while that thread holds
    the event's own lock inside `Event.wait()`, and setting the event there would deadlock.
    """
    import socket

    stop = threading.Event()
    rsock, wsock = socket.socketpair()
    wsock.setblocking(False)
    signal.set_wakeup_fd(wsock.fileno(), warn_on_full_buffer=False)

    def _on_signal(signum: int, frame: object) -> None:
        pass  # the wakeup fd has already been written; the watcher does the rest

    def _watch() -> None:
        while True:
            data = rsock.recv(64)
            if not data:
                return
            for signum in data:
                if signum in (signal.SIGINT, signal.SIGTERM):
                    log.info("signal %s: stopping", signal.Signals(signum).name)
                    stop.set()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    threading.Thread(target=_watch, name="signals", daemon=True).start()
    # keep the socket pair alive as long as the event
    stop._wakeup_socks = (rsock, wsock)  # type: ignore[attr-defined]
    return stop


def cmd_local(args: argparse.Namespace) -> int:
    cfg = _load_config(args.config)
    o = _merge(args, LOCAL_OPTS, cfg)
    remotes = remote_entries(o)
    if not o["volume"]:
        raise UsageError("local: --volume is required (a file or block device)")
    if not o["usbip"] and o["gadget"] is None and not o["iscsi"]:
        raise UsageError("local: give --usbip HOST:PORT, --gadget [UDC] and/or --iscsi HOST:PORT so the host "
                         "can reach the disk")
    iscsi = _iscsi_options(o)
    from firmware.local_main import LocalOptions, run_local

    opts = LocalOptions(
        volume=o["volume"], size=o["size"], block_size=o["block_size"], journal=o["journal"],
        journal_size=o["journal_size"], write_cache=o["write_cache"] == "on",
        throttle_start=o["throttle_start"], throttle_max_delay_ms=o["throttle_max_delay_ms"],
        throttle_resume=o["throttle_resume"], journal_salvage=o["journal_salvage"] == "on",
        usbip=_hostport(o["usbip"]) if o["usbip"] else None, usbip_busid=o["usbip_busid"],
        gadget=o["gadget"], vendor_id=int(str(o["vendor_id"]), 16), product_id=int(str(o["product_id"]), 16),
        acm_console=o["acm_console"] == "on", source_id=o["source_id"], remotes=remotes,
        tls_dir=o["tls_dir"], bandwidth_limit=o["bandwidth_limit"], state_dir=o["state_dir"],
        sync_timeout=o["sync_timeout"],
        progress=o["progress"] == "on" or (o["progress"] == "auto" and sys.stderr.isatty()),
        metrics=_metrics_listen(o["metrics"]),
        **iscsi,
    )
    stop = _install_stop_signals()
    return run_local(opts, stop)


def _iscsi_options(o: dict[str, Any]) -> dict[str, Any]:
    """The iSCSI part of LocalOptions, checked: CHAP form, and USB beside iSCSI only when asked for."""
    if not o["iscsi"]:
        if o["iscsi_chap"] or o["iscsi_initiator"]:
            raise UsageError("local: --iscsi-chap and --iscsi-initiator need --iscsi HOST:PORT")
        return {}
    if (o["usbip"] or o["gadget"] is not None) and o["iscsi_with_usb"] != "on":
        raise UsageError("local: --iscsi beside --usbip/--gadget lets two hosts write the same volume without "
                         "knowing of each other; give --iscsi-with-usb on only if they coordinate (cluster)")
    chap = None
    if o["iscsi_chap"]:
        user, sep, secret = str(o["iscsi_chap"]).partition(":")
        if not sep or not user or not 12 <= len(secret) <= 255:
            raise UsageError("--iscsi-chap expects USER:SECRET with a secret of 12 to 255 characters")
        chap = (user, secret)
    return {"iscsi": _hostport(o["iscsi"]), "iscsi_chap": chap,
            "iscsi_initiators": tuple(o["iscsi_initiator"] or ())}


def cmd_remote(args: argparse.Namespace) -> int:
    cfg = _load_config(args.config)
    o = _merge(args, REMOTE_OPTS, cfg, extra=("targets",))
    targets: dict[str, str] = {}
    for t in o.get("target") or []:
        sid, sep, path = str(t).partition("=")
        if not sep or not sid or not path:
            raise UsageError(f"--target expects ID=PATH, got {t!r}")
        targets[sid] = path
    if isinstance(o.get("targets"), dict):
        for sid, path in o["targets"].items():
            targets.setdefault(str(sid), str(path))
    if not o["name"]:
        raise UsageError("remote: --name is required")
    if not targets:
        raise UsageError("remote: give at least one --target ID=PATH")
    if not o["tls_dir"]:
        raise UsageError("remote: --tls-dir is required (make one with `usbmirror pair`)")
    from firmware.remote_main import run_remote

    stop = _install_stop_signals()
    return run_remote(listen=_hostport(o["listen"]), name=o["name"], targets=targets,
                      tls_dir=o["tls_dir"], state_dir=o["state_dir"], stop=stop,
                      history_size=int(o["history_size"]), history_age_s=float(o["history_age"]),
                      metrics=_metrics_listen(o["metrics"]))


def _metrics_listen(text: str | None) -> tuple[str, int] | None:
    from firmware.metrics import parse_listen

    try:
        return parse_listen(text) if text else None
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def cmd_selftest(args: argparse.Namespace) -> int:
    cfg = _load_config(args.config)
    o = _merge(args, SELFTEST_OPTS, cfg)
    from firmware.selftest import run_selftest_cli

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
    # run firmware.cli (not this __main__ copy) so UsageError raised by local_main/remote_main is caught
    from firmware.cli import main as _main

    sys.exit(_main())
