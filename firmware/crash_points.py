"""Named crash points in the multi-step role changes (promote, failback, resolve; docs/FAILOVER.md).

Each step that must survive a crash calls `crash_point(NAME)` at the instant after which a crash is
most awkward (a state recorded, the next not yet). Normally that does nothing. A unit started with
`USBMIRROR_CRASH_AT=NAME[,NAME...]` in its environment kills itself there with SIGKILL, as a crash
would: no handler, no flush, no clean-up runs. The kill tests (`host_tests/test_failover_kills.py`)
start units that way, one point at a time, and check that the step resumes or rolls back when the
unit starts again and that nothing acknowledged on the side that was kept is lost.

The names are listed in `POINTS`; an unknown name in the variable stops the unit at start-up
(`armed()` raises), so a misspelled test never passes by not crashing.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)

ENV = "USBMIRROR_CRASH_AT"

POINTS = frozenset({
    "promote.recorded",          # remote: the new generation (and a rollback to do) is durable, nothing served yet
    "promote.rolling_back",      # remote: part of the rollback to --mark/--at/--seq is written
    "failback.handover",         # remote: the copy is no longer served and the handover is durable
    "failback.pulled",           # local: some of the differing regions are written to the volume, not all
    "failback.taken_over",       # local: its new generation is durable, the remote has not heard of it
    "failback.handed_back",      # remote: applied_seq is the fork position, the role state still primary
    "resolve.recorded",          # remote (--keep local): the resolution is durable, the target not yet reset
    "resolve.saved",             # local (--keep remote): the replica role is durable, host writes still taken
})


def armed() -> frozenset[str]:
    """The crash points named in the environment; ValueError for a name that does not exist."""
    names = frozenset(n.strip() for n in os.environ.get(ENV, "").split(",") if n.strip())
    unknown = names - POINTS
    if unknown:
        raise ValueError(f"{ENV} names unknown crash points: {', '.join(sorted(unknown))}")
    return names


_ARMED = armed()


def crash_point(name: str) -> None:
    """SIGKILL this process if `name` is armed (see the module docstring); otherwise nothing."""
    if name not in POINTS:
        raise ValueError(f"unknown crash point {name!r}")
    if name in _ARMED:
        log.critical("crash point reached: %s (%s)", name, ENV)
        for h in logging.getLogger().handlers:
            h.flush()
        os.kill(os.getpid(), signal.SIGKILL)
