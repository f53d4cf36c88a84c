"""Serving a remote unit's promoted copies to standby hosts (the bring-up half of `usbmirror promote`).

`PromotionServers` belongs to a running remote unit (`firmware.remote_main`): its `promote` is the
control command `promote` (the unit makes its copy primary, then this serves the copy read-write on
one bus: USB/IP, iSCSI with the project's own target `firmware.iscsi`, or the board's USB gadget
through configfs and FunctionFS, as `usbmirror local` does), and `resume_all` serves again, the way
recorded at promotion, every copy that is primary when the remote starts. The disk has its own
serial number and identifier (derived from the source id and its volume), the same on every bus and
across restarts of the remote, and never the source's; over iSCSI its target name is built from
them too. USB/IP has no authentication (bind to 127.0.0.1 or a trusted network); iSCSI takes CHAP
(`iscsi_chap`), whose secret is kept beside the role state (`roles/<source>.iscsi-chap`, mode 0600)
so a restart serves with it again and never without it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from firmware.atomic import write_atomically
from firmware.config import UsageError, parse_chap, parse_hostport
from firmware.promotion import PromotedStore
from firmware.remote_unit import PromoteError, RemoteUnit, SourceTarget

log = logging.getLogger(__name__)

PRODUCT = "usbmirror copy"  # INQUIRY product (16 characters at most)
BUSES = ("usbip", "iscsi", "gadget")


def _check_address(what: str, host: str, port: int) -> None:
    """Refuse an address the server could not listen on, before anything changes."""
    if port == 0:
        return
    try:
        s = socket.create_server((host, port), reuse_port=False)
    except OSError as exc:
        raise PromoteError(f"cannot listen for {what} on {host}:{port}: {exc.strerror}") from None
    s.close()


@dataclass
class GadgetPaths:
    """Where the kernel's USB gadget stack lives (the defaults of `gadget.functionfs.serve_gadget`)."""

    configfs_root: Path | None = None  # None: /sys/kernel/config, mounted when needed
    udc_class: Path | None = None  # None: /sys/class/udc
    mountpoint: Path = Path("/run/usbmirror/ffs-promoted")
    filesystems: Path = Path("/proc/filesystems")


def _check_gadget(udc: str, paths: GadgetPaths) -> str:
    """Refuse, before anything changes, a board where the gadget cannot be set up: no configfs
    with usb_gadget (libcomposite), no FunctionFS in the kernel, no such UDC, or no permission."""
    from gadget import configfs as cfs

    root = paths.configfs_root or cfs.DEFAULT_CONFIGFS
    try:
        if paths.configfs_root is None:
            cfs.ensure_configfs_mounted(root)
        elif not (root / "usb_gadget").is_dir():
            raise cfs.GadgetError(f"configfs has no usb_gadget at {root}: load libcomposite")
        try:
            kernel_fs = paths.filesystems.read_text()
        except OSError:
            kernel_fs = ""
        if not re.search(r"\bfunctionfs\b", kernel_fs):
            raise cfs.GadgetError("the kernel has no FunctionFS (CONFIG_USB_FUNCTIONFS, module usb_f_fs)")
        chosen = cfs.pick_udc(udc or None, paths.udc_class or cfs.DEFAULT_UDC_CLASS)
    except (cfs.GadgetError, OSError) as exc:
        raise PromoteError(f"cannot serve through the USB gadget: {exc}") from None
    gadgets = root / "usb_gadget"
    if not os.access(gadgets, os.W_OK):
        raise PromoteError(f"cannot serve through the USB gadget: no permission to create a gadget in {gadgets} "
                           "(run the remote unit as root)")
    return chosen


def iqn_for(sid: str, serial: str) -> str:
    """The iSCSI target name of a promoted copy: the source id (lower case, what an IQN allows)
    and the copy's serial number."""
    from firmware.iscsi.server import IQN_PREFIX

    part = re.sub(r"[^a-z0-9.:-]", "-", sid.lower())[:160]
    return f"{IQN_PREFIX}:copy-{part}-{serial.lower()}"


@dataclass
class _Serving:
    """One promoted copy's server: how to stop it and what status shows of it."""

    bus: str
    stack: contextlib.ExitStack
    status: Callable[[], dict[str, Any]] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def stop(self) -> None:
        self.stack.close()


