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
  keeps it from being confirmed), and the resync after it;
- now and then a whole failover (`host_tests.torture_failover`): the remote promoted through the
  firmware's own failover code, the standby host's writes on it, the old local unit back as a replica
  (or a split brain, resolved with `resolve --keep`), failback, with power cuts and kills inside.

After every fault, and at the end of each heal phase, it checks against a model of the host's writes:
the local disk is the host's disk after some prefix of its writes that includes every write
acknowledged as durable (`lost` otherwise); the remote's target, unless it is marked inconsistent
during a resync, is the host's disk after some prefix of the writes, never older than one it was
seen at (`prefix_violations`); the remote never applies a record at or below the position it made
durable, i.e. over a newer write (`applied_twice`); after each heal phase (faults off) the link
reaches the journal's head within a bounded number of steps and the remote equals the local disk
(`wedges` otherwise).

A share of the time (TORTURE_REAL_SHARE, 0.2 by default) goes to rounds with real processes and
real files between heal phases (`host_tests.torture_real`): a `usbmirror local` / `usbmirror remote`
pair on tmp files, written over USB/IP, kill -9 of either unit and restart, and in about half of the
rounds a promotion of the remote, writes on the promoted copy, and a failback; checked against the
same kind of model.

The step sequence depends only on the seed: TORTURE_SEED=S replays a campaign, TORTURE_STEPS=N
stops it after exactly N steps (the time bound, TORTURE_SECONDS, only decides how many steps run;
a real round draws on its own random stream, seeded by the seed and its number).
The last line is `torture: seed=S seconds=T cuts=N kills=N link_faults=N corrupt_frames=N enospc=N
overflows=N promotions=N failbacks=N real_rounds=N acked=N lost=0 prefix_violations=0 applied_twice=0
wedges=0`; on a violation the line before it names the seed and the step, and the exit status is 1.

Run: .venv/bin/python -m host_tests.torture [--seed S] [--seconds T] [--steps N]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import json
import logging
import os
import random
import sys
import time
import uuid
from collections.abc import Sequence
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
from host_tests.torture_failover import Violation, fail_over
from host_tests.torture_real import RealViolation, real_round

UNIT = uuid.UUID("70270e00-0000-4000-8000-000000000013")
BS = 512
NBLOCKS = 256
REGION = 8
SECTOR_BYTES = 512
RING = 96 * 1024  # small: the journal fills and overflows while the remote is cut off
CONSUMER = "remote"
HEAL_EVERY = 400  # steps between heal phases (faults off, the link must catch up)
HEAL_STEPS = 3000  # a heal phase that has not caught up after this many steps is a wedge
FAILOVER_FROM = 1 - 1 / 1500  # the share of steps above it are a whole failover (host_tests.torture_failover)
ME = SourceIdentity("src", UNIT.bytes, NBLOCKS * BS, BS, 1)


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
    remote_cuts: int = 0
    remote_torn_checks: int = 0
    promotion_checks: int = 0  # in process: promotions a remote would allow right after its power cut, checked
    promotions_refused: int = 0  # ... and refused (the target may be torn, or a resync is open)
    promotions: int = 0
    failbacks: int = 0
    real_promotions: int = 0  # of `promotions`, those in rounds with real processes
    real_failbacks: int = 0
    failovers_refused: int = 0  # in process: promotions the remote refused (a resync open, a torn target)
    promoted_writes: int = 0  # the standby host's writes answered by a promoted copy, in process
    split_brains: int = 0
    resolved: int = 0  # split brains resolved with `resolve --keep`
    failover_loss: int = 0  # acknowledged writes of the old primary a promotion discarded (accepted, counted)
    real_rounds: int = 0
    resyncs: int = 0
    steps: int = 0


