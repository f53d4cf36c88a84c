"""Hypothesis stateful test: random writes, unmaps, flushes, write-cache switches, consumer
confirmations, resyncs and power cuts (at any device operation, with dropped, kept, torn or
in-order-partial unsynced writes), each followed by recovery.

After every recovery:
- every write acknowledged as durable is present;
- the disk equals the host's disk after some prefix of its writes that includes all of those (only
  a write that was in flight when the power failed in overflow mode, written straight to the volume,
  may be there in part: a SCSI write is not atomic);
- the journal's invariants hold and every retained record reads back with valid checksums.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from firmware.journal import Journal
from firmware.journal.format import RING_OFFSET
from firmware.journal.sim import CrashMode, PowerCut, PowerRail, SimulatedFlash, SimulatedVolume
from firmware.local_unit import LocalUnit, ThrottlePolicy

UNIT = uuid.UUID("0badcafe-0000-4000-8000-000000000001")
BS = 512
NBLOCKS = 48
RING = 64 * 1024  # small: wrap-around, a full journal and overflow happen within a few dozen steps
REGION = 8


class PowerCutMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.rail = PowerRail()
        self.jflash = SimulatedFlash(RING_OFFSET + RING, rail=self.rail)
        self.vflash = SimulatedFlash(NBLOCKS * BS, rail=self.rail)
        self.bflash = SimulatedFlash(8192, rail=self.rail)
        self.write_cache = False
        self.tag = 0
        self.states: list[bytes] = [bytes(NBLOCKS * BS)]  # host disk after each issued write
        self.durable_idx = 0  # states[durable_idx] and before: acknowledged as durable
        self.inflight_partial = False
        self.recoveries = 0
        self.must_be_dirty: set[int] = set()  # regions written straight to the volume, not resynced
        self._start()
        self.consumer_seq = self.journal.register_consumer("remote")

    def _start(self) -> None:
        self.journal = Journal.open(None, size=None, unit_uuid=UNIT, block_size=BS, flash=self.jflash)
        self.lu = LocalUnit(SimulatedVolume(self.vflash, block_size=BS), self.journal, write_cache=self.write_cache,
                            throttle=ThrottlePolicy(start_fill=0.7, max_delay_s=0.0, resume_fill=0.4),
                            bitmap_flash=self.bflash, region_blocks=REGION, sleep=lambda s: None,
                            volume_sync_bytes=8 * 1024, background_flush=False)

    # -- host operations --------------------------------------------------------------------------
    def _host_op(self, lba: int, new: bytes, op: Callable[[], None], *, fua: bool = False) -> None:
        state = bytearray(self.states[-1])
        state[lba * BS: lba * BS + len(new)] = new
        self.states.append(bytes(state))
        was_overflow = self.lu.overflow
        try:
            op()
        except PowerCut:
            # in flight: may or may not be there, and in part only if it bypassed the journal
            self.inflight_partial = was_overflow or self.lu.overflow
            event("power cut during a host write" + (" in overflow" if self.inflight_partial else ""))
            self._recover()
            return
        if self.lu.overflow:
            event("write in overflow mode")
            n = len(new) // BS
            self.must_be_dirty.update(range(lba // REGION, (lba + n - 1) // REGION + 1))
        if self.lu.overflow or not self.write_cache or fua:
            self.durable_idx = len(self.states) - 1

    @rule(lba=st.integers(0, NBLOCKS - 1), n=st.integers(1, 6), fua=st.booleans())
    def write(self, lba: int, n: int, fua: bool) -> None:
        n = min(n, NBLOCKS - lba)
        self.tag += 1
        data = bytes([self.tag % 251 + 1]) * (n * BS)
        self._host_op(lba, data, lambda: self.lu.write(lba, data, fua=fua), fua=fua)

    @rule(lba=st.integers(0, NBLOCKS - 1), n=st.integers(1, 12))
    def unmap(self, lba: int, n: int) -> None:
        n = min(n, NBLOCKS - lba)
        self._host_op(lba, bytes(n * BS), lambda: self.lu.unmap(lba, n))

    @rule()
    def flush(self) -> None:
        try:
            self.lu.flush()
        except PowerCut:
            self._recover()
            return
        self.durable_idx = len(self.states) - 1

    @rule(on=st.booleans())
    def set_write_cache(self, on: bool) -> None:
        try:
            self.lu.set_write_cache(on)
        except PowerCut:
            self._recover()
            return
        if self.write_cache and not on:
            self.durable_idx = len(self.states) - 1
        self.write_cache = on

    @rule(frac=st.floats(0.0, 1.0))
    def consumer_confirms(self, frac: float) -> None:
        j = self.journal
        lo = j.consumers()["remote"]
        seq = lo + int((j.durable_seq - lo) * frac)
        try:
            if seq > lo:
                # a consumer reads what it confirms: this must never return damaged data
                j.read_records(lo, 1 << 20)
            j.confirm("remote", seq)
        except PowerCut:
            self._recover()

    @rule()
    def resync_dirty_regions(self) -> None:
        try:
            snap = self.lu.dirty_snapshot()
            assert self.must_be_dirty <= set(snap.region_indices)
            self.lu.clear_dirty(snap)
            self.must_be_dirty.clear()
        except PowerCut:
            self._recover()

    @rule()
    def clean_restart(self) -> None:
        """Orderly shutdown and start: everything, cached or not, is kept."""
        try:
            self.lu.close()
            self.journal.close()
        except PowerCut:
            self._recover()
            return
        self.durable_idx = len(self.states) - 1
        self._recover(CrashMode.DROP, 0)

    @rule(after=st.integers(1, 8))
    def arm_power_cut(self, after: int) -> None:
        """The power fails at the after-th device operation from now (inside some later step)."""
        if self.rail.cut_at is None:
            self.rail.cut_at = self.rail.ops + after

    @rule(mode=st.sampled_from(list(CrashMode)), seed=st.integers(0, 2**16), now=st.integers(0, 3))
    def power_cut_between_commands(self, mode: CrashMode, seed: int, now: int) -> None:
        if now == 0:  # a quarter of the draws: keeps runs long enough to fill the journal
            self.rail.cut_now()
            self._recover(mode, seed)

    # -- recovery and checks ----------------------------------------------------------------------
    def _recover(self, mode: CrashMode | None = None, seed: int | None = None) -> None:
        self.recoveries += 1
        rng = random.Random(seed if seed is not None else self.recoveries)
        mode = mode if mode is not None else rng.choice(list(CrashMode))
        self.rail = PowerRail()
        self.jflash = self.jflash.rebooted(rng, mode, rail=self.rail)
        self.vflash = self.vflash.rebooted(rng, mode, rail=self.rail)
        self.bflash = self.bflash.rebooted(rng, mode, rail=self.rail)
        self._start()  # must not raise: a power cut is not corruption
        disk = self.lu.read(0, NBLOCKS)
        candidates = self.states[self.durable_idx:]
        ok = disk in candidates
        if not ok and self.inflight_partial and self.durable_idx <= len(self.states) - 2:
            old, new = self.states[-2], self.states[-1]
            ok = all(disk[i:i + BS] in (old[i:i + BS], new[i:i + BS]) for i in range(0, len(disk), BS))
        event(f"recovered after a power cut ({mode.value})")
        if self.journal.recovery.torn_tail:
            event("torn journal tail discarded")
        if self.lu.replayed_records:
            event("records replayed onto the volume")
        assert ok, (f"recovered disk is not the host's disk after a prefix of its writes that includes the "
                    f"{self.durable_idx} acknowledged as durable (mode {mode.value})")
        self.states = [disk]
        self.durable_idx = 0
        self.inflight_partial = False
        self._check_journal_readable()

    def _check_journal_readable(self) -> None:
        j = self.journal
        recs = j.read_records(j.tail_seq - 1, 1 << 30)
        assert [r.seq for r in recs] == list(range(j.tail_seq, j.durable_seq + 1))

    @invariant()
    def journal_invariants(self) -> None:
        if self.rail.cut:
            return
        j = self.journal
        assert 1 <= j.tail_seq <= j.durable_seq + 1 <= j.head_seq + 1
        assert 0 <= j.used_bytes <= j.capacity_bytes
        assert j.tail_seq - 1 <= j.applied_seq <= j.durable_seq
        for seq in j.consumers().values():
            assert j.tail_seq - 1 <= seq <= j.durable_seq

    @invariant()
    def reads_return_newest_data(self) -> None:
        if self.rail.cut:
            return
        assert self.lu.read(0, NBLOCKS) == self.states[-1]

    @invariant()
    def overflow_writes_stay_dirty_until_resynced(self) -> None:
        if self.rail.cut:
            return
        assert self.must_be_dirty <= set(self.lu.dirty_snapshot().region_indices)

    @invariant()
    def status_tells_the_overflow(self) -> None:
        st_ = self.lu.status()["journal"]
        assert isinstance(st_, dict) and st_["overflow"] is self.lu.overflow


PowerCutMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=80, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
test_power_cuts_never_lose_acknowledged_writes = PowerCutMachine.TestCase
