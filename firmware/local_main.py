"""Bring up and run a local unit: volume, journal, SCSI target, USB transports, replication, control.

This is the only place that knows how the parts fit together; each part is a context manager and
is torn down in reverse order on SIGINT/SIGTERM, so the journal is checkpointed and the volume is
synced before the process exits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from firmware.config import LocalOptions, UsageError
from firmware.status_text import render_status

log = logging.getLogger("usbmirror.local")


def run_local(opts: LocalOptions, stop: threading.Event) -> int:
    from firmware.control import ControlError, ControlServer
    from firmware.identity import load_or_create
    from firmware.pairing import TlsFiles, add_expiry_status
    from firmware.volume import Volume, VolumeError

    state_dir = Path(opts.state_dir)
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create state dir {state_dir}: {exc.strerror}") from None
    ident = load_or_create(state_dir)
    started = time.monotonic()
    if opts.remotes and not (opts.source_id and opts.tls_dir):
        raise UsageError("remotes need --source-id and --tls-dir (make the TLS files with `usbmirror pair`)")

    with contextlib.ExitStack() as stack:
        control = ControlServer(state_dir)
        try:
            control.start()
        except ControlError as exc:
            raise UsageError(str(exc)) from None
        stack.callback(control.close)
        try:
            volume = stack.enter_context(
                Volume(opts.volume, size=opts.size, block_size=opts.block_size, write_cache=opts.write_cache)
            )
        except (VolumeError, OSError) as exc:
            raise UsageError(f"volume: {exc}") from None

        from firmware.journal import Journal
        from firmware.local_unit import LocalUnit, ThrottlePolicy

        journal_path = opts.journal or str(state_dir / "journal")
        from firmware.journal import JournalError

        try:
            journal = stack.enter_context(
                Journal.open(journal_path, size=opts.journal_size, unit_uuid=ident.unit_uuid,
                             block_size=opts.block_size, salvage=opts.journal_salvage)
            )
        except JournalError as exc:
            hint = "" if opts.journal_salvage else " (--journal-salvage on cuts the journal there and resyncs)"
            raise UsageError(f"journal {journal_path}: {exc}{hint}") from None
        unit = stack.enter_context(
            LocalUnit(volume, journal, write_cache=opts.write_cache,
                      throttle=ThrottlePolicy(start_fill=opts.throttle_start,
                                              max_delay_s=opts.throttle_max_delay_ms / 1000.0,
                                              resume_fill=opts.throttle_resume),
                      bitmap_path=str(state_dir / "dirty.bitmap"))
        )

        from firmware.failover.state import RoleStore, open_roles

        roles: RoleStore | None = None
        local_roles: Any = None
        if opts.source_id:
            try:
                roles = stack.enter_context(open_roles(state_dir, opts.source_id, primary=True))
            except ValueError as exc:
                raise UsageError(str(exc)) from None
            from firmware.local_roles import LocalRoles

            local_roles = LocalRoles(roles, unit, journal, catch_up_interval_s=opts.catch_up_interval)
            local_roles.at_start()  # a replica refuses host writes from the first command on

        from firmware.monitor import CommandMonitor
        from firmware.scsi import ScsiTarget, naa_locally_assigned
        from firmware.watchdog import Watchdog

        watchdog = Watchdog({})  # enabled only under systemd (NOTIFY_SOCKET); probes are added below
        scsi_target = ScsiTarget(unit, serial=ident.serial, device_id=naa_locally_assigned(ident.unit_uuid.bytes),
                                 shared=_shared_unit(state_dir))
        unit.add_write_refusal_listener(scsi_target.write_protect_changed)  # a replica's WP bit (FAILOVER.md)
        target: Any = scsi_target
        monitor: CommandMonitor | None = None
        if opts.metrics is not None or watchdog.enabled:
            # latency per opcode, and the running command the watchdog needs to see a wedge
            target = monitor = CommandMonitor(target)

        replicator: Any = None
        if opts.remotes:
            from firmware.progress_bars import RichProgress
            from firmware.replication.spec import RemoteSpec
            from firmware.replicator import Replicator, ReplicatorTuning

            specs = [RemoteSpec(address=r.address, mode=r.mode, name=r.name,
                                bandwidth_limit_bps=r.extra.get("bandwidth_limit", opts.bandwidth_limit))
                     for r in opts.remotes]
            progress = stack.enter_context(RichProgress()) if opts.progress else None
            role_hooks: dict[str, Any] = {}
            if local_roles is not None:
                role_hooks = {"generations": local_roles.generations,
                              "on_remote_primary": local_roles.on_remote_primary,
                              "on_link_up": local_roles.on_link_up}
            replicator = stack.enter_context(
                Replicator(unit, journal, source_id=opts.source_id or "", remotes=specs,
                           tls_dir=opts.tls_dir or "", state_dir=str(state_dir),
                           tuning=ReplicatorTuning(sync_timeout_s=opts.sync_timeout), progress=progress,
                           **role_hooks)
            )

        from gadget.descriptors import DeviceIdentity

        usb_ident = DeviceIdentity(vendor_id=opts.vendor_id, product_id=opts.product_id, serial=ident.serial)
        transports: list[str] = []
        usb_status: list[Any] = []
        uas_workers: list[Any] = []  # the SCSI targets UAS commands run on, counted in status too
        if opts.usbip:
            from gadget.usbip_server import UsbipServer

            if opts.uas:
                server = stack.enter_context(
                    _uas_server(target, scsi_target, unit, ident, usb_ident, opts.usbip, opts.usbip_busid,
                                uas_workers))
            else:
                server = stack.enter_context(
                    UsbipServer.for_logical_unit(target, usb_ident, host=opts.usbip[0], port=opts.usbip[1],
                                                 busid=opts.usbip_busid)
                )
            transports.append(f"usbip {opts.usbip[0]}:{server.port} busid {opts.usbip_busid}"
                              + (" (bulk-only + uas)" if opts.uas else ""))
            usb_status.append(server)
            log.info("serving over USB/IP host=%s port=%d busid=%s", opts.usbip[0], server.port,
                     opts.usbip_busid)
        if opts.gadget is not None:
            from gadget.functionfs import serve_gadget

            gad = stack.enter_context(
                serve_gadget(target, usb_ident, udc=opts.gadget or None, acm_console=opts.acm_console,
                             status_text=lambda: _status_text(status_fn))
            )
            transports.append(f"gadget udc {getattr(gad, 'udc', opts.gadget)}")
            usb_status.append(gad)

        iscsi_server: Any = None
        if opts.iscsi:
            from firmware.iscsi.server import serve_unit

            iscsi_server = stack.enter_context(
                serve_unit(unit, ident, host=opts.iscsi[0], port=opts.iscsi[1], chap=opts.iscsi_chap,
                           mutual_chap=opts.iscsi_mutual_chap, portal=opts.iscsi_portal,
                           initiators=opts.iscsi_initiators, shared=target.shared)
            )
            transports.append(f"iscsi {opts.iscsi[0]}:{iscsi_server.port}")

        def status_fn(req: dict[str, Any] | None = None) -> dict[str, Any]:
            st: dict[str, Any] = {
                "role": "local",
                "unit_uuid": str(ident.unit_uuid),
                "serial": ident.serial,
                "pid": os.getpid(),
                "uptime_s": time.monotonic() - started,
                "volume": {"path": str(volume.path), "size_bytes": volume.size_bytes,
                           "block_size": volume.block_size},
                "write_cache": "on" if unit.write_cache else "off",
                "transports": transports,
            }
            st.update(unit.status())
            st.update(local_roles.status() if local_roles is not None else
                      {"primary": True, "split_brain": False, "host_writes": "accepted", "host_writes_reason": None})
            st["scsi"] = combined_scsi_status([target.status(), *(w.status() for w in uas_workers)])
            usb: list[dict[str, Any]] = []
            for s in usb_status:
                if hasattr(s, "status"):
                    usb.append(s.status())
            st["usb"] = usb
            if iscsi_server is not None:
                st["iscsi"] = iscsi_server.status()
            st["remotes"] = replicator.status()["remotes"] if replicator is not None else []
            if opts.tls_dir and opts.source_id:
                add_expiry_status(st, TlsFiles.for_source(opts.tls_dir, opts.source_id))
            return st

        def verify_fn(req: dict[str, Any]) -> dict[str, Any]:
            if replicator is None:
                return {"remotes": [], "error": "no remotes configured"}
            report: dict[str, Any] = replicator.verify()
            return report

        def mark_fn(req: dict[str, Any]) -> dict[str, Any]:
            seq = unit.mark(str(req.get("name", "")))
            return {"seq": seq, "name": req.get("name")}

        control.register("status", status_fn)
        control.register("verify", verify_fn)
        control.register("mark", mark_fn)
        if local_roles is not None:
            control.register("resolve", local_roles.resolve)
        from firmware.watchdog import LinkProgress, command_probe

        if monitor is not None:
            links = LinkProgress()
            watchdog.probes["commands"] = command_probe(monitor)
            watchdog.probes["links"] = lambda: links.check(time.monotonic(), status_fn().get("remotes", []))
        watchdog.status_text = lambda: _short_status(status_fn())
        stack.enter_context(watchdog)
        if opts.metrics is not None:
            from firmware.metrics import MetricsServer, StatusCollector

            try:
                stack.enter_context(MetricsServer(opts.metrics, StatusCollector(status_fn, monitor)))
            except OSError as exc:
                raise UsageError(f"--metrics {opts.metrics[0]}:{opts.metrics[1]}: {exc.strerror}") from None
        log.info("local unit running unit=%s serial=%s volume=%s journal=%s", ident.unit_uuid, ident.serial,
                 opts.volume, journal_path)
        watchdog.ready(_short_status(status_fn()))
        stop.wait()
        log.info("stopping local unit")
    log.info("local unit stopped")
    return 0


def _short_status(st: dict[str, Any]) -> str:
    """One line for systemd's STATUS= (shown by `systemctl status`)."""
    j = st.get("journal") or {}
    parts = [f"journal {100.0 * float(j.get('fill') or 0):.0f}% used"]
    if j.get("overflow"):
        parts.append("OVERFLOW")
    if st.get("volume_full"):
        parts.append("VOLUME FULL")
    for r in st.get("remotes") or []:
        parts.append(f"{r.get('name') or r.get('address')} {r.get('state')} lag {r.get('lag_bytes', 0)} B")
    return "; ".join(parts)


