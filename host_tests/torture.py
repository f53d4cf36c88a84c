"""`make torture`: a seeded, reproducible, time-bounded fault campaign, in one process.

A local unit (`LocalUnit` over `Journal`, on the simulated flash of `firmware.journal.sim`: journal,
volume and dirty bitmap share one power rail) and a remote unit (the `TargetSession` of
`firmware.replication.target` over an in-memory target) are joined by a link that carries real
journey frames (`JourneyConnection`, CRC32C-checked). The campaign drives the source side the way
`firmware.replicator` does (HELLO, resume or resync, batches of durable records, ACKs confirmed to the
journal, a resync of the dirty regions after an overflow) with a simulated clock, and at random
steps issues host writes, flushes and marks, switches the write cache, and injects:

- power cuts of the local unit at a random device operation, with the writes since the last sync
  dropped, kept, torn per 512-byte sector or kept in order up to a random sector (journal, volume
  and bitmap alike), then recovery;
- kills of either unit (the local unit's writes reach its files, nothing more; a remote unit keeps
  its target's blocks and restarts from its last saved state);
- link faults: a drop with part of a frame delivered, a partition lasting many steps;
- corrupted frames (one byte flipped: the CRC must refuse it) and truncated frames;
- a remote target that fills up (ENOSPC on apply) and is freed later;
- journal overflow into the dirty bitmap (the journal is small and a partition or a full target
  keeps it from being confirmed), and the resync after it.

After every fault, and at the end of each heal phase, it checks against a model of the host's writes:
the local disk is the host's disk after some prefix of its writes that includes every write
acknowledged as durable (`lost` otherwise); the remote's target, unless it is marked inconsistent
during a resync, is the host's disk after some prefix of the writes, never older than one it was
seen at (`prefix_violations`); the remote never applies a record at or below the position it made
durable, i.e. over a newer write (`applied_twice`); after each heal phase (faults off) the link
reaches the journal's head within a bounded number of steps and the remote equals the local disk
(`wedges` otherwise).

The step sequence depends only on the seed: TORTURE_SEED=S replays a campaign, TORTURE_STEPS=N
stops it after exactly N steps (the time bound, TORTURE_SECONDS, only decides how many steps run).
The last line is `torture: seed=S seconds=T cuts=N kills=N link_faults=N corrupt_frames=N enospc=N
overflows=N acked=N lost=0 prefix_violations=0 applied_twice=0 wedges=0`; on a violation the line
before it names the seed and the step, and the exit status is 1.

Run: .venv/bin/python -m host_tests.torture [--seed S] [--seconds T] [--steps N]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import logging
import os
import random
import sys
import time
import uuid
from dataclasses import dataclass, field

from firmware.journal import Journal, RecordsGone
from firmware.journal.bitmap import DirtySnapshot
from firmware.journal.format import RING_OFFSET, RecordKind
from firmware.journal.sim import CrashMode, PowerCut, PowerRail, SimulatedFlash, SimulatedVolume
from firmware.link import protocol as jp
from firmware.local_unit import LocalUnit, ThrottlePolicy
from firmware.replication.source import (
    OPEN_END,
    ResyncPlan,
    ResyncReason,
    SourceIdentity,
    SourceSession,
    dirty_plan,
    dirty_round_covers,
    records_before_dirty,
)
from firmware.replication.target import (
    ApplyRecords,
    Close,
    CopyRegion,
    MakeDurable,
    ReadDigests,
    Refused,
    SaveState,
    Send,
    SyncNow,
    TargetAction,
    TargetSession,
    TargetState,
)
from firmware.storage import StorageError

UNIT = uuid.UUID("70270e00-0000-4000-8000-000000000013")
BS = 512
NBLOCKS = 256
REGION = 8
RING = 96 * 1024  # small: the journal fills and overflows while the remote is cut off
CONSUMER = "remote"
HEAL_EVERY = 400  # steps between heal phases (faults off, the link must catch up)
HEAL_STEPS = 3000  # a heal phase that has not caught up after this many steps is a wedge
ME = SourceIdentity("src", UNIT.bytes, NBLOCKS * BS, BS, 1)


class Violation(Exception):
    """A property of the model does not hold."""


@dataclass
class Counts:
    cuts: int = 0
    kills: int = 0
    link_faults: int = 0
    corrupt_frames: int = 0
    enospc: int = 0
    overflows: int = 0
    acked: int = 0
    lost: int = 0
    prefix_violations: int = 0
    applied_twice: int = 0
    wedges: int = 0
    resyncs: int = 0
    steps: int = 0


class HostModel:
    """The host's writes in order, and the disk after any prefix of them since `base_idx`."""

    def __init__(self) -> None:
        self.base = bytearray(NBLOCKS * BS)  # the disk after write number base_idx
        self.base_idx = 0
        self.writes: list[tuple[int, bytes]] = []  # writes base_idx+1 .. issued
        self.durable_idx = 0  # every write up to here was acknowledged as durable

    @property
    def issued(self) -> int:
        return self.base_idx + len(self.writes)

    def add(self, lba: int, data: bytes) -> int:
        self.writes.append((lba, data))
        return self.issued

    def truncate(self, k: int) -> None:
        """The writes after k never happened (the power failed before they were acknowledged)."""
        del self.writes[k - self.base_idx:]
        self.durable_idx = min(self.durable_idx, k)

    def find(self, image: bytes, lo: int) -> int | None:
        """The newest k >= lo such that `image` is the disk after write k, or None."""
        lo = max(lo, self.base_idx)
        disk = bytearray(self.base)
        found = None
        if lo == self.base_idx and disk == image:
            found = lo
        for i, (lba, data) in enumerate(self.writes):
            disk[lba * BS: lba * BS + len(data)] = data
            if self.base_idx + i + 1 >= lo and disk == image:
                found = self.base_idx + i + 1
        return found

    def disk_at(self, k: int) -> bytes:
        disk = bytearray(self.base)
        for lba, data in self.writes[: k - self.base_idx]:
            disk[lba * BS: lba * BS + len(data)] = data
        return bytes(disk)

    def trim(self, keep_from: int) -> None:
        """Forget the writes before `keep_from` (no check will look further back)."""
        n = keep_from - self.base_idx
        if n <= 256:
            return
        for lba, data in self.writes[:n]:
            self.base[lba * BS: lba * BS + len(data)] = data
        del self.writes[:n]
        self.base_idx = keep_from


