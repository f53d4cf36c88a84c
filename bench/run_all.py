"""`make bench`: run every benchmark in bench/ in turn and keep going past a failing one.

Each benchmark prints its figures beside the raw limit of the same disk or link measured in the
same run, as a ratio. Nothing here asserts a speed; the figures are for people to read.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ORDER = ["bench_unit_cpu.py", "bench_usbip.py", "bench_journal.py", "bench_link.py", "bench_cascade.py",
         "bench_history.py", "bench_guest_fio.py", "bench_gadget_fio.py"]


def main() -> int:
    scripts = [BENCH / n for n in ORDER if (BENCH / n).exists()]
    scripts += sorted(p for p in BENCH.glob("bench_*.py") if p.name not in ORDER)
    failed = []
    for s in scripts:
        print(f"\n===== {s.name} =====", flush=True)
        t0 = time.monotonic()
        rc = subprocess.call([sys.executable, str(s)], cwd=BENCH.parent)
        print(f"----- {s.name}: exit {rc}, {time.monotonic() - t0:.0f} s", flush=True)
        if rc != 0:
            failed.append(s.name)
    if failed:
        print(f"\nbenchmarks that failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