class PromotionServers:
    """The servers of one remote unit's promoted copies; `with` stops them all."""

    def __init__(self, unit: RemoteUnit, *, gadget_paths: GadgetPaths | None = None,
                 serve_gadget: Callable[..., Any] | None = None) -> None:
        self.unit = unit
        self.gadget_paths = gadget_paths or GadgetPaths()
        self._serve_gadget = serve_gadget  # None: gadget.functionfs.serve_gadget
        self._servers: dict[str, _Serving] = {}

    def __enter__(self) -> PromotionServers:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        for sid in list(self._servers):
            self._stop(sid)

    def _stop(self, sid: str) -> None:
        """Stop serving `sid`'s copy (the standby host loses the disk), if it is served."""
        served = self._servers.pop(sid, None)
        if served is not None:
            served.stop()
            log.info("stopped serving promoted copy source=%s bus=%s", sid, served.bus)

    def add_status(self, st: dict[str, Any]) -> None:
        """Put each served copy's live server status (iSCSI sessions, the gadget's UDC) into the
        remote's status, under its source."""
        for src in st.get("sources", []):
            served = self._servers.get(src.get("source_id"))
            if served is not None:
                live = {**served.info, **(served.status() if served.status is not None else {})}
                src["served"] = {"bus": served.bus, **live}

    # -- the buses -----------------------------------------------------------------------------
    def _identity(self, sid: str) -> tuple[str, bytes]:
        t = self.unit.targets[sid]
        digest = hashlib.sha256(f"promoted:{sid}:{t.state.volume_uuid}".encode()).digest()
        return digest[:6].hex().upper(), digest[:8]

    def _logical_unit(self, sid: str, store: PromotedStore, shared: Any) -> Any:
        from firmware.scsi import ScsiTarget, naa_locally_assigned

        serial, dev = self._identity(sid)
        return ScsiTarget(store, product=PRODUCT, serial=serial, device_id=naa_locally_assigned(dev), shared=shared)

    def _record(self, t: SourceTarget, **changes: Any) -> None:
        promo = dict(t.roles.state.promotion or {})
        if any(promo.get(k) != v for k, v in changes.items()):
            promo.update(changes)  # e.g. the port a restart serves on again
            t.roles.update(promotion=promo)

    def _serve(self, sid: str, store: PromotedStore, promo: dict[str, Any]) -> dict[str, Any]:
        """Serve `sid`'s copy the way `promo` (its recorded promotion) says; returns what to tell."""
        from firmware.scsi.shared import SharedUnit

        t = self.unit.targets[sid]
        shared = SharedUnit()  # one set of reservations for the copy, whichever connection
        stack = contextlib.ExitStack()
        try:
            if promo.get("iscsi"):
                served = self._serve_iscsi(sid, t, store, shared, stack, promo)
            elif promo.get("gadget") is not None:
                served = self._serve_gadget_bus(sid, store, shared, stack, promo)
            else:
                served = self._serve_usbip(sid, t, store, shared, stack, promo)
        except BaseException:
            stack.close()
            raise
        self._servers[sid] = served
        return served.info

    def _serve_usbip(self, sid: str, t: SourceTarget, store: PromotedStore, shared: Any,
                     stack: contextlib.ExitStack, promo: dict[str, Any]) -> _Serving:
        from gadget.descriptors import DeviceIdentity
        from gadget.usbip_server import UsbipServer

        host, port = parse_hostport(str(promo.get("usbip") or "127.0.0.1:0"))
        busid = str(promo.get("busid") or "1-1")
        serial, _ = self._identity(sid)
        try:
            server = UsbipServer.for_logical_unit(self._logical_unit(sid, store, shared),
                                                  DeviceIdentity(serial=serial, product=PRODUCT), host=host,
                                                  port=port, busid=busid)
        except OSError as exc:
            raise PromoteError(f"cannot listen for USB/IP on {host}:{port}: {exc.strerror}") from None
        server.start()
        stack.callback(server.stop)
        address = f"{host}:{server.port}"
        self._record(t, usbip=address)
        log.warning("serving promoted copy read-write source=%s usbip=%s busid=%s", sid, address, busid)
        return _Serving("usbip", stack, None, {"usbip": address, "busid": busid})

    def _serve_iscsi(self, sid: str, t: SourceTarget, store: PromotedStore, shared: Any,
                     stack: contextlib.ExitStack, promo: dict[str, Any]) -> _Serving:
        from firmware.iscsi.connection import TargetConfig
        from firmware.iscsi.server import IscsiServer

        host, port = parse_hostport(str(promo["iscsi"]))
        serial, _ = self._identity(sid)
        iqn = iqn_for(sid, serial)
        chap = self._load_chap(t, promo)
        config = TargetConfig(target_name=iqn, portal="", alias=f"usbmirror copy of {sid}", chap=chap)
        try:
            server = stack.enter_context(IscsiServer(config, lambda: self._logical_unit(sid, store, shared),
                                                     host=host, port=port, reservations=shared.reservations))
        except OSError as exc:
            raise PromoteError(f"cannot listen for iSCSI on {host}:{port}: {exc.strerror}") from None
        portal = f"{host}:{server.port}"
        self._record(t, iscsi=portal, iscsi_target=iqn)
        log.warning("serving promoted copy read-write source=%s iscsi=%s target=%s chap=%s", sid, portal, iqn,
                    "on" if chap else "off")
        return _Serving("iscsi", stack, server.status,
                        {"iscsi": portal, "iscsi_target": iqn, "iscsi_chap": chap is not None})

    def _serve_gadget_bus(self, sid: str, store: PromotedStore, shared: Any, stack: contextlib.ExitStack,
                          promo: dict[str, Any]) -> _Serving:
        from gadget.descriptors import DeviceIdentity
        from gadget.functionfs import serve_gadget

        serve: Callable[..., Any] = self._serve_gadget or serve_gadget
        paths = self.gadget_paths
        udc = str(promo.get("gadget") or "")
        _check_gadget(udc, paths)
        serial, _ = self._identity(sid)
        try:
            session = stack.enter_context(serve(self._logical_unit(sid, store, shared),
                                                DeviceIdentity(serial=serial, product=PRODUCT), udc=udc or None,
                                                name="usbmirror-copy", configfs_root=paths.configfs_root,
                                                udc_class=paths.udc_class, mountpoint=paths.mountpoint))
        except Exception as exc:  # GadgetError, FunctionFsError, OSError: the kernel said no
            raise PromoteError(f"cannot serve through the USB gadget: {exc}") from None
        bound = str(getattr(session, "udc", udc))
        log.warning("serving promoted copy read-write source=%s gadget udc=%s", sid, bound)
        return _Serving("gadget", stack, None, {"gadget": udc, "udc": bound})

    # -- CHAP ----------------------------------------------------------------------------------
    def _chap_path(self, t: SourceTarget) -> Path:
        return t.roles.dir / f"{t.source_id}.iscsi-chap"

    def _save_chap(self, t: SourceTarget, chap: tuple[str, str] | None) -> None:
        path = self._chap_path(t)
        if chap is None:
            path.unlink(missing_ok=True)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, json.dumps({"user": chap[0], "secret": chap[1]}).encode() + b"\n", mode=0o600)

    def _load_chap(self, t: SourceTarget, promo: dict[str, Any]) -> tuple[str, str] | None:
        user = promo.get("iscsi_chap_user")
        if not user:
            return None
        path = self._chap_path(t)
        try:
            raw = json.loads(path.read_text())
            chap = (str(raw["user"]), str(raw["secret"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise PromoteError(f"the copy was promoted with iSCSI CHAP (user {user}) but its secret in {path} "
                               f"cannot be read ({exc}); it is not served without CHAP: promote again after a "
                               "failback, or restore the file") from None
        if chap[0] != user:
            raise PromoteError(f"{path} holds CHAP user {chap[0]!r}, not {user!r}: not served")
        return chap

    # -- the control commands ------------------------------------------------------------------
    def resume_all(self) -> None:
        """Serve every copy that is primary on this remote (the remote just started)."""
        for sid, t in self.unit.targets.items():
            if not t.roles.state.primary:
                continue
            try:
                store = t.resume_promotion()
                if store is None:
                    continue
                self._serve(sid, store, dict(t.roles.state.promotion or {}))
            except (PromoteError, ValueError) as exc:
                t.promotion_error = str(exc)
                log.error("promoted copy not served source=%s error=%s", sid, exc)

    def _serving_request(self, sid: str, req: dict[str, Any]) -> tuple[dict[str, Any], tuple[str, str] | None]:
        """What the request asks to serve on, checked (before anything changes): the `serving`
        part of the promotion record, and the CHAP credentials."""
        buses = [b for b in BUSES if req.get(b) is not None]
        if len(buses) != 1:
            raise PromoteError("promote serves the copy on one bus: give exactly one of --usbip HOST:PORT, "
                               "--iscsi HOST:PORT or --gadget [UDC]" + (f" (not {', '.join('--' + b for b in buses)})"
                                                                        if buses else ""))
        bus = buses[0]
        chap: tuple[str, str] | None = None
        if req.get("iscsi_chap") is not None and bus != "iscsi":
            raise PromoteError("--iscsi-chap needs --iscsi HOST:PORT")
        if bus == "gadget":
            udc = req["gadget"]
            if not isinstance(udc, str):
                raise PromoteError("--gadget takes a UDC name or nothing")
            busy = [other for other, served in self._servers.items() if served.bus == "gadget" and other != sid]
            if busy:
                raise PromoteError(f"the USB gadget already serves the copy of source {busy[0]}: one gadget per "
                                   "board (fail that one back first, or use --usbip or --iscsi)")
            _check_gadget(udc, self.gadget_paths)
            return {"gadget": udc}, None
        value = req[bus]
        if not isinstance(value, str):
            raise PromoteError(f"--{bus} expects HOST:PORT")
        try:
            host, port = parse_hostport(value)
            if bus == "iscsi" and req.get("iscsi_chap") is not None:
                chap = parse_chap(str(req["iscsi_chap"]), "--iscsi-chap")
        except (ValueError, UsageError) as exc:
            raise PromoteError(str(exc)) from None
        _check_address("USB/IP" if bus == "usbip" else "iSCSI", host, port)
        if bus == "usbip":
            return {"usbip": f"{host}:{port}", "busid": str(req.get("busid") or "1-1")}, None
        serial, _ = self._identity(sid)
        return {"iscsi": f"{host}:{port}", "iscsi_target": iqn_for(sid, serial),
                "iscsi_chap_user": chap[0] if chap else None}, chap

    def promote(self, req: dict[str, Any]) -> dict[str, Any]:
        """The control command: make the copy of `req["source"]` primary and serve it."""
        sid = req.get("source")
        if not isinstance(sid, str):
            raise PromoteError("promote needs a source id")
        if sid not in self.unit.targets:
            raise PromoteError(f"unknown source {sid!r}; this remote serves {', '.join(sorted(self.unit.targets))}")
        t = self.unit.targets[sid]
        point = {k: req.get(k) for k in ("mark", "at", "seq") if req.get(k) is not None}
        if "seq" in point and (not isinstance(point["seq"], int) or isinstance(point["seq"], bool)):
            raise PromoteError("--seq must be an integer")
        serving, chap = self._serving_request(sid, req)
        if not t.roles.state.primary:
            self._save_chap(t, chap)  # before the promotion is recorded: a restart never serves without it
        try:
            result = self.unit.promote(sid, serving=serving, force=bool(req.get("force")), **point)
        except BaseException:
            if not t.roles.state.primary:
                self._save_chap(t, None)  # refused: no secret left behind
            raise
        assert t.promoted is not None
        try:
            info = self._serve(sid, t.promoted, dict(t.roles.state.promotion or {}))
        except PromoteError as exc:
            t.promotion_error = str(exc)
            raise PromoteError(f"source {sid} is primary now, but {exc}; restart the remote unit to serve it "
                               "the recorded way") from None
        result.pop("iscsi_chap_user", None)
        result.update(info)
        return result

    def failback(self, req: dict[str, Any]) -> dict[str, Any]:
        """The control command `failback`: stop serving the promoted copy of `req["source"]`, hand the
        source back, and wait (up to `req["timeout"]` seconds) until the old local unit pulled what
        changed and took over (the copy is then its replica)."""
        sid = req.get("source")
        t = self.unit.targets.get(sid) if isinstance(sid, str) else None
        if t is None or not isinstance(sid, str):
            raise PromoteError(f"unknown source {sid!r}; this remote serves {', '.join(sorted(self.unit.targets))}")
        timeout = req.get("timeout", 600)
        if not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout < 0:
            raise PromoteError("timeout must be a number of seconds")
        self._stop(sid)  # the standby host loses the disk first: no write can race the handover
        out = t.begin_failback()
        self._save_chap(t, None)  # never served again in this generation
        deadline = time.monotonic() + float(timeout)
        while t.roles.state.primary and time.monotonic() < deadline:
            time.sleep(0.1)
        out["done"] = not t.roles.state.primary
        out["last_resync"] = t.roles.state.last_resync
        return out

    def resolve(self, req: dict[str, Any]) -> dict[str, Any]:
        """The control command `resolve` on a remote unit (`SourceTarget.resolve`)."""
        sid = req.get("source")
        t = self.unit.targets.get(sid) if isinstance(sid, str) else None
        if t is None or not isinstance(sid, str):
            raise PromoteError(f"unknown source {sid!r}; this remote serves {', '.join(sorted(self.unit.targets))}")
        keep = req.get("keep")
        if keep not in ("local", "remote"):
            raise PromoteError("--keep must be local or remote")
        dry = bool(req.get("dry_run"))
        if not dry and keep == "local" and t.roles.state.primary:
            self._stop(sid)  # the standby host loses the disk before its writes are discarded
        out = t.resolve(str(keep), dry_run=dry)
        if not t.roles.state.primary:
            self._save_chap(t, None)
        return out
