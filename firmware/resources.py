"""What a unit process holds of the board: threads, resident memory and open file descriptors, for
`usbmirror status` (a remote unit with many sources shows that its cost per source stays flat)."""

from __future__ import annotations

import contextlib
import os
import threading

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def process_resources() -> dict[str, int | None]:
    """`threads` (Python threads alive), `rss_bytes` (resident set) and `open_fds` of this process;
    None for a figure this system does not expose (no /proc)."""
    rss: int | None = None
    fds: int | None = None
    try:
        with open("/proc/self/statm", "rb") as f:
            rss = int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        pass
    with contextlib.suppress(OSError):
        fds = len(os.listdir("/proc/self/fd"))
    return {"threads": threading.active_count(), "rss_bytes": rss, "open_fds": fds}


FDS_PER_SOURCE = 8  # a remote unit holds about 6 per connected source (socket, waker pair, target, history)


def raise_fd_limit(wanted: int) -> tuple[int, int]:
    """Raise this process's soft limit on open files towards `wanted` (never above the hard limit);
    returns (soft, hard) after. A shell's default soft limit of 1024 is too few for a remote unit
    with a few hundred sources."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft, hard