class MemRemote:
    """A remote unit's target in memory: the blocks a reader sees, the saved state, a full disk."""

    def __init__(self, counts: Counts) -> None:
        self.counts = counts
        self.blocks = bytearray(NBLOCKS * BS)
        self.saved = TargetState("src", volume_uuid=UNIT.hex, generation=1, applied_seq=0, block_size=BS,
                                 num_blocks=NBLOCKS)
        self.session = self.new_session()
        self.full = False
        self.outbox: list[jp.Event] = []
        self.closed = False

    def new_session(self) -> TargetSession:
        return TargetSession(TargetState(**vars(self.saved)), remote_name="r1")

    def save(self) -> None:
        self.saved = TargetState(**vars(self.session.state))

    def _write(self, lba: int, data: bytes) -> None:
        if self.full:
            self.counts.enospc += 1
            raise OSError(errno.ENOSPC, "no space left on the target")
        self.blocks[lba * BS: lba * BS + len(data)] = data

    def do(self, actions: list[TargetAction]) -> None:
        for a in actions:
            if isinstance(a, ApplyRecords):
                for r in a.records:
                    if r.seq <= self.saved.applied_seq and not self.session.state.resync_active:
                        self.counts.applied_twice += 1
                    if r.kind is RecordKind.WRITE:
                        self._write(r.lba, r.payload)
                    elif r.kind is RecordKind.UNMAP:
                        self._write(r.lba, bytes(r.count * BS))
                self.session.applied_ok(a.records)
            elif isinstance(a, CopyRegion):
                self._write(a.lba, a.data)
            elif isinstance(a, Send):
                self.outbox.append(a.event)
            elif isinstance(a, SaveState):
                self.save()
            elif isinstance(a, MakeDurable):
                # the flusher, done at once: sync the target, store the position, then ACK
                self.session.state.applied_seq = max(self.session.state.applied_seq, a.seq)
                self.save()
                self.do(self.session.durable(a.seq))
            elif isinstance(a, ReadDigests):
                digests = tuple(jp.region_digest(bytes(self.blocks[i * a.region_blocks * BS:
                                                                   (i + 1) * a.region_blocks * BS]))
                                for i in range(a.first_region, a.first_region + a.count))
                self.outbox.append(jp.RegionDigests(a.first_region, a.region_blocks, digests))
            elif isinstance(a, Close):
                self.closed = True
            elif isinstance(a, SyncNow):
                pass  # the blocks are durable as soon as they are written here

    def receive(self, ev: jp.Event) -> None:
        if isinstance(ev, jp.Hello):
            self.do(self.session.hello(ev, target_id="mem", target_blocks=NBLOCKS))
        else:
            self.do(self.session.event(ev))
        want = self.session.want_flush(flusher_busy=False)
        if want is not None:
            self.do([want])

    def connection_lost(self) -> None:
        last = self.session.connection_lost()
        if last is not None:
            with contextlib.suppress(OSError):
                self.do([last])
        self.session.forget_unsynced()
        self.outbox.clear()
        self.closed = False

    def kill(self) -> None:
        """The remote process dies: its blocks stay (the OS has them), its state is the saved one."""
        self.outbox.clear()
        self.session = self.new_session()
        self.closed = False


