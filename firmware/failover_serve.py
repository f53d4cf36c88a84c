"""Serving a remote unit's promoted copies to standby hosts (the bring-up half of `usbmirror promote`).

`PromotionServers` belongs to a running remote unit (`firmware.remote_main`): its `promote` is the
control command `promote` (the unit makes its copy primary, then this serves the copy over USB/IP,
read-write), and `resume_all` serves again, on the address recorded at promotion, every copy that
is primary when the remote starts. The disk has its own serial number and identifier (derived from
the source id and its volume), the same across restarts of the remote, and never the source's.
USB/IP has no authentication: bind to 127.0.0.1 or a trusted network.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import time
from types import TracebackType
from typing import Any

from firmware.config import parse_hostport
from firmware.promotion import PromotedStore
from firmware.remote_unit import PromoteError, RemoteUnit

log = logging.getLogger(__name__)

PRODUCT = "usbmirror copy"  # INQUIRY product (16 characters at most)


def _check_address(host: str, port: int) -> None:
    """Refuse an address the USB/IP server could not listen on, before anything changes."""
    if port == 0:
        return
    try:
        s = socket.create_server((host, port), reuse_port=False)
    except OSError as exc:
        raise PromoteError(f"cannot listen for USB/IP on {host}:{port}: {exc.strerror}") from None
    s.close()


class PromotionServers:
    """The USB/IP servers of one remote unit's promoted copies; `with` stops them all."""

    def __init__(self, unit: RemoteUnit) -> None:
        self.unit = unit
        self._servers: dict[str, Any] = {}

    def __enter__(self) -> PromotionServers:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        for sid, server in list(self._servers.items()):
            server.stop()
            log.info("stopped serving promoted copy source=%s", sid)
        self._servers.clear()

    def _serve(self, sid: str, store: PromotedStore, host: str, port: int, busid: str) -> Any:
        from firmware.scsi import ScsiTarget, naa_locally_assigned
        from gadget.descriptors import DeviceIdentity
        from gadget.usbip_server import UsbipServer

        t = self.unit.targets[sid]
        digest = hashlib.sha256(f"promoted:{sid}:{t.state.volume_uuid}".encode()).digest()
        serial = digest[:6].hex().upper()
        lu = ScsiTarget(store, product=PRODUCT, serial=serial, device_id=naa_locally_assigned(digest[:8]))
        try:
            server = UsbipServer.for_logical_unit(lu, DeviceIdentity(serial=serial, product=PRODUCT), host=host,
                                                  port=port, busid=busid)
        except OSError as exc:
            raise PromoteError(f"cannot listen for USB/IP on {host}:{port}: {exc.strerror}") from None
        server.start()
        self._servers[sid] = server
        address = f"{host}:{server.port}"
        promo = dict(t.roles.state.promotion or {})
        if promo.get("usbip") != address:
            promo["usbip"] = address  # the port a restart serves on again
            t.roles.update(promotion=promo)
        log.warning("serving promoted copy read-write source=%s usbip=%s busid=%s", sid, address, busid)
        return server

    def resume_all(self) -> None:
        """Serve every copy that is primary on this remote (the remote just started)."""
        for sid, t in self.unit.targets.items():
            if not t.roles.state.primary:
                continue
            promo = t.roles.state.promotion or {}
            try:
                store = t.resume_promotion()
                if store is None:
                    continue
                host, port = parse_hostport(str(promo.get("usbip") or "127.0.0.1:0"))
                self._serve(sid, store, host, port, str(promo.get("busid") or "1-1"))
            except (PromoteError, ValueError) as exc:
                t.promotion_error = str(exc)
                log.error("promoted copy not served source=%s error=%s", sid, exc)

    def promote(self, req: dict[str, Any]) -> dict[str, Any]:
        """The control command: make the copy of `req["source"]` primary and serve it."""
        sid = req.get("source")
        if not isinstance(sid, str):
            raise PromoteError("promote needs a source id")
        usbip = req.get("usbip")
        if not isinstance(usbip, str):
            raise PromoteError("promote needs --usbip HOST:PORT")
        try:
            host, port = parse_hostport(usbip)
        except ValueError as exc:
            raise PromoteError(str(exc)) from None
        busid = req.get("busid") or "1-1"
        point = {k: req.get(k) for k in ("mark", "at", "seq") if req.get(k) is not None}
        if "seq" in point and (not isinstance(point["seq"], int) or isinstance(point["seq"], bool)):
            raise PromoteError("--seq must be an integer")
        _check_address(host, port)
        result = self.unit.promote(sid, usbip=f"{host}:{port}", busid=str(busid), force=bool(req.get("force")),
                                   **point)
        t = self.unit.targets[sid]
        assert t.promoted is not None
        try:
            server = self._serve(sid, t.promoted, host, port, str(busid))
        except PromoteError as exc:
            t.promotion_error = str(exc)
            raise PromoteError(f"source {sid} is primary now, but {exc}; restart the remote unit to serve it "
                               "on the recorded address") from None
        result["usbip"] = f"{host}:{server.port}"
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
        server = self._servers.pop(sid, None)
        if server is not None:
            server.stop()  # the standby host loses the disk first: no write can race the handover
        out = t.begin_failback()
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
            server = self._servers.pop(sid, None)
            if server is not None:
                server.stop()  # the standby host loses the disk before its writes are discarded
        return t.resolve(str(keep), dry_run=dry)
