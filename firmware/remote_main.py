"""Bring up and run a remote unit: the TLS journey server and its control socket."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from firmware.config import RemoteOptions, UsageError

log = logging.getLogger("usbmirror.remote")


def run_remote(opts: RemoteOptions, stop: threading.Event) -> int:
    from firmware.control import ControlError, ControlServer
    from firmware.failover_serve import PromotionServers
    from firmware.pairing import PairingError, TlsFiles, add_expiry_status
    from firmware.relay import ForwardSpec
    from firmware.remote_unit import PromoteError, RemoteUnit, RemoteUnitConfig

    sd = Path(opts.state_dir)
    try:
        sd.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create state dir {sd}: {exc.strerror}") from None
    targets, tls_dir, name = opts.targets, opts.tls_dir, opts.name
    from firmware.resources import FDS_PER_SOURCE, raise_fd_limit

    wanted = 64 + FDS_PER_SOURCE * len(targets)
    soft, hard = raise_fd_limit(wanted)
    if soft < wanted:
        log.warning("open file limit too low for every source at once soft=%d hard=%d wanted=%d "
                    "(raise LimitNOFILE or ulimit -Hn)", soft, hard, wanted)
    cfg = RemoteUnitConfig(listen=opts.listen, name=name, targets=targets, tls_dir=tls_dir,
                           state_dir=opts.state_dir, history_size=opts.history_size,
                           history_age_s=opts.history_age_s,
                           forwards={sid: ForwardSpec(sid, spec, opts.forward_retention)
                                     for sid, spec in opts.forwards.items()})
    control = ControlServer(sd)
    try:
        control.start()
    except ControlError as exc:
        raise UsageError(str(exc)) from None
    try:
        try:
            unit = RemoteUnit(cfg)
        except (PairingError, OSError, ValueError) as exc:
            raise UsageError(f"cannot start remote unit: {exc}") from None
        with unit, PromotionServers(unit) as promoted:

            def status(req: dict[str, Any]) -> dict[str, Any]:
                st = unit.status()
                promoted.add_status(st)
                st["pid"] = os.getpid()
                add_expiry_status(st, TlsFiles.for_remote(tls_dir, name))
                return st

            def rollback(req: dict[str, Any]) -> dict[str, Any]:
                sid = req.get("source")
                if not isinstance(sid, str) or sid not in targets:
                    raise ValueError(f"unknown source {sid!r}; this remote serves {', '.join(sorted(targets))}")
                done = unit.rollback_resync(sid)
                log.warning("rollback requested source=%s restored=%s", sid, done)
                return {"source": sid, "rolled_back": done}

            def refusable(name: str, do: Callable[[dict[str, Any]], dict[str, Any]], *, log_refusal: bool = True
                          ) -> Callable[[dict[str, Any]], dict[str, Any]]:
                """A control request whose refusal (PromoteError) is an answer, not a failure."""

                def handle(req: dict[str, Any]) -> dict[str, Any]:
                    try:
                        return do(req)
                    except PromoteError as exc:
                        if log_refusal:
                            log.warning("%s refused source=%s reason=%s", name, req.get("source"), exc)
                        return {"ok": False, "error": str(exc)}

                return handle

            promoted.resume_all()
            control.register("status", status)
            control.register("rollback", rollback)
            control.register("promote", refusable("promote", promoted.promote))
            control.register("failback", refusable("failback", promoted.failback))
            control.register("resolve", refusable("resolve", promoted.resolve, log_refusal=False))
            with contextlib.ExitStack() as stack:
                from firmware.watchdog import Watchdog

                def accepting() -> str | None:
                    alive = any(t.name == "remote-accept" and t.is_alive() for t in threading.enumerate())
                    return None if alive else "the accept thread is gone"

                def status_line() -> str:
                    return "; ".join(f"{s['source_id']} {s['state']} applied seq {s['applied_seq']}"
                                     for s in status({}).get("sources", [])) or "no sources"

                watchdog = stack.enter_context(Watchdog({"accept": accepting}, status=status_line))
                if opts.metrics is not None:
                    from firmware.metrics import MetricsServer, StatusCollector

                    try:
                        stack.enter_context(MetricsServer(opts.metrics, StatusCollector(lambda: status({}))))
                    except OSError as exc:
                        raise UsageError(f"--metrics {opts.metrics[0]}:{opts.metrics[1]}: {exc.strerror}") from None
                watchdog.ready(status_line())
                unit.serve_forever(stop)
            log.info("stopping remote unit")
    finally:
        control.close()
    log.info("remote unit stopped")
    return 0
