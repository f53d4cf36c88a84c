"""SIGINT/SIGTERM as a stop event for a unit's main thread (used by every unit entry point)."""

from __future__ import annotations

import logging
import signal
import socket
import threading

log = logging.getLogger("usbmirror")


def install_stop_signals() -> threading.Event:
    """SIGINT/SIGTERM set the returned event.

    The event is set from a watcher thread woken through `signal.set_wakeup_fd`, never from the
    Python signal handler itself: a handler runs in the main thread, possibly while that thread holds
    the event's own lock inside `Event.wait()`, and setting the event there would deadlock.
    """
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