class HostModel:
    """The host's writes in order, and the disk after any prefix of them since `base_idx`."""

    def __init__(self, nblocks: int = NBLOCKS) -> None:
        self.base = bytearray(nblocks * BS)  # the disk after write number base_idx
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
        # the target and its state file on one power rail: target writes stay unsynced until the
        # session asks for a sync; the state file is written tmp + fsync + rename + fsync(dir)
        self.rail = PowerRail()
        self.flash = SimulatedFlash(NBLOCKS * BS, rail=self.rail)
        self.state_tmp = SimulatedFlash(4096, rail=self.rail)
        self.state_dir = SimulatedFlash(SECTOR_BYTES, rail=self.rail)
        self.saved = TargetState("src", volume_uuid=UNIT.hex, generation=1, applied_seq=0, block_size=BS,
                                 num_blocks=NBLOCKS)
        self.saved_json = self.durable_json = self.dump(self.saved)
        self.session = self.new_session()
        self.full = False
        self.outbox: list[jp.Event] = []
        self.closed = False

    @property
    def blocks(self) -> bytearray:
        """What a reader of the target sees now."""
        return self.flash.current

    @staticmethod
    def dump(state: TargetState) -> bytes:
        return json.dumps(vars(state), sort_keys=True).encode()

    def new_session(self) -> TargetSession:
        return TargetSession(TargetState(**vars(self.saved)), remote_name="r1")

    def save(self) -> None:
        """The state file, as `write_atomically` writes it; a cut before the rename keeps the old one."""
        raw = self.dump(self.session.state)
        self.state_tmp.pwrite(raw.ljust(self.state_tmp.size, b" "), 0)
        self.state_tmp.sync()
        self.state_dir.pwrite(b"\x01", 0)  # the rename, durable with the directory's fsync
        self.saved_json = raw
        self.saved = TargetState(**json.loads(raw))
        self.state_dir.sync()
        self.durable_json = raw

    def power_cut(self, rng: random.Random, mode: CrashMode) -> None:
        """The remote loses power: unsynced target writes are dropped, kept or torn per sector; the
        state file is the last one renamed into place, or the one before if that rename was not durable."""
        if self.state_dir.unsynced and (mode is CrashMode.DROP or (mode is not CrashMode.KEEP and rng.random() < 0.5)):
            self.saved_json = self.durable_json
        self.durable_json = self.saved_json
        self.rail = PowerRail()
        self.flash = self.flash.rebooted(rng, mode, rail=self.rail)
        self.state_tmp = SimulatedFlash(4096, rail=self.rail)
        self.state_dir = SimulatedFlash(SECTOR_BYTES, rail=self.rail)
        self.saved = TargetState(**json.loads(self.saved_json))
        self.kill()

    def _write(self, lba: int, data: bytes) -> None:
        if self.full:
            self.counts.enospc += 1
            raise OSError(errno.ENOSPC, "no space left on the target")
        self.flash.pwrite(data, lba * BS)

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
                self.flash.sync()
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
                self.flash.sync()

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