def _status_text(fn: Any) -> str:
    try:
        return render_status(fn())
    except Exception as exc:
        return f"status unavailable: {exc}"


def _shared_unit(state_dir: Path) -> Any:
    """The unit's reservation state (every bus), persisted crash-safely in the state dir once an
    initiator asks for it with APTPL (docs/ISCSI.md), and loaded back at start-up."""
    from firmware.atomic import fsync_dir, write_atomically
    from firmware.scsi.reservations import Reservations
    from firmware.scsi.shared import SharedUnit

    path = state_dir / "reservations.json"

    def persist(state: bytes) -> None:
        if state:
            write_atomically(path, state)
        elif path.exists():
            path.unlink()
            fsync_dir(state_dir)

    try:
        saved = path.read_bytes()
    except FileNotFoundError:
        saved = b""
    except OSError as exc:
        raise UsageError(f"cannot read the reservation state {path}: {exc.strerror}") from None
    try:
        reservations = Reservations(persist=persist, saved=saved)
    except ValueError as exc:
        raise UsageError(f"the reservation state {path} is damaged ({exc}); remove it to start without the "
                         "persistent reservations it held") from None
    if saved:
        snap = reservations.snapshot()
        log.info("persistent reservations restored path=%s registrations=%s reservation=%s", path,
                 snap["registrations"], snap["reservation"])
    return SharedUnit(reservations=reservations)


