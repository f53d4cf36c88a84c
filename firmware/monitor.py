"""What the operator-facing parts (metrics, the systemd watchdog) learn from the command path.

`CommandMonitor` wraps a `firmware.logical_unit.LogicalUnit` (the SCSI target) for a transport: it
times every `execute()` into a latency histogram per opcode and keeps the start of every command
still running, so the watchdog can tell a unit that is idle from one whose command loop is stuck.
It costs two clock reads, a bisect, a dict store and delete and one list increment per command, and
takes no lock: each thread that executes commands counts into its own histograms, which a scrape
adds up (`bench/bench_unit_cpu.py --monitor` measures the cost).

Everything else (status, plan) is passed to the wrapped unit unchanged.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable
from typing import Any

from firmware.logical_unit import CommandPlan, CommandResult, LogicalUnit
from firmware.scsi.opcodes import Opcode

# upper bounds of the latency buckets, seconds (Prometheus `le`); the last bucket is +Inf
LATENCY_BUCKETS_S: tuple[float, ...] = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                        0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BOUNDS_NS = [round(b * 1e9) for b in LATENCY_BUCKETS_S]


def opcode_name(op: int) -> str:
    try:
        return Opcode(op).name
    except ValueError:
        return f"0x{op:02x}"


class _Counts:
    """One thread's histograms: opcode -> count per bucket (the last one is +Inf), and the sums."""

    __slots__ = ("hist", "sum_ns")

    def __init__(self) -> None:
        self.hist: dict[int, list[int]] = {}
        self.sum_ns: dict[int, int] = {}


class CommandMonitor:
    """A LogicalUnit that times each command of the one it wraps. Thread-safe without locks on the
    command path: only the thread that runs a command writes its counts."""

    def __init__(self, lu: LogicalUnit, *, clock_ns: Callable[[], int] = time.monotonic_ns) -> None:
        self.lu = lu
        self._clock = clock_ns
        self._running: dict[int, tuple[int, int]] = {}  # thread id -> (opcode, start ns)
        self._per_thread: dict[int, _Counts] = {}  # thread id -> its counts (never removed: a few threads)

    # -- LogicalUnit ----------------------------------------------------------------------------
    def plan(self, cdb: bytes) -> CommandPlan:
        return self.lu.plan(cdb)

    def execute(self, cdb: bytes, data_out: bytes = b"") -> CommandResult:
        op = cdb[0] if cdb else -1
        tid = threading.get_ident()
        t0 = self._clock()
        self._running[tid] = (op, t0)
        try:
            return self.lu.execute(cdb, data_out)
        finally:
            dt = self._clock() - t0
            del self._running[tid]
            c = self._per_thread.get(tid)
            if c is None:
                c = self._per_thread[tid] = _Counts()
            h = c.hist.get(op)
            if h is None:
                c.sum_ns[op] = 0
                h = c.hist[op] = [0] * (len(_BOUNDS_NS) + 1)
            h[bisect.bisect_left(_BOUNDS_NS, dt)] += 1
            c.sum_ns[op] += dt

    def __getattr__(self, name: str) -> Any:  # status(), sense state, ... of the wrapped unit
        return getattr(self.lu, name)

    # -- for the watchdog and the metrics -------------------------------------------------------
    def oldest_running(self) -> tuple[str, float] | None:
        """(opcode name, seconds) of the command that has been running longest, or None when idle."""
        now = self._clock()
        running = list(self._running.copy().values())
        if not running:
            return None
        op, t0 = min(running, key=lambda r: r[1])
        return opcode_name(op), (now - t0) / 1e9

    def latency(self) -> dict[str, tuple[list[int], float]]:
        """Opcode name -> (count per bucket, the last one for +Inf; sum of durations in seconds), over
        every thread. A command that ends during the call may be in its count and not yet in its sum."""
        total: dict[int, list[int]] = {}
        sums: dict[int, int] = {}
        for c in list(self._per_thread.copy().values()):
            for op, h in list(c.hist.copy().items()):
                acc = total.setdefault(op, [0] * len(h))
                for i, n in enumerate(h.copy()):
                    acc[i] += n
                sums[op] = sums.get(op, 0) + c.sum_ns.get(op, 0)
        return {opcode_name(op): (h, sums[op] / 1e9) for op, h in sorted(total.items())}