class RemotePowerCut(Exception):
    """The remote's power failed while it acted on a frame."""


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
        self.last_action = ""
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

    def recover_local(self, mode: CrashMode, *, inflight: tuple[int, int, bool] | None, check: bool = True) -> None:
        """After a power cut or a kill: reboot the devices, reopen, check the disk against the model
        (`check=False`: in the middle of a failback, whose next attempt compares every region again)."""
        self.drop_link()
        self.rail = PowerRail()
        rng = random.Random(self.rng.getrandbits(32))
        self.jflash = self.jflash.rebooted(rng, mode, rail=self.rail)
        self.vflash = self.vflash.rebooted(rng, mode, rail=self.rail)
        self.bflash = self.bflash.rebooted(rng, mode, rail=self.rail)
        self.start_local()
        if not check:
            return
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
            try:
                self.remote.connection_lost()
            except PowerCut:  # the remote's power failed while it made its last batch durable
                self.remote_lost_power()
                return
            self.session.connection_lost()

    def remote_lost_power(self) -> None:
        """The remote's power failed: its connection ends, its devices come back as the cut left them."""
        self.c.cuts += 1
        self.c.remote_cuts += 1
        self.covered_token = None
        self.pending_clear = None
        self.resync_open = False
        self.link = None
        self.session.connection_lost()
        self.remote.power_cut(random.Random(self.rng.getrandbits(32)), self.crash_mode())
        self.promotion_check()

    def promotion_check(self) -> None:
        """`usbmirror promote` right after the remote's power cut (the local site may be gone too): it
        is refused while the remote says its target may be torn; if the remote would serve it, what it
        serves must be an image of the host's writes, checked here whatever the remote says."""
        ses = self.remote.session
        if ses.state.resync_active or ses.reapplying or not ses.state.volume_uuid:
            self.c.promotions_refused += 1
            return
        self.c.promotion_checks += 1
        if self.model.find(bytes(self.remote.blocks), self.remote_k) is None:
            self.c.prefix_violations += 1
            raise Violation(f"a promotion right after the remote's power cut would serve no image of the host's "
                            f"writes (applied seq {ses.state.applied_seq}, write limit {ses.state.write_limit})")

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
                except PowerCut:
                    raise RemotePowerCut from None
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
        except RemotePowerCut:
            self.remote_lost_power()

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
        try:
            self.deliver(len(queue) + 1)
        except (jp.ProtocolError, LinkBroken):
            pass
        except RemotePowerCut:
            self.remote_lost_power()
            return
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
        if self.remote.session.state.resync_active or not self.remote.session.state.volume_uuid:
            return  # marked inconsistent, or holding no copy (`resolve --keep local`): a reader is told so
        if self.remote.session.reapplying:
            # after its power cut the remote's target may hold torn writes of records it had applied
            # but not made durable; it says so (not consistent, promotion refused) until it applied them again
            self.c.remote_torn_checks += 1
            return
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
        self.remote.rail.cut_at = None
        self.lu.flush()
        self.model.durable_idx = self.model.issued
        for _ in range(HEAL_STEPS):
            self.pump()
            self.now += 0.01
            st = self.remote.session.state
            if (self.link is not None and self.session.acked_seq >= self.journal.durable_seq
                    and not st.resync_active and not self.remote.session.reapplying and not self.lu.overflow
                    and not self.lu.dirty_snapshot().regions
                    and self.pending_clear is None):
                break
        else:
            self.c.wedges += 1
            raise Violation(f"no progress: after {HEAL_STEPS} steps without faults the remote is at "
                            f"{self.session.acked_seq}, the journal at {self.journal.durable_seq} (connected "
                            f"{self.link is not None}, resync {self.remote.session.state.resync_active}, re-applying "
                            f"{self.remote.session.reapplying}, overflow "
                            f"{self.lu.overflow}, dirty regions {len(self.lu.dirty_snapshot().regions)}, "
                            f"clear pending {self.pending_clear is not None})")
        if bytes(self.remote.blocks) != self.lu.read(0, NBLOCKS):
            self.c.prefix_violations += 1
            raise Violation("caught up, yet the remote target differs from the local disk")
        self.check_remote()

    # -- the campaign ----------------------------------------------------------------------------
    ACTIONS = ((0.50, "host write"), (0.54, "flush"), (0.56, "mark"), (0.57, "write cache switched"),
               (0.90, "link step"), (0.93, "power cut armed"), (0.945, "link fault"), (0.96, "corrupt frame"),
               (0.965, "kill local"), (0.97, "kill remote"), (0.975, "remote target full"),
               (0.99, "remote power cut armed"), (FAILOVER_FROM, "link step"), (1.0, "fail over and back"))

    def step(self, sid: int | None = None) -> None:
        """One step: step number `sid` of the seed (default: the next one). A step draws only on its
        own random stream (seed, sid), so a trace of step numbers replays with any of them left out."""
        self.c.steps += 1
        sid = self.c.steps if sid is None else sid
        self.rng = random.Random((self.seed << 40) | sid)
        self.now += 0.01
        if self.remote.full and self.c.steps >= self.full_until:
            self.remote.full = False
        r = self.rng.random()
        self.last_action = next(name for limit, name in self.ACTIONS if r < limit)
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
            elif r < 0.99:
                self.remote.rail.cut_at = self.remote.rail.ops + self.rng.randint(1, 12)
            elif r < FAILOVER_FROM:
                self.pump()
            else:
                fail_over(self)
                self.check_remote()
        except PowerCut:  # the power failed inside a flush, a mark, a journal read or a confirm
            self.c.cuts += 1
            self.recover_local(self.crash_mode(), inflight=None)
            self.check_remote()
        if sid % HEAL_EVERY == 0:
            self.heal()


def failure_kind(c: Counts) -> str:
    """Which property a failed campaign broke (the counter that is not 0)."""
    return next((k for k in ("lost", "prefix_violations", "applied_twice", "wedges") if getattr(c, k)), "")