@dataclass
class Link:
    """One journey connection: frames in flight each way, as bytes."""

    src: jp.JourneyConnection = field(default_factory=lambda: jp.JourneyConnection(jp.Role.SOURCE))
    tgt: jp.JourneyConnection = field(default_factory=lambda: jp.JourneyConnection(jp.Role.REMOTE))
    to_tgt: list[bytes] = field(default_factory=list)
    to_src: list[bytes] = field(default_factory=list)
    handshaken: bool = False
    sent: int = 0  # frames queued towards the remote so far
    delivered: int = 0  # frames the remote has acted on


class LinkBroken(Exception):
    """The connection ends (a protocol error, a refusal, a drop)."""


class Campaign:
    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.c = Counts()
        self.model = HostModel()
        self.remote = MemRemote(self.c)
        self.remote_k = 0  # the remote was last seen as the disk after this write
        self.now = 1000.0
        self.partition_until = -1
        self.full_until = -1
        self.write_cache = False
        self.link: Link | None = None
        self.pending_clear: tuple[int, DirtySnapshot] | None = None  # (frame number, dirty snapshot) to clear
        self.covered_token: int | None = None
        self.resync_open = False  # a round during an overflow left the remote's resync open
        self.was_overflow = False
        self.trace: list[tuple[int, float, int, int, int, int]] = []  # the last steps, for a failure report
        self.rail = PowerRail()
        self.jflash = SimulatedFlash(RING_OFFSET + RING, rail=self.rail)
        self.vflash = SimulatedFlash(NBLOCKS * BS, rail=self.rail)
        self.bflash = SimulatedFlash(8192, rail=self.rail)
        self.start_local()

    # -- the local unit ------------------------------------------------------------------------
    def start_local(self) -> None:
        self.journal = Journal.open(None, size=None, unit_uuid=UNIT, block_size=BS, flash=self.jflash)
        self.lu = LocalUnit(SimulatedVolume(self.vflash, block_size=BS), self.journal, write_cache=self.write_cache,
                            throttle=ThrottlePolicy(start_fill=0.7, max_delay_s=0.0, resume_fill=0.4),
                            bitmap_flash=self.bflash, region_blocks=REGION, sleep=lambda s: None,
                            volume_sync_bytes=8 * 1024, background_flush=False)
        acked = self.journal.register_consumer(CONSUMER, start_seq=0)
        self.session = SourceSession(ME, acked_seq=acked, window_bytes=32 * 1024, heartbeat_interval_s=5.0,
                                     dead_after_s=20.0)

    def recover_local(self, mode: CrashMode, *, inflight: tuple[int, int, bool] | None) -> None:
        """After a power cut or a kill: reboot the devices, reopen, check the disk against the model."""
        self.drop_link()
        self.rail = PowerRail()
        rng = random.Random(self.rng.getrandbits(32))
        self.jflash = self.jflash.rebooted(rng, mode, rail=self.rail)
        self.vflash = self.vflash.rebooted(rng, mode, rail=self.rail)
        self.bflash = self.bflash.rebooted(rng, mode, rail=self.rail)
        self.start_local()
        disk = self.lu.read(0, NBLOCKS)
        m = self.model
        k = m.find(disk, m.durable_idx)
        if k is None and inflight is not None and inflight[2] and m.issued >= 1:
            # a write in flight in overflow mode goes straight to the volume: a SCSI WRITE is not
            # atomic, each of its blocks may be old or new; the host was not answered
            lba, n, _ = inflight
            old, new = m.disk_at(m.issued - 1), m.disk_at(m.issued)
            if all(disk[i:i + BS] in (old[i:i + BS], new[i:i + BS]) for i in range(0, len(disk), BS)):
                m.writes[-1] = (lba, bytes(disk[lba * BS:(lba + n) * BS]))
                k = m.issued
        if k is None:
            older = m.find(disk, 0)
            if older is not None:
                self.c.lost += 1
                raise Violation(f"after recovery ({mode.value}) the local disk is the host's disk after write "
                                f"{older}, but writes up to {m.durable_idx} were acknowledged as durable")
            self.c.prefix_violations += 1
            raise Violation(f"after recovery ({mode.value}) the local disk is no prefix of the host's writes")
        m.truncate(k)
        self.remote_k = min(self.remote_k, k)

    def host_write(self) -> None:
        n = self.rng.randint(1, 8)
        lba = self.rng.randrange(NBLOCKS - n + 1)
        data = self.rng.randbytes(n * BS)
        fua = self.rng.random() < 0.1
        m = self.model
        idx = m.add(lba, data)
        overflow_before = self.lu.overflow
        try:
            self.lu.write(lba, data, fua=fua)
        except PowerCut:
            self.c.cuts += 1
            self.recover_local(self.crash_mode(), inflight=(lba, n, overflow_before or self.lu.overflow))
            return
        self.c.acked += 1
        if not self.write_cache or fua or self.lu.overflow:
            m.durable_idx = idx
        if self.lu.overflow and not self.was_overflow:
            self.c.overflows += 1
        self.was_overflow = self.lu.overflow

    def flush(self) -> None:
        self.lu.flush()
        self.model.durable_idx = self.model.issued

    def mark(self) -> None:
        # a full journal refuses a mark with a precise error; the host may place it later
        with contextlib.suppress(StorageError):
            self.lu.mark(f"m{self.c.steps}")

    def toggle_cache(self) -> None:
        on = not self.write_cache
        self.lu.set_write_cache(on)
        if not on:
            self.model.durable_idx = self.model.issued
        self.write_cache = on

    def crash_mode(self) -> CrashMode:
        return self.rng.choice(list(CrashMode))

    # -- the link --------------------------------------------------------------------------------
    def drop_link(self) -> None:
        # what the remote was known to hold of the dirty regions is forgotten with the connection:
        # the next one copies them again
        self.covered_token = None
        self.pending_clear = None
        self.resync_open = False  # the remote reports its open resync in HELLO_REPLY: a full one follows
        if self.link is not None:
            self.link = None
            self.remote.connection_lost()
            self.session.connection_lost()

    def connect(self) -> None:
        self.link = Link()
        self.session.connection_made(self.now)
        self.send(self.session.hello())

    def send(self, ev: jp.Event) -> None:
        assert self.link is not None
        self.link.to_tgt.append(self.link.src.send(ev))
        self.link.sent += 1

    def deliver(self, max_frames: int) -> None:
        """Carry up to `max_frames` frames each way and act on them."""
        link = self.link
        assert link is not None
        for _ in range(max_frames):
            if not link.to_tgt:
                break
            link.tgt.receive_data(link.to_tgt.pop(0))
            while not isinstance(ev := link.tgt.next_event(), jp.NeedData):
                try:
                    self.remote.receive(ev)
                except Refused as exc:
                    raise LinkBroken(f"refused: {exc}") from None
                except OSError as exc:
                    raise LinkBroken(f"target: {exc}") from None
            for out in self.remote.outbox:
                link.to_src.append(link.tgt.send(out))
            self.remote.outbox.clear()
            if self.remote.closed:
                raise LinkBroken("the remote closed the connection")
            link.delivered += 1
            if self.pending_clear is not None and link.delivered >= self.pending_clear[0]:
                # the remote holds the copied regions (its blocks are written as it acts on a frame)
                snap = self.pending_clear[1]
                self.pending_clear = None
                self.lu.clear_dirty(snap)
        for _ in range(max_frames):
            if not link.to_src:
                break
            link.src.receive_data(link.to_src.pop(0))
            while not isinstance(ev := link.src.next_event(), jp.NeedData):
                self.source_event(ev)

    def source_event(self, ev: jp.Event) -> None:
        j = self.journal
        if isinstance(ev, jp.HelloReply):
            try:
                j.read_records(ev.applied_seq, 1)
                has_after = True
            except RecordsGone:
                has_after = False
            confirms, plan = self.session.hello_reply(ev, self.now, durable_seq=j.durable_seq, tail_seq=j.tail_seq,
                                                      has_records_after=has_after,
                                                      total_regions=NBLOCKS // REGION)
            for cf in confirms:
                j.confirm(CONSUMER, min(cf.seq, j.durable_seq))
            assert self.link is not None
            self.link.handshaken = True
            if isinstance(plan, ResyncPlan):
                self.resync(plan, None)
        elif isinstance(ev, jp.Ack):
            _, confirms = self.session.ack(ev.seq, self.now)
            for cf in confirms:
                j.confirm(CONSUMER, min(cf.seq, j.durable_seq))
        elif isinstance(ev, jp.Error):
            raise LinkBroken(f"remote error {ev.code.name}: {ev.message}")

    def resync(self, plan: ResyncPlan, snap: DirtySnapshot | None, *, final: bool = True) -> None:
        """Copy the plan's regions from the local volume, then records after its position. A round
        that is not final (the journal still overflows) leaves the remote's resync open."""
        self.c.resyncs += 1
        self.send(jp.ResyncBegin(plan.position, REGION, len(plan.regions)))
        for idx in plan.regions:
            self.send(jp.RegionData(idx * REGION, self.lu.read(idx * REGION, REGION)))
        self.session.resync_copy_done(plan.position)
        self.send(jp.ResyncEnd(self.journal.head_seq if final else OPEN_END))
        self.resync_open = not final
        if snap is not None:
            assert self.link is not None
            self.pending_clear = (self.link.sent, snap)  # clear once the remote acted on RESYNC_END
            self.covered_token = snap.token

    def dirty_round(self) -> bool:
        """The resync of the dirty regions this remote lacks, at P = sent_seq, as the replicator runs it:
        final once the overflow has ended and no run of dirty writes was journaled after P."""
        snap = self.lu.dirty_snapshot()
        overflowing = self.lu.overflow
        plan = dirty_plan((snap.token, snap.regions) if snap.regions else None,
                          covered_token=self.covered_token, resync_open=self.resync_open, overflowing=overflowing,
                          position=self.session.sent_seq, region_blocks=REGION, total_regions=NBLOCKS // REGION)
        if plan is None:
            return False
        held: DirtySnapshot | None = None
        complete = True
        if snap.regions:
            _, runs = self.lu.dirty_runs()
            token, complete = dirty_round_covers(tuple(r for r in runs if r[0] <= snap.token), snap.token,
                                                 plan.position)
            held = dataclasses.replace(snap, token=token)
        self.resync(plan, held, final=complete and not overflowing)
        return True

    def stream(self) -> None:
        link = self.link
        if link is None or not link.handshaken:
            return
        j = self.journal
        while self.session.window_open and self.session.sent_seq < j.durable_seq:
            try:
                recs = [r for r in j.read_records(self.session.sent_seq, 16 * 1024) if r.seq <= j.durable_seq]
            except RecordsGone:
                self.resync(ResyncPlan(ResyncReason.RECORDS_GONE, tuple(range(NBLOCKS // REGION)), j.durable_seq), None)
                return
            if not recs:
                return
            # records journaled after writes this remote lacks (an overflow ended) wait for their
            # regions: the remote is sent the records before them, then the copy, then the rest
            token, runs = self.lu.dirty_runs()
            limit = records_before_dirty(runs, token, self.covered_token) if runs and not self.resync_open else None
            if limit is not None and recs[-1].seq > limit:
                if self.session.sent_seq < limit:
                    recs = [r for r in recs if r.seq <= limit]
                elif self.pending_clear is None and self.dirty_round():
                    continue
                else:
                    return
            self.send(self.session.batch(recs))
        if self.session.sent_seq < j.durable_seq or self.pending_clear is not None:
            return
        if self.lu.overflow:
            return  # the copy would chase the writes; the records after the overflow wait for it
        # caught up: the regions written straight to the volume during an overflow, at P = sent_seq
        self.dirty_round()

    def pump(self) -> None:
        """One step of the link: connect when it can, send what there is, carry some frames."""
        if self.link is None:
            if self.c.steps < self.partition_until:
                return
            self.connect()
        try:
            self.stream()
            self.deliver(self.rng.randint(1, 4))
        except (jp.ProtocolError, LinkBroken):
            self.drop_link()

    # -- faults ----------------------------------------------------------------------------------
    def link_fault(self) -> None:
        link = self.link
        if link is None:
            return
        self.c.link_faults += 1
        kind = self.rng.random()
        if kind < 0.4 and link.to_tgt:  # dropped mid-frame: part of it arrives, then nothing
            frame = link.to_tgt[0]
            link.tgt.receive_data(frame[: self.rng.randrange(len(frame))])
        elif kind < 0.6:  # a partition: no connection for a while
            self.partition_until = self.c.steps + self.rng.randint(20, 400)
        self.drop_link()

    def corrupt_frame(self) -> None:
        link = self.link
        if link is None:
            return
        queue = link.to_tgt if (link.to_tgt and self.rng.random() < 0.7) or not link.to_src else link.to_src
        if not queue:
            return
        self.c.corrupt_frames += 1
        i = self.rng.randrange(len(queue))
        frame = bytearray(queue[i])
        if self.rng.random() < 0.5:
            frame[self.rng.randrange(len(frame))] ^= 1 << self.rng.randrange(8)
            queue[i] = bytes(frame)
            queue[i + 1:] = []  # a damaged frame ends the connection: what follows never counts
        else:  # truncated: the connection ends after part of the frame
            queue[i] = bytes(frame[: self.rng.randrange(len(frame))])
            queue[i + 1:] = []
        with contextlib.suppress(jp.ProtocolError, LinkBroken):
            self.deliver(len(queue) + 1)
        self.drop_link()

    def kill_local(self) -> None:
        self.c.kills += 1
        self.recover_local(CrashMode.KEEP, inflight=None)

    def kill_remote(self) -> None:
        self.c.kills += 1
        self.drop_link()
        self.remote.kill()

    def cut_power(self) -> None:
        """Power fails at one of the next device operations (journal, volume or bitmap)."""
        self.rail.cut_at = self.rail.ops + self.rng.randint(1, 12)

    # -- checks ----------------------------------------------------------------------------------
    def check_remote(self) -> None:
        if self.remote.session.state.resync_active:
            return  # marked inconsistent: a reader is told so
        k = self.model.find(bytes(self.remote.blocks), self.remote_k)
        if k is None:
            self.c.prefix_violations += 1
            raise Violation(f"the remote target is no image of the host's writes from write {self.remote_k} on "
                            f"(applied seq {self.remote.saved.applied_seq}, journal head {self.journal.head_seq})")
        self.remote_k = k
        self.model.trim(min(self.remote_k, self.model.durable_idx))

    def heal(self) -> None:
        """Faults off: the link must bring the remote to the local disk within HEAL_STEPS steps."""
        self.partition_until = -1
        self.remote.full = False
        self.rail.cut_at = None
        self.lu.flush()
        self.model.durable_idx = self.model.issued
        for _ in range(HEAL_STEPS):
            self.pump()
            self.now += 0.01
            st = self.remote.session.state
            if (self.link is not None and self.session.acked_seq >= self.journal.durable_seq
                    and not st.resync_active and not self.lu.overflow and not self.lu.dirty_snapshot().regions
                    and self.pending_clear is None):
                break
        else:
            self.c.wedges += 1
            raise Violation(f"no progress: after {HEAL_STEPS} steps without faults the remote is at "
                            f"{self.session.acked_seq}, the journal at {self.journal.durable_seq} (connected "
                            f"{self.link is not None}, resync {self.remote.session.state.resync_active}, overflow "
                            f"{self.lu.overflow}, dirty regions {len(self.lu.dirty_snapshot().regions)}, "
                            f"clear pending {self.pending_clear is not None})")
        if bytes(self.remote.blocks) != self.lu.read(0, NBLOCKS):
            self.c.prefix_violations += 1
            raise Violation("caught up, yet the remote target differs from the local disk")
        self.check_remote()

    # -- the campaign ----------------------------------------------------------------------------
    def step(self) -> None:
        self.c.steps += 1
        self.now += 0.01
        if self.remote.full and self.c.steps >= self.full_until:
            self.remote.full = False
        r = self.rng.random()
        self.trace.append((self.c.steps, r, self.journal.durable_seq, self.session.acked_seq,
                           self.remote.saved.applied_seq, self.model.issued))
        del self.trace[:-200]
        try:
            if r < 0.50:
                self.host_write()
            elif r < 0.54:
                self.flush()
            elif r < 0.56:
                self.mark()
            elif r < 0.57:
                self.toggle_cache()
            elif r < 0.90:
                self.pump()
            elif r < 0.93:
                self.cut_power()
            elif r < 0.945:
                self.link_fault()
            elif r < 0.96:
                self.corrupt_frame()
            elif r < 0.965:
                self.kill_local()
                self.check_remote()
            elif r < 0.97:
                self.kill_remote()
                self.check_remote()
            elif r < 0.975:
                self.remote.full = True
                self.full_until = self.c.steps + self.rng.randint(20, 300)
            else:
                self.pump()
        except PowerCut:  # the power failed inside a flush, a mark, a journal read or a confirm
            self.c.cuts += 1
            self.recover_local(self.crash_mode(), inflight=None)
            self.check_remote()
        if self.c.steps % HEAL_EVERY == 0:
            self.heal()


def run(seed: int, seconds: float, steps: int | None = None) -> tuple[Counts, str | None]:
    """Run one campaign; returns its counts and the violation (with the step it happened at), or None."""
    camp = Campaign(seed)
    deadline = time.monotonic() + seconds
    try:
        while (camp.c.steps < steps) if steps is not None else (time.monotonic() < deadline):
            camp.step()
        camp.heal()
    except Violation as exc:
        return camp.c, f"step {camp.c.steps}: {exc}"
    return camp.c, None


def summary(seed: int, seconds: float, c: Counts) -> str:
    return (f"torture: seed={seed} seconds={seconds:g} cuts={c.cuts} kills={c.kills} link_faults={c.link_faults} "
            f"corrupt_frames={c.corrupt_frames} enospc={c.enospc} overflows={c.overflows} acked={c.acked} "
            f"lost={c.lost} prefix_violations={c.prefix_violations} applied_twice={c.applied_twice} "
            f"wedges={c.wedges}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=None, help="default: TORTURE_SEED, else a random seed")
    ap.add_argument("--seconds", type=float, default=None, help="default: TORTURE_SECONDS, else 60")
    ap.add_argument("--steps", type=int, default=None, help="stop after exactly N steps (default: TORTURE_STEPS)")
    args = ap.parse_args(argv)
    env_seed, env_steps = os.environ.get("TORTURE_SEED"), os.environ.get("TORTURE_STEPS")
    seed = args.seed if args.seed is not None else int(env_seed) if env_seed else random.SystemRandom().randrange(1 << 31)
    seconds = args.seconds if args.seconds is not None else float(os.environ.get("TORTURE_SECONDS") or 60)
    steps = args.steps if args.steps is not None else int(env_steps) if env_steps else None
    logging.disable(logging.CRITICAL)  # the units log every overflow and resync; the counts say it
    print(f"torture: seed={seed} (replay with TORTURE_SEED={seed})", flush=True)
    t0 = time.monotonic()
    counts, failure = run(seed, seconds, steps)
    elapsed = time.monotonic() - t0
    print(f"torture: {counts.steps} steps, {counts.resyncs} resyncs in {elapsed:.1f} s", flush=True)
    if failure is not None:
        print(f"torture: FAILED seed={seed} at {failure} (replay: TORTURE_SEED={seed} "
              f"TORTURE_STEPS={counts.steps})", flush=True)
    print(summary(seed, round(elapsed), counts), flush=True)
    return 1 if failure is not None else 0


if __name__ == "__main__":
    sys.exit(main())
