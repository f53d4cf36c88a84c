"""Configuration of the units: every option of `local`, `remote` and `selftest`, the TOML config
file, remote specs, and the checked option sets the bring-up modules take.

Every option is also a key of the TOML file given with `--config` (spelled with dashes or
underscores); the command line wins over the file. This module is used by the command line
(`firmware.cli`), the bring-up modules (`firmware.local_main`, `firmware.remote_main`) and the
self-test; it imports no unit, so none of them import each other through it.
"""

from __future__ import annotations

import argparse
import math
import sys
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from firmware.replication.spec import RemoteSpec
from firmware.volume import parse_size

DEFAULT_STATE_DIR = "/var/lib/usbmirror"
_DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_duration(text: str) -> float:
    """`90`, `90s`, `15m`, `24h`, `30d`, `2w` as seconds."""
    t = text.strip().lower()
    unit = _DURATION_UNITS.get(t[-1:])
    num = t[:-1] if unit is not None else t
    try:
        v = float(num) * (unit or 1.0)
    except ValueError:
        raise ValueError(f"{text!r} is not a duration (like 90s, 15m, 24h, 30d)") from None
    if v <= 0:
        raise ValueError(f"{text!r}: a duration is more than zero")
    return v


class UsageError(Exception):
    """Bad options or config: printed as one line, exit status 2."""


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


def add_opts(p: argparse.ArgumentParser, opts: Sequence[Opt]) -> None:
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