def combined_scsi_status(statuses: list[dict[str, Any]]) -> dict[str, Any]:
    """The `scsi` status of a unit whose commands run on several SCSI targets (Bulk-Only's and the
    UAS workers'): counters and per-opcode/per-size/per-error counts summed, the rest from the first."""
    out: dict[str, Any] = dict(statuses[0])
    for st in statuses[1:]:
        for key, value in st.items():
            if isinstance(value, dict):
                merged = dict(out.get(key) or {})
                for k, n in value.items():
                    merged[k] = merged.get(k, 0) + n
                out[key] = dict(sorted(merged.items()))
            elif isinstance(value, int) and not isinstance(value, bool) and key not in _SCSI_FIXED:
                out[key] = out.get(key, 0) + value
    return out


_SCSI_FIXED = frozenset({"block_size", "num_blocks", "max_transfer_blocks"})


#: UAS commands run on this many workers, each with its own SCSI target over the one local unit
#: (Linux's `uas` keeps up to 30 commands in flight at high speed; past a few, the journal's group
#: commit already shares each flush among them).
UAS_WORKERS = 8


@contextlib.contextmanager
def _uas_server(target: Any, scsi_target: Any, unit: Any, ident: Any, usb_ident: Any, address: tuple[str, int],
                busid: str, workers_out: list[Any]) -> Any:
    """A USB/IP server whose device offers UAS beside Bulk-Only (docs/UAS.md); its workers' targets
    share the reservations and write gate of `scsi_target`, the one Bulk-Only uses, and are put in
    `workers_out` (status counts their commands)."""
    from firmware.scsi import ScsiTarget, naa_locally_assigned
    from gadget.uas_device import UasMassStorageDevice
    from gadget.usbip_server import UsbipServer

    device_id = naa_locally_assigned(ident.unit_uuid.bytes)
    workers = [ScsiTarget(unit, serial=ident.serial, device_id=device_id, shared=scsi_target.shared)
               for _ in range(UAS_WORKERS)]
    for worker in workers:
        unit.add_write_refusal_listener(worker.write_protect_changed)  # the replica's WP bit too
    workers_out.extend(workers)
    device = UasMassStorageDevice(target, workers, usb_ident)
    try:
        with UsbipServer(device, host=address[0], port=address[1], busid=busid) as server:
            yield server
    finally:
        device.close()
