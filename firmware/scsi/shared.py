"""State of one logical unit shared by every `ScsiTarget` serving it (the iSCSI server runs a pool).

`SharedUnit` holds the unit's reservations (`firmware.scsi.reservations`) and the `WriteGate` that
makes COMPARE AND WRITE atomic: ordinary writes (WRITE, WRITE SAME, UNMAP, WRITE AND VERIFY) pass
the gate together, as before; a COMPARE AND WRITE waits for the writes in flight to end, keeps new
ones out, reads, compares and writes, then lets them through. A waiting COMPARE AND WRITE keeps
new writes out, so a stream of writes cannot starve it. Reads do not pass the gate: they may see a
COMPARE AND WRITE's blocks as they may see an ordinary WRITE's, before or after.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from firmware.scsi.reservations import Reservations


class WriteGate:
    """Many ordinary writers at once, or one exclusive writer (see the module docstring)."""

    def __init__(self) -> None:
        # enter() and leave() take the condition's lock itself: the condition's own __enter__ is a
        # Python-level call, and these two run for every write
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._writers = 0
        self._exclusive = False

    def enter(self) -> None:
        with self._lock:
            while self._exclusive:
                self._cond.wait()
            self._writers += 1

    def leave(self) -> None:
        with self._lock:
            self._writers -= 1
            # only an exclusive writer waits for the writers to drain, and it set _exclusive first
            if not self._writers and self._exclusive:
                self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive:
                self._cond.wait()
            self._exclusive = True
            while self._writers:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


@dataclass
class SharedUnit:
    reservations: Reservations = field(default_factory=Reservations)
    gate: WriteGate = field(default_factory=WriteGate)