def load_config(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise UsageError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise UsageError(f"config file {path} cannot be read: {exc.strerror}") from None
    return parse_config(data, path)


def parse_config(data: bytes, name: str) -> dict[str, Any]:
    """The settings of a TOML config file's contents (`name` is for messages); UsageError when it is
    not UTF-8 or not valid TOML."""
    try:
        raw = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise UsageError(f"config file {name} is not UTF-8 text: byte {exc.start}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config file {name} is not valid TOML: {exc}") from None
    return {k.replace("-", "_"): v for k, v in raw.items()}


def merge_options(ns: argparse.Namespace, opts: Sequence[Opt], cfg: dict[str, Any], *,
                  extra: Sequence[str] = ()) -> dict[str, Any]:
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


def parse_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _address(o: dict[str, Any], key: str) -> tuple[str, int]:
    """Option `key` (`--key` on the command line) as HOST:PORT, or UsageError naming it."""
    try:
        return parse_hostport(str(o[key]))
    except ValueError as exc:
        raise UsageError(f"--{key.replace('_', '-')}: {exc}") from None


def _usb_id(o: dict[str, Any], key: str) -> int:
    """A USB vendor or product id given in hex (1209 or 0x1209)."""
    text = str(o[key])
    try:
        value = int(text, 16)
    except ValueError:
        value = -1
    if not 0 <= value <= 0xFFFF:
        raise UsageError(f"--{key.replace('_', '-')} expects a 16-bit hex id such as 1209, got {text!r}")
    return value


LOCAL_OPTS = [
    Opt("--volume", "the local disk served to the host: an image file (created sparse) or a block device",
        metavar="PATH"),
    Opt("--size", "size of the disk, e.g. 64M, 32G, 3T (needed to create an image file)", kind=parse_size,
        metavar="SIZE"),
    Opt("--block-size", "logical block size the host sees: 512 (default) or 4096", default=512, kind=int,
        metavar="BYTES"),
    Opt("--journal", "the flash journal: a file (created and pre-written) or a partition; default "
        "<state-dir>/journal", metavar="PATH"),
    Opt("--journal-size", "journal size when it is created (default 256M)", default="256M", kind=parse_size,
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
    Opt("--uas", "on: with --usbip, offer USB Attached SCSI (alternate setting 1) beside Bulk-Only, so a "
        "host with a UAS driver queues several commands at once (docs/UAS.md)", default="off",
        choices=("on", "off")),
    Opt("--iscsi", "serve the disk as an iSCSI target on this address (e.g. 0.0.0.0:3260)", metavar="HOST:PORT"),
    Opt("--iscsi-chap", "require CHAP at iSCSI login with this user and secret (12 to 255 characters; "
        "prefer the TOML key iscsi_chap, a command line is visible to other users)", metavar="USER:SECRET"),
    Opt("--iscsi-mutual-chap", "mutual CHAP: the name and secret the target proves to an initiator that "
        "asks it to authenticate (12 to 255 characters, not the --iscsi-chap secret); needs --iscsi-chap",
        metavar="USER:SECRET"),
    Opt("--iscsi-portal", "the address iSCSI discovery (SendTargets) tells initiators to log in at, e.g. "
        "the public address behind NAT (default: the address the initiator reached)", metavar="HOST:PORT"),
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
        "bandwidth_limit overrides it", kind=parse_size, metavar="RATE"),
    Opt("--sync-timeout", "a sync remote unreachable this long stops holding host writes (status shows it "
        "degraded) rather than hanging the host; keep it well under the host's SCSI command timeout (30 s on "
        "Linux)", default=15.0, kind=float, metavar="SECONDS"),
    Opt("--catch-up-interval", "a replica of a promoted remote pulls the blocks the promoted copy changed this "
        "often while that copy is served, so a failback has little left to move; 0 turns it off (the failback "
        "still pulls them all)", default=30.0, kind=float, metavar="SECONDS"),
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
    Opt("--history-size", "point-in-time history kept per source (default 1G), see "
        "docs/HISTORY.md", default="1G", kind=parse_size, metavar="SIZE"),
    Opt("--history-age", "drop history older than this (default 24h)", default="24h",
        kind=parse_duration, metavar="DURATION"),
    Opt("--metrics", "serve Prometheus metrics at http://HOST:PORT/metrics (docs/OPERATIONS.md)",
        metavar="HOST:PORT"),
    Opt("--forward", "relay source ID, in order, to a further remote unit (cascade); repeat per source. "
        "Append ,name=N to require that remote's certificate name, ,bandwidth_limit=SIZE to cap it",
        multiple=True, metavar="ID=HOST:PORT"),
    Opt("--forward-retention", "relay journal kept per forwarded source for the next hop (default 256M); "
        "when it fills, the next hop is brought up to date by a dirty-region resync",
        default="256M", kind=parse_size, metavar="SIZE"),
]

SELFTEST_OPTS = LOCAL_OPTS  # the self-test reads the local unit's own options and config file


# ---------------------------------------------------------------------------------------------
# remotes


def parse_remote(spec: str | dict[str, Any]) -> RemoteSpec:
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
            extra["bandwidth_limit"] = parse_size(str(extra["bandwidth_limit"]))
        except ValueError as exc:
            raise UsageError(f"remote {addr}: bandwidth_limit: {exc}") from None
    if mode not in ("async", "sync"):
        raise UsageError(f"remote {addr}: mode must be async or sync, not {mode!r}")
    try:
        hp = parse_hostport(addr)
    except ValueError as exc:
        raise UsageError(f"remote: {exc}") from None
    return RemoteSpec(hp, mode, str(name) if name else None,
                      extra.get("bandwidth_limit"), extra)


def remote_entries(o: dict[str, Any]) -> list[RemoteSpec]:
    """The merged `remote` option (command line, else the config's `remote` string, list or
    `[[remote]]` tables) as entries."""
    return [parse_remote(r) for r in o["remote"] or []]


def iscsi_options(o: dict[str, Any]) -> dict[str, Any]:
    """The iSCSI part of LocalOptions, checked: CHAP form, and USB beside iSCSI only when asked for."""
    if not o["iscsi"]:
        if o["iscsi_chap"] or o["iscsi_initiator"] or o["iscsi_mutual_chap"] or o["iscsi_portal"]:
            raise UsageError("local: --iscsi-chap, --iscsi-mutual-chap, --iscsi-portal and --iscsi-initiator "
                             "need --iscsi HOST:PORT")
        return {}
    if (o["usbip"] or o["gadget"] is not None) and o["iscsi_with_usb"] != "on":
        raise UsageError("local: --iscsi beside --usbip/--gadget lets two hosts write the same volume without "
                         "knowing of each other; give --iscsi-with-usb on only if they coordinate (cluster)")
    chap = _chap_credentials(o, "iscsi_chap")
    mutual = _chap_credentials(o, "iscsi_mutual_chap")
    if mutual is not None:
        if chap is None:
            raise UsageError("--iscsi-mutual-chap needs --iscsi-chap: the target authenticates itself only to "
                             "an initiator that authenticated first")
        if mutual[1] == chap[1]:
            raise UsageError("--iscsi-mutual-chap needs a secret of its own, not the --iscsi-chap secret")
    portal = None
    if o["iscsi_portal"]:
        host, port = _address(o, "iscsi_portal")
        portal = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return {"iscsi": _address(o, "iscsi"), "iscsi_chap": chap, "iscsi_mutual_chap": mutual,
            "iscsi_portal": portal, "iscsi_initiators": tuple(o["iscsi_initiator"] or ())}


def _chap_credentials(o: dict[str, Any], key: str) -> tuple[str, str] | None:
    if not o[key]:
        return None
    return parse_chap(str(o[key]), f"--{key.replace('_', '-')}")


def parse_chap(text: str, flag: str) -> tuple[str, str]:
    """USER:SECRET for iSCSI CHAP (a secret of 12 to 255 characters); UsageError naming `flag`."""
    user, sep, secret = text.partition(":")
    if not sep or not user or not 12 <= len(secret) <= 255:
        raise UsageError(f"{flag} expects USER:SECRET with a secret of 12 to 255 characters")
    return (user, secret)


# ---------------------------------------------------------------------------------------------
# checked option sets for the bring-up modules


@dataclass
class LocalOptions:
    """Everything `usbmirror local` was given; the defaults live in one place, `LOCAL_OPTS` above."""

    volume: str
    size: int | None
    block_size: int
    journal: str | None
    journal_size: int
    write_cache: bool
    throttle_start: float
    throttle_max_delay_ms: float
    throttle_resume: float
    journal_salvage: bool
    usbip: tuple[str, int] | None
    usbip_busid: str
    gadget: str | None
    vendor_id: int
    product_id: int
    acm_console: bool
    source_id: str | None
    remotes: list[RemoteSpec]
    tls_dir: str | None
    bandwidth_limit: int | None
    state_dir: str
    sync_timeout: float
    catch_up_interval: float
    progress: bool
    metrics: tuple[str, int] | None = None
    iscsi: tuple[str, int] | None = None
    iscsi_chap: tuple[str, str] | None = None
    iscsi_mutual_chap: tuple[str, str] | None = None
    iscsi_portal: str | None = None  # "host:port" SendTargets advertises
    iscsi_initiators: tuple[str, ...] = ()
    uas: bool = False


def local_options(o: dict[str, Any]) -> LocalOptions:
    """The merged `local` options (see `merge_options`), checked, as what `run_local` takes."""
    remotes = remote_entries(o)
    if not o["volume"]:
        raise UsageError("local: --volume is required (a file or block device)")
    if not o["usbip"] and o["gadget"] is None and not o["iscsi"]:
        raise UsageError("local: give --usbip HOST:PORT, --gadget [UDC] and/or --iscsi HOST:PORT so the host "
                         "can reach the disk")
    iscsi = iscsi_options(o)
    if o["uas"] == "on" and not o["usbip"]:
        raise UsageError("local: --uas on needs --usbip HOST:PORT (UAS is served over USB/IP; docs/UAS.md)")
    return LocalOptions(
        volume=o["volume"], size=o["size"], block_size=o["block_size"], journal=o["journal"],
        journal_size=o["journal_size"], write_cache=o["write_cache"] == "on",
        throttle_start=o["throttle_start"], throttle_max_delay_ms=o["throttle_max_delay_ms"],
        throttle_resume=o["throttle_resume"], journal_salvage=o["journal_salvage"] == "on",
        usbip=_address(o, "usbip") if o["usbip"] else None, usbip_busid=o["usbip_busid"],
        gadget=o["gadget"], vendor_id=_usb_id(o, "vendor_id"), product_id=_usb_id(o, "product_id"),
        acm_console=o["acm_console"] == "on", source_id=o["source_id"], remotes=remotes,
        tls_dir=o["tls_dir"], bandwidth_limit=o["bandwidth_limit"], state_dir=o["state_dir"],
        sync_timeout=o["sync_timeout"], catch_up_interval=_catch_up_interval(o["catch_up_interval"]),
        progress=o["progress"] == "on" or (o["progress"] == "auto" and sys.stderr.isatty()),
        metrics=metrics_listen(o["metrics"]),
        uas=o["uas"] == "on",
        **iscsi,
    )


def _catch_up_interval(v: Any) -> float:
    """--catch-up-interval (or the TOML key catch_up_interval) as seconds, 0 = off."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise UsageError(f"--catch-up-interval: expected seconds (0 or more, 0 turns the catch-up off), "
                         f"got {v!r}")
    return float(v)


@dataclass
class RemoteOptions:
    """Everything `usbmirror remote` was given, checked; the defaults live in `REMOTE_OPTS`."""

    listen: tuple[str, int]
    name: str
    targets: dict[str, str]
    tls_dir: str
    state_dir: str
    history_size: int | None = None
    history_age_s: float = 86400.0
    metrics: tuple[str, int] | None = None
    forwards: dict[str, RemoteSpec] = field(default_factory=dict)
    forward_retention: int = 256 << 20


def forward_entries(o: dict[str, Any], targets: dict[str, str]) -> dict[str, RemoteSpec]:
    """`--forward ID=HOST:PORT[,name=N][,bandwidth_limit=SIZE]` (or the config's `forward` list, or
    a `[forward]` table of ID = "HOST:PORT"), checked against the targets."""
    items: list[tuple[str, str]] = []
    for f in o.get("forward") or []:
        sid, sep, rest = str(f).partition("=")
        if not sep or not sid or not rest:
            raise UsageError(f"--forward expects ID=HOST:PORT, got {f!r}")
        items.append((sid, rest))
    if isinstance(o.get("forwards"), dict):
        items += [(str(k), str(v)) for k, v in o["forwards"].items()]
    out: dict[str, RemoteSpec] = {}
    for sid, rest in items:
        if sid not in targets:
            raise UsageError(f"--forward {sid}=...: this remote has no --target {sid}=PATH to relay")
        if sid in out:
            raise UsageError(f"--forward {sid}: a source is forwarded to one next remote only")
        spec = parse_remote(rest)
        if spec.mode != "async":
            raise UsageError(f"--forward {sid}: a relay forwards asynchronously (no mode=sync)")
        out[sid] = spec
    return out


def remote_options(o: dict[str, Any]) -> RemoteOptions:
    """The merged `remote` options (with the config's `[targets]` table), checked."""
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
    return RemoteOptions(listen=_address(o, "listen"), name=o["name"], targets=targets,
                         tls_dir=o["tls_dir"], state_dir=o["state_dir"],
                         history_size=int(o["history_size"]), history_age_s=float(o["history_age"]),
                         metrics=metrics_listen(o["metrics"]), forwards=forward_entries(o, targets),
                         forward_retention=int(o["forward_retention"]))


def metrics_listen(text: str | None) -> tuple[str, int] | None:
    """`--metrics HOST:PORT` (an empty host listens on every address)."""
    if not text:
        return None
    host, sep, port = str(text).rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"--metrics {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9373")
    return host.strip("[]") or "0.0.0.0", int(port)
