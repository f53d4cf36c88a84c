"""Profile a unit process a benchmark starts (bench_unit_cpu.py --profile DIR puts this directory on
PYTHONPATH and names DIR in USBMIRROR_BENCH_PROFILE): every thread gets its own cProfile profiler,
and at exit all of them are merged into DIR/unit-PID.pstats (read it with `python -m pstats`)."""

from __future__ import annotations

import os

_DIR = os.environ.get("USBMIRROR_BENCH_PROFILE")

if _DIR:
    import atexit
    import cProfile
    import pstats
    import sys
    import threading

    _profiles: list[cProfile.Profile] = []

    def _start_thread_profile(*_args: object) -> None:
        sys.setprofile(None)  # this hook ran once, from the new thread's first call
        p = cProfile.Profile()
        _profiles.append(p)
        p.enable()

    def _dump(out_dir: str) -> None:
        main = _profiles[0]
        main.disable()
        stats = pstats.Stats(main)
        for p in _profiles[1:]:
            stats.add(p)
        stats.dump_stats(os.path.join(out_dir, f"unit-{os.getpid()}.pstats"))

    threading.setprofile(_start_thread_profile)
    _first = cProfile.Profile()
    _profiles.append(_first)
    _first.enable()
    atexit.register(_dump, _DIR)
