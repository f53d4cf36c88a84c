"""Readiness and the systemd watchdog: READY, STATUS and WATCHDOG over sd_notify (`sdnotify`).

`Watchdog(probes)` is a lifecycle object (a context manager owning one thread). When systemd
started the unit with `Type=notify` it finds `NOTIFY_SOCKET` (and, with `WatchdogSec=`,
`WATCHDOG_USEC`) in the environment; elsewhere it does nothing. `ready(text)` sends READY=1 once
the unit serves. Then every half watchdog period (every 5 s without a watchdog) the thread runs
each probe: a probe returns None while its part of the unit makes progress, or the reason it does
not. Only when every probe is content does it send WATCHDOG=1 (with a STATUS line); otherwise it
sends STATUS=stalled: … and no WATCHDOG, so systemd kills and restarts a wedged unit after
`WatchdogSec`. A probe that raises or blocks also stops the pings.

The probes (sans-IO judges, `now` passed in) are below: `command_probe` (no command of the SCSI
target running longer than its deadline, from `firmware.monitor.CommandMonitor`) and `LinkProgress`
(a streaming link with records waiting gets acknowledgements).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

from firmware.monitor import CommandMonitor

log = logging.getLogger(__name__)

Probe = Callable[[], str | None]

# A SCSI command longer than this is a wedge: Linux gives up on a command after 30 s and a sync
# remote holds one at most --sync-timeout (15 s) beyond its own work.
COMMAND_DEADLINE_S = 45.0
# A streaming link whose remote acknowledges nothing for this long while records wait is stuck
# (its own dead-peer detection would have cut the session well before).
LINK_DEADLINE_S = 120.0
# longest wait to hand one message to systemd; a message that cannot go is dropped (and logged)
SEND_TIMEOUT_S = 1.0


def command_probe(monitor: CommandMonitor, deadline_s: float = COMMAND_DEADLINE_S) -> Probe:
    def probe() -> str | None:
        oldest = monitor.oldest_running()
        if oldest is not None and oldest[1] > deadline_s:
            return f"command {oldest[0]} running for {oldest[1]:.0f} s"
        return None

    return probe


class LinkProgress:
    """Judges the links from the replicator's status: a remote that is streaming with records it
    lacks must acknowledge some within `deadline_s`."""

    def __init__(self, deadline_s: float = LINK_DEADLINE_S) -> None:
        self.deadline_s = deadline_s
        self._seen: dict[str, tuple[int, float]] = {}  # address -> (acked seq, since when)

    def check(self, now: float, remotes: Sequence[Mapping[str, Any]]) -> str | None:
        stuck: list[str] = []
        for r in remotes:
            addr = str(r.get("address"))
            acked = int(r.get("acked_seq") or 0)
            if r.get("state") != "streaming" or not r.get("lag_records"):
                self._seen.pop(addr, None)
                continue
            last = self._seen.get(addr)
            if last is None or last[0] != acked:
                self._seen[addr] = (acked, now)
            elif now - last[1] > self.deadline_s:
                stuck.append(f"link to {addr} acknowledged nothing for {now - last[1]:.0f} s "
                             f"({r.get('lag_records')} records wait)")
        return "; ".join(stuck) or None


class Watchdog:
    """sd_notify for one unit: `with Watchdog({"name": probe, ...}) as wd: ...; wd.ready("serving")`."""

    def __init__(self, probes: Mapping[str, Probe], *, status: Callable[[], str] | None = None,
                 environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.probes = dict(probes)
        self.status_text = status
        self.enabled = bool(env.get("NOTIFY_SOCKET"))
        usec = env.get("WATCHDOG_USEC")
        pid = env.get("WATCHDOG_PID")
        self.watchdog_s: float | None = None
        if usec and (not pid or pid == str(os.getpid())):
            try:
                self.watchdog_s = int(usec) / 1e6
            except ValueError:
                log.warning("WATCHDOG_USEC=%r is not a number: no watchdog", usec)
        self.interval_s = self.watchdog_s / 2 if self.watchdog_s else 5.0
        self._notifier: Any = None
        if self.enabled:
            try:
                import sdnotify  # only under systemd: the unit needs it nowhere else
            except ImportError:
                log.warning("NOTIFY_SOCKET is set but the sdnotify package is missing: no readiness or watchdog")
                self.enabled = False
        if self.enabled:
            old = os.environ.get("NOTIFY_SOCKET")
            try:
                os.environ["NOTIFY_SOCKET"] = env["NOTIFY_SOCKET"]  # sdnotify reads the process environment
                self._notifier = sdnotify.SystemdNotifier(debug=True)
                # a datagram to a reader that lags blocks once its queue is full: never wait long on it
                self._notifier.socket.settimeout(SEND_TIMEOUT_S)
            except OSError as exc:
                log.warning("cannot reach the systemd notify socket %s: %s", env["NOTIFY_SOCKET"], exc)
                self.enabled = False
            finally:
                if old is None:
                    os.environ.pop("NOTIFY_SOCKET", None)
                else:
                    os.environ["NOTIFY_SOCKET"] = old
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.pings = 0
        self.stalled: str | None = None

    def notify(self, message: str) -> None:
        if self._notifier is None:
            return
        try:
            self._notifier.notify(message)
        except OSError as exc:
            log.warning("sd_notify failed: %s", exc)

    def ready(self, text: str) -> None:
        self.notify(f"READY=1\nSTATUS={text}")
        log.info("ready status=%s watchdog_s=%s", text, self.watchdog_s)

    def check(self) -> str | None:
        """Run every probe; None when all are content, else the reasons."""
        reasons: list[str] = []
        for name, probe in self.probes.items():
            try:
                r = probe()
            except Exception as exc:
                r = f"probe failed: {type(exc).__name__}: {exc}"
            if r:
                reasons.append(f"{name}: {r}")
        return "; ".join(reasons) or None

    def tick(self) -> None:
        stalled = self.check()
        if stalled is None:
            text = self.status_text() if self.status_text is not None else "running"
            self.notify(f"WATCHDOG=1\nSTATUS={text}" if self.watchdog_s else f"STATUS={text}")
            self.pings += 1
            if self.stalled is not None:
                log.warning("progress again, watchdog pings resume")
        else:
            if self.stalled != stalled:
                log.error("stalled, no watchdog ping (systemd restarts the unit after WatchdogSec): %s", stalled)
            self.notify(f"STATUS=stalled: {stalled}")
        self.stalled = stalled

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.tick()

    def start(self) -> None:
        if self.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="watchdog", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self.notify("STOPPING=1")
            self._thread.join(timeout=max(1.0, self.interval_s) + 5)
            self._thread = None

    def __enter__(self) -> Watchdog:
        self.start()
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