def replay(seed: int, sids: Sequence[int], *, log: list[str] | None = None) -> tuple[Counts, str | None]:
    """Run exactly the steps `sids` of campaign `seed`, then a heal phase; returns the counts and the
    violation, or None. `log` gets one line per step (its number and action)."""
    camp = Campaign(seed)
    try:
        for sid in sids:
            camp.step(sid)
            if log is not None:
                log.append(f"step {sid}: {camp.last_action}")
        camp.heal()
    except Violation as exc:
        return camp.c, str(exc)
    return camp.c, None


def minimize(seed: int, sids: Sequence[int], kind: str, *, budget_s: float) -> tuple[list[int], bool]:
    """A shorter list of steps of campaign `seed` that still breaks property `kind`: first the shortest
    suffix that does (the steps just before a failure usually cause it), then delta debugging (drop
    chunks of steps, halving them down to single steps, while the failure stays). Returns the list
    and whether it is 1-minimal (no single step can go) or the time budget ran out first."""
    deadline = time.monotonic() + budget_s

    def fails(cand: Sequence[int]) -> bool:
        c, failure = replay(seed, cand)
        return failure is not None and failure_kind(c) == kind

    cur = list(sids)
    lo, hi = 0, len(cur) - 1  # the largest start whose suffix still fails, by bisection
    while lo < hi and time.monotonic() < deadline:
        mid = (lo + hi + 1) // 2
        if fails(cur[mid:]):
            lo = mid
        else:
            hi = mid - 1
    cur = cur[lo:]
    n = 2
    while len(cur) >= 2:
        if time.monotonic() >= deadline:
            return cur, False
        size = -(-len(cur) // n)
        for start in range(0, len(cur), size):
            cand = cur[:start] + cur[start + size:]
            if cand and fails(cand):
                cur = cand
                n = max(n - 1, 2)
                break
            if time.monotonic() >= deadline:
                return cur, False
        else:
            if size == 1:
                return cur, True
            n = min(len(cur), n * 2)
    return cur, True


def report_failure(seed: int, steps: int, kind: str, budget_s: float) -> list[str]:
    """The lines a failure prints: the minimized trace, each step's action, and how to keep it as a test."""
    t0 = time.monotonic()
    trace, minimal = minimize(seed, range(1, steps + 1), kind, budget_s=budget_s)
    log: list[str] = []
    _, failure = replay(seed, trace, log=log)
    ids = ",".join(map(str, trace))
    lines = [f"torture: shortest trace found ({len(trace)} of {steps} steps, "
             f"{'1-minimal' if minimal else 'time budget reached'}, {time.monotonic() - t0:.0f} s): "
             f"TORTURE_SEED={seed} TORTURE_TRACE={ids}"]
    lines += [f"torture:   {line}" for line in log]
    lines.append(f"torture:   then: {failure}")
    lines.append(f"torture: as a regression test in host_tests/test_torture.py: "
                 f"def test_seed_{seed}_trace() -> None: assert torture.replay({seed}, [{ids}])[1] is None")
    return lines


def run(seed: int, seconds: float, steps: int | None = None, *, real_share: float = 0.0) -> tuple[Counts, str | None]:
    """Run one campaign; returns its counts and the violation (with the step it happened at), or None.

    `real_share`: the fraction of the time given to rounds with real processes and files
    (`host_tests.torture_real`), run between heal phases; they draw on their own random streams, so
    the in-process steps stay the seed's."""
    camp = Campaign(seed)
    t0 = time.monotonic()
    deadline = t0 + seconds
    real_time = 0.0
    try:
        while (camp.c.steps < steps) if steps is not None else (time.monotonic() < deadline):
            camp.step()
            if real_share > 0 and camp.c.steps % HEAL_EVERY == 0 and \
                    real_time < real_share * (time.monotonic() - t0):
                r0 = time.monotonic()
                try:
                    real_round(seed, camp.c.real_rounds, camp.c, HostModel)
                except RealViolation as exc:
                    return camp.c, f"step {camp.c.steps}: {exc}"
                real_time += time.monotonic() - r0
        camp.heal()
    except Violation as exc:
        return camp.c, f"step {camp.c.steps}: {exc}"
    return camp.c, None


def summary(seed: int, seconds: float, c: Counts) -> str:
    return (f"torture: seed={seed} seconds={seconds:g} cuts={c.cuts} kills={c.kills} link_faults={c.link_faults} "
            f"corrupt_frames={c.corrupt_frames} enospc={c.enospc} overflows={c.overflows} promotions={c.promotions} "
            f"failbacks={c.failbacks} real_rounds={c.real_rounds} acked={c.acked} "
            f"lost={c.lost} prefix_violations={c.prefix_violations} applied_twice={c.applied_twice} "
            f"wedges={c.wedges}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=None, help="default: TORTURE_SEED, else a random seed")
    ap.add_argument("--seconds", type=float, default=None, help="default: TORTURE_SECONDS, else 60")
    ap.add_argument("--steps", type=int, default=None, help="stop after exactly N steps (default: TORTURE_STEPS)")
    ap.add_argument("--real-share", type=float, default=None,
                    help="fraction of the time for rounds with real processes (default: TORTURE_REAL_SHARE, else 0.2)")
    ap.add_argument("--trace", default=None,
                    help="replay exactly these steps of the seed, e.g. 3,17,18 (default: TORTURE_TRACE)")
    ap.add_argument("--minimize-seconds", type=float, default=None,
                    help="time for searching the shortest failing trace (default: TORTURE_MINIMIZE_SECONDS, else 300)")
    args = ap.parse_args(argv)
    env_seed, env_steps = os.environ.get("TORTURE_SEED"), os.environ.get("TORTURE_STEPS")
    seed = args.seed if args.seed is not None else int(env_seed) if env_seed else random.SystemRandom().randrange(1 << 31)
    seconds = args.seconds if args.seconds is not None else float(os.environ.get("TORTURE_SECONDS") or 60)
    steps = args.steps if args.steps is not None else int(env_steps) if env_steps else None
    logging.disable(logging.CRITICAL)  # the units log every overflow and resync; the counts say it
    print(f"torture: seed={seed} (replay with TORTURE_SEED={seed})", flush=True)
    t0 = time.monotonic()
    env_share = os.environ.get("TORTURE_REAL_SHARE")
    share = args.real_share if args.real_share is not None else float(env_share) if env_share else 0.2
    trace = args.trace if args.trace is not None else os.environ.get("TORTURE_TRACE") or None
    if trace:
        counts, failure = replay(seed, [int(x) for x in trace.split(",")])
        print(f"torture: trace of {counts.steps} steps: {failure or 'every property holds'}", flush=True)
        print(summary(seed, round(time.monotonic() - t0), counts), flush=True)
        return 1 if failure is not None else 0
    counts, failure = run(seed, seconds, steps, real_share=share)
    elapsed = time.monotonic() - t0
    print(f"torture: {counts.steps} steps, {counts.resyncs} resyncs, {counts.real_rounds} rounds with real "
          f"processes in {elapsed:.1f} s; {counts.remote_cuts} of the cuts hit the remote, remote checks "
          f"skipped while it said it was re-applying records its power cut may have torn: {counts.remote_torn_checks}; "
          f"promotions right after a remote power cut: {counts.promotion_checks} checked, "
          f"{counts.promotions_refused} refused; in process, failovers: {counts.promotions - counts.real_promotions} "
          f"promotions ({counts.failovers_refused} refused), {counts.failbacks - counts.real_failbacks} failbacks, "
          f"{counts.promoted_writes} standby host writes, {counts.split_brains} split brains, {counts.resolved} "
          f"resolved with resolve --keep, {counts.failover_loss} acknowledged writes the promotions discarded",
          flush=True)
    if failure is not None:
        print(f"torture: FAILED seed={seed} at {failure} (replay: TORTURE_SEED={seed} "
              f"TORTURE_STEPS={counts.steps})", flush=True)
        if "real round" not in failure:  # an in-process failure: its steps replay, so shorten them
            env_budget = os.environ.get("TORTURE_MINIMIZE_SECONDS")
            budget = args.minimize_seconds if args.minimize_seconds is not None else \
                float(env_budget) if env_budget else 300.0
            for line in report_failure(seed, counts.steps, failure_kind(counts), budget):
                print(line, flush=True)
    print(summary(seed, round(elapsed), counts), flush=True)
    return 1 if failure is not None else 0


if __name__ == "__main__":
    sys.exit(main())
